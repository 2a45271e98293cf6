//! A figure measured many times, summed up as its median with an interval: the range of the
//! middle order statistics that covers the true median with at least 95 % probability (a
//! distribution-free interval: it assumes only that the samples are independent, not that they are
//! normal), and the whole range.

use serde::{Deserialize, Serialize};

/// Wanted coverage of [`Spread::low`]..[`Spread::high`].
const COVERAGE: f64 = 0.95;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    /// The interval for the median; `None` with fewer than 6 samples, where even the whole range
    /// covers less than 95 %.
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// How likely the interval holds the true median (≥ 0.95; order statistics give steps).
    pub coverage: Option<f64>,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Spread {
    /// `None` without samples.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        let interval = median_interval_rank(n).map(|k| (v[k - 1], v[n - k], 1.0 - 2.0 * binomial_cdf(n, k - 1)));
        Some(Self {
            median,
            low: interval.map(|i| i.0),
            high: interval.map(|i| i.1),
            coverage: interval.map(|i| i.2),
            min: v[0],
            max: v[n - 1],
            samples: n,
        })
    }

    /// The same spread with every figure multiplied by `factor` (to percent, say).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            median: self.median * factor,
            low: self.low.map(|x| x * factor),
            high: self.high.map(|x| x * factor),
            min: self.min * factor,
            max: self.max * factor,
            ..self.clone()
        }
    }

    /// Whether the interval lies wholly at or below `limit` (`Some(true)`), wholly above
    /// (`Some(false)`), or straddles it or is missing (`None`): a target counts as met only when
    /// the interval says so. Without an interval (fewer than 6 samples) it is never met, and
    /// missed when every sample is above the limit.
    pub fn at_most(&self, limit: f64) -> Option<bool> {
        match (self.low, self.high) {
            (_, Some(high)) if high <= limit => Some(true),
            (Some(low), _) if low > limit => Some(false),
            (None, None) if self.min > limit => Some(false),
            _ => None,
        }
    }

    /// `median [low, high]`, each with `decimals` decimals; the range when there is no interval.
    pub fn display(&self, decimals: usize) -> String {
        match (self.low, self.high) {
            (Some(low), Some(high)) => format!("{:.decimals$} [{low:.decimals$}, {high:.decimals$}]", self.median),
            _ => format!("{:.decimals$} (range {:.decimals$}..{:.decimals$})", self.median, self.min, self.max),
        }
    }
}

/// The largest rank k (1-based) such that [x_(k), x_(n+1-k)] covers the median with at least
/// [`COVERAGE`]: P(Bin(n, ½) ≤ k−1) ≤ (1 − COVERAGE)/2.
fn median_interval_rank(n: usize) -> Option<usize> {
    let tail = (1.0 - COVERAGE) / 2.0;
    (1..=n / 2).take_while(|&k| binomial_cdf(n, k - 1) <= tail).last()
}

/// P(Bin(n, ½) ≤ k).
fn binomial_cdf(n: usize, k: usize) -> f64 {
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut sum = term;
    for i in 1..=k.min(n) {
        term *= (n + 1 - i) as f64 / i as f64;
        sum += term;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_the_textbook_one() {
        // n = 10: [x_2, x_9], coverage 1 − 2·11/1024; n = 20: [x_6, x_15], 95.86 %.
        assert_eq!(median_interval_rank(5), None);
        assert_eq!(median_interval_rank(6), Some(1));
        assert_eq!(median_interval_rank(10), Some(2));
        assert_eq!(median_interval_rank(20), Some(6));
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Spread::of(&values).unwrap();
        assert_eq!((s.median, s.low, s.high, s.min, s.max), (5.5, Some(2.0), Some(9.0), 1.0, 10.0));
        assert!((s.coverage.unwrap() - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
    }

    #[test]
    fn a_target_is_met_only_when_the_interval_says_so() {
        let s = Spread::of(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]).unwrap();
        assert_eq!(s.at_most(0.7), Some(true));
        assert_eq!(s.at_most(0.4), None);
        assert_eq!(s.at_most(0.05), Some(false));
        assert_eq!(Spread::of(&[0.1, 0.2]).unwrap().at_most(1.0), None);
        assert_eq!(Spread::of(&[0.1, 0.2]).unwrap().at_most(0.15), None);
        assert_eq!(Spread::of(&[0.1, 0.2]).unwrap().at_most(0.05), Some(false), "every sample above");
        assert_eq!(Spread::of(&[]), None);
    }
}
