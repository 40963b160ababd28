//! The in-process transport: a [`Session`] on the broker this job runs inside.
//!
//! Deliveries arrive in the session's [`Inbox`], which wakes the job's operator; the messages
//! are the broker's own (`Arc<Message>`), so a body is never copied or re-encoded between
//! the queue and the job. Publishing is a function call into the broker; confirms come from
//! the same group commit that confirms wire publishers, through the same code.

use super::unconfirmed::Unconfirmed;
use super::{
    ConsumeSpec, Credentials, PublishSpec, QueueSetup, SinkTransport, SourceTransport, Waker,
};
use crate::error::ConnectError;
use crate::message::{Content, DeliveryTag, Incoming, Outgoing};
use bytes::Bytes;
use rill_broker::queue::Queue;
use rill_broker::session::{Confirm, ConsumeOptions, Inbox, Session};
use rill_broker::vhost::QueueDeclare;
use rill_broker::{Broker, ConnEvent};
use rill_codec::ReplyCode;
use std::sync::Arc;

fn open(
    broker: &Broker,
    creds: &Credentials,
    waker: Waker,
) -> Result<(Session, Arc<Inbox>), ConnectError> {
    let inbox = Arc::new(Inbox::with_waker(move || waker()));
    let session = Session::open(
        broker,
        &creds.vhost,
        &creds.user,
        &creds.password,
        inbox.clone(),
    )
    .map_err(|e| {
        ConnectError::refused(
            format!(
                "opening a session as '{}' on vhost '{}'",
                creds.user, creds.vhost
            ),
            &e,
        )
    })?;
    Ok((session, inbox))
}

/// Declares or checks `name` as `setup` says.
pub(crate) fn setup_queue(
    session: &mut Session,
    name: &str,
    setup: &QueueSetup,
) -> Result<Arc<Queue>, ConnectError> {
    let what = || format!("queue '{name}'");
    match setup {
        QueueSetup::Existing => session
            .declare_queue(QueueDeclare::passive(name))
            .map_err(|e| ConnectError::refused(what(), &e)),
        QueueSetup::DeclareIfMissing { durable, arguments } => match session.queue(name) {
            Ok(q) => Ok(q),
            Err(e) if e.code == ReplyCode::NotFound => session
                .declare_queue(QueueDeclare {
                    durable: *durable,
                    arguments: arguments.clone(),
                    ..QueueDeclare::durable(name)
                })
                .map_err(|e| ConnectError::refused(what(), &e)),
            Err(e) => Err(ConnectError::refused(what(), &e)),
        },
    }
}

/// Consumes one queue of the broker this process runs.
pub struct EmbeddedSource {
    session: Session,
    inbox: Arc<Inbox>,
    queue: Arc<Queue>,
    events: Vec<ConnEvent>,
}

impl std::fmt::Debug for EmbeddedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSource")
            .field("queue", &self.queue.name())
            .finish_non_exhaustive()
    }
}

impl EmbeddedSource {
    /// Opens a session, sets the queue up, and starts consuming with `spec.prefetch`.
    pub fn start(
        broker: &Broker,
        creds: &Credentials,
        spec: &ConsumeSpec,
        waker: Waker,
    ) -> Result<EmbeddedSource, ConnectError> {
        let (mut session, inbox) = open(broker, creds, waker)?;
        let queue = setup_queue(&mut session, &spec.queue, &spec.setup)?;
        let consume = || format!("consuming from queue '{}'", spec.queue);
        session
            .qos(spec.prefetch, false)
            .map_err(|e| ConnectError::refused(consume(), &e))?;
        session
            .consume(ConsumeOptions {
                arguments: spec.arguments.clone(),
                ..ConsumeOptions::new(&spec.queue)
            })
            .map_err(|e| ConnectError::refused(consume(), &e))?;
        Ok(EmbeddedSource {
            session,
            inbox,
            queue,
            events: Vec::new(),
        })
    }
}

impl SourceTransport for EmbeddedSource {
    fn poll(&mut self, out: &mut Vec<Incoming>) -> Result<(), ConnectError> {
        self.inbox.drain_into(&mut self.events);
        for event in self.events.drain(..) {
            match event {
                ConnEvent::Deliver(d) => {
                    if let Some(got) = self.session.deliver(d) {
                        out.push(Incoming {
                            tag: DeliveryTag {
                                generation: 0,
                                tag: got.tag,
                            },
                            redelivered: got.redelivered,
                            content: Content::Local(got.message),
                        });
                    }
                }
                ConnEvent::ConsumerCancelled { .. } => {
                    return Err(ConnectError::refused_code(
                        format!("consuming from queue '{}'", self.queue.name()),
                        ReplyCode::NotFound.code(),
                        "the queue was deleted",
                    ))
                }
                ConnEvent::ForceClose { code, text } => {
                    return Err(ConnectError::refused_code(
                        "the broker closed the session",
                        code,
                        text,
                    ))
                }
                ConnEvent::Blocked(_) | ConnEvent::Synced(_) => {}
            }
        }
        Ok(())
    }

    fn ack_upto(&mut self, tag: DeliveryTag) -> Result<(), ConnectError> {
        self.session
            .ack(tag.tag, true)
            .map_err(|e| ConnectError::refused("acknowledging deliveries", &e))
    }

    fn reject(&mut self, tag: DeliveryTag) -> Result<(), ConnectError> {
        self.session
            .nack(tag.tag, false, false)
            .map_err(|e| ConnectError::refused("rejecting a delivery", &e))
    }

    fn queue_depth(&self) -> Option<u64> {
        Some(u64::from(self.queue.message_count()))
    }

    fn stream_end(&self) -> Option<u64> {
        self.queue.stream_next_offset()
    }

    fn close(&mut self) -> Result<(), ConnectError> {
        self.session.close();
        Ok(())
    }
}

/// Publishes with confirms into the broker this process runs. While a resource alarm is in
/// force it holds messages back, as a blocked client connection would.
pub struct EmbeddedSink {
    session: Session,
    inbox: Arc<Inbox>,
    exchange: Bytes,
    pending: Unconfirmed,
    blocked: bool,
    events: Vec<ConnEvent>,
}

impl std::fmt::Debug for EmbeddedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSink")
            .field("outstanding", &self.pending.outstanding())
            .finish_non_exhaustive()
    }
}

impl EmbeddedSink {
    /// Opens a session in confirm mode and sets up the target queue, if any.
    pub fn start(
        broker: &Broker,
        creds: &Credentials,
        spec: &PublishSpec,
        waker: Waker,
    ) -> Result<EmbeddedSink, ConnectError> {
        let (mut session, inbox) = open(broker, creds, waker)?;
        if let Some((queue, setup)) = &spec.queue {
            setup_queue(&mut session, queue, setup)?;
        }
        if !spec.exchange.is_empty() {
            session
                .vhost()
                .exchange(&spec.exchange)
                .map_err(|e| ConnectError::refused(format!("exchange '{}'", spec.exchange), &e))?;
        }
        session
            .confirm_select()
            .map_err(|e| ConnectError::refused("enabling publisher confirms", &e))?;
        Ok(EmbeddedSink {
            session,
            inbox,
            exchange: Bytes::copy_from_slice(spec.exchange.as_bytes()),
            pending: Unconfirmed::new(),
            blocked: false,
            events: Vec::new(),
        })
    }

    fn handle_events(&mut self) -> Result<(), ConnectError> {
        self.inbox.drain_into(&mut self.events);
        for event in self.events.drain(..) {
            match event {
                ConnEvent::Blocked(reason) => self.blocked = reason.is_some(),
                ConnEvent::ForceClose { code, text } => {
                    return Err(ConnectError::refused_code(
                        "the broker closed the session",
                        code,
                        text,
                    ))
                }
                ConnEvent::Deliver(d) => d.bounce(),
                ConnEvent::ConsumerCancelled { .. } | ConnEvent::Synced(_) => {}
            }
        }
        Ok(())
    }

    /// Publishes what waits, unless an alarm holds publishers back.
    fn send(&mut self) -> Result<(), ConnectError> {
        if self.blocked {
            return Ok(());
        }
        // One sync round for everything published in this pass.
        let _batch = rill_store::SyncGroup::defer_start();
        let mut seqs = Vec::with_capacity(SEND_BATCH);
        let mut published = Vec::with_capacity(SEND_BATCH);
        loop {
            seqs.clear();
            published.clear();
            let batch: Vec<(Bytes, Bytes, Bytes)> = self
                .pending
                .unsent()
                .take(SEND_BATCH)
                .map(|(seq, msg)| {
                    seqs.push(seq);
                    (
                        Bytes::copy_from_slice(msg.routing_key.as_bytes()),
                        msg.properties.encoded(),
                        msg.body.clone(),
                    )
                })
                .collect();
            if batch.is_empty() {
                return Ok(());
            }
            let result = self
                .session
                .publish_batch(&self.exchange, batch, &mut published);
            for (seq, p) in seqs.iter().zip(&published) {
                match p.seq {
                    Some(wire) => self.pending.sent(*seq, wire),
                    None => {
                        return Err(ConnectError::Config(
                            "the sink's session is not in confirm mode".into(),
                        ))
                    }
                }
            }
            result.map_err(|e| ConnectError::refused("publishing", &e))?;
        }
    }
}

/// Messages an embedded sink publishes under one lock of its queue: enough to hand the queue
/// to its consumers rarely, few enough that they are not kept waiting long.
const SEND_BATCH: usize = 256;

impl SinkTransport for EmbeddedSink {
    /// Queues the message; it is published at the next [`SinkTransport::poll_confirmed`],
    /// which the job's sink calls once per batch of records. Publishing a batch together
    /// starts one sync round for it, where one per message woke the sync thread (and the
    /// sink queue's consumer) hundreds of thousands of times a second.
    fn publish(&mut self, msg: Outgoing) -> Result<u64, ConnectError> {
        Ok(self.pending.push(msg))
    }

    fn poll_confirmed(&mut self) -> Result<u64, ConnectError> {
        self.handle_events()?;
        self.send()?;
        let pending = &mut self.pending;
        self.session.poll_confirms(&mut |c| match c {
            Confirm::Ack { upto, multiple } => pending.acked(upto, multiple),
            Confirm::Nack(seq) => pending.nacked(seq, false),
        });
        self.send()?;
        Ok(self.pending.confirmed_upto())
    }

    fn outstanding(&self) -> u64 {
        self.pending.outstanding()
    }

    fn close(&mut self) -> Result<(), ConnectError> {
        self.session.close();
        Ok(())
    }
}
