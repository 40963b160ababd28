//! The API's paths, answered from the broker's state with RabbitMQ's field names.

use crate::auth::User;
use crate::json::table;
use crate::rates::{counts, PerSecond};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use rill_broker::exchange::{Binding, Destination, Exchange};
use rill_broker::queue::Queue;
use rill_broker::vhost::VHost;
use serde_json::{json, Value};
use std::sync::Arc;

/// The management API version whose paths and fields this API follows.
pub const MANAGEMENT_VERSION: &str = "3.10.8";

/// Every route (state attached by [`crate::router`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/vhosts", get(vhosts))
        .route("/api/vhosts/{vhost}", get(vhost))
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_of))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue)
                .put(crate::write::put_queue)
                .delete(crate::write::delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            delete(crate::write::purge_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/get",
            post(crate::actions::get_messages),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(crate::actions::publish),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_of))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange)
                .put(crate::write::put_exchange)
                .delete(crate::write::delete_exchange),
        )
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_of))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}",
            get(crate::write::get_bindings_between).post(crate::write::post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}/{props}",
            get(binding).delete(crate::write::delete_binding),
        )
        .route("/api/definitions", get(crate::definitions::export))
        .route("/api/users", get(crate::users::list))
        .route(
            "/api/users/without-permissions",
            get(crate::users::without_permissions),
        )
        .route("/api/users/{user}", get(crate::users::one))
        .route(
            "/api/users/{user}/permissions",
            get(crate::users::user_permissions),
        )
        .route("/api/permissions", get(crate::users::all_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(crate::users::permission),
        )
        .route(
            "/api/vhosts/{vhost}/permissions",
            get(crate::users::vhost_permissions),
        )
        .route("/api/health/checks/alarms", get(crate::health::alarms))
        .route(
            "/api/health/checks/local-alarms",
            get(crate::health::local_alarms),
        )
        .route(
            "/api/health/checks/virtual-hosts",
            get(crate::health::virtual_hosts),
        )
        .route(
            "/api/health/checks/port-listener/{port}",
            get(crate::health::port_listener),
        )
        .route("/api/aliveness-test/{vhost}", get(crate::health::aliveness))
        .fallback(not_found)
}

/// Why a request has no answer, as RabbitMQ says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiError {
    /// A vhost, queue, exchange or path that does not exist.
    NotFound,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "Object Not Found", "reason": "Not Found"})),
            )
                .into_response(),
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

type Answer = Result<Json<Value>, ApiError>;

pub(crate) fn find_vhost(state: &AppState, name: &str) -> Result<Arc<VHost>, ApiError> {
    state.broker.vhost(name).ok_or(ApiError::NotFound)
}

async fn whoami(user: User) -> Json<Value> {
    Json(json!({"name": user.name, "tags": user.tags}))
}

/// `{"rate": r}`, as every `_details` object.
fn rate(r: f64) -> Value {
    json!({ "rate": r })
}

async fn overview(State(state): State<AppState>, _user: User) -> Json<Value> {
    let vhosts = state.broker.vhosts();
    let (mut queues, mut exchanges, mut consumers) = (0u64, 0u64, 0u64);
    let (mut ready, mut unacked) = (0u64, 0u64);
    let (mut publish, mut deliver_get, mut ack) = (0u64, 0u64, 0u64);
    for v in &vhosts {
        exchanges += v.exchanges().len() as u64;
        for q in v.queues() {
            queues += 1;
            consumers += u64::from(q.consumer_count());
            let c = counts(&q);
            ready += c.ready;
            unacked += c.unacked;
            publish += c.publish;
            deliver_get += c.deliver_get;
            ack += c.ack;
        }
    }
    let r = state.rates.total();
    let mut listeners = Vec::new();
    if let Some(http) = state.http {
        listeners.push(json!({
            "node": &*state.node, "protocol": "http",
            "ip_address": http.ip().to_string(), "port": http.port(),
        }));
    }
    Json(json!({
        "management_version": MANAGEMENT_VERSION,
        "rates_mode": "basic",
        "exchange_types": exchange_types(),
        "product_version": env!("CARGO_PKG_VERSION"),
        "product_name": "Rill",
        "rabbitmq_version": MANAGEMENT_VERSION,
        "cluster_name": &*state.node,
        "node": &*state.node,
        "disable_stats": false,
        "enable_queue_totals": false,
        "statistics_db_event_queue": 0,
        "message_stats": message_stats(&[
            ("publish", publish, r.publish),
            ("deliver_get", deliver_get, r.deliver_get),
            ("ack", ack, r.ack),
        ]),
        "queue_totals": {
            "messages": ready + unacked, "messages_details": rate(r.messages),
            "messages_ready": ready, "messages_ready_details": rate(r.ready),
            "messages_unacknowledged": unacked,
            "messages_unacknowledged_details": rate(r.unacked),
        },
        "object_totals": {
            "connections": state.broker.connection_count(),
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": queues,
        },
        "listeners": listeners,
    }))
}

/// `message_stats` as RabbitMQ shows it: a counter (with its `_details`) appears once it has
/// counted something.
fn message_stats(stats: &[(&str, u64, f64)]) -> Value {
    let mut m = serde_json::Map::new();
    for &(name, count, per_second) in stats.iter().filter(|s| s.1 > 0) {
        m.insert(name.to_string(), count.into());
        m.insert(format!("{name}_details"), rate(per_second));
    }
    Value::Object(m)
}

fn exchange_types() -> Value {
    let t = |name: &str, description: &str| json!({"name": name, "description": description, "enabled": true});
    json!([
        t(
            "direct",
            "AMQP direct exchange, as per the AMQP specification"
        ),
        t(
            "fanout",
            "AMQP fanout exchange, as per the AMQP specification"
        ),
        t(
            "headers",
            "AMQP headers exchange, as per the AMQP specification"
        ),
        t(
            "topic",
            "AMQP topic exchange, as per the AMQP specification"
        ),
        t(
            rill_broker::dedup::EXCHANGE_TYPE,
            "Message Deduplication Exchange (the rabbitmq-message-deduplication plugin's)"
        ),
    ])
}

fn vhost_json(state: &AppState, v: &VHost) -> Value {
    // RabbitMQ describes the vhost it creates at first start.
    let description = if v.name == "/" {
        "Default virtual host"
    } else {
        ""
    };
    json!({
        "name": v.name,
        "description": description,
        "tags": [],
        "default_queue_type": "undefined",
        "metadata": {"description": description, "tags": []},
        "tracing": false,
        "cluster_state": { state.node.to_string(): "running" },
    })
}

async fn vhosts(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(Value::Array(
        all_vhosts(&state)
            .iter()
            .map(|v| vhost_json(&state, v))
            .collect(),
    ))
}

async fn vhost(State(state): State<AppState>, _user: User, Path(name): Path<String>) -> Answer {
    let v = find_vhost(&state, &name)?;
    Ok(Json(vhost_json(&state, &v)))
}

fn queue_json(state: &AppState, vhost: &str, q: &Queue) -> Value {
    let c = counts(q);
    let r: PerSecond = state.rates.queue(vhost, q.name());
    let counters = q.counters();
    json!({
        "name": q.name(),
        "vhost": vhost,
        "durable": q.config.durable,
        "auto_delete": q.config.auto_delete,
        "exclusive": q.config.exclusive_owner.is_some(),
        "arguments": table(&q.config.arguments),
        "node": &*state.node,
        "state": "running",
        "type": if q.is_stream() { "stream" } else { "classic" },
        "consumers": q.consumer_count(),
        "memory": counters.memory_bytes.load(std::sync::atomic::Ordering::Relaxed),
        "messages": c.messages,
        "messages_details": rate(r.messages),
        "messages_ready": c.ready,
        "messages_ready_details": rate(r.ready),
        "messages_unacknowledged": c.unacked,
        "messages_unacknowledged_details": rate(r.unacked),
        "message_stats": message_stats(&[
            ("publish", c.publish, r.publish),
            ("deliver_get", c.deliver_get, r.deliver_get),
            ("ack", c.ack, r.ack),
        ]),
        "policy": null,
        "operator_policy": null,
        "exclusive_consumer_tag": null,
        "single_active_consumer_tag": null,
    })
}

fn sorted_queues(v: &VHost) -> Vec<Arc<Queue>> {
    let mut qs = v.queues();
    qs.retain(|q| !q.is_deleted());
    qs.sort_by(|a, b| a.name().cmp(b.name()));
    qs
}

fn queues_json(state: &AppState, vhosts: &[Arc<VHost>]) -> Value {
    Value::Array(
        vhosts
            .iter()
            .flat_map(|v| {
                sorted_queues(v)
                    .into_iter()
                    .map(|q| queue_json(state, &v.name, &q))
                    .collect::<Vec<_>>()
            })
            .collect(),
    )
}

/// Every vhost, by name.
pub(crate) fn all_vhosts(state: &AppState) -> Vec<Arc<VHost>> {
    let mut vs = state.broker.vhosts();
    vs.sort_by(|a, b| a.name.cmp(&b.name));
    vs
}

async fn queues(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(queues_json(&state, &all_vhosts(&state)))
}

async fn queues_of(State(state): State<AppState>, _user: User, Path(v): Path<String>) -> Answer {
    let v = find_vhost(&state, &v)?;
    Ok(Json(queues_json(&state, &[v])))
}

/// The queue `name` of `v`, unless it is missing (or being deleted).
pub(crate) fn find_queue(v: &VHost, name: &str) -> Result<Arc<Queue>, ApiError> {
    v.queues()
        .into_iter()
        .find(|q| q.name() == name && !q.is_deleted())
        .ok_or(ApiError::NotFound)
}

async fn queue(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
) -> Answer {
    let v = find_vhost(&state, &v)?;
    let q = find_queue(&v, &name)?;
    let mut body = queue_json(&state, &v.name, &q);
    if let Value::Object(m) = &mut body {
        m.insert("consumer_details".into(), json!([]));
        m.insert("deliveries".into(), json!([]));
        m.insert("incoming".into(), json!([]));
    }
    Ok(Json(body))
}

fn exchange_json(vhost: &str, x: &Exchange) -> Value {
    let c = &x.config;
    json!({
        "name": &*c.name,
        "vhost": vhost,
        "type": c.kind.as_str(),
        "durable": c.durable,
        "auto_delete": c.auto_delete,
        "internal": c.internal,
        "arguments": table(&c.arguments),
        "user_who_performed_action": if c.name.is_empty() || c.name.starts_with("amq.") { "rmq-internal" } else { "" },
    })
}

fn exchanges_json(vhosts: &[Arc<VHost>]) -> Value {
    Value::Array(
        vhosts
            .iter()
            .flat_map(|v| {
                sorted_exchanges(v)
                    .iter()
                    .map(|x| exchange_json(&v.name, x))
                    .collect::<Vec<_>>()
            })
            .collect(),
    )
}

async fn exchanges(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(exchanges_json(&all_vhosts(&state)))
}

async fn exchanges_of(State(state): State<AppState>, _user: User, Path(v): Path<String>) -> Answer {
    let v = find_vhost(&state, &v)?;
    Ok(Json(exchanges_json(&[v])))
}

async fn exchange(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
) -> Answer {
    let v = find_vhost(&state, &v)?;
    let x = v.exchange(&name).map_err(|_| ApiError::NotFound)?;
    let mut body = exchange_json(&v.name, &x);
    if let Value::Object(m) = &mut body {
        m.insert("incoming".into(), json!([]));
        m.insert("outgoing".into(), json!([]));
    }
    Ok(Json(body))
}

/// The last part of a binding's path (its `properties_key`).
pub(crate) fn binding_path(routing_key: &str, arguments: &rill_codec::FieldTable) -> String {
    properties_key(routing_key, arguments)
}

/// RabbitMQ's `properties_key`: the routing key alone when there are no arguments (`~` for
/// an empty one); with arguments, the routing key and a digest of them after a `~`.
fn properties_key(routing_key: &str, arguments: &rill_codec::FieldTable) -> String {
    if arguments.inner().is_empty() {
        return if routing_key.is_empty() {
            "~".into()
        } else {
            routing_key.to_string()
        };
    }
    let encoded = rill_codec::encode_field_table(arguments);
    let digest = encoded.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{routing_key}~{digest:016x}")
}

fn binding_json(
    vhost: &str,
    source: &str,
    destination: &str,
    destination_type: &str,
    routing_key: &str,
    arguments: &rill_codec::FieldTable,
) -> Value {
    json!({
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": routing_key,
        "arguments": table(arguments),
        "properties_key": properties_key(routing_key, arguments),
    })
}

/// Every binding of `v`, as RabbitMQ lists them: the default exchange's implicit binding of
/// each queue first, then the declared ones by source exchange. `only_queue` keeps those
/// leading to that queue.
fn vhost_bindings(v: &VHost, only_queue: Option<&str>) -> Vec<Value> {
    let empty = rill_codec::FieldTable::default();
    let mut out: Vec<Value> = sorted_queues(v)
        .iter()
        .filter(|q| only_queue.is_none_or(|n| n == q.name()))
        .map(|q| binding_json(&v.name, "", q.name(), "queue", q.name(), &empty))
        .collect();
    for x in sorted_exchanges(v)
        .iter()
        .filter(|x| !x.config.name.is_empty())
    {
        let mut bs = exchange_bindings(&v.name, x);
        if let Some(n) = only_queue {
            bs.retain(|b| b["destination_type"] == "queue" && b["destination"] == n);
        }
        out.extend(bs);
    }
    out
}

/// Every exchange of `v`, by name.
pub(crate) fn sorted_exchanges(v: &VHost) -> Vec<Arc<Exchange>> {
    let mut xs = v.exchanges();
    xs.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    xs
}

/// Where a binding leads: its name and RabbitMQ's `destination_type`.
fn destination_of(b: &Binding) -> (&str, &'static str) {
    match &b.destination {
        Destination::Queue(q) => (q.name(), "queue"),
        Destination::Exchange(n) => (n, "exchange"),
    }
}

/// The declared bindings from exchange `x` of vhost `vhost`, by destination then routing
/// key.
pub(crate) fn exchange_bindings(vhost: &str, x: &Exchange) -> Vec<Value> {
    let mut bs: Vec<Value> = x
        .bindings()
        .iter()
        .map(|b| {
            let (dest, kind) = destination_of(b);
            binding_json(
                vhost,
                &x.config.name,
                dest,
                kind,
                &b.routing_key,
                &b.arguments,
            )
        })
        .collect();
    bs.sort_by_key(|b| (b["destination"].to_string(), b["routing_key"].to_string()));
    bs
}

async fn bindings(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(Value::Array(
        all_vhosts(&state)
            .iter()
            .flat_map(|v| vhost_bindings(v, None))
            .collect(),
    ))
}

async fn bindings_of(State(state): State<AppState>, _user: User, Path(v): Path<String>) -> Answer {
    let v = find_vhost(&state, &v)?;
    Ok(Json(Value::Array(vhost_bindings(&v, None))))
}

/// As RabbitMQ answers it: an unknown vhost has no bindings (200, `[]`), and a queue that
/// does not exist still has its default-exchange binding.
async fn queue_bindings(
    State(state): State<AppState>,
    _user: User,
    Path((v, name)): Path<(String, String)>,
) -> Json<Value> {
    let Ok(v) = find_vhost(&state, &v) else {
        return Json(json!([]));
    };
    if find_queue(&v, &name).is_err() {
        let empty = rill_codec::FieldTable::default();
        return Json(json!([binding_json(
            &v.name, "", &name, "queue", &name, &empty
        )]));
    }
    Json(Value::Array(vhost_bindings(&v, Some(&name))))
}

/// The bindings from exchange `source` to `dest` (a queue if `to_queue`).
pub(crate) fn bindings_between(v: &VHost, source: &str, dest: &str, to_queue: bool) -> Vec<Value> {
    let kind = if to_queue { "queue" } else { "exchange" };
    let mut all = if source.is_empty() {
        // The default exchange's implicit binding is the only one it has.
        vhost_bindings(v, to_queue.then_some(dest))
    } else {
        vhost_bindings(v, None)
    };
    all.retain(|b| {
        b["source"] == source && b["destination"] == dest && b["destination_type"] == kind
    });
    all
}

/// The routing key and arguments of the binding from `source` to `dest` whose
/// `properties_key` is `props` (the default exchange's cannot be removed: none).
pub(crate) fn find_binding(
    v: &VHost,
    source: &str,
    dest: &str,
    to_queue: bool,
    props: &str,
) -> Option<(String, rill_codec::FieldTable)> {
    if source.is_empty() {
        return None;
    }
    let x = v.exchange(source).ok()?;
    x.bindings().into_iter().find_map(|b| {
        let (name, kind) = destination_of(&b);
        let matches = name == dest && (kind == "queue") == to_queue;
        (matches && properties_key(&b.routing_key, &b.arguments) == props)
            .then(|| (b.routing_key.clone(), b.arguments.clone()))
    })
}

async fn binding(
    State(state): State<AppState>,
    _user: User,
    Path((v, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> Answer {
    let to_queue = match kind.as_str() {
        "q" => true,
        "e" => false,
        _ => return Err(ApiError::NotFound),
    };
    let v = find_vhost(&state, &v)?;
    bindings_between(&v, &source, &dest, to_queue)
        .into_iter()
        .find(|b| b["properties_key"] == props.as_str())
        .map(Json)
        .ok_or(ApiError::NotFound)
}
