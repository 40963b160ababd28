//! The driver without timely: operators run through scripted frontiers.
//!
//! Each operator kind runs over random scripts — two sources whose epochs and watermarks move
//! independently, records arriving late and out of order, processing time advancing — with a
//! checkpoint at every epoch. From every snapshot a fresh operator is restored and fed what
//! the original had not yet handled; its output must equal the original's output after the
//! snapshot. The harness also checks capability discipline: nothing is emitted below the
//! time the capabilities were held at, and the hold never goes back.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::order::{PartialOrder, Product};

use super::{Driver, Emit, Operator};
use crate::checkpoint::{CheckpointPolicy, Checkpointing, OperatorSnapshot, SnapshotState};
use crate::epoch::Time;
use crate::error::StreamError;
use crate::keyed::{AggregateFunction, AggregateOp, KeyedProcessFunction, ProcessContext};
use crate::keyed::{ProcessOp, RunningOp};
use crate::keygroup::KeyGroups;
use crate::state::{ListState, MemoryStateBackend, ValueState};
use crate::window::{
    AggFn, CountWindowOp, ProcFn, ReduceFn, SessionWindows, SlidingWindows, TimeWindow,
    TumblingWindows, WindowAssigner, WindowOp,
};

type Rec = (u8, u64);

/// One activation: the batches pulled in it, the input frontier's meet, the clock.
#[derive(Clone, Debug)]
struct Step {
    batches: Vec<(Time, Vec<(u64, Rec)>)>,
    bound: Option<Time>,
    now: u64,
}

/// A small deterministic generator (xorshift), so failures reproduce from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Two sources, each a chain of times (epoch, frontier) moving independently; batches are
/// delivered in the activation after they were sent, and the bound covers sources and
/// batches in flight, as timely's frontier does.
fn script(seed: u64, steps: usize) -> Vec<Step> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut caps = [Product::new(0u64, 0u64); 2];
    let mut out = Vec::new();
    let mut value = 0u64;
    for step in 0..steps {
        let mut batches = Vec::new();
        for cap in caps.iter_mut() {
            if rng.below(3) > 0 {
                let n = 1 + rng.below(3);
                let records = (0..n)
                    .map(|_| {
                        value += 1;
                        // Mostly around the frontier, sometimes behind it (late).
                        let ts = (cap.inner + rng.below(50)).saturating_sub(30);
                        (ts, (rng.below(3) as u8, value))
                    })
                    .collect();
                batches.push((*cap, records));
            }
            cap.inner += rng.below(12);
            match rng.below(10) {
                0..=5 => {}
                6..=8 => cap.outer += 1,
                _ => cap.outer += 2,
            }
        }
        let bound = batches
            .iter()
            .map(|(t, _)| *t)
            .chain(caps)
            .fold(Product::new(u64::MAX, u64::MAX), |m: Time, t| {
                Product::new(m.outer.min(t.outer), m.inner.min(t.inner))
            });
        out.push(Step {
            batches,
            bound: Some(bound),
            now: 1_000 + step as u64 * 7,
        });
    }
    out.push(Step {
        batches: Vec::new(),
        bound: None,
        now: 1_000 + steps as u64 * 7,
    });
    out
}

/// What an operator did, in order.
#[derive(Clone, Debug, PartialEq)]
enum Event<O> {
    /// (epoch, timestamp, record) on the main output.
    Out(u64, u64, O),
    /// (epoch, timestamp, record) on the late output.
    Late(u64, u64, Rec),
    /// A snapshot at the end of an epoch.
    Snapshot(u64, BTreeMap<u32, Vec<u8>>),
}

type Log<O> = Arc<Mutex<Vec<Event<O>>>>;

fn lock<O>(log: &Log<O>) -> std::sync::MutexGuard<'_, Vec<Event<O>>> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records output and checks it is not below where the capabilities were held.
struct Recorder<O> {
    log: Log<O>,
    floor: Time,
}

impl<O> Emit<O, Rec> for Recorder<O> {
    fn give(&mut self, time: Time, data: &mut Vec<(u64, O)>) {
        assert!(
            self.floor.less_equal(&time),
            "{time:?} below {:?}",
            self.floor
        );
        let mut log = lock(&self.log);
        log.extend(data.drain(..).map(|(ts, v)| Event::Out(time.outer, ts, v)));
    }
    fn give_late(&mut self, time: Time, data: &mut Vec<(u64, Rec)>) {
        assert!(
            self.floor.less_equal(&time),
            "{time:?} below {:?}",
            self.floor
        );
        let mut log = lock(&self.log);
        log.extend(data.drain(..).map(|(ts, v)| Event::Late(time.outer, ts, v)));
    }
}

/// Snapshots every epoch into the log.
struct EveryEpoch<O>(Log<O>);

impl<O: Send + 'static> CheckpointPolicy for EveryEpoch<O> {
    fn checkpoint_in(&self, completed: Range<u64>) -> Option<u64> {
        completed.end.checked_sub(1)
    }
    fn store(&self, snapshot: OperatorSnapshot) -> Result<(), StreamError> {
        let SnapshotState::KeyGroups(groups) = snapshot.state else {
            return Err(StreamError::Worker(
                "keyed operators snapshot key groups".into(),
            ));
        };
        lock(&self.0).push(Event::Snapshot(snapshot.epoch, groups));
        Ok(())
    }
}

const GROUPS: KeyGroups = KeyGroups::new(8, 1);

/// Runs `steps` through `driver`, logging into `log`.
fn run<Op: Operator<In = Rec>>(driver: &mut Driver<Op>, steps: &[Step], log: &Log<Op::Out>) {
    for step in steps {
        let floor = driver.hold();
        let mut em = Recorder {
            log: log.clone(),
            floor,
        };
        driver.begin(step.bound, step.now, &mut em).expect("begin");
        for (t, data) in &step.batches {
            driver.batch(*t, &mut data.clone(), &mut em).expect("batch");
        }
        if let Some(hold) = driver.finish(&mut em).expect("finish") {
            assert!(
                floor.less_equal(&hold),
                "hold went back: {floor:?} -> {hold:?}"
            );
            if let Some(b) = step.bound {
                assert!(
                    hold.less_equal(&b),
                    "hold {hold:?} above the frontier {b:?}"
                );
            }
        }
    }
}

/// What a roundtrip covered.
#[derive(Debug, Default)]
struct Coverage {
    /// Snapshots restored and compared.
    restored: usize,
    /// Of those, how many had output after them to compare.
    with_output: usize,
    /// Late records seen over all uninterrupted runs.
    late: usize,
}

/// The uninterrupted run; then, from each snapshot, a restored run compared with it.
fn roundtrip<Op, F>(make: F, seeds: Range<u64>) -> Coverage
where
    Op: Operator<In = Rec>,
    Op::Out: PartialEq + Debug,
    F: Fn() -> Op,
{
    let mut coverage = Coverage::default();
    let runs = (seeds.end - seeds.start) as usize;
    for seed in seeds {
        let steps = script(seed, 40);
        let log: Log<Op::Out> = Arc::default();
        let checkpoint = Checkpointing::policy(Arc::new(EveryEpoch(log.clone())), "test", 0);
        let mut original = Driver::new(make(), 0, GROUPS, Some(checkpoint));
        // Note in which step each snapshot was taken.
        let mut taken_in = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let before = lock(&log).len();
            run(&mut original, std::slice::from_ref(step), &log);
            let events = lock(&log);
            for e in &events[before..] {
                if let Event::Snapshot(epoch, _) = e {
                    taken_in.push((*epoch, i));
                }
            }
        }
        let events = lock(&log).clone();
        assert!(
            events.iter().any(|e| matches!(e, Event::Out(..))),
            "seed {seed}: the script produced no output"
        );
        coverage.late += events
            .iter()
            .filter(|e| matches!(e, Event::Late(..)))
            .count();
        for (epoch, step) in taken_in {
            let Some(at) = events
                .iter()
                .position(|e| matches!(e, Event::Snapshot(c, _) if *c == epoch))
            else {
                panic!("seed {seed}: snapshot {epoch} missing");
            };
            let Event::Snapshot(_, groups) = &events[at] else {
                unreachable!()
            };
            let expected: Vec<Event<Op::Out>> = events[at + 1..]
                .iter()
                .filter(|e| !matches!(e, Event::Snapshot(..)))
                .cloned()
                .collect();
            assert!(
                expected.iter().all(|e| match e {
                    Event::Out(ep, ..) | Event::Late(ep, ..) => *ep > epoch,
                    Event::Snapshot(..) => true,
                }),
                "seed {seed}: output of epoch <= {epoch} after its snapshot"
            );

            let restored_log: Log<Op::Out> = Arc::default();
            let mut restored = Driver::new(make(), 0, GROUPS, None);
            restored
                .restore(epoch, groups.values().map(Vec::as_slice))
                .expect("restore");
            // What the original had received but not handled — the later epochs' batches —
            // replayed as sources would, under a frontier that lets none of it through yet;
            // then the same activations as the original.
            let replay: Vec<_> = steps[..step]
                .iter()
                .flat_map(|s| s.batches.iter())
                .filter(|(t, _)| t.outer > epoch)
                .cloned()
                .collect();
            let mut rest = vec![Step {
                batches: replay,
                bound: Some(Product::new(epoch, 0)),
                now: 0,
            }];
            rest.extend(steps[step..].iter().map(|s| {
                Step {
                    batches: s
                        .batches
                        .iter()
                        .filter(|(t, _)| t.outer > epoch)
                        .cloned()
                        .collect(),
                    ..s.clone()
                }
            }));
            run(&mut restored, &rest, &restored_log);
            let got = lock(&restored_log).clone();
            assert_eq!(got, expected, "seed {seed}: restored at epoch {epoch}");
            coverage.restored += 1;
            coverage.with_output += usize::from(!expected.is_empty());
        }
    }
    // Every seed's script spans several epochs: a snapshot after most of them, with output
    // still to come after many.
    assert!(coverage.restored >= 5 * runs, "{coverage:?}");
    assert!(coverage.with_output >= 2 * runs, "{coverage:?}");
    coverage
}

const SEEDS: Range<u64> = 1..25;

#[test]
fn running_sum_and_min_by_restore() {
    roundtrip(
        || RunningOp::new(|r: &Rec| r.0, |s: &mut Rec, v: Rec| s.1 += v.1),
        SEEDS,
    );
    roundtrip(
        || {
            RunningOp::new(
                |r: &Rec| r.0,
                |s: &mut Rec, v: Rec| {
                    if v.1 % 7 < s.1 % 7 {
                        *s = v;
                    }
                },
            )
        },
        SEEDS,
    );
}

struct Avg;
impl AggregateFunction<Rec, (u64, u64), (u64, u64)> for Avg {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: Rec, acc: &mut (u64, u64)) {
        acc.0 += v.1;
        acc.1 += 1;
    }
    fn get_result(&self, acc: &(u64, u64)) -> (u64, u64) {
        (acc.0 / acc.1.max(1), acc.1)
    }
    fn merge(&self, a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
        (a.0 + b.0, a.1 + b.1)
    }
}

#[test]
fn running_aggregate_restores() {
    roundtrip(|| AggregateOp::new(|r: &Rec| r.0, Avg), SEEDS);
}

/// Per key: counts records, keeps the last values; an event-time timer 15 ms after a key's
/// first record reports and clears; every 4th record also sets a processing-time timer.
struct Report;
#[derive(Clone, Default, Serialize, Deserialize)]
struct ReportState {
    count: ValueState<u64>,
    values: ListState<u64>,
}
impl KeyedProcessFunction<u8, Rec, (u8, u64, Vec<u64>, u64)> for Report {
    type State = ReportState;
    fn process_element(
        &mut self,
        v: Rec,
        ctx: &mut ProcessContext<'_, u8, ReportState, (u8, u64, Vec<u64>, u64)>,
    ) {
        let n = ctx.state().count.value().copied().unwrap_or(0);
        ctx.state().count.update(n + 1);
        ctx.state().values.add(v.1);
        if n == 0 {
            let at = ctx.timestamp() + 15;
            ctx.register_event_time_timer(at);
        }
        if v.1.is_multiple_of(4) {
            let at = ctx.current_processing_time() + 10;
            ctx.register_processing_time_timer(at);
        }
    }
    fn on_timer(
        &mut self,
        ts: u64,
        ctx: &mut ProcessContext<'_, u8, ReportState, (u8, u64, Vec<u64>, u64)>,
    ) {
        let key = *ctx.key();
        let watermark = ctx.current_watermark();
        let n = ctx.state().count.value().copied().unwrap_or(0);
        let values = ctx.state().values.take();
        ctx.collect((key, n, values, watermark.min(ts)));
        ctx.clear_state();
    }
}

#[test]
fn process_function_restores() {
    roundtrip(
        || {
            ProcessOp::new(
                |r: &Rec| r.0,
                Report,
                MemoryStateBackend::<u8, ReportState>::default(),
            )
        },
        SEEDS,
    );
}

type WindowOut = (u8, u64, u64, usize, u64);

#[test]
fn time_windows_restore() {
    let ms = Duration::from_millis;
    let cases: Vec<(&str, WindowAssigner, u64)> = vec![
        ("tumbling", TumblingWindows::event_time(ms(20)), 0),
        (
            "tumbling with lateness",
            TumblingWindows::event_time(ms(20)),
            15,
        ),
        ("sliding", SlidingWindows::event_time(ms(30), ms(10)), 5),
        ("session", SessionWindows::event_time_gap(ms(8)), 10),
        (
            "processing time",
            TumblingWindows::processing_time(ms(25)),
            0,
        ),
        (
            "processing-time session",
            SessionWindows::processing_time_gap(ms(9)),
            0,
        ),
    ];
    for (name, assigner, lateness) in cases {
        let coverage = roundtrip(
            move || {
                WindowOp::new(
                    |r: &Rec| r.0,
                    assigner,
                    lateness,
                    ProcFn(
                        |k: &u8, w: TimeWindow, rs: &[Rec], out: &mut Vec<WindowOut>| {
                            out.push((*k, w.start, w.end, rs.len(), rs.iter().map(|r| r.1).sum()))
                        },
                        std::marker::PhantomData,
                    ),
                    true,
                )
            },
            SEEDS,
        );
        if assigner.domain() == crate::window::TimeDomain::EventTime {
            assert!(coverage.late > 0, "{name}: no late record in any script");
        }
    }
}

#[test]
fn window_reduce_and_aggregate_restore() {
    let ms = Duration::from_millis;
    roundtrip(
        || {
            WindowOp::new(
                |r: &Rec| r.0,
                TumblingWindows::event_time(ms(16)),
                8,
                ReduceFn(|a: Rec, b: Rec| (a.0, a.1 + b.1)),
                false,
            )
        },
        SEEDS,
    );
    roundtrip(
        || {
            WindowOp::new(
                |r: &Rec| r.0,
                SessionWindows::event_time_gap(ms(6)),
                4,
                AggFn(Avg, std::marker::PhantomData),
                false,
            )
        },
        SEEDS,
    );
}

#[test]
fn count_windows_restore() {
    roundtrip(
        || {
            CountWindowOp::new(
                |r: &Rec| r.0,
                3,
                2,
                ProcFn(
                    |k: &u8, w: TimeWindow, rs: &[Rec], out: &mut Vec<(u8, u64, Vec<u64>)>| {
                        out.push((*k, w.start, rs.iter().map(|r| r.1).collect()))
                    },
                    std::marker::PhantomData,
                ),
            )
        },
        SEEDS,
    );
}

#[test]
fn a_restored_window_remembers_it_fired() {
    // Window [0, 20) with 50 ms lateness fires at frontier 30, then the state is restored
    // into a fresh operator whose source restarted with a lower watermark: a record for the
    // window still fires it again (its fire timer is gone; the frontier says it fired).
    let make = || {
        WindowOp::new(
            |r: &Rec| r.0,
            TumblingWindows::event_time(Duration::from_millis(20)),
            50,
            ReduceFn(|a: Rec, b: Rec| (a.0, a.1 + b.1)),
            false,
        )
    };
    let log: Log<Rec> = Arc::default();
    let checkpoint = Checkpointing::policy(Arc::new(EveryEpoch(log.clone())), "test", 0);
    let mut d = Driver::new(make(), 0, GROUPS, Some(checkpoint));
    let steps = [
        Step {
            batches: vec![(Product::new(0, 0), vec![(5, (0, 1))])],
            bound: Some(Product::new(0, 0)),
            now: 0,
        },
        Step {
            batches: vec![],
            bound: Some(Product::new(0, 30)),
            now: 0,
        },
        Step {
            batches: vec![],
            bound: Some(Product::new(1, 30)),
            now: 0,
        },
    ];
    run(&mut d, &steps, &log);
    let events = lock(&log).clone();
    assert_eq!(events[0], Event::Out(0, 19, (0, 1)));
    let Some(Event::Snapshot(0, groups)) = events.get(1) else {
        panic!("no snapshot at epoch 0: {events:?}");
    };

    let restored_log: Log<Rec> = Arc::default();
    let mut r = Driver::new(make(), 0, GROUPS, None);
    r.restore(0, groups.values().map(Vec::as_slice))
        .expect("restore");
    let replay = [Step {
        batches: vec![(Product::new(1, 0), vec![(6, (0, 2))])],
        bound: Some(Product::new(1, 0)),
        now: 0,
    }];
    run(&mut r, &replay, &restored_log);
    assert_eq!(lock(&restored_log).clone(), vec![Event::Out(1, 19, (0, 3))]);
}

#[test]
fn later_epochs_wait_for_earlier_ones() {
    // Epoch 1 arrives before epoch 0 is complete: it is held back, then handled after it.
    let log: Log<Rec> = Arc::default();
    let mut d = Driver::new(
        RunningOp::new(|r: &Rec| r.0, |s: &mut Rec, v: Rec| s.1 += v.1),
        0,
        GROUPS,
        None,
    );
    let steps = [
        Step {
            batches: vec![
                (Product::new(1, 0), vec![(0, (0, 10))]),
                (Product::new(0, 0), vec![(0, (0, 1))]),
            ],
            bound: Some(Product::new(0, 0)),
            now: 0,
        },
        Step {
            batches: vec![],
            bound: Some(Product::new(1, 0)),
            now: 0,
        },
    ];
    run(&mut d, &steps[..1], &log);
    assert_eq!(lock(&log).clone(), vec![Event::Out(0, 0, (0, 1))]);
    run(&mut d, &steps[1..], &log);
    assert_eq!(
        lock(&log).clone(),
        vec![Event::Out(0, 0, (0, 1)), Event::Out(1, 0, (0, 11))]
    );
}
