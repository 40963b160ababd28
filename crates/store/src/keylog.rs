//! [`KeyLog`]: remembered keys with an expiry time each (the broker's message-deduplication
//! caches), kept in a small append-only log that is rewritten once most of it is dead.
//!
//! The store does not know what a key means or when it is forgotten. It appends records,
//! replays them in order at [`KeyLog::open`], and starts over from a compacted copy when its
//! owner hands it the live keys ([`KeyLog::rewrite`]). Forgetting is the owner's replay rule
//! (e.g. "the newest N keys, unless expired"), so the log needs no delete records.
//!
//! # A key is written after the data it stands for
//!
//! A key must never reach the disk without its message: after a crash a publisher retries
//! what was not confirmed, and a key that survived without its message would drop the retry.
//! So every record names the group-commit round its message was written in (`after_epoch`
//! of [`KeyLog::append`]); the [`SyncGroup`](crate::SyncGroup) writes key logs only after the
//! round's queue logs are fdatasynced, and a round writes the longest prefix of buffered
//! records whose `after_epoch` it has reached (records stay in log order). Until then they
//! wait in a userspace buffer: nothing is written outside a round, so a `kill -9` cannot
//! leave a key on disk whose message was not written first.
//!
//! # Generations
//!
//! One file per generation, `NNNNNNNNNN.keys`. A generation starts with a snapshot marker
//! naming how many key records after it form its snapshot (0 for the first generation).
//! [`KeyLog::rewrite`] starts the next generation with the live keys already on disk as its
//! snapshot; records still waiting for their round follow it. Older generations are deleted
//! in the first round after the one that fdatasynced the new snapshot. [`KeyLog::open`]
//! replays the newest generation whose snapshot is complete, so a crash during a rewrite
//! leaves the previous generation in charge. See `docs/storage.md` for the byte layout.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::backend::{FileBackend, OpenMode, StorageBackend, StorageFile};
use crate::error::IoContext;
use crate::format::{self, Header, HEADER_LEN, KEY_MAGIC, MAX_PAYLOAD, RECORD_HEADER_LEN};
use crate::{StoreError, SyncBatch, SyncPolicy};

const KIND_KEY: u8 = 1;
const KIND_SNAPSHOT: u8 = 2;
/// Payload bytes before the key: kind u8 and value u64 (expiry, or the snapshot's count).
const FIXED: usize = 9;

/// One remembered key, as replayed by [`KeyLog::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's bytes (opaque to the store).
    pub key: Vec<u8>,
    /// When the key is forgotten (ms since the Unix epoch); `None`: never by time.
    pub expires_at_ms: Option<u64>,
}

/// A shared [`KeyLog`]: its owner appends under this lock, the [`SyncGroup`](crate::SyncGroup)
/// thread locks it only to write buffers, never during fdatasync.
pub type SharedKeyLog = Arc<parking_lot::Mutex<KeyLog>>;

/// Where a buffered record ends and when it may be written.
#[derive(Debug, Clone, Copy)]
struct Bound {
    /// End of the record in `buf`.
    end: usize,
    /// The sync round that must have been reached (its queue logs fdatasynced) first.
    after: u64,
    /// The sequence number [`KeyLog::append`] returned; `None` for the header, the snapshot
    /// marker and the snapshot's records.
    seq: Option<u64>,
    /// Writing this completes the generation's snapshot.
    ends_snapshot: bool,
}

/// The log of one deduplication cache. See the module docs.
///
/// ```
/// use rill_store::{KeyLog, KeyRecord, SyncPolicy};
/// let dir = tempfile::tempdir()?;
/// let (mut log, recovered) = KeyLog::open(dir.path(), SyncPolicy::Always)?;
/// assert!(recovered.is_empty());
/// // A key whose message went out in sync round 0 (i.e. needs no round), never expiring.
/// log.append(b"order-17", None, 0)?;
/// log.sync()?;
/// drop(log);
/// let (_, recovered) = KeyLog::open(dir.path(), SyncPolicy::Always)?;
/// assert_eq!(recovered, vec![KeyRecord { key: b"order-17".to_vec(), expires_at_ms: None }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct KeyLog {
    dir: PathBuf,
    policy: SyncPolicy,
    backend: Arc<dyn StorageBackend>,
    /// The generation being written.
    gen: u32,
    /// Its file, once the first write created it.
    file: Option<Arc<dyn StorageFile>>,
    /// Bytes of the generation's file.
    len: u64,
    /// Encoded records not written yet, in log order.
    buf: Vec<u8>,
    bounds: VecDeque<Bound>,
    /// Key records in the current generation (snapshot and appended, written or not).
    records: u64,
    next_seq: u64,
    /// Records appended with a smaller sequence number are in a file.
    written_below: u64,
    /// The generation's snapshot is not completely written: older generations must stay.
    snapshot_unwritten: bool,
    /// Older generations, to delete once the current snapshot is written and synced.
    superseded: Vec<PathBuf>,
    /// Older generations whose replacement was synced by an earlier round: delete now.
    deletable: Vec<PathBuf>,
    data_dirty: bool,
    dir_dirty: bool,
    /// The first write/sync failure; once set, the log refuses writes (see [`StoreError::Failed`]).
    failure: Arc<OnceLock<String>>,
    destroyed: bool,
}

fn gen_name(id: u32) -> String {
    format!("{id:010}.keys")
}

fn parse_gen_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".keys")?;
    if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Appends one record; `key.len()` was checked against [`MAX_PAYLOAD`].
fn encode(kind: u8, value: u64, key: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    let len = (FIXED + key.len()) as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]); // CRC, filled below
    buf.push(kind);
    buf.extend_from_slice(&value.to_le_bytes());
    buf.extend_from_slice(key);
    let payload = start + RECORD_HEADER_LEN as usize;
    let crc = crc32c::crc32c(&buf[payload..]);
    buf[start + 4..payload].copy_from_slice(&crc.to_le_bytes());
}

enum Parsed {
    Record {
        kind: u8,
        value: u64,
        key: Range<usize>,
        end: usize,
    },
    End,
    Invalid(String),
}

fn parse(buf: &[u8], at: usize) -> Parsed {
    let rest = buf.len().saturating_sub(at);
    if rest == 0 {
        return Parsed::End;
    }
    let rh = RECORD_HEADER_LEN as usize;
    if rest < rh {
        return Parsed::Invalid(format!("torn record header ({rest} bytes)"));
    }
    let len = format::le_u32(&buf[at..]) as usize;
    let crc = format::le_u32(&buf[at + 4..]);
    if len < FIXED {
        return Parsed::Invalid(format!("invalid record length {len}"));
    }
    if len > rest - rh {
        return Parsed::Invalid(format!(
            "record length {len} runs past the end of the file ({} bytes left): torn write",
            rest - rh
        ));
    }
    let start = at + rh;
    let payload = &buf[start..start + len];
    if crc32c::crc32c(payload) != crc {
        return Parsed::Invalid("CRC mismatch".to_string());
    }
    let kind = payload[0];
    match kind {
        KIND_KEY => {}
        KIND_SNAPSHOT if len == FIXED => {}
        _ => return Parsed::Invalid(format!("invalid record kind {kind} of length {len}")),
    }
    Parsed::Record {
        kind,
        value: format::le_u64(&payload[1..FIXED]),
        key: start + FIXED..start + len,
        end: start + len,
    }
}

/// What one generation file holds.
struct Generation {
    id: u32,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    file_len: u64,
    /// End of the last valid record, and why parsing stopped there if not at the end.
    valid_len: u64,
    invalid: Option<String>,
    records: Vec<KeyRecord>,
    /// It starts with a snapshot marker and all the snapshot's records are there.
    complete: bool,
}

impl KeyLog {
    /// Opens (creating if missing) the key log in `dir` and replays it: the newest generation
    /// whose snapshot is complete, with a torn or corrupt tail truncated (and a warning naming
    /// the file and offset). Other generations are deleted. Records come back in log order.
    /// Never panics on any file content.
    pub fn open(dir: &Path, policy: SyncPolicy) -> Result<(KeyLog, Vec<KeyRecord>), StoreError> {
        KeyLog::open_with(dir, policy, Arc::new(FileBackend))
    }

    /// [`KeyLog::open`] on a given storage backend (tests simulate crashes this way).
    pub fn open_with(
        dir: &Path,
        policy: SyncPolicy,
        backend: Arc<dyn StorageBackend>,
    ) -> Result<(KeyLog, Vec<KeyRecord>), StoreError> {
        backend.create_dir_all(dir).ctx(dir)?;
        let mut ids: Vec<u32> = backend
            .list_dir(dir)
            .ctx(dir)?
            .iter()
            .filter_map(|n| n.to_str().and_then(parse_gen_name))
            .collect();
        ids.sort_unstable();
        let mut log = KeyLog {
            dir: dir.to_path_buf(),
            policy,
            backend,
            gen: 0,
            file: None,
            len: 0,
            buf: Vec::new(),
            bounds: VecDeque::new(),
            records: 0,
            // Recovered records count as written with sequence number 0.
            next_seq: 1,
            written_below: 1,
            snapshot_unwritten: false,
            superseded: Vec::new(),
            deletable: Vec::new(),
            data_dirty: false,
            dir_dirty: false,
            failure: Arc::default(),
            destroyed: false,
        };
        let mut complete = None;
        let mut fallback = None;
        for &id in ids.iter().rev() {
            let Some(g) = log.read_generation(id)? else {
                continue;
            };
            if g.complete {
                complete = Some(g);
                break;
            }
            if fallback.is_none() {
                fallback = Some(g);
            }
        }
        let chosen = complete.or(fallback);
        let chosen_id = chosen.as_ref().map(|g| g.id);
        for &id in &ids {
            if Some(id) == chosen_id {
                continue;
            }
            let path = dir.join(gen_name(id));
            if chosen_id.is_some_and(|c| id > c) {
                tracing::warn!(file = %path.display(), "removing a key log generation whose rewrite never completed");
            } else {
                tracing::debug!(file = %path.display(), "removing a superseded key log generation");
            }
            log.remove(&path)?;
        }
        let next_id = ids.last().map_or(Ok(0), |&m| {
            m.checked_add(1)
                .ok_or_else(|| StoreError::corrupt(dir, "key log generation numbers exhausted"))
        })?;
        let Some(g) = chosen else {
            log.begin_generation(next_id, &[]);
            return Ok((log, Vec::new()));
        };
        if let Some(reason) = &g.invalid {
            tracing::warn!(
                file = %g.path.display(),
                offset = g.valid_len,
                lost_bytes = g.file_len - g.valid_len,
                reason = %reason,
                "truncating key log at the last valid record"
            );
            g.file.set_len(g.valid_len).ctx(&g.path)?;
        }
        if !g.complete {
            // Never append to a generation without a complete snapshot: its records would
            // not be replayed. Its keys become the snapshot of a new one.
            tracing::warn!(file = %g.path.display(), "key log generation has an incomplete snapshot; rewriting it");
            let snapshot: Vec<(&[u8], Option<u64>)> = g
                .records
                .iter()
                .map(|r| (r.key.as_slice(), r.expires_at_ms))
                .collect();
            log.begin_generation(next_id, &snapshot);
            log.superseded.push(g.path.clone());
            return Ok((log, g.records));
        }
        log.gen = g.id;
        log.len = g.valid_len;
        log.records = g.records.len() as u64;
        log.file = Some(g.file);
        Ok((log, g.records))
    }

    /// Reads generation `id`; `None` if its header never reached the disk (the file is
    /// removed: nothing in it was ever synced).
    fn read_generation(&mut self, id: u32) -> Result<Option<Generation>, StoreError> {
        let path = self.dir.join(gen_name(id));
        let file = self.backend.open(&path, OpenMode::Existing).ctx(&path)?;
        let file_len = file.len().ctx(&path)?;
        let len = usize::try_from(file_len)
            .map_err(|_| StoreError::corrupt(&path, "key log larger than memory"))?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, 0).ctx(&path)?;
        if format::check_header(&data, KEY_MAGIC, &path)? == Header::Torn {
            tracing::warn!(file = %path.display(), len = file_len, "key log header is torn; removing the empty generation");
            self.remove(&path)?;
            return Ok(None);
        }
        let mut at = HEADER_LEN as usize;
        let mut records = Vec::new();
        let mut snapshot = None;
        let invalid = loop {
            match parse(&data, at) {
                Parsed::End => break None,
                Parsed::Invalid(reason) => break Some(reason),
                Parsed::Record {
                    kind,
                    value,
                    key,
                    end,
                } => {
                    match (kind, snapshot.is_none()) {
                        (KIND_SNAPSHOT, true) => snapshot = Some(value),
                        (KIND_SNAPSHOT, false) => {
                            break Some("snapshot marker inside a generation".to_string())
                        }
                        (_, true) => {
                            break Some("generation does not start with a snapshot marker".into())
                        }
                        (_, false) => records.push(KeyRecord {
                            key: data[key].to_vec(),
                            expires_at_ms: (value != 0).then_some(value),
                        }),
                    }
                    at = end;
                }
            }
        };
        let complete = snapshot.is_some_and(|n| records.len() as u64 >= n);
        Ok(Some(Generation {
            id,
            path,
            file,
            file_len,
            valid_len: at as u64,
            invalid,
            records,
            complete,
        }))
    }

    /// Starts generation `id` in the buffer: header, snapshot marker, snapshot records. Its
    /// file is created by the first write.
    fn begin_generation(&mut self, id: u32, snapshot: &[(&[u8], Option<u64>)]) {
        self.gen = id;
        self.file = None;
        self.len = 0;
        self.buf.clear();
        self.bounds.clear();
        self.buf.extend_from_slice(&format::header(KEY_MAGIC));
        encode(KIND_SNAPSHOT, snapshot.len() as u64, &[], &mut self.buf);
        for (key, expires) in snapshot {
            encode(KIND_KEY, expiry_value(*expires), key, &mut self.buf);
        }
        self.bounds.push_back(Bound {
            end: self.buf.len(),
            after: 0,
            seq: None,
            ends_snapshot: true,
        });
        self.records = snapshot.len() as u64;
        self.snapshot_unwritten = true;
    }

    fn path(&self) -> PathBuf {
        self.dir.join(gen_name(self.gen))
    }

    /// Buffers a key (no syscall). It is written by the first sync round at or after
    /// `after_epoch` (the round its message was written in; 0 if none). Returns the record's
    /// sequence number, for [`KeyLog::rewrite`].
    pub fn append(
        &mut self,
        key: &[u8],
        expires_at_ms: Option<u64>,
        after_epoch: u64,
    ) -> Result<u64, StoreError> {
        self.check_writable()?;
        check_key(key)?;
        encode(KIND_KEY, expiry_value(expires_at_ms), key, &mut self.buf);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bounds.push_back(Bound {
            end: self.buf.len(),
            after: after_epoch,
            seq: Some(seq),
            ends_snapshot: false,
        });
        self.records += 1;
        Ok(seq)
    }

    /// Starts a new generation whose snapshot is `live`: (key, expiry, sequence number from
    /// [`KeyLog::append`], or 0 for a key [`KeyLog::open`] recovered), in the order they are
    /// to be replayed. Entries whose record is not written yet are left out: their records
    /// move over, after the snapshot, still waiting for their round. Only encodes into the
    /// buffer (no syscall); the next round writes the new file and the one after deletes the
    /// old ones.
    pub fn rewrite<'a>(
        &mut self,
        live: impl IntoIterator<Item = (&'a [u8], Option<u64>, u64)>,
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        let written_below = self.written_below;
        let snapshot: Vec<(&[u8], Option<u64>)> = live
            .into_iter()
            .filter(|(_, _, seq)| *seq < written_below)
            .map(|(key, expires, _)| (key, expires))
            .collect();
        for (key, _) in &snapshot {
            check_key(key)?;
        }
        let next = self.gen.checked_add(1).ok_or_else(|| {
            StoreError::corrupt(&self.dir, "key log generation numbers exhausted")
        })?;
        let old_buf = std::mem::take(&mut self.buf);
        let old_bounds = std::mem::take(&mut self.bounds);
        if self.file.is_some() {
            self.superseded.push(self.path());
        }
        self.begin_generation(next, &snapshot);
        // Appended records not written yet keep their place after the snapshot; a previous
        // snapshot that was never written is in the new one.
        let mut start = 0;
        for b in old_bounds {
            if b.seq.is_some() {
                self.buf.extend_from_slice(&old_buf[start..b.end]);
                self.bounds.push_back(Bound {
                    end: self.buf.len(),
                    ..b
                });
                self.records += 1;
            }
            start = b.end;
        }
        Ok(())
    }

    /// Key records in the current generation (its snapshot and what was appended since),
    /// written or not: with the live count, when to [`KeyLog::rewrite`].
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Records buffered and waiting for their round (tests, metrics).
    pub fn unwritten(&self) -> usize {
        self.bounds.iter().filter(|b| b.seq.is_some()).count()
    }

    /// For round `round` of a [`SyncGroup`](crate::SyncGroup): deletes generations a synced
    /// rewrite replaced, writes the buffered records whose round has come, and returns the
    /// fdatasyncs to run without holding the log's lock. A record waiting for a round that
    /// `failed` (its message may not be on disk) fails the log instead of being written.
    pub(crate) fn prepare_round(
        &mut self,
        round: u64,
        fsync: bool,
        failed: &dyn Fn(u64) -> bool,
    ) -> Result<SyncBatch, StoreError> {
        if self.destroyed {
            return Ok(SyncBatch::new(
                &self.dir,
                Vec::new(),
                false,
                fsync,
                self.backend.clone(),
                self.failure.clone(),
            ));
        }
        self.check_writable()?;
        for path in std::mem::take(&mut self.deletable) {
            self.remove(&path)?;
        }
        self.write_ready(round, failed)?;
        if !self.snapshot_unwritten {
            // Deleted by the next round, after this one has synced the snapshot.
            self.deletable.append(&mut self.superseded);
        }
        let mut files = Vec::new();
        if std::mem::take(&mut self.data_dirty) {
            if let Some(f) = &self.file {
                files.push((self.path(), f.clone()));
            }
        }
        Ok(SyncBatch::new(
            &self.dir,
            files,
            std::mem::take(&mut self.dir_dirty),
            fsync,
            self.backend.clone(),
            self.failure.clone(),
        ))
    }

    /// Writes the longest prefix of the buffer whose records may go out in round `round`.
    fn write_ready(&mut self, round: u64, failed: &dyn Fn(u64) -> bool) -> Result<(), StoreError> {
        let n = self.bounds.iter().take_while(|b| b.after <= round).count();
        let Some(last) = n.checked_sub(1).and_then(|i| self.bounds.get(i)) else {
            return Ok(());
        };
        if let Some(b) = self
            .bounds
            .iter()
            .take(n)
            .find(|b| b.after > 0 && failed(b.after))
        {
            let detail = format!(
                "a key waits for sync round {}, which failed: its message may not be on disk",
                b.after
            );
            let _ = self.failure.set(detail.clone());
            return Err(StoreError::Failed {
                path: self.dir.clone(),
                detail,
            });
        }
        let end = last.end;
        let path = self.path();
        let file = match &self.file {
            Some(f) => f.clone(),
            None => match self.backend.open(&path, OpenMode::CreateTruncate) {
                Ok(f) => {
                    self.file = Some(f.clone());
                    self.dir_dirty = true;
                    f
                }
                Err(e) => return Err(self.fail(&path, "create", e)),
            },
        };
        if let Err(e) = file.write_all_at(&self.buf[..end], self.len) {
            return Err(self.fail(&path, "write", e));
        }
        self.len += end as u64;
        self.buf.drain(..end);
        for b in self.bounds.drain(..n) {
            if let Some(seq) = b.seq {
                self.written_below = seq + 1;
            }
            if b.ends_snapshot {
                self.snapshot_unwritten = false;
            }
        }
        for b in &mut self.bounds {
            b.end -= end;
        }
        if self.buf.capacity() > 1024 * 1024 && self.buf.len() < 64 * 1024 {
            self.buf.shrink_to(64 * 1024);
        }
        self.data_dirty = true;
        Ok(())
    }

    /// Writes every buffered record whatever its round and fdatasyncs it (skipped with
    /// [`SyncPolicy::Never`]). For tests and tools: a broker lets its `SyncGroup` do this.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let fsync = self.policy != SyncPolicy::Never;
        self.prepare_round(u64::MAX, fsync, &|_| false)?.run()
    }

    /// The first write or fdatasync failure, if any: from then on appends fail with
    /// [`StoreError::Failed`] until the log is reopened.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Deletes the log's directory (its queue or exchange was deleted); later appends fail with
    /// [`StoreError::Destroyed`] and rounds do nothing. A directory already gone is fine.
    pub fn destroy_in_place(&mut self) -> Result<(), StoreError> {
        self.destroyed = true;
        self.file = None;
        self.buf = Vec::new();
        self.bounds.clear();
        self.superseded.clear();
        self.deletable.clear();
        self.backend.remove_dir_all(&self.dir).ctx(&self.dir)?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            match self.backend.sync_dir(parent) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::io(parent, e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.destroyed {
            return Err(StoreError::Destroyed {
                path: self.dir.clone(),
            });
        }
        if let Some(detail) = self.failure.get() {
            return Err(StoreError::Failed {
                path: self.dir.clone(),
                detail: detail.clone(),
            });
        }
        Ok(())
    }

    fn fail(&self, path: &Path, what: &str, e: std::io::Error) -> StoreError {
        let _ = self.failure.set(format!("{what} {}: {e}", path.display()));
        StoreError::io(path, e)
    }

    fn remove(&mut self, path: &Path) -> Result<(), StoreError> {
        match self.backend.remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.fail(path, "remove", e)),
        }
        self.dir_dirty = true;
        Ok(())
    }
}

/// 0 on disk means "no expiry"; an expiry at the epoch itself is long past, so 1 serves.
fn expiry_value(expires_at_ms: Option<u64>) -> u64 {
    expires_at_ms.map_or(0, |t| t.max(1))
}

fn check_key(key: &[u8]) -> Result<(), StoreError> {
    let len = (FIXED + key.len()) as u64;
    if len > MAX_PAYLOAD {
        return Err(StoreError::RecordTooLarge {
            size: len + u64::from(RECORD_HEADER_LEN),
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn generation_names_round_trip() {
        assert_eq!(parse_gen_name(&gen_name(42)), Some(42));
        assert_eq!(parse_gen_name("0000000042.seg"), None);
        assert_eq!(parse_gen_name("42.keys"), None);
    }

    #[test]
    fn records_parse_back_and_reject_damage() {
        let mut buf = Vec::new();
        encode(KIND_KEY, 7, b"k", &mut buf);
        match parse(&buf, 0) {
            Parsed::Record {
                kind, value, key, ..
            } => assert_eq!((kind, value, &buf[key]), (KIND_KEY, 7, &b"k"[..])),
            _ => panic!("not parsed"),
        }
        for cut in 1..buf.len() {
            assert!(
                matches!(parse(&buf[..cut], 0), Parsed::Invalid(_)),
                "cut {cut}"
            );
        }
        let mut flipped = buf.clone();
        flipped[10] ^= 1;
        assert!(matches!(parse(&flipped, 0), Parsed::Invalid(_)));
        let mut bad_marker = Vec::new();
        encode(KIND_SNAPSHOT, 1, b"x", &mut bad_marker);
        assert!(matches!(parse(&bad_marker, 0), Parsed::Invalid(_)));
    }

    use crate::backend::MemBackend;

    fn open(mem: &MemBackend) -> (KeyLog, Vec<Vec<u8>>) {
        let (log, recovered) =
            KeyLog::open_with("/x".as_ref(), SyncPolicy::Always, Arc::new(mem.clone())).unwrap();
        (log, recovered.into_iter().map(|r| r.key).collect())
    }

    fn round(log: &mut KeyLog, r: u64) {
        log.prepare_round(r, true, &|_| false)
            .unwrap()
            .run()
            .unwrap();
    }

    fn key_files(mem: &MemBackend) -> Vec<String> {
        mem.list_dir("/x".as_ref())
            .unwrap()
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".keys"))
            .collect()
    }

    #[test]
    fn records_wait_for_their_round_and_keep_their_order() {
        let mem = MemBackend::new();
        let (mut log, _) = open(&mem);
        log.append(b"a", None, 3).unwrap();
        log.append(b"b", None, 1).unwrap();
        log.append(b"c", Some(5), 2).unwrap();
        round(&mut log, 1);
        // "b" may go, but not ahead of "a".
        assert_eq!(log.unwritten(), 3);
        assert!(open(&mem).1.is_empty());
        round(&mut log, 3);
        assert_eq!(log.unwritten(), 0);
        assert_eq!(
            open(&mem).1,
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
    }

    #[test]
    fn a_key_waiting_for_a_failed_round_is_never_written() {
        let mem = MemBackend::new();
        let (mut log, _) = open(&mem);
        log.append(b"ok", None, 0).unwrap();
        round(&mut log, 1);
        log.append(b"lost", None, 2).unwrap();
        let err = log.prepare_round(2, true, &|e| e == 2).unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{err}");
        assert!(log.failure().is_some());
        assert!(matches!(
            log.append(b"x", None, 0),
            Err(StoreError::Failed { .. })
        ));
        assert_eq!(open(&mem).1, vec![b"ok".to_vec()]);
    }

    #[test]
    fn rewrite_moves_waiting_records_after_the_snapshot_and_deletes_the_old_generation_later() {
        let mem = MemBackend::new();
        let (mut log, _) = open(&mem);
        let a = log.append(b"a", None, 0).unwrap();
        let dead = log.append(b"dead", None, 0).unwrap();
        round(&mut log, 1);
        let b = log.append(b"b", None, 5).unwrap();
        log.rewrite([(&b"a"[..], None, a), (&b"b"[..], None, b)])
            .unwrap();
        assert_ne!(dead, a);
        // Snapshot ["a"], then "b" still waiting for round 5.
        assert_eq!(log.records(), 2);
        round(&mut log, 2);
        assert_eq!(
            key_files(&mem).len(),
            2,
            "the old generation stays until the snapshot is synced"
        );
        assert_eq!(open(&mem).1, vec![b"a".to_vec()]);
        round(&mut log, 5);
        assert_eq!(key_files(&mem), vec![gen_name(1)]);
        assert_eq!(open(&mem).1, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn a_rewrite_whose_snapshot_waits_keeps_the_old_generation() {
        let mem = MemBackend::new();
        let (mut log, _) = open(&mem);
        let a = log.append(b"a", None, 0).unwrap();
        round(&mut log, 1);
        log.rewrite([(&b"a"[..], None, a)]).unwrap();
        // A second rewrite before the first one's snapshot was written.
        log.rewrite([(&b"a"[..], None, a)]).unwrap();
        round(&mut log, 2);
        round(&mut log, 3);
        assert_eq!(key_files(&mem), vec![gen_name(2)]);
        assert_eq!(open(&mem).1, vec![b"a".to_vec()]);
    }
}
