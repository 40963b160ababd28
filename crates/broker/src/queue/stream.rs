//! Stream queues (`x-queue-type=stream`): an append-only log that consumers read from offsets of
//! their choosing, as RabbitMQ 3.10 serves streams over AMQP 0-9-1.
//!
//! - Every message gets an offset when it is appended; consuming never removes it. Each consumer
//!   has its own cursor, placed by its `x-stream-offset` argument ([`OffsetSpec`]: `first`,
//!   `last`, `next` (the default), a number, or a timestamp) and advanced as it is served.
//! - Deliveries carry the `x-stream-offset` header. It is stamped into the properties once at
//!   publish (and so is also in the on-disk record, which is how offsets survive a restart).
//! - Acks, nacks and requeues are flow control only: they return the consumer's credit, which is
//!   why a consumer must have a prefetch (checked by the channel, with RabbitMQ's errors).
//! - The log is cut into logical segments of `x-stream-max-segment-size-bytes`. When a segment
//!   rolls over, retention (`x-max-length-bytes`, `x-max-age`) drops whole old segments, and
//!   the roll uses up one offset, as in RabbitMQ (offsets are dense only within a segment).
//! - A chunk (RabbitMQ's unit of writing, where `last` starts) is one publish here.
//!
//! The log ([`StreamLog`]) is pure bookkeeping with no I/O, so offset rules are unit-tested here.
//! A durable stream writes every message to its queue's `rill-store` log; only the newest
//! [`crate::queue::MEMORY_WINDOW`] bytes keep their bodies in memory, older ones are read back
//! when a consumer reaches them. Messages dropped by retention are acked in the store, which
//! deletes its segment files once they are fully acked.

use super::{now_ms, ConsumeError, PublishOutcome, Queue, MEMORY_WINDOW};
use crate::args::QueueArgs;
use crate::consumer::{ConnEvent, Consumer, Delivery};
use crate::durable::{Durable, ReadAhead};
use crate::message::{Message, QueuedMessage};
use parking_lot::Mutex;
use rill_codec::{AMQPValue, FieldTable, PropertiesView};
use rill_store::{Position, RecoveredRecord};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// RabbitMQ's default `x-stream-max-segment-size-bytes`.
const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;

/// The header every stream delivery carries.
pub const OFFSET_HEADER: &str = "x-stream-offset";

/// Where a new consumer starts reading (`x-stream-offset` consume argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The oldest message still retained.
    First,
    /// The start of the last chunk.
    Last,
    /// Only messages published from now on (the default).
    Next,
    /// This offset: clamped to `First` when below it; beyond the end it waits for the log.
    Offset(i64),
    /// The first chunk written at or after this time (ms since the epoch).
    Timestamp(u64),
}

impl OffsetSpec {
    /// Reads a consumer's `x-stream-offset` argument; absent or unrecognised means `next`.
    ///
    /// ```
    /// use rill_broker::queue::stream::OffsetSpec;
    /// use rill_codec::{field_table_insert, AMQPValue, FieldTable};
    /// let mut args = FieldTable::default();
    /// field_table_insert(&mut args, "x-stream-offset", AMQPValue::LongInt(7));
    /// assert_eq!(OffsetSpec::from_arguments(&args), OffsetSpec::Offset(7));
    /// assert_eq!(OffsetSpec::from_arguments(&FieldTable::default()), OffsetSpec::Next);
    /// ```
    pub fn from_arguments(args: &FieldTable) -> OffsetSpec {
        match args.inner().get(OFFSET_HEADER) {
            None => OffsetSpec::Next,
            // AMQP timestamps are whole seconds.
            Some(AMQPValue::Timestamp(secs)) => OffsetSpec::Timestamp(secs.saturating_mul(1000)),
            Some(v) => match rill_codec::value_as_bytes(v) {
                Some(b"first") => OffsetSpec::First,
                Some(b"last") => OffsetSpec::Last,
                Some(_) => OffsetSpec::Next,
                None => rill_codec::value_as_i64(v).map_or(OffsetSpec::Next, OffsetSpec::Offset),
            },
        }
    }
}

/// Retention settings, from the queue's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_bytes: Option<u64>,
    pub max_age_ms: Option<u64>,
    pub segment_bytes: u64,
}

impl Retention {
    pub fn from_args(args: &QueueArgs) -> Retention {
        Retention {
            max_bytes: args.max_bytes,
            max_age_ms: args.max_age_ms,
            segment_bytes: args
                .stream_segment_bytes
                .filter(|&b| b > 0)
                .unwrap_or(DEFAULT_SEGMENT_BYTES),
        }
    }
}

/// One message in the log.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub offset: u64,
    pub timestamp_ms: u64,
    /// Bytes it counts for in segments and `x-max-length-bytes`.
    pub size: u64,
    /// The stamped message; None while its body lives only on disk.
    pub msg: Option<Arc<Message>>,
    pub pos: Option<Position>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Entries in it (they are contiguous in [`StreamLog::entries`]).
    len: usize,
    bytes: u64,
    newest_ms: u64,
}

/// The offsets, segments and retention of one stream, without I/O.
#[derive(Debug)]
pub struct StreamLog {
    retention: Retention,
    /// Ordered by offset.
    entries: VecDeque<StreamEntry>,
    /// Oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    next_offset: u64,
    /// Body bytes of entries whose message is in memory.
    memory_bytes: u64,
    /// Entries below this offset have been paged out (if they could be).
    resident_from: u64,
    /// Entries ever dropped from the front: `entries[i]` is entry number `dropped + i` of
    /// the log's life. Readers remember these absolute numbers as hints, because a binary
    /// search over millions of entries per delivery costs more than the delivery.
    dropped: u64,
    /// Absolute number of the entry at `resident_from` (a hint).
    resident_hint: u64,
}

impl StreamLog {
    pub fn new(retention: Retention) -> StreamLog {
        StreamLog {
            retention,
            entries: VecDeque::new(),
            segments: VecDeque::new(),
            next_offset: 0,
            memory_bytes: 0,
            resident_from: 0,
            dropped: 0,
            resident_hint: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The offset the next message will get (unless a segment rolls first).
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Whether appending at `now_ms` rolls the current segment over first: it is full, or
    /// (with `x-max-age`) everything in it has expired.
    fn should_roll(&self, now_ms: u64) -> bool {
        self.segments.back().is_some_and(|s| {
            s.len > 0
                && (s.bytes >= self.retention.segment_bytes
                    || self
                        .retention
                        .max_age_ms
                        .is_some_and(|age| s.newest_ms.saturating_add(age) < now_ms))
        })
    }

    /// The offset the next append will get, rolling the segment over if it is due; returns the
    /// entries retention dropped.
    pub fn prepare_append(&mut self, now_ms: u64) -> (u64, Vec<StreamEntry>) {
        let mut dropped = Vec::new();
        if self.should_roll(now_ms) {
            // A roll uses up an offset, as in RabbitMQ.
            self.next_offset += 1;
            self.segments.push_back(Segment {
                len: 0,
                bytes: 0,
                newest_ms: now_ms,
            });
            self.apply_retention(now_ms, &mut dropped);
        }
        (self.next_offset, dropped)
    }

    /// Appends an entry at [`StreamLog::prepare_append`]'s offset (or a recovered one at or
    /// past it).
    pub fn push(&mut self, entry: StreamEntry) {
        // A recovered entry past the next offset follows a roll (rolls use up an offset), so
        // segments come back as they were.
        let rolled =
            entry.offset > self.next_offset && self.segments.back().is_some_and(|s| s.len > 0);
        if self.segments.is_empty() || rolled {
            self.segments.push_back(Segment {
                len: 0,
                bytes: 0,
                newest_ms: entry.timestamp_ms,
            });
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.len += 1;
            seg.bytes += entry.size;
            seg.newest_ms = seg.newest_ms.max(entry.timestamp_ms);
        }
        if entry.msg.is_some() {
            self.memory_bytes += entry.size;
        }
        self.next_offset = self.next_offset.max(entry.offset + 1);
        self.entries.push_back(entry);
    }

    /// Appends a message and returns its offset and what retention dropped.
    pub fn append(
        &mut self,
        msg: Option<Arc<Message>>,
        pos: Option<Position>,
        size: u64,
        now_ms: u64,
    ) -> (u64, Vec<StreamEntry>) {
        let (offset, dropped) = self.prepare_append(now_ms);
        self.push(StreamEntry {
            offset,
            timestamp_ms: now_ms,
            size,
            msg,
            pos,
        });
        (offset, dropped)
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Drops whole old segments (never the one being written) while over the limits.
    fn apply_retention(&mut self, now_ms: u64, dropped: &mut Vec<StreamEntry>) {
        let mut total = self.total_bytes();
        while self.segments.len() > 1 {
            let oldest = self.segments[0];
            let too_big = self.retention.max_bytes.is_some_and(|m| total > m);
            let too_old = self
                .retention
                .max_age_ms
                .is_some_and(|age| oldest.newest_ms.saturating_add(age) < now_ms);
            if !too_big && !too_old {
                break;
            }
            self.segments.pop_front();
            total -= oldest.bytes;
            self.dropped += oldest.len as u64;
            for e in self.entries.drain(..oldest.len) {
                if e.msg.is_some() {
                    self.memory_bytes -= e.size;
                }
                dropped.push(e);
            }
        }
    }

    /// Where a consumer with `spec` starts.
    pub fn resolve(&self, spec: OffsetSpec) -> u64 {
        let first = self.entries.front().map_or(self.next_offset, |e| e.offset);
        match spec {
            OffsetSpec::First => first,
            // A chunk is one publish: the last chunk starts at the last message.
            OffsetSpec::Last => self.entries.back().map_or(self.next_offset, |e| e.offset),
            OffsetSpec::Next => self.next_offset,
            OffsetSpec::Offset(n) => u64::try_from(n).map_or(first, |n| n.max(first)),
            OffsetSpec::Timestamp(ms) => self
                .entries
                .iter()
                .find(|e| e.timestamp_ms >= ms)
                .map_or(self.next_offset, |e| e.offset),
        }
    }

    /// The first entry at or after `offset`.
    pub fn at_or_after(&self, offset: u64) -> Option<&StreamEntry> {
        self.entries.get(self.index_at_or_after(offset, None))
    }

    /// Index in `entries` of the first entry at or after `offset`; `hint` is the absolute
    /// number (see `dropped`) where it probably is, checked before any search.
    fn index_at_or_after(&self, offset: u64, hint: Option<u64>) -> usize {
        let fits = |i: usize| {
            self.entries.get(i).is_none_or(|e| e.offset >= offset)
                && i.checked_sub(1)
                    .and_then(|before| self.entries.get(before))
                    .is_none_or(|e| e.offset < offset)
        };
        hint.and_then(|h| h.checked_sub(self.dropped))
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i <= self.entries.len() && fits(i))
            .unwrap_or_else(|| self.entries.partition_point(|e| e.offset < offset))
    }

    /// Over `window` bytes of bodies in memory, the oldest bodies that are also on disk are
    /// dropped from memory (consumers mostly read near the tail).
    fn page_out(&mut self, window: u64) {
        if self.memory_bytes <= window {
            return;
        }
        let mut idx = self.index_at_or_after(self.resident_from, Some(self.resident_hint));
        while self.memory_bytes > window {
            let Some(e) = self.entries.get_mut(idx) else {
                break;
            };
            if e.pos.is_none() {
                // Not on disk (a broker without a data directory): it has to stay.
                break;
            }
            if e.msg.take().is_some() {
                self.memory_bytes -= e.size;
            }
            self.resident_from = e.offset + 1;
            idx += 1;
        }
        self.resident_hint = self.dropped + idx as u64;
    }
}

/// A consumer and the offset it reads next.
#[derive(Debug)]
struct Cursor {
    consumer: Arc<Consumer>,
    next: u64,
    /// Absolute number of the entry at `next` (see `StreamLog::dropped`), a search hint.
    hint: Option<u64>,
    /// A consumer behind the memory window reads runs of records from disk.
    read_ahead: ReadAhead,
}

impl Cursor {
    fn new(consumer: Arc<Consumer>, next: u64) -> Cursor {
        Cursor {
            consumer,
            next,
            hint: None,
            read_ahead: ReadAhead::default(),
        }
    }
}

#[derive(Debug)]
struct StreamState {
    log: StreamLog,
    cursors: Vec<Cursor>,
    deleted: bool,
}

/// A stream queue's log and consumers. Its lock is taken for one append, dispatch pass or
/// consumer change, like a classic queue's (see [`crate::queue`]); lock order is stream, then
/// the store.
#[derive(Debug)]
pub struct StreamQueue {
    durable: Option<Durable>,
    state: Mutex<StreamState>,
}

/// Bytes a message counts for in segments: roughly its size on disk.
fn entry_size(msg: &Message) -> u64 {
    (msg.body.len() + msg.properties.len() + msg.exchange.len() + msg.routing_key.len() + 32) as u64
}

/// The `x-stream-offset` stamped into stored properties.
fn stamped_offset(properties: &[u8]) -> Option<u64> {
    let headers = PropertiesView::new(properties).ok()?.headers().ok()??;
    let v = headers.inner().get(OFFSET_HEADER)?;
    u64::try_from(rill_codec::value_as_i64(v)?).ok()
}

impl StreamQueue {
    pub(super) fn new(args: &QueueArgs, durable: Option<Durable>) -> StreamQueue {
        StreamQueue {
            durable,
            state: Mutex::new(StreamState {
                log: StreamLog::new(Retention::from_args(args)),
                cursors: Vec::new(),
                deleted: false,
            }),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.state.lock().log.len()
    }

    pub(super) fn is_persistent(&self) -> bool {
        self.durable.is_some()
    }

    pub(super) fn next_offset(&self) -> u64 {
        self.state.lock().log.next_offset()
    }

    pub(super) fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Acks, nacks and rejects are flow control: the credit is back, read on.
    pub(super) fn settle(&self, queue: &Arc<Queue>, seqs: impl IntoIterator<Item = u64>) {
        let n = seqs.into_iter().count() as u64;
        queue.counters().acked.fetch_add(n, Ordering::Relaxed);
        self.dispatch(queue);
    }

    pub(super) fn consumer_count(&self) -> usize {
        self.state.lock().cursors.len()
    }

    /// Appends a message (to disk too when durable, whatever its delivery mode: a stream is a
    /// log) and serves consumers waiting at the tail.
    pub(super) fn publish(&self, queue: &Arc<Queue>, msg: Arc<Message>) -> PublishOutcome {
        let mut st = self.state.lock();
        if st.deleted {
            return PublishOutcome {
                accepted: true,
                durable_at: None,
            };
        }
        let now = now_ms();
        let (offset, dropped) = st.log.prepare_append(now);
        self.forget(&dropped);
        let stamped = match msg.with_header_long(OFFSET_HEADER, offset as i64) {
            Some(m) => Arc::new(m),
            None => msg,
        };
        let mut pos = None;
        let mut durable_at = None;
        if let Some(d) = &self.durable {
            match d.append(&stamped) {
                Ok((p, epoch)) => {
                    pos = Some(p);
                    durable_at = Some(epoch);
                }
                Err(e) => {
                    tracing::error!(queue = %queue.name(), error = %e, "cannot write stream message; refusing it");
                    return PublishOutcome {
                        accepted: false,
                        durable_at: None,
                    };
                }
            }
        }
        let size = entry_size(&stamped);
        st.log.push(StreamEntry {
            offset,
            timestamp_ms: now,
            size,
            msg: Some(stamped),
            pos,
        });
        queue.counters().published.fetch_add(1, Ordering::Relaxed);
        self.dispatch_locked(&mut st, queue);
        st.log.page_out(MEMORY_WINDOW);
        self.sync_gauges(&st, queue);
        PublishOutcome {
            accepted: true,
            durable_at,
        }
    }

    /// Rebuilds the index from the log at start-up. Offsets come from the stamped header of
    /// each record (read back once); records without one follow the previous offset.
    pub(super) fn restore(
        &self,
        queue: &Queue,
        records: impl IntoIterator<Item = RecoveredRecord>,
    ) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        let mut reader = ReadAhead::default();
        for r in records {
            let offset = self
                .durable
                .as_ref()
                .and_then(|d| reader.read(d, r.position).ok())
                .and_then(|m| stamped_offset(&m.properties))
                .filter(|&o| o >= st.log.next_offset())
                .unwrap_or_else(|| st.log.next_offset());
            st.log.push(StreamEntry {
                offset,
                timestamp_ms: r.timestamp_ms,
                size: u64::from(r.encoded_len),
                msg: None,
                pos: Some(r.position),
            });
            n += 1;
        }
        st.log.resident_from = st.log.next_offset();
        self.sync_gauges(&st, queue);
        n
    }

    /// Settles retention-dropped entries in the store, so it can delete their files.
    fn forget(&self, dropped: &[StreamEntry]) {
        if let Some(d) = &self.durable {
            let positions: Vec<Position> = dropped.iter().filter_map(|e| e.pos).collect();
            if !positions.is_empty() {
                d.ack(&positions);
            }
        }
    }

    pub(super) fn add_consumer(
        &self,
        queue: &Arc<Queue>,
        consumer: Arc<Consumer>,
    ) -> Result<(), ConsumeError> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(ConsumeError::Deleted);
        }
        let next = st
            .log
            .resolve(OffsetSpec::from_arguments(&consumer.arguments));
        st.cursors.push(Cursor::new(consumer, next));
        self.dispatch_locked(&mut st, queue);
        self.sync_gauges(&st, queue);
        Ok(())
    }

    /// Returns whether it was a consumer of this stream.
    pub(super) fn remove_consumer(&self, queue: &Queue, consumer: &Arc<Consumer>) -> bool {
        let mut st = self.state.lock();
        let before = st.cursors.len();
        st.cursors.retain(|c| !Arc::ptr_eq(&c.consumer, consumer));
        self.sync_gauges(&st, queue);
        st.cursors.len() != before
    }

    /// Lets consumers with credit read on.
    pub(super) fn dispatch(&self, queue: &Arc<Queue>) {
        let mut st = self.state.lock();
        if !st.cursors.is_empty() {
            self.dispatch_locked(&mut st, queue);
        }
    }

    fn dispatch_locked(&self, st: &mut StreamState, queue: &Arc<Queue>) {
        let StreamState { log, cursors, .. } = st;
        for cursor in cursors.iter_mut() {
            loop {
                let idx = log.index_at_or_after(cursor.next, cursor.hint);
                cursor.hint = Some(log.dropped + idx as u64);
                let Some(entry) = log.entries.get(idx) else {
                    break;
                };
                if !cursor.consumer.try_take() {
                    break;
                }
                cursor.next = entry.offset + 1;
                cursor.hint = Some(log.dropped + idx as u64 + 1);
                let msg = match (&entry.msg, &self.durable, entry.pos) {
                    (Some(m), _, _) => m.clone(),
                    (None, Some(d), Some(pos)) => match cursor.read_ahead.read(d, pos) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::error!(queue = %queue.name(), offset = entry.offset, error = %e, "cannot read stream message back; skipping it");
                            cursor.consumer.release(1);
                            continue;
                        }
                    },
                    (None, _, _) => {
                        cursor.consumer.release(1);
                        continue;
                    }
                };
                queue.counters().delivered.fetch_add(1, Ordering::Relaxed);
                let consumer = Arc::clone(&cursor.consumer);
                let outlet = Arc::clone(&consumer.outlet);
                outlet.push(ConnEvent::Deliver(Delivery {
                    consumer,
                    queue: Arc::clone(queue),
                    // Nothing is held for the delivery: its settlement only returns credit.
                    item: QueuedMessage {
                        seq: entry.offset,
                        msg,
                        redelivered: false,
                        pos: None,
                    },
                }));
            }
        }
    }

    /// The queue is being deleted: its consumers are cancelled and its files removed.
    pub(super) fn mark_deleted(&self, queue: &Queue) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.state.lock();
        if st.deleted {
            return (0, Vec::new());
        }
        st.deleted = true;
        let n = u32::try_from(st.log.len()).unwrap_or(u32::MAX);
        st.log = StreamLog::new(st.log.retention);
        if let Some(d) = &self.durable {
            d.destroy();
        }
        let consumers: Vec<Arc<Consumer>> = st.cursors.drain(..).map(|c| c.consumer).collect();
        for c in &consumers {
            c.cancel();
        }
        self.sync_gauges(&st, queue);
        (n, consumers)
    }

    fn sync_gauges(&self, st: &StreamState, queue: &Queue) {
        let stats = queue.counters();
        stats.ready.store(st.log.len() as u64, Ordering::Relaxed);
        stats
            .consumers
            .store(st.cursors.len() as u64, Ordering::Relaxed);
        stats
            .memory_bytes
            .store(st.log.memory_bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(max_bytes: Option<u64>, max_age_ms: Option<u64>, segment_bytes: u64) -> StreamLog {
        StreamLog::new(Retention {
            max_bytes,
            max_age_ms,
            segment_bytes,
        })
    }

    fn offsets(l: &StreamLog) -> Vec<u64> {
        l.entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn offsets_first_last_next_numeric() {
        let mut l = log(None, None, 1 << 30);
        assert_eq!(l.resolve(OffsetSpec::First), 0);
        assert_eq!(l.resolve(OffsetSpec::Last), 0);
        for t in 0..5 {
            l.append(None, None, 10, t);
        }
        assert_eq!(offsets(&l), vec![0, 1, 2, 3, 4]);
        assert_eq!(l.resolve(OffsetSpec::First), 0);
        assert_eq!(l.resolve(OffsetSpec::Last), 4);
        assert_eq!(l.resolve(OffsetSpec::Next), 5);
        assert_eq!(l.resolve(OffsetSpec::Offset(2)), 2);
        assert_eq!(l.resolve(OffsetSpec::Offset(-1)), 0);
        // Beyond the end: the cursor waits there, skipping what comes before it.
        assert_eq!(l.resolve(OffsetSpec::Offset(9)), 9);
        assert!(l.at_or_after(9).is_none());
        assert_eq!(l.at_or_after(3).map(|e| e.offset), Some(3));
    }

    #[test]
    fn hinted_lookup_matches_a_search_whatever_the_hint() {
        // Rolls leave offset gaps and retention drops entries, so hints go stale.
        let mut l = log(Some(200), None, 30);
        for t in 0..100 {
            l.append(None, None, 10, t);
        }
        assert!(l.dropped > 0);
        for offset in 0..l.next_offset() + 2 {
            let searched = l.entries.partition_point(|e| e.offset < offset);
            for hint in [
                None,
                Some(0),
                Some(l.dropped),
                Some(l.dropped + searched as u64),
            ]
            .into_iter()
            .chain((0..l.dropped + l.entries.len() as u64 + 2).map(Some))
            {
                assert_eq!(
                    l.index_at_or_after(offset, hint),
                    searched,
                    "{offset} {hint:?}"
                );
            }
        }
    }

    #[test]
    fn timestamp_starts_at_first_message_at_or_after() {
        let mut l = log(None, None, 1 << 30);
        for t in [1000, 1500, 3000, 3000, 4000] {
            l.append(None, None, 10, t);
        }
        assert_eq!(l.resolve(OffsetSpec::Timestamp(0)), 0);
        assert_eq!(l.resolve(OffsetSpec::Timestamp(2000)), 2);
        assert_eq!(l.resolve(OffsetSpec::Timestamp(3000)), 2);
        assert_eq!(l.resolve(OffsetSpec::Timestamp(9000)), 5);
    }

    #[test]
    fn rolling_uses_an_offset_and_retention_drops_whole_segments() {
        // Segments hold 3 entries of 10 bytes; keep at most 50 bytes.
        let mut l = log(Some(50), None, 30);
        let mut dropped = Vec::new();
        for t in 0..12 {
            dropped.extend(l.append(None, None, 10, t).1);
        }
        // Segments: [0,1,2] [4,5,6] [8,9,10] [12,13,14]: each roll skips one offset.
        assert_eq!(l.next_offset(), 15);
        let kept = offsets(&l);
        assert_eq!(kept.last(), Some(&14));
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert!(l.total_bytes() <= 50 + 30, "{kept:?}");
        assert_eq!(dropped.len() + kept.len(), 12);
        assert_eq!(l.resolve(OffsetSpec::First), kept[0]);
        assert!(kept[0] > 0);
    }

    #[test]
    fn recovered_offsets_rebuild_segments() {
        let mut l = log(Some(50), None, 30);
        for t in 0..12 {
            l.append(None, None, 10, t);
        }
        let mut again = log(Some(50), None, 30);
        for e in &l.entries {
            again.push(e.clone());
        }
        assert_eq!(offsets(&again), offsets(&l));
        assert_eq!(again.next_offset(), l.next_offset());
        assert_eq!(again.segments.len(), l.segments.len());
        // The next roll applies retention to the rebuilt segments as before.
        for t in 12..15 {
            l.append(None, None, 10, t);
            again.append(None, None, 10, t);
        }
        assert_eq!(offsets(&again), offsets(&l));
    }

    #[test]
    fn max_age_rolls_an_expired_segment_and_drops_it() {
        let mut l = log(None, Some(1000), 1 << 30);
        for t in 0..3 {
            l.append(None, None, 10, t);
        }
        let (offset, dropped) = l.append(None, None, 10, 5000);
        assert_eq!(dropped.len(), 3);
        assert_eq!(offset, 4);
        assert_eq!(offsets(&l), vec![4]);
        assert_eq!(l.resolve(OffsetSpec::First), 4);
    }

    /// The queue-level path: offsets from consume arguments, the header on each delivery,
    /// credit returned by acks and requeues, nothing removed or reinserted.
    #[test]
    fn stream_queue_serves_cursors_with_credit() {
        use crate::consumer::{ChannelCredit, Outlet};
        use crate::queue::QueueConfig;
        use bytes::Bytes;
        use rill_codec::{field_table_insert, LongString};

        #[derive(Debug, Default)]
        struct Sink(Mutex<Vec<QueuedMessage>>);
        impl Outlet for Sink {
            fn push(&self, event: ConnEvent) {
                if let ConnEvent::Deliver(d) = event {
                    self.0.lock().push(d.item);
                }
            }
        }
        impl Sink {
            fn offsets(&self) -> Vec<u64> {
                self.0
                    .lock()
                    .iter()
                    .map(|i| stamped_offset(&i.msg.properties).unwrap_or(u64::MAX))
                    .collect()
            }
        }
        let mut arguments = FieldTable::default();
        field_table_insert(
            &mut arguments,
            "x-queue-type",
            AMQPValue::LongString(LongString::from("stream")),
        );
        let q = Queue::new(QueueConfig {
            name: "s".into(),
            durable: true,
            auto_delete: false,
            exclusive_owner: None,
            arguments,
        });
        assert!(q.is_stream());
        let msg = || {
            Arc::new(Message::new(
                "".into(),
                Bytes::from_static(b"s"),
                Bytes::from_static(&[0, 0]),
                Bytes::from_static(b"x"),
            ))
        };
        for _ in 0..5 {
            q.publish(msg());
        }
        let reader = |spec: AMQPValue, prefetch: u32| {
            let sink = Arc::new(Sink::default());
            let mut args = FieldTable::default();
            field_table_insert(&mut args, OFFSET_HEADER, spec);
            let c = Arc::new(Consumer::new(
                "c".into(),
                1,
                1,
                false,
                false,
                args,
                prefetch,
                Arc::new(ChannelCredit::default()),
                sink.clone(),
            ));
            q.add_consumer(c.clone()).unwrap();
            (sink, c)
        };
        let (first, c) = reader(AMQPValue::LongString(LongString::from("first")), 2);
        assert_eq!(first.offsets(), vec![0, 1]);
        c.release(2);
        q.ack([0, 1]);
        assert_eq!(first.offsets(), vec![0, 1, 2, 3]);
        c.release(2);
        q.requeue([2, 3]);
        assert_eq!(first.offsets(), vec![0, 1, 2, 3, 4]);
        let (from_three, _) = reader(AMQPValue::LongInt(3), 10);
        assert_eq!(from_three.offsets(), vec![3, 4]);
        let (next, _) = reader(AMQPValue::LongString(LongString::from("next")), 10);
        assert!(next.offsets().is_empty());
        q.publish(msg());
        assert_eq!(next.offsets(), vec![5]);
        assert_eq!(q.message_count(), 6);
        assert!(q.get(true).is_none());
    }

    #[test]
    fn offset_spec_from_arguments() {
        use rill_codec::{field_table_insert, LongString};
        let spec = |v: AMQPValue| {
            let mut t = FieldTable::default();
            field_table_insert(&mut t, OFFSET_HEADER, v);
            OffsetSpec::from_arguments(&t)
        };
        assert_eq!(
            spec(AMQPValue::LongString(LongString::from("first"))),
            OffsetSpec::First
        );
        assert_eq!(
            spec(AMQPValue::LongString(LongString::from("last"))),
            OffsetSpec::Last
        );
        assert_eq!(
            spec(AMQPValue::LongString(LongString::from("next"))),
            OffsetSpec::Next
        );
        assert_eq!(spec(AMQPValue::LongLongInt(-1)), OffsetSpec::Offset(-1));
        assert_eq!(
            spec(AMQPValue::Timestamp(1_700_000_000)),
            OffsetSpec::Timestamp(1_700_000_000_000)
        );
    }
}
