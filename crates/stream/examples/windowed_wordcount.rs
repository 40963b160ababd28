//! Per-word counts in 5 s tumbling event-time windows over out-of-order input.
//!
//! Words arrive up to 4 s out of order; the watermark trails the largest timestamp by 2 s,
//! so some words are late: those within 1 s of allowed lateness update their window (a
//! second firing), the rest go to a side output.
//!
//! ```text
//! cargo run -p rill-stream --example windowed_wordcount -- [--parallelism P]
//! ```

use std::time::Duration;

use rill_stream::{
    OutputTag, StreamExecutionEnvironment, TimeWindow, TumblingWindows, WatermarkStrategy,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut env = StreamExecutionEnvironment::new();
    let args: Vec<String> = std::env::args().collect();
    if let Some(p) = args
        .iter()
        .position(|a| a == "--parallelism")
        .and_then(|i| args.get(i + 1))
    {
        env.set_parallelism(p.parse()?);
    }
    // (event time ms, word): time advances 700 ms per event, with a deterministic jitter of
    // up to 4 s backwards.
    let words = ["rill", "flink", "timely", "rust"];
    let events: Vec<(u64, String)> = (0..60u64)
        .map(|i| {
            let ts = (i * 700).saturating_sub((i * 7919) % 10 * 450);
            (ts, words[(i * 31 % 4) as usize].to_string())
        })
        .collect();

    env.execute("windowed wordcount", move |env| {
        let late = OutputTag::new("late");
        let counts = env
            .from_parallel_iter(
                // One copy of the input, on worker 0 (like a single Kafka partition).
                |index, _| {
                    if index == 0 {
                        events.clone()
                    } else {
                        Vec::new()
                    }
                },
                WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_secs(2))
                    .with_timestamp_assigner(|e: &(u64, String), _| e.0),
            )
            .map(|(_, word)| (word, 1u64))
            .key_by(|t| t.0.clone())
            .window(TumblingWindows::event_time(Duration::from_secs(5)))
            .allowed_lateness(Duration::from_secs(1))
            .side_output_late_data(&late)
            .process(
                |word: &String,
                 w: TimeWindow,
                 rs: &[(String, u64)],
                 out: &mut Vec<(String, String, u64)>| {
                    out.push((
                        format!("[{}s,{}s)", w.start / 1000, w.end / 1000),
                        word.clone(),
                        rs.len() as u64,
                    ));
                },
            );
        counts
            .get_side_output(&late)
            .map(|(word, _)| ("late".to_string(), word))
            .print();
        counts.print();
    })?;
    Ok(())
}
