//! The storage seam: every file operation the store performs goes through [`StorageBackend`] and
//! [`StorageFile`], in the spirit of redb's `StorageBackend`, so tests can swap the real file
//! system ([`FileBackend`]) for an in-memory one that can simulate a power loss
//! ([`MemBackend`]) or wrap either with counters and injected failures ([`FaultyBackend`]).
//!
//! The traits are deliberately small: positional reads and writes (pread/pwrite), `set_len`,
//! `fdatasync`, and a handful of directory operations. No mmap.

mod faulty;
mod file;
mod mem;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use faulty::{FaultyBackend, IoCounters};
pub use file::FileBackend;
pub use mem::MemBackend;

/// How [`StorageBackend::open`] treats a missing or existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file for reading and writing; missing is an error.
    Existing,
    /// Create the file, truncating it if it exists.
    CreateTruncate,
}

/// Directory-level operations.
pub trait StorageBackend: Send + Sync + fmt::Debug {
    /// Opens a file for positional reads and writes.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>>;
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the regular files directly inside `path`.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Unlinks a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, deletions and renames inside `path` durable (fsync on the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` exists (file or directory).
    fn exists(&self, path: &Path) -> io::Result<bool>;
}

/// One open file.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fills `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (pwrite), extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
}
