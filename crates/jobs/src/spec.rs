//! What to run: a built-in job and its options, from a job file or the command line.

use rill_connect::format::BadInputPolicy;
use rill_connect::transport::Credentials;
use std::path::PathBuf;

/// A job and how to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// For logs, and to tell jobs apart.
    pub name: String,
    pub job: BuiltinJob,
    pub options: JobOptions,
}

/// The jobs `rill job run` and `rill server --job` know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuiltinJob {
    /// The seed's WordCount over queues (see [`crate::wordcount`]).
    Wordcount {
        source_queue: String,
        sink_queue: String,
    },
}

impl BuiltinJob {
    /// The name `rill job run` takes.
    pub fn kind(&self) -> &'static str {
        match self {
            BuiltinJob::Wordcount { .. } => "wordcount",
        }
    }
}

/// Options every built-in job takes.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    /// Worker threads (each runs one consumer per source queue).
    pub parallelism: usize,
    /// Unacked deliveries each source consumer may hold.
    pub prefetch: u16,
    pub bad_input: BadInputPolicy,
    /// Declare the job's queues if they are missing (otherwise a missing queue is an error).
    pub declare_queues: bool,
    /// Queues the job declares because they are missing are durable.
    pub durable_queues: bool,
    /// Login for the job's sessions (in-process), or taken from the URI (standalone).
    pub credentials: Credentials,
    /// Accepted now; checkpoints are written from the next release on.
    pub checkpoint_interval_ms: Option<u64>,
    pub checkpoint_dir: Option<PathBuf>,
}

/// Unacked deliveries per consumer when nothing is said: enough to keep a job busy while the
/// deliveries of the last epoch are being acknowledged.
pub const DEFAULT_PREFETCH: u16 = 2000;

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            parallelism: 1,
            prefetch: DEFAULT_PREFETCH,
            bad_input: BadInputPolicy::Fail,
            declare_queues: true,
            durable_queues: true,
            credentials: Credentials::default(),
            checkpoint_interval_ms: None,
            checkpoint_dir: None,
        }
    }
}
