//! Epoch completion: telling readers (and writers) when every record of an epoch has gone
//! all the way through the job, on every worker of every process.
//!
//! Every sink has a dataless *progress* output. Its frontier follows the sink's input
//! frontier; a [`crate::SinkWriter`] sink also holds a capability on it at its lowest epoch
//! whose output is not yet confirmed. After the job closure returns, each worker builds one
//! tracker operator whose input is all progress outputs (and the readers' notice outputs)
//! concatenated through an `Exchange` channel: timely's progress tracking then makes the
//! tracker's input frontier the meet over *every worker's* sinks, across processes. When the
//! epoch coordinate of that frontier passes `e`, the tracker calls `on_epoch_complete(e)` on
//! this worker's readers and writers (shared with it through `Rc<RefCell<…>>` on the worker
//! thread); when the frontier empties (the job ended) it makes the final call and closes them.
//!
//! With checkpoints in storage ([`crate::checkpoint`]) the tracker is also the checkpoint
//! coordinator: on worker 0 it records a checkpoint complete once its frontier passed the
//! checkpoint epoch (every part is durable by then) and sends the completion to every
//! worker's *commit* operator, which calls `on_epoch_complete(c)` on the readers and writers
//! there; when its frontier empties it takes the final savepoint the same way. Epochs
//! that are not completed checkpoints are never announced.
//!
//! The same channel carries *failure notices*: a reader or writer that fails sends one to
//! every worker's tracker, at its current time — so it is received before the frontier can
//! pass the failed operator's epoch — and so does every reader that finishes because
//! something else in its process failed. A tracker that got one (or whose own process
//! failed) never completes another epoch: after a failure nothing more is acked, and the
//! readers' unacked deliveries will be redelivered. It also stops this process's sources,
//! so that a failure in one process ends the job in all of them.

use std::cell::RefCell;
use std::rc::Rc;

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Concatenate;
use timely::dataflow::StreamVec;
use timely::order::Product;

use crate::checkpoint::{CompletedCheckpoint, StoredJob};
use crate::env::JobEnv;
use crate::epoch::{meet, Time};
use crate::error::{CheckpointError, StreamError};

/// A failure notice from worker `from`, addressed to worker `to`'s tracker.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Notice {
    pub(crate) to: u64,
    pub(crate) from: u64,
}

/// Notices for every worker, from `from`.
pub(crate) fn failure_notices(from: usize, peers: usize) -> Vec<Notice> {
    (0..peers as u64)
        .map(|to| Notice {
            to,
            from: from as u64,
        })
        .collect()
}

/// A dataless stream (only failure notices) whose frontier says how far its operator got.
pub(crate) type ProgressStream<'s> = StreamVec<'s, Time, Notice>;

/// What the tracker drives on this worker: readers and writers.
pub(crate) trait EpochListener {
    /// Every record of epochs `<= epoch` went through every sink.
    fn epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError>;
    /// The job ended; `completed` is false after a failure (then nothing may be acked).
    /// `final_ack`: complete the last epoch now (without checkpoints); with them the final
    /// savepoint's completion came as an `epoch_complete` already.
    fn job_end(&mut self, completed: bool, final_ack: bool) -> Result<(), StreamError>;
}

/// A writer to wait for after the job's dataflow ended (checkpoint mode): its final commit
/// was published and must be confirmed before `execute` returns.
pub(crate) trait Finisher {
    /// True once everything published is confirmed.
    fn finish_committed(&mut self) -> Result<bool, StreamError>;
}

/// A checkpoint completion from the coordinator, for worker `to`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Commit {
    pub(crate) to: u64,
    pub(crate) id: u64,
    pub(crate) savepoint: bool,
}

/// Collected while the job closure runs; the tracker is built from it afterwards.
#[derive(Default)]
pub(crate) struct Registry<'s> {
    progress: RefCell<Vec<ProgressStream<'s>>>,
    listeners: RefCell<Vec<Rc<RefCell<dyn EpochListener>>>>,
    /// Operators that write checkpoint parts (checkpoint mode).
    operators: RefCell<Vec<String>>,
}

impl<'s> Registry<'s> {
    pub(crate) fn add_progress(&self, stream: ProgressStream<'s>) {
        self.progress.borrow_mut().push(stream);
    }

    pub(crate) fn add_listener(&self, listener: Rc<RefCell<dyn EpochListener>>) {
        self.listeners.borrow_mut().push(listener);
    }

    pub(crate) fn add_operator(&self, operator: String) {
        self.operators.borrow_mut().push(operator);
    }
}

/// Builds this worker's tracker if the job has readers or writers to drive. Every worker
/// runs the same job closure, so all of them build it or none does.
pub(crate) fn build_tracker(env: &JobEnv<'_>) {
    if let Some(job) = env.stored_job() {
        return build_coordinator(env, job.clone());
    }
    let listeners = std::mem::take(&mut *env.registry.listeners.borrow_mut());
    if listeners.is_empty() {
        return;
    }
    let streams = std::mem::take(&mut *env.registry.progress.borrow_mut());
    let reporter = env.reporter();
    let mut completed: u64 = 0;
    let mut ended = false;
    env.scope.concatenate(streams).sink(
        Exchange::new(|n: &Notice| n.to),
        "EpochCompletion",
        move |(input, frontier)| {
            input.for_each(|_, notices| {
                for n in notices.drain(..) {
                    // A no-op if this process already recorded the failure itself.
                    reporter.report(StreamError::Worker(format!(
                        "the job failed on worker {}",
                        n.from
                    )));
                }
            });
            if ended {
                return;
            }
            let failed = reporter.failed();
            match meet(frontier.frontier()) {
                Some(t) => {
                    if failed || t.outer <= completed {
                        return;
                    }
                    completed = t.outer;
                    for l in &listeners {
                        if let Err(e) = l.borrow_mut().epoch_complete(t.outer - 1) {
                            reporter.report(e);
                        }
                    }
                }
                None => {
                    ended = true;
                    for l in &listeners {
                        if let Err(e) = l.borrow_mut().job_end(!failed, !failed) {
                            reporter.report(e);
                        }
                    }
                }
            }
        },
    );
}

/// The tracker with checkpoints in storage: the coordinator on worker 0 (every worker builds
/// it; the others only pass failure notices on), and a commit operator on every worker.
fn build_coordinator(env: &JobEnv<'_>, job: Arc<StoredJob>) {
    let listeners = std::mem::take(&mut *env.registry.listeners.borrow_mut());
    let streams = std::mem::take(&mut *env.registry.progress.borrow_mut());
    let operators = std::mem::take(&mut *env.registry.operators.borrow_mut());
    let reporter = env.reporter();
    let peers = env.parallelism();
    if let Some(r) = &job.restored {
        // Every worker builds the same job, so every worker finds the same difference; the
        // error stops the sources before their first record.
        if let Err(e) = same_operators(r.id(), r.operators.keys(), &operators) {
            reporter.report(e.into());
        }
    }
    let expected: Vec<(String, u32)> = operators
        .iter()
        .flat_map(|op| (0..peers as u32).map(move |w| (op.clone(), w)))
        .collect();
    let coordinator = env.worker_index() == 0;
    let schedule = job.schedule;
    let trigger = job.trigger.clone();
    let failures = reporter.clone();
    let commits = env
        .scope
        .concatenate(streams)
        .unary_frontier::<CapacityContainerBuilder<Vec<Commit>>, _, _, _>(
            Exchange::new(|n: &Notice| n.to),
            "CheckpointCoordinator",
            move |cap, _| {
                let mut cap = Some(cap);
                // Epochs below this were looked at.
                let mut passed = schedule.base;
                let mut last: Option<u64> = None;
                move |(input, frontier), output| {
                    input.for_each(|_, notices| {
                        for n in notices.drain(..) {
                            failures.report(StreamError::Worker(format!(
                                "the job failed on worker {}",
                                n.from
                            )));
                        }
                    });
                    let Some(c) = cap.as_mut() else {
                        return;
                    };
                    let bound = meet(frontier.frontier());
                    let due = match bound {
                        Some(t) if t.outer > passed => {
                            let range = passed..t.outer;
                            passed = t.outer;
                            schedule.last_in(&range).map(|id| (id, false))
                        }
                        Some(_) => None,
                        None => Some((0, true)),
                    };
                    if let (Some((id, savepoint)), true, false) =
                        (due, coordinator, failures.failed())
                    {
                        match complete(&job, id, savepoint, last, &expected, peers) {
                            Ok(done) => {
                                last = Some(done.id);
                                let mut msgs: Vec<Commit> = (0..peers as u64)
                                    .map(|to| Commit {
                                        to,
                                        id: done.id,
                                        savepoint,
                                    })
                                    .collect();
                                output.session(&*c).give_container(&mut msgs);
                                job.trigger.record_completed(done);
                            }
                            Err(e) => {
                                let n = job.trigger.record_failed();
                                tracing::error!(
                                    checkpoint = id,
                                    savepoint,
                                    consecutive_failures = n,
                                    error = %e,
                                    "checkpoint failed; the job runs on from its last complete checkpoint"
                                );
                                if savepoint {
                                    // Nothing after the last checkpoint can be committed.
                                    failures.report(e.into());
                                } else if n >= job.max_failures {
                                    failures.report(
                                        CheckpointError::TooManyFailures {
                                            failures: n,
                                            last: e.to_string(),
                                        }
                                        .into(),
                                    );
                                }
                            }
                        }
                    }
                    match bound {
                        Some(t) => c.downgrade(&Product::new(t.outer.max(c.outer), 0)),
                        None => cap = None,
                    }
                }
            },
        );
    let reporter = env.reporter();
    let mut ended = false;
    commits.sink(
        Exchange::new(|m: &Commit| m.to),
        "CheckpointCommit",
        move |(input, frontier)| {
            input.for_each(|_, msgs| {
                for m in msgs.drain(..) {
                    // A completed checkpoint is durable: committing it is right even if the
                    // job failed since.
                    trigger.record_completed(CompletedCheckpoint {
                        id: m.id,
                        savepoint: m.savepoint,
                        bytes: 0,
                        duration: None,
                    });
                    for l in &listeners {
                        if let Err(e) = l.borrow_mut().epoch_complete(m.id) {
                            reporter.report(e);
                        }
                    }
                }
            });
            if frontier.is_empty() && !ended {
                ended = true;
                let completed = !reporter.failed();
                for l in &listeners {
                    if let Err(e) = l.borrow_mut().job_end(completed, false) {
                        reporter.report(e);
                    }
                }
            }
        },
    );
}

/// Refuses a checkpoint whose operators are not the job's.
fn same_operators<'a>(
    id: u64,
    stored: impl Iterator<Item = &'a String>,
    job: &[String],
) -> Result<(), CheckpointError> {
    let stored: BTreeSet<&str> = stored.map(String::as_str).collect();
    let built: BTreeSet<&str> = job.iter().map(String::as_str).collect();
    if stored == built {
        return Ok(());
    }
    let missing: Vec<&str> = stored.difference(&built).copied().collect();
    let new: Vec<&str> = built.difference(&stored).copied().collect();
    Err(CheckpointError::Incompatible {
        id,
        detail: format!(
            "the job graph changed (state of {missing:?} has no operator; {new:?} have no state): \
             restore it with the job that took it, or start without restoring"
        ),
    })
}

/// Records checkpoint `id` (or, for the savepoint, the id its final parts call for)
/// complete, logs it and removes old ones.
fn complete(
    job: &StoredJob,
    id: u64,
    savepoint: bool,
    last: Option<u64>,
    expected: &[(String, u32)],
    peers: usize,
) -> Result<CompletedCheckpoint, CheckpointError> {
    let id = match savepoint {
        true => job.store.final_id(
            expected,
            job.schedule.base,
            last.or(job.schedule.base.checked_sub(1)),
        )?,
        false => id,
    };
    let meta = job.store.complete(
        id,
        job.schedule.base,
        expected,
        peers,
        job.key_groups,
        savepoint,
    )?;
    let duration = job.store.take_duration(&meta);
    tracing::info!(
        checkpoint = id,
        savepoint,
        parts = meta.parts.len(),
        bytes = meta.bytes,
        duration_ms = duration.map(|d| d.as_secs_f64() * 1e3),
        "checkpoint complete"
    );
    if let Err(e) = job.store.retain(Some(id)) {
        tracing::warn!(error = %e, "could not remove old checkpoints");
    }
    Ok(CompletedCheckpoint {
        id,
        savepoint,
        bytes: meta.bytes,
        duration,
    })
}
