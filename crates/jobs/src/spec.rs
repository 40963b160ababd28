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
    /// Unacked deliveries each source consumer may hold (None: [`JobOptions::prefetch`]
    /// picks).
    pub prefetch: Option<u32>,
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

/// Unacked deliveries per consumer when nothing is said, without checkpoints: enough to keep
/// a job busy while the deliveries of the last epoch (20 ms) are being acknowledged.
pub const DEFAULT_PREFETCH: u32 = 2000;

/// ... and with checkpoints, where deliveries are acked once per checkpoint: the window must
/// hold what arrives between two checkpoints. In-process there is no protocol limit; over
/// AMQP 0-9-1 the most a consumer can ask for is 65535.
pub const CHECKPOINT_PREFETCH_EMBEDDED: u32 = 200_000;
pub const CHECKPOINT_PREFETCH_AMQP: u32 = 65_535;

impl JobOptions {
    /// Whether the job takes checkpoints (and so gives exactly-once results).
    pub fn checkpointing(&self) -> bool {
        self.checkpoint_interval_ms.is_some() || self.checkpoint_dir.is_some()
    }

    /// The prefetch to use: the one asked for, or the default for the mode.
    pub fn prefetch(&self, embedded: bool) -> u32 {
        self.prefetch
            .unwrap_or(match (self.checkpointing(), embedded) {
                (false, _) => DEFAULT_PREFETCH,
                (true, true) => CHECKPOINT_PREFETCH_EMBEDDED,
                (true, false) => CHECKPOINT_PREFETCH_AMQP,
            })
    }
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            parallelism: 1,
            prefetch: None,
            bad_input: BadInputPolicy::Fail,
            declare_queues: true,
            durable_queues: true,
            credentials: Credentials::default(),
            checkpoint_interval_ms: None,
            checkpoint_dir: None,
        }
    }
}
