//! Traffic from inside a lab's namespaces (echo requests, UDP, TCP exchanges from a chosen source
//! address) and TCP echo servers to answer it.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{Lab, LabError, Role, enter};

impl Lab {
    /// Sends one ICMP (v4) or ICMPv6 echo request from a role's namespace; its id is derived from
    /// `seq`, so every echo starts a new conntrack entry.
    pub fn ping(&self, role: Role, src: IpAddr, dst: IpAddr, seq: u16) -> Result<(), LabError> {
        let ns = self.ns(role);
        self.in_ns(role, move || send_echo(src, dst, seq))?.map_err(|source| LabError::Io { ns, source })
    }

    /// Sends one UDP datagram from `src` (port chosen by the kernel when 0).
    pub fn udp(&self, role: Role, src: SocketAddr, dst: SocketAddr, payload: &'static [u8]) -> Result<(), LabError> {
        let ns = self.ns(role);
        self.in_ns(role, move || UdpSocket::bind(src).and_then(|s| s.send_to(payload, dst)).map(drop))?
            .map_err(|source| LabError::Io { ns, source })
    }

    /// Sends `count` UDP datagrams from one socket bound to `src`, as fast as it can.
    pub fn udp_burst(
        &self,
        role: Role,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'static [u8],
        count: usize,
    ) -> Result<(), LabError> {
        let ns = self.ns(role);
        self.in_ns(role, move || {
            let socket = UdpSocket::bind(src)?;
            (0..count).try_for_each(|_| socket.send_to(payload, dst).map(drop))
        })?
        .map_err(|source| LabError::Io { ns, source })
    }

    /// Opens a TCP connection from `src` to `dst`, sends `payload`, reads the echo and closes.
    /// A refused or dropped connection is not an error: the packets were sent, which is what a
    /// trace needs.
    pub fn tcp(&self, role: Role, src: IpAddr, dst: SocketAddr, payload: &'static [u8]) -> Result<bool, LabError> {
        let ns = self.ns(role);
        self.in_ns(role, move || tcp_exchange(src, dst, payload))?.map_err(|source| LabError::Io { ns, source })
    }

    /// Starts TCP echo servers on `ports` of every address in a role's namespace; they stop when
    /// the returned handle is dropped.
    pub fn tcp_echo_servers(&self, role: Role, ports: &[u16]) -> Result<EchoServers, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (ns, stop) = (self.ns(role), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(thread::spawn(move || {
                let listener = enter(&ns)
                    .and_then(|()| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 512];
                            if let Ok(n) = conn.read(&mut buf) {
                                let _ = conn.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            rx.recv()
                .unwrap_or_else(|_| Err(io::Error::other("echo server thread died")))
                .map_err(|source| LabError::Io { ns: self.ns(role), source })?;
        }
        Ok(EchoServers { stop, threads })
    }
}

/// Running echo servers; stopped and joined on drop.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A socket of `kind` and `protocol` bound to `src`: std has no bind-before-connect or raw
/// sockets, and the lab's clients must choose their source address.
fn bound_socket(src: IpAddr, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    let domain = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2), owned right away.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: storage holds a valid sockaddr of length len.
    if unsafe { libc::bind(owned.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

fn tcp_exchange(src: IpAddr, dst: SocketAddr, payload: &[u8]) -> io::Result<bool> {
    let owned = bound_socket(src, libc::SOCK_STREAM, 0)?;
    let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: SO_SNDTIMEO bounds connect(2) on a blocking socket.
    unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    let (storage, len) = sockaddr(dst);
    // SAFETY: as above.
    if unsafe { libc::connect(owned.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        return Ok(false);
    }
    let mut stream = TcpStream::from(owned);
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(payload)?;
    let mut buf = vec![0u8; payload.len()];
    let ok = stream.read_exact(&mut buf).is_ok();
    Ok(ok)
}

/// `addr` as the sockaddr bind(2), connect(2) and sendto(2) take, and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// An echo request through a raw socket; for ICMPv6 the kernel fills in the checksum.
fn send_echo(src: IpAddr, dst: IpAddr, seq: u16) -> io::Result<()> {
    let (proto, kind) = match dst {
        IpAddr::V4(_) => (libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::IPPROTO_ICMPV6, 128u8),
    };
    let owned = bound_socket(src, libc::SOCK_RAW, proto)?;
    // An id per sequence number: each echo is a connection of its own to conntrack.
    let mut msg = vec![kind, 0, 0, 0];
    msg.extend_from_slice(&0x1200u16.wrapping_add(seq).to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(b"iptrace lab echo");
    if dst.is_ipv4() {
        let sum = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let (storage, len) = sockaddr(SocketAddr::new(dst, 0));
    // SAFETY: msg and storage are valid for the lengths passed.
    let sent =
        unsafe { libc::sendto(owned.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0, (&raw const storage).cast(), len) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The RFC 1071 checksum (ICMP, and TCP over a pseudo-header), for packets built by hand.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
