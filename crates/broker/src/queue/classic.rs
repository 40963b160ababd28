//! Classic queues: messages in FIFO order (per priority), the deliveries awaiting
//! acknowledgement, and consumers served round robin within priority groups.
//!
//! A durable queue also appends persistent messages to its on-disk log ([`Durable`]). Only the
//! first [`MEMORY_WINDOW`] bytes of ready bodies stay in memory; the rest are read back from
//! disk when their turn comes, so a backlog of millions costs a few dozen bytes a message.
//!
//! With `x-message-deduplication` the queue drops a message whose key it remembers (see
//! [`crate::dedup`]); the check and the remembering happen under the queue's lock, so two
//! copies published at once cannot both get in.
//!
//! Messages that leave without being consumed (expired, dropped for length, rejected, over the
//! delivery limit) are collected under the lock and dead-lettered after it is released
//! (see [`crate::deadletter`]), since that publishes into other queues.

use super::{now_ms, ConsumeError, PublishOutcome, Queue, MEMORY_WINDOW};
use crate::args::{Overflow, QueueArgs, QueueType};
use crate::consumer::{ConnEvent, Consumer, Delivery};
use crate::deadletter::{is_cycle, record_death, Death, Reason};
use crate::dedup::{Check, Deduplicator, MessageKey};
use crate::durable::{Durable, DurableKeys, ReadAhead};
use crate::message::{Message, QueuedMessage};
use parking_lot::Mutex;
use rill_store::{KeyRecord, Position, RecoveredRecord};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A classic (or single-node quorum) queue's messages and consumers.
#[derive(Debug)]
pub struct Classic {
    /// The on-disk log of a durable queue (None for transient queues or a broker without a
    /// data directory).
    durable: Option<Durable>,
    /// Some ready message has a per-message expiry: the ticker must look at this queue.
    has_expiring: AtomicBool,
    state: Mutex<QueueState>,
}

/// A message's place in the queue.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    /// None while the body lives only on disk.
    msg: Option<Arc<Message>>,
    /// Where it is in the queue's log, if persisted.
    pos: Option<Position>,
    size: u64,
    redelivered: bool,
    /// When it expires (ms since the epoch), from x-message-ttl or its expiration.
    expires_at: Option<u64>,
    priority: u8,
    /// Times it was handed out (for x-delivery-limit / x-delivery-count).
    deliveries: u32,
}

/// Ready messages, one FIFO per priority level (one level unless x-max-priority is set), each
/// ordered by `seq`.
#[derive(Debug, Default)]
struct Ready {
    levels: Vec<VecDeque<Entry>>,
    len: usize,
}

impl Ready {
    fn new(levels: usize) -> Ready {
        Ready {
            levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }
    fn level(&self, priority: u8) -> usize {
        usize::from(priority).min(self.levels.len() - 1)
    }
    fn push(&mut self, e: Entry) -> usize {
        let l = self.level(e.priority);
        self.levels[l].push_back(e);
        self.len += 1;
        l
    }
    fn insert(&mut self, e: Entry) {
        let l = self.level(e.priority);
        let q = &mut self.levels[l];
        let at = q.partition_point(|m| m.seq < e.seq);
        q.insert(at, e);
        self.len += 1;
    }
    fn head(&self) -> Option<&Entry> {
        self.levels.iter().rev().find_map(|q| q.front())
    }
    fn pop(&mut self) -> Option<Entry> {
        let e = self.levels.iter_mut().rev().find_map(|q| q.pop_front())?;
        self.len -= 1;
        Some(e)
    }
    fn clear(&mut self) {
        self.levels.iter_mut().for_each(VecDeque::clear);
        self.len = 0;
    }
    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.levels.iter().flatten()
    }
    fn back_mut(&mut self, level: usize) -> Option<&mut Entry> {
        self.levels.get_mut(level)?.back_mut()
    }
}

#[derive(Debug, Default)]
struct QueueState {
    ready: Ready,
    /// Body bytes of `ready`, for `x-max-length-bytes`.
    ready_bytes: u64,
    /// Body bytes of `ready` held in memory.
    memory_bytes: u64,
    unacked: HashMap<u64, Entry>,
    next_seq: u64,
    /// Highest priority first; equal priorities in arrival order.
    consumers: Vec<Arc<Consumer>>,
    /// With x-single-active-consumer: consumers in registration order; the first is active.
    registration: Vec<Arc<Consumer>>,
    /// Round-robin cursor into `consumers`.
    next_consumer: usize,
    /// Whether it ever had a consumer (auto-delete only fires after one went away).
    had_consumer: bool,
    deleted: bool,
    /// Paged-out bodies at the head are read back in runs.
    read_ahead: ReadAhead,
    /// Positions delivered with acks pending, recorded in the log together once a dispatch
    /// is done (before the queue's lock is released, so no ack can come first).
    delivery_marks: Vec<Position>,
    /// The keys of `x-message-deduplication`.
    dedup: Option<Deduplicator>,
}

/// Messages leaving the queue for its dead-letter exchange, gathered under the lock.
type DeadLetters = Vec<(Arc<Message>, Reason)>;

impl Classic {
    pub(super) fn new(args: &QueueArgs, durable: Option<Durable>) -> Classic {
        let levels = args.max_priority.map_or(1, |p| usize::from(p) + 1);
        Classic {
            durable,
            has_expiring: AtomicBool::new(false),
            state: Mutex::new(QueueState {
                ready: Ready::new(levels),
                dedup: args.dedup.as_ref().map(Deduplicator::new),
                ..QueueState::default()
            }),
        }
    }

    pub(super) fn is_persistent(&self) -> bool {
        self.durable.is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.state.lock().ready.len
    }

    pub(super) fn consumer_count(&self) -> usize {
        self.state.lock().consumers.len()
    }

    pub(super) fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    pub(super) fn has_expiring(&self, q: &Queue) -> bool {
        q.args.message_ttl.is_some() || self.has_expiring.load(Ordering::Relaxed)
    }

    pub(super) fn publish(&self, q: &Arc<Queue>, msg: Arc<Message>) -> PublishOutcome {
        let mut dead = DeadLetters::new();
        // Read before taking the lock; a queue without deduplication reads nothing.
        let key = q.args.dedup.as_ref().and_then(|d| d.key_of(&msg));
        let outcome = {
            let mut st = self.state.lock();
            self.publish_locked(q, &mut st, msg, key, now_ms(), &mut dead)
        };
        self.dead_letter(q, dead);
        outcome
    }

    /// [`Classic::publish`] of several messages in order under one lock: the queue's
    /// consumers (and anyone else waiting for the lock) are handed it once, not per message.
    pub(super) fn publish_batch(
        &self,
        q: &Arc<Queue>,
        msgs: impl IntoIterator<Item = Arc<Message>>,
        out: &mut Vec<PublishOutcome>,
    ) {
        let dedup = q.args.dedup.as_ref();
        let keyed: Vec<(Arc<Message>, Option<MessageKey>)> = msgs
            .into_iter()
            .map(|m| {
                let key = dedup.and_then(|d| d.key_of(&m));
                (m, key)
            })
            .collect();
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            let now = now_ms();
            for (msg, key) in keyed {
                out.push(self.publish_locked(q, &mut st, msg, key, now, &mut dead));
            }
        }
        self.dead_letter(q, dead);
    }

    fn publish_locked(
        &self,
        q: &Arc<Queue>,
        st: &mut QueueState,
        msg: Arc<Message>,
        key: Option<MessageKey>,
        now: u64,
        dead: &mut DeadLetters,
    ) -> PublishOutcome {
        if st.deleted {
            return PublishOutcome::ACCEPTED;
        }
        if let (Some(k), Some(d)) = (&key, &st.dedup) {
            match d.check(k, now) {
                Check::New => {}
                // Accepted and dropped: confirmed once the original is durable.
                Check::Duplicate { durable_at } => {
                    q.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                    return PublishOutcome {
                        accepted: true,
                        durable_at,
                    };
                }
                // Only exchanges remember keys in two steps.
                Check::InFlight => return PublishOutcome::REFUSED,
            }
        }
        let args = &q.args;
        let size = msg.size() as u64;
        if args.overflow != Overflow::DropHead
            && args.exceeded(st.ready.len + 1, st.ready_bytes + size)
        {
            if args.overflow == Overflow::RejectPublishDlx {
                dead.push((msg, Reason::Maxlen));
            }
            return PublishOutcome::REFUSED;
        }
        let priority = msg.priority;
        let per_message = msg.expiration_ms;
        let ttl = match (args.message_ttl, per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if per_message.is_some() {
            self.has_expiring.store(true, Ordering::Relaxed);
        }
        let mut pos = None;
        let mut durable_at = None;
        if let (true, Some(d)) = (msg.persistent, &self.durable) {
            match d.append(&msg) {
                Ok((p, epoch)) => {
                    pos = Some(p);
                    durable_at = Some(epoch);
                }
                Err(e) => {
                    tracing::error!(queue = %q.config.name, error = %e, "cannot write message; refusing it");
                    return PublishOutcome::REFUSED;
                }
            }
        }
        if let (Some(k), Some(d)) = (&key, st.dedup.as_mut()) {
            // After the message: its key is written to disk only once the message is.
            match d.remember(k, now, durable_at, msg.persistent) {
                Ok(at) => durable_at = durable_at.max(at),
                Err(e) => {
                    tracing::error!(queue = %q.config.name, error = %e, "cannot write a deduplication key; refusing the message");
                    if let (Some(d), Some(p)) = (&self.durable, pos) {
                        d.ack(&[p]);
                    }
                    return PublishOutcome::REFUSED;
                }
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let level = st.push_ready(Entry {
            seq,
            msg: Some(msg),
            pos,
            size,
            redelivered: false,
            expires_at: ttl.map(|t| now.saturating_add(t)),
            priority,
            deliveries: 0,
        });
        q.stats.published.fetch_add(1, Ordering::Relaxed);
        if !st.consumers.is_empty() {
            self.dispatch_locked(q, st, dead);
        }
        st.page_out_tail(level);
        while args.exceeded(st.ready.len, st.ready_bytes) {
            match st.pop_ready() {
                Some(dropped) => self.leave(q, dropped, Reason::Maxlen, dead),
                None => break,
            }
        }
        // A TTL of 0 means "now or never": what no consumer took at once expires.
        self.expire_head(q, st, now, dead);
        sync_gauges(q, st);
        PublishOutcome {
            accepted: true,
            durable_at,
        }
    }

    pub(super) fn restore(
        &self,
        q: &Queue,
        records: impl IntoIterator<Item = RecoveredRecord>,
    ) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        // The index has no properties: a priority queue reads each record's priority back.
        let mut priorities = self
            .durable
            .as_ref()
            .filter(|_| q.args.max_priority.is_some())
            .map(|d| (d, ReadAhead::default()));
        for r in records {
            let priority = match &mut priorities {
                Some((d, reader)) => match reader.read(d, r.position) {
                    Ok(m) => m.priority,
                    Err(e) => {
                        tracing::error!(queue = %q.config.name, pos = ?r.position, error = %e, "cannot read a recovered message's priority; it goes to level 0");
                        0
                    }
                },
                None => 0,
            };
            let seq = st.next_seq;
            st.next_seq += 1;
            st.push_ready(Entry {
                seq,
                msg: None,
                pos: Some(r.position),
                // The record's size stands in for the body's until it is read back.
                size: u64::from(r.encoded_len),
                redelivered: r.delivered,
                expires_at: q.args.message_ttl.map(|t| r.timestamp_ms.saturating_add(t)),
                priority,
                deliveries: u32::from(r.delivered),
            });
            n += 1;
        }
        sync_gauges(q, &st);
        n
    }

    /// Keeps the deduplication cache in `keys` from now on, with the keys it recovered, and
    /// the keys of the recovered messages themselves. A message's key reaches its log only
    /// after the message is synced (a key must never outlive a lost message), so a crash in
    /// between leaves a message whose key is gone; its publisher had no confirm and sends it
    /// again. Reading the keys back from the messages still in the queue catches that copy.
    pub(super) fn restore_keys(&self, q: &Queue, keys: DurableKeys, recovered: Vec<KeyRecord>) {
        let mut st = self.state.lock();
        let QueueState { dedup, ready, .. } = &mut *st;
        let Some(d) = dedup.as_mut() else {
            return;
        };
        d.attach_log(keys, recovered);
        let (Some(durable), Some(args)) = (&self.durable, q.args.dedup.as_ref()) else {
            return;
        };
        let now = now_ms();
        let mut reader = ReadAhead::default();
        let mut restored = 0u64;
        for pos in ready.iter().filter_map(|e| e.pos) {
            let Ok(msg) = reader.read(durable, pos) else {
                continue;
            };
            let Some(key) = args.key_of(&msg) else {
                continue;
            };
            if matches!(d.check(&key, now), Check::New) {
                match d.remember(&key, now, None, true) {
                    Ok(_) => restored += 1,
                    Err(e) => {
                        tracing::error!(queue = %q.config.name, error = %e, "cannot write a deduplication key");
                        break;
                    }
                }
            }
        }
        if restored > 0 {
            tracing::info!(queue = %q.config.name, keys = restored, "deduplication keys recovered from messages whose keys the crash lost");
        }
    }

    pub(super) fn dispatch(&self, q: &Arc<Queue>) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if !st.consumers.is_empty() && st.ready.len > 0 {
                self.dispatch_locked(q, &mut st, &mut dead);
                sync_gauges(q, &st);
            }
        }
        self.dead_letter(q, dead);
    }

    fn dispatch_locked(&self, q: &Arc<Queue>, st: &mut QueueState, dead: &mut DeadLetters) {
        let now = now_ms();
        loop {
            self.expire_head(q, st, now, dead);
            if st.ready.len == 0 {
                break;
            }
            let Some(idx) = st.pick_consumer(q.args.single_active_consumer) else {
                break;
            };
            st.next_consumer = st.next_consumer.wrapping_add(1);
            let consumer = Arc::clone(&st.consumers[idx]);
            let Some(item) = self.take_head(q, st, !consumer.no_ack, false) else {
                consumer.release(1);
                continue;
            };
            q.stats.delivered.fetch_add(1, Ordering::Relaxed);
            let outlet = Arc::clone(&consumer.outlet);
            outlet.push(ConnEvent::Deliver(Delivery {
                consumer,
                queue: Arc::clone(q),
                item,
            }));
        }
        self.record_delivery_marks(st);
    }

    /// Writes the delivery marks `take_head` collected (lazily synced: see `Durable`).
    fn record_delivery_marks(&self, st: &mut QueueState) {
        if let (Some(d), false) = (&self.durable, st.delivery_marks.is_empty()) {
            d.mark_delivered(&st.delivery_marks);
            st.delivery_marks.clear();
        }
    }

    /// Pops the head for delivery, loading its body from disk if needed, and keeps it as
    /// unacked when `ack` is set. A body that cannot be read is logged and dropped.
    fn take_head(
        &self,
        q: &Queue,
        st: &mut QueueState,
        ack: bool,
        via_get: bool,
    ) -> Option<QueuedMessage> {
        let mut entry = st.pop_ready()?;
        if let (true, false, true, Some(pos)) =
            (ack, entry.redelivered, self.durable.is_some(), entry.pos)
        {
            st.delivery_marks.push(pos);
        }
        let msg = match entry.msg.take() {
            Some(m) => m,
            None => match self.load(q, &entry, Some(&mut st.read_ahead)) {
                Some(m) => m,
                None => {
                    self.forget(&entry);
                    return None;
                }
            },
        };
        entry.deliveries += 1;
        let delivered = with_delivery_count(q, &msg, entry.deliveries, via_get);
        if ack {
            // A persisted message can be read back if it is requeued; keep only its place.
            let keep = entry.pos.is_none().then(|| msg.clone());
            st.unacked.insert(
                entry.seq,
                Entry {
                    msg: keep,
                    ..entry.clone()
                },
            );
        } else {
            self.forget(&entry);
        }
        Some(QueuedMessage {
            seq: entry.seq,
            msg: delivered,
            redelivered: entry.redelivered,
            pos: entry.pos,
        })
    }

    /// Reads a paged-out body back: through `read_ahead` for the head of the queue, alone for
    /// a message leaving from elsewhere.
    fn load(
        &self,
        q: &Queue,
        entry: &Entry,
        read_ahead: Option<&mut ReadAhead>,
    ) -> Option<Arc<Message>> {
        let (Some(d), Some(pos)) = (&self.durable, entry.pos) else {
            return None;
        };
        let read = match read_ahead {
            Some(r) => r.read(d, pos),
            None => d.read(pos).map(Arc::new),
        };
        match read {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(queue = %q.config.name, ?pos, error = %e, "cannot read message back; dropping it");
                None
            }
        }
    }

    /// The message left the queue for good: settle it in the log.
    fn forget(&self, entry: &Entry) {
        if let (Some(d), Some(pos)) = (&self.durable, entry.pos) {
            d.ack(&[pos]);
        }
    }

    /// The message leaves without being consumed: settled in the log and, if the queue has a
    /// dead-letter exchange, queued for dead-lettering.
    fn leave(&self, q: &Queue, entry: Entry, reason: Reason, dead: &mut DeadLetters) {
        if q.args.dead_letter_exchange.is_some() {
            let msg = entry.msg.clone().or_else(|| self.load(q, &entry, None));
            if let Some(m) = msg {
                dead.push((m, reason));
            }
        }
        self.forget(&entry);
    }

    /// Drops expired messages at the head (RabbitMQ expires only there), dead-lettering them.
    fn expire_head(&self, q: &Queue, st: &mut QueueState, now: u64, dead: &mut DeadLetters) {
        while st
            .ready
            .head()
            .is_some_and(|e| e.expires_at.is_some_and(|t| t <= now))
        {
            if let Some(e) = st.pop_ready() {
                self.leave(q, e, Reason::Expired, dead);
            }
        }
    }

    /// The ticker's part: expires messages at the head.
    pub(super) fn expire(&self, q: &Arc<Queue>, now: u64) {
        if !self.has_expiring(q) {
            return;
        }
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            self.expire_head(q, &mut st, now, &mut dead);
            sync_gauges(q, &st);
        }
        self.dead_letter(q, dead);
    }

    /// Republishes dead letters to the dead-letter exchange (after the queue lock is released:
    /// this publishes into other queues, maybe this one).
    fn dead_letter(&self, q: &Queue, dead: DeadLetters) {
        if dead.is_empty() {
            return;
        }
        let (Some(dlx), Some(vhost)) = (&q.args.dead_letter_exchange, q.vhost()) else {
            return;
        };
        // A missing dead-letter exchange drops the message silently, as in RabbitMQ.
        let Ok(exchange) = vhost.exchange(dlx) else {
            return;
        };
        let time_secs = now_ms() / 1000;
        let mut targets = Vec::new();
        for (msg, reason) in dead {
            let death = Death {
                queue: &q.config.name,
                reason,
                exchange: &msg.exchange,
                routing_key: msg.routing_key_str(),
                time_secs,
            };
            let Ok(properties) = record_death(&msg.properties, &death) else {
                continue;
            };
            let routing_key = match &q.args.dead_letter_routing_key {
                Some(k) => bytes::Bytes::from(k.clone().into_bytes()),
                None => msg.routing_key.clone(),
            };
            let letter = Arc::new(Message::new(
                exchange.config.name.clone(),
                routing_key,
                properties,
                msg.body.clone(),
            ));
            targets.clear();
            let routed = vhost.route_message(&exchange, &letter, &mut targets);
            let mut outcome = PublishOutcome::ACCEPTED;
            for target in targets.drain(..) {
                if is_cycle(&letter.properties, reason, target.name()) {
                    tracing::debug!(queue = %target.name(), "dead-letter cycle: message dropped");
                    continue;
                }
                let o = target.publish(letter.clone());
                outcome.accepted &= o.accepted;
                outcome.durable_at = outcome.durable_at.max(o.durable_at);
            }
            // Nobody confirms dead letters; this settles deduplicating exchanges' keys.
            let _ = routed.finish(outcome);
        }
    }

    pub(super) fn get(&self, q: &Arc<Queue>, ack: bool) -> Option<(QueuedMessage, u32)> {
        let mut dead = DeadLetters::new();
        let got = {
            let mut st = self.state.lock();
            let now = now_ms();
            let item = loop {
                self.expire_head(q, &mut st, now, &mut dead);
                if st.ready.len == 0 {
                    break None;
                }
                if let Some(item) = self.take_head(q, &mut st, ack, true) {
                    break Some(item);
                }
            };
            self.record_delivery_marks(&mut st);
            if item.is_some() {
                q.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            let left = u32::try_from(st.ready.len).unwrap_or(u32::MAX);
            sync_gauges(q, &st);
            item.map(|i| (i, left))
        };
        self.dead_letter(q, dead);
        got
    }

    /// Forgets settled messages (dead-lettering them with `dead_reason`), then lets consumers
    /// use the credit that freed.
    pub(super) fn settle(
        &self,
        q: &Arc<Queue>,
        seqs: impl IntoIterator<Item = u64>,
        dead_reason: Option<Reason>,
    ) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            let mut n = 0;
            let mut positions = Vec::new();
            for seq in seqs {
                if let Some(e) = st.unacked.remove(&seq) {
                    n += 1;
                    if let Some(reason) = dead_reason {
                        if q.args.dead_letter_exchange.is_some() {
                            if let Some(m) = e.msg.clone().or_else(|| self.load(q, &e, None)) {
                                dead.push((m, reason));
                            }
                        }
                    }
                    positions.extend(e.pos);
                }
            }
            if let (Some(d), false) = (&self.durable, positions.is_empty()) {
                d.ack(&positions);
            }
            q.stats.acked.fetch_add(n, Ordering::Relaxed);
            if !st.consumers.is_empty() && st.ready.len > 0 {
                self.dispatch_locked(q, &mut st, &mut dead);
            }
            sync_gauges(q, &st);
        }
        self.dead_letter(q, dead);
    }

    pub(super) fn requeue(&self, q: &Arc<Queue>, seqs: impl IntoIterator<Item = u64>) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            for seq in seqs {
                if let Some(mut e) = st.unacked.remove(&seq) {
                    if q.args
                        .delivery_limit
                        .is_some_and(|limit| u64::from(e.deliveries) > limit)
                    {
                        self.leave(q, e, Reason::DeliveryLimit, &mut dead);
                        continue;
                    }
                    e.redelivered = true;
                    st.insert_ready(e);
                }
            }
            if !st.consumers.is_empty() {
                self.dispatch_locked(q, &mut st, &mut dead);
            }
            sync_gauges(q, &st);
        }
        self.dead_letter(q, dead);
    }

    pub(super) fn return_undelivered(&self, q: &Arc<Queue>, item: QueuedMessage) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if st.deleted {
                return;
            }
            let previous = st.unacked.remove(&item.seq);
            let size = item.msg.size() as u64;
            let priority = item.msg.priority;
            st.insert_ready(Entry {
                seq: item.seq,
                msg: Some(item.msg),
                pos: item.pos,
                size,
                redelivered: item.redelivered,
                expires_at: previous.as_ref().and_then(|e| e.expires_at),
                priority,
                deliveries: previous.map_or(0, |e| e.deliveries.saturating_sub(1)),
            });
            if !st.consumers.is_empty() {
                self.dispatch_locked(q, &mut st, &mut dead);
            }
            sync_gauges(q, &st);
        }
        self.dead_letter(q, dead);
    }

    pub(super) fn add_consumer(
        &self,
        q: &Arc<Queue>,
        consumer: Arc<Consumer>,
    ) -> Result<(), ConsumeError> {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if st.deleted {
                return Err(ConsumeError::Deleted);
            }
            let single_active = q.args.single_active_consumer;
            if st.consumers.iter().any(|c| c.exclusive)
                || (consumer.exclusive && (!st.consumers.is_empty() || single_active))
            {
                return Err(ConsumeError::ExclusiveConflict);
            }
            let pos = st
                .consumers
                .partition_point(|c| c.priority >= consumer.priority);
            st.consumers.insert(pos, consumer.clone());
            if single_active {
                st.registration.push(consumer);
            }
            st.had_consumer = true;
            self.dispatch_locked(q, &mut st, &mut dead);
            sync_gauges(q, &st);
        }
        self.dead_letter(q, dead);
        Ok(())
    }

    pub(super) fn remove_consumer(&self, q: &Arc<Queue>, consumer: &Arc<Consumer>) -> bool {
        let mut dead = DeadLetters::new();
        let delete = {
            let mut st = self.state.lock();
            let before = st.consumers.len();
            st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
            if st.consumers.len() == before {
                return false;
            }
            // Credit freed up elsewhere may let the remaining consumers take more.
            if !st.consumers.is_empty() {
                self.dispatch_locked(q, &mut st, &mut dead);
            }
            sync_gauges(q, &st);
            q.config.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
        };
        self.dead_letter(q, dead);
        delete
    }

    pub(super) fn purge(&self, q: &Queue) -> u32 {
        let mut st = self.state.lock();
        let n = st.ready.len;
        let positions: Vec<Position> = st.ready.iter().filter_map(|e| e.pos).collect();
        if let (Some(d), false) = (&self.durable, positions.is_empty()) {
            d.ack(&positions);
        }
        st.ready.clear();
        st.read_ahead.clear();
        st.ready_bytes = 0;
        st.memory_bytes = 0;
        sync_gauges(q, &st);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub(super) fn mark_deleted(&self, q: &Queue) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.state.lock();
        if st.deleted {
            return (0, Vec::new());
        }
        st.deleted = true;
        let n = u32::try_from(st.ready.len).unwrap_or(u32::MAX);
        st.ready.clear();
        st.unacked.clear();
        st.ready_bytes = 0;
        st.memory_bytes = 0;
        if let Some(d) = &self.durable {
            d.destroy();
        }
        if let Some(d) = st.dedup.as_mut() {
            d.destroy();
        }
        st.registration.clear();
        let consumers = std::mem::take(&mut st.consumers);
        for c in &consumers {
            c.cancel();
        }
        sync_gauges(q, &st);
        (n, consumers)
    }
}

/// Quorum queues tell consumers how often a message was delivered before
/// (`x-delivery-count`): on redeliveries, and on every basic.get.
fn with_delivery_count(
    q: &Queue,
    msg: &Arc<Message>,
    deliveries: u32,
    via_get: bool,
) -> Arc<Message> {
    if q.args.queue_type != QueueType::Quorum || (deliveries <= 1 && !via_get) {
        return msg.clone();
    }
    match msg.with_header_long("x-delivery-count", i64::from(deliveries) - 1) {
        Some(m) => Arc::new(m),
        None => msg.clone(),
    }
}

fn sync_gauges(q: &Queue, st: &QueueState) {
    let stats = &q.stats;
    stats.ready.store(st.ready.len as u64, Ordering::Relaxed);
    stats
        .unacked
        .store(st.unacked.len() as u64, Ordering::Relaxed);
    stats
        .consumers
        .store(st.consumers.len() as u64, Ordering::Relaxed);
    stats.memory_bytes.store(st.memory_bytes, Ordering::Relaxed);
}

impl QueueState {
    /// The consumer to get the next message: the highest priority group with credit, round
    /// robin within the group; with a single active consumer, only the earliest registered.
    /// Takes the credit.
    fn pick_consumer(&mut self, single_active: bool) -> Option<usize> {
        if single_active {
            // A cancelled active consumer keeps its turn until its deliveries are settled, so
            // its unacked messages reach the next consumer before newer ones.
            while self
                .registration
                .first()
                .is_some_and(|c| c.is_cancelled() && c.in_flight() == 0)
            {
                self.registration.remove(0);
            }
            let active = self.registration.first()?;
            let idx = self.consumers.iter().position(|c| Arc::ptr_eq(c, active))?;
            return active.try_take().then_some(idx);
        }
        let mut start = 0;
        while start < self.consumers.len() {
            let prio = self.consumers[start].priority;
            let end = start
                + self.consumers[start..]
                    .iter()
                    .take_while(|c| c.priority == prio)
                    .count();
            let n = end - start;
            if let Some(i) = (0..n)
                .map(|i| start + (self.next_consumer + i) % n)
                .find(|&i| self.consumers[i].try_take())
            {
                return Some(i);
            }
            start = end;
        }
        None
    }

    fn push_ready(&mut self, e: Entry) -> usize {
        self.ready_bytes += e.size;
        if e.msg.is_some() {
            self.memory_bytes += e.size;
        }
        self.ready.push(e)
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let e = self.ready.pop()?;
        self.ready_bytes -= e.size;
        if e.msg.is_some() {
            self.memory_bytes -= e.size;
        }
        Some(e)
    }

    /// Back at its original position (each level is ordered by seq).
    fn insert_ready(&mut self, e: Entry) {
        self.ready_bytes += e.size;
        if e.msg.is_some() {
            self.memory_bytes += e.size;
        }
        self.ready.insert(e);
    }

    /// Over the memory window, the newest persisted body (just pushed at `level`) is dropped
    /// from memory; the head of the queue (next to go out) stays in memory.
    fn page_out_tail(&mut self, level: usize) {
        if self.memory_bytes <= MEMORY_WINDOW {
            return;
        }
        let mut freed = 0;
        if let Some(last) = self.ready.back_mut(level) {
            if last.pos.is_some() && last.msg.is_some() {
                last.msg = None;
                freed = last.size;
            }
        }
        self.memory_bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{ChannelCredit, Outlet};
    use crate::queue::QueueConfig;
    use bytes::Bytes;
    use rill_codec::FieldTable;

    #[derive(Debug, Default)]
    struct Sink(parking_lot::Mutex<Vec<ConnEvent>>);
    impl Outlet for Sink {
        fn push(&self, event: ConnEvent) {
            self.0.lock().push(event);
        }
    }
    impl Sink {
        fn seqs(&self) -> Vec<u64> {
            self.0
                .lock()
                .iter()
                .filter_map(|e| match e {
                    ConnEvent::Deliver(d) => Some(d.item.seq),
                    _ => None,
                })
                .collect()
        }
    }

    fn queue() -> Arc<Queue> {
        Queue::new(QueueConfig {
            name: "q".into(),
            durable: false,
            auto_delete: false,
            exclusive_owner: None,
            arguments: FieldTable::default(),
        })
    }

    fn msg(body: &'static str) -> Arc<Message> {
        Arc::new(Message::new(
            "".into(),
            Bytes::from_static(b"q"),
            Bytes::from_static(&[0, 0]),
            Bytes::from_static(body.as_bytes()),
        ))
    }

    fn consumer(sink: &Arc<Sink>, prefetch: u32, tag: &str) -> Arc<Consumer> {
        Arc::new(Consumer::new(
            tag.into(),
            1,
            1,
            false,
            false,
            FieldTable::default(),
            prefetch,
            Arc::new(ChannelCredit::default()),
            sink.clone(),
        ))
    }

    #[test]
    fn prefetch_limits_in_flight_and_release_resumes() {
        let q = queue();
        let sink = Arc::new(Sink::default());
        let c = consumer(&sink, 2, "c");
        q.add_consumer(c.clone()).unwrap();
        for _ in 0..5 {
            q.publish(msg("x"));
        }
        assert_eq!(sink.seqs(), vec![0, 1]);
        q.ack([0]);
        c.release(1);
        q.dispatch();
        assert_eq!(sink.seqs(), vec![0, 1, 2]);
        assert_eq!(q.message_count(), 2);
    }

    #[test]
    fn round_robin_between_consumers() {
        let q = queue();
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        q.add_consumer(consumer(&a, 0, "a")).unwrap();
        q.add_consumer(consumer(&b, 0, "b")).unwrap();
        for _ in 0..4 {
            q.publish(msg("x"));
        }
        assert_eq!(a.seqs(), vec![0, 2]);
        assert_eq!(b.seqs(), vec![1, 3]);
    }

    #[test]
    fn requeue_keeps_position_and_marks_redelivered() {
        let q = queue();
        for _ in 0..3 {
            q.publish(msg("x"));
        }
        let (first, _) = q.get(true).unwrap();
        q.requeue([first.seq]);
        let (again, left) = q.get(false).unwrap();
        assert_eq!(again.seq, 0);
        assert!(again.redelivered);
        assert_eq!(left, 2);
    }

    #[test]
    fn exclusive_consumer_conflicts() {
        let q = queue();
        let sink = Arc::new(Sink::default());
        q.add_consumer(consumer(&sink, 0, "a")).unwrap();
        let excl = Arc::new(Consumer::new(
            "b".into(),
            1,
            1,
            false,
            true,
            FieldTable::default(),
            0,
            Arc::new(ChannelCredit::default()),
            sink.clone(),
        ));
        assert_eq!(q.add_consumer(excl), Err(ConsumeError::ExclusiveConflict));
    }

    #[test]
    fn purge_and_delete_count_ready_only() {
        let q = queue();
        for _ in 0..3 {
            q.publish(msg("x"));
        }
        let _ = q.get(true);
        assert_eq!(q.purge(), 2);
        q.publish(msg("y"));
        assert_eq!(q.mark_deleted().0, 1);
    }
}
