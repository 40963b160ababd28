//! Rill's connectors: stream jobs that read from queues and write to queues, against the
//! broker they run inside or any AMQP 0-9-1 broker over TCP.
//!
//! This is the one crate where the broker and the stream engine meet: `rill-stream` knows
//! nothing of queues and `rill-broker` nothing of jobs.
//!
//! # Layout
//! - [`transport`]: how a connector talks to a broker, one interface with two
//!   implementations: [`transport::embedded`] (an in-process [`rill_broker::Session`]) and
//!   [`transport::amqp`] (lapin over TCP, reconnecting with backoff).
//! - [`message`]: messages as read ([`message::Incoming`]) and as published
//!   ([`message::Outgoing`]).
//! - [`format`]: decoders and encoders (raw bytes, UTF-8 text, JSON) and the bad-input
//!   policy.
//! - [`error`]: [`ConnectError`], with the broker's reply code and a retry hint.

pub mod error;
pub mod format;
pub mod message;
pub mod transport;

pub use error::ConnectError;
