//! The timer service of a keyed operator: event-time and processing-time timers per
//! (key, namespace), as Flink's `InternalTimerService`.
//!
//! The namespace tells timers of one key apart: `()` for a process function, the window (and
//! whether the timer fires or cleans it up) for window operators. Timers at the same time fire
//! in registration order. The operator driver owns the service, fires due timers in between
//! batches, and snapshots it per key group together with the operator's state.

use std::collections::BTreeMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{decode, encode};
use crate::error::StateError;
use crate::hash::FxHashSet;
use crate::keygroup::KeyGroups;
use crate::types::Key;

/// What a timer namespace must be: data that can be hashed and compared.
pub(crate) trait Namespace:
    Clone + Hash + Eq + Serialize + for<'de> Deserialize<'de> + 'static
{
}
impl<T: Clone + Hash + Eq + Serialize + for<'de> Deserialize<'de> + 'static> Namespace for T {}

/// Registered timers of one time domain, ordered by time, then by registration.
pub(crate) struct Timers<T> {
    by_time: BTreeMap<u64, Vec<T>>,
    // Deleting only removes from `live`; `by_time` entries that are not live are skipped
    // when they come up, which keeps deletion O(1).
    live: FxHashSet<(u64, T)>,
}

impl<T: Clone + Hash + Eq> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            by_time: BTreeMap::new(),
            live: FxHashSet::default(),
        }
    }
}

impl<T: Clone + Hash + Eq> Timers<T> {
    pub(crate) fn register(&mut self, ts: u64, t: &T) {
        if self.live.insert((ts, t.clone())) {
            self.by_time.entry(ts).or_default().push(t.clone());
        }
    }

    pub(crate) fn delete(&mut self, ts: u64, t: &T) {
        self.live.remove(&(ts, t.clone()));
    }

    /// Removes and returns one due timer (`ts < bound`; any if `bound` is `None`), if any.
    pub(crate) fn pop_before(&mut self, bound: Option<u64>) -> Option<(u64, T)> {
        loop {
            let mut entry = self.by_time.first_entry()?;
            let ts = *entry.key();
            if bound.is_some_and(|b| ts >= b) {
                return None;
            }
            let list = entry.get_mut();
            if list.is_empty() {
                entry.remove();
                continue;
            }
            let t = list.remove(0);
            if list.is_empty() {
                entry.remove();
            }
            if self.live.remove(&(ts, t.clone())) {
                return Some((ts, t));
            }
        }
    }

    /// The earliest registered time (possibly of a deleted timer: an early wake-up is
    /// harmless).
    pub(crate) fn earliest(&self) -> Option<u64> {
        self.by_time.keys().next().copied()
    }

    /// Live timers in firing order, each once.
    fn in_order(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        let mut seen: FxHashSet<(u64, &T)> = FxHashSet::default();
        self.by_time.iter().flat_map(move |(ts, list)| {
            let ts = *ts;
            list.iter()
                .filter(|t| self.live.contains(&(ts, (*t).clone())))
                .filter(|t| seen.insert((ts, *t)))
                .map(move |t| (ts, t))
                .collect::<Vec<_>>()
        })
    }
}

/// A timer that came due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Timer<K, N> {
    /// Event time (due by watermark) or processing time (due by the clock).
    pub(crate) domain: crate::window::TimeDomain,
    pub(crate) ts: u64,
    pub(crate) key: K,
    pub(crate) ns: N,
}

/// Both domains' timers of one operator.
pub(crate) struct TimerService<K, N> {
    pub(crate) event: Timers<(K, N)>,
    pub(crate) processing: Timers<(K, N)>,
}

impl<K: Key, N: Namespace> Default for TimerService<K, N> {
    fn default() -> Self {
        TimerService {
            event: Timers::default(),
            processing: Timers::default(),
        }
    }
}

/// One key group's timers as snapshotted: (time, position in firing order, key, namespace)
/// for each domain. The position restores the firing order of equal-time timers across
/// key groups.
type GroupTimers<K, N> = (Vec<(u64, u64, K, N)>, Vec<(u64, u64, K, N)>);

impl<K: Key, N: Namespace> TimerService<K, N> {
    pub(crate) fn register_event(&mut self, ts: u64, key: &K, ns: N) {
        self.event.register(ts, &(key.clone(), ns));
    }

    pub(crate) fn delete_event(&mut self, ts: u64, key: &K, ns: N) {
        self.event.delete(ts, &(key.clone(), ns));
    }

    pub(crate) fn register_processing(&mut self, ts: u64, key: &K, ns: N) {
        self.processing.register(ts, &(key.clone(), ns));
    }

    pub(crate) fn delete_processing(&mut self, ts: u64, key: &K, ns: N) {
        self.processing.delete(ts, &(key.clone(), ns));
    }

    /// Timers by key group.
    pub(crate) fn snapshot(
        &self,
        groups: &KeyGroups,
    ) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
        let mut by_group: BTreeMap<u32, GroupTimers<&K, &N>> = BTreeMap::new();
        for (pos, (ts, (k, n))) in self.event.in_order().enumerate() {
            let g = by_group.entry(groups.group_of(k)).or_default();
            g.0.push((ts, pos as u64, k, n));
        }
        for (pos, (ts, (k, n))) in self.processing.in_order().enumerate() {
            let g = by_group.entry(groups.group_of(k)).or_default();
            g.1.push((ts, pos as u64, k, n));
        }
        by_group
            .into_iter()
            .map(|(g, t)| Ok((g, encode(&t)?)))
            .collect()
    }

    /// Adds the timers of the given key groups (as written by [`Self::snapshot`]).
    #[cfg_attr(not(test), allow(dead_code))] // Through `Driver::restore`.
    pub(crate) fn restore<'a>(
        &mut self,
        groups: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), StateError> {
        let (mut event, mut processing) = (Vec::new(), Vec::new());
        for bytes in groups {
            let (e, p): GroupTimers<K, N> = decode(bytes)?;
            event.extend(e);
            processing.extend(p);
        }
        event.sort_by_key(|t| (t.0, t.1));
        processing.sort_by_key(|t| (t.0, t.1));
        for (ts, _, k, n) in event {
            self.register_event(ts, &k, n);
        }
        for (ts, _, k, n) in processing {
            self.register_processing(ts, &k, n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_time_then_registration_order_and_survive_a_snapshot() {
        let mut t = TimerService::<u32, u8>::default();
        t.register_event(5, &1, 0);
        t.register_event(3, &2, 0);
        t.register_event(5, &3, 0);
        t.register_event(5, &1, 0); // duplicate: ignored
        t.register_event(7, &4, 0);
        t.delete_event(7, &4, 0);
        t.register_processing(100, &9, 1);

        let kg = KeyGroups::new(4, 1);
        let snap = t.snapshot(&kg).expect("snapshot");
        let mut r = TimerService::<u32, u8>::default();
        r.restore(snap.values().map(Vec::as_slice))
            .expect("restore");

        for s in [&mut t, &mut r] {
            let fired: Vec<_> = std::iter::from_fn(|| s.event.pop_before(Some(6))).collect();
            assert_eq!(fired, vec![(3, (2, 0)), (5, (1, 0)), (5, (3, 0))]);
            assert_eq!(s.event.pop_before(None), None);
            assert_eq!(s.processing.pop_before(Some(100)), None);
            assert_eq!(s.processing.pop_before(Some(101)), Some((100, (9, 1))));
        }
    }
}
