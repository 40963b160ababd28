//! [`SyncGroup`]: group commit shared by many stores.
//!
//! Publishers append under each queue's own lock, then call [`SyncGroup::mark_dirty`], which
//! puts the store in the round being collected and returns that round's epoch. One background
//! thread repeatedly takes the collected stores, writes their buffers (briefly locking each
//! store), runs the fdatasyncs with no store lock held (so appends continue meanwhile), publishes
//! the epoch, wakes [`SyncGroup::wait`]ers and calls subscribers. Everything appended before
//! `mark_dirty` returned `e` is durable once `synced_epoch() >= e`, unless the store reports a
//! [`QueueStore::failure`](crate::QueueStore::failure).
//!
//! Key logs ([`KeyLog`](crate::KeyLog), marked with [`SyncGroup::mark_keys_dirty`]) are
//! written in a second stage of each round, after the queue logs' fdatasyncs: a remembered
//! deduplication key must never be on disk before the message it stands for.
//!
//! A caller that appends a batch (a connection handling one read's worth of publishes) holds a
//! [`DeferredStart`] meanwhile: the round then starts once, when the batch is done, instead of
//! at its first message, so one fdatasync covers the batch and does not compete for a core
//! with the batch's deliveries.

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::{SharedKeyLog, SharedStore, StoreError, SyncPolicy};

type Subscriber = Arc<dyn Fn(u64) + Send + Sync>;

/// Group commit for many stores. Cloning shares the group; the sync thread finishes the
/// pending round and stops when the last handle is dropped.
///
/// ```
/// use std::sync::Arc;
/// use rill_store::{QueueStore, StoreOptions, StoredMessage, SyncGroup, SyncPolicy};
/// let dir = tempfile::tempdir()?;
/// let (store, _) = QueueStore::open(dir.path(), StoreOptions::default())?;
/// let store = Arc::new(parking_lot::Mutex::new(store));
/// let group = SyncGroup::new(SyncPolicy::Always);
/// let msg = StoredMessage { exchange: String::new(), routing_key: "q".into(),
///     properties: Default::default(), body: "hi".into(), timestamp_ms: 0, flags: 0 };
/// store.lock().append(&msg)?;
/// let epoch = group.mark_dirty(&store);
/// group.wait(epoch); // durable now (check store.lock().failure() before confirming)
/// assert!(group.synced_epoch() >= epoch);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SyncGroup {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for SyncGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncGroup")
            .field("policy", &self.handle.shared.policy)
            .field("synced_epoch", &self.synced_epoch())
            .finish()
    }
}

/// Owned by the user-facing handles only; dropping it stops the thread.
struct Handle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How long writes nobody waits on may stay unsynced when no other round comes.
pub const LAZY_SYNC: std::time::Duration = std::time::Duration::from_millis(100);

struct Shared {
    policy: SyncPolicy,
    /// Guards the round being collected; held only to push or take stores, never during I/O.
    state: Mutex<State>,
    /// Signals the sync thread: stores became dirty, or shutdown.
    work: Condvar,
    /// Signals waiters: an epoch was reached.
    done: Condvar,
    synced: AtomicU64,
    /// Separate from `state` so callbacks never run under the lock publishers take.
    subscribers: Mutex<Vec<Subscriber>>,
    /// Rounds in which some store's flush or fdatasync failed: what waited on them must not be
    /// confirmed as durable.
    failed_rounds: Mutex<std::collections::BTreeSet<u64>>,
}

struct State {
    /// Epoch of the round being collected.
    collecting: u64,
    dirty: Vec<SharedStore>,
    /// Key logs in the round, written after `dirty` is synced.
    keys: Vec<SharedKeyLog>,
    /// `dirty` and `keys`, by address.
    seen: HashSet<usize>,
    /// Dirty stores nobody waits on (see [`SyncGroup::mark_dirty_lazy`]).
    lazy: Vec<SharedStore>,
    lazy_seen: HashSet<usize>,
    shutdown: bool,
}

impl SyncGroup {
    /// Starts the sync thread.
    pub fn new(policy: SyncPolicy) -> SyncGroup {
        let shared = Arc::new(Shared {
            policy,
            state: Mutex::new(State {
                collecting: 1,
                dirty: Vec::new(),
                keys: Vec::new(),
                seen: HashSet::new(),
                lazy: Vec::new(),
                lazy_seen: HashSet::new(),
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            synced: AtomicU64::new(0),
            subscribers: Mutex::new(Vec::new()),
            failed_rounds: Mutex::new(std::collections::BTreeSet::new()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rill-store-sync".into())
            .spawn(move || run(&s))
            .map_err(|e| tracing::error!(error = %e, "cannot spawn the store sync thread"))
            .ok();
        SyncGroup {
            handle: Arc::new(Handle { shared, thread }),
        }
    }

    /// Puts `store` in the round being collected and returns the epoch that round will reach:
    /// everything appended to `store` before this call is durable once that epoch is synced.
    /// May be called with the store's lock held (it does not lock the store).
    pub fn mark_dirty(&self, store: &SharedStore) -> u64 {
        let sh = &self.handle.shared;
        let mut st = sh.state.lock();
        if st.add_dirty(store) && st.pending() == 1 && !defer_start(self) {
            sh.work.notify_one();
        }
        st.collecting
    }

    /// [`SyncGroup::mark_dirty`] for a key log: puts it in the round being collected and
    /// returns that round's epoch. The round writes the log's records whose `after_epoch` it
    /// has reached, after the queue logs' fdatasyncs, so a record appended with
    /// `after_epoch <= e` before this returned `e` is durable once `e` is synced.
    pub fn mark_keys_dirty(&self, log: &SharedKeyLog) -> u64 {
        let sh = &self.handle.shared;
        let mut st = sh.state.lock();
        let added = st.seen.insert(Arc::as_ptr(log) as usize);
        if added {
            st.keys.push(log.clone());
            if st.pending() == 1 && !defer_start(self) {
                sh.work.notify_one();
            }
        }
        st.collecting
    }

    /// Until the returned guard is dropped (nested guards: the outermost), this thread's
    /// [`SyncGroup::mark_dirty`] calls do not wake an idle sync thread; dropping the guard does.
    /// A sync thread that is busy anyway may still pick their writes up earlier.
    pub fn defer_start() -> DeferredStart {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            d.depth += 1;
        });
        DeferredStart {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Starts a round if stores are waiting for one.
    fn start_pending(&self) {
        let sh = &self.handle.shared;
        let st = sh.state.lock();
        if st.pending() > 0 {
            sh.work.notify_one();
        }
    }

    /// Like [`SyncGroup::mark_dirty`] for writes nobody waits on (acks, delivery marks): they
    /// ride along with the next round, or are synced within [`LAZY_SYNC`] if none comes, so a
    /// consumer's acks do not cost a device flush each at low rates.
    pub fn mark_dirty_lazy(&self, store: &SharedStore) {
        let sh = &self.handle.shared;
        let mut st = sh.state.lock();
        if st.add_lazy(store) && st.lazy.len() == 1 && st.pending() == 0 {
            // Let the thread start its LAZY_SYNC timer.
            sh.work.notify_one();
        }
    }

    /// The last completed round.
    pub fn synced_epoch(&self) -> u64 {
        self.handle.shared.synced.load(Ordering::Acquire)
    }

    /// Whether round `epoch` failed to make everything durable (a store's write or fdatasync
    /// failed). Callers must then nack instead of confirm what waited on that round.
    pub fn round_failed(&self, epoch: u64) -> bool {
        self.handle.shared.failed_rounds.lock().contains(&epoch)
    }

    /// Calls `f` on the sync thread after each round with the new synced epoch (after
    /// [`SyncGroup::wait`]ers of that round are woken). `f` must be
    /// quick and must not call [`SyncGroup::wait`]; a panic in it is caught and logged.
    pub fn subscribe(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        self.handle.shared.subscribers.lock().push(Arc::from(f));
    }

    /// Blocks until `epoch` is synced. `epoch` must come from [`SyncGroup::mark_dirty`].
    pub fn wait(&self, epoch: u64) {
        let sh = &self.handle.shared;
        if sh.synced.load(Ordering::Acquire) >= epoch {
            return;
        }
        // A round this thread holds back with a guard would never come.
        self.start_pending();
        let mut st = sh.state.lock();
        while sh.synced.load(Ordering::Acquire) < epoch {
            if self.handle.thread.is_none() {
                // No sync thread could be started; never block forever.
                return;
            }
            sh.done.wait(&mut st);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.take() {
            // A subscriber dropping the last handle runs on the sync thread itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl State {
    /// Stores and key logs in the round being collected.
    fn pending(&self) -> usize {
        self.dirty.len() + self.keys.len()
    }

    /// Puts `store` in the round being collected; false if it already is.
    fn add_dirty(&mut self, store: &SharedStore) -> bool {
        let added = self.seen.insert(Arc::as_ptr(store) as usize);
        if added {
            self.dirty.push(store.clone());
        }
        added
    }

    /// Puts `store` on the lazy list unless it is in the round or on the list already.
    fn add_lazy(&mut self, store: &SharedStore) -> bool {
        let key = Arc::as_ptr(store) as usize;
        let added = !self.seen.contains(&key) && self.lazy_seen.insert(key);
        if added {
            self.lazy.push(store.clone());
        }
        added
    }
}

/// Rounds held back on this thread (see [`SyncGroup::defer_start`]).
#[derive(Default)]
struct Deferred {
    depth: usize,
    groups: Vec<SyncGroup>,
}

thread_local! {
    static DEFERRED: RefCell<Deferred> = RefCell::new(Deferred::default());
}

/// Returns true if `group`'s round start was taken over by this thread's guard.
fn defer_start(group: &SyncGroup) -> bool {
    DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        if d.depth == 0 {
            return false;
        }
        if !d
            .groups
            .iter()
            .any(|g| Arc::ptr_eq(&g.handle, &group.handle))
        {
            d.groups.push(group.clone());
        }
        true
    })
}

/// While alive, rounds this thread would start wait; dropping it starts them. Not `Send`: it
/// belongs to the thread that made it.
#[must_use = "rounds start when the guard is dropped"]
pub struct DeferredStart {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for DeferredStart {
    fn drop(&mut self) {
        let groups = DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            d.depth -= 1;
            if d.depth == 0 {
                std::mem::take(&mut d.groups)
            } else {
                Vec::new()
            }
        });
        for g in groups {
            g.start_pending();
        }
    }
}

fn run(sh: &Shared) {
    let mut last_round: Option<Instant> = None;
    loop {
        let (epoch, stores, key_logs, all_acks) = {
            let mut st = sh.state.lock();
            let mut lazy_since: Option<Instant> = None;
            while st.pending() == 0 && !st.shutdown {
                if st.lazy.is_empty() {
                    lazy_since = None;
                    sh.work.wait(&mut st);
                    continue;
                }
                let since = *lazy_since.get_or_insert_with(Instant::now);
                let due = since + LAZY_SYNC;
                if Instant::now() >= due {
                    break;
                }
                sh.work.wait_until(&mut st, due);
            }
            // A round of its own for lazy writes (or the last one) syncs all ack files; a
            // round for publishes syncs only those whose acks have waited LAZY_SYNC.
            let all_acks = st.pending() == 0 || st.shutdown;
            // Lazily dirtied stores ride along with this round.
            for store in std::mem::take(&mut st.lazy) {
                st.add_dirty(&store);
            }
            st.lazy_seen.clear();
            if st.pending() == 0 {
                return; // shutdown with nothing pending
            }
            if let (SyncPolicy::Interval(d), Some(last)) = (sh.policy, last_round) {
                let due = last + d;
                while !st.shutdown && Instant::now() < due {
                    sh.work.wait_until(&mut st, due);
                }
            }
            let epoch = st.collecting;
            st.collecting += 1;
            st.seen.clear();
            (
                epoch,
                std::mem::take(&mut st.dirty),
                std::mem::take(&mut st.keys),
                all_acks,
            )
        };
        last_round = Some(Instant::now());
        let fsync = sh.policy != SyncPolicy::Never;
        // Phase 1: write buffers under each store's lock (short).
        let mut batches = Vec::with_capacity(stores.len());
        let mut prepare_failed = false;
        let mut acks_left = Vec::new();
        for store in &stores {
            match store.lock().prepare_sync_inner(fsync, !all_acks) {
                Ok(b) => {
                    if b.acks_deferred() {
                        acks_left.push(store.clone());
                    }
                    batches.push(b);
                }
                Err(e) => {
                    prepare_failed = true;
                    tracing::error!(error = %e, "store flush failed");
                }
            }
        }
        drop(stores);
        // Phase 2: fdatasync without any store lock.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let report = |r: Result<(), StoreError>| {
            if let Err(e) = r {
                failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "store fdatasync failed; the store refuses further writes");
            }
        };
        for b in batches {
            report(b.run());
        }
        if prepare_failed || failed.load(Ordering::Relaxed) {
            sh.failed_rounds.lock().insert(epoch);
        }
        // Phase 3: key logs, now that the messages their records stand for are on disk. A
        // record whose message's round failed is never written (the log fails instead).
        let round_failed = |e: u64| sh.failed_rounds.lock().contains(&e);
        for log in &key_logs {
            let prepared = log.lock().prepare_round(epoch, fsync, &round_failed);
            match prepared.and_then(|b| b.run()) {
                Ok(()) => {}
                Err(e) => {
                    sh.failed_rounds.lock().insert(epoch);
                    tracing::error!(error = %e, "key log write or fdatasync failed; the log refuses further writes");
                }
            }
        }
        drop(key_logs);
        {
            // Publish under the lock so a waiter cannot miss the notification.
            let mut st = sh.state.lock();
            sh.synced.store(epoch, Ordering::Release);
            sh.done.notify_all();
            for store in &acks_left {
                st.add_lazy(store);
            }
        }
        let subs: Vec<Subscriber> = sh.subscribers.lock().clone();
        for f in subs {
            if std::panic::catch_unwind(AssertUnwindSafe(|| f(epoch))).is_err() {
                tracing::error!(epoch, "a sync subscriber panicked");
            }
        }
    }
}
