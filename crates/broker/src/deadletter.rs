//! Dead-lettering: a message that leaves a queue without being consumed (rejected without
//! requeue, expired, dropped by a length limit, over its delivery limit) is republished to the
//! queue's dead-letter exchange with the `x-death` history RabbitMQ writes.
//!
//! The headers are rewritten in wire order because RabbitMQ's order is observable: the
//! message's own headers first, then `x-death` (most recent death first), then
//! `x-first-death-exchange/queue/reason`. An `x-death` entry written on a message with no
//! history has the keys count, reason, queue, time, exchange, routing-keys
//! [, original-expiration]; an entry written or updated later has them sorted; entries are
//! matched on (queue, reason, exchange) and only their count changes.

use bytes::Bytes;
use rill_codec::{
    array_items, decode_raw_value, encode_field_table, raw_nested_body, replace_headers,
    table_entries, AMQPValue, AmqpError, FieldTable, LongString, PropertiesView,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rejected,
    Expired,
    Maxlen,
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::Maxlen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// One death to record.
#[derive(Debug, Clone)]
pub struct Death<'a> {
    pub queue: &'a str,
    pub reason: Reason,
    /// The exchange the message had been published to.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub time_secs: u64,
}

fn put_long_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'S');
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_key(out: &mut Vec<u8>, key: &str) {
    let k = rill_codec::short_string_truncated(key);
    out.push(k.as_str().len() as u8);
    out.extend_from_slice(k.as_str().as_bytes());
}

fn put_entry(out: &mut Vec<u8>, key: &str, raw_value: &[u8]) {
    put_key(out, key);
    out.extend_from_slice(raw_value);
}

fn long_str_value(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 5);
    put_long_str(&mut v, s.as_bytes());
    v
}

fn nested(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(tag);
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn text(v: Option<&AMQPValue>) -> Option<String> {
    rill_codec::value_as_bytes(v?).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// A fresh entry in RabbitMQ's insertion order.
fn first_entry(d: &Death<'_>, original_expiration: Option<&str>) -> Vec<u8> {
    let mut t = Vec::new();
    put_key(&mut t, "count");
    t.push(b'l');
    t.extend_from_slice(&1i64.to_be_bytes());
    put_entry(&mut t, "reason", &long_str_value(d.reason.as_str()));
    put_entry(&mut t, "queue", &long_str_value(d.queue));
    put_key(&mut t, "time");
    t.push(b'T');
    t.extend_from_slice(&d.time_secs.to_be_bytes());
    put_entry(&mut t, "exchange", &long_str_value(d.exchange));
    let mut keys = Vec::new();
    put_long_str(&mut keys, d.routing_key.as_bytes());
    put_entry(&mut t, "routing-keys", &nested(b'A', &keys));
    if let Some(e) = original_expiration {
        put_entry(&mut t, "original-expiration", &long_str_value(e));
    }
    nested(b'F', &t)
}

/// An entry with sorted keys (amq-protocol's table encoder sorts them).
fn sorted_entry(t: &FieldTable) -> Vec<u8> {
    let mut v = vec![b'F'];
    v.extend_from_slice(&encode_field_table(t));
    v
}

/// Returns the message's properties with this death recorded and `expiration` removed.
pub fn record_death(properties: &[u8], d: &Death<'_>) -> Result<Bytes, AmqpError> {
    let view = PropertiesView::new(properties)?;
    let original_expiration = view.expiration();
    let entries = match view.headers_raw() {
        Some(body) => table_entries(body)?,
        None => Vec::new(),
    };
    let mut own: Vec<(&str, &[u8])> = Vec::new();
    let mut history: Vec<&[u8]> = Vec::new();
    let mut had_history = false;
    let mut first: [Option<&[u8]>; 3] = [None; 3];
    for (k, v) in entries {
        match k {
            "x-death" => {
                had_history = true;
                if let Some(body) = raw_nested_body(v) {
                    history = array_items(body)?;
                }
            }
            "x-first-death-exchange" => first[0] = Some(v),
            "x-first-death-queue" => first[1] = Some(v),
            "x-first-death-reason" => first[2] = Some(v),
            _ => own.push((k, v)),
        }
    }
    // The matching entry, if any, is updated and moves to the front.
    let mut updated: Option<Vec<u8>> = None;
    let mut rest: Vec<&[u8]> = Vec::with_capacity(history.len());
    for item in history {
        if updated.is_none() {
            if let Some(AMQPValue::FieldTable(t)) = decode_raw_value(item) {
                let same = text(t.inner().get("queue")).as_deref() == Some(d.queue)
                    && text(t.inner().get("reason")).as_deref() == Some(d.reason.as_str())
                    && text(t.inner().get("exchange")).as_deref() == Some(d.exchange);
                if same {
                    let count = t
                        .inner()
                        .get("count")
                        .and_then(rill_codec::value_as_i64)
                        .unwrap_or(0);
                    let mut t = t.clone();
                    t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
                    updated = Some(sorted_entry(&t));
                    continue;
                }
            }
        }
        rest.push(item);
    }
    let newest = match updated {
        Some(e) => e,
        None if !had_history => first_entry(d, original_expiration),
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert(
                "reason".into(),
                AMQPValue::LongString(LongString::from(d.reason.as_str())),
            );
            t.insert(
                "queue".into(),
                AMQPValue::LongString(LongString::from(d.queue)),
            );
            t.insert("time".into(), AMQPValue::Timestamp(d.time_secs));
            t.insert(
                "exchange".into(),
                AMQPValue::LongString(LongString::from(d.exchange)),
            );
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(
                    vec![AMQPValue::LongString(LongString::from(d.routing_key))].into(),
                ),
            );
            if let Some(e) = original_expiration {
                t.insert(
                    "original-expiration".into(),
                    AMQPValue::LongString(LongString::from(e)),
                );
            }
            sorted_entry(&t)
        }
    };
    let mut items = newest;
    for item in rest {
        items.extend_from_slice(item);
    }
    let mut body = Vec::new();
    for (k, v) in own {
        put_entry(&mut body, k, v);
    }
    put_entry(&mut body, "x-death", &nested(b'A', &items));
    let defaults = [d.exchange, d.queue, d.reason.as_str()];
    for ((key, old), default) in [
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    .into_iter()
    .zip(first)
    .zip(defaults)
    {
        match old {
            Some(v) => put_entry(&mut body, key, v),
            None => put_entry(&mut body, key, &long_str_value(default)),
        }
    }
    replace_headers(properties, Some(&body), true)
}

/// Returns the properties with header `key` set to a signed 64-bit value: replaced where it
/// was, or appended after the other headers.
pub fn set_header_long(properties: &[u8], key: &str, value: i64) -> Result<Bytes, AmqpError> {
    let view = PropertiesView::new(properties)?;
    let entries = match view.headers_raw() {
        Some(body) => table_entries(body)?,
        None => Vec::new(),
    };
    let mut raw = vec![b'l'];
    raw.extend_from_slice(&value.to_be_bytes());
    let mut body = Vec::new();
    let mut placed = false;
    for (k, v) in entries {
        if k == key {
            put_entry(&mut body, k, &raw);
            placed = true;
        } else {
            put_entry(&mut body, k, v);
        }
    }
    if !placed {
        put_entry(&mut body, key, &raw);
    }
    replace_headers(properties, Some(&body), false)
}

/// Whether dead-lettering a message (whose properties already record this death) into `target`
/// would close a cycle with no rejection in it; RabbitMQ drops the message for such a queue.
pub fn is_cycle(properties: &[u8], reason: Reason, target: &str) -> bool {
    if reason == Reason::Rejected {
        return false;
    }
    let Ok(Some(headers)) = PropertiesView::new(properties).and_then(|v| v.headers()) else {
        return false;
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    for death in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = death else {
            continue;
        };
        if text(t.inner().get("reason")).as_deref() == Some("rejected") {
            return false;
        }
        if text(t.inner().get("queue")).as_deref() == Some(target) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_codec::{encode_properties, BasicProperties};

    fn death<'a>(queue: &'a str, reason: Reason) -> Death<'a> {
        Death {
            queue,
            reason,
            exchange: "",
            routing_key: queue,
            time_secs: 1_700_000_000,
        }
    }

    fn xdeath(props: &[u8]) -> Vec<FieldTable> {
        let h = PropertiesView::new(props)
            .unwrap()
            .headers()
            .unwrap()
            .unwrap();
        match h.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_death_then_repeat_increments_and_keeps_order_rules() {
        let raw = encode_properties(&BasicProperties::default().with_expiration("200".into()));
        let once = record_death(&raw, &death("q", Reason::Expired)).unwrap();
        let v = PropertiesView::new(&once).unwrap();
        assert_eq!(v.expiration(), None);
        let body = v.headers_raw().unwrap();
        let keys: Vec<&str> = table_entries(body)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "x-death",
                "x-first-death-exchange",
                "x-first-death-queue",
                "x-first-death-reason"
            ]
        );
        let d = xdeath(&once);
        assert_eq!(d.len(), 1);
        assert_eq!(
            text(d[0].inner().get("original-expiration")).as_deref(),
            Some("200")
        );
        // The first entry keeps RabbitMQ's insertion order on the wire.
        let item =
            array_items(raw_nested_body(table_entries(body).unwrap()[0].1).unwrap()).unwrap()[0];
        let order: Vec<&str> = table_entries(raw_nested_body(item).unwrap())
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            order,
            [
                "count",
                "reason",
                "queue",
                "time",
                "exchange",
                "routing-keys",
                "original-expiration"
            ]
        );
        let twice = record_death(
            &record_death(&once, &death("r", Reason::Rejected)).unwrap(),
            &death("q", Reason::Expired),
        )
        .unwrap();
        let d = xdeath(&twice);
        assert_eq!(d.len(), 2);
        assert_eq!(text(d[0].inner().get("queue")).as_deref(), Some("q"));
        assert_eq!(d[0].inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(
            text(d[1].inner().get("reason")).as_deref(),
            Some("rejected")
        );
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let raw = encode_properties(&BasicProperties::default());
        let expired = record_death(&raw, &death("q", Reason::Expired)).unwrap();
        assert!(is_cycle(&expired, Reason::Expired, "q"));
        assert!(!is_cycle(&expired, Reason::Expired, "other"));
        assert!(!is_cycle(&expired, Reason::Rejected, "q"));
        let rejected = record_death(&raw, &death("q", Reason::Rejected)).unwrap();
        let again = record_death(&rejected, &death("w", Reason::Expired)).unwrap();
        assert!(!is_cycle(&again, Reason::Expired, "q"));
    }
}
