//! Content: the content header frame, and the hand-written encoders of everything that
//! carries a message to a client (deliver, get-ok, return), always as method + header +
//! body frames back-to-back, since interleaving them is 505 UNEXPECTED_FRAME.

use crate::error::AmqpError;
use crate::frame::{put_frame_header, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD};
use crate::method::{CLASS_BASIC, METHOD_BASIC_DELIVER, METHOD_BASIC_GET_OK, METHOD_BASIC_RETURN};
use crate::properties::{PropertiesView, EMPTY_PROPERTIES};
use crate::wire::{put_short_str, short_str_len, Reader};
use bytes::{BufMut, Bytes, BytesMut};

/// A content header frame payload: class id, body size and the raw property bytes
/// (property flags + property list) exactly as received, to be passed on to consumers
/// without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentHeader {
    /// Class id (60 for basic, the only class with content).
    pub class_id: u16,
    /// Total size of the body that follows in body frames.
    pub body_size: u64,
    /// Property flags + property list, validated by [`PropertiesView::new`].
    pub properties: Bytes,
}

impl ContentHeader {
    /// A view on the properties. Cannot fail for a header from [`decode_content_header`].
    pub fn view(&self) -> Result<PropertiesView<'_>, AmqpError> {
        PropertiesView::new(&self.properties)
    }
}

/// Decodes a content header frame payload. The property bytes are validated (see
/// [`PropertiesView::new`]) but kept as a zero-copy slice of `payload`. Malformed → 502.
pub fn decode_content_header(payload: Bytes) -> Result<ContentHeader, AmqpError> {
    let mut r = Reader::new(&payload);
    let (Some(class_id), Some(_weight), Some(body_size)) = (r.u16(), r.u16(), r.u64()) else {
        return Err(AmqpError::undecodable("content header frame too short"));
    };
    let start = r.pos();
    let properties = payload.slice(start..);
    PropertiesView::new(&properties)?;
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
    })
}

/// Largest body chunk per frame: `frame_max - 8`, or "unlimited" (capped at what a
/// frame's 32-bit size can say) for frame_max 0.
fn body_chunk(frame_max: u32) -> usize {
    let max = if frame_max == 0 { u32::MAX } else { frame_max };
    usize::try_from(max.saturating_sub(8).max(1)).unwrap_or(usize::MAX)
}

fn content_len(properties: &[u8], body: &[u8], frame_max: u32) -> usize {
    let props = properties.len().max(EMPTY_PROPERTIES.len());
    let frames = body.len().div_ceil(body_chunk(frame_max));
    8 + 12 + props + body.len() + frames * 8
}

/// Appends the content frames alone: a header frame (class 60) with `properties`
/// (flags + list; empty means no properties) and `body` in frames of at most
/// `frame_max - 8` bytes (frame_max 0: one body frame; empty body: no body frame).
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    out.reserve(content_len(properties, body, frame_max));
    put_content(out, channel, properties, body, frame_max);
}

fn put_content(out: &mut BytesMut, channel: u16, properties: &[u8], body: &[u8], frame_max: u32) {
    let properties = if properties.is_empty() {
        &EMPTY_PROPERTIES[..]
    } else {
        properties
    };
    put_frame_header(out, FRAME_HEADER, channel, (12 + properties.len()) as u32);
    out.put_u16(CLASS_BASIC);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    out.put_slice(properties);
    out.put_u8(FRAME_END);
    for chunk in body.chunks(body_chunk(frame_max)) {
        put_frame_header(out, FRAME_BODY, channel, chunk.len() as u32);
        out.put_slice(chunk);
        out.put_u8(FRAME_END);
    }
}

/// Appends `basic.deliver` + content header + body frames. Short strings over 255 bytes
/// are cut at a character boundary.
#[allow(clippy::too_many_arguments)] // mirrors the method's wire arguments
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let size = 4
        + short_str_len(consumer_tag)
        + 8
        + 1
        + short_str_len(exchange)
        + short_str_len(routing_key);
    out.reserve(size + 8 + content_len(properties, body, frame_max));
    put_frame_header(out, FRAME_METHOD, channel, size as u32);
    out.put_u16(CLASS_BASIC);
    out.put_u16(METHOD_BASIC_DELIVER);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u8(FRAME_END);
    put_content(out, channel, properties, body, frame_max);
}

/// Appends `basic.get-ok` + content header + body frames.
#[allow(clippy::too_many_arguments)] // mirrors the method's wire arguments
pub fn encode_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    message_count: u32,
    properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let size = 4 + 8 + 1 + short_str_len(exchange) + short_str_len(routing_key) + 4;
    out.reserve(size + 8 + content_len(properties, body, frame_max));
    put_frame_header(out, FRAME_METHOD, channel, size as u32);
    out.put_u16(CLASS_BASIC);
    out.put_u16(METHOD_BASIC_GET_OK);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u32(message_count);
    out.put_u8(FRAME_END);
    put_content(out, channel, properties, body, frame_max);
}

/// Appends `basic.return` + content header + body frames.
#[allow(clippy::too_many_arguments)] // mirrors the method's wire arguments
pub fn encode_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
    properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let size =
        4 + 2 + short_str_len(reply_text) + short_str_len(exchange) + short_str_len(routing_key);
    out.reserve(size + 8 + content_len(properties, body, frame_max));
    put_frame_header(out, FRAME_METHOD, channel, size as u32);
    out.put_u16(CLASS_BASIC);
    out.put_u16(METHOD_BASIC_RETURN);
    out.put_u16(reply_code);
    put_short_str(out, reply_text);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u8(FRAME_END);
    put_content(out, channel, properties, body, frame_max);
}
