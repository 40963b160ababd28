//! `rill bench …`: built-in benchmarks. Each prints `events_per_s <number>` as its last line.
//!
//! `wordcount` is the keyed running count of `../shared/bench/flink_wordcount.py` on the
//! DataStream API: ids `1..=N` from a parallel sequence source, word = `"w" + (id*7919 % V)`,
//! `key_by(word).sum(count)`, and a sink that keeps each key's last running count so the
//! final counts can be checked to sum to N. `wordcount-baseline` is the same generation and
//! counting as a plain single-threaded loop over a `HashMap` with a reused buffer: the limit.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use rill_stream::hash::FxHashMap;
use rill_stream::{ClusterConfig, CollectSink, ShortStr, StreamExecutionEnvironment};

/// Run a built-in benchmark.
#[derive(Args, Debug)]
pub struct BenchCmd {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Keyed running word count on the stream engine.
    Wordcount(WordcountArgs),
    /// The same words counted by a plain single-threaded HashMap loop (the upper bound).
    WordcountBaseline(BaselineArgs),
}

#[derive(Args, Debug)]
struct WordcountArgs {
    /// Number of generated words (ids 1..=N).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Vocabulary size V: word = "w" + (id * 7919 % V).
    #[arg(long, default_value_t = 10_000)]
    vocab: u64,
    /// Worker threads per process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Number of cooperating processes.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's index (0-based) when --processes > 1.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// File with one host:port per process; default 127.0.0.1:2101, 2102, ...
    #[arg(long)]
    hostfile: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BaselineArgs {
    /// Number of generated words (ids 1..=N).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Vocabulary size V.
    #[arg(long, default_value_t = 10_000)]
    vocab: u64,
}

/// Runs the chosen benchmark.
pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd.bench {
        Bench::Wordcount(args) => wordcount(args),
        Bench::WordcountBaseline(args) => baseline(args),
    }
}

fn wordcount(args: WordcountArgs) -> anyhow::Result<()> {
    if args.vocab == 0 {
        bail!("--vocab must be at least 1");
    }
    let mut env = StreamExecutionEnvironment::new();
    env.set_parallelism(args.workers.max(1) * args.processes.max(1));
    if args.processes > 1 {
        let cluster = match &args.hostfile {
            Some(path) => ClusterConfig::from_hostfile(path, args.process)?,
            None => ClusterConfig::localhost(args.processes, args.process, 2101),
        };
        env.set_cluster(cluster);
    }
    let (n, vocab) = (args.events, args.vocab);
    let totals = CollectSink::new();
    let sink = totals.clone();
    let result = env
        .execute("wordcount-bench", move |env| {
            env.from_sequence(1, n)
                .map(move |id| {
                    let mut word = ShortStr::default();
                    // "w" + a u64 always fits in 23 bytes.
                    let _ = write!(word, "w{}", id.wrapping_mul(7919) % vocab);
                    (word, 1u64)
                })
                .key_by(|t| t.0)
                .sum(|t| &mut t.1)
                // Each key's last running count, per worker; then (keys, sum of counts).
                .fold_at_end(
                    (FxHashMap::<ShortStr, u64>::default(), 0u64, 0u64),
                    |acc, (word, count)| {
                        acc.0.insert(word, count);
                    },
                    |acc, mut part| {
                        part.1 += part.0.len() as u64;
                        part.2 += part.0.values().sum::<u64>();
                        acc.1 += part.1;
                        acc.2 += part.2;
                    },
                )
                .collect_into(&sink);
        })
        .context("running the wordcount job")?;
    let secs = result.net_runtime.as_secs_f64();
    // Only process 0 hosts worker 0, which receives the global totals.
    if let Some((_, keys, sum)) = totals.take().pop() {
        println!(
            "wordcount: events={n} vocab={vocab} workers={} processes={} keys={keys} sum_of_counts={sum} ok={}",
            args.workers,
            args.processes,
            sum == n
        );
        if sum != n {
            bail!("final counts sum to {sum}, expected {n}");
        }
    }
    println!("net_runtime_s {secs:.3}");
    println!("events_per_s {:.0}", n as f64 / secs);
    Ok(())
}

fn baseline(args: BaselineArgs) -> anyhow::Result<()> {
    if args.vocab == 0 {
        bail!("--vocab must be at least 1");
    }
    let start = Instant::now();
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut buf = String::new();
    for id in 1..=args.events {
        buf.clear();
        let _ = write!(buf, "w{}", id.wrapping_mul(7919) % args.vocab);
        match counts.get_mut(buf.as_str()) {
            Some(c) => *c += 1,
            None => {
                counts.insert(buf.clone(), 1);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let sum: u64 = counts.values().sum();
    println!("wordcount-baseline: events={} keys={} sum_of_counts={sum} ok={}", args.events, counts.len(), sum == args.events);
    println!("net_runtime_s {secs:.3}");
    println!("events_per_s {:.0}", args.events as f64 / secs);
    Ok(())
}
