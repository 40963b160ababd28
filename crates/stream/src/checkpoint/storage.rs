//! Where checkpoints are kept: the handful of file operations a checkpoint needs, behind
//! [`CheckpointStorage`] so that crashes and full disks can be tested (redb's
//! file/memory/faulty backends).
//!
//! The durability protocol itself (write, fsync, rename, fsync the directory) lives in the
//! checkpoint store, one level up; a backend only performs single operations. Paths are
//! relative and `/`-separated (`parts/…`, `checkpoints/…`).

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The file operations a checkpoint needs. Implementations are shared by every worker of a
/// process (and, for files, by every process of a job: a shared directory, like Flink's
/// shared file system).
pub trait CheckpointStorage: Send + Sync + 'static {
    /// Creates (or truncates) `path`, creating its directory if needed, and writes `bytes`.
    /// Not durable until [`Self::sync`].
    fn write(&self, path: &str, bytes: &[u8]) -> io::Result<()>;
    /// Makes `path`'s contents durable (fsync).
    fn sync(&self, path: &str) -> io::Result<()>;
    /// Renames `from` to `to` atomically, replacing `to`. Durable after [`Self::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes the directory `dir`'s entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &str) -> io::Result<()>;
    /// Reads all of `path`.
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// The size of `path` in bytes.
    fn size(&self, path: &str) -> io::Result<u64>;
    /// The names of the files in `dir` (empty if it does not exist).
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Removes `path`; a missing file is not an error.
    fn remove(&self, path: &str) -> io::Result<()>;
}

/// Checkpoints in a directory of the local (or a shared) file system.
///
/// ```
/// use rill_stream::checkpoint::{CheckpointStorage, FileStorage};
/// let dir = std::env::temp_dir().join(format!("rill-doc-{}", std::process::id()));
/// let fs = FileStorage::new(&dir);
/// fs.write("parts/a.tmp", b"state").unwrap();
/// fs.sync("parts/a.tmp").unwrap();
/// fs.rename("parts/a.tmp", "parts/a").unwrap();
/// fs.sync_dir("parts").unwrap();
/// assert_eq!(fs.list("parts").unwrap(), vec!["a".to_string()]);
/// assert_eq!(fs.read("parts/a").unwrap(), b"state");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    /// Checkpoints under `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStorage { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl CheckpointStorage for FileStorage {
    fn write(&self, path: &str, bytes: &[u8]) -> io::Result<()> {
        let full = self.path(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::File::create(&full)?;
        f.write_all(bytes)
    }

    fn sync(&self, path: &str) -> io::Result<()> {
        // fsync through a new descriptor flushes the inode's data all the same.
        std::fs::File::open(self.path(path))?.sync_all()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from), self.path(to))
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        std::fs::File::open(self.path(dir))?.sync_all()
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(path))
    }

    fn size(&self, path: &str) -> io::Result<u64> {
        Ok(std::fs::metadata(self.path(path))?.len())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(self.path(dir)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(path)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// Checkpoints in memory, for tests and for jobs that only need savepoints within one
/// process's lifetime. Clones share the same files. Everything written counts as durable.
///
/// ```
/// use rill_stream::checkpoint::{CheckpointStorage, MemoryStorage};
/// let m = MemoryStorage::new();
/// m.write("checkpoints/x", b"1").unwrap();
/// assert_eq!(m.clone().list("checkpoints").unwrap(), vec!["x".to_string()]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryStorage {
    // Locked for single file operations only (a checkpoint part at most).
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn files(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        match self.files.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn not_found(path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.to_string())
}

impl CheckpointStorage for MemoryStorage {
    fn write(&self, path: &str, bytes: &[u8]) -> io::Result<()> {
        self.files().insert(path.to_string(), bytes.to_vec());
        Ok(())
    }

    fn sync(&self, path: &str) -> io::Result<()> {
        match self.files().contains_key(path) {
            true => Ok(()),
            false => Err(not_found(path)),
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files();
        let bytes = files.remove(from).ok_or_else(|| not_found(from))?;
        files.insert(to.to_string(), bytes);
        Ok(())
    }

    fn sync_dir(&self, _dir: &str) -> io::Result<()> {
        Ok(())
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        self.files()
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))
    }

    fn size(&self, path: &str) -> io::Result<u64> {
        let files = self.files();
        let bytes = files.get(path).ok_or_else(|| not_found(path))?;
        Ok(bytes.len() as u64)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        Ok(self
            .files()
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(String::from)
            .collect())
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        self.files().remove(path);
        Ok(())
    }
}

/// A storage operation, for [`FaultyStorage`]'s fault plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageOp {
    /// [`CheckpointStorage::write`].
    Write,
    /// [`CheckpointStorage::sync`].
    Sync,
    /// [`CheckpointStorage::rename`].
    Rename,
    /// [`CheckpointStorage::sync_dir`].
    SyncDir,
}

impl StorageOp {
    fn index(self) -> usize {
        match self {
            StorageOp::Write => 0,
            StorageOp::Sync => 1,
            StorageOp::Rename => 2,
            StorageOp::SyncDir => 3,
        }
    }
}

#[derive(Default)]
struct Plan {
    /// Calls so far, per operation.
    calls: [u64; 4],
    /// Fail the call with this number (1-based), once.
    nth: Vec<(StorageOp, u64)>,
    /// Fail every call from this number on.
    from: Vec<(StorageOp, u64)>,
    /// Bytes that may still be written before the disk is full.
    capacity: Option<u64>,
    injected: u64,
}

/// Wraps a storage and injects failures: the n-th write, fsync or rename fails (EIO), or
/// the disk fills up after so many bytes (ENOSPC, leaving the write that hit the limit
/// torn, as a real full disk does). For tests of checkpoint failure handling.
///
/// ```
/// use rill_stream::checkpoint::{CheckpointStorage, FaultyStorage, MemoryStorage, StorageOp};
/// use std::sync::Arc;
/// let faulty = FaultyStorage::new(Arc::new(MemoryStorage::new()));
/// faulty.fail_nth(StorageOp::Sync, 2);
/// faulty.write("a", b"1").unwrap();
/// assert!(faulty.sync("a").is_ok());
/// assert!(faulty.sync("a").is_err());
/// assert!(faulty.sync("a").is_ok());
/// faulty.disk_full_after(3);
/// let full = faulty.write("b", b"12345").unwrap_err();
/// assert_eq!(full.raw_os_error(), Some(28)); // ENOSPC
/// assert_eq!(faulty.injected(), 2);
/// ```
pub struct FaultyStorage {
    inner: Arc<dyn CheckpointStorage>,
    // Locked once per storage operation; tests only.
    plan: Mutex<Plan>,
}

impl std::fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStorage")
            .field("injected", &self.injected())
            .finish()
    }
}

/// ENOSPC: what a full disk answers.
const ENOSPC: i32 = 28;

impl FaultyStorage {
    /// Passes everything through to `inner` until told otherwise.
    pub fn new(inner: Arc<dyn CheckpointStorage>) -> Self {
        FaultyStorage {
            inner,
            plan: Mutex::new(Plan::default()),
        }
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        match self.plan.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The `n`-th call of `op` (counting from the storage's creation, 1-based) fails once.
    pub fn fail_nth(&self, op: StorageOp, n: u64) {
        self.plan().nth.push((op, n));
    }

    /// Every call of `op` from the `n`-th on fails.
    pub fn fail_from(&self, op: StorageOp, n: u64) {
        self.plan().from.push((op, n));
    }

    /// Writes fail with ENOSPC once `bytes` more bytes were written (the failing write is
    /// left torn: the bytes that still fit are written).
    pub fn disk_full_after(&self, bytes: u64) {
        self.plan().capacity = Some(bytes);
    }

    /// Removes every planned fault (the disk was cleaned up).
    pub fn heal(&self) {
        let mut plan = self.plan();
        plan.nth.clear();
        plan.from.clear();
        plan.capacity = None;
    }

    /// How many calls of `op` were made.
    pub fn calls(&self, op: StorageOp) -> u64 {
        self.plan().calls[op.index()]
    }

    /// How many failures were injected.
    pub fn injected(&self) -> u64 {
        self.plan().injected
    }

    /// Counts the call and says whether it must fail.
    fn check(&self, op: StorageOp) -> io::Result<()> {
        let mut plan = self.plan();
        plan.calls[op.index()] += 1;
        let n = plan.calls[op.index()];
        let fail = plan.nth.iter().any(|&(o, k)| o == op && k == n)
            || plan.from.iter().any(|&(o, k)| o == op && n >= k);
        if fail {
            plan.injected += 1;
            return Err(io::Error::other(format!("injected failure of {op:?} #{n}")));
        }
        Ok(())
    }
}

impl CheckpointStorage for FaultyStorage {
    fn write(&self, path: &str, bytes: &[u8]) -> io::Result<()> {
        self.check(StorageOp::Write)?;
        let torn = {
            let mut plan = self.plan();
            match plan.capacity {
                Some(left) if (bytes.len() as u64) > left => {
                    plan.capacity = Some(0);
                    plan.injected += 1;
                    Some(left as usize)
                }
                Some(left) => {
                    plan.capacity = Some(left - bytes.len() as u64);
                    None
                }
                None => None,
            }
        };
        match torn {
            Some(fits) => {
                self.inner.write(path, &bytes[..fits])?;
                Err(io::Error::from_raw_os_error(ENOSPC))
            }
            None => self.inner.write(path, bytes),
        }
    }

    fn sync(&self, path: &str) -> io::Result<()> {
        self.check(StorageOp::Sync)?;
        self.inner.sync(path)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.check(StorageOp::Rename)?;
        self.inner.rename(from, to)
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        self.check(StorageOp::SyncDir)?;
        self.inner.sync_dir(dir)
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }

    fn size(&self, path: &str) -> io::Result<u64> {
        self.inner.size(path)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        self.inner.remove(path)
    }
}
