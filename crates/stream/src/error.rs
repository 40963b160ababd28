//! Errors of the stream layer. One enum for job execution, one for state (de)serialisation.

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
