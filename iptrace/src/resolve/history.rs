//! A rule set's history, the same for both engines: snapshots, each under the point it was read
//! at — a check (epoch) for a legacy table ([`super::blob`]), a commit generation for the
//! nf_tables rule set ([`super::nft`]) — of which the newest few are kept. What a snapshot is,
//! and which of them may show a rule as it was for an event, is the engine's business.

use std::collections::BTreeMap;

#[derive(Debug)]
pub(super) struct History<K, S> {
    /// By the point each was read at.
    snapshots: BTreeMap<K, S>,
    kept: usize,
}

impl<K: Ord + Copy, S> History<K, S> {
    /// A history that keeps the newest `kept` snapshots.
    pub(super) fn new(kept: usize) -> Self {
        Self { snapshots: BTreeMap::new(), kept }
    }

    /// Adds the snapshot read at `at`, dropping the oldest beyond those kept.
    pub(super) fn insert(&mut self, at: K, snapshot: S) {
        self.snapshots.insert(at, snapshot);
        while self.snapshots.len() > self.kept {
            self.snapshots.pop_first();
        }
    }

    /// The snapshot read at `at`.
    pub(super) fn get(&self, at: K) -> Option<&S> {
        self.snapshots.get(&at)
    }

    pub(super) fn oldest(&self) -> Option<&S> {
        self.snapshots.values().next()
    }

    pub(super) fn newest_mut(&mut self) -> Option<&mut S> {
        self.snapshots.values_mut().next_back()
    }

    /// Every snapshot, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (K, &S)> {
        self.snapshots.iter().map(|(k, s)| (*k, s))
    }

    /// The snapshots read at `at` or later, oldest first.
    pub(super) fn from(&self, at: K) -> impl Iterator<Item = (K, &S)> {
        self.snapshots.range(at..).map(|(k, s)| (*k, s))
    }

    /// The snapshots read before `at`, oldest first (reversible).
    pub(super) fn before(&self, at: K) -> impl DoubleEndedIterator<Item = (K, &S)> {
        self.snapshots.range(..at).map(|(k, s)| (*k, s))
    }

    /// The newest snapshot read at `at` or before, else the oldest after it.
    pub(super) fn nearest(&self, at: K) -> Option<&S> {
        self.snapshots.range(..=at).next_back().or_else(|| self.snapshots.range(at..).next()).map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_finds_by_point() {
        let mut history = History::new(3);
        for generation in [4u32, 2, 7, 9] {
            history.insert(generation, generation * 10);
        }
        // The oldest point goes first, whatever the order of reading.
        assert_eq!(history.iter().collect::<Vec<_>>(), [(4, &40), (7, &70), (9, &90)]);
        assert_eq!((history.get(7), history.get(2)), (Some(&70), None));
        assert_eq!(history.oldest(), Some(&40));
        *history.newest_mut().unwrap() += 1;
        assert_eq!(history.get(9), Some(&91));
        assert_eq!(history.from(5).map(|(k, _)| k).collect::<Vec<_>>(), [7, 9]);
        assert_eq!(history.from(7).map(|(k, _)| k).collect::<Vec<_>>(), [7, 9]);
        assert_eq!(history.before(9).rev().map(|(k, _)| k).collect::<Vec<_>>(), [7, 4]);
        // Nearest: at or before, else the first after.
        assert_eq!(history.nearest(8), Some(&70));
        assert_eq!(history.nearest(7), Some(&70));
        assert_eq!(history.nearest(1), Some(&40));
        assert_eq!(history.nearest(u32::MAX), Some(&91));
        assert_eq!(History::<u32, u32>::new(2).nearest(1), None);
    }
}
