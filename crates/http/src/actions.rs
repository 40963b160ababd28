//! The management API's message actions: getting messages from a queue and publishing to an
//! exchange (what `rabbitmqadmin get` and `publish` and the UI's queue page use), with
//! RabbitMQ's field names, encodings and errors.

use crate::auth::User;
use crate::json::{from_json_table, table};
use crate::write::Failure;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use rill_broker::session::{Inbox, Session};
use rill_codec::{BasicProperties, Publish, ShortString};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// `[{key_missing,a},{key_missing,b}]`, as Erlang prints the list RabbitMQ reports (one line
/// while it fits in 80 columns, else one element per line).
fn keys_missing(m: &Map<String, Value>, required: &[&str]) -> Result<(), Failure> {
    let missing: Vec<String> = required
        .iter()
        .filter(|k| !m.contains_key(**k))
        .map(|k| format!("{{key_missing,{k}}}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let one_line = format!("[{}]", missing.join(","));
    let reason = if one_line.len() <= 80 {
        one_line
    } else {
        format!("[{}]", missing.join(",\n "))
    };
    Err(Failure::bad_request(reason))
}

fn object(body: &Bytes) -> Result<Map<String, Value>, Failure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Failure::bad_request("not_json")),
    }
}

/// A message's properties as RabbitMQ shows them (`[]` when there are none: its empty
/// proplist).
pub fn properties_json(p: &BasicProperties) -> Value {
    let mut m = Map::new();
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    let fields: [(&str, Option<Value>); 14] = [
        ("content_type", s(p.content_type())),
        ("content_encoding", s(p.content_encoding())),
        ("headers", p.headers().as_ref().map(table)),
        ("delivery_mode", p.delivery_mode().map(Value::from)),
        ("priority", p.priority().map(Value::from)),
        ("correlation_id", s(p.correlation_id())),
        ("reply_to", s(p.reply_to())),
        ("expiration", s(p.expiration())),
        ("message_id", s(p.message_id())),
        ("timestamp", p.timestamp().map(Value::from)),
        ("type", s(p.kind())),
        ("user_id", s(p.user_id())),
        ("app_id", s(p.app_id())),
        ("cluster_id", s(p.cluster_id())),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    if m.is_empty() {
        json!([])
    } else {
        Value::Object(m)
    }
}

/// Properties from the JSON a publish carries.
fn properties_from(v: &Value) -> Result<BasicProperties, Failure> {
    let mut p = BasicProperties::default();
    let Value::Object(m) = v else {
        // RabbitMQ takes `[]` for no properties too.
        return match v {
            Value::Array(a) if a.is_empty() => Ok(p),
            _ => Err(Failure::bad_request("properties must be an object")),
        };
    };
    let text = |k: &str| -> Result<Option<ShortString>, Failure> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 255 => Ok(Some(ShortString::from(s.as_str()))),
            Some(other) => Err(Failure::bad_request(format!(
                "invalid property {k}: {other}"
            ))),
        }
    };
    let number = |k: &str| -> Result<Option<u64>, Failure> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Failure::bad_request(format!("invalid property {k}: {v}"))),
        }
    };
    let small = |k: &str| -> Result<Option<u8>, Failure> {
        number(k)?
            .map(|n| {
                u8::try_from(n)
                    .map_err(|_| Failure::bad_request(format!("invalid property {k}: {n}")))
            })
            .transpose()
    };
    if let Some(v) = text("content_type")? {
        p = p.with_content_type(v);
    }
    if let Some(v) = text("content_encoding")? {
        p = p.with_content_encoding(v);
    }
    if let Some(h) = m.get("headers").filter(|h| !h.is_null()) {
        p = p.with_headers(from_json_table(h)?);
    }
    if let Some(v) = small("delivery_mode")? {
        p = p.with_delivery_mode(v);
    }
    if let Some(v) = small("priority")? {
        p = p.with_priority(v);
    }
    if let Some(v) = text("correlation_id")? {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = text("reply_to")? {
        p = p.with_reply_to(v);
    }
    if let Some(v) = text("expiration")? {
        p = p.with_expiration(v);
    }
    if let Some(v) = text("message_id")? {
        p = p.with_message_id(v);
    }
    if let Some(v) = number("timestamp")? {
        p = p.with_timestamp(v);
    }
    if let Some(v) = text("type")? {
        p = p.with_type(v);
    }
    if let Some(v) = text("user_id")? {
        p = p.with_user_id(v);
    }
    if let Some(v) = text("app_id")? {
        p = p.with_app_id(v);
    }
    Ok(p)
}

/// `POST /api/queues/{vhost}/{name}/get`: `{count, ackmode, encoding[, truncate]}`.
pub(crate) async fn get_messages(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let m = object(&body)?;
    keys_missing(&m, &["ackmode", "count", "encoding"])?;
    // A number, or digits in a string (what `rabbitmqadmin` sends).
    let int = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok());
    let count = int(&m["count"]).ok_or_else(|| Failure::bad_request("count must be a number"))?;
    let (ack, requeue) = match m["ackmode"].as_str() {
        Some("ack_requeue_true") | Some("reject_requeue_true") => (true, true),
        Some("ack_requeue_false") => (true, false),
        Some("reject_requeue_false") => (false, false),
        _ => return Err(Failure::bad_request("unknown ackmode")),
    };
    let base64 = match m["encoding"].as_str() {
        Some("auto") => false,
        Some("base64") => true,
        _ => return Err(Failure::bad_request("unknown encoding")),
    };
    let truncate = m.get("truncate").and_then(int);
    let not_found = || Failure::not_found(format!("NOT_FOUND - no queue '{name}' in vhost '{v}'"));
    let vhost = state.broker.vhost(&v).ok_or_else(not_found)?;
    let q = crate::api::find_queue(&vhost, &name).map_err(|_| not_found())?;
    // All taken first (the counts left go down), then settled together, as RabbitMQ does.
    let mut taken = Vec::new();
    for _ in 0..count {
        match q.get(true) {
            Some(got) => taken.push(got),
            None => break,
        }
    }
    let mut out = Vec::with_capacity(taken.len());
    for (item, left) in &taken {
        let msg = &item.msg;
        let props = rill_codec::decode_properties(&msg.properties).unwrap_or_default();
        let body = &msg.body[..];
        let shown = truncate.map_or(body, |t| &body[..body.len().min(t as usize)]);
        let (payload, encoding) = match (base64, std::str::from_utf8(shown)) {
            (false, Ok(s)) => (s.to_string(), "string"),
            _ => (rill_codec::base64::encode(shown), "base64"),
        };
        out.push(json!({
            "payload_bytes": body.len(),
            "redelivered": item.redelivered,
            "exchange": &*msg.exchange,
            "routing_key": String::from_utf8_lossy(&msg.routing_key),
            "message_count": left,
            "properties": properties_json(&props),
            "payload": payload,
            "payload_encoding": encoding,
        }));
    }
    let seqs: Vec<u64> = taken.iter().map(|(item, _)| item.seq).collect();
    match (ack, requeue) {
        (_, true) => q.requeue(seqs),
        (true, false) => q.ack(seqs),
        (false, false) => q.discard(seqs),
    }
    Ok(Json(Value::Array(out)))
}

/// `POST /api/exchanges/{vhost}/{name}/publish`:
/// `{routing_key, properties, payload, payload_encoding}` → `{"routed": bool}`. Published as
/// the requesting user (so the broker checks `user_id` and the exchange as over AMQP), and
/// mandatory, to tell whether a queue took it.
pub(crate) async fn publish(
    State(state): State<AppState>,
    user: User,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, Failure> {
    let m = object(&body)?;
    keys_missing(
        &m,
        &["routing_key", "properties", "payload", "payload_encoding"],
    )?;
    let routing_key = m["routing_key"]
        .as_str()
        .ok_or_else(|| Failure::bad_request("routing_key must be a string"))?;
    let payload = m["payload"]
        .as_str()
        .ok_or_else(|| Failure::bad_request("payload must be a string"))?;
    let body = match m["payload_encoding"].as_str() {
        Some("string") => Bytes::copy_from_slice(payload.as_bytes()),
        Some("base64") => Bytes::from(
            rill_codec::base64::decode(payload)
                .ok_or_else(|| Failure::bad_request("payload is not base64"))?,
        ),
        _ => return Err(Failure::bad_request("unknown payload_encoding")),
    };
    let props = properties_from(&m["properties"])?;
    let exchange = if name == "amq.default" { "" } else { &name };
    let broker = state.broker.clone();
    let publish = Publish {
        exchange: Bytes::copy_from_slice(exchange.as_bytes()),
        routing_key: Bytes::copy_from_slice(routing_key.as_bytes()),
        mandatory: true,
        immediate: false,
    };
    let refused =
        |e: rill_codec::AmqpError| Failure::bad_request(format!("{} {}", e.code as u16, e.text));
    let mut session = Session::open(
        &broker,
        &v,
        &user.name,
        user.password(),
        Arc::new(Inbox::default()),
    )
    .map_err(refused)?;
    let published = session
        .publish(&publish, rill_codec::encode_properties(&props), body)
        .map_err(refused);
    session.close();
    Ok(Json(json!({"routed": published?.returned.is_none()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_read_as_erlang_prints_them() {
        let m = Map::new();
        let short = keys_missing(&m, &["ackmode", "count", "encoding"]).unwrap_err();
        assert_eq!(
            short.body()["reason"],
            "[{key_missing,ackmode},{key_missing,count},{key_missing,encoding}]"
        );
        let long = keys_missing(
            &m,
            &["routing_key", "properties", "payload", "payload_encoding"],
        )
        .unwrap_err();
        assert_eq!(
            long.body()["reason"],
            "[{key_missing,routing_key},\n {key_missing,properties},\n {key_missing,payload},\n {key_missing,payload_encoding}]"
        );
    }

    #[test]
    fn empty_properties_are_an_empty_list() {
        assert_eq!(properties_json(&BasicProperties::default()), json!([]));
        let p = properties_from(&json!({"delivery_mode": 2, "headers": {"h": 1}})).unwrap();
        assert_eq!(
            properties_json(&p),
            json!({"delivery_mode": 2, "headers": {"h": 1}})
        );
    }
}
