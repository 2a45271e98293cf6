//! The traffic generator: many UDP flows through `sendmmsg(2)` plus TCP SYNs from a raw socket,
//! paced to a packet rate and stopped after a duration. Call [`send`] on a thread inside the
//! lab's client namespace: the only destination is the lab's server address, so nothing can leave
//! the lab.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use iptrace_lab::{addr, internet_checksum};

/// The UDP flows go from this client port to `UDP_FIRST_PORT..UDP_FIRST_PORT + flows`.
pub const UDP_SOURCE_PORT: u16 = 40_000;
pub const UDP_FIRST_PORT: u16 = 5_000;
/// TCP SYNs go from `SYN_FIRST_SOURCE_PORT..+SYN_SOURCE_PORTS` to this server port.
pub const SYN_DESTINATION_PORT: u16 = 80;
const SYN_FIRST_SOURCE_PORT: u16 = 20_000;
const SYN_SOURCE_PORTS: u16 = 1_024;
/// Packets per `sendmmsg` (NAPI's weight, too).
const BATCH: usize = 64;
/// At or above this rate the generator is not paced: it sends as fast as the CPU lets it.
pub const UNPACED_PPS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
pub struct TrafficPlan {
    pub rate_pps: u64,
    pub duration: Duration,
    pub udp_flows: u16,
    /// One packet in this many is a TCP SYN (each from a new source port, so a new connection).
    pub syn_one_in: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficReport {
    pub udp_sent: u64,
    pub syn_sent: u64,
    pub elapsed: Duration,
    /// The sending thread's CPU time over the run (`CLOCK_THREAD_CPUTIME_ID`, nanoseconds): the
    /// softirq work of the whole path runs in it (see [`pin_to_last_cpu`]).
    pub thread_cpu_ns: u64,
    /// The CPU it ran on.
    pub cpu: usize,
}

/// The lab's client and server addresses as IPv4.
fn endpoints() -> (Ipv4Addr, Ipv4Addr) {
    match (addr::CLIENT, addr::SERVER) {
        (IpAddr::V4(c), IpAddr::V4(s)) => (c, s),
        _ => unreachable!("the lab's client and server have IPv4 addresses"),
    }
}

/// Sends until `plan.duration` has passed, at most `plan.rate_pps` packets a second.
pub fn send(plan: &TrafficPlan) -> io::Result<TrafficReport> {
    let cpu = pin_to_last_cpu()?;
    run_before_others()?;
    let (client, server) = endpoints();
    let mut udp = Sender::new(libc::SOCK_DGRAM, libc::IPPROTO_UDP)?;
    udp.bind(SocketAddrV4::new(client, UDP_SOURCE_PORT))?;
    let mut syn = Sender::new(libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let flows = plan.udp_flows.max(1);
    let udp_targets: Vec<libc::sockaddr_in> =
        (0..flows).map(|f| sockaddr_in(SocketAddrV4::new(server, UDP_FIRST_PORT + f))).collect();
    let syn_target = sockaddr_in(SocketAddrV4::new(server, 0));

    let mut report = TrafficReport { cpu, ..TrafficReport::default() };
    let cpu_at_start = thread_cpu_ns()?;
    let start = Instant::now();
    let mut sequence: u64 = 0;
    let (mut udp_batch, mut syn_batch) = (Batch::default(), Batch::default());
    let batch_interval = Duration::from_secs_f64(BATCH as f64 / plan.rate_pps.max(1) as f64);
    while start.elapsed() < plan.duration {
        let allowed = (start.elapsed().as_secs_f64() * plan.rate_pps as f64) as u64;
        let due = allowed.saturating_sub(report.udp_sent + report.syn_sent).min(BATCH as u64);
        // Paced, it sends whole batches and sleeps until the next is due: a wake-up per packet or
        // two would cost the sending CPU more than the path being measured (a VM's idle exit
        // and timer), and vary more.
        if due < BATCH as u64 && plan.rate_pps < UNPACED_PPS {
            let next = start + batch_interval.mul_f64(((report.udp_sent + report.syn_sent) / BATCH as u64 + 1) as f64);
            thread::sleep(next.saturating_duration_since(Instant::now()).max(Duration::from_micros(1)));
            continue;
        }
        for _ in 0..due {
            if plan.syn_one_in > 0 && sequence.is_multiple_of(plan.syn_one_in) {
                syn_batch.push(syn_packet(client, server, sequence), syn_target);
            } else {
                let flow = report.udp_sent + udp_batch.packets.len() as u64;
                udp_batch.push(udp_payload(sequence).to_vec(), udp_targets[(flow % u64::from(flows)) as usize]);
            }
            sequence += 1;
        }
        report.udp_sent += udp.send_batch(&mut udp_batch)?;
        report.syn_sent += syn.send_batch(&mut syn_batch)?;
    }
    report.elapsed = start.elapsed();
    report.thread_cpu_ns = thread_cpu_ns()? - cpu_at_start;
    Ok(report)
}

/// The calling thread's CPU time in nanoseconds. The scheduler keeps it to the nanosecond, and on
/// a kernel without `CONFIG_IRQ_TIME_ACCOUNTING` it includes the softirqs run in the thread's
/// context (design.md §15).
pub(crate) fn thread_cpu_ns() -> io::Result<u64> {
    // SAFETY: all-zero is a valid timespec.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: t is a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// The whole path (client, router, server) runs in softirq on the sending CPU, so that CPU is the
/// router's forwarding CPU. Keeping it in one place, rather than wherever the scheduler moves the
/// thread, keeps a tracer's threads off it the way a NIC queue's interrupt CPU would, and steadies
/// the rate from run to run. Returns the CPU.
fn pin_to_last_cpu() -> io::Result<usize> {
    let cpu = sending_cpu();
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 { Ok(cpu) } else { Err(io::Error::last_os_error()) }
}

/// Puts the calling thread in the real-time class (`SCHED_FIFO`, lowest priority), as a NIC's
/// interrupt and softirq work preempts ordinary tasks: other work on the CPU (a compiler) then
/// runs only while the generator waits for its next batch, and does not cut into the path's work
/// and cool its caches in the middle of it. The kernel's real-time throttling leaves ordinary
/// tasks 5 % of the CPU even in the saturated phase.
fn run_before_others() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: param is a valid sched_param; 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU [`send`] runs on: the last one.
pub fn sending_cpu() -> usize {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    cpus - 1
}

/// Each payload is unique, so that a tracer can tell the packets of one flow apart.
fn udp_payload(sequence: u64) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[..16].copy_from_slice(b"iptrace-bench-00");
    p[16..24].copy_from_slice(&sequence.to_be_bytes());
    p
}

/// An IPv4 TCP SYN; the kernel fills in the IP checksum, total length and ID (IP_HDRINCL). The
/// TCP checksum must be right: conntrack marks packets with a bad one INVALID.
fn syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sequence: u64) -> Vec<u8> {
    let source_port = SYN_FIRST_SOURCE_PORT + (sequence % u64::from(SYN_SOURCE_PORTS)) as u16;
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&source_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&SYN_DESTINATION_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&(sequence as u32).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(tcp);
    let sum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    p
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// Packets waiting for one `sendmmsg` call.
#[derive(Default)]
struct Batch {
    packets: Vec<Vec<u8>>,
    targets: Vec<libc::sockaddr_in>,
}

impl Batch {
    fn push(&mut self, packet: Vec<u8>, target: libc::sockaddr_in) {
        self.packets.push(packet);
        self.targets.push(target);
    }
}

struct Sender {
    socket: OwnedFd,
}

impl Sender {
    fn new(kind: libc::c_int, protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and owned by nobody else.
        Ok(Self { socket: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn bind(&mut self, at: SocketAddrV4) -> io::Result<()> {
        let sa = sockaddr_in(at);
        // SAFETY: sa is a valid sockaddr_in of the length passed.
        let rc = unsafe {
            libc::bind(
                self.socket.as_raw_fd(),
                (&raw const sa).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Sends and empties `batch`; returns how many the kernel took. A full device backlog drops
    /// packets later, silently, as it would on a real router.
    fn send_batch(&mut self, batch: &mut Batch) -> io::Result<u64> {
        let mut iovecs: Vec<libc::iovec> = batch
            .packets
            .iter_mut()
            .map(|p| libc::iovec { iov_base: p.as_mut_ptr().cast(), iov_len: p.len() })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .zip(batch.targets.iter_mut())
            .map(|(iov, target)| {
                // SAFETY: all-zero is a valid msghdr.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (target as *mut libc::sockaddr_in).cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = iov;
                h.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: h, msg_len: 0 }
            })
            .collect();
        let mut sent = 0usize;
        while sent < headers.len() {
            let rest = &mut headers[sent..];
            // SAFETY: every header points at live buffers and addresses of `batch`.
            let n =
                unsafe { libc::sendmmsg(self.socket.as_raw_fd(), rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // A full socket buffer or an unresolved neighbour: the packet is not sent.
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => break,
                    _ => return Err(e),
                }
            }
            sent += n.max(0) as usize;
        }
        batch.packets.clear();
        batch.targets.clear();
        Ok(sent as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksum_verifies() {
        let (c, s) = endpoints();
        let p = syn_packet(c, s, 7);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&c.octets());
        pseudo.extend_from_slice(&s.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
