//! Throwaway network labs for `iptrace --demo`, the integration tests and the benchmarks: a
//! client, a router and a server namespace joined by veth pairs, traffic sent from inside them
//! ([`traffic`]), and everything removed when the [`Lab`] is dropped (also when a test fails).
//! Nothing here touches the caller's own namespace beyond creating and deleting the lab's.
//!
//! A crate of its own, so that the tracing library carries only tracing; it does not depend on
//! iptrace, whose binary runs the [`demo`].

pub mod demo;
mod traffic;

use std::{
    fs::File,
    io::{self, Write},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
};

pub use traffic::{EchoServers, internet_checksum, sockaddr};

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
        let entering = ns.clone();
        thread::spawn(move || enter(&entering).map(|()| f()))
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the lab thread panicked")))
            .map_err(|source| LabError::Io { ns, source })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = run(&["ip", "netns", "del", &ns]);
        }
    }
}

/// Moves the calling thread into the lab's namespace `ns`. iptrace's `netns::enter` does this for
/// any name or path a user gives; the lab enters only namespaces it made with `ip netns add`, and
/// does not depend on iptrace (iptrace's binary depends on it, for `--demo`).
fn enter(ns: &str) -> io::Result<()> {
    let file = File::open(Path::new("/run/netns").join(ns))?;
    // SAFETY: setns(2) on a descriptor we own; it only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
