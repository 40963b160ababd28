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

use crate::checkpoint::{decode_keyed, encode_keyed};
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
}

/// The in-memory backend: a hash map (Fx-hashed) from key to state.
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
    map: FxHashMap<K, S>,
}

impl<K, S> Default for MemoryStateBackend<K, S> {
    fn default() -> Self {
        MemoryStateBackend {
            map: FxHashMap::default(),
        }
    }
}

impl<K: Key, S: Data> MemoryStateBackend<K, S> {
    /// Direct access for operators on the hot path (one hash lookup per record).
    #[inline]
    pub(crate) fn map_mut(&mut self) -> &mut FxHashMap<K, S> {
        &mut self.map
    }
}

impl<K: Key, S: Data> StateBackend<K, S> for MemoryStateBackend<K, S> {
    fn get(&self, key: &K) -> Option<&S> {
        self.map.get(key)
    }
    fn get_mut(&mut self, key: &K) -> Option<&mut S> {
        self.map.get_mut(key)
    }
    fn get_or_insert_with(&mut self, key: &K, init: &mut dyn FnMut() -> S) -> &mut S {
        self.map.entry(key.clone()).or_insert_with(init)
    }
    fn insert(&mut self, key: K, state: S) {
        self.map.insert(key, state);
    }
    fn remove(&mut self, key: &K) -> Option<S> {
        self.map.remove(key)
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn for_each(&self, f: &mut dyn FnMut(&K, &S)) {
        for (k, s) in &self.map {
            f(k, s);
        }
    }
    fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        let entries: Vec<(&K, &S)> = self.map.iter().collect();
        bincode::serialize(&entries).map_err(|e| StateError::Encode(e.to_string()))
    }
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let entries: Vec<(K, S)> =
            bincode::deserialize(bytes).map_err(|e| StateError::Decode(e.to_string()))?;
        self.map = entries.into_iter().collect();
        Ok(())
    }
    fn snapshot_key_groups(
        &self,
        groups: &KeyGroups,
    ) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
        // Borrows the entries instead of cloning them as the default does.
        encode_keyed(groups, self.map.iter())
    }
}
