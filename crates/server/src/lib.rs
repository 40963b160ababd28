//! Rill's network layer: accepts TCP connections and runs one task per AMQP connection.
//!
//! # Layout
//! - [`server`]: the listener, the connection cap, signal handling and orderly shutdown.
//! - [`conn`]: one connection task: socket bytes ↔ frames ↔ the broker core's state machine,
//!   heartbeats, batched writes.
//!
//! All AMQP semantics live in `rill-broker`; this crate only moves bytes and keeps time.

mod conn;
pub mod server;

pub use server::{run_blocking, serve, ServerConfig, ServerError};
