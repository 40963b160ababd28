//! Queues: what every queue shares (name, arguments, counters, x-expires bookkeeping) and the
//! kinds that hold messages differently, one type each, as LavinMQ cuts `queue/` and
//! `stream/`:
//!
//! - [`classic`]: FIFO per priority, deliveries awaiting acks, consumers with prefetch, TTL,
//!   length limits, dead-lettering, single active consumer. Quorum queues are classic queues
//!   with a delivery limit on a single node.
//! - [`stream`]: an append-only log read from per-consumer offsets (`x-queue-type=stream`).
//!
//! [`Queue`] dispatches each operation to its [`QueueKind`] once, so neither kind's code ever
//! asks which kind it is.
//!
//! Each kind keeps its state behind one short mutex. Publishers, ackers and consumers'
//! connections each take it for the length of one enqueue, settle or dispatch pass, never
//! across an `.await` (the core has none), so no global lock sits on the publish path: two
//! queues never contend. Dispatch runs in whichever thread changed the queue (the publisher's
//! connection, the acker's, or a consumer whose credit came back), which saves a hop through a
//! queue task.

pub mod classic;
pub mod stream;

use crate::args::{QueueArgs, QueueType};
use crate::consumer::Consumer;
use crate::durable::{Durable, DurableKeys};
use crate::message::{Message, QueuedMessage};
use crate::vhost::VHost;
use classic::Classic;
use rill_codec::FieldTable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};
use stream::StreamQueue;

pub use rill_store::Position;
use rill_store::{KeyRecord, RecoveredRecord};

/// Ready messages above which a consumed queue asks its publishers to pause.
const FLOW_HIGH: u64 = 20_000;
/// ... and below which they resume.
const FLOW_LOW: u64 = 10_000;

/// Body bytes of ready persistent messages a durable queue keeps in memory; beyond this, bodies
/// live only on disk until delivered.
pub const MEMORY_WINDOW: u64 = 4 * 1024 * 1024;

/// Milliseconds since the Unix epoch: the clock for TTLs and x-expires.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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

/// How a queue holds its messages.
#[derive(Debug)]
pub enum QueueKind {
    Classic(Classic),
    Stream(StreamQueue),
}

#[derive(Debug)]
pub struct Queue {
    pub config: QueueConfig,
    args: QueueArgs,
    /// Where dead letters are routed.
    vhost: Weak<VHost>,
    /// For x-expires: when it was last used (declared, consumed from, got from), ms.
    last_used: AtomicU64,
    kind: QueueKind,
    stats: QueueCounters,
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
    /// Publishes dropped as duplicates (`x-message-deduplication`).
    pub deduplicated: AtomicU64,
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

impl PublishOutcome {
    /// Taken, nothing to wait for.
    pub const ACCEPTED: PublishOutcome = PublishOutcome {
        accepted: true,
        durable_at: None,
    };
    /// Refused: the publisher gets a nack.
    pub const REFUSED: PublishOutcome = PublishOutcome {
        accepted: false,
        durable_at: None,
    };
}

impl Queue {
    /// A queue whose messages live in memory only, with its arguments taken as given.
    pub fn new(config: QueueConfig) -> Arc<Queue> {
        let args = QueueArgs::parse(&config.arguments, &config.name, "/", true, false, false)
            .unwrap_or_default();
        Self::build(config, args, None, Weak::new())
    }

    /// A queue with validated arguments, an optional on-disk log for persistent messages, and
    /// the vhost its dead letters are routed in.
    pub fn build(
        config: QueueConfig,
        args: QueueArgs,
        durable: Option<Durable>,
        vhost: Weak<VHost>,
    ) -> Arc<Queue> {
        let kind = match args.queue_type {
            QueueType::Stream => QueueKind::Stream(StreamQueue::new(&args, durable)),
            QueueType::Classic | QueueType::Quorum => {
                QueueKind::Classic(Classic::new(&args, durable))
            }
        };
        Arc::new(Queue {
            config,
            kind,
            vhost,
            last_used: AtomicU64::new(now_ms()),
            stats: QueueCounters::default(),
            args,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    pub fn kind(&self) -> &QueueKind {
        &self.kind
    }

    pub fn counters(&self) -> &QueueCounters {
        &self.stats
    }

    pub(crate) fn vhost(&self) -> Option<Arc<VHost>> {
        self.vhost.upgrade()
    }

    pub fn is_persistent(&self) -> bool {
        match &self.kind {
            QueueKind::Classic(c) => c.is_persistent(),
            QueueKind::Stream(s) => s.is_persistent(),
        }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.kind, QueueKind::Stream(_))
    }

    /// Marks the queue used now (x-expires counts from the last use).
    pub fn touch(&self) {
        self.last_used.store(now_ms(), Ordering::Relaxed);
    }

    /// Publisher flow control for backlogs that cannot leave memory. A queue is a buffer:
    /// a durable queue pages persistent messages beyond [`MEMORY_WINDOW`] out to disk, so a
    /// slow consumer never holds its publishers back (as in RabbitMQ; only resource alarms
    /// block publishers). Transient messages have nowhere to go but memory, so while a
    /// consumed queue holds more than the window of them and its consumers cannot keep up,
    /// publishers into it pause reading their sockets, long before the memory alarm would
    /// block every publisher of the broker. A queue without consumers is buffering by design
    /// and never holds publishers back.
    pub fn wants_publishers_paused(&self) -> bool {
        // A stream's "ready" count is its whole log, which consumers never drain.
        !self.is_stream()
            && self.stats.consumers.load(Ordering::Relaxed) > 0
            && self.stats.ready.load(Ordering::Relaxed) > FLOW_HIGH
            && self.stats.memory_bytes.load(Ordering::Relaxed) > MEMORY_WINDOW
    }

    /// Publishers paused by this queue may resume.
    pub fn lets_publishers_resume(&self) -> bool {
        self.stats.consumers.load(Ordering::Relaxed) == 0
            || self.stats.ready.load(Ordering::Relaxed) < FLOW_LOW
            || self.stats.memory_bytes.load(Ordering::Relaxed) <= MEMORY_WINDOW / 2
            || self.is_deleted()
    }

    pub fn message_count(&self) -> u32 {
        let n = match &self.kind {
            QueueKind::Classic(c) => c.len(),
            QueueKind::Stream(s) => s.len(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub fn consumer_count(&self) -> u32 {
        let n = match &self.kind {
            QueueKind::Classic(c) => c.consumer_count(),
            QueueKind::Stream(s) => s.consumer_count(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// For a stream queue, the offset its next message will get.
    pub fn stream_next_offset(&self) -> Option<u64> {
        match &self.kind {
            QueueKind::Stream(s) => Some(s.next_offset()),
            QueueKind::Classic(_) => None,
        }
    }

    pub fn has_consumers(&self) -> bool {
        self.consumer_count() > 0
    }

    /// Appends a message and hands it to a consumer if one has credit. A persistent message in a
    /// durable queue is written to the queue's log first.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> PublishOutcome {
        match &self.kind {
            QueueKind::Classic(c) => c.publish(self, msg),
            QueueKind::Stream(s) => s.publish(self, msg),
        }
    }

    /// Publishes `msgs` in order, as [`Queue::publish`] each would, pushing their outcomes
    /// onto `out`; a classic queue takes them under one lock.
    pub fn publish_batch(
        self: &Arc<Self>,
        msgs: impl IntoIterator<Item = Arc<Message>>,
        out: &mut Vec<PublishOutcome>,
    ) {
        match &self.kind {
            QueueKind::Classic(c) => c.publish_batch(self, msgs, out),
            QueueKind::Stream(s) => out.extend(msgs.into_iter().map(|m| s.publish(self, m))),
        }
    }

    /// Messages recovered from the log at start-up, in log order, as an index: bodies are read
    /// back when delivered. Those delivered before the restart come back redelivered.
    pub fn restore(&self, records: impl IntoIterator<Item = RecoveredRecord>) -> usize {
        match &self.kind {
            QueueKind::Classic(c) => c.restore(self, records),
            QueueKind::Stream(s) => s.restore(self, records),
        }
    }

    /// The deduplication keys a durable queue kept on disk, and where to keep new ones (a
    /// queue declared with `x-message-deduplication` and disk persistence; streams have none).
    pub fn restore_keys(&self, keys: DurableKeys, recovered: Vec<KeyRecord>) {
        match &self.kind {
            QueueKind::Classic(c) => c.restore_keys(self, keys, recovered),
            QueueKind::Stream(_) => {}
        }
    }

    /// Lets consumers with fresh credit take waiting messages.
    pub fn dispatch(self: &Arc<Self>) {
        match &self.kind {
            QueueKind::Classic(c) => c.dispatch(self),
            QueueKind::Stream(s) => s.dispatch(self),
        }
    }

    /// basic.get: takes the head message. With `ack` it stays unacked until settled.
    /// Returns the message and the number of messages left ready; None when empty (and
    /// always for a stream, which serves consumers only: the channel refuses basic.get on
    /// streams before asking).
    pub fn get(self: &Arc<Self>, ack: bool) -> Option<(QueuedMessage, u32)> {
        self.touch();
        match &self.kind {
            QueueKind::Classic(c) => c.get(self, ack),
            QueueKind::Stream(_) => None,
        }
    }

    /// Forgets acknowledged messages, then lets consumers use the credit that freed. On a
    /// stream, acks are flow control only.
    pub fn ack(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        match &self.kind {
            QueueKind::Classic(c) => c.settle(self, seqs, None),
            QueueKind::Stream(s) => s.settle(self, seqs),
        }
    }

    /// Rejected without requeue: gone, dead-lettered if the queue has a dead-letter exchange.
    pub fn discard(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        match &self.kind {
            QueueKind::Classic(c) => {
                c.settle(self, seqs, Some(crate::deadletter::Reason::Rejected))
            }
            QueueKind::Stream(s) => s.settle(self, seqs),
        }
    }

    /// Puts delivered messages back at their original positions, marked redelivered, and
    /// dispatches them again. Past x-delivery-limit a message is dead-lettered instead.
    pub fn requeue(self: &Arc<Self>, seqs: impl IntoIterator<Item = u64>) {
        match &self.kind {
            QueueKind::Classic(c) => c.requeue(self, seqs),
            // Nothing left a stream, so nothing goes back; the credit does.
            QueueKind::Stream(s) => s.dispatch(self),
        }
    }

    /// A delivery that never reached the client (its consumer was cancelled before the frame
    /// was written): back to its place, with its redelivered flag unchanged.
    pub fn return_undelivered(self: &Arc<Self>, item: QueuedMessage) {
        match &self.kind {
            QueueKind::Classic(c) => c.return_undelivered(self, item),
            QueueKind::Stream(s) => s.dispatch(self),
        }
    }

    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> Result<(), ConsumeError> {
        self.touch();
        match &self.kind {
            QueueKind::Classic(c) => c.add_consumer(self, consumer),
            QueueKind::Stream(s) => s.add_consumer(self, consumer),
        }
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was its last
    /// consumer, i.e. the caller should delete the queue.
    pub fn remove_consumer(self: &Arc<Self>, consumer: &Arc<Consumer>) -> bool {
        self.touch();
        match &self.kind {
            QueueKind::Classic(c) => c.remove_consumer(self, consumer),
            QueueKind::Stream(s) => {
                // Streams are never auto-delete.
                s.remove_consumer(self, consumer);
                false
            }
        }
    }

    /// Drops all ready messages; returns how many. A stream is never purged.
    pub fn purge(&self) -> u32 {
        match &self.kind {
            QueueKind::Classic(c) => c.purge(self),
            QueueKind::Stream(_) => 0,
        }
    }

    /// Marks the queue deleted (its log is removed) and returns (ready message count,
    /// consumers to notify).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        match &self.kind {
            QueueKind::Classic(c) => c.mark_deleted(self),
            QueueKind::Stream(s) => s.mark_deleted(self),
        }
    }

    pub fn is_deleted(&self) -> bool {
        match &self.kind {
            QueueKind::Classic(c) => c.is_deleted(),
            QueueKind::Stream(s) => s.is_deleted(),
        }
    }

    /// Periodic work: expiring messages and, with x-expires, the queue itself. Returns true
    /// when the queue has expired and should be deleted.
    pub fn tick(self: &Arc<Self>, now: u64) -> bool {
        if let QueueKind::Classic(c) = &self.kind {
            c.expire(self, now);
        }
        match self.args.expires {
            Some(ttl) => {
                self.stats.consumers.load(Ordering::Relaxed) == 0
                    && now.saturating_sub(self.last_used.load(Ordering::Relaxed)) >= ttl
            }
            None => false,
        }
    }

    /// Whether [`Queue::tick`] has anything to do for this queue.
    pub fn needs_tick(&self) -> bool {
        self.args.expires.is_some()
            || matches!(&self.kind, QueueKind::Classic(c) if c.has_expiring(self))
    }
}
