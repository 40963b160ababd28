//! Progress counters of stream jobs, kept in one place: jobs attached to this broker register
//! theirs with the [`crate::Broker`] (so the management API can serve them), standalone jobs
//! keep their own, and both log them the same way.
//!
//! Updated by the jobs' sources and sinks with relaxed atomics (no lock on the record path),
//! read by whoever reports progress.

use std::sync::atomic::{AtomicU64, Ordering};

/// One job's counters. Totals are monotonic; gauges (source lag, confirms outstanding) are
/// kept per worker and summed when read.
#[derive(Debug)]
pub struct JobCounters {
    name: String,
    records_in: AtomicU64,
    records_out: AtomicU64,
    bad_input: AtomicU64,
    acked: AtomicU64,
    confirmed: AtomicU64,
    reconnects: AtomicU64,
    source_lag: Box<[AtomicU64]>,
    confirms_outstanding: Box<[AtomicU64]>,
}

/// A reading of a job's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Messages the job's sources consumed.
    pub records_in: u64,
    /// Messages its sinks published.
    pub records_out: u64,
    /// Messages skipped or dead-lettered because they could not be read.
    pub bad_input: u64,
    /// Deliveries acknowledged to the broker.
    pub acked: u64,
    /// Publishes the broker confirmed.
    pub confirmed: u64,
    /// Times a transport reconnected.
    pub reconnects: u64,
    /// Messages waiting in the source queues (queue depth), or for stream queues the gap
    /// between the end of the stream and the job's offset.
    pub source_lag: u64,
    /// Publishes not confirmed yet.
    pub confirms_outstanding: u64,
}

impl JobCounters {
    /// Counters for a job with `workers` workers.
    ///
    /// ```
    /// use rill_broker::jobs::JobCounters;
    /// let c = JobCounters::new("wc", 2);
    /// c.add_in(3);
    /// c.set_source_lag(0, 10);
    /// c.set_source_lag(1, 5);
    /// let p = c.progress();
    /// assert_eq!((p.records_in, p.source_lag), (3, 15));
    /// ```
    pub fn new(name: &str, workers: usize) -> JobCounters {
        let gauges = || (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect();
        JobCounters {
            name: name.to_owned(),
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            bad_input: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            source_lag: gauges(),
            confirms_outstanding: gauges(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn add_in(&self, n: u64) {
        self.records_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: u64) {
        self.records_out.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_bad_input(&self, n: u64) {
        self.bad_input.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_acked(&self, n: u64) {
        self.acked.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_confirmed(&self, n: u64) {
        self.confirmed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Worker `worker`'s source lag (ignored for a worker index out of range).
    pub fn set_source_lag(&self, worker: usize, lag: u64) {
        if let Some(g) = self.source_lag.get(worker) {
            g.store(lag, Ordering::Relaxed);
        }
    }

    /// Worker `worker`'s unconfirmed publishes.
    pub fn set_confirms_outstanding(&self, worker: usize, n: u64) {
        if let Some(g) = self.confirms_outstanding.get(worker) {
            g.store(n, Ordering::Relaxed);
        }
    }

    pub fn progress(&self) -> JobProgress {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sum = |gs: &[AtomicU64]| gs.iter().map(get).sum();
        JobProgress {
            records_in: get(&self.records_in),
            records_out: get(&self.records_out),
            bad_input: get(&self.bad_input),
            acked: get(&self.acked),
            confirmed: get(&self.confirmed),
            reconnects: get(&self.reconnects),
            source_lag: sum(&self.source_lag),
            confirms_outstanding: sum(&self.confirms_outstanding),
        }
    }
}
