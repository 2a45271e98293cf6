//! The run's figures as `latest.json` and as the Markdown tables of `docs/benchmarks.md`, with the
//! targets iptrace is held to, each judged by its interval.
//!
//! Long because every table of `docs/benchmarks.md` is written here, column by column, from the
//! same figures as the JSON: one place to see that they say the same.

use std::{collections::BTreeMap, fmt::Write as _, fs, io, path::Path, process::Command};

use serde::{Deserialize, Serialize};

use crate::{
    rounds::ScenarioResult,
    scenario::{Host, Scenario},
    slice::ExpressionTime,
    spread::Spread,
};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    /// The 1-minute load average when the report was written: other work shares the CPUs.
    pub load_average_at_end: f64,
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
            load_average_at_end: fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// How the run was set up, so that figures of two runs can be compared.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub rate_limit_pps: u64,
    /// The fixed load as a share of each lab's untraced saturated rate.
    pub fixed_load_share: f64,
    pub fixed_phase_s: f64,
    pub saturated_phase_s: f64,
    /// Cycles of the rows that resolve a per cent, and of the others.
    pub cycles_fine: usize,
    pub cycles_coarse: usize,
    pub udp_flows: u16,
    pub syn_one_in: u64,
    pub calibration_rules: usize,
}

/// A lab as measured: its rule set, its untraced rates and the fixed load derived from them.
#[derive(Debug, Serialize, Deserialize)]
pub struct LabFigures {
    pub host: Host,
    pub rules: usize,
    pub untraced_saturated_pps: f64,
    pub fixed_load_pps: u64,
    /// Forwarding CPU per packet at the fixed load over all the lab's untraced slices.
    pub untraced_ns_per_packet: Option<Spread>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub date: String,
    pub setup: Setup,
    pub labs: BTreeMap<&'static str, LabFigures>,
    pub scenarios: BTreeMap<&'static str, ScenarioResult>,
    /// What drop reasons cost (issue 15): one flow with them minus one flow without, cycle by
    /// cycle, in percentage points of the forwarding CPU per packet.
    pub drop_reasons_cost_pct: Option<Spread>,
    /// From iptrace's start to its ready line, or to its refusal, per hard selection.
    pub expressions: BTreeMap<&'static str, ExpressionTime>,
    pub targets: Vec<Target>,
}

pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Report {
    pub fn new(
        date: String,
        setup: Setup,
        labs: BTreeMap<&'static str, LabFigures>,
        scenarios: BTreeMap<&'static str, ScenarioResult>,
        expressions: BTreeMap<&'static str, ExpressionTime>,
        machine: Machine,
    ) -> Self {
        let mut report = Self {
            machine,
            date,
            setup,
            labs,
            scenarios,
            drop_reasons_cost_pct: None,
            expressions,
            targets: Vec::new(),
        };
        report.drop_reasons_cost_pct =
            report.paired_difference("legacy_iptrace_one_flow", "legacy_iptrace_one_flow_no_drops");
        report.targets = report.judge();
        report
    }

    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(path, text + "\n")
    }

    fn get(&self, key: &str) -> Option<&ScenarioResult> {
        self.scenarios.get(key)
    }

    /// `a`'s cost minus `b`'s, cycle by cycle (both measured in the same cycles).
    fn paired_difference(&self, a: &str, b: &str) -> Option<Spread> {
        let (a, b) = (self.get(a)?, self.get(b)?);
        let d: Vec<f64> = a.cost_samples_pct.iter().zip(&b.cost_samples_pct).map(|(a, b)| a - b).collect();
        Spread::of(&d)
    }

    /// The tables and the target verdicts, in Markdown.
    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let (m, s) = (&self.machine, &self.setup);
        let _ = writeln!(
            t,
            "Measured {} on Linux {}, {} × {}, {} GiB, load average {:.2} at the end. Traffic: {} UDP flows plus a \
             TCP SYN in every {} packets. Each slice: {} s at the fixed load ({:.0} % of the lab's untraced saturated \
             rate), then {} s unpaced; {} cycles for the rows that resolve a per cent, {} for the others; intervals \
             are distribution-free ≥ 95 % intervals of the median (order statistics), ranges when there are fewer than \
             6 cycles.\n",
            self.date,
            m.kernel,
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            m.load_average_at_end,
            s.udp_flows,
            s.syn_one_in,
            s.fixed_phase_s,
            s.fixed_load_share * 100.0,
            s.saturated_phase_s,
            s.cycles_fine,
            s.cycles_coarse,
        );
        t.push_str("| lab | rules | untraced saturated pps | fixed load pps | untraced forwarding ns / packet |\n|---|--:|--:|--:|--:|\n");
        for (name, lab) in &self.labs {
            let _ = writeln!(
                t,
                "| {name} ({}) | {} | {:.0} | {} | {} |",
                host_name(lab.host),
                lab.rules,
                lab.untraced_saturated_pps,
                lab.fixed_load_pps,
                lab.untraced_ns_per_packet.as_ref().map_or("—".into(), |s| s.display(0)),
            );
        }
        t.push_str(
            "\n| scenario | fwd ns / packet | cost % [95 % CI] | vs floor, points [95 % CI] | saturated vs untraced | \
             traced pps | traced (kernel) | complete | lost (admitted) | CPU s / 1k traced [95 % CI] | peak RSS MB | msgs / match | \
             ready ms | exit ms |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for scenario in Scenario::ALL.iter().filter(|s| !s.key.starts_with("scale_")) {
            let Some(r) = self.get(scenario.key) else { continue };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.key,
                number(r.forwarding_ns_per_packet, 0),
                spread(r.cost_pct.as_ref(), 2),
                spread(r.cost_vs_floor_pct.as_ref(), 2),
                r.saturated_ratio.as_ref().map_or("—".into(), |s| format!("{:.1} %", s.median * 100.0)),
                number(r.traced_pps, 0),
                count(r.traced_packets_kernel),
                percent(r.complete_ratio),
                count(r.lost_events),
                spread(r.cpu_s_per_1k_traced_spread.as_ref(), 3),
                number(r.peak_rss_mb, 1),
                number(r.msgs_to_userspace_per_match, 2),
                number(r.ready_ms, 0),
                number(r.exit_ms, 0),
            );
        }
        let mut runs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (key, r) in &self.scenarios {
            runs.entry(r.measured.as_str()).or_default().push(key);
        }
        if runs.len() > 1 {
            t.push_str("\nThe rows come from separate runs (`--only ... --merge`):\n");
            for (date, keys) in &runs {
                let _ = writeln!(t, "- {date}: {}", keys.join(", "));
            }
        }
        if let Some(d) = &self.drop_reasons_cost_pct {
            let _ = writeln!(
                t,
                "\nDrop reasons (legacy_iptrace_one_flow minus legacy_iptrace_one_flow_no_drops, cycle by cycle): {} \
                 points of the forwarding CPU per packet.",
                d.display(2)
            );
        }
        for key in ["legacy_iptrace_one_flow", "nft_iptrace_one_flow", "mixed_iptrace_one_flow"] {
            let Some(r) = self.get(key) else { continue };
            let (Some(counted), Some(runs), Some(own), Some(pct)) = (
                r.ebpf_ns_per_packet.get("drop_reasons"),
                r.ebpf_runs_per_packet.get("drop_reasons"),
                r.ebpf_own_ns_per_packet.get("drop_reasons"),
                drop_program_pct(r),
            ) else {
                continue;
            };
            let _ = writeln!(
                t,
                "- {key}: the drop-reason program ran {runs:.2} times per forwarded packet, {own:.1} ns per \
                 packet of its own ({pct:.2} % of the forwarding CPU; {counted:.1} ns as counted, with the \
                 clock reads of counting), counted by the kernel."
            );
        }
        let notes: Vec<String> = Scenario::ALL
            .iter()
            .filter_map(|s| Some((s.key, self.get(s.key)?)))
            .flat_map(|(k, r)| r.notes.iter().map(move |n| format!("- {k}: {n}")))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(t, "\n{}", notes.join("\n"));
        }
        t.push_str(&self.scale_tables());
        t.push_str("\n| target | measured | |\n|---|--:|---|\n");
        for target in &self.targets {
            let _ = writeln!(t, "| {} | {} | {} |", target.what, target.measured, target.verdict());
        }
        t
    }

    /// Cost against rule-set size (nf_tables hosts, iptrace's default, one flow) and against the
    /// traced rate (the nf_tables lab, iptrace --backend nft).
    fn scale_tables(&self) -> String {
        let mut t = String::from(
            "\n| rule set (nf_tables host, iptrace default, one flow) | rules | untraced fwd ns / packet | cost % | \
             CPU s / 1k traced | peak RSS MB | ready ms |\n|---|--:|--:|--:|--:|--:|--:|\n",
        );
        let by_size = [
            ("scale_100_rules", "nftables_100_rules"),
            ("nft_iptrace_one_flow", "nftables"),
            ("scale_1000_rules", "nftables_1000_rules"),
            ("scale_10000_rules", "nftables_10000_rules"),
            ("scale_5000_nft_rules_10000_set", "nftables_5000_rules_10000_set"),
        ];
        for (key, lab) in by_size {
            let (Some(r), Some(l)) = (self.get(key), self.labs.get(lab)) else { continue };
            let _ = writeln!(
                t,
                "| {key} | {} | {} | {} | {} | {} | {} |",
                l.rules,
                number(r.untraced_ns_per_packet, 0),
                spread(r.cost_pct.as_ref(), 2),
                number(r.cpu_s_per_1k_traced, 3),
                number(r.peak_rss_mb, 1),
                number(r.ready_ms, 0),
            );
        }
        t.push_str(
            "\n| traced (nf_tables lab, iptrace --backend nft) | traced pps at the fixed load | cost % | saturated vs \
             untraced | CPU s / 1k traced | complete |\n|---|--:|--:|--:|--:|--:|\n",
        );
        for key in ["nft_iptrace_one_flow", "nft_iptrace_16_flows", "nft_iptrace_64_flows", "nft_iptrace_all"] {
            let Some(r) = self.get(key) else { continue };
            let _ = writeln!(
                t,
                "| {key} | {} | {} | {} | {} | {} |",
                number(r.traced_pps, 0),
                spread(r.cost_pct.as_ref(), 2),
                r.saturated_ratio.as_ref().map_or("—".into(), |s| format!("{:.1} %", s.median * 100.0)),
                number(r.cpu_s_per_1k_traced, 3),
                percent(r.complete_ratio),
            );
        }
        t
    }

    fn judge(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (key, engine) in [
            ("legacy_iptrace_one_flow", "iptables-legacy"),
            ("nft_iptrace_one_flow", "nf_tables"),
            ("mixed_iptrace_one_flow", "both (mixed host, default backend)"),
        ] {
            let vs_floor = self.get(key).and_then(|r| r.cost_vs_floor_pct.as_ref());
            targets.push(Target {
                what: format!("one flow on {engine} ({key}) costs ≤ floor + 0.5 % of the forwarding CPU per packet"),
                measured: vs_floor.map_or("—".into(), |s| format!("{} points", s.display(2))),
                pass: vs_floor.and_then(|s| s.at_most(0.5)),
            });
        }
        let calibration = self.get("calibration_1pct").and_then(|r| r.cost_pct.as_ref());
        targets.push(Target {
            what: format!(
                "the method resolves 1 %: calibration_1pct ({} no-op rules) is told from 0",
                self.setup.calibration_rules
            ),
            measured: calibration.map_or("—".into(), |s| format!("{} %", s.display(2))),
            pass: calibration.and_then(|s| s.low.map(|low| low > 0.0)),
        });
        let all_rows = [
            "legacy_iptrace_all",
            "legacy_iptrace_all_json",
            "legacy_iptrace_all_pcapng",
            "nft_iptrace_all",
            "nft_iptrace_all_json",
            "nft_iptrace_all_pcapng",
        ];
        let rows = |keys: &[&str]| -> Vec<(String, &ScenarioResult)> {
            keys.iter().filter_map(|k| Some(((*k).to_owned(), self.get(k)?))).collect()
        };
        let all = rows(&all_rows);
        let worst_complete =
            all.iter().filter_map(|(k, r)| Some((k, r.complete_ratio?))).min_by(|a, b| a.1.total_cmp(&b.1));
        targets.push(Target {
            what: "tracing everything: 100 % of kernel-traced packets reported complete (text, JSON, pcap-ng; worst)"
                .into(),
            measured: worst_complete.map_or("—".into(), |(k, c)| format!("{:.2} % ({k})", c * 100.0)),
            pass: (!all.is_empty()).then(|| all.iter().all(|(_, r)| r.reported_complete >= r.traced_packets_kernel)),
        });
        targets.push(every_interval_at_most(
            "tracing everything: ≤ 0.02 CPU-s / 1,000 traced packets (worst format, per slice)",
            &all,
            0.02,
            |r| r.cpu_s_per_1k_traced_spread.as_ref(),
            "s",
        ));
        let one_flow = rows(&["legacy_iptrace_one_flow", "nft_iptrace_one_flow", "mixed_iptrace_one_flow"]);
        targets.push(every_interval_at_most(
            "tracing one flow: ≤ 0.1 CPU-s / 1,000 traced packets (worst engine, per slice)",
            &one_flow,
            0.1,
            |r| r.cpu_s_per_1k_traced_spread.as_ref(),
            "s",
        ));
        targets.push(worst_at_most(
            "drop reasons: the kfree_skb program's own run time ≤ 0.5 % of the forwarding CPU per packet (one \
             flow, worst engine; counted by the kernel)",
            &one_flow,
            0.5,
            drop_program_pct,
            "%",
        ));
        let set = rows(&["scale_5000_nft_rules_10000_set"]);
        targets.push(worst_at_most(
            "5,000 nft rules with a 10,000-element set: ready ≤ 150 ms (median of starts)",
            &set,
            150.0,
            |r| r.ready_ms,
            "ms",
        ));
        let iptrace_rows: Vec<(String, &ScenarioResult)> = Scenario::ALL
            .iter()
            .filter(|s| matches!(s.tool, crate::scenario::Tool::Iptrace { .. }))
            .filter_map(|s| Some((s.key.to_owned(), self.get(s.key)?)))
            .collect();
        targets.push(worst_at_most(
            "peak RSS ≤ 30 MB (every iptrace row)",
            &iptrace_rows,
            30.0,
            |r| r.peak_rss_mb,
            "MB",
        ));
        let slowest = self.expressions.iter().max_by(|a, b| a.1.ms.total_cmp(&b.1.ms));
        targets.push(Target {
            what: "any expression compiled (ready) or refused within 1 s (slowest of the hard selections)".into(),
            measured: slowest.map_or("—".into(), |(k, e)| {
                format!("{:.0} ms ({k}, {})", e.ms, if e.refused.is_some() { "refused" } else { "ready" })
            }),
            pass: slowest.map(|(_, e)| e.ms <= 1000.0),
        });
        targets
    }
}

/// The drop-reason program's own run time per forwarded packet (without counting's clock reads),
/// in per cent of the untraced forwarding CPU per packet.
fn drop_program_pct(r: &ScenarioResult) -> Option<f64> {
    Some(r.ebpf_own_ns_per_packet.get("drop_reasons")? / r.untraced_ns_per_packet? * 100.0)
}

fn worst_at_most(
    what: &str,
    rows: &[(String, &ScenarioResult)],
    limit: f64,
    figure: fn(&ScenarioResult) -> Option<f64>,
    unit: &str,
) -> Target {
    let worst = rows.iter().filter_map(|(k, r)| Some((k, figure(r)?))).max_by(|a, b| a.1.total_cmp(&b.1));
    Target {
        what: what.to_owned(),
        measured: worst.map_or("—".into(), |(k, v)| format!("{v:.3} {unit} ({k})")),
        pass: worst.map(|(_, v)| v <= limit),
    }
}

/// Met when every row's interval is at or below `limit`, missed when one lies above it
/// ([`Spread::at_most`]); the row shown is the one with the highest median.
fn every_interval_at_most(
    what: &str,
    rows: &[(String, &ScenarioResult)],
    limit: f64,
    figure: fn(&ScenarioResult) -> Option<&Spread>,
    unit: &str,
) -> Target {
    let spreads: Vec<(&String, &Spread)> = rows.iter().filter_map(|(k, r)| Some((k, figure(r)?))).collect();
    let worst = spreads.iter().max_by(|a, b| a.1.median.total_cmp(&b.1.median));
    let verdicts: Vec<Option<bool>> = spreads.iter().map(|(_, s)| s.at_most(limit)).collect();
    Target {
        what: what.to_owned(),
        measured: worst.map_or("—".into(), |(k, s)| format!("{} {unit} ({k})", s.display(3))),
        pass: if verdicts.contains(&Some(false)) {
            Some(false)
        } else {
            (!verdicts.is_empty() && verdicts.iter().all(|v| *v == Some(true))).then_some(true)
        },
    }
}

fn host_name(host: Host) -> &'static str {
    match host {
        Host::Legacy => "iptables-legacy",
        Host::Nftables => "nf_tables",
        Host::Mixed => "both",
    }
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub measured: String,
    /// `None`: not measured, or the interval straddles the limit.
    pub pass: Option<bool>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "pass",
            Some(false) => "**miss**",
            None => "undecided (the interval straddles the limit, or not measured)",
        }
    }
}

fn spread(v: Option<&Spread>, decimals: usize) -> String {
    v.map_or("—".into(), |s| s.display(decimals))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, cpu: &[f64]) -> (String, ScenarioResult) {
        (key.to_owned(), ScenarioResult { cpu_s_per_1k_traced_spread: Spread::of(cpu), ..Default::default() })
    }

    fn judged(rows: &[(String, ScenarioResult)]) -> Target {
        let rows: Vec<(String, &ScenarioResult)> = rows.iter().map(|(k, r)| (k.clone(), r)).collect();
        every_interval_at_most("cpu", &rows, 0.1, |r| r.cpu_s_per_1k_traced_spread.as_ref(), "s")
    }

    #[test]
    fn every_row_decides_an_interval_target() {
        let under = [0.05, 0.06, 0.07, 0.08, 0.09, 0.05, 0.06];
        let straddling = [0.05, 0.08, 0.09, 0.11, 0.12, 0.13, 0.2];
        let over = [0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.5];
        assert_eq!(judged(&[row("a", &under), row("b", &under)]).pass, Some(true));
        assert_eq!(judged(&[row("a", &under), row("b", &straddling)]).pass, None, "one row undecided");
        assert_eq!(judged(&[row("a", &straddling), row("b", &over)]).pass, Some(false), "one row above decides");
        assert_eq!(judged(&[row("a", &[0.01, 0.02])]).pass, None, "no interval: never met");
        assert_eq!(judged(&[]).pass, None);
        assert_eq!(judged(&[row("a", &[])]).measured, "—");
        // The row shown is the one with the highest median, with its interval.
        let shown = judged(&[row("low", &under), row("high", &over), row("mid", &straddling)]);
        assert_eq!(shown.measured, "0.300 [0.200, 0.500] s (high)");
    }
}
