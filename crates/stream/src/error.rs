//! Errors of the stream layer. One enum for job execution, one for state (de)serialisation,
//! one for checkpoints (storage, restore).

use thiserror::Error;

/// Why a job could not be built or run.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The environment settings are inconsistent (e.g. parallelism not divisible by processes).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Timely could not start its workers or connect the processes.
    #[error("failed to start the dataflow: {0}")]
    Startup(String),
    /// A worker thread panicked or failed.
    #[error("worker failed: {0}")]
    Worker(String),
    /// A source or sink failed on I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A user source reported a failure.
    #[error("source failed: {0}")]
    Source(String),
    /// Serialising a record for a sink failed.
    #[error("serialisation failed: {0}")]
    Serialize(String),
    /// State could not be snapshotted or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// Checkpoint storage or restore failed (see [`CheckpointError`]).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A connector (or another library a job uses) failed. The error is kept as it was so
    /// that callers can look into it (a broker's reply code, say) with `downcast_ref`.
    #[error("{0}")]
    External(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>),
}

/// Snapshot/restore failures of a [`crate::StateBackend`].
#[derive(Debug, Error)]
pub enum StateError {
    /// Encoding the state failed.
    #[error("could not encode state: {0}")]
    Encode(String),
    /// The bytes do not decode as this backend's state.
    #[error("could not decode state: {0}")]
    Decode(String),
}

/// Why a checkpoint could not be written or a job could not be restored from one.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A storage operation failed (a full disk is `ErrorKind::StorageFull`, ENOSPC).
    #[error("checkpoint storage: {context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A stored file does not decode or fails its checksum.
    #[error("corrupt checkpoint file {path}: {detail}")]
    Corrupt {
        /// The file, relative to the checkpoint directory.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Some part of a checkpoint is missing (a worker's write failed, or it never wrote it).
    #[error("checkpoint {id} is incomplete: no part for {missing}")]
    Incomplete {
        /// The checkpoint (its epoch).
        id: u64,
        /// The first missing part: operator and worker.
        missing: String,
    },
    /// The checkpoint was taken by a job of another shape: restoring it would misplace state.
    #[error("checkpoint {id} does not fit this job: {detail}")]
    Incompatible {
        /// The checkpoint (its epoch).
        id: u64,
        /// What differs (operators, key groups, job name).
        detail: String,
    },
    /// Checkpoints failed this many times in a row: the job stops rather than run on
    /// without a recent recovery point.
    #[error("{failures} consecutive checkpoints failed; the last: {last}")]
    TooManyFailures {
        /// Consecutive failures.
        failures: u32,
        /// The last failure.
        last: String,
    },
}
