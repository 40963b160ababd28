//! AMQP 0-9-1 codec: bytes ↔ frames, methods, content headers and properties.
//!
//! Owns the wire format and nothing else: no sockets, no I/O, no broker state (it knows
//! nothing of queues, exchanges, channels' states or users). Every function is pure and
//! safe on hostile input: decoders return [`AmqpError`]s carrying the reply code the
//! server should close with, and never panic (this crate is fuzzed).
//!
//! The control plane (connection, channel, exchange, queue, qos, consume, confirm, tx) is
//! decoded and encoded by `amq-protocol`. The hot path is written by hand because
//! amq-protocol costs ~1.3 µs a message: frame splitting with the `frame_max` check before
//! buffering, `basic.publish`/`ack`/`nack`/`reject` decode, content headers kept as raw
//! bytes (passed through to consumers without re-encoding), and `basic.deliver`/`get-ok`/
//! `return`/`ack`/`nack` encode.
//!
//! # Layout
//! - `error`: [`ReplyCode`] (soft/hard) and [`AmqpError`], the one error type.
//! - `frame`: [`split_frame`] cuts [`RawFrame`]s off a `BytesMut`; frame constants.
//! - `method`: [`decode_method`] → [`Method`]; method encoders.
//! - `content`: [`decode_content_header`]; deliver/get-ok/return/content encoders.
//! - `properties`: [`PropertiesView`] over raw properties; full decode/encode.
//! - `table`: field-table validation (nesting bound) and lookups.
//! - `wire`: checked reads and short-string writes shared by the above.
//!
//! # Example
//! ```
//! use bytes::BytesMut;
//! use rill_codec::*;
//! let mut out = BytesMut::new();
//! encode_deliver(&mut out, 1, "ctag", 1, false, "", "hello", &[0, 0], b"Hello World!", 131072);
//! let method = split_frame(&mut out, 131072).unwrap().unwrap();
//! assert_eq!(method.kind, FRAME_METHOD);
//! let header = split_frame(&mut out, 131072).unwrap().unwrap();
//! assert_eq!(decode_content_header(header.payload).unwrap().body_size, 12);
//! let body = split_frame(&mut out, 131072).unwrap().unwrap();
//! assert_eq!(&body.payload[..], b"Hello World!");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod content;
mod error;
mod frame;
mod method;
mod properties;
mod table;
mod wire;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests;

pub mod base64;
pub use amq_protocol;
pub use amq_protocol::protocol::AMQPClass;
pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

pub use content::{
    decode_content_header, encode_content, encode_deliver, encode_get_ok, encode_return,
    ContentHeader,
};
pub use error::{AmqpError, ReplyCode};
pub use frame::{
    encode_heartbeat, split_frame, RawFrame, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT,
    FRAME_METHOD, FRAME_OVERHEAD, PROTOCOL_HEADER,
};
pub use method::{
    decode_method, encode_basic_ack, encode_basic_nack, encode_basic_reject, encode_method,
    encode_publish, is_known_method, try_encode_method, Method, Publish, CLASS_BASIC,
    METHOD_BASIC_ACK, METHOD_BASIC_DELIVER, METHOD_BASIC_GET_OK, METHOD_BASIC_NACK,
    METHOD_BASIC_PUBLISH, METHOD_BASIC_REJECT, METHOD_BASIC_RETURN,
};
pub use properties::{
    decode_properties, encode_properties, replace_headers, PropertiesView, EMPTY_PROPERTIES,
};
pub use table::{
    array_items, decode_field_table, decode_field_table_body, decode_raw_value, encode_field_table,
    field_table_get, field_table_insert, raw_nested_body, table_entries, table_get_bool,
    table_get_i64, table_get_str, value_as_bytes, value_as_i64, MAX_TABLE_DEPTH,
};
pub use wire::short_string_truncated;
