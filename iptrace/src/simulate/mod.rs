//! `iptrace simulate`: what a rule set does with a packet, answered by the kernel itself. The
//! rule set is loaded into a scratch namespace ([`scratch`]) with interfaces named as the packet
//! says, the packet is crafted ([`craft`]) and injected there as real traffic (or sent by a local
//! socket; [`host`] sets both up), and the usual trace ([`crate::run`]) prints its block. Nothing
//! outside the scratch namespaces is changed: a `--from-netns` source is only read (design.md
//! §14).

pub mod cases;
pub mod cli;
pub mod craft;
pub mod expect;
mod host;
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
    netns::NetnsError,
    render::{Format, TextStyle},
    run::{self, Observer, Options, RunError},
};
use expect::{Expectation, Outcome, chosen_by_chance};
pub use host::snapshot_netns;
use host::{injector_source, read_nat, set_up};
use rules::{RandomRule, RuleSet};
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
    /// `ip route add` refused a `--route` (what it said): bad input.
    #[error("bad --route '{route}': {reason}")]
    Route { route: String, reason: String },
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
            | SimulateError::Route { .. }
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

/// Whether a flow can be simulated for `packet`'s connection: a forwarded one, whose reply
/// comes in on its `out` interface. Where not, why, naming what asked for it (`--flow`, `flow =
/// true`).
pub fn check_flow(packet: &PacketSpec, asked_by: &str) -> Result<(), String> {
    if packet.local || packet.out_interface.is_none() {
        return Err(format!("{asked_by} simulates forwarded connections: '{packet}' needs 'in IFACE' and 'out IFACE'"));
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

/// How long a simulated packet's block may take to come.
const PACKET_DEADLINE: Duration = Duration::from_secs(5);
/// How long a flow's blocks may take to come after its last packet was sent.
const FLOW_DEADLINE: Duration = Duration::from_secs(1);
/// Simulates `case` on a fresh scratch host set up as `host` says: its blocks on `out`, and
/// what became of its packets.
pub fn simulate(
    case: &Case,
    host: &Host,
    style: &Style,
    out: Box<dyn Write + Send>,
) -> Result<Simulated, SimulateError> {
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
    let reports: Vec<PacketReport> = reports_rx.try_iter().collect();
    let from_to =
        |from: IpAddr, to: IpAddr| move |r: &&PacketReport| r.arrived.header.src == from && r.arrived.header.dst == to;
    let mut forward = reports.iter().filter(from_to(src, packet.dst));
    let outcome = Outcome::new(forward.next(), nat);
    let mut later = Vec::new();
    if case.flow {
        // Sent only where the first packet left a connection; without one, none is looked for.
        let reply = nat.and_then(|n| reports.iter().find(from_to(n.dst, n.src)));
        later.push(("the reply", Outcome::new(reply, None)));
        if let spec::TransportSpec::Tcp { .. } = packet.transport {
            later.push(("the third packet (ACK)", Outcome::new(forward.next(), None)));
        }
    }
    let random: Vec<RandomRule> = host.rule_sets.iter().flat_map(RuleSet::random_rules).collect();
    let by_chance = reports.iter().find_map(|r| chosen_by_chance(r, &random));
    Ok(Simulated { packet: outcome, later, by_chance })
}

/// What became of a case's packet and, with `--flow`, of its connection's later packets (the
/// reply, then for TCP the handshake's third), each named for messages.
pub struct Simulated {
    pub packet: Outcome,
    pub later: Vec<(&'static str, Outcome)>,
    /// The rule that chose its path at random, if one did ([`chosen_by_chance`]).
    pub by_chance: Option<String>,
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
        let simulated = simulate(case, host, style, out)?;
        let verdict = check(case, &simulated);
        failed += usize::from(verdict.is_err());
        let what = case.name.clone().unwrap_or_else(|| case.packet.to_string());
        let expected = case.expect.as_ref().map(ToString::to_string);
        if let Some(rule) = &simulated.by_chance {
            crate::note!(
                "iptrace: note: {what}: {rule} decides at random, so another run may take another path and get another result"
            );
        }
        match reporting {
            Reporting::Expectations => match (&expected, &verdict) {
                (Some(expected), Ok(())) => crate::note!("iptrace: {what}: {expected} as expected"),
                (_, Err(got)) => crate::note!("iptrace: {what}: {got}"),
                (None, Ok(())) => {}
            },
            Reporting::Cases if json_cases => {
                let text = buffer.0.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                // One object per block, in the flow's order: the packet's, then its connection's.
                let mut traces = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
                let trace = traces.next();
                let mut record = serde_json::json!({
                    "case": what,
                    "packet": case.packet.to_string(),
                    "expect": expected,
                    "rule": case.rule,
                    "passed": verdict.is_ok(),
                    "failure": verdict.as_ref().err(),
                    "by_chance": simulated.by_chance,
                    "trace": trace,
                });
                if case.flow {
                    record["flow"] = serde_json::Value::Array(traces.collect());
                }
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

/// Whether `case` met its expectation and rule; where not, `expected X, got Y`. With `--flow`,
/// accept and NAT expectations are of the whole connection: its later packets must be accepted
/// too (drop and reject are the first packet's: there is no connection after it).
fn check(case: &Case, simulated: &Simulated) -> Result<(), String> {
    let outcome = &simulated.packet;
    if let Some(expected) = &case.expect {
        outcome.check(expected).map_err(|got| format!("expected {expected}, got {got}"))?;
        if !matches!(expected, Expectation::Drop | Expectation::Reject) {
            for (which, later) in &simulated.later {
                later
                    .check(&Expectation::Accept)
                    .map_err(|got| format!("expected {expected}, but {which} got {got}"))?;
            }
        }
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

/// The trace of one packet: its addresses selected (one way), its family, stopped after its block. With
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
        // One way only: the host's own answer (a TCP reset, an ICMP error) can finish its
        // block first and would end the trace before the packet's.
        (false, Some(src)) => format!("src host {src} and dst host {}", packet.dst),
        (false, None) => format!("dst host {}", packet.dst),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::CompiledFilter;
    use craft::{TcpNumbers, ip_packet};

    /// With `--flow`, accept (and NAT) is the whole connection's; drop is the first packet's.
    #[test]
    fn a_flow_meets_accept_only_where_every_packet_was_accepted() {
        let packet = PacketSpec::parse("tcp 10.0.0.2:1 > 10.1.0.2:80 in lan out wan").unwrap();
        let case = |expect| Case { name: None, packet: packet.clone(), expect: Some(expect), rule: None, flow: true };
        let outcome = |verdict: &str| Outcome {
            verdict: verdict.into(),
            kernel_drop: None,
            decided_by: Some(format!("nft inet f forward policy {verdict}")),
            nat: None,
        };
        let replies_dropped = Simulated {
            packet: outcome("accept"),
            later: vec![("the reply", outcome("drop")), ("the third packet (ACK)", outcome("drop"))],
            by_chance: None,
        };
        assert_eq!(
            check(&case(Expectation::Accept), &replies_dropped),
            Err("expected accept, but the reply got drop at nft inet f forward policy drop".into())
        );
        let all_accepted = Simulated {
            packet: outcome("accept"),
            later: vec![("the reply", outcome("accept")), ("the third packet (ACK)", outcome("accept"))],
            by_chance: None,
        };
        assert_eq!(check(&case(Expectation::Accept), &all_accepted), Ok(()));
        let first_dropped = Simulated {
            packet: outcome("drop"),
            later: vec![("the reply", Outcome::new(None, None))],
            by_chance: None,
        };
        assert_eq!(check(&case(Expectation::Drop), &first_dropped), Ok(()));
    }

    /// The selection takes the simulated packet and not the host's answer to it: a reset from a
    /// port nobody listens on can end its block first, and the trace stops after one block.
    #[test]
    fn a_packet_is_selected_and_the_hosts_answer_is_not() {
        let style = Style { format: Format::Text, text: TextStyle::default() };
        for (packet, answer) in [
            ("tcp 10.5.1.7:40004 > 10.5.1.1:22 syn in vif0", "tcp 10.5.1.1:22 > 10.5.1.7:40004 rst in lo"),
            ("udp [fd00::7]:53 > [fd00::1]:53 in vif0", "udp [fd00::1]:53 > [fd00::7]:53 in lo"),
        ] {
            let packet = PacketSpec::parse(packet).unwrap();
            let answer = PacketSpec::parse(answer).unwrap();
            let options = trace_options(&packet, &style, false);
            let filter = CompiledFilter::compile(options.selection.expression.as_deref().unwrap()).unwrap();
            assert!(filter.matches(&ip_packet(&packet, packet.src.unwrap(), TcpNumbers::FIRST)), "{packet}");
            assert!(!filter.matches(&ip_packet(&answer, answer.src.unwrap(), TcpNumbers::REPLY)), "{answer}");
        }
    }
}
