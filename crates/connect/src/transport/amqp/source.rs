//! The TCP source: consumes one queue, reconnecting under a new generation.

use super::{
    abandon, classify, close_connection, close_task, command, launch, reconnect, setup_queue,
    short, AmqpOptions, Cmd, Ended, Endpoint, Failure, Reconnected, DELIVERY_BATCH,
};
use crate::error::ConnectError;
use crate::message::{Content, DeliveryTag, Incoming};
use crate::transport::{ConsumeSpec, QueueSetup, SourceTransport, Waker};
use bytes::Bytes;
use futures_lite::future::poll_once;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use parking_lot::Mutex;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

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
            prefetch: u16::try_from(spec.prefetch).unwrap_or_else(|_| {
                tracing::warn!(queue = %spec.queue, prefetch = spec.prefetch, "AMQP 0-9-1 carries a prefetch of at most 65535: using that");
                u16::MAX
            }),
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
