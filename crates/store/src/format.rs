//! The on-disk encoding: file headers and records. Every integer is explicitly little-endian.
//!
//! ```text
//! file header   magic[8] ("RILLSEG\0" | "RILLACK\0" | "RILLDEF\0" | "RILLKEY\0")  version u32
//! record        len u32  crc32c(payload) u32  payload[len]
//! payload       timestamp_ms u64  flags u8  exchange_len u8  exchange
//!               routing_key_len u8  routing_key  properties_len u32  properties  body (rest)
//! ack entry     record offset u32
//! key payload   kind u8  value u64  key (rest)   (in `.keys` files; see `keylog`)
//! ```

use std::path::Path;

use bytes::Bytes;

use crate::{StoreError, StoredMessage};

pub(crate) const SEG_MAGIC: &[u8; 8] = b"RILLSEG\0";
pub(crate) const ACK_MAGIC: &[u8; 8] = b"RILLACK\0";
pub(crate) const DEF_MAGIC: &[u8; 8] = b"RILLDEF\0";
pub(crate) const KEY_MAGIC: &[u8; 8] = b"RILLKEY\0";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of a file header.
pub const HEADER_LEN: u32 = 12;
/// Bytes before a record's payload (length + CRC).
pub const RECORD_HEADER_LEN: u32 = 8;
/// Smallest valid payload: the fixed fields with empty strings, properties and body.
pub(crate) const MIN_PAYLOAD: u32 = 8 + 1 + 1 + 1 + 4;
/// Largest payload: one record alone in a segment must still have u32 offsets.
pub const MAX_PAYLOAD: u64 = (u32::MAX - HEADER_LEN - RECORD_HEADER_LEN) as u64;

pub(crate) fn header(magic: &[u8; 8]) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(magic);
    h[8..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Outcome of checking a file header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Valid,
    /// Shorter than a header, or all zeros: the file was created but its header never reached
    /// the disk, so no sync ever completed on it and nothing in it was confirmed.
    Torn,
}

pub(crate) fn check_header(
    data: &[u8],
    magic: &[u8; 8],
    path: &Path,
) -> Result<Header, StoreError> {
    let Some(h) = data.get(..HEADER_LEN as usize) else {
        return Ok(Header::Torn);
    };
    if h.iter().all(|&b| b == 0) {
        return Ok(Header::Torn);
    }
    if &h[..8] != magic {
        return Err(StoreError::corrupt(
            path,
            format!("bad magic {:?}", &h[..8]),
        ));
    }
    let version = le_u32(&h[8..12]);
    if version > VERSION {
        return Err(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if version == 0 {
        return Err(StoreError::corrupt(path, "format version 0"));
    }
    Ok(Header::Valid)
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Payload length of `msg`, validating its short strings.
pub(crate) fn payload_len(msg: &StoredMessage) -> Result<u64, StoreError> {
    if msg.exchange.len() > 255 {
        return Err(StoreError::FieldTooLong {
            field: "exchange",
            len: msg.exchange.len(),
        });
    }
    if msg.routing_key.len() > 255 {
        return Err(StoreError::FieldTooLong {
            field: "routing_key",
            len: msg.routing_key.len(),
        });
    }
    let len = u64::from(MIN_PAYLOAD)
        + msg.exchange.len() as u64
        + msg.routing_key.len() as u64
        + msg.properties.len() as u64
        + msg.body.len() as u64;
    if len > MAX_PAYLOAD || msg.properties.len() as u64 > u64::from(u32::MAX) {
        return Err(StoreError::RecordTooLarge {
            size: len + u64::from(RECORD_HEADER_LEN),
            max: MAX_PAYLOAD,
        });
    }
    Ok(len)
}

/// Appends the record (header + payload) for `msg` to `buf`; `payload_len` from [`payload_len`].
pub(crate) fn encode_record(msg: &StoredMessage, payload_len: u32, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.reserve(RECORD_HEADER_LEN as usize + payload_len as usize);
    buf.extend_from_slice(&payload_len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]); // CRC, filled below
    buf.extend_from_slice(&msg.timestamp_ms.to_le_bytes());
    buf.push(msg.flags);
    // Lengths were validated by `payload_len`.
    buf.push(msg.exchange.len() as u8);
    buf.extend_from_slice(msg.exchange.as_bytes());
    buf.push(msg.routing_key.len() as u8);
    buf.extend_from_slice(msg.routing_key.as_bytes());
    buf.extend_from_slice(&(msg.properties.len() as u32).to_le_bytes());
    buf.extend_from_slice(&msg.properties);
    buf.extend_from_slice(&msg.body);
    let payload_start = start + RECORD_HEADER_LEN as usize;
    let crc = crc32c::crc32c(&buf[payload_start..]);
    buf[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
}

/// Field boundaries inside a payload.
struct Layout {
    exchange: std::ops::Range<usize>,
    routing_key: std::ops::Range<usize>,
    properties: std::ops::Range<usize>,
    body_start: usize,
}

fn layout(p: &[u8]) -> Result<Layout, &'static str> {
    let short = "payload shorter than its fields";
    if p.len() < MIN_PAYLOAD as usize {
        return Err(short);
    }
    let ex_len = p[9] as usize;
    let exchange = 10..10 + ex_len;
    let rk_len = *p.get(exchange.end).ok_or(short)? as usize;
    let routing_key = exchange.end + 1..exchange.end + 1 + rk_len;
    let pl = p.get(routing_key.end..routing_key.end + 4).ok_or(short)?;
    let props_len = le_u32(pl) as usize;
    let props_start = routing_key.end + 4;
    let props_end = props_start.checked_add(props_len).ok_or(short)?;
    if props_end > p.len() {
        return Err(short);
    }
    if std::str::from_utf8(&p[exchange.clone()]).is_err()
        || std::str::from_utf8(&p[routing_key.clone()]).is_err()
    {
        return Err("exchange or routing key is not UTF-8");
    }
    Ok(Layout {
        exchange,
        routing_key,
        properties: props_start..props_end,
        body_start: props_end,
    })
}

/// Checks a payload's structure without allocating.
pub(crate) fn validate_payload(p: &[u8]) -> Result<(), &'static str> {
    layout(p).map(|_| ())
}

/// The fixed fields (timestamp, flags) of a valid payload.
pub(crate) fn payload_header(p: &[u8]) -> Result<(u64, u8), &'static str> {
    if p.len() < MIN_PAYLOAD as usize {
        return Err("payload shorter than its fields");
    }
    Ok((le_u64(p), p[8]))
}

/// Decodes a payload; `properties` and `body` share `p`'s allocation.
pub(crate) fn decode_payload(p: Bytes) -> Result<StoredMessage, &'static str> {
    let l = layout(&p)?;
    let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&p[r]).into_owned();
    Ok(StoredMessage {
        exchange: text(l.exchange),
        routing_key: text(l.routing_key),
        properties: p.slice(l.properties),
        body: p.slice(l.body_start..),
        timestamp_ms: le_u64(&p[..8]),
        flags: p[8],
    })
}

/// Outcome of parsing one record from a buffer.
pub(crate) enum Parsed {
    /// A valid record whose payload is `buf[payload]`.
    Record { payload: std::ops::Range<usize> },
    /// Nothing left.
    End,
    /// Invalid from here on, for the reason given.
    Invalid(String),
}

/// Parses the record starting at `buf[at..]`.
pub(crate) fn parse_record(buf: &[u8], at: usize) -> Parsed {
    let rest = buf.len().saturating_sub(at);
    if rest == 0 {
        return Parsed::End;
    }
    if rest < RECORD_HEADER_LEN as usize {
        return Parsed::Invalid(format!("torn record header ({rest} bytes)"));
    }
    let len = le_u32(&buf[at..]);
    let crc = le_u32(&buf[at + 4..]);
    if len < MIN_PAYLOAD {
        return Parsed::Invalid(format!("invalid record length {len}"));
    }
    let start = at + RECORD_HEADER_LEN as usize;
    let avail = rest - RECORD_HEADER_LEN as usize;
    if len as usize > avail {
        return Parsed::Invalid(format!(
            "record length {len} runs past the end of the file ({avail} bytes left): torn write"
        ));
    }
    let payload = start..start + len as usize;
    if crc32c::crc32c(&buf[payload.clone()]) != crc {
        return Parsed::Invalid("CRC mismatch".to_string());
    }
    if let Err(e) = validate_payload(&buf[payload.clone()]) {
        return Parsed::Invalid(e.to_string());
    }
    Parsed::Record { payload }
}
