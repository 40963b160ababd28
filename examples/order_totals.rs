//! A stream job of your own, as an ordinary program: per-item order totals over 10-second
//! event-time windows, read from one queue and written to another.
//!
//! Orders are JSON, `{"item":"tea","amount":3,"ts":1700000000000}` (`ts` in ms since the
//! epoch, the order's own time); they may arrive up to 2 s out of order. Every 10 s of event
//! time, each item's total goes out as `{"item":"tea","window_start":…,"window_end":…,
//! "total":…}`. Windows fire when the watermark passes their end, i.e. once an order 2 s
//! past the end has arrived.
//!
//! Standalone, against any AMQP 0-9-1 broker (Rill or RabbitMQ):
//!
//! ```sh
//! cargo run -p rill-jobs --example order_totals -- amqp://guest:guest@127.0.0.1:5672/%2F
//! ```
//!
//! Embedded, with the broker in the same process and the job compiled in (no network hop
//! between them; clients still connect on the port):
//!
//! ```sh
//! cargo run -p rill-jobs --example order_totals -- --embedded 5672 ./order-data
//! ```
//!
//! SIGTERM or Ctrl-C stops it cleanly: what it consumed is processed, published, confirmed
//! and acked before it exits.

use rill_connect::transport::{Credentials, QueueSetup};
use rill_connect::{Endpoint, QueueSink, QueueSource};
use rill_jobs::runner::EmbeddedJobRun;
use rill_stream::{
    JobEnv, StreamExecutionEnvironment, TimeWindow, TumblingWindows, WatermarkStrategy,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    item: String,
    amount: u64,
    ts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Total {
    item: String,
    window_start: u64,
    window_end: u64,
    total: u64,
}

/// The job's dataflow, the same standalone and embedded.
fn order_totals(env: &JobEnv<'_>, broker: &Endpoint) {
    let orders = QueueSource::new(broker.clone(), "orders")
        .json::<Order>()
        .setup(QueueSetup::durable())
        .build_with_watermarks(
            env,
            WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_secs(2))
                .with_timestamp_assigner(|o: &Order, _| o.ts),
        );
    let totals = orders
        .key_by(|o: &Order| o.item.clone())
        .window(TumblingWindows::event_time(Duration::from_secs(10)))
        .process(
            |item: &String, w: TimeWindow, orders: &[Order], out: &mut Vec<Total>| {
                out.push(Total {
                    item: item.clone(),
                    window_start: w.start,
                    window_end: w.end,
                    total: orders.iter().map(|o| o.amount).sum(),
                });
            },
        );
    QueueSink::to_queue(broker.clone(), "order-totals")
        .json()
        .setup(QueueSetup::durable())
        .build(totals);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RILL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = StreamExecutionEnvironment::new().with_parallelism(1);
    let result = match args.first().map(String::as_str) {
        Some("--embedded") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(5672);
            let data_dir = args
                .get(2)
                .cloned()
                .unwrap_or_else(|| "./order-data".into());
            let job = EmbeddedJobRun::new(
                "order-totals",
                env,
                Credentials::default(),
                |env, broker, _| order_totals(env, broker),
            );
            let config = rill_server::ServerConfig {
                bind: std::net::Ipv4Addr::LOCALHOST.into(),
                port,
                // No management API: this example is about the job.
                http_port: None,
                data_dir: data_dir.into(),
                max_connections: 1024,
                memory_high_watermark: 0.4,
                disk_free_limit: 50_000_000,
                sync: rill_store::SyncPolicy::Always,
            };
            rill_server::Server::new(config)
                .job(Box::new(job))
                .run_blocking()
                .map_err(|e| e.to_string())
        }
        uri => {
            let broker = Endpoint::amqp(uri.unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2F"));
            rill_jobs::signals::stop_on_terminate(env.stop_handle());
            env.execute("order-totals", move |env| order_totals(env, &broker))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        eprintln!("order_totals: {e}");
        std::process::exit(1);
    }
}
