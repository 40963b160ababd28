//! Key groups (Flink's max parallelism): the unit in which keyed state is routed and
//! snapshotted.
//!
//! A key belongs to one of `count` key groups by its routing hash; key group `g` lives on
//! worker `g * parallelism / count` (contiguous ranges of groups per worker, as Flink). Routing goes through the group rather than straight from the
//! hash to a worker so that a snapshot, organised by key group, can be restored at another
//! parallelism: each worker then takes the groups that map to it.

use std::hash::Hash;

use crate::hash::route;

/// Key groups when none are configured (Flink's default lower bound for max parallelism).
pub const DEFAULT_KEY_GROUPS: u32 = 128;

/// How keys map to key groups and key groups to workers.
///
/// This runs once per record in every keyed exchange, so it avoids divisions: the group is
/// the high bits of `hash * count` (Lemire's multiply-shift range reduction, uniform for any
/// count), and when `count` is a power of two (the default) the worker is a shift too.
///
/// ```
/// use rill_stream::KeyGroups;
/// let kg = KeyGroups::new(128, 4);
/// let g = kg.group_of(&"some key");
/// assert!(g < 128);
/// assert_eq!(kg.worker_of(g), g as usize * 4 / 128);
/// // Contiguous ranges of groups per worker.
/// assert_eq!(kg.worker_of(0), 0);
/// assert_eq!(kg.worker_of(127), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyGroups {
    count: u32,
    parallelism: usize,
    /// `log2(count)` if `count` is a power of two.
    shift: Option<u32>,
}

impl KeyGroups {
    /// `count` key groups over `parallelism` workers (both at least 1).
    pub const fn new(count: u32, parallelism: usize) -> Self {
        let count = if count == 0 { 1 } else { count };
        KeyGroups {
            count,
            parallelism: if parallelism == 0 { 1 } else { parallelism },
            shift: if count.is_power_of_two() {
                Some(count.trailing_zeros())
            } else {
                None
            },
        }
    }

    /// Number of key groups.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The key group of `key`.
    #[inline]
    pub fn group_of<K: Hash + ?Sized>(&self, key: &K) -> u32 {
        ((u128::from(route(key)) * u128::from(self.count)) >> 64) as u32
    }

    /// The worker that owns key group `group`.
    #[inline]
    pub fn worker_of(&self, group: u32) -> usize {
        // u64: group * parallelism overflows 32 bits for large values.
        let spread = u64::from(group) * self.parallelism as u64;
        match self.shift {
            Some(s) => (spread >> s) as usize,
            None => (spread / u64::from(self.count)) as usize,
        }
    }

    /// The worker that owns `key`.
    #[inline]
    pub fn worker_of_key<K: Hash + ?Sized>(&self, key: &K) -> usize {
        self.worker_of(self.group_of(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_groups_and_groups_stay_in_range() {
        for parallelism in 1..=7 {
            let kg = KeyGroups::new(128, parallelism);
            let mut seen = vec![false; parallelism];
            for g in 0..128 {
                seen[kg.worker_of(g)] = true;
            }
            assert!(seen.iter().all(|s| *s), "parallelism {parallelism}");
        }
        for (count, workers) in [(16, 3), (100, 7), (128, 2)] {
            let kg = KeyGroups::new(count, workers);
            let mut per_group = vec![0u32; count as usize];
            for k in 0..100_000u64 {
                let g = kg.group_of(&k);
                per_group[g as usize] += 1;
                assert_eq!(kg.worker_of(g), g as usize * workers / count as usize);
                assert!(kg.worker_of_key(&k) < workers);
            }
            // Roughly uniform: every group within 20% of the mean.
            let mean = 100_000 / count;
            assert!(
                per_group.iter().all(|n| n.abs_diff(mean) < mean / 5),
                "{count} groups: {per_group:?}"
            );
        }
    }
}
