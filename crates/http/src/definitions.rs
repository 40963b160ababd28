//! `GET /api/definitions`: the broker's users, vhosts, permissions, queues, exchanges and
//! bindings in RabbitMQ's definitions format, which RabbitMQ imports as it is (passwords as
//! its salted SHA-256 hashes).

use crate::api::{all_vhosts, exchange_bindings, sorted_exchanges, MANAGEMENT_VERSION};
use crate::auth::User;
use crate::json::table;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

pub(crate) async fn export(State(state): State<AppState>, _user: User) -> Json<Value> {
    let vhosts = all_vhosts(&state);
    let users = state.broker.users();
    let (mut queues, mut exchanges, mut bindings) = (Vec::new(), Vec::new(), Vec::new());
    for v in &vhosts {
        let mut qs = v.queues();
        // Exclusive queues go with their connection: RabbitMQ leaves them out too.
        qs.retain(|q| !q.is_deleted() && q.config.exclusive_owner.is_none());
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        for q in qs {
            queues.push(json!({
                "name": q.name(), "vhost": v.name, "durable": q.config.durable,
                "auto_delete": q.config.auto_delete, "arguments": table(&q.config.arguments),
            }));
        }
        for x in &sorted_exchanges(v) {
            let c = &x.config;
            // Built-in exchanges exist everywhere; the default exchange's bindings are implicit.
            if c.name.is_empty() || c.name.starts_with("amq.") {
                if !c.name.is_empty() {
                    push_bindings(&mut bindings, &v.name, x);
                }
                continue;
            }
            exchanges.push(json!({
                "name": &*c.name, "vhost": v.name, "type": c.kind.as_str(),
                "durable": c.durable, "auto_delete": c.auto_delete, "internal": c.internal,
                "arguments": table(&c.arguments),
            }));
            push_bindings(&mut bindings, &v.name, x);
        }
    }
    Json(json!({
        "rabbit_version": MANAGEMENT_VERSION,
        "rabbitmq_version": MANAGEMENT_VERSION,
        "product_name": "Rill",
        "product_version": env!("CARGO_PKG_VERSION"),
        "users": users.iter().map(crate::users::user_json).collect::<Vec<_>>(),
        "vhosts": vhosts.iter().map(|v| json!({"name": v.name})).collect::<Vec<_>>(),
        "permissions": crate::users::permissions(&state),
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }))
}

/// `x`'s bindings as definitions list them (without the API's `properties_key`).
fn push_bindings(out: &mut Vec<Value>, vhost: &str, x: &rill_broker::exchange::Exchange) {
    out.extend(exchange_bindings(vhost, x).into_iter().map(|mut b| {
        if let Value::Object(m) = &mut b {
            m.remove("properties_key");
        }
        b
    }));
}
