//! The broker handle: virtual hosts, users and limits. Cheap to clone; every connection and
//! (later) embedded stream job holds one.

use crate::vhost::VHost;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Negotiation limits and identity the broker announces.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub channel_max: u16,
    pub frame_max: u32,
    /// Heartbeat interval we propose, in seconds.
    pub heartbeat: u16,
    /// Largest message body accepted (RabbitMQ's default max_message_size: 128 MiB).
    pub max_message_size: u64,
    pub cluster_name: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
            max_message_size: 128 * 1024 * 1024,
            cluster_name: "rill@localhost".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    password: String,
    pub tags: Vec<String>,
    /// Like RabbitMQ's `loopback_users`: may only log in from a loopback address.
    pub loopback_only: bool,
}

#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BrokerConfig,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    users: RwLock<HashMap<String, User>>,
    next_connection_id: AtomicU64,
}

/// Why a login was refused (the wire reply is the same for all: 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    UnknownUser,
    BadPassword,
    LoopbackOnly,
}

impl Broker {
    /// A broker with RabbitMQ's out-of-the-box state: vhost `/` and user guest/guest,
    /// loopback only.
    pub fn new(config: BrokerConfig) -> Broker {
        let b = Broker {
            inner: Arc::new(Inner {
                config,
                vhosts: RwLock::new(HashMap::new()),
                users: RwLock::new(HashMap::new()),
                next_connection_id: AtomicU64::new(1),
            }),
        };
        b.add_vhost("/");
        b.add_user("guest", "guest", vec!["administrator".into()], true);
        b
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        self.inner
            .vhosts
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| VHost::new(name))
            .clone()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.inner.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.inner.vhosts.read().values().cloned().collect()
    }

    pub fn add_user(&self, name: &str, password: &str, tags: Vec<String>, loopback_only: bool) {
        self.inner.users.write().insert(
            name.to_owned(),
            User {
                name: name.to_owned(),
                password: password.to_owned(),
                tags,
                loopback_only,
            },
        );
    }

    /// Checks credentials as presented from `peer` (None for in-process callers).
    pub fn login(
        &self,
        user: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<User, LoginError> {
        let users = self.inner.users.read();
        let u = users.get(user).ok_or(LoginError::UnknownUser)?;
        if !constant_time_eq(u.password.as_bytes(), password.as_bytes()) {
            return Err(LoginError::BadPassword);
        }
        if u.loopback_only && peer.is_some_and(|ip| !ip.is_loopback()) {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(u.clone())
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.inner
            .next_connection_id
            .fetch_add(1, Ordering::Relaxed)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
