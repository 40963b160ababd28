//! Snapshots in a running job are aligned on epochs: a keyed operator's snapshot at epoch `c`
//! reflects exactly the records of epochs `<= c`, and a reader's its position after them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rill_stream::*;

/// Checkpoints every epoch and keeps the snapshots.
#[derive(Default)]
struct EveryEpoch(Mutex<Vec<OperatorSnapshot>>);

impl CheckpointPolicy for EveryEpoch {
    fn checkpoint_in(&self, completed: Range<u64>) -> Option<u64> {
        completed.end.checked_sub(1)
    }
    fn store(&self, snapshot: OperatorSnapshot) -> Result<(), StreamError> {
        self.0
            .lock()
            .map_err(|_| StreamError::Worker("poisoned".into()))?
            .push(snapshot);
        Ok(())
    }
}

/// Emits `(key, 1)` records a few at a time, logging the epoch of each; its position is the
/// number emitted so far.
struct Counter {
    worker: u64,
    next: u64,
    end: u64,
    log: Arc<Mutex<Vec<(u64, u64, u8)>>>,
}

impl SourceReader<(u8, u64)> for Counter {
    fn poll(&mut self, out: &mut ReaderOutput<'_, (u8, u64)>) -> Result<ReaderStatus, StreamError> {
        for _ in 0..20 {
            if self.next == self.end {
                return Ok(ReaderStatus::Finished);
            }
            let key = (self.next % 5) as u8;
            self.log
                .lock()
                .map_err(|_| StreamError::Worker("poisoned".into()))?
                .push((self.worker, out.epoch(), key));
            out.collect((key, 1));
            self.next += 1;
        }
        Ok(ReaderStatus::IdleFor(Duration::from_millis(1)))
    }

    fn snapshot(&mut self, _epoch: u64) -> Result<Vec<u8>, StreamError> {
        Ok(self.next.to_le_bytes().to_vec())
    }
}

#[test]
fn snapshots_are_aligned_on_epochs() {
    let policy = Arc::new(EveryEpoch::default());
    let log: Arc<Mutex<Vec<(u64, u64, u8)>>> = Arc::default();
    let mut env = StreamExecutionEnvironment::new()
        .with_parallelism(2)
        .with_epoch_interval(Duration::from_millis(2));
    env.set_checkpoint_policy(policy.clone());
    let l = log.clone();
    env.execute("aligned", move |env| {
        let l = l.clone();
        env.from_reader(
            move |worker, _| Counter {
                worker: worker as u64,
                next: 0,
                end: 1_500,
                log: l,
            },
            WatermarkStrategy::no_watermarks(),
            "counter",
        )
        .key_by(|t| t.0)
        .sum(|t| &mut t.1)
        .collect_into(&CollectSink::new());
    })
    .expect("job runs");

    let log = log.lock().expect("log").clone();
    let snapshots = policy.0.lock().expect("snapshots").clone();
    let expected_at = |epoch: u64| {
        let mut expected: BTreeMap<u8, u64> = BTreeMap::new();
        for (_, e, k) in &log {
            if *e <= epoch {
                *expected.entry(*k).or_default() += 1;
            }
        }
        expected
    };
    // Sum state per epoch, merged over the workers that snapshotted that epoch.
    let mut sums: BTreeMap<u64, (usize, BTreeMap<u8, u64>)> = BTreeMap::new();
    let mut readers = 0;
    for s in &snapshots {
        if s.operator.starts_with("Sum") {
            let expected = expected_at(s.epoch);
            let got: Vec<(u8, (u8, u64))> = s.keyed_entries().expect("decodes");
            let slot = sums.entry(s.epoch).or_default();
            slot.0 += 1;
            for (k, (_, n)) in got {
                // Each key's count is exactly its records of epochs <= s.epoch.
                assert_eq!(Some(&n), expected.get(&k), "key {k} at epoch {}", s.epoch);
                slot.1.insert(k, n);
            }
        } else if s.operator.starts_with("counter") {
            let SnapshotState::Source {
                position: bytes, ..
            } = &s.state
            else {
                panic!("a reader's snapshot is its own: {s:?}");
            };
            let position = u64::from_le_bytes(bytes[..].try_into().expect("8 bytes"));
            let emitted = log
                .iter()
                .filter(|(w, e, _)| *w == s.worker as u64 && *e <= s.epoch)
                .count() as u64;
            assert_eq!(
                position, emitted,
                "reader {} at epoch {}",
                s.worker, s.epoch
            );
            readers += 1;
        }
    }
    // Where both workers snapshotted an epoch, together they hold every key: nothing of an
    // earlier epoch is missing either.
    let complete: Vec<u64> = sums
        .iter()
        .filter(|(_, (workers, _))| *workers == 2)
        .map(|(e, (_, merged))| {
            assert_eq!(merged, &expected_at(*e), "all keys at epoch {e}");
            *e
        })
        .collect();
    let epochs: std::collections::BTreeSet<u64> = log.iter().map(|r| r.1).collect();
    assert!(epochs.len() > 3, "input should span epochs: {epochs:?}");
    assert!(
        complete.len() > 2 && readers > 3,
        "{complete:?} fully snapshotted epochs, {readers} reader snapshots"
    );
}

/// Emits increasing timestamps a few at a time, logging the epoch of each.
struct Stamps {
    worker: u64,
    next: u64,
    log: Arc<Mutex<Vec<(u64, u64, u64)>>>,
}

impl SourceReader<u64> for Stamps {
    fn poll(&mut self, out: &mut ReaderOutput<'_, u64>) -> Result<ReaderStatus, StreamError> {
        for _ in 0..10 {
            if self.next == 600 {
                return Ok(ReaderStatus::Finished);
            }
            // Out of order by up to 4.
            let ts = self.next * 3 + (self.next * 7) % 5;
            self.log
                .lock()
                .map_err(|_| StreamError::Worker("poisoned".into()))?
                .push((self.worker, out.epoch(), ts));
            out.collect(ts);
            self.next += 1;
        }
        Ok(ReaderStatus::IdleFor(Duration::from_micros(300)))
    }
}

#[test]
fn assigned_watermarks_are_snapshotted_at_epoch_ends() {
    let policy = Arc::new(EveryEpoch::default());
    let log: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::default();
    let mut env = StreamExecutionEnvironment::new()
        .with_parallelism(2)
        .with_epoch_interval(Duration::from_millis(2));
    env.set_checkpoint_policy(policy.clone());
    let l = log.clone();
    env.execute("stamps", move |env| {
        let l = l.clone();
        env.from_reader(
            move |worker, _| Stamps {
                worker: worker as u64,
                next: 0,
                log: l,
            },
            WatermarkStrategy::no_watermarks(),
            "stamps",
        )
        .assign_timestamps_and_watermarks(
            WatermarkStrategy::for_monotonous_timestamps().with_timestamp_assigner(|t, _| *t),
        )
        .collect_into(&CollectSink::new());
    })
    .expect("job runs");
    let log = log.lock().expect("log").clone();
    let snapshots = policy.0.lock().expect("snapshots").clone();
    let mut checked = 0;
    for s in snapshots
        .iter()
        .filter(|s| s.operator.starts_with("AssignTimestamps"))
    {
        let SnapshotState::Source { watermark, .. } = &s.state else {
            panic!("a generator's state: {s:?}");
        };
        // Exactly the records of this worker's epochs up to the snapshot's.
        let max = log
            .iter()
            .filter(|(w, e, _)| *w == s.worker as u64 && *e <= s.epoch)
            .map(|(_, _, ts)| *ts)
            .max();
        assert_eq!(
            watermark.max_ts, max,
            "worker {} epoch {}",
            s.worker, s.epoch
        );
        checked += 1;
    }
    let epochs: std::collections::BTreeSet<u64> = log.iter().map(|r| r.1).collect();
    assert!(
        epochs.len() > 3 && checked > 3,
        "{checked} snapshots over {epochs:?}"
    );
}
