//! The broker's use of `rill-store`: a durable queue's log, group commit for publisher
//! confirms, deduplication key logs, and the definitions file.
//!
//! Only this module turns broker types into stored records and back, so the rest of the core
//! sees messages and positions, never files.

use crate::consumer::{ConnEvent, Outlet};
use crate::message::Message;
use bytes::Bytes;
use parking_lot::Mutex;
use rill_store::{
    Definitions, DefinitionsFile, KeyLog, KeyRecord, Position, QueueStore, RecoveredRecord,
    SharedKeyLog, SharedStore, StoreError, StoreOptions, StoredMessage, SyncGroup, SyncPolicy,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One durable queue's log plus the group commit it syncs through.
#[derive(Clone)]
pub struct Durable {
    store: SharedStore,
    sync: SyncGroup,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Durable {
    pub fn new(store: SharedStore, sync: SyncGroup) -> Durable {
        Durable { store, sync }
    }

    /// Writes the message (page cache, no fsync) and returns its position and the sync epoch
    /// after which it is durable.
    pub(crate) fn append(&self, msg: &Message) -> Result<(Position, u64), StoreError> {
        let record = StoredMessage {
            exchange: msg.exchange.to_string(),
            routing_key: msg.routing_key_str().to_owned(),
            properties: msg.properties.clone(),
            body: msg.body.clone(),
            timestamp_ms: now_ms(),
            flags: 0,
        };
        let pos = self.store.lock().append(&record)?;
        Ok((pos, self.sync.mark_dirty(&self.store)))
    }

    /// Records settled messages; they are synced with the next round, nobody waits for it.
    pub(crate) fn ack(&self, positions: &[Position]) {
        {
            let mut store = self.store.lock();
            for &pos in positions {
                if let Err(e) = store.ack(pos) {
                    tracing::error!(?pos, error = %e, "cannot record ack");
                }
            }
        }
        self.sync.mark_dirty_lazy(&self.store);
    }

    /// Notes that a message went out to a consumer, so a crash brings it back redelivered.
    pub(crate) fn mark_delivered(&self, positions: &[Position]) {
        {
            let mut store = self.store.lock();
            for &pos in positions {
                if let Err(e) = store.mark_delivered(pos) {
                    tracing::error!(?pos, error = %e, "cannot record delivery");
                }
            }
        }
        self.sync.mark_dirty_lazy(&self.store);
    }

    pub(crate) fn read(&self, pos: Position) -> Result<Message, StoreError> {
        let record = self.store.lock().read(pos)?;
        Ok(message_from(record))
    }

    /// The message at `pos` and the ones after it in its segment, up to about `max_bytes`,
    /// read with one syscall (see [`rill_store::QueueStore::read_run`]).
    pub(crate) fn read_run(
        &self,
        pos: Position,
        max_bytes: usize,
    ) -> Result<Vec<(Position, Message)>, StoreError> {
        let run = self.store.lock().read_run(pos, max_bytes)?;
        Ok(run.into_iter().map(|(p, r)| (p, message_from(r))).collect())
    }

    /// The queue was deleted: its files go.
    pub(crate) fn destroy(&self) {
        if let Err(e) = self.store.lock().destroy_in_place() {
            tracing::error!(error = %e, "cannot remove a deleted queue's files");
        }
    }
}

/// The key log of a durable deduplicating queue or exchange plus the group commit it syncs
/// through (after the queue logs of each round: see [`rill_store::KeyLog`]).
#[derive(Clone)]
pub struct DurableKeys {
    log: SharedKeyLog,
    sync: SyncGroup,
}

impl std::fmt::Debug for DurableKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableKeys").finish_non_exhaustive()
    }
}

impl DurableKeys {
    /// Buffers a key to be written once round `after_epoch` (its message's) is synced; returns
    /// the record's sequence number and the sync epoch after which the key is durable.
    pub(crate) fn append(
        &self,
        key: &[u8],
        expires_at_ms: Option<u64>,
        after_epoch: u64,
    ) -> Result<(u64, u64), StoreError> {
        let seq = self.log.lock().append(key, expires_at_ms, after_epoch)?;
        Ok((seq, self.sync.mark_keys_dirty(&self.log)))
    }

    /// Records in the log's current generation, live or dead.
    pub(crate) fn records(&self) -> u64 {
        self.log.lock().records()
    }

    /// Starts a compacted generation from the live keys (buffer only; written by the next
    /// round). See [`rill_store::KeyLog::rewrite`].
    pub(crate) fn rewrite<'a>(
        &self,
        live: impl IntoIterator<Item = (&'a [u8], Option<u64>, u64)>,
    ) -> Result<(), StoreError> {
        self.log.lock().rewrite(live)?;
        self.sync.mark_keys_dirty(&self.log);
        Ok(())
    }

    /// The queue or exchange was deleted: its keys go.
    pub(crate) fn destroy(&self) {
        if let Err(e) = self.log.lock().destroy_in_place() {
            tracing::error!(error = %e, "cannot remove a deleted deduplication cache's files");
        }
    }
}

/// Smallest and largest run [`ReadAhead`] reads at once.
const READ_AHEAD_MIN: usize = 4 * 1024;
const READ_AHEAD_MAX: usize = 256 * 1024;

/// Reads paged-out messages back for one reader (a stream consumer, a queue's head): a
/// reader going through the log in order gets a run of records per syscall, doubling up to
/// 256 KiB, while one that jumps about (priority levels, requeues) drops back to small runs.
/// Holds at most one run.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    run: std::collections::VecDeque<(Position, Arc<Message>)>,
    window: usize,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            run: std::collections::VecDeque::new(),
            window: READ_AHEAD_MIN,
        }
    }
}

impl ReadAhead {
    /// The message at `pos`.
    pub(crate) fn read(
        &mut self,
        durable: &Durable,
        pos: Position,
    ) -> Result<Arc<Message>, StoreError> {
        let mut in_order = true;
        while let Some((p, _)) = self.run.front() {
            if *p >= pos {
                break;
            }
            self.run.pop_front();
            in_order = false;
        }
        match self.run.front() {
            Some((p, _)) if *p == pos => {}
            front => {
                // Sequential: the last run was used up exactly; anything else is a jump.
                self.window = if in_order && front.is_none() {
                    (self.window * 2).min(READ_AHEAD_MAX)
                } else {
                    READ_AHEAD_MIN
                };
                self.run = durable
                    .read_run(pos, self.window)?
                    .into_iter()
                    .map(|(p, m)| (p, Arc::new(m)))
                    .collect();
            }
        }
        match self.run.pop_front() {
            Some((p, m)) if p == pos => Ok(m),
            _ => Err(StoreError::NotFound(pos)),
        }
    }

    /// Drops what was read ahead (e.g. the messages were deleted).
    pub(crate) fn clear(&mut self) {
        self.run.clear();
    }
}

pub(crate) fn message_from(record: StoredMessage) -> Message {
    Message::new(
        Arc::from(record.exchange.as_str()),
        Bytes::from(record.routing_key.into_bytes()),
        record.properties,
        record.body,
    )
}

/// Everything the broker keeps under `--data-dir`: queue logs, group commit, definitions.
pub struct Persistence {
    data_dir: PathBuf,
    options: StoreOptions,
    sync: SyncGroup,
    definitions: Mutex<(DefinitionsFile, Option<Definitions>)>,
    /// Connections waiting for a sync round to send confirms.
    waiters: Arc<Mutex<Vec<Arc<dyn Outlet>>>>,
    /// A durable entity changed since definitions were last written.
    definitions_dirty: AtomicBool,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Persistence {
    /// Opens the data directory; returns the definitions saved there, if any.
    pub fn open(
        data_dir: &Path,
        sync_policy: SyncPolicy,
    ) -> Result<(Arc<Persistence>, Option<Definitions>), StoreError> {
        let (file, saved) = DefinitionsFile::open(data_dir)?;
        let sync = SyncGroup::new(sync_policy);
        let waiters: Arc<Mutex<Vec<Arc<dyn Outlet>>>> = Arc::default();
        let wake = waiters.clone();
        sync.subscribe(Box::new(move |epoch| {
            let outlets = std::mem::take(&mut *wake.lock());
            for o in outlets {
                o.push(ConnEvent::Synced(epoch));
            }
        }));
        let p = Persistence {
            data_dir: data_dir.to_path_buf(),
            options: StoreOptions {
                sync: sync_policy,
                ..StoreOptions::default()
            },
            sync,
            definitions: Mutex::new((file, saved.clone())),
            waiters,
            definitions_dirty: AtomicBool::new(false),
        };
        Ok((Arc::new(p), saved))
    }

    /// Opens (or creates) a durable queue's log and returns an index of the messages it still
    /// holds (no bodies: they are read back when delivered).
    pub fn open_queue_log(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<(Durable, Vec<RecoveredRecord>), StoreError> {
        let dir = rill_store::ensure_queue_dir(&self.data_dir, vhost, queue)?;
        let (store, recovered) = QueueStore::open_index(&dir, self.options)?;
        let durable = Durable::new(Arc::new(Mutex::new(store)), self.sync.clone());
        Ok((durable, recovered))
    }

    /// Opens (or creates) the deduplication key log kept in a durable queue's directory and
    /// returns the keys it remembers, oldest first.
    pub fn open_queue_keys(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<(DurableKeys, Vec<KeyRecord>), StoreError> {
        let dir = rill_store::ensure_queue_dir(&self.data_dir, vhost, queue)?;
        self.open_keys(&dir)
    }

    /// The same for a durable deduplicating exchange (`<data_dir>/exchanges/<hash>/`).
    pub fn open_exchange_keys(
        &self,
        vhost: &str,
        exchange: &str,
    ) -> Result<(DurableKeys, Vec<KeyRecord>), StoreError> {
        let dir = rill_store::ensure_exchange_dir(&self.data_dir, vhost, exchange)?;
        self.open_keys(&dir)
    }

    fn open_keys(&self, dir: &Path) -> Result<(DurableKeys, Vec<KeyRecord>), StoreError> {
        let (log, recovered) = KeyLog::open(dir, self.options.sync)?;
        let keys = DurableKeys {
            log: Arc::new(Mutex::new(log)),
            sync: self.sync.clone(),
        };
        Ok((keys, recovered))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn synced_epoch(&self) -> u64 {
        self.sync.synced_epoch()
    }

    /// Whether sync round `epoch` failed: what waited on it is nacked, not confirmed.
    pub fn round_failed(&self, epoch: u64) -> bool {
        self.sync.round_failed(epoch)
    }

    /// Wakes `outlet` with [`ConnEvent::Synced`] after the next sync round.
    pub fn notify_when_synced(&self, outlet: &Arc<dyn Outlet>) {
        let mut w = self.waiters.lock();
        if !w.iter().any(|o| Arc::ptr_eq(o, outlet)) {
            w.push(outlet.clone());
        }
    }

    pub fn mark_definitions_dirty(&self) {
        self.definitions_dirty.store(true, Ordering::Release);
    }

    /// Clears and returns the dirty flag.
    pub fn take_definitions_dirty(&self) -> bool {
        self.definitions_dirty.swap(false, Ordering::AcqRel)
    }

    /// Writes the definitions if they changed since the last save.
    pub fn save_definitions(&self, defs: Definitions) {
        let mut guard = self.definitions.lock();
        if guard.1.as_ref() == Some(&defs) {
            return;
        }
        match guard.0.save(&defs) {
            Ok(()) => guard.1 = Some(defs),
            Err(e) => tracing::error!(error = %e, "cannot save definitions"),
        }
    }
}
