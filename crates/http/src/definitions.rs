//! `GET /api/definitions`: the broker's users, vhosts, permissions, queues, exchanges and
//! bindings in RabbitMQ's definitions format, which RabbitMQ imports as it is (passwords as
//! its salted SHA-256 hashes).

use crate::api::MANAGEMENT_VERSION;
use crate::auth::User;
use crate::json::table;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use rill_broker::exchange::Destination;
use serde_json::{json, Value};

pub(crate) async fn export(State(state): State<AppState>, _user: User) -> Json<Value> {
    let broker = &state.broker;
    let mut vhosts = broker.vhosts();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let users = broker.users();
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
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        for x in &xs {
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

fn push_bindings(out: &mut Vec<Value>, vhost: &str, x: &rill_broker::exchange::Exchange) {
    let mut bs: Vec<Value> = x
        .bindings()
        .iter()
        .map(|b| {
            let (dest, kind) = match &b.destination {
                Destination::Queue(q) => (q.name().to_string(), "queue"),
                Destination::Exchange(n) => (n.to_string(), "exchange"),
            };
            json!({"source": &*x.config.name, "vhost": vhost, "destination": dest,
                   "destination_type": kind, "routing_key": b.routing_key,
                   "arguments": table(&b.arguments)})
        })
        .collect();
    bs.sort_by_key(|b| (b["destination"].to_string(), b["routing_key"].to_string()));
    out.extend(bs);
}
