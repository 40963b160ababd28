//! Property tests: window results on random, out-of-order, late input equal a straightforward
//! batch computation over the records that are not late.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use rill_stream::*;

/// (key, ts, value) records in source order.
type Input = Vec<(u8, u64, u64)>;

/// The frontier each record is emitted under by a bounded-out-of-orderness source:
/// max timestamp of the records *before* it, minus the bound.
fn frontiers(input: &Input, bound: u64) -> Vec<u64> {
    let mut max: Option<u64> = None;
    input
        .iter()
        .map(|&(_, ts, _)| {
            let f = max.map_or(0, |m| m.saturating_sub(bound));
            max = Some(max.map_or(ts, |m| m.max(ts)));
            f
        })
        .collect()
}

/// (key, start, end) -> (sum, count)
type Windows = BTreeMap<(u8, u64, u64), (u64, u64)>;

fn run(
    input: &Input,
    bound: u64,
    lateness: u64,
    assigner: WindowAssigner,
    parallelism: usize,
) -> (Windows, Vec<(u8, u64, u64)>) {
    let out = CollectSink::new();
    let late = CollectSink::new();
    let (sink, late_sink) = (out.clone(), late.clone());
    let items: Vec<(u64, (u8, u64, u64))> = input.iter().map(|&r| (r.1, r)).collect();
    StreamExecutionEnvironment::new()
        .with_parallelism(parallelism)
        .execute("window-prop", move |env| {
            let tag = OutputTag::new("late");
            let strategy =
                WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_millis(bound));
            let windows = env
                .from_timestamped(items.clone(), strategy)
                .key_by(|r| r.0)
                .window(assigner)
                .allowed_lateness(Duration::from_millis(lateness))
                .side_output_late_data(&tag)
                .process(
                    |key: &u8,
                     w: TimeWindow,
                     rs: &[(u8, u64, u64)],
                     out: &mut Vec<(u8, u64, u64, u64, u64)>| {
                        out.push((
                            *key,
                            w.start,
                            w.end,
                            rs.iter().map(|r| r.2).sum(),
                            rs.len() as u64,
                        ));
                    },
                );
            windows.get_side_output(&tag).collect_into(&late_sink);
            windows.collect_into(&sink);
        })
        .expect("job runs");
    // The last firing of a window has the most records: firings only ever add records.
    let mut final_: Windows = BTreeMap::new();
    for (k, s, e, sum, n) in out.take() {
        let slot = final_.entry((k, s, e)).or_insert((0, 0));
        if n >= slot.1 {
            *slot = (sum, n);
        }
    }
    let mut late = late.take();
    late.sort();
    (final_, late)
}

/// Batch reference for tumbling/sliding windows.
fn batch_sliding(
    input: &Input,
    bound: u64,
    lateness: u64,
    size: u64,
    slide: u64,
) -> (Windows, Vec<(u8, u64, u64)>) {
    let fs = frontiers(input, bound);
    let mut windows = Windows::new();
    let mut late = Vec::new();
    for (&(k, ts, v), &f) in input.iter().zip(&fs) {
        let mut placed = false;
        let mut start = ts - ts % slide;
        loop {
            let end = start + size;
            if end > ts && end + lateness > f {
                let slot = windows.entry((k, start, end)).or_insert((0, 0));
                slot.0 += v;
                slot.1 += 1;
                placed = true;
            }
            if start < slide || start + size <= ts {
                break;
            }
            start -= slide;
        }
        if !placed {
            late.push((k, ts, v));
        }
    }
    late.sort();
    (windows, late)
}

/// Batch reference for session windows.
fn batch_sessions(
    input: &Input,
    bound: u64,
    lateness: u64,
    gap: u64,
) -> (Windows, Vec<(u8, u64, u64)>) {
    let fs = frontiers(input, bound);
    let mut by_key: BTreeMap<u8, Vec<(u64, u64)>> = BTreeMap::new();
    let mut late = Vec::new();
    for (&(k, ts, v), &f) in input.iter().zip(&fs) {
        if ts + lateness < f {
            late.push((k, ts, v));
        } else {
            by_key.entry(k).or_default().push((ts, v));
        }
    }
    let mut windows = Windows::new();
    for (k, mut rs) in by_key {
        rs.sort();
        let mut cur: Option<(u64, u64, u64, u64)> = None; // start, end, sum, count
        for (ts, v) in rs {
            cur = Some(match cur {
                Some((s, e, sum, n)) if ts <= e => (s, e.max(ts + gap), sum + v, n + 1),
                Some(done) => {
                    windows.insert((k, done.0, done.1), (done.2, done.3));
                    (ts, ts + gap, v, 1)
                }
                None => (ts, ts + gap, v, 1),
            });
        }
        if let Some(done) = cur {
            windows.insert((k, done.0, done.1), (done.2, done.3));
        }
    }
    late.sort();
    (windows, late)
}

/// Streaming session output contains superseded sessions (fired, then merged into a larger
/// one by a late record): keep only the maximal ones.
fn maximal(ws: Windows) -> Windows {
    let keys: Vec<_> = ws.keys().copied().collect();
    ws.into_iter()
        .filter(|((k, s, e), _)| {
            !keys
                .iter()
                .any(|(k2, s2, e2)| k2 == k && s2 <= s && e2 >= e && (s2, e2) != (s, e))
        })
        .collect()
}

fn input_strategy() -> impl Strategy<Value = Input> {
    prop::collection::vec((0u8..3, 0u64..300, 1u64..10), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_matches_batch(input in input_strategy(), bound in 0u64..40, lateness in 0u64..30, size in 1u64..50, par in 1usize..3) {
        let got = run(&input, bound, lateness, TumblingWindows::event_time(Duration::from_millis(size)), par);
        prop_assert_eq!(got, batch_sliding(&input, bound, lateness, size, size));
    }

    #[test]
    fn sliding_matches_batch(input in input_strategy(), bound in 0u64..40, lateness in 0u64..30, slide in 1u64..20, mult in 1u64..4, par in 1usize..3) {
        let size = slide * mult;
        let got = run(&input, bound, lateness, SlidingWindows::event_time(Duration::from_millis(size), Duration::from_millis(slide)), par);
        prop_assert_eq!(got, batch_sliding(&input, bound, lateness, size, slide));
    }

    #[test]
    fn sessions_match_batch(input in input_strategy(), bound in 0u64..40, lateness in 0u64..30, gap in 1u64..30, par in 1usize..3) {
        let (got, late) = run(&input, bound, lateness, SessionWindows::event_time_gap(Duration::from_millis(gap)), par);
        prop_assert_eq!((maximal(got), late), batch_sessions(&input, bound, lateness, gap));
    }
}
