//! A scenario measured in rounds: a slice of the scenario, then a slice without a tracer, repeated.
//!
//! On a shared 2-core VM the forwarding rate drifts by a percent or two over minutes and dips by
//! up to five for a second now and then, as much as the overhead being measured. Alternating short
//! slices holds each scenario slice against a baseline taken seconds later, and the median of the
//! per-round ratios keeps one dip from deciding the figure.

use crate::scenario::ScenarioResult;

/// One round: the scenario's slice and the rate of the baseline slice right after it.
#[derive(Clone, Debug)]
pub struct Round {
    pub scenario: ScenarioResult,
    pub baseline_pps: Option<f64>,
}

/// The scenario's figures over all rounds: rates and ratios are medians, counts are sums, per-packet
/// figures are weighted by the packets each round traced, peak RSS is the highest, start and exit
/// times are medians.
pub fn merge(rounds: &[Round]) -> ScenarioResult {
    let traced: Vec<Option<u64>> = rounds.iter().map(|r| r.scenario.traced_packets_kernel).collect();
    let per_traced = |figure: fn(&ScenarioResult) -> Option<f64>| {
        let (mut sum, mut weight) = (0.0, 0u64);
        for (r, t) in rounds.iter().zip(&traced) {
            if let (Some(v), Some(t)) = (figure(&r.scenario), t) {
                sum += v * *t as f64;
                weight += t;
            }
        }
        (weight > 0).then(|| sum / weight as f64)
    };
    let sum = |figure: fn(&ScenarioResult) -> Option<u64>| {
        rounds.iter().map(|r| figure(&r.scenario)).reduce(|a, b| a.zip(b).map(|(a, b)| a + b)).flatten()
    };
    let median_of = |figure: &dyn Fn(&Round) -> Option<f64>| median(rounds.iter().filter_map(figure).collect());
    let traced_sum = sum(|r| r.traced_packets_kernel);
    let complete_sum = sum(|r| r.reported_complete);
    let mut notes: Vec<String> = Vec::new();
    for note in rounds.iter().flat_map(|r| &r.scenario.notes) {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
    ScenarioResult {
        forward_pps: median_of(&|r| r.scenario.forward_pps),
        forward_ratio: median_of(&|r| r.scenario.forward_pps.zip(r.baseline_pps).map(|(pps, base)| pps / base)),
        traced_packets_kernel: traced_sum,
        reported_complete: complete_sum,
        complete_ratio: complete_sum.zip(traced_sum.filter(|&t| t > 0)).map(|(c, t)| c as f64 / t as f64),
        lost_events: sum(|r| r.lost_events),
        cpu_s_per_1k_traced: per_traced(|r| r.cpu_s_per_1k_traced),
        peak_rss_mb: rounds.iter().filter_map(|r| r.scenario.peak_rss_mb).reduce(f64::max),
        msgs_to_userspace_per_match: per_traced(|r| r.msgs_to_userspace_per_match),
        ready_ms: median_of(&|r| r.scenario.ready_ms),
        exit_ms: median_of(&|r| r.scenario.exit_ms),
        adjacent_baseline_pps: median_of(&|r| r.baseline_pps),
        offered_pps: median_of(&|r| r.scenario.offered_pps),
        rounds: rounds.len(),
        notes,
    }
}

/// The median; the mean of the middle two for an even count.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(pps: f64, base: f64, traced: u64, complete: u64, cpu_per_1k: f64) -> Round {
        Round {
            scenario: ScenarioResult {
                forward_pps: Some(pps),
                traced_packets_kernel: Some(traced),
                reported_complete: Some(complete),
                lost_events: Some(1),
                cpu_s_per_1k_traced: Some(cpu_per_1k),
                peak_rss_mb: Some(traced as f64),
                ready_ms: Some(pps),
                ..ScenarioResult::default()
            },
            baseline_pps: Some(base),
        }
    }

    #[test]
    fn a_dip_in_one_round_does_not_decide_the_ratio() {
        let rounds =
            [round(97.0, 100.0, 10, 10, 1.0), round(60.0, 100.0, 30, 27, 3.0), round(98.0, 101.0, 10, 10, 1.0)];
        let m = merge(&rounds);
        assert_eq!(m.forward_ratio, Some(97.0 / 100.0));
        assert_eq!(m.forward_pps, Some(97.0));
        assert_eq!(m.adjacent_baseline_pps, Some(100.0));
        assert_eq!((m.traced_packets_kernel, m.reported_complete, m.lost_events), (Some(50), Some(47), Some(3)));
        assert_eq!(m.complete_ratio, Some(47.0 / 50.0));
        // CPU per 1k traced over all rounds: (10·1 + 30·3 + 10·1) / 50.
        assert_eq!(m.cpu_s_per_1k_traced, Some(110.0 / 50.0));
        assert_eq!(m.peak_rss_mb, Some(30.0));
        assert_eq!(m.rounds, 3);
    }

    #[test]
    fn even_counts_take_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn a_figure_missing_in_a_round_is_missing_in_the_sum() {
        let mut rounds = vec![round(97.0, 100.0, 10, 10, 1.0), round(98.0, 100.0, 10, 10, 1.0)];
        rounds[1].scenario.lost_events = None;
        assert_eq!(merge(&rounds).lost_events, None);
    }
}
