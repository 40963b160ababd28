//! The management HTTP API, compatible with RabbitMQ 3.10's management plugin: the same
//! paths, status codes and JSON field names, so that `curl` scripts, dashboards and tools
//! written for RabbitMQ read Rill unchanged.
//!
//! Layers: [`auth`] checks HTTP basic credentials against the broker's users (and that the
//! user may use the management API at all, as RabbitMQ's tags decide); [`api`] answers each
//! path from the broker's state, read without holding any lock across an await; [`rates`]
//! samples the broker's counters every few seconds, as RabbitMQ's statistics collector
//! does, for the `_details.rate` figures; [`json`] turns AMQP field tables into JSON as
//! RabbitMQ does.
//!
//! Served so far: reading `/api/overview`, `/api/whoami`, `/api/vhosts[/{vhost}]`,
//! `/api/queues[/{vhost}[/{name}]]`, `/api/queues/{vhost}/{name}/bindings`,
//! `/api/exchanges[/{vhost}[/{name}]]`, `/api/bindings[/{vhost}[/e/{x}/{q|e}/{d}[/{props}]]]`;
//! creating and deleting queues, exchanges and bindings, and purging queues ([`write`]).
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let broker = rill_broker::Broker::new(rill_broker::BrokerConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:15672").await?;
//! rill_http::serve(listener, broker, None, std::future::pending()).await
//! # }
//! ```

pub mod actions;
pub mod api;
pub mod auth;
pub mod definitions;
pub mod health;
pub mod json;
pub mod rates;
pub mod users;
pub mod write;

use rill_broker::Broker;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    pub rates: Arc<rates::Rates>,
    /// The node's name, as RabbitMQ's `node` fields show it.
    pub node: Arc<str>,
    /// Where the HTTP listener is, for `/api/overview`'s listeners.
    pub http: Option<SocketAddr>,
    /// Where the AMQP listener is (listeners, the port-listener health check).
    pub amqp: Option<SocketAddr>,
}

impl AppState {
    pub fn new(broker: Broker, http: Option<SocketAddr>) -> AppState {
        AppState {
            broker,
            rates: Arc::new(rates::Rates::default()),
            node: node_name().into(),
            http,
            amqp: None,
        }
    }
}

/// `rill@<host>`, as RabbitMQ's `rabbit@<host>`.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("rill@{host}")
}

/// How often counters are sampled for rates (RabbitMQ's `collect_statistics_interval`).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// The API's routes over `state`.
pub fn router(state: AppState) -> axum::Router {
    api::routes().with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, sampling rates meanwhile.
/// `amqp` is where the broker's AMQP listener is, if it has one.
pub async fn serve(
    listener: tokio::net::TcpListener,
    broker: Broker,
    amqp: Option<SocketAddr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut state = AppState::new(broker, listener.local_addr().ok());
    state.amqp = amqp;
    let sampler = tokio::spawn(rates::sample_forever(
        state.broker.clone(),
        state.rates.clone(),
        SAMPLE_INTERVAL,
    ));
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sampler.abort();
    served
}
