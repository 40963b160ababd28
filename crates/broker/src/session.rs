//! A typed broker session: what one AMQP channel *means*, without frames.
//!
//! A [`Session`] declares and binds queues and exchanges, publishes (with the promise a
//! publisher confirm makes), consumes with a prefetch window, gets, settles deliveries with
//! ack, nack or requeue, runs transactions, and on close requeues whatever it had not settled.
//! Two things drive it:
//!
//! - the AMQP channel (`crate::channel`), which assembles publishes from frames, calls the
//!   session, and encodes what the session answers back onto the wire;
//! - in-process users such as stream jobs embedded in `rill server`, which open one with
//!   [`Session::open`] and call it directly: no socket, no encoding, no copy of a body.
//!
//! Both paths run exactly this code, so they cannot drift apart.
//!
//! Deliveries and events reach a session's owner through the [`Outlet`] it was opened with,
//! as [`ConnEvent`]s (the server's connection task is one such owner; [`Inbox`] is a simple
//! one for in-process users). The owner hands each [`ConnEvent::Deliver`] to
//! [`Session::deliver`], which assigns the delivery tag.
//!
//! ```
//! use rill_broker::session::{Inbox, Session, ConsumeOptions};
//! use rill_broker::vhost::QueueDeclare;
//! use rill_broker::{Broker, BrokerConfig, ConnEvent};
//! use rill_codec::{BasicProperties, FieldTable};
//! use std::sync::Arc;
//!
//! let broker = Broker::new(BrokerConfig::default());
//! let inbox = Arc::new(Inbox::default());
//! let mut s = Session::open(&broker, "/", "guest", "guest", inbox.clone()).unwrap();
//! s.declare_queue(QueueDeclare::durable("jobs")).unwrap();
//! s.confirm_select().unwrap();
//! let published = s.publish_to("", "jobs", &BasicProperties::default(), "hello".into()).unwrap();
//! assert_eq!(published.seq, Some(1));
//! // Not persistent, so confirmable at once.
//! let mut acked = 0;
//! s.poll_confirms(&mut |c| if let rill_broker::session::Confirm::Ack { upto, .. } = c { acked = upto });
//! assert_eq!(acked, 1);
//!
//! s.qos(10, false).unwrap();
//! let tag = s.consume(ConsumeOptions::new("jobs")).unwrap();
//! let ConnEvent::Deliver(d) = inbox.take().remove(0) else { panic!() };
//! let delivered = s.deliver(d).unwrap();
//! assert_eq!(&delivered.message.body[..], b"hello");
//! assert_eq!(delivered.consumer_tag(), tag);
//! s.ack(delivered.tag, false).unwrap();
//! ```

use crate::broker::{Broker, LoginError};
use crate::consumer::{ChannelCredit, ConnEvent, Consumer, Delivery, Outlet};
use crate::dedup::Routed;
use crate::exchange::Exchange;
use crate::message::Message;
use crate::queue::{ConsumeError, PublishOutcome, Queue};
use crate::vhost::{generate_name, ExchangeDeclare, QueueDeclare, VHost};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use rill_codec::{
    short_string_truncated, AmqpError, BasicProperties, FieldTable, PropertiesView, Publish,
    ReplyCode,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Who a session acts for: its connection, user and vhost. Shared by the channels of one AMQP
/// connection; an in-process session has its own.
#[derive(Debug)]
pub(crate) struct SessionCtx {
    pub broker: Broker,
    pub vhost: Arc<VHost>,
    pub connection: u64,
    pub user: String,
    pub outlet: Arc<dyn Outlet>,
    pub max_message_size: u64,
}

/// A delivery the client has not settled yet.
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<Queue>,
    seq: u64,
    /// None for basic.get deliveries, which hold no consumer credit.
    consumer: Option<Arc<Consumer>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Requeue,
    Discard,
}

/// Publisher-confirm bookkeeping. Acks are coalesced into one `multiple` ack per poll.
#[derive(Debug, Default)]
struct Confirms {
    /// Sequence number of the last publish.
    published: u64,
    /// Highest sequence number confirmed (acked or nacked).
    confirmed: u64,
    /// Publishes whose confirm must wait (for a sync round, or to keep a nack in order), in
    /// sequence order. Publishes not listed here are confirmable at once.
    waiting: VecDeque<Wait>,
}

#[derive(Debug, Clone, Copy)]
struct Wait {
    seq: u64,
    /// Sync epoch that makes it durable (0: none needed).
    epoch: u64,
    nack: bool,
}

#[derive(Debug)]
struct PendingPublish {
    exchange: Arc<Exchange>,
    msg: Arc<Message>,
    mandatory: bool,
}

#[derive(Debug, Default)]
struct Tx {
    publishes: Vec<PendingPublish>,
    settles: Vec<(Unacked, Settle)>,
}

/// The pseudo-queue name for RabbitMQ's direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What `basic.consume` asks for.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// The queue; empty means the session's last declared queue.
    pub queue: String,
    /// Empty: the broker generates one (`amq.ctag-...`).
    pub consumer_tag: String,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority`, `x-stream-offset`, ...
    pub arguments: FieldTable,
}

impl ConsumeOptions {
    /// Manual acks, not exclusive, no arguments, a generated tag.
    pub fn new(queue: &str) -> ConsumeOptions {
        ConsumeOptions {
            queue: queue.to_owned(),
            consumer_tag: String::new(),
            no_ack: false,
            exclusive: false,
            arguments: FieldTable::default(),
        }
    }
}

/// What a publish did.
#[derive(Debug, Default)]
pub struct Published {
    /// In confirm mode, the publish's sequence number: [`Session::poll_confirms`] reports its
    /// confirm.
    pub seq: Option<u64>,
    /// A `mandatory` message no queue took: it goes back to the publisher (basic.return 312
    /// NO_ROUTE).
    pub returned: Option<Arc<Message>>,
}

/// A publisher confirm, in sequence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Every publish after the previous confirm, up to and including `upto`, is safe: routed,
    /// and on disk where that was asked for. `multiple` is false when it covers just `upto`.
    Ack { upto: u64, multiple: bool },
    /// This publish was refused (a full queue with `reject-publish`, a failed disk write or
    /// fsync): it is not in the broker.
    Nack(u64),
}

/// A transaction's commit, owed once its persistent messages are on disk.
#[derive(Debug)]
pub enum CommitOutcome {
    /// Commit-ok can be sent now.
    Done,
    /// The session waits for a sync round; [`Session::poll_confirms`] reports the end.
    Pending,
}

/// A message handed to one of this session's consumers (or got), with its delivery tag.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The delivery tag to settle it with.
    pub tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// The consumer it was delivered to (None for basic.get).
    consumer: Option<Arc<Consumer>>,
}

impl Delivered {
    /// The consumer tag it was delivered to ("" for basic.get).
    pub fn consumer_tag(&self) -> &str {
        self.consumer.as_ref().map_or("", |c| c.tag.as_str())
    }
}

/// What polling confirms left to do.
#[derive(Debug, Default)]
pub struct ConfirmPoll {
    /// Confirms still wait for a later sync round: the outlet gets [`ConnEvent::Synced`] when
    /// one ends.
    pub waiting: bool,
    /// A pending transaction commit finished: Some(Ok) to send commit-ok, Some(Err) when its
    /// messages could not be made durable (the channel fails with it).
    pub commit: Option<Result<(), AmqpError>>,
}

/// One channel's worth of broker state: consumers, unacked deliveries, confirm and
/// transaction modes. See the [module docs](self).
#[derive(Debug)]
pub struct Session {
    ctx: Arc<SessionCtx>,
    /// The AMQP channel number (consumers remember it to route deliveries back); 1 for
    /// in-process sessions.
    id: u16,
    closing: bool,
    /// An in-process session stands for a connection of its own: it registers for alarms,
    /// removes its exclusive queues when dropped, and on close returns deliveries still
    /// waiting in its inbox to their queues.
    inbox: Option<Arc<Inbox>>,
    credit: Arc<ChannelCredit>,
    /// `basic.qos global=false` prefetch, applied to consumers created afterwards.
    consumer_prefetch: u32,
    consumers: HashMap<String, (Arc<Consumer>, Arc<Queue>)>,
    /// Ordered by delivery tag.
    unacked: VecDeque<Unacked>,
    last_tag: u64,
    last_queue: Option<String>,
    confirms: Option<Confirms>,
    tx: Option<Tx>,
    route_buf: Vec<Arc<Queue>>,
    seq_buf: Vec<u64>,
    /// The direct reply-to pseudo-queue this session consumes from, if any.
    reply_queue: Option<String>,
    /// Queues that asked this session's publisher to slow down (see
    /// [`Queue::wants_publishers_paused`]).
    flow_paused_by: Vec<Arc<Queue>>,
    /// tx.commit-ok owed once this sync epoch is reached.
    pending_commit: Option<u64>,
}

impl Session {
    pub(crate) fn new(ctx: Arc<SessionCtx>, id: u16) -> Session {
        Session {
            ctx,
            id,
            closing: false,
            inbox: None,
            credit: Arc::new(ChannelCredit::default()),
            consumer_prefetch: 0,
            consumers: HashMap::new(),
            unacked: VecDeque::new(),
            last_tag: 0,
            last_queue: None,
            confirms: None,
            tx: None,
            route_buf: Vec::new(),
            seq_buf: Vec::new(),
            reply_queue: None,
            flow_paused_by: Vec::new(),
            pending_commit: None,
        }
    }

    /// Opens an in-process session on `vhost` as `user`, as a client connection would:
    /// 403 ACCESS_REFUSED for bad credentials, 530 NOT_ALLOWED for an unknown vhost.
    /// Deliveries and events go to `inbox`. It acts as a connection of its own: it is told
    /// about resource alarms ([`ConnEvent::Blocked`]) and exclusive queues it declares go
    /// when it is dropped.
    pub fn open(
        broker: &Broker,
        vhost: &str,
        user: &str,
        password: &str,
        inbox: Arc<Inbox>,
    ) -> Result<Session, AmqpError> {
        let outlet: Arc<dyn Outlet> = inbox.clone();
        let u = broker.login(user, password, None).map_err(|why| {
            AmqpError::new(
                ReplyCode::AccessRefused,
                match why {
                    LoginError::UnknownUser | LoginError::BadPassword => {
                        format!("login refused for user '{user}': bad credentials")
                    }
                    LoginError::LoopbackOnly => format!("user '{user}' may only log in locally"),
                },
            )
        })?;
        let Some(vh) = broker.vhost(vhost) else {
            return Err(AmqpError::new(
                ReplyCode::NotAllowed,
                format!("vhost {vhost} not found"),
            ));
        };
        let connection = broker.next_connection_id();
        broker.register_connection(connection, outlet.clone());
        let ctx = Arc::new(SessionCtx {
            broker: broker.clone(),
            vhost: vh,
            connection,
            user: u.name,
            outlet,
            max_message_size: broker.config().max_message_size,
        });
        let mut s = Session::new(ctx, 1);
        s.inbox = Some(inbox);
        Ok(s)
    }

    /// The AMQP channel number.
    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn vhost(&self) -> &Arc<VHost> {
        &self.ctx.vhost
    }

    pub fn user(&self) -> &str {
        &self.ctx.user
    }

    /// Largest body this session accepts (the broker's `max_message_size`).
    pub fn max_message_size(&self) -> u64 {
        self.ctx.max_message_size
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Deliveries handed out and not settled yet.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    // ---- declarations ----

    pub fn declare_exchange(&mut self, d: ExchangeDeclare<'_>) -> Result<(), AmqpError> {
        self.ctx.vhost.declare_exchange(d).map(|_| ())
    }

    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        self.ctx.vhost.delete_exchange(name, if_unused)
    }

    pub fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        self.ctx
            .vhost
            .bind_exchange(destination, source, routing_key, arguments)
    }

    pub fn unbind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        self.ctx
            .vhost
            .unbind_exchange(destination, source, routing_key, arguments)
    }

    /// Declares (or, passively, checks) a queue; returns it. It becomes the session's "last
    /// declared queue", which an empty queue name means elsewhere.
    pub fn declare_queue(&mut self, d: QueueDeclare<'_>) -> Result<Arc<Queue>, AmqpError> {
        let q = self.ctx.vhost.declare_queue(self.ctx.connection, d)?;
        self.last_queue = Some(q.name().to_owned());
        Ok(q)
    }

    /// Binds a queue. An empty queue name means the last declared queue; with it, an empty
    /// routing key means that queue's name (as the AMQP spec asks).
    pub fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let qname = self.queue_name(queue)?;
        let key = if queue.is_empty() && routing_key.is_empty() {
            qname.clone()
        } else {
            routing_key.to_owned()
        };
        self.ctx
            .vhost
            .bind_queue(self.ctx.connection, &qname, exchange, &key, arguments)
    }

    pub fn unbind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let qname = self.queue_name(queue)?;
        self.ctx.vhost.unbind_queue(
            self.ctx.connection,
            &qname,
            exchange,
            routing_key,
            arguments,
        )
    }

    /// Drops a queue's ready messages; returns how many.
    pub fn purge_queue(&mut self, queue: &str) -> Result<u32, AmqpError> {
        let qname = self.queue_name(queue)?;
        Ok(self
            .ctx
            .vhost
            .queue_for(self.ctx.connection, &qname)?
            .purge())
    }

    /// Deletes a queue; returns the number of ready messages it held.
    pub fn delete_queue(
        &mut self,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let qname = self.queue_name(queue)?;
        self.ctx
            .vhost
            .delete_queue(self.ctx.connection, &qname, if_unused, if_empty)
    }

    /// A queue this session may use (exclusive queues of other connections are locked).
    pub fn queue(&self, name: &str) -> Result<Arc<Queue>, AmqpError> {
        self.ctx.vhost.queue_for(self.ctx.connection, name)
    }

    /// An empty queue name means the session's last declared queue.
    fn queue_name(&self, given: &str) -> Result<String, AmqpError> {
        if !given.is_empty() {
            return Ok(given.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::new(ReplyCode::NotFound, "no previously declared queue"))
    }

    // ---- publishing ----

    /// Enables publisher confirms (`confirm.select`).
    pub fn confirm_select(&mut self) -> Result<(), AmqpError> {
        if self.tx.is_some() {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                "cannot switch from tx to confirm mode",
            ));
        }
        self.confirms.get_or_insert_with(Confirms::default);
        Ok(())
    }

    /// Publishes a message whose properties are already encoded (as they arrive on the wire;
    /// they are stored and delivered as they are). Validates it as RabbitMQ does (user_id,
    /// expiration, internal exchanges), routes it, and in confirm mode gives it a sequence
    /// number whose [`Confirm`] arrives through [`Session::poll_confirms`] once it is routed
    /// and, for persistent messages in durable queues, on disk.
    pub fn publish(
        &mut self,
        publish: &Publish,
        properties: Bytes,
        body: Bytes,
    ) -> Result<Published, AmqpError> {
        let exchange = self.publish_exchange(publish)?;
        let msg = self.message(&exchange, publish, properties, body)?;
        if let Some(tx) = &mut self.tx {
            tx.publishes.push(PendingPublish {
                exchange,
                msg,
                mandatory: publish.mandatory,
            });
            return Ok(Published::default());
        }
        let mut published = Published::default();
        let routed = self.route(&exchange, msg, publish.mandatory, &mut published.returned);
        published.seq = self.note_published(routed);
        Ok(published)
    }

    /// Publishes `messages` (routing key, encoded properties, body) to the exchange `exchange`
    /// names, not mandatory, as [`Session::publish`] does each in turn, appending each
    /// one's [`Published`] to `published`. Consecutive messages that go to the same single
    /// queue go in under one lock of it: one handover of the queue to its consumers per run
    /// instead of one per message, which is what a job's sink committing its output needs.
    /// On an error, the messages before the one refused are published (and in
    /// `published`), the rest are not.
    pub fn publish_batch(
        &mut self,
        exchange: &Bytes,
        messages: impl IntoIterator<Item = (Bytes, Bytes, Bytes)>,
        published: &mut Vec<Published>,
    ) -> Result<(), AmqpError> {
        let mut publish = Publish {
            exchange: exchange.clone(),
            routing_key: Bytes::new(),
            mandatory: false,
            immediate: false,
        };
        let target = self.publish_exchange(&publish)?;
        let vhost = self.ctx.vhost.clone();
        // A run: messages routed to `run_queue` alone, each with what exchanges did to it.
        let mut run_queue: Option<Arc<Queue>> = None;
        let mut run: Vec<(Arc<Message>, Routed)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut result = Ok(());
        for (routing_key, properties, body) in messages {
            publish.routing_key = routing_key;
            let msg = match self.message(&target, &publish, properties, body) {
                Ok(m) => m,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if self.tx.is_some() {
                // Held until commit: nothing to batch.
                published.push(self.publish_held(&target, msg));
                continue;
            }
            self.route_buf.clear();
            let routed = vhost.route_message(&target, &msg, &mut self.route_buf);
            let single =
                (self.route_buf.len() == 1 && routed.is_plain()).then(|| self.route_buf[0].clone());
            match single {
                Some(q) if run_queue.as_ref().is_none_or(|r| Arc::ptr_eq(r, &q)) => {
                    run_queue = Some(q);
                    run.push((msg, routed));
                }
                Some(q) => {
                    self.publish_run(run_queue.replace(q), &mut run, &mut outcomes, published);
                    run.push((msg, routed));
                }
                None => {
                    self.publish_run(run_queue.take(), &mut run, &mut outcomes, published);
                    let outcome = self.publish_routed(&msg);
                    let seq = self.note_published(routed.finish(outcome));
                    published.push(Published {
                        seq,
                        returned: None,
                    });
                }
            }
        }
        self.publish_run(run_queue, &mut run, &mut outcomes, published);
        result
    }

    /// Publishes a batch's run into its queue under one lock and records each confirm.
    fn publish_run(
        &mut self,
        queue: Option<Arc<Queue>>,
        run: &mut Vec<(Arc<Message>, Routed)>,
        outcomes: &mut Vec<PublishOutcome>,
        published: &mut Vec<Published>,
    ) {
        let Some(q) = queue else { return };
        if run.is_empty() {
            return;
        }
        outcomes.clear();
        q.publish_batch(run.iter().map(|(m, _)| m.clone()), outcomes);
        for ((_, routed), outcome) in run.drain(..).zip(outcomes.drain(..)) {
            let seq = self.note_published(routed.finish(outcome));
            published.push(Published {
                seq,
                returned: None,
            });
        }
        self.note_flow(q);
    }

    /// A publish inside a transaction: held until commit.
    fn publish_held(&mut self, exchange: &Arc<Exchange>, msg: Arc<Message>) -> Published {
        if let Some(tx) = &mut self.tx {
            tx.publishes.push(PendingPublish {
                exchange: exchange.clone(),
                msg,
                mandatory: false,
            });
        }
        Published::default()
    }

    /// In confirm mode, numbers a routed publish and remembers when to confirm it.
    fn note_published(&mut self, routed: PublishOutcome) -> Option<u64> {
        let c = self.confirms.as_mut()?;
        c.published += 1;
        if !routed.accepted || routed.durable_at.is_some() {
            c.waiting.push_back(Wait {
                seq: c.published,
                epoch: routed.durable_at.unwrap_or(0),
                nack: !routed.accepted,
            });
        }
        Some(c.published)
    }

    /// The exchange a publish names, if this session may publish to it.
    fn publish_exchange(&self, publish: &Publish) -> Result<Arc<Exchange>, AmqpError> {
        let vhost = &self.ctx.vhost;
        let exchange = vhost.exchange(publish.exchange_str()?)?;
        if exchange.config.internal {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!(
                    "cannot publish to internal exchange '{}' in vhost '{}'",
                    exchange.name(),
                    vhost.name
                ),
            ));
        }
        Ok(exchange)
    }

    /// Checks a publish's properties and makes its message.
    fn message(
        &self,
        exchange: &Exchange,
        publish: &Publish,
        properties: Bytes,
        body: Bytes,
    ) -> Result<Arc<Message>, AmqpError> {
        let view = PropertiesView::new(&properties)?;
        if let Some(uid) = view.user_id() {
            if uid != self.ctx.user.as_bytes() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "user_id property set to '{}' but authenticated user was '{}'",
                        String::from_utf8_lossy(uid),
                        self.ctx.user
                    ),
                ));
            }
        }
        if let Some(exp) = view.expiration() {
            check_expiration(exp)?;
        }
        publish.routing_key_str()?;
        let properties = if view.reply_to() == Some(REPLY_TO) {
            self.rewrite_reply_to(&properties)?
        } else {
            properties
        };
        Ok(Arc::new(Message::new(
            exchange.config.name.clone(),
            publish.routing_key.clone(),
            properties,
            body,
        )))
    }

    /// [`Session::publish`] for in-process callers: properties are encoded here.
    pub fn publish_to(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: Bytes,
    ) -> Result<Published, AmqpError> {
        let publish = Publish {
            exchange: Bytes::copy_from_slice(exchange.as_bytes()),
            routing_key: Bytes::copy_from_slice(routing_key.as_bytes()),
            mandatory: false,
            immediate: false,
        };
        self.publish(&publish, rill_codec::encode_properties(properties), body)
    }

    /// Direct reply-to: `reply_to = amq.rabbitmq.reply-to` becomes the name of this session's
    /// reply pseudo-queue, so the responder's publish reaches our consumer directly.
    fn rewrite_reply_to(&self, properties: &[u8]) -> Result<Bytes, AmqpError> {
        let Some(reply_queue) = &self.reply_queue else {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                "fast reply consumer does not exist",
            ));
        };
        let props = rill_codec::decode_properties(properties)?
            .with_reply_to(short_string_truncated(reply_queue));
        Ok(rill_codec::encode_properties(&props))
    }

    fn route(
        &mut self,
        exchange: &Arc<Exchange>,
        msg: Arc<Message>,
        mandatory: bool,
        returned: &mut Option<Arc<Message>>,
    ) -> PublishOutcome {
        self.route_buf.clear();
        let routed = self
            .ctx
            .vhost
            .route_message(exchange, &msg, &mut self.route_buf);
        if self.route_buf.is_empty() {
            if mandatory {
                *returned = Some(msg);
            }
            return routed.finish(PublishOutcome::ACCEPTED);
        }
        let outcome = self.publish_routed(&msg);
        routed.finish(outcome)
    }

    /// Publishes `msg` into the queues in `route_buf` (emptying it); their joint outcome.
    fn publish_routed(&mut self, msg: &Arc<Message>) -> PublishOutcome {
        let mut outcome = PublishOutcome::ACCEPTED;
        let mut queues = std::mem::take(&mut self.route_buf);
        for q in queues.drain(..) {
            let o = q.publish(msg.clone());
            outcome.accepted &= o.accepted;
            outcome.durable_at = outcome.durable_at.max(o.durable_at);
            self.note_flow(q);
        }
        self.route_buf = queues;
        outcome
    }

    /// Remembers a queue published to that wants publishers paused.
    fn note_flow(&mut self, q: Arc<Queue>) {
        if q.wants_publishers_paused() && !self.flow_paused_by.iter().any(|p| Arc::ptr_eq(p, &q)) {
            self.flow_paused_by.push(q);
        }
    }

    /// Whether a queue this session published to still wants publishers paused (credit flow:
    /// its consumers cannot keep up). A publisher should hold back until this is false.
    pub fn publish_paused(&mut self) -> bool {
        if self.flow_paused_by.is_empty() {
            return false;
        }
        self.flow_paused_by.retain(|q| !q.lets_publishers_resume());
        !self.flow_paused_by.is_empty()
    }

    /// Reports the confirms (and a transaction commit) that became due, in order, given the
    /// group-commit epoch reached so far: each publish is acked once routed and, where it was
    /// written to disk, once its sync round finished; a round whose fdatasync failed made
    /// nothing durable, so what waited on it is nacked.
    pub(crate) fn take_confirms(
        &mut self,
        clock: &ConfirmClock,
        emit: &mut dyn FnMut(Confirm),
    ) -> ConfirmPoll {
        let synced = clock.synced();
        let round_failed = |epoch| clock.round_failed(epoch);
        let mut poll = ConfirmPoll::default();
        if let Some(c) = &mut self.confirms {
            let mut ack_upto = c.published;
            while let Some(w) = c.waiting.front().copied() {
                if w.epoch > synced {
                    ack_upto = w.seq - 1;
                    poll.waiting = true;
                    break;
                }
                c.waiting.pop_front();
                if w.nack || (w.epoch > 0 && round_failed(w.epoch)) {
                    // Acks before it go first, then the nack, so each tag is confirmed once.
                    ack_range(emit, c.confirmed, w.seq - 1);
                    emit(Confirm::Nack(w.seq));
                    c.confirmed = w.seq;
                }
            }
            ack_range(emit, c.confirmed, ack_upto);
            c.confirmed = c.confirmed.max(ack_upto);
        }
        if let Some(epoch) = self.pending_commit {
            if epoch <= synced {
                self.pending_commit = None;
                poll.commit = Some(if round_failed(epoch) {
                    // The commit did not reach the disk: the channel fails instead.
                    Err(AmqpError::new(
                        ReplyCode::InternalError,
                        "cannot make the transaction's messages durable",
                    )
                    .with_method(90, 20))
                } else {
                    Ok(())
                });
            } else {
                poll.waiting = true;
            }
        }
        poll
    }

    /// Reports the confirms that became due ([`Confirm`]s in sequence order), and arranges
    /// for the outlet to get [`ConnEvent::Synced`] when a sync round ends while some still
    /// wait. Also writes durable definitions if they changed.
    pub fn poll_confirms(&mut self, emit: &mut dyn FnMut(Confirm)) -> ConfirmPoll {
        let ctx = self.ctx.clone();
        let mut result = ConfirmPoll::default();
        poll_confirm_passes(&ctx.broker, &ctx.outlet, |clock| {
            let p = self.take_confirms(clock, emit);
            result.waiting = p.waiting;
            if p.commit.is_some() {
                result.commit = p.commit;
            }
            p.waiting
        });
        result
    }

    /// Publishes confirmed so far (the highest sequence number acked or nacked).
    pub fn confirmed_seq(&self) -> u64 {
        self.confirms.as_ref().map_or(0, |c| c.confirmed)
    }

    // ---- consuming ----

    /// `basic.qos`: the prefetch for consumers created afterwards (`global=false`) or shared by
    /// all of this session's consumers (`global=true`). 0 means no limit.
    pub fn qos(&mut self, prefetch_count: u32, global: bool) -> Result<(), AmqpError> {
        if global {
            self.credit.set_prefetch(prefetch_count);
        } else {
            self.consumer_prefetch = prefetch_count;
        }
        Ok(())
    }

    /// Subscribes to a queue (`basic.consume`); returns the consumer tag. Deliveries arrive at
    /// the outlet as [`ConnEvent::Deliver`]; hand each to [`Session::deliver`].
    pub fn consume(&mut self, c: ConsumeOptions) -> Result<String, AmqpError> {
        let vhost = self.ctx.vhost.clone();
        let qname = self.queue_name(&c.queue)?;
        let q = if qname == REPLY_TO {
            if !c.no_ack {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    "reply consumer cannot acknowledge",
                ));
            }
            if self.reply_queue.is_some() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    "reply consumer already set",
                ));
            }
            let q = vhost.declare_reply_queue(self.ctx.connection);
            self.reply_queue = Some(q.name().to_owned());
            q
        } else {
            vhost.queue_for(self.ctx.connection, &qname)?
        };
        if q.is_stream() {
            let what = format!("queue '{qname}' in vhost '{}'", vhost.name);
            if c.no_ack {
                return Err(AmqpError::new(
                    ReplyCode::NotImplemented,
                    format!("automatic acknowledgement not supported by stream queues {what}"),
                ));
            }
            // Stream acks are flow control: without a prefetch there would be none.
            if self.consumer_prefetch == 0 && !self.credit.is_limited() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("consumer prefetch count is not set for '{what}'"),
                ));
            }
        }
        let tag = if c.consumer_tag.is_empty() {
            generate_name("amq.ctag-")
        } else {
            c.consumer_tag
        };
        if self.consumers.contains_key(&tag) {
            return Err(AmqpError::new(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let consumer = Arc::new(Consumer::new(
            tag.clone(),
            self.id,
            self.ctx.connection,
            c.no_ack,
            c.exclusive,
            c.arguments,
            self.consumer_prefetch,
            self.credit.clone(),
            self.ctx.outlet.clone(),
        ));
        // Register before answering: if it fails the client must not see consume-ok.
        // Deliveries it triggers travel through the outlet and are handled after this returns.
        q.add_consumer(consumer.clone()).map_err(|e| match e {
            ConsumeError::ExclusiveConflict => AmqpError::new(
                ReplyCode::AccessRefused,
                format!("queue '{qname}' in vhost '{}' in exclusive use", vhost.name),
            ),
            ConsumeError::Deleted => AmqpError::new(
                ReplyCode::NotFound,
                format!("no queue '{qname}' in vhost '{}'", vhost.name),
            ),
        })?;
        self.consumers.insert(tag.clone(), (consumer, q));
        Ok(tag)
    }

    /// `basic.cancel`: stops a consumer; its unacked deliveries stay unacked. Returns whether
    /// it existed.
    pub fn cancel(&mut self, consumer_tag: &str) -> bool {
        let Some((consumer, q)) = self.consumers.remove(consumer_tag) else {
            return false;
        };
        if self.reply_queue.as_deref() == Some(q.name()) {
            self.reply_queue = None;
        }
        consumer.cancel();
        if q.remove_consumer(&consumer) {
            self.ctx.vhost.remove_queue(&q);
        }
        true
    }

    /// Takes a delivery a queue handed to one of this session's consumers and gives it its
    /// delivery tag. None if it can no longer be taken (the consumer was cancelled or the
    /// session is closing): it went back to its queue.
    pub fn deliver(&mut self, d: Delivery) -> Option<Delivered> {
        if self.closing || d.consumer.is_cancelled() {
            d.bounce();
            return None;
        }
        self.last_tag += 1;
        let tag = self.last_tag;
        let delivered = Delivered {
            tag,
            redelivered: d.item.redelivered,
            message: d.item.msg,
            consumer: Some(d.consumer.clone()),
        };
        if d.consumer.no_ack {
            if d.consumer.release(1) {
                d.queue.dispatch();
            }
        } else {
            self.unacked.push_back(Unacked {
                tag,
                queue: d.queue,
                seq: d.item.seq,
                consumer: Some(d.consumer),
            });
        }
        Some(delivered)
    }

    /// `basic.get`: the queue's head message, if any, and how many are left ready.
    pub fn get(
        &mut self,
        queue: &str,
        no_ack: bool,
    ) -> Result<Option<(Delivered, u32)>, AmqpError> {
        let qname = self.queue_name(queue)?;
        let q = self.ctx.vhost.queue_for(self.ctx.connection, &qname)?;
        if q.is_stream() {
            return Err(AmqpError::new(
                ReplyCode::NotImplemented,
                format!(
                    "basic.get not supported by stream queues queue '{qname}' in vhost '{}'",
                    self.ctx.vhost.name
                ),
            ));
        }
        let Some((item, left)) = q.get(!no_ack) else {
            return Ok(None);
        };
        self.last_tag += 1;
        let tag = self.last_tag;
        let delivered = Delivered {
            tag,
            redelivered: item.redelivered,
            message: item.msg,
            consumer: None,
        };
        if !no_ack {
            self.unacked.push_back(Unacked {
                tag,
                queue: q,
                seq: item.seq,
                consumer: None,
            });
        }
        Ok(Some((delivered, left)))
    }

    /// Acknowledges delivery `tag` (with `multiple`, every unsettled one up to it; tag 0 with
    /// `multiple` means all).
    pub fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), AmqpError> {
        self.settle(tag, multiple, Settle::Ack)
    }

    /// Rejects deliveries: back to their queues (`requeue`, marked redelivered) or gone
    /// (dead-lettered if the queue has a dead-letter exchange).
    pub fn nack(&mut self, tag: u64, multiple: bool, requeue: bool) -> Result<(), AmqpError> {
        self.settle(tag, multiple, requeue_or_discard(requeue))
    }

    /// `basic.recover`: every unsettled delivery goes back to its queue.
    pub fn recover(&mut self, requeue: bool) -> Result<(), AmqpError> {
        if !requeue {
            return Err(AmqpError::new(ReplyCode::NotImplemented, "requeue=false"));
        }
        let items: Vec<(Unacked, Settle)> = self
            .unacked
            .drain(..)
            .map(|u| (u, Settle::Requeue))
            .collect();
        self.apply_settles(items);
        Ok(())
    }

    fn settle(&mut self, tag: u64, multiple: bool, how: Settle) -> Result<(), AmqpError> {
        let taken: Vec<Unacked> = if multiple && tag == 0 {
            self.unacked.drain(..).collect()
        } else {
            let Ok(idx) = self.unacked.binary_search_by_key(&tag, |u| u.tag) else {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("unknown delivery tag {tag}"),
                ));
            };
            if multiple {
                self.unacked.drain(..=idx).collect()
            } else {
                self.unacked.remove(idx).into_iter().collect()
            }
        };
        if let Some(tx) = &mut self.tx {
            tx.settles.extend(taken.into_iter().map(|u| (u, how)));
            return Ok(());
        }
        self.apply_settles(taken.into_iter().map(|u| (u, how)));
        Ok(())
    }

    /// Returns consumer credit first, then settles per queue in runs (one lock per run), so the
    /// queue's dispatch after settling sees the credit.
    fn apply_settles(&mut self, items: impl IntoIterator<Item = (Unacked, Settle)>) {
        let items: Vec<(Unacked, Settle)> = items.into_iter().collect();
        for (u, _) in &items {
            if let Some(c) = &u.consumer {
                c.release(1);
            }
        }
        let mut run: Option<(Arc<Queue>, Settle)> = None;
        self.seq_buf.clear();
        for (u, how) in items {
            let same = run
                .as_ref()
                .is_some_and(|(q, h)| Arc::ptr_eq(q, &u.queue) && *h == how);
            if !same {
                if let Some((q, h)) = run.take() {
                    settle_run(&q, h, &mut self.seq_buf);
                }
                run = Some((u.queue, how));
            }
            self.seq_buf.push(u.seq);
        }
        if let Some((q, h)) = run {
            settle_run(&q, h, &mut self.seq_buf);
        }
        if self.credit_is_shared() {
            self.dispatch_consumer_queues();
        }
    }

    fn credit_is_shared(&self) -> bool {
        self.credit.is_limited() && self.consumers.len() > 1
    }

    /// Lets every queue this session consumes from dispatch again (credit came back).
    pub fn dispatch_consumer_queues(&self) {
        let mut seen: Vec<&Arc<Queue>> = Vec::new();
        for (_, q) in self.consumers.values() {
            if !seen.iter().any(|s| Arc::ptr_eq(s, q)) {
                seen.push(q);
                q.dispatch();
            }
        }
    }

    /// The queue of a consumer of ours went away ([`ConnEvent::ConsumerCancelled`]). Returns
    /// whether it was ours.
    pub fn consumer_gone(&mut self, tag: &str) -> bool {
        self.consumers.remove(tag).is_some()
    }

    // ---- transactions ----

    /// `tx.select`: publishes and settlements wait for `tx.commit`.
    pub fn tx_select(&mut self) -> Result<(), AmqpError> {
        if self.confirms.is_some() {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                "cannot switch from confirm to tx mode",
            ));
        }
        self.tx.get_or_insert_with(Tx::default);
        Ok(())
    }

    /// `tx.commit`: routes the transaction's publishes and applies its settlements. Publishes
    /// that were `mandatory` and unroutable are handed to `returned`.
    pub fn tx_commit(
        &mut self,
        returned: &mut dyn FnMut(Arc<Message>),
    ) -> Result<CommitOutcome, AmqpError> {
        let tx = std::mem::take(self.tx.as_mut().ok_or_else(not_tx)?);
        let mut durable_at = None;
        for p in tx.publishes {
            let mut back = None;
            let o = self.route(&p.exchange, p.msg, p.mandatory, &mut back);
            if let Some(m) = back {
                returned(m);
            }
            durable_at = durable_at.max(o.durable_at);
        }
        self.apply_settles(tx.settles);
        Ok(match durable_at {
            // commit-ok once the persistent messages are on disk (see take_confirms).
            Some(epoch) => {
                self.pending_commit = Some(epoch);
                CommitOutcome::Pending
            }
            None => CommitOutcome::Done,
        })
    }

    /// `tx.rollback`: drops the transaction's publishes; its settlements are taken back (the
    /// deliveries are unsettled again, in tag order).
    pub fn tx_rollback(&mut self) -> Result<(), AmqpError> {
        let tx = std::mem::take(self.tx.as_mut().ok_or_else(not_tx)?);
        for (u, _) in tx.settles {
            let pos = self.unacked.partition_point(|x| x.tag < u.tag);
            self.unacked.insert(pos, u);
        }
        Ok(())
    }

    // ---- closing ----

    /// Tears the session down: consumers cancelled, unacked deliveries requeued. Nothing
    /// more is reported afterwards, not even confirms.
    pub fn close(&mut self) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.confirms = None;
        self.pending_commit = None;
        // Cancelled first so nothing is dispatched to them; the unacked go back to their
        // queues while the consumers are still registered, so they reach the next consumer
        // ahead of messages that were never delivered (single active consumer takeover).
        let consumers: Vec<(Arc<Consumer>, Arc<Queue>)> =
            self.consumers.drain().map(|(_, cq)| cq).collect();
        for (c, _) in &consumers {
            c.cancel();
        }
        let mut items: Vec<(Unacked, Settle)> = self
            .unacked
            .drain(..)
            .map(|u| (u, Settle::Requeue))
            .collect();
        if let Some(tx) = self.tx.take() {
            items.extend(tx.settles.into_iter().map(|(u, _)| (u, Settle::Requeue)));
        }
        items.sort_by_key(|(u, _)| u.tag);
        self.apply_settles(items);
        for (c, q) in consumers {
            if q.remove_consumer(&c) {
                self.ctx.vhost.remove_queue(&q);
            }
        }
        // No queue delivers to our consumers any more (each removal took the queue's lock
        // after any dispatch in progress); what reached the inbox goes back.
        if let Some(inbox) = &self.inbox {
            for event in inbox.take() {
                if let ConnEvent::Deliver(d) = event {
                    d.bounce();
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
        if self.inbox.is_some() {
            let ctx = &self.ctx;
            ctx.broker.deregister_connection(ctx.connection);
            ctx.vhost.connection_closed(ctx.connection);
            ctx.broker.save_definitions_if_dirty();
        }
    }
}

/// The group-commit clock confirms are measured against: the sync epoch reached and which
/// rounds failed (no data directory: everything counts as synced).
pub(crate) struct ConfirmClock {
    persistence: Option<Arc<crate::durable::Persistence>>,
}

impl ConfirmClock {
    pub(crate) fn synced(&self) -> u64 {
        self.persistence
            .as_ref()
            .map_or(u64::MAX, |p| p.synced_epoch())
    }

    pub(crate) fn round_failed(&self, epoch: u64) -> bool {
        self.persistence
            .as_ref()
            .is_some_and(|p| p.round_failed(epoch))
    }
}

/// Runs `pass` (poll every session's confirms once; true if some still wait for a sync round)
/// and, if something waits, registers `outlet` for [`ConnEvent::Synced`] and runs it once
/// more, so a round that ended in between is not missed. Durable definitions that changed
/// are written first (a confirm promises the queue's declaration is on disk too).
pub(crate) fn poll_confirm_passes(
    broker: &Broker,
    outlet: &Arc<dyn Outlet>,
    mut pass: impl FnMut(&ConfirmClock) -> bool,
) {
    broker.save_definitions_if_dirty();
    let clock = ConfirmClock {
        persistence: broker.persistence().cloned(),
    };
    if pass(&clock) {
        if let Some(p) = &clock.persistence {
            p.notify_when_synced(outlet);
            pass(&clock);
        }
    }
}

/// Acks (confirmed, upto] with one confirm.
fn ack_range(emit: &mut dyn FnMut(Confirm), confirmed: u64, upto: u64) {
    if upto > confirmed {
        emit(Confirm::Ack {
            upto,
            multiple: upto - confirmed > 1,
        });
    }
}

fn settle_run(q: &Arc<Queue>, how: Settle, seqs: &mut Vec<u64>) {
    match how {
        Settle::Ack => q.ack(seqs.drain(..)),
        Settle::Discard => q.discard(seqs.drain(..)),
        Settle::Requeue => q.requeue(seqs.drain(..)),
    }
}

fn requeue_or_discard(requeue: bool) -> Settle {
    if requeue {
        Settle::Requeue
    } else {
        Settle::Discard
    }
}

fn not_tx() -> AmqpError {
    AmqpError::new(
        ReplyCode::PreconditionFailed,
        "channel is not transactional",
    )
}

/// Per-message TTL must be a non-negative integer (milliseconds), as RabbitMQ checks it.
fn check_expiration(exp: &str) -> Result<u64, AmqpError> {
    let reason = match exp.parse::<i64>() {
        Ok(n) if n >= 0 => return Ok(n as u64),
        Ok(n) => format!("{{value_negative,{n}}}"),
        Err(_) => "no_integer".to_owned(),
    };
    Err(AmqpError::new(
        ReplyCode::PreconditionFailed,
        format!("invalid expiration '{exp}': {reason}"),
    ))
}

/// An [`Outlet`] for in-process sessions: events queue up until their owner takes them, and
/// an optional callback wakes the owner (a stream job's operator, a test's thread) when the
/// queue goes from empty to non-empty.
#[derive(Default)]
pub struct Inbox {
    events: Mutex<Vec<ConnEvent>>,
    ready: Condvar,
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("queued", &self.events.lock().len())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// An inbox that calls `wake` whenever an event arrives while it was empty.
    pub fn with_waker(wake: impl Fn() + Send + Sync + 'static) -> Inbox {
        Inbox {
            events: Mutex::new(Vec::new()),
            ready: Condvar::new(),
            wake: Some(Box::new(wake)),
        }
    }

    /// Takes every queued event, in arrival order.
    pub fn take(&self) -> Vec<ConnEvent> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Moves the queued events into `out` (keeps `out`'s allocation).
    pub fn drain_into(&self, out: &mut Vec<ConnEvent>) {
        out.append(&mut self.events.lock());
    }

    /// Waits until an event is queued or `timeout` passes (for threads that may block).
    pub fn wait(&self, timeout: Duration) {
        let mut events = self.events.lock();
        if events.is_empty() {
            self.ready.wait_for(&mut events, timeout);
        }
    }
}

impl Outlet for Inbox {
    fn push(&self, event: ConnEvent) {
        let was_empty = {
            let mut events = self.events.lock();
            events.push(event);
            events.len() == 1
        };
        if was_empty {
            self.ready.notify_all();
            if let Some(w) = &self.wake {
                w();
            }
        }
    }
}

impl Drop for Inbox {
    /// Deliveries nobody will take go back to their queues.
    fn drop(&mut self) {
        for ev in self.events.get_mut().drain(..) {
            if let ConnEvent::Deliver(d) = ev {
                d.bounce();
            }
        }
    }
}
