//! The seed's WordCount: a source emits "Hello Flink!" `--count` times, `--interval-ms` apart
//! (default 100 × 1000 ms), words are split, keyed and summed, and every running count is
//! printed in Flink's format (`N> (word,count)`).
//!
//! ```text
//! cargo run -p rill-stream --example wordcount -- --no-delay --count 5 --parallelism 2
//! ```

use std::time::Duration;

use rill_stream::{SourceContext, SourceFunction, StreamError, StreamExecutionEnvironment};

/// Emits "Hello Flink!" `count` times, sleeping `interval` in between.
struct HelloSource {
    count: u64,
    interval: Duration,
}

impl SourceFunction<String> for HelloSource {
    fn run(&mut self, ctx: &mut SourceContext<String>) -> Result<(), StreamError> {
        for i in 0..self.count {
            if ctx.is_cancelled() {
                break;
            }
            ctx.collect("Hello Flink!".to_string());
            if !self.interval.is_zero() && i + 1 < self.count {
                std::thread::sleep(self.interval);
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut count = 100u64;
    let mut interval_ms = 1000u64;
    let mut parallelism = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64, Box<dyn std::error::Error>> {
            let v = args.next().ok_or_else(|| format!("{name} needs a value"))?;
            Ok(v.parse::<u64>().map_err(|e| format!("{name}: {e}"))?)
        };
        match arg.as_str() {
            "--count" => count = value("--count")?,
            "--interval-ms" => interval_ms = value("--interval-ms")?,
            "--no-delay" => interval_ms = 0,
            "--parallelism" => parallelism = Some(value("--parallelism")? as usize),
            other => return Err(format!("unknown argument {other}; use --count N --interval-ms MS --no-delay --parallelism P").into()),
        }
    }

    let mut env = StreamExecutionEnvironment::new();
    if let Some(p) = parallelism {
        env.set_parallelism(p);
    }
    env.execute("Window WordCount", move |env| {
        env.add_source(HelloSource {
            count,
            interval: Duration::from_millis(interval_ms),
        })
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(|w| (w.to_string(), 1u64))
                .collect::<Vec<_>>()
        })
        .key_by(|t| t.0.clone())
        .sum(|t| &mut t.1)
        .print();
    })?;
    Ok(())
}
