//! A [`Bench`]: one lab with its rule set, calibrated, and the slices of scenarios run on it
//! (the tracer started, the traffic in its two phases, the figures read), with the marking
//! installed through iptrace's library where the tool under test does not mark itself.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use iptrace::instrument::Marker;
use iptrace_lab::{Lab, Role};
use serde::{Deserialize, Serialize};

use crate::{
    completeness::{self, OutputFormat},
    kernel::{self, Listened, TraceListener, TraceMessages},
    marking::{MarkingThread, NoOpChain},
    scenario::{Host, LabSpec, Scenario, ScenarioError, Tool, Traced},
    tracer::{Finished, Readiness, TracerError, TracerProcess},
    traffic::{self, TrafficPlan},
};

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
    /// iptrace's eBPF programs over an extra fixed-load phase with run-time statistics on.
    pub programs: Option<ProgramPhase>,
    pub notes: Vec<String>,
}

/// What iptrace's eBPF programs ran during one fixed-load phase, and the packets it forwarded:
/// their own cost per forwarded packet, counted by the kernel, free of the forwarding CPU's noise.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramPhase {
    pub forwarded: u64,
    pub runs: [kernel::ProgramRuns; kernel::IPTRACE_PROGRAMS.len()],
    /// [`kernel::ClockReference`]'s: what counting adds to each run.
    pub clock: kernel::ProgramRuns,
}

impl ProgramPhase {
    /// Program `i`'s own nanoseconds per forwarded packet: its counted time less what counting
    /// added to each of its runs. `None` when the clock reference did not run.
    pub fn own_ns_per_packet(&self, i: usize) -> Option<f64> {
        let clock_ns_per_run = (self.clock.runs > 0).then(|| self.clock.ns as f64 / self.clock.runs as f64)?;
        let run = self.runs[i];
        Some((run.ns as f64 - run.runs as f64 * clock_ns_per_run) / self.forwarded as f64)
    }
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

/// From a tracer's ready signal to the traffic, at least: what is measured is the cost of
/// tracing, not of starting. iptrace finishes its start in the background after it says it is
/// ready (its eBPF programs' verification, about 0.15 s; the first read of the nf_tables rule
/// set, 0.5 s on 10,000 rules), and the traffic also waits for those threads to end
/// ([`TracerProcess::wait_until_started`]); the start is measured on its own as `ready_ms`.
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

    /// One more fixed-load phase, with the kernel counting the eBPF programs' runs.
    fn measure_programs(&self) -> Result<ProgramPhase, ScenarioError> {
        let _clock = kernel::ClockReference::attach()?;
        let _counting = kernel::RunTimeStatistics::enable()?;
        let before = kernel::program_runs();
        let phase = self.phase(self.fixed)?;
        let after = kernel::program_runs();
        let mut runs = after;
        for (run, earlier) in runs.iter_mut().zip(before) {
            run.runs = run.runs.saturating_sub(earlier.runs);
            run.ns = run.ns.saturating_sub(earlier.ns);
        }
        let [iptrace @ .., clock] = runs;
        Ok(ProgramPhase { forwarded: phase.forwarded, runs: iptrace, clock })
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
        slice.tracer_cpu_seconds = read.reader_cpu_seconds;
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

    /// Starts the tracer `argv` (writing to `path`), and once it is ready and warmed up runs the
    /// slice's traffic and stops it: the forwarding figures, the packets the kernel traced, and
    /// how the tracer ended.
    fn trace_slice(
        &self,
        scenario: &Scenario,
        argv: &[String],
        path: &Path,
        readiness: &Readiness,
        programs: bool,
    ) -> Result<(Slice, u64, Finished), ScenarioError> {
        let mut tracer = TracerProcess::start(argv, path, readiness)?;
        thread::sleep(WARM_UP);
        tracer.wait_until_started();
        tracer.start_tracing();
        let mut slice = self.measure_forwarding()?;
        if programs {
            slice.programs = Some(self.measure_programs()?);
        }
        thread::sleep(Self::drain(scenario));
        let traced = self.traced_packets()?;
        Ok((slice, traced, tracer.stop()?))
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
        let readiness = Readiness::StderrLine("iptrace: tracing");
        let (mut slice, traced, finished) = self.trace_slice(scenario, &argv, &path, &readiness, true)?;
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
        let (mut slice, traced, finished) = self.trace_slice(scenario, &argv, &path, &readiness, false)?;
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

fn fill_tracer_figures(slice: &mut Slice, traced: u64, complete: u64, finished: &Finished) {
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
