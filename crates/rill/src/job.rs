//! `rill job …`: running a built-in job as its own processes against any AMQP 0-9-1 broker.
//!
//! `rill job run` is a supervisor (see `rill_jobs::supervisor`): it starts the job's worker
//! processes (`rill job worker`, the same arguments plus the worker's place in the cluster)
//! and restarts them when one fails.

use clap::{Args, Subcommand};
use rill_connect::format::BadInputPolicy;
use rill_jobs::supervisor::RestartStrategy;
use rill_jobs::{BuiltinJob, JobOptions, JobSpec};
use std::path::PathBuf;
use std::time::Duration;

/// Run stream jobs over queues.
#[derive(Args, Debug)]
pub struct JobCmd {
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// Run a built-in job until SIGTERM/SIGINT (it then finishes what it consumed, acks it,
    /// waits for its publishes to be confirmed, and exits 0), restarting its worker
    /// processes when one fails.
    Run(RunArgs),
    /// Ask a running job for a checkpoint now, and wait until it is complete.
    Savepoint(SavepointArgs),
    /// One worker process of a job (started by `rill job run`).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Args, Debug)]
struct SavepointArgs {
    /// The job's checkpoint directory (as given to `rill job run --checkpoint-dir`).
    #[arg(long)]
    checkpoint_dir: PathBuf,
    /// How long to wait for the checkpoint to complete.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Builtin {
    /// Word counts of a text queue, one JSON message per word occurrence.
    Wordcount,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// The same pause before every restart.
    FixedDelay,
    /// A pause doubling from --restart-delay-ms up to --restart-max-delay-ms.
    ExponentialBackoff,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Which built-in job.
    job: Builtin,
    /// The broker: amqp://user:pass@host:port/vhost (Rill or RabbitMQ).
    #[arg(long)]
    uri: String,
    /// The queue the job reads (declared as a durable classic queue if missing).
    #[arg(long)]
    source_queue: String,
    /// The queue the job writes (declared as a durable classic queue if missing).
    #[arg(long)]
    sink_queue: String,
    /// Where checkpoints are kept.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// How often a checkpoint is taken.
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    /// Worker threads over all processes, each with its own consumer and publisher.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallelism: u16,
    /// Worker processes (one timely cluster over loopback); must divide --parallelism.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    processes: u16,
    /// Unacked deliveries each consumer may hold (at most 65535 over AMQP). Default: 2000,
    /// or 65535 with checkpoints (acks come once per checkpoint, so the window must hold
    /// what arrives between two).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    prefetch: Option<u32>,
    /// What to do with a message that is not UTF-8: skip (ack it), dead-letter (nack it
    /// without requeue) or fail (stop with an error).
    #[arg(long, default_value = "fail")]
    bad_input: BadInputPolicy,
    /// Queues declared because they are missing are transient instead of durable.
    #[arg(long)]
    transient_queues: bool,
    /// Do not declare missing queues: a missing queue is an error (exit code 4).
    #[arg(long)]
    no_declare: bool,
    /// The job's name in logs.
    #[arg(long)]
    name: Option<String>,
    /// How failed workers are restarted.
    #[arg(long, value_enum, default_value_t = Restart::ExponentialBackoff)]
    restart_strategy: Restart,
    /// The (first) pause before restarting.
    #[arg(long, default_value_t = 200)]
    restart_delay_ms: u64,
    /// The longest pause of exponential backoff.
    #[arg(long, default_value_t = 30_000)]
    restart_max_delay_ms: u64,
    /// Give up after this many restarts in a row (default: never).
    #[arg(long)]
    max_restarts: Option<u32>,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    run: RunArgs,
    /// This process's index in the cluster.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// Every process's host:port, comma-separated (empty for one process).
    #[arg(long, default_value = "")]
    hosts: String,
}

/// Runs the chosen job command; returns the process exit code.
pub fn run(cmd: JobCmd) -> i32 {
    match cmd.command {
        JobCommand::Run(args) => supervise(args),
        JobCommand::Savepoint(args) => savepoint(args),
        JobCommand::Worker(args) => worker(args),
    }
}

fn spec(args: &RunArgs) -> JobSpec {
    let job = match args.job {
        Builtin::Wordcount => BuiltinJob::Wordcount {
            source_queue: args.source_queue.clone(),
            sink_queue: args.sink_queue.clone(),
        },
    };
    JobSpec {
        name: args.name.clone().unwrap_or_else(|| job.kind().to_owned()),
        job,
        options: JobOptions {
            parallelism: usize::from(args.parallelism),
            prefetch: args.prefetch,
            bad_input: args.bad_input,
            declare_queues: !args.no_declare,
            durable_queues: !args.transient_queues,
            checkpoint_interval_ms: args.checkpoint_interval_ms,
            checkpoint_dir: args.checkpoint_dir.clone(),
            ..JobOptions::default()
        },
    }
}

fn supervise(args: RunArgs) -> i32 {
    if !args.parallelism.is_multiple_of(args.processes) {
        eprintln!(
            "rill job run: --parallelism {} is not a multiple of --processes {}",
            args.parallelism, args.processes
        );
        return 2;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rill job run: cannot find the rill binary to start workers: {e}");
            return 1;
        }
    };
    let restart = match args.restart_strategy {
        Restart::FixedDelay => RestartStrategy::FixedDelay {
            delay: Duration::from_millis(args.restart_delay_ms),
            max_attempts: args.max_restarts,
        },
        Restart::ExponentialBackoff => RestartStrategy::ExponentialBackoff {
            initial: Duration::from_millis(args.restart_delay_ms),
            max: Duration::from_millis(args.restart_max_delay_ms.max(args.restart_delay_ms)),
            max_attempts: args.max_restarts,
        },
    };
    // Workers get our arguments as they were, plus their place in the cluster.
    let passed: Vec<std::ffi::OsString> = std::env::args_os().skip(3).collect();
    let spec = spec(&args);
    let pid_file = rill_jobs::runner::standalone_checkpoint_dir(&spec)
        .map(|dir| dir.join(rill_jobs::supervisor::PID_FILE));
    rill_jobs::supervisor::supervise(
        &spec.name,
        usize::from(args.processes),
        restart,
        pid_file.as_deref(),
        |i, hosts| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("job").arg("worker").args(&passed);
            cmd.arg("--process").arg(i.to_string());
            cmd.arg("--hosts").arg(hosts.join(","));
            cmd
        },
    )
}

fn savepoint(args: SavepointArgs) -> i32 {
    let timeout = Duration::from_millis(args.timeout_ms);
    match rill_jobs::supervisor::request_checkpoint(&args.checkpoint_dir, timeout) {
        Ok(id) => {
            println!(
                "checkpoint {id} complete: {}",
                args.checkpoint_dir
                    .join("checkpoints")
                    .join(format!("{id:020}.meta"))
                    .display()
            );
            0
        }
        Err(e) => {
            eprintln!("rill job savepoint: {e}");
            1
        }
    }
}

fn worker(args: WorkerArgs) -> i32 {
    let spec = spec(&args.run);
    let hosts: Vec<String> = args
        .hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    let cluster = (hosts.len() > 1).then_some(rill_stream::ClusterConfig {
        process: args.process,
        hosts,
    });
    match rill_jobs::runner::run_standalone(&spec, &args.run.uri, cluster) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(job = %spec.name, error = %e, "job failed");
            eprintln!("rill job run: {e}");
            e.exit_code()
        }
    }
}
