//! Readers and writers on the epoch clock: acks only after every sink confirmed, every record
//! eventually acked, clean stop, failures that stop the job and ack nothing more — at
//! parallelism 1 and 2, and as two processes talking over loopback TCP.
//!
//! Readers are fed through channels by threads of the test; writers confirm late, from a
//! thread of their own, and wake their operator through its `Waker`. Everything they do is
//! written into one ledger that the test then checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rill_stream::*;
use serde::{Deserialize, Serialize};

/// What readers, writers and confirmers did, in one place.
#[derive(Default)]
struct Ledger {
    /// id -> epoch it was emitted in.
    emitted: BTreeMap<u64, u64>,
    /// id -> epoch it was written in.
    written: BTreeMap<u64, u64>,
    confirmed: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    /// Acked ids seen by an `on_epoch_complete` that was not followed by `close` directly.
    acked_mid_stream: usize,
    closed_readers: usize,
    finished_writers: usize,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn book(l: &Shared) -> MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for `cond` with a generous bound, so that a bug shows as a failure, not a hang.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Feeds `ids` to one reader, waking it after every send; stops early if `stop` is set or
/// the reader is gone.
struct Feed {
    tx: SyncSender<u64>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Feed {
    fn send(&self, id: u64, stop: &AtomicBool) -> bool {
        let mut id = Some(id);
        while let Some(v) = id.take() {
            match self.tx.try_send(v) {
                Ok(()) => {}
                Err(TrySendError::Full(v)) => {
                    if stop.load(Ordering::SeqCst) {
                        return false;
                    }
                    id = Some(v);
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            w.wake();
        }
        true
    }
}

/// A reader fed by a channel, recording in which epoch each id went out, and checking at
/// every completion that what it acks was confirmed by a writer.
struct ChannelReader {
    rx: Receiver<u64>,
    waker: Arc<Mutex<Option<Waker>>>,
    ledger: Shared,
    pending: Vec<(u64, u64)>,
    fail_after: Option<usize>,
    emitted: usize,
    last_acked: usize,
}

impl SourceReader<u64> for ChannelReader {
    fn open(&mut self, ctx: &ReaderContext) -> Result<(), StreamError> {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.waker().clone());
        Ok(())
    }

    fn poll(&mut self, out: &mut ReaderOutput<'_, u64>) -> Result<ReaderStatus, StreamError> {
        for _ in 0..64 {
            if self.fail_after.is_some_and(|n| self.emitted >= n) {
                return Err(StreamError::Source("reader broke".into()));
            }
            match self.rx.try_recv() {
                Ok(id) => {
                    book(&self.ledger).emitted.insert(id, out.epoch());
                    self.pending.push((out.epoch(), id));
                    self.emitted += 1;
                    out.collect(id);
                }
                Err(TryRecvError::Empty) => return Ok(ReaderStatus::Idle),
                Err(TryRecvError::Disconnected) => return Ok(ReaderStatus::Finished),
            }
        }
        Ok(ReaderStatus::MoreAvailable)
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let mut l = book(&self.ledger);
        l.acked_mid_stream += self.last_acked;
        let (done, pending): (Vec<_>, Vec<_>) =
            self.pending.drain(..).partition(|(e, _)| *e <= epoch);
        self.pending = pending;
        for (e, id) in &done {
            if !l.confirmed.contains(id) {
                let msg = format!("id {id} of epoch {e} completed at {epoch} unconfirmed");
                l.violations.push(msg);
            }
            l.acked.insert(*id);
        }
        self.last_acked = done.len();
        Ok(())
    }

    fn close(&mut self) -> Result<(), StreamError> {
        let mut l = book(&self.ledger);
        l.closed_readers += 1;
        self.last_acked = 0;
        Ok(())
    }
}

/// A writer whose confirms come late, from a thread that wakes the operator.
struct LateConfirmWriter {
    ledger: Shared,
    by_epoch: BTreeMap<u64, Vec<u64>>,
    to_confirm: Option<mpsc::Sender<(u64, Vec<u64>)>>,
    /// Confirmed up to (epoch + 1); 0: nothing.
    confirmed: Arc<AtomicU64>,
    ended: Option<u64>,
    fail_at: Option<usize>,
    writes: usize,
}

impl LateConfirmWriter {
    fn new(ledger: Shared, fail_at: Option<usize>) -> Self {
        LateConfirmWriter {
            ledger,
            by_epoch: BTreeMap::new(),
            to_confirm: None,
            confirmed: Arc::default(),
            ended: None,
            fail_at,
            writes: 0,
        }
    }
}

impl SinkWriter<u64> for LateConfirmWriter {
    fn open(&mut self, ctx: &WriterContext) -> Result<(), StreamError> {
        let (tx, rx) = mpsc::channel::<(u64, Vec<u64>)>();
        let (ledger, confirmed, waker) = (
            self.ledger.clone(),
            self.confirmed.clone(),
            ctx.waker().clone(),
        );
        std::thread::spawn(move || {
            while let Ok((epoch, ids)) = rx.recv() {
                // Publisher confirms take a while.
                std::thread::sleep(Duration::from_millis(2));
                book(&ledger).confirmed.extend(ids);
                confirmed.store(epoch + 1, Ordering::SeqCst);
                waker.wake();
            }
        });
        self.to_confirm = Some(tx);
        Ok(())
    }

    fn write(&mut self, epoch: u64, id: u64, _ts: u64) -> Result<(), StreamError> {
        self.writes += 1;
        if self.fail_at.is_some_and(|n| self.writes >= n) {
            return Err(StreamError::Io {
                context: "publishing".into(),
                source: std::io::Error::other("broker went away"),
            });
        }
        book(&self.ledger).written.insert(id, epoch);
        self.by_epoch.entry(epoch).or_default().push(id);
        Ok(())
    }

    fn end_epoch(&mut self, epoch: u64) -> Result<(), StreamError> {
        let later = self.by_epoch.split_off(&(epoch + 1));
        let ids: Vec<u64> = std::mem::replace(&mut self.by_epoch, later)
            .into_values()
            .flatten()
            .collect();
        self.ended = Some(epoch);
        if let Some(tx) = &self.to_confirm {
            tx.send((epoch, ids))
                .map_err(|_| StreamError::Worker("confirm thread gone".into()))?;
        }
        Ok(())
    }

    fn confirmed_epoch(&mut self) -> Result<Option<u64>, StreamError> {
        Ok(self.confirmed.load(Ordering::SeqCst).checked_sub(1))
    }

    fn finish(&mut self) -> Result<bool, StreamError> {
        let done = self
            .ended
            .is_none_or(|e| self.confirmed_epoch().ok().flatten() >= Some(e));
        if done {
            // Ends the confirm thread.
            self.to_confirm = None;
            book(&self.ledger).finished_writers += 1;
        }
        Ok(done)
    }
}

/// Passes records through, keyed: makes them cross workers through the operator driver.
struct PassThrough;
#[derive(Clone, Default, Serialize, Deserialize)]
struct Nothing;
impl KeyedProcessFunction<u64, u64, u64> for PassThrough {
    type State = Nothing;
    fn process_element(&mut self, v: u64, ctx: &mut ProcessContext<'_, u64, Nothing, u64>) {
        ctx.collect(v);
        ctx.clear_state();
    }
}

/// How a run is set up.
#[derive(Clone, Default)]
struct Faults {
    writer_fails_at: Option<usize>,
    reader_fails_after: Option<usize>,
}

/// The job: one channel reader per worker, keyed pass-through, late-confirming writers.
/// Returns the feeds, one per worker of `workers` (the global indices run by this env).
fn job(
    env: &StreamExecutionEnvironment,
    workers: std::ops::Range<usize>,
    ledger: &Shared,
    faults: Faults,
) -> (
    Vec<Feed>,
    impl FnOnce() -> Result<JobExecutionResult, StreamError>,
) {
    let mut feeds = Vec::new();
    let mut slots = BTreeMap::new();
    for w in workers {
        let (tx, rx) = mpsc::sync_channel(256);
        let waker = Arc::new(Mutex::new(None));
        feeds.push(Feed {
            tx,
            waker: waker.clone(),
        });
        slots.insert(w, (rx, waker));
    }
    let slots = Arc::new(Mutex::new(slots));
    let (env, l) = (env.clone(), ledger.clone());
    let run = move || {
        env.execute("connectors", move |env| {
            let (l, l2, slots) = (l.clone(), l.clone(), slots.clone());
            let faults = faults.clone();
            env.from_reader(
                move |worker, _| {
                    let Some((rx, waker)) = slots
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&worker)
                    else {
                        panic!("no channel for worker {worker}");
                    };
                    ChannelReader {
                        rx,
                        waker,
                        ledger: l,
                        pending: Vec::new(),
                        fail_after: faults.reader_fails_after.filter(|_| worker == 0),
                        emitted: 0,
                        last_acked: 0,
                    }
                },
                WatermarkStrategy::no_watermarks(),
                "channel",
            )
            .key_by(|id| id % 7)
            .process(PassThrough)
            .sink_to(move |_, _| LateConfirmWriter::new(l2, faults.writer_fails_at));
        })
    };
    (feeds, run)
}

/// Feeds `per_worker` ids to each feed, pausing now and then so that the input spans many
/// epochs; halfway, waits until something was acked mid-stream (so the test cannot pass
/// with acks only at the end).
fn feed_all(feeds: Vec<Feed>, first_id: u64, per_worker: u64, ledger: Shared) {
    let stop = AtomicBool::new(false);
    for i in 0..per_worker {
        if i == per_worker / 2 {
            wait_for("an ack before the input ended", || {
                !book(&ledger).acked.is_empty()
            });
        }
        for (w, f) in feeds.iter().enumerate() {
            f.send(first_id + i * 100 + w as u64, &stop);
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn check_complete(l: &Ledger, expected: usize) {
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert_eq!(l.emitted.len(), expected);
    let emitted: BTreeSet<u64> = l.emitted.keys().copied().collect();
    assert_eq!(l.written.keys().copied().collect::<BTreeSet<_>>(), emitted);
    assert!(l.confirmed.is_superset(&emitted));
    assert_eq!(l.acked, emitted, "every emitted record is eventually acked");
    // Records keep the epoch they were read in all the way to the sink.
    for (id, e) in &l.emitted {
        assert_eq!(l.written.get(id), Some(e), "epoch of {id}");
    }
    let epochs: BTreeSet<u64> = l.emitted.values().copied().collect();
    assert!(epochs.len() > 2, "the input should span epochs: {epochs:?}");
}

fn env(parallelism: usize) -> StreamExecutionEnvironment {
    StreamExecutionEnvironment::new()
        .with_parallelism(parallelism)
        .with_epoch_interval(Duration::from_millis(3))
}

#[test]
fn acks_follow_confirms_at_parallelism_1_and_2() {
    for p in [1usize, 2] {
        let ledger: Shared = Arc::default();
        let (feeds, run) = job(&env(p), 0..p, &ledger, Faults::default());
        let feeder = {
            let l = ledger.clone();
            std::thread::spawn(move || feed_all(feeds, 0, 2_000, l))
        };
        run().expect("job runs");
        feeder.join().expect("feeder");
        let l = book(&ledger);
        check_complete(&l, 2_000 * p);
        assert!(l.acked_mid_stream > 0, "acks only came at the end");
        assert_eq!(l.closed_readers, p);
        assert_eq!(l.finished_writers, p);
    }
}

#[test]
fn stop_drains_and_completes_everything() {
    let ledger: Shared = Arc::default();
    let e = env(2);
    let stop_handle = e.stop_handle();
    let (feeds, run) = job(&e, 0..2, &ledger, Faults::default());
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Unbounded input: runs until the job stops.
            for i in 0.. {
                for (w, f) in feeds.iter().enumerate() {
                    if !f.send(i * 100 + w as u64, &stop) {
                        return;
                    }
                }
            }
        })
    };
    let stopper = {
        let (l, h) = (ledger.clone(), stop_handle.clone());
        std::thread::spawn(move || {
            wait_for("some acks", || book(&l).acked.len() > 500);
            h.stop();
        })
    };
    run().expect("a stopped job ends cleanly");
    stop.store(true, Ordering::SeqCst);
    stopper.join().expect("stopper");
    feeder.join().expect("feeder");
    let l = book(&ledger);
    let n = l.emitted.len();
    check_complete(&l, n);
    assert_eq!(l.closed_readers, 2);
    assert_eq!(l.finished_writers, 2);
    assert!(stop_handle.is_stopped());
}

#[test]
fn a_writer_failure_fails_the_job_and_nothing_is_acked_after_it() {
    let ledger: Shared = Arc::default();
    let faults = Faults {
        writer_fails_at: Some(300),
        ..Faults::default()
    };
    let (feeds, run) = job(&env(2), 0..2, &ledger, faults);
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for i in 0.. {
                for (w, f) in feeds.iter().enumerate() {
                    if !f.send(i * 100 + w as u64, &stop) {
                        return;
                    }
                }
            }
        })
    };
    let err = run().expect_err("the writer failed");
    stop.store(true, Ordering::SeqCst);
    feeder.join().expect("feeder");
    assert!(matches!(err, StreamError::Io { .. }), "{err}");
    let l = book(&ledger);
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    // Whatever was acked had been confirmed (checked at each ack); some records were
    // emitted but never acked: they will be redelivered.
    assert!(l.acked.len() < l.emitted.len());
    assert_eq!(
        l.closed_readers, 2,
        "readers are closed after a failure too"
    );
}

#[test]
fn a_reader_failure_stops_the_other_readers() {
    let ledger: Shared = Arc::default();
    let faults = Faults {
        reader_fails_after: Some(200),
        ..Faults::default()
    };
    let (feeds, run) = job(&env(2), 0..2, &ledger, faults);
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Worker 1's input never ends: only the failure can stop the job.
            for i in 0.. {
                for (w, f) in feeds.iter().enumerate() {
                    if !f.send(i * 100 + w as u64, &stop) && w == 1 {
                        return;
                    }
                }
            }
        })
    };
    let err = run().expect_err("the reader failed");
    stop.store(true, Ordering::SeqCst);
    feeder.join().expect("feeder");
    assert!(matches!(err, StreamError::Source(_)), "{err}");
    let l = book(&ledger);
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert_eq!(l.closed_readers, 2);
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn acks_wait_for_sinks_in_other_processes() {
    // Two processes of one worker each (threads of this test, each with its own timely
    // cluster endpoint over loopback TCP); records cross between them at the key_by.
    let ledger: Shared = Arc::default();
    let hosts = vec![
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let mut runs = Vec::new();
    let mut all_feeds = Vec::new();
    for process in 0..2 {
        let e = env(2).with_cluster(ClusterConfig {
            process,
            hosts: hosts.clone(),
        });
        let (feeds, run) = job(&e, process..process + 1, &ledger, Faults::default());
        all_feeds.extend(feeds);
        runs.push(std::thread::spawn(run));
    }
    let feeder = {
        let l = ledger.clone();
        std::thread::spawn(move || feed_all(all_feeds, 0, 1_500, l))
    };
    for r in runs {
        r.join().expect("process thread").expect("job runs");
    }
    feeder.join().expect("feeder");
    let l = book(&ledger);
    check_complete(&l, 3_000);
    assert!(l.acked_mid_stream > 0, "acks only came at the end");
    assert_eq!(l.closed_readers, 2);
}

/// Fails to store the keyed operator's snapshots: a failure outside readers and writers.
struct BrokenStore;
impl CheckpointPolicy for BrokenStore {
    fn checkpoint_in(&self, completed: std::ops::Range<u64>) -> Option<u64> {
        completed.end.checked_sub(1)
    }
    fn store(&self, snapshot: OperatorSnapshot) -> Result<(), StreamError> {
        if !snapshot.operator.starts_with("Process") {
            return Ok(());
        }
        Err(StreamError::Io {
            context: "writing a checkpoint".into(),
            source: std::io::Error::other("disk full"),
        })
    }
}

#[test]
fn a_failure_in_one_process_ends_the_job_in_every_process() {
    let ledger: Shared = Arc::default();
    let hosts = vec![
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let mut runs = Vec::new();
    let mut all_feeds = Vec::new();
    let mut stop_first = None;
    for process in 0..2 {
        let mut e = env(2).with_cluster(ClusterConfig {
            process,
            hosts: hosts.clone(),
        });
        if process == 1 {
            e.set_checkpoint_policy(Arc::new(BrokenStore));
        } else {
            stop_first = Some(e.stop_handle());
        }
        let (feeds, run) = job(&e, process..process + 1, &ledger, Faults::default());
        all_feeds.extend(feeds);
        runs.push(std::thread::spawn(run));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Never-ending input on both processes: only the failure can end the job.
            for i in 0.. {
                let mut open = false;
                for (w, f) in all_feeds.iter().enumerate() {
                    open |= f.send(i * 100 + w as u64, &stop);
                }
                if !open {
                    return;
                }
            }
        })
    };
    // If the failure did not reach process 0, it would run forever: stop it after a long
    // while, so that a regression fails the assertion below instead of hanging.
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(Duration::from_secs(60)).is_err() {
            if let Some(h) = stop_first {
                h.stop();
            }
        }
    });
    let results: Vec<_> = runs
        .into_iter()
        .map(|r| r.join().expect("process thread"))
        .collect();
    let _ = done.send(());
    watchdog.join().expect("watchdog");
    stop.store(true, Ordering::SeqCst);
    feeder.join().expect("feeder");
    assert!(
        matches!(&results[1], Err(StreamError::Io { .. })),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(&results[0], Err(StreamError::Worker(_))),
        "the other process fails too: {:?}",
        results[0]
    );
    let l = book(&ledger);
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert_eq!(l.closed_readers, 2);
}
