//! An in-memory file system that remembers what was last made durable, so tests can simulate a
//! power loss ([`MemBackend::crash`]): every file reverts to its contents at its last
//! `sync_data`, and files or renames never made durable by a directory sync disappear.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{OpenMode, StorageBackend, StorageFile};

/// In-memory backend; cloning shares the same "disk".
#[derive(Debug, Default, Clone)]
pub struct MemBackend {
    inner: Arc<Mutex<MemFs>>,
}

#[derive(Debug, Default)]
struct MemFs {
    /// Current directory entries.
    files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// Directory entries as of the last `sync_dir` of their parent.
    durable_files: BTreeMap<PathBuf, Arc<MemFile>>,
    dirs: BTreeSet<PathBuf>,
}

#[derive(Debug, Default)]
struct MemFile {
    data: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
}

#[derive(Debug)]
struct MemHandle(Arc<MemFile>);

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl MemBackend {
    /// A new, empty file system.
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Simulates a power loss: each file's contents revert to what was last `sync_data`ed, and
    /// directory entries revert to what was last made durable by `sync_dir`.
    pub fn crash(&self) {
        let files = self.survivors();
        let mut fs = self.inner.lock();
        fs.durable_files = files.clone();
        fs.files = files;
    }

    /// A separate file system holding what a power loss now would leave, this one untouched
    /// (for checking durability while writers carry on).
    pub fn snapshot_after_crash(&self) -> MemBackend {
        let files = self.survivors();
        let dirs = self.inner.lock().dirs.clone();
        MemBackend {
            inner: Arc::new(Mutex::new(MemFs {
                durable_files: files.clone(),
                files,
                dirs,
            })),
        }
    }

    /// The durable directory entries with their durable contents, as fresh files so that
    /// stale handles cannot touch them.
    fn survivors(&self) -> BTreeMap<PathBuf, Arc<MemFile>> {
        let fs = self.inner.lock();
        fs.durable_files
            .iter()
            .map(|(path, file)| {
                let synced = file.durable.lock().clone();
                let fresh = Arc::new(MemFile {
                    data: Mutex::new(synced.clone()),
                    durable: Mutex::new(synced),
                });
                (path.clone(), fresh)
            })
            .collect()
    }

    /// Current contents of a file (for tests).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.inner
            .lock()
            .files
            .get(path)
            .map(|f| f.data.lock().clone())
    }

    /// Replaces the contents of a file (for tests that corrupt data by hand).
    pub fn set_contents(&self, path: &Path, data: Vec<u8>) {
        let mut fs = self.inner.lock();
        let file = fs.files.entry(path.to_path_buf()).or_default().clone();
        *file.durable.lock() = data.clone();
        *file.data.lock() = data;
        fs.durable_files.insert(path.to_path_buf(), file);
    }
}

impl StorageBackend for MemBackend {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut fs = self.inner.lock();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !fs.dirs.contains(parent) {
                return Err(not_found(parent));
            }
        }
        match mode {
            OpenMode::Existing => match fs.files.get(path) {
                Some(f) => Ok(Arc::new(MemHandle(f.clone()))),
                None => Err(not_found(path)),
            },
            OpenMode::CreateTruncate => {
                let file = fs.files.entry(path.to_path_buf()).or_default().clone();
                file.data.lock().clear();
                Ok(Arc::new(MemHandle(file)))
            }
        }
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.inner.lock();
        for anc in path.ancestors() {
            if !anc.as_os_str().is_empty() {
                fs.dirs.insert(anc.to_path_buf());
            }
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let fs = self.inner.lock();
        if !fs.dirs.contains(path) {
            return Err(not_found(path));
        }
        Ok(fs
            .files
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.inner.lock();
        fs.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.inner.lock();
        let f = fs.files.remove(from).ok_or_else(|| not_found(from))?;
        fs.files.insert(to.to_path_buf(), f);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.inner.lock();
        if !fs.dirs.contains(path) {
            return Err(not_found(path));
        }
        fs.durable_files.retain(|p, _| p.parent() != Some(path));
        let current: Vec<(PathBuf, Arc<MemFile>)> = fs
            .files
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        fs.durable_files.extend(current);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.inner.lock();
        fs.files.retain(|p, _| !p.starts_with(path));
        fs.durable_files.retain(|p, _| !p.starts_with(path));
        fs.dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let fs = self.inner.lock();
        Ok(fs.files.contains_key(path) || fs.dirs.contains(path))
    }
}

impl StorageFile for MemHandle {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.data.lock().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.0.data.lock();
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = data.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.0.data.lock();
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| eof())?;
        self.0.data.lock().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let data = self.0.data.lock().clone();
        *self.0.durable.lock() = data;
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file")
}
