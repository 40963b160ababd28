//! Health checks, as RabbitMQ's management API serves them to load balancers and
//! orchestrators: `200 {"status":"ok"}`, or `503` with `"status":"failed"` and why.

use crate::api::ApiError;
use crate::auth::User;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rill_broker::session::{Inbox, Session};
use rill_broker::vhost::QueueDeclare;
use rill_codec::BasicProperties;
use serde_json::json;
use std::sync::Arc;

fn ok() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

fn failed(body: serde_json::Value) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

fn alarms_check(state: &AppState, reason: &str) -> Response {
    let alarms = state.broker.alarms();
    if alarms.is_empty() {
        return ok();
    }
    let list: Vec<_> = alarms
        .iter()
        .map(|r| json!({"node": &*state.node, "resource": r}))
        .collect();
    failed(json!({"alarms": list, "reason": reason, "status": "failed"}))
}

/// `GET /api/health/checks/alarms`: a memory or disk alarm in force is a failure.
pub(crate) async fn alarms(State(state): State<AppState>, _user: User) -> Response {
    alarms_check(&state, "There are alarms in effect in the cluster")
}

/// `GET /api/health/checks/local-alarms`: the same, for this node.
pub(crate) async fn local_alarms(State(state): State<AppState>, _user: User) -> Response {
    alarms_check(&state, "There are alarms in effect on the node")
}

/// `GET /api/health/checks/virtual-hosts`: every vhost is up in a single process.
pub(crate) async fn virtual_hosts(_user: User) -> Response {
    ok()
}

/// `GET /api/health/checks/port-listener/{port}`.
pub(crate) async fn port_listener(
    State(state): State<AppState>,
    _user: User,
    Path(port): Path<String>,
) -> Response {
    let Ok(port) = port.parse::<u16>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "bad_request", "reason": format!("{port} is not a port")})),
        )
            .into_response();
    };
    let mut ports: Vec<u16> = [state.http, state.amqp]
        .iter()
        .flatten()
        .map(|a| a.port())
        .collect();
    ports.sort_unstable();
    if ports.contains(&port) {
        return Json(json!({"status": "ok", "port": port})).into_response();
    }
    failed(
        json!({"status": "failed", "reason": "No active listener", "missing": port, "ports": ports}),
    )
}

/// `GET /api/aliveness-test/{vhost}`: declares the queue `aliveness-test` in the vhost,
/// publishes a message to it and gets it back, as the requesting user (RabbitMQ's test).
pub(crate) async fn aliveness(
    State(state): State<AppState>,
    user: User,
    Path(vhost): Path<String>,
) -> Result<Response, ApiError> {
    crate::api::find_vhost(&state, &vhost)?;
    let broker = state.broker.clone();
    let test = move || -> Result<(), String> {
        let mut s = Session::open(
            &broker,
            &vhost,
            &user.name,
            user.password(),
            Arc::new(Inbox::default()),
        )
        .map_err(|e| e.to_string())?;
        let result = (|| {
            s.declare_queue(QueueDeclare {
                durable: false,
                ..QueueDeclare::durable("aliveness-test")
            })
            .map_err(|e| e.to_string())?;
            s.publish_to(
                "",
                "aliveness-test",
                &BasicProperties::default(),
                "test_message".into(),
            )
            .map_err(|e| e.to_string())?;
            match s.get("aliveness-test", true).map_err(|e| e.to_string())? {
                Some(_) => Ok(()),
                None => Err("the test message did not come back".to_string()),
            }
        })();
        s.close();
        result
    };
    Ok(match test() {
        Ok(()) => ok(),
        Err(reason) => failed(json!({"status": "failed", "reason": reason})),
    })
}
