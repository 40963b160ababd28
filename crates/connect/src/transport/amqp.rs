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

use super::unconfirmed::Unconfirmed;
use super::{ConsumeSpec, PublishSpec, QueueSetup, SinkTransport, SourceTransport, Waker};
use crate::error::ConnectError;
use crate::message::{Content, DeliveryTag, Incoming, Outgoing};
use bytes::Bytes;
use futures_lite::future::poll_once;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};
use parking_lot::Mutex;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{interval, sleep, sleep_until, timeout, Instant, MissedTickBehavior};

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

// ---------------------------------------------------------------------------------------
// Source

/// What the source's task hands its owner. A lock because the worker drains it while a
/// runtime thread fills it; each side holds it for one push or drain, never across an await.
#[derive(Debug, Default)]
struct SourceShared {
    /// Deliveries not polled yet, in delivery order.
    deliveries: VecDeque<Incoming>,
    /// Generation of the current connection.
    generation: u32,
    depth: Option<u64>,
    failed: Option<ConnectError>,
    /// Consumer arguments for the next (re)connection, when the owner changed them (a
    /// stream reader resumes after the last offset it emitted).
    resume_arguments: Option<FieldTable>,
}

struct SourceCtx {
    what: String,
    endpoint: Endpoint,
    queue: ShortString,
    setup: QueueSetup,
    prefetch: u16,
    arguments: FieldTable,
    opts: AmqpOptions,
    shared: Arc<Mutex<SourceShared>>,
    waker: Waker,
}

impl SourceCtx {
    fn fail(&self, e: ConnectError) {
        {
            let mut s = self.shared.lock();
            s.deliveries.clear();
            s.failed = Some(e);
        }
        (self.waker)();
    }
}

struct SourceSession {
    conn: Connection,
    /// Consumes.
    channel: Channel,
    /// Declares (setup, the depth refresh): a refused one closes this channel, not the
    /// consumer's.
    control: Channel,
    consumer: Consumer,
}

impl SourceSession {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

async fn open_source(ctx: &SourceCtx) -> Result<SourceSession, Failure> {
    let conn = ctx.endpoint.connect().await?;
    let what = format!("consuming from queue '{}'", ctx.queue);
    let control = conn
        .create_channel()
        .await
        .map_err(|e| classify(&what, &e))?;
    let (control, depth) = setup_queue(&conn, control, &ctx.queue, &ctx.setup).await?;
    // Before `start` returns (this runs inside it the first time).
    ctx.shared.lock().depth = Some(u64::from(depth));
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| classify(&what, &e))?;
    channel
        .basic_qos(ctx.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|e| classify(&what, &e))?;
    let arguments = ctx
        .shared
        .lock()
        .resume_arguments
        .clone()
        .unwrap_or_else(|| ctx.arguments.clone());
    let consumer = channel
        .basic_consume(
            ctx.queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| classify(&what, &e))?;
    Ok(SourceSession {
        conn,
        channel,
        control,
        consumer,
    })
}

/// The source's task: serve, reconnect under the next generation, serve...
async fn run_source(
    ctx: Arc<SourceCtx>,
    mut session: SourceSession,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut generation: u32 = 0;
    loop {
        let reason = match serve_source(&ctx, &mut session, generation, &mut cmds).await {
            Ended::Closed(reply) => {
                close_connection(&session.conn, ctx.opts.close_timeout).await;
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            Ended::Failed(e) => {
                ctx.fail(e);
                close_connection(&session.conn, ctx.opts.close_timeout).await;
                return;
            }
            Ended::Broken(reason) => reason,
        };
        generation = generation.wrapping_add(1);
        {
            // What was not polled yet cannot be settled any more; the broker has requeued
            // it and delivers it again on the new connection.
            let mut s = ctx.shared.lock();
            s.generation = generation;
            s.deliveries.clear();
        }
        abandon(session.conn, ctx.opts.close_timeout);
        session = match reconnect(&ctx.what, &ctx.opts, &mut cmds, reason, || {
            open_source(&ctx)
        })
        .await
        {
            Reconnected::Session(s) => s,
            Reconnected::Closed(reply) => {
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            Reconnected::Failed(e) => {
                ctx.fail(e);
                return;
            }
        };
    }
}

/// Aborts a task when dropped (a session's helpers end with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refreshes the depth figure with a passive declare every period, on the control channel.
/// A failure ends the session through `report` (a 404 means the queue was deleted).
async fn refresh_depth(
    control: Channel,
    queue: ShortString,
    every: Duration,
    shared: Arc<Mutex<SourceShared>>,
    report: oneshot::Sender<Failure>,
) {
    let what = format!("checking queue '{queue}'");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        sleep(every).await;
        match timeout(
            every,
            control.queue_declare(queue.clone(), passive, FieldTable::default()),
        )
        .await
        {
            Ok(Ok(q)) => shared.lock().depth = Some(u64::from(q.message_count())),
            Ok(Err(e)) => {
                let _ = report.send(classify(&what, &e));
                return;
            }
            // A broker too busy to answer within a period: keep the last figure.
            Err(_) => {}
        }
    }
}

/// One connection's worth of consuming.
async fn serve_source(
    ctx: &SourceCtx,
    session: &mut SourceSession,
    generation: u32,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Ended {
    let (report_tx, mut report_rx) = oneshot::channel();
    let _refresher = AbortOnDrop(tokio::spawn(refresh_depth(
        session.control.clone(),
        ctx.queue.clone(),
        ctx.opts.refresh_interval,
        ctx.shared.clone(),
        report_tx,
    )));
    let mut refresher_done = false;
    // Delivered and not settled yet, so that settlements are idempotent: a second ack of
    // the same tag, or an ack of a tag already rejected, would make the broker close the
    // channel with 406.
    let mut unsettled = BTreeSet::new();
    let mut tick = interval(ctx.opts.refresh_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return Ended::Closed(None) };
                batch.push(cmd);
                while let Ok(more) = cmds.try_recv() {
                    batch.push(more);
                }
                if let Err(end) =
                    settle(&session.channel, generation, &mut unsettled, &mut batch).await
                {
                    return end;
                }
            }
            next = session.consumer.next() => {
                let mut got = Vec::new();
                let mut end = None;
                match next {
                    Some(Ok(d)) => got.push(d),
                    Some(Err(e)) => end = Some(classify("consuming", &e).into()),
                    None => end = Some(consumer_ended(ctx, session)),
                }
                // Take what else has arrived, without waiting.
                while end.is_none() && got.len() < DELIVERY_BATCH {
                    match poll_once(session.consumer.next()).await {
                        Some(Some(Ok(d))) => got.push(d),
                        Some(Some(Err(e))) => end = Some(classify("consuming", &e).into()),
                        Some(None) => end = Some(consumer_ended(ctx, session)),
                        None => break,
                    }
                }
                if !got.is_empty() {
                    deliver(ctx, generation, &mut unsettled, got);
                }
                if let Some(end) = end {
                    return end;
                }
            }
            failure = &mut report_rx, if !refresher_done => {
                refresher_done = true;
                if let Ok(failure) = failure {
                    return failure.into();
                }
            }
            _ = tick.tick() => {
                if !session.alive() {
                    return Ended::Broken("the connection closed".into());
                }
            }
        }
    }
}

/// The consumer stream ended without an error: either the connection is closing, or the
/// broker cancelled the consumer (the queue was deleted), which no reconnection undoes.
fn consumer_ended(ctx: &SourceCtx, session: &SourceSession) -> Ended {
    if session.alive() {
        Ended::Failed(ConnectError::refused_code(
            format!("consuming from queue '{}'", ctx.queue),
            404,
            "the broker cancelled the consumer: the queue was deleted",
        ))
    } else {
        Ended::Broken("the connection closed".into())
    }
}

fn deliver(ctx: &SourceCtx, generation: u32, unsettled: &mut BTreeSet<u64>, got: Vec<Delivery>) {
    let incoming: Vec<Incoming> = got
        .into_iter()
        .map(|d| {
            unsettled.insert(d.delivery_tag);
            Incoming {
                tag: DeliveryTag {
                    generation,
                    tag: d.delivery_tag,
                },
                redelivered: d.redelivered,
                content: Content::Remote {
                    exchange: d.exchange.into(),
                    routing_key: d.routing_key.into(),
                    properties: Box::new(d.properties),
                    body: Bytes::from(d.data),
                },
            }
        })
        .collect();
    ctx.shared.lock().deliveries.extend(incoming);
    (ctx.waker)();
}

/// Carries out settlements in order, merging consecutive acks into one `multiple` ack.
/// `Err` ends the session (a close among the commands, or a failure).
async fn settle(
    channel: &Channel,
    generation: u32,
    unsettled: &mut BTreeSet<u64>,
    batch: &mut Vec<Cmd>,
) -> Result<(), Ended> {
    let mut ack_upto: Option<u64> = None;
    for cmd in batch.drain(..) {
        match cmd {
            Cmd::Ack(tag) if tag.generation == generation => {
                ack_upto = ack_upto.max(Some(tag.tag));
            }
            Cmd::Reject(tag) if tag.generation == generation => {
                if let Some(upto) = ack_upto.take() {
                    ack(channel, unsettled, upto).await?;
                }
                if unsettled.remove(&tag.tag) {
                    let requeue = BasicNackOptions {
                        multiple: false,
                        requeue: false,
                    };
                    channel
                        .basic_nack(tag.tag, requeue)
                        .await
                        .map_err(|e| Ended::from(classify("rejecting a delivery", &e)))?;
                }
            }
            Cmd::Close(reply) => {
                if let Some(upto) = ack_upto.take() {
                    ack(channel, unsettled, upto).await?;
                }
                return Err(Ended::Closed(Some(reply)));
            }
            // Settlements of an earlier connection's deliveries: the broker requeued them.
            Cmd::Ack(_) | Cmd::Reject(_) | Cmd::Kick => {}
        }
    }
    if let Some(upto) = ack_upto {
        ack(channel, unsettled, upto).await?;
    }
    Ok(())
}

/// Acks everything unsettled up to `upto`, naming the highest such tag (the broker refuses
/// a `multiple` ack whose own tag is already settled).
async fn ack(channel: &Channel, unsettled: &mut BTreeSet<u64>, upto: u64) -> Result<(), Ended> {
    let Some(&last) = unsettled.range(..=upto).next_back() else {
        return Ok(());
    };
    *unsettled = unsettled.split_off(&(last + 1));
    channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| Ended::from(classify("acknowledging deliveries", &e)))
}

/// Consumes one queue of a broker over TCP, reconnecting when the connection is lost.
///
/// ```no_run
/// use rill_connect::transport::amqp::AmqpSource;
/// use rill_connect::transport::{ConsumeSpec, QueueSetup, SourceTransport};
/// use std::sync::Arc;
///
/// let spec = ConsumeSpec {
///     queue: "orders".into(),
///     setup: QueueSetup::Existing,
///     prefetch: 100,
///     arguments: Default::default(),
/// };
/// let mut source =
///     AmqpSource::start("amqp://guest:guest@127.0.0.1:5672/%2f", &spec, Arc::new(|| {}))?;
/// let mut got = Vec::new();
/// source.poll(&mut got)?;
/// if let Some(last) = got.last() {
///     source.ack_upto(last.tag)?;
/// }
/// source.close()?;
/// # Ok::<(), rill_connect::ConnectError>(())
/// ```
pub struct AmqpSource {
    what: String,
    shared: Arc<Mutex<SourceShared>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    close_timeout: Duration,
    closed: bool,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Connects to `uri` (`amqp://user:pass@host:port/vhost`), sets the queue up as
    /// `spec.setup` says, and starts consuming with `spec.prefetch`; with the default
    /// [`AmqpOptions`]. Blocks until then.
    pub fn start(uri: &str, spec: &ConsumeSpec, waker: Waker) -> Result<AmqpSource, ConnectError> {
        AmqpSource::start_with(uri, spec, waker, &AmqpOptions::default())
    }

    /// [`AmqpSource::start`] with other timeouts.
    pub fn start_with(
        uri: &str,
        spec: &ConsumeSpec,
        waker: Waker,
        options: &AmqpOptions,
    ) -> Result<AmqpSource, ConnectError> {
        let what = format!("AMQP source of queue '{}'", spec.queue);
        let shared = Arc::new(Mutex::new(SourceShared::default()));
        let ctx = Arc::new(SourceCtx {
            what: what.clone(),
            endpoint: Endpoint::parse(uri, format!("rill source '{}'", spec.queue))?,
            queue: short(&spec.queue, "queue")?,
            setup: spec.setup.clone(),
            prefetch: spec.prefetch,
            arguments: spec.arguments.clone(),
            opts: options.clone(),
            shared: shared.clone(),
            waker,
        });
        let open_ctx = ctx.clone();
        let cmds = launch(
            &what,
            options,
            move || {
                let ctx = open_ctx.clone();
                async move { open_source(&ctx).await }
            },
            move |session, cmds| run_source(ctx, session, cmds),
        )?;
        Ok(AmqpSource {
            what,
            shared,
            cmds,
            close_timeout: options.close_timeout,
            closed: false,
        })
    }

    /// The current connection's generation (0, then one more per reconnection).
    pub fn generation(&self) -> u32 {
        self.shared.lock().generation
    }

    fn settle(&self, cmd: Cmd) -> Result<(), ConnectError> {
        command(
            &self.cmds,
            cmd,
            || self.shared.lock().failed.clone(),
            &self.what,
        )
    }
}

impl SourceTransport for AmqpSource {
    fn poll(&mut self, out: &mut Vec<Incoming>) -> Result<(), ConnectError> {
        let mut s = self.shared.lock();
        if let Some(e) = &s.failed {
            return Err(e.clone());
        }
        out.extend(s.deliveries.drain(..));
        Ok(())
    }

    fn ack_upto(&mut self, tag: DeliveryTag) -> Result<(), ConnectError> {
        // The task checks the generation again: a reconnection may come in between.
        if tag.generation != self.generation() {
            return Ok(());
        }
        self.settle(Cmd::Ack(tag))
    }

    fn reject(&mut self, tag: DeliveryTag) -> Result<(), ConnectError> {
        if tag.generation != self.generation() {
            return Ok(());
        }
        self.settle(Cmd::Reject(tag))
    }

    /// Messages ready in the queue as of the last passive declare (at start, then every
    /// [`AmqpOptions::refresh_interval`]); unacked deliveries are not counted, as RabbitMQ
    /// reports it.
    fn queue_depth(&self) -> Option<u64> {
        self.shared.lock().depth
    }

    fn resume_with(&mut self, arguments: FieldTable) {
        self.shared.lock().resume_arguments = Some(arguments);
    }

    fn close(&mut self) -> Result<(), ConnectError> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        close_task(&self.cmds, self.close_timeout, &self.what)
    }
}

// ---------------------------------------------------------------------------------------
// Sink

/// What the sink and its task share. A lock because the worker publishes and polls while a
/// runtime thread sends and records confirms; each side holds it for a push, a batch of
/// marks or a read, never across an await.
#[derive(Debug)]
struct SinkShared {
    pending: Unconfirmed,
    /// A [`Cmd::Kick`] is on its way, so publishing sends one per batch, not per message.
    kicked: bool,
    failed: Option<ConnectError>,
}

struct SinkCtx {
    what: String,
    endpoint: Endpoint,
    exchange: ShortString,
    queue: Option<(ShortString, QueueSetup)>,
    opts: AmqpOptions,
    shared: Arc<Mutex<SinkShared>>,
    waker: Waker,
}

impl SinkCtx {
    fn fail(&self, e: ConnectError) {
        self.shared.lock().failed = Some(e);
        (self.waker)();
    }
}

struct SinkSession {
    conn: Connection,
    channel: Channel,
}

impl SinkSession {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

async fn open_sink(ctx: &SinkCtx) -> Result<SinkSession, Failure> {
    let conn = ctx.endpoint.connect().await?;
    let mut channel = conn
        .create_channel()
        .await
        .map_err(|e| classify("opening a channel", &e))?;
    if let Some((queue, setup)) = &ctx.queue {
        channel = setup_queue(&conn, channel, queue, setup).await?.0;
    }
    if !ctx.exchange.as_str().is_empty() {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        // A passive declare only checks that the exchange exists; the kind is not compared.
        channel
            .exchange_declare(
                ctx.exchange.clone(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(&format!("exchange '{}'", ctx.exchange), &e))?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| classify("enabling publisher confirms", &e))?;
    Ok(SinkSession { conn, channel })
}

/// A pause before publishing again after a nack, growing while the broker keeps refusing (a
/// full queue with `overflow=reject-publish` nacks everything) and back to the start after
/// an ack: a refusing broker is not flooded with the same messages.
struct NackHold {
    until: Option<Instant>,
    backoff: Backoff,
}

impl NackHold {
    fn nacked(&mut self, what: &str) {
        if self.until.is_none() {
            let pause = self.backoff.next();
            tracing::debug!(
                "{what}: the broker nacked publications; publishing again in {pause:?}"
            );
            self.until = Some(Instant::now() + pause);
        }
    }
}

/// The sink's task: serve, reset what was unconfirmed and reconnect, serve...
async fn run_sink(
    ctx: Arc<SinkCtx>,
    mut session: SinkSession,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut hold = NackHold {
        until: None,
        backoff: Backoff::new(&ctx.opts),
    };
    loop {
        let reason = match serve_sink(&ctx, &session, &mut hold, &mut cmds).await {
            Ended::Closed(reply) => {
                close_connection(&session.conn, ctx.opts.close_timeout).await;
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            Ended::Failed(e) => {
                ctx.fail(e);
                close_connection(&session.conn, ctx.opts.close_timeout).await;
                return;
            }
            Ended::Broken(reason) => reason,
        };
        // The new channel numbers its publishes from 1 again, and whatever the old one did
        // not confirm may or may not have reached the queue: all of it goes out again.
        ctx.shared.lock().pending.reset();
        abandon(session.conn, ctx.opts.close_timeout);
        session = match reconnect(&ctx.what, &ctx.opts, &mut cmds, reason, || open_sink(&ctx)).await
        {
            Reconnected::Session(s) => s,
            Reconnected::Closed(reply) => {
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            Reconnected::Failed(e) => {
                ctx.fail(e);
                return;
            }
        };
    }
}

/// A publication's outcome: the number it went out under on this channel, and its confirm.
type Confirmed = (u64, lapin::Result<Confirmation>);

/// One channel's worth of publishing.
async fn serve_sink(
    ctx: &SinkCtx,
    session: &SinkSession,
    hold: &mut NackHold,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Ended {
    // Dropped with the session: the old channel's confirms never reach the new numbering.
    let mut confirms: JoinSet<Confirmed> = JoinSet::new();
    let mut wire: u64 = 0;
    let mut tick = interval(ctx.opts.refresh_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Whether anything may wait to be sent: everything unconfirmed on a new channel, then
    // after kicks and after a nack pause. (Looking costs a pass over what is outstanding.)
    let mut look = true;
    loop {
        if look && hold.until.is_none() {
            look = false;
            if let Err(end) = send_unsent(ctx, &session.channel, &mut wire, &mut confirms).await {
                return end;
            }
        }
        let held_until = hold.until;
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return Ended::Closed(None),
                Some(Cmd::Close(reply)) => return Ended::Closed(Some(reply)),
                Some(_) => look = true,
            },
            Some(done) = confirms.join_next(), if !confirms.is_empty() => {
                let mut done = Some(done);
                let mut advanced = false;
                while let Some(d) = done {
                    match on_confirm(ctx, hold, d) {
                        Ok(a) => advanced |= a,
                        Err(end) => return end,
                    }
                    done = confirms.try_join_next();
                }
                if advanced {
                    (ctx.waker)();
                }
            }
            () = sleep_until(held_until.unwrap_or_else(Instant::now)), if held_until.is_some() => {
                hold.until = None;
                look = true;
            }
            _ = tick.tick() => {
                if !session.alive() {
                    return Ended::Broken("the connection closed".into());
                }
            }
        }
    }
}

/// Records one confirm; `Ok(true)` if the confirmed prefix grew.
fn on_confirm(
    ctx: &SinkCtx,
    hold: &mut NackHold,
    done: Result<Confirmed, JoinError>,
) -> Result<bool, Ended> {
    match done {
        Ok((wire, Ok(Confirmation::Ack(_)))) => {
            hold.backoff.reset();
            let mut s = ctx.shared.lock();
            let before = s.pending.confirmed_upto();
            // lapin resolves each publication's own confirm, `multiple` ones included.
            s.pending.acked(wire, false);
            Ok(s.pending.confirmed_upto() > before)
        }
        Ok((wire, Ok(Confirmation::Nack(_)))) => {
            ctx.shared.lock().pending.nacked(wire, false);
            hold.nacked(&ctx.what);
            Ok(false)
        }
        Ok((_, Ok(Confirmation::NotRequested))) => Err(Ended::Failed(ConnectError::Config(
            "the sink's channel is not in confirm mode".into(),
        ))),
        Ok((_, Err(e))) => Err(classify("publishing", &e).into()),
        Err(e) => Err(Ended::Broken(format!("awaiting a publisher confirm: {e}"))),
    }
}

/// Publishes everything waiting, in sink order.
async fn send_unsent(
    ctx: &SinkCtx,
    channel: &Channel,
    wire: &mut u64,
    confirms: &mut JoinSet<Confirmed>,
) -> Result<(), Ended> {
    let batch: Vec<(u64, Outgoing)> = {
        let mut s = ctx.shared.lock();
        s.kicked = false;
        let unsent: Vec<(u64, Outgoing)> = s
            .pending
            .unsent()
            .map(|(seq, m)| (seq, m.clone()))
            .collect();
        unsent
            .into_iter()
            .map(|(seq, msg)| {
                *wire += 1;
                s.pending.sent(seq, *wire);
                (*wire, msg)
            })
            .collect()
    };
    for (number, msg) in batch {
        let routing_key = ShortString::try_new(msg.routing_key)
            .map_err(|e| Ended::Failed(ConnectError::Config(format!("routing key: {e}"))))?;
        let (channel, exchange) = (channel.clone(), ctx.exchange.clone());
        let body = msg.body;
        let properties = msg.properties;
        let mut publish = Box::pin(async move {
            channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?
                .await
        });
        // The first poll hands the frames to lapin, in this loop's order, which is the
        // order the broker sees (and numbers) them in. Awaiting each publication instead
        // would wait for lapin's I/O thread to write it, once per message; spawning it
        // unpolled would let the runtime's two threads reorder messages.
        match poll_once(&mut publish).await {
            Some(Err(e)) => return Err(classify("publishing", &e).into()),
            Some(Ok(c)) => {
                confirms.spawn(std::future::ready((number, Ok(c))));
            }
            None => {
                confirms.spawn(async move { (number, publish.await) });
            }
        }
    }
    Ok(())
}

/// Publishes with confirms to a broker over TCP; what is not confirmed when the connection
/// is lost goes out again on the next one.
///
/// ```no_run
/// use rill_connect::message::Outgoing;
/// use rill_connect::transport::amqp::AmqpSink;
/// use rill_connect::transport::{PublishSpec, QueueSetup, SinkTransport};
/// use std::sync::Arc;
///
/// let spec = PublishSpec {
///     exchange: "".into(),
///     queue: Some(("results".into(), QueueSetup::durable())),
/// };
/// let mut sink = AmqpSink::start("amqp://guest:guest@127.0.0.1:5672/%2f", &spec, Arc::new(|| {}))?;
/// let seq = sink.publish(Outgoing {
///     exchange: "".into(),
///     routing_key: "results".into(),
///     properties: Default::default(),
///     body: "42".into(),
/// })?;
/// // Later, when woken:
/// if sink.poll_confirmed()? >= seq {
///     sink.close()?;
/// }
/// # Ok::<(), rill_connect::ConnectError>(())
/// ```
pub struct AmqpSink {
    what: String,
    shared: Arc<Mutex<SinkShared>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    close_timeout: Duration,
    closed: bool,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("what", &self.what)
            .field("outstanding", &self.outstanding())
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// Connects to `uri`, sets up `spec.queue` if any, checks that `spec.exchange` exists,
    /// and enables publisher confirms; with the default [`AmqpOptions`]. Blocks until then.
    pub fn start(uri: &str, spec: &PublishSpec, waker: Waker) -> Result<AmqpSink, ConnectError> {
        AmqpSink::start_with(uri, spec, waker, &AmqpOptions::default())
    }

    /// [`AmqpSink::start`] with other timeouts.
    pub fn start_with(
        uri: &str,
        spec: &PublishSpec,
        waker: Waker,
        options: &AmqpOptions,
    ) -> Result<AmqpSink, ConnectError> {
        let what = format!("AMQP sink to exchange '{}'", spec.exchange);
        let queue = match &spec.queue {
            Some((name, setup)) => Some((short(name, "queue")?, setup.clone())),
            None => None,
        };
        let shared = Arc::new(Mutex::new(SinkShared {
            pending: Unconfirmed::new(),
            kicked: false,
            failed: None,
        }));
        let ctx = Arc::new(SinkCtx {
            what: what.clone(),
            endpoint: Endpoint::parse(uri, format!("rill sink '{}'", spec.exchange))?,
            exchange: short(&spec.exchange, "exchange")?,
            queue,
            opts: options.clone(),
            shared: shared.clone(),
            waker,
        });
        let open_ctx = ctx.clone();
        let cmds = launch(
            &what,
            options,
            move || {
                let ctx = open_ctx.clone();
                async move { open_sink(&ctx).await }
            },
            move |session, cmds| run_sink(ctx, session, cmds),
        )?;
        Ok(AmqpSink {
            what,
            shared,
            cmds,
            close_timeout: options.close_timeout,
            closed: false,
        })
    }
}

impl SinkTransport for AmqpSink {
    fn publish(&mut self, msg: Outgoing) -> Result<u64, ConnectError> {
        if self.closed {
            return Err(ConnectError::Connection {
                what: self.what.clone(),
                detail: "publishing after close".into(),
            });
        }
        if msg.routing_key.len() > 255 {
            return Err(ConnectError::Config(format!(
                "routing key of {} bytes (at most 255)",
                msg.routing_key.len()
            )));
        }
        let (seq, kick) = {
            let mut s = self.shared.lock();
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            let seq = s.pending.push(msg);
            (seq, !std::mem::replace(&mut s.kicked, true))
        };
        if kick {
            command(
                &self.cmds,
                Cmd::Kick,
                || self.shared.lock().failed.clone(),
                &self.what,
            )?;
        }
        Ok(seq)
    }

    fn poll_confirmed(&mut self) -> Result<u64, ConnectError> {
        let s = self.shared.lock();
        match &s.failed {
            Some(e) => Err(e.clone()),
            None => Ok(s.pending.confirmed_upto()),
        }
    }

    fn outstanding(&self) -> u64 {
        self.shared.lock().pending.outstanding()
    }

    fn close(&mut self) -> Result<(), ConnectError> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        close_task(&self.cmds, self.close_timeout, &self.what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let opts = AmqpOptions::default();
        let mut b = Backoff::new(&opts);
        let got: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn the_uri_shown_in_messages_has_no_password() {
        let ep = Endpoint::parse("amqp://bob:s3cret@example.org:5673/prod", "n".into())
            .expect("a valid URI");
        assert_eq!(ep.shown, "amqp://bob@example.org:5673/prod");
        let ep = Endpoint::parse("amqp://guest:guest@localhost:5672/%2f", "n".into())
            .expect("a valid URI");
        assert_eq!(ep.shown, "amqp://guest@localhost:5672/%2f");
        for bad in ["http://nope", "amqps://guest:guest@localhost:5671/%2f"] {
            assert!(
                matches!(
                    Endpoint::parse(bad, "n".into()),
                    Err(ConnectError::Config(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn refusals_are_sorted_by_reply_code() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let refused = |kind: AMQPErrorKind| {
            let e: lapin::Error =
                lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "text".into())).into();
            classify("x", &e)
        };
        match refused(AMQPSoftError::NOTFOUND.into()) {
            Failure::Fatal(e) => assert_eq!(e.reply_code(), Some(404)),
            other => panic!("404 must be fatal, got {other:?}"),
        }
        match refused(AMQPHardError::NOTALLOWED.into()) {
            Failure::Fatal(e) => assert_eq!(e.reply_code(), Some(530)),
            other => panic!("530 must be fatal, got {other:?}"),
        }
        assert!(matches!(
            refused(AMQPHardError::CONNECTIONFORCED.into()),
            Failure::Retry(_)
        ));
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(matches!(classify("x", &io), Failure::Retry(_)));
    }
}
