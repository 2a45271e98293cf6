//! The run's figures as `latest.json` and as the Markdown table of `docs/benchmarks.md`, with the
//! targets iptrace is held to.

use std::{collections::BTreeMap, fmt::Write as _, fs, io, path::Path, process::Command};

use serde::Serialize;

use crate::scenario::{Scenario, ScenarioResult};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
                .unwrap_or_default(),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

/// How the run was set up, so that figures of two runs can be compared.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub legacy_rules: usize,
    pub nft_rules: usize,
    pub rate_limit_pps: u64,
    pub seconds_per_scenario: f64,
    pub rounds: usize,
    pub udp_flows: u16,
    pub syn_one_in: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub date: String,
    pub setup: Setup,
    pub scenarios: BTreeMap<&'static str, ScenarioResult>,
}

pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Report {
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(path, text + "\n")
    }

    /// The table and the target verdicts, in Markdown.
    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let s = &self.setup;
        let _ = writeln!(
            t,
            "Measured {} on Linux {}, {} × {}, {} GiB. Router: {} iptables-legacy rules and the same {} as iptables-nft; \
             traffic: {} UDP flows plus a TCP SYN in every {} packets, at most {} packets/s, {} s per scenario in {} rounds (each a slice of the scenario, then one without a tracer).\n",
            self.date,
            m.kernel,
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            s.legacy_rules,
            s.nft_rules,
            s.udp_flows,
            s.syn_one_in,
            s.rate_limit_pps,
            s.seconds_per_scenario,
            s.rounds
        );
        t.push_str(
            "| scenario | forwarded pps | vs baseline | traced (kernel) | reported complete | complete | lost (admitted) | CPU s / 1k traced | peak RSS MB | msgs / match | ready ms | exit ms |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for scenario in Scenario::ALL {
            let Some(r) = self.scenarios.get(scenario.key()) else { continue };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.key(),
                number(r.forward_pps, 0),
                percent(r.forward_ratio),
                count(r.traced_packets_kernel),
                count(r.reported_complete),
                percent(r.complete_ratio),
                count(r.lost_events),
                number(r.cpu_s_per_1k_traced, 3),
                number(r.peak_rss_mb, 1),
                number(r.msgs_to_userspace_per_match, 2),
                number(r.ready_ms, 0),
                number(r.exit_ms, 0),
            );
        }
        let notes: Vec<String> = Scenario::ALL
            .iter()
            .filter_map(|s| Some((s.key(), self.scenarios.get(s.key())?)))
            .flat_map(|(k, r)| r.notes.iter().map(move |n| format!("- {k}: {n}")))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(t, "\n{}", notes.join("\n"));
        }
        t.push_str("\n| target | measured | |\n|---|--:|---|\n");
        for target in self.targets() {
            let _ = writeln!(t, "| {} | {} | {} |", target.what, target.measured, target.verdict());
        }
        t
    }

    fn get(&self, s: Scenario) -> Option<&ScenarioResult> {
        self.scenarios.get(s.key())
    }

    fn targets(&self) -> Vec<Target> {
        let one_flow_cost = self.get(Scenario::IptraceOneFlow).and_then(|r| r.forward_ratio).map(|r| 1.0 - r);
        let complete = self.get(Scenario::IptraceAll).and_then(|r| r.complete_ratio);
        let iptrace = [Scenario::IptraceOneFlow, Scenario::IptraceAll].map(|s| self.get(s));
        let worst =
            |f: fn(&ScenarioResult) -> Option<f64>| iptrace.iter().flatten().filter_map(|r| f(r)).reduce(f64::max);
        vec![
            Target::at_most(
                "tracing one flow among many costs ≤ 3 % of forwarding",
                one_flow_cost.map(|c| c * 100.0),
                3.0,
                "%",
            ),
            Target::at_least(
                "tracing every packet, ≥ 99 % reported complete (to a file)",
                complete.map(|c| c * 100.0),
                99.0,
                "%",
            ),
            Target::at_most("peak RSS ≤ 30 MB", worst(|r| r.peak_rss_mb), 30.0, "MB"),
            Target::at_most("ready ≤ 300 ms", worst(|r| r.ready_ms), 300.0, "ms"),
        ]
    }
}

struct Target {
    what: &'static str,
    measured: String,
    pass: Option<bool>,
}

impl Target {
    fn at_most(what: &'static str, value: Option<f64>, limit: f64, unit: &str) -> Self {
        Self {
            what, measured: value.map_or("—".into(), |v| format!("{v:.1} {unit}")), pass: value.map(|v| v <= limit)
        }
    }

    fn at_least(what: &'static str, value: Option<f64>, limit: f64, unit: &str) -> Self {
        Self {
            what, measured: value.map_or("—".into(), |v| format!("{v:.1} {unit}")), pass: value.map(|v| v >= limit)
        }
    }

    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "pass",
            Some(false) => "**miss**",
            None => "not measured",
        }
    }
}

fn number(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.decimals$}"))
}

fn percent(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{:.1} %", v * 100.0))
}

fn count(v: Option<u64>) -> String {
    v.map_or("—".into(), |v| v.to_string())
}

const BEGIN: &str = "<!-- iptrace-bench:begin -->";
const END: &str = "<!-- iptrace-bench:end -->";

/// Replaces the generated part of `docs/benchmarks.md` (between its markers), or appends it.
pub fn update_markdown(path: &Path, generated: &str) -> io::Result<()> {
    let current = fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{generated}{END}");
    let updated = match (current.find(BEGIN), current.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &current[..b], &current[e + END.len()..]),
        _ => format!("{current}\n{block}\n"),
    };
    fs::write(path, updated)
}
