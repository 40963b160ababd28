//! Store throughput: `cargo run --release -p rill-store --example store_bench [-- DIR [N]]`.
//!
//! 1. N × 1 KiB appends to one store with `SyncPolicy::Never`, then one sync.
//! 2. Recovery (`QueueStore::open`) of those N records.
//! 3. Group commit: 4 threads, each publishing to its own store in bursts of 64 and waiting
//!    for durability (fdatasync) after each burst, like publishers with pipelined confirms.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rill_store::backend::{FaultyBackend, FileBackend};
use rill_store::{
    QueueStore, SharedStore, StoreError, StoreOptions, StoredMessage, SyncGroup, SyncPolicy,
};

fn message(body: &Bytes) -> StoredMessage {
    StoredMessage {
        exchange: "amq.direct".into(),
        routing_key: "bench".into(),
        properties: Bytes::from_static(&[0x10, 0x00, 0x02]),
        body: body.clone(),
        timestamp_ms: 1_700_000_000_000,
        flags: 0,
    }
}

fn main() -> Result<(), StoreError> {
    let mut args = std::env::args().skip(1);
    let base: PathBuf = args.next().map_or_else(
        || std::env::temp_dir().join("rill-store-bench"),
        PathBuf::from,
    );
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let body = Bytes::from(vec![0xab; 1024]);
    let msg = message(&body);
    let _ = std::fs::remove_dir_all(&base);

    // 1. Appends, no fsync.
    let dir = base.join("never");
    let opts = StoreOptions {
        sync: SyncPolicy::Never,
        ..StoreOptions::default()
    };
    let (mut store, _) = QueueStore::open(&dir, opts)?;
    let t = Instant::now();
    for _ in 0..n {
        store.append(&msg)?;
    }
    store.sync()?;
    let el = t.elapsed();
    let mb = store.stats().bytes_on_disk as f64 / 1e6;
    println!(
        "append (SyncPolicy::Never): {n} x 1 KiB in {:.2?}: {:.0} records/s, {:.0} MB/s",
        el,
        n as f64 / el.as_secs_f64(),
        mb / el.as_secs_f64()
    );
    drop(store);

    // 2. Recovery.
    let t = Instant::now();
    let (store, recovered) = QueueStore::open(&dir, opts)?;
    let el = t.elapsed();
    println!(
        "recovery: {} records ({} segments) in {:.2?}: {:.0} records/s",
        recovered.len(),
        store.stats().segments,
        el,
        recovered.len() as f64 / el.as_secs_f64()
    );
    drop(recovered);
    store.destroy()?;

    // 3. Group commit with real fdatasync.
    group_commit(&base.join("group"), n, &msg)?;
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

fn group_commit(base: &Path, n: u64, msg: &StoredMessage) -> Result<(), StoreError> {
    const THREADS: u64 = 4;
    const BURST: u64 = 64;
    let fb = FaultyBackend::new(Arc::new(FileBackend));
    let group = SyncGroup::new(SyncPolicy::Always);
    let mut stores: Vec<SharedStore> = Vec::new();
    for i in 0..THREADS {
        let (s, _) = QueueStore::open_with(
            &base.join(format!("q{i}")),
            StoreOptions::default(),
            Arc::new(fb.clone()),
        )?;
        stores.push(Arc::new(parking_lot::Mutex::new(s)));
    }
    let per_thread = n / THREADS;
    let t = Instant::now();
    std::thread::scope(|scope| -> Result<(), StoreError> {
        let handles: Vec<_> = stores
            .iter()
            .map(|store| {
                let group = group.clone();
                scope.spawn(move || -> Result<(), StoreError> {
                    let mut sent = 0;
                    while sent < per_thread {
                        let burst = BURST.min(per_thread - sent);
                        {
                            let mut s = store.lock();
                            for _ in 0..burst {
                                s.append(msg)?;
                            }
                        }
                        sent += burst;
                        let e = group.mark_dirty(store);
                        group.wait(e);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| StoreError::Corrupt {
                path: base.into(),
                detail: "bench thread panicked".into(),
            })??;
        }
        Ok(())
    })?;
    let el = t.elapsed();
    let total = per_thread * THREADS;
    let c = fb.counters();
    println!(
        "group commit (Always, {THREADS} threads x bursts of {BURST}): {total} x 1 KiB in {:.2?}: {:.0} records/s; \
         {} fdatasyncs ({:.0} records each), {} rounds",
        el,
        total as f64 / el.as_secs_f64(),
        c.file_syncs,
        total as f64 / c.file_syncs.max(1) as f64,
        group.synced_epoch()
    );
    for s in stores {
        s.lock().destroy_in_place()?;
    }
    Ok(())
}
