//! The scenarios and one run of each: the lab with its rule sets, a tracer (or none), the
//! traffic, and the figures.
//!
//! The router carries the same kube-proxy/Docker rule set twice: in iptables-legacy (what iptrace
//! traces) and in iptables-nft (what `nft monitor trace` and `xtables-monitor --trace` trace), so
//! every scenario forwards through the same rules and one baseline serves all.

use std::{fs, path::PathBuf, thread, time::Duration};

use iptrace::{decode::Family, instrument::nf_log};
use iptrace_lab::{Lab, LabError, Role};
use serde::Serialize;

use crate::{
    completeness::{self, OutputFormat},
    kernel::{self, KernelError, Listened, TraceListener},
    rounds::{self, Round},
    ruleset::RuleSet,
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
    #[error("the router's logger binding")]
    Logger(#[from] iptrace::instrument::InstrumentError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Baseline,
    /// One flow with drop reasons on (iptrace's default; issue 15's cost of `skb:kfree_skb`).
    IptraceOneFlow,
    /// The same with `--no-drops`: the difference is what reporting drops costs.
    IptraceOneFlowNoDrops,
    IptraceAll,
    /// As [`Scenario::IptraceAll`], written as JSON lines (`--json`).
    IptraceAllJson,
    NftMonitorOneFlow,
    NftMonitorAll,
    XtablesMonitorAll,
    IptraceAllNoSocketFilter,
    IptraceBothEnginesOneFlow,
    IptraceBothEnginesAll,
    TraceFloorOneFlow,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::Baseline,
        Scenario::IptraceOneFlow,
        Scenario::IptraceOneFlowNoDrops,
        Scenario::IptraceAll,
        Scenario::IptraceAllJson,
        Scenario::NftMonitorOneFlow,
        Scenario::NftMonitorAll,
        Scenario::XtablesMonitorAll,
        Scenario::IptraceAllNoSocketFilter,
        Scenario::IptraceBothEnginesOneFlow,
        Scenario::IptraceBothEnginesAll,
        Scenario::TraceFloorOneFlow,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::IptraceOneFlow => "iptrace_one_flow",
            Scenario::IptraceOneFlowNoDrops => "iptrace_one_flow_no_drops",
            Scenario::IptraceAll => "iptrace_all",
            Scenario::IptraceAllJson => "iptrace_all_json",
            Scenario::NftMonitorOneFlow => "nft_monitor_one_flow",
            Scenario::NftMonitorAll => "nft_monitor_all",
            Scenario::XtablesMonitorAll => "xtables_monitor_all",
            Scenario::IptraceAllNoSocketFilter => "iptrace_all_no_socket_filter",
            Scenario::IptraceBothEnginesOneFlow => "iptrace_both_engines_one_flow",
            Scenario::IptraceBothEnginesAll => "iptrace_both_engines_all",
            Scenario::TraceFloorOneFlow => "trace_floor_one_flow",
        }
    }

    fn one_flow(self) -> bool {
        matches!(
            self,
            Scenario::IptraceOneFlow
                | Scenario::IptraceOneFlowNoDrops
                | Scenario::NftMonitorOneFlow
                | Scenario::IptraceBothEnginesOneFlow
                | Scenario::TraceFloorOneFlow
        )
    }
}

/// The figures of one scenario; `None` where a figure does not apply.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioResult {
    pub forward_pps: Option<f64>,
    pub forward_ratio: Option<f64>,
    pub traced_packets_kernel: Option<u64>,
    pub reported_complete: Option<u64>,
    pub complete_ratio: Option<f64>,
    pub lost_events: Option<u64>,
    pub cpu_s_per_1k_traced: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub msgs_to_userspace_per_match: Option<f64>,
    pub ready_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    /// The baseline measured right after this scenario, which `forward_ratio` is relative to.
    pub adjacent_baseline_pps: Option<f64>,
    /// Packets the generator handed to the kernel per second.
    pub offered_pps: Option<f64>,
    /// Scenario slices the figures were taken over (see [`crate::rounds`]).
    pub rounds: usize,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub traffic: TrafficPlan,
    pub iptrace: PathBuf,
    /// Where the tracers write their output.
    pub work_dir: PathBuf,
    /// Leave the outputs there, for a look at what each tracer reported.
    pub keep_outputs: bool,
}

/// The nft table holding the `meta nftrace set 1` rule of the nft monitor scenarios; priority
/// -350 runs it before the raw table, as iptrace's TRACE rule is the first of raw.
const NFTRACE_TABLE: &str = "iptrace_bench";
const NFTRACE_CHAIN: &str = "mark_for_trace";
/// From a tracer's ready signal to the traffic: what is measured is the cost of tracing, not of
/// starting (iptrace verifies and attaches its eBPF socket filter in the background for about
/// 0.3 s after it says it is ready); the start is measured on its own as `ready_ms`.
const WARM_UP: Duration = Duration::from_secs(1);
/// After the traffic: in-flight packets arrive within this.
const SETTLE: Duration = Duration::from_millis(100);
/// Then the tracer gets this long to take in what is still queued (iptrace's grouping waits
/// 50 ms of quiet per packet) before it is stopped.
const DRAIN: Duration = Duration::from_millis(700);

/// The lab with its rule sets, ready for scenarios; removed on drop.
pub struct Bench {
    lab: Lab,
    config: BenchConfig,
}

impl Bench {
    pub fn build(config: BenchConfig, rules: &RuleSet) -> Result<Self, ScenarioError> {
        fs::create_dir_all(&config.work_dir)
            .map_err(|source| ScenarioError::WorkDir { path: config.work_dir.clone(), source })?;
        let lab = Lab::router_lab("iptbench")?;
        lab.exec(Role::Router, &["iptables-legacy-restore"], &rules.restore_text)?;
        lab.exec(Role::Router, &["iptables-nft-restore"], &rules.restore_text)?;
        // The server only counts what arrives: dropping it before anything else keeps its replies
        // (ICMP port unreachable, RST) off the router.
        lab.exec(
            Role::Server,
            &["nft", "-f", "-"],
            "table ip sink {\n chain arrivals {\n  type filter hook prerouting priority -500; policy drop\n }\n}\n",
        )?;
        Ok(Self { lab, config })
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Measures `scenario` in `rounds` rounds, each a slice of it and then a slice without a tracer
    /// (see [`crate::rounds`]); the baseline itself in `rounds` slices.
    pub fn measure(&self, scenario: Scenario, rounds: usize) -> Result<ScenarioResult, ScenarioError> {
        let mut measured = Vec::with_capacity(rounds);
        for _ in 0..rounds.max(1) {
            let slice = self.run(scenario)?;
            let baseline_pps = match scenario {
                Scenario::Baseline => slice.forward_pps,
                _ => self.run(Scenario::Baseline)?.forward_pps,
            };
            measured.push(Round { scenario: slice, baseline_pps });
        }
        Ok(rounds::merge(&measured))
    }

    /// One slice of `scenario`: start its tracer, send the traffic, stop the tracer.
    pub fn run(&self, scenario: Scenario) -> Result<ScenarioResult, ScenarioError> {
        match scenario {
            Scenario::Baseline => self.measure_forwarding(),
            // The required iptrace scenarios trace the legacy copy of the rule set, as nft monitor
            // and xtables-monitor trace the nf_tables copy; the both-engines ones show what
            // iptrace's default does on this mixed host: it traces every packet through both.
            Scenario::IptraceOneFlow | Scenario::IptraceAll => self.run_iptrace(scenario, &["--backend", "legacy"]),
            Scenario::IptraceAllJson => self.run_iptrace(scenario, &["--backend", "legacy", "--json"]),
            Scenario::IptraceOneFlowNoDrops => self.run_iptrace(scenario, &["--backend", "legacy", "--no-drops"]),
            Scenario::IptraceAllNoSocketFilter => {
                self.run_iptrace(scenario, &["--backend", "legacy", "--no-socket-filter"])
            }
            Scenario::IptraceBothEnginesOneFlow | Scenario::IptraceBothEnginesAll => {
                self.run_iptrace(scenario, &["--backend", "nft"])
            }
            Scenario::NftMonitorOneFlow | Scenario::NftMonitorAll | Scenario::XtablesMonitorAll => {
                self.run_nft(scenario)
            }
            Scenario::TraceFloorOneFlow => self.run_trace_floor(),
        }
    }

    /// What tracing the flow costs the kernel alone: the TRACE rule iptrace would insert for
    /// `udp dst port 5000` (its native match, first in raw PREROUTING), nfnetlink_log bound, and a
    /// reader that only counts the messages.
    fn run_trace_floor(&self) -> Result<ScenarioResult, ScenarioError> {
        let _logger = LoggerBinding::bind(&self.lab, "nfnetlink_log")?;
        let _marking = TraceMarking::legacy_trace_rule(&self.lab)?;
        let listener = TraceListener::start(&self.lab, Listened::Nflog)?;
        let mut result = self.measure_forwarding()?;
        thread::sleep(DRAIN);
        let traced = kernel::trace_rule_packets(&self.lab, "iptables-legacy")?;
        let messages = listener.finish()?;
        result.traced_packets_kernel = Some(traced);
        result.lost_events = Some(messages.overruns);
        result.msgs_to_userspace_per_match = nonzero(traced).map(|t| messages.messages as f64 / t as f64);
        Ok(result)
    }

    fn measure_forwarding(&self) -> Result<ScenarioResult, ScenarioError> {
        let before = kernel::server_received_packets(&self.lab)?;
        let plan = self.config.traffic;
        let sent = self.lab.in_ns(Role::Client, move || traffic::send(&plan))?.map_err(ScenarioError::Traffic)?;
        thread::sleep(SETTLE);
        let received = kernel::server_received_packets(&self.lab)? - before;
        let seconds = sent.elapsed.as_secs_f64();
        Ok(ScenarioResult {
            forward_pps: Some(received as f64 / seconds),
            offered_pps: Some((sent.udp_sent + sent.syn_sent) as f64 / seconds),
            ..ScenarioResult::default()
        })
    }

    fn output_path(&self, scenario: Scenario) -> PathBuf {
        self.config.work_dir.join(format!("{}.out", scenario.key()))
    }

    fn take_output(&self, path: &std::path::Path) -> String {
        let text = fs::read_to_string(path).unwrap_or_default();
        if !self.config.keep_outputs {
            let _ = fs::remove_file(path);
        }
        text
    }

    fn run_iptrace(&self, scenario: Scenario, extra: &[&str]) -> Result<ScenarioResult, ScenarioError> {
        let router = self.lab.ns(Role::Router);
        let mut argv: Vec<String> =
            [self.config.iptrace.to_string_lossy().as_ref(), "--netns", &router, "--stats", "-4"]
                .iter()
                .chain(extra)
                .map(|s| (*s).to_owned())
                .collect();
        if scenario.one_flow() {
            argv.push(format!("udp dst port {UDP_FIRST_PORT}"));
        }
        let output = self.output_path(scenario);
        let mut tracer = TracerProcess::start(&argv, &output, &Readiness::StderrLine("iptrace: tracing"))?;
        thread::sleep(WARM_UP);
        tracer.start_tracing();
        let mut result = self.measure_forwarding()?;
        thread::sleep(DRAIN);
        // One of the two marks packets, depending on the backend iptrace chose.
        let traced =
            kernel::trace_rule_packets(&self.lab, "iptables-legacy")? + kernel::iptrace_table_packets(&self.lab)?;
        let finished = tracer.stop()?;
        let stats = finished.stderr.iter().find_map(|l| IptraceStats::parse(l));
        if stats.is_none() {
            result.notes.push(format!("no --stats line; stderr: {}", finished.stderr.join(" | ")));
        }
        let text = self.take_output(&output);
        let format =
            if scenario == Scenario::IptraceAllJson { OutputFormat::IptraceJson } else { OutputFormat::Iptrace };
        let complete = completeness::complete_packets(format, &text);
        fill_tracer_figures(&mut result, traced, complete, &finished);
        result.lost_events = stats.map(|s| s.overruns);
        result.msgs_to_userspace_per_match =
            stats.map(|s| s.messages).zip(nonzero(traced)).map(|(m, t)| m as f64 / t as f64);
        Ok(result)
    }

    fn run_nft(&self, scenario: Scenario) -> Result<ScenarioResult, ScenarioError> {
        let router = self.lab.ns(Role::Router);
        let _no_legacy_logging = LoggerBinding::bind(&self.lab, "NONE")?;
        let (format, argv, _marking) = match scenario {
            Scenario::XtablesMonitorAll => (
                OutputFormat::XtablesMonitor,
                vec!["ip", "netns", "exec", &router, "xtables-monitor", "--trace"],
                TraceMarking::iptables_nft(&self.lab)?,
            ),
            _ => (
                OutputFormat::NftMonitor,
                vec!["ip", "netns", "exec", &router, "nft", "monitor", "trace"],
                TraceMarking::nftrace_rule(&self.lab, scenario.one_flow())?,
            ),
        };
        let argv: Vec<String> = argv.into_iter().map(str::to_owned).collect();
        let listener = TraceListener::start(&self.lab, Listened::Nftrace)?;
        let output = self.output_path(scenario);
        let readiness = Readiness::NetlinkGroup { netns: router, group: 9 };
        let mut tracer = TracerProcess::start(&argv, &output, &readiness)?;
        thread::sleep(WARM_UP);
        tracer.start_tracing();
        let mut result = self.measure_forwarding()?;
        thread::sleep(DRAIN);
        let traced = match scenario {
            Scenario::XtablesMonitorAll => kernel::trace_rule_packets(&self.lab, "iptables-nft")?,
            _ => kernel::nft_chain_counter(&self.lab, "ip", NFTRACE_TABLE, NFTRACE_CHAIN)?,
        };
        let finished = tracer.stop()?;
        let messages = listener.finish()?;
        let text = self.take_output(&output);
        let complete = completeness::complete_packets(format, &text);
        fill_tracer_figures(&mut result, traced, complete, &finished);
        result.lost_events = Some(completeness::admitted_losses(format, &text, &finished.stderr));
        result.msgs_to_userspace_per_match = nonzero(traced).map(|t| messages.messages as f64 / t as f64);
        if messages.overruns > 0 {
            result.notes.push(format!(
                "the harness's own trace listener overran {} times (message count is a lower bound)",
                messages.overruns
            ));
        }
        if !finished.ran_to_stop {
            result.notes.push(format!("the tool exited by itself before the end: {}", finished.stderr.join(" | ")));
        }
        Ok(result)
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

fn fill_tracer_figures(result: &mut ScenarioResult, traced: u64, complete: u64, finished: &crate::tracer::Finished) {
    result.traced_packets_kernel = Some(traced);
    result.reported_complete = Some(complete);
    result.complete_ratio = nonzero(traced).map(|t| complete as f64 / t as f64);
    // While tracing; a tool that gave up before the stop is charged its whole run.
    let cpu = finished.tracing_cpu_seconds.unwrap_or(finished.cpu_seconds);
    result.cpu_s_per_1k_traced = nonzero(traced).map(|t| cpu * 1000.0 / t as f64);
    result.peak_rss_mb = finished.peak_rss_mb;
    result.ready_ms = Some(finished.ready.as_secs_f64() * 1000.0);
    // A tool that gave up before the stop signal has no clean-exit time.
    result.exit_ms = finished.ran_to_stop.then_some(finished.exit.as_secs_f64() * 1000.0);
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

/// The rule that marks packets for tracing, removed on drop.
enum TraceMarking<'a> {
    NftraceTable(&'a Lab),
    IptablesNftTrace(&'a Lab),
    LegacyTrace(&'a Lab),
}

impl<'a> TraceMarking<'a> {
    fn nftrace_rule(lab: &'a Lab, one_flow: bool) -> Result<Self, LabError> {
        let selection = if one_flow { format!("udp dport {UDP_FIRST_PORT} ") } else { String::new() };
        lab.exec(
            Role::Router,
            &["nft", "-f", "-"],
            &format!(
                "table ip {NFTRACE_TABLE} {{\n chain {NFTRACE_CHAIN} {{\n  type filter hook prerouting priority -350\n  \
                 {selection}counter meta nftrace set 1\n }}\n}}\n"
            ),
        )?;
        Ok(Self::NftraceTable(lab))
    }

    fn legacy_trace_rule(lab: &'a Lab) -> Result<Self, LabError> {
        Self::legacy_command(lab, "-I")?;
        Ok(Self::LegacyTrace(lab))
    }

    /// Inserts or deletes the one-flow TRACE rule of [`Scenario::TraceFloorOneFlow`], worded as
    /// iptrace words it for `udp dst port 5000`.
    fn legacy_command(lab: &Lab, action: &str) -> Result<std::process::Output, LabError> {
        let port = UDP_FIRST_PORT.to_string();
        let rule = ["-t", "raw", action, "PREROUTING", "-p", "udp", "-m", "udp", "--dport", &port, "-j", "TRACE"];
        lab.exec(Role::Router, &[&["iptables-legacy", "-w"], &rule[..]].concat(), "")
    }

    fn iptables_nft(lab: &'a Lab) -> Result<Self, LabError> {
        lab.exec(Role::Router, &["iptables-nft", "-w", "-t", "raw", "-I", "PREROUTING", "-j", "TRACE"], "")?;
        Ok(Self::IptablesNftTrace(lab))
    }
}

impl Drop for TraceMarking<'_> {
    fn drop(&mut self) {
        let _ = match self {
            Self::NftraceTable(lab) => lab.exec(Role::Router, &["nft", "delete", "table", "ip", NFTRACE_TABLE], ""),
            Self::IptablesNftTrace(lab) => {
                lab.exec(Role::Router, &["iptables-nft", "-w", "-t", "raw", "-D", "PREROUTING", "-j", "TRACE"], "")
            }
            Self::LegacyTrace(lab) => Self::legacy_command(lab, "-D"),
        };
    }
}

/// The router's IPv4 logger, bound to another for a scenario and restored on drop. A packet
/// marked by nftables is also traced by the legacy tables (design.md §5.2), which would
/// log every step to the router's default logger, syslog: the nft scenarios bind "NONE", which
/// sends those lines nowhere; the trace floor binds nfnetlink_log.
struct LoggerBinding<'a> {
    lab: &'a Lab,
    saved: String,
}

impl<'a> LoggerBinding<'a> {
    fn bind(lab: &'a Lab, logger: &'static str) -> Result<Self, ScenarioError> {
        let saved = lab.in_ns(Role::Router, move || {
            let saved = nf_log::bound_logger(Family::Ipv4)?;
            nf_log::bind_logger(Family::Ipv4, logger).map(|()| saved)
        })??;
        Ok(Self { lab, saved })
    }
}

impl Drop for LoggerBinding<'_> {
    fn drop(&mut self) {
        let saved = self.saved.clone();
        let _ = self.lab.in_ns(Role::Router, move || nf_log::bind_logger(Family::Ipv4, &saved));
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
}
