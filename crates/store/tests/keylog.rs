//! The key log (message-deduplication caches on disk): replay, torn and corrupt files, crashes
//! in the middle of a rewrite, and its place in group commit after the queue logs.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions may panic too

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use rill_store::backend::{FaultyBackend, MemBackend, StorageBackend};
use rill_store::{
    KeyLog, KeyRecord, QueueStore, SharedKeyLog, SharedStore, StoreError, SyncGroup, SyncPolicy,
};

const DIR: &str = "/keys";

fn open_mem(mem: &MemBackend, policy: SyncPolicy) -> (KeyLog, Vec<KeyRecord>) {
    KeyLog::open_with(DIR.as_ref(), policy, Arc::new(mem.clone())).unwrap()
}

fn keys(records: &[KeyRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect()
}

fn key_files(mem: &MemBackend) -> Vec<String> {
    let mut v: Vec<String> = mem
        .list_dir(DIR.as_ref())
        .unwrap()
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".keys"))
        .collect();
    v.sort();
    v
}

fn gen_path(id: u32) -> std::path::PathBuf {
    Path::new(DIR).join(format!("{id:010}.keys"))
}

/// A log holding keys k0..k{n-1}, synced, in generation 0.
fn synced_log(mem: &MemBackend, n: usize) -> KeyLog {
    let (mut log, _) = open_mem(mem, SyncPolicy::Always);
    for i in 0..n {
        log.append(format!("k{i}").as_bytes(), Some(1_000 + i as u64), 0)
            .unwrap();
    }
    log.sync().unwrap();
    log
}

#[test]
fn keys_and_expiry_times_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, rec) = KeyLog::open(dir.path(), SyncPolicy::Always).unwrap();
    assert!(rec.is_empty());
    log.append(b"a", None, 0).unwrap();
    log.append(b"", Some(42), 0).unwrap();
    log.append(&[0xff; 300], Some(0), 0).unwrap();
    log.sync().unwrap();
    drop(log);
    let (_, rec) = KeyLog::open(dir.path(), SyncPolicy::Always).unwrap();
    assert_eq!(
        rec,
        vec![
            KeyRecord {
                key: b"a".to_vec(),
                expires_at_ms: None
            },
            KeyRecord {
                key: Vec::new(),
                expires_at_ms: Some(42)
            },
            // An expiry at the epoch itself is stored as 1 ms after it: still long past.
            KeyRecord {
                key: vec![0xff; 300],
                expires_at_ms: Some(1)
            },
        ]
    );
}

#[test]
fn power_loss_keeps_exactly_what_was_synced() {
    let mem = MemBackend::new();
    let mut log = synced_log(&mem, 2);
    log.append(b"unsynced", None, 0).unwrap();
    mem.crash();
    let (_, rec) = open_mem(&mem, SyncPolicy::Always);
    assert_eq!(keys(&rec), ["k0", "k1"]);
}

#[test]
fn appended_keys_survive_a_process_kill_once_written() {
    let mem = MemBackend::new();
    let (mut log, _) = open_mem(&mem, SyncPolicy::Never);
    log.append(b"a", None, 0).unwrap();
    // Only buffered: a killed process takes it along.
    assert!(open_mem(&mem, SyncPolicy::Never).1.is_empty());
    // Written to the OS without fdatasync: survives kill -9 (no crash()), not a power loss.
    log.sync().unwrap();
    assert_eq!(keys(&open_mem(&mem, SyncPolicy::Never).1), ["a"]);
}

#[test]
fn a_torn_tail_is_truncated_with_a_warning_and_appends_continue() {
    let mem = MemBackend::new();
    drop(synced_log(&mem, 3));
    let path = gen_path(0);
    let mut data = mem.contents(&path).unwrap();
    let full = data.len();
    // Half of a fourth record.
    data.extend_from_slice(&[20, 0, 0, 0, 1, 2, 3, 4, 1, 0]);
    mem.set_contents(&path, data);
    let ((mut log, rec), warnings) = capture_warnings(|| open_mem(&mem, SyncPolicy::Always));
    assert_eq!(keys(&rec), ["k0", "k1", "k2"]);
    assert!(warnings.contains("truncating key log"), "{warnings}");
    assert!(warnings.contains("0000000000.keys"), "{warnings}");
    assert_eq!(mem.contents(&path).unwrap().len(), full);
    log.append(b"k3", None, 0).unwrap();
    log.sync().unwrap();
    drop(log);
    assert_eq!(
        keys(&open_mem(&mem, SyncPolicy::Always).1),
        ["k0", "k1", "k2", "k3"]
    );
}

#[test]
fn any_cut_or_flipped_byte_recovers_a_prefix_without_panicking() {
    let mem = MemBackend::new();
    drop(synced_log(&mem, 4));
    let path = gen_path(0);
    let good = mem.contents(&path).unwrap();
    let all = ["k0", "k1", "k2", "k3"];
    for cut in 0..good.len() {
        let m = MemBackend::new();
        drop(synced_log(&m, 0));
        m.set_contents(&path, good[..cut].to_vec());
        let rec = match KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(m)) {
            Ok((_, rec)) => keys(&rec),
            Err(e) => panic!("cut at {cut}: {e}"),
        };
        assert_eq!(rec, all[..rec.len()], "cut at {cut}");
    }
    for at in 12..good.len() {
        let m = MemBackend::new();
        drop(synced_log(&m, 0));
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        m.set_contents(&path, bad);
        let (_, rec) = KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(m)).unwrap();
        let rec = keys(&rec);
        assert_eq!(rec, all[..rec.len()], "flipped byte {at}");
    }
}

#[test]
fn random_files_never_panic() {
    // xorshift: deterministic, no extra dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let m = MemBackend::new();
        drop(synced_log(&m, 0));
        let len = (next() % 200) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if next() % 2 == 0 && data.len() >= 12 {
            data[..8].copy_from_slice(b"RILLKEY\0");
            data[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        m.set_contents(&gen_path(0), data);
        let _ = KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(m));
    }
}

#[test]
fn foreign_or_newer_files_are_refused() {
    let mem = MemBackend::new();
    drop(synced_log(&mem, 1));
    let path = gen_path(0);
    let good = mem.contents(&path).unwrap();
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    mem.set_contents(&path, newer);
    assert!(matches!(
        KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(mem.clone())),
        Err(StoreError::UnsupportedVersion { found: 2, .. })
    ));
    let mut foreign = good;
    foreign[..8].copy_from_slice(b"RILLSEG\0");
    mem.set_contents(&path, foreign);
    assert!(matches!(
        KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(mem.clone())),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn a_rewrite_drops_dead_keys_and_the_old_generation() {
    let mem = MemBackend::new();
    let (mut log, _) = open_mem(&mem, SyncPolicy::Always);
    let seqs: Vec<u64> = (0..10)
        .map(|i| log.append(format!("k{i}").as_bytes(), None, 0).unwrap())
        .collect();
    log.sync().unwrap();
    assert_eq!(log.records(), 10);
    let live: Vec<(Vec<u8>, u64)> = (7..10)
        .map(|i| (format!("k{i}").into_bytes(), seqs[i]))
        .collect();
    log.rewrite(live.iter().map(|(k, s)| (k.as_slice(), None, *s)))
        .unwrap();
    assert_eq!(log.records(), 3);
    log.append(b"k10", None, 0).unwrap();
    log.sync().unwrap();
    // The old generation goes in the round after the one that synced its replacement.
    assert_eq!(key_files(&mem).len(), 2);
    log.sync().unwrap();
    assert_eq!(key_files(&mem), ["0000000001.keys"]);
    mem.crash();
    let (_, rec) = open_mem(&mem, SyncPolicy::Always);
    assert_eq!(keys(&rec), ["k7", "k8", "k9", "k10"]);
}

#[test]
fn power_loss_during_a_rewrite_leaves_the_previous_generation_in_charge() {
    let mem = MemBackend::new();
    drop(synced_log(&mem, 5));
    // Reopened without fdatasync: the rewrite is written and the old generation unlinked,
    // but none of it is durable.
    let (mut log, rec) = open_mem(&mem, SyncPolicy::Never);
    assert_eq!(rec.len(), 5);
    log.rewrite([(&b"k4"[..], Some(1_004), 0)]).unwrap();
    log.sync().unwrap();
    log.sync().unwrap();
    assert_eq!(key_files(&mem), ["0000000001.keys"]);
    // kill -9: what was written counts; the new generation is complete.
    let snapshot = mem.snapshot_after_crash();
    let (_, rec) = open_mem(&mem, SyncPolicy::Never);
    assert_eq!(keys(&rec), ["k4"]);
    // Power loss instead: the new file and the unlink were never made durable.
    let (_, rec) = KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(snapshot)).unwrap();
    assert_eq!(keys(&rec), ["k0", "k1", "k2", "k3", "k4"]);
}

#[test]
fn a_torn_snapshot_falls_back_to_the_older_generation() {
    let mem = MemBackend::new();
    let mut log = synced_log(&mem, 3);
    log.rewrite([(&b"k1"[..], None, 0), (&b"k2"[..], None, 0)])
        .unwrap();
    log.sync().unwrap();
    drop(log);
    let new = gen_path(1);
    let data = mem.contents(&new).unwrap();
    // Cut inside the snapshot's second record.
    mem.set_contents(&new, data[..data.len() - 3].to_vec());
    let ((_, rec), warnings) = capture_warnings(|| open_mem(&mem, SyncPolicy::Always));
    assert_eq!(keys(&rec), ["k0", "k1", "k2"]);
    assert!(warnings.contains("rewrite never completed"), "{warnings}");
    assert_eq!(key_files(&mem), ["0000000000.keys"]);
}

#[test]
fn an_incomplete_only_generation_is_kept_and_rewritten() {
    let mem = MemBackend::new();
    let mut log = synced_log(&mem, 2);
    log.rewrite([(&b"k0"[..], None, 0), (&b"k1"[..], None, 0)])
        .unwrap();
    log.sync().unwrap();
    log.sync().unwrap();
    drop(log);
    assert_eq!(key_files(&mem), ["0000000001.keys"]);
    // Damage (not a crash: the older generation is gone) cuts the snapshot short.
    let path = gen_path(1);
    let data = mem.contents(&path).unwrap();
    mem.set_contents(&path, data[..data.len() - 2].to_vec());
    let ((mut log, rec), warnings) = capture_warnings(|| open_mem(&mem, SyncPolicy::Always));
    assert_eq!(keys(&rec), ["k0"]);
    assert!(warnings.contains("incomplete snapshot"), "{warnings}");
    log.append(b"k9", None, 0).unwrap();
    log.sync().unwrap();
    log.sync().unwrap();
    drop(log);
    assert_eq!(key_files(&mem), ["0000000002.keys"]);
    assert_eq!(keys(&open_mem(&mem, SyncPolicy::Always).1), ["k0", "k9"]);
}

#[test]
fn write_failures_fail_the_log() {
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (mut log, _) =
        KeyLog::open_with(DIR.as_ref(), SyncPolicy::Always, Arc::new(fb.clone())).unwrap();
    log.append(b"a", None, 0).unwrap();
    fb.fail_writes(true);
    assert!(matches!(log.sync(), Err(StoreError::Io { .. })));
    assert!(log.failure().is_some());
    assert!(matches!(
        log.append(b"b", None, 0),
        Err(StoreError::Failed { .. })
    ));
}

#[test]
fn destroy_removes_the_directory_and_refuses_appends() {
    let mem = MemBackend::new();
    let mut log = synced_log(&mem, 1);
    log.destroy_in_place().unwrap();
    assert!(!mem.exists(DIR.as_ref()).unwrap());
    assert!(matches!(
        log.append(b"a", None, 0),
        Err(StoreError::Destroyed { .. })
    ));
    // A second destroy (the queue's own log removed the directory first) is fine.
    log.destroy_in_place().unwrap();
}

fn shared_pair(mem: &MemBackend, fb: &FaultyBackend) -> (SharedStore, SharedKeyLog) {
    let (q, _) = QueueStore::open_with("/q".as_ref(), opts(1 << 20), Arc::new(fb.clone())).unwrap();
    let (k, _) = open_mem(mem, SyncPolicy::Always);
    (
        Arc::new(parking_lot::Mutex::new(q)),
        Arc::new(parking_lot::Mutex::new(k)),
    )
}

#[test]
fn group_commit_writes_a_key_in_its_messages_round() {
    let mem = MemBackend::new();
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (queue, keys_log) = shared_pair(&mem, &fb);
    let group = SyncGroup::new(SyncPolicy::Always);
    queue.lock().append(&msg(1, 8)).unwrap();
    let m = group.mark_dirty(&queue);
    keys_log.lock().append(b"k", None, m).unwrap();
    let k = group.mark_keys_dirty(&keys_log);
    assert!(k >= m);
    group.wait(k);
    assert!(!group.round_failed(k));
    assert_eq!(keys_log.lock().unwritten(), 0);
    mem.crash();
    assert_eq!(keys(&open_mem(&mem, SyncPolicy::Always).1), ["k"]);
}

#[test]
fn group_commit_holds_a_key_back_until_its_round() {
    let mem = MemBackend::new();
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (_, keys_log) = shared_pair(&mem, &fb);
    let group = SyncGroup::new(SyncPolicy::Always);
    // Its message's round is still to come.
    keys_log.lock().append(b"later", None, u64::MAX).unwrap();
    let e = group.mark_keys_dirty(&keys_log);
    group.wait(e);
    assert_eq!(keys_log.lock().unwritten(), 1);
    assert!(open_mem(&mem, SyncPolicy::Always).1.is_empty());
}

#[test]
fn a_key_whose_message_was_not_synced_is_never_written() {
    let mem = MemBackend::new();
    let fb = FaultyBackend::new(Arc::new(MemBackend::new()));
    let (queue, keys_log) = shared_pair(&mem, &fb);
    let group = SyncGroup::new(SyncPolicy::Always);
    fb.fail_syncs(true);
    queue.lock().append(&msg(1, 8)).unwrap();
    let m = group.mark_dirty(&queue);
    keys_log.lock().append(b"k", None, m).unwrap();
    let k = group.mark_keys_dirty(&keys_log);
    group.wait(k);
    assert!(group.round_failed(k));
    assert!(keys_log.lock().failure().is_some());
    assert!(open_mem(&mem, SyncPolicy::Always).1.is_empty());
}
