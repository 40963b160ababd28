//! Formats: how queue messages become records and records become messages, and what happens
//! to a message that cannot be read ([`BadInputPolicy`]).
//!
//! Decoders: [`RawBytes`], [`Text`] (UTF-8), [`Json`] (any serde type, or
//! `serde_json::Value`), and [`WithMeta`], which wraps any of them to hand the job the
//! message's properties, headers, exchange and routing key too ([`Received`]).
//! Encoders: [`RawBytes`], [`Text`], [`Json`].

use crate::message::Incoming;
use bytes::Bytes;
use rill_codec::{BasicProperties, ShortString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// Turns a queue message into a record. An `Err` is bad input, handled by the source's
/// [`BadInputPolicy`].
pub trait Decoder<T>: Send + 'static {
    fn decode(&self, msg: &Incoming) -> Result<T, String>;
}

/// Turns a record into a message body (and its content type).
pub trait Encoder<T>: Send + 'static {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), String>;
    /// The `content_type` property of the messages it makes.
    fn content_type(&self) -> Option<&'static str> {
        None
    }
}

/// What a source does with a message its decoder refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadInputPolicy {
    /// Ack it (it is gone) and count it.
    Skip,
    /// Nack it without requeue, so the queue's dead-letter exchange receives it (or it is
    /// dropped if the queue has none, as RabbitMQ does).
    DeadLetter,
    /// Stop the job with an error naming the queue and the delivery.
    #[default]
    Fail,
}

impl std::str::FromStr for BadInputPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(BadInputPolicy::Skip),
            "dead-letter" => Ok(BadInputPolicy::DeadLetter),
            "fail" => Ok(BadInputPolicy::Fail),
            other => Err(format!(
                "unknown bad-input policy '{other}' (expected skip, dead-letter or fail)"
            )),
        }
    }
}

/// The body as it is.
///
/// ```
/// use rill_connect::format::{Decoder, RawBytes};
/// use rill_connect::message::Incoming;
/// let msg = Incoming::detached("q", Default::default(), bytes::Bytes::from_static(b"\xff\x00"));
/// assert_eq!(&RawBytes.decode(&msg).unwrap()[..], b"\xff\x00");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBytes;

impl Decoder<Bytes> for RawBytes {
    fn decode(&self, msg: &Incoming) -> Result<Bytes, String> {
        Ok(msg.body_bytes())
    }
}

impl Encoder<Bytes> for RawBytes {
    fn encode(&self, value: &Bytes, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(value);
        Ok(())
    }
}

impl Encoder<Vec<u8>> for RawBytes {
    fn encode(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(value);
        Ok(())
    }
}

/// UTF-8 text; anything else is bad input.
///
/// ```
/// use rill_connect::format::{Decoder, Text};
/// use rill_connect::message::Incoming;
/// let msg = |b: &'static [u8]| Incoming::detached("q", Default::default(), bytes::Bytes::from_static(b));
/// assert_eq!(Text.decode(&msg(b"Hello World!")).unwrap(), "Hello World!");
/// assert!(Text.decode(&msg(b"\xff")).is_err());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Text;

impl Decoder<String> for Text {
    fn decode(&self, msg: &Incoming) -> Result<String, String> {
        std::str::from_utf8(msg.body())
            .map(str::to_owned)
            .map_err(|e| format!("body is not UTF-8: {e}"))
    }
}

impl<T: AsRef<str>> Encoder<T> for Text {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(value.as_ref().as_bytes());
        Ok(())
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("text/plain")
    }
}

/// JSON, into and from any serde type (`serde_json::Value` for untyped JSON).
///
/// ```
/// use rill_connect::format::{Decoder, Encoder, Json};
/// use rill_connect::message::Incoming;
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct Count { word: String, count: u64 }
/// let msg = Incoming::detached("q", Default::default(), bytes::Bytes::from_static(br#"{"word":"Hello","count":1}"#));
/// let c: Count = Json::new().decode(&msg).unwrap();
/// assert_eq!(c, Count { word: "Hello".into(), count: 1 });
/// let mut out = Vec::new();
/// Json::new().encode(&c, &mut out).unwrap();
/// assert_eq!(out, br#"{"word":"Hello","count":1}"#);
/// ```
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Json<T> {
    pub fn new() -> Self {
        Json(PhantomData)
    }
}

impl<T> Default for Json<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Json<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> std::fmt::Debug for Json<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Json")
    }
}

impl<T: DeserializeOwned + 'static> Decoder<T> for Json<T> {
    fn decode(&self, msg: &Incoming) -> Result<T, String> {
        serde_json::from_slice(msg.body())
            .map_err(|e| format!("body is not the expected JSON: {e}"))
    }
}

impl<T: Serialize + 'static> Encoder<T> for Json<T> {
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        serde_json::to_writer(out, value).map_err(|e| e.to_string())
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("application/json")
    }
}

/// A record with the message it came from: exchange, routing key, redelivery flag and
/// properties (headers, message id, timestamps...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received<T> {
    pub value: T,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub properties: BasicProperties,
}

impl<T> Received<T> {
    /// A header's value as text, if it is a string.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        let v = self.properties.headers().as_ref()?.inner().get(name)?;
        std::str::from_utf8(rill_codec::value_as_bytes(v)?).ok()
    }

    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }
}

/// Wraps a decoder to hand the job [`Received`] records (value + message metadata).
#[derive(Debug, Clone, Copy, Default)]
pub struct WithMeta<D>(pub D);

impl<T, D: Decoder<T>> Decoder<Received<T>> for WithMeta<D> {
    fn decode(&self, msg: &Incoming) -> Result<Received<T>, String> {
        Ok(Received {
            value: self.0.decode(msg)?,
            exchange: msg.exchange().to_owned(),
            routing_key: msg.routing_key().to_owned(),
            redelivered: msg.redelivered,
            properties: msg.properties().into_owned(),
        })
    }
}
