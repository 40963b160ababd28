//! Consumers, their credit (prefetch) and the outlet through which a queue hands deliveries to
//! the connection that owns the consumer.

use crate::message::QueuedMessage;
use crate::queue::Queue;
use rill_codec::FieldTable;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// Deliveries a no-ack consumer may have buffered towards its socket before the queue stops
/// handing it more; keeps a slow no-ack consumer from pulling a whole backlog into memory.
pub const NO_ACK_BUFFER: u32 = 2048;

/// Events a connection receives from outside its own frame stream (queues, the broker).
#[derive(Debug)]
pub enum ConnEvent {
    /// A queue picked this connection's consumer for a message. The connection assigns the
    /// delivery tag when it writes the frame.
    Deliver(Delivery),
    /// The consumer's queue went away; tell the client (basic.cancel) if it wants to know.
    ConsumerCancelled { channel: u16, consumer_tag: String },
    /// The broker is stopping or an operator closed this connection.
    ForceClose { code: u16, text: String },
    /// Resource alarm state changed (connection.blocked / unblocked).
    Blocked(Option<String>),
    /// A group-commit round finished: confirms waiting for this epoch can go out.
    Synced(u64),
}

#[derive(Debug)]
pub struct Delivery {
    pub consumer: Arc<Consumer>,
    pub queue: Arc<Queue>,
    pub item: QueuedMessage,
}

impl Delivery {
    /// A delivery that can no longer be written: back to its queue at its old position, and
    /// the consumer's credit returned. Never call this while holding the queue's lock.
    pub fn bounce(self) {
        self.consumer.release(1);
        self.queue.return_undelivered(self.item);
    }
}

/// Where a connection receives its events. The server implements it with a channel into the
/// connection task; tests with a vector.
pub trait Outlet: Send + Sync + std::fmt::Debug {
    fn push(&self, event: ConnEvent);
}

/// Channel-wide flow state shared by all consumers of one channel: `basic.qos global=true`
/// prefetch and `channel.flow`.
#[derive(Debug, Default)]
pub struct ChannelCredit {
    prefetch: AtomicU32,
    in_flight: AtomicU32,
    paused: AtomicBool,
}

impl ChannelCredit {
    pub fn set_prefetch(&self, n: u32) {
        self.prefetch.store(n, Ordering::Relaxed);
    }
    /// Whether a channel-wide prefetch is in force (acks may then unblock any of its consumers).
    pub fn is_limited(&self) -> bool {
        self.prefetch.load(Ordering::Relaxed) != 0
    }
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
    fn try_acquire(&self) -> bool {
        if self.paused.load(Ordering::Relaxed) {
            return false;
        }
        let limit = self.prefetch.load(Ordering::Relaxed);
        if limit == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
    fn release(&self, n: u32) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
}

/// One `basic.consume` subscription.
#[derive(Debug)]
pub struct Consumer {
    pub tag: String,
    pub channel: u16,
    pub connection_id: u64,
    pub no_ack: bool,
    pub exclusive: bool,
    pub arguments: FieldTable,
    /// `x-priority`: queues offer messages to higher priorities first.
    pub priority: i64,
    /// Per-consumer prefetch (`basic.qos global=false` in force when it subscribed); 0 = none.
    prefetch: u32,
    in_flight: AtomicU32,
    channel_credit: Arc<ChannelCredit>,
    cancelled: AtomicBool,
    pub outlet: Arc<dyn Outlet>,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: String,
        channel: u16,
        connection_id: u64,
        no_ack: bool,
        exclusive: bool,
        arguments: FieldTable,
        prefetch: u32,
        channel_credit: Arc<ChannelCredit>,
        outlet: Arc<dyn Outlet>,
    ) -> Self {
        Consumer {
            tag,
            channel,
            connection_id,
            no_ack,
            exclusive,
            priority: rill_codec::table_get_i64(&arguments, "x-priority").unwrap_or(0),
            arguments,
            prefetch,
            in_flight: AtomicU32::new(0),
            channel_credit,
            cancelled: AtomicBool::new(false),
            outlet,
        }
    }

    /// Takes one unit of credit if the consumer may receive another message now.
    pub(crate) fn try_take(&self) -> bool {
        if self.is_cancelled() {
            return false;
        }
        if self.no_ack {
            // No-ack deliveries are bounded only by what is buffered towards the socket.
            return self
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < NO_ACK_BUFFER).then_some(n + 1)
                })
                .is_ok();
        }
        if self.prefetch != 0 && self.in_flight.load(Ordering::Relaxed) >= self.prefetch {
            return false;
        }
        if !self.channel_credit.try_acquire() {
            return false;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Returns credit for `n` settled (or, for no-ack, written) deliveries. Returns true if the
    /// consumer had been starved, so the caller should let its queue dispatch again.
    pub fn release(&self, n: u32) -> bool {
        let before = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        if self.no_ack {
            return before >= NO_ACK_BUFFER;
        }
        self.channel_credit.release(n);
        true
    }

    /// Deliveries taken and not yet settled (or, for no-ack, not yet written).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}
