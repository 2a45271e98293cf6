//! `iptrace simulate`: what a rule set does with a packet, answered by the kernel itself. The
//! rule set is loaded into a scratch namespace ([`scratch`]) with interfaces named as the packet
//! says, the packet is crafted ([`craft`]) and injected there as real traffic (or sent by a local
//! socket), and the usual trace ([`crate::run`]) prints its block. Nothing outside the scratch
//! namespaces is changed: a `--from-netns` source is only read (design.md §14).

pub mod cases;
pub mod cli;
pub mod craft;
pub mod expect;
pub mod rules;
pub mod scratch;
pub mod spec;

use std::{
    cell::RefCell,
    io::{self, Write},
    net::IpAddr,
    rc::Rc,
    sync::mpsc,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    command::CommandError,
    filter::Selection,
    model::PacketReport,
    netns::{self, NetnsError},
    render::{Format, TextStyle},
    run::{self, Observer, Options, RunError},
};
use expect::{Expectation, NatBinding, Outcome};
use rules::RuleSet;
use scratch::Scratch;
use spec::PacketSpec;

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {0}")]
    Read(String, #[source] io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to make its scratch network namespaces")]
    NotPermitted,
    #[error("not root, and cannot make a user namespace to simulate in")]
    NoUserNamespace(#[source] io::Error),
    #[error("cannot make or enter the scratch network namespace")]
    Scratch(#[source] io::Error),
    #[error("cannot set up the scratch network namespace")]
    Setup(#[source] CommandError),
    #[error("cannot load {origin}")]
    Load {
        origin: String,
        #[source]
        source: CommandError,
    },
    #[error("cannot read the rule sets of netns {origin}")]
    Snapshot {
        origin: String,
        #[source]
        source: CommandError,
    },
    #[error("cannot inject the packet")]
    Inject(#[source] io::Error),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("stopped by a signal before every packet was simulated")]
    Stopped,
}

impl SimulateError {
    /// 2 for bad input, an unsuitable host and a rule set that does not load (nothing outside
    /// the scratch namespaces was changed either way), 1 for failures while simulating.
    pub fn exit_code(&self) -> u8 {
        match self {
            SimulateError::Spec(_)
            | SimulateError::Usage(_)
            | SimulateError::Read(..)
            | SimulateError::Netns(_)
            | SimulateError::NotPermitted
            | SimulateError::NoUserNamespace(_)
            | SimulateError::Load { .. }
            | SimulateError::Snapshot { .. } => 2,
            SimulateError::Run(e) => u8::try_from(e.exit_code()).unwrap_or(1),
            _ => 1,
        }
    }
}

/// One packet to simulate and what it should meet.
pub struct Case {
    pub name: Option<String>,
    pub packet: PacketSpec,
    pub expect: Option<Expectation>,
    /// The rule that must decide it (`--summary`'s line of the deciding step contains it).
    pub rule: Option<String>,
    /// `--flow`: the reply, and for TCP the handshake's third packet, follow it.
    pub flow: bool,
}

/// Whether `--flow` can simulate `packet`'s connection: a forwarded one, whose reply comes in
/// on its `out` interface.
pub fn check_flow(packet: &PacketSpec) -> Result<(), SimulateError> {
    if packet.local || packet.out_interface.is_none() {
        return Err(SimulateError::Usage(format!(
            "--flow simulates forwarded connections: '{packet}' needs 'in IFACE' and 'out IFACE'"
        )));
    }
    Ok(())
}

/// How the simulated host is set up, beyond what the packets imply.
pub struct Host {
    pub rule_sets: Vec<RuleSet>,
    /// `--addr IFACE=ADDRESS/LEN`.
    pub addresses: Vec<(String, String)>,
    /// `--route 'ROUTE'`, as `ip route add` takes it.
    pub routes: Vec<String>,
    /// Interfaces to create as dummies (a `--from-netns` source's).
    pub interfaces: Vec<String>,
}

/// How blocks are written.
pub struct Style {
    pub format: Format,
    pub text: TextStyle,
}

/// The address a simulated host's `out` interface gets when nothing else gives it one (NAT's
/// masquerade needs one), and the gateway it routes through: from the benchmarking range (RFC
/// 2544) and a unique local prefix.
const OUT_ADDRESSES_V4: (&str, &str) = ("198.18.0.1", "198.18.0.2");
const OUT_ADDRESSES_V6: (&str, &str) = ("fd53:494d::1", "fd53:494d::2");

/// How long a simulated packet's block may take to come.
const PACKET_DEADLINE: Duration = Duration::from_secs(5);
/// How long a flow's blocks may take to come after its last packet was sent.
const FLOW_DEADLINE: Duration = Duration::from_secs(1);
/// The pause between a flow's packets: the kernel has handled one (its conntrack entry is
/// there), and its block is complete (longer than the trace's 50 ms linger), before the next
/// is sent, so that blocks come in the flow's order.
const FLOW_PAUSE: Duration = Duration::from_millis(150);

/// Simulates `case` on a fresh scratch host set up as `host` says: its block on `out`, and
/// what became of it.
pub fn simulate(case: &Case, host: &Host, style: &Style, out: Box<dyn Write + Send>) -> Result<Outcome, SimulateError> {
    let packet = &case.packet;
    let mut scratch = Scratch::new()?;
    let injector = set_up(&mut scratch, packet, host, case.flow)?;
    let (reports_tx, reports_rx) = mpsc::channel::<PacketReport>();
    let injected: Rc<RefCell<Option<io::Error>>> = Rc::default();
    let ready = {
        let injected = injected.clone();
        Box::new(move || *injected.borrow_mut() = injector.send().err())
    };
    let options = trace_options(packet, style, case.flow);
    scratch.enter_host()?;
    let traced = run::trace_observed(&options, out, Some(Observer { ready, reports: reports_tx }));
    // The conntrack entry is read before the namespace goes.
    let nat = read_nat(packet, injector_source(packet, host));
    scratch.leave()?;
    if traced?.stop_signal.get().is_some() {
        return Err(SimulateError::Stopped);
    }
    if let Some(e) = injected.take() {
        return Err(SimulateError::Inject(e));
    }
    // The packet's own block: with --flow, the first one from its source to its destination.
    let src = injector_source(packet, host);
    let report = reports_rx.try_iter().find(|r| r.arrived.header.src == src && r.arrived.header.dst == packet.dst);
    Ok(Outcome::new(report.as_ref(), nat))
}

/// How results are reported: after `--expect`, a line on stderr per packet; of a `--cases`
/// file, a test runner's lines and summary on stdout, or with `--json` one object per case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporting {
    Expectations,
    Cases,
}

/// Runs every case, each on a fresh scratch host; returns how many did not meet their
/// expectation.
pub fn run_cases(cases: &[Case], host: &Host, style: &Style, reporting: Reporting) -> Result<usize, SimulateError> {
    let json_cases = reporting == Reporting::Cases && style.format == Format::Json;
    let mut failed = 0;
    for case in cases {
        // A case's JSON object holds its packet's, so that one goes to a buffer first.
        let buffer = SharedBuffer::default();
        let out: Box<dyn Write + Send> = if json_cases { Box::new(buffer.clone()) } else { Box::new(io::stdout()) };
        let outcome = simulate(case, host, style, out)?;
        let verdict = check(case, &outcome);
        failed += usize::from(verdict.is_err());
        let what = case.name.clone().unwrap_or_else(|| case.packet.to_string());
        let expected = case.expect.as_ref().map(ToString::to_string);
        match reporting {
            Reporting::Expectations => match (&expected, &verdict) {
                (Some(expected), Ok(())) => crate::note!("iptrace: {what}: {expected} as expected"),
                (_, Err(got)) => crate::note!("iptrace: {what}: {got}"),
                (None, Ok(())) => {}
            },
            Reporting::Cases if json_cases => {
                let text = buffer.0.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                let trace = text.lines().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
                let record = serde_json::json!({
                    "case": what,
                    "packet": case.packet.to_string(),
                    "expect": expected,
                    "rule": case.rule,
                    "passed": verdict.is_ok(),
                    "failure": verdict.as_ref().err(),
                    "trace": trace,
                });
                write_line(&record.to_string());
            }
            Reporting::Cases => match &verdict {
                Ok(()) => write_line(&format!("case {}: ok\n", crate::render::Printable(&what))),
                Err(got) => write_line(&format!(
                    "case {}: FAILED: {}\n",
                    crate::render::Printable(&what),
                    crate::render::Printable(got)
                )),
            },
        }
    }
    if reporting == Reporting::Cases {
        let passed = cases.len() - failed;
        if json_cases {
            write_line(&serde_json::json!({ "passed": passed, "failed": failed }).to_string());
        } else {
            write_line(&format!("{passed} passed, {failed} failed"));
        }
    }
    Ok(failed)
}

/// Whether `case` met its expectation and rule; where not, `expected X, got Y`.
fn check(case: &Case, outcome: &Outcome) -> Result<(), String> {
    if let Some(expected) = &case.expect {
        outcome.check(expected).map_err(|got| format!("expected {expected}, got {got}"))?;
    }
    match &case.rule {
        Some(rule) if !outcome.decided_by(rule) => {
            let got = outcome.decided_by.as_deref().unwrap_or("no deciding rule");
            Err(format!("expected a rule with '{rule}' to decide, got {got}"))
        }
        _ => Ok(()),
    }
}

/// A line on stdout, flushed (a reader that went away is no error).
fn write_line(line: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// A writer into memory that the trace's processing thread and the caller share.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| io::Error::other("buffer poisoned"))?.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The source address of `packet`: its own, else the `out` interface's.
fn injector_source(packet: &PacketSpec, host: &Host) -> IpAddr {
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
fn read_nat(packet: &PacketSpec, src: IpAddr) -> Option<NatBinding> {
    let table = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").ok()?;
    let ports = match packet.transport {
        spec::TransportSpec::Tcp { sport, dport, .. } | spec::TransportSpec::Udp { sport, dport } => {
            Some((sport, dport))
        }
        spec::TransportSpec::Icmp { .. } => None,
    };
    expect::nat_binding(&table, packet.protocol(), src, packet.dst, ports)
}

/// The trace of one packet: its addresses selected, its family, stopped after its block. With
/// `flow`, its protocol is selected (NAT may change the reply's addresses; the scratch host has
/// no other traffic of it) and the trace stops after the flow's blocks.
fn trace_options(packet: &PacketSpec, style: &Style, flow: bool) -> Options {
    let expression = match (flow, packet.src) {
        (true, _) => match packet.transport {
            spec::TransportSpec::Tcp { .. } => "tcp".to_owned(),
            spec::TransportSpec::Udp { .. } => "udp".to_owned(),
            spec::TransportSpec::Icmp { .. } if packet.dst.is_ipv4() => "icmp".to_owned(),
            spec::TransportSpec::Icmp { .. } => "icmp6".to_owned(),
        },
        (false, Some(src)) => format!("host {src} and host {}", packet.dst),
        (false, None) => format!("host {}", packet.dst),
    };
    let blocks = match (flow, packet.transport) {
        (false, _) => 1,
        (true, spec::TransportSpec::Tcp { .. }) => 3,
        (true, _) => 2,
    };
    Options {
        selection: Selection { expression: Some(expression), ..Selection::default() },
        families: vec![packet.family()],
        backend: crate::backend::BackendChoice::Auto,
        in_interface: None,
        out_interface: None,
        limit: None,
        chain: None,
        count: Some(blocks),
        // A flow's packets are all sent when the wait begins; one dropped on the way leaves
        // fewer blocks.
        duration: Some(if flow { FLOW_DEADLINE } else { PACKET_DEADLINE }),
        targets: crate::netns::Targets::default(),
        stats: false,
        format: style.format,
        text: style.text,
        summary: false,
        pcapng: None,
        linger: Duration::from_millis(50),
        socket_filter: true,
        drops: true,
        record: None,
        ebpf_log: false,
    }
}

/// How a packet gets in: a frame on an `in` interface's far end (with `--flow`, its reply on the
/// `out` interface's), or a local program's packet.
enum Injector {
    Wire { socket: scratch::WireSocket, frame: Vec<u8>, flow: Option<Flow> },
    Local { socket: scratch::LocalSocket, packet: Vec<u8>, dst: IpAddr },
}

/// `--flow`: what the reply and the third packet are made from.
struct Flow {
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
    fn send(&self) -> io::Result<()> {
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

/// The table that sets a `mark N` on a packet arriving on its `in` interface.
const MARK_TABLE: &str = "iptrace_simulate_mark";

fn wire_mac() -> String {
    scratch::WIRE_MAC.map(|b| format!("{b:02x}")).join(":")
}

fn host_prefix(address: IpAddr) -> String {
    format!("{address}/{}", if address.is_ipv4() { 32 } else { 128 })
}

/// Interfaces, addresses, routes and sysctls of the simulated host, its rule sets loaded, and
/// the packet's way in.
fn set_up(scratch: &mut Scratch, packet: &PacketSpec, host: &Host, flow: bool) -> Result<Injector, SimulateError> {
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
        scratch.ip(&args)?;
    }
    scratch.in_host(|| host.rule_sets.iter().try_for_each(RuleSet::load))?;
    if let (Some(in_interface), mark @ 1..) = (&packet.in_interface, packet.mark) {
        // A packet from another namespace arrives without a mark (the veth clears it): an
        // ingress chain sets it, before any hook iptrace traces; loaded after the rule sets,
        // whose `flush ruleset` would remove it.
        let chain = format!(
            "table netdev {MARK_TABLE} {{ chain ingress {{ type filter hook ingress device \"{in_interface}\" priority -500; meta mark set {mark}; }}; }}"
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
