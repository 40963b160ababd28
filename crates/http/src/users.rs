//! Users and permissions, read-only so far. Rill does not restrict users to vhosts yet:
//! every user may configure, write and read everything in every vhost, and that is what
//! the permissions read here say.

use crate::api::ApiError;
use crate::auth::User;
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use rill_broker::broker::{User as BrokerUser, PASSWORD_HASHING};
use serde_json::{json, Value};

/// A user as RabbitMQ shows one (the password as its salted SHA-256 hash).
pub(crate) fn user_json(u: &BrokerUser) -> Value {
    json!({
        "name": u.name, "password_hash": u.password_hash(),
        "hashing_algorithm": PASSWORD_HASHING, "tags": u.tags, "limits": {},
    })
}

/// Every (user, vhost) permission, users by name, then vhosts by name.
pub(crate) fn permissions(state: &AppState) -> Vec<Value> {
    let vhosts = crate::api::all_vhosts(state);
    state
        .broker
        .users()
        .iter()
        .flat_map(|u| {
            vhosts.iter().map(move |v| {
                json!({"user": u.name, "vhost": v.name,
                       "configure": ".*", "write": ".*", "read": ".*"})
            })
        })
        .collect()
}

pub(crate) async fn list(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(Value::Array(
        state.broker.users().iter().map(user_json).collect(),
    ))
}

pub(crate) async fn one(
    State(state): State<AppState>,
    _user: User,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let users = state.broker.users();
    let u = users
        .iter()
        .find(|u| u.name == name)
        .ok_or(ApiError::NotFound)?;
    Ok(Json(user_json(u)))
}

/// `GET /api/users/without-permissions`: none, since every user has every vhost.
pub(crate) async fn without_permissions(_user: User) -> Json<Value> {
    Json(json!([]))
}

pub(crate) async fn all_permissions(State(state): State<AppState>, _user: User) -> Json<Value> {
    Json(Value::Array(permissions(&state)))
}

pub(crate) async fn user_permissions(
    State(state): State<AppState>,
    _user: User,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state.broker.users().iter().any(|u| u.name == name) {
        return Err(ApiError::NotFound);
    }
    let mut ps = permissions(&state);
    ps.retain(|p| p["user"] == name.as_str());
    Ok(Json(Value::Array(ps)))
}

pub(crate) async fn vhost_permissions(
    State(state): State<AppState>,
    _user: User,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::api::find_vhost(&state, &vhost)?;
    let mut ps = permissions(&state);
    ps.retain(|p| p["vhost"] == vhost.as_str());
    Ok(Json(Value::Array(ps)))
}

pub(crate) async fn permission(
    State(state): State<AppState>,
    _user: User,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    permissions(&state)
        .into_iter()
        .find(|p| p["vhost"] == vhost.as_str() && p["user"] == name.as_str())
        .map(Json)
        .ok_or(ApiError::NotFound)
}
