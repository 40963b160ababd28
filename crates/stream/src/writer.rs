//! Connector sinks (Flink's Sink V2 `SinkWriter`): a [`SinkWriter`] may confirm its output
//! asynchronously (publisher confirms), and the job's epochs complete only once it has.
//!
//! One writer per worker ([`DataStream::sink_to`]). It gets every record with its epoch,
//! `end_epoch(e)` when its input frontier passes epoch `e`, and is asked for its highest
//! confirmed epoch whenever its operator runs — which its [`Waker`] triggers from the thread
//! that receives confirms. The operator holds a capability on its progress output at the
//! lowest epoch it wrote to that is not yet confirmed, so the epoch-completion tracker
//! (`completion`) cannot complete that epoch before the writer confirmed it. Epochs
//! the writer wrote nothing to need no confirm.
//!
//! When the input ends, `finish` is polled (each time the writer wakes the operator) until
//! everything written is confirmed; only then does the job end. A writer error fails the
//! job: no epoch completes afterwards, anywhere.
//!
//! With checkpoints in storage ([`crate::checkpoint`]) the writer is the participant of a
//! two-phase commit instead: its epochs count as done once its pending output is in the
//! checkpoint ([`SinkWriter::snapshot`], taken synchronously at each checkpoint epoch), not
//! when confirmed; `on_epoch_complete(c)` commits (publishes) the output of epochs `<= c`
//! once checkpoint `c` is durable; `confirmed_epoch` is not asked; after the input ended its
//! pending output goes into the final savepoint, and `finish` is polled once that savepoint
//! was committed and the dataflow ended, until what was published is confirmed.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::rc::Rc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::order::Product;

use crate::checkpoint::{Checkpointing, Due, SnapshotState};
use crate::completion::{failure_notices, EpochListener, Finisher, Notice};
use crate::epoch::meet;
use crate::error::{CheckpointError, StreamError};
use crate::reader::Waker;
use crate::stream::DataStream;
use crate::types::Data;

/// Where a writer runs.
#[derive(Clone, Debug)]
pub struct WriterContext {
    worker_index: usize,
    parallelism: usize,
    waker: Waker,
}

impl WriterContext {
    /// This worker's index in `0..parallelism()`.
    pub fn worker_index(&self) -> usize {
        self.worker_index
    }

    /// The number of workers (and writers) of the job.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// Wakes this writer's operator: call it (from any thread) when confirms arrive.
    pub fn waker(&self) -> &Waker {
        &self.waker
    }
}

/// A sink that may confirm its output asynchronously (publisher confirms).
///
/// ```
/// use rill_stream::*;
/// use std::sync::{Arc, Mutex};
///
/// /// Appends to a shared log; everything is durable once `end_epoch` returns.
/// struct Log { out: Arc<Mutex<Vec<u64>>>, confirmed: Option<u64> }
/// impl SinkWriter<u64> for Log {
///     fn write(&mut self, _epoch: u64, value: u64, _ts: u64) -> Result<(), StreamError> {
///         self.out.lock().map_err(|_| StreamError::Worker("poisoned".into()))?.push(value);
///         Ok(())
///     }
///     fn end_epoch(&mut self, epoch: u64) -> Result<(), StreamError> {
///         self.confirmed = Some(epoch);
///         Ok(())
///     }
///     fn confirmed_epoch(&mut self) -> Result<Option<u64>, StreamError> {
///         Ok(self.confirmed)
///     }
///     fn finish(&mut self) -> Result<bool, StreamError> {
///         Ok(true)
///     }
/// }
///
/// let log = Arc::new(Mutex::new(Vec::new()));
/// let shared = log.clone();
/// StreamExecutionEnvironment::new().with_parallelism(2).execute("writer", move |env| {
///     let out = shared.clone();
///     env.from_sequence(1, 100).sink_to(move |_, _| Log { out, confirmed: None });
/// }).unwrap();
/// assert_eq!(log.lock().unwrap().iter().sum::<u64>(), 5050);
/// ```
pub trait SinkWriter<T>: 'static {
    /// Called once on the worker before the first record.
    fn open(&mut self, ctx: &WriterContext) -> Result<(), StreamError> {
        let _ = ctx;
        Ok(())
    }

    /// Writes one record of `epoch` with its event timestamp. Records of a later epoch may
    /// come before an earlier epoch ended (they come from other workers).
    fn write(&mut self, epoch: u64, value: T, timestamp: u64) -> Result<(), StreamError>;

    /// All records of epochs `<= epoch` have been written; called once per epoch boundary
    /// seen (possibly skipping epochs).
    fn end_epoch(&mut self, epoch: u64) -> Result<(), StreamError> {
        let _ = epoch;
        Ok(())
    }

    /// The highest epoch whose output is confirmed durable (`None`: nothing yet). Polled
    /// whenever the operator runs (wake it when confirms arrive). Confirm only epochs that
    /// ended.
    fn confirmed_epoch(&mut self) -> Result<Option<u64>, StreamError>;

    /// Output of epochs `<= epoch` not yet committed, for a checkpoint (called when `epoch`
    /// is a checkpoint; with the job's checkpoints in storage also when the input ended,
    /// with `u64::MAX`: all of it). The output stays pending: it is committed in
    /// `on_epoch_complete`.
    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        let _ = epoch;
        Ok(Vec::new())
    }

    /// With the job's checkpoints in storage, a writer may snapshot incrementally: only the
    /// output of epochs `<= epoch` it did not put into an earlier increment of this run,
    /// naming the earlier increments whose output it still needs (all of it is restored
    /// together). `None` (the default) takes a full [`SinkWriter::snapshot`] instead. A
    /// writer whose output is mostly waiting for confirms then writes each message into
    /// checkpoints once, not once per checkpoint until it is confirmed.
    fn snapshot_increment(&mut self, epoch: u64) -> Result<Option<Increment>, StreamError> {
        let _ = epoch;
        Ok(None)
    }

    /// The last increment did not reach storage: the next must not build on it (take a
    /// full one).
    fn increment_lost(&mut self) {}

    /// Without checkpoints: every sink and reader of the job is done with epochs
    /// `<= epoch`. With checkpoints in storage this is the two-phase commit: checkpoint
    /// `epoch` is complete, so publish the pending output of epochs `<= epoch` (see
    /// [`crate::checkpoint`]).
    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let _ = epoch;
        Ok(())
    }

    /// With the job's checkpoints in storage, called whenever the operator runs (wake it
    /// when confirms arrive): a two-phase writer publishes committed output a little at a
    /// time and takes its confirms here. `confirmed_epoch` is not asked then.
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    /// Resumes from a checkpoint, before `open`: the snapshots of the old writers this
    /// writer takes over (old writer `i` goes to writer `i % parallelism`, so each is
    /// handed to exactly one). That output belongs to a completed checkpoint: the writer
    /// gets `on_epoch_complete` for it right after `open` and republishes it then, under
    /// the ids it had. The default ignores them (for writers that snapshot nothing).
    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        let _ = snapshots;
        Ok(())
    }

    /// The input ended: return `Ok(true)` once everything written is confirmed; polled again
    /// (when woken) while `Ok(false)`.
    fn finish(&mut self) -> Result<bool, StreamError>;
}

/// A writer's incremental snapshot ([`SinkWriter::snapshot_increment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    /// The output since the writer's previous increment.
    pub bytes: Vec<u8>,
    /// The epochs of earlier increments (of this run) whose output is still needed, oldest
    /// first.
    pub earlier: Vec<u64>,
}

/// A writer as shared by its sink operator and the epoch-completion tracker.
struct WriterCell<T, W> {
    writer: W,
    /// The highest epoch passed to `end_epoch`.
    ended: Option<u64>,
    completed: Option<u64>,
    _t: PhantomData<fn(T)>,
}

impl<T: 'static, W: SinkWriter<T>> EpochListener for WriterCell<T, W> {
    fn epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        self.completed = Some(epoch);
        self.writer.on_epoch_complete(epoch)
    }

    fn job_end(&mut self, completed: bool, final_ack: bool) -> Result<(), StreamError> {
        match self.ended {
            Some(e) if completed && final_ack && self.completed.is_none_or(|c| c < e) => {
                self.completed = Some(e);
                self.writer.on_epoch_complete(e)
            }
            _ => Ok(()),
        }
    }
}

impl<T: 'static, W: SinkWriter<T>> Finisher for WriterCell<T, W> {
    fn finish_committed(&mut self) -> Result<bool, StreamError> {
        self.writer.finish()
    }
}

/// Hands a writer the old writers' snapshots it takes over; returns the checkpoint's id (to
/// commit them once the writer is open).
fn restore_writer<T, W: SinkWriter<T>>(
    checkpoint: Option<&Checkpointing>,
    writer: &mut W,
    index: usize,
    peers: usize,
) -> Result<Option<u64>, StreamError> {
    let Some((id, parts)) = checkpoint.and_then(Checkpointing::restored) else {
        return Ok(None);
    };
    let mut share = Vec::new();
    for (old, part) in parts.iter().enumerate() {
        if old % peers != index {
            continue;
        }
        match part {
            Some(SnapshotState::Worker(bytes)) => share.push(bytes.clone()),
            Some(SnapshotState::WorkerIncrement { bytes, .. }) => {
                let earlier = checkpoint.map_or(&[][..], |c| c.restored_earlier(old));
                for e in earlier {
                    let SnapshotState::WorkerIncrement { bytes, .. } = e else {
                        return Err(CheckpointError::Incompatible {
                            id,
                            detail: "a writer's earlier part is not an increment".into(),
                        }
                        .into());
                    };
                    share.push(bytes.clone());
                }
                share.push(bytes.clone());
            }
            None => {}
            Some(_) => {
                return Err(CheckpointError::Incompatible {
                    id,
                    detail: format!(
                        "{} holds no writer state",
                        checkpoint.map_or("", |c| c.operator())
                    ),
                }
                .into())
            }
        }
    }
    writer.restore(&share)?;
    Ok(Some(id))
}

impl<'s, T: Data> DataStream<'s, T> {
    /// Writes every record with a [`SinkWriter`]; `make(worker_index, parallelism)` builds
    /// each worker's writer. Epochs complete (readers ack) only once it confirmed them.
    pub fn sink_to<W: SinkWriter<T>>(self, make: impl FnOnce(usize, usize) -> W) {
        let env = self.env.clone();
        let (index, peers) = (env.worker_index(), env.parallelism());
        let cell = Rc::new(RefCell::new(WriterCell {
            writer: make(index, peers),
            ended: None,
            completed: None,
            _t: PhantomData,
        }));
        env.registry.add_listener(cell.clone());

        let scope = env.scope;
        let mut builder = OperatorBuilder::new("SinkTo".to_owned(), scope);
        let info = builder.operator_info();
        let mut input = builder.new_input(self.inner, Pipeline);
        let (notice_out, progress) = builder.new_output::<Vec<Notice>>();
        let mut notice_out =
            OutputBuilder::<_, CapacityContainerBuilder<Vec<Notice>>>::from(notice_out);
        let ctx = WriterContext {
            worker_index: index,
            parallelism: peers,
            waker: Waker::new(scope.worker().sync_activator_for(info.address.to_vec())),
        };
        let checkpoint = env.checkpointing("SinkTo", &info.address);
        // With checkpoints in storage the output is in the checkpoint: epochs do not wait
        // for confirms, and the commit happens when a checkpoint completes.
        let stored = checkpoint.as_ref().is_some_and(Checkpointing::is_stored);
        if stored {
            env.shared.finishers.borrow_mut().push(cell.clone());
        }
        let reporter = env.reporter();

        builder.build(move |caps| {
            // On the progress output, at the lowest epoch written to and not yet confirmed
            // (with checkpoints: whose part is not yet written).
            let mut cap = caps.into_iter().next();
            let mut open_error = {
                let mut cell = cell.borrow_mut();
                (|| -> Result<(), StreamError> {
                    let restored =
                        restore_writer(checkpoint.as_ref(), &mut cell.writer, index, peers)?;
                    cell.writer.open(&ctx)?;
                    if let Some(id) = restored {
                        // The restored output belongs to a completed checkpoint.
                        cell.completed = Some(id);
                        cell.writer.on_epoch_complete(id)?;
                    }
                    Ok(())
                })()
                .err()
            };
            let mut unconfirmed: BTreeSet<u64> = BTreeSet::new();
            let mut max_written: Option<u64> = None;
            let mut finishing = false;
            move |frontiers| {
                let Some(c) = cap.as_mut() else {
                    input.for_each(|_, data| data.clear());
                    return;
                };
                let result = (|| -> Result<Option<u64>, StreamError> {
                    if let Some(e) = open_error.take() {
                        return Err(e);
                    }
                    let mut cell = cell.borrow_mut();
                    let mut failed = None;
                    input.for_each(|incap, data| {
                        if failed.is_some() {
                            data.clear();
                            return;
                        }
                        let epoch = incap.stamp().iter().map(|t| t.outer).min().unwrap_or(0);
                        if !stored {
                            unconfirmed.insert(epoch);
                        }
                        max_written = max_written.max(Some(epoch));
                        for (ts, v) in data.drain(..) {
                            if let Err(e) = cell.writer.write(epoch, v, ts) {
                                failed = Some(e);
                                break;
                            }
                        }
                        data.clear();
                    });
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    let bound = meet(frontiers[0].frontier());
                    let ended_now = match bound {
                        Some(b) => b.outer.checked_sub(1),
                        // The input ended: the last epoch written to is the last to end.
                        None => max_written,
                    };
                    let before = cell.ended;
                    if let Some(e) = ended_now.filter(|e| cell.ended.is_none_or(|x| x < *e)) {
                        let first = cell.ended.map_or(0, |x| x + 1);
                        cell.writer.end_epoch(e)?;
                        cell.ended = Some(e);
                        // At the end, the final part below holds everything.
                        if let Some(cp) = checkpoint.as_ref().filter(|_| bound.is_some()) {
                            for at in cp.due_each(first..e + 1) {
                                let increment = match stored {
                                    true => cell.writer.snapshot_increment(at)?,
                                    false => None,
                                };
                                let state = match increment {
                                    Some(Increment { bytes, earlier }) => {
                                        SnapshotState::WorkerIncrement { bytes, earlier }
                                    }
                                    None => SnapshotState::Worker(cell.writer.snapshot(at)?),
                                };
                                let due = Due { from: at, to: at };
                                if !cp.store(due, state)? {
                                    cell.writer.increment_lost();
                                }
                            }
                        }
                    }
                    if let (true, Some(cp)) = (stored, &checkpoint) {
                        cell.writer.flush()?;
                        let Some(b) = bound else {
                            // Everything pending goes into the savepoint, committed when it
                            // completes; `finish` is awaited after that.
                            let from = before.map_or(0, |x| x + 1).max(max_written.unwrap_or(0));
                            let pending = cell.writer.snapshot(u64::MAX)?;
                            cp.store_final(from, SnapshotState::Worker(pending));
                            return Ok(None);
                        };
                        return Ok(Some(b.outer));
                    }
                    if let Some(confirmed) = cell.writer.confirmed_epoch()? {
                        unconfirmed = unconfirmed.split_off(&(confirmed.saturating_add(1)));
                    }
                    if bound.is_none() {
                        finishing = true;
                    }
                    if finishing && cell.writer.finish()? {
                        return Ok(None);
                    }
                    let lowest = unconfirmed.first().copied();
                    Ok(Some(match (lowest, bound) {
                        (Some(l), Some(b)) => l.min(b.outer),
                        (Some(l), None) => l,
                        (None, Some(b)) => b.outer,
                        // Finishing with everything confirmed, but the writer not done yet.
                        (None, None) => c.outer,
                    }))
                })();
                match result {
                    Ok(Some(epoch)) => {
                        let _ = c.try_downgrade(&Product::new(epoch.max(c.outer), 0));
                    }
                    Ok(None) => cap = None,
                    Err(e) => {
                        reporter.report(e);
                        let mut notices = failure_notices(index, peers);
                        notice_out
                            .activate()
                            .session(&*c)
                            .give_container(&mut notices);
                        cap = None;
                    }
                }
            }
        });
        env.registry.add_progress(progress);
    }
}
