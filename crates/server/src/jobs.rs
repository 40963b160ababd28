//! Jobs attached to the broker process (`rill server --job FILE`, or a program that embeds the
//! server with its own jobs compiled in).
//!
//! The server knows nothing of stream processing: a job is anything that can start against
//! the [`Broker`] and be stopped. The server starts its jobs once the data directory has been
//! recovered (so their queues are there, with their messages) and, at shutdown, stops them
//! and waits for them before it closes client connections, so a job's last acks and confirms
//! reach a broker that is still whole.

use rill_broker::Broker;
use std::time::Duration;

/// A job the broker runs in its own process.
pub trait EmbeddedJob: Send + 'static {
    /// The job's name, for logs.
    fn name(&self) -> &str;
    /// Starts it against `broker` (on threads of its own: never the server's I/O threads).
    fn start(self: Box<Self>, broker: Broker) -> Result<Box<dyn RunningJob>, String>;
}

/// A started job.
pub trait RunningJob: Send + 'static {
    fn name(&self) -> &str;
    /// Asks the job to stop: it finishes what it consumed, and returns. Does not wait.
    fn stop(&self);
    /// Whether it has ended (stopped, finished or failed).
    fn is_finished(&self) -> bool;
    /// Waits up to `timeout` for the job to end; its error if it failed, `Err` too if it is
    /// still running then. May block: call it off the I/O threads.
    fn join(self: Box<Self>, timeout: Duration) -> Result<(), String>;
}

/// How long a job gets to drain at shutdown.
pub const JOB_STOP_GRACE: Duration = Duration::from_secs(30);

/// Starts every job; a job that cannot start is logged and left out (the broker itself stays
/// up: it holds the messages).
pub(crate) fn start_all(
    jobs: Vec<Box<dyn EmbeddedJob>>,
    broker: &Broker,
) -> Vec<Box<dyn RunningJob>> {
    let mut running = Vec::new();
    for job in jobs {
        let name = job.name().to_owned();
        match job.start(broker.clone()) {
            Ok(r) => {
                tracing::info!(job = %name, "job started");
                running.push(r);
            }
            Err(e) => tracing::error!(job = %name, error = %e, "job failed to start"),
        }
    }
    running
}

/// Stops every job and waits for them (blocking: run it with `spawn_blocking`).
pub(crate) fn stop_all(running: Vec<Box<dyn RunningJob>>) {
    for job in &running {
        job.stop();
    }
    for job in running {
        let name = job.name().to_owned();
        match job.join(JOB_STOP_GRACE) {
            Ok(()) => tracing::info!(job = %name, "job stopped"),
            Err(e) => tracing::error!(job = %name, error = %e, "job did not stop cleanly"),
        }
    }
}
