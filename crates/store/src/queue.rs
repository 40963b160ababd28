//! [`QueueStore`]: one durable queue's append-only log of segment files and ack files.
//!
//! Appends are encoded into a userspace buffer and written with one `pwrite` when the buffer
//! fills, at sync, or at segment rollover; acks are buffered the same way. [`QueueStore::read`]
//! serves records that are still buffered straight from the buffer, so buffering never changes
//! what a caller observes; it only changes what a crash can lose, and only data that was never
//! confirmed (confirms wait for [`QueueStore::sync`], which writes the buffers out first).
//!
//! Recovered segments are never appended to again: after [`QueueStore::open`] the first append
//! starts a new segment. That keeps a truncated tail (and any ack entries that pointed into the
//! truncated part) from ever being mistaken for new records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::backend::{FileBackend, OpenMode, StorageBackend, StorageFile};
use crate::error::IoContext;
use crate::format::{self, Header, Parsed, ACK_MAGIC, HEADER_LEN, RECORD_HEADER_LEN, SEG_MAGIC};
use crate::segment::{parse_name, Segment};
use crate::StoreError;

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Segment number (the file `NNNNNNNNNN.seg`).
    pub segment: u32,
    /// Byte offset of the record inside the segment file.
    pub offset: u32,
}

/// What the broker stores per message (the store treats it as opaque fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Exchange the message was published to (at most 255 bytes).
    pub exchange: String,
    /// Routing key (at most 255 bytes).
    pub routing_key: String,
    /// Raw AMQP property flags + property list.
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
    /// Publish time, for TTL / x-max-age.
    pub timestamp_ms: u64,
    /// Opaque to the store (e.g. a redelivered bit).
    pub flags: u8,
}

impl StoredMessage {
    /// Bytes the record takes in a segment file (header + payload), or an error if it cannot be
    /// stored.
    pub fn encoded_len(&self) -> Result<u64, StoreError> {
        Ok(format::payload_len(self)? + u64::from(RECORD_HEADER_LEN))
    }
}

/// When data is fdatasync'ed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// fdatasync before confirming (group commit): the default.
    #[default]
    Always,
    /// fdatasync at most every interval; confirms wait for it.
    Interval(Duration),
    /// Never fsync (tests and benchmarks only): [`QueueStore::sync`] only writes buffers to the
    /// OS, which survives a process crash (`kill -9`) but not a power loss.
    Never,
}

/// Options for [`QueueStore::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Segment files roll over when the next record would exceed this many bytes.
    pub segment_size: u32,
    /// Sync policy; `Never` makes [`QueueStore::sync`] skip fdatasync.
    pub sync: SyncPolicy,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            segment_size: 8 * 1024 * 1024,
            sync: SyncPolicy::Always,
        }
    }
}

/// One entry of [`QueueStore::open_index`]: an unacked record without its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredRecord {
    /// Where it is.
    pub position: Position,
    /// Its size in the segment file (header + payload).
    pub encoded_len: u32,
    /// [`StoredMessage::timestamp_ms`].
    pub timestamp_ms: u64,
    /// [`StoredMessage::flags`].
    pub flags: u8,
    /// [`QueueStore::mark_delivered`] was recorded for it before the restart.
    pub delivered: bool,
}

/// Set in [`StoredMessage::flags`] of records returned by [`QueueStore::open`] that were
/// marked delivered ([`QueueStore::mark_delivered`]).
pub const FLAG_DELIVERED: u8 = 0x80;

/// Ack-file entries with this bit set are delivery marks, not acks (record offsets never
/// reach 2 GiB: positions are u32 and records start within a segment).
const DELIVERED_MARK: u32 = 0x8000_0000;

/// Receives each unacked record's payload (and whether it was marked delivered) during
/// recovery.
type Visit<'a> = &'a mut dyn FnMut(Position, &[u8], bool) -> Result<(), &'static str>;

/// Cheap counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records not acked.
    pub live_records: u64,
    /// Bytes in segment and ack files (including buffered, not yet written bytes).
    pub bytes_on_disk: u64,
    /// Segment files.
    pub segments: u32,
}

/// Appended data is buffered up to this many bytes before a `pwrite`.
const WRITE_BUFFER: usize = 256 * 1024;
/// Ack entries are buffered up to this many bytes (over all segments) before writing.
const ACK_BUFFER: usize = 16 * 1024;

/// One durable queue's append-only log. See the crate docs for the format.
///
/// ```
/// use rill_store::{QueueStore, StoreOptions, StoredMessage};
/// let dir = tempfile::tempdir()?;
/// let (mut store, recovered) = QueueStore::open(dir.path(), StoreOptions::default())?;
/// assert!(recovered.is_empty());
/// let msg = StoredMessage {
///     exchange: "amq.direct".into(),
///     routing_key: "k".into(),
///     properties: bytes::Bytes::new(),
///     body: bytes::Bytes::from_static(b"hello"),
///     timestamp_ms: 0,
///     flags: 0,
/// };
/// let pos = store.append(&msg)?;
/// store.sync()?; // now durable: a confirm may be sent
/// assert_eq!(store.read(pos)?, msg);
/// store.ack(pos)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct QueueStore {
    dir: PathBuf,
    opts: StoreOptions,
    backend: Arc<dyn StorageBackend>,
    segments: BTreeMap<u32, Segment>,
    /// The segment being written, if any (created lazily by the first append).
    active: Option<u32>,
    next_id: u64,
    /// Encoded records not yet written to the active segment; `wbuf[0]` belongs at `wbuf_start`.
    wbuf: Vec<u8>,
    wbuf_start: u32,
    /// Segments with buffered ack entries.
    ack_pending_segs: Vec<u32>,
    ack_pending_bytes: usize,
    /// Segments with data or ack files written since the last sync.
    dirty_segs: Vec<u32>,
    /// When ack entries were first written after the last fdatasync of the ack files.
    acks_dirty_since: Option<std::time::Instant>,
    dir_dirty: bool,
    live: u64,
    /// The first write/sync failure; once set, the store refuses writes (see [`StoreError::Failed`]).
    failure: Arc<OnceLock<String>>,
    destroyed: bool,
}

/// The fdatasyncs one [`QueueStore::prepare_sync`] call asks for, to be run without holding the
/// store's lock (so appends continue while the disk works).
#[derive(Debug)]
#[must_use = "a SyncBatch does nothing until run"]
pub struct SyncBatch {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<dyn StorageFile>)>,
    sync_dir: bool,
    fsync: bool,
    acks_deferred: bool,
    backend: Arc<dyn StorageBackend>,
    failure: Arc<OnceLock<String>>,
}

impl SyncBatch {
    /// A batch for the files of another kind of log in `dir` (see [`crate::KeyLog`]).
    pub(crate) fn new(
        dir: &Path,
        files: Vec<(PathBuf, Arc<dyn StorageFile>)>,
        sync_dir: bool,
        fsync: bool,
        backend: Arc<dyn StorageBackend>,
        failure: Arc<OnceLock<String>>,
    ) -> SyncBatch {
        SyncBatch {
            dir: dir.to_path_buf(),
            files,
            sync_dir,
            fsync,
            acks_deferred: false,
            backend,
            failure,
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && !self.sync_dir
    }

    /// Whether ack files were left for a later round (see `QueueStore::prepare_sync_inner`).
    pub fn acks_deferred(&self) -> bool {
        self.acks_deferred
    }

    /// fdatasyncs the files, then the directory. A failure marks the store failed (see
    /// [`StoreError::Failed`]): data written since its last good sync may be lost.
    pub fn run(self) -> Result<(), StoreError> {
        if !self.fsync {
            return Ok(());
        }
        // Sequential on purpose: flushing the files concurrently needs a thread each, and at
        // low rates (a round per message) spawning them cost more CPU and latency than it saved.
        let results: Vec<(&PathBuf, std::io::Result<()>)> = self
            .files
            .iter()
            .map(|(path, file)| (path, file.sync_data()))
            .collect();
        for (path, r) in results {
            if let Err(e) = r {
                let _ = self
                    .failure
                    .set(format!("fdatasync {}: {e}", path.display()));
                return Err(StoreError::io(path, e));
            }
        }
        if self.sync_dir {
            if let Err(e) = self.backend.sync_dir(&self.dir) {
                let _ = self
                    .failure
                    .set(format!("fsync directory {}: {e}", self.dir.display()));
                return Err(StoreError::io(&self.dir, e));
            }
        }
        Ok(())
    }
}

impl QueueStore {
    /// Opens (creating if missing) the store in `dir` and recovers it: scans segments in order,
    /// validates each record's length and CRC, truncates a torn or corrupt part at the last
    /// valid record (with a `tracing::warn!` naming the file and offset; later segments are
    /// kept), applies ack files, deletes fully acked segments, and returns the unacked records
    /// in log order. Never panics on any file content.
    pub fn open(
        dir: &Path,
        opts: StoreOptions,
    ) -> Result<(QueueStore, Vec<(Position, StoredMessage)>), StoreError> {
        QueueStore::open_with(dir, opts, Arc::new(FileBackend))
    }

    /// [`QueueStore::open`] on a given storage backend (tests inject faults this way).
    pub fn open_with(
        dir: &Path,
        opts: StoreOptions,
        backend: Arc<dyn StorageBackend>,
    ) -> Result<(QueueStore, Vec<(Position, StoredMessage)>), StoreError> {
        let mut recovered = Vec::new();
        let store = QueueStore::open_inner(dir, opts, backend, &mut |pos, payload, delivered| {
            let mut msg = format::decode_payload(Bytes::copy_from_slice(payload))?;
            if delivered {
                msg.flags |= FLAG_DELIVERED;
            }
            recovered.push((pos, msg));
            Ok(())
        })?;
        Ok((store, recovered))
    }

    /// Like [`QueueStore::open_with`], but returns only an index of the unacked records (no
    /// bodies), for backlogs larger than memory: the broker reads bodies back with
    /// [`QueueStore::read`] when it delivers them.
    pub fn open_index_with(
        dir: &Path,
        opts: StoreOptions,
        backend: Arc<dyn StorageBackend>,
    ) -> Result<(QueueStore, Vec<RecoveredRecord>), StoreError> {
        let mut index = Vec::new();
        let store =
            QueueStore::open_inner(dir, opts, backend, &mut |position, payload, delivered| {
                let (timestamp_ms, flags) = format::payload_header(payload)?;
                let encoded_len = payload.len() as u32 + RECORD_HEADER_LEN;
                index.push(RecoveredRecord {
                    position,
                    encoded_len,
                    timestamp_ms,
                    flags,
                    delivered,
                });
                Ok(())
            })?;
        Ok((store, index))
    }

    /// [`QueueStore::open_index_with`] on the file system.
    pub fn open_index(
        dir: &Path,
        opts: StoreOptions,
    ) -> Result<(QueueStore, Vec<RecoveredRecord>), StoreError> {
        QueueStore::open_index_with(dir, opts, Arc::new(FileBackend))
    }

    fn open_inner(
        dir: &Path,
        opts: StoreOptions,
        backend: Arc<dyn StorageBackend>,
        visit: Visit<'_>,
    ) -> Result<QueueStore, StoreError> {
        backend.create_dir_all(dir).ctx(dir)?;
        let mut segs = BTreeSet::new();
        let mut acks = BTreeSet::new();
        for name in backend.list_dir(dir).ctx(dir)? {
            if let Some((id, is_ack)) = name.to_str().and_then(parse_name) {
                if is_ack {
                    acks.insert(id)
                } else {
                    segs.insert(id)
                };
            }
        }
        let max_id = segs.iter().chain(acks.iter()).max().copied();
        let mut store = QueueStore {
            dir: dir.to_path_buf(),
            opts,
            backend,
            segments: BTreeMap::new(),
            active: None,
            next_id: max_id.map_or(0, |m| u64::from(m) + 1),
            wbuf: Vec::new(),
            wbuf_start: 0,
            ack_pending_segs: Vec::new(),
            ack_pending_bytes: 0,
            dirty_segs: Vec::new(),
            acks_dirty_since: None,
            dir_dirty: false,
            live: 0,
            failure: Arc::default(),
            destroyed: false,
        };
        // An ack file without its segment: the segment was deleted and the crash came before
        // the ack file followed it.
        for &id in acks.difference(&segs) {
            let path = dir.join(crate::segment::ack_name(id));
            tracing::debug!(file = %path.display(), "removing orphaned ack file");
            store.remove(&path)?;
        }
        for &id in &segs {
            store.recover_segment(id, acks.contains(&id), visit)?;
        }
        Ok(store)
    }

    fn recover_segment(
        &mut self,
        id: u32,
        has_ack: bool,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let path = dir.join(crate::segment::seg_name(id));
        let file = self.backend.open(&path, OpenMode::Existing).ctx(&path)?;
        let file_len = file.len().ctx(&path)?;
        // Positions are u32: anything past 4 GiB cannot be ours.
        let scan_len = file_len.min(u64::from(u32::MAX));
        let mut data = vec![0u8; scan_len as usize];
        file.read_exact_at(&mut data, 0).ctx(&path)?;
        if format::check_header(&data, SEG_MAGIC, &path)? == Header::Torn {
            tracing::warn!(file = %path.display(), len = file_len, "segment header is torn; removing the empty segment");
            self.remove(&path)?;
            if has_ack {
                self.remove(&dir.join(crate::segment::ack_name(id)))?;
            }
            return Ok(());
        }
        let mut seg = Segment::new(&dir, id, file, HEADER_LEN);
        let mut at = HEADER_LEN as usize;
        let mut payloads = Vec::new();
        let invalid = loop {
            match format::parse_record(&data, at) {
                Parsed::End => break None,
                Parsed::Invalid(reason) => break Some(reason),
                Parsed::Record { payload } => {
                    seg.push(at as u32);
                    at = payload.end;
                    payloads.push(payload);
                }
            }
        };
        if let Some(reason) =
            invalid.or_else(|| (file_len > scan_len).then(|| "file exceeds 4 GiB".to_string()))
        {
            tracing::warn!(
                file = %path.display(),
                offset = at,
                lost_bytes = file_len - at as u64,
                reason = %reason,
                "truncating segment at the last valid record"
            );
            seg.file.set_len(at as u64).ctx(&path)?;
        }
        seg.len = at as u32;
        seg.seal();

        if has_ack {
            self.recover_acks(&mut seg)?;
        }
        if seg.live == 0 {
            tracing::debug!(file = %path.display(), "segment fully acked; removing");
            self.remove(&seg.path)?;
            if seg.ack_file.is_some() {
                self.remove(&seg.ack_path)?;
            }
            return Ok(());
        }
        for (i, payload) in payloads.into_iter().enumerate() {
            if seg.is_acked(i) {
                continue;
            }
            let pos = Position {
                segment: id,
                offset: seg.offset(i),
            };
            // Validated by parse_record; decoding cannot fail here, but never panic on content.
            visit(pos, &data[payload], seg.is_delivered(i))
                .map_err(|e| StoreError::corrupt(&path, e))?;
        }
        self.live += u64::from(seg.live);
        self.segments.insert(id, seg);
        Ok(())
    }

    fn recover_acks(&mut self, seg: &mut Segment) -> Result<(), StoreError> {
        let path = seg.ack_path.clone();
        let file = self.backend.open(&path, OpenMode::Existing).ctx(&path)?;
        let len = file.len().ctx(&path)?.min(u64::from(u32::MAX));
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, 0).ctx(&path)?;
        if format::check_header(&data, ACK_MAGIC, &path)? == Header::Torn {
            tracing::warn!(file = %path.display(), "ack file header is torn; rewriting it (its acks are lost)");
            file.set_len(0).ctx(&path)?;
            file.write_all_at(&format::header(ACK_MAGIC), 0)
                .ctx(&path)?;
            seg.ack_dirty = true;
            self.dirty_segs.push(seg.id);
            self.acks_dirty_since
                .get_or_insert_with(std::time::Instant::now);
            seg.ack_file = Some(file);
            seg.ack_len = HEADER_LEN;
            return Ok(());
        }
        let entries = (data.len() - HEADER_LEN as usize) / 4;
        let valid_len = HEADER_LEN as usize + entries * 4;
        if valid_len != data.len() {
            tracing::warn!(file = %path.display(), offset = valid_len, "truncating torn ack entry");
            file.set_len(valid_len as u64).ctx(&path)?;
        }
        for chunk in data[HEADER_LEN as usize..valid_len].chunks_exact(4) {
            let entry = format::le_u32(chunk);
            // Offsets that are not record starts (e.g. into a truncated tail) are ignored.
            if entry & DELIVERED_MARK != 0 {
                if let Some(i) = seg.index_of(entry & !DELIVERED_MARK) {
                    seg.set_delivered(i);
                }
            } else if let Some(i) = seg.index_of(entry) {
                seg.set_acked(i);
            }
        }
        seg.ack_file = Some(file);
        seg.ack_len = valid_len as u32;
        Ok(())
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first write or fdatasync failure, if any: from then on writes fail with
    /// [`StoreError::Failed`], and data written since the last successful sync must be treated
    /// as not durable (nack it). Check this after a [`crate::SyncGroup`] round that included
    /// the store.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
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

    /// Records the first failure and returns the error.
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

    fn mark_dirty(&mut self, id: u32) {
        if let Some(seg) = self.segments.get(&id) {
            if !seg.data_dirty && !seg.ack_dirty {
                self.dirty_segs.push(id);
            }
        }
    }

    /// Appends a record (buffered; no fsync). Returns its position; its size on disk is
    /// [`StoredMessage::encoded_len`].
    pub fn append(&mut self, msg: &StoredMessage) -> Result<Position, StoreError> {
        self.check_writable()?;
        let payload_len = format::payload_len(msg)?;
        let rec_len = payload_len + u64::from(RECORD_HEADER_LEN);
        let id = match self.active.and_then(|id| self.segments.get(&id)) {
            Some(seg) => {
                let end = u64::from(seg.len) + rec_len;
                let has_records = seg.records() > 0;
                if has_records
                    && (end > u64::from(self.opts.segment_size) || end > u64::from(u32::MAX))
                {
                    self.roll()?
                } else {
                    seg.id
                }
            }
            None => self.create_segment()?,
        };
        if !self.wbuf.is_empty() && self.wbuf.len() as u64 + rec_len > WRITE_BUFFER as u64 {
            self.flush_data()?;
        }
        let Some(seg) = self.segments.get_mut(&id) else {
            return Err(StoreError::corrupt(&self.dir, "active segment missing"));
        };
        let offset = seg.len;
        // payload_len <= MAX_PAYLOAD < u32::MAX, checked by format::payload_len.
        format::encode_record(msg, payload_len as u32, &mut self.wbuf);
        seg.len += rec_len as u32;
        seg.push(offset);
        self.live += 1;
        if self.wbuf.len() >= WRITE_BUFFER {
            self.flush_data()?;
        }
        Ok(Position {
            segment: id,
            offset,
        })
    }

    fn create_segment(&mut self) -> Result<u32, StoreError> {
        let id = u32::try_from(self.next_id)
            .map_err(|_| StoreError::corrupt(&self.dir, "segment numbers exhausted"))?;
        let path = self.dir.join(crate::segment::seg_name(id));
        let file = match self.backend.open(&path, OpenMode::CreateTruncate) {
            Ok(f) => f,
            Err(e) => return Err(self.fail(&path, "create", e)),
        };
        self.next_id += 1;
        self.dir_dirty = true;
        let seg = Segment::new(&self.dir, id, file, HEADER_LEN);
        self.segments.insert(id, seg);
        self.active = Some(id);
        self.wbuf.clear();
        self.wbuf.extend_from_slice(&format::header(SEG_MAGIC));
        self.wbuf_start = 0;
        Ok(id)
    }

    /// Seals the active segment (writing or discarding its buffer) and starts a new one.
    fn roll(&mut self) -> Result<u32, StoreError> {
        if let Some(old) = self.active {
            let fully_acked = self.segments.get(&old).is_some_and(|s| s.live == 0);
            if fully_acked {
                self.wbuf.clear();
                self.delete_segment(old)?;
            } else {
                self.flush_data()?;
                if let Some(seg) = self.segments.get_mut(&old) {
                    seg.seal();
                }
            }
            self.active = None;
        }
        self.create_segment()
    }

    fn delete_segment(&mut self, id: u32) -> Result<(), StoreError> {
        if let Some(seg) = self.segments.remove(&id) {
            if self.active == Some(id) {
                self.active = None;
                self.wbuf.clear();
            }
            self.ack_pending_bytes -= seg.ack_pending.len();
            // Segment first: a leftover ack file is harmless (removed on open), a leftover
            // segment without its acks would redeliver acked messages.
            self.remove(&seg.path)?;
            if seg.ack_file.is_some() {
                self.remove(&seg.ack_path)?;
            }
        }
        Ok(())
    }

    /// Writes the append buffer to the active segment.
    fn flush_data(&mut self) -> Result<(), StoreError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let Some(id) = self.active else {
            self.wbuf.clear();
            return Ok(());
        };
        let Some(seg) = self.segments.get(&id) else {
            self.wbuf.clear();
            return Ok(());
        };
        if let Err(e) = seg
            .file
            .write_all_at(&self.wbuf, u64::from(self.wbuf_start))
        {
            let path = seg.path.clone();
            return Err(self.fail(&path, "write", e));
        }
        self.wbuf_start += self.wbuf.len() as u32;
        self.wbuf.clear();
        if self.wbuf.capacity() > 4 * WRITE_BUFFER {
            self.wbuf.shrink_to(WRITE_BUFFER);
        }
        self.mark_dirty(id);
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.data_dirty = true;
        }
        Ok(())
    }

    /// Writes buffered ack entries to their ack files (creating them as needed).
    fn flush_acks(&mut self) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut self.ack_pending_segs);
        for id in pending {
            let Some(seg) = self.segments.get_mut(&id) else {
                continue;
            };
            if seg.ack_pending.is_empty() {
                continue;
            }
            let n = seg.ack_pending.len();
            let result = match &seg.ack_file {
                Some(file) => file
                    .write_all_at(&seg.ack_pending, u64::from(seg.ack_len))
                    .map(|()| None),
                None => self
                    .backend
                    .open(&seg.ack_path, OpenMode::CreateTruncate)
                    .and_then(|file| {
                        let mut buf = Vec::with_capacity(HEADER_LEN as usize + n);
                        buf.extend_from_slice(&format::header(ACK_MAGIC));
                        buf.extend_from_slice(&seg.ack_pending);
                        file.write_all_at(&buf, 0).map(|()| Some(file))
                    }),
            };
            match result {
                Ok(created) => {
                    if let Some(file) = created {
                        seg.ack_file = Some(file);
                        seg.ack_len = HEADER_LEN;
                        self.dir_dirty = true;
                    }
                    seg.ack_len += n as u32;
                    seg.ack_pending.clear();
                    seg.ack_pending.shrink_to(1024);
                    self.ack_pending_bytes -= n;
                    let newly_dirty = !seg.data_dirty && !seg.ack_dirty;
                    seg.ack_dirty = true;
                    if newly_dirty {
                        self.dirty_segs.push(id);
                    }
                    self.acks_dirty_since
                        .get_or_insert_with(std::time::Instant::now);
                }
                Err(e) => {
                    let path = seg.ack_path.clone();
                    return Err(self.fail(&path, "write", e));
                }
            }
        }
        Ok(())
    }

    /// Records an ack (buffered; no fsync). Acking an unknown or already acked position is a
    /// no-op. A segment whose records are all acked is deleted unless it is being written.
    pub fn ack(&mut self, pos: Position) -> Result<(), StoreError> {
        self.check_writable()?;
        let Some(seg) = self.segments.get_mut(&pos.segment) else {
            return Ok(());
        };
        let Some(i) = seg.index_of(pos.offset) else {
            return Ok(());
        };
        if !seg.set_acked(i) {
            return Ok(());
        }
        self.live -= 1;
        if seg.live == 0 && self.active != Some(pos.segment) {
            return self.delete_segment(pos.segment);
        }
        if seg.ack_pending.is_empty() {
            self.ack_pending_segs.push(pos.segment);
        }
        seg.ack_pending.extend_from_slice(&pos.offset.to_le_bytes());
        self.ack_pending_bytes += 4;
        if self.ack_pending_bytes >= ACK_BUFFER {
            self.flush_acks()?;
        }
        Ok(())
    }

    /// Records that the message at `pos` was handed to a consumer, so that after a crash it
    /// comes back marked redelivered (written with the acks; no fsync).
    pub fn mark_delivered(&mut self, pos: Position) -> Result<(), StoreError> {
        self.check_writable()?;
        let Some(seg) = self.segments.get_mut(&pos.segment) else {
            return Ok(());
        };
        if seg.index_of(pos.offset).is_none() || pos.offset & DELIVERED_MARK != 0 {
            return Ok(());
        }
        if seg.ack_pending.is_empty() {
            self.ack_pending_segs.push(pos.segment);
        }
        seg.ack_pending
            .extend_from_slice(&(pos.offset | DELIVERED_MARK).to_le_bytes());
        self.ack_pending_bytes += 4;
        if self.ack_pending_bytes >= ACK_BUFFER {
            self.flush_acks()?;
        }
        Ok(())
    }

    /// The segment holding the record that starts at `pos`, and the record's index in it.
    fn record_at(&self, pos: Position) -> Result<(&Segment, usize), StoreError> {
        if self.destroyed {
            return Err(StoreError::Destroyed {
                path: self.dir.clone(),
            });
        }
        let seg = self
            .segments
            .get(&pos.segment)
            .ok_or(StoreError::NotFound(pos))?;
        let index = seg.index_of(pos.offset).ok_or(StoreError::NotFound(pos))?;
        Ok((seg, index))
    }

    /// Reads a record back (from the append buffer or with pread).
    pub fn read(&self, pos: Position) -> Result<StoredMessage, StoreError> {
        let (seg, _) = self.record_at(pos)?;
        let corrupt = |detail: String| {
            StoreError::corrupt(
                &seg.path,
                format!("record at offset {}: {detail}", pos.offset),
            )
        };
        let rh = RECORD_HEADER_LEN as usize;
        let payload = if self.active == Some(pos.segment) && pos.offset >= self.wbuf_start {
            let at = (pos.offset - self.wbuf_start) as usize;
            match format::parse_record(&self.wbuf, at) {
                Parsed::Record { payload } => Bytes::copy_from_slice(&self.wbuf[payload]),
                Parsed::End => return Err(StoreError::NotFound(pos)),
                Parsed::Invalid(reason) => return Err(corrupt(reason)),
            }
        } else {
            let mut h = [0u8; RECORD_HEADER_LEN as usize];
            seg.file
                .read_exact_at(&mut h, u64::from(pos.offset))
                .ctx(&seg.path)?;
            let len = format::le_u32(&h[..4]);
            let crc = format::le_u32(&h[4..]);
            let end = u64::from(pos.offset) + rh as u64 + u64::from(len);
            if end > u64::from(seg.len) {
                return Err(corrupt(format!("length {len} runs past the segment end")));
            }
            let mut buf = vec![0u8; len as usize];
            seg.file
                .read_exact_at(&mut buf, u64::from(pos.offset) + rh as u64)
                .ctx(&seg.path)?;
            if crc32c::crc32c(&buf) != crc {
                return Err(corrupt("CRC mismatch".into()));
            }
            Bytes::from(buf)
        };
        format::decode_payload(payload).map_err(|e| corrupt(e.to_string()))
    }

    /// Reads the record at `pos` and those after it in its segment, with one pread of at most
    /// `max_bytes` (always at least the first record): a reader catching up on a backlog pays
    /// one syscall per run instead of two per record. Records that are still in the append
    /// buffer are left to [`QueueStore::read`], except a first one. The messages share one
    /// allocation, which lives as long as any of them.
    pub fn read_run(
        &self,
        pos: Position,
        max_bytes: usize,
    ) -> Result<Vec<(Position, StoredMessage)>, StoreError> {
        let (seg, first) = self.record_at(pos)?;
        // Appends reach the file a whole buffer at a time, so `wbuf_start` is a record boundary.
        let on_file = if self.active == Some(pos.segment) {
            self.wbuf_start
        } else {
            seg.len
        };
        if pos.offset >= on_file {
            return Ok(vec![(pos, self.read(pos)?)]);
        }
        let record_end = |i: usize| {
            if i + 1 < seg.records() {
                seg.offset(i + 1)
            } else {
                seg.len
            }
        };
        let mut last = first;
        while last + 1 < seg.records() {
            let end = record_end(last + 1);
            if end > on_file || (end - pos.offset) as usize > max_bytes {
                break;
            }
            last += 1;
        }
        let mut block = vec![0u8; (record_end(last) - pos.offset) as usize];
        seg.file
            .read_exact_at(&mut block, u64::from(pos.offset))
            .ctx(&seg.path)?;
        let block = Bytes::from(block);
        let mut out = Vec::with_capacity(last - first + 1);
        for i in first..=last {
            let offset = seg.offset(i);
            let at = (offset - pos.offset) as usize;
            let to = (record_end(i) - pos.offset) as usize;
            let corrupt = |detail: &str| {
                StoreError::corrupt(&seg.path, format!("record at offset {offset}: {detail}"))
            };
            let payload = match format::parse_record(&block[at..to], 0) {
                Parsed::Record { payload } => block.slice(at + payload.start..at + payload.end),
                Parsed::End => return Err(corrupt("empty")),
                Parsed::Invalid(reason) => return Err(corrupt(&reason)),
            };
            let msg = format::decode_payload(payload).map_err(corrupt)?;
            out.push((
                Position {
                    segment: pos.segment,
                    offset,
                },
                msg,
            ));
        }
        Ok(out)
    }

    /// Writes buffered appends and acks to the OS without fdatasync: after this they survive a
    /// process crash, not a power loss.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.check_writable()?;
        self.flush_data()?;
        self.flush_acks()
    }

    /// Writes the buffers and returns the fdatasyncs needed to make everything written so far
    /// durable, to run with [`SyncBatch::run`] after releasing the store's lock.
    pub fn prepare_sync(&mut self) -> Result<SyncBatch, StoreError> {
        self.prepare_sync_inner(self.opts.sync != SyncPolicy::Never, false)
    }

    /// With `acks_when_due`, ack files whose oldest unsynced entry is younger than
    /// [`crate::LAZY_SYNC`] are written but not fdatasynced this time ([`SyncBatch::acks_deferred`]
    /// says so): at a round per publish batch, syncing them every round doubled the fdatasyncs
    /// for writes that only a power loss could undo.
    pub(crate) fn prepare_sync_inner(
        &mut self,
        fsync: bool,
        acks_when_due: bool,
    ) -> Result<SyncBatch, StoreError> {
        let mut batch = SyncBatch {
            dir: self.dir.clone(),
            files: Vec::new(),
            sync_dir: false,
            fsync,
            acks_deferred: false,
            backend: self.backend.clone(),
            failure: self.failure.clone(),
        };
        if self.destroyed {
            return Ok(batch);
        }
        self.flush()?;
        let sync_acks = !acks_when_due
            || self
                .acks_dirty_since
                .is_some_and(|t| t.elapsed() >= crate::LAZY_SYNC);
        let mut still_dirty = Vec::new();
        for id in std::mem::take(&mut self.dirty_segs) {
            let Some(seg) = self.segments.get_mut(&id) else {
                continue;
            };
            if std::mem::take(&mut seg.data_dirty) {
                batch.files.push((seg.path.clone(), seg.file.clone()));
            }
            if seg.ack_dirty && !sync_acks {
                still_dirty.push(id);
            } else if std::mem::take(&mut seg.ack_dirty) {
                if let Some(f) = &seg.ack_file {
                    batch.files.push((seg.ack_path.clone(), f.clone()));
                }
            }
        }
        if sync_acks {
            self.acks_dirty_since = None;
        }
        batch.acks_deferred = !still_dirty.is_empty();
        self.dirty_segs = still_dirty;
        batch.sync_dir = std::mem::take(&mut self.dir_dirty);
        Ok(batch)
    }

    /// fdatasyncs everything written since the last sync (segment and ack files, and the
    /// directory after creating or deleting files); with [`SyncPolicy::Never`] only writes the
    /// buffers. Returns quickly if nothing is dirty.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.prepare_sync()?.run()
    }

    /// Deletes all files (queue deleted).
    pub fn destroy(mut self) -> Result<(), StoreError> {
        self.destroy_in_place()
    }

    /// [`QueueStore::destroy`] for a store behind a shared handle: deletes the directory and
    /// leaves a store on which writes fail with [`StoreError::Destroyed`] and syncs do nothing.
    pub fn destroy_in_place(&mut self) -> Result<(), StoreError> {
        self.destroyed = true;
        self.segments.clear();
        self.active = None;
        self.wbuf = Vec::new();
        self.ack_pending_segs.clear();
        self.ack_pending_bytes = 0;
        self.dirty_segs.clear();
        self.live = 0;
        self.backend.remove_dir_all(&self.dir).ctx(&self.dir)?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.backend.sync_dir(parent).ctx(parent)?;
        }
        Ok(())
    }

    /// Cheap stats.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            live_records: self.live,
            bytes_on_disk: self.segments.values().map(Segment::bytes).sum(),
            segments: self.segments.len() as u32,
        }
    }

    /// Marks everything currently unacked as acked (queue purge) by deleting every segment;
    /// the next append starts a new one. Returns how many records were purged.
    pub fn purge(&mut self) -> Result<u64, StoreError> {
        self.check_writable()?;
        let purged = self.live;
        let ids: Vec<u32> = self.segments.keys().copied().collect();
        for id in ids {
            self.delete_segment(id)?;
        }
        self.live = 0;
        self.active = None;
        self.wbuf.clear();
        Ok(purged)
    }
}
