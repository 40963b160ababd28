//! The TCP sink: a confirming publisher that republishes what a broken channel left unconfirmed.

use super::{
    abandon, classify, close_connection, close_task, command, launch, reconnect, setup_queue,
    short, AmqpOptions, Backoff, Cmd, Ended, Endpoint, Failure, Reconnected,
};
use crate::error::ConnectError;
use crate::message::Outgoing;
use crate::transport::unconfirmed::Unconfirmed;
use crate::transport::{PublishSpec, QueueSetup, SinkTransport, Waker};
use futures_lite::future::poll_once;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ExchangeKind};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};

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

/// How many messages [`send_unsent`] takes out of the shared state at a time: a bounded
/// batch keeps the lock short and its copies in memory the allocator already has (a
/// checkpoint commits hundreds of thousands at once).
const SEND_BATCH: usize = 1024;

/// Publishes everything waiting, in sink order.
async fn send_unsent(
    ctx: &SinkCtx,
    channel: &Channel,
    wire: &mut u64,
    confirms: &mut JoinSet<Confirmed>,
) -> Result<(), Ended> {
    let mut batch: Vec<(u64, Outgoing)> = Vec::with_capacity(SEND_BATCH);
    loop {
        {
            let mut s = ctx.shared.lock();
            s.kicked = false;
            batch.extend(
                s.pending
                    .unsent()
                    .take(SEND_BATCH)
                    .map(|(seq, m)| (seq, m.clone())),
            );
            for (seq, _) in batch.iter_mut() {
                *wire += 1;
                s.pending.sent(*seq, *wire);
                *seq = *wire;
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        for (number, msg) in batch.drain(..) {
            publish_one(ctx, channel, number, msg, confirms).await?;
        }
    }
}

/// Hands one message to lapin, and its confirm to `confirms`.
async fn publish_one(
    ctx: &SinkCtx,
    channel: &Channel,
    number: u64,
    msg: Outgoing,
    confirms: &mut JoinSet<Confirmed>,
) -> Result<(), Ended> {
    let routing_key = ShortString::try_new(msg.routing_key)
        .map_err(|e| Ended::Failed(ConnectError::Config(format!("routing key: {e}"))))?;
    let (channel, exchange) = (channel.clone(), ctx.exchange.clone());
    let body = msg.body;
    let properties = msg
        .properties
        .into_fields()
        .map_err(|e| Ended::Failed(ConnectError::Config(format!("message properties: {e}"))))?;
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
    // The first poll hands the frames to lapin, in this loop's order, which is the order
    // the broker sees (and numbers) them in. Awaiting each publication instead would wait
    // for lapin's I/O thread to write it, once per message; spawning it unpolled would let
    // the runtime's two threads reorder messages.
    match poll_once(&mut publish).await {
        Some(Err(e)) => return Err(classify("publishing", &e).into()),
        Some(Ok(c)) => {
            confirms.spawn(std::future::ready((number, Ok(c))));
        }
        None => {
            confirms.spawn(async move { (number, publish.await) });
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
