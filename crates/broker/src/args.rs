//! Queue arguments (`x-...`) that change a queue's behaviour, parsed and validated once at
//! declaration with RabbitMQ's error texts.

use crate::dedup::DedupArgs;
use crate::vhost::type_name;
use rill_codec::{AMQPValue, AmqpError, FieldTable, ReplyCode};

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    /// Accepted on a single node as a durable queue with a delivery limit.
    Quorum,
    Stream,
}

impl QueueType {
    pub fn module_name(self) -> &'static str {
        match self {
            QueueType::Classic => "rabbit_classic_queue",
            QueueType::Quorum => "rabbit_quorum_queue",
            QueueType::Stream => "rabbit_stream_queue",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueArgs {
    pub max_length: Option<u64>,
    pub max_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-message-ttl`, ms.
    pub message_ttl: Option<u64>,
    /// `x-expires`, ms of disuse after which the queue is deleted.
    pub expires: Option<u64>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority`: number of priority levels above 0.
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    /// `x-delivery-limit` (quorum queues).
    pub delivery_limit: Option<u64>,
    pub queue_type: QueueType,
    /// `x-max-age` (streams), ms: segments whose newest message is older go at the next roll.
    pub max_age_ms: Option<u64>,
    /// `x-stream-max-segment-size-bytes` (streams): retention works a segment at a time.
    pub stream_segment_bytes: Option<u64>,
    /// `x-message-deduplication` and its cache arguments.
    pub dedup: Option<DedupArgs>,
}

impl Default for QueueArgs {
    fn default() -> Self {
        QueueArgs {
            max_length: None,
            max_bytes: None,
            overflow: Overflow::DropHead,
            message_ttl: None,
            expires: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            max_priority: None,
            single_active_consumer: false,
            delivery_limit: None,
            queue_type: QueueType::Classic,
            max_age_ms: None,
            stream_segment_bytes: None,
            dedup: None,
        }
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    rill_codec::value_as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// `x-max-age` as RabbitMQ writes it: a positive number and a unit, `Y`, `M`, `D`, `h`, `m` or
/// `s` (e.g. `7D`, `1h`), in milliseconds.
///
/// ```
/// assert_eq!(rill_broker::args::parse_max_age("7D"), Some(7 * 86_400_000));
/// assert_eq!(rill_broker::args::parse_max_age("10x"), None);
/// ```
pub fn parse_max_age(s: &str) -> Option<u64> {
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(secs * 1000)
}

impl QueueArgs {
    /// Parses and checks `args` for queue `name` in `vhost`, given the declared flags.
    pub fn parse(
        args: &FieldTable,
        name: &str,
        vhost: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
    ) -> Result<QueueArgs, AmqpError> {
        let what = format!("queue '{name}' in vhost '{vhost}'");
        let invalid = |arg: &str, detail: String| {
            AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("invalid arg '{arg}' for {what}: {detail}"),
            )
        };
        let get = |k: &str| args.inner().get(k);
        let mut a = QueueArgs::default();
        if let Some(v) = get("x-queue-type") {
            a.queue_type = match text(v).as_deref() {
                Some("classic") => QueueType::Classic,
                Some("quorum") => QueueType::Quorum,
                Some("stream") => QueueType::Stream,
                Some(other) => {
                    return Err(invalid(
                        "x-queue-type",
                        format!("\"unsupported queue type '{other}'\""),
                    ))
                }
                None => {
                    return Err(invalid(
                        "x-queue-type",
                        format!("{{unacceptable_type,{}}}", type_name(v)),
                    ))
                }
            };
        }
        if a.queue_type != QueueType::Classic {
            if name.is_empty() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "Cannot declare a server-named queue for type {}",
                        a.queue_type.module_name()
                    ),
                ));
            }
            let bad = if !durable {
                Some("non-durable")
            } else if exclusive {
                Some("exclusive-owner")
            } else if auto_delete {
                Some("auto-delete")
            } else {
                None
            };
            if let Some(prop) = bad {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("invalid property '{prop}' for {what}"),
                ));
            }
            if get("x-max-priority").is_some() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "invalid arg 'x-max-priority' for {what} of queue type {}",
                        a.queue_type.module_name()
                    ),
                ));
            }
        }
        let non_negative = |k: &str| -> Result<Option<u64>, AmqpError> {
            let Some(v) = get(k) else {
                return Ok(None);
            };
            match rill_codec::value_as_i64(v) {
                Some(n) if n >= 0 => Ok(Some(n as u64)),
                Some(n) => Err(invalid(k, format!("{{value_negative,{n}}}"))),
                None => Err(invalid(
                    k,
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                )),
            }
        };
        a.max_length = non_negative("x-max-length")?;
        a.max_bytes = non_negative("x-max-length-bytes")?;
        a.message_ttl = non_negative("x-message-ttl")?;
        a.delivery_limit = non_negative("x-delivery-limit")?;
        a.stream_segment_bytes = non_negative("x-stream-max-segment-size-bytes")?;
        if let (QueueType::Stream, Some(v)) = (a.queue_type, get("x-max-age")) {
            a.max_age_ms = Some(text(v).as_deref().and_then(parse_max_age).ok_or_else(|| {
                invalid(
                    "x-max-age",
                    format!("{{invalid_max_age,{}}}", text(v).unwrap_or_default()),
                )
            })?);
        }
        if let Some(v) = get("x-expires") {
            match rill_codec::value_as_i64(v) {
                Some(n) if n > 0 => a.expires = Some(n as u64),
                Some(n) => return Err(invalid("x-expires", format!("{{value_zero_or_less,{n}}}"))),
                None => {
                    return Err(invalid(
                        "x-expires",
                        format!("{{unacceptable_type,{}}}", type_name(v)),
                    ))
                }
            }
        }
        if let Some(v) = get("x-max-priority") {
            match rill_codec::value_as_i64(v) {
                Some(n) if n < 0 => {
                    return Err(invalid("x-max-priority", format!("{{value_negative,{n}}}")))
                }
                Some(n) if n > 255 => {
                    return Err(invalid(
                        "x-max-priority",
                        format!("{{max_value_exceeded,{n}}}"),
                    ))
                }
                Some(n) => a.max_priority = Some(n as u8),
                None => {
                    return Err(invalid(
                        "x-max-priority",
                        format!("\"expected integer, got {}\"", type_name(v)),
                    ))
                }
            }
        }
        if let Some(v) = get("x-single-active-consumer") {
            match v {
                AMQPValue::Boolean(b) => a.single_active_consumer = *b,
                other => {
                    return Err(invalid(
                        "x-single-active-consumer",
                        format!("{{unacceptable_type,{}}}", type_name(other)),
                    ))
                }
            }
        }
        a.overflow = match get("x-overflow").and_then(text).as_deref() {
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            _ => Overflow::DropHead,
        };
        a.dead_letter_exchange = get("x-dead-letter-exchange").and_then(text);
        a.dead_letter_routing_key = get("x-dead-letter-routing-key").and_then(text);
        a.dedup = DedupArgs::for_queue(args, a.queue_type, &what)?;
        Ok(a)
    }

    /// Length limits exceeded by a queue of `len` ready messages and `bytes` body bytes.
    pub fn exceeded(&self, len: usize, bytes: u64) -> bool {
        self.max_length.is_some_and(|m| len as u64 > m) || self.max_bytes.is_some_and(|m| bytes > m)
    }
}
