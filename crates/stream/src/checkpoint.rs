//! Checkpoint hooks: which epochs are snapshotted, and what a snapshot holds.
//!
//! An epoch is a Flink checkpoint barrier: when an operator's input frontier passes epoch
//! `e`, every record of epochs `<= e` has reached it, and (the operator driver sees to it) no
//! record of a later epoch has been touched yet. Snapshotting state at that moment gives a
//! consistent cut — Flink's aligned checkpoint — without barrier messages.
//!
//! This module only defines the seam: a [`CheckpointPolicy`] (set on the environment) is
//! asked, each time epochs complete at an operator, whether one of them is a checkpoint, and
//! receives the resulting [`OperatorSnapshot`]s. The default is no policy: no snapshot is
//! taken and nothing is paid for. A checkpoint coordinator that writes snapshots atomically
//! and records which checkpoints completed plugs in here.
//!
//! Keyed state is snapshotted per key group ([`crate::KeyGroups`]), so that a restore at a
//! different parallelism can hand each worker the groups it now owns.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{StateError, StreamError};
use crate::keygroup::KeyGroups;
use crate::types::Key;

/// Decides which epochs are checkpoints and receives the snapshots. Shared by all workers of
/// a process.
///
/// ```
/// use rill_stream::{CheckpointPolicy, OperatorSnapshot, StreamError};
/// use std::ops::Range;
/// use std::sync::Mutex;
///
/// /// Every 10th epoch, kept in memory.
/// #[derive(Default)]
/// struct EveryTenth(Mutex<Vec<OperatorSnapshot>>);
/// impl CheckpointPolicy for EveryTenth {
///     fn checkpoint_in(&self, completed: Range<u64>) -> Option<u64> {
///         let last = completed.end.checked_sub(1)?;
///         let c = last - last % 10;
///         completed.contains(&c).then_some(c)
///     }
///     fn store(&self, snapshot: OperatorSnapshot) -> Result<(), StreamError> {
///         self.0.lock().map_err(|_| StreamError::Worker("poisoned".into()))?.push(snapshot);
///         Ok(())
///     }
/// }
/// assert_eq!(EveryTenth::default().checkpoint_in(5..23), Some(20));
/// assert_eq!(EveryTenth::default().checkpoint_in(11..20), None);
/// ```
pub trait CheckpointPolicy: Send + Sync + 'static {
    /// The epochs in `completed` have just completed together at one operator (nothing
    /// happened in between, so they share one state): the one to snapshot, if any.
    ///
    /// Operators see epochs complete in different groupings, so a coordinator should have at
    /// most one checkpoint epoch pending at a time (as Flink triggers one checkpoint after
    /// another); then every operator snapshots exactly that epoch.
    fn checkpoint_in(&self, completed: Range<u64>) -> Option<u64>;

    /// Receives one operator's snapshot. An error fails the job.
    fn store(&self, snapshot: OperatorSnapshot) -> Result<(), StreamError>;
}

/// One operator instance's state at the end of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    /// The operator: its name and its position in the dataflow, the same each time the same
    /// job is built (e.g. `Sum@[0, 5]`).
    pub operator: String,
    /// The worker that took it.
    pub worker: usize,
    /// All records of epochs `<= epoch` are reflected in it, and none of a later epoch.
    pub epoch: u64,
    /// The state.
    pub state: SnapshotState,
}

/// What a snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Keyed state (with its timers), by key group: restorable at any parallelism. Only the
    /// groups that hold state are present.
    KeyGroups(BTreeMap<u32, Vec<u8>>),
    /// A source's or sink's own state (a reader's position, a writer's pending output),
    /// bound to its worker.
    Worker(Vec<u8>),
}

impl OperatorSnapshot {
    /// Decodes the keyed state of a keyed operator whose per-key state type is `S` — the
    /// record type for running aggregates (`sum`, `reduce`, ...), the accumulator for
    /// `aggregate`, the function's `State` for `process` — over all key groups. For
    /// inspecting snapshots; restoring goes through the operators themselves.
    ///
    /// ```
    /// use rill_stream::*;
    /// use std::collections::BTreeMap;
    /// use std::ops::Range;
    /// use std::sync::{Arc, Mutex};
    ///
    /// #[derive(Default)]
    /// struct Keep(Mutex<Vec<OperatorSnapshot>>);
    /// impl CheckpointPolicy for Keep {
    ///     fn checkpoint_in(&self, completed: Range<u64>) -> Option<u64> { completed.end.checked_sub(1) }
    ///     fn store(&self, s: OperatorSnapshot) -> Result<(), StreamError> {
    ///         self.0.lock().unwrap().push(s);
    ///         Ok(())
    ///     }
    /// }
    /// let keep = Arc::new(Keep::default());
    /// let mut env = StreamExecutionEnvironment::new().with_parallelism(1);
    /// env.set_checkpoint_policy(keep.clone());
    /// env.execute("counts", |env| {
    ///     env.from_collection(vec![('a', 1u64), ('b', 1), ('a', 1)])
    ///         .key_by(|t| t.0)
    ///         .sum(|t| &mut t.1)
    ///         .collect_into(&CollectSink::new());
    /// }).unwrap();
    /// // A job this short may end inside its first epoch: then no checkpoint was due.
    /// for snapshot in keep.0.lock().unwrap().iter().filter(|s| s.operator.starts_with("Sum")) {
    ///     let state: BTreeMap<char, (char, u64)> =
    ///         snapshot.keyed_entries::<char, (char, u64)>().unwrap().into_iter().collect();
    ///     assert!(state.values().all(|(_, n)| *n <= 2));
    /// }
    /// ```
    pub fn keyed_entries<K: Key, S: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Vec<(K, S)>, StateError> {
        let SnapshotState::KeyGroups(groups) = &self.state else {
            return Err(StateError::Decode(format!(
                "{} is not a keyed operator",
                self.operator
            )));
        };
        let mut entries = Vec::new();
        for bytes in groups.values() {
            let KeyGroupState(_, state, _) = decode(bytes)?;
            if !state.is_empty() {
                entries.extend(decode_keyed::<K, S>(&state)?);
            }
        }
        Ok(entries)
    }
}

/// One key group of a keyed operator's snapshot: the operator's event-time frontier (which
/// says what has fired), its state as the operator wrote it (`encode_keyed`), its timers.
#[derive(Serialize, Deserialize)]
pub(crate) struct KeyGroupState(pub(crate) u64, pub(crate) Vec<u8>, pub(crate) Vec<u8>);

/// Encodes keyed entries into one `Vec<(K, S)>` (bincode) per key group.
pub(crate) fn encode_keyed<'a, K: Key, S: Serialize + 'a>(
    groups: &KeyGroups,
    entries: impl Iterator<Item = (&'a K, &'a S)>,
) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
    let mut by_group: BTreeMap<u32, Vec<(&K, &S)>> = BTreeMap::new();
    for (k, s) in entries {
        by_group.entry(groups.group_of(k)).or_default().push((k, s));
    }
    by_group
        .into_iter()
        .map(|(g, entries)| Ok((g, encode(&entries)?)))
        .collect()
}

/// Decodes one key group written by [`encode_keyed`].
pub(crate) fn decode_keyed<K: Key, S: for<'de> Deserialize<'de>>(
    bytes: &[u8],
) -> Result<Vec<(K, S)>, StateError> {
    decode(bytes)
}

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StateError> {
    bincode::serialize(value).map_err(|e| StateError::Encode(e.to_string()))
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StateError> {
    bincode::deserialize(bytes).map_err(|e| StateError::Decode(e.to_string()))
}

/// Where an operator sends its snapshots: the job's policy, and the operator's identity.
#[derive(Clone)]
pub(crate) struct Checkpointing {
    pub(crate) policy: std::sync::Arc<dyn CheckpointPolicy>,
    pub(crate) operator: String,
    pub(crate) worker: usize,
}

impl Checkpointing {
    /// The epoch to snapshot now that `completed` are complete, if any.
    pub(crate) fn due(&self, completed: Range<u64>) -> Option<u64> {
        if completed.is_empty() {
            return None;
        }
        self.policy.checkpoint_in(completed)
    }

    pub(crate) fn store(&self, epoch: u64, state: SnapshotState) -> Result<(), StreamError> {
        self.policy.store(OperatorSnapshot {
            operator: self.operator.clone(),
            worker: self.worker,
            epoch,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_entries_round_trip_by_group() {
        let kg = KeyGroups::new(8, 2);
        let map: Vec<(u32, String)> = (0..50).map(|i| (i, format!("v{i}"))).collect();
        let groups = encode_keyed(&kg, map.iter().map(|(k, v)| (k, v))).expect("encode");
        assert!(groups.keys().all(|g| *g < 8));
        let mut back: Vec<(u32, String)> = Vec::new();
        for (g, bytes) in &groups {
            let entries: Vec<(u32, String)> = decode_keyed(bytes).expect("decode");
            assert!(entries.iter().all(|(k, _)| kg.group_of(k) == *g));
            back.extend(entries);
        }
        back.sort();
        assert_eq!(back, map);
        assert!(decode_keyed::<u32, String>(&[0xff]).is_err());
    }
}
