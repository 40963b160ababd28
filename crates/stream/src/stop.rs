//! Stopping a running job from outside (SIGTERM) and after a failure.
//!
//! Stopping is cooperative: every source checks a flag at each activation and finishes when
//! it is set, exactly as if its input had ended. The job then drains: operators fire what the
//! end of input fires, sinks finish (waiting for their confirms), readers get their final
//! epoch completion and are closed, and `execute` returns. Sources register a thread-safe
//! activator so that `stop` can wake the idle ones instead of waiting for their next tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use timely::scheduling::SyncActivator;

/// Stops the jobs of one [`crate::StreamExecutionEnvironment`] (and its clones) cleanly.
///
/// `Clone + Send + Sync`: hand it to a signal handler or another thread.
///
/// ```
/// use rill_stream::{CollectSink, StreamExecutionEnvironment};
/// let env = StreamExecutionEnvironment::new().with_parallelism(1);
/// let stop = env.stop_handle();
/// stop.stop(); // before the job even started: its sources finish at once
/// let out = CollectSink::new();
/// let sink = out.clone();
/// env.execute("stopped", move |env| {
///     env.from_sequence(1, u64::MAX).collect_into(&sink);
/// }).unwrap();
/// assert!(out.take().is_empty());
/// ```
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

#[derive(Default)]
struct StopInner {
    stopped: AtomicBool,
    // The activators of the running job's sources. Locked to register a source (at dataflow
    // construction) and to wake them all (once, on stop or failure): never on a hot path.
    wakers: Mutex<Vec<SyncActivator>>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl StopHandle {
    pub(crate) fn new() -> Self {
        StopHandle {
            inner: Arc::default(),
        }
    }

    /// Makes every source of the running job (and of any later job of this environment)
    /// finish at its next activation, and wakes them. Idempotent.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.wake_sources();
    }

    /// True once [`Self::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn register(&self, activator: SyncActivator) {
        self.wakers().push(activator);
    }

    pub(crate) fn wake_sources(&self) {
        for w in self.wakers().iter() {
            // An error means that worker has already shut down: nothing left to wake.
            let _ = w.activate();
        }
    }

    /// Forgets the activators of a finished job.
    pub(crate) fn clear(&self) {
        self.wakers().clear();
    }

    fn wakers(&self) -> MutexGuard<'_, Vec<SyncActivator>> {
        match self.inner.wakers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// What a source checks at each activation: the user's stop, or a failure of this job.
#[derive(Clone)]
pub(crate) struct JobControl {
    pub(crate) stop: StopHandle,
    pub(crate) failed: Arc<AtomicBool>,
}

impl JobControl {
    /// True if sources must finish now.
    #[inline]
    pub(crate) fn should_stop(&self) -> bool {
        self.stop.is_stopped() || self.failed.load(Ordering::Relaxed)
    }
}
