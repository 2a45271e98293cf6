//! Scenarios measured in cycles against untraced slices, and their figures merged.
//!
//! On a shared 2-core VM the forwarding CPU's cost per packet drifts over minutes as other work
//! warms and cools its caches, by as much as the overhead being measured. So every slice of a
//! scenario sits between two untraced slices (U S₁ U S₂ U … per cycle, the order reversed every
//! other cycle), its cost is taken against the mean of those two, and a scenario's figure is the
//! median over cycles with an interval ([`Spread`]). Scenarios held against a floor were measured
//! in the same cycles as the floor, so their difference is taken cycle by cycle too.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::{IPTRACE_PROGRAMS, ProgramRuns},
    scenario::{Scenario, ScenarioError, Tool},
    slice::{Bench, ProgramPhase, Slice},
    spread::Spread,
};

/// One slice of a scenario and the untraced slices on either side of it.
#[derive(Clone, Debug)]
pub struct Round {
    pub slice: Slice,
    /// Mean of the two neighbours: forwarding CPU per packet at the fixed load, and the saturated
    /// rate.
    pub untraced_ns_per_packet: Option<f64>,
    pub untraced_saturated_pps: Option<f64>,
}

impl Round {
    fn between(slice: Slice, before: &Slice, after: &Slice) -> Self {
        let mean = |f: fn(&Slice) -> Option<f64>| f(before).zip(f(after)).map(|(a, b)| (a + b) / 2.0);
        Self {
            untraced_ns_per_packet: mean(|s| s.fixed.cpu_ns_per_packet()),
            untraced_saturated_pps: mean(|s| s.saturated.pps()),
            slice,
        }
    }

    /// Extra forwarding CPU per packet against the untraced neighbours, in per cent.
    fn cost_pct(&self) -> Option<f64> {
        self.slice.fixed.cpu_ns_per_packet().zip(self.untraced_ns_per_packet).map(|(t, u)| (t / u - 1.0) * 100.0)
    }
}

/// A scenario's figures over its rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// When the run that measured it started (a report merged from runs has several).
    #[serde(default)]
    pub measured: String,
    /// Forwarding CPU per forwarded packet at the fixed load, in ns: the median over the
    /// scenario's slices, and over their untraced neighbours.
    pub forwarding_ns_per_packet: Option<f64>,
    pub untraced_ns_per_packet: Option<f64>,
    /// The extra forwarding CPU per packet, in per cent of the untraced: median and interval
    /// over cycles.
    pub cost_pct: Option<Spread>,
    /// `cost_pct` minus the floor's, cycle by cycle, in percentage points.
    pub cost_vs_floor_pct: Option<Spread>,
    /// Forwarded packets per second with the generator unpaced, and its ratio to the untraced
    /// neighbours' (the second figure: throughput, coarser).
    pub saturated_pps: Option<f64>,
    pub saturated_ratio: Option<Spread>,
    /// Packets traced per second at the fixed load (the traced share of the forwarded packets
    /// times the fixed phase's rate).
    pub traced_pps: Option<f64>,
    pub traced_packets_kernel: Option<u64>,
    pub reported_complete: Option<u64>,
    pub complete_ratio: Option<f64>,
    pub lost_events: Option<u64>,
    /// The tracer's CPU time over all rounds per 1,000 packets the kernel traced in them.
    pub cpu_s_per_1k_traced: Option<f64>,
    /// The same per slice: median and interval over the rounds, which the CPU targets are judged
    /// by (from one run to the next the pooled figure moves by more than the changes measured).
    #[serde(default)]
    pub cpu_s_per_1k_traced_spread: Option<Spread>,
    pub peak_rss_mb: Option<f64>,
    pub msgs_to_userspace_per_match: Option<f64>,
    pub ready_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    /// Each of iptrace's eBPF programs that ran: its run time per forwarded packet in ns as the
    /// kernel counts it, its runs per forwarded packet, and its own time per forwarded packet,
    /// without what counting adds to each run (medians over the slices' program phases).
    #[serde(default)]
    pub ebpf_ns_per_packet: BTreeMap<String, f64>,
    #[serde(default)]
    pub ebpf_runs_per_packet: BTreeMap<String, f64>,
    #[serde(default)]
    pub ebpf_own_ns_per_packet: BTreeMap<String, f64>,
    /// The per-cycle costs behind `cost_pct`, in measuring order.
    pub cost_samples_pct: Vec<f64>,
    pub rounds: usize,
    pub notes: Vec<String>,
}

/// Rates and per-packet figures are medians, counts are sums, CPU per traced packet is over all
/// rounds' traced packets (and per round, with its spread), peak RSS is the highest, start and exit times are medians.
pub fn merge(rounds: &[Round]) -> ScenarioResult {
    let slices: Vec<&Slice> = rounds.iter().map(|r| &r.slice).collect();
    let median = |values: Vec<f64>| Spread::of(&values).map(|s| s.median);
    let sum = |figure: fn(&Slice) -> Option<u64>| {
        slices.iter().map(|s| figure(s)).reduce(|a, b| a.zip(b).map(|(a, b)| a + b)).flatten()
    };
    let traced = sum(|s| s.traced_packets_kernel);
    let complete = sum(|s| s.reported_complete);
    let tracer_cpu = slices.iter().map(|s| s.tracer_cpu_seconds).reduce(|a, b| a.zip(b).map(|(a, b)| a + b)).flatten();
    let costs: Vec<f64> = rounds.iter().filter_map(Round::cost_pct).collect();
    let ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.slice.saturated.pps().zip(r.untraced_saturated_pps).map(|(t, u)| t / u))
        .collect();
    let mut notes: Vec<String> = Vec::new();
    for note in slices.iter().flat_map(|s| &s.notes) {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
    let nonzero = traced.filter(|&t| t > 0);
    ScenarioResult {
        measured: String::new(),
        forwarding_ns_per_packet: median(slices.iter().filter_map(|s| s.fixed.cpu_ns_per_packet()).collect()),
        untraced_ns_per_packet: median(rounds.iter().filter_map(|r| r.untraced_ns_per_packet).collect()),
        cost_pct: Spread::of(&costs),
        cost_vs_floor_pct: None,
        saturated_pps: median(slices.iter().filter_map(|s| s.saturated.pps()).collect()),
        saturated_ratio: Spread::of(&ratios),
        traced_pps: median(
            slices
                .iter()
                .filter_map(|s| {
                    // The kernel's count of traced packets spans the program phase too.
                    let forwarded = s.fixed.forwarded + s.saturated.forwarded + s.programs.map_or(0, |p| p.forwarded);
                    let share = s.traced_packets_kernel? as f64 / (forwarded > 0).then_some(forwarded)? as f64;
                    Some(share * s.fixed.pps()?)
                })
                .collect(),
        ),
        traced_packets_kernel: traced,
        reported_complete: complete,
        complete_ratio: complete.zip(nonzero).map(|(c, t)| c as f64 / t as f64),
        lost_events: sum(|s| s.lost_events),
        cpu_s_per_1k_traced: tracer_cpu.zip(nonzero).map(|(cpu, t)| cpu * 1000.0 / t as f64),
        cpu_s_per_1k_traced_spread: Spread::of(
            &slices
                .iter()
                .filter_map(|s| {
                    let traced = s.traced_packets_kernel.filter(|&t| t > 0)?;
                    Some(s.tracer_cpu_seconds? * 1000.0 / traced as f64)
                })
                .collect::<Vec<_>>(),
        ),
        peak_rss_mb: slices.iter().filter_map(|s| s.peak_rss_mb).reduce(f64::max),
        msgs_to_userspace_per_match: sum(|s| s.messages).zip(nonzero).map(|(m, t)| m as f64 / t as f64),
        ready_ms: median(slices.iter().filter_map(|s| s.ready_ms).collect()),
        exit_ms: median(slices.iter().filter_map(|s| s.exit_ms).collect()),
        ebpf_ns_per_packet: per_program(&slices, per_packet(|r| r.ns)),
        ebpf_runs_per_packet: per_program(&slices, per_packet(|r| r.runs)),
        ebpf_own_ns_per_packet: per_program(&slices, ProgramPhase::own_ns_per_packet),
        cost_samples_pct: costs,
        rounds: rounds.len(),
        notes,
    }
}

/// `figure` of each eBPF program (by index) in each of the slices' program phases: the median,
/// for the programs that ran at all.
fn per_program(slices: &[&Slice], figure: impl Fn(&ProgramPhase, usize) -> Option<f64>) -> BTreeMap<String, f64> {
    let phases: Vec<_> = slices.iter().filter_map(|s| s.programs).filter(|p| p.forwarded > 0).collect();
    IPTRACE_PROGRAMS
        .iter()
        .enumerate()
        .filter(|(i, _)| phases.iter().any(|p| p.runs[*i].runs > 0))
        .filter_map(|(i, name)| {
            let values: Vec<f64> = phases.iter().filter_map(|p| figure(p, i)).collect();
            Some(((*name).to_owned(), Spread::of(&values)?.median))
        })
        .collect()
}

/// `figure` of a program's runs per forwarded packet of a phase.
fn per_packet(figure: fn(&ProgramRuns) -> u64) -> impl Fn(&ProgramPhase, usize) -> Option<f64> {
    move |phase, i| Some(figure(&phase.runs[i]) as f64 / phase.forwarded as f64)
}

/// Measures `scenarios` (all of `bench`'s lab) together for `cycles` cycles, each slice between
/// two untraced ones; returns each scenario's figures, with its difference to its floor where the
/// floor was among them, and the untraced slices.
pub fn measure_together(
    bench: &Bench,
    scenarios: &[Scenario],
    cycles: usize,
    interrupted: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<(Vec<ScenarioResult>, Vec<Slice>), ScenarioError> {
    let untraced = Scenario { tool: Tool::Untraced, ..scenarios[0] };
    let mut rounds: Vec<Vec<Round>> = vec![Vec::with_capacity(cycles); scenarios.len()];
    let mut untraced_slices = vec![bench.run(&untraced)?];
    for cycle in 0..cycles {
        let order: Vec<usize> =
            if cycle % 2 == 0 { (0..scenarios.len()).collect() } else { (0..scenarios.len()).rev().collect() };
        for i in order {
            if interrupted.load(Ordering::Relaxed) {
                return Err(ScenarioError::Interrupted);
            }
            let slice = bench.run(&scenarios[i])?;
            let after = bench.run(&untraced)?;
            let before = untraced_slices.last().expect("one untraced slice comes first");
            rounds[i].push(Round::between(slice, before, &after));
            untraced_slices.push(after);
        }
        progress(&format!("cycle {}/{cycles}", cycle + 1));
    }
    let mut results: Vec<ScenarioResult> = rounds.iter().map(|r| merge(r)).collect();
    for (i, scenario) in scenarios.iter().enumerate() {
        let Some(floor) = scenario.floor.and_then(|f| scenarios.iter().position(|s| s.key == f)) else { continue };
        let differences: Vec<f64> = rounds[i]
            .iter()
            .zip(&rounds[floor])
            .filter_map(|(r, f)| r.cost_pct().zip(f.cost_pct()).map(|(r, f)| r - f))
            .collect();
        results[i].cost_vs_floor_pct = Spread::of(&differences);
    }
    Ok((results, untraced_slices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::Phase;

    fn slice(ns_per_packet: f64, pps: f64, traced: u64, complete: u64, cpu: f64) -> Slice {
        Slice {
            fixed: Phase {
                forwarded: 1000,
                offered: 1000,
                seconds: 1.0,
                forwarding_cpu_ns: (ns_per_packet * 1000.0) as u64,
            },
            saturated: Phase { forwarded: pps as u64, offered: pps as u64, seconds: 1.0, ..Phase::default() },
            traced_packets_kernel: Some(traced),
            reported_complete: Some(complete),
            lost_events: Some(1),
            tracer_cpu_seconds: Some(cpu),
            peak_rss_mb: Some(traced as f64),
            ready_ms: Some(pps),
            ..Slice::default()
        }
    }

    fn untraced(ns_per_packet: f64, pps: f64) -> Slice {
        slice(ns_per_packet, pps, 0, 0, 0.0)
    }

    #[test]
    fn costs_are_against_the_neighbours_and_a_dip_does_not_decide() {
        let rounds = [
            Round::between(slice(1010.0, 97.0, 10, 10, 0.01), &untraced(990.0, 100.0), &untraced(1010.0, 100.0)),
            Round::between(slice(1500.0, 60.0, 30, 27, 0.09), &untraced(1000.0, 100.0), &untraced(1000.0, 100.0)),
            Round::between(slice(1030.0, 98.0, 10, 10, 0.01), &untraced(1000.0, 100.0), &untraced(1000.0, 100.0)),
        ];
        let m = merge(&rounds);
        let cost = m.cost_pct.unwrap();
        assert!((cost.median - 3.0).abs() < 1e-9, "{cost:?}");
        assert!((cost.min - 1.0).abs() < 1e-9 && (cost.max - 50.0).abs() < 1e-9);
        assert_eq!(m.saturated_ratio.unwrap().median, 0.97);
        assert_eq!(m.forwarding_ns_per_packet, Some(1030.0));
        assert_eq!((m.traced_packets_kernel, m.reported_complete, m.lost_events), (Some(50), Some(47), Some(3)));
        assert_eq!(m.complete_ratio, Some(47.0 / 50.0));
        // CPU per 1k traced over all rounds: 0.11 s for 50 packets.
        assert!((m.cpu_s_per_1k_traced.unwrap() - 0.11 * 1000.0 / 50.0).abs() < 1e-9);
        assert_eq!(m.peak_rss_mb, Some(30.0));
        assert_eq!(m.rounds, 3);
    }

    #[test]
    fn a_figure_missing_in_a_round_is_missing_in_the_sum() {
        let mut missing = slice(1000.0, 100.0, 10, 10, 0.01);
        missing.lost_events = None;
        let u = untraced(1000.0, 100.0);
        let rounds = [Round::between(slice(1000.0, 100.0, 10, 10, 0.01), &u, &u), Round::between(missing, &u, &u)];
        assert_eq!(merge(&rounds).lost_events, None);
    }
}
