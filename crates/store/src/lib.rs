//! Rill's on-disk storage: per-queue append-only segment logs with ack files, group commit
//! (one fdatasync shared by concurrent publishers), and the durable definitions file.
//!
//! # Layout
//! - [`queue`]: [`QueueStore`], one durable queue's log: append, ack, read, sync, recovery.
//! - [`sync_group`]: [`SyncGroup`], the background thread that fsyncs dirty stores in rounds.
//! - [`keylog`]: [`KeyLog`], remembered keys with expiry times (message deduplication), an
//!   append-only log written after the data it depends on and rewritten when mostly dead.
//! - [`definitions`]: [`DefinitionsFile`], vhosts/users/exchanges/queues/bindings, saved
//!   atomically.
//! - [`layout`]: where each queue and exchange lives in the data directory ([`queue_dir`],
//!   [`exchange_dir`]).
//! - [`backend`]: the storage seam ([`backend::StorageBackend`]) with file, in-memory
//!   (power-loss simulating) and fault-injecting implementations.
//! - `format`, `segment`: the byte layout (all little-endian) and per-segment bookkeeping.
//!
//! This crate knows nothing of AMQP semantics, sockets or async runtimes: a message is a set of
//! opaque fields, and the broker decides what to store, when to ack, and when to confirm.
//! See `docs/storage.md` at the repository root for the format and the exact durability guarantees.

#![forbid(unsafe_code)]

pub mod backend;
pub mod definitions;
mod error;
mod format;
pub mod keylog;
pub mod layout;
pub mod queue;
mod segment;
pub mod sync_group;

pub use definitions::{
    BindingDef, Definitions, DefinitionsFile, ExchangeDef, PermissionDef, QueueDef, UserDef,
    VhostDef,
};
pub use error::StoreError;
pub use format::{HEADER_LEN, MAX_PAYLOAD, RECORD_HEADER_LEN, VERSION};
pub use keylog::{KeyLog, KeyRecord, SharedKeyLog};
pub use layout::{ensure_exchange_dir, ensure_queue_dir, exchange_dir, queue_dir};
pub use queue::{
    Position, QueueStore, RecoveredRecord, StoreOptions, StoreStats, StoredMessage, SyncBatch,
    SyncPolicy, FLAG_DELIVERED,
};
pub use sync_group::{DeferredStart, SyncGroup, LAZY_SYNC};

/// A store shared between the broker's queue (which appends and acks under this lock) and the
/// [`SyncGroup`] thread (which locks it only to write buffers, never during fdatasync).
pub type SharedStore = std::sync::Arc<parking_lot::Mutex<QueueStore>>;
