//! `rill bench pipeline`: producer → IN → wordcount → OUT → one consumer, with confirmed
//! persistent messages, run three ways side by side:
//!
//! * **(a) embedded**: `rill server --job FILE`, the job on in-process sessions;
//! * **(b) standalone → Rill**: `rill server` plus `rill job run wordcount` over loopback TCP;
//! * **(c) standalone → RabbitMQ**: `rill job run wordcount` against RabbitMQ
//!   (`--rabbitmq-uri`, or a private node the bench starts with `--rabbitmq`);
//!
//! and, as its own row **base**, Rill's confirmed-persistent one-publisher/one-consumer rate
//! on a fresh `rill server`, measured by the code of `rill bench amqp --client wire --kind
//! classic --persistent`. The targets the figures are read against: (a) ≥ 2× (b),
//! (a) ≥ 10× (c), (a) ≥ 50 % of base. They are reported, never asserted.
//!
//! **Load.** The pipelined client of [`crate::bench_wire`] publishes with a confirm window.
//! Message i is `m<i>` followed by `--words - 1` words from a vocabulary, so the job's output
//! for the marker, `{"word":"m<i>","count":1}`, identifies message i on OUT: its send time
//! against its arrival is the end-to-end latency, a marker never seen is a lost message and
//! a marker seen twice (or counted past 1) a duplicate. Each row runs two phases:
//!
//! 1. *throughput*: `--messages N` as fast as the window allows, timed from the first
//!    publish until OUT has received all `N × words` outputs. Its latencies are mostly time
//!    spent queued behind earlier messages (the publisher outruns the job), so they are
//!    printed, but as "saturated";
//! 2. *latency*: `--rate R` messages per second for `--rate-secs`, a load all three
//!    configurations sustain; its p50/p99 are the latency figures to compare.
//!
//! A row whose OUT count differs from `N × words`, or with missing or duplicate markers, is
//! flagged in the table and makes the command exit non-zero after printing everything.
//!
//! **Processes.** Every broker and job is a child process (see [`crate::bench_procs`]),
//! fresh for each row, stopped when its row ends, on error and on Ctrl-C.
//!
//! # Layout
//! This file runs the rows and their phases; `markers` makes the bodies and accounts for
//! what comes out of OUT (latency, loss, duplicates); `report` prints the table, the ratios
//! and the JSON lines.

mod markers;
mod report;

use crate::bench_amqp::{self, AmqpArgs};
use crate::bench_procs::{tree_cpu_seconds, Proc, RabbitNode, RillServer};
use crate::bench_wire::{self, ConsumeSpec, Counters, Pace, WireConn};
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};
use markers::Tracker;
use report::{Cpu, Outcome, Phase, PipelineResult};
use rill_codec::{encode_properties, BasicProperties, FieldTable};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The rows `--only` chooses from.
#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Row {
    /// Rill's own confirmed-persistent 1-publisher/1-consumer rate.
    Base,
    /// Embedded: `rill server --job`.
    A,
    /// Standalone job over loopback TCP against `rill server`.
    B,
    /// Standalone job over loopback TCP against RabbitMQ.
    C,
}

impl Row {
    fn key(self) -> &'static str {
        match self {
            Row::Base => "base",
            Row::A => "a",
            Row::B => "b",
            Row::C => "c",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Base => "Rill 1 pub/1 con, classic persistent",
            Row::A => "embedded: rill server --job",
            Row::B => "standalone job -> rill (TCP)",
            Row::C => "standalone job -> RabbitMQ (TCP)",
        }
    }
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// Messages published in the throughput phase.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Words per message: a marker unique to the message, then words from the vocabulary.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    words: u64,
    /// Vocabulary size of the words after the marker: "w" + ((i*(words-1)+k)*7919 % V).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    vocab: u64,
    /// The job's worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallelism: u16,
    /// Unacked deliveries each of the job's source consumers may hold (default: the job's own,
    /// which depends on checkpoints and on embedded or standalone).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    prefetch: Option<u32>,
    /// Unconfirmed publishes the load generator keeps in flight.
    #[arg(long, default_value_t = 1000)]
    inflight: usize,
    /// Prefetch of the consumer that drains OUT.
    #[arg(long, default_value_t = 1000)]
    out_prefetch: u16,
    /// The OUT consumer acks each delivery (1), or every N with `multiple`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    out_ack_every: u64,
    /// Messages per second in the latency phase (0: no latency phase).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    rate_secs: u64,
    /// Checkpoint interval passed to the jobs (off when absent).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_interval_ms: Option<u64>,
    /// Instead of the usual rows: (a) and (b), each without checkpoints and with a checkpoint
    /// every MS, and the throughput lost to checkpoints.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "checkpoint_interval_ms")]
    compare_checkpoints: Option<u64>,
    /// Row (c) against this RabbitMQ (amqp://user:pass@host:port/vhost).
    #[arg(long)]
    rabbitmq_uri: Option<String>,
    /// Row (c) against a private RabbitMQ node the bench starts and stops itself.
    #[arg(long, conflicts_with = "rabbitmq_uri")]
    rabbitmq: bool,
    /// Which rows, in this order (repeat the command with another order to alternate).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "base,a,b,c")]
    only: Vec<Row>,
    /// Measured seconds of the base row (after its one second of warm-up).
    #[arg(long, default_value_t = 10)]
    base_secs: u64,
    /// A phase is given up (and reported incomplete) when OUT receives nothing for this long.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
}

/// One row to run: which configuration, with which checkpoint interval.
#[derive(Clone, Copy, Debug)]
struct Plan {
    row: Row,
    checkpoint_ms: Option<u64>,
}

/// Runs the benchmark; prints the table, one `JSON` line per row and `events_per_s` last.
pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        bail!("--rate must be a number of messages per second, 0 for no latency phase");
    }
    let plans = plans(&args);
    if plans.is_empty() {
        bail!("--compare-checkpoints runs rows a and b: --only names neither");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // On a signal the rows' future is dropped; its guards stop the children and remove the
    // temporary directories on the way out, and the rows finished so far are still reported.
    let mut results = Vec::new();
    let interrupted = rt.block_on(async {
        tokio::select! {
            () = run_rows(&args, &plans, &mut results) => None,
            signal = interrupted() => Some(signal),
        }
    });
    drop(rt);
    let reported = report::report(&args, &results);
    match interrupted {
        Some(signal) => bail!(
            "interrupted by {signal} after {} of {} rows: children stopped",
            results.len(),
            plans.len()
        ),
        None => reported,
    }
}

fn plans(args: &PipelineArgs) -> Vec<Plan> {
    match args.compare_checkpoints {
        None => args
            .only
            .iter()
            .map(|&row| Plan {
                row,
                checkpoint_ms: args.checkpoint_interval_ms,
            })
            .collect(),
        Some(ms) => args
            .only
            .iter()
            .filter(|r| matches!(r, Row::A | Row::B))
            .flat_map(|&row| [None, Some(ms)].map(|checkpoint_ms| Plan { row, checkpoint_ms }))
            .collect(),
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

async fn run_rows(args: &PipelineArgs, plans: &[Plan], results: &mut Vec<(Plan, Outcome)>) {
    for (n, &plan) in plans.iter().enumerate() {
        eprintln!(
            "[{}/{}] row {}{}: {}",
            n + 1,
            plans.len(),
            plan.row.key(),
            checkpoint_suffix(plan.checkpoint_ms),
            plan.row.label()
        );
        let outcome = match plan.row {
            Row::Base => base_row(args).await,
            Row::C if args.rabbitmq_uri.is_none() && !args.rabbitmq => Ok(Outcome::Skipped(
                "needs --rabbitmq-uri URI or --rabbitmq".into(),
            )),
            Row::C if args.rabbitmq && !RabbitNode::available() => Ok(Outcome::Skipped(
                "--rabbitmq: RabbitMQ is not installed (/usr/lib/rabbitmq/bin)".into(),
            )),
            _ => pipeline_row(args, plan)
                .await
                .map(|r| Outcome::Pipeline(Box::new(r))),
        };
        let outcome = outcome.unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
        eprintln!("    {}", report::summary(&outcome));
        results.push((plan, outcome));
    }
}

fn checkpoint_suffix(ms: Option<u64>) -> String {
    ms.map_or(String::new(), |ms| format!(" ckpt={ms}ms"))
}

fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("rill-bench-pipeline-")
        .tempdir()
        .context("create a temporary directory")
}

async fn base_row(args: &PipelineArgs) -> anyhow::Result<Outcome> {
    let dir = temp_dir()?;
    let mut server = RillServer::start(dir.path(), None).await?;
    let amqp =
        AmqpArgs::classic_persistent_wire(&server.uri(), args.base_secs, Some(server.proc.pid()))?;
    let client0 = bench_amqp::cpu_seconds(std::process::id());
    let started = Instant::now();
    let figures = bench_amqp::measure(&amqp).await;
    // The client's CPU is taken over warm-up and window alike (as a share, that differs
    // little); the broker's over the window only, by `measure`.
    let secs = started.elapsed().as_secs_f64();
    let client = cpu_share(client0, bench_amqp::cpu_seconds(std::process::id()), secs);
    server.proc.check()?;
    let figures = figures?;
    server.proc.stop().map_err(|e| anyhow!(e))?;
    Ok(Outcome::Base(
        figures,
        Cpu {
            broker: figures.broker_cpu,
            job: None,
            client,
        },
    ))
}

fn cpu_share(before: Option<f64>, after: Option<f64>, secs: f64) -> Option<f64> {
    Some((after? - before?) / secs.max(1e-9))
}

/// Queue names, unique per run so that a RabbitMQ given by URI can be shared.
struct Queues {
    input: String,
    output: String,
    /// What the job declares OUT with (deduplicating with checkpoints), so that the bench
    /// declaring it first is equivalent.
    output_arguments: FieldTable,
}

impl Queues {
    fn new(plan: Plan) -> Queues {
        let tag = format!("{}-{}", std::process::id(), plan.row.key());
        Queues {
            input: format!("rill-bench-pipeline-in-{tag}"),
            output: format!("rill-bench-pipeline-out-{tag}"),
            output_arguments: match plan.checkpoint_ms {
                Some(_) => rill_jobs::wordcount::sink_queue_arguments(),
                None => FieldTable::default(),
            },
        }
    }
}

/// The brokers and jobs of one pipeline row, in the order they must stop (the job before its
/// broker): Rust drops locals in reverse order of declaration, so each row declares its
/// broker first.
async fn pipeline_row(args: &PipelineArgs, plan: Plan) -> anyhow::Result<PipelineResult> {
    let dir = temp_dir()?;
    let queues = Queues::new(plan);
    let checkpoint_dir = dir.path().join("checkpoints");
    let checkpoint = plan.checkpoint_ms.map(|ms| (ms, checkpoint_dir.as_path()));
    let mut notes = Vec::new();
    match plan.row {
        Row::A => {
            let job_file = dir.path().join("job.toml");
            write_job_file(&job_file, args, &queues, checkpoint)?;
            let mut server = RillServer::start(dir.path(), Some(&job_file)).await?;
            let pids = Pids {
                broker: Some(server.proc.pid()),
                job: None,
            };
            let measured =
                measure(args, &server.uri(), &queues, pids, &mut [&mut server.proc]).await?;
            notes.extend(server.proc.stop().err());
            Ok(measured.with_notes(notes))
        }
        Row::B => {
            let mut server = RillServer::start(dir.path(), None).await?;
            let uri = server.uri();
            let mut job = start_job(args, &uri, &queues, checkpoint, dir.path())?;
            let pids = Pids {
                broker: Some(server.proc.pid()),
                job: Some(job.pid()),
            };
            let measured =
                measure(args, &uri, &queues, pids, &mut [&mut server.proc, &mut job]).await?;
            notes.extend(job.stop().err());
            notes.extend(server.proc.stop().err());
            Ok(measured.with_notes(notes))
        }
        Row::C => {
            let (node, uri) = match &args.rabbitmq_uri {
                Some(uri) => (None, uri.clone()),
                None => {
                    eprintln!("    starting a private RabbitMQ node");
                    let rmq_dir = dir.path().join("rabbitmq");
                    let node = tokio::task::spawn_blocking(move || RabbitNode::start(&rmq_dir))
                        .await
                        .context("starting RabbitMQ")??;
                    let uri = node.uri();
                    (Some(node), uri)
                }
            };
            let mut job = start_job(args, &uri, &queues, checkpoint, dir.path())?;
            let pids = Pids {
                broker: node.as_ref().and_then(RabbitNode::beam_pid),
                job: Some(job.pid()),
            };
            let measured = measure(args, &uri, &queues, pids, &mut [&mut job]).await;
            notes.extend(job.stop().err());
            if node.is_none() {
                // A shared broker: leave nothing behind.
                if let Ok(mut conn) = WireConn::connect(&uri).await {
                    let _ = conn.delete_queue(&queues.input).await;
                    let _ = conn.delete_queue(&queues.output).await;
                }
            }
            if let Some(node) = node {
                tokio::task::spawn_blocking(move || drop(node)).await?;
            }
            Ok(measured?.with_notes(notes))
        }
        Row::Base => bail!("the base row is no pipeline"),
    }
}

impl PipelineResult {
    fn with_notes(mut self, notes: Vec<String>) -> Self {
        self.notes.extend(notes);
        self
    }
}

/// A job file for `rill server --job` (the keys of `rill_jobs::jobfile`).
fn write_job_file(
    path: &Path,
    args: &PipelineArgs,
    queues: &Queues,
    checkpoint: Option<(u64, &Path)>,
) -> anyhow::Result<()> {
    let mut text = format!(
        "name = \"bench-wordcount\"\njob = \"wordcount\"\nsource_queue = \"{}\"\n\
         sink_queue = \"{}\"\nparallelism = {}\ndurable_queues = true\n",
        queues.input, queues.output, args.parallelism
    );
    if let Some(p) = args.prefetch {
        text.push_str(&format!("prefetch = {p}\n"));
    }
    if let Some((ms, dir)) = checkpoint {
        text.push_str(&format!(
            "checkpoint_interval_ms = {ms}\ncheckpoint_dir = {:?}\n",
            dir.to_string_lossy()
        ));
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// `rill job run wordcount` against `uri`, its log in `dir`.
fn start_job(
    args: &PipelineArgs,
    uri: &str,
    queues: &Queues,
    checkpoint: Option<(u64, &Path)>,
    dir: &Path,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(std::env::current_exe().context("locate the rill binary")?);
    cmd.args(["job", "run", "wordcount", "--uri", uri])
        .args(["--source-queue", &queues.input])
        .args(["--sink-queue", &queues.output])
        .args(["--parallelism", &args.parallelism.to_string()])
        .args(["--name", "bench-wordcount"]);
    if let Some(p) = args.prefetch {
        cmd.args(["--prefetch", &p.to_string()]);
    }
    if let Some((ms, checkpoint_dir)) = checkpoint {
        cmd.args(["--checkpoint-interval-ms", &ms.to_string()])
            .arg("--checkpoint-dir")
            .arg(checkpoint_dir);
    }
    Proc::spawn("rill job run", &mut cmd, &dir.join("job.log"))
}

/// Processes whose CPU a row reports.
#[derive(Clone, Copy)]
struct Pids {
    broker: Option<u32>,
    job: Option<u32>,
}

/// CPU seconds so far of the broker, the job and this process (the load client).
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    broker: Option<f64>,
    job: Option<f64>,
    client: Option<f64>,
}

impl CpuSample {
    fn take(pids: Pids) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            broker: pids.broker.and_then(tree_cpu_seconds),
            job: pids.job.and_then(tree_cpu_seconds),
            client: bench_amqp::cpu_seconds(std::process::id()),
        }
    }

    fn since(self, before: CpuSample) -> Cpu {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        Cpu {
            broker: cpu_share(before.broker, self.broker, secs),
            job: cpu_share(before.job, self.job, secs),
            client: cpu_share(before.client, self.client, secs),
        }
    }
}

/// Aborts a spawned task when dropped, so a row that ends early leaves no client running.
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Both phases of one pipeline row against a broker whose job is (being) started.
async fn measure(
    args: &PipelineArgs,
    uri: &str,
    queues: &Queues,
    pids: Pids,
    procs: &mut [&mut Proc],
) -> anyhow::Result<PipelineResult> {
    let latency_messages = if args.rate > 0.0 {
        (args.rate * args.rate_secs as f64).ceil() as u64
    } else {
        0
    };
    let tracker = Arc::new(Tracker::new(
        args.messages + latency_messages,
        args.words,
        args.vocab,
    )?);
    let mut conn = WireConn::connect(uri)
        .await
        .context("connect the load client")?;
    // The job declares both as durable classic queues if missing; declaring them first (the
    // same way) lets the bench see the job's consumers arrive.
    conn.declare_queue(&queues.input, true).await?;
    conn.declare_queue_with(&queues.output, true, queues.output_arguments.clone())
        .await?;
    wait_for_job(&mut conn, &queues.input, args.parallelism, procs).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(Counters::default());
    let consumer = {
        let (uri, queue, t) = (uri.to_owned(), queues.output.clone(), tracker.clone());
        let spec = ConsumeSpec {
            prefetch: args.out_prefetch,
            ack_every: args.out_ack_every,
            arguments: FieldTable::default(),
        };
        let (counters, stop) = (consumed.clone(), stop.clone());
        Task(tokio::spawn(async move {
            let on_body: bench_wire::OnBody = Box::new(move |body: &[u8]| t.on_out(body));
            bench_wire::consume_each(&uri, &queue, spec, counters, stop, Some(on_body)).await
        }))
    };
    let rig = Rig {
        args,
        uri,
        queues,
        tracker: &tracker,
        pids,
        consumer: &consumer,
    };
    let throughput = rig.phase(procs, 0, args.messages, None).await?;
    let latency = if latency_messages > 0 && throughput.clean() {
        Some(
            rig.phase(procs, args.messages, latency_messages, Some(args.rate))
                .await?,
        )
    } else {
        None
    };
    stop.store(true, Ordering::Relaxed);
    drop(consumer);
    Ok(PipelineResult {
        throughput,
        latency,
        notes: Vec::new(),
    })
}

/// Waits until the job consumes from `input` with all its workers.
async fn wait_for_job(
    conn: &mut WireConn,
    input: &str,
    parallelism: u16,
    procs: &mut [&mut Proc],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in procs.iter_mut() {
            p.check()?;
        }
        let (_, consumers) = conn.declare_queue(input, true).await?;
        if consumers >= u32::from(parallelism) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the job did not consume from {input} within 60 s ({consumers} consumers)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the phases of one row share.
struct Rig<'a> {
    args: &'a PipelineArgs,
    uri: &'a str,
    queues: &'a Queues,
    tracker: &'a Arc<Tracker>,
    pids: Pids,
    /// The OUT consumer, running across both phases.
    consumer: &'a Task<anyhow::Result<()>>,
}

impl Rig<'_> {
    /// Publishes messages `first..first+count` (at `rate` per second if given) and waits until
    /// OUT has `count × words` more outputs, or until it stalls.
    async fn phase(
        &self,
        procs: &mut [&mut Proc],
        first: u64,
        count: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<Phase> {
        let Rig {
            args,
            uri,
            queues,
            tracker,
            pids,
            consumer,
        } = *self;
        let out_expected = count * args.words;
        let received0 = tracker.received.load(Ordering::Relaxed);
        tracker
            .target
            .store(received0 + out_expected, Ordering::Relaxed);
        let published = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let properties = [encode_properties(
            &BasicProperties::default().with_delivery_mode(2),
        )];
        let pace = Pace {
            inflight: args.inflight,
            count: Some(count),
            rate,
        };
        let cpu0 = CpuSample::take(pids);
        let mut publisher = {
            let (uri, queue, t) = (uri.to_owned(), queues.input.clone(), tracker.clone());
            let (counters, stop) = (published.clone(), stop.clone());
            Task(tokio::spawn(async move {
                let body = move |i: u64, buf: &mut Vec<u8>| t.body(first + i, buf);
                bench_wire::publish_each(&uri, &queue, &properties, pace, body, counters, stop)
                    .await
            }))
        };
        let stall = Duration::from_secs(args.stall_secs);
        let mut last = (received0, Instant::now());
        let mut cpu1 = None;
        let mut stalled = false;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            for p in procs.iter_mut() {
                p.check()?;
            }
            if consumer.0.is_finished() {
                bail!("the OUT consumer ended early (the broker closed its connection?)");
            }
            if publisher.0.is_finished() && published.done.load(Ordering::Relaxed) < count {
                stop.store(true, Ordering::Relaxed);
                let ended = (&mut publisher.0).await;
                ended?.context("publisher failed")?;
                bail!("the publisher ended before its messages were confirmed");
            }
            let received = tracker.received.load(Ordering::Relaxed);
            if received >= received0 + out_expected && cpu1.is_none() {
                cpu1 = Some(CpuSample::take(pids));
                // A moment more, to see copies arrive after the last expected output.
                last = (received, Instant::now());
            }
            if cpu1.is_some() {
                if last.1.elapsed() >= Duration::from_millis(500) {
                    break;
                }
                continue;
            }
            if received != last.0 {
                last = (received, Instant::now());
            } else if last.1.elapsed() >= stall {
                stalled = true;
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let nacked = published.nacked.load(Ordering::Relaxed);
        if nacked > 0 {
            bail!("the broker refused {nacked} publishes (basic.nack)");
        }
        let out_received = tracker.received.load(Ordering::Relaxed) - received0;
        let start = usize::try_from(first)?;
        let end = start + usize::try_from(count)?;
        let first_sent = tracker.sent_at[start].load(Ordering::Acquire);
        let end_ns = if stalled {
            tracker.now_ns()
        } else {
            tracker.target_at.load(Ordering::Relaxed)
        };
        let (missing, duplicates, p50_ms, p99_ms) = tracker.phase_markers(start..end);
        let cpu = cpu1.unwrap_or_else(|| CpuSample::take(pids)).since(cpu0);
        Ok(Phase {
            messages: count,
            out_expected,
            out_received,
            missing,
            duplicates,
            stalled,
            seconds: end_ns.saturating_sub(first_sent) as f64 / 1e9,
            p50_ms,
            p99_ms,
            cpu,
        })
    }
}
