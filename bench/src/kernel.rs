//! The kernel's side of each figure, counted independently of the tracer under test: packets the
//! server received (interface counters), packets the kernel marked for tracing (counters of the
//! rule that marks them), and nftables trace messages it delivered (a minimal listener of its
//! own on `NFNLGRP_NFTRACE`; multicast, so it does not take anything from the tracer).
//!
//! nflog's group 0 has a single owner per netns, so for iptrace the messages come from its own
//! `--stats`, and the traced packets from the counters of whichever marker it chose: its legacy
//! TRACE rules, or the marking rules of its nf_tables table.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
};

use iptrace::{
    instrument::Owner,
    lab::{Lab, LabError, Role},
};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("cannot read {what}: {detail}")]
    Unreadable { what: &'static str, detail: String },
    #[error("the NFNLGRP_NFTRACE listener failed: {0}")]
    Listener(#[source] io::Error),
}

/// Packets received on the server's `eth0`, from `/proc/net/dev` of its netns.
pub fn server_received_packets(lab: &Lab) -> Result<u64, KernelError> {
    let dev = lab
        .in_ns(Role::Server, || std::fs::read_to_string("/proc/thread-self/net/dev"))?
        .map_err(|e| KernelError::Unreadable { what: "the server's /proc/net/dev", detail: e.to_string() })?;
    // "  eth0: rx_bytes rx_packets ..."
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("eth0:"))
        .and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| KernelError::Unreadable { what: "eth0's rx_packets", detail: dev.clone() })
}

/// The packet counters of the rules with a TRACE target in raw PREROUTING, summed, as
/// `binary -t raw -L PREROUTING -v -x -n` lists them (iptables-legacy or iptables-nft).
pub fn trace_rule_packets(lab: &Lab, binary: &str) -> Result<u64, KernelError> {
    let out = lab.exec(Role::Router, &[binary, "-w", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"], "")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("TRACE"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// The packets counted by the `counter` of an nft chain's rules.
pub fn nft_chain_counter(lab: &Lab, family: &str, table: &str, chain: &str) -> Result<u64, KernelError> {
    let out = lab.exec(Role::Router, &["nft", "list", "chain", family, table, chain], "")?;
    Ok(counted_packets(&String::from_utf8_lossy(&out.stdout)))
}

/// The packets iptrace's nf_tables tables marked: their marking rules' counters, summed. Read
/// while iptrace runs, since it deletes its table on exit.
pub fn iptrace_table_packets(lab: &Lab) -> Result<u64, KernelError> {
    let out = lab.exec(Role::Router, &["nft", "list", "tables", "inet"], "")?;
    let tables = String::from_utf8_lossy(&out.stdout);
    let mut packets = 0;
    for table in tables.lines().filter_map(|l| l.trim().strip_prefix("table inet ")) {
        if Owner::from_table_name(table).is_some() {
            let out = lab.exec(Role::Router, &["nft", "list", "table", "inet", table], "")?;
            packets += counted_packets(&String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(packets)
}

/// The sum of the `counter packets N bytes M` statements in an nft listing.
fn counted_packets(listing: &str) -> u64 {
    listing
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// What the nftables trace listener received.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceMessages {
    pub messages: u64,
    /// ENOBUFS seen: the listener itself lost messages (then `messages` is a lower bound).
    pub overruns: u64,
}

/// A thread in the router's netns counting `NFT_MSG_TRACE` messages until finished.
pub struct NftraceListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<TraceMessages>>>,
}

const NFNLGRP_NFTRACE: libc::c_int = 9;
const NFT_MSG_TRACE_TYPE: u16 = (10 << 8) | 17;

impl NftraceListener {
    /// Starts listening; returns once the socket has joined the group.
    pub fn start(lab: &Lab) -> Result<Self, KernelError> {
        let netns = lab.ns(Role::Router);
        let stop = Arc::new(AtomicBool::new(false));
        let (joined_tx, joined_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let joined = iptrace::netns::enter(&netns).map_err(io::Error::other).and_then(|()| open_listener());
                let socket = match joined {
                    Ok(s) => {
                        let _ = joined_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = joined_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                count_messages(&socket, &stop)
            })
        };
        joined_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("listener thread died")))
            .map_err(KernelError::Listener)?;
        Ok(Self { stop, thread: Some(thread) })
    }

    pub fn finish(mut self) -> Result<TraceMessages, KernelError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map_or(Ok(TraceMessages::default()), |t| {
                t.join().unwrap_or_else(|_| Err(io::Error::other("listener panicked")))
            })
            .map_err(KernelError::Listener)
    }
}

impl Drop for NftraceListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_listener() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2), owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level, option, value: &[u8]| {
        // SAFETY: value is a live buffer of the length passed.
        let rc = unsafe {
            libc::setsockopt(socket.as_raw_fd(), level, option, value.as_ptr().cast(), value.len() as libc::socklen_t)
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    };
    // Large enough that this listener keeps up where the tools under test do not.
    set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(64i32 << 20).to_ne_bytes())?;
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    // SAFETY: timeval is plain data; viewed as its bytes for setsockopt.
    let timeout_bytes =
        unsafe { std::slice::from_raw_parts((&raw const timeout).cast::<u8>(), size_of::<libc::timeval>()) };
    set(libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout_bytes)?;
    // SAFETY: all-zero is a valid sockaddr_nl; the kernel assigns the port id.
    let mut local: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // Bind before joining: an unbound socket receives nothing (kernel-interfaces §5.1).
    // SAFETY: local is a valid sockaddr_nl.
    if unsafe {
        libc::bind(socket.as_raw_fd(), (&raw const local).cast(), size_of::<libc::sockaddr_nl>() as libc::socklen_t)
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    set(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &NFNLGRP_NFTRACE.to_ne_bytes())?;
    Ok(socket)
}

fn count_messages(socket: &OwnedFd, stop: &AtomicBool) -> io::Result<TraceMessages> {
    let mut counts = TraceMessages::default();
    let mut buf = vec![0u8; 1 << 16];
    // Keep reading after the stop until the queue is empty, so late messages are counted.
    let mut idle_after_stop = false;
    while !idle_after_stop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) => counts.overruns += 1,
                Some(libc::EAGAIN | libc::EINTR) => idle_after_stop = stop.load(Ordering::Relaxed),
                _ => return Err(e),
            }
            continue;
        }
        let mut rest = &buf[..n as usize];
        // Walk every nlmsghdr {u32 len; u16 type; ...}.
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if u16::from_ne_bytes([rest[4], rest[5]]) == NFT_MSG_TRACE_TYPE {
                counts.messages += 1;
            }
            let step = (len + 3) & !3;
            if len < 16 || step > rest.len() {
                break;
            }
            rest = &rest[step..];
        }
    }
    Ok(counts)
}
