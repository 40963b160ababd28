//! The `rill bench wordcount` job as an example, for measuring without building the binary:
//!
//! ```text
//! cargo run --release -p rill-stream --example bench_wordcount -- --events 10000000 --vocab 10000 --workers 2
//! cargo run --release -p rill-stream --example bench_wordcount -- --baseline
//! ... --processes 2 --process 0|1   (127.0.0.1:2101, 2102)
//! ```

use rill_stream::bench::{wordcount, wordcount_baseline};
use rill_stream::{ClusterConfig, StreamExecutionEnvironment};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut events, mut vocab, mut workers, mut processes, mut process, mut baseline) =
        (10_000_000u64, 10_000u64, 1usize, 1usize, 0usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or("missing value")
                .and_then(|v| v.parse::<u64>().map_err(|_| "bad number"))
        };
        match arg.as_str() {
            "--events" => events = value()?,
            "--vocab" => vocab = value()?,
            "--workers" => workers = value()? as usize,
            "--processes" => processes = value()? as usize,
            "--process" => process = value()? as usize,
            "--baseline" => baseline = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let report = if baseline {
        wordcount_baseline(events, vocab)
    } else {
        let mut env = StreamExecutionEnvironment::new();
        env.set_parallelism(workers * processes);
        if processes > 1 {
            env.set_cluster(ClusterConfig::localhost(processes, process, 2101));
        }
        wordcount(&env, events, vocab)?
    };
    println!(
        "keys={:?} sum_of_counts={:?} expected={events} runtime_s={:.3}",
        report.keys,
        report.sum_of_counts,
        report.runtime.as_secs_f64()
    );
    println!("events_per_s {:.0}", report.events_per_s());
    Ok(())
}
