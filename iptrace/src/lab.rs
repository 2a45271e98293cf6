//! Throwaway network labs for `iptrace --demo` and the integration tests: a client, a router and
//! a server namespace joined by veth pairs, traffic sent from inside them, and everything removed
//! when the [`Lab`] is dropped (also when a test fails). Nothing here touches the caller's own
//! namespace beyond creating and deleting the lab's.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::netns;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("in namespace {ns}")]
    Io {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
}

/// Addresses of the standard lab. Client LAN 10.5.1.0/24 and fd00:5:1::/64 (two clients, the
/// second one "restricted"), server LAN 172.16.2.0/24 and fd00:16:2::/64; the router SNATs the
/// client LAN to 172.16.2.200-201.
pub mod addr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 5, 1, 7));
    pub const CLIENT_RESTRICTED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 5, 1, 8));
    pub const ROUTER_CLIENT_SIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 5, 1, 1));
    pub const ROUTER_SERVER_SIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 16, 2, 1));
    pub const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 16, 2, 2));
    pub const SNAT_POOL: [IpAddr; 2] =
        [IpAddr::V4(Ipv4Addr::new(172, 16, 2, 200)), IpAddr::V4(Ipv4Addr::new(172, 16, 2, 201))];
    pub const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, 7));
    pub const SERVER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x16, 2, 0, 0, 0, 0, 2));
}

const MAC_VIF0: &str = "02:00:0a:05:01:01";
const MAC_CLIENT: &str = "02:00:0a:05:01:07";
const MAC_VIF2: &str = "02:00:ac:10:02:01";
const MAC_SERVER: &str = "02:00:ac:10:02:02";

/// The three roles of the standard lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Router,
    Server,
}

/// Namespaces named `<prefix>-client`, `<prefix>-router`, `<prefix>-server`, deleted on drop.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    created: Vec<String>,
}

impl Lab {
    /// Builds the client/router/server lab with forwarding on in the router. Router interfaces:
    /// `vif0` towards the client, `vif2` towards the server (as in the original tool's examples).
    pub fn router_lab(prefix: &str) -> Result<Self, LabError> {
        let mut lab = Self { prefix: prefix.to_owned(), created: Vec::new() };
        // Leftovers of a run that was killed: start clean.
        for role in [Role::Client, Role::Router, Role::Server] {
            let _ = run(&["ip", "netns", "del", &lab.ns(role)]);
        }
        for role in [Role::Client, Role::Router, Role::Server] {
            let ns = lab.ns(role);
            run(&["ip", "netns", "add", &ns])?;
            lab.created.push(ns.clone());
            // No duplicate address detection: link-local addresses would stay tentative for a
            // second, and neighbour discovery with them, so the first IPv6 packets would wait.
            lab.in_ns(role, || {
                std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/accept_dad", "0")
            })?
            .map_err(|source| LabError::Io { ns, source })?;
        }
        let (c, r, s) = (lab.ns(Role::Client), lab.ns(Role::Router), lab.ns(Role::Server));
        run(&[
            "ip", "link", "add", "vif0", "address", MAC_VIF0, "netns", &r, "type", "veth", "peer", "name", "eth0",
            "address", MAC_CLIENT, "netns", &c,
        ])?;
        run(&[
            "ip", "link", "add", "vif2", "address", MAC_VIF2, "netns", &r, "type", "veth", "peer", "name", "eth0",
            "address", MAC_SERVER, "netns", &s,
        ])?;
        let steps: &[(&str, &[&str])] = &[
            (&c, &["addr", "add", "10.5.1.7/24", "dev", "eth0"]),
            (&c, &["addr", "add", "10.5.1.8/24", "dev", "eth0"]),
            (&c, &["addr", "add", "fd00:5:1::7/64", "dev", "eth0"]),
            (&r, &["addr", "add", "10.5.1.1/24", "dev", "vif0"]),
            (&r, &["addr", "add", "fd00:5:1::1/64", "dev", "vif0"]),
            (&r, &["addr", "add", "172.16.2.1/24", "dev", "vif2"]),
            (&r, &["addr", "add", "172.16.2.200/24", "dev", "vif2"]),
            (&r, &["addr", "add", "172.16.2.201/24", "dev", "vif2"]),
            (&r, &["addr", "add", "fd00:16:2::1/64", "dev", "vif2"]),
            (&s, &["addr", "add", "172.16.2.2/24", "dev", "eth0"]),
            (&s, &["addr", "add", "fd00:16:2::2/64", "dev", "eth0"]),
        ];
        for (ns, args) in steps {
            lab.ip(ns, args)?;
        }
        for (ns, dev) in [(&c, "eth0"), (&r, "vif0"), (&r, "vif2"), (&s, "eth0"), (&c, "lo"), (&r, "lo"), (&s, "lo")] {
            lab.ip(ns, &["link", "set", dev, "up"])?;
        }
        // Permanent neighbours: no ARP or neighbour discovery, whose first probes a veth may drop
        // while it is still coming up, and no such packets in the traces.
        let neighbours: &[(&str, &str, &[&str], &str)] = &[
            (&c, "eth0", &["10.5.1.1", "fd00:5:1::1"], MAC_VIF0),
            (&r, "vif0", &["10.5.1.7", "10.5.1.8", "fd00:5:1::7"], MAC_CLIENT),
            (&r, "vif2", &["172.16.2.2", "fd00:16:2::2"], MAC_SERVER),
            (&s, "eth0", &["172.16.2.1", "172.16.2.200", "172.16.2.201", "fd00:16:2::1"], MAC_VIF2),
        ];
        for (ns, dev, ips, mac) in neighbours {
            for ip in *ips {
                lab.ip(ns, &["neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"])?;
            }
        }
        lab.ip(&c, &["route", "add", "default", "via", "10.5.1.1"])?;
        lab.ip(&c, &["-6", "route", "add", "default", "via", "fd00:5:1::1"])?;
        lab.ip(&s, &["route", "add", "default", "via", "172.16.2.1"])?;
        lab.ip(&s, &["-6", "route", "add", "default", "via", "fd00:16:2::1"])?;
        lab.in_ns(Role::Router, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })?
        .map_err(|source| LabError::Io { ns: r.clone(), source })?;
        Ok(lab)
    }

    pub fn ns(&self, role: Role) -> String {
        let suffix = match role {
            Role::Client => "client",
            Role::Router => "router",
            Role::Server => "server",
        };
        format!("{}-{suffix}", self.prefix)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<Output, LabError> {
        let mut all = vec!["ip", "-n", ns];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs `command` inside a role's namespace (`ip netns exec`), with `stdin` as its input.
    pub fn exec(&self, role: Role, command: &[&str], stdin: &str) -> Result<Output, LabError> {
        let ns = self.ns(role);
        let mut all = vec!["ip", "netns", "exec", &ns];
        all.extend_from_slice(command);
        run_with_input(&all, stdin)
    }

    /// Runs `f` on a thread inside a role's namespace and returns its result.
    pub fn in_ns<T: Send + 'static>(&self, role: Role, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
        let ns = self.ns(role);
        thread::spawn(move || netns::enter(&ns).map(|()| f()))
            .join()
            .unwrap_or_else(|_| Err(netns::NetnsError::Unknown { name: "panicked lab thread".into() }))
            .map_err(LabError::from)
    }

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
                let listener = netns::enter(&ns)
                    .map_err(|e| io::Error::other(crate::WithCauses(&e).to_string()))
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

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = run(&["ip", "netns", "del", &ns]);
        }
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

fn run(args: &[&str]) -> Result<Output, LabError> {
    run_with_input(args, "")
}

fn run_with_input(args: &[&str], stdin: &str) -> Result<Output, LabError> {
    let command = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(LabError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(out)
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

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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
