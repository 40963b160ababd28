//! Recovery: jobs with checkpoints that are stopped or crash and are restored give exactly
//! the results of an uninterrupted run — at another parallelism, across processes, with
//! failing storage, and through any number of kills.
//!
//! Output goes through a two-phase-commit writer into an idempotent "broker" that drops a
//! record whose id (writer, epoch, sequence) it already has; input comes from a replayable
//! log (positions in the checkpoint) or from a queue that forgets only acked messages and
//! redelivers the rest after a crash. Comparing the broker's records as a multiset with an
//! uninterrupted run's shows both losses and duplicates. The writer snapshots incrementally
//! (each checkpoint holds its new output and names the earlier increments still pending),
//! so every restore here also reads a chain of increments back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proptest::prelude::*;
use rill_stream::checkpoint::{
    CheckpointConfig, CheckpointStorage, FaultyStorage, FileStorage, MemoryStorage, StorageOp,
};
use rill_stream::*;
use serde::{Deserialize, Serialize};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An output record's id: writer, epoch, sequence in that epoch on that writer.
type Id = (u32, u64, u64);

/// The output queue of a deduplicating broker.
#[derive(Clone, Default)]
struct Broker(Arc<Mutex<BTreeMap<Id, String>>>);

impl Broker {
    fn publish(&self, id: Id, value: String) {
        lock(&self.0).entry(id).or_insert(value);
    }

    fn values(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.0).values().cloned().collect();
        v.sort();
        v
    }
}

/// Where a run is cut short.
#[derive(Clone, Default)]
struct Kill {
    /// Readers fail (or stop the job) once this many records were emitted in this run.
    after_records: Option<u64>,
    /// Stop with a savepoint there instead of failing.
    stop: Option<StopHandle>,
    /// A writer fails in this commit (1-based, over the run), before publishing: a crash
    /// between the completion record and the commit.
    in_commit: Option<u64>,
    /// The reader holds back at `after_records` until this many checkpoints completed.
    after_checkpoints: u64,
    emitted: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
    checkpoints: Arc<AtomicU64>,
}

impl Kill {
    fn none() -> Self {
        Kill::default()
    }

    fn after(n: u64) -> Self {
        Kill {
            after_records: Some(n),
            ..Kill::default()
        }
    }

    fn stop_after(n: u64, stop: StopHandle) -> Self {
        Kill {
            after_records: Some(n),
            stop: Some(stop),
            ..Kill::default()
        }
    }

    /// Before emitting a record: `Ok(false)` if the reader must emit no more now.
    fn emit(&self) -> Result<bool, StreamError> {
        let Some(n) = self.after_records else {
            return Ok(true);
        };
        if self.emitted.load(Ordering::SeqCst) < n {
            self.emitted.fetch_add(1, Ordering::SeqCst);
            return Ok(true);
        }
        if self.checkpoints.load(Ordering::SeqCst) < self.after_checkpoints {
            return Ok(false);
        }
        match &self.stop {
            Some(stop) => {
                stop.stop();
                Ok(false)
            }
            None => Err(StreamError::Source(format!("killed after {n} records"))),
        }
    }

    fn commit(&self) -> Result<(), StreamError> {
        let k = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        match self.in_commit == Some(k) {
            true => Err(StreamError::Source(format!("killed in commit {k}"))),
            false => Ok(()),
        }
    }
}

/// The two-phase-commit writer: output is pending until its checkpoint completes.
struct TwoPhase {
    broker: Broker,
    worker: u32,
    pending: Vec<(Id, String)>,
    seq: BTreeMap<u64, u64>,
    kill: Kill,
    /// Pending output of epochs up to here is in an increment of this run.
    snapshotted: Option<u64>,
    /// This run's increments that held output, by epoch.
    increments: Vec<u64>,
}

impl TwoPhase {
    fn new(broker: &Broker, worker: usize, kill: &Kill) -> Self {
        TwoPhase {
            broker: broker.clone(),
            worker: worker as u32,
            pending: Vec::new(),
            seq: BTreeMap::new(),
            kill: kill.clone(),
            snapshotted: None,
            increments: Vec::new(),
        }
    }
}

impl SinkWriter<String> for TwoPhase {
    fn write(&mut self, epoch: u64, value: String, _ts: u64) -> Result<(), StreamError> {
        let seq = self.seq.entry(epoch).or_default();
        self.pending.push(((self.worker, epoch, *seq), value));
        *seq += 1;
        Ok(())
    }

    fn confirmed_epoch(&mut self) -> Result<Option<u64>, StreamError> {
        Err(StreamError::Worker(
            "not asked with checkpoints in storage".into(),
        ))
    }

    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        let due: Vec<&(Id, String)> = self
            .pending
            .iter()
            .filter(|(id, _)| id.1 <= epoch)
            .collect();
        bincode::serialize(&due).map_err(|e| StreamError::Serialize(e.to_string()))
    }

    fn snapshot_increment(&mut self, epoch: u64) -> Result<Option<Increment>, StreamError> {
        // Output is published when committed, so an increment is needed while it holds an
        // epoch at or after the oldest pending one.
        match self.pending.iter().map(|(id, _)| id.1).min() {
            Some(oldest) => self.increments.retain(|e| *e >= oldest),
            None => self.increments.clear(),
        }
        let earlier = self.increments.clone();
        let from = self.snapshotted.map_or(0, |prev| prev + 1);
        let due: Vec<&(Id, String)> = self
            .pending
            .iter()
            .filter(|(id, _)| from <= id.1 && id.1 <= epoch)
            .collect();
        if !due.is_empty() {
            self.increments.push(epoch);
        }
        self.snapshotted = Some(epoch);
        let bytes = bincode::serialize(&due).map_err(|e| StreamError::Serialize(e.to_string()))?;
        Ok(Some(Increment { bytes, earlier }))
    }

    fn increment_lost(&mut self) {
        self.snapshotted = None;
        self.increments.clear();
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        self.kill.commit()?;
        let (now, later) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(id, _)| id.1 <= epoch);
        self.pending = later;
        let now: Vec<(Id, String)> = now;
        for (id, v) in now {
            self.broker.publish(id, v);
        }
        Ok(())
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        for s in snapshots {
            let part: Vec<(Id, String)> =
                bincode::deserialize(s).map_err(|e| StreamError::Source(e.to_string()))?;
            self.pending.extend(part);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<bool, StreamError> {
        Ok(true)
    }
}

/// (timestamp, key, value).
type Rec = (u64, u8, u64);

/// A replayable log read by worker 0's reader: its position is an offset.
struct LogReader<T = Rec> {
    log: Arc<Vec<T>>,
    worker: usize,
    offset: u64,
    kill: Kill,
}

impl<T: Data + Copy> SourceReader<T> for LogReader<T> {
    fn poll(&mut self, out: &mut ReaderOutput<'_, T>) -> Result<ReaderStatus, StreamError> {
        if self.worker != 0 {
            return Ok(ReaderStatus::Finished);
        }
        for _ in 0..4 {
            let Some(r) = self.log.get(self.offset as usize) else {
                return Ok(ReaderStatus::Finished);
            };
            if !self.kill.emit()? {
                return Ok(ReaderStatus::Idle);
            }
            out.collect(*r);
            self.offset += 1;
        }
        Ok(ReaderStatus::IdleFor(Duration::from_micros(200)))
    }

    fn snapshot(&mut self, _epoch: u64) -> Result<Vec<u8>, StreamError> {
        Ok(self.offset.to_le_bytes().to_vec())
    }

    fn on_epoch_complete(&mut self, _checkpoint: u64) -> Result<(), StreamError> {
        self.kill.checkpoints.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        // Only old worker 0 read.
        if let Some(Ok(b)) = snapshots.first().map(|s| <[u8; 8]>::try_from(s.as_slice())) {
            self.offset = u64::from_le_bytes(b);
        }
        Ok(())
    }
}

/// Bursts of records per key with gaps between (sessions), slightly out of order.
fn log(n: u64) -> Arc<Vec<Rec>> {
    let mut ts = 0;
    let recs = (0..n)
        .map(|i| {
            ts += if i % 37 == 36 { 17 } else { 1 };
            let jitter = (i * 7919) % 3;
            (ts + jitter, ((i / 7) % 4) as u8, i)
        })
        .collect();
    Arc::new(recs)
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct Seen {
    count: ValueState<u64>,
    last: ValueState<u64>,
}

/// Emits a key's count 10 ms (event time) after its last record.
struct Quiet;
impl KeyedProcessFunction<u8, Rec, String> for Quiet {
    type State = Seen;
    fn process_element(&mut self, r: Rec, ctx: &mut ProcessContext<'_, u8, Seen, String>) {
        let n = ctx.state().count.value().copied().unwrap_or(0) + 1;
        ctx.state().count.update(n);
        let last = ctx.state().last.value().copied().unwrap_or(0).max(r.0);
        ctx.state().last.update(last);
        ctx.register_event_time_timer(last + 10);
    }
    fn on_timer(&mut self, ts: u64, ctx: &mut ProcessContext<'_, u8, Seen, String>) {
        if ctx.state().last.value().map(|l| l + 10) == Some(ts) {
            let n = ctx.state().count.value().copied().unwrap_or(0);
            let k = *ctx.key();
            ctx.collect(format!("P {k} {n} @{ts}"));
        }
    }
}

fn contents(tag: &str, k: &u8, w: TimeWindow, rs: &[Rec], out: &mut Vec<String>) {
    let mut values: Vec<u64> = rs.iter().map(|r| r.2).collect();
    values.sort();
    out.push(format!("{tag} {k} {}..{} {values:?}", w.start, w.end));
}

/// Tumbling and session windows and a process function with timers over the log.
fn windowed(env: &JobEnv<'_>, log: &Arc<Vec<Rec>>, kill: &Kill, broker: &Broker) {
    let (log, kill, broker) = (log.clone(), kill.clone(), broker.clone());
    let k2 = kill.clone();
    let input = env.from_reader(
        move |worker, _| LogReader {
            log,
            worker,
            offset: 0,
            kill: k2,
        },
        WatermarkStrategy::for_bounded_out_of_orderness(ms(3))
            .with_timestamp_assigner(|r: &Rec, _| r.0),
        "log",
    );
    let tumbling = input
        .clone()
        .key_by(|r| r.1)
        .window(TumblingWindows::event_time(ms(20)))
        .process(|k: &u8, w: TimeWindow, rs: &[Rec], out: &mut Vec<String>| {
            contents("T", k, w, rs, out)
        });
    let sessions = input
        .clone()
        .key_by(|r| r.1)
        .window(SessionWindows::event_time_gap(ms(5)))
        .process(|k: &u8, w: TimeWindow, rs: &[Rec], out: &mut Vec<String>| {
            contents("S", k, w, rs, out)
        });
    let quiet = input.key_by(|r| r.1).process(Quiet);
    tumbling
        .union(sessions)
        .union(quiet)
        .sink_to(move |w, _| TwoPhase::new(&broker, w, &kill));
}

fn checkpointed(
    storage: &Arc<dyn CheckpointStorage>,
    parallelism: usize,
) -> StreamExecutionEnvironment {
    let mut env = StreamExecutionEnvironment::new()
        .with_parallelism(parallelism)
        .with_epoch_interval(ms(1));
    env.set_max_parallelism(16);
    env.set_checkpointing(CheckpointConfig::with_storage(storage.clone()).with_interval(ms(3)));
    env
}

fn memory() -> Arc<dyn CheckpointStorage> {
    Arc::new(MemoryStorage::new())
}

/// Runs the windowed job over `log` to the end on a fresh storage: the expected output.
fn uninterrupted(log: &Arc<Vec<Rec>>, parallelism: usize) -> Vec<String> {
    let broker = Broker::default();
    let (l, b) = (log.clone(), broker.clone());
    checkpointed(&memory(), parallelism)
        .execute("windowed", move |env| windowed(env, &l, &Kill::none(), &b))
        .expect("uninterrupted run");
    broker.values()
}

/// Runs the windowed job at `parallelism` with `kill` (made from the run's stop handle);
/// returns how it ended.
fn run_windowed(
    storage: &Arc<dyn CheckpointStorage>,
    parallelism: usize,
    log: &Arc<Vec<Rec>>,
    broker: &Broker,
    kill: impl FnOnce(StopHandle) -> Kill,
) -> Result<JobExecutionResult, StreamError> {
    let env = checkpointed(storage, parallelism);
    let kill = kill(env.stop_handle());
    let (l, b) = (log.clone(), broker.clone());
    env.execute("windowed", move |env| windowed(env, &l, &kill, &b))
}

/// Runs the windowed job to the end; returns the checkpoint it was restored from.
fn run_windowed_restored(
    storage: &Arc<dyn CheckpointStorage>,
    parallelism: usize,
    log: &Arc<Vec<Rec>>,
    broker: &Broker,
) -> Option<u64> {
    let env = checkpointed(storage, parallelism);
    let trigger = env.checkpoint_trigger();
    let (l, b) = (log.clone(), broker.clone());
    env.execute("windowed", move |env| windowed(env, &l, &Kill::none(), &b))
        .expect("restored run");
    trigger.stats().restored_from
}

#[test]
fn stopped_with_a_savepoint_and_restored_fires_the_same_windows() {
    let log = log(400);
    let expected = uninterrupted(&log, 2);
    assert!(expected.iter().any(|r| r.starts_with('T')));
    assert!(expected.iter().any(|r| r.starts_with('S')));
    assert!(expected.iter().any(|r| r.starts_with('P')));
    for stop_at in [1, 150, 333] {
        let storage = memory();
        let broker = Broker::default();
        run_windowed(&storage, 2, &log, &broker, |stop| {
            Kill::stop_after(stop_at, stop)
        })
        .expect("a stop is a clean end");
        let partial = broker.values().len();
        assert!(
            partial < expected.len(),
            "stopped at {stop_at}: not drained"
        );
        assert!(run_windowed_restored(&storage, 2, &log, &broker).is_some());
        assert_eq!(broker.values(), expected, "stopped at {stop_at}");
    }
}

#[test]
fn crashed_after_checkpoints_and_restored_fires_the_same_windows() {
    let log = log(400);
    let expected = uninterrupted(&log, 2);
    for (crash_at, checkpoints) in [(0, 0), (120, 1), (120, 3), (399, 2)] {
        let storage = memory();
        let broker = Broker::default();
        let kill = Kill {
            after_checkpoints: checkpoints,
            ..Kill::after(crash_at)
        };
        let err =
            run_windowed(&storage, 2, &log, &broker, |_| kill).expect_err("the run was killed");
        assert!(matches!(err, StreamError::Source(_)), "{err}");
        let restored = run_windowed_restored(&storage, 2, &log, &broker);
        assert_eq!(broker.values(), expected, "crashed at {crash_at}");
        // Crashes after checkpoints: the restored run resumes from one.
        if checkpoints > 0 {
            assert!(restored.is_some(), "crashed at {crash_at}");
        }
    }
}

#[test]
fn rescaling_from_one_to_two_workers_and_back() {
    let log = log(300);
    let expected = uninterrupted(&log, 1);
    assert_eq!(
        uninterrupted(&log, 2),
        expected,
        "parallelism does not matter"
    );
    for (before, after) in [(1, 2), (2, 1)] {
        // Once through a savepoint, once through a crash.
        for stop in [true, false] {
            let storage = memory();
            let broker = Broker::default();
            let first = run_windowed(&storage, before, &log, &broker, |handle| match stop {
                true => Kill::stop_after(170, handle),
                false => Kill::after(170),
            });
            assert_eq!(first.is_ok(), stop);
            run_windowed(&storage, after, &log, &broker, |_| Kill::none()).expect("rescaled");
            assert_eq!(
                broker.values(),
                expected,
                "{before} -> {after}, stop: {stop}"
            );
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs the windowed job as two processes (threads with their own environments) sharing a
/// checkpoint directory; returns each process's result.
fn two_processes(
    dir: &std::path::Path,
    log: &Arc<Vec<Rec>>,
    broker: &Broker,
    kill: Kill,
) -> Vec<Result<JobExecutionResult, StreamError>> {
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|process| {
            let storage: Arc<dyn CheckpointStorage> = Arc::new(FileStorage::new(dir));
            let (l, b, k) = (log.clone(), broker.clone(), kill.clone());
            std::thread::spawn(move || {
                let mut env = checkpointed(&storage, 2);
                env.set_cluster(ClusterConfig::localhost(2, process, port));
                env.execute("windowed", move |env| windowed(env, &l, &k, &b))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("process thread"))
        .collect()
}

#[test]
fn two_processes_crash_and_restore_exactly() {
    let log = log(300);
    let expected = uninterrupted(&log, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::default();
    let crashed = two_processes(dir.path(), &log, &broker, Kill::after(200));
    assert!(crashed.iter().all(Result::is_err), "the failure ends both");
    let done = two_processes(dir.path(), &log, &broker, Kill::none());
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert_eq!(broker.values(), expected);
    // The newest records (3 are kept) and no temporary files are left on disk.
    let fs = FileStorage::new(dir.path());
    let records = fs.list("checkpoints").expect("list");
    assert!(!records.is_empty() && records.len() <= 3, "{records:?}");
    assert!(records.iter().all(|r| r.ends_with(".meta")), "{records:?}");
}

/// In-memory storage on which every `every`-th rename fails (until healed).
fn failing_renames(every: u64) -> (Arc<FaultyStorage>, Arc<dyn CheckpointStorage>) {
    let faulty = Arc::new(FaultyStorage::new(Arc::new(MemoryStorage::new())));
    for n in (every..5000).step_by(every as usize) {
        faulty.fail_nth(StorageOp::Rename, n);
    }
    let storage: Arc<dyn CheckpointStorage> = faulty.clone();
    (faulty, storage)
}

/// The checkpointed environment at parallelism 2, running on through failed checkpoints.
fn running_through_failures(storage: &Arc<dyn CheckpointStorage>) -> StreamExecutionEnvironment {
    let mut env = checkpointed(storage, 2);
    env.set_checkpointing(
        CheckpointConfig::with_storage(storage.clone())
            .with_interval(ms(3))
            .with_max_consecutive_failures(1000),
    );
    env
}

#[test]
fn a_failed_part_write_fails_that_checkpoint_only() {
    let log = log(300);
    let expected = uninterrupted(&log, 2);
    // A checkpoint renames 11 files (10 parts and its record); every 29th rename fails, so
    // some checkpoints lose a part or their record and the others complete.
    let (faulty, storage) = failing_renames(29);
    let broker = Broker::default();
    let env = running_through_failures(&storage);
    let trigger = env.checkpoint_trigger();
    let (l, b) = (log.clone(), broker.clone());
    let first = env.execute("windowed", move |env| {
        // Killed after 250 records, once 8 checkpoints completed: by then at least 88
        // renames were tried, so at least 3 failed.
        let kill = Kill {
            after_checkpoints: 8,
            ..Kill::after(250)
        };
        windowed(env, &l, &kill, &b)
    });
    assert!(first.is_err());
    let stats = trigger.stats();
    // The job ran on through the failures (each failed checkpoint is counted unless a later
    // one completed first: the coordinator only tries the newest epoch it sees complete).
    assert!(faulty.injected() >= 3, "{faulty:?}");
    assert!(stats.completed >= 8, "{stats:?}");
    // Whatever was recorded complete restores whole; the run goes on from the newest.
    faulty.heal();
    run_windowed(&storage, 2, &log, &broker, |_| Kill::none()).expect("restored run");
    assert_eq!(broker.values(), expected);
}

/// A checkpoint that fails (another operator's part is lost) leaves the sink's increment for
/// it on disk; the next checkpoint names it, and a crash between that checkpoint's record
/// and its commit must republish that output too.
#[test]
fn a_crash_in_the_commit_after_failed_checkpoints_republishes_every_increment() {
    let log = log(300);
    let expected = uninterrupted(&log, 2);
    let mut crashes = 0;
    for every in [13, 23] {
        for commit in 2..=6 {
            let (faulty, storage) = failing_renames(every);
            let broker = Broker::default();
            let env = running_through_failures(&storage);
            let (l, b) = (log.clone(), broker.clone());
            let run = env.execute("windowed", move |env| {
                let kill = Kill {
                    in_commit: Some(commit),
                    ..Kill::none()
                };
                windowed(env, &l, &kill, &b)
            });
            // A run that completes fewer checkpoints than `commit` ends normally.
            if run.is_err() {
                crashes += 1;
                faulty.heal();
                run_windowed(&storage, 2, &log, &broker, |_| Kill::none()).expect("restored run");
            }
            assert_eq!(
                broker.values(),
                expected,
                "rename {every}s fail, commit {commit}"
            );
        }
    }
    assert!(crashes >= 5, "only {crashes} runs crashed");
}

#[test]
fn a_full_disk_stops_the_job_after_consecutive_failures_and_restore_uses_the_last_good() {
    let log = log(300);
    let expected = uninterrupted(&log, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = Arc::new(FaultyStorage::new(Arc::new(FileStorage::new(dir.path()))));
    let storage: Arc<dyn CheckpointStorage> = faulty.clone();
    let broker = Broker::default();
    // Room for a few checkpoints, then ENOSPC for good.
    faulty.disk_full_after(30_000);
    let mut env = checkpointed(&storage, 2);
    env.set_checkpointing(
        CheckpointConfig::with_storage(storage.clone())
            .with_interval(ms(3))
            .with_max_consecutive_failures(3),
    );
    let trigger = env.checkpoint_trigger();
    let (l, b) = (log.clone(), broker.clone());
    // The input stalls halfway, so the job runs until the disk is full, however fast it is.
    let stall = Kill {
        after_checkpoints: u64::MAX,
        ..Kill::after(150)
    };
    let err = env
        .execute("windowed", move |env| windowed(env, &l, &stall, &b))
        .expect_err("the disk filled up");
    assert!(
        matches!(
            err,
            StreamError::Checkpoint(CheckpointError::TooManyFailures { failures: 3, .. })
        ),
        "{err}"
    );
    let stats = trigger.stats();
    assert!(stats.consecutive_failures >= 3, "{stats:?}");
    // Space is freed; the next run restores the newest good checkpoint and finishes.
    faulty.heal();
    let env = checkpointed(&storage, 2);
    let trigger = env.checkpoint_trigger();
    let (l, b) = (log.clone(), broker.clone());
    env.execute("windowed", move |env| windowed(env, &l, &Kill::none(), &b))
        .expect("restored run");
    assert_eq!(trigger.stats().restored_from, stats.last.map(|c| c.id));
    assert_eq!(broker.values(), expected);
}

#[test]
fn a_changed_job_graph_is_refused() {
    let storage = memory();
    let log = log(50);
    run_windowed(&storage, 1, &log, &Broker::default(), |_| Kill::none()).expect("first run");
    let env = checkpointed(&storage, 1);
    let err = env
        .execute("windowed", move |env| {
            env.from_sequence(0, 10)
                .key_by(|x| *x)
                .sum(|x| x)
                .collect_into(&CollectSink::new());
        })
        .expect_err("another graph");
    assert!(
        matches!(
            err,
            StreamError::Checkpoint(CheckpointError::Incompatible { .. })
        ),
        "{err}"
    );
}

/// A queue: messages stay until acked; after a crash every unacked one is redelivered.
#[derive(Default)]
struct Queue {
    msgs: BTreeMap<u64, u8>,
    delivered: BTreeSet<u64>,
}

/// A competing consumer that acks only what completed checkpoints hold and drops
/// redeliveries of messages the restored state already reflects.
struct QueueReader {
    queue: Arc<Mutex<Queue>>,
    emitted: Vec<(u64, u64)>,
    /// Messages in the restored state that were not acked before the crash.
    seen: BTreeSet<u64>,
    kill: Kill,
}

impl SourceReader<(u8, u64)> for QueueReader {
    fn poll(&mut self, out: &mut ReaderOutput<'_, (u8, u64)>) -> Result<ReaderStatus, StreamError> {
        let mut q = lock(&self.queue);
        let next: Vec<(u64, u8)> = q
            .msgs
            .iter()
            .filter(|(id, _)| !q.delivered.contains(id))
            .take(3)
            .map(|(id, k)| (*id, *k))
            .collect();
        if next.is_empty() {
            return Ok(ReaderStatus::Finished);
        }
        for (id, key) in next {
            if !self.kill.emit()? {
                return Ok(ReaderStatus::Idle);
            }
            q.delivered.insert(id);
            if self.seen.remove(&id) {
                // Its checkpoint completed but the ack was lost: ack it now.
                q.msgs.remove(&id);
                continue;
            }
            self.emitted.push((out.epoch(), id));
            out.collect((key, 1));
        }
        Ok(ReaderStatus::IdleFor(Duration::from_micros(100)))
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let mut q = lock(&self.queue);
        self.emitted.retain(|(e, id)| {
            if *e <= epoch {
                q.msgs.remove(id);
            }
            *e > epoch
        });
        Ok(())
    }

    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        let ids: Vec<u64> = self
            .seen
            .iter()
            .copied()
            .chain(
                self.emitted
                    .iter()
                    .filter(|(e, _)| *e <= epoch)
                    .map(|(_, id)| *id),
            )
            .collect();
        bincode::serialize(&ids).map_err(|e| StreamError::Serialize(e.to_string()))
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        for s in snapshots.iter().filter(|s| !s.is_empty()) {
            let ids: Vec<u64> =
                bincode::deserialize(s).map_err(|e| StreamError::Source(e.to_string()))?;
            self.seen.extend(ids);
        }
        Ok(())
    }
}

/// Counts messages per key from the queue into the broker (running counts), at
/// `parallelism`, killed as `kill` says.
fn count_from_queue(
    storage: &Arc<dyn CheckpointStorage>,
    parallelism: usize,
    queue: &Arc<Mutex<Queue>>,
    broker: &Broker,
    kill: Kill,
) -> Result<JobExecutionResult, StreamError> {
    // A new connection: everything unacked is delivered again.
    lock(queue).delivered.clear();
    let env = checkpointed(storage, parallelism);
    let (q, b) = (queue.clone(), broker.clone());
    env.execute("counts", move |env| {
        let (q, k, b) = (q.clone(), kill.clone(), b.clone());
        let k2 = k.clone();
        env.from_reader(
            move |_, _| QueueReader {
                queue: q,
                emitted: Vec::new(),
                seen: BTreeSet::new(),
                kill: k2,
            },
            WatermarkStrategy::no_watermarks(),
            "queue",
        )
        .key_by(|t| t.0)
        .sum(|t| &mut t.1)
        .map(|(k, n)| format!("{k}:{n}"))
        .sink_to(move |w, _| TwoPhase::new(&b, w, &k));
    })
}

fn queue_of(n: u64) -> Arc<Mutex<Queue>> {
    Arc::new(Mutex::new(Queue {
        msgs: (0..n).map(|i| (i, (i % 7) as u8)).collect(),
        delivered: BTreeSet::new(),
    }))
}

/// Every key's running counts 1..=n, each once.
fn exact_counts(n: u64) -> Vec<String> {
    let mut per_key: BTreeMap<u8, u64> = BTreeMap::new();
    for i in 0..n {
        *per_key.entry((i % 7) as u8).or_default() += 1;
    }
    let mut v: Vec<String> = per_key
        .iter()
        .flat_map(|(k, n)| (1..=*n).map(move |c| format!("{k}:{c}")))
        .collect();
    v.sort();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any number of kills at random points — in a reader after n records, or in a writer's
    /// commit after the completion record — each with a storage fault somewhere (a write,
    /// fsync, rename or directory fsync fails), at parallelism 1 or 2, then a run to the end:
    /// every message is counted exactly once.
    #[test]
    fn exactly_once_through_random_kills(
        kills in proptest::collection::vec(
            (0u64..250, 0u64..6, 1usize..=2, any::<bool>(), 0usize..4, 1u64..80),
            0..5,
        ),
        last_parallelism in 1usize..=2,
    ) {
        let n = 200;
        let faulty = Arc::new(FaultyStorage::new(memory()));
        let storage: Arc<dyn CheckpointStorage> = faulty.clone();
        let queue = queue_of(n);
        let broker = Broker::default();
        let ops = [StorageOp::Write, StorageOp::Sync, StorageOp::Rename, StorageOp::SyncDir];
        for (records, commit, parallelism, in_commit, op, nth) in kills {
            let kill = match in_commit {
                true => Kill { in_commit: Some(commit + 1), ..Kill::default() },
                false => Kill::after(records),
            };
            faulty.fail_nth(ops[op], faulty.calls(ops[op]) + nth);
            // A kill point past the end lets the run finish: that is fine too.
            let _ = count_from_queue(&storage, parallelism, &queue, &broker, kill);
        }
        faulty.heal();
        count_from_queue(&storage, last_parallelism, &queue, &broker, Kill::none())
            .expect("the last run finishes");
        prop_assert_eq!(broker.values(), exact_counts(n));
        prop_assert!(lock(&queue).msgs.is_empty(), "everything acked");
    }
}

#[test]
fn a_trigger_takes_a_checkpoint_of_a_running_job() {
    let storage = memory();
    let mut env = checkpointed(&storage, 1);
    // Periodic checkpoints far apart: only the trigger takes one while the job runs.
    env.set_checkpointing(
        CheckpointConfig::with_storage(storage.clone()).with_interval(Duration::from_secs(3600)),
    );
    let trigger = env.checkpoint_trigger();
    let t = trigger.clone();
    let stop = env.stop_handle();
    let driver = std::thread::spawn(move || {
        let id = loop {
            match t.trigger() {
                Some(id) => break id,
                None => std::thread::sleep(ms(1)),
            }
        };
        let done = t.wait_for(id, Duration::from_secs(60));
        stop.stop();
        (id, done)
    });
    env.execute("counts", move |env| {
        // Never finishes on its own: only the stop ends it.
        env.from_reader(
            move |_, _| IdleForever,
            WatermarkStrategy::no_watermarks(),
            "idle",
        )
        .collect_into(&CollectSink::new());
    })
    .expect("stopped");
    let (id, done) = driver.join().expect("driver");
    let done = done.expect("the triggered checkpoint completed");
    assert!(done.id >= id && !done.savepoint, "{done:?}");
    let last = trigger.stats().last.expect("savepoint");
    assert!(last.savepoint && last.id > done.id, "{last:?}");
}

struct IdleForever;
impl SourceReader<u64> for IdleForever {
    fn poll(&mut self, _out: &mut ReaderOutput<'_, u64>) -> Result<ReaderStatus, StreamError> {
        Ok(ReaderStatus::Idle)
    }
}

#[test]
fn a_keyed_operator_whose_output_goes_nowhere_is_in_every_checkpoint() {
    let storage = memory();
    let log = log(200);
    let broker = Broker::default();
    for run in 0..3 {
        let env = checkpointed(&storage, 2);
        let trigger = env.checkpoint_trigger();
        let kill = Kill::stop_after(60 * (run + 1), env.stop_handle());
        let (l, b) = (log.clone(), broker.clone());
        env.execute("dangling", move |env| {
            let (l, k) = (l.clone(), kill.clone());
            let k2 = k.clone();
            let input = env.from_reader(
                move |worker, _| LogReader {
                    log: l,
                    worker,
                    offset: 0,
                    kill: k2,
                },
                WatermarkStrategy::no_watermarks(),
                "log",
            );
            // Its state is checkpointed although nothing reads its output.
            let _unused = input.clone().key_by(|r| r.1).sum(|r| &mut r.2);
            let b = b.clone();
            input
                .map(|r| format!("{}", r.2))
                .sink_to(move |w, _| TwoPhase::new(&b, w, &k));
        })
        .expect("the savepoint has every operator's parts");
        let last = trigger.stats().last.expect("a savepoint");
        eprintln!("run {run}: {:?} {}", trigger.stats(), broker.values().len());
        assert!(last.savepoint, "run {run}: {last:?}");
    }
    // Stopped after 60 and 60 + 120 records, then to the end: every record once.
    let mut all: Vec<String> = (0..200u64).map(|i| i.to_string()).collect();
    all.sort();
    assert_eq!(broker.values(), all);
}

#[test]
fn a_fold_at_end_resumes_from_its_partial_results() {
    let log = log(300);
    let total: u64 = log.iter().map(|r| r.2).sum();
    // (parallelism before, after, stopped rather than crashed)
    for (before, after, stop) in [(2, 2, true), (2, 1, false), (1, 2, true)] {
        let storage = memory();
        let broker = Broker::default();
        let run = |parallelism: usize, kill: &dyn Fn(StopHandle) -> Kill| {
            let env = checkpointed(&storage, parallelism);
            let kill = kill(env.stop_handle());
            let (l, b) = (log.clone(), broker.clone());
            env.execute("fold", move |env| {
                let (l, k) = (l.clone(), kill.clone());
                let k2 = k.clone();
                let b = b.clone();
                env.from_reader(
                    move |worker, _| LogReader {
                        log: l,
                        worker,
                        offset: 0,
                        kill: k2,
                    },
                    WatermarkStrategy::no_watermarks(),
                    "log",
                )
                .fold_at_end(0u64, |acc, r| *acc += r.2, |acc, other| *acc += other)
                .map(|sum| sum.to_string())
                .sink_to(move |w, _| TwoPhase::new(&b, w, &k));
            })
        };
        let first = run(before, &|handle| match stop {
            true => Kill::stop_after(140, handle),
            false => Kill {
                after_checkpoints: 2,
                ..Kill::after(140)
            },
        });
        assert_eq!(first.is_ok(), stop);
        assert!(broker.values().is_empty(), "no result before the end");
        run(after, &|_| Kill::none()).expect("restored run");
        assert_eq!(
            broker.values(),
            vec![total.to_string()],
            "{before} -> {after}"
        );
    }
}

/// Record `i` of the many-keys job: 2000 keys once each, then three keys over and over,
/// then the first 500 keys once more (their counts need the state of the first phase).
fn many_keys_record(i: u64) -> (u32, u64) {
    let key = match i {
        0..2000 => i,
        2000..5500 => i % 3,
        _ => i - 5500,
    };
    (key as u32, 1)
}

fn run_many_keys(
    storage: &Arc<dyn CheckpointStorage>,
    parallelism: usize,
    n: u64,
    broker: &Broker,
    kill: Kill,
) -> Result<JobExecutionResult, StreamError> {
    let (b, k) = (broker.clone(), kill);
    checkpointed(storage, parallelism).execute("many-keys", move |env| {
        let (k, b) = (k.clone(), b.clone());
        let k2 = k.clone();
        let log: Arc<Vec<(u32, u64)>> = Arc::new((0..n).map(many_keys_record).collect());
        env.from_reader(
            move |worker, _| LogReader {
                log,
                worker,
                offset: 0,
                kill: k2,
            },
            WatermarkStrategy::no_watermarks(),
            "many",
        )
        .key_by(|t| t.0)
        .sum(|t| &mut t.1)
        .map(|(k, n)| format!("{k}:{n}"))
        .sink_to(move |w, _| TwoPhase::new(&b, w, &k));
    })
}

/// Keyed state with many keys of which few change checkpoints as changes (each part
/// names the earlier parts it applies on, as the writer's increments do), and a crash
/// restores through that chain — at the same parallelism and at another — to exactly the
/// results of an uninterrupted run.
#[test]
fn keyed_state_checkpoints_as_changes_and_restores_through_the_chain() {
    let n = 6000;
    let expected = {
        let broker = Broker::default();
        run_many_keys(&memory(), 1, n, &broker, Kill::none()).expect("uninterrupted");
        broker.values()
    };
    for (before, after) in [(1, 1), (1, 2), (2, 1)] {
        let storage = memory();
        let broker = Broker::default();
        let kill = Kill {
            after_checkpoints: 3,
            ..Kill::after(5000)
        };
        run_many_keys(&storage, before, n, &broker, kill).expect_err("killed");
        // Parts that name earlier ones (deps files) are the keyed operator's changes: this
        // writer's commits are confirmed at once, so its increments never name earlier ones.
        let deps: BTreeSet<String> = storage
            .list("parts")
            .expect("list")
            .into_iter()
            .filter_map(|f| Some(f.strip_suffix(".deps")?.rsplit('-').next()?.to_string()))
            .collect();
        assert_eq!(deps.len(), 1, "{before} -> {after}: deps of {deps:?}");
        run_many_keys(&storage, after, n, &broker, Kill::none()).expect("restored");
        assert_eq!(broker.values(), expected, "{before} -> {after}");
    }
}
