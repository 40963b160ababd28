//! `rill bench amqp`: one publisher (with confirms) and one consumer (manual acks) on one queue
//! of a chosen kind, against any AMQP 0-9-1 broker, so queue types the shared load generator
//! cannot declare (streams, priority queues) are measured the same way on Rill and RabbitMQ.
//! Prints one `JSON {...}` line; the last line is `events_per_s <consumed msgs/s>`.
//!
//! `--client wire` (the default) drives the broker with the pipelined client in
//! `bench_wire`, which leaves the machine's CPU to the broker; `--client lapin` uses lapin,
//! whose own CPU use bounds the figure on a small machine.

use crate::bench_wire::{self, Counters};
use anyhow::Context as _;
use clap::{Args, ValueEnum};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rill_codec::encode_properties;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum QueueKind {
    /// A durable classic queue.
    Classic,
    /// A durable classic queue with `x-max-priority`; messages cycle through the levels.
    Priority,
    /// A stream queue read from `first`.
    Stream,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Client {
    /// The pipelined client built on rill-codec (`bench_wire`).
    Wire,
    /// lapin, one task per publish.
    Lapin,
}

#[derive(Args, Debug, Clone)]
pub struct AmqpArgs {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    #[arg(long, value_enum, default_value = "stream")]
    kind: QueueKind,
    /// Body size in bytes.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unconfirmed publishes allowed in flight.
    #[arg(long, default_value_t = 1000)]
    inflight: usize,
    /// Consumer prefetch (streams require one).
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Ack each delivery (1), or every N deliveries with `multiple`.
    #[arg(long, default_value_t = 1)]
    ack_every: u64,
    /// Queue name (default `rill-bench-<kind>`); it is deleted and declared afresh.
    #[arg(long)]
    queue: Option<String>,
    /// Which client library drives the broker.
    #[arg(long, value_enum, default_value = "wire")]
    client: Client,
    /// Priority levels for `--kind priority`.
    #[arg(long, default_value_t = 10)]
    priorities: u8,
    /// delivery_mode 2 (streams store every message anyway).
    #[arg(long, default_value_t = true)]
    persistent: bool,
    /// Broker process id, to report its CPU use in the window.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Only publish, until this many messages are confirmed, and keep the queue: fills a
    /// backlog (e.g. for recovery-time and memory measurements).
    #[arg(long)]
    fill: Option<u64>,
}

/// CPU seconds (user + system) a process has used so far, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub fn run(args: AmqpArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

/// One measurement's figures (rates over the measured window, after the warm-up).
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub pub_per_s: f64,
    pub con_per_s: f64,
    pub nacked: u64,
    /// Broker CPU in the window as a fraction of one core, if its pid was given.
    pub broker_cpu: Option<f64>,
}

impl AmqpArgs {
    /// The arguments of `rill bench amqp --client wire --kind classic --persistent --uri URI
    /// --duration S`, every other option at its command-line default (parsed, so they cannot
    /// drift apart): Rill's own confirmed-persistent one-publisher/one-consumer rate, which
    /// `rill bench pipeline` compares against.
    pub fn classic_persistent_wire(
        uri: &str,
        duration: u64,
        broker_pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: AmqpArgs,
        }
        let duration = duration.to_string();
        let mut cmd = <Cmd as clap::Parser>::try_parse_from([
            "amqp",
            "--client",
            "wire",
            "--kind",
            "classic",
            "--persistent",
            "--uri",
            uri,
            "--duration",
            &duration,
        ])?;
        cmd.args.broker_pid = broker_pid;
        Ok(cmd.args)
    }
}

async fn run_async(args: AmqpArgs) -> anyhow::Result<()> {
    if let Some(n) = args.fill {
        let (_setup, _ch, queue) = fresh_queue(&args).await?;
        return fill(&args, &queue, n).await;
    }
    let f = measure(&args).await?;
    println!(
        "JSON {{\"kind\":\"{:?}\",\"client\":\"{:?}\",\"size\":{},\"duration_s\":{},\"nacked\":{},\"pub_per_s\":{:.0},\"con_per_s\":{:.0},\"broker_cpu_pct\":{},\"msgs_per_broker_cpu_s\":{}}}",
        args.kind,
        args.client,
        args.size,
        args.duration,
        f.nacked,
        f.pub_per_s,
        f.con_per_s,
        f.broker_cpu.map_or("null".to_owned(), |c| format!("{:.0}", c * 100.0)),
        f.broker_cpu
            .filter(|c| *c > 0.0)
            .map_or("null".to_owned(), |c| format!("{:.0}", f.con_per_s / c)),
    );
    println!("events_per_s {:.0}", f.con_per_s);
    Ok(())
}

/// The queue's name, deleted and declared afresh with the arguments of its kind, and the
/// connection and channel that did it: kept open for the run (closing it on a broker that
/// just closed the first channel makes lapin log errors) and used to delete the queue after.
async fn fresh_queue(args: &AmqpArgs) -> anyhow::Result<(Connection, lapin::Channel, String)> {
    let queue = queue_name(args);
    let setup = Connection::connect(&args.uri, ConnectionProperties::default())
        .await
        .context("connect")?;
    let ch = setup.create_channel().await?;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let ch = setup.create_channel().await?;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        queue_arguments(args),
    )
    .await
    .context("declare")?;
    Ok((setup, ch, queue))
}

fn queue_name(args: &AmqpArgs) -> String {
    args.queue
        .clone()
        .unwrap_or_else(|| format!("rill-bench-{:?}", args.kind).to_lowercase())
}

fn queue_arguments(args: &AmqpArgs) -> FieldTable {
    let mut qargs = FieldTable::default();
    match args.kind {
        QueueKind::Classic => {}
        QueueKind::Priority => {
            qargs.insert(
                "x-max-priority".into(),
                AMQPValue::LongInt(args.priorities.into()),
            );
        }
        QueueKind::Stream => {
            qargs.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("stream")),
            );
        }
    }
    qargs
}

/// One publisher and one consumer on a fresh queue for one warm-up second and
/// `args.duration` measured seconds; the queue is deleted afterwards.
pub async fn measure(args: &AmqpArgs) -> anyhow::Result<Figures> {
    let (_setup, ch, queue) = fresh_queue(args).await?;
    let published = Arc::new(Counters::default());
    let consumed = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumer_args = FieldTable::default();
    if args.kind == QueueKind::Stream {
        consumer_args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    // Raw properties of the i-th message are `properties[i % len]`: one set per priority.
    let levels = if args.kind == QueueKind::Priority {
        args.priorities.max(1)
    } else {
        1
    };
    let properties: Vec<BasicProperties> = (0..levels)
        .map(|level| {
            let p =
                BasicProperties::default().with_delivery_mode(if args.persistent { 2 } else { 1 });
            if args.kind == QueueKind::Priority {
                p.with_priority(level)
            } else {
                p
            }
        })
        .collect();

    // The consumer attaches first, so a classic queue delivers as it fills.
    let (consumer_task, publisher_task) = match args.client {
        Client::Wire => {
            let (uri, q, counters, stop2) = (
                args.uri.clone(),
                queue.clone(),
                consumed.clone(),
                stop.clone(),
            );
            let (prefetch, ack_every) = (args.prefetch, args.ack_every);
            let consumer = tokio::spawn(async move {
                bench_wire::consume(
                    &uri,
                    &q,
                    prefetch,
                    ack_every,
                    consumer_args,
                    counters,
                    stop2,
                )
                .await
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            let raw: Vec<bytes::Bytes> = properties.iter().map(encode_properties).collect();
            let (uri, q, counters, stop2) = (
                args.uri.clone(),
                queue.clone(),
                published.clone(),
                stop.clone(),
            );
            let (body, inflight) = (vec![7u8; args.size], args.inflight);
            let publisher = tokio::spawn(async move {
                bench_wire::publish(&uri, &q, &body, &raw, inflight, counters, stop2).await
            });
            (consumer, publisher)
        }
        Client::Lapin => {
            let consumer = tokio::spawn(lapin_consume(
                args.clone(),
                queue.clone(),
                consumer_args,
                consumed.clone(),
                stop.clone(),
            ));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let publisher = tokio::spawn(lapin_publish(
                args.clone(),
                queue.clone(),
                properties,
                published.clone(),
                stop.clone(),
            ));
            (consumer, publisher)
        }
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, c0) = (
        published.done.load(Ordering::Relaxed),
        consumed.done.load(Ordering::Relaxed),
    );
    let cpu0 = args.broker_pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (p1, c1) = (
        published.done.load(Ordering::Relaxed),
        consumed.done.load(Ordering::Relaxed),
    );
    let cpu1 = args.broker_pid.and_then(cpu_seconds);
    stop.store(true, Ordering::Relaxed);
    let pub_rate = (p1 - p0) as f64 / secs;
    let con_rate = (c1 - c0) as f64 / secs;
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) / secs),
        _ => None,
    };
    // A client that failed before the end (refused declare, closed channel) is an error,
    // not a low figure.
    for (what, task) in [("publisher", publisher_task), ("consumer", consumer_task)] {
        if task.is_finished() {
            task.await?.with_context(|| format!("{what} failed"))?;
        } else {
            task.abort();
        }
    }
    let nacked = published.nacked.load(Ordering::Relaxed);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    Ok(Figures {
        pub_per_s: pub_rate,
        con_per_s: con_rate,
        nacked,
        broker_cpu: cpu,
    })
}

async fn lapin_consume(
    args: AmqpArgs,
    queue: String,
    arguments: FieldTable,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await?;
    let ack_every = args.ack_every.max(1);
    let mut n = 0u64;
    // Single acks are not awaited one by one: each await is a round trip to lapin's I/O
    // thread, which would cap the consumer far below the broker (amqp-load avoids it too).
    // `multiple` acks are awaited: lapin may send concurrent ones out of order, and a late
    // lower tag is then unknown to the broker.
    let mut acks = tokio::task::JoinSet::new();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        n += 1;
        counters.done.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(ack_every) {
            let multiple = ack_every > 1;
            let acker = delivery.acker;
            let ack = async move { acker.ack(BasicAckOptions { multiple }).await };
            if multiple {
                ack.await?;
            } else {
                acks.spawn(ack);
                while let Some(done) = acks.try_join_next() {
                    done??;
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok(())
}

async fn lapin_publish(
    args: AmqpArgs,
    queue: String,
    properties: Vec<BasicProperties>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = Arc::new(conn.create_channel().await?);
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let inflight = args.inflight.max(1);
    let body = Arc::new(vec![7u8; args.size]);
    let queue = Arc::new(queue);
    let mut i: usize = 0;
    // Each publish runs in its own task so lapin batches many into one socket write, as a
    // pipelining client does; waiting on the oldest bounds what is in flight.
    let mut pending: std::collections::VecDeque<tokio::task::JoinHandle<lapin::Result<bool>>> =
        std::collections::VecDeque::with_capacity(inflight);
    while !stop.load(Ordering::Relaxed) {
        if pending.len() >= inflight {
            if let Some(oldest) = pending.pop_front() {
                let counter = if oldest.await?? {
                    &counters.done
                } else {
                    &counters.nacked
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        let props = properties[i % properties.len()].clone();
        let (ch, body, queue) = (ch.clone(), body.clone(), queue.clone());
        pending.push_back(tokio::spawn(async move {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
            Ok(confirm.await?.is_ack())
        }));
        i += 1;
    }
    Ok(())
}

/// Publishes `n` confirmed messages into `queue` and leaves them there.
async fn fill(args: &AmqpArgs, queue: &str, n: u64) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(args.inflight));
    let confirmed = Arc::new(AtomicU64::new(0));
    let body = vec![7u8; args.size];
    let props = BasicProperties::default().with_delivery_mode(if args.persistent { 2 } else { 1 });
    let started = Instant::now();
    for _ in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await?;
        let count = confirmed.clone();
        tokio::spawn(async move {
            if matches!(confirm.await, Ok(c) if c.is_ack()) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    // Every permit back means every confirm arrived.
    let _all = permits.acquire_many(args.inflight as u32).await?;
    let secs = started.elapsed().as_secs_f64();
    let ok = confirmed.load(Ordering::Relaxed);
    println!(
        "JSON {{\"fill\":{n},\"confirmed\":{ok},\"size\":{},\"seconds\":{secs:.1},\"pub_per_s\":{:.0}}}",
        args.size,
        ok as f64 / secs
    );
    println!("events_per_s {:.0}", ok as f64 / secs);
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
