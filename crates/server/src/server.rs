//! Listener, connection cap, signals and shutdown.

use crate::conn;
use crate::jobs::EmbeddedJob;
use rill_broker::{Broker, BrokerConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Semaphore};

/// How the broker process listens and where it keeps data.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: IpAddr,
    pub port: u16,
    /// The management HTTP API's port (on `bind`), if it is served.
    pub http_port: Option<u16>,
    pub data_dir: PathBuf,
    /// Connections beyond this wait in the accept backlog.
    pub max_connections: usize,
    /// Fraction of RAM at which publishers are blocked.
    pub memory_high_watermark: f64,
    /// Free bytes below which publishers are blocked.
    pub disk_free_limit: u64,
    /// When persistent messages are fsynced before they are confirmed.
    pub sync: rill_store::SyncPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
    #[error("cannot open the broker's data: {0}")]
    Store(#[from] rill_store::StoreError),
}

/// How long connections get to finish their close handshake at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Starts a runtime and serves until SIGINT or SIGTERM.
pub fn run_blocking(config: ServerConfig) -> Result<(), ServerError> {
    Server::new(config).run_blocking()
}

/// The broker process: its configuration and the jobs it runs inside.
///
/// ```no_run
/// # fn job() -> Box<dyn rill_server::EmbeddedJob> { unimplemented!() }
/// let config = rill_server::ServerConfig {
///     bind: "127.0.0.1".parse().unwrap(),
///     port: 5672,
///     http_port: Some(15672),
///     data_dir: "./rill-data".into(),
///     max_connections: 65_536,
///     memory_high_watermark: 0.4,
///     disk_free_limit: 50_000_000,
///     sync: rill_store::SyncPolicy::Always,
/// };
/// rill_server::Server::new(config).job(job()).run_blocking().unwrap();
/// ```
pub struct Server {
    config: ServerConfig,
    jobs: Vec<Box<dyn EmbeddedJob>>,
}

impl Server {
    pub fn new(config: ServerConfig) -> Server {
        Server {
            config,
            jobs: Vec::new(),
        }
    }

    /// Attaches a job: started once the data directory is recovered, stopped (and waited for)
    /// before connections close at shutdown.
    pub fn job(mut self, job: Box<dyn EmbeddedJob>) -> Server {
        self.jobs.push(job);
        self
    }

    /// Starts a runtime and serves until SIGINT or SIGTERM.
    pub fn run_blocking(self) -> Result<(), ServerError> {
        let Server { config, jobs } = self;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        check_writable(&config.data_dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("rill-io")
            .build()
            .map_err(ServerError::Runtime)?;
        runtime.block_on(async move {
            let addr = SocketAddr::new(config.bind, config.port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            // Both ports are taken before anything starts: a port in use is a clear error.
            let http = match config.http_port {
                Some(port) => {
                    let addr = SocketAddr::new(config.bind, port);
                    let l = TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind { addr, source })?;
                    Some(l)
                }
                None => None,
            };
            tracing::info!(%addr, data_dir = %config.data_dir.display(), "rill broker listening");
            let addr_amqp = listener.local_addr().unwrap_or(addr);
            let started = std::time::Instant::now();
            let broker = Broker::open(BrokerConfig::default(), &config.data_dir, config.sync)?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "data directory loaded"
            );
            // Message TTLs and x-expires: a few ticks a second keep expiry within ~25 ms.
            let ticking = broker.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(25));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    ticking.tick();
                }
            });
            tokio::spawn(crate::alarms::watch(
                broker.clone(),
                crate::alarms::AlarmConfig {
                    memory_high_watermark: config.memory_high_watermark,
                    disk_free_limit: config.disk_free_limit,
                    data_dir: config.data_dir.clone(),
                },
            ));
            if let Some(listener) = http {
                let addr = listener.local_addr().ok();
                tracing::info!(addr = ?addr, "management HTTP API listening");
                let broker = broker.clone();
                let amqp = Some(addr_amqp);
                // Ends with the runtime, after the AMQP listener.
                tokio::spawn(async move {
                    if let Err(e) =
                        rill_http::serve(listener, broker, amqp, std::future::pending()).await
                    {
                        tracing::error!(error = %e, "the management HTTP API stopped");
                    }
                });
            }
            let running = crate::jobs::start_all(jobs, &broker);
            let stop_jobs = async move {
                shutdown_signal().await;
                if !running.is_empty() {
                    tracing::info!(jobs = running.len(), "shutting down: stopping jobs");
                    let _ =
                        tokio::task::spawn_blocking(move || crate::jobs::stop_all(running)).await;
                }
            };
            serve(listener, broker, config.max_connections, stop_jobs).await
        })
    }
}

fn check_writable(dir: &std::path::Path) -> Result<(), ServerError> {
    let probe = dir.join(".rill-write-probe");
    std::fs::write(&probe, b"ok")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| ServerError::DataDir {
            path: dir.to_path_buf(),
            source,
        })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the broker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Accepts connections until `shutdown` completes, then closes every connection with
/// 320 CONNECTION_FORCED and waits (bounded) for them to finish.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let (stop_tx, _) = broadcast::channel::<()>(1);
    // Each connection task holds a clone; when all are dropped, recv() returns None.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let broker = broker.clone();
        let stop = stop_tx.subscribe();
        let done = done_tx.clone();
        tokio::spawn(async move {
            conn::run(socket, peer, broker, stop).await;
            drop(permit);
            drop(done);
        });
    }
    tracing::info!("shutting down: closing connections");
    drop(listener);
    let _ = stop_tx.send(());
    drop(done_tx);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv()).await;
    tracing::info!("stopped");
    Ok(())
}
