//! Connector sources (Flink's Source V2 `SourceReader`): a [`SourceReader`] runs inside the
//! worker, never blocks, and learns when the records it emitted have gone all the way
//! through the job — which is when a queue consumer acks them.
//!
//! One reader per worker ([`JobEnv::from_reader`]). The worker polls it; it emits what is
//! available now and says when to poll again ([`ReaderStatus`]): at once, when its [`Waker`]
//! fires (from any thread: a consumer's delivery callback), or after a delay. It is also
//! polled at every epoch boundary, since that is when its capability moves to the next epoch
//! (an idle reader must not hold back epoch completion), so `poll` must tolerate finding
//! nothing.
//!
//! Records are emitted in the current epoch ([`ReaderOutput::epoch`]); the reader keeps
//! track of what it emitted in which epoch (delivery tags) and acks them in
//! [`SourceReader::on_epoch_complete`], called by the epoch-completion tracker
//! (`completion`) once every sink on every worker confirmed its output for those
//! epochs. When the job ends (input exhausted, or stopped) it gets a final
//! `on_epoch_complete` and then `close`; after a failure only `close`: nothing may be acked
//! then, and unacked deliveries are redelivered later (at-least-once).
//!
//! With checkpoints in storage ([`crate::checkpoint`]) `on_epoch_complete(c)` comes only for
//! completed checkpoints `c` (the final savepoint included): the reader acks what it emitted
//! in epochs `<= c`, which durable state now reflects. [`SourceReader::snapshot`] is taken
//! at every checkpoint epoch (and when the reader finishes), [`SourceReader::restore`]
//! hands it back after a restart, before `open`.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::order::Product;
use timely::scheduling::SyncActivator;

use crate::checkpoint::{Checkpointing, SnapshotState};
use crate::completion::{failure_notices, EpochListener, Notice};
use crate::env::JobEnv;
use crate::error::{CheckpointError, StreamError};
use crate::stream::{Builder, DataStream};
use crate::types::Data;
use crate::watermark::{WatermarkGen, WatermarkState, WatermarkStrategy};

/// Wakes a reader's or writer's operator from any thread (timely's `SyncActivator`).
///
/// Cheap to clone; `Send + Sync`. Waking a job that has finished does nothing.
#[derive(Clone, Debug)]
pub struct Waker {
    activator: SyncActivator,
}

impl Waker {
    pub(crate) fn new(activator: SyncActivator) -> Self {
        Waker { activator }
    }

    /// Schedules the operator to run (poll the reader, or ask the writer for confirms).
    pub fn wake(&self) {
        // An error means the worker has shut down: there is nobody left to wake.
        let _ = self.activator.activate();
    }
}

/// Where a reader runs.
#[derive(Clone, Debug)]
pub struct ReaderContext {
    worker_index: usize,
    parallelism: usize,
    waker: Waker,
}

impl ReaderContext {
    /// This worker's index in `0..parallelism()`.
    pub fn worker_index(&self) -> usize {
        self.worker_index
    }

    /// The number of workers (and readers) of the job.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// Wakes this reader: call it (from any thread) when records become available.
    pub fn waker(&self) -> &Waker {
        &self.waker
    }
}

/// What a reader wants after a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderStatus {
    /// More is available now: poll again soon (after other operators had their turn).
    MoreAvailable,
    /// Nothing now: poll when the [`Waker`] fires (or at the next epoch boundary).
    Idle,
    /// Nothing now: poll after this long (or earlier if woken).
    IdleFor(Duration),
    /// The input is exhausted: the reader is not polled again.
    Finished,
}

/// A source that runs inside the worker and never blocks; queue consumers live here.
///
/// ```
/// use rill_stream::*;
/// use std::collections::VecDeque;
///
/// /// Emits its numbers and remembers in which epoch each went out, to ack them.
/// struct Numbers { todo: VecDeque<u64>, emitted: Vec<(u64, u64)>, acked: Vec<u64> }
/// impl SourceReader<u64> for Numbers {
///     fn poll(&mut self, out: &mut ReaderOutput<'_, u64>) -> Result<ReaderStatus, StreamError> {
///         for _ in 0..100 {
///             let Some(n) = self.todo.pop_front() else { return Ok(ReaderStatus::Finished) };
///             self.emitted.push((out.epoch(), n));
///             out.collect(n);
///         }
///         Ok(ReaderStatus::MoreAvailable)
///     }
///     fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
///         let (done, pending): (Vec<(u64, u64)>, Vec<(u64, u64)>) =
///             self.emitted.drain(..).partition(|(e, _)| *e <= epoch);
///         self.emitted = pending;
///         self.acked.extend(done.into_iter().map(|(_, n)| n));
///         Ok(())
///     }
///     fn close(&mut self) -> Result<(), StreamError> {
///         assert!(self.emitted.is_empty(), "everything was acked before close");
///         Ok(())
///     }
/// }
///
/// let out = CollectSink::new();
/// let sink = out.clone();
/// StreamExecutionEnvironment::new().with_parallelism(2).execute("reader", move |env| {
///     env.from_reader(
///         |worker, workers| Numbers {
///             todo: (0..1000).filter(|n| n % workers as u64 == worker as u64).collect(),
///             emitted: Vec::new(),
///             acked: Vec::new(),
///         },
///         WatermarkStrategy::no_watermarks(),
///         "numbers",
///     )
///     .collect_into(&sink);
/// }).unwrap();
/// assert_eq!(out.take().len(), 1000);
/// ```
pub trait SourceReader<T>: 'static {
    /// Called once on the worker before the first poll.
    fn open(&mut self, ctx: &ReaderContext) -> Result<(), StreamError> {
        let _ = ctx;
        Ok(())
    }

    /// Emits what is available now through `out`, without blocking. Emit a bounded amount
    /// per call (a few thousand records) and return [`ReaderStatus::MoreAvailable`] if more
    /// is ready, so that downstream operators run in between.
    fn poll(&mut self, out: &mut ReaderOutput<'_, T>) -> Result<ReaderStatus, StreamError>;

    /// Every record emitted in epochs `<= epoch` has gone all the way through the job: all
    /// sinks on all workers and processes confirmed their output for those epochs. A queue
    /// source acks those deliveries here. Epochs only grow between calls.
    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let _ = epoch;
        Ok(())
    }

    /// The reader's position after emitting everything of epochs `<= epoch`, for a
    /// checkpoint (called only when `epoch` is a checkpoint; with the job's checkpoints in
    /// storage also when the reader finished, with its last epoch).
    ///
    /// With checkpoints, `on_epoch_complete(c)` is called only for completed checkpoints
    /// `c` (see [`crate::checkpoint`]): ack then what was emitted in epochs `<= c`.
    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        let _ = epoch;
        Ok(Vec::new())
    }

    /// Resumes from a checkpoint, before `open`: `snapshots[i]` is what old reader `i`'s
    /// [`Self::snapshot`] returned (empty if it had nothing), for every reader of the job
    /// that took it. At the same parallelism a reader's own is `snapshots[worker_index]`; at
    /// another one each reader picks what it now owns (a stream reader: the positions of its
    /// partitions, whichever old reader had them). The default ignores them: right for
    /// readers whose broker keeps the position (a queue with acks).
    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        let _ = snapshots;
        Ok(())
    }

    /// Called once when the job ends, after the final `on_epoch_complete`.
    fn close(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
}

/// Where a reader emits records and watermarks during one poll.
///
/// The watermark is re-evaluated after every record, as for every other source: which
/// records are late depends only on the order they were emitted in.
pub struct ReaderOutput<'a, T> {
    batch: &'a mut Vec<(u64, T)>,
    // Where the frontier rose: records before index `i` go out under the frontier before it.
    rises: &'a mut Vec<(usize, u64)>,
    gen: &'a mut WatermarkGen<T>,
    frontier: u64,
    epoch: u64,
}

impl<T> ReaderOutput<'_, T> {
    /// Emits a record; its timestamp comes from the watermark strategy's assigner (or is 0).
    #[inline]
    pub fn collect(&mut self, item: T) {
        self.push(item, 0);
    }

    /// Emits a record with an event timestamp (ms).
    #[inline]
    pub fn collect_with_timestamp(&mut self, item: T, timestamp: u64) {
        self.push(item, timestamp);
    }

    /// Declares that no more records with timestamps `<= watermark` will follow.
    pub fn emit_watermark(&mut self, watermark: u64) {
        self.gen.explicit_watermark(watermark);
        self.rise();
    }

    /// The epoch the records of this poll belong to (what `on_epoch_complete` refers to).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    #[inline]
    fn push(&mut self, item: T, attached: u64) {
        let ts = self.gen.stamp(&item, attached);
        self.batch.push((ts, item));
        self.rise();
    }

    #[inline]
    fn rise(&mut self) {
        let f = self.gen.frontier();
        if f > self.frontier {
            self.rises.push((self.batch.len(), f));
            self.frontier = f;
        }
    }
}

/// A reader as shared by its source operator and the epoch-completion tracker (both on the
/// worker thread, never running at the same time).
struct ReaderCell<T, R> {
    reader: R,
    /// The epoch of the reader's capability: every record it emitted is in an epoch `<=`.
    last_epoch: u64,
    completed: Option<u64>,
    closed: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T: 'static, R: SourceReader<T>> EpochListener for ReaderCell<T, R> {
    fn epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        if self.closed {
            return Ok(());
        }
        self.completed = Some(epoch);
        self.reader.on_epoch_complete(epoch)
    }

    fn job_end(&mut self, completed: bool, final_ack: bool) -> Result<(), StreamError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let last = self.last_epoch;
        let acked = if completed && final_ack && self.completed.is_none_or(|c| c < last) {
            self.completed = Some(last);
            self.reader.on_epoch_complete(last)
        } else {
            Ok(())
        };
        let closed = self.reader.close();
        acked.and(closed)
    }
}

impl<'s> JobEnv<'s> {
    /// A parallel source of [`SourceReader`]s: `make(worker_index, parallelism)` builds each
    /// worker's reader. See [`SourceReader`] for an example.
    pub fn from_reader<T: Data, R: SourceReader<T>>(
        &self,
        make: impl FnOnce(usize, usize) -> R,
        strategy: WatermarkStrategy<T>,
        name: &str,
    ) -> DataStream<'s, T> {
        let (index, peers) = (self.worker_index(), self.parallelism());
        let cell = Rc::new(RefCell::new(ReaderCell {
            reader: make(index, peers),
            last_epoch: 0,
            completed: None,
            closed: false,
            _t: PhantomData,
        }));
        self.registry.add_listener(cell.clone());

        let scope = self.scope;
        let mut builder = OperatorBuilder::new(name.to_owned(), scope);
        let info = builder.operator_info();
        let (data_out, data_stream) = builder.new_output::<Vec<(u64, T)>>();
        let (notice_out, notice_stream) = builder.new_output::<Vec<Notice>>();
        let mut data_out = OutputBuilder::<_, Builder<T>>::from(data_out);
        let mut notice_out =
            OutputBuilder::<_, CapacityContainerBuilder<Vec<Notice>>>::from(notice_out);
        let activator = scope.activator_for(info.address.clone());
        let sync = scope.worker().sync_activator_for(info.address.to_vec());
        let (clock, control, reporter) = (self.clock(), self.control().clone(), self.reporter());
        control.stop.register(sync.clone());
        let checkpoint = self.checkpointing(name, &info.address);
        let ctx = ReaderContext {
            worker_index: index,
            parallelism: peers,
            waker: Waker::new(sync),
        };

        builder.build(move |caps| {
            let mut caps = caps.into_iter();
            // Data at (epoch, frontier); notices at (epoch, 0). Held and dropped together.
            let mut cap = caps.next().zip(caps.next());
            let mut gen = WatermarkGen::new(strategy);
            let mut open_error = {
                let mut cell = cell.borrow_mut();
                restore_reader(
                    checkpoint.as_ref(),
                    &mut cell.reader,
                    &mut gen,
                    index,
                    peers,
                )
                .and_then(|()| cell.reader.open(&ctx))
                .err()
            };
            let (mut batch, mut rises) = (Vec::new(), Vec::new());
            let mut next_wake: Option<Instant> = None;
            move |_frontiers| {
                let Some((c, nc)) = cap.as_mut() else {
                    return;
                };
                let now = Instant::now();
                let epoch = clock.epoch_at(now);
                // Something else in this process failed: finish, and tell the other
                // processes (every process has readers, so each failure reaches them all).
                let failed_here = control.should_stop() && reporter.failed();
                let status = (|| -> Result<ReaderStatus, StreamError> {
                    if let Some(e) = open_error.take() {
                        return Err(e);
                    }
                    if control.should_stop() {
                        return Ok(ReaderStatus::Finished);
                    }
                    let mut cell = cell.borrow_mut();
                    if epoch > c.outer {
                        // Epochs up to `epoch - 1` are closed here: everything of them is out.
                        if let Some(cp) = &checkpoint {
                            if let Some(due) = cp.due(c.outer..epoch) {
                                let position = cell.reader.snapshot(due.to)?;
                                let watermark = gen.state();
                                let _durable = cp.store(
                                    due,
                                    SnapshotState::Source {
                                        position,
                                        watermark,
                                    },
                                )?;
                            }
                        }
                        c.downgrade(&Product::new(epoch, c.inner));
                        nc.downgrade(&Product::new(epoch, 0));
                        cell.last_epoch = epoch;
                    }
                    let mut out = ReaderOutput {
                        batch: &mut batch,
                        rises: &mut rises,
                        gen: &mut gen,
                        frontier: c.inner,
                        epoch: c.outer,
                    };
                    cell.reader.poll(&mut out)
                })();
                if status.is_ok() && !batch.is_empty() {
                    let mut out = data_out.activate();
                    if rises.is_empty() {
                        out.session(&*c).give_container(&mut batch);
                    } else {
                        let mut items = batch.drain(..);
                        let mut sent = 0;
                        for (upto, f) in rises.drain(..) {
                            let mut part: Vec<_> = items.by_ref().take(upto - sent).collect();
                            sent = upto;
                            out.session(&*c).give_container(&mut part);
                            c.downgrade(&Product::new(c.outer, f));
                        }
                        let mut rest: Vec<_> = items.collect();
                        out.session(&*c).give_container(&mut rest);
                    }
                } else if let Some(&(_, f)) = rises.last() {
                    // A watermark without records.
                    c.downgrade(&Product::new(c.outer, f));
                }
                batch.clear();
                rises.clear();
                let mut schedule = |delay: Duration| {
                    let at = now + delay;
                    if next_wake.is_none_or(|w| at < w || w <= now) {
                        activator.activate_after(delay);
                        next_wake = Some(at);
                    }
                };
                match status {
                    Ok(ReaderStatus::MoreAvailable) => activator.activate(),
                    Ok(ReaderStatus::Idle) => schedule(clock.until_after(epoch, now)),
                    Ok(ReaderStatus::IdleFor(d)) => schedule(d.min(clock.until_after(epoch, now))),
                    Ok(ReaderStatus::Finished) => {
                        if let Some(cp) = checkpoint.as_ref().filter(|_| !reporter.failed()) {
                            // It stands for this reader in every later checkpoint.
                            match cell.borrow_mut().reader.snapshot(c.outer) {
                                Ok(position) => cp.store_final(
                                    c.outer,
                                    SnapshotState::Source {
                                        position,
                                        watermark: gen.state(),
                                    },
                                ),
                                Err(e) => reporter.report(e),
                            }
                        }
                        if failed_here {
                            let mut notices = failure_notices(index, peers);
                            notice_out
                                .activate()
                                .session(&*nc)
                                .give_container(&mut notices);
                        }
                        cap = None;
                    }
                    Err(e) => {
                        reporter.report(e);
                        let mut notices = failure_notices(index, peers);
                        notice_out
                            .activate()
                            .session(&*nc)
                            .give_container(&mut notices);
                        cap = None;
                    }
                }
            }
        });
        self.registry.add_progress(notice_stream);
        DataStream::new(data_stream, self.clone())
    }
}

/// Hands a reader its old snapshots and its watermark generator its old state.
pub(crate) fn restore_reader<T, R: SourceReader<T>>(
    checkpoint: Option<&Checkpointing>,
    reader: &mut R,
    gen: &mut WatermarkGen<T>,
    index: usize,
    peers: usize,
) -> Result<(), StreamError> {
    let Some((positions, marks)) = restored_sources(checkpoint)? else {
        return Ok(());
    };
    gen.restore(resumed_watermark(checkpoint, &marks, index, peers));
    reader.restore(&positions)
}

/// A source's parts in the checkpoint the job was restored from: positions and watermark
/// states by old worker.
#[allow(clippy::type_complexity)]
pub(crate) fn restored_sources(
    checkpoint: Option<&Checkpointing>,
) -> Result<Option<(Vec<Vec<u8>>, Vec<Option<WatermarkState>>)>, StreamError> {
    let Some((id, parts)) = checkpoint.and_then(Checkpointing::restored) else {
        return Ok(None);
    };
    let mut positions = Vec::with_capacity(parts.len());
    let mut marks = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Some(SnapshotState::Source {
                position,
                watermark,
            }) => {
                positions.push(position.clone());
                marks.push(Some(*watermark));
            }
            None => {
                positions.push(Vec::new());
                marks.push(None);
            }
            Some(_) => {
                return Err(CheckpointError::Incompatible {
                    id,
                    detail: format!(
                        "{} holds no source state",
                        checkpoint.map_or("", |c| c.operator())
                    ),
                }
                .into())
            }
        }
    }
    Ok(Some((positions, marks)))
}

/// Where a source's watermark resumes: its own old state at the same parallelism, else the
/// lowest of all (nothing becomes late that was not).
pub(crate) fn resumed_watermark(
    checkpoint: Option<&Checkpointing>,
    marks: &[Option<WatermarkState>],
    index: usize,
    peers: usize,
) -> WatermarkState {
    let same = checkpoint.and_then(Checkpointing::restored_parallelism) == Some(peers);
    match (same, marks.get(index)) {
        (true, Some(Some(own))) => *own,
        _ => WatermarkState::lowest(marks.iter().flatten().copied()),
    }
}
