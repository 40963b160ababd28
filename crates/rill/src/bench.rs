//! `rill bench …`: built-in benchmarks. Each prints `events_per_s <number>` as its last line.
//!
//! `wordcount` is the keyed running count of `../shared/bench/flink_wordcount.py` on the
//! DataStream API: ids `1..=N` from a parallel sequence source, word = `"w" + (id*7919 % V)`,
//! `key_by(word).sum(count)`, and a sink that keeps each key's last running count so the
//! final counts can be checked to sum to N. `wordcount-baseline` is the same generation and
//! counting as a plain single-threaded loop over a `HashMap` with a reused buffer: the limit.
//!
//! `amqp` measures one broker (`bench_amqp`, on the pipelined client of `bench_wire`);
//! `pipeline` measures brokers and the wordcount job together (`bench_pipeline`, with its
//! child processes in `bench_procs`).
//!
//! `checkpoint` builds keyed running counts of N distinct keys, checkpoints them to a
//! directory, and restores them in a new environment: it prints the checkpoint's write time
//! and size on disk, and the time from starting the restored job until its first new
//! output (`events_per_s` is keys written per second of checkpoint time).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use rill_stream::{bench, ClusterConfig, StreamExecutionEnvironment};

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
    /// One publisher and one consumer on a classic, priority or stream queue of any AMQP broker.
    Amqp(crate::bench_amqp::AmqpArgs),
    /// Producer -> IN -> wordcount job -> OUT -> consumer: the job embedded in the broker,
    /// standalone against Rill and standalone against RabbitMQ, side by side.
    Pipeline(crate::bench_pipeline::PipelineArgs),
    /// Checkpoint and restore a large keyed state.
    Checkpoint(CheckpointArgs),
}

#[derive(Args, Debug)]
struct CheckpointArgs {
    /// Distinct keys in the keyed state.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Checkpoint directory (must be empty or absent); default a fresh one under the
    /// system's temporary directory, removed afterwards.
    #[arg(long)]
    dir: Option<PathBuf>,
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
        Bench::Amqp(args) => crate::bench_amqp::run(args),
        Bench::Pipeline(args) => crate::bench_pipeline::run(args),
        Bench::Checkpoint(args) => checkpoint(args),
    }
}

fn checkpoint(args: CheckpointArgs) -> anyhow::Result<()> {
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("rill-bench-checkpoint-{}", std::process::id())),
            true,
        ),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} is not empty", dir.display());
    }
    let report = bench::checkpoint(&dir, args.keys, args.workers);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.context("running the checkpoint benchmark")?;
    let write = report
        .checkpoint
        .duration
        .context("the coordinator's process reports the write time")?;
    println!(
        "checkpoint: keys={} workers={} id={} bytes={} restored_count={} ok={}",
        report.keys,
        args.workers,
        report.checkpoint.id,
        report.checkpoint.bytes,
        report.restored_count,
        report.restored_count == 2
    );
    println!("checkpoint_write_s {:.3}", write.as_secs_f64());
    println!("checkpoint_bytes {}", report.checkpoint.bytes);
    println!(
        "restore_to_first_output_s {:.3}",
        report.restore_to_first_output.as_secs_f64()
    );
    println!(
        "events_per_s {:.0}",
        report.keys as f64 / write.as_secs_f64().max(1e-9)
    );
    if report.restored_count != 2 {
        bail!(
            "the restored count is {}, expected 2",
            report.restored_count
        );
    }
    Ok(())
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
    let report =
        bench::wordcount(&env, args.events, args.vocab).context("running the wordcount job")?;
    // Only the process hosting worker 0 receives the global totals.
    if let (Some(keys), Some(sum)) = (report.keys, report.sum_of_counts) {
        println!(
            "wordcount: events={} vocab={} workers={} processes={} keys={keys} sum_of_counts={sum} ok={}",
            args.events,
            args.vocab,
            args.workers,
            args.processes,
            sum == args.events
        );
        if sum != args.events {
            bail!("final counts sum to {sum}, expected {}", args.events);
        }
    }
    println!("net_runtime_s {:.3}", report.runtime.as_secs_f64());
    println!("events_per_s {:.0}", report.events_per_s());
    Ok(())
}

fn baseline(args: BaselineArgs) -> anyhow::Result<()> {
    let report = bench::wordcount_baseline(args.events, args.vocab);
    let sum = report.sum_of_counts.unwrap_or(0);
    println!(
        "wordcount-baseline: events={} keys={} sum_of_counts={sum} ok={}",
        args.events,
        report.keys.unwrap_or(0),
        sum == args.events
    );
    println!("net_runtime_s {:.3}", report.runtime.as_secs_f64());
    println!("events_per_s {:.0}", report.events_per_s());
    Ok(())
}
