//! One AMQP channel: the wire adapter over a [`Session`]. It assembles publishes from method,
//! header and body frames, turns methods into session calls, and encodes what the session
//! answers (replies, deliveries, returns, confirms) into the connection's output buffer.
//! Everything a channel *means* lives in the session, which in-process users drive directly.

use crate::consumer::Delivery;
use crate::message::Message;
use crate::session::{CommitOutcome, ConfirmClock, ConsumeOptions, Delivered, Session};
use crate::vhost::{ExchangeDeclare, QueueDeclare};
use bytes::{Bytes, BytesMut};
use rill_codec::amq_protocol::protocol::{
    access as amqp_access, basic as amqp_basic, channel as amqp_channel, confirm as amqp_confirm,
    exchange as amqp_exchange, queue as amqp_queue, tx as amqp_tx,
};
use rill_codec::{
    decode_content_header, encode_basic_ack, encode_basic_nack, encode_deliver, encode_get_ok,
    encode_method, encode_return, short_string_truncated, AMQPClass, AmqpError, ContentHeader,
    Method, Publish, ReplyCode,
};
use std::sync::Arc;

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

#[derive(Debug)]
pub(crate) struct Channel {
    session: Session,
    content: Content,
}

fn reply(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    encode_method(out, channel, &method);
}

impl Channel {
    pub fn new(session: Session) -> Channel {
        Channel {
            session,
            content: Content::Idle,
        }
    }

    fn id(&self) -> u16 {
        self.session.id()
    }

    pub fn is_closing(&self) -> bool {
        self.session.is_closing()
    }

    pub fn handle_method(
        &mut self,
        method: Method,
        frame_max: u32,
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
        let id = self.id();
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
            } => self.session.ack(delivery_tag, multiple),
            Method::Nack {
                delivery_tag,
                multiple,
                requeue,
            } => self.session.nack(delivery_tag, multiple, requeue),
            Method::Reject {
                delivery_tag,
                requeue,
            } => self.session.nack(delivery_tag, false, requeue),
            Method::Qos {
                prefetch_size,
                prefetch_count,
                global,
            } => self.qos(prefetch_size, prefetch_count, global, out),
            Method::Other(AMQPClass::Basic(m)) => self.basic(m, frame_max, out),
            Method::Other(AMQPClass::Exchange(m)) => self.exchange(m, out),
            Method::Other(AMQPClass::Queue(m)) => self.queue(m, out),
            Method::Other(AMQPClass::Confirm(amqp_confirm::AMQPMethod::Select(s))) => {
                self.session.confirm_select()?;
                if !s.nowait {
                    reply(
                        out,
                        id,
                        AMQPClass::Confirm(amqp_confirm::AMQPMethod::SelectOk(
                            amqp_confirm::SelectOk {},
                        )),
                    );
                }
                Ok(())
            }
            Method::Other(AMQPClass::Tx(m)) => self.tx(m, frame_max, out),
            Method::Other(AMQPClass::Channel(m)) => match m {
                amqp_channel::AMQPMethod::Flow(f) => {
                    // RabbitMQ 3.x no longer lets clients pause deliveries this way.
                    if !f.active {
                        return Err(AmqpError::new(ReplyCode::NotImplemented, "active=false"));
                    }
                    reply(
                        out,
                        id,
                        AMQPClass::Channel(amqp_channel::AMQPMethod::FlowOk(
                            amqp_channel::FlowOk { active: f.active },
                        )),
                    );
                    self.session.dispatch_consumer_queues();
                    Ok(())
                }
                amqp_channel::AMQPMethod::FlowOk(_) => Ok(()),
                _ => Err(command_invalid()),
            },
            Method::Other(AMQPClass::Access(amqp_access::AMQPMethod::Request(_))) => {
                reply(
                    out,
                    id,
                    AMQPClass::Access(amqp_access::AMQPMethod::RequestOk(
                        amqp_access::RequestOk {},
                    )),
                );
                Ok(())
            }
            Method::Other(_) => Err(command_invalid()),
        }
    }

    fn qos(
        &mut self,
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        if prefetch_size != 0 {
            return Err(AmqpError::new(
                ReplyCode::NotImplemented,
                format!("prefetch_size!=0 ({prefetch_size})"),
            ));
        }
        self.session.qos(u32::from(prefetch_count), global)?;
        reply(
            out,
            self.id(),
            AMQPClass::Basic(amqp_basic::AMQPMethod::QosOk(amqp_basic::QosOk {})),
        );
        Ok(())
    }

    // ---- publishing ----

    pub fn content_header(
        &mut self,
        payload: Bytes,
        frame_max: u32,
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
        let max = self.session.max_message_size();
        if header.body_size > max {
            self.content = Content::Discard {
                remaining: header.body_size,
                error: AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "message size {} is larger than configured max size {max}",
                        header.body_size
                    ),
                )
                .with_method(60, 40),
            };
            return Ok(());
        }
        if header.body_size == 0 {
            return self.publish_complete(publish, header, Bytes::new(), frame_max, out);
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
        payload: Bytes,
        frame_max: u32,
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
        self.publish_complete(publish, header, body.freeze(), frame_max, out)
    }

    fn publish_complete(
        &mut self,
        publish: Publish,
        header: ContentHeader,
        body: Bytes,
        frame_max: u32,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        let published = self
            .session
            .publish(&publish, header.properties, body)
            .map_err(|e| e.with_method(60, 40))?;
        if let Some(msg) = published.returned {
            encode_returned(out, self.id(), &msg, frame_max);
        }
        Ok(())
    }

    /// Whether a queue this channel published to still wants publishers paused.
    pub fn publish_paused(&mut self) -> bool {
        self.session.publish_paused()
    }

    /// Sends the publisher confirms (and a transaction's commit-ok) that became due.
    pub fn flush_confirms(&mut self, clock: &ConfirmClock, out: &mut BytesMut) -> Flushed {
        let id = self.id();
        let poll = self.session.take_confirms(clock, &mut |c| match c {
            crate::session::Confirm::Ack { upto, multiple } => {
                encode_basic_ack(out, id, upto, multiple)
            }
            crate::session::Confirm::Nack(seq) => encode_basic_nack(out, id, seq, false, false),
        });
        let mut failed = None;
        match poll.commit {
            Some(Ok(())) => reply(
                out,
                id,
                AMQPClass::Tx(amqp_tx::AMQPMethod::CommitOk(amqp_tx::CommitOk {})),
            ),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
        Flushed {
            waiting: poll.waiting,
            failed,
        }
    }

    // ---- deliveries ----

    /// Writes a delivery a queue handed to one of this channel's consumers.
    pub fn deliver(&mut self, d: Delivery, frame_max: u32, out: &mut BytesMut) {
        let Some(delivered) = self.session.deliver(d) else {
            return;
        };
        let m = &delivered.message;
        encode_deliver(
            out,
            self.id(),
            delivered.consumer_tag(),
            delivered.tag,
            delivered.redelivered,
            &m.exchange,
            m.routing_key_str(),
            &m.properties,
            &m.body,
            frame_max,
        );
    }

    /// The queue of a consumer of ours went away: tell the client (basic.cancel) if it asked.
    pub fn consumer_gone(&mut self, tag: &str, notify: bool, out: &mut BytesMut) {
        if self.session.consumer_gone(tag) && notify && !self.is_closing() {
            reply(
                out,
                self.id(),
                AMQPClass::Basic(amqp_basic::AMQPMethod::Cancel(amqp_basic::Cancel {
                    consumer_tag: short_string_truncated(tag),
                    nowait: true,
                })),
            );
        }
    }

    /// Tears the channel down: consumers cancelled, unacked deliveries requeued.
    pub fn close(&mut self) {
        self.content = Content::Idle;
        self.session.close();
    }

    // ---- basic.* control methods ----

    fn basic(
        &mut self,
        m: amqp_basic::AMQPMethod,
        frame_max: u32,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_basic::AMQPMethod as B;
        let id = self.id();
        match m {
            B::Qos(q) => self.qos(0, q.prefetch_count, q.global, out),
            B::Consume(c) => {
                let tag = self.session.consume(ConsumeOptions {
                    queue: c.queue.as_str().to_owned(),
                    consumer_tag: c.consumer_tag.as_str().to_owned(),
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    arguments: c.arguments,
                })?;
                if !c.nowait {
                    reply(
                        out,
                        id,
                        AMQPClass::Basic(B::ConsumeOk(amqp_basic::ConsumeOk {
                            consumer_tag: short_string_truncated(&tag),
                        })),
                    );
                }
                Ok(())
            }
            B::Cancel(c) => {
                self.session.cancel(c.consumer_tag.as_str());
                if !c.nowait {
                    reply(
                        out,
                        id,
                        AMQPClass::Basic(B::CancelOk(amqp_basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            B::Get(g) => {
                match self.session.get(g.queue.as_str(), g.no_ack)? {
                    Some((d, left)) => encode_got(out, id, &d, left, frame_max),
                    None => reply(
                        out,
                        id,
                        AMQPClass::Basic(B::GetEmpty(amqp_basic::GetEmpty {})),
                    ),
                }
                Ok(())
            }
            B::Recover(r) => {
                self.session.recover(r.requeue)?;
                reply(
                    out,
                    id,
                    AMQPClass::Basic(B::RecoverOk(amqp_basic::RecoverOk {})),
                );
                Ok(())
            }
            B::RecoverAsync(r) => self.session.recover(r.requeue),
            _ => Err(command_invalid()),
        }
    }

    fn exchange(
        &mut self,
        m: amqp_exchange::AMQPMethod,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_exchange::AMQPMethod as X;
        let (nowait, ok) = match m {
            X::Declare(d) => {
                self.session.declare_exchange(ExchangeDeclare {
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
                self.session
                    .delete_exchange(d.exchange.as_str(), d.if_unused)?;
                (d.nowait, X::DeleteOk(amqp_exchange::DeleteOk {}))
            }
            X::Bind(b) => {
                self.session.bind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (b.nowait, X::BindOk(amqp_exchange::BindOk {}))
            }
            X::Unbind(b) => {
                self.session.unbind_exchange(
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
            reply(out, self.id(), AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    fn queue(&mut self, m: amqp_queue::AMQPMethod, out: &mut BytesMut) -> Result<(), AmqpError> {
        use amqp_queue::AMQPMethod as Q;
        let (nowait, ok) = match m {
            Q::Declare(d) => {
                let q = self.session.declare_queue(QueueDeclare {
                    name: d.queue.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                })?;
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
                self.session.bind_queue(
                    b.queue.as_str(),
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (b.nowait, Q::BindOk(amqp_queue::BindOk {}))
            }
            Q::Unbind(b) => {
                self.session.unbind_queue(
                    b.queue.as_str(),
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                (false, Q::UnbindOk(amqp_queue::UnbindOk {}))
            }
            Q::Purge(p) => {
                let n = self.session.purge_queue(p.queue.as_str())?;
                (
                    p.nowait,
                    Q::PurgeOk(amqp_queue::PurgeOk { message_count: n }),
                )
            }
            Q::Delete(d) => {
                let n = self
                    .session
                    .delete_queue(d.queue.as_str(), d.if_unused, d.if_empty)?;
                (
                    d.nowait,
                    Q::DeleteOk(amqp_queue::DeleteOk { message_count: n }),
                )
            }
            _ => return Err(command_invalid()),
        };
        if !nowait {
            reply(out, self.id(), AMQPClass::Queue(ok));
        }
        Ok(())
    }

    fn tx(
        &mut self,
        m: amqp_tx::AMQPMethod,
        frame_max: u32,
        out: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        use amqp_tx::AMQPMethod as T;
        let id = self.id();
        match m {
            T::Select(_) => {
                self.session.tx_select()?;
                reply(out, id, AMQPClass::Tx(T::SelectOk(amqp_tx::SelectOk {})));
            }
            T::Commit(_) => {
                let outcome = self
                    .session
                    .tx_commit(&mut |msg| encode_returned(out, id, &msg, frame_max))?;
                if let CommitOutcome::Done = outcome {
                    reply(out, id, AMQPClass::Tx(T::CommitOk(amqp_tx::CommitOk {})));
                }
            }
            T::Rollback(_) => {
                self.session.tx_rollback()?;
                reply(
                    out,
                    id,
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

/// basic.return 312 NO_ROUTE for an unroutable `mandatory` publish.
fn encode_returned(out: &mut BytesMut, channel: u16, msg: &Arc<Message>, frame_max: u32) {
    encode_return(
        out,
        channel,
        312,
        "NO_ROUTE",
        &msg.exchange,
        msg.routing_key_str(),
        &msg.properties,
        &msg.body,
        frame_max,
    );
}

fn encode_got(out: &mut BytesMut, channel: u16, d: &Delivered, left: u32, frame_max: u32) {
    let m = &d.message;
    encode_get_ok(
        out,
        channel,
        d.tag,
        d.redelivered,
        &m.exchange,
        m.routing_key_str(),
        left,
        &m.properties,
        &m.body,
        frame_max,
    );
}

fn command_invalid() -> AmqpError {
    AmqpError::new(ReplyCode::CommandInvalid, "method not valid from a client")
}
