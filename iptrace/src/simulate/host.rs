//! The scratch host set up as a [`Host`] says (interfaces, addresses, routes, sysctls, the rule
//! sets), the packet's way in ([`Injector`]: a frame on a wire, or a local socket's packet, and
//! with `--flow` the rest of the connection), and a live namespace read into a [`Host`].

use std::{io, net::IpAddr, time::Duration};

use super::{
    Host, SimulateError, craft,
    expect::{self, NatBinding},
    rules::{self, RuleSet},
    scratch::{self, Scratch},
    spec::{self, PacketSpec},
};
use crate::{command::CommandError, instrument::owner::SIMULATE_MARK_TABLE, netns};

/// The address a simulated host's `out` interface gets when nothing else gives it one (NAT's
/// masquerade needs one), and the gateway it routes through: from the benchmarking range (RFC
/// 2544) and a unique local prefix.
const OUT_ADDRESSES_V4: (&str, &str) = ("198.18.0.1", "198.18.0.2");
const OUT_ADDRESSES_V6: (&str, &str) = ("fd53:494d::1", "fd53:494d::2");

/// The pause between a flow's packets: the kernel has handled one (its conntrack entry is
/// there), and its block is complete (longer than the trace's 50 ms linger), before the next
/// is sent, so that blocks come in the flow's order.
const FLOW_PAUSE: Duration = Duration::from_millis(150);

/// The source address of `packet`: its own, else the `out` interface's.
pub(super) fn injector_source(packet: &PacketSpec, host: &Host) -> IpAddr {
    packet.src.unwrap_or_else(|| {
        let out = packet.out_interface.as_deref();
        let given = host.addresses.iter().filter(|(i, _)| Some(i.as_str()) == out).find_map(|(_, a)| {
            let address: IpAddr = a.split('/').next()?.parse().ok()?;
            (address.is_ipv4() == packet.dst.is_ipv4()).then_some(address)
        });
        given.unwrap_or_else(|| {
            let (own, _) = if packet.dst.is_ipv4() { OUT_ADDRESSES_V4 } else { OUT_ADDRESSES_V6 };
            own.parse().unwrap_or(packet.dst)
        })
    })
}

/// The packet's conntrack entry in the calling thread's namespace, if there is one.
pub(super) fn read_nat(packet: &PacketSpec, src: IpAddr) -> Option<NatBinding> {
    let table = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").ok()?;
    let ports = match packet.transport {
        spec::TransportSpec::Tcp { sport, dport, .. } | spec::TransportSpec::Udp { sport, dport } => {
            Some((sport, dport))
        }
        spec::TransportSpec::Icmp { .. } => None,
    };
    expect::nat_binding(&table, packet.protocol(), src, packet.dst, ports)
}

/// How a packet gets in: a frame on an `in` interface's far end (with `--flow`, its reply on the
/// `out` interface's), or a local program's packet.
pub(super) enum Injector {
    Wire { socket: scratch::WireSocket, frame: Vec<u8>, flow: Option<Flow> },
    Local { socket: scratch::LocalSocket, packet: Vec<u8>, dst: IpAddr },
}

/// `--flow`: what the reply and the third packet are made from.
pub(super) struct Flow {
    reply_socket: scratch::WireSocket,
    packet: PacketSpec,
    src: IpAddr,
}

impl Flow {
    /// After the first packet: the reply as the connection's conntrack entry says it comes back
    /// (from the DNAT target, to the SNAT address), then for TCP the acknowledgement. Nothing
    /// where the first packet left no connection (it was dropped).
    fn send_rest(&self, socket: &scratch::WireSocket) -> io::Result<()> {
        std::thread::sleep(FLOW_PAUSE);
        let Some(nat) = read_nat(&self.packet, self.src) else { return Ok(()) };
        let mut reply = self.packet.clone();
        reply.src = Some(nat.dst);
        reply.dst = nat.src;
        reply.transport = match self.packet.transport {
            spec::TransportSpec::Tcp { sport, dport, .. } => spec::TransportSpec::Tcp {
                sport: nat.dport.unwrap_or(dport),
                dport: nat.sport.unwrap_or(sport),
                flags: spec::TcpFlags(0x12),
            },
            spec::TransportSpec::Udp { sport, dport } => {
                spec::TransportSpec::Udp { sport: nat.dport.unwrap_or(dport), dport: nat.sport.unwrap_or(sport) }
            }
            spec::TransportSpec::Icmp { code, .. } => {
                spec::TransportSpec::Icmp { kind: if nat.src.is_ipv4() { 0 } else { 129 }, code }
            }
        };
        let bytes = craft::ip_packet(&reply, nat.dst, craft::TcpNumbers::REPLY);
        self.reply_socket.send(&craft::ethernet_frame(scratch::HOST_MAC, scratch::WIRE_MAC, &bytes))?;
        if let spec::TransportSpec::Tcp { sport, dport, .. } = self.packet.transport {
            std::thread::sleep(FLOW_PAUSE);
            let mut third = self.packet.clone();
            third.transport = spec::TransportSpec::Tcp { sport, dport, flags: spec::TcpFlags(0x10) };
            let bytes = craft::ip_packet(&third, self.src, craft::TcpNumbers::THIRD);
            socket.send(&craft::ethernet_frame(scratch::HOST_MAC, scratch::WIRE_MAC, &bytes))?;
        }
        Ok(())
    }
}

impl Injector {
    pub(super) fn send(&self) -> io::Result<()> {
        match self {
            Injector::Wire { socket, frame, flow } => {
                socket.send(frame)?;
                flow.as_ref().map_or(Ok(()), |f| f.send_rest(socket))
            }
            // A packet netfilter drops on its way out fails the send with EPERM: it was sent,
            // and its block says what happened.
            Injector::Local { socket, packet, dst } => match socket.send(packet, *dst) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                other => other,
            },
        }
    }
}

fn wire_mac() -> String {
    scratch::WIRE_MAC.map(|b| format!("{b:02x}")).join(":")
}

fn host_prefix(address: IpAddr) -> String {
    format!("{address}/{}", if address.is_ipv4() { 32 } else { 128 })
}

/// Interfaces, addresses, routes and sysctls of the simulated host, its rule sets loaded, and
/// the packet's way in.
pub(super) fn set_up(
    scratch: &mut Scratch,
    packet: &PacketSpec,
    host: &Host,
    flow: bool,
) -> Result<Injector, SimulateError> {
    scratch.in_host(|| {
        // Forwarding as a router's; no duplicate address detection, so that addresses are
        // usable at once.
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
            ("/proc/sys/net/ipv6/conf/all/accept_dad", "0"),
            ("/proc/sys/net/ipv6/conf/default/accept_dad", "0"),
        ] {
            std::fs::write(path, value).map_err(SimulateError::Scratch)?;
        }
        Ok(())
    })?;
    scratch.ip(&["link", "set", "lo", "up"])?;
    let mut made: Vec<(String, String)> = Vec::new();
    let named = packet.in_interface.iter().chain(&packet.out_interface);
    for name in named.chain(host.addresses.iter().map(|(i, _)| i)).chain(&host.interfaces) {
        if !made.iter().any(|(n, _)| n == name) {
            let far = scratch.add_interface(name)?;
            made.push((name.clone(), far));
        }
    }
    let far_end = |name: &str| made.iter().find(|(n, _)| n == name).map(|(_, far)| far.clone());
    let far_end = &far_end;
    let wire = packet.in_interface.as_deref().and_then(far_end).map(|far| scratch.wire_socket(&far)).transpose()?;
    for (interface, address) in &host.addresses {
        scratch.ip(&["addr", "add", address, "dev", interface])?;
    }
    let src = injector_source(packet, host);
    let v4 = packet.dst.is_ipv4();
    match (&packet.in_interface, &packet.out_interface) {
        // Leaving there: the destination, and by default everything else (a DNAT target), is
        // routed out through a gateway with a fixed neighbour (no neighbour discovery); the far
        // end has no address and discards what it gets.
        (_, Some(out)) => {
            let has_address = host.addresses.iter().any(|(i, a)| i == out && a.contains('.') == v4);
            let (own, gateway) = if v4 { OUT_ADDRESSES_V4 } else { OUT_ADDRESSES_V6 };
            if !has_address {
                scratch.ip(&["addr", "add", &host_prefix(own.parse().unwrap_or(src)), "dev", out])?;
            }
            let family = if v4 { "-4" } else { "-6" };
            scratch.ip(&["neigh", "replace", gateway, "lladdr", &wire_mac(), "dev", out, "nud", "permanent"])?;
            for to in [host_prefix(packet.dst).as_str(), "default"] {
                scratch.ip(&[family, "route", "replace", to, "via", gateway, "dev", out, "onlink"])?;
            }
        }
        // Arriving for the host itself, unless an address given says otherwise.
        (Some(in_interface), None) => {
            let given = host.addresses.iter().any(|(_, a)| a.split('/').next() == Some(&packet.dst.to_string()));
            if !given {
                scratch.ip(&["addr", "add", &host_prefix(packet.dst), "dev", in_interface])?;
            }
        }
        (None, None) => {}
    }
    if let Some(in_interface) = &packet.in_interface {
        // The way back to the source, for replies and the reverse-path filter; its neighbour
        // fixed, so that no neighbour discovery runs.
        scratch.ip(&["route", "replace", &host_prefix(src), "dev", in_interface])?;
        scratch.ip(&[
            "neigh",
            "replace",
            &src.to_string(),
            "lladdr",
            &wire_mac(),
            "dev",
            in_interface,
            "nud",
            "permanent",
        ])?;
    }
    for route in &host.routes {
        let mut args = vec!["route", "add"];
        args.extend(route.split_whitespace());
        scratch.ip(&args).map_err(|e| match e {
            SimulateError::Setup(CommandError::Failed { stderr, .. }) => {
                SimulateError::Route { route: route.clone(), reason: stderr }
            }
            other => other,
        })?;
    }
    scratch.in_host(|| host.rule_sets.iter().try_for_each(RuleSet::load))?;
    if let (Some(in_interface), mark @ 1..) = (&packet.in_interface, packet.mark) {
        // A packet from another namespace arrives without a mark (the veth clears it): an
        // ingress chain sets it, before any hook iptrace traces; loaded after the rule sets,
        // whose `flush ruleset` would remove it.
        let chain = format!(
            "table netdev {SIMULATE_MARK_TABLE} {{ chain ingress {{ type filter hook ingress device \"{in_interface}\" priority -500; meta mark set {mark}; }}; }}"
        );
        scratch.in_host(|| {
            crate::nftables::apply(&chain).map_err(|e| SimulateError::Usage(format!("cannot set the mark: {e}")))
        })?;
    }
    let bytes = craft::ip_packet(packet, src, craft::TcpNumbers::FIRST);
    let flow = match packet.out_interface.as_deref().and_then(far_end) {
        Some(far) if flow => Some(Flow { reply_socket: scratch.wire_socket(&far)?, packet: packet.clone(), src }),
        _ => None,
    };
    Ok(match wire {
        Some(socket) => {
            let frame = craft::ethernet_frame(scratch::HOST_MAC, scratch::WIRE_MAC, &bytes);
            Injector::Wire { socket, frame, flow }
        }
        None => {
            Injector::Local { socket: scratch.local_socket(packet.dst, packet.mark)?, packet: bytes, dst: packet.dst }
        }
    })
}

/// The rule sets, interfaces and addresses of live namespace `name`, read from inside it; the
/// calling thread returns where it was.
pub fn snapshot_netns(name: &str) -> Result<Host, SimulateError> {
    netns::check(name)?;
    let home = scratch::this_thread_netns().map_err(SimulateError::Scratch)?;
    netns::enter(name)?;
    let read = (|| {
        let sets = rules::snapshot(name)?;
        let links = crate::command::run("ip", &["-o", "addr", "show"], None)
            .map_err(|source| SimulateError::Snapshot { origin: name.to_owned(), source })?;
        Ok::<_, SimulateError>((sets, links))
    })();
    scratch::setns(&home).map_err(SimulateError::Scratch)?;
    let (rule_sets, links) = read?;
    let (interfaces, addresses) = interfaces_and_addresses(&links);
    Ok(Host { rule_sets, addresses, routes: Vec::new(), interfaces })
}

/// From `ip -o addr show`: the interfaces (but `lo`) and their global addresses.
fn interfaces_and_addresses(listing: &str) -> (Vec<String>, Vec<(String, String)>) {
    let mut interfaces = Vec::new();
    let mut addresses = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = words.get(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if name == "lo" {
            continue;
        }
        if !interfaces.iter().any(|i| i == name) {
            interfaces.push(name.to_owned());
        }
        if let (Some(kind), Some(address)) = (words.get(2), words.get(3))
            && matches!(*kind, "inet" | "inet6")
            && !address.starts_with("fe80:")
        {
            addresses.push((name.to_owned(), (*address).to_owned()));
        }
    }
    (interfaces, addresses)
}
