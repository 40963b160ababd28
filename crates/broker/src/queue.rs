//! A queue: its messages in FIFO order, the deliveries awaiting acknowledgement, and its
//! consumers.
//!
//! Each queue owns its state behind one short mutex. Publishers, ackers and consumers'
//! connections each take it for the length of one enqueue, settle or dispatch pass, never across
//! an `.await` (the core has none), so no global lock sits on the publish path: two queues never
//! contend. Dispatch runs in whichever thread changed the queue (the publisher's connection, the
//! acker's, or a consumer whose credit came back), which saves a hop through a queue task.
//!
//! A durable queue also appends persistent messages to its on-disk log ([`Durable`]). Only the
//! first [`MEMORY_WINDOW`] bytes of ready bodies stay in memory; the rest are read back from
//! disk when their turn comes, so a backlog of millions costs a few dozen bytes a message.

use crate::consumer::{ConnEvent, Consumer, Delivery};
use crate::durable::Durable;
use crate::message::{Message, QueuedMessage};
use parking_lot::Mutex;
use rill_codec::FieldTable;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use rill_store::Position;
use rill_store::RecoveredRecord;

/// Ready messages above which a consumed queue asks its publishers to pause.
const FLOW_HIGH: u64 = 20_000;
/// ... and below which they resume.
const FLOW_LOW: u64 = 10_000;

/// Body bytes of ready persistent messages a durable queue keeps in memory; beyond this, bodies
/// live only on disk until delivered.
pub const MEMORY_WINDOW: u64 = 4 * 1024 * 1024;

/// Declared properties of a queue, compared on redeclaration.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// The connection an exclusive queue belongs to.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
}

#[derive(Debug)]
pub struct Queue {
    pub config: QueueConfig,
    limits: Limits,
    /// The on-disk log of a durable queue (None for transient queues or a broker without a
    /// data directory).
    durable: Option<Durable>,
    state: Mutex<QueueState>,
    stats: QueueCounters,
}

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// Length limits from `x-max-length`, `x-max-length-bytes` and `x-overflow`. Only ready
/// messages count, as in RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_length: Option<u64>,
    max_bytes: Option<u64>,
    overflow: Overflow,
}

impl Limits {
    fn from_args(args: &FieldTable) -> Limits {
        let num = |k: &str| rill_codec::table_get_i64(args, k).and_then(|n| u64::try_from(n).ok());
        Limits {
            max_length: num("x-max-length"),
            max_bytes: num("x-max-length-bytes"),
            overflow: match rill_codec::table_get_str(args, "x-overflow") {
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            },
        }
    }

    fn exceeded(&self, len: usize, bytes: u64) -> bool {
        self.max_length.is_some_and(|m| len as u64 > m) || self.max_bytes.is_some_and(|m| bytes > m)
    }
}

/// Monotonic counters readable without taking the queue lock (management API, metrics).
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub ready: AtomicU64,
    pub unacked: AtomicU64,
    pub consumers: AtomicU64,
    /// Ready body bytes held in memory.
    pub memory_bytes: AtomicU64,
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
}

#[derive(Debug, Default)]
struct QueueState {
    /// Ordered by `seq`.
    ready: VecDeque<Entry>,
    /// Body bytes of `ready`, for `x-max-length-bytes`.
    ready_bytes: u64,
    /// Body bytes of `ready` held in memory.
    memory_bytes: u64,
    unacked: HashMap<u64, Entry>,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    /// Round-robin cursor into `consumers`.
    next_consumer: usize,
    /// Whether it ever had a consumer (auto-delete only fires after one went away).
    had_consumer: bool,
    deleted: bool,
}

/// What happened to a consumer registration.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsumeError {
    /// Someone consumes exclusively, or we want exclusivity and others consume.
    ExclusiveConflict,
    Deleted,
}

/// The result of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// False when the queue refused it (full with `x-overflow=reject-publish`, or the disk
    /// write failed): the publisher gets a nack.
    pub accepted: bool,
    /// The sync epoch that makes it durable, when it was written to disk.
    pub durable_at: Option<u64>,
}

impl Queue {
    /// A queue whose messages live in memory only.
    pub fn new(config: QueueConfig) -> Arc<Queue> {
        Self::with_log(config, None)
    }

    /// A queue with an on-disk log for persistent messages.
    pub fn with_log(config: QueueConfig, durable: Option<Durable>) -> Arc<Queue> {
        Arc::new(Queue {
            limits: Limits::from_args(&config.arguments),
            config,
            durable,
            state: Mutex::new(QueueState::default()),
            stats: QueueCounters::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn counters(&self) -> &QueueCounters {
        &self.stats
    }

    pub fn is_persistent(&self) -> bool {
        self.durable.is_some()
    }

    /// Publisher flow control, like RabbitMQ's credit flow: while consumers are attached and
    /// cannot keep up, publishers into this queue should pause reading their sockets. A queue
    /// without consumers is buffering by design and never holds publishers back.
    pub fn wants_publishers_paused(&self) -> bool {
        self.stats.consumers.load(Ordering::Relaxed) > 0
            && self.stats.ready.load(Ordering::Relaxed) > FLOW_HIGH
    }

    /// Publishers paused by this queue may resume.
    pub fn lets_publishers_resume(&self) -> bool {
        self.stats.consumers.load(Ordering::Relaxed) == 0
            || self.stats.ready.load(Ordering::Relaxed) < FLOW_LOW
            || self.is_deleted()
    }

    pub fn message_count(&self) -> u32 {
        u32::try_from(self.state.lock().ready.len()).unwrap_or(u32::MAX)
    }

    pub fn consumer_count(&self) -> u32 {
        u32::try_from(self.state.lock().consumers.len()).unwrap_or(u32::MAX)
    }

    /// Appends a message and hands it to a consumer if one has credit. A persistent message in a
    /// durable queue is written to the queue's log first.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>, persistent: bool) -> PublishOutcome {
        let mut st = self.state.lock();
        if st.deleted {
            return PublishOutcome {
                accepted: true,
                durable_at: None,
            };
        }
        let size = msg.size() as u64;
        if self.limits.overflow != Overflow::DropHead
            && self
                .limits
                .exceeded(st.ready.len() + 1, st.ready_bytes + size)
        {
            return PublishOutcome {
                accepted: false,
                durable_at: None,
            };
        }
        let mut pos = None;
        let mut durable_at = None;
        if let (true, Some(d)) = (persistent, &self.durable) {
            match d.append(&msg) {
                Ok((p, epoch)) => {
                    pos = Some(p);
                    durable_at = Some(epoch);
                }
                Err(e) => {
                    tracing::error!(queue = %self.config.name, error = %e, "cannot write message; refusing it");
                    return PublishOutcome {
                        accepted: false,
                        durable_at: None,
                    };
                }
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.push_ready(Entry {
            seq,
            msg: Some(msg),
            pos,
            size,
            redelivered: false,
        });
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        if !st.consumers.is_empty() {
            self.dispatch_locked(&mut st);
        }
        st.page_out_tail();
        while self.limits.exceeded(st.ready.len(), st.ready_bytes) {
            match st.pop_ready() {
                Some(dropped) => self.forget(&dropped),
                None => break,
            }
        }
        self.sync_gauges(&st);
        PublishOutcome {
            accepted: true,
            durable_at,
        }
    }

    /// Messages recovered from the log at start-up, in log order, as an index: bodies are read
    /// back when delivered. Those delivered before the restart come back redelivered.
    pub fn restore(&self, records: impl IntoIterator<Item = RecoveredRecord>) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        for r in records {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.push_ready(Entry {
                seq,
                msg: None,
                pos: Some(r.position),
                // The record's size stands in for the body's until it is read back.
                size: u64::from(r.encoded_len),
                redelivered: r.delivered,
            });
            n += 1;
        }
        self.sync_gauges(&st);
        n
    }

    /// Lets consumers with fresh credit take waiting messages.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        if !st.consumers.is_empty() && !st.ready.is_empty() {
            self.dispatch_locked(&mut st);
            self.sync_gauges(&st);
        }
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        while !st.ready.is_empty() {
            let Some(idx) = st.pick_consumer() else {
                break;
            };
            st.next_consumer = st.next_consumer.wrapping_add(1);
            let consumer = Arc::clone(&st.consumers[idx]);
            let Some(item) = self.take_head(st, !consumer.no_ack) else {
                consumer.release(1);
                continue;
            };
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            let outlet = Arc::clone(&consumer.outlet);
            outlet.push(ConnEvent::Deliver(Delivery {
                consumer,
                queue: Arc::clone(self),
                item,
            }));
        }
    }

    /// Pops the head for delivery, loading its body from disk if needed, and keeps it as
    /// unacked when `ack` is set. A body that cannot be read is logged and dropped.
    fn take_head(&self, st: &mut QueueState, ack: bool) -> Option<QueuedMessage> {
        let mut entry = st.pop_ready()?;
        if let (true, false, Some(d), Some(pos)) =
            (ack, entry.redelivered, &self.durable, entry.pos)
        {
            d.mark_delivered(pos);
        }
        let msg = match entry.msg.take() {
            Some(m) => m,
            None => match self.load(&entry) {
                Some(m) => m,
                None => {
                    self.forget(&entry);
                    return None;
                }
            },
        };
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
            msg,
            redelivered: entry.redelivered,
            pos: entry.pos,
        })
    }

    fn load(&self, entry: &Entry) -> Option<Arc<Message>> {
        let (Some(d), Some(pos)) = (&self.durable, entry.pos) else {
            return None;
        };
        match d.read(pos) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::error!(queue = %self.config.name, ?pos, error = %e, "cannot read message back; dropping it");
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

    /// basic.get: takes the head message. With `ack` it stays unacked until settled.
    /// Returns the message and the number of messages left ready.
    pub fn get(&self, ack: bool) -> Option<(QueuedMessage, u32)> {
        let mut st = self.state.lock();
        let item = loop {
            if st.ready.is_empty() {
                self.sync_gauges(&st);
                return None;
            }
            if let Some(item) = self.take_head(&mut st, ack) {
                break item;
            }
        };
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        let left = u32::try_from(st.ready.len()).unwrap_or(u32::MAX);
        self.sync_gauges(&st);
        Some((item, left))
    }

    /// Forgets acknowledged (or rejected without requeue) messages, then lets consumers use the
    /// credit that freed.
    pub fn ack(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        let mut st = self.state.lock();
        let mut n = 0;
        let mut positions = Vec::new();
        for seq in seqs {
            if let Some(e) = st.unacked.remove(&seq) {
                n += 1;
                positions.extend(e.pos);
            }
        }
        if let (Some(d), false) = (&self.durable, positions.is_empty()) {
            d.ack(&positions);
        }
        self.stats.acked.fetch_add(n, Ordering::Relaxed);
        if !st.consumers.is_empty() && !st.ready.is_empty() {
            self.dispatch_locked(&mut st);
        }
        self.sync_gauges(&st);
    }

    /// Puts delivered messages back at their original positions, marked redelivered, and
    /// dispatches them again.
    pub fn requeue(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        let mut st = self.state.lock();
        for seq in seqs {
            if let Some(mut e) = st.unacked.remove(&seq) {
                e.redelivered = true;
                st.insert_ready(e);
            }
        }
        if !st.consumers.is_empty() {
            self.dispatch_locked(&mut st);
        }
        self.sync_gauges(&st);
    }

    /// A delivery that never reached the client (its consumer was cancelled before the frame
    /// was written): back to its place, with its redelivered flag unchanged.
    pub fn return_undelivered(self: &Arc<Self>, item: QueuedMessage) {
        let mut st = self.state.lock();
        if st.deleted {
            return;
        }
        st.unacked.remove(&item.seq);
        let size = item.msg.size() as u64;
        st.insert_ready(Entry {
            seq: item.seq,
            msg: Some(item.msg),
            pos: item.pos,
            size,
            redelivered: item.redelivered,
        });
        if !st.consumers.is_empty() {
            self.dispatch_locked(&mut st);
        }
        self.sync_gauges(&st);
    }

    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> Result<(), ConsumeError> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(ConsumeError::Deleted);
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(ConsumeError::ExclusiveConflict);
        }
        // Kept sorted by priority, highest first; equal priorities in arrival order.
        let pos = st
            .consumers
            .partition_point(|c| c.priority >= consumer.priority);
        st.consumers.insert(pos, consumer);
        st.had_consumer = true;
        self.dispatch_locked(&mut st);
        self.sync_gauges(&st);
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was its last
    /// consumer, i.e. the caller should delete the queue.
    pub fn remove_consumer(self: &Arc<Self>, consumer: &Arc<Consumer>) -> bool {
        let mut st = self.state.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
        if st.consumers.len() == before {
            return false;
        }
        // Credit freed up elsewhere may let the remaining consumers take more.
        if !st.consumers.is_empty() {
            self.dispatch_locked(&mut st);
        }
        self.sync_gauges(&st);
        self.config.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
    }

    pub fn has_consumers(&self) -> bool {
        !self.state.lock().consumers.is_empty()
    }

    /// Drops all ready messages; returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let n = st.ready.len();
        let positions: Vec<Position> = st.ready.iter().filter_map(|e| e.pos).collect();
        if let (Some(d), false) = (&self.durable, positions.is_empty()) {
            d.ack(&positions);
        }
        st.ready.clear();
        st.ready_bytes = 0;
        st.memory_bytes = 0;
        self.sync_gauges(&st);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Marks the queue deleted (its log is removed) and returns (ready message count,
    /// consumers to notify).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.state.lock();
        if st.deleted {
            return (0, Vec::new());
        }
        st.deleted = true;
        let n = u32::try_from(st.ready.len()).unwrap_or(u32::MAX);
        st.ready.clear();
        st.unacked.clear();
        st.ready_bytes = 0;
        st.memory_bytes = 0;
        if let Some(d) = &self.durable {
            d.destroy();
        }
        let consumers = std::mem::take(&mut st.consumers);
        for c in &consumers {
            c.cancel();
        }
        self.sync_gauges(&st);
        (n, consumers)
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    fn sync_gauges(&self, st: &QueueState) {
        self.stats
            .ready
            .store(st.ready.len() as u64, Ordering::Relaxed);
        self.stats
            .unacked
            .store(st.unacked.len() as u64, Ordering::Relaxed);
        self.stats
            .consumers
            .store(st.consumers.len() as u64, Ordering::Relaxed);
        self.stats
            .memory_bytes
            .store(st.memory_bytes, Ordering::Relaxed);
    }
}

impl QueueState {
    /// The consumer to get the next message: the highest priority group with credit, round
    /// robin within the group. Takes the credit.
    fn pick_consumer(&self) -> Option<usize> {
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

    fn push_ready(&mut self, e: Entry) {
        self.ready_bytes += e.size;
        if e.msg.is_some() {
            self.memory_bytes += e.size;
        }
        self.ready.push_back(e);
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        let e = self.ready.pop_front()?;
        self.ready_bytes -= e.size;
        if e.msg.is_some() {
            self.memory_bytes -= e.size;
        }
        Some(e)
    }

    /// Back at its original position (ready is ordered by seq).
    fn insert_ready(&mut self, e: Entry) {
        self.ready_bytes += e.size;
        if e.msg.is_some() {
            self.memory_bytes += e.size;
        }
        let at = self.ready.partition_point(|m| m.seq < e.seq);
        self.ready.insert(at, e);
    }

    /// Over the memory window, the newest persisted body is dropped from memory; the head of
    /// the queue (next to go out) stays in memory.
    fn page_out_tail(&mut self) {
        if self.memory_bytes <= MEMORY_WINDOW {
            return;
        }
        if let Some(last) = self.ready.back_mut() {
            if last.pos.is_some() && last.msg.is_some() {
                last.msg = None;
                self.memory_bytes -= last.size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{ChannelCredit, Outlet};
    use bytes::Bytes;

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
        Arc::new(Message {
            exchange: "".into(),
            routing_key: Bytes::from_static(b"q"),
            properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from_static(body.as_bytes()),
        })
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
            q.publish(msg("x"), false);
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
            q.publish(msg("x"), false);
        }
        assert_eq!(a.seqs(), vec![0, 2]);
        assert_eq!(b.seqs(), vec![1, 3]);
    }

    #[test]
    fn requeue_keeps_position_and_marks_redelivered() {
        let q = queue();
        for _ in 0..3 {
            q.publish(msg("x"), false);
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
            q.publish(msg("x"), false);
        }
        let _ = q.get(true);
        assert_eq!(q.purge(), 2);
        q.publish(msg("y"), false);
        assert_eq!(q.mark_deleted().0, 1);
    }
}
