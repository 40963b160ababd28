//! The checkpoint store: the on-disk layout, writing parts and completion records durably,
//! finding the newest complete checkpoint, and deleting what is no longer needed.
//!
//! # Layout
//! ```text
//! <dir>/parts/<from>-<to>-w<worker>-<operator hash>.part   one operator instance's state
//! <dir>/checkpoints/<id>.meta                              completion records
//! ```
//! Numbers are zero-padded decimal (20 digits; the worker 5), the operator hash 16 hex
//! digits. A part holds one operator instance's state and is valid for every checkpoint
//! epoch in `from..=to`: an operator that saw several checkpoint epochs complete together
//! (nothing happened in between) writes its state once for all of them, and an operator
//! that finished writes a *final* part (`to` = `u64::MAX`) that stands for it in every
//! later checkpoint. Each part is written to `<name>.tmp`, fsynced and renamed, so a
//! `.part` file is always whole.
//!
//! A checkpoint exists only through its completion record, written by the coordinator once
//! every part of every worker is durable: the parts directory is fsynced, the record (which
//! lists every part with its size) is written to `<id>.meta.tmp`, fsynced, renamed, and
//! the directory fsynced. A crash at any point leaves either no record (the checkpoint
//! never happened; its parts are garbage) or a complete one.
//!
//! Every file is an envelope: magic `RILLCKPT`, format version (u32), payload length
//! (u64), payload checksum (u64), all little-endian, then the bincode payload.
//!
//! # Retention
//! The newest `keep` records are kept; after each completion older records are removed,
//! then every part of an epoch up to the new checkpoint that no kept record lists (older
//! checkpoints' parts, parts of failed checkpoints, torn `.tmp` files). Parts of later
//! epochs may belong to a checkpoint still being written and are left alone. At start-up,
//! before any worker runs, the coordinator's process also removes leftovers of a crashed
//! run: every part and temporary file that no record lists.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::storage::CheckpointStorage;
use crate::checkpoint::SnapshotState;
use crate::error::CheckpointError;

pub(crate) const PARTS: &str = "parts";
pub(crate) const CHECKPOINTS: &str = "checkpoints";
const MAGIC: &[u8; 8] = b"RILLCKPT";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8;

/// A checksum of a file's payload: catches torn or rotten files at restore. Word at a time
/// (little-endian, so the format is the same on every host).
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = bytes.len() as u64 ^ 0x5bd1_e995;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

/// `value` encoded in a checkpoint file's envelope (header, then the bincode payload). The
/// payload is sized first and written in place: a part holds a checkpoint's whole pending
/// output, and growing and copying buffers of that size cost the worker more than the
/// encoding itself.
fn envelope<T: Serialize>(
    value: &T,
    path: impl Fn() -> String,
) -> Result<Vec<u8>, CheckpointError> {
    let mut out = Vec::new();
    envelope_into(value, path, &mut out)?;
    Ok(out)
}

/// [`envelope`] into `out` (cleared first), whose memory can serve the next part.
fn envelope_into<T: Serialize>(
    value: &T,
    path: impl Fn() -> String,
    out: &mut Vec<u8>,
) -> Result<(), CheckpointError> {
    let encoding = |e: bincode::Error| CheckpointError::Corrupt {
        path: path(),
        detail: format!("encoding: {e}"),
    };
    let size = bincode::serialized_size(value).map_err(encoding)? as usize;
    out.clear();
    out.reserve(HEADER + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(size as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    bincode::serialize_into(&mut *out, value).map_err(encoding)?;
    let sum = checksum(&out[HEADER..]);
    out[HEADER - 8..HEADER].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

thread_local! {
    /// Each worker thread encodes its parts into the same memory: a fresh buffer the size of
    /// a part (megabytes) is fresh pages from the kernel every time, and zeroing them cost a
    /// job's worker more than the encoding.
    static PART_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A part buffer larger than this is not kept for the next part.
const KEEP_PART_BUFFER: usize = 64 << 20;

fn open_envelope<'a>(path: &str, bytes: &'a [u8]) -> Result<&'a [u8], CheckpointError> {
    let corrupt = |detail: &str| CheckpointError::Corrupt {
        path: path.to_string(),
        detail: detail.to_string(),
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt("not a checkpoint file"));
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    if u32::from_le_bytes(v) != VERSION {
        return Err(corrupt("unknown format version"));
    }
    let (len, sum) = (word(12), word(20));
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(corrupt("truncated"));
    }
    if checksum(payload) != sum {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(payload)
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> CheckpointError {
    move |source| CheckpointError::Io { context, source }
}

/// A 64-bit hash of an operator's identity, for file names (FNV-1a: stable across builds).
pub(crate) fn operator_hash(operator: &str) -> u64 {
    operator.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where a part lives, from its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PartName {
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) worker: u32,
    pub(crate) operator: u64,
}

impl PartName {
    pub(crate) fn file(&self) -> String {
        format!(
            "{:020}-{:020}-w{:05}-{:016x}.part",
            self.from, self.to, self.worker, self.operator
        )
    }

    /// The file naming the earlier increments a [`SnapshotState::WorkerIncrement`] part
    /// needs (written only when there are some).
    pub(crate) fn deps_file(&self) -> String {
        format!(
            "{:020}-{:020}-w{:05}-{:016x}.deps",
            self.from, self.to, self.worker, self.operator
        )
    }

    /// Parses a part's (or its deps file's) name, also a `.tmp` one; `None` for anything
    /// else.
    pub(crate) fn parse(file: &str) -> Option<PartName> {
        let file = file.strip_suffix(".tmp").unwrap_or(file);
        let stem = file
            .strip_suffix(".part")
            .or_else(|| file.strip_suffix(".deps"))?;
        let mut it = stem.split('-');
        let from = it.next()?.parse().ok()?;
        let to = it.next()?.parse().ok()?;
        let worker = it.next()?.strip_prefix('w')?.parse().ok()?;
        let operator = u64::from_str_radix(it.next()?, 16).ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(PartName {
            from,
            to,
            worker,
            operator,
        })
    }

    fn covers(&self, id: u64) -> bool {
        self.from <= id && id <= self.to
    }
}

/// What a part file holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct PartFile {
    pub(crate) operator: String,
    pub(crate) worker: u32,
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) state: SnapshotState,
}

/// One part of a completed checkpoint, as its completion record lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// The file, under `parts/`.
    pub file: String,
    /// The operator (`name@address`).
    pub operator: String,
    /// The worker that wrote it.
    pub worker: u32,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A checkpoint's completion record: it exists only if every part listed is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// The job name given to `execute`.
    pub job: String,
    /// The checkpoint's id: its epoch. Every record of epochs `<= id` is reflected in it.
    pub id: u64,
    /// The job's parallelism when it was taken.
    pub parallelism: u32,
    /// The job's key groups (max parallelism); a restore needs the same number.
    pub key_groups: u32,
    /// True for the checkpoint taken when the job ended or was stopped (a savepoint).
    pub savepoint: bool,
    /// Every part.
    pub parts: Vec<PartRef>,
    /// The parts' total size.
    pub bytes: u64,
}

impl CheckpointMetadata {
    fn file(id: u64) -> String {
        format!("{id:020}.meta")
    }
}

/// A checkpoint loaded for restore: every operator's parts by the worker that wrote them.
#[derive(Debug)]
pub(crate) struct Restored {
    pub(crate) meta: CheckpointMetadata,
    pub(crate) operators: BTreeMap<String, Vec<Option<SnapshotState>>>,
    /// The earlier parts increments and keyed changes stand on, oldest first, by operator
    /// and worker.
    pub(crate) earlier: BTreeMap<(String, u32), Vec<SnapshotState>>,
}

impl Restored {
    pub(crate) fn id(&self) -> u64 {
        self.meta.id
    }

    pub(crate) fn parallelism(&self) -> usize {
        self.meta.parallelism as usize
    }

    /// The parts of `operator`, indexed by the worker that wrote them.
    pub(crate) fn parts(&self, operator: &str) -> Option<&[Option<SnapshotState>]> {
        self.operators.get(operator).map(Vec::as_slice)
    }

    /// The earlier parts of `operator` on `worker`, oldest first.
    pub(crate) fn earlier(&self, operator: &str, worker: usize) -> &[SnapshotState] {
        self.earlier
            .get(&(operator.to_string(), worker as u32))
            .map_or(&[], Vec::as_slice)
    }
}

/// The store, shared by every worker of a process.
pub(crate) struct CheckpointStore {
    storage: Arc<dyn CheckpointStorage>,
    job: String,
    keep: usize,
    // When this process began writing each part of a pending checkpoint (by `from`), so the
    // coordinator can log how long a checkpoint took. Locked once per part write.
    started: Mutex<BTreeMap<u64, Instant>>,
}

impl CheckpointStore {
    pub(crate) fn new(storage: Arc<dyn CheckpointStorage>, job: &str, keep: usize) -> Self {
        CheckpointStore {
            storage,
            job: job.to_string(),
            keep: keep.max(1),
            started: Mutex::new(BTreeMap::new()),
        }
    }

    fn started(&self) -> MutexGuard<'_, BTreeMap<u64, Instant>> {
        match self.started.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Writes one part durably: `.tmp`, fsync, rename. Returns its size.
    pub(crate) fn write_part(&self, part: &PartFile) -> Result<u64, CheckpointError> {
        self.started().entry(part.from).or_insert_with(Instant::now);
        let name = PartName {
            from: part.from,
            to: part.to,
            worker: part.worker,
            operator: operator_hash(&part.operator),
        };
        let earlier = part.state.earlier();
        if !earlier.is_empty() {
            // Before the part: a part that is there always has its deps file.
            let deps = envelope(&earlier, || name.deps_file())?;
            self.write_durably(&format!("{PARTS}/{}", name.deps_file()), &deps)?;
        }
        PART_BUFFER.with_borrow_mut(|buf| {
            envelope_into(part, || name.file(), buf)?;
            let written = self.write_durably(&format!("{PARTS}/{}", name.file()), buf);
            let len = buf.len() as u64;
            if buf.capacity() > KEEP_PART_BUFFER {
                *buf = Vec::new();
            }
            written.map(|()| len)
        })
    }

    /// Writes `path` as `.tmp`, fsyncs and renames it (durable once its directory is
    /// fsynced).
    fn write_durably(&self, path: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let tmp = format!("{path}.tmp");
        self.storage
            .write(&tmp, bytes)
            .map_err(io_err(format!("writing {tmp}")))?;
        self.storage
            .sync(&tmp)
            .map_err(io_err(format!("fsync {tmp}")))?;
        self.storage
            .rename(&tmp, path)
            .map_err(io_err(format!("renaming {tmp}")))
    }

    /// Reads an enveloped file and decodes it.
    fn read_enveloped<T: for<'de> Deserialize<'de>>(
        &self,
        path: String,
    ) -> Result<T, CheckpointError> {
        let bytes = self
            .storage
            .read(&path)
            .map_err(io_err(format!("reading {path}")))?;
        let payload = open_envelope(&path, &bytes)?;
        bincode::deserialize(payload).map_err(|e| CheckpointError::Corrupt {
            path,
            detail: e.to_string(),
        })
    }

    /// The earlier increments a part's deps file names (none without one).
    fn read_deps(&self, name: &PartName, listed: &[String]) -> Result<Vec<u64>, CheckpointError> {
        let file = name.deps_file();
        if !listed.contains(&file) {
            return Ok(Vec::new());
        }
        self.read_enveloped(format!("{PARTS}/{file}"))
    }

    fn list_parts(&self) -> Result<Vec<(PartName, String)>, CheckpointError> {
        Ok(self.list_parts_and_deps()?.0)
    }

    /// The parts, and the deps files.
    #[allow(clippy::type_complexity)]
    fn list_parts_and_deps(
        &self,
    ) -> Result<(Vec<(PartName, String)>, Vec<String>), CheckpointError> {
        let files = self
            .storage
            .list(PARTS)
            .map_err(io_err(format!("listing {PARTS}")))?;
        let deps = files
            .iter()
            .filter(|f| f.ends_with(".deps"))
            .cloned()
            .collect();
        let parts = files
            .into_iter()
            .filter(|f| f.ends_with(".part"))
            .filter_map(|f| PartName::parse(&f).map(|n| (n, f)))
            .collect();
        Ok((parts, deps))
    }

    /// The final checkpoint's id: above every epoch any operator's final part (of this
    /// run: from `base` on) says it reached, and above `after` (the last checkpoint
    /// completed). An error if some operator wrote no final part.
    pub(crate) fn final_id(
        &self,
        expected: &[(String, u32)],
        base: u64,
        after: Option<u64>,
    ) -> Result<u64, CheckpointError> {
        let parts = self.list_parts()?;
        let mut id = after.map_or(0, |a| a.saturating_add(1));
        for (op, worker) in expected {
            let h = operator_hash(op);
            let from = parts
                .iter()
                .filter(|(n, _)| {
                    n.operator == h && n.worker == *worker && n.to == u64::MAX && n.from >= base
                })
                .map(|(n, _)| n.from)
                .max()
                .ok_or_else(|| CheckpointError::Incomplete {
                    id,
                    missing: format!("{op} on worker {worker} (final)"),
                })?;
            id = id.max(from);
        }
        Ok(id)
    }

    /// Records checkpoint `id` complete if every expected part covering it is there:
    /// fsyncs the parts directory and writes the record atomically. Never records a
    /// checkpoint with a part missing. Only parts of this run count (from its first epoch,
    /// `base`, on): a final part of an earlier run also covers later epochs, but holds that
    /// run's state.
    pub(crate) fn complete(
        &self,
        id: u64,
        base: u64,
        expected: &[(String, u32)],
        parallelism: usize,
        key_groups: u32,
        savepoint: bool,
    ) -> Result<CheckpointMetadata, CheckpointError> {
        let (parts, deps) = self.list_parts_and_deps()?;
        let mut refs = Vec::with_capacity(expected.len());
        let mut total = 0;
        for (op, worker) in expected {
            let h = operator_hash(op);
            let Some((name, file)) = parts.iter().find(|(n, _)| {
                n.operator == h && n.worker == *worker && n.from >= base && n.covers(id)
            }) else {
                return Err(CheckpointError::Incomplete {
                    id,
                    missing: format!("{op} on worker {worker}"),
                });
            };
            // A writer's increment, or keyed changes, come with the earlier parts they
            // name, oldest first.
            let mut files = Vec::new();
            for e in self.read_deps(name, &deps)? {
                let Some((_, earlier)) = parts.iter().find(|(n, _)| {
                    n.operator == h && n.worker == *worker && n.from >= base && n.from == e
                }) else {
                    return Err(CheckpointError::Incomplete {
                        id,
                        missing: format!("{op} on worker {worker} (its increment of {e})"),
                    });
                };
                files.push(earlier.clone());
            }
            files.push(file.clone());
            for file in files {
                let path = format!("{PARTS}/{file}");
                let bytes = self
                    .storage
                    .size(&path)
                    .map_err(io_err(format!("size of {path}")))?;
                total += bytes;
                refs.push(PartRef {
                    file,
                    operator: op.clone(),
                    worker: *worker,
                    bytes,
                });
            }
        }
        // The parts' renames must be durable before a record points at them.
        self.storage
            .sync_dir(PARTS)
            .map_err(io_err(format!("fsync {PARTS}/")))?;
        let meta = CheckpointMetadata {
            job: self.job.clone(),
            id,
            parallelism: parallelism as u32,
            key_groups,
            savepoint,
            parts: refs,
            bytes: total,
        };
        let bytes = envelope(&meta, || CheckpointMetadata::file(id))?;
        let path = format!("{CHECKPOINTS}/{}", CheckpointMetadata::file(id));
        self.write_durably(&path, &bytes)?;
        self.storage
            .sync_dir(CHECKPOINTS)
            .map_err(io_err(format!("fsync {CHECKPOINTS}/")))?;
        Ok(meta)
    }

    /// How long checkpoint `id` took in this process: from the first part write that went
    /// into it until now. Forgets the write times it covers.
    pub(crate) fn take_duration(&self, meta: &CheckpointMetadata) -> Option<Duration> {
        let mut started = self.started();
        let first = meta
            .parts
            .iter()
            .filter_map(|p| PartName::parse(&p.file))
            .filter_map(|n| started.get(&n.from).copied())
            .min();
        let later = started.split_off(&meta.id.saturating_add(1));
        *started = later;
        first.map(|t| t.elapsed())
    }

    fn list_metas(&self) -> Result<Vec<(u64, String)>, CheckpointError> {
        let files = self
            .storage
            .list(CHECKPOINTS)
            .map_err(io_err(format!("listing {CHECKPOINTS}")))?;
        let mut metas: Vec<(u64, String)> = files
            .into_iter()
            .filter_map(|f| {
                let id = f.strip_suffix(".meta")?.parse().ok()?;
                Some((id, f))
            })
            .collect();
        metas.sort();
        Ok(metas)
    }

    fn read_meta(&self, file: &str) -> Result<CheckpointMetadata, CheckpointError> {
        self.read_enveloped(format!("{CHECKPOINTS}/{file}"))
    }

    /// Keeps the newest `keep` records and removes parts no kept record lists, among those
    /// of epochs up to `upto` (all of them if `None`: at start-up, nothing is being
    /// written). Failures to remove are logged — garbage left behind is removed next time —
    /// except at start-up, where a leftover part that cannot be removed is an error.
    pub(crate) fn retain(&self, upto: Option<u64>) -> Result<(), CheckpointError> {
        let metas = self.list_metas()?;
        let cut = metas.len().saturating_sub(self.keep);
        for (_, file) in &metas[..cut] {
            let path = format!("{CHECKPOINTS}/{file}");
            if let Err(e) = self.storage.remove(&path) {
                tracing::warn!(path, error = %e, "could not remove an old checkpoint record");
            }
        }
        let mut referenced = BTreeSet::new();
        for (_, file) in &metas[cut..] {
            match self.read_meta(file) {
                Ok(meta) => referenced.extend(meta.parts.into_iter().map(|p| p.file)),
                // A record we cannot read protects nothing; restore skips it too.
                Err(e) => tracing::warn!(error = %e, "unreadable checkpoint record"),
            }
        }
        let files = self
            .storage
            .list(PARTS)
            .map_err(io_err(format!("listing {PARTS}")))?;
        for file in files {
            let garbage = match PartName::parse(&file) {
                // A deps file goes with its part.
                Some(n) => !referenced.contains(&n.file()) && upto.is_none_or(|u| n.from <= u),
                // Not ours: leave it.
                None => false,
            };
            if garbage {
                let path = format!("{PARTS}/{file}");
                match self.storage.remove(&path) {
                    Ok(()) => {}
                    // At start-up a leftover of a crashed run must go: the new run's epochs
                    // start after the newest checkpoint, so the leftover's epochs are the
                    // new run's too, and it could stand in for a part the run failed to
                    // write.
                    Err(source) if upto.is_none() => {
                        return Err(CheckpointError::Io {
                            context: format!("removing the crashed run's leftover {path}"),
                            source,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(path, error = %e, "could not remove an old checkpoint part")
                    }
                }
            }
        }
        if upto.is_none() {
            for file in self
                .storage
                .list(CHECKPOINTS)
                .map_err(io_err(format!("listing {CHECKPOINTS}")))?
            {
                if file.ends_with(".meta.tmp") {
                    let _ = self.storage.remove(&format!("{CHECKPOINTS}/{file}"));
                }
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint whose every part reads back whole, newest first; an
    /// unreadable one is skipped with a warning (the one before it is still good).
    pub(crate) fn load_latest(&self) -> Result<Option<Restored>, CheckpointError> {
        let metas = self.list_metas()?;
        for (id, file) in metas.iter().rev() {
            match self.load(file) {
                Ok(r) => return Ok(Some(r)),
                Err(e @ CheckpointError::Incompatible { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(checkpoint = id, error = %e, "skipping an unreadable checkpoint");
                }
            }
        }
        Ok(None)
    }

    fn load(&self, file: &str) -> Result<Restored, CheckpointError> {
        let meta = self.read_meta(file)?;
        if meta.job != self.job {
            return Err(CheckpointError::Incompatible {
                id: meta.id,
                detail: format!(
                    "it belongs to job {:?}, not {:?}: use another directory",
                    meta.job, self.job
                ),
            });
        }
        let mut operators: BTreeMap<String, Vec<Option<SnapshotState>>> = BTreeMap::new();
        let mut earlier: BTreeMap<(String, u32), Vec<SnapshotState>> = BTreeMap::new();
        for p in &meta.parts {
            let path = format!("{PARTS}/{}", p.file);
            let part: PartFile = self.read_enveloped(path.clone())?;
            if part.operator != p.operator || part.worker != p.worker {
                return Err(CheckpointError::Corrupt {
                    path,
                    detail: format!("holds {} of worker {}", part.operator, part.worker),
                });
            }
            // A part that does not cover the checkpoint is an earlier part of a writer's
            // increments or of keyed changes (listed before the part that names it).
            if !(part.from <= meta.id && meta.id <= part.to) {
                if matches!(part.state, SnapshotState::Source { .. }) {
                    return Err(CheckpointError::Corrupt {
                        path,
                        detail: format!("does not cover checkpoint {}", meta.id),
                    });
                }
                earlier
                    .entry((part.operator, part.worker))
                    .or_default()
                    .push(part.state);
                continue;
            }
            let slots = operators
                .entry(part.operator)
                .or_insert_with(|| vec![None; meta.parallelism as usize]);
            if let Some(slot) = slots.get_mut(part.worker as usize) {
                *slot = Some(part.state);
            }
        }
        Ok(Restored {
            meta,
            operators,
            earlier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::storage::{FaultyStorage, MemoryStorage, StorageOp};

    fn part(op: &str, worker: u32, from: u64, to: u64) -> PartFile {
        PartFile {
            operator: op.to_string(),
            worker,
            from,
            to,
            state: SnapshotState::Worker(vec![worker as u8; 10]),
        }
    }

    fn expected() -> Vec<(String, u32)> {
        vec![("a@[1]".into(), 0), ("a@[1]".into(), 1)]
    }

    #[test]
    fn names_round_trip() {
        let n = PartName {
            from: 5,
            to: u64::MAX,
            worker: 3,
            operator: operator_hash("Sum@[0, 1]"),
        };
        assert_eq!(PartName::parse(&n.file()), Some(n));
        assert_eq!(PartName::parse(&format!("{}.tmp", n.file())), Some(n));
        assert_eq!(PartName::parse("x.part"), None);
    }

    fn increment(worker: u32, at: u64, bytes: u8, earlier: Vec<u64>) -> PartFile {
        PartFile {
            operator: "w@[2]".to_string(),
            worker,
            from: at,
            to: at,
            state: SnapshotState::WorkerIncrement {
                bytes: vec![bytes],
                earlier,
            },
        }
    }

    #[test]
    fn increments_bring_the_earlier_ones_they_name() {
        let mem = MemoryStorage::new();
        let store = CheckpointStore::new(Arc::new(mem.clone()), "job", 1);
        let expected = vec![("w@[2]".to_string(), 0)];
        store
            .write_part(&increment(0, 3, 3, vec![]))
            .expect("write");
        store.complete(3, 0, &expected, 1, 8, false).expect("3");
        store
            .write_part(&increment(0, 5, 5, vec![3]))
            .expect("write");
        store.complete(5, 0, &expected, 1, 8, false).expect("5");
        // 7 names 3 and 5; 5 is kept by 7's record even with only one record kept.
        store
            .write_part(&increment(0, 7, 7, vec![3, 5]))
            .expect("write");
        let meta = store.complete(7, 0, &expected, 1, 8, false).expect("7");
        assert_eq!(meta.parts.len(), 3);
        store.retain(Some(7)).expect("retain");
        let r = store.load_latest().expect("load").expect("some");
        assert_eq!(r.id(), 7);
        assert_eq!(
            r.earlier("w@[2]", 0),
            &[
                increment(0, 3, 3, vec![]).state,
                increment(0, 5, 5, vec![3]).state
            ]
        );
        assert!(matches!(
            r.parts("w@[2]").expect("op")[0],
            Some(SnapshotState::WorkerIncrement { ref bytes, .. }) if bytes == &vec![7]
        ));
        // 9 needs 3 no more: 3's and 7's parts go once 9 is the record kept.
        store
            .write_part(&increment(0, 9, 9, vec![5]))
            .expect("write");
        store.complete(9, 0, &expected, 1, 8, false).expect("9");
        store.retain(Some(9)).expect("retain");
        let mut files = mem.list(PARTS).expect("list");
        files.sort();
        let names: Vec<u64> = files
            .iter()
            .filter(|f| f.ends_with(".part"))
            .map(|f| PartName::parse(f).expect("name").from)
            .collect();
        assert_eq!(names, vec![5, 9]);
        // Deps files go with their parts: 5's and 9's stay.
        assert_eq!(files.iter().filter(|f| f.ends_with(".deps")).count(), 2);
        // An increment naming a part that is not there is no checkpoint.
        store
            .write_part(&increment(0, 11, 11, vec![4]))
            .expect("write");
        let missing = store.complete(11, 0, &expected, 1, 8, false).unwrap_err();
        assert!(matches!(
            missing,
            CheckpointError::Incomplete { id: 11, .. }
        ));
    }

    #[test]
    fn complete_needs_every_part_and_retains_the_newest() {
        let mem = MemoryStorage::new();
        let store = CheckpointStore::new(Arc::new(mem.clone()), "job", 2);
        store.write_part(&part("a@[1]", 0, 3, 3)).expect("write");
        let missing = store.complete(3, 0, &expected(), 2, 8, false).unwrap_err();
        assert!(matches!(missing, CheckpointError::Incomplete { id: 3, .. }));
        assert!(store.list_metas().expect("list").is_empty());
        // A range part of worker 1 covers 3 and 7; worker 0 writes 7 on its own.
        store.write_part(&part("a@[1]", 1, 3, 7)).expect("write");
        store
            .complete(3, 0, &expected(), 2, 8, false)
            .expect("complete");
        store.write_part(&part("a@[1]", 0, 7, 7)).expect("write");
        store
            .complete(7, 0, &expected(), 2, 8, false)
            .expect("complete");
        store
            .write_part(&part("a@[1]", 0, 9, u64::MAX))
            .expect("write");
        store
            .write_part(&part("a@[1]", 1, 12, u64::MAX))
            .expect("write");
        let f = store.final_id(&expected(), 0, Some(7)).expect("final");
        assert_eq!(f, 12);
        store
            .complete(f, 0, &expected(), 2, 8, true)
            .expect("final");
        // The next run (from epoch 13) may not use this run's final parts.
        let next = store
            .complete(20, 13, &expected(), 2, 8, false)
            .unwrap_err();
        assert!(matches!(next, CheckpointError::Incomplete { id: 20, .. }));
        assert!(store.final_id(&expected(), 13, Some(12)).is_err());
        store.retain(Some(f)).expect("retain");
        let metas: Vec<u64> = store
            .list_metas()
            .expect("list")
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(metas, vec![7, 12]);
        // Checkpoint 3's own part went with it; the range part is still listed by 7.
        let parts = mem.list(PARTS).expect("list");
        assert_eq!(parts.len(), 4, "{parts:?}");
        let r = store.load_latest().expect("load").expect("some");
        assert_eq!(r.id(), 12);
        assert!(r.meta.savepoint);
        let slots = r.parts("a@[1]").expect("operator");
        assert_eq!(slots[1], Some(SnapshotState::Worker(vec![1; 10])));
    }

    #[test]
    fn a_failed_step_records_nothing_and_restore_falls_back() {
        let mem = MemoryStorage::new();
        let faulty = Arc::new(FaultyStorage::new(Arc::new(mem.clone())));
        let store = CheckpointStore::new(faulty.clone(), "job", 3);
        for w in 0..2 {
            store.write_part(&part("a@[1]", w, 1, 1)).expect("write");
        }
        store
            .complete(1, 0, &expected(), 2, 8, false)
            .expect("complete");
        for w in 0..2 {
            store.write_part(&part("a@[1]", w, 2, 2)).expect("write");
        }
        // The record's rename fails: checkpoint 2 does not exist.
        faulty.fail_nth(StorageOp::Rename, faulty.calls(StorageOp::Rename) + 1);
        assert!(store.complete(2, 0, &expected(), 2, 8, false).is_err());
        assert_eq!(store.load_latest().expect("load").map(|r| r.id()), Some(1));
        // A full disk tears a part: it never becomes a `.part`.
        faulty.disk_full_after(5);
        let full = store.write_part(&part("a@[1]", 0, 4, 4)).unwrap_err();
        let CheckpointError::Io { source, .. } = full else {
            panic!("an I/O error");
        };
        assert_eq!(source.raw_os_error(), Some(28));
        faulty.heal();
        assert!(store.complete(4, 0, &expected(), 2, 8, false).is_err());
        // Start-up clean-up removes the torn and unlisted files.
        store.retain(None).expect("retain");
        let left = mem.list(PARTS).expect("list");
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(mem.list(CHECKPOINTS).expect("list").len() == 1);
        // A rotten part makes restore fall back to nothing older here.
        mem.write(&format!("{PARTS}/{}", left[0]), b"RILLCKPT garbage")
            .expect("write");
        assert!(store.load_latest().expect("load").is_none());
    }
}
