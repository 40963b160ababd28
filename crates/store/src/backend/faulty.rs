//! A wrapper backend that counts operations and fails them on demand, for tests (group commit
//! efficiency, error propagation) and for the broker's own disk-failure tests.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{OpenMode, StorageBackend, StorageFile};

/// Operation counts observed by a [`FaultyBackend`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// `write_all_at` calls.
    pub writes: u64,
    /// `sync_data` (fdatasync) calls on files.
    pub file_syncs: u64,
    /// `sync_dir` calls.
    pub dir_syncs: u64,
    /// Files opened or created.
    pub opens: u64,
}

#[derive(Debug, Default)]
struct Shared {
    writes: AtomicU64,
    file_syncs: AtomicU64,
    dir_syncs: AtomicU64,
    opens: AtomicU64,
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    fail_opens: AtomicBool,
}

/// Wraps another backend; counts calls and injects `io::Error`s while a failure switch is on.
/// Cloning shares counters and switches.
#[derive(Debug, Clone)]
pub struct FaultyBackend {
    inner: Arc<dyn StorageBackend>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    shared: Arc<Shared>,
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl FaultyBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn StorageBackend>) -> FaultyBackend {
        FaultyBackend {
            inner,
            shared: Arc::default(),
        }
    }

    /// Counts so far.
    pub fn counters(&self) -> IoCounters {
        let s = &self.shared;
        IoCounters {
            writes: s.writes.load(Ordering::Relaxed),
            file_syncs: s.file_syncs.load(Ordering::Relaxed),
            dir_syncs: s.dir_syncs.load(Ordering::Relaxed),
            opens: s.opens.load(Ordering::Relaxed),
        }
    }

    /// While on, every write fails (as with a full disk).
    pub fn fail_writes(&self, on: bool) {
        self.shared.fail_writes.store(on, Ordering::SeqCst);
    }

    /// While on, every fdatasync (file or directory) fails.
    pub fn fail_syncs(&self, on: bool) {
        self.shared.fail_syncs.store(on, Ordering::SeqCst);
    }

    /// While on, opening or creating files fails.
    pub fn fail_opens(&self, on: bool) {
        self.shared.fail_opens.store(on, Ordering::SeqCst);
    }
}

impl StorageBackend for FaultyBackend {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        if self.shared.fail_opens.load(Ordering::SeqCst) {
            return Err(injected("open"));
        }
        self.shared.opens.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.open(path, mode)?;
        Ok(Arc::new(FaultyFile {
            inner,
            shared: self.shared.clone(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list_dir(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if self.shared.fail_syncs.load(Ordering::SeqCst) {
            return Err(injected("directory sync"));
        }
        self.shared.dir_syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync_dir(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.inner.exists(path)
    }
}

impl StorageFile for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.shared.fail_writes.load(Ordering::SeqCst) {
            return Err(injected("write"));
        }
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.shared.fail_writes.load(Ordering::SeqCst) {
            return Err(injected("truncate"));
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if self.shared.fail_syncs.load(Ordering::SeqCst) {
            return Err(injected("fdatasync"));
        }
        self.shared.file_syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync_data()
    }
}
