//! One test (or a few) per operator, each running a small job end to end.

use std::time::Duration;

use rill_stream::*;
use serde::{Deserialize, Serialize};

fn run<T: Data, F>(parallelism: usize, job: F) -> Vec<T>
where
    F: Fn(&JobEnv<'_>, &CollectSink<T>) + Send + Sync + 'static,
{
    let out = CollectSink::new();
    let sink = out.clone();
    StreamExecutionEnvironment::new()
        .with_parallelism(parallelism)
        .execute("test", move |env| job(env, &sink))
        .expect("job runs");
    out.take()
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

#[test]
fn map_filter_flat_map() {
    let got = run(2, |env, sink| {
        env.from_sequence(1, 10)
            .map(|x| x * 3)
            .filter(|x| x % 2 == 0)
            .flat_map(|x| vec![x, x + 1])
            .collect_into(sink);
    });
    assert_eq!(sorted(got), vec![6, 7, 12, 13, 18, 19, 24, 25, 30, 31]);
}

#[test]
fn from_sequence_splits_across_workers() {
    let got = run(3, |env, sink| env.from_sequence(5, 1004).collect_into(sink));
    assert_eq!(sorted(got), (5..=1004).collect::<Vec<_>>());
}

#[test]
fn union_and_split() {
    let got = run(2, |env, sink| {
        let (evens, odds) =
            env.from_sequence(1, 6)
                .split(|x| if x % 2 == 0 { Ok(x) } else { Err(x * 100) });
        evens.union(odds).collect_into(sink);
    });
    assert_eq!(sorted(got), vec![2, 4, 6, 100, 300, 500]);
}

#[test]
fn running_sum_min_max() {
    let input = vec![('a', 5i64), ('b', 1), ('a', 3), ('a', 9), ('b', -2)];
    let i2 = input.clone();
    let sums = run(2, move |env, sink| {
        env.from_collection(i2.clone())
            .key_by(|t| t.0)
            .sum(|t| &mut t.1)
            .collect_into(sink)
    });
    assert_eq!(
        sorted(sums),
        sorted(vec![('a', 5), ('a', 8), ('a', 17), ('b', 1), ('b', -1)])
    );
    let i2 = input.clone();
    let mins = run(2, move |env, sink| {
        env.from_collection(i2.clone())
            .key_by(|t| t.0)
            .min(|t| &mut t.1)
            .collect_into(sink)
    });
    assert_eq!(
        sorted(mins),
        sorted(vec![('a', 5), ('a', 3), ('a', 3), ('b', 1), ('b', -2)])
    );
    let i2 = input.clone();
    let maxs = run(2, move |env, sink| {
        env.from_collection(i2.clone())
            .key_by(|t| t.0)
            .max(|t| &mut t.1)
            .collect_into(sink)
    });
    assert_eq!(
        sorted(maxs),
        sorted(vec![('a', 5), ('a', 5), ('a', 9), ('b', 1), ('b', 1)])
    );
}

#[test]
fn min_by_max_by_keep_whole_record() {
    let input = vec![
        ('a', 5, "x".to_string()),
        ('a', 3, "y".to_string()),
        ('a', 9, "z".to_string()),
    ];
    let i2 = input.clone();
    let got = run(1, move |env, sink| {
        env.from_collection(i2.clone())
            .key_by(|t| t.0)
            .min_by(|t| &mut t.1)
            .collect_into(sink)
    });
    assert_eq!(got.last().map(|t| t.2.as_str()), Some("y"));
    let got = run(1, move |env, sink| {
        env.from_collection(input.clone())
            .key_by(|t| t.0)
            .max_by(|t| &mut t.1)
            .collect_into(sink)
    });
    assert_eq!(got.last().map(|t| t.2.as_str()), Some("z"));
}

#[test]
fn running_reduce() {
    let got = run(2, |env, sink| {
        env.from_collection(vec![(1u8, 2u64), (1, 3), (2, 10), (1, 4)])
            .key_by(|t| t.0)
            .reduce(|a, b| (a.0, a.1 * b.1))
            .collect_into(sink)
    });
    assert_eq!(sorted(got), vec![(1, 2), (1, 6), (1, 24), (2, 10)]);
}

struct Avg;
impl AggregateFunction<(u8, u64), (u64, u64), (u64, u64)> for Avg {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, v: (u8, u64), acc: &mut (u64, u64)) {
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
fn running_aggregate() {
    let got = run(2, |env, sink| {
        env.from_collection(vec![(1u8, 2u64), (1, 4), (1, 9)])
            .key_by(|t| t.0)
            .aggregate(Avg)
            .collect_into(sink)
    });
    assert_eq!(got, vec![(2, 1), (3, 2), (5, 3)]);
}

/// Counts per key; emits the count and the distinct tags seen when an event-time timer 10 ms
/// after the first record fires; also uses list state.
struct CountWithTimer;
#[derive(Clone, Default, Serialize, Deserialize)]
struct CountState {
    count: ValueState<u64>,
    seen: MapState<String, u64>,
    log: ListState<u64>,
}
impl KeyedProcessFunction<u8, (u8, u64, String), (u8, u64, usize, Vec<u64>)> for CountWithTimer {
    type State = CountState;
    fn process_element(
        &mut self,
        v: (u8, u64, String),
        ctx: &mut ProcessContext<'_, u8, CountState, (u8, u64, usize, Vec<u64>)>,
    ) {
        let st = ctx.state();
        let n = st.count.value().copied().unwrap_or(0);
        st.count.update(n + 1);
        *st.seen.entry(v.2).or_insert(0) += 1;
        st.log.add(v.1);
        if n == 0 {
            ctx.register_event_time_timer(v.1 + 10);
        }
    }
    fn on_timer(
        &mut self,
        _ts: u64,
        ctx: &mut ProcessContext<'_, u8, CountState, (u8, u64, usize, Vec<u64>)>,
    ) {
        let key = *ctx.key();
        let st = ctx.state();
        let out = (
            key,
            st.count.value().copied().unwrap_or(0),
            st.seen.len(),
            st.log.take(),
        );
        ctx.collect(out);
        ctx.clear_state();
    }
}

#[test]
fn process_with_state_and_event_timers() {
    let input = vec![
        (0, (1u8, 0u64, "x".to_string())),
        (3, (1, 3, "y".to_string())),
        (5, (2, 5, "x".to_string())),
        (9, (1, 9, "x".to_string())),
        // Sent under watermark 8 (monotonous: the previous maximum minus one), so it is
        // counted before key 1's timer at 10 fires — as in Flink, where the watermark
        // follows the record.
        (12, (1, 12, "z".to_string())),
        // Sent under watermark 11: key 1's timer (10) has fired, key 2's (15) has not.
        (40, (2, 40, "z".to_string())),
        (50, (1, 50, "w".to_string())),
    ];
    for par in [1, 2, 3] {
        let i2 = input.clone();
        let got = run(par, move |env, sink| {
            env.from_timestamped(i2.clone(), WatermarkStrategy::for_monotonous_timestamps())
                .key_by(|t| t.0)
                .process(CountWithTimer)
                .collect_into(sink)
        });
        assert_eq!(
            sorted(got),
            vec![
                (1, 1, 1, vec![50]),
                (1, 4, 3, vec![0, 3, 9, 12]),
                (2, 2, 2, vec![5, 40])
            ],
            "parallelism {par}"
        );
    }
}

struct ProcTimer;
impl KeyedProcessFunction<u8, u8, (u8, u64)> for ProcTimer {
    type State = ValueState<u64>;
    fn process_element(
        &mut self,
        _v: u8,
        ctx: &mut ProcessContext<'_, u8, ValueState<u64>, (u8, u64)>,
    ) {
        let n = ctx.state().value().copied().unwrap_or(0) + 1;
        ctx.state().update(n);
        let at = ctx.current_processing_time() + 5;
        ctx.register_processing_time_timer(at);
    }
    fn on_timer(&mut self, _ts: u64, ctx: &mut ProcessContext<'_, u8, ValueState<u64>, (u8, u64)>) {
        let (k, n) = (*ctx.key(), ctx.state().value().copied().unwrap_or(0));
        ctx.collect((k, n));
        ctx.clear_state();
    }
}

#[test]
fn processing_time_timers_fire() {
    let got = run(1, |env, sink| {
        env.from_collection(vec![1u8, 1, 2])
            .key_by(|x| *x)
            .process(ProcTimer)
            .collect_into(sink)
    });
    // Timers either fire on the clock or when the input ends; both keys report their counts.
    let mut keys: Vec<u8> = got.iter().map(|t| t.0).collect();
    keys.dedup();
    assert_eq!(sorted(keys), vec![1, 2]);
    assert_eq!(got.iter().map(|t| t.1).sum::<u64>(), 3);
}

#[test]
fn assign_timestamps_then_tumbling_windows() {
    let got = run(2, |env, sink| {
        env.from_collection(vec![
            (100u64, 'a'),
            (4_000, 'a'),
            (5_100, 'a'),
            (2_000, 'b'),
            (12_000, 'a'),
        ])
        .assign_timestamps_and_watermarks(
            WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_secs(5))
                .with_timestamp_assigner(|r: &(u64, char), _| r.0),
        )
        .map(|r| (r.1, 1u32))
        .key_by(|t| t.0)
        .window(TumblingWindows::event_time(Duration::from_secs(5)))
        .reduce(|a, b| (a.0, a.1 + b.1))
        .with_timestamps()
        .collect_into(sink)
    });
    assert_eq!(
        sorted(got),
        vec![
            (4_999, ('a', 2)),
            (4_999, ('b', 1)),
            (9_999, ('a', 1)),
            (14_999, ('a', 1))
        ]
    );
}

#[test]
fn allowed_lateness_fires_again_and_late_side_output() {
    // Monotonous watermark: the record at 2000 arrives after the watermark passed 5000.
    let input = vec![
        (1_000u64, 1u64),
        (6_000, 1),
        (2_000, 1),
        (10_500, 1),
        (3_000, 1),
    ];
    let late = CollectSink::new();
    let late_sink = late.clone();
    let i2 = input.clone();
    let got = run(1, move |env, sink| {
        let tag = OutputTag::new("late");
        let w = env
            .from_timestamped(i2.clone(), WatermarkStrategy::for_monotonous_timestamps())
            .key_by(|_| 0u8)
            .window(TumblingWindows::event_time(Duration::from_secs(5)))
            .allowed_lateness(Duration::from_secs(5))
            .side_output_late_data(&tag)
            .reduce(|a, b| a + b);
        w.get_side_output(&tag).collect_into(&late_sink);
        w.collect_into(sink);
    });
    // [0,5s) fires with 1, fires again with 2 (lateness allows 2000 at watermark 6000);
    // 3000 arrives at watermark 10500 > 5000 + 5000: dropped to the side output.
    assert_eq!(got, vec![1, 2, 1, 1]);
    assert_eq!(late.take(), vec![1]);
}

#[test]
fn sliding_and_session_windows() {
    let input: Vec<(u64, (char, u32))> = vec![
        (0, ('k', 1)),
        (3, ('k', 1)),
        (7, ('k', 1)),
        (30, ('k', 1)),
        (33, ('k', 1)),
    ];
    let i2 = input.clone();
    let sliding = run(2, move |env, sink| {
        env.from_timestamped(i2.clone(), WatermarkStrategy::for_monotonous_timestamps())
            .key_by(|t| t.0)
            .window(SlidingWindows::event_time(
                Duration::from_millis(10),
                Duration::from_millis(5),
            ))
            .process(
                |_k: &char, w: TimeWindow, rs: &[(char, u32)], out: &mut Vec<(u64, u64, usize)>| {
                    out.push((w.start, w.end, rs.len()))
                },
            )
            .collect_into(sink)
    });
    assert_eq!(
        sorted(sliding),
        vec![(0, 10, 3), (5, 15, 1), (25, 35, 2), (30, 40, 2)]
    );
    let sessions = run(2, move |env, sink| {
        env.from_timestamped(
            input.clone(),
            WatermarkStrategy::for_monotonous_timestamps(),
        )
        .key_by(|t| t.0)
        .window(SessionWindows::event_time_gap(Duration::from_millis(5)))
        .process(
            |_k: &char, w: TimeWindow, rs: &[(char, u32)], out: &mut Vec<(u64, u64, usize)>| {
                out.push((w.start, w.end, rs.len()))
            },
        )
        .collect_into(sink)
    });
    assert_eq!(sorted(sessions), vec![(0, 12, 3), (30, 38, 2)]);
}

#[test]
fn window_aggregate() {
    let got = run(2, |env, sink| {
        env.from_timestamped(
            vec![(1, (1u8, 2u64)), (2, (1, 4)), (11, (1, 6))],
            WatermarkStrategy::for_monotonous_timestamps(),
        )
        .key_by(|t| t.0)
        .window(TumblingWindows::event_time(Duration::from_millis(10)))
        .aggregate(Avg)
        .collect_into(sink)
    });
    assert_eq!(got, vec![(3, 2), (6, 1)]);
}

#[test]
fn processing_time_windows_flush_at_end() {
    let got = run(2, |env, sink| {
        env.from_sequence(1, 100)
            .key_by(|x| x % 2)
            .window(TumblingWindows::processing_time(Duration::from_secs(3600)))
            .reduce(|a, b| a + b)
            .collect_into(sink)
    });
    // Both keys' windows (one or two per key if the hour turned) hold all records.
    assert_eq!(got.iter().sum::<u64>(), 5050);
}

#[test]
fn count_windows() {
    let input: Vec<(char, u32)> = (1..=7).map(|i| ('a', i)).collect();
    let i2 = input.clone();
    let tumbling = run(2, move |env, sink| {
        env.from_collection(i2.clone())
            .key_by(|t| t.0)
            .count_window(3)
            .reduce(|a, b| (a.0, a.1 + b.1))
            .collect_into(sink)
    });
    assert_eq!(tumbling, vec![('a', 6), ('a', 15)]);
    let sliding = run(2, move |env, sink| {
        env.from_collection(input.clone())
            .key_by(|t| t.0)
            .count_window_sliding(3, 2)
            .reduce(|a, b| (a.0, a.1 + b.1))
            .collect_into(sink)
    });
    // Fires every 2 records over the last (up to) 3: [1,2], [2,3,4], [4,5,6]
    assert_eq!(sliding, vec![('a', 3), ('a', 9), ('a', 15)]);
}

struct Gen {
    n: u64,
}
impl SourceFunction<(u64, u64)> for Gen {
    fn run(&mut self, ctx: &mut SourceContext<(u64, u64)>) -> Result<(), StreamError> {
        for i in 0..self.n {
            ctx.collect_with_timestamp((i % 3, 1), i * 10);
            if i % 10 == 9 {
                ctx.emit_watermark(i * 10);
            }
        }
        Ok(())
    }
}

#[test]
fn source_function_with_timestamps_and_watermarks() {
    let got = run(2, |env, sink| {
        env.from_source(Gen { n: 100 }, WatermarkStrategy::no_watermarks(), "gen")
            .key_by(|t| t.0)
            .window(TumblingWindows::event_time(Duration::from_millis(100)))
            .sum_window()
            .collect_into(sink)
    });
    // 10 windows of 10 records, split over 3 keys.
    assert_eq!(got.iter().map(|t| t.1).sum::<u64>(), 100);
    assert_eq!(got.len(), 30);
}

trait SumWindow<'s> {
    fn sum_window(self) -> DataStream<'s, (u64, u64)>;
}
impl<'s, KF: Fn(&(u64, u64)) -> u64 + Clone + 'static> SumWindow<'s>
    for WindowedStream<'s, (u64, u64), u64, KF>
{
    fn sum_window(self) -> DataStream<'s, (u64, u64)> {
        self.reduce(|a, b| (a.0, a.1 + b.1))
    }
}

#[test]
fn text_file_source_and_sinks() {
    let dir = std::env::temp_dir().join(format!("rill-stream-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("in.txt");
    std::fs::write(&input, "to be or\nnot to be\n").expect("write input");
    let (text_out, json_out) = (dir.join("out.txt"), dir.join("out.jsonl"));
    let (i2, t2, j2) = (input.clone(), text_out.clone(), json_out.clone());
    StreamExecutionEnvironment::new()
        .with_parallelism(1)
        .execute("files", move |env| {
            let counts = env
                .read_text_file(&i2)
                .flat_map(|l: String| {
                    l.split(' ')
                        .map(|w| (w.to_string(), 1u64))
                        .collect::<Vec<_>>()
                })
                .key_by(|t| t.0.clone())
                .sum(|t| &mut t.1);
            counts.clone().write_as_text(&t2);
            counts.write_as_json_lines(&j2);
        })
        .expect("job runs");
    let text = std::fs::read_to_string(&text_out).expect("text output");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec!["(to,1)", "(be,1)", "(or,1)", "(not,1)", "(to,2)", "(be,2)"]
    );
    let json = std::fs::read_to_string(&json_out).expect("json output");
    assert_eq!(json.lines().last(), Some(r#"["be",2]"#));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_file_is_an_error() {
    let err = StreamExecutionEnvironment::new()
        .with_parallelism(2)
        .execute("missing", |env| {
            env.read_text_file("/nonexistent/rill/input.txt")
                .collect_into(&CollectSink::new());
        })
        .expect_err("must fail");
    assert!(matches!(err, StreamError::Io { .. }), "{err}");
}

#[test]
fn flink_format() {
    assert_eq!(("Hello".to_string(), 3u64).flink_string(), "(Hello,3)");
    assert_eq!(
        (1, (2.5, 'c'), Some(true)).flink_string(),
        "(1,(2.5,c),true)"
    );
    assert_eq!(vec![1, 2].flink_string(), "[1, 2]");
}

#[test]
fn state_backend_snapshot_restore() {
    let mut b = MemoryStateBackend::<String, CountState>::default();
    let st = b.get_or_insert_with(&"k".to_string(), &mut CountState::default);
    st.count.update(7);
    st.log.add(1);
    st.seen.put("x".into(), 2);
    let bytes = b.snapshot().expect("snapshot");
    let mut c = MemoryStateBackend::<String, CountState>::default();
    c.restore(&bytes).expect("restore");
    let st = c.get(&"k".to_string()).expect("restored key");
    assert_eq!(st.count.value(), Some(&7));
    assert_eq!(st.log.get(), &[1]);
    assert_eq!(st.seen.get(&"x".to_string()), Some(&2));
    assert!(c.restore(&[1, 2, 3]).is_err());
}

#[test]
fn bad_cluster_config_is_rejected() {
    let err = StreamExecutionEnvironment::new()
        .with_parallelism(3)
        .with_cluster(ClusterConfig::localhost(2, 0, 1))
        .execute("bad", |_| {})
        .expect_err("3 workers over 2 processes");
    assert!(matches!(err, StreamError::Config(_)));
}
