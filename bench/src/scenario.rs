//! The scenarios and one slice of each: the lab with its rule set, a tracer (or none), the
//! traffic in two phases, and the figures.
//!
//! Every comparison is like for like: a lab per engine holds the rule set in that engine only
//! (iptables-legacy, or iptables-nft), and each engine's rows are held against that engine's
//! floor, the kernel's own tracing with a reader that only counts; a third lab carries both copies
//! (the mixed host, where iptrace's default traces both). Within an engine every row marks packets
//! the same way (iptrace's TRACE rules on the legacy host, iptrace's nf_tables table on the
//! others, installed through iptrace's library where the tool under test does not mark itself),
//! counts the packets the kernel traced from that marking's rule counters, and on the nf_tables
//! hosts has the harness's extra listener on `NFNLGRP_NFTRACE` (for messages per packet).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use iptrace::{
    decode::Family,
    filter::Selection,
    instrument::{self, Instrumentation, Marker, Prefilter, TracePlan},
};
use iptrace_lab::{Lab, LabError, Role};
use serde::{Deserialize, Serialize};

use crate::{
    completeness::{self, OutputFormat},
    kernel::{self, KernelError, Listened, TraceListener, TraceMessages},
    ruleset::{self, RuleSet},
    tracer::{Readiness, TracerError, TracerProcess},
    traffic::{self, TrafficPlan, UDP_FIRST_PORT},
};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error("the traffic generator failed")]
    Traffic(#[source] std::io::Error),
    #[error("cannot use the work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the floor's marking: {0}")]
    Marking(String),
    #[error("interrupted; the lab is removed")]
    Interrupted,
}

/// Which engine holds the router's rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Host {
    /// iptables-legacy only.
    Legacy,
    /// nf_tables only (iptables-nft, or native nft).
    Nftables,
    /// The same rule set in both: every packet crosses both copies.
    Mixed,
}

/// The router's rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// The kube-proxy/Docker node of [`ruleset::kube_node`] with about this many rules.
    KubeNode(usize),
    /// This many rules in all: the 574-rule kube node in iptables-nft (so that lab packets cross
    /// the chains the completeness check looks for) and native nft rules with a set of this many
    /// elements ([`ruleset::nft_with_set`]) for the rest.
    NftWithSet { rules: usize, elements: usize },
}

/// A lab: where a scenario runs. Scenarios of one lab share its build and its fixed load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabSpec {
    pub name: &'static str,
    pub host: Host,
    pub rules: Rules,
}

impl LabSpec {
    /// The kube node (in the engines of the host), and the native nft rule set with its set.
    fn rule_sets(&self) -> (RuleSet, Option<RuleSet>) {
        match self.rules {
            Rules::KubeNode(rules) => (ruleset::kube_node(ruleset::services_for(rules)), None),
            Rules::NftWithSet { rules, elements } => {
                let kube = ruleset::kube_node(ruleset::services_for(574));
                let native = ruleset::nft_with_set(rules.saturating_sub(kube.rules), elements);
                (kube, Some(native))
            }
        }
    }
}

const LEGACY: LabSpec = LabSpec { name: "legacy", host: Host::Legacy, rules: Rules::KubeNode(574) };
const NFTABLES: LabSpec = LabSpec { name: "nftables", host: Host::Nftables, rules: Rules::KubeNode(574) };
const MIXED: LabSpec = LabSpec { name: "mixed", host: Host::Mixed, rules: Rules::KubeNode(574) };
const RULES_100: LabSpec = LabSpec { name: "nftables_100_rules", host: Host::Nftables, rules: Rules::KubeNode(100) };
const RULES_1K: LabSpec = LabSpec { name: "nftables_1000_rules", host: Host::Nftables, rules: Rules::KubeNode(1_000) };
const RULES_10K: LabSpec =
    LabSpec { name: "nftables_10000_rules", host: Host::Nftables, rules: Rules::KubeNode(10_000) };
const NFT_SET: LabSpec = LabSpec {
    name: "nftables_5000_rules_10000_set",
    host: Host::Nftables,
    rules: Rules::NftWithSet { rules: 5_000, elements: 10_000 },
};

/// What runs during a scenario's slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// Nothing: the slice is one more untraced one (the A/A check: its cost must come out 0).
    Untraced,
    /// Nothing traces, but a chain of rules that match nothing runs first in raw PREROUTING
    /// ([`BenchConfig::calibration_rules`]): a known extra cost, to show what the method resolves.
    NoOpChain,
    /// The engine's floor: iptrace's marking installed through its library, and a reader that
    /// only counts (iptrace's trace socket, set up as iptrace sets it up).
    Floor,
    Iptrace {
        args: &'static [&'static str],
        output: OutputFormat,
    },
    NftMonitor,
    XtablesMonitor,
}

/// Which packets are traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traced {
    /// UDP to the first `n` of the 256 flows' ports (`udp dst port 5000`, `portrange 5000-…`).
    Flows(u16),
    Everything,
}

impl Traced {
    fn expression(self) -> Option<String> {
        match self {
            Traced::Flows(1) => Some(format!("udp dst port {UDP_FIRST_PORT}")),
            Traced::Flows(n) => Some(format!("udp dst portrange {UDP_FIRST_PORT}-{}", UDP_FIRST_PORT + n - 1)),
            Traced::Everything => None,
        }
    }
}

/// How many cycles a scenario gets: the precise ones resolve a per cent, the others (tracing more
/// than one flow, the scale rows) are about completeness, CPU per traced packet, memory and start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fine,
    Coarse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub key: &'static str,
    pub lab: LabSpec,
    pub tool: Tool,
    pub traced: Traced,
    pub precision: Precision,
    /// The scenario whose cost this one's is held against, per cycle (same lab, same cycles).
    pub floor: Option<&'static str>,
}

const fn row(key: &'static str, lab: LabSpec, tool: Tool, traced: Traced, floor: Option<&'static str>) -> Scenario {
    // One flow on the three main labs: the rows the targets and the calibration are about.
    let precision = match (traced, lab.rules) {
        (Traced::Flows(1), Rules::KubeNode(574)) => Precision::Fine,
        _ => Precision::Coarse,
    };
    Scenario { key, lab, tool, traced, precision, floor }
}

const ONE: Traced = Traced::Flows(1);
const ALL: Traced = Traced::Everything;
const TEXT: OutputFormat = OutputFormat::Iptrace;
const LEGACY_ARGS: &[&str] = &["--backend", "legacy"];
const NFT_ARGS: &[&str] = &["--backend", "nft"];
/// Rules in the calibration chain by default: about 1 % of the legacy lab's forwarding CPU per
/// packet (see docs/benchmarks.md for how that was measured).
pub const CALIBRATION_RULES: usize = 30;

impl Scenario {
    pub const ALL: [Scenario; 29] = [
        row("calibration_a_a", LEGACY, Tool::Untraced, ONE, None),
        row("calibration_1pct", LEGACY, Tool::NoOpChain, ONE, None),
        row("legacy_floor_one_flow", LEGACY, Tool::Floor, ONE, None),
        row(
            "legacy_iptrace_one_flow",
            LEGACY,
            Tool::Iptrace { args: LEGACY_ARGS, output: TEXT },
            ONE,
            Some("legacy_floor_one_flow"),
        ),
        row(
            "legacy_iptrace_one_flow_no_drops",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "--no-drops"], output: TEXT },
            ONE,
            Some("legacy_floor_one_flow"),
        ),
        row("legacy_floor_all", LEGACY, Tool::Floor, ALL, None),
        row(
            "legacy_iptrace_all",
            LEGACY,
            Tool::Iptrace { args: LEGACY_ARGS, output: TEXT },
            ALL,
            Some("legacy_floor_all"),
        ),
        row(
            "legacy_iptrace_all_json",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "--json"], output: OutputFormat::IptraceJson },
            ALL,
            Some("legacy_floor_all"),
        ),
        row(
            "legacy_iptrace_all_pcapng",
            LEGACY,
            Tool::Iptrace { args: &["--backend", "legacy", "-w", "-"], output: OutputFormat::Pcapng },
            ALL,
            Some("legacy_floor_all"),
        ),
        row("nft_floor_one_flow", NFTABLES, Tool::Floor, ONE, None),
        row(
            "nft_iptrace_one_flow",
            NFTABLES,
            Tool::Iptrace { args: NFT_ARGS, output: TEXT },
            ONE,
            Some("nft_floor_one_flow"),
        ),
        row("nft_monitor_one_flow", NFTABLES, Tool::NftMonitor, ONE, Some("nft_floor_one_flow")),
        row("nft_xtables_monitor_one_flow", NFTABLES, Tool::XtablesMonitor, ONE, Some("nft_floor_one_flow")),
        row("nft_iptrace_16_flows", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, Traced::Flows(16), None),
        row("nft_iptrace_64_flows", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, Traced::Flows(64), None),
        row("nft_floor_all", NFTABLES, Tool::Floor, ALL, None),
        row("nft_iptrace_all", NFTABLES, Tool::Iptrace { args: NFT_ARGS, output: TEXT }, ALL, Some("nft_floor_all")),
        row(
            "nft_iptrace_all_json",
            NFTABLES,
            Tool::Iptrace { args: &["--backend", "nft", "--json"], output: OutputFormat::IptraceJson },
            ALL,
            Some("nft_floor_all"),
        ),
        row(
            "nft_iptrace_all_pcapng",
            NFTABLES,
            Tool::Iptrace { args: &["--backend", "nft", "-w", "-"], output: OutputFormat::Pcapng },
            ALL,
            Some("nft_floor_all"),
        ),
        row("nft_monitor_all", NFTABLES, Tool::NftMonitor, ALL, Some("nft_floor_all")),
        row("nft_xtables_monitor_all", NFTABLES, Tool::XtablesMonitor, ALL, Some("nft_floor_all")),
        row("mixed_floor_one_flow", MIXED, Tool::Floor, ONE, None),
        row(
            "mixed_iptrace_one_flow",
            MIXED,
            Tool::Iptrace { args: &[], output: TEXT },
            ONE,
            Some("mixed_floor_one_flow"),
        ),
        row("mixed_floor_all", MIXED, Tool::Floor, ALL, None),
        row("mixed_iptrace_all", MIXED, Tool::Iptrace { args: &[], output: TEXT }, ALL, Some("mixed_floor_all")),
        row("scale_100_rules", RULES_100, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_1000_rules", RULES_1K, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_10000_rules", RULES_10K, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
        row("scale_5000_nft_rules_10000_set", NFT_SET, Tool::Iptrace { args: &[], output: TEXT }, ONE, None),
    ];

    pub fn by_key(key: &str) -> Option<Scenario> {
        Self::ALL.into_iter().find(|s| s.key == key)
    }
}

/// Traffic through the lab, as one phase of a slice measured it.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Phase {
    /// Packets the server's interface received.
    pub forwarded: u64,
    /// Packets the generator handed to the kernel.
    pub offered: u64,
    pub seconds: f64,
    /// CPU time of the forwarding CPU's work: the sending thread (the whole path runs in softirq
    /// in its context) plus that CPU's softirq thread, in nanoseconds.
    pub forwarding_cpu_ns: u64,
}

impl Phase {
    pub fn cpu_ns_per_packet(&self) -> Option<f64> {
        (self.forwarded > 0).then(|| self.forwarding_cpu_ns as f64 / self.forwarded as f64)
    }

    pub fn pps(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.forwarded as f64 / self.seconds)
    }
}

/// One slice of a scenario: the fixed-load phase, then the saturated one, and the tracer's
/// figures over both.
#[derive(Clone, Debug, Default)]
pub struct Slice {
    pub fixed: Phase,
    pub saturated: Phase,
    pub traced_packets_kernel: Option<u64>,
    pub reported_complete: Option<u64>,
    pub lost_events: Option<u64>,
    pub tracer_cpu_seconds: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub messages: Option<u64>,
    pub ready_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The saturated phase's traffic (also the base of the fixed phase's, whose rate and length
    /// the lab's calibration sets).
    pub traffic: TrafficPlan,
    /// Length of the fixed-load phase of each slice.
    pub fixed_phase: Duration,
    /// The fixed load as a share of the untraced saturated rate.
    pub fixed_load_share: f64,
    pub iptrace: PathBuf,
    /// Where the tracers write their output.
    pub work_dir: PathBuf,
    /// Leave the outputs there, for a look at what each tracer reported.
    pub keep_outputs: bool,
    /// Prefix of the lab's namespaces.
    pub lab_prefix: String,
    /// Rules in the chain of [`Tool::NoOpChain`].
    pub calibration_rules: usize,
}

/// From a tracer's ready signal to the traffic: what is measured is the cost of tracing, not of
/// starting (iptrace verifies its eBPF programs in the background for about 0.15 s after it
/// says it is ready); the start is measured on its own as `ready_ms`.
const WARM_UP: Duration = Duration::from_millis(500);
/// After the traffic: in-flight packets arrive within this.
const SETTLE: Duration = Duration::from_millis(50);
/// Then the tracer gets this long to take in what is still queued (iptrace's grouping waits
/// 50 ms of quiet per packet) before it is stopped.
const DRAIN_ONE_FLOW: Duration = Duration::from_millis(300);
const DRAIN_ALL: Duration = Duration::from_millis(700);
/// Saturated slices that find a lab's untraced rate, of which the fixed load is a share.
const RATE_PROBES: usize = 3;

/// A lab with its rule set, ready for scenarios; removed on drop.
pub struct Bench {
    lab: Lab,
    spec: LabSpec,
    config: BenchConfig,
    rules: usize,
    /// The fixed phase's traffic: a share of the untraced saturated rate found at the start.
    fixed: TrafficPlan,
    pub untraced_saturated_pps: f64,
}

impl Bench {
    pub fn build(config: BenchConfig, spec: LabSpec) -> Result<Self, ScenarioError> {
        fs::create_dir_all(&config.work_dir)
            .map_err(|source| ScenarioError::WorkDir { path: config.work_dir.clone(), source })?;
        let lab = Lab::router_lab(&config.lab_prefix)?;
        let (kube, native) = spec.rule_sets();
        if matches!(spec.host, Host::Legacy | Host::Mixed) {
            lab.exec(Role::Router, &["iptables-legacy-restore"], &kube.restore_text)?;
        }
        if matches!(spec.host, Host::Nftables | Host::Mixed) {
            lab.exec(Role::Router, &["iptables-nft-restore"], &kube.restore_text)?;
        }
        if let Some(native) = &native {
            lab.exec(Role::Router, &["nft", "-f", "-"], &native.restore_text)?;
        }
        let rules = kube.rules + native.map_or(0, |n| n.rules);
        // The server only counts what arrives: dropping it before anything else keeps its replies
        // (ICMP port unreachable, RST) off the router.
        lab.exec(
            Role::Server,
            &["nft", "-f", "-"],
            "table ip sink {\n chain arrivals {\n  type filter hook prerouting priority -500; policy drop\n }\n}\n",
        )?;
        let fixed = TrafficPlan { duration: config.fixed_phase, ..config.traffic };
        let mut bench = Self { lab, spec, config, rules, fixed, untraced_saturated_pps: 0.0 };
        let mut probes = Vec::with_capacity(RATE_PROBES);
        for _ in 0..RATE_PROBES {
            probes.push(bench.phase(bench.config.traffic)?.pps().unwrap_or(0.0));
        }
        probes.sort_by(f64::total_cmp);
        bench.untraced_saturated_pps = probes[RATE_PROBES / 2];
        bench.fixed.rate_pps = (bench.untraced_saturated_pps * bench.config.fixed_load_share) as u64;
        Ok(bench)
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    pub fn rules(&self) -> usize {
        self.rules
    }

    pub fn fixed_load_pps(&self) -> u64 {
        self.fixed.rate_pps
    }

    /// One slice of `scenario`: set up its tracer, send the traffic, stop the tracer.
    pub fn run(&self, scenario: &Scenario) -> Result<Slice, ScenarioError> {
        match scenario.tool {
            Tool::Untraced => self.measure_forwarding(),
            Tool::NoOpChain => {
                let _chain = NoOpChain::install(&self.lab, self.config.calibration_rules)?;
                self.measure_forwarding()
            }
            Tool::Floor => self.run_floor(scenario),
            Tool::Iptrace { args, output } => self.run_iptrace(scenario, args, output),
            Tool::NftMonitor | Tool::XtablesMonitor => self.run_monitor(scenario),
        }
    }

    /// Both phases: the fixed load, then as fast as the forwarding CPU goes.
    fn measure_forwarding(&self) -> Result<Slice, ScenarioError> {
        let fixed = self.phase(self.fixed)?;
        let saturated = self.phase(self.config.traffic)?;
        Ok(Slice { fixed, saturated, ..Slice::default() })
    }

    fn phase(&self, plan: TrafficPlan) -> Result<Phase, ScenarioError> {
        let before = kernel::server_received_packets(&self.lab)?;
        let cpu = traffic::sending_cpu();
        let softirq_before = kernel::softirq_thread_ns(cpu).unwrap_or(0);
        let sent = self.lab.in_ns(Role::Client, move || traffic::send(&plan))?.map_err(ScenarioError::Traffic)?;
        let softirq = kernel::softirq_thread_ns(cpu).unwrap_or(0).saturating_sub(softirq_before);
        thread::sleep(SETTLE);
        let forwarded = kernel::server_received_packets(&self.lab)? - before;
        Ok(Phase {
            forwarded,
            offered: sent.udp_sent + sent.syn_sent,
            seconds: sent.elapsed.as_secs_f64(),
            forwarding_cpu_ns: sent.thread_cpu_ns + softirq,
        })
    }

    fn drain(scenario: &Scenario) -> Duration {
        match scenario.traced {
            Traced::Everything => DRAIN_ALL,
            Traced::Flows(_) => DRAIN_ONE_FLOW,
        }
    }

    /// The packets the kernel marked for tracing, from the counters of the marking's rules: the
    /// TRACE rules on the legacy host (listing legacy tables elsewhere would create them),
    /// iptrace's nf_tables table on the others. Read while the marking is in place.
    fn traced_packets(&self) -> Result<u64, ScenarioError> {
        Ok(match self.spec.host {
            Host::Legacy => kernel::trace_rule_packets(&self.lab, "iptables-legacy")?,
            Host::Nftables | Host::Mixed => kernel::iptrace_table_packets(&self.lab)?,
        })
    }

    /// The harness's extra listener on `NFNLGRP_NFTRACE`, in every tracing row of the nf_tables
    /// hosts (none on the legacy host: nflog's group has a single reader).
    fn extra_listener(&self) -> Result<Option<TraceListener>, ScenarioError> {
        Ok(match self.spec.host {
            Host::Legacy => None,
            Host::Nftables | Host::Mixed => Some(TraceListener::start(&self.lab, Listened::Nftrace)?),
        })
    }

    /// The kernel's tracing alone: iptrace's marking for this host, and iptrace's trace socket
    /// read by a reader that only counts.
    fn run_floor(&self, scenario: &Scenario) -> Result<Slice, ScenarioError> {
        let nflog = matches!(self.spec.host, Host::Legacy | Host::Mixed);
        let marker = if self.spec.host == Host::Legacy { Marker::TraceRules } else { Marker::NftTable };
        let marking = MarkingThread::install(&self.lab, marker, nflog, scenario.traced)?;
        let listener = self.extra_listener()?;
        let reader =
            TraceListener::start(&self.lab, Listened::TraceSocket { nflog, nftrace: marker == Marker::NftTable })?;
        let mut slice = self.measure_forwarding()?;
        thread::sleep(Self::drain(scenario));
        let traced = self.traced_packets()?;
        let read = reader.finish()?;
        marking.finish()?;
        slice.traced_packets_kernel = Some(traced);
        slice.lost_events = Some(read.overruns);
        slice.messages = Some(read.messages);
        if let Some(listener) = listener {
            note_listener(&mut slice, listener.finish()?);
        }
        Ok(slice)
    }

    fn output_path(&self, scenario: &Scenario) -> PathBuf {
        self.config.work_dir.join(format!("{}.out", scenario.key))
    }

    fn take_output(&self, path: &Path) -> Vec<u8> {
        let data = fs::read(path).unwrap_or_default();
        if !self.config.keep_outputs {
            let _ = fs::remove_file(path);
        }
        data
    }

    /// How long iptrace takes from its start to tracing with `expression` (its ready line), or to
    /// refusing it (its exit), in milliseconds; with `refused` telling which.
    pub fn time_expression(&self, expression: &str) -> Result<ExpressionTime, ScenarioError> {
        let router = self.lab.ns(Role::Router);
        let argv: Vec<String> = [self.config.iptrace.to_string_lossy().as_ref(), "--netns", &router, "-4", expression]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let path = self.config.work_dir.join("expression.out");
        let timed = match TracerProcess::start(&argv, &path, &Readiness::StderrLine("iptrace: tracing")) {
            Ok(tracer) => {
                let finished = tracer.stop()?;
                ExpressionTime { ms: finished.ready.as_secs_f64() * 1000.0, refused: None }
            }
            Err(TracerError::NotReady { waited, stderr, .. }) => {
                ExpressionTime { ms: waited.as_secs_f64() * 1000.0, refused: Some(stderr) }
            }
            Err(e) => return Err(e.into()),
        };
        let _ = fs::remove_file(&path);
        Ok(timed)
    }

    fn run_iptrace(&self, scenario: &Scenario, args: &[&str], output: OutputFormat) -> Result<Slice, ScenarioError> {
        let router = self.lab.ns(Role::Router);
        let mut argv: Vec<String> =
            [self.config.iptrace.to_string_lossy().as_ref(), "--netns", &router, "--stats", "-4"]
                .iter()
                .chain(args)
                .map(|s| (*s).to_owned())
                .collect();
        argv.extend(scenario.traced.expression());
        let listener = self.extra_listener()?;
        let path = self.output_path(scenario);
        let mut tracer = TracerProcess::start(&argv, &path, &Readiness::StderrLine("iptrace: tracing"))?;
        thread::sleep(WARM_UP);
        tracer.start_tracing();
        let mut slice = self.measure_forwarding()?;
        thread::sleep(Self::drain(scenario));
        let traced = self.traced_packets()?;
        let finished = tracer.stop()?;
        let stats = finished.stderr.iter().find_map(|l| IptraceStats::parse(l));
        if stats.is_none() {
            slice.notes.push(format!("no --stats line; stderr: {}", finished.stderr.join(" | ")));
        }
        let complete = completeness::complete_packets(output, &self.take_output(&path));
        fill_tracer_figures(&mut slice, traced, complete, &finished);
        slice.lost_events = stats.map(|s| s.overruns);
        slice.messages = stats.map(|s| s.messages);
        if let Some(listener) = listener {
            note_listener(&mut slice, listener.finish()?);
        }
        Ok(slice)
    }

    /// `nft monitor trace` or `xtables-monitor --trace`, with iptrace's nf_tables marking (the
    /// floor's), installed through its library.
    fn run_monitor(&self, scenario: &Scenario) -> Result<Slice, ScenarioError> {
        let router = self.lab.ns(Role::Router);
        let nflog = self.spec.host != Host::Nftables;
        let marking = MarkingThread::install(&self.lab, Marker::NftTable, nflog, scenario.traced)?;
        let (format, command): (OutputFormat, &[&str]) = match scenario.tool {
            Tool::XtablesMonitor => (OutputFormat::XtablesMonitor, &["xtables-monitor", "--trace"]),
            _ => (OutputFormat::NftMonitor, &["nft", "monitor", "trace"]),
        };
        let argv: Vec<String> =
            ["ip", "netns", "exec", &router].iter().chain(command).map(|s| (*s).to_owned()).collect();
        let listener = self.extra_listener()?;
        let path = self.output_path(scenario);
        let readiness = Readiness::NetlinkGroup { netns: router, group: 9 };
        let mut tracer = TracerProcess::start(&argv, &path, &readiness)?;
        thread::sleep(WARM_UP);
        tracer.start_tracing();
        let mut slice = self.measure_forwarding()?;
        thread::sleep(Self::drain(scenario));
        let traced = self.traced_packets()?;
        let finished = tracer.stop()?;
        marking.finish()?;
        let text = String::from_utf8_lossy(&self.take_output(&path)).into_owned();
        let complete = completeness::complete_packets(format, text.as_bytes());
        fill_tracer_figures(&mut slice, traced, complete, &finished);
        slice.lost_events = Some(completeness::admitted_losses(format, &text, &finished.stderr));
        if let Some(listener) = listener {
            note_listener(&mut slice, listener.finish()?);
        }
        if !finished.ran_to_stop {
            slice.notes.push(format!("the tool exited by itself before the end: {}", finished.stderr.join(" | ")));
        }
        Ok(slice)
    }
}

/// [`Bench::time_expression`]'s figure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpressionTime {
    pub ms: f64,
    /// iptrace's reason when it refused the expression.
    pub refused: Option<String>,
}

/// The extra listener's count is the messages per packet of the tools that report none.
fn note_listener(slice: &mut Slice, heard: TraceMessages) {
    slice.messages = slice.messages.or(Some(heard.messages));
    if heard.overruns > 0 {
        slice.notes.push(format!(
            "the harness's extra trace listener overran {} times (its message count is a lower bound)",
            heard.overruns
        ));
    }
}

fn fill_tracer_figures(slice: &mut Slice, traced: u64, complete: u64, finished: &crate::tracer::Finished) {
    slice.traced_packets_kernel = Some(traced);
    slice.reported_complete = Some(complete);
    // While tracing; a tool that gave up before the stop is charged its whole run.
    slice.tracer_cpu_seconds = Some(finished.tracing_cpu_seconds.unwrap_or(finished.cpu_seconds));
    slice.peak_rss_mb = finished.peak_rss_mb;
    slice.ready_ms = Some(finished.ready.as_secs_f64() * 1000.0);
    // A tool that gave up before the stop signal has no clean-exit time.
    slice.exit_ms = finished.ran_to_stop.then_some(finished.exit.as_secs_f64() * 1000.0);
}

/// iptrace's `--stats` line.
#[derive(Clone, Copy, Debug)]
struct IptraceStats {
    messages: u64,
    overruns: u64,
}

impl IptraceStats {
    /// `iptrace: stats: N datagrams, N messages, ..., N receive-buffer overruns`, or with `--json`
    /// `{"schema":1,"stats":{"messages":N,"overruns":N,...}}`.
    fn parse(line: &str) -> Option<Self> {
        if let Ok(record) = serde_json::from_str::<serde_json::Value>(line) {
            let stats = &record["stats"];
            return Some(Self { messages: stats["messages"].as_u64()?, overruns: stats["overruns"].as_u64()? });
        }
        let counters = line.strip_prefix("iptrace: stats: ")?;
        let find = |name: &str| counters.split(", ").find_map(|c| c.strip_suffix(name)?.trim().parse::<u64>().ok());
        Some(Self { messages: find(" messages")?, overruns: find(" receive-buffer overruns")? })
    }
}

/// iptrace's marking (TRACE rules or its nf_tables table, with its native match for the
/// selection), installed through iptrace's library by a thread in the router's netns that holds
/// the instrumentation until dropped, then tears it down as iptrace does.
struct MarkingThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl MarkingThread {
    fn install(lab: &Lab, marker: Marker, nflog: bool, traced: Traced) -> Result<Self, ScenarioError> {
        let selection = Selection { expression: traced.expression(), ..Selection::default() };
        let prefilter = match selection.to_native().map_err(|e| ScenarioError::Marking(e.to_string()))? {
            Some(native) => Prefilter::Native(native),
            None if traced == Traced::Everything => Prefilter::None,
            None => return Err(ScenarioError::Marking(format!("{selection:?} has no native match"))),
        };
        let plan = TracePlan {
            families: vec![Family::Ipv4],
            marker,
            prefilter,
            in_interface: None,
            out_interface: None,
            limit: None,
            chain: None,
        };
        let netns = lab.ns(Role::Router);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || -> Result<(), String> {
                let text = |e: &(dyn std::error::Error + 'static)| iptrace::WithCauses(e).to_string();
                iptrace::netns::enter(&netns).map_err(|e| text(&e))?;
                let families: &[Family] = if nflog { &[Family::Ipv4] } else { &[] };
                let (mut instrumentation, _stale) = Instrumentation::prepare(families).map_err(|e| text(&e))?;
                let installed = instrument::install(instrumentation.owner(), &plan).map_err(|e| text(&e));
                let _ = ready_tx.send(installed.clone());
                if installed.is_ok() {
                    while !stop.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                match instrumentation.teardown().first() {
                    Some(e) => Err(text(e)),
                    None => installed,
                }
            })
        };
        let installed = ready_rx.recv().unwrap_or_else(|_| Err("the marking thread died".into()));
        let this = Self { stop, thread: Some(thread) };
        installed.map_err(ScenarioError::Marking)?;
        Ok(this)
    }
}

impl MarkingThread {
    /// Tears the marking down; what could not be undone is an error.
    fn finish(mut self) -> Result<(), ScenarioError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result.map_err(ScenarioError::Marking),
            Some(Err(_)) => Err(ScenarioError::Marking("the marking thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for MarkingThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calibration's chain of rules that match nothing, jumped to first in raw PREROUTING of the
/// legacy tables; removed on drop.
struct NoOpChain<'a> {
    lab: &'a Lab,
}

const NO_OP_CHAIN: &str = "BENCH-CALIBRATION";

impl<'a> NoOpChain<'a> {
    fn install(lab: &'a Lab, rules: usize) -> Result<Self, LabError> {
        let mut text = format!("*raw\n:{NO_OP_CHAIN} - [0:0]\n-I PREROUTING -j {NO_OP_CHAIN}\n");
        for i in 0..rules {
            // TEST-NET-1 sources: no lab packet matches, each rule is walked and missed.
            text.push_str(&format!("-A {NO_OP_CHAIN} -s 192.0.2.{}/32 -j RETURN\n", i % 250 + 1));
        }
        text.push_str("COMMIT\n");
        lab.exec(Role::Router, &["iptables-legacy-restore", "--noflush"], &text)?;
        Ok(Self { lab })
    }
}

impl Drop for NoOpChain<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(
            Role::Router,
            &["iptables-legacy-restore", "--noflush"],
            &format!("*raw\n-D PREROUTING -j {NO_OP_CHAIN}\n-F {NO_OP_CHAIN}\n-X {NO_OP_CHAIN}\nCOMMIT\n"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stats_line() {
        let s = IptraceStats::parse(
            "iptrace: stats: 10 datagrams, 12 messages, 11 trace events decoded, 0 malformed, 3 packets shown, 2 receive-buffer overruns",
        )
        .unwrap();
        assert_eq!((s.messages, s.overruns), (12, 2));
        let s = IptraceStats::parse(r#"{"schema":1,"stats":{"datagrams":10,"messages":12,"overruns":2}}"#).unwrap();
        assert_eq!((s.messages, s.overruns), (12, 2));
        assert!(IptraceStats::parse("iptrace: tracing every packet").is_none());
    }

    #[test]
    fn every_comparison_is_within_one_lab_and_precision() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::ALL.iter().filter(|o| o.key == s.key).count(), 1, "{}", s.key);
            if let Some(floor) = s.floor {
                let f = Scenario::by_key(floor).unwrap();
                assert_eq!((f.lab, f.precision, f.traced), (s.lab, s.precision, s.traced), "{}", s.key);
                assert_eq!(f.tool, Tool::Floor);
            }
        }
    }

    #[test]
    fn selections_are_iptrace_expressions() {
        assert_eq!(Traced::Flows(1).expression().unwrap(), "udp dst port 5000");
        assert_eq!(Traced::Flows(16).expression().unwrap(), "udp dst portrange 5000-5015");
        assert_eq!(Traced::Everything.expression(), None);
    }
}
