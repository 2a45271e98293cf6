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
    time::Duration,
};

use iptrace::{
    capture::TraceSocket,
    decode::{Family, nflog::NFULNL_PACKET_TYPE, nftrace::NFT_TRACE_TYPE},
    instrument::Owner,
    netfilter::{NetfilterSocket, Received, netlink::NetlinkMessages},
};
use iptrace_common::uapi::NFNLGRP_NFTRACE;
use iptrace_lab::{Lab, LabError, Role};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("cannot read {what}: {detail}")]
    Unreadable { what: &'static str, detail: String },
    #[error("the harness's trace listener failed")]
    Listener(#[source] io::Error),
}

/// iptrace's eBPF programs, by the names the kernel lists them under: the drop-reason program
/// on `skb:kfree_skb`, the trace socket's filter, and the pinned prefilter of long selections.
pub const IPTRACE_PROGRAMS: [&str; 3] = ["drop_reasons", "trace_filter", "xt_prefilter"];

/// Runs of one program and the time spent in them (`bpf_prog_info.run_cnt`, `run_time_ns`),
/// which the kernel counts only while run-time statistics are enabled ([`RunTimeStatistics`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    pub runs: u64,
    pub ns: u64,
}

/// [`ProgramRuns`] of each of [`IPTRACE_PROGRAMS`], then of [`CLOCK_REFERENCE`], each summed
/// over the loaded programs of that name.
pub fn program_runs() -> [ProgramRuns; IPTRACE_PROGRAMS.len() + 1] {
    let mut runs = [ProgramRuns::default(); IPTRACE_PROGRAMS.len() + 1];
    for info in aya::programs::loaded_programs().flatten() {
        let Some(i) = info
            .name_as_str()
            .and_then(|name| IPTRACE_PROGRAMS.iter().chain([&CLOCK_REFERENCE]).position(|p| *p == name))
        else {
            continue;
        };
        runs[i].runs += info.run_count();
        runs[i].ns += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
    }
    runs
}

/// The kernel counts every eBPF program's runs and run time while this is held
/// (`BPF_ENABLE_STATS` with `BPF_STATS_RUN_TIME`, Linux 5.8; the count stops when the descriptor
/// closes). Counting adds two clock reads to each run, so it is held only around the phase that
/// measures the programs, never around the phases whose forwarding CPU is compared.
pub struct RunTimeStatistics {
    _enabled: std::os::fd::OwnedFd,
}

impl RunTimeStatistics {
    pub fn enable() -> Result<Self, KernelError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| Self { _enabled: fd })
            .map_err(|e| KernelError::Unreadable { what: "eBPF run-time statistics", detail: e.to_string() })
    }
}

/// A program that returns at once, on the tracepoint of iptrace's drop program (a BTF-enabled
/// raw tracepoint on `skb:kfree_skb`, as that one is), for as long as this is held.
///
/// Run-time statistics time each run between two clock reads, which adds their cost (about
/// 70 ns on a VM's `kvm-clock`) to every program's count. This program runs as often as the
/// drop program, in the same phase, and does nothing: its time per run is that cost, and the
/// drop program's own time per run is its count minus this one's.
pub struct ClockReference {
    _program: OwnedFd,
    _link: OwnedFd,
}

/// The name the kernel lists [`ClockReference`]'s program under (at most 15 bytes).
pub const CLOCK_REFERENCE: &str = "clock_reference";

impl ClockReference {
    pub fn attach() -> Result<Self, KernelError> {
        let unreadable = |detail: String| KernelError::Unreadable { what: "the clock reference program", detail };
        let btf = std::fs::read(iptrace::drops::KERNEL_BTF).map_err(|e| unreadable(e.to_string()))?;
        let attach_btf_id = iptrace::drops::Btf::parse(&btf)
            .and_then(|btf| btf.tracepoint_type(iptrace_common::drops::DROP_TRACEPOINT))
            .map_err(|e| unreadable(e.to_string()))?;
        // r0 = 0; exit
        let insns: [u64; 2] = [0xb7, 0x95];
        let mut prog_name = [0u8; 16];
        prog_name[..CLOCK_REFERENCE.len()].copy_from_slice(CLOCK_REFERENCE.as_bytes());
        let load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            prog_name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id,
            ..ProgLoadAttr::default()
        };
        let program = bpf(BPF_PROG_LOAD, &load).map_err(|e| unreadable(format!("BPF_PROG_LOAD: {e}")))?;
        let open = RawTracepointOpenAttr { name: 0, prog_fd: program.as_raw_fd() as u32, padding: 0 };
        let link =
            bpf(BPF_RAW_TRACEPOINT_OPEN, &open).map_err(|e| unreadable(format!("BPF_RAW_TRACEPOINT_OPEN: {e}")))?;
        Ok(Self { _program: program, _link: link })
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id` (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN`: no name for a BTF-enabled program. The
/// padding is a field so that every byte handed to the kernel is set.
#[repr(C)]
struct RawTracepointOpenAttr {
    name: u64,
    prog_fd: u32,
    padding: u32,
}

/// The `bpf(2)` command `cmd` that returns a new descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a `bpf_attr` prefix of its own size; the kernel zero-extends the rest.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// CPU time in nanoseconds of the softirq thread of `cpu` (`ksoftirqd/N`, from
/// `/proc/PID/schedstat`): the forwarding work the sending thread hands off when a softirq round
/// runs out of budget. `None` when it cannot be found.
pub fn softirq_thread_ns(cpu: usize) -> Option<u64> {
    let name = format!("ksoftirqd/{cpu}");
    let pid = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim() == name).then_some(pid)
    })?;
    std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?.split_whitespace().next()?.parse().ok()
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
    /// The CPU time of a floor's reader (the trace socket read by a thread that only counts),
    /// seconds: what taking the kernel's messages costs, before any work on them.
    pub reader_cpu_seconds: Option<f64>,
}

/// Which trace messages a [`TraceListener`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listened {
    /// nf_tables trace events, on the `NFNLGRP_NFTRACE` multicast group beside the tool under test
    /// (it takes nothing from the tool, but the kernel builds one more copy of each message).
    Nftrace,
    /// What iptrace's own trace socket receives, set up as iptrace sets it up: nfnetlink_log's
    /// group 0 (IPv4) when `nflog`, `NFNLGRP_NFTRACE` and `NFNLGRP_NFTABLES` when `nftrace`. A
    /// reader that only counts, so that what tracing costs the kernel itself can be measured.
    TraceSocket { nflog: bool, nftrace: bool },
}

/// A thread in the router's netns counting trace messages until finished.
pub struct TraceListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<TraceMessages>>>,
}

impl TraceListener {
    /// Starts listening; returns once the socket receives.
    pub fn start(lab: &Lab, listened: Listened) -> Result<Self, KernelError> {
        let netns = lab.ns(Role::Router);
        let stop = Arc::new(AtomicBool::new(false));
        let (joined_tx, joined_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let opened = iptrace::netns::enter(&netns)
                    .map_err(io::Error::other)
                    .and_then(|()| ListenerSocket::open(listened));
                let socket = match opened {
                    Ok(s) => {
                        let _ = joined_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = joined_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                socket.count(&stop)
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

impl Drop for TraceListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum ListenerSocket {
    Nftrace(NetfilterSocket),
    /// iptrace's own socket set-up (bound to group 0, whole packets, 128 MiB buffer); only the
    /// reading differs.
    Trace(TraceSocket),
}

impl ListenerSocket {
    fn open(listened: Listened) -> io::Result<Self> {
        match listened {
            Listened::Nftrace => open_listener().map(Self::Nftrace),
            Listened::TraceSocket { nflog, nftrace } => {
                let families: &[Family] = if nflog { &[Family::Ipv4] } else { &[] };
                let socket = TraceSocket::open(families, Duration::from_millis(50)).map_err(io::Error::other)?;
                if nftrace {
                    socket.join_nftrace().map_err(io::Error::other)?;
                }
                Ok(Self::Trace(socket))
            }
        }
    }

    fn count(&self, stop: &AtomicBool) -> io::Result<TraceMessages> {
        match self {
            Self::Nftrace(socket) => count_messages(socket, stop),
            Self::Trace(socket) => count_trace_socket_messages(socket, stop),
        }
    }
}

fn open_listener() -> io::Result<NetfilterSocket> {
    let socket = NetfilterSocket::open()?;
    // Large enough that this listener keeps up where the tools under test do not.
    socket.set_receive_buffer(64 << 20)?;
    socket.set_receive_timeout(Duration::from_millis(50))?;
    socket.join(&[NFNLGRP_NFTRACE])?;
    Ok(socket)
}

fn count_messages(socket: &NetfilterSocket, stop: &AtomicBool) -> io::Result<TraceMessages> {
    let mut counts = TraceMessages::default();
    let mut buf = vec![0u8; 1 << 16];
    // Keep reading after the stop until the queue is empty, so late messages are counted.
    loop {
        match socket.receive(&mut buf)? {
            Received::Datagram(n) => counts.messages += messages_of_type(&buf[..n], NFT_TRACE_TYPE),
            Received::Overrun => counts.overruns += 1,
            Received::Idle if stop.load(Ordering::Relaxed) => return Ok(counts),
            Received::Idle => {}
        }
    }
}

fn count_trace_socket_messages(socket: &TraceSocket, stop: &AtomicBool) -> io::Result<TraceMessages> {
    let mut counts = TraceMessages::default();
    let mut buf = vec![0u8; 1 << 17];
    let cpu_at_start = crate::traffic::thread_cpu_ns()?;
    // As above: after the stop, until the queue is empty.
    loop {
        match socket.receive(&mut buf).map_err(io::Error::other)? {
            Received::Datagram(n) => {
                counts.messages +=
                    messages_of_type(&buf[..n], NFULNL_PACKET_TYPE) + messages_of_type(&buf[..n], NFT_TRACE_TYPE)
            }
            Received::Overrun => counts.overruns += 1,
            Received::Idle if stop.load(Ordering::Relaxed) => {
                let cpu_ns = crate::traffic::thread_cpu_ns()? - cpu_at_start;
                counts.reader_cpu_seconds = Some(cpu_ns as f64 / 1e9);
                return Ok(counts);
            }
            Received::Idle => {}
        }
    }
}

/// The netlink messages of `message_type` in a datagram (walking every `nlmsghdr`).
fn messages_of_type(datagram: &[u8], message_type: u16) -> u64 {
    NetlinkMessages::new(datagram).flatten().filter(|m| m.message_type == message_type).count() as u64
}
