//! The store's one error type.

use std::io;
use std::path::{Path, PathBuf};

use crate::Position;

/// Everything that can go wrong in the store. I/O errors carry the path they happened on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system error on `path`.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file written by a newer, unknown format version: refuse to start rather than guess.
    #[error("{} has format version {found}; this build understands version {}", path.display(), crate::format::VERSION)]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in its header.
        found: u32,
    },
    /// A file that is not ours or is damaged beyond what recovery repairs by truncation.
    #[error("{} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The encoded record would not fit the format (payload > ~4 GiB).
    #[error("record of {size} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// Encoded size.
        size: u64,
        /// Largest encodable size.
        max: u64,
    },
    /// `exchange` or `routing_key` longer than 255 bytes (AMQP short strings).
    #[error("{field} is {len} bytes; at most 255 are allowed")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// `read` of a position that is not a record of this store (never written, or its segment
    /// was deleted after being fully acked).
    #[error("no record at segment {} offset {}", .0.segment, .0.offset)]
    NotFound(Position),
    /// An earlier write or fdatasync failed: what was written since the last successful sync
    /// may not be on disk, so the store refuses further writes. Reopen it to recover.
    #[error("store in {} failed earlier and refuses writes until reopened: {detail}", path.display())]
    Failed {
        /// The queue directory.
        path: PathBuf,
        /// The first failure.
        detail: String,
    },
    /// The store was destroyed.
    #[error("store in {} was destroyed", path.display())]
    Destroyed {
        /// The (former) queue directory.
        path: PathBuf,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// `result.ctx(path)?` turns an `io::Result` into a `StoreError::Io` naming `path`.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::io(path, e))
    }
}
