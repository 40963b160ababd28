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
//! The same channel carries *failure notices*: a reader or writer that fails sends one to
//! every worker's tracker, at its current time — so it is received before the frontier can
//! pass the failed operator's epoch — and so does every reader that finishes because
//! something else in its process failed. A tracker that got one (or whose own process
//! failed) never completes another epoch: after a failure nothing more is acked, and the
//! readers' unacked deliveries will be redelivered. It also stops this process's sources,
//! so that a failure in one process ends the job in all of them.

use std::cell::RefCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Concatenate;
use timely::dataflow::StreamVec;

use crate::env::JobEnv;
use crate::epoch::{meet, Time};
use crate::error::StreamError;

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
    fn job_end(&mut self, completed: bool) -> Result<(), StreamError>;
}

/// Collected while the job closure runs; the tracker is built from it afterwards.
#[derive(Default)]
pub(crate) struct Registry<'s> {
    progress: RefCell<Vec<ProgressStream<'s>>>,
    listeners: RefCell<Vec<Rc<RefCell<dyn EpochListener>>>>,
}

impl<'s> Registry<'s> {
    pub(crate) fn add_progress(&self, stream: ProgressStream<'s>) {
        self.progress.borrow_mut().push(stream);
    }

    pub(crate) fn add_listener(&self, listener: Rc<RefCell<dyn EpochListener>>) {
        self.listeners.borrow_mut().push(listener);
    }
}

/// Builds this worker's tracker if the job has readers or writers to drive. Every worker
/// runs the same job closure, so all of them build it or none does.
pub(crate) fn build_tracker(env: &JobEnv<'_>) {
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
                        if let Err(e) = l.borrow_mut().job_end(!failed) {
                            reporter.report(e);
                        }
                    }
                }
            }
        },
    );
}
