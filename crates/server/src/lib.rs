//! Rill's network layer: accepts TCP connections and runs one task per AMQP connection.
//!
//! # Layout
//! - [`server`]: the listener, the connection cap, signal handling and orderly shutdown.
//! - [`alarms`]: memory and free-disk sampling that raises the broker's resource alarms.
//! - [`jobs`]: jobs attached to the broker process, started after recovery and stopped
//!   before connections close.
//! - [`conn`]: one connection task: socket bytes ↔ frames ↔ the broker core's state machine,
//!   heartbeats, batched writes.
//!
//! All AMQP semantics live in `rill-broker`; this crate only moves bytes and keeps time.

pub mod alarms;
mod conn;
pub mod jobs;
pub mod server;

pub use alarms::AlarmConfig;
pub use jobs::{EmbeddedJob, RunningJob};
pub use server::{run_blocking, serve, Server, ServerConfig, ServerError};
