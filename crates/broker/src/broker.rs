//! The broker handle: virtual hosts, users and limits. Cheap to clone; every connection and
//! (later) embedded stream job holds one.

use crate::consumer::{ConnEvent, Outlet};
use crate::durable::Persistence;
use crate::jobs::JobCounters;
use crate::vhost::VHost;
use parking_lot::{Mutex, RwLock};
use rill_store::{Definitions, StoreError, SyncPolicy, VhostDef};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
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

/// The name RabbitMQ gives its salted SHA-256 password hashing.
pub const PASSWORD_HASHING: &str = "rabbit_password_hashing_sha256";

impl User {
    /// The password hashed as RabbitMQ hashes it (`base64(salt ++ sha256(salt ++ password))`,
    /// a fresh 4-byte salt each time): what definitions exports carry, and what RabbitMQ
    /// accepts on import.
    pub fn password_hash(&self) -> String {
        password_hash(rand::random(), &self.password)
    }
}

/// RabbitMQ's `rabbit_password_hashing_sha256` with the given salt.
///
/// ```
/// // RabbitMQ's documented example: salt 908D C60A, password "test12".
/// let h = rill_broker::broker::password_hash([0x90, 0x8D, 0xC6, 0x0A], "test12");
/// assert_eq!(h, "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR");
/// ```
pub fn password_hash(salt: [u8; 4], password: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut raw = salt.to_vec();
    raw.extend_from_slice(&h.finalize());
    rill_codec::base64::encode(&raw)
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
    /// Open connections, to broadcast alarms and (later) for management.
    connections: Mutex<HashMap<u64, Arc<dyn Outlet>>>,
    /// Resource alarms in force (e.g. "memory", "disk"); publishers are blocked while any is.
    alarms: Mutex<Vec<String>>,
    /// The data directory, when the broker keeps durable state.
    persistence: Option<Arc<Persistence>>,
    /// Stream jobs running inside the broker process, by name.
    jobs: Mutex<Vec<Arc<JobCounters>>>,
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
        Self::with_persistence(config, None)
    }

    /// A broker that keeps durable definitions and persistent messages under `data_dir` and
    /// restores what is there: durable vhosts, exchanges, queues with their messages, bindings.
    pub fn open(
        config: BrokerConfig,
        data_dir: &Path,
        sync: SyncPolicy,
    ) -> Result<Broker, StoreError> {
        let (persistence, saved) = Persistence::open(data_dir, sync)?;
        let b = Self::with_persistence(config, Some(persistence));
        if let Some(defs) = saved {
            b.restore(&defs)?;
        }
        b.save_definitions();
        Ok(b)
    }

    fn restore(&self, defs: &Definitions) -> Result<(), StoreError> {
        for v in &defs.vhosts {
            self.add_vhost(&v.name);
        }
        for vh in self.vhosts() {
            vh.restore(defs)?;
        }
        Ok(())
    }

    /// Writes durable definitions if they changed (no-op for an in-memory broker).
    pub fn save_definitions(&self) {
        let Some(p) = &self.inner.persistence else {
            return;
        };
        let mut defs = Definitions::default();
        let mut vhosts = self.vhosts();
        vhosts.sort_by(|a, b| a.name.cmp(&b.name));
        for vh in vhosts {
            defs.vhosts.push(VhostDef {
                name: vh.name.clone(),
            });
            vh.snapshot(&mut defs);
        }
        p.save_definitions(defs);
    }

    /// Saves definitions if a durable entity changed since the last save. Called after each
    /// method that may change them; cheap when nothing did.
    pub fn save_definitions_if_dirty(&self) {
        if self
            .inner
            .persistence
            .as_ref()
            .is_some_and(|p| p.take_definitions_dirty())
        {
            self.save_definitions();
        }
    }

    /// Periodic work (message TTLs, queue expiry); the server calls it a few times a second.
    pub fn tick(&self) {
        let now = crate::queue::now_ms();
        for vh in self.vhosts() {
            vh.tick(now);
        }
    }

    /// Where the broker keeps durable state (None for an in-memory broker).
    pub fn data_dir(&self) -> Option<&Path> {
        self.inner.persistence.as_ref().map(|p| p.data_dir())
    }

    pub fn persistence(&self) -> Option<&Arc<Persistence>> {
        self.inner.persistence.as_ref()
    }

    fn with_persistence(config: BrokerConfig, persistence: Option<Arc<Persistence>>) -> Broker {
        let b = Broker {
            inner: Arc::new(Inner {
                persistence,
                config,
                vhosts: RwLock::new(HashMap::new()),
                users: RwLock::new(HashMap::new()),
                next_connection_id: AtomicU64::new(1),
                connections: Mutex::new(HashMap::new()),
                alarms: Mutex::new(Vec::new()),
                jobs: Mutex::new(Vec::new()),
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
            .or_insert_with(|| VHost::new(name, self.inner.persistence.clone()))
            .clone()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.inner.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.inner.vhosts.read().values().cloned().collect()
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<User> {
        let mut users: Vec<User> = self.inner.users.read().values().cloned().collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        users
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

    /// Registers an open connection; it is told at once if an alarm is in force.
    pub(crate) fn register_connection(&self, id: u64, outlet: Arc<dyn Outlet>) {
        if let Some(reason) = self.alarm_reason() {
            outlet.push(ConnEvent::Blocked(Some(reason)));
        }
        self.inner.connections.lock().insert(id, outlet);
    }

    pub(crate) fn deregister_connection(&self, id: u64) {
        self.inner.connections.lock().remove(&id);
    }

    pub fn connection_count(&self) -> usize {
        self.inner.connections.lock().len()
    }

    /// Raises or clears a resource alarm (`resource` is e.g. "memory" or "disk"). While any alarm
    /// is in force, publishing connections are blocked (connection.blocked), as in RabbitMQ.
    pub fn set_alarm(&self, resource: &str, on: bool) {
        let before = self.alarm_reason();
        {
            let mut alarms = self.inner.alarms.lock();
            let present = alarms.iter().any(|a| a == resource);
            if on && !present {
                alarms.push(resource.to_owned());
            } else if !on && present {
                alarms.retain(|a| a != resource);
            }
        }
        let after = self.alarm_reason();
        if before.is_some() != after.is_some() {
            if let Some(r) = &after {
                tracing::warn!(alarm = %r, "resource alarm raised: blocking publishers");
            } else {
                tracing::info!("resource alarms cleared: unblocking publishers");
            }
            for outlet in self.inner.connections.lock().values() {
                outlet.push(ConnEvent::Blocked(after.clone()));
            }
        }
    }

    /// The connection.blocked reason while an alarm is in force, RabbitMQ's wording.
    /// The resources (`memory`, `disk`) whose alarm is in force.
    pub fn alarms(&self) -> Vec<String> {
        self.inner.alarms.lock().clone()
    }

    pub fn alarm_reason(&self) -> Option<String> {
        let alarms = self.inner.alarms.lock();
        match alarms.first() {
            None => None,
            Some(a) if a == "memory" => Some("low on memory".to_owned()),
            Some(a) if a == "disk" => Some("low on disk".to_owned()),
            Some(a) => Some(format!("low on {a}")),
        }
    }

    /// Registers the counters of a job running inside the broker process (replacing a job's
    /// of the same name).
    pub fn register_job(&self, counters: Arc<JobCounters>) {
        let mut jobs = self.inner.jobs.lock();
        jobs.retain(|j| j.name() != counters.name());
        jobs.push(counters);
    }

    pub fn deregister_job(&self, name: &str) {
        self.inner.jobs.lock().retain(|j| j.name() != name);
    }

    /// The jobs running inside the broker process.
    pub fn jobs(&self) -> Vec<Arc<JobCounters>> {
        self.inner.jobs.lock().clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_logs_in_from_loopback_only() {
        let b = Broker::new(BrokerConfig::default());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(b.login("guest", "guest", Some(lo)).is_ok());
        assert!(b.login("guest", "guest", Some(lo6)).is_ok());
        assert_eq!(
            b.login("guest", "guest", Some(remote)).err(),
            Some(LoginError::LoopbackOnly)
        );
        assert_eq!(
            b.login("guest", "nope", Some(lo)).err(),
            Some(LoginError::BadPassword)
        );
        assert_eq!(
            b.login("nobody", "x", Some(lo)).err(),
            Some(LoginError::UnknownUser)
        );
        // In-process callers (embedded stream jobs) have no peer address.
        assert!(b.login("guest", "guest", None).is_ok());
    }

    #[test]
    fn alarms_reach_registered_connections_once() {
        #[derive(Debug, Default)]
        struct Sink(Mutex<Vec<Option<String>>>);
        impl Outlet for Sink {
            fn push(&self, e: ConnEvent) {
                if let ConnEvent::Blocked(r) = e {
                    self.0.lock().push(r);
                }
            }
        }
        let b = Broker::new(BrokerConfig::default());
        let sink = Arc::new(Sink::default());
        b.register_connection(1, sink.clone());
        b.set_alarm("memory", true);
        b.set_alarm("disk", true);
        b.set_alarm("memory", false);
        b.set_alarm("disk", false);
        assert_eq!(*sink.0.lock(), vec![Some("low on memory".to_owned()), None]);
    }
}
