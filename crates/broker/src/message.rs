//! A published message as it sits in queues: shared, immutable, cheap to clone.

use bytes::Bytes;
use rill_codec::{FieldTable, PropertiesView};
use std::sync::Arc;

/// One message as published. The encoded properties are kept exactly as the publisher sent them
/// so deliveries pass them through without re-encoding; the few properties queues act on are
/// read once, here, not by every queue the message reaches.
#[derive(Debug)]
pub struct Message {
    /// The exchange it was published to (empty for the default exchange).
    pub exchange: Arc<str>,
    /// Validated UTF-8 (checked when the publish was decoded).
    pub routing_key: Bytes,
    /// Raw property flags + property list.
    pub properties: Bytes,
    pub body: Bytes,
    /// `delivery_mode = 2`.
    pub persistent: bool,
    /// `priority` (0 if absent).
    pub priority: u8,
    /// Per-message TTL from `expiration`, in ms.
    pub expiration_ms: Option<u64>,
}

impl Message {
    pub fn new(exchange: Arc<str>, routing_key: Bytes, properties: Bytes, body: Bytes) -> Message {
        let view = PropertiesView::new(&properties).ok();
        Message {
            persistent: view.and_then(|v| v.delivery_mode()) == Some(2),
            priority: view.and_then(|v| v.priority()).unwrap_or(0),
            expiration_ms: view
                .and_then(|v| v.expiration())
                .and_then(|e| e.parse().ok()),
            exchange,
            routing_key,
            properties,
            body,
        }
    }

    /// The same message with other properties (e.g. a header added for one delivery).
    pub fn with_properties(&self, properties: Bytes) -> Message {
        Message::new(
            self.exchange.clone(),
            self.routing_key.clone(),
            properties,
            self.body.clone(),
        )
    }

    /// The same message with header `key` set to a signed 64-bit value (`x-delivery-count`,
    /// `x-stream-offset`); None if its properties cannot be rewritten.
    pub fn with_header_long(&self, key: &str, value: i64) -> Option<Message> {
        crate::deadletter::set_header_long(&self.properties, key, value)
            .ok()
            .map(|p| self.with_properties(p))
    }

    /// The decoded `headers` table, for headers-exchange routing.
    pub fn headers(&self) -> Option<FieldTable> {
        PropertiesView::new(&self.properties).ok()?.headers().ok()?
    }

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
