//! Checkpoints: consistent snapshots of a running job, written durably, restored at start.
//!
//! An epoch is a Flink checkpoint barrier: when an operator's input frontier passes epoch
//! `e`, every record of epochs `<= e` has reached it, and (the operator driver sees to it) no
//! record of a later epoch has been touched yet. Snapshotting state at that moment gives a
//! consistent cut — Flink's aligned checkpoint — without barrier messages.
//!
//! # Two ways to receive snapshots
//! - A [`CheckpointPolicy`] (`set_checkpoint_policy`) is asked which epochs to snapshot and
//!   receives every [`OperatorSnapshot`]; nothing is written or restored for it. For
//!   inspecting state.
//! - [`CheckpointConfig`] (`set_checkpointing`) turns on checkpoints proper: written to a
//!   [`CheckpointStorage`], completed by a coordinator, restored by `execute`, and the
//!   basis of exactly-once results. The rest of this page is about them.
//!
//! # Which epochs
//! Epochs keep their short interval; every `ceil(interval / epoch interval)`-th epoch is a
//! checkpoint (a pure function of the epoch number, so every operator, worker and process
//! agrees). [`CheckpointTrigger::trigger`] moves the epoch clock forward to the next
//! checkpoint epoch at once. When the job ends — its input is exhausted, or it is stopped
//! with its [`crate::StopHandle`] — a final checkpoint (a *savepoint*) is taken after
//! everything else. On a stop the job is *not* drained: windows and timers that have not
//! fired stay in the savepoint and fire in the restored job (Flink's stop-with-savepoint);
//! when the input is exhausted everything fires first, as without checkpoints.
//!
//! # What is in a checkpoint
//! One *part* per operator instance (operator × worker): keyed operators (running
//! aggregates, `aggregate`, `process`, windows) write their state and timers per key
//! group, with their event-time frontier; [`crate::SourceReader`]s their
//! [`crate::SourceReader::snapshot`] and their watermark generator's state; in-memory
//! sources (`from_collection`, `from_sequence`, …) how many records they emitted and their
//! watermark state; `assign_timestamps_and_watermarks` its generator's state;
//! `fold_at_end` its partial results; [`crate::SinkWriter`]s their
//! [`crate::SinkWriter::snapshot`]: the output pending commit. Parts are written
//! synchronously on the worker (a large keyed state pauses that worker while it is encoded
//! and fsynced) when the operator sees the checkpoint epoch complete, before its
//! capabilities move past it. Not in a checkpoint: [`crate::SourceFunction`]s (they run on
//! their own thread and are replayed from their start), and what plain sinks
//! (`collect_into`, `print`, files) already wrote: only [`crate::SinkWriter`]s give
//! exactly-once output.
//!
//! # Completion
//! Every part is durable before the operator's capability passes the checkpoint epoch, so
//! when the epoch-completion tracker's frontier (the meet over every worker's sinks and
//! readers, in every process) passes epoch `c`, every part of `c` has been written or has
//! failed. The tracker of worker 0 is the coordinator: it looks for one part per operator
//! and worker covering `c` and, only if all are there, writes the completion record
//! (`store` module: fsync, temp file, rename, directory fsync). It then tells every worker,
//! through the dataflow, that `c` is complete. A part or record that could not be written
//! fails that checkpoint only: the error is logged and counted ([`CheckpointStats`]), the
//! job runs on from its last good checkpoint, and nothing of the failed epoch is acked or
//! committed; after `max_consecutive_failures` in a row the job stops with
//! [`crate::error::CheckpointError::TooManyFailures`].
//!
//! # What readers and writers are told in checkpoint mode
//! - `SourceReader::on_epoch_complete(c)` is called only for completed checkpoints `c`
//!   (including the final savepoint): every record the reader emitted in epochs `<= c` is
//!   reflected in durable state. A queue source acks those deliveries then — and only
//!   those. Deliveries acked late are redelivered after a crash although the checkpoint
//!   has them: a reader that must not see them twice keeps their ids in its snapshot and
//!   drops them on redelivery (Flink's RabbitMQ source does the same with correlation ids).
//! - `SinkWriter::snapshot(c)` returns the output of epochs `<= c` not yet committed (and
//!   keeps it pending); `SinkWriter::on_epoch_complete(c)` is the two-phase commit: publish
//!   the pending output of epochs `<= c`. Each record must carry an id that is the same
//!   every time it is published (e.g. writer/epoch/sequence) so that a deduplicating
//!   broker drops a republish. A restored run's epochs start after its checkpoint's, so
//!   the epoch of committed output never recurs with other output (a crashed run's epochs
//!   after its last checkpoint do recur, but nothing of them was committed). The writer's
//!   epochs do not wait for `confirmed_epoch` (the output is in the checkpoint);
//!   `confirmed_epoch` is not called, and `finish` is polled only after the final commit,
//!   once the dataflow has ended, until the published output is confirmed.
//! - Without checkpoints everything stays as it was: at-least-once, epochs complete when
//!   every writer confirmed them, readers ack then.
//!
//! # Restore
//! `execute` loads the newest complete checkpoint before any record flows (one that does not
//! read back whole is skipped for the one before it) and restores every operator, at the
//! current parallelism: keyed state goes by key group to the worker that now owns it;
//! every reader gets every old reader's snapshot ([`crate::SourceReader::restore`]); each
//! old writer's snapshot goes to exactly one new writer (old worker `i` to new worker
//! `i % parallelism`, [`crate::SinkWriter::restore`]), which commits it at once
//! (`on_epoch_complete(c)`); watermark generators resume (at another parallelism, from the
//! lowest of the old ones, so that nothing becomes late that was not); the epoch clock
//! starts at `c + 1`. Operators are identified by name and position in the dataflow
//! (`Sum@[0, 1, 5]`), the same each time the same job is built: a checkpoint whose
//! operators differ from the job's is refused ([`crate::error::CheckpointError::Incompatible`]),
//! and so is one with another number of key groups. In-memory parallel sources
//! (`from_sequence`, `from_parallel_iter`) restore only at the same parallelism.
//!
//! Keyed state is snapshotted per key group ([`crate::KeyGroups`]), so that a restore at a
//! different parallelism can hand each worker the groups it now owns.

pub mod config;
pub mod storage;
pub(crate) mod store;

pub use config::{
    CheckpointConfig, CheckpointStats, CheckpointTrigger, CompletedCheckpoint, DEFAULT_KEEP,
    DEFAULT_MAX_FAILURES,
};
pub use storage::{CheckpointStorage, FaultyStorage, FileStorage, MemoryStorage, StorageOp};
pub use store::{CheckpointMetadata, PartRef};

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{StateError, StreamError};
use crate::keygroup::KeyGroups;
use crate::types::Key;
pub use crate::watermark::WatermarkState;

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
    /// A sink's own state (a writer's pending output), bound to its worker.
    Worker(Vec<u8>),
    /// A sink's output since its previous snapshot (see [`crate::Increment`]); the
    /// checkpoint also holds the writer's `earlier` increments of this run, named by the
    /// checkpoint epochs they were taken at.
    WorkerIncrement {
        /// The writer's increment.
        bytes: Vec<u8>,
        /// The epochs of earlier increments still needed.
        earlier: Vec<u64>,
    },
    /// Keyed state as the changes since the operator's previous part (see
    /// [`crate::StateBackend::snapshot_key_group_changes`]), with full timers. It stands on
    /// the `earlier` parts of this run (by the epoch each starts at, oldest first: a
    /// [`SnapshotState::KeyGroups`], then changes), which the checkpoint also holds.
    KeyGroupsChanges {
        /// Per key group: the changes, in a [`SnapshotState::KeyGroups`] group's envelope.
        groups: BTreeMap<u32, Vec<u8>>,
        /// The `from` epochs of the parts these changes apply on.
        earlier: Vec<u64>,
    },
    /// A source's state: its position (a reader's snapshot, or how many records an
    /// in-memory source emitted) and its watermark generator's.
    Source {
        /// The reader's snapshot.
        position: Vec<u8>,
        /// The watermark generator's state.
        watermark: WatermarkState,
    },
}

impl SnapshotState {
    /// The earlier parts of this run that this one builds on (their `from` epochs, oldest
    /// first): none for a self-contained part.
    pub(crate) fn earlier(&self) -> &[u64] {
        match self {
            SnapshotState::WorkerIncrement { earlier, .. }
            | SnapshotState::KeyGroupsChanges { earlier, .. } => earlier,
            _ => &[],
        }
    }
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

/// Which epochs are checkpoints when checkpoints go to storage: every `every`-th epoch
/// (`e % every == every - 1`), from the first epoch of this run (`base`) on. A pure function
/// of the epoch number, so that every operator on every worker and process agrees without
/// being told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub(crate) every: u64,
    pub(crate) base: u64,
}

impl Schedule {
    #[cfg(test)]
    fn is_checkpoint(&self, e: u64) -> bool {
        e >= self.base && e % self.every == self.every - 1
    }

    /// The first checkpoint epoch in `range`.
    pub(crate) fn first_in(&self, range: &Range<u64>) -> Option<u64> {
        let lo = range.start.max(self.base);
        let first = lo.checked_add(self.every - 1 - lo % self.every)?;
        (first < range.end).then_some(first)
    }

    /// The last checkpoint epoch in `range`.
    pub(crate) fn last_in(&self, range: &Range<u64>) -> Option<u64> {
        let hi = range.end.checked_sub(1)?;
        let last = if hi % self.every == self.every - 1 {
            hi
        } else {
            (hi - hi % self.every).checked_sub(1)?
        };
        (last >= range.start.max(self.base)).then_some(last)
    }
}

/// The checkpoint epochs an operator's state stands for: it was taken when epochs
/// `from..=to` (and everything before) had completed and nothing after them was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) from: u64,
    pub(crate) to: u64,
}

/// Where an operator sends its snapshots.
#[derive(Clone)]
pub(crate) enum Checkpointing {
    /// A [`CheckpointPolicy`] receives each snapshot.
    Policy {
        policy: std::sync::Arc<dyn CheckpointPolicy>,
        operator: String,
        worker: usize,
    },
    /// Snapshots are parts of checkpoints in storage ([`CheckpointConfig`]).
    Stored(std::rc::Rc<PartWriter>),
}

/// One operator instance's way to its checkpoints' storage.
pub(crate) struct PartWriter {
    pub(crate) job: std::sync::Arc<StoredJob>,
    pub(crate) operator: String,
    pub(crate) worker: usize,
    pub(crate) control: crate::stop::JobControl,
}

impl Checkpointing {
    pub(crate) fn policy(
        policy: std::sync::Arc<dyn CheckpointPolicy>,
        operator: &str,
        worker: usize,
    ) -> Self {
        Checkpointing::Policy {
            policy,
            operator: operator.to_string(),
            worker,
        }
    }

    /// The checkpoint epochs to snapshot now that `completed` are complete, if any.
    pub(crate) fn due(&self, completed: Range<u64>) -> Option<Due> {
        if completed.is_empty() {
            return None;
        }
        match self {
            Checkpointing::Policy { policy, .. } => policy
                .checkpoint_in(completed)
                .map(|e| Due { from: e, to: e }),
            Checkpointing::Stored(w) => {
                let s = w.job.schedule;
                Some(Due {
                    from: s.first_in(&completed)?,
                    to: s.last_in(&completed)?,
                })
            }
        }
    }

    /// Each checkpoint epoch in `completed` on its own (for writers, whose pending output
    /// differs from one checkpoint epoch to the next).
    pub(crate) fn due_each(&self, completed: Range<u64>) -> Vec<u64> {
        match (self, self.due(completed)) {
            (_, None) => Vec::new(),
            (Checkpointing::Policy { .. }, Some(d)) => vec![d.to],
            (Checkpointing::Stored(w), Some(d)) => (d.from..=d.to)
                .step_by(w.job.schedule.every as usize)
                .collect(),
        }
    }

    /// Stores the state for the checkpoint epochs `due`; false if it is not durable. With
    /// storage, a failed write is logged and leaves the part missing, so that checkpoint
    /// fails (the coordinator counts it) while the job runs on.
    pub(crate) fn store(&self, due: Due, state: SnapshotState) -> Result<bool, StreamError> {
        match self {
            Checkpointing::Policy {
                policy,
                operator,
                worker,
            } => policy
                .store(OperatorSnapshot {
                    operator: operator.clone(),
                    worker: *worker,
                    epoch: due.to,
                    state,
                })
                .map(|()| true),
            Checkpointing::Stored(w) => Ok(w.write(due.from, due.to, state)),
        }
    }

    /// With storage: the operator finished; `state` stands for it in every checkpoint from
    /// epoch `from` on (the savepoint taken when the job ends among them).
    pub(crate) fn store_final(&self, from: u64, state: SnapshotState) {
        if let Checkpointing::Stored(w) = self {
            let _ = w.write(from.max(w.job.schedule.base), u64::MAX, state);
        }
    }

    /// With storage: the parts this operator wrote into the checkpoint the job was
    /// restored from, by the worker that wrote them, and that checkpoint's id.
    pub(crate) fn restored(&self) -> Option<(u64, &[Option<SnapshotState>])> {
        let Checkpointing::Stored(w) = self else {
            return None;
        };
        let r = w.job.restored.as_ref()?;
        Some((r.id(), r.parts(&w.operator).unwrap_or(&[])))
    }

    /// With storage: the earlier increments (oldest first) that go with worker `worker`'s
    /// [`SnapshotState::WorkerIncrement`] in the checkpoint the job was restored from.
    pub(crate) fn restored_earlier(&self, worker: usize) -> &[SnapshotState] {
        let Checkpointing::Stored(w) = self else {
            return &[];
        };
        w.job
            .restored
            .as_ref()
            .map_or(&[], |r| r.earlier(&w.operator, worker))
    }

    /// The worker count of the checkpoint the job was restored from.
    pub(crate) fn restored_parallelism(&self) -> Option<usize> {
        match self {
            Checkpointing::Stored(w) => w.job.restored.as_ref().map(|r| r.parallelism()),
            Checkpointing::Policy { .. } => None,
        }
    }

    /// True with storage: writers commit on checkpoint completion, not on confirms.
    pub(crate) fn is_stored(&self) -> bool {
        matches!(self, Checkpointing::Stored(_))
    }

    /// True with storage while the job is being stopped (not drained): operators keep their
    /// pending windows and timers for the savepoint instead of firing them.
    pub(crate) fn stopping(&self) -> bool {
        match self {
            Checkpointing::Stored(w) => w.control.should_stop(),
            Checkpointing::Policy { .. } => false,
        }
    }

    pub(crate) fn operator(&self) -> &str {
        match self {
            Checkpointing::Policy { operator, .. } => operator,
            Checkpointing::Stored(w) => &w.operator,
        }
    }
}

impl PartWriter {
    /// Writes a part; false if it could not (logged).
    fn write(&self, from: u64, to: u64, state: SnapshotState) -> bool {
        let part = store::PartFile {
            operator: self.operator.clone(),
            worker: self.worker as u32,
            from,
            to,
            state,
        };
        if let Err(e) = self.job.store.write_part(&part) {
            // The coordinator sees the part missing and counts the checkpoint as failed.
            tracing::error!(
                operator = %self.operator,
                worker = self.worker,
                checkpoint = from,
                error = %e,
                "could not write a checkpoint part"
            );
            return false;
        }
        true
    }
}

/// A job's checkpointing with storage, shared by every worker of a process.
pub(crate) struct StoredJob {
    pub(crate) store: std::sync::Arc<store::CheckpointStore>,
    pub(crate) schedule: Schedule,
    pub(crate) restored: Option<std::sync::Arc<store::Restored>>,
    pub(crate) trigger: CheckpointTrigger,
    pub(crate) max_failures: u32,
    pub(crate) key_groups: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_pick_every_nth_epoch_from_the_base() {
        let s = Schedule { every: 5, base: 7 };
        assert!(s.is_checkpoint(9) && s.is_checkpoint(14) && !s.is_checkpoint(4));
        assert_eq!(s.first_in(&(0..9)), None);
        assert_eq!(s.first_in(&(0..10)), Some(9));
        assert_eq!(s.last_in(&(0..10)), Some(9));
        assert_eq!(s.first_in(&(10..30)), Some(14));
        assert_eq!(s.last_in(&(10..30)), Some(29));
        assert_eq!(s.last_in(&(10..29)), Some(24));
        assert_eq!(s.last_in(&(0..4)), None);
        let every = Schedule { every: 1, base: 0 };
        assert_eq!(
            (every.first_in(&(3..6)), every.last_in(&(3..6))),
            (Some(3), Some(5))
        );
    }

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
