//! Rill's broker core: what an AMQP 0-9-1 broker *means*, without any I/O.
//!
//! # Layout
//! - [`broker`]: the [`Broker`] handle (vhosts, users, limits); clone it to share.
//! - [`vhost`]: a virtual host's exchanges and queues, declaration rules and routing.
//! - [`exchange`]: bindings and the matching rules of direct, fanout, topic and headers exchanges.
//! - [`queue`]: what every queue shares, and its kinds: [`queue::classic`] (messages, unacked
//!   deliveries and consumers; dispatch with prefetch, priorities, TTL, length limits, single
//!   active consumer) and [`queue::stream`] (an append-only log read from offsets, with
//!   retention).
//! - [`args`]: queue arguments (`x-...`), validated at declaration.
//! - [`deadletter`]: the `x-death` history of dead-lettered messages.
//! - [`dedup`]: message deduplication (queue argument and exchange type, as the RabbitMQ
//!   plugin and LavinMQ define it): arguments, message keys, the key cache.
//! - [`consumer`]: consumers, their credit, and the [`Outlet`] a queue delivers through.
//! - [`message`]: the shared, immutable message.
//! - [`jobs`]: progress counters of the stream jobs attached to the broker.
//! - [`durable`]: the bridge to `rill-store`: queue logs, deduplication key logs, group
//!   commit, definitions.
//! - [`session`]: one channel's semantics as a typed API (declare, publish with confirms,
//!   consume with prefetch, get, ack/nack/requeue, transactions, close); in-process users
//!   such as embedded stream jobs drive it directly.
//! - [`connection`] / `channel`: the AMQP state machines: frames in, frames out; a channel is
//!   the wire adapter over a [`session::Session`].
//!
//! This crate knows nothing of sockets or runtimes (files only through `rill-store`): the server feeds it frames and
//! writes the bytes it produces; queues hand deliveries to connections through an [`Outlet`].
//! That keeps every AMQP rule (acks, requeue order, prefetch, exclusivity, auto-delete)
//! testable in-process, and lets stream jobs embed a broker without TCP.

pub mod args;
pub mod broker;
mod channel;
pub mod connection;
pub mod consumer;
pub mod deadletter;
pub mod dedup;
pub mod durable;
pub mod exchange;
pub mod jobs;
pub mod message;
pub mod queue;
pub mod session;
pub mod vhost;

pub use broker::{Broker, BrokerConfig};
pub use connection::{Connection, Status, Tuning};
pub use consumer::{ConnEvent, Outlet};
pub use session::{Inbox, Session};
