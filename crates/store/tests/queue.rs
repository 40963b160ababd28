//! QueueStore: round trips, recovery, rollover, deletion, purge, errors.

mod common;

use common::*;
use rill_store::{Position, QueueStore, StoreError, StoredMessage};

#[test]
fn round_trip_append_read_ack_recover() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, rec) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    assert!(rec.is_empty());
    let msgs: Vec<_> = (0..100).map(|i| msg(i, 100 + i as usize)).collect();
    let pos: Vec<Position> = msgs.iter().map(|m| s.append(m).unwrap()).collect();
    // Reads work both from the buffer and after a sync (from the file).
    for (p, m) in pos.iter().zip(&msgs) {
        assert_eq!(&s.read(*p).unwrap(), m);
    }
    s.sync().unwrap();
    for (p, m) in pos.iter().zip(&msgs) {
        assert_eq!(&s.read(*p).unwrap(), m);
    }
    for p in pos.iter().step_by(2) {
        s.ack(*p).unwrap();
    }
    assert_eq!(s.stats().live_records, 50);
    s.sync().unwrap();
    drop(s);
    let (s, rec) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let expect: Vec<_> = pos
        .iter()
        .zip(&msgs)
        .skip(1)
        .step_by(2)
        .map(|(p, m)| (*p, m.clone()))
        .collect();
    assert_eq!(rec, expect);
    assert_eq!(s.stats().live_records, 50);
}

#[test]
fn recovery_returns_unacked_in_log_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(4096)).unwrap();
    let mut expect = Vec::new();
    for i in 0..200u64 {
        let m = msg(i, 50 + (i as usize * 7) % 300);
        let p = s.append(&m).unwrap();
        if i % 3 == 0 {
            s.ack(p).unwrap();
        } else {
            expect.push((p, m));
        }
    }
    assert!(s.stats().segments > 5, "{:?}", s.stats());
    s.sync().unwrap();
    drop(s);
    let (mut s, rec) = QueueStore::open(dir.path(), opts(4096)).unwrap();
    assert_eq!(rec, expect);
    // Appends after recovery go to a new segment, after every recovered one.
    let p = s.append(&msg(999, 10)).unwrap();
    assert!(p > expect.last().unwrap().0);
    // Reopen again without a sync in between: a clean drop of the process loses nothing
    // written to the OS, but the buffer was never written: it's gone, which is allowed.
    s.flush().unwrap();
    drop(s);
    let (_, rec2) = QueueStore::open(dir.path(), opts(4096)).unwrap();
    assert_eq!(rec2.len(), expect.len() + 1);
    assert_eq!(rec2[..expect.len()], expect[..]);
}

#[test]
fn rollover_and_deletion_of_fully_acked_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(2048)).unwrap();
    let pos: Vec<_> = (0..40).map(|i| s.append(&msg(i, 200)).unwrap()).collect();
    s.sync().unwrap();
    let segs: std::collections::BTreeSet<u32> = pos.iter().map(|p| p.segment).collect();
    assert!(segs.len() >= 4);
    assert_eq!(files_with_ext(dir.path(), ".seg").len(), segs.len());
    // Ack everything in the first segment but one record: the files stay.
    let first = *segs.iter().next().unwrap();
    let in_first: Vec<_> = pos.iter().filter(|p| p.segment == first).copied().collect();
    for p in &in_first[1..] {
        s.ack(*p).unwrap();
    }
    s.sync().unwrap();
    assert!(dir.path().join(format!("{first:010}.seg")).exists());
    assert!(dir.path().join(format!("{first:010}.ack")).exists());
    s.ack(in_first[0]).unwrap();
    assert!(!dir.path().join(format!("{first:010}.seg")).exists());
    assert!(!dir.path().join(format!("{first:010}.ack")).exists());
    // Acking a deleted or unknown position is a no-op.
    s.ack(in_first[0]).unwrap();
    s.ack(Position {
        segment: 12345,
        offset: 12,
    })
    .unwrap();
    s.ack(Position {
        segment: pos[39].segment,
        offset: 13,
    })
    .unwrap();
    assert_eq!(s.stats().live_records, 40 - in_first.len() as u64);
    // Ack everything: all sealed segments go; the active one stays until it rolls.
    for p in &pos {
        s.ack(*p).unwrap();
    }
    s.sync().unwrap();
    assert_eq!(files_with_ext(dir.path(), ".seg").len(), 1);
    assert_eq!(s.stats().live_records, 0);
    // The next rollover removes the fully acked active segment too.
    let last_seg = pos[39].segment;
    for i in 0..20 {
        s.append(&msg(i, 200)).unwrap();
    }
    s.sync().unwrap();
    assert!(!dir.path().join(format!("{last_seg:010}.seg")).exists());
    // And a reopen removes a fully acked segment left behind.
    drop(s);
    let (s, rec) = QueueStore::open(dir.path(), opts(2048)).unwrap();
    assert_eq!(rec.len(), 20);
    assert_eq!(
        s.stats().segments as usize,
        files_with_ext(dir.path(), ".seg").len()
    );
}

#[test]
fn record_larger_than_segment_gets_its_own_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(1024)).unwrap();
    let a = s.append(&msg(1, 10)).unwrap();
    let big = msg(2, 10_000);
    let b = s.append(&big).unwrap();
    let c = s.append(&msg(3, 10)).unwrap();
    assert!(a.segment < b.segment && b.segment < c.segment);
    assert_eq!(b.offset, rill_store::HEADER_LEN);
    assert_eq!(s.read(b).unwrap(), big);
    s.sync().unwrap();
    drop(s);
    let (_, rec) = QueueStore::open(dir.path(), opts(1024)).unwrap();
    assert_eq!(rec.iter().map(|r| r.0).collect::<Vec<_>>(), vec![a, b, c]);
}

#[test]
fn oversized_fields_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(1024)).unwrap();
    let mut m = msg(1, 1);
    m.exchange = "x".repeat(256);
    assert!(matches!(
        s.append(&m),
        Err(StoreError::FieldTooLong {
            field: "exchange",
            ..
        })
    ));
    let mut m = msg(1, 1);
    m.routing_key = "x".repeat(256);
    assert!(matches!(
        s.append(&m),
        Err(StoreError::FieldTooLong {
            field: "routing_key",
            ..
        })
    ));
    // The store is still usable.
    let p = s.append(&msg(2, 2)).unwrap();
    assert_eq!(s.read(p).unwrap(), msg(2, 2));
    assert!(matches!(
        s.read(Position {
            segment: p.segment,
            offset: p.offset + 1
        }),
        Err(StoreError::NotFound(_))
    ));
}

#[allow(clippy::unwrap_used)]
/// Builds a store with 3 synced records in one segment; returns (dir, positions, record bytes).
fn three_records(dir: &std::path::Path) -> (Vec<Position>, Vec<StoredMessage>) {
    let (mut s, _) = QueueStore::open(dir, opts(1 << 20)).unwrap();
    let msgs: Vec<_> = (0..3).map(|i| msg(i, 20)).collect();
    let pos = msgs.iter().map(|m| s.append(m).unwrap()).collect();
    s.sync().unwrap();
    (pos, msgs)
}

#[test]
fn torn_tail_at_every_cut_point_of_the_last_record() {
    let base = tempfile::tempdir().unwrap();
    let (pos, msgs) = three_records(base.path());
    let seg = base.path().join(format!("{:010}.seg", pos[0].segment));
    let full = std::fs::read(&seg).unwrap();
    let last = pos[2].offset as usize;
    for cut in last..full.len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg.file_name().unwrap());
        std::fs::write(&path, &full[..cut]).unwrap();
        let ((_, rec), log) =
            capture_warnings(|| QueueStore::open(dir.path(), opts(1 << 20)).unwrap());
        let got: Vec<_> = rec.into_iter().map(|r| r.1).collect();
        assert_eq!(got, msgs[..2], "cut at {cut}");
        if cut > last {
            assert!(log.contains("truncating segment"), "cut {cut}: {log}");
            assert!(log.contains(&format!("offset={last}")), "cut {cut}: {log}");
            assert!(log.contains(path.to_str().unwrap()), "cut {cut}: {log}");
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            last as u64,
            "truncated at {cut}"
        );
    }
}

#[test]
fn corrupt_byte_anywhere_in_the_last_record_drops_only_it() {
    let base = tempfile::tempdir().unwrap();
    let (pos, msgs) = three_records(base.path());
    let seg = base.path().join(format!("{:010}.seg", pos[0].segment));
    let full = std::fs::read(&seg).unwrap();
    let last = pos[2].offset as usize;
    for at in last..full.len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(seg.file_name().unwrap());
        let mut data = full.clone();
        data[at] ^= 0x5a;
        std::fs::write(&path, &data).unwrap();
        let ((_, rec), log) =
            capture_warnings(|| QueueStore::open(dir.path(), opts(1 << 20)).unwrap());
        let got: Vec<_> = rec.into_iter().map(|r| r.1).collect();
        assert_eq!(got, msgs[..2], "flip at {at}");
        assert!(log.contains("truncating segment"), "flip {at}: {log}");
    }
}

#[test]
fn corrupt_crc_mid_log_truncates_that_segment_and_keeps_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(512)).unwrap();
    let all: Vec<_> = (0..30u64)
        .map(|i| (s.append(&msg(i, 60)).unwrap(), msg(i, 60)))
        .collect();
    s.sync().unwrap();
    drop(s);
    let segs: Vec<u32> = {
        let mut v: Vec<u32> = all.iter().map(|r| r.0.segment).collect();
        v.dedup();
        v
    };
    assert!(segs.len() >= 3);
    let victim_seg = segs[1];
    let in_victim: Vec<_> = all.iter().filter(|r| r.0.segment == victim_seg).collect();
    assert!(in_victim.len() >= 2);
    let bad = in_victim[1].0;
    let path = dir.path().join(format!("{victim_seg:010}.seg"));
    let mut data = std::fs::read(&path).unwrap();
    data[bad.offset as usize + 4] ^= 0xff; // the CRC field
    std::fs::write(&path, &data).unwrap();
    let ((_, rec), log) = capture_warnings(|| QueueStore::open(dir.path(), opts(512)).unwrap());
    assert!(log.contains("CRC mismatch"), "{log}");
    assert!(log.contains(&format!("offset={}", bad.offset)), "{log}");
    let expect: Vec<_> = all
        .iter()
        .filter(|r| r.0.segment != victim_seg || r.0.offset < bad.offset)
        .cloned()
        .collect();
    assert_eq!(rec, expect);
}

#[test]
fn garbage_segment_and_ack_files_never_panic() {
    // Random-ish contents behind valid headers, and headers alone.
    let mut seed = 0x1234_5678_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let dir = tempfile::tempdir().unwrap();
        let len = (next() % 300) as usize;
        let mut seg: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && seg.len() >= 12 {
            seg[..8].copy_from_slice(b"RILLSEG\0");
            seg[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        let mut ack: Vec<u8> = (0..(next() % 40) as usize).map(|_| next() as u8).collect();
        if round % 3 == 0 && ack.len() >= 12 {
            ack[..8].copy_from_slice(b"RILLACK\0");
            ack[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        std::fs::write(dir.path().join("0000000000.seg"), &seg).unwrap();
        std::fs::write(dir.path().join("0000000000.ack"), &ack).unwrap();
        if let Ok((mut s, _)) = QueueStore::open(dir.path(), opts(4096)) {
            s.append(&msg(1, 1)).unwrap();
            s.sync().unwrap();
        }
    }
}

#[test]
fn unknown_newer_version_refuses_to_open() {
    for (name, magic) in [
        ("0000000000.seg", b"RILLSEG\0"),
        ("0000000000.ack", b"RILLACK\0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = QueueStore::open(dir.path(), opts(4096)).unwrap();
        let p = s.append(&msg(1, 1)).unwrap();
        s.append(&msg(2, 1)).unwrap();
        s.ack(p).unwrap();
        s.sync().unwrap();
        drop(s);
        let path = dir.path().join(name);
        let mut data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], magic);
        data[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &data).unwrap();
        match QueueStore::open(dir.path(), opts(4096)) {
            Err(StoreError::UnsupportedVersion { path: p, found: 2 }) => assert_eq!(p, path),
            other => panic!("{name}: expected UnsupportedVersion, got {other:?}"),
        }
    }
}

#[test]
fn torn_ack_entry_is_ignored_and_later_acks_stay_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let pos: Vec<_> = (0..4).map(|i| s.append(&msg(i, 5)).unwrap()).collect();
    s.ack(pos[0]).unwrap();
    s.sync().unwrap();
    drop(s);
    let ack = dir.path().join(format!("{:010}.ack", pos[0].segment));
    let mut data = std::fs::read(&ack).unwrap();
    data.extend_from_slice(&pos[1].offset.to_le_bytes()[..3]); // torn entry
    std::fs::write(&ack, &data).unwrap();
    let (mut s, rec) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(rec.iter().map(|r| r.0).collect::<Vec<_>>(), pos[1..]);
    s.ack(pos[2]).unwrap();
    s.sync().unwrap();
    drop(s);
    let (_, rec) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(
        rec.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![pos[1], pos[3]]
    );
}

#[test]
fn purge_acks_everything_and_removes_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(1024)).unwrap();
    let pos: Vec<_> = (0..50).map(|i| s.append(&msg(i, 100)).unwrap()).collect();
    s.ack(pos[3]).unwrap();
    s.sync().unwrap();
    assert_eq!(s.purge().unwrap(), 49);
    assert_eq!(s.stats().live_records, 0);
    assert_eq!(s.stats().segments, 0);
    s.sync().unwrap();
    assert!(files_with_ext(dir.path(), ".seg").is_empty());
    assert!(files_with_ext(dir.path(), ".ack").is_empty());
    assert!(matches!(s.read(pos[10]), Err(StoreError::NotFound(_))));
    let p = s.append(&msg(100, 1)).unwrap();
    assert!(p > pos[49], "positions are not reused");
    s.sync().unwrap();
    drop(s);
    let (_, rec) = QueueStore::open(dir.path(), opts(1024)).unwrap();
    assert_eq!(rec, vec![(p, msg(100, 1))]);
}

#[test]
fn destroy_removes_the_directory() {
    let base = tempfile::tempdir().unwrap();
    let dir = rill_store::ensure_queue_dir(base.path(), "/", "q1").unwrap();
    let (mut s, _) = QueueStore::open(&dir, opts(1024)).unwrap();
    s.append(&msg(1, 1)).unwrap();
    s.sync().unwrap();
    s.destroy().unwrap();
    assert!(!dir.exists());
}

#[test]
fn queue_dirs_are_stable_and_detect_collisions() {
    let base = tempfile::tempdir().unwrap();
    let a = rill_store::ensure_queue_dir(base.path(), "/", "a\nb/../c").unwrap();
    assert_eq!(a, rill_store::queue_dir(base.path(), "/", "a\nb/../c"));
    assert_eq!(a.parent().unwrap(), base.path().join("queues"));
    let meta = std::fs::read_to_string(a.join("meta")).unwrap();
    assert!(meta.contains(r#""a\nb/../c""#), "{meta}");
    // Idempotent.
    assert_eq!(
        rill_store::ensure_queue_dir(base.path(), "/", "a\nb/../c").unwrap(),
        a
    );
    // A directory whose meta names another queue is refused.
    std::fs::write(a.join("meta"), "vhost: \"/\"\nqueue: \"other\"\n").unwrap();
    assert!(matches!(
        rill_store::ensure_queue_dir(base.path(), "/", "a\nb/../c"),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn index_only_recovery_matches_full_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(2048)).unwrap();
    for i in 0..60u64 {
        let p = s.append(&msg(i, 100)).unwrap();
        if i % 4 == 1 {
            s.ack(p).unwrap();
        }
    }
    s.sync().unwrap();
    drop(s);
    let (_, full) = QueueStore::open(dir.path(), opts(2048)).unwrap();
    let (s, index) = QueueStore::open_index(dir.path(), opts(2048)).unwrap();
    assert_eq!(index.len(), full.len());
    for (r, (p, m)) in index.iter().zip(&full) {
        assert_eq!(r.position, *p);
        assert_eq!(r.timestamp_ms, m.timestamp_ms);
        assert_eq!(r.flags, m.flags);
        assert_eq!(u64::from(r.encoded_len), m.encoded_len().unwrap());
        assert_eq!(&s.read(r.position).unwrap(), m);
    }
}

#[test]
fn delivery_marks_survive_restart_and_are_not_acks() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let pos: Vec<Position> = (0..4).map(|i| s.append(&msg(i, 10)).unwrap()).collect();
    s.mark_delivered(pos[1]).unwrap();
    s.mark_delivered(pos[2]).unwrap();
    s.ack(pos[2]).unwrap();
    s.sync().unwrap();
    drop(s);
    let (s, index) = QueueStore::open_index(dir.path(), opts(1 << 20)).unwrap();
    let got: Vec<(Position, bool)> = index.iter().map(|r| (r.position, r.delivered)).collect();
    assert_eq!(got, vec![(pos[0], false), (pos[1], true), (pos[3], false)]);
    assert_eq!(s.stats().live_records, 3);
    drop(s);
    let (_, full) = QueueStore::open(dir.path(), opts(1 << 20)).unwrap();
    let flags: Vec<bool> = full
        .iter()
        .map(|(_, m)| m.flags & rill_store::FLAG_DELIVERED != 0)
        .collect();
    assert_eq!(flags, vec![false, true, false]);
}

#[test]
fn read_run_returns_consecutive_records_from_files_and_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = QueueStore::open(dir.path(), opts(8192)).unwrap();
    let msgs: Vec<_> = (0..120)
        .map(|i| msg(i, 20 + (i as usize * 13) % 400))
        .collect();
    let mut pos: Vec<Position> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        pos.push(s.append(m).unwrap());
        if i == 80 {
            s.flush().unwrap(); // the rest stays in the append buffer
        }
    }
    assert!(
        pos.iter()
            .map(|p| p.segment)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 3
    );
    for max_bytes in [0, 1, 300, 1000, 5000, 1 << 20] {
        let mut i = 0;
        while i < pos.len() {
            let run = s.read_run(pos[i], max_bytes).unwrap();
            assert!(!run.is_empty());
            for (k, (p, m)) in run.iter().enumerate() {
                assert_eq!(
                    (*p, m),
                    (pos[i + k], &msgs[i + k]),
                    "max {max_bytes} from {i}"
                );
            }
            // A run stays within one segment and within max_bytes (past its first record).
            assert!(run.iter().all(|(p, _)| p.segment == pos[i].segment));
            if run.len() > 1 {
                let (last, _) = run.last().unwrap();
                assert!((last.offset - pos[i].offset) as usize <= max_bytes);
            }
            i += run.len();
        }
    }
    // After a sync everything is on file: a large run covers a whole segment.
    s.sync().unwrap();
    let run = s.read_run(pos[100], 1 << 20).unwrap();
    let same_segment = pos[100..]
        .iter()
        .filter(|p| p.segment == pos[100].segment)
        .count();
    assert_eq!(run.len(), same_segment);
    assert!(matches!(
        s.read_run(
            Position {
                segment: pos[0].segment,
                offset: pos[0].offset + 1
            },
            100
        ),
        Err(StoreError::NotFound(_))
    ));
}
