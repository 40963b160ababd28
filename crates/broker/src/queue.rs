//! A queue: its messages in FIFO order, the deliveries awaiting acknowledgement, and its
//! consumers.
//!
//! Each queue owns its state behind one short mutex. Publishers, ackers and consumers'
//! connections each take it for the length of one enqueue, settle or dispatch pass, never across
//! an `.await` (the core has none), so no global lock sits on the publish path: two queues never
//! contend. Dispatch runs in whichever thread changed the queue (the publisher's connection, the
//! acker's, or a consumer whose credit came back), which saves a hop through a queue task.

use crate::consumer::{ConnEvent, Consumer, Delivery};
use crate::message::{Message, QueuedMessage};
use parking_lot::Mutex;
use rill_codec::FieldTable;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Ready messages above which a consumed queue asks its publishers to pause.
const FLOW_HIGH: u64 = 20_000;
/// ... and below which they resume.
const FLOW_LOW: u64 = 10_000;

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
}

#[derive(Debug, Default)]
struct QueueState {
    /// Ordered by `seq`.
    ready: VecDeque<QueuedMessage>,
    /// Body bytes of `ready`, for `x-max-length-bytes`.
    ready_bytes: u64,
    unacked: HashMap<u64, QueuedMessage>,
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

impl Queue {
    pub fn new(config: QueueConfig) -> Arc<Queue> {
        Arc::new(Queue {
            limits: Limits::from_args(&config.arguments),
            config,
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

    /// Appends a message and hands it to a consumer if one has credit. Returns false when the
    /// queue refused it (full, with `x-overflow=reject-publish`): the publisher gets a nack.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> bool {
        let mut st = self.state.lock();
        if st.deleted {
            return true;
        }
        let size = msg.size() as u64;
        if self.limits.overflow != Overflow::DropHead
            && self
                .limits
                .exceeded(st.ready.len() + 1, st.ready_bytes + size)
        {
            return false;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.push_ready(QueuedMessage {
            seq,
            msg,
            redelivered: false,
        });
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        if !st.consumers.is_empty() {
            self.dispatch_locked(&mut st);
        }
        while self.limits.exceeded(st.ready.len(), st.ready_bytes) {
            if st.pop_ready().is_none() {
                break;
            }
        }
        self.sync_gauges(&st);
        true
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
            let Some(item) = st.pop_ready() else {
                break;
            };
            let consumer = Arc::clone(&st.consumers[idx]);
            if !consumer.no_ack {
                st.unacked.insert(item.seq, item.clone());
            }
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            let outlet = Arc::clone(&consumer.outlet);
            outlet.push(ConnEvent::Deliver(Delivery {
                consumer,
                queue: Arc::clone(self),
                item,
            }));
        }
    }

    /// basic.get: takes the head message. With `ack` it stays unacked until settled.
    /// Returns the message and the number of messages left ready.
    pub fn get(&self, ack: bool) -> Option<(QueuedMessage, u32)> {
        let mut st = self.state.lock();
        let item = st.pop_ready()?;
        if ack {
            st.unacked.insert(item.seq, item.clone());
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        let left = u32::try_from(st.ready.len()).unwrap_or(u32::MAX);
        self.sync_gauges(&st);
        Some((item, left))
    }

    /// Forgets acknowledged messages, then lets consumers use the credit that freed.
    pub fn ack(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        let mut st = self.state.lock();
        let mut n = 0;
        for seq in seqs {
            if st.unacked.remove(&seq).is_some() {
                n += 1;
            }
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
            if let Some(mut item) = st.unacked.remove(&seq) {
                item.redelivered = true;
                st.insert_ready(item);
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
        st.insert_ready(item);
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
        st.ready.clear();
        st.ready_bytes = 0;
        self.sync_gauges(&st);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Marks the queue deleted and returns (ready message count, consumers to notify).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.state.lock();
        st.deleted = true;
        let n = u32::try_from(st.ready.len()).unwrap_or(u32::MAX);
        st.ready.clear();
        st.unacked.clear();
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

    fn push_ready(&mut self, item: QueuedMessage) {
        self.ready_bytes += item.msg.size() as u64;
        self.ready.push_back(item);
    }

    fn pop_ready(&mut self) -> Option<QueuedMessage> {
        let item = self.ready.pop_front()?;
        self.ready_bytes -= item.msg.size() as u64;
        Some(item)
    }

    /// Back at its original position (ready is ordered by seq).
    fn insert_ready(&mut self, item: QueuedMessage) {
        self.ready_bytes += item.msg.size() as u64;
        let pos = self.ready.partition_point(|m| m.seq < item.seq);
        self.ready.insert(pos, item);
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
