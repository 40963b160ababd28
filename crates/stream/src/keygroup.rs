//! Key groups (Flink's max parallelism): the unit in which keyed state is routed and
//! snapshotted.
//!
//! A key belongs to key group `route(key) % count`; key group `g` lives on worker
//! `g * parallelism / count`. Routing goes through the group rather than straight from the
//! hash to a worker so that a snapshot, organised by key group, can be restored at another
//! parallelism: each worker then takes the groups that map to it.

use std::hash::Hash;

use crate::hash::route;

/// Key groups when none are configured (Flink's default lower bound for max parallelism).
pub const DEFAULT_KEY_GROUPS: u32 = 128;

/// How keys map to key groups and key groups to workers.
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
}

impl KeyGroups {
    /// `count` key groups over `parallelism` workers (both at least 1).
    pub const fn new(count: u32, parallelism: usize) -> Self {
        KeyGroups {
            count: if count == 0 { 1 } else { count },
            parallelism: if parallelism == 0 { 1 } else { parallelism },
        }
    }

    /// Number of key groups.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The key group of `key`.
    #[inline]
    pub fn group_of<K: Hash + ?Sized>(&self, key: &K) -> u32 {
        (route(key) % u64::from(self.count)) as u32
    }

    /// The worker that owns key group `group`.
    #[inline]
    pub fn worker_of(&self, group: u32) -> usize {
        // u64 arithmetic: group * parallelism overflows u32/usize-32 for large values.
        (u64::from(group) * self.parallelism as u64 / u64::from(self.count)) as usize
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
        let kg = KeyGroups::new(16, 3);
        for k in 0..1000u64 {
            assert!(kg.group_of(&k) < 16);
            assert!(kg.worker_of_key(&k) < 3);
        }
    }
}
