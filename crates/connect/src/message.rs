//! Messages as connectors move them: what a source read ([`Incoming`]) and what a sink
//! publishes ([`Outgoing`]), the same for the in-process and the TCP transport.

use bytes::Bytes;
use rill_broker::message::Message;
use rill_codec::{AMQPValue, BasicProperties, FieldTable};
use std::borrow::Cow;
use std::sync::Arc;

/// Identifies a delivery on a transport. `generation` counts reconnections: a tag from an
/// earlier connection must never be acked on a later one (it would settle another message),
/// so transports ignore settlements of stale generations; the broker has requeued those
/// deliveries anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryTag {
    pub generation: u32,
    pub tag: u64,
}

/// A message read from a queue, with the delivery it came in.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub tag: DeliveryTag,
    /// The broker delivered it before (to this job or another consumer).
    pub redelivered: bool,
    pub content: Content,
}

/// A message's content, as the transport got it.
#[derive(Debug, Clone)]
pub enum Content {
    /// From the in-process broker: the broker's own message, shared, not copied.
    Local(Arc<Message>),
    /// From a broker over TCP.
    Remote {
        exchange: String,
        routing_key: String,
        properties: Box<BasicProperties>,
        body: Bytes,
    },
}

impl Incoming {
    /// A message without a transport behind it (tests, examples): delivery tag 0.
    pub fn detached(routing_key: &str, properties: BasicProperties, body: Bytes) -> Incoming {
        Incoming {
            tag: DeliveryTag {
                generation: 0,
                tag: 0,
            },
            redelivered: false,
            content: Content::Remote {
                exchange: String::new(),
                routing_key: routing_key.to_owned(),
                properties: Box::new(properties),
                body,
            },
        }
    }

    pub fn body(&self) -> &[u8] {
        match &self.content {
            Content::Local(m) => &m.body,
            Content::Remote { body, .. } => body,
        }
    }

    /// The body as shared bytes (no copy).
    pub fn body_bytes(&self) -> Bytes {
        match &self.content {
            Content::Local(m) => m.body.clone(),
            Content::Remote { body, .. } => body.clone(),
        }
    }

    pub fn exchange(&self) -> &str {
        match &self.content {
            Content::Local(m) => &m.exchange,
            Content::Remote { exchange, .. } => exchange,
        }
    }

    pub fn routing_key(&self) -> &str {
        match &self.content {
            Content::Local(m) => m.routing_key_str(),
            Content::Remote { routing_key, .. } => routing_key,
        }
    }

    /// The message's properties (decoded on demand for in-process messages, which keep them
    /// as published).
    pub fn properties(&self) -> Cow<'_, BasicProperties> {
        match &self.content {
            Content::Local(m) => {
                Cow::Owned(rill_codec::decode_properties(&m.properties).unwrap_or_default())
            }
            Content::Remote { properties, .. } => Cow::Borrowed(properties),
        }
    }

    /// The `x-stream-offset` header a stream queue puts on every delivery.
    pub fn stream_offset(&self) -> Option<u64> {
        let headers = match &self.content {
            Content::Local(m) => rill_codec::PropertiesView::new(&m.properties)
                .ok()?
                .headers()
                .ok()??,
            Content::Remote { properties, .. } => properties.headers().clone()?,
        };
        let v = headers.inner().get("x-stream-offset")?;
        u64::try_from(rill_codec::value_as_i64(v)?).ok()
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties()
            .headers()
            .as_ref()
            .and_then(|h: &FieldTable| h.inner().get(name).cloned())
    }
}

/// A message a sink publishes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: Arc<str>,
    pub routing_key: String,
    pub properties: OutgoingProperties,
    pub body: Bytes,
}

/// An outgoing message's properties: as fields, or already in their AMQP wire encoding
/// (flags and list), as a two-phase sink keeps them. The in-process transport publishes the
/// encoding as it is; over TCP, lapin takes fields.
///
/// ```
/// use rill_codec::{encode_properties, BasicProperties};
/// use rill_connect::message::OutgoingProperties;
/// let fields = BasicProperties::default().with_delivery_mode(2);
/// let encoded = OutgoingProperties::Encoded(encode_properties(&fields));
/// assert_eq!(encoded.into_fields().unwrap(), fields);
/// assert_eq!(OutgoingProperties::from(fields.clone()).encoded(), encode_properties(&fields));
/// ```
// Not boxed: fields are the common case (every sink without checkpoints), and a box would
// cost an allocation per message where the size costs a copy.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum OutgoingProperties {
    Fields(BasicProperties),
    Encoded(Bytes),
}

impl Default for OutgoingProperties {
    fn default() -> Self {
        OutgoingProperties::Fields(BasicProperties::default())
    }
}

impl From<BasicProperties> for OutgoingProperties {
    fn from(p: BasicProperties) -> Self {
        OutgoingProperties::Fields(p)
    }
}

impl OutgoingProperties {
    /// The AMQP wire encoding.
    pub fn encoded(&self) -> Bytes {
        match self {
            OutgoingProperties::Fields(p) => rill_codec::encode_properties(p),
            OutgoingProperties::Encoded(raw) => raw.clone(),
        }
    }

    /// The fields (decoding them if they are encoded).
    pub fn into_fields(self) -> Result<BasicProperties, rill_codec::AmqpError> {
        match self {
            OutgoingProperties::Fields(p) => Ok(p),
            OutgoingProperties::Encoded(raw) => rill_codec::decode_properties(&raw),
        }
    }
}
