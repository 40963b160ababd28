//! A virtual host: its exchanges and queues, declaration rules, and routing.

use crate::args::QueueArgs;
use crate::consumer::ConnEvent;
use crate::dedup::{DedupArgs, Routed};
use crate::durable::Persistence;
use crate::exchange::{Binding, Destination, Exchange, ExchangeConfig, ExchangeKind};
use crate::message::Message;
use crate::queue::{Queue, QueueConfig};
use parking_lot::RwLock;
use rill_codec::{AMQPValue, AmqpError, FieldTable, ReplyCode};
use rill_store::{BindingDef, Definitions, ExchangeDef, QueueDef, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Queue arguments RabbitMQ compares on redeclaration; others are kept but not compared.
const COMPARED_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-quorum-initial-group-size",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-queue-master-locator",
    // The deduplication plugin's (crate::dedup::COMPARED_ARGS).
    "x-message-deduplication",
    "x-cache-size",
    "x-cache-ttl",
    "x-cache-persistence",
    "x-deduplication-header",
];

/// Exchange arguments compared on redeclaration.
const COMPARED_EXCHANGE_ARGS: &[&str] = &[
    "alternate-exchange",
    "x-message-deduplication",
    "x-cache-size",
    "x-cache-ttl",
    "x-cache-persistence",
    "x-deduplication-header",
];

#[derive(Debug)]
pub struct VHost {
    pub name: String,
    /// Itself, for queues to route dead letters through.
    me: Weak<VHost>,
    /// Where durable queues keep their logs (None: everything in memory).
    persistence: Option<Arc<Persistence>>,
    // Both maps are read on every publish and written only by declarations, so a read-mostly
    // lock; routing clones the Arcs it needs and drops the guard at once.
    exchanges: RwLock<HashMap<Arc<str>, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
}

/// Arguments of exchange.declare.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// Arguments of queue.declare.
#[derive(Debug, Clone)]
pub struct QueueDeclare<'a> {
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

impl<'a> QueueDeclare<'a> {
    /// A durable, non-exclusive, non-auto-delete queue without arguments.
    pub fn durable(name: &'a str) -> QueueDeclare<'a> {
        QueueDeclare {
            name,
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }

    /// Checks that a queue exists without changing anything (`passive`).
    pub fn passive(name: &'a str) -> QueueDeclare<'a> {
        QueueDeclare {
            passive: true,
            ..QueueDeclare::durable(name)
        }
    }
}

impl<'a> ExchangeDeclare<'a> {
    /// A durable exchange of `kind` without arguments.
    pub fn durable(name: &'a str, kind: &'a str) -> ExchangeDeclare<'a> {
        ExchangeDeclare {
            name,
            kind,
            passive: false,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }
}

fn bool_word(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

impl VHost {
    /// A vhost with the standard exchanges every RabbitMQ vhost has.
    pub fn new(name: &str, persistence: Option<Arc<Persistence>>) -> Arc<VHost> {
        Arc::new_cyclic(|me| Self::with_builtins(name, persistence, me.clone()))
    }

    fn with_builtins(name: &str, persistence: Option<Arc<Persistence>>, me: Weak<VHost>) -> VHost {
        let vh = VHost {
            name: name.to_owned(),
            me,
            persistence,
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
        };
        for (x, kind) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            let name: Arc<str> = x.into();
            vh.exchanges.write().insert(
                name.clone(),
                Exchange::new(ExchangeConfig {
                    name,
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                }),
            );
        }
        vh
    }

    /// A durable entity changed: definitions must be written again.
    fn durable_changed(&self) {
        if let Some(p) = &self.persistence {
            p.mark_definitions_dirty();
        }
    }

    fn not_found_exchange(&self, name: &str) -> AmqpError {
        AmqpError::new(
            ReplyCode::NotFound,
            format!("no exchange '{name}' in vhost '{}'", self.name),
        )
    }

    fn not_found_queue(&self, name: &str) -> AmqpError {
        AmqpError::new(
            ReplyCode::NotFound,
            format!("no queue '{name}' in vhost '{}'", self.name),
        )
    }

    pub fn exchange(&self, name: &str) -> Result<Arc<Exchange>, AmqpError> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found_exchange(name))
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    pub fn declare_exchange(&self, d: ExchangeDeclare<'_>) -> Result<Arc<Exchange>, AmqpError> {
        if d.passive {
            return self.exchange(d.name);
        }
        if d.name.is_empty() {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                "operation not permitted on the default exchange",
            ));
        }
        let Some(kind) = ExchangeKind::parse(d.kind) else {
            return Err(AmqpError::new(
                ReplyCode::CommandInvalid,
                format!("unknown exchange type '{}'", d.kind),
            ));
        };
        let mut map = self.exchanges.write();
        if let Some(x) = map.get(d.name) {
            let c = &x.config;
            let mismatch = |arg: &str, got: &str, cur: &str| {
                AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "inequivalent arg '{arg}' for exchange '{}' in vhost '{}': received '{got}' but current is '{cur}'",
                        d.name, self.name
                    ),
                )
            };
            if c.kind != kind {
                return Err(mismatch("type", kind.as_str(), c.kind.as_str()));
            }
            if c.durable != d.durable {
                return Err(mismatch(
                    "durable",
                    bool_word(d.durable),
                    bool_word(c.durable),
                ));
            }
            if c.auto_delete != d.auto_delete {
                return Err(mismatch(
                    "auto_delete",
                    bool_word(d.auto_delete),
                    bool_word(c.auto_delete),
                ));
            }
            if c.internal != d.internal {
                return Err(mismatch(
                    "internal",
                    bool_word(d.internal),
                    bool_word(c.internal),
                ));
            }
            compare_args(
                COMPARED_EXCHANGE_ARGS,
                &d.arguments,
                &c.arguments,
                &format!("exchange '{}' in vhost '{}'", d.name, self.name),
            )?;
            return Ok(x.clone());
        }
        // Reserved names may be redeclared equivalently (above) but not created.
        if d.name.starts_with("amq.") {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!(
                    "exchange name '{}' contains reserved prefix 'amq.*'",
                    d.name
                ),
            ));
        }
        DedupArgs::for_exchange(kind == ExchangeKind::Deduplication, &d.arguments)?;
        let name: Arc<str> = d.name.into();
        let x = self
            .make_exchange(ExchangeConfig {
                name: name.clone(),
                kind,
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments,
            })
            .map_err(|e| {
                AmqpError::new(
                    ReplyCode::InternalError,
                    format!(
                        "cannot create exchange '{name}' in vhost '{}': {e}",
                        self.name
                    ),
                )
            })?;
        map.insert(name, x.clone());
        if x.config.durable {
            self.durable_changed();
        }
        Ok(x)
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                if name.is_empty() {
                    "operation not permitted on the default exchange".to_owned()
                } else {
                    format!(
                        "deletion of system exchange '{name}' in vhost '{}' not allowed",
                        self.name
                    )
                },
            ));
        }
        let removed = {
            let mut map = self.exchanges.write();
            let Some(x) = map.get(name) else {
                // Deleting what is not there succeeds, as in RabbitMQ 3.x.
                return Ok(());
            };
            if if_unused && x.has_bindings() {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("exchange '{name}' in vhost '{}' in use", self.name),
                ));
            }
            map.remove(name)
        };
        if let Some(x) = removed {
            if let Some(d) = x.dedup() {
                d.destroy();
            }
            self.forget_destination(&Destination::Exchange(x.config.name.clone()));
            self.durable_changed();
        }
        Ok(())
    }

    /// Drops all bindings leading to `dest`, and auto-delete exchanges left without bindings.
    fn forget_destination(&self, dest: &Destination) {
        let exchanges = self.exchanges();
        let mut emptied = Vec::new();
        for x in exchanges {
            if x.unbind_destination(dest) > 0 && x.config.auto_delete && !x.has_bindings() {
                emptied.push(x.config.name.clone());
            }
        }
        for name in emptied {
            let _ = self.delete_exchange(&name, false);
        }
    }

    fn check_bind_target(&self, source: &str) -> Result<Arc<Exchange>, AmqpError> {
        if source.is_empty() {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                "operation not permitted on the default exchange",
            ));
        }
        self.exchange(source)
    }

    pub fn bind_queue(
        &self,
        connection: u64,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let q = self.queue_for(connection, queue)?;
        let x = self.check_bind_target(exchange)?;
        if x.config.kind == ExchangeKind::Headers {
            crate::exchange::headers::validate(&arguments)
                .map_err(|e| AmqpError::new(ReplyCode::PreconditionFailed, e))?;
        }
        x.bind(Binding::new(
            Destination::Queue(q),
            routing_key.to_owned(),
            arguments,
        ));
        self.durable_changed();
        Ok(())
    }

    pub fn unbind_queue(
        &self,
        connection: u64,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let q = self.queue_for(connection, queue)?;
        let x = self.check_bind_target(exchange)?;
        x.unbind(&Binding::new(
            Destination::Queue(q),
            routing_key.to_owned(),
            arguments,
        ));
        self.auto_delete_if_unbound(&x);
        self.durable_changed();
        Ok(())
    }

    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let dest = self.check_bind_target(destination)?;
        let src = self.check_bind_target(source)?;
        src.bind(Binding::new(
            Destination::Exchange(dest.config.name.clone()),
            routing_key.to_owned(),
            arguments,
        ));
        self.durable_changed();
        Ok(())
    }

    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        let dest = self.check_bind_target(destination)?;
        let src = self.check_bind_target(source)?;
        src.unbind(&Binding::new(
            Destination::Exchange(dest.config.name.clone()),
            routing_key.to_owned(),
            arguments,
        ));
        self.auto_delete_if_unbound(&src);
        self.durable_changed();
        Ok(())
    }

    fn auto_delete_if_unbound(&self, x: &Arc<Exchange>) {
        if x.config.auto_delete && !x.has_bindings() {
            let _ = self.delete_exchange(&x.config.name, false);
        }
    }

    /// Looks a queue up for use by `connection`, enforcing exclusivity (405).
    pub fn queue_for(&self, connection: u64, name: &str) -> Result<Arc<Queue>, AmqpError> {
        let q = self
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found_queue(name))?;
        self.check_exclusive(&q, connection)?;
        Ok(q)
    }

    fn check_exclusive(&self, q: &Queue, connection: u64) -> Result<(), AmqpError> {
        match q.config.exclusive_owner {
            Some(owner) if owner != connection => Err(AmqpError::new(
                ReplyCode::ResourceLocked,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    q.name(),
                    self.name
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Declares (or checks) a queue; returns it and whether it was created now.
    pub fn declare_queue(
        &self,
        connection: u64,
        d: QueueDeclare<'_>,
    ) -> Result<Arc<Queue>, AmqpError> {
        if d.passive {
            let q = self.queue_for(connection, d.name)?;
            q.touch();
            return Ok(q);
        }
        let args = QueueArgs::parse(
            &d.arguments,
            d.name,
            &self.name,
            d.durable,
            d.exclusive,
            d.auto_delete,
        )?;
        if d.name.starts_with("amq.") {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("queue name '{}' contains reserved prefix 'amq.*'", d.name),
            ));
        }
        let mut map = self.queues.write();
        if let Some(q) = map.get(d.name) {
            self.check_exclusive(q, connection)?;
            let c = &q.config;
            if c.exclusive_owner.is_some() != d.exclusive {
                return Err(AmqpError::new(
                    ReplyCode::ResourceLocked,
                    format!(
                        "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                        d.name, self.name
                    ),
                ));
            }
            let mismatch = |arg: &str, got: bool, cur: bool| {
                AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received '{}' but current is '{}'",
                        d.name,
                        self.name,
                        bool_word(got),
                        bool_word(cur)
                    ),
                )
            };
            if c.durable != d.durable {
                return Err(mismatch("durable", d.durable, c.durable));
            }
            if c.auto_delete != d.auto_delete {
                return Err(mismatch("auto_delete", d.auto_delete, c.auto_delete));
            }
            compare_args(
                COMPARED_QUEUE_ARGS,
                &d.arguments,
                &c.arguments,
                &format!("queue '{}' in vhost '{}'", d.name, self.name),
            )?;
            return Ok(q.clone());
        }
        let name = if d.name.is_empty() {
            generate_name("amq.gen-")
        } else {
            d.name.to_owned()
        };
        let config = QueueConfig {
            name: name.clone(),
            durable: d.durable,
            auto_delete: d.auto_delete,
            exclusive_owner: d.exclusive.then_some(connection),
            arguments: d.arguments,
        };
        let q = self.make_queue(config, args).map_err(|e| {
            AmqpError::new(
                ReplyCode::InternalError,
                format!("cannot create queue '{name}' in vhost '{}': {e}", self.name),
            )
        })?;
        map.insert(name, q.clone());
        if q.config.durable {
            self.durable_changed();
        }
        Ok(q)
    }

    /// An exchange; a durable deduplicating one keeps its keys on disk (and gets back those a
    /// previous run remembered).
    fn make_exchange(&self, config: ExchangeConfig) -> Result<Arc<Exchange>, StoreError> {
        let x = Exchange::new(config);
        if let (Some(d), Some(p), true) = (x.dedup(), &self.persistence, x.config.durable) {
            if d.args.persist {
                let (keys, recovered) = p.open_exchange_keys(&self.name, &x.config.name)?;
                d.attach_log(keys, recovered);
            }
        }
        Ok(x)
    }

    /// A queue, with an on-disk log if it is durable and the broker has a data directory.
    /// Messages left in an existing log are restored.
    fn make_queue(&self, config: QueueConfig, args: QueueArgs) -> Result<Arc<Queue>, StoreError> {
        let Some(p) = self.persistence.as_ref().filter(|_| config.durable) else {
            return Ok(Queue::build(config, args, None, self.me.clone()));
        };
        let started = std::time::Instant::now();
        let (log, messages) = p.open_queue_log(&self.name, &config.name)?;
        let name = config.name.clone();
        let keep_keys = args.dedup.as_ref().is_some_and(|d| d.persist);
        let q = Queue::build(config, args, Some(log), self.me.clone());
        let n = q.restore(messages);
        if keep_keys {
            let (keys, recovered) = p.open_queue_keys(&self.name, &name)?;
            q.restore_keys(keys, recovered);
        }
        if n > 0 {
            tracing::info!(vhost = %self.name, queue = %name, messages = n, elapsed_ms = started.elapsed().as_millis() as u64, "recovered queue");
        }
        Ok(q)
    }

    /// Recreates this vhost's durable exchanges, queues (with their messages) and bindings.
    pub fn restore(&self, defs: &Definitions) -> Result<(), StoreError> {
        for x in defs.exchanges.iter().filter(|x| x.vhost == self.name) {
            let Some(kind) = ExchangeKind::parse(&x.kind) else {
                tracing::warn!(exchange = %x.name, kind = %x.kind, "skipping exchange of unknown type");
                continue;
            };
            let name: Arc<str> = x.name.as_str().into();
            let exchange = self.make_exchange(ExchangeConfig {
                name: name.clone(),
                kind,
                durable: true,
                auto_delete: x.auto_delete,
                internal: x.internal,
                arguments: table_from(&x.arguments),
            })?;
            self.exchanges.write().insert(name, exchange);
        }
        for qd in defs.queues.iter().filter(|q| q.vhost == self.name) {
            let arguments = table_from(&qd.arguments);
            let args = QueueArgs::parse(
                &arguments,
                &qd.name,
                &self.name,
                true,
                false,
                qd.auto_delete,
            )
            .unwrap_or_default();
            let q = self.make_queue(
                QueueConfig {
                    name: qd.name.clone(),
                    durable: true,
                    auto_delete: qd.auto_delete,
                    exclusive_owner: None,
                    arguments,
                },
                args,
            )?;
            self.queues.write().insert(qd.name.clone(), q);
        }
        for b in defs.bindings.iter().filter(|b| b.vhost == self.name) {
            let Ok(src) = self.exchange(&b.source) else {
                continue;
            };
            let dest = if b.destination_is_queue {
                match self.queues.read().get(&b.destination) {
                    Some(q) => Destination::Queue(q.clone()),
                    None => continue,
                }
            } else {
                match self.exchange(&b.destination) {
                    Ok(x) => Destination::Exchange(x.config.name.clone()),
                    Err(_) => continue,
                }
            };
            src.bind(Binding::new(
                dest,
                b.routing_key.clone(),
                table_from(&b.arguments),
            ));
        }
        Ok(())
    }

    /// Adds this vhost's durable entities to `defs` (transient ones are not restored, as in
    /// RabbitMQ; nor are exclusive queues, which die with their connection).
    pub fn snapshot(&self, defs: &mut Definitions) {
        let mut exchanges = self.exchanges();
        exchanges.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        let is_builtin = |n: &str| n.is_empty() || n.starts_with("amq.");
        let durable_queue = |q: &Queue| q.config.durable && q.config.exclusive_owner.is_none();
        let exchange_durable = |name: &str| {
            self.exchanges
                .read()
                .get(name)
                .is_some_and(|x| x.config.durable)
        };
        for x in &exchanges {
            let c = &x.config;
            if c.durable && !is_builtin(&c.name) {
                defs.exchanges.push(ExchangeDef {
                    vhost: self.name.clone(),
                    name: c.name.to_string(),
                    kind: c.kind.as_str().to_owned(),
                    durable: true,
                    auto_delete: c.auto_delete,
                    internal: c.internal,
                    arguments: rill_codec::encode_field_table(&c.arguments),
                });
            }
            if !c.durable || c.name.is_empty() {
                continue;
            }
            let mut bindings = x.bindings();
            bindings.sort_by(|a, b| a.routing_key.cmp(&b.routing_key));
            for b in bindings {
                let (destination, is_queue) = match &b.destination {
                    Destination::Queue(q) if durable_queue(q) => (q.name().to_owned(), true),
                    Destination::Exchange(n) if exchange_durable(n) => (n.to_string(), false),
                    _ => continue,
                };
                defs.bindings.push(BindingDef {
                    vhost: self.name.clone(),
                    source: c.name.to_string(),
                    destination,
                    destination_is_queue: is_queue,
                    routing_key: b.routing_key.clone(),
                    arguments: rill_codec::encode_field_table(&b.arguments),
                });
            }
        }
        let mut queues = self.queues();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        for q in queues.iter().filter(|q| durable_queue(q)) {
            defs.queues.push(QueueDef {
                vhost: self.name.clone(),
                name: q.name().to_owned(),
                durable: true,
                auto_delete: q.config.auto_delete,
                arguments: rill_codec::encode_field_table(&q.config.arguments),
            });
        }
    }

    /// A direct reply-to pseudo-queue: exclusive to the connection, gone with its consumer.
    pub fn declare_reply_queue(&self, connection: u64) -> Arc<Queue> {
        let name = generate_name("amq.rabbitmq.reply-to.");
        let q = Queue::new(QueueConfig {
            name: name.clone(),
            durable: false,
            auto_delete: true,
            exclusive_owner: Some(connection),
            arguments: FieldTable::default(),
        });
        self.queues.write().insert(name, q.clone());
        q
    }

    /// Deletes a queue, cancelling its consumers; returns the number of ready messages it held.
    pub fn delete_queue(
        &self,
        connection: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let q = match self.queue_for(connection, name) {
            Ok(q) => q,
            // Deleting a queue that is not there succeeds with count 0, as in RabbitMQ 3.x.
            Err(e) if e.code == ReplyCode::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        if if_unused && q.has_consumers() {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("queue '{name}' in vhost '{}' in use", self.name),
            ));
        }
        if if_empty && q.message_count() > 0 {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("queue '{name}' in vhost '{}' not empty", self.name),
            ));
        }
        Ok(self.remove_queue(&q))
    }

    /// Unconditional removal (exclusive owner gone, auto-delete, explicit delete).
    pub fn remove_queue(&self, q: &Arc<Queue>) -> u32 {
        {
            let mut map = self.queues.write();
            match map.get(q.name()) {
                Some(cur) if Arc::ptr_eq(cur, q) => {
                    map.remove(q.name());
                }
                _ => return 0,
            }
        }
        if q.config.durable {
            self.durable_changed();
        }
        let (count, consumers) = q.mark_deleted();
        for c in consumers {
            c.outlet.push(ConnEvent::ConsumerCancelled {
                channel: c.channel,
                consumer_tag: c.tag.clone(),
            });
        }
        self.forget_destination(&Destination::Queue(q.clone()));
        count
    }

    /// Periodic work: message TTLs and queue expiry (x-expires).
    pub fn tick(&self, now: u64) {
        let due: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.needs_tick())
            .cloned()
            .collect();
        for q in due {
            if q.tick(now) {
                tracing::debug!(queue = %q.name(), "queue expired (x-expires)");
                self.remove_queue(&q);
            }
        }
    }

    /// Deletes the exclusive queues of a connection that went away.
    pub fn connection_closed(&self, connection: u64) {
        let owned: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.config.exclusive_owner == Some(connection))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&q);
        }
    }

    /// Finds the queues a message published to `exchange` reaches: follows exchange-to-exchange
    /// bindings and alternate exchanges, visiting each exchange once, each queue once (headers
    /// are decoded only if a headers exchange asks). A deduplicating exchange on the way may
    /// drop the message (routing nothing further from there, not even to its alternate
    /// exchange) or remember its key: publish to `out`, then pass the outcome to
    /// [`Routed::finish`].
    pub fn route_message(
        &self,
        exchange: &Arc<Exchange>,
        msg: &Message,
        out: &mut Vec<Arc<Queue>>,
    ) -> Routed {
        let mut routed = Routed::default();
        let routing_key = msg.routing_key_str();
        if exchange.config.name.is_empty() {
            if let Some(q) = self.queues.read().get(routing_key) {
                out.push(q.clone());
            }
            return routed;
        }
        let headers = || msg.headers();
        let mut now = None;
        let mut visited: Vec<Arc<str>> = vec![exchange.config.name.clone()];
        let mut pending = vec![exchange.clone()];
        let mut dests = Vec::new();
        while let Some(x) = pending.pop() {
            if x.dedup().is_some()
                && !routed.admit(&x, msg, *now.get_or_insert_with(crate::queue::now_ms))
            {
                continue;
            }
            dests.clear();
            x.route(routing_key, headers, &mut dests);
            if dests.is_empty() {
                if let Some(ae) = x.alternate_exchange() {
                    dests.push(Destination::Exchange(ae.into()));
                }
            }
            for d in dests.drain(..) {
                match d {
                    Destination::Queue(q) => {
                        if !out.iter().any(|o| Arc::ptr_eq(o, &q)) {
                            out.push(q);
                        }
                    }
                    Destination::Exchange(name) => {
                        if visited.contains(&name) {
                            continue;
                        }
                        if let Some(next) = self.exchanges.read().get(&name).cloned() {
                            visited.push(name);
                            pending.push(next);
                        }
                    }
                }
            }
        }
        routed
    }
}

/// RabbitMQ-style equivalence check of declaration arguments.
fn compare_args(
    keys: &[&str],
    got: &FieldTable,
    cur: &FieldTable,
    what: &str,
) -> Result<(), AmqpError> {
    for key in keys {
        let (g, c) = (got.inner().get(*key), cur.inner().get(*key));
        if g == c {
            continue;
        }
        let describe = |v: Option<&AMQPValue>| match v {
            None => "none".to_owned(),
            Some(v) => format!("the value '{}' of type '{}'", value_text(v), type_name(v)),
        };
        let text = match (g, c) {
            // Same type: RabbitMQ shows just the values.
            (Some(a), Some(b)) if type_name(a) == type_name(b) => format!(
                "inequivalent arg '{key}' for {what}: received '{}' but current is '{}'",
                value_text(a),
                value_text(b)
            ),
            _ => format!(
                "inequivalent arg '{key}' for {what}: received {} but current is {}",
                describe(g),
                describe(c)
            ),
        };
        return Err(AmqpError::new(ReplyCode::PreconditionFailed, text));
    }
    Ok(())
}

fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// RabbitMQ's names for field types, as they appear in its error texts.
pub(crate) fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

fn table_from(encoded: &[u8]) -> FieldTable {
    rill_codec::decode_field_table(encoded).unwrap_or_default()
}

/// Server-generated names in RabbitMQ's style: a prefix and 22 URL-safe base64 characters.
pub fn generate_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for _ in 0..22 {
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}
