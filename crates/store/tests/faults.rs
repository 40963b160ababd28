//! Injected I/O failures surface as errors (never panics), and group commit shares fdatasyncs.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use rill_store::backend::{FaultyBackend, MemBackend, StorageBackend};
use rill_store::{QueueStore, SharedStore, StoreError, SyncGroup, SyncPolicy};

#[test]
fn write_error_surfaces_as_store_error_and_fails_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(file_backend());
    let (mut s, _) =
        QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let good = s.append(&msg(1, 10)).unwrap();
    s.sync().unwrap();
    fb.fail_writes(true);
    // Buffered: the append itself succeeds; the write happens at sync and fails there.
    s.append(&msg(2, 10)).unwrap();
    let err = s.sync().unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(s.failure().is_some());
    // From now on writes are refused, reads still work.
    assert!(matches!(
        s.append(&msg(3, 10)),
        Err(StoreError::Failed { .. })
    ));
    assert!(matches!(s.ack(good), Err(StoreError::Failed { .. })));
    assert!(matches!(s.sync(), Err(StoreError::Failed { .. })));
    assert_eq!(s.read(good).unwrap(), msg(1, 10));
    fb.fail_writes(false);
    drop(s);
    // Reopening recovers what was synced.
    let (_, rec) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(rec, vec![(good, msg(1, 10))]);
}

#[test]
fn large_append_write_error_is_returned_by_append() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(file_backend());
    let (mut s, _) =
        QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    fb.fail_writes(true);
    // Bigger than the write buffer: written at once.
    assert!(matches!(
        s.append(&msg(1, 300_000)),
        Err(StoreError::Io { .. })
    ));
}

#[test]
fn fsync_error_fails_the_store_and_the_group_round_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(file_backend());
    let (s, _) = QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Always);
    fb.fail_syncs(true);
    store.lock().append(&msg(1, 1)).unwrap();
    let e = group.mark_dirty(&store);
    group.wait(e);
    // The broker's check before confirming:
    assert!(group.round_failed(e));
    assert!(store.lock().failure().is_some());
    assert!(matches!(
        store.lock().append(&msg(2, 1)),
        Err(StoreError::Failed { .. })
    ));
}

#[test]
fn healthy_rounds_are_not_reported_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Always);
    store.lock().append(&msg(1, 1)).unwrap();
    let e = group.mark_dirty(&store);
    group.wait(e);
    assert!(!group.round_failed(e));
}

#[test]
fn open_error_surfaces_as_store_error() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(file_backend());
    let (mut s, _) =
        QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    fb.fail_opens(true);
    assert!(matches!(s.append(&msg(1, 1)), Err(StoreError::Io { .. })));
    drop(s);
    // An empty directory has nothing to open.
    assert!(QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).is_ok());
    fb.fail_opens(false);
    let (mut s, _) =
        QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    s.append(&msg(1, 1)).unwrap();
    s.sync().unwrap();
    drop(s);
    fb.fail_opens(true);
    assert!(matches!(
        QueueStore::open_with(dir.path(), opts(1 << 20), Arc::new(fb.clone())),
        Err(StoreError::Io { .. })
    ));
}

#[test]
fn sync_with_nothing_dirty_does_no_io() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (mut s, _) =
        QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    s.append(&msg(1, 1)).unwrap();
    s.sync().unwrap();
    let before = fb.counters();
    s.sync().unwrap();
    s.sync().unwrap();
    assert_eq!(fb.counters(), before);
}

#[test]
fn group_commit_shares_fdatasyncs_between_concurrent_publishers() {
    const THREADS: u64 = 8;
    const STORES: usize = 2;
    const BURSTS: u64 = 100;
    const PER_BURST: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(file_backend());
    let backend: Arc<dyn StorageBackend> = Arc::new(fb.clone());
    let stores: Vec<SharedStore> = (0..STORES)
        .map(|i| {
            let (s, _) = QueueStore::open_with(
                &dir.path().join(format!("q{i}")),
                opts(1 << 20),
                backend.clone(),
            )
            .unwrap();
            Arc::new(parking_lot::Mutex::new(s))
        })
        .collect();
    let group = SyncGroup::new(SyncPolicy::Always);
    let notified = Arc::new(AtomicU64::new(0));
    let n = notified.clone();
    group.subscribe(Box::new(move |e| {
        n.fetch_max(e, Ordering::SeqCst);
    }));
    let base = fb.counters();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = stores[t as usize % STORES].clone();
            let group = group.clone();
            scope.spawn(move || {
                for b in 0..BURSTS {
                    // A publisher with pipelined confirms: a burst, then wait for its epoch.
                    for k in 0..PER_BURST {
                        store
                            .lock()
                            .append(&msg(t * 1_000_000 + b * 100 + k, 64))
                            .unwrap();
                    }
                    let e = group.mark_dirty(&store);
                    group.wait(e);
                    assert!(group.synced_epoch() >= e);
                }
            });
        }
    });
    let appends = THREADS * BURSTS * PER_BURST;
    let syncs = fb.counters().file_syncs - base.file_syncs;
    eprintln!(
        "{appends} appends, {syncs} fdatasyncs, {} rounds",
        group.synced_epoch()
    );
    assert!(syncs > 0);
    assert!(
        syncs * 10 < appends,
        "{syncs} fdatasyncs for {appends} appends"
    );
    // Subscribers saw the last round (they run after waiters are woken, so look once the
    // thread has stopped).
    let last = group.synced_epoch();
    drop(group);
    assert_eq!(notified.load(Ordering::SeqCst), last);
    // Everything is there after reopening.
    let mut total = 0;
    for i in 0..STORES {
        let (_, rec) = QueueStore::open(&dir.path().join(format!("q{i}")), opts(1 << 20)).unwrap();
        total += rec.len() as u64;
    }
    assert_eq!(total, appends);
}

#[test]
fn interval_policy_batches_rounds() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (s, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Interval(std::time::Duration::from_millis(20)));
    let start = std::time::Instant::now();
    let mut last = 0;
    for i in 0..5 {
        store.lock().append(&msg(i, 1)).unwrap();
        last = group.mark_dirty(&store);
        group.wait(last);
    }
    assert_eq!(group.synced_epoch(), last);
    // First round is immediate, the next four wait for the interval.
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(80),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn never_policy_group_flushes_without_fdatasync() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (s, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Never);
    store.lock().append(&msg(1, 1)).unwrap();
    let e = group.mark_dirty(&store);
    group.wait(e);
    let c = fb.counters();
    assert_eq!(c.file_syncs, 0);
    assert!(c.writes > 0, "buffer was written to the OS");
}

#[test]
fn dropping_the_group_finishes_the_pending_round() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (s, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Interval(std::time::Duration::from_secs(3600)));
    store.lock().append(&msg(1, 1)).unwrap();
    let e1 = group.mark_dirty(&store);
    group.wait(e1); // first round is immediate
    store.lock().append(&msg(2, 1)).unwrap();
    group.mark_dirty(&store);
    let syncs = fb.counters().file_syncs;
    let t = std::time::Instant::now();
    drop(group);
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert!(fb.counters().file_syncs > syncs);
}

#[test]
fn lazy_writes_are_synced_without_another_round() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (s, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Always);
    let pos = store.lock().append(&msg(1, 1)).unwrap();
    group.wait(group.mark_dirty(&store));
    let before = group.synced_epoch();
    store.lock().ack(pos).unwrap();
    group.mark_dirty_lazy(&store);
    // No publisher waits: the ack still reaches the disk within LAZY_SYNC (bounded poll).
    let deadline = std::time::Instant::now() + rill_store::LAZY_SYNC * 50;
    while group.synced_epoch() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(group.synced_epoch() > before, "lazy write never synced");
}

#[test]
fn rounds_held_back_by_a_guard_still_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Always);
    let outer = SyncGroup::defer_start();
    let e = {
        let _inner = SyncGroup::defer_start();
        store.lock().append(&msg(1, 1)).unwrap();
        group.mark_dirty(&store)
    };
    // Dropping the outer guard wakes the sync thread (if a round did not already take it).
    drop(outer);
    group.wait(e);
    assert!(group.synced_epoch() >= e && !group.round_failed(e));
    // Waiting inside a guard starts the held-back round instead of waiting forever.
    let _guard = SyncGroup::defer_start();
    store.lock().append(&msg(2, 1)).unwrap();
    let e2 = group.mark_dirty(&store);
    group.wait(e2);
    assert!(group.synced_epoch() >= e2);
}

#[test]
fn acks_skipped_by_publish_rounds_are_synced_within_the_lazy_bound() {
    let mem = MemBackend::new();
    let backend = Arc::new(mem.clone());
    let (s, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), backend.clone()).unwrap();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(s));
    let group = SyncGroup::new(SyncPolicy::Always);
    let acked = store.lock().append(&msg(1, 1)).unwrap();
    group.wait(group.mark_dirty(&store));
    store.lock().ack(acked).unwrap();
    group.mark_dirty_lazy(&store);
    // Publish rounds keep coming; each makes its own message durable at once, while the ack
    // waits for its LAZY_SYNC turn, which these rounds must not postpone forever.
    let deadline = std::time::Instant::now() + rill_store::LAZY_SYNC * 50;
    let ack_durable = loop {
        let last = store.lock().append(&msg(2, 1)).unwrap();
        group.wait(group.mark_dirty(&store));
        let after_crash = mem.snapshot_after_crash();
        let (_, recovered) =
            QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(after_crash)).unwrap();
        assert!(
            recovered.iter().any(|(p, _)| *p == last),
            "a confirmed message was lost"
        );
        if recovered.iter().all(|(p, _)| *p != acked) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(rill_store::LAZY_SYNC / 10);
    };
    assert!(
        ack_durable,
        "the ack was never synced while publish rounds ran"
    );
}
