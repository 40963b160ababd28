//! Property tests: random append/ack/read/sync/purge/reopen sequences against a model, and a
//! power-loss model on the in-memory backend.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use rill_store::backend::MemBackend;
use rill_store::{Position, QueueStore, StoreOptions, StoredMessage, SyncPolicy};

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Ack(usize),
    AckUnknown(u32, u32),
    Read(usize),
    Sync,
    Reopen,
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0usize..700).prop_map(Op::Append),
        6 => any::<usize>().prop_map(Op::Ack),
        1 => (0u32..20, 0u32..4096).prop_map(|(s, o)| Op::AckUnknown(s, o)),
        2 => any::<usize>().prop_map(Op::Read),
        2 => Just(Op::Sync),
        2 => Just(Op::Reopen),
        1 => Just(Op::Purge),
    ]
}

fn open(mem: &MemBackend, segment_size: u32) -> (QueueStore, Vec<(Position, StoredMessage)>) {
    let opts = StoreOptions {
        segment_size,
        sync: SyncPolicy::Always,
    };
    QueueStore::open_with(Path::new("/data/q"), opts, Arc::new(mem.clone())).expect("open")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_match_the_model(ops in prop::collection::vec(op(), 1..80), segment_size in 200u32..3000) {
        let mem = MemBackend::new();
        let (mut s, rec) = open(&mem, segment_size);
        prop_assert!(rec.is_empty());
        let mut model: BTreeMap<Position, StoredMessage> = BTreeMap::new();
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Append(size) => {
                    n += 1;
                    let m = msg(n, size);
                    let p = s.append(&m).unwrap();
                    prop_assert!(model.keys().next_back().is_none_or(|last| *last < p), "positions grow");
                    model.insert(p, m);
                }
                Op::Ack(i) if !model.is_empty() => {
                    let p = *model.keys().nth(i % model.len()).unwrap();
                    s.ack(p).unwrap();
                    s.ack(p).unwrap(); // twice: no-op
                    model.remove(&p);
                }
                Op::AckUnknown(seg, off) => {
                    let p = Position { segment: seg, offset: off };
                    if !model.contains_key(&p) {
                        s.ack(p).unwrap();
                    }
                }
                Op::Read(i) if !model.is_empty() => {
                    let (p, m) = model.iter().nth(i % model.len()).unwrap();
                    prop_assert_eq!(&s.read(*p).unwrap(), m);
                }
                Op::Sync => s.sync().unwrap(),
                Op::Reopen => {
                    // A process exit after the OS got the data (kill -9 after a flush).
                    s.flush().unwrap();
                    drop(s);
                    let (s2, rec) = open(&mem, segment_size);
                    s = s2;
                    let expect: Vec<_> = model.iter().map(|(p, m)| (*p, m.clone())).collect();
                    prop_assert_eq!(rec, expect);
                }
                Op::Purge => {
                    prop_assert_eq!(s.purge().unwrap(), model.len() as u64);
                    model.clear();
                }
                Op::Ack(_) | Op::Read(_) => {}
            }
            prop_assert_eq!(s.stats().live_records, model.len() as u64);
        }
        s.sync().unwrap();
        drop(s);
        let (s, rec) = open(&mem, segment_size);
        let expect: Vec<_> = model.iter().map(|(p, m)| (*p, m.clone())).collect();
        prop_assert_eq!(rec, expect);
        // Fully acked segments are gone: every segment on disk holds a live record.
        let live_segs: BTreeSet<u32> = model.keys().map(|p| p.segment).collect();
        prop_assert_eq!(s.stats().segments as usize, live_segs.len());
    }

    /// Power loss at random points: everything appended before a completed sync and not acked
    /// is recovered; nothing acked before a completed sync comes back; nothing is invented.
    #[test]
    fn power_loss_keeps_everything_synced(ops in prop::collection::vec(op(), 1..80), segment_size in 200u32..3000) {
        let mem = MemBackend::new();
        let (mut s, _) = open(&mem, segment_size);
        // Everything appended (and not known to be gone), by position.
        let mut written: BTreeMap<Position, StoredMessage> = BTreeMap::new();
        let mut live: BTreeSet<Position> = BTreeSet::new();
        // Must survive a crash / must not come back.
        let mut must_have: BTreeSet<Position> = BTreeSet::new();
        let mut must_not: BTreeSet<Position> = BTreeSet::new();
        let mut acked_unsynced: BTreeSet<Position> = BTreeSet::new();
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Append(size) => {
                    n += 1;
                    let m = msg(n, size);
                    let p = s.append(&m).unwrap();
                    written.insert(p, m);
                    live.insert(p);
                }
                Op::Ack(i) if !live.is_empty() => {
                    let p = *live.iter().nth(i % live.len()).unwrap();
                    s.ack(p).unwrap();
                    live.remove(&p);
                    must_have.remove(&p);
                    acked_unsynced.insert(p);
                }
                Op::Sync => {
                    s.sync().unwrap();
                    must_have = live.clone();
                    must_not.extend(std::mem::take(&mut acked_unsynced));
                }
                Op::Purge => {
                    s.purge().unwrap();
                    acked_unsynced.extend(std::mem::take(&mut live));
                    must_have.clear();
                }
                Op::Reopen => {
                    // Power loss: only what was fdatasync'ed (and directory-synced) survives.
                    drop(s);
                    mem.crash();
                    let (s2, rec) = open(&mem, segment_size);
                    s = s2;
                    let got: BTreeSet<Position> = rec.iter().map(|r| r.0).collect();
                    let order: Vec<Position> = rec.iter().map(|r| r.0).collect();
                    prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "log order");
                    for p in &must_have {
                        prop_assert!(got.contains(p), "synced record {:?} lost", p);
                    }
                    for p in &must_not {
                        prop_assert!(!got.contains(p), "synced ack of {:?} lost", p);
                    }
                    for (p, m) in &rec {
                        prop_assert_eq!(Some(m), written.get(p), "invented record at {:?}", p);
                    }
                    // The recovered state is the new truth.
                    written = rec.into_iter().collect();
                    live = got.clone();
                    must_have = got;
                    must_not.clear();
                    acked_unsynced.clear();
                }
                Op::Ack(_) | Op::Read(_) | Op::AckUnknown(..) => {}
            }
        }
    }
}
