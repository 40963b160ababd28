//! Keyed state: per-key [`ValueState`], [`ListState`] and [`MapState`], stored by a
//! [`StateBackend`] that the owning operator can snapshot and restore.
//!
//! A keyed operator's state is a map from key to a per-key state value `S`. For a
//! [`crate::KeyedProcessFunction`], `S` is a user struct composed of the three state
//! primitives below, so it is typed (no per-access (de)serialisation) yet serialisable as a
//! whole — which is what the checkpointing work needs: `snapshot()` gives bytes, `restore()`
//! takes them back. Checkpoints use the per-key-group form
//! ([`StateBackend::snapshot_key_groups`]), so that state can move between workers.

use std::collections::BTreeMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{decode, decode_keyed, encode, encode_keyed};
use crate::error::StateError;
use crate::hash::FxHashMap;
use crate::keygroup::KeyGroups;
use crate::types::{Data, Key};

/// A single value per key (Flink's `ValueState`).
///
/// ```
/// use rill_stream::ValueState;
/// let mut s = ValueState::default();
/// assert_eq!(s.value(), None);
/// s.update(3u32);
/// assert_eq!(s.value(), Some(&3));
/// s.clear();
/// assert!(s.value().is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueState<V> {
    value: Option<V>,
}

impl<V> Default for ValueState<V> {
    fn default() -> Self {
        ValueState { value: None }
    }
}

impl<V> ValueState<V> {
    /// The current value, if any.
    pub fn value(&self) -> Option<&V> {
        self.value.as_ref()
    }
    /// Mutable access to the current value, if any.
    pub fn value_mut(&mut self) -> Option<&mut V> {
        self.value.as_mut()
    }
    /// Replaces the value.
    pub fn update(&mut self, value: V) {
        self.value = Some(value);
    }
    /// Removes and returns the value.
    pub fn take(&mut self) -> Option<V> {
        self.value.take()
    }
    /// Removes the value.
    pub fn clear(&mut self) {
        self.value = None;
    }
}

/// A list of values per key (Flink's `ListState`).
///
/// ```
/// use rill_stream::ListState;
/// let mut s = ListState::default();
/// s.add("a");
/// s.add_all(["b", "c"]);
/// assert_eq!(s.get(), &["a", "b", "c"]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListState<V> {
    items: Vec<V>,
}

impl<V> Default for ListState<V> {
    fn default() -> Self {
        ListState { items: Vec::new() }
    }
}

impl<V> ListState<V> {
    /// All values, in insertion order.
    pub fn get(&self) -> &[V] {
        &self.items
    }
    /// Appends a value.
    pub fn add(&mut self, value: V) {
        self.items.push(value);
    }
    /// Appends values.
    pub fn add_all(&mut self, values: impl IntoIterator<Item = V>) {
        self.items.extend(values);
    }
    /// Replaces all values.
    pub fn update(&mut self, values: Vec<V>) {
        self.items = values;
    }
    /// Removes all values and returns them.
    pub fn take(&mut self) -> Vec<V> {
        std::mem::take(&mut self.items)
    }
    /// Removes all values.
    pub fn clear(&mut self) {
        self.items.clear();
    }
}

/// A map per key (Flink's `MapState`).
///
/// ```
/// use rill_stream::MapState;
/// let mut s = MapState::default();
/// s.put("x", 1);
/// *s.entry("x").or_insert(0) += 1;
/// assert_eq!(s.get(&"x"), Some(&2));
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(
    serialize = "UK: Serialize + Hash + Eq, UV: Serialize",
    deserialize = "UK: Deserialize<'de> + Hash + Eq, UV: Deserialize<'de>"
))]
pub struct MapState<UK, UV> {
    map: FxHashMap<UK, UV>,
}

impl<UK, UV> Default for MapState<UK, UV> {
    fn default() -> Self {
        MapState {
            map: FxHashMap::default(),
        }
    }
}

impl<UK: Hash + Eq, UV> MapState<UK, UV> {
    /// The value under `key`.
    pub fn get(&self, key: &UK) -> Option<&UV> {
        self.map.get(key)
    }
    /// Inserts or replaces.
    pub fn put(&mut self, key: UK, value: UV) -> Option<UV> {
        self.map.insert(key, value)
    }
    /// In-place access.
    pub fn entry(&mut self, key: UK) -> std::collections::hash_map::Entry<'_, UK, UV> {
        self.map.entry(key)
    }
    /// Removes `key`.
    pub fn remove(&mut self, key: &UK) -> Option<UV> {
        self.map.remove(key)
    }
    /// True if `key` is present.
    pub fn contains(&self, key: &UK) -> bool {
        self.map.contains_key(key)
    }
    /// All entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&UK, &UV)> {
        self.map.iter()
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Removes all entries.
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Where a keyed operator keeps its per-key state `S`.
///
/// Operators only use this interface, so a different backend (on disk, remote) can be put
/// behind it; [`StateBackend::snapshot`]/[`StateBackend::restore`] are the hooks for
/// checkpoints.
pub trait StateBackend<K: Key, S: Data>: 'static {
    /// The state of `key`, if any.
    fn get(&self, key: &K) -> Option<&S>;
    /// Mutable state of `key`, if any.
    fn get_mut(&mut self, key: &K) -> Option<&mut S>;
    /// Mutable state of `key`, created with `init` if absent.
    fn get_or_insert_with(&mut self, key: &K, init: &mut dyn FnMut() -> S) -> &mut S;
    /// Sets the state of `key`.
    fn insert(&mut self, key: K, state: S);
    /// Drops the state of `key`.
    fn remove(&mut self, key: &K) -> Option<S>;
    /// Number of keys with state.
    fn len(&self) -> usize;
    /// True if no key has state.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Visits every key's state.
    fn for_each(&self, f: &mut dyn FnMut(&K, &S));
    /// Serialises all state.
    fn snapshot(&self) -> Result<Vec<u8>, StateError>;
    /// Replaces all state with a snapshot.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError>;

    /// Serialises the state per key group (what checkpoints store): each group's bytes
    /// decode with [`Self::restore_key_group`] on any backend for the same `K` and `S`.
    fn snapshot_key_groups(
        &self,
        groups: &KeyGroups,
    ) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
        let mut entries: Vec<(K, S)> = Vec::with_capacity(self.len());
        self.for_each(&mut |k, s| entries.push((k.clone(), s.clone())));
        encode_keyed(groups, entries.iter().map(|(k, s)| (k, s)))
    }

    /// Adds the state of one key group written by [`Self::snapshot_key_groups`].
    fn restore_key_group(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        for (k, s) in decode_keyed::<K, S>(bytes)? {
            self.insert(k, s);
        }
        Ok(())
    }

    /// From now on, remember what changes between snapshots, for
    /// [`Self::snapshot_key_group_changes`] (checkpoints to storage call it once). Until
    /// then a backend need not remember removed keys, which would grow without bound.
    fn track_changes(&mut self) {}

    /// Per key group, what changed since the previous snapshot (full or of changes): the
    /// keys removed and the entries written, for [`Self::restore_key_group_changes`].
    /// `None` if this backend cannot tell; the caller then takes a full snapshot.
    fn snapshot_key_group_changes(
        &self,
        _groups: &KeyGroups,
    ) -> Result<Option<BTreeMap<u32, Vec<u8>>>, StateError> {
        Ok(None)
    }

    /// A snapshot (full or of changes) was taken: changes count from here.
    fn snapshot_taken(&mut self) {}

    /// Applies one key group's changes written by [`Self::snapshot_key_group_changes`] on
    /// top of the state restored so far.
    fn restore_key_group_changes(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let (removed, written): (Vec<K>, Vec<(K, S)>) = decode(bytes)?;
        for k in &removed {
            self.remove(k);
        }
        for (k, s) in written {
            self.insert(k, s);
        }
        Ok(())
    }
}

/// A key's state and the generation of the last snapshot it changed after.
type Stamped<S> = (S, u32);

/// The in-memory backend's map, as operators on the hot path use it: every write stamps the
/// entry with the current generation, and removals are remembered while changes are
/// tracked, so that a checkpoint can write only what changed.
pub(crate) struct TrackedMap<'a, K, S> {
    map: &'a mut FxHashMap<K, Stamped<S>>,
    generation: u32,
    removed: Option<&'a mut Vec<K>>,
}

impl<K: Key, S> TrackedMap<'_, K, S> {
    /// Mutable state of `key`, if any (counted as changed).
    #[inline]
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut S> {
        let generation = self.generation;
        self.map.get_mut(key).map(|e| {
            e.1 = generation;
            &mut e.0
        })
    }

    /// Sets the state of `key`.
    #[inline]
    pub(crate) fn insert(&mut self, key: K, state: S) {
        self.map.insert(key, (state, self.generation));
    }

    /// Mutable state of `key`, created with `init` if absent (counted as changed).
    #[inline]
    pub(crate) fn get_or_insert_with(&mut self, key: K, init: impl FnOnce() -> S) -> &mut S {
        let generation = self.generation;
        let e = self.map.entry(key).or_insert_with(|| (init(), generation));
        e.1 = generation;
        &mut e.0
    }

    /// Drops the state of `key`.
    pub(crate) fn remove(&mut self, key: &K) -> Option<S> {
        let old = self.map.remove(key)?;
        if let Some(removed) = self.removed.as_mut() {
            removed.push(key.clone());
        }
        Some(old.0)
    }
}

fn encode_changes<K: Key, S: Data>(
    groups: &KeyGroups,
    map: &FxHashMap<K, Stamped<S>>,
    generation: u32,
    removed: &[K],
) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
    #[allow(clippy::type_complexity)]
    let mut by_group: BTreeMap<u32, (Vec<&K>, Vec<(&K, &S)>)> = BTreeMap::new();
    for k in removed {
        by_group.entry(groups.group_of(k)).or_default().0.push(k);
    }
    for (k, (s, g)) in map {
        if *g == generation {
            by_group
                .entry(groups.group_of(k))
                .or_default()
                .1
                .push((k, s));
        }
    }
    by_group
        .into_iter()
        .map(|(g, changes)| Ok((g, encode(&changes)?)))
        .collect()
}

/// The in-memory backend: a hash map (Fx-hashed) from key to state. Each entry carries the
/// generation it was last written in, so a checkpoint can take only what changed since the
/// previous one ([`StateBackend::snapshot_key_group_changes`]).
///
/// ```
/// use rill_stream::{MemoryStateBackend, StateBackend};
/// let mut b = MemoryStateBackend::<String, u64>::default();
/// *b.get_or_insert_with(&"a".to_string(), &mut || 0) += 5;
/// let bytes = b.snapshot().unwrap();
/// let mut c = MemoryStateBackend::<String, u64>::default();
/// c.restore(&bytes).unwrap();
/// assert_eq!(c.get(&"a".to_string()), Some(&5));
/// ```
pub struct MemoryStateBackend<K, S> {
    map: FxHashMap<K, Stamped<S>>,
    /// Entries written since the last snapshot carry this generation.
    generation: u32,
    /// Keys removed since the last snapshot, once changes are tracked.
    removed: Option<Vec<K>>,
}

impl<K, S> Default for MemoryStateBackend<K, S> {
    fn default() -> Self {
        MemoryStateBackend {
            map: FxHashMap::default(),
            generation: 1,
            removed: None,
        }
    }
}

impl<K: Key, S: Data> MemoryStateBackend<K, S> {
    /// Direct access for operators on the hot path (one hash lookup per record).
    #[inline]
    pub(crate) fn map_mut(&mut self) -> TrackedMap<'_, K, S> {
        TrackedMap {
            map: &mut self.map,
            generation: self.generation,
            removed: self.removed.as_mut(),
        }
    }

    /// Drops every key's state (the input ended; no snapshot of changes follows).
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        if let Some(removed) = self.removed.as_mut() {
            removed.clear();
        }
    }
}

impl<K: Key, S: Data> StateBackend<K, S> for MemoryStateBackend<K, S> {
    fn get(&self, key: &K) -> Option<&S> {
        self.map.get(key).map(|e| &e.0)
    }
    fn get_mut(&mut self, key: &K) -> Option<&mut S> {
        let generation = self.generation;
        self.map.get_mut(key).map(|e| {
            e.1 = generation;
            &mut e.0
        })
    }
    fn get_or_insert_with(&mut self, key: &K, init: &mut dyn FnMut() -> S) -> &mut S {
        let generation = self.generation;
        let e = self
            .map
            .entry(key.clone())
            .or_insert_with(|| (init(), generation));
        e.1 = generation;
        &mut e.0
    }
    fn insert(&mut self, key: K, state: S) {
        self.map_mut().insert(key, state);
    }
    fn remove(&mut self, key: &K) -> Option<S> {
        self.map_mut().remove(key)
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn for_each(&self, f: &mut dyn FnMut(&K, &S)) {
        for (k, (s, _)) in &self.map {
            f(k, s);
        }
    }
    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        let entries: Vec<(&K, &S)> = self.map.iter().map(|(k, (s, _))| (k, s)).collect();
        bincode::serialize(&entries).map_err(|e| StateError::Encode(e.to_string()))
    }
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let entries: Vec<(K, S)> =
            bincode::deserialize(bytes).map_err(|e| StateError::Decode(e.to_string()))?;
        let generation = self.generation;
        self.map = entries
            .into_iter()
            .map(|(k, s)| (k, (s, generation)))
            .collect();
        Ok(())
    }
    fn snapshot_key_groups(
        &self,
        groups: &KeyGroups,
    ) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
        // Borrows the entries instead of cloning them as the default does.
        encode_keyed(groups, self.map.iter().map(|(k, (s, _))| (k, s)))
    }
    fn track_changes(&mut self) {
        self.removed.get_or_insert_with(Vec::new);
    }
    fn snapshot_key_group_changes(
        &self,
        groups: &KeyGroups,
    ) -> Result<Option<BTreeMap<u32, Vec<u8>>>, StateError> {
        match &self.removed {
            Some(removed) => encode_changes(groups, &self.map, self.generation, removed).map(Some),
            None => Ok(None),
        }
    }
    fn snapshot_taken(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if let Some(removed) = self.removed.as_mut() {
            removed.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(parts: &[(&BTreeMap<u32, Vec<u8>>, bool)]) -> BTreeMap<String, u64> {
        let mut b = MemoryStateBackend::<String, u64>::default();
        for (groups, changes) in parts {
            for bytes in groups.values() {
                match changes {
                    false => b.restore_key_group(bytes).expect("full"),
                    true => b.restore_key_group_changes(bytes).expect("changes"),
                }
            }
        }
        let mut out = BTreeMap::new();
        b.for_each(&mut |k, s| {
            out.insert(k.clone(), *s);
        });
        out
    }

    #[test]
    fn a_full_snapshot_and_its_changes_restore_the_state() {
        let groups = KeyGroups::new(8, 1);
        let mut b = MemoryStateBackend::<String, u64>::default();
        b.track_changes();
        for k in ["a", "b", "c", "d"] {
            b.insert(k.into(), 1);
        }
        let full = b.snapshot_key_groups(&groups).expect("full");
        b.snapshot_taken();
        // Written, removed, removed and written again, untouched.
        *b.get_mut(&"a".into()).expect("a") += 1;
        b.remove(&"b".into());
        b.remove(&"c".into());
        b.insert("c".into(), 7);
        b.insert("e".into(), 5);
        let first = b
            .snapshot_key_group_changes(&groups)
            .expect("enc")
            .expect("changes");
        b.snapshot_taken();
        // Only what changed since: "e" removed.
        b.remove(&"e".into());
        let second = b
            .snapshot_key_group_changes(&groups)
            .expect("enc")
            .expect("changes");
        let size = |m: &BTreeMap<u32, Vec<u8>>| m.values().map(Vec::len).sum::<usize>();
        assert!(size(&second) < size(&first), "only the new changes");

        let expected: BTreeMap<String, u64> = [("a", 2), ("c", 7), ("d", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        let chain = restored(&[(&full, false), (&first, true), (&second, true)]);
        assert_eq!(chain, expected);
        let mut current = BTreeMap::new();
        b.for_each(&mut |k, s| {
            current.insert(k.clone(), *s);
        });
        assert_eq!(current, expected);
    }

    #[test]
    fn without_tracking_there_are_no_changes_to_take() {
        let mut b = MemoryStateBackend::<u32, u64>::default();
        b.insert(1, 1);
        b.remove(&1);
        let groups = KeyGroups::new(4, 1);
        assert!(b.snapshot_key_group_changes(&groups).expect("ok").is_none());
    }
}
