//! Turning checkpoints on: [`CheckpointConfig`], and [`CheckpointTrigger`] to take one now.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::storage::{CheckpointStorage, FileStorage};
use crate::epoch::EpochClock;
use crate::stop::StopHandle;

/// Checkpoints kept when nothing is said.
pub const DEFAULT_KEEP: usize = 3;
/// Consecutive failed checkpoints after which the job stops, when nothing is said.
pub const DEFAULT_MAX_FAILURES: u32 = 5;

/// Where and how often checkpoints are taken; see [`crate::checkpoint`] for what they
/// mean for readers and writers.
///
/// ```
/// use rill_stream::checkpoint::{CheckpointConfig, MemoryStorage};
/// use std::sync::Arc;
/// use std::time::Duration;
/// let on_disk = CheckpointConfig::new("/var/lib/rill/checkpoints/wordcount")
///     .with_interval(Duration::from_secs(10));
/// assert_eq!(on_disk.keep, 3);
/// let in_memory = CheckpointConfig::with_storage(Arc::new(MemoryStorage::new()));
/// assert!(in_memory.restore);
/// ```
#[derive(Clone)]
pub struct CheckpointConfig {
    /// Where checkpoints are written: every process of a job must see the same files.
    pub storage: Arc<dyn CheckpointStorage>,
    /// How often a checkpoint is taken (rounded up to whole epochs; default 1 s).
    pub interval: Duration,
    /// How many complete checkpoints to keep (default [`DEFAULT_KEEP`], at least 1).
    pub keep: usize,
    /// After this many failed checkpoints in a row the job stops with
    /// [`crate::error::CheckpointError::TooManyFailures`] (default [`DEFAULT_MAX_FAILURES`]);
    /// fewer are logged and counted, and the job runs on from its last good checkpoint.
    pub max_consecutive_failures: u32,
    /// Restore the newest complete checkpoint at start (default true).
    pub restore: bool,
}

impl std::fmt::Debug for CheckpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointConfig")
            .field("interval", &self.interval)
            .field("keep", &self.keep)
            .field("max_consecutive_failures", &self.max_consecutive_failures)
            .field("restore", &self.restore)
            .finish()
    }
}

impl CheckpointConfig {
    /// Checkpoints in directory `dir` ([`FileStorage`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_storage(Arc::new(FileStorage::new(dir)))
    }

    /// Checkpoints in `storage`.
    pub fn with_storage(storage: Arc<dyn CheckpointStorage>) -> Self {
        CheckpointConfig {
            storage,
            interval: Duration::from_secs(1),
            keep: DEFAULT_KEEP,
            max_consecutive_failures: DEFAULT_MAX_FAILURES,
            restore: true,
        }
    }

    /// Builder form of setting [`Self::interval`].
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Builder form of setting [`Self::keep`].
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep.max(1);
        self
    }

    /// Builder form of setting [`Self::max_consecutive_failures`].
    pub fn with_max_consecutive_failures(mut self, failures: u32) -> Self {
        self.max_consecutive_failures = failures.max(1);
        self
    }

    /// Builder form of setting [`Self::restore`].
    pub fn with_restore(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }
}

/// A completed checkpoint, as this process saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedCheckpoint {
    /// Its id (epoch).
    pub id: u64,
    /// True for the savepoint taken when the job stopped or ended.
    pub savepoint: bool,
    /// Bytes on disk (known in the coordinator's process; 0 elsewhere).
    pub bytes: u64,
    /// From the first part written in the coordinator's process until the completion record
    /// was durable (`None` elsewhere).
    pub duration: Option<Duration>,
}

/// Counters of one environment's checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Checkpoints completed.
    pub completed: u64,
    /// Checkpoints that failed (a part or the record could not be written).
    pub failed: u64,
    /// Failures since the last completed checkpoint.
    pub consecutive_failures: u32,
    /// The newest completed checkpoint.
    pub last: Option<CompletedCheckpoint>,
    /// The checkpoint the running job was restored from.
    pub restored_from: Option<u64>,
}

/// Takes a checkpoint of the running job now, and tells which checkpoints completed.
///
/// `Clone + Send + Sync`: hand it to a control thread or a CLI handler. A trigger moves
/// this process's epoch clock forward to the next checkpoint epoch; in a job of several
/// processes, trigger every process (as a stop signals every process), otherwise the
/// checkpoint completes when the other processes reach that epoch on their own schedule.
///
/// ```
/// use rill_stream::{checkpoint::*, CollectSink, StreamExecutionEnvironment};
/// use std::sync::Arc;
/// let mut env = StreamExecutionEnvironment::new().with_parallelism(1);
/// env.set_checkpointing(CheckpointConfig::with_storage(Arc::new(MemoryStorage::new())));
/// let trigger = env.checkpoint_trigger();
/// assert_eq!(trigger.trigger(), None); // no job is running
/// env.execute("sum", |env| {
///     env.from_collection(vec![1u64, 2, 3]).collect_into(&CollectSink::new());
/// }).unwrap();
/// // The job's end took a savepoint.
/// assert!(trigger.stats().last.unwrap().savepoint);
/// ```
#[derive(Clone, Default)]
pub struct CheckpointTrigger {
    inner: Arc<TriggerInner>,
}

#[derive(Default)]
struct TriggerInner {
    // Locked to trigger, to record a completion or failure, and by waiters: never per record.
    state: Mutex<TriggerState>,
    completed: Condvar,
}

#[derive(Default)]
struct TriggerState {
    running: Option<Running>,
    stats: CheckpointStats,
}

struct Running {
    clock: EpochClock,
    every: u64,
    wake: StopHandle,
}

impl std::fmt::Debug for CheckpointTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointTrigger")
            .field("stats", &self.stats())
            .finish()
    }
}

impl CheckpointTrigger {
    fn state(&self) -> MutexGuard<'_, TriggerState> {
        match self.inner.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes the next epoch of the running job a checkpoint and returns its id, or `None`
    /// if no checkpointed job is running. It completes about one epoch interval later
    /// (see [`Self::wait_for`]).
    pub fn trigger(&self) -> Option<u64> {
        let state = self.state();
        let running = state.running.as_ref()?;
        let id = running
            .clock
            .jump_to_checkpoint(Instant::now(), running.every);
        running.wake.wake_sources();
        Some(id)
    }

    /// Waits until a checkpoint with id `>= id` completed (or `timeout` passed); returns
    /// the newest completed one then.
    pub fn wait_for(&self, id: u64, timeout: Duration) -> Option<CompletedCheckpoint> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if let Some(last) = state.stats.last.as_ref().filter(|l| l.id >= id) {
                return Some(last.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = match self.inner.completed.wait_timeout(state, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The counters so far (over every job of the environment).
    pub fn stats(&self) -> CheckpointStats {
        self.state().stats.clone()
    }

    pub(crate) fn start(&self, clock: EpochClock, every: u64, wake: StopHandle) {
        self.state().running = Some(Running { clock, every, wake });
    }

    pub(crate) fn restored(&self, id: Option<u64>) {
        self.state().stats.restored_from = id;
    }

    pub(crate) fn finish(&self) {
        self.state().running = None;
        self.inner.completed.notify_all();
    }

    pub(crate) fn record_completed(&self, done: CompletedCheckpoint) {
        let mut state = self.state();
        if state.stats.last.as_ref().is_some_and(|l| l.id >= done.id) {
            return;
        }
        state.stats.completed += 1;
        state.stats.consecutive_failures = 0;
        state.stats.last = Some(done);
        drop(state);
        self.inner.completed.notify_all();
    }

    /// Counts a failure; returns the consecutive failures so far.
    pub(crate) fn record_failed(&self) -> u32 {
        let mut state = self.state();
        state.stats.failed += 1;
        state.stats.consecutive_failures += 1;
        state.stats.consecutive_failures
    }
}
