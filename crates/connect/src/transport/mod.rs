//! Transports: how a connector talks to a broker. Two implementations of one interface:
//!
//! - [`embedded`]: a [`rill_broker::Session`] in the same process (`rill server --job`):
//!   no socket, no encoding, deliveries share the broker's message buffers;
//! - [`amqp`]: AMQP 0-9-1 over TCP with lapin, against any broker (Rill or RabbitMQ), with
//!   reconnection and backoff.
//!
//! Both are polled, never blocking: sources and sinks run inside timely workers, which must
//! not block. A transport wakes its owner through a [`Waker`] when something arrives
//! (deliveries, confirms), from whatever thread noticed it.

pub mod amqp;
pub mod embedded;
mod unconfirmed;

use crate::error::ConnectError;
use crate::message::{DeliveryTag, Incoming, Outgoing};
use rill_codec::FieldTable;
use std::sync::Arc;

/// Wakes whoever polls a transport (a job's operator), from any thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What a connector does about the queue it reads or writes, before it starts.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueSetup {
    /// The queue must exist (a passive declare; 404 NOT_FOUND otherwise).
    Existing,
    /// If it is missing, declare it (durable or not, classic, with these arguments); if it
    /// exists, use it as it is.
    DeclareIfMissing {
        durable: bool,
        arguments: FieldTable,
    },
}

impl QueueSetup {
    /// Declare a durable classic queue if missing (what the built-in jobs do).
    pub fn durable() -> QueueSetup {
        QueueSetup::DeclareIfMissing {
            durable: true,
            arguments: FieldTable::default(),
        }
    }
}

/// What a source consumes.
#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    pub queue: String,
    pub setup: QueueSetup,
    /// Unacked deliveries the source may hold (`basic.qos` prefetch): the job never holds more
    /// than this from this consumer, which is the source's backpressure. In-process any
    /// number; AMQP 0-9-1 carries at most 65535 (larger values are capped there).
    pub prefetch: u32,
    /// Consumer arguments (`x-stream-offset`, `x-priority`).
    pub arguments: FieldTable,
}

/// Where a sink publishes: an exchange ("" is the default exchange, which routes by queue
/// name), and the queue to set up first, if any.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub exchange: String,
    /// A queue to declare (or check) before publishing, e.g. the target of the default
    /// exchange.
    pub queue: Option<(String, QueueSetup)>,
}

/// How a transport logs in and where: `amqp://user:pass@host:port/vhost` over TCP, or the
/// same credentials and vhost in-process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            user: "guest".into(),
            password: "guest".into(),
            vhost: "/".into(),
        }
    }
}

/// A consumer of one queue.
pub trait SourceTransport: 'static {
    /// Moves the deliveries that arrived into `out`, in delivery order. Never blocks.
    /// Errors are fatal for the source; a lost connection is not an error for transports
    /// that reconnect (their deliveries come back, redelivered, under a new generation).
    fn poll(&mut self, out: &mut Vec<Incoming>) -> Result<(), ConnectError>;
    /// Acknowledges every delivery up to and including `tag` (of the current generation;
    /// older generations are ignored: the broker requeued them when the connection broke).
    fn ack_upto(&mut self, tag: DeliveryTag) -> Result<(), ConnectError>;
    /// Rejects one delivery without requeue (to the queue's dead-letter exchange).
    fn reject(&mut self, tag: DeliveryTag) -> Result<(), ConnectError>;
    /// Messages waiting in the queue, when known (for progress logs).
    fn queue_depth(&self) -> Option<u64>;
    /// For a stream queue, the offset the next message will get, when known (for the
    /// offset-gap lag). The in-process transport knows it; AMQP 0-9-1 does not tell.
    fn stream_end(&self) -> Option<u64> {
        None
    }
    /// Consumer arguments to use if the transport has to consume again (after a
    /// reconnection), e.g. an `x-stream-offset` just past what was already read. Transports
    /// that never reconnect ignore it.
    fn resume_with(&mut self, arguments: FieldTable) {
        let _ = arguments;
    }
    /// Stops consuming; what was not acked goes back to the queue.
    fn close(&mut self) -> Result<(), ConnectError>;
}

/// A confirming publisher. Messages get consecutive sequence numbers from 1; the transport
/// keeps each until the broker confirms it, publishing it again after a nack or a
/// reconnection, so confirmation is eventually reported for every sequence number in order.
pub trait SinkTransport: 'static {
    /// Queues a message for publishing; returns its sequence number. Never blocks: the
    /// caller bounds what is outstanding ([`SinkTransport::outstanding`]). A transport may
    /// hold messages until the next [`SinkTransport::poll_confirmed`] to publish them
    /// together, so callers poll after a batch of publishes.
    fn publish(&mut self, msg: Outgoing) -> Result<u64, ConnectError>;
    /// The highest sequence number such that it and every one before it is confirmed.
    fn poll_confirmed(&mut self) -> Result<u64, ConnectError>;
    /// Messages published and not confirmed yet.
    fn outstanding(&self) -> u64;
    /// Stops publishing (after the caller has seen everything confirmed).
    fn close(&mut self) -> Result<(), ConnectError>;
}
