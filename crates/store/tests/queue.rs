//! QueueStore: round trips, recovery, rollover, deletion, purge, errors.

mod common;

use common::*;
use rill_store::{Position, QueueStore};

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
