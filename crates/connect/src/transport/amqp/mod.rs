//! AMQP 0-9-1 over TCP with lapin: [`AmqpSource`] and [`AmqpSink`], which behave as the
//! in-process transport ([`super::embedded`]) does, against any broker, and outlive the
//! broker going away.
//!
//! # Threads
//! A transport is polled from a timely worker, which must never block, while lapin is async.
//! Each transport therefore has a task on the connectors' tokio runtime (see `runtime`) that
//! owns its connection, and the two sides meet in a small shared state under a lock
//! (deliveries, confirmation progress, the depth figure, a fatal error) plus a command
//! channel towards the task (settlements, "there is something to publish", close). The task
//! calls the owner's [`Waker`] when it changed something the owner polls. Only `start` and
//! `close` wait for the task, each bounded by a timeout in [`AmqpOptions`].
//!
//! # Connection life
//! ```text
//! start ──► connecting ──refused (403, 530, 404 Existing...)──► start returns the refusal
//!              │   └─unreachable, timed out──► backoff, again, until start_timeout: Connection error
//!              ▼
//!           serving ──close──► connection.close, done
//!              │   └─refused for good (queue deleted, 406...)──► failed: poll returns the error
//!              ▼ connection or channel lost
//!           reconnecting (backoff 100 ms doubling to 5 s, forever, one warning per attempt)
//!              │   └─refused for good──► failed
//!              └──► serving, under generation + 1
//! ```
//! A source that reconnects tags its deliveries with the next generation: the broker
//! requeued what the old connection held, so those come back redelivered, and settlements
//! carrying the old generation are dropped. A sink republishes everything unconfirmed on the
//! new channel (`Unconfirmed::reset`).

use super::QueueSetup;
use crate::error::ConnectError;
use crate::message::DeliveryTag;
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use std::future::Future;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

/// Deliveries handed over to the worker with one lock and one wake-up, at most.
const DELIVERY_BATCH: usize = 256;

/// Timeouts and backoff of the TCP transports.
///
/// ```
/// use rill_connect::transport::amqp::AmqpOptions;
/// use std::time::Duration;
///
/// // Give up quickly on a broker that is not there at all.
/// let options = AmqpOptions {
///     start_timeout: Duration::from_secs(2),
///     ..AmqpOptions::default()
/// };
/// assert_eq!(options.backoff_max, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// How long `start` keeps trying a broker it cannot reach (connection refused, no
    /// answer) before it returns [`ConnectError::Connection`]. Refusals by the broker are
    /// returned at once.
    pub start_timeout: Duration,
    /// One attempt: TCP connect, handshake and queue setup.
    pub attempt_timeout: Duration,
    /// First pause between attempts; it doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often a source refreshes its queue depth and a transport checks its connection
    /// when nothing else would notice it closing.
    pub refresh_interval: Duration,
    /// How long `close` waits for connection.close-ok.
    pub close_timeout: Duration,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            start_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(1),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// The connectors' tokio runtime, shared by every TCP transport of the process.
///
/// One for all rather than one per transport: lapin drives each connection's socket on a
/// thread of its own, so what runs here is light (moving deliveries into the shared state,
/// awaiting confirms, backoff timers), and a runtime per source or sink would only add idle
/// threads. Two workers, so a busy source converting deliveries does not delay the others'
/// acks and confirms. Created on first use; it lives as long as the process.
fn runtime() -> Result<&'static tokio::runtime::Runtime, ConnectError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("rill-amqp")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ConnectError::Config(format!("starting the AMQP connectors' runtime: {e}")))
}

/// From the owner to its transport's task.
#[derive(Debug)]
enum Cmd {
    /// `basic.ack(multiple)` up to this delivery.
    Ack(DeliveryTag),
    /// `basic.nack(requeue=false)` of this delivery.
    Reject(DeliveryTag),
    /// The sink has new messages to publish.
    Kick,
    /// Close the connection, then answer.
    Close(SyncSender<()>),
}

/// Why an attempt or an operation failed, by what to do about it.
#[derive(Debug)]
enum Failure {
    /// The connection or channel is gone, or the broker is restarting: connect again.
    Retry(String),
    /// The broker refused something it will refuse again (or lapin cannot go on).
    Fatal(ConnectError),
}

/// Sorts a lapin error: broker refusals by their reply code ([`ConnectError::is_retryable`]),
/// everything else by whether a new connection can help.
fn classify(what: &str, e: &lapin::Error) -> Failure {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
        let err = ConnectError::refused_code(what, amqp.get_id(), amqp.get_message().as_str());
        return if err.is_retryable() {
            Failure::Retry(err.to_string())
        } else {
            Failure::Fatal(err)
        };
    }
    if e.can_be_recovered() {
        Failure::Retry(format!("{what}: {e}"))
    } else {
        Failure::Fatal(ConnectError::Connection {
            what: what.to_owned(),
            detail: e.to_string(),
        })
    }
}

/// A name the broker takes as a short string (at most 255 bytes).
fn short(name: &str, what: &str) -> Result<ShortString, ConnectError> {
    ShortString::try_new(name).map_err(|e| ConnectError::Config(format!("{what} '{name}': {e}")))
}

/// Where to connect, and how to name it in messages (without the password).
struct Endpoint {
    uri: AMQPUri,
    shown: String,
    /// `connection_name` client property, as management UIs show it.
    name: String,
}

impl Endpoint {
    fn parse(uri: &str, name: String) -> Result<Endpoint, ConnectError> {
        let parsed: AMQPUri = uri
            .parse()
            .map_err(|e: String| ConnectError::Config(format!("bad AMQP URI: {e}")))?;
        if parsed.scheme == lapin::uri::AMQPScheme::AMQPS {
            // Said now rather than after start_timeout of failing connection attempts.
            return Err(ConnectError::Config(
                "amqps:// is not supported: the workspace builds lapin without TLS".into(),
            ));
        }
        let shown = format!(
            "amqp://{}@{}:{}/{}",
            parsed.authority.userinfo.username,
            parsed.authority.host,
            parsed.authority.port,
            parsed.vhost.replace('%', "%25").replace('/', "%2f")
        );
        Ok(Endpoint {
            uri: parsed,
            shown,
            name,
        })
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        // lapin's own recovery stays off (the default): reconnecting here is ours, because
        // what a new connection must do (generations, setup semantics, republishing) is.
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.clone().into());
        Connection::connect_uri(self.uri.clone(), properties)
            .await
            .map_err(|e| classify(&format!("connecting to {}", self.shown), &e))
    }
}

/// Declares or checks `queue` as `setup` says, on `channel`. A refused passive declare closes
/// its channel, so this returns the channel to go on with, and the queue's message count.
async fn setup_queue(
    conn: &Connection,
    channel: Channel,
    queue: &ShortString,
    setup: &QueueSetup,
) -> Result<(Channel, u32), Failure> {
    let what = format!("queue '{queue}'");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let err = match channel
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await
    {
        Ok(q) => return Ok((channel, q.message_count())),
        Err(e) => e,
    };
    let missing = matches!(err.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404);
    match setup {
        // Declared only when missing: an existing queue is used as it is, whatever its
        // properties (declaring it again with others would be refused with 406).
        QueueSetup::DeclareIfMissing { durable, arguments } if missing => {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| classify(&what, &e))?;
            let options = QueueDeclareOptions {
                durable: *durable,
                ..QueueDeclareOptions::default()
            };
            let q = channel
                .queue_declare(queue.clone(), options, arguments.clone())
                .await
                .map_err(|e| classify(&what, &e))?;
            Ok((channel, q.message_count()))
        }
        _ => Err(classify(&what, &err)),
    }
}

/// Closes a connection politely, bounded: the broker requeues what a source held at once
/// rather than when it notices the socket is gone.
async fn close_connection(conn: &Connection, limit: Duration) {
    let _ = timeout(limit, conn.close(200, "OK".into())).await;
}

/// Lets a broken session's connection go without waiting for it (it may be dead, or alive
/// with a channel the broker closed).
fn abandon(conn: Connection, limit: Duration) {
    tokio::spawn(async move { close_connection(&conn, limit).await });
}

/// Pauses between attempts: doubling from `backoff_initial` to `backoff_max`.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(opts: &AmqpOptions) -> Backoff {
        Backoff {
            initial: opts.backoff_initial,
            max: opts.backoff_max,
            next: opts.backoff_initial,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// How a connected session ended.
#[derive(Debug)]
enum Ended {
    /// The owner closed the transport (or dropped it: the command channel is gone).
    Closed(Option<SyncSender<()>>),
    /// Connect again.
    Broken(String),
    /// Report to the owner and stop.
    Failed(ConnectError),
}

impl From<Failure> for Ended {
    fn from(f: Failure) -> Ended {
        match f {
            Failure::Retry(reason) => Ended::Broken(reason),
            Failure::Fatal(e) => Ended::Failed(e),
        }
    }
}

/// Connects for `start`: again after failures that a broker coming up would explain, until
/// `start_timeout`; refusals end it at once.
async fn first_connect<S, F, Fut>(
    what: &str,
    opts: &AmqpOptions,
    open: F,
) -> Result<S, ConnectError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, Failure>>,
{
    let deadline = Instant::now() + opts.start_timeout;
    let mut backoff = Backoff::new(opts);
    loop {
        let reason = match timeout(opts.attempt_timeout, open()).await {
            Ok(Ok(session)) => return Ok(session),
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry(reason))) => reason,
            Err(_) => format!("no answer within {:?}", opts.attempt_timeout),
        };
        let delay = backoff.next();
        if Instant::now() + delay >= deadline {
            return Err(ConnectError::Connection {
                what: what.to_owned(),
                detail: format!("{reason} (gave up after {:?})", opts.start_timeout),
            });
        }
        tracing::warn!("{what}: {reason}; trying again in {delay:?}");
        sleep(delay).await;
    }
}

/// What reconnecting came to.
enum Reconnected<S> {
    Session(S),
    Closed(Option<SyncSender<()>>),
    Failed(ConnectError),
}

/// Connects again after a lost connection: forever, with backoff, one warning per attempt;
/// the owner can still close meanwhile. Settlements that arrive meanwhile are dropped (they
/// are for deliveries the broker has requeued); a sink's messages wait in its
/// [`Unconfirmed`].
async fn reconnect<S, F, Fut>(
    what: &str,
    opts: &AmqpOptions,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    mut reason: String,
    open: F,
) -> Reconnected<S>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, Failure>>,
{
    let mut backoff = Backoff::new(opts);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let delay = backoff.next();
        tracing::warn!(attempt, "{what}: {reason}; reconnecting in {delay:?}");
        let try_once = async {
            sleep(delay).await;
            timeout(opts.attempt_timeout, open()).await
        };
        tokio::pin!(try_once);
        let outcome = loop {
            tokio::select! {
                out = &mut try_once => break out,
                cmd = cmds.recv() => match cmd {
                    None => return Reconnected::Closed(None),
                    Some(Cmd::Close(reply)) => return Reconnected::Closed(Some(reply)),
                    Some(_) => {}
                },
            }
        };
        match outcome {
            Ok(Ok(session)) => {
                tracing::info!(attempt, "{what}: reconnected");
                return Reconnected::Session(session);
            }
            Ok(Err(Failure::Fatal(e))) => return Reconnected::Failed(e),
            Ok(Err(Failure::Retry(r))) => reason = r,
            Err(_) => reason = format!("no answer within {:?}", opts.attempt_timeout),
        }
    }
}

/// Starts a transport's task: `open` is tried as [`first_connect`] says while the calling
/// thread (the job's, before it runs) waits; then `serve` goes on with the session in the
/// background, taking commands from the returned sender.
fn launch<S, O, OFut, R, RFut>(
    what: &str,
    opts: &AmqpOptions,
    open: O,
    serve: R,
) -> Result<mpsc::UnboundedSender<Cmd>, ConnectError>
where
    S: Send + 'static,
    O: Fn() -> OFut + Send + 'static,
    OFut: Future<Output = Result<S, Failure>> + Send,
    R: FnOnce(S, mpsc::UnboundedReceiver<Cmd>) -> RFut + Send + 'static,
    RFut: Future<Output = ()> + Send,
{
    let rt = runtime()?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (started_tx, started_rx) = sync_channel(1);
    let (task_what, task_opts) = (what.to_owned(), opts.clone());
    rt.spawn(async move {
        match first_connect(&task_what, &task_opts, open).await {
            // If `start` gave up waiting, nobody owns the session: dropping it closes it.
            Ok(session) => {
                if started_tx.send(Ok(())).is_ok() {
                    serve(session, cmd_rx).await;
                }
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
        }
    });
    // first_connect stops by itself within start_timeout plus one attempt; this bound only
    // guards against a stuck runtime.
    let limit = opts.start_timeout + opts.attempt_timeout + Duration::from_secs(1);
    match started_rx.recv_timeout(limit) {
        Ok(Ok(())) => Ok(cmd_tx),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnectError::Connection {
            what: what.to_owned(),
            detail: format!("not connected within {limit:?}"),
        }),
    }
}

/// Sends a command to a transport's task; if the task has stopped, says why.
fn command(
    cmds: &mpsc::UnboundedSender<Cmd>,
    cmd: Cmd,
    failed: impl FnOnce() -> Option<ConnectError>,
    what: &str,
) -> Result<(), ConnectError> {
    cmds.send(cmd).map_err(|_| {
        failed().unwrap_or_else(|| ConnectError::Connection {
            what: what.to_owned(),
            detail: "the transport is closed".into(),
        })
    })
}

/// Asks the task to close the connection and waits for it, bounded.
fn close_task(
    cmds: &mpsc::UnboundedSender<Cmd>,
    close_timeout: Duration,
    what: &str,
) -> Result<(), ConnectError> {
    let (tx, rx) = sync_channel(1);
    if cmds.send(Cmd::Close(tx)).is_err() {
        // The task already ended (it failed and closed, or start never finished).
        return Ok(());
    }
    let limit = close_timeout + Duration::from_secs(1);
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ConnectError::Connection {
            what: what.to_owned(),
            detail: format!("closing took longer than {limit:?}"),
        }),
    }
}

mod sink;
mod source;
#[cfg(test)]
mod tests;

pub use sink::AmqpSink;
pub use source::AmqpSource;
