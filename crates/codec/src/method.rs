//! Method frames: the hand-written hot methods (publish, ack, nack, reject) and
//! amq-protocol for the control plane.

use crate::error::{AmqpError, ReplyCode};
use crate::frame::{put_frame_header, FRAME_END, FRAME_METHOD};
use crate::table::skip_table;
use crate::wire::{put_short_str, short_str_len, Reader};
use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::{gen_class, parse_class, AMQPClass};
use bytes::{BufMut, Bytes, BytesMut};

/// Class id of `basic`.
pub const CLASS_BASIC: u16 = 60;
/// Method id of `basic.publish`.
pub const METHOD_BASIC_PUBLISH: u16 = 40;
/// Method id of `basic.return`.
pub const METHOD_BASIC_RETURN: u16 = 50;
/// Method id of `basic.deliver`.
pub const METHOD_BASIC_DELIVER: u16 = 60;
/// Method id of `basic.get-ok`.
pub const METHOD_BASIC_GET_OK: u16 = 71;
/// Method id of `basic.ack`.
pub const METHOD_BASIC_ACK: u16 = 80;
/// Method id of `basic.reject`.
pub const METHOD_BASIC_REJECT: u16 = 90;
/// Method id of `basic.nack`.
pub const METHOD_BASIC_NACK: u16 = 120;
/// Method id of `basic.qos`.
pub const METHOD_BASIC_QOS: u16 = 10;

/// A decoded method frame payload. Hot methods are decoded by hand; the rest by amq-protocol.
#[derive(Debug, Clone)]
pub enum Method {
    /// `basic.publish`; its content header and body frames follow.
    Publish(Publish),
    /// `basic.ack` (from a consumer, or a publisher confirm sent by a server).
    Ack {
        /// Delivery tag (or publish sequence number).
        delivery_tag: u64,
        /// Whether all tags up to and including this one are meant.
        multiple: bool,
    },
    /// `basic.nack`.
    Nack {
        /// Delivery tag.
        delivery_tag: u64,
        /// Whether all tags up to and including this one are meant.
        multiple: bool,
        /// Whether the message(s) go back to the queue.
        requeue: bool,
    },
    /// `basic.reject`.
    Reject {
        /// Delivery tag.
        delivery_tag: u64,
        /// Whether the message goes back to the queue.
        requeue: bool,
    },
    /// `basic.qos`, decoded here because amq-protocol drops `prefetch_size`, which a broker
    /// must refuse when non-zero.
    Qos {
        /// Prefetch window in bytes (0 = none).
        prefetch_size: u32,
        /// Prefetch window in messages (0 = none).
        prefetch_count: u16,
        /// Whether the limit is shared by the whole channel.
        global: bool,
    },
    /// Any other method, decoded by amq-protocol.
    Other(AMQPClass),
}

impl Method {
    /// The method's class and method ids.
    pub fn ids(&self) -> (u16, u16) {
        match self {
            Method::Publish(_) => (CLASS_BASIC, METHOD_BASIC_PUBLISH),
            Method::Ack { .. } => (CLASS_BASIC, METHOD_BASIC_ACK),
            Method::Nack { .. } => (CLASS_BASIC, METHOD_BASIC_NACK),
            Method::Reject { .. } => (CLASS_BASIC, METHOD_BASIC_REJECT),
            Method::Qos { .. } => (CLASS_BASIC, METHOD_BASIC_QOS),
            Method::Other(c) => (c.get_amqp_class_id(), c.get_amqp_method_id()),
        }
    }
}

/// `basic.publish` arguments. The names are the raw short-string bytes, zero-copy
/// slices of the frame payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Exchange name bytes (empty = the default exchange).
    pub exchange: Bytes,
    /// Routing key bytes.
    pub routing_key: Bytes,
    /// Return the message (basic.return 312) if no queue gets it.
    pub mandatory: bool,
    /// The `immediate` flag (RabbitMQ refuses it with 540).
    pub immediate: bool,
}

impl Publish {
    /// The exchange name; invalid UTF-8 is 502 SYNTAX_ERROR.
    pub fn exchange_str(&self) -> Result<&str, AmqpError> {
        publish_str(&self.exchange, "exchange name")
    }

    /// The routing key; invalid UTF-8 is 502 SYNTAX_ERROR.
    pub fn routing_key_str(&self) -> Result<&str, AmqpError> {
        publish_str(&self.routing_key, "routing key")
    }
}

fn publish_str<'a>(b: &'a Bytes, what: &str) -> Result<&'a str, AmqpError> {
    std::str::from_utf8(b).map_err(|_| {
        AmqpError::undecodable(format_args!("{what} is not valid UTF-8"))
            .with_method(CLASS_BASIC, METHOD_BASIC_PUBLISH)
    })
}

/// Every (class, method) pair of AMQP 0-9-1 with RabbitMQ's extensions that amq-protocol
/// can decode. Anything else is 540 NOT_IMPLEMENTED.
const KNOWN_METHODS: &[(u16, &[u16])] = &[
    (
        10,
        &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
    ),
    (20, &[10, 11, 20, 21, 40, 41]),
    (30, &[10, 11]),
    (40, &[10, 11, 20, 21, 30, 31, 40, 51]),
    (50, &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51]),
    (
        60,
        &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
    ),
    (85, &[10, 11]),
    (90, &[10, 11, 20, 21, 30, 31]),
];

/// Whether `(class_id, method_id)` names a method this codec decodes.
pub fn is_known_method(class_id: u16, method_id: u16) -> bool {
    KNOWN_METHODS
        .iter()
        .any(|(c, ms)| *c == class_id && ms.contains(&method_id))
}

/// Argument shapes, used to find and validate field tables before amq-protocol sees them.
#[derive(Clone, Copy)]
enum Arg {
    U8,
    U16,
    Bits,
    Short,
    Long,
    Table,
}

/// Argument lists of the methods that carry field tables.
fn table_signature(class_id: u16, method_id: u16) -> Option<&'static [Arg]> {
    use Arg::*;
    Some(match (class_id, method_id) {
        (10, 10) => &[U8, U8, Table, Long, Long],
        (10, 11) => &[Table, Short, Long, Short],
        (40, 10) => &[U16, Short, Short, Bits, Table],
        (40, 30) | (40, 40) | (50, 20) => &[U16, Short, Short, Short, Bits, Table],
        (50, 10) => &[U16, Short, Bits, Table],
        (50, 50) => &[U16, Short, Short, Short, Table],
        (60, 20) => &[U16, Short, Short, Bits, Table],
        _ => return None,
    })
}

fn validate_signature(args: &[u8], sig: &[Arg]) -> Result<(), AmqpError> {
    let mut r = Reader::new(args);
    let truncated = || AmqpError::undecodable("truncated method arguments");
    for arg in sig {
        match arg {
            Arg::U8 | Arg::Bits => {
                r.u8().ok_or_else(truncated)?;
            }
            Arg::U16 => {
                r.u16().ok_or_else(truncated)?;
            }
            Arg::Short => {
                r.short_str().ok_or_else(truncated)?;
            }
            Arg::Long => {
                r.long_str().ok_or_else(truncated)?;
            }
            Arg::Table => skip_table(&mut r)?,
        }
    }
    Ok(())
}

/// Decodes a method frame payload (class id, method id, arguments).
///
/// Unknown class/method → 540 NOT_IMPLEMENTED; truncated or malformed arguments, or
/// bytes left over after them → 502 SYNTAX_ERROR. Both carry the class and method ids
/// when the payload had them. Never panics.
///
/// ```
/// use bytes::Bytes;
/// use rill_codec::{decode_method, Method};
/// // basic.ack, delivery tag 5, multiple
/// let payload = Bytes::from_static(&[0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 5, 1]);
/// match decode_method(&payload).unwrap() {
///     Method::Ack { delivery_tag, multiple } => assert_eq!((delivery_tag, multiple), (5, true)),
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn decode_method(payload: &Bytes) -> Result<Method, AmqpError> {
    let mut r = Reader::new(payload);
    let (Some(class_id), Some(method_id)) = (r.u16(), r.u16()) else {
        return Err(AmqpError::undecodable(
            "method frame too short for class and method ids",
        ));
    };
    let hot = match (class_id, method_id) {
        (CLASS_BASIC, METHOD_BASIC_PUBLISH) => decode_publish(payload, &mut r),
        (CLASS_BASIC, METHOD_BASIC_ACK) => (|| {
            let delivery_tag = r.u64()?;
            let bits = r.u8()?;
            Some(Method::Ack {
                delivery_tag,
                multiple: bits & 1 != 0,
            })
        })(),
        (CLASS_BASIC, METHOD_BASIC_NACK) => (|| {
            let delivery_tag = r.u64()?;
            let bits = r.u8()?;
            Some(Method::Nack {
                delivery_tag,
                multiple: bits & 1 != 0,
                requeue: bits & 2 != 0,
            })
        })(),
        (CLASS_BASIC, METHOD_BASIC_REJECT) => (|| {
            let delivery_tag = r.u64()?;
            let bits = r.u8()?;
            Some(Method::Reject {
                delivery_tag,
                requeue: bits & 1 != 0,
            })
        })(),
        (CLASS_BASIC, METHOD_BASIC_QOS) => (|| {
            let prefetch_size = r.u32()?;
            let prefetch_count = r.u16()?;
            let bits = r.u8()?;
            Some(Method::Qos {
                prefetch_size,
                prefetch_count,
                global: bits & 1 != 0,
            })
        })(),
        _ => return decode_other(payload, class_id, method_id),
    };
    match hot {
        Some(m) if r.is_empty() => Ok(m),
        Some(_) => Err(
            AmqpError::undecodable("unexpected bytes after method arguments")
                .with_method(class_id, method_id),
        ),
        None => {
            Err(AmqpError::undecodable("truncated method arguments")
                .with_method(class_id, method_id))
        }
    }
}

fn decode_publish(payload: &Bytes, r: &mut Reader<'_>) -> Option<Method> {
    let _ticket = r.u16()?;
    let ex_start = r.pos() + 1;
    let exchange = r.short_str()?;
    let ex = payload.slice(ex_start..ex_start + exchange.len());
    let rk_start = r.pos() + 1;
    let routing_key = r.short_str()?;
    let rk = payload.slice(rk_start..rk_start + routing_key.len());
    let bits = r.u8()?;
    Some(Method::Publish(Publish {
        exchange: ex,
        routing_key: rk,
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    }))
}

fn decode_other(payload: &[u8], class_id: u16, method_id: u16) -> Result<Method, AmqpError> {
    if !is_known_method(class_id, method_id) {
        return Err(AmqpError::new(
            ReplyCode::NotImplemented,
            format_args!("unknown method {class_id}.{method_id}"),
        )
        .with_method(class_id, method_id));
    }
    if let Some(sig) = table_signature(class_id, method_id) {
        validate_signature(payload.get(4..).unwrap_or_default(), sig)
            .map_err(|e| e.with_method(class_id, method_id))?;
    }
    match parse_class(payload) {
        Ok(([], class)) => Ok(Method::Other(class)),
        Ok(_) => Err(
            AmqpError::undecodable("unexpected bytes after method arguments")
                .with_method(class_id, method_id),
        ),
        Err(_) => {
            Err(AmqpError::undecodable("malformed method arguments")
                .with_method(class_id, method_id))
        }
    }
}

/// Appends a method frame for any method, generated by amq-protocol.
///
/// Never panics: amq-protocol's `ShortString` cannot hold more than 255 bytes, so every
/// method built from it encodes. Should generation still fail, nothing is written; use
/// [`try_encode_method`] to see the error.
pub fn encode_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) {
    // Writing into a Vec cannot fail; the Result only exists for the generic writer.
    let _ = try_encode_method(out, channel, method);
}

/// [`encode_method`], reporting a generation failure as 541 INTERNAL_ERROR.
pub fn try_encode_method(
    out: &mut BytesMut,
    channel: u16,
    method: &AMQPClass,
) -> Result<(), AmqpError> {
    let internal = |what: &str| {
        AmqpError::new(
            ReplyCode::InternalError,
            format_args!("cannot encode method: {what}"),
        )
        .with_method(method.get_amqp_class_id(), method.get_amqp_method_id())
    };
    let (args, _) = gen_class(method)(WriteContext::from(Vec::with_capacity(64)))
        .map_err(|e| internal(&e.to_string()))?
        .into_inner();
    let size = u32::try_from(args.len()).map_err(|_| internal("payload over 4 GiB"))?;
    out.reserve(args.len() + 8);
    put_frame_header(out, FRAME_METHOD, channel, size);
    out.put_slice(&args);
    out.put_u8(FRAME_END);
    Ok(())
}

/// Appends a `basic.ack` frame (publisher confirms).
pub fn encode_basic_ack(out: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    put_tag_method(
        out,
        channel,
        METHOD_BASIC_ACK,
        delivery_tag,
        u8::from(multiple),
    );
}

/// Appends a `basic.nack` frame (publisher confirms).
pub fn encode_basic_nack(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    multiple: bool,
    requeue: bool,
) {
    let bits = u8::from(multiple) | u8::from(requeue) << 1;
    put_tag_method(out, channel, METHOD_BASIC_NACK, delivery_tag, bits);
}

/// Appends a `basic.reject` frame (used by clients; here for tests and in-process clients).
pub fn encode_basic_reject(out: &mut BytesMut, channel: u16, delivery_tag: u64, requeue: bool) {
    put_tag_method(
        out,
        channel,
        METHOD_BASIC_REJECT,
        delivery_tag,
        u8::from(requeue),
    );
}

fn put_tag_method(out: &mut BytesMut, channel: u16, method_id: u16, tag: u64, bits: u8) {
    out.reserve(21);
    put_frame_header(out, FRAME_METHOD, channel, 13);
    out.put_u16(CLASS_BASIC);
    out.put_u16(method_id);
    out.put_u64(tag);
    out.put_u8(bits);
    out.put_u8(FRAME_END);
}

/// Appends a `basic.publish` method frame (client side: tests, benchmarks, in-process
/// publishers). Names over 255 bytes are cut at a character boundary.
pub fn encode_publish(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    immediate: bool,
) {
    let size = 4 + 2 + short_str_len(exchange) + short_str_len(routing_key) + 1;
    out.reserve(size + 8);
    put_frame_header(out, FRAME_METHOD, channel, size as u32);
    out.put_u16(CLASS_BASIC);
    out.put_u16(METHOD_BASIC_PUBLISH);
    out.put_u16(0);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u8(u8::from(mandatory) | u8::from(immediate) << 1);
    out.put_u8(FRAME_END);
}
