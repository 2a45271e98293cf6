//! The eBPF trace filter on a real nftables trace socket (`NFNLGRP_NFTRACE`): with every packet
//! traced by `meta nftrace set 1` in the router, only the selected packets' trace events reach
//! the socket, the header-less later events of those packets included.

use std::{
    collections::HashSet,
    io, mem,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use iptrace::{
    bpf::TraceSocketFilter,
    decode::netlink::{Attributes, NetlinkMessages},
    filter::CompiledFilter,
};
use iptrace_common::{
    message::NFT_TRACE_TYPE,
    uapi::{NFNLGRP_NFTRACE, NFTA_TRACE_ID, NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_TRANSPORT_HEADER},
};
use iptrace_tests::{Role, addr, lab, require_root};

/// A NETLINK_NETFILTER socket in the calling thread's netns, bound, then joined to the nftables
/// trace group (an unbound socket receives nothing, design.md §5.1).
fn open_trace_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; we set its family.
    let mut address: libc::sockaddr_nl = unsafe { mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `address` is a sockaddr_nl of the length given.
    let bound = unsafe { libc::bind(fd, (&raw const address).cast(), mem::size_of_val(&address) as u32) };
    let group = NFNLGRP_NFTRACE;
    // SAFETY: `group` is a u32 of the length given.
    let joined =
        unsafe { libc::setsockopt(fd, libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, (&raw const group).cast(), 4) };
    if bound != 0 || joined != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Every datagram waiting on `socket`.
fn drain(socket: &OwnedFd) -> Vec<Vec<u8>> {
    let mut datagrams = Vec::new();
    let mut buffer = vec![0_u8; 65536];
    loop {
        // SAFETY: `buffer` is writable for its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT) };
        let Ok(n) = usize::try_from(n) else { return datagrams };
        datagrams.push(buffer[..n].to_vec());
    }
}

#[test]
fn only_selected_nft_trace_events_reach_the_socket() {
    if !require_root("only_selected_nft_trace_events_reach_the_socket") {
        return;
    }
    let lab = lab("nftflt");
    for command in [
        &["nft", "add", "table", "inet", "iptrace_test"][..],
        &["nft", "add", "chain", "inet", "iptrace_test", "c", "{ type filter hook prerouting priority -350; }"],
        &["nft", "add", "rule", "inet", "iptrace_test", "c", "meta nftrace set 1"],
    ] {
        let out = lab.exec(Role::Router, command, "").unwrap();
        assert!(out.status.success(), "{command:?}: {out:?}");
    }
    let socket = lab.in_ns(Role::Router, open_trace_socket).unwrap().unwrap();
    let selection = CompiledFilter::compile("udp dst port 9999").unwrap();
    let mut filter = TraceSocketFilter::load(Some(selection.instructions()), false).unwrap();
    filter.attach(socket.as_fd()).unwrap();
    // Queued before the filter was attached (IPv6 neighbour discovery, MLD), so never judged.
    drain(&socket);

    let client = SocketAddr::new(addr::CLIENT, 0);
    lab.udp_burst(Role::Client, client, SocketAddr::new(addr::SERVER, 5000), b"not selected", 20).unwrap();
    for _ in 0..3 {
        lab.udp(Role::Client, client, SocketAddr::new(addr::SERVER, 9999), b"selected").unwrap();
    }
    thread::sleep(Duration::from_millis(300));

    let datagrams = drain(&socket);
    let mut selected_ids = HashSet::new();
    let mut later_events = 0;
    for datagram in &datagrams {
        let message = NetlinkMessages::new(datagram).next().unwrap().unwrap();
        assert_eq!(message.message_type, NFT_TRACE_TYPE);
        let (mut id, mut network, mut transport) = (None, None, None);
        for attribute in Attributes::new(&message.payload[4..]) {
            let attribute = attribute.unwrap();
            match u32::from(attribute.kind) {
                NFTA_TRACE_ID => id = Some(attribute.value.to_vec()),
                NFTA_TRACE_NETWORK_HEADER => network = Some(attribute.value),
                NFTA_TRACE_TRANSPORT_HEADER => transport = Some(attribute.value),
                _ => {}
            }
        }
        let id = id.unwrap();
        match network {
            Some(network) => {
                let headers = [network, transport.unwrap()].concat();
                assert!(selection.matches(&headers), "unselected first event {headers:02x?}");
                selected_ids.insert(id);
            }
            None => {
                assert!(selected_ids.contains(&id), "later event of an unselected id");
                later_events += 1;
            }
        }
    }
    // Per packet: the rule, the end of the chain and the policy.
    assert_eq!((selected_ids.len(), later_events), (3, 6), "{} datagrams", datagrams.len());
    let counters = filter.counters().unwrap();
    assert_eq!(counters.passed, datagrams.len() as u64, "{counters:?}");
    assert_eq!(counters.seen, counters.passed + counters.dropped, "{counters:?}");
    assert!(counters.dropped >= 60, "{counters:?}");
}
