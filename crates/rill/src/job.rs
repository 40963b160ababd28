//! `rill job …`: running a built-in job as its own process against any AMQP 0-9-1 broker.

use clap::{Args, Subcommand};
use rill_connect::format::BadInputPolicy;
use rill_jobs::{BuiltinJob, JobOptions, JobSpec};
use std::path::PathBuf;

/// Run stream jobs over queues.
#[derive(Args, Debug)]
pub struct JobCmd {
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// Run a built-in job until SIGTERM/SIGINT (it then finishes what it consumed, acks it,
    /// waits for its publishes to be confirmed, and exits 0).
    Run(RunArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Builtin {
    /// Word counts of a text queue, one JSON message per word occurrence.
    Wordcount,
}

#[derive(Args, Debug)]
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
    /// Worker threads, each with its own consumer and publisher.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallelism: u16,
    /// Unacked deliveries each consumer may hold.
    #[arg(long, default_value_t = rill_jobs::spec::DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
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
}

/// Runs the chosen job command; returns the process exit code.
pub fn run(cmd: JobCmd) -> i32 {
    match cmd.command {
        JobCommand::Run(args) => run_job(args),
    }
}

fn run_job(args: RunArgs) -> i32 {
    let job = match args.job {
        Builtin::Wordcount => BuiltinJob::Wordcount {
            source_queue: args.source_queue,
            sink_queue: args.sink_queue,
        },
    };
    let spec = JobSpec {
        name: args.name.unwrap_or_else(|| job.kind().to_owned()),
        job,
        options: JobOptions {
            parallelism: usize::from(args.parallelism),
            prefetch: args.prefetch,
            bad_input: args.bad_input,
            declare_queues: !args.no_declare,
            durable_queues: !args.transient_queues,
            checkpoint_interval_ms: args.checkpoint_interval_ms,
            checkpoint_dir: args.checkpoint_dir,
            ..JobOptions::default()
        },
    };
    let result = rill_jobs::runner::run_standalone(&spec, &args.uri);
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(job = %spec.name, error = %e, "job failed");
            eprintln!("rill job run: {e}");
            e.exit_code()
        }
    }
}
