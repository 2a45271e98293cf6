//! The eBPF trace filter on a real nftables trace socket (`NFNLGRP_NFTRACE`): with every packet
//! traced by `meta nftrace set 1` in the router, only the selected packets' trace events reach
//! the socket, the header-less later events of those packets included.

use std::{collections::HashSet, io, net::SocketAddr, thread, time::Duration};

use iptrace::{
    bpf::TraceSocketFilter,
    filter::CompiledFilter,
    netfilter::{NetfilterSocket, Received, netlink::NetlinkMessages},
};
use iptrace_common::{
    message::NFT_TRACE_TYPE,
    uapi::{NFNLGRP_NFTRACE, NFTA_TRACE_ID, NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_TRANSPORT_HEADER},
};
use iptrace_tests::{Role, addr, lab, require_root};

/// A NETLINK_NETFILTER socket in the calling thread's netns, joined to the nftables trace group.
fn open_trace_socket() -> io::Result<NetfilterSocket> {
    let socket = NetfilterSocket::open()?;
    socket.join(&[NFNLGRP_NFTRACE])?;
    Ok(socket)
}

/// Every datagram waiting on `socket`.
fn drain(socket: &NetfilterSocket) -> Vec<Vec<u8>> {
    let mut datagrams = Vec::new();
    let mut buffer = vec![0_u8; 65536];
    while let Ok(Received::Datagram(n)) = socket.receive_queued(&mut buffer) {
        datagrams.push(buffer[..n].to_vec());
    }
    datagrams
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
    filter.attach(socket.fd()).unwrap();
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
        for attribute in message.nfnetlink().unwrap().1 {
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
