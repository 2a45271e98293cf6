//! The scratch namespaces a simulation runs in: `host`, the simulated host, where the rule set
//! is loaded and traced, and `wire`, which holds the far ends of its `in` interfaces, from which
//! packets are injected. Both are anonymous (`unshare(CLONE_NEWNET)`, no name in /run/netns):
//! they live as long as iptrace holds their descriptors, so they vanish with it on every way
//! out, a SIGKILL included, and no other program sees or changes them.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::SimulateError;
use crate::command;

/// The MAC addresses of the simulated host's `in` interfaces and their far ends: locally
/// administered, fixed, so that frames are addressed without neighbour discovery.
pub const HOST_MAC: [u8; 6] = [0x02, 0x53, 0x49, 0x4d, 0x00, 0x01];
pub const WIRE_MAC: [u8; 6] = [0x02, 0x53, 0x49, 0x4d, 0x00, 0x02];

pub struct Scratch {
    /// The namespace the calling thread was in.
    home: File,
    pub host: File,
    wire: File,
    /// Far ends made so far (their names are numbered).
    far_ends: u32,
}

pub(super) fn this_thread_netns() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

pub(super) fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns(2) on a descriptor we own; it only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn new_netns() -> io::Result<File> {
    // SAFETY: unshare(2) with CLONE_NEWNET only moves this thread into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    this_thread_netns()
}

/// `/proc/PID/fd/N`: a path to `file` that a child process (`ip link ... netns PATH`) can open.
fn proc_path(file: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd())
}

impl Scratch {
    /// Makes both namespaces; the calling thread stays where it was.
    pub fn new() -> Result<Self, SimulateError> {
        let home = this_thread_netns().map_err(SimulateError::Scratch)?;
        let made = (|| {
            let host = new_netns()?;
            setns(&home)?;
            let wire = new_netns()?;
            setns(&home)?;
            Ok((host, wire))
        })();
        let (host, wire) = made.map_err(|e: io::Error| {
            // Back home whatever happened (best effort: a thread that cannot go back fails next).
            let _ = setns(&home);
            if e.raw_os_error() == Some(libc::EPERM) { SimulateError::NotPermitted } else { SimulateError::Scratch(e) }
        })?;
        Ok(Self { home, host, wire, far_ends: 0 })
    }

    /// Runs `f` with the calling thread in the simulated host's namespace, then back home.
    pub fn in_host<T>(&self, f: impl FnOnce() -> Result<T, SimulateError>) -> Result<T, SimulateError> {
        in_netns(&self.host, &self.home, f)
    }

    /// Moves the calling thread into the simulated host's namespace (for the trace, whose threads
    /// start from it); [`Scratch::leave`] moves it back.
    pub fn enter_host(&self) -> Result<(), SimulateError> {
        setns(&self.host).map_err(SimulateError::Scratch)
    }

    pub fn leave(&self) -> Result<(), SimulateError> {
        setns(&self.home).map_err(SimulateError::Scratch)
    }

    /// Runs `ip ARGS` in the simulated host.
    pub fn ip(&self, args: &[&str]) -> Result<(), SimulateError> {
        self.in_host(|| command::run("ip", args, None).map(drop).map_err(SimulateError::Setup))
    }

    /// Adds interface `name` to the simulated host, up: a veth whose far end, up too, is
    /// `wire<N>` in `wire` (this kernel may have no dummy interfaces; a veth is always there).
    /// Returns the far end's name.
    pub fn add_interface(&mut self, name: &str) -> Result<String, SimulateError> {
        let far = format!("wire{}", self.far_ends);
        self.far_ends += 1;
        let (host_mac, wire_mac) = (mac_text(HOST_MAC), mac_text(WIRE_MAC));
        let wire = proc_path(&self.wire);
        self.ip(&[
            "link", "add", name, "address", &host_mac, "type", "veth", "peer", "name", &far, "address", &wire_mac,
            "netns", &wire,
        ])?;
        self.ip(&["link", "set", name, "up"])?;
        in_netns(&self.wire, &self.home, || {
            // No IPv6 on the far end: it would send router solicitations and the like.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{far}/disable_ipv6"), "1");
            command::run("ip", &["link", "set", &far, "up"], None).map_err(SimulateError::Setup)
        })?;
        Ok(far)
    }

    /// An AF_PACKET socket on far end `far`, whose frames arrive on the simulated host.
    pub fn wire_socket(&self, far: &str) -> Result<WireSocket, SimulateError> {
        in_netns(&self.wire, &self.home, || WireSocket::open(far))
    }

    /// Opens a raw IP socket in the simulated host that sends packets as a local program would.
    pub fn local_socket(&self, family: IpAddr, mark: u32) -> Result<LocalSocket, SimulateError> {
        self.in_host(|| LocalSocket::open(family, mark).map_err(SimulateError::Inject))
    }
}

/// Without root: makes iptrace root of a user namespace of its own, with a network namespace
/// and a mount namespace, whose `/run` is a private tmpfs (the xtables lock and iptrace's state
/// live there, and the host's are not writable from inside). The scratch namespaces are made
/// from there. To be called while the process has one thread (`unshare(CLONE_NEWUSER)`
/// requires it). design.md §14.
pub fn enter_user_namespace() -> Result<(), SimulateError> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare(2) moves only this (single-threaded) process.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(SimulateError::NoUserNamespace(io::Error::last_os_error()));
    }
    let mapped = (|| {
        std::fs::write("/proc/self/setgroups", "deny")?;
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))?;
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))?;
        // SAFETY: mount(2) with static NUL-terminated strings, in this process's own mount
        // namespace: first no propagation to the host's, then a tmpfs over /run.
        let private = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        if private != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let run = unsafe {
            libc::mount(c"tmpfs".as_ptr(), c"/run".as_ptr(), c"tmpfs".as_ptr(), 0, c"mode=0755".as_ptr().cast())
        };
        if run != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })();
    mapped.map_err(SimulateError::NoUserNamespace)
}

fn in_netns<T>(ns: &File, home: &File, f: impl FnOnce() -> Result<T, SimulateError>) -> Result<T, SimulateError> {
    setns(ns).map_err(SimulateError::Scratch)?;
    let result = f();
    setns(home).map_err(SimulateError::Scratch)?;
    result
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An AF_PACKET socket on the far end of an `in` interface: a frame sent on it arrives on the
/// simulated host as real traffic (design.md §14).
pub struct WireSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl WireSocket {
    fn open(name: &str) -> Result<Self, SimulateError> {
        let ifindex = crate::netns::interface_index(name)
            .ok_or_else(|| SimulateError::Inject(io::Error::other(format!("no interface {name}"))))?;
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0).map_err(SimulateError::Inject)?;
        Ok(Self { fd, ifindex: ifindex as i32 })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and `to` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// A raw IP socket in the simulated host that sends whole IP packets (`IPPROTO_RAW`: the header
/// included) through OUTPUT as a local program's, with `SO_MARK`.
pub struct LocalSocket {
    fd: OwnedFd,
}

impl LocalSocket {
    fn open(family: IpAddr, mark: u32) -> io::Result<Self> {
        let fd =
            socket(if family.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 }, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
        if mark != 0 {
            // SAFETY: setsockopt(2) with a u32 value of the size passed.
            let set = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const mark).cast(),
                    size_of::<u32>() as libc::socklen_t,
                )
            };
            if set != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    pub fn send(&self, packet: &[u8], dst: IpAddr) -> io::Result<()> {
        let (storage, len) = iptrace_lab::sockaddr(std::net::SocketAddr::new(dst, 0));
        // SAFETY: packet and storage are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0, (&raw const storage).cast(), len)
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}
