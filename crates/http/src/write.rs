//! Creating and deleting queues, exchanges and bindings, and purging queues, with the status
//! codes and error bodies RabbitMQ's management API answers with: 201 when created, 204 when
//! it already existed (or on delete), 400 `bad_request` for bodies it cannot use and for
//! inequivalent redeclarations, 404 `not_found` naming what is missing.

use crate::api::{binding_path, find_queue, find_vhost, ApiError};
use crate::auth::User;
use crate::json::{from_json_table, Invalid};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rill_broker::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use rill_codec::{AmqpError, FieldTable, ReplyCode};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The connection id management operations act as: no connection owns an exclusive queue
/// through it.
const HTTP_CONNECTION: u64 = u64::MAX;

/// An error answer: status and `{error, reason}` body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    body: Value,
}

impl Failure {
    pub(crate) fn bad_request(reason: impl Into<Value>) -> Failure {
        Failure {
            status: StatusCode::BAD_REQUEST,
            body: json!({"error": "bad_request", "reason": reason.into()}),
        }
    }

    pub(crate) fn not_found(reason: impl Into<Value>) -> Failure {
        Failure {
            status: StatusCode::NOT_FOUND,
            body: json!({"error": "not_found", "reason": reason.into()}),
        }
    }

    /// The `{error, reason}` body.
    pub fn body(&self) -> &Value {
        &self.body
    }

    /// RabbitMQ answers a refused operation on a built-in object with 401.
    fn access_refused() -> Failure {
        Failure {
            status: StatusCode::UNAUTHORIZED,
            body: json!({"error": "not_authorised", "reason": "Access refused."}),
        }
    }

    /// What the broker said, as RabbitMQ's management API says it: the AMQP reply text
    /// without its `PRECONDITION_FAILED - ` style prefix.
    fn from_amqp(e: &AmqpError) -> Failure {
        let text = e.text.to_string();
        let reason = match text.split_once(" - ") {
            Some((code, rest)) if code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') => {
                rest.to_string()
            }
            _ => text,
        };
        match e.code {
            ReplyCode::AccessRefused => Failure::access_refused(),
            ReplyCode::NotFound => Failure::not_found(reason),
            _ => Failure::bad_request(reason),
        }
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        match e {
            ApiError::NotFound => Failure {
                status: StatusCode::NOT_FOUND,
                body: json!({"error": "Object Not Found", "reason": "Not Found"}),
            },
        }
    }
}

impl From<Invalid> for Failure {
    fn from(e: Invalid) -> Failure {
        Failure::bad_request(e.0)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A request body as a JSON object: none at all is `{}`, as RabbitMQ takes it.
fn body_object(body: &Bytes) -> Result<Map<String, Value>, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Failure::bad_request("not_json")),
    }
}

/// A boolean field (default `false`): `true`/`false`, or those words as strings (what
/// `rabbitmqadmin` sends); anything else is RabbitMQ's `["not_boolean", value]`.
fn flag(m: &Map<String, Value>, key: &str) -> Result<bool, Failure> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(Value::String(s)) => Err(Failure::bad_request(json!(["not_boolean", s]))),
        Some(other) => Err(Failure::bad_request(json!([
            "not_boolean",
            other.to_string()
        ]))),
    }
}

fn arguments(m: &Map<String, Value>) -> Result<FieldTable, Failure> {
    match m.get("arguments") {
        None | Some(Value::Null) => Ok(FieldTable::default()),
        Some(v) => Ok(from_json_table(v)?),
    }
}

fn string_field<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, Failure> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Failure::bad_request(json!([
            "not_string",
            other.to_string()
        ]))),
    }
}

fn vhost_for_write(state: &AppState, name: &str) -> Result<Arc<VHost>, Failure> {
    state
        .broker
        .vhost(name)
        .ok_or_else(|| Failure::not_found("vhost_not_found"))
}

/// Durable definitions changed: saved off the runtime's threads (a file write and fsync).
async fn save(state: &AppState) {
    let broker = state.broker.clone();
    let _ = tokio::task::spawn_blocking(move || broker.save_definitions_if_dirty()).await;
}

fn created(existed: bool) -> Response {
    if existed {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::CREATED.into_response()
    }
}

pub(crate) async fn put_queue(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Failure> {
    let m = body_object(&body)?;
    let v = vhost_for_write(&state, &v)?;
    let (durable, auto_delete) = (flag(&m, "durable")?, flag(&m, "auto_delete")?);
    let arguments = arguments(&m)?;
    let existed = find_queue(&v, &name).is_ok();
    v.declare_queue(
        HTTP_CONNECTION,
        QueueDeclare {
            name: &name,
            passive: false,
            durable,
            exclusive: false,
            auto_delete,
            arguments,
        },
    )
    .map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok(created(existed))
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct DeleteOptions {
    #[serde(rename = "if-empty")]
    if_empty: Option<bool>,
    #[serde(rename = "if-unused")]
    if_unused: Option<bool>,
}

pub(crate) async fn delete_queue(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
    Query(opts): Query<DeleteOptions>,
) -> Result<Response, Failure> {
    let v = find_vhost(&state, &v)?;
    find_queue(&v, &name)?;
    v.delete_queue(
        HTTP_CONNECTION,
        &name,
        opts.if_unused.unwrap_or(false),
        opts.if_empty.unwrap_or(false),
    )
    .map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn purge_queue(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let v = find_vhost(&state, &v)?;
    find_queue(&v, &name)?.purge();
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn put_exchange(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, Failure> {
    let m = body_object(&body)?;
    let v = vhost_for_write(&state, &v)?;
    let kind = string_field(&m, "type")?.unwrap_or("direct");
    let (durable, auto_delete, internal) = (
        flag(&m, "durable")?,
        flag(&m, "auto_delete")?,
        flag(&m, "internal")?,
    );
    let arguments = arguments(&m)?;
    let existed = v.exchange(&name).is_ok();
    v.declare_exchange(ExchangeDeclare {
        name: &name,
        kind,
        passive: false,
        durable,
        auto_delete,
        internal,
        arguments,
    })
    .map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok(created(existed))
}

pub(crate) async fn delete_exchange(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
    Query(opts): Query<DeleteOptions>,
) -> Result<Response, Failure> {
    let v = find_vhost(&state, &v)?;
    if name.is_empty() || name.starts_with("amq.") {
        return Err(Failure::access_refused());
    }
    v.exchange(&name).map_err(|_| ApiError::NotFound)?;
    v.delete_exchange(&name, opts.if_unused.unwrap_or(false))
        .map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `e/{source}/q/{destination}` or `e/{source}/e/{destination}`.
fn binding_ends(kind: &str) -> Result<bool, Failure> {
    match kind {
        "q" => Ok(true),
        "e" => Ok(false),
        _ => Err(ApiError::NotFound.into()),
    }
}

/// Checks that a binding's source exchange and destination exist, as RabbitMQ names what
/// is missing.
fn check_binding_ends(v: &VHost, source: &str, dest: &str, to_queue: bool) -> Result<(), Failure> {
    v.exchange(source)
        .map_err(|_| Failure::not_found(format!("no exchange '{source}' in vhost '{}'", v.name)))?;
    let present = if to_queue {
        find_queue(v, dest).is_ok()
    } else {
        v.exchange(dest).is_ok()
    };
    if !present {
        let what = if to_queue { "queue" } else { "exchange" };
        return Err(Failure::not_found(format!(
            "no {what} '{dest}' in vhost '{}'",
            v.name
        )));
    }
    Ok(())
}

pub(crate) async fn post_binding(
    State(state): State<AppState>,
    _user: User,
    Path((v, source, kind, dest)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Result<Response, Failure> {
    let to_queue = binding_ends(&kind)?;
    let m = body_object(&body)?;
    let v = vhost_for_write(&state, &v)?;
    check_binding_ends(&v, &source, &dest, to_queue)?;
    let routing_key = string_field(&m, "routing_key")?.unwrap_or("").to_string();
    let arguments = arguments(&m)?;
    let location = format!("{dest}/{}", binding_path(&routing_key, &arguments));
    let bound = if to_queue {
        v.bind_queue(HTTP_CONNECTION, &dest, &source, &routing_key, arguments)
    } else {
        v.bind_exchange(&dest, &source, &routing_key, arguments)
    };
    bound.map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok((StatusCode::CREATED, [(LOCATION, location)]).into_response())
}

pub(crate) async fn get_bindings_between(
    State(state): State<AppState>,
    _user: User,
    Path((v, source, kind, dest)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, Failure> {
    let to_queue = binding_ends(&kind)?;
    let v = find_vhost(&state, &v)?;
    check_binding_ends(&v, &source, &dest, to_queue)?;
    Ok(Json(Value::Array(crate::api::bindings_between(
        &v, &source, &dest, to_queue,
    ))))
}

pub(crate) async fn delete_binding(
    State(state): State<AppState>,
    _user: User,
    Path((v, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> Result<Response, Failure> {
    let to_queue = binding_ends(&kind)?;
    let v = find_vhost(&state, &v)?;
    let found =
        crate::api::find_binding(&v, &source, &dest, to_queue, &props).ok_or(ApiError::NotFound)?;
    let (routing_key, arguments) = found;
    let unbound = if to_queue {
        v.unbind_queue(HTTP_CONNECTION, &dest, &source, &routing_key, arguments)
    } else {
        v.unbind_exchange(&dest, &source, &routing_key, arguments)
    };
    unbound.map_err(|e| Failure::from_amqp(&e))?;
    save(&state).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
