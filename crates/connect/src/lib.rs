//! Rill's connectors: stream jobs that read from queues and write to queues, against the
//! broker they run inside or any AMQP 0-9-1 broker over TCP.
//!
//! This is the one crate where the broker and the stream engine meet: `rill-stream` knows
//! nothing of queues and `rill-broker` nothing of jobs.
//!
//! # Layout
//! - [`source`]: [`QueueSource`], a queue consumed with manual acks inside a prefetch window,
//!   acked when the job is done with each epoch.
//! - [`stream_source`]: [`StreamSource`], stream queues read from an `x-stream-offset` as
//!   partitions, one worker each, with tracked positions.
//! - [`sink`]: [`QueueSink`], persistent publishes with confirms to an exchange or queue.
//! - [`exactly_once`]: input ids remembered across checkpoints, output held until its
//!   checkpoint completes (two-phase commit) with deterministic deduplication ids.
//! - [`endpoint`]: [`Endpoint`], where they connect: this process's broker or one over TCP.
//! - [`transport`]: how a connector talks to a broker, one interface with two
//!   implementations: [`transport::embedded`] (an in-process [`rill_broker::Session`]) and
//!   [`transport::amqp`] (lapin over TCP, reconnecting with backoff).
//! - [`message`]: messages as read ([`message::Incoming`]) and as published
//!   ([`message::Outgoing`]).
//! - [`format`]: decoders and encoders (raw bytes, UTF-8 text, JSON, with or without the
//!   message's metadata) and the bad-input policy.
//! - [`error`]: [`ConnectError`], with the broker's reply code and a retry hint.

pub mod endpoint;
pub mod error;
pub mod exactly_once;
pub mod format;
pub mod message;
pub mod sink;
pub mod source;
pub mod stream_source;
pub mod transport;

pub use endpoint::Endpoint;
pub use error::ConnectError;
pub use sink::{QueueSink, Routing};
pub use source::QueueSource;
pub use stream_source::{StartOffset, StreamSource};
