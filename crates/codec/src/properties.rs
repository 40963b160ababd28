//! Basic properties: full decode/encode through amq-protocol, and [`PropertiesView`],
//! which reads single properties straight from the raw bytes a publisher sent.

use crate::error::AmqpError;
use crate::table::skip_table;
use crate::wire::Reader;
use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;

/// Property indexes in flag order (bit 15 first), as the spec lists them.
const CONTENT_TYPE: usize = 0;
const HEADERS: usize = 2;
const DELIVERY_MODE: usize = 3;
const PRIORITY: usize = 4;
const CORRELATION_ID: usize = 5;
const REPLY_TO: usize = 6;
const EXPIRATION: usize = 7;
const MESSAGE_ID: usize = 8;
const TIMESTAMP: usize = 9;
const TYPE: usize = 10;
const USER_ID: usize = 11;
const APP_ID: usize = 12;
const NUM_PROPERTIES: usize = 14;

#[derive(Clone, Copy)]
enum Shape {
    Short,
    Table,
    Octet,
    LongLong,
}

const SHAPES: [Shape; NUM_PROPERTIES] = [
    Shape::Short,    // content-type
    Shape::Short,    // content-encoding
    Shape::Table,    // headers
    Shape::Octet,    // delivery-mode
    Shape::Octet,    // priority
    Shape::Short,    // correlation-id
    Shape::Short,    // reply-to
    Shape::Short,    // expiration
    Shape::Short,    // message-id
    Shape::LongLong, // timestamp
    Shape::Short,    // type
    Shape::Short,    // user-id
    Shape::Short,    // app-id
    Shape::Short,    // cluster-id (deprecated)
];

/// The property flags + property list of an empty property set.
pub const EMPTY_PROPERTIES: [u8; 2] = [0, 0];

/// Reads single properties from raw property bytes (flags + list) without a full decode.
///
/// [`PropertiesView::new`] walks the whole list once and validates it (short strings
/// are UTF-8 and fit, the headers table is well formed and not nested too deeply, no
/// trailing bytes), so the getters are O(1) and bytes that pass can always be fully
/// decoded by [`decode_properties`].
///
/// ```
/// use rill_codec::{encode_properties, BasicProperties, PropertiesView, ShortString};
/// let raw = encode_properties(
///     &BasicProperties::default()
///         .with_delivery_mode(2)
///         .with_expiration(ShortString::from("60000")),
/// );
/// let view = PropertiesView::new(&raw).unwrap();
/// assert_eq!(view.delivery_mode(), Some(2));
/// assert_eq!(view.expiration(), Some("60000"));
/// assert_eq!(view.priority(), None);
/// assert!(!view.has_headers());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PropertiesView<'a> {
    raw: &'a [u8],
    flags: u16,
    /// Byte offset in `raw` of each present property's encoding.
    offsets: [usize; NUM_PROPERTIES],
}

impl<'a> PropertiesView<'a> {
    /// Validates `raw` and records where each property starts. Malformed → 502.
    pub fn new(raw: &'a [u8]) -> Result<Self, AmqpError> {
        let mut r = Reader::new(raw);
        let truncated = || AmqpError::undecodable("truncated content header properties");
        let flags = r.u16().ok_or_else(truncated)?;
        if flags & 0b11 != 0 {
            return Err(AmqpError::undecodable(
                "content header property flags set reserved or continuation bits",
            ));
        }
        let mut offsets = [0usize; NUM_PROPERTIES];
        for (i, (shape, offset)) in SHAPES.iter().zip(offsets.iter_mut()).enumerate() {
            if flags & (1 << (15 - i)) == 0 {
                continue;
            }
            *offset = r.pos();
            match shape {
                Shape::Short => {
                    let s = r.short_str().ok_or_else(truncated)?;
                    if std::str::from_utf8(s).is_err() {
                        return Err(AmqpError::undecodable("property short string is not UTF-8"));
                    }
                }
                Shape::Table => skip_table(&mut r)?,
                Shape::Octet => {
                    r.u8().ok_or_else(truncated)?;
                }
                Shape::LongLong => {
                    r.u64().ok_or_else(truncated)?;
                }
            }
        }
        if !r.is_empty() {
            return Err(AmqpError::undecodable(
                "unexpected bytes after content header properties",
            ));
        }
        Ok(PropertiesView {
            raw,
            flags,
            offsets,
        })
    }

    /// The raw bytes this view reads.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The property flags word.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The raw bytes from property `i` to the end, if it is present.
    fn tail(&self, i: usize) -> Option<&'a [u8]> {
        if self.flags & (1 << (15 - i)) == 0 {
            return None;
        }
        self.raw.get(*self.offsets.get(i)?..)
    }

    /// The raw encoding of property `i` alone, if it is present.
    fn field(&self, i: usize) -> Option<&'a [u8]> {
        let start = *self.offsets.get(i)?;
        if self.flags & (1 << (15 - i)) == 0 {
            return None;
        }
        let end = (i + 1..NUM_PROPERTIES)
            .find(|&j| self.flags & (1 << (15 - j)) != 0)
            .and_then(|j| self.offsets.get(j).copied())
            .unwrap_or(self.raw.len());
        self.raw.get(start..end)
    }

    fn at(&self, i: usize) -> Option<Reader<'a>> {
        self.tail(i).map(Reader::new)
    }

    fn short(&self, i: usize) -> Option<&'a [u8]> {
        self.at(i)?.short_str()
    }

    fn short_utf8(&self, i: usize) -> Option<&'a str> {
        std::str::from_utf8(self.short(i)?).ok()
    }

    /// `delivery-mode` (1 transient, 2 persistent).
    pub fn delivery_mode(&self) -> Option<u8> {
        self.at(DELIVERY_MODE)?.u8()
    }

    /// `priority`.
    pub fn priority(&self) -> Option<u8> {
        self.at(PRIORITY)?.u8()
    }

    /// `expiration` (per-message TTL in milliseconds, as a decimal string).
    pub fn expiration(&self) -> Option<&'a str> {
        self.short_utf8(EXPIRATION)
    }

    /// `user-id` bytes (checked against the connection's user).
    pub fn user_id(&self) -> Option<&'a [u8]> {
        self.short(USER_ID)
    }

    /// Whether a `headers` table is present.
    pub fn has_headers(&self) -> bool {
        self.flags & (1 << (15 - HEADERS)) != 0
    }

    /// The `headers` table decoded by amq-protocol (for the headers exchange, DLX, CC/BCC).
    pub fn headers(&self) -> Result<Option<FieldTable>, AmqpError> {
        let Some(rest) = self.tail(HEADERS) else {
            return Ok(None);
        };
        parse_field_table(rest)
            .map(|(_, t)| Some(t))
            .map_err(|_| AmqpError::undecodable("malformed headers table"))
    }

    /// The `headers` table's body as received (entries in wire order, without the length),
    /// for rewriting it in order (see [`crate::table_entries`]).
    pub fn headers_raw(&self) -> Option<&'a [u8]> {
        let rest = self.tail(HEADERS)?;
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        rest.get(4..4 + len)
    }

    /// `content-type`.
    pub fn content_type(&self) -> Option<&'a str> {
        self.short_utf8(CONTENT_TYPE)
    }

    /// `correlation-id`.
    pub fn correlation_id(&self) -> Option<&'a str> {
        self.short_utf8(CORRELATION_ID)
    }

    /// `reply-to` (e.g. `amq.rabbitmq.reply-to`).
    pub fn reply_to(&self) -> Option<&'a str> {
        self.short_utf8(REPLY_TO)
    }

    /// `message-id`.
    pub fn message_id(&self) -> Option<&'a str> {
        self.short_utf8(MESSAGE_ID)
    }

    /// `timestamp` (seconds since the epoch).
    pub fn timestamp(&self) -> Option<u64> {
        self.at(TIMESTAMP)?.u64()
    }

    /// `type`.
    pub fn kind(&self) -> Option<&'a str> {
        self.short_utf8(TYPE)
    }

    /// `app-id`.
    pub fn app_id(&self) -> Option<&'a str> {
        self.short_utf8(APP_ID)
    }
}

/// Full property decode (via amq-protocol) of raw property bytes (flags + list).
/// The bytes are validated first, so hostile input cannot exhaust the stack.
pub fn decode_properties(raw: &[u8]) -> Result<BasicProperties, AmqpError> {
    PropertiesView::new(raw)?;
    match parse_properties(raw) {
        Ok(([], props)) => Ok(props),
        _ => Err(AmqpError::undecodable(
            "malformed content header properties",
        )),
    }
}

/// Rewrites `raw` properties with the headers table replaced by `headers_body` (a table body
/// without its length, entries in the caller's order; `None` removes the headers) and, if
/// `drop_expiration`, without the expiration. The other properties are copied byte for byte,
/// without decoding them: this runs once per stream message and per dead-lettering.
///
/// ```
/// use rill_codec::{decode_properties, encode_properties, replace_headers, BasicProperties, PropertiesView, ShortString};
/// let raw = encode_properties(
///     &BasicProperties::default().with_content_type(ShortString::from("text/plain")).with_delivery_mode(2),
/// );
/// // One entry: "n" = 32-bit integer 7.
/// let out = replace_headers(&raw, Some(b"\x01nI\x00\x00\x00\x07"), false).unwrap();
/// let view = PropertiesView::new(&out).unwrap();
/// assert_eq!((view.content_type(), view.delivery_mode()), (Some("text/plain"), Some(2)));
/// assert_eq!(view.headers_raw(), Some(&b"\x01nI\x00\x00\x00\x07"[..]));
/// ```
pub fn replace_headers(
    raw: &[u8],
    headers_body: Option<&[u8]>,
    drop_expiration: bool,
) -> Result<Bytes, AmqpError> {
    let view = PropertiesView::new(raw)?;
    let headers_len = match headers_body.map(|b| u32::try_from(b.len())) {
        Some(Err(_)) => return Err(AmqpError::undecodable("headers table too large")),
        Some(Ok(n)) => Some(n),
        None => None,
    };
    let bit = |i: usize| 1u16 << (15 - i);
    let mut flags = view.flags;
    let mut out = Vec::with_capacity(raw.len() + headers_body.map_or(0, |b| b.len() + 4));
    out.extend_from_slice(&[0, 0]);
    for i in 0..NUM_PROPERTIES {
        if i == HEADERS {
            match (headers_body, headers_len) {
                (Some(body), Some(len)) => {
                    flags |= bit(i);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(body);
                }
                _ => flags &= !bit(i),
            }
        } else if i == EXPIRATION && drop_expiration {
            flags &= !bit(i);
        } else if let Some(field) = view.field(i) {
            out.extend_from_slice(field);
        }
    }
    out[..2].copy_from_slice(&flags.to_be_bytes());
    Ok(Bytes::from(out))
}

/// Encodes properties (flags + list) via amq-protocol. Note that amq-protocol keeps
/// headers in a `BTreeMap`, so keys come out sorted, and writes `AMQPValue::ShortString`
/// with type tag `_`, which clients do not understand: use `LongString` in tables.
pub fn encode_properties(props: &BasicProperties) -> Bytes {
    match gen_properties(props)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(ctx) => Bytes::from(ctx.into_inner().0),
        // Writing into a Vec cannot fail.
        Err(_) => Bytes::from_static(&EMPTY_PROPERTIES),
    }
}
