//! The `rill` binary: one command line for the broker and the stream engine.
//!
//! It only parses arguments, sets up logging and hands over to the library crates;
//! no broker or stream logic lives here.

mod bench;
mod bench_amqp;
mod bench_pipeline;
mod bench_procs;
mod bench_wire;
mod job;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: a job allocates and frees small buffers at a high rate
/// across threads (a record's words, keys, encoded messages), and glibc's free-list
/// consolidation made the embedded pipeline's throughput bimodal (26k–46k msg/s, median
/// 28k); with mimalloc it is 50k–56k, median 52k (`rill bench pipeline --only a`, 5 runs
/// each). The broker alone is unchanged (~550k msg/s either way); the crate costs about 8 s
/// of a clean release build.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rill",
    version,
    about = "An AMQP 0-9-1 broker and stream processor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the AMQP broker.
    Server(ServerArgs),
    /// Run a stream job over queues as its own process.
    Job(job::JobCmd),
    /// Run a built-in benchmark.
    Bench(bench::BenchCmd),
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// AMQP port.
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Management HTTP API port (RabbitMQ's management plugin's API), on the same address.
    #[arg(long, default_value_t = 15672)]
    http_port: u16,
    /// Where durable state is kept.
    #[arg(long, default_value = "./rill-data")]
    data_dir: std::path::PathBuf,
    /// Most concurrent client connections; more wait in the accept backlog.
    #[arg(long, default_value_t = 65_536)]
    max_connections: usize,
    /// Block publishers when the broker uses more than this fraction of RAM.
    #[arg(long, default_value_t = 0.4)]
    memory_high_watermark: f64,
    /// Block publishers when the data directory has fewer free bytes than this.
    #[arg(long, default_value_t = 50_000_000)]
    disk_free_limit: u64,
    /// 0: fsync persistent messages before confirming them (group commit). N: fsync at most
    /// every N ms; confirms still wait for the fsync that covers them.
    #[arg(long, default_value_t = 0)]
    sync_interval_ms: u64,
    /// A job file to run inside the broker (repeatable): started once the data directory is
    /// recovered, stopped cleanly before the broker shuts down.
    #[arg(long = "job", value_name = "FILE")]
    jobs: Vec<std::path::PathBuf>,
}

/// Log filter unless `RILL_LOG` says otherwise. lapin logs expected events of our own making
/// at ERROR (a passive declare's 404 while a job sets its queues up, the socket closing after
/// connection.close-ok); the transports report what matters themselves.
const DEFAULT_LOG: &str = "info,lapin=off";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RILL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Server(args) => server(args),
        Command::Job(cmd) => std::process::exit(job::run(cmd)),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

fn server(args: ServerArgs) -> anyhow::Result<()> {
    // Job files are checked before anything starts: a bad one names its key and line.
    let mut specs = Vec::new();
    for path in &args.jobs {
        match rill_jobs::jobfile::load(path) {
            Ok(spec) => specs.push(spec),
            Err(e) => {
                eprintln!("rill server: {e}");
                std::process::exit(2);
            }
        }
    }
    let data_dir = args.data_dir.clone();
    let mut server = rill_server::Server::new(rill_server::ServerConfig {
        bind: args.bind,
        port: args.port,
        http_port: Some(args.http_port),
        data_dir: args.data_dir,
        max_connections: args.max_connections,
        memory_high_watermark: args.memory_high_watermark,
        disk_free_limit: args.disk_free_limit,
        sync: match args.sync_interval_ms {
            0 => rill_store::SyncPolicy::Always,
            ms => rill_store::SyncPolicy::Interval(std::time::Duration::from_millis(ms)),
        },
    });
    for spec in specs {
        server = server.job(Box::new(rill_jobs::runner::EmbeddedJobRun::from_spec(
            &spec, &data_dir,
        )));
    }
    Ok(server.run_blocking()?)
}
