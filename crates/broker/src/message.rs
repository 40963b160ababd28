//! A published message as it sits in queues: shared, immutable, cheap to clone.

use bytes::Bytes;
use std::sync::Arc;

/// One message as published. The encoded properties are kept exactly as the publisher sent them
/// so deliveries pass them through without re-encoding.
#[derive(Debug)]
pub struct Message {
    /// The exchange it was published to (empty for the default exchange).
    pub exchange: Arc<str>,
    /// Validated UTF-8 (checked when the publish was decoded).
    pub routing_key: Bytes,
    /// Raw property flags + property list.
    pub properties: Bytes,
    pub body: Bytes,
}

impl Message {
    pub fn routing_key_str(&self) -> &str {
        std::str::from_utf8(&self.routing_key).unwrap_or("")
    }

    /// Bytes this message accounts for in queue statistics.
    pub fn size(&self) -> usize {
        self.body.len()
    }
}

/// A message at a position in one queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Position in its queue; requeued messages go back to their original position.
    pub seq: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    /// Where the message is in its queue's on-disk log, if it was persisted.
    pub pos: Option<rill_store::Position>,
}
