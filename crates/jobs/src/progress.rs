//! Progress logging: every few seconds a job logs its records in and out per second, its
//! source lag and its sink's outstanding confirms, read from its [`JobCounters`].

use rill_broker::jobs::{JobCounters, JobProgress};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often progress is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Logs a job's progress on a thread of its own until dropped.
pub struct ProgressLogger {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// One progress line's figures: rates over the interval since the last reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub in_per_s: f64,
    pub out_per_s: f64,
}

/// Rates between two readings `elapsed` apart.
///
/// ```
/// use rill_broker::jobs::JobProgress;
/// use rill_jobs::progress::rates;
/// use std::time::Duration;
/// let a = JobProgress { records_in: 100, records_out: 500, ..Default::default() };
/// let b = JobProgress { records_in: 300, records_out: 1500, ..Default::default() };
/// let r = rates(&a, &b, Duration::from_secs(2));
/// assert_eq!((r.in_per_s, r.out_per_s), (100.0, 500.0));
/// ```
pub fn rates(before: &JobProgress, now: &JobProgress, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-9);
    Rates {
        in_per_s: now.records_in.saturating_sub(before.records_in) as f64 / secs,
        out_per_s: now.records_out.saturating_sub(before.records_out) as f64 / secs,
    }
}

impl ProgressLogger {
    pub fn start(counters: Arc<JobCounters>, every: Duration) -> ProgressLogger {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rill-job-progress".into())
            .spawn(move || {
                let mut last = counters.progress();
                let mut at = Instant::now();
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let now = counters.progress();
                    let r = rates(&last, &now, at.elapsed());
                    tracing::info!(
                        job = counters.name(),
                        in_per_s = r.in_per_s.round() as u64,
                        out_per_s = r.out_per_s.round() as u64,
                        records_in = now.records_in,
                        records_out = now.records_out,
                        source_lag = now.source_lag,
                        confirms_outstanding = now.confirms_outstanding,
                        bad_input = now.bad_input,
                        reconnects = now.reconnects,
                        "job progress"
                    );
                    last = now;
                    at = Instant::now();
                }
            })
            .ok();
        ProgressLogger {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for ProgressLogger {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
