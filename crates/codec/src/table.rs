//! Field tables: a validating walk over raw table bytes, and lookups on decoded tables.
//!
//! amq-protocol's table parser recurses once per nesting level, so a few kilobytes of
//! `F`/`A` nesting from a client would overflow the stack. Everything we hand to it from
//! the network is first walked here, with recursion bounded by [`MAX_TABLE_DEPTH`].

use crate::error::AmqpError;
use crate::wire::Reader;
use amq_protocol::frame::WriteContext;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

/// Deepest nesting of tables and arrays accepted from the network. RabbitMQ's own
/// deepest header (`x-death`: headers → array → table) is 3.
pub const MAX_TABLE_DEPTH: usize = 64;

/// Walks a field table body (the bytes after its 32-bit length) and checks that every
/// entry is well formed: keys are UTF-8 short strings, value types are known, lengths
/// fit, and nesting stays within [`MAX_TABLE_DEPTH`].
pub(crate) fn validate_table_body(body: &[u8], depth: usize) -> Result<(), AmqpError> {
    if depth > MAX_TABLE_DEPTH {
        return Err(AmqpError::undecodable("field table nesting too deep"));
    }
    let mut r = Reader::new(body);
    while !r.is_empty() {
        let key = r
            .short_str()
            .ok_or_else(|| AmqpError::undecodable("truncated field table key"))?;
        if std::str::from_utf8(key).is_err() {
            return Err(AmqpError::undecodable("field table key is not UTF-8"));
        }
        validate_value(&mut r, depth)?;
    }
    Ok(())
}

fn validate_array_body(body: &[u8], depth: usize) -> Result<(), AmqpError> {
    if depth > MAX_TABLE_DEPTH {
        return Err(AmqpError::undecodable("field array nesting too deep"));
    }
    let mut r = Reader::new(body);
    while !r.is_empty() {
        validate_value(&mut r, depth)?;
    }
    Ok(())
}

fn validate_value(r: &mut Reader<'_>, depth: usize) -> Result<(), AmqpError> {
    let truncated = || AmqpError::undecodable("truncated field value");
    let kind = r.u8().ok_or_else(truncated)?;
    let fixed = match kind {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'L' | b'l' | b'd' | b'T' => 8,
        b'S' | b'x' => {
            r.long_str().ok_or_else(truncated)?;
            return Ok(());
        }
        b'F' => return validate_table_body(r.long_str().ok_or_else(truncated)?, depth + 1),
        b'A' => return validate_array_body(r.long_str().ok_or_else(truncated)?, depth + 1),
        other => {
            return Err(AmqpError::undecodable(format_args!(
                "unknown field value type {:?}",
                char::from(other)
            )))
        }
    };
    r.take(fixed).ok_or_else(truncated)?;
    Ok(())
}

/// Reads a table (32-bit length + body) from `r` and validates it.
pub(crate) fn skip_table(r: &mut Reader<'_>) -> Result<(), AmqpError> {
    let body = r
        .long_str()
        .ok_or_else(|| AmqpError::undecodable("truncated field table"))?;
    validate_table_body(body, 1)
}

/// Decodes a field table's body (the entries, without the 32-bit length prefix; e.g. an
/// AMQPLAIN response) from network bytes. Validated first: calling amq-protocol's
/// `parse_field_table` directly on hostile input can overflow the stack and abort.
///
/// ```
/// use rill_codec::{decode_field_table_body, table_get_str};
/// let t = decode_field_table_body(b"\x05LOGINS\x00\x00\x00\x05guest").unwrap();
/// assert_eq!(table_get_str(&t, "LOGIN"), Some("guest"));
/// ```
pub fn decode_field_table_body(body: &[u8]) -> Result<FieldTable, AmqpError> {
    validate_table_body(body, 1)?;
    let len =
        u32::try_from(body.len()).map_err(|_| AmqpError::undecodable("field table over 4 GiB"))?;
    let mut framed = Vec::with_capacity(body.len() + 4);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(body);
    match parse_field_table(framed.as_slice()) {
        Ok(([], t)) => Ok(t),
        _ => Err(AmqpError::undecodable("malformed field table")),
    }
}

/// Decodes a field table with its 32-bit length prefix, which must cover all of `raw`.
pub fn decode_field_table(raw: &[u8]) -> Result<FieldTable, AmqpError> {
    let mut r = Reader::new(raw);
    let body = r
        .long_str()
        .ok_or_else(|| AmqpError::undecodable("truncated field table"))?;
    if !r.is_empty() {
        return Err(AmqpError::undecodable("unexpected bytes after field table"));
    }
    decode_field_table_body(body)
}

/// Encodes a field table with its 32-bit length prefix (amq-protocol: keys sorted;
/// `AMQPValue::ShortString` comes out with type tag `_`, which clients reject — use
/// `LongString`).
pub fn encode_field_table(t: &FieldTable) -> Vec<u8> {
    match gen_field_table(t)(WriteContext::from(Vec::new())) {
        Ok(ctx) => ctx.into_inner().0,
        // Writing into a Vec cannot fail; an empty table is the safe fallback.
        Err(_) => vec![0, 0, 0, 0],
    }
}

/// Looks a key up in a decoded table.
///
/// ```
/// use rill_codec::{field_table_get, AMQPValue, FieldTable};
/// let mut t = FieldTable::default();
/// t.insert("x-max-length".into(), AMQPValue::LongInt(10));
/// assert_eq!(field_table_get(&t, "x-max-length"), Some(&AMQPValue::LongInt(10)));
/// assert_eq!(field_table_get(&t, "absent"), None);
/// ```
pub fn field_table_get<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    t.inner().get(key)
}

/// Any integer-typed value (signed or unsigned, any width, or a timestamp) as an `i64`;
/// `None` for other types and for `u64` timestamps beyond `i64::MAX`. RabbitMQ accepts
/// every integer type for arguments such as `x-message-ttl` and `x-max-length`.
pub fn value_as_i64(v: &AMQPValue) -> Option<i64> {
    match *v {
        AMQPValue::ShortShortInt(i) => Some(i64::from(i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(i)),
        AMQPValue::ShortInt(i) => Some(i64::from(i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(i)),
        AMQPValue::LongInt(i) => Some(i64::from(i)),
        AMQPValue::LongUInt(i) => Some(i64::from(i)),
        AMQPValue::LongLongInt(i) => Some(i),
        AMQPValue::Timestamp(t) => i64::try_from(t).ok(),
        _ => None,
    }
}

/// A string-typed value (long string, short string or byte array) as bytes.
pub fn value_as_bytes(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(a) => Some(a.as_slice()),
        _ => None,
    }
}

/// `field_table_get` followed by [`value_as_i64`].
pub fn table_get_i64(t: &FieldTable, key: &str) -> Option<i64> {
    field_table_get(t, key).and_then(value_as_i64)
}

/// `field_table_get` followed by [`value_as_bytes`] and a UTF-8 check.
pub fn table_get_str<'a>(t: &'a FieldTable, key: &str) -> Option<&'a str> {
    field_table_get(t, key)
        .and_then(value_as_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
}

/// `field_table_get` of a boolean value.
pub fn table_get_bool(t: &FieldTable, key: &str) -> Option<bool> {
    match field_table_get(t, key) {
        Some(AMQPValue::Boolean(b)) => Some(*b),
        _ => None,
    }
}

/// Inserts `value` under `key`, cutting the key to 255 bytes rather than panicking.
pub fn field_table_insert(t: &mut FieldTable, key: &str, value: AMQPValue) {
    let key: ShortString = crate::wire::short_string_truncated(key);
    t.insert(key, value);
}

/// The entries of a field table body (without its 32-bit length) in wire order, each value
/// raw: its type tag and payload. For rewriting a table while keeping its order, which
/// amq-protocol's `FieldTable` (a `BTreeMap`) cannot.
///
/// ```
/// let body = b"\x01bS\x00\x00\x00\x01x\x01at\x01";
/// let entries = rill_codec::table_entries(body).unwrap();
/// assert_eq!(entries, vec![("b", &b"S\x00\x00\x00\x01x"[..]), ("a", &b"t\x01"[..])]);
/// ```
pub fn table_entries(body: &[u8]) -> Result<Vec<(&str, &[u8])>, AmqpError> {
    validate_table_body(body, 1)?;
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while !r.is_empty() {
        let key = r
            .short_str()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| AmqpError::undecodable("bad field table key"))?;
        let start = r.pos();
        validate_value(&mut r, 1)?;
        out.push((key, body.get(start..r.pos()).unwrap_or_default()));
    }
    Ok(out)
}

/// The items of a field array body (without its 32-bit length) in wire order, raw.
pub fn array_items(body: &[u8]) -> Result<Vec<&[u8]>, AmqpError> {
    validate_array_body(body, 1)?;
    let mut r = Reader::new(body);
    let mut out = Vec::new();
    while !r.is_empty() {
        let start = r.pos();
        validate_value(&mut r, 1)?;
        out.push(body.get(start..r.pos()).unwrap_or_default());
    }
    Ok(out)
}

/// The body of a raw `F` (table) or `A` (array) value, i.e. after the tag and length.
pub fn raw_nested_body(raw_value: &[u8]) -> Option<&[u8]> {
    let mut r = Reader::new(raw_value);
    match r.u8()? {
        b'F' | b'A' => r.long_str(),
        _ => None,
    }
}

/// Decodes one raw value (type tag + payload), e.g. from [`table_entries`].
pub fn decode_raw_value(raw_value: &[u8]) -> Option<AMQPValue> {
    // Wrap it as a one-entry table so amq-protocol's (validated) parser can read it.
    let mut body = Vec::with_capacity(raw_value.len() + 2);
    body.push(1u8);
    body.push(b'v');
    body.extend_from_slice(raw_value);
    decode_field_table_body(&body)
        .ok()?
        .inner()
        .get("v")
        .cloned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use amq_protocol::types::LongString;

    #[test]
    fn typed_lookups() {
        let mut t = FieldTable::default();
        field_table_insert(&mut t, "a", AMQPValue::ShortShortUInt(7));
        field_table_insert(&mut t, "b", AMQPValue::LongString(LongString::from("dlx")));
        field_table_insert(&mut t, "c", AMQPValue::Boolean(true));
        field_table_insert(&mut t, &"k".repeat(300), AMQPValue::Void);
        assert_eq!(table_get_i64(&t, "a"), Some(7));
        assert_eq!(table_get_i64(&t, "b"), None);
        assert_eq!(table_get_str(&t, "b"), Some("dlx"));
        assert_eq!(table_get_bool(&t, "c"), Some(true));
        assert!(t.contains_key(&"k".repeat(255)));
    }

    #[test]
    fn validation_rejects_bad_tables() {
        // unknown type
        assert!(validate_table_body(b"\x01aZ", 1).is_err());
        // truncated value
        assert!(validate_table_body(b"\x01aI\x00\x00", 1).is_err());
        // non-UTF-8 key
        assert!(validate_table_body(b"\x01\xffV", 1).is_err());
        // fine
        assert!(validate_table_body(b"\x01aV\x01bt\x01", 1).is_ok());
    }

    #[test]
    fn table_decode_encode_round_trip() {
        let mut t = FieldTable::default();
        field_table_insert(&mut t, "LOGIN", AMQPValue::LongString("guest".into()));
        field_table_insert(&mut t, "n", AMQPValue::LongInt(-3));
        let raw = encode_field_table(&t);
        assert_eq!(decode_field_table(&raw).unwrap(), t);
        assert_eq!(decode_field_table_body(&raw[4..]).unwrap(), t);
        for len in 0..raw.len() {
            assert!(decode_field_table(&raw[..len]).is_err(), "len {len}");
        }
        let mut long = raw.clone();
        long.push(0);
        assert!(decode_field_table(&long).is_err());
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        // key "" + 'F' + len, nested 10_000 deep.
        let mut body: Vec<u8> = Vec::new();
        for _ in 0..10_000 {
            let mut outer = vec![0u8, b'F'];
            outer.extend_from_slice(&(body.len() as u32).to_be_bytes());
            outer.extend_from_slice(&body);
            body = outer;
        }
        let err = validate_table_body(&body, 1).unwrap_err();
        assert_eq!(err.code, crate::ReplyCode::FrameError);
        // amq-protocol alone aborts the process on this input (stack overflow)
        assert!(decode_field_table_body(&body).is_err());
    }
}
