//! One AMQP channel: publishes being assembled, consumers, deliveries awaiting acks, confirm and
//! transaction modes. Driven by [`crate::connection::Connection`]; writes replies into the
//! connection's output buffer.

use crate::consumer::{ChannelCredit, Consumer, Delivery, Outlet};
use crate::message::Message;
use crate::queue::{ConsumeError, PublishOutcome, Queue};
use crate::vhost::{generate_name, ExchangeDeclare, QueueDeclare, VHost};
use bytes::{Bytes, BytesMut};
use rill_codec::amq_protocol::protocol::{
    access as amqp_access, basic as amqp_basic, channel as amqp_channel, confirm as amqp_confirm,
    exchange as amqp_exchange, queue as amqp_queue, tx as amqp_tx,
};
use rill_codec::{
    decode_content_header, encode_basic_ack, encode_basic_nack, encode_deliver, encode_get_ok,
    encode_method, encode_return, short_string_truncated, AMQPClass, AmqpError, ContentHeader,
    Method, PropertiesView, Publish, ReplyCode,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What a channel needs to know about its connection.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub vhost: Option<Arc<VHost>>,
    pub connection: u64,
    pub user: String,
    pub outlet: Arc<dyn Outlet>,
    pub frame_max: u32,
    pub max_message_size: u64,
}

impl Ctx {
    fn vhost(&self) -> Result<&Arc<VHost>, AmqpError> {
        self.vhost
            .as_ref()
            .ok_or_else(|| AmqpError::new(ReplyCode::InternalError, "connection has no vhost"))
    }
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

#[derive(Debug)]
enum Content {
    Idle,
    AwaitHeader(Publish),
    AwaitBody {
        publish: Publish,
        header: ContentHeader,
        body: BodyBuf,
    },
    /// An over-size message: its body is read and dropped, then the channel fails, which is
    /// when RabbitMQ reports it.
    Discard {
        remaining: u64,
        error: AmqpError,
    },
}

/// Body frames of one message. One frame (the common case) is kept as the zero-copy payload.
#[derive(Debug)]
enum BodyBuf {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl BodyBuf {
    fn len(&self) -> usize {
        match self {
            BodyBuf::Empty => 0,
            BodyBuf::One(b) => b.len(),
            BodyBuf::Many(b) => b.len(),
        }
    }

    fn push(&mut self, part: Bytes, expected: usize) {
        *self = match std::mem::replace(self, BodyBuf::Empty) {
            BodyBuf::Empty => BodyBuf::One(part),
            BodyBuf::One(first) => {
                let mut all = BytesMut::with_capacity(expected);
                all.extend_from_slice(&first);
                all.extend_from_slice(&part);
                BodyBuf::Many(all)
            }
            BodyBuf::Many(mut all) => {
                all.extend_from_slice(&part);
                BodyBuf::Many(all)
            }
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            BodyBuf::Empty => Bytes::new(),
            BodyBuf::One(b) => b,
            BodyBuf::Many(b) => b.freeze(),
        }
    }
}

/// Publisher-confirm bookkeeping. Acks are coalesced per input batch into one `multiple` ack.
#[derive(Debug, Default)]
struct Confirms {
    /// Sequence number of the last publish.
    published: u64,
    /// Highest sequence number confirmed (acked or nacked) to the client.
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
    exchange: Arc<crate::exchange::Exchange>,
    msg: Arc<Message>,
    mandatory: bool,
}

#[derive(Debug, Default)]
struct Tx {
    publishes: Vec<PendingPublish>,
    settles: Vec<(Unacked, Settle)>,
}

#[derive(Debug)]
pub(crate) struct Channel {
    id: u16,
    closing: bool,
    content: Content,
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
    /// The direct reply-to pseudo-queue this channel consumes from, if any.
    reply_queue: Option<String>,
    /// Queues that asked this channel's publisher to slow down (see
    /// [`Queue::wants_publishers_paused`]).
    flow_paused_by: Vec<Arc<Queue>>,
    /// tx.commit-ok owed once this sync epoch is reached.
    pending_commit: Option<u64>,
}

/// The pseudo-queue name for RabbitMQ's direct reply-to.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn reply(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    encode_method(out, channel, &method);
}

impl Channel {
    pub fn new(id: u16) -> Channel {
        Channel {
            id,
            closing: false,
            content: Content::Idle,
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

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    pub fn handle_method(
        &mut self,
        ctx: &Ctx,
        method: Method,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        match self.content {
            Content::Idle => {}
            Content::AwaitHeader(_) => {
                return Err(AmqpError::new(
                    ReplyCode::UnexpectedFrame,
                    "expected content header for class 60, got non content header frame instead",
                )
                .with_method(60, 40))
            }
            Content::AwaitBody { .. } | Content::Discard { .. } => {
                return Err(AmqpError::new(
                    ReplyCode::UnexpectedFrame,
                    "expected content body, got non content body frame instead",
                )
                .with_method(60, 40))
            }
        }
        match method {
            Method::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::new(ReplyCode::NotImplemented, "immediate=true"));
                }
                self.content = Content::AwaitHeader(p);
                Ok(())
            }
            Method::Ack {
                delivery_tag,
                multiple,
            } => self.settle(ctx, delivery_tag, multiple, Settle::Ack),
            Method::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => self.settle(ctx, delivery_tag, multiple, requeue_or_discard(requeue)),
            Method::Reject {
                delivery_tag,
                requeue,
            } => self.settle(ctx, delivery_tag, false, requeue_or_discard(requeue)),
            Method::Qos {
                prefetch_size,
                prefetch_count,
                global,
            } => {
                if prefetch_size != 0 {
                    return Err(AmqpError::new(
                        ReplyCode::NotImplemented,
                        format!("prefetch_size!=0 ({prefetch_size})"),
                    ));
                }
                if global {
                    self.credit.set_prefetch(u32::from(prefetch_count));
                } else {
                    self.consumer_prefetch = u32::from(prefetch_count);
                }
                reply(
                    out,
                    self.id,
                    AMQPClass::Basic(amqp_basic::AMQPMethod::QosOk(amqp_basic::QosOk {})),
                );
                Ok(())
            }
            Method::Other(AMQPClass::Basic(m)) => self.basic(ctx, m, out),
            Method::Other(AMQPClass::Exchange(m)) => self.exchange(ctx, m, out),
            Method::Other(AMQPClass::Queue(m)) => self.queue(ctx, m, out),
            Method::Other(AMQPClass::Confirm(amqp_confirm::AMQPMethod::Select(s))) => {
                if self.tx.is_some() {
                    return Err(AmqpError::new(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.confirms.get_or_insert_with(Confirms::default);
                if !s.nowait {
                    reply(
                        out,
                        self.id,
                        AMQPClass::Confirm(amqp_confirm::AMQPMethod::SelectOk(
                            amqp_confirm::SelectOk {},
                        )),
                    );
                }
                Ok(())
            }
            Method::Other(AMQPClass::Tx(m)) => self.tx(ctx, m, out),
            Method::Other(AMQPClass::Channel(m)) => match m {
                amqp_channel::AMQPMethod::Flow(f) => {
                    // RabbitMQ 3.x no longer lets clients pause deliveries this way.
                    if !f.active {
                        return Err(AmqpError::new(ReplyCode::NotImplemented, "active=false"));
                    }
                    reply(
                        out,
                        self.id,
                        AMQPClass::Channel(amqp_channel::AMQPMethod::FlowOk(
                            amqp_channel::FlowOk { active: f.active },
                        )),
                    );
                    if f.active {
                        self.dispatch_consumer_queues();
                    }
                    Ok(())
                }
                amqp_channel::AMQPMethod::FlowOk(_) => Ok(()),
                _ => Err(command_invalid()),
            },
            Method::Other(AMQPClass::Access(amqp_access::AMQPMethod::Request(_))) => {
                reply(
                    out,
                    self.id,
                    AMQPClass::Access(amqp_access::AMQPMethod::RequestOk(
                        amqp_access::RequestOk {},
                    )),
                );
                Ok(())
            }
            Method::Other(_) => Err(command_invalid()),
        }
    }

    // ---- publishing ----

    pub fn content_header(
        &mut self,
        ctx: &Ctx,
        payload: Bytes,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        if !matches!(self.content, Content::Idle | Content::AwaitHeader(_)) {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "expected content body, got non content body frame instead",
            )
            .with_method(60, 40));
        }
        let Content::AwaitHeader(publish) = std::mem::replace(&mut self.content, Content::Idle)
        else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "expected method frame, got non method frame instead",
            ));
        };
        let header = decode_content_header(payload)?;
        if header.body_size > ctx.max_message_size {
            self.content = Content::Discard {
                remaining: header.body_size,
                error: AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "message size {} is larger than configured max size {}",
                        header.body_size, ctx.max_message_size
                    ),
                )
                .with_method(60, 40),
            };
            return Ok(());
        }
        if header.body_size == 0 {
            return self.publish_complete(ctx, publish, header, Bytes::new(), out);
        }
        self.content = Content::AwaitBody {
            publish,
            header,
            body: BodyBuf::Empty,
        };
        Ok(())
    }

    pub fn content_body(
        &mut self,
        ctx: &Ctx,
        payload: Bytes,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        if let Content::Discard { remaining, .. } = &mut self.content {
            *remaining = remaining.saturating_sub(payload.len() as u64);
            if *remaining > 0 {
                return Ok(());
            }
            if let Content::Discard { error, .. } =
                std::mem::replace(&mut self.content, Content::Idle)
            {
                return Err(error);
            }
        }
        if matches!(self.content, Content::AwaitHeader(_)) {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "expected content header for class 60, got non content header frame instead",
            )
            .with_method(60, 40));
        }
        let Content::AwaitBody { header, body, .. } = &mut self.content else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "expected method frame, got non method frame instead",
            ));
        };
        let expected = usize::try_from(header.body_size).unwrap_or(usize::MAX);
        if body.len() + payload.len() > expected {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!(
                    "body of {} bytes exceeds the {} bytes announced in the content header",
                    body.len() + payload.len(),
                    expected
                ),
            ));
        }
        body.push(payload, expected);
        if body.len() < expected {
            return Ok(());
        }
        let Content::AwaitBody {
            publish,
            header,
            body,
        } = std::mem::replace(&mut self.content, Content::Idle)
        else {
            return Ok(());
        };
        self.publish_complete(ctx, publish, header, body.freeze(), out)
    }

    fn publish_complete(
        &mut self,
        ctx: &Ctx,
        publish: Publish,
        header: ContentHeader,
        body: Bytes,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        let at_publish = |e: AmqpError| e.with_method(60, 40);
        let vhost = ctx.vhost()?;
        let view = PropertiesView::new(&header.properties).map_err(at_publish)?;
        if let Some(uid) = view.user_id() {
            if uid != ctx.user.as_bytes() {
                return Err(at_publish(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "user_id property set to '{}' but authenticated user was '{}'",
                        String::from_utf8_lossy(uid),
                        ctx.user
                    ),
                )));
            }
        }
        if let Some(exp) = view.expiration() {
            check_expiration(exp).map_err(at_publish)?;
        }
        let exchange = vhost
            .exchange(publish.exchange_str().map_err(at_publish)?)
            .map_err(at_publish)?;
        if exchange.config.internal {
            return Err(at_publish(AmqpError::new(
                ReplyCode::AccessRefused,
                format!(
                    "cannot publish to internal exchange '{}' in vhost '{}'",
                    exchange.name(),
                    vhost.name
                ),
            )));
        }
        publish.routing_key_str().map_err(at_publish)?;
        let properties = if view.reply_to() == Some(REPLY_TO) {
            self.rewrite_reply_to(&header.properties)
                .map_err(at_publish)?
        } else {
            header.properties.clone()
        };
        let msg = Arc::new(Message::new(
            exchange.config.name.clone(),
            publish.routing_key.clone(),
            properties,
            body,
        ));
        if let Some(tx) = &mut self.tx {
            tx.publishes.push(PendingPublish {
                exchange,
                msg,
                mandatory: publish.mandatory,
            });
            return Ok(());
        }
        let routed = self.route(ctx, &exchange, msg, publish.mandatory, out);
        if let Some(c) = &mut self.confirms {
            c.published += 1;
            if !routed.accepted || routed.durable_at.is_some() {
                c.waiting.push_back(Wait {
                    seq: c.published,
                    epoch: routed.durable_at.unwrap_or(0),
                    nack: !routed.accepted,
                });
            }
        }
        Ok(())
    }

    /// Direct reply-to: `reply_to = amq.rabbitmq.reply-to` becomes the name of this channel's
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
        ctx: &Ctx,
        exchange: &Arc<crate::exchange::Exchange>,
        msg: Arc<Message>,
        mandatory: bool,
        out: &mut BytesMut,
    ) -> PublishOutcome {
        let mut outcome = PublishOutcome {
            accepted: true,
            durable_at: None,
        };
        self.route_buf.clear();
        let Ok(vhost) = ctx.vhost() else {
            return outcome;
        };
        vhost.route_message(exchange, &msg, &mut self.route_buf);
        if self.route_buf.is_empty() {
            if mandatory {
                encode_return(
                    out,
                    self.id,
                    312,
                    "NO_ROUTE",
                    &msg.exchange,
                    msg.routing_key_str(),
                    &msg.properties,
                    &msg.body,
                    ctx.frame_max,
                );
            }
            return outcome;
        }
        for q in self.route_buf.drain(..) {
            let o = q.publish(msg.clone());
            outcome.accepted &= o.accepted;
            outcome.durable_at = outcome.durable_at.max(o.durable_at);
            if q.wants_publishers_paused()
                && !self.flow_paused_by.iter().any(|p| Arc::ptr_eq(p, &q))
            {
                self.flow_paused_by.push(q);
            }
        }
        outcome
    }

    /// Whether a queue this channel published to still wants publishers paused.
    pub fn publish_paused(&mut self) -> bool {
        if self.flow_paused_by.is_empty() {
            return false;
        }
        self.flow_paused_by.retain(|q| !q.lets_publishers_resume());
        !self.flow_paused_by.is_empty()
    }

    /// Sends the publisher confirms accumulated during the last input batch.
    /// `synced` is the group-commit epoch reached so far. Returns true while confirms still
    /// wait for a later sync round.
    pub fn flush_confirms(
        &mut self,
        synced: u64,
        round_failed: &dyn Fn(u64) -> bool,
        out: &mut BytesMut,
    ) -> Flushed {
        let id = self.id;
        let mut waiting = false;
        if let Some(c) = &mut self.confirms {
            let mut ack_upto = c.published;
            while let Some(w) = c.waiting.front().copied() {
                if w.epoch > synced {
                    ack_upto = w.seq - 1;
                    waiting = true;
                    break;
                }
                c.waiting.pop_front();
                // A round whose fdatasync failed made nothing durable: nack what waited on it.
                if w.nack || (w.epoch > 0 && round_failed(w.epoch)) {
                    // Acks before it go first, then the nack, so each tag is confirmed once.
                    ack_range(out, id, c.confirmed, w.seq - 1);
                    encode_basic_nack(out, id, w.seq, false, false);
                    c.confirmed = w.seq;
                }
            }
            ack_range(out, id, c.confirmed, ack_upto);
            c.confirmed = c.confirmed.max(ack_upto);
        }
        if let Some(epoch) = self.pending_commit {
            if epoch <= synced {
                self.pending_commit = None;
                if round_failed(epoch) {
                    // The commit did not reach the disk: the channel fails instead.
                    return Flushed {
                        waiting,
                        failed: Some(
                            AmqpError::new(
                                ReplyCode::InternalError,
                                "cannot make the transaction's messages durable",
                            )
                            .with_method(90, 20),
                        ),
                    };
                }
                reply(
                    out,
                    id,
                    AMQPClass::Tx(amqp_tx::AMQPMethod::CommitOk(amqp_tx::CommitOk {})),
                );
            } else {
                waiting = true;
            }
        }
        Flushed {
            waiting,
            failed: None,
        }
    }

    // ---- deliveries and acknowledgements ----

    /// Writes a delivery a queue handed to one of this channel's consumers.
    pub fn deliver(&mut self, d: Delivery, frame_max: u32, out: &mut BytesMut) {
        if self.closing || d.consumer.is_cancelled() {
            Self::bounce(d);
            return;
        }
        self.last_tag += 1;
        let tag = self.last_tag;
        let m = &d.item.msg;
        encode_deliver(
            out,
            self.id,
            &d.consumer.tag,
            tag,
            d.item.redelivered,
            &m.exchange,
            m.routing_key_str(),
            &m.properties,
            &m.body,
            frame_max,
        );
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
    }

    /// A delivery that can no longer be written: back to its queue, credit returned.
    pub fn bounce(d: Delivery) {
        d.bounce();
    }

    fn settle(
        &mut self,
        ctx: &Ctx,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), AmqpError> {
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
        let _ = ctx;
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

    fn dispatch_consumer_queues(&self) {
        let mut seen: Vec<&Arc<Queue>> = Vec::new();
        for (_, q) in self.consumers.values() {
            if !seen.iter().any(|s| Arc::ptr_eq(s, q)) {
                seen.push(q);
                q.dispatch();
            }
        }
    }

    /// The queue of a consumer of ours went away.
    pub fn consumer_gone(&mut self, tag: &str, notify: bool, out: &mut BytesMut) {
        if self.consumers.remove(tag).is_some() && notify && !self.closing {
            reply(
                out,
                self.id,
                AMQPClass::Basic(amqp_basic::AMQPMethod::Cancel(amqp_basic::Cancel {
                    consumer_tag: short_string_truncated(tag),
                    nowait: true,
                })),
            );
        }
    }

    /// Tears the channel down: consumers cancelled, unacked deliveries requeued.
    pub fn close(&mut self, vhost: Option<&Arc<VHost>>) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.content = Content::Idle;
        // Nothing may follow channel.close on this channel, not even confirms.
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
                if let Some(vh) = vhost {
                    vh.remove_queue(&q);
                }
            }
        }
    }

    // ---- basic.* control methods ----

    fn basic(
        &mut self,
        ctx: &Ctx,
        m: amqp_basic::AMQPMethod,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_basic::AMQPMethod as B;
        let vhost = ctx.vhost()?;
        match m {
            B::Qos(q) => {
                if q.global {
                    self.credit.set_prefetch(u32::from(q.prefetch_count));
                } else {
                    self.consumer_prefetch = u32::from(q.prefetch_count);
                }
                reply(
                    out,
                    self.id,
                    AMQPClass::Basic(B::QosOk(amqp_basic::QosOk {})),
                );
                Ok(())
            }
            B::Consume(c) => {
                let qname = self.queue_name(c.queue.as_str())?;
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
                    let q = vhost.declare_reply_queue(ctx.connection);
                    self.reply_queue = Some(q.name().to_owned());
                    q
                } else {
                    vhost.queue_for(ctx.connection, &qname)?
                };
                if q.is_stream() {
                    let what = format!("queue '{qname}' in vhost '{}'", vhost.name);
                    if c.no_ack {
                        return Err(AmqpError::new(
                            ReplyCode::NotImplemented,
                            format!(
                                "automatic acknowledgement not supported by stream queues {what}"
                            ),
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
                let tag = if c.consumer_tag.as_str().is_empty() {
                    generate_name("amq.ctag-")
                } else {
                    c.consumer_tag.as_str().to_owned()
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
                    ctx.connection,
                    c.no_ack,
                    c.exclusive,
                    c.arguments,
                    self.consumer_prefetch,
                    self.credit.clone(),
                    ctx.outlet.clone(),
                ));
                // Register before replying: if it fails the client must not see consume-ok.
                // Deliveries it triggers travel through the outlet and are written after this
                // reply.
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
                if !c.nowait {
                    reply(
                        out,
                        self.id,
                        AMQPClass::Basic(B::ConsumeOk(amqp_basic::ConsumeOk {
                            consumer_tag: short_string_truncated(&tag),
                        })),
                    );
                }
                Ok(())
            }
            B::Cancel(c) => {
                if let Some((consumer, q)) = self.consumers.remove(c.consumer_tag.as_str()) {
                    if self.reply_queue.as_deref() == Some(q.name()) {
                        self.reply_queue = None;
                    }
                    consumer.cancel();
                    if q.remove_consumer(&consumer) {
                        vhost.remove_queue(&q);
                    }
                }
                if !c.nowait {
                    reply(
                        out,
                        self.id,
                        AMQPClass::Basic(B::CancelOk(amqp_basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            B::Get(g) => {
                let qname = self.queue_name(g.queue.as_str())?;
                let q = vhost.queue_for(ctx.connection, &qname)?;
                if q.is_stream() {
                    return Err(AmqpError::new(
                        ReplyCode::NotImplemented,
                        format!(
                            "basic.get not supported by stream queues queue '{qname}' in vhost '{}'",
                            vhost.name
                        ),
                    ));
                }
                match q.get(!g.no_ack) {
                    Some((item, left)) => {
                        self.last_tag += 1;
                        let tag = self.last_tag;
                        let m = &item.msg;
                        encode_get_ok(
                            out,
                            self.id,
                            tag,
                            item.redelivered,
                            &m.exchange,
                            m.routing_key_str(),
                            left,
                            &m.properties,
                            &m.body,
                            ctx.frame_max,
                        );
                        if !g.no_ack {
                            self.unacked.push_back(Unacked {
                                tag,
                                queue: q,
                                seq: item.seq,
                                consumer: None,
                            });
                        }
                    }
                    None => reply(
                        out,
                        self.id,
                        AMQPClass::Basic(B::GetEmpty(amqp_basic::GetEmpty {})),
                    ),
                }
                Ok(())
            }
            B::Recover(amqp_basic::Recover { requeue: false })
            | B::RecoverAsync(amqp_basic::RecoverAsync { requeue: false }) => {
                Err(AmqpError::new(ReplyCode::NotImplemented, "requeue=false"))
            }
            B::Recover(_) | B::RecoverAsync(_) => {
                let items: Vec<(Unacked, Settle)> = self
                    .unacked
                    .drain(..)
                    .map(|u| (u, Settle::Requeue))
                    .collect();
                self.apply_settles(items);
                if matches!(m, B::Recover(_)) {
                    reply(
                        out,
                        self.id,
                        AMQPClass::Basic(B::RecoverOk(amqp_basic::RecoverOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(command_invalid()),
        }
    }

    /// An empty queue name means the channel's last declared queue.
    fn queue_name(&self, given: &str) -> Result<String, AmqpError> {
        if !given.is_empty() {
            return Ok(given.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::new(ReplyCode::NotFound, "no previously declared queue"))
    }

    fn exchange(
        &mut self,
        ctx: &Ctx,
        m: amqp_exchange::AMQPMethod,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_exchange::AMQPMethod as X;
        let vhost = ctx.vhost()?;
        let (nowait, ok) = match m {
            X::Declare(d) => {
                vhost.declare_exchange(ExchangeDeclare {
                    name: d.exchange.as_str(),
                    kind: d.kind.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })?;
                (d.nowait, X::DeclareOk(amqp_exchange::DeclareOk {}))
            }
            X::Delete(d) => {
                vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                (d.nowait, X::DeleteOk(amqp_exchange::DeleteOk {}))
            }
            X::Bind(b) => {
                vhost.bind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (b.nowait, X::BindOk(amqp_exchange::BindOk {}))
            }
            X::Unbind(b) => {
                vhost.unbind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (b.nowait, X::UnbindOk(amqp_exchange::UnbindOk {}))
            }
            _ => return Err(command_invalid()),
        };
        if !nowait {
            reply(out, self.id, AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    fn queue(
        &mut self,
        ctx: &Ctx,
        m: amqp_queue::AMQPMethod,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_queue::AMQPMethod as Q;
        let vhost = ctx.vhost()?;
        let (nowait, ok) = match m {
            Q::Declare(d) => {
                let q = vhost.declare_queue(
                    ctx.connection,
                    QueueDeclare {
                        name: d.queue.as_str(),
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    },
                )?;
                self.last_queue = Some(q.name().to_owned());
                (
                    d.nowait,
                    Q::DeclareOk(amqp_queue::DeclareOk {
                        queue: short_string_truncated(q.name()),
                        message_count: q.message_count(),
                        consumer_count: q.consumer_count(),
                    }),
                )
            }
            Q::Bind(b) => {
                let qname = self.queue_name(b.queue.as_str())?;
                let key = if b.queue.as_str().is_empty() && b.routing_key.as_str().is_empty() {
                    qname.clone()
                } else {
                    b.routing_key.as_str().to_owned()
                };
                vhost.bind_queue(
                    ctx.connection,
                    &qname,
                    b.exchange.as_str(),
                    &key,
                    b.arguments,
                )?;
                (b.nowait, Q::BindOk(amqp_queue::BindOk {}))
            }
            Q::Unbind(b) => {
                let qname = self.queue_name(b.queue.as_str())?;
                vhost.unbind_queue(
                    ctx.connection,
                    &qname,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (false, Q::UnbindOk(amqp_queue::UnbindOk {}))
            }
            Q::Purge(p) => {
                let qname = self.queue_name(p.queue.as_str())?;
                let n = vhost.queue_for(ctx.connection, &qname)?.purge();
                (
                    p.nowait,
                    Q::PurgeOk(amqp_queue::PurgeOk { message_count: n }),
                )
            }
            Q::Delete(d) => {
                let qname = self.queue_name(d.queue.as_str())?;
                let n = vhost.delete_queue(ctx.connection, &qname, d.if_unused, d.if_empty)?;
                (
                    d.nowait,
                    Q::DeleteOk(amqp_queue::DeleteOk { message_count: n }),
                )
            }
            _ => return Err(command_invalid()),
        };
        if !nowait {
            reply(out, self.id, AMQPClass::Queue(ok));
        }
        Ok(())
    }

    fn tx(
        &mut self,
        ctx: &Ctx,
        m: amqp_tx::AMQPMethod,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_tx::AMQPMethod as T;
        let not_tx = || {
            AmqpError::new(
                ReplyCode::PreconditionFailed,
                "channel is not transactional",
            )
        };
        match m {
            T::Select(_) => {
                if self.confirms.is_some() {
                    return Err(AmqpError::new(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Tx::default);
                reply(
                    out,
                    self.id,
                    AMQPClass::Tx(T::SelectOk(amqp_tx::SelectOk {})),
                );
            }
            T::Commit(_) => {
                let tx = std::mem::take(self.tx.as_mut().ok_or_else(not_tx)?);
                let mut durable_at = None;
                for p in tx.publishes {
                    let o = self.route(ctx, &p.exchange, p.msg, p.mandatory, out);
                    durable_at = durable_at.max(o.durable_at);
                }
                self.apply_settles(tx.settles);
                match durable_at {
                    // commit-ok once the persistent messages are on disk (see flush_confirms).
                    Some(epoch) => self.pending_commit = Some(epoch),
                    None => reply(
                        out,
                        self.id,
                        AMQPClass::Tx(T::CommitOk(amqp_tx::CommitOk {})),
                    ),
                }
            }
            T::Rollback(_) => {
                let tx = std::mem::take(self.tx.as_mut().ok_or_else(not_tx)?);
                // Acks taken back: the deliveries are unacked again, in tag order.
                for (u, _) in tx.settles {
                    let pos = self.unacked.partition_point(|x| x.tag < u.tag);
                    self.unacked.insert(pos, u);
                }
                reply(
                    out,
                    self.id,
                    AMQPClass::Tx(T::RollbackOk(amqp_tx::RollbackOk {})),
                );
            }
            _ => return Err(command_invalid()),
        }
        Ok(())
    }
}

/// What flushing confirms left to do.
#[derive(Debug)]
pub(crate) struct Flushed {
    /// Confirms still wait for a later sync round.
    pub waiting: bool,
    /// The channel must fail with this error (a transaction could not be made durable).
    pub failed: Option<AmqpError>,
}

/// Acks (confirmed, upto] with one frame.
fn ack_range(out: &mut BytesMut, channel: u16, confirmed: u64, upto: u64) {
    if upto > confirmed {
        encode_basic_ack(out, channel, upto, upto - confirmed > 1);
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

fn command_invalid() -> AmqpError {
    AmqpError::new(ReplyCode::CommandInvalid, "method not valid from a client")
}
