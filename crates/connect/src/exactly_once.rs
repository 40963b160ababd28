//! The connectors' half of exactly-once: remembering which inputs were already taken into
//! account, and holding output until the checkpoint that produced it is complete.
//!
//! **Inputs.** A queue source acks the deliveries of epoch `c` once checkpoint `c` is
//! complete. If the ack is lost — the job dies right after the checkpoint, or the broker dies
//! before the ack reached its disk — the broker delivers those messages again, although
//! their effect is already in the checkpoint. A producer retrying a publish whose confirm it
//! never got (the broker died) can also put a message in twice. Neither can be told from a
//! new message by the delivery alone; like Flink's RabbitMQ source, the job recognises them by
//! a message id: the `message_id` property, or the `x-deduplication-header` header. An
//! [`IdWindow`] remembers the ids of what recent checkpoints covered, in the checkpoints
//! themselves, and the source drops (and acks) a delivery whose id it has seen. Messages
//! without an id cannot be recognised: for them a crash between checkpoint and ack means
//! at-least-once.
//!
//! **Outputs.** A sink in exactly-once mode publishes nothing when a record arrives: the
//! message waits ([`Pending`]) and goes into the next checkpoint; when that checkpoint is
//! complete it is published, with a deterministic id (`job/epoch/worker/sequence`) in the
//! `x-deduplication-header` header. After a crash, the restored checkpoint's pending output is
//! published again and a deduplicating queue or exchange (`docs/deduplication.md`) drops the
//! copies that had arrived; output of epochs after the checkpoint was never published, and
//! is produced again from the redelivered input. A broker without deduplication (RabbitMQ)
//! keeps the copies: at-least-once, every copy with the same ids as the first.

use crate::message::{Incoming, Outgoing, OutgoingProperties};
use bytes::Bytes;
use rill_codec::{BasicProperties, ShortString};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

/// The header deduplicating queues and exchanges key on.
pub const DEDUP_HEADER: &str = "x-deduplication-header";

/// A 128-bit digest of a message id: two FNV-1a passes with different offsets. Ids are
/// remembered by digest, so a window of millions costs 16 bytes each.
fn digest(id: &[u8]) -> u128 {
    let fnv = |basis: u64| {
        id.iter().fold(basis, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4))
}

/// The id of an input message: its `message_id`, else its `x-deduplication-header`.
pub fn input_id(msg: &Incoming) -> Option<u128> {
    let props = msg.properties();
    if let Some(id) = props.message_id() {
        return Some(digest(id.as_str().as_bytes()));
    }
    let headers = props.headers().as_ref()?;
    let v = headers.inner().get(DEDUP_HEADER)?;
    match rill_codec::value_as_bytes(v) {
        Some(b) => Some(digest(b)),
        None => rill_codec::value_as_i64(v).map(|n| digest(n.to_string().as_bytes())),
    }
}

/// Ids of inputs taken into account, by the epoch they were taken in, for the last few
/// checkpoints that took any. Checkpoints without new inputs do not move the window: while
/// the broker is down the job keeps taking (empty) checkpoints, and the deliveries whose
/// acks the crash lost come back first when it returns — their ids must still be there.
///
/// ```
/// use rill_connect::exactly_once::IdWindow;
/// let mut w = IdWindow::new(2);
/// assert!(w.insert(1, 10));
/// assert!(!w.insert(1, 10)); // seen
/// w.insert(2, 20);
/// w.checkpointed(1);
/// w.checkpointed(2); // nothing new since checkpoint 1: the window does not move
/// w.insert(3, 30);
/// w.checkpointed(3);
/// assert!(!w.insert(4, 10)); // still within the last 2 checkpoints that took inputs
/// w.insert(4, 40);
/// w.checkpointed(4); // keeps what checkpoints 3 and 4 covered
/// assert!(w.insert(5, 10)); // forgotten: checkpoint 1's
/// assert!(!w.insert(5, 30));
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdWindow {
    /// How many checkpoints' worth of epochs to keep.
    keep: usize,
    by_epoch: BTreeMap<u64, Vec<u128>>,
    /// Epochs of completed checkpoints, newest last (at most `keep`).
    checkpoints: Vec<u64>,
    #[serde(skip)]
    seen: HashSet<u128>,
    /// Ids were added since the last checkpoint counted.
    #[serde(skip)]
    fresh: bool,
}

impl IdWindow {
    pub fn new(keep_checkpoints: usize) -> IdWindow {
        IdWindow {
            keep: keep_checkpoints.max(1),
            ..IdWindow::default()
        }
    }

    /// Records `id` as taken in `epoch`; false if it was already there (a duplicate).
    pub fn insert(&mut self, epoch: u64, id: u128) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.by_epoch.entry(epoch).or_default().push(id);
        self.fresh = true;
        true
    }

    /// Checkpoint `epoch` is complete. Ids are kept for the epochs the `keep` newest
    /// checkpoints covered; older ones go (their acks are long done).
    pub fn checkpointed(&mut self, epoch: u64) {
        if !std::mem::take(&mut self.fresh) {
            return;
        }
        self.checkpoints.push(epoch);
        if self.checkpoints.len() <= self.keep {
            return;
        }
        let excess = self.checkpoints.len() - self.keep;
        let dropped = self.checkpoints[excess - 1];
        self.checkpoints.drain(..excess);
        let old: Vec<u64> = self.by_epoch.range(..=dropped).map(|(e, _)| *e).collect();
        for e in old {
            if let Some(ids) = self.by_epoch.remove(&e) {
                for id in ids {
                    self.seen.remove(&id);
                }
            }
        }
    }

    /// The part of the window a checkpoint of `epoch` keeps (ids of epochs `<= epoch`),
    /// encoded as an `IdWindow` is (bincode) without copying the ids first.
    pub fn snapshot(&self, epoch: u64) -> Result<Vec<u8>, bincode::Error> {
        /// `IdWindow`'s serialized fields, borrowed.
        #[derive(Serialize)]
        struct View<'a> {
            keep: usize,
            by_epoch: BTreeMap<u64, &'a [u128]>,
            checkpoints: &'a [u64],
        }
        bincode::serialize(&View {
            keep: self.keep,
            by_epoch: self
                .by_epoch
                .range(..=epoch)
                .map(|(e, ids)| (*e, ids.as_slice()))
                .collect(),
            checkpoints: &self.checkpoints,
        })
    }

    /// Merges a restored window (several, when parallelism changed) into this one.
    pub fn absorb(&mut self, other: IdWindow) {
        self.keep = self.keep.max(other.keep);
        for (e, ids) in other.by_epoch {
            for id in ids {
                self.insert(e, id);
            }
        }
        self.checkpoints.extend(other.checkpoints);
        self.checkpoints.sort_unstable();
        self.checkpoints.dedup();
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A message held for publishing, as a checkpoint stores it: stamped with its id
/// ([`stamp`]) and encoded once, when it is made, so that neither checkpoints nor the
/// publication encode it again.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingMessage {
    pub epoch: u64,
    pub routing_key: String,
    /// The AMQP wire encoding of its properties.
    pub properties: Bytes,
    pub body: Bytes,
}

impl PendingMessage {
    /// Output `seq` of `worker` in `epoch` of `job`, stamped with its id.
    pub fn new(
        (job, epoch, worker, seq): (&str, u64, usize, u64),
        routing_key: String,
        properties: BasicProperties,
        body: Bytes,
    ) -> PendingMessage {
        let id = output_id(job, epoch, worker, seq);
        PendingMessage {
            epoch,
            routing_key,
            properties: rill_codec::encode_properties(&stamp(properties, &id)),
            body,
        }
    }

    /// The message to publish.
    pub fn outgoing(&self, exchange: &Arc<str>) -> Outgoing {
        Outgoing {
            exchange: exchange.clone(),
            routing_key: self.routing_key.clone(),
            properties: OutgoingProperties::Encoded(self.properties.clone()),
            body: self.body.clone(),
        }
    }
}

/// The checkpoint encoding of pending output: a version byte, the message count, then per
/// message varints for
/// epoch, worker and sequence, and length-prefixed routing key, properties (in their AMQP
/// wire form) and body. A length of 0 for the routing key or the properties means "the same
/// as the message before" (output of one job mostly shares both), so they count 0 bytes
/// then, and the encoding copies no `BasicProperties`.
const PENDING_FORMAT: u8 = 1;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn get_slice<'a>(bytes: &mut &'a [u8], len: u64) -> Option<&'a [u8]> {
    let len = usize::try_from(len).ok()?;
    if bytes.len() < len {
        return None;
    }
    let (head, rest) = bytes.split_at(len);
    *bytes = rest;
    Some(head)
}

/// Writes the `count` messages `msgs` in the pending-output encoding.
fn encode_pending<'a>(
    count: usize,
    msgs: impl Iterator<Item = &'a PendingMessage>,
    out: &mut Vec<u8>,
) {
    out.push(PENDING_FORMAT);
    put_varint(out, count as u64);
    let mut last_key: Option<&str> = None;
    for m in msgs {
        put_varint(out, m.epoch);
        if last_key == Some(m.routing_key.as_str()) {
            put_varint(out, 0);
        } else {
            put_varint(out, m.routing_key.len() as u64 + 1);
            out.extend_from_slice(m.routing_key.as_bytes());
            last_key = Some(&m.routing_key);
        }
        put_varint(out, m.properties.len() as u64);
        out.extend_from_slice(&m.properties);
        put_varint(out, m.body.len() as u64);
        out.extend_from_slice(&m.body);
    }
}

/// Reads what [`encode_pending`] wrote.
fn decode_pending(mut bytes: &[u8]) -> Result<Vec<PendingMessage>, String> {
    let bad = || "truncated or corrupt pending output".to_string();
    match bytes.split_first() {
        Some((&PENDING_FORMAT, rest)) => bytes = rest,
        Some((v, _)) => return Err(format!("unknown pending-output format {v}")),
        None => return Ok(Vec::new()),
    }
    let b = &mut bytes;
    let count = get_varint(b).ok_or_else(bad)?;
    let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut key = String::new();
    while !b.is_empty() {
        let epoch = get_varint(b).ok_or_else(bad)?;
        match get_varint(b).ok_or_else(bad)? {
            0 => {}
            n => {
                let raw = get_slice(b, n - 1).ok_or_else(bad)?;
                key = String::from_utf8(raw.to_vec()).map_err(|_| bad())?;
            }
        }
        let len = get_varint(b).ok_or_else(bad)?;
        let raw = get_slice(b, len).ok_or_else(bad)?;
        // Checked here, so that a bad file fails the restore, not the publication later.
        rill_codec::PropertiesView::new(raw).map_err(|e| e.to_string())?;
        let properties = Bytes::copy_from_slice(raw);
        let len = get_varint(b).ok_or_else(bad)?;
        let body = Bytes::copy_from_slice(get_slice(b, len).ok_or_else(bad)?);
        out.push(PendingMessage {
            epoch,
            routing_key: key.clone(),
            properties,
            body,
        });
    }
    if out.len() as u64 != count {
        return Err(bad());
    }
    Ok(out)
}

/// The deterministic id of output message `seq` of `worker` in `epoch` of `job`: unique over
/// the job's life, since epochs never repeat across restarts.
///
/// ```
/// assert_eq!(rill_connect::exactly_once::output_id("wc", 7, 1, 42), "wc/7/1/42");
/// ```
pub fn output_id(job: &str, epoch: u64, worker: usize, seq: u64) -> String {
    format!("{job}/{epoch}/{worker}/{seq}")
}

/// Sets the dedup header (and the `message_id`, unless the job set one) of an output
/// message to `id`.
pub fn stamp(properties: BasicProperties, id: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    rill_codec::field_table_insert(
        &mut headers,
        DEDUP_HEADER,
        rill_codec::AMQPValue::LongString(id.into()),
    );
    let p = properties.with_headers(headers);
    if p.message_id().is_some() {
        p
    } else {
        // A short string holds 255 bytes; cut longer ids (long job names) at a char boundary.
        let mut end = id.len().min(255);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        p.with_message_id(ShortString::from(id[..end].to_owned()))
    }
}

/// How many committed messages a sink keeps published and unconfirmed at once. A checkpoint
/// commits everything its interval produced (hundreds of thousands of messages at full
/// speed); publishing it all in one go made copies of all of it at once, and the allocator
/// then spent more time faulting in fresh pages than the sink spent publishing. Within this
/// window the copies reuse the same memory, and the broker's confirms pace the rest.
pub const COMMIT_WINDOW: usize = 16384;

/// Output held until its checkpoint completes, then published (at most [`COMMIT_WINDOW`]
/// unconfirmed at a time) and kept until confirmed.
#[derive(Debug, Default)]
pub struct Pending {
    /// Not committed yet, by epoch.
    held: BTreeMap<u64, Vec<PendingMessage>>,
    /// Committed (its checkpoint is complete), not published yet, in order.
    committed: VecDeque<PendingMessage>,
    /// Published, with the sink's sequence number (increasing), until confirmed.
    in_flight: VecDeque<(u64, PendingMessage)>,
    /// Per (epoch): how many messages were made in it by this worker (for ids).
    next_seq: BTreeMap<u64, u64>,
    /// Held output of epochs up to here is in an increment of this run.
    snapshotted: Option<u64>,
    /// The epochs of this run's increments that hold messages, oldest first; those at or
    /// after the oldest unconfirmed message's epoch are still needed.
    increments: VecDeque<u64>,
}

impl Pending {
    /// The next sequence number for an output of `epoch`.
    pub fn next_seq(&mut self, epoch: u64) -> u64 {
        let s = self.next_seq.entry(epoch).or_insert(0);
        *s += 1;
        *s
    }

    pub fn hold(&mut self, msg: PendingMessage) {
        self.held.entry(msg.epoch).or_default().push(msg);
    }

    /// Encodes what a checkpoint of `epoch` must keep: committed output not confirmed yet
    /// (published or not), and held output of epochs `<= epoch`.
    pub fn snapshot(&self, epoch: u64) -> Vec<u8> {
        let held = self.held.range(..=epoch).flat_map(|(_, v)| v.iter());
        let count = self.count_upto(epoch);
        let mut out = Vec::with_capacity(1 + count * 64);
        let msgs = self
            .in_flight
            .iter()
            .map(|(_, m)| m)
            .chain(&self.committed)
            .chain(held);
        encode_pending(count, msgs, &mut out);
        out
    }

    /// An increment for the checkpoint of `epoch`: the held output of epochs `<= epoch` no
    /// earlier increment of this run holds (the first holds everything not confirmed), and
    /// the earlier increments still needed. Publication goes in epoch order and confirms
    /// come in publication order, so the messages not confirmed are exactly those from the
    /// oldest unconfirmed one's epoch on, and the increments needed are those taken at or
    /// after that epoch.
    pub fn increment(&mut self, epoch: u64) -> (Vec<u8>, Vec<u64>) {
        match self.oldest_unconfirmed() {
            Some(oldest) => {
                while self.increments.front().is_some_and(|e| *e < oldest) {
                    self.increments.pop_front();
                }
            }
            None => self.increments.clear(),
        }
        let earlier: Vec<u64> = self.increments.iter().copied().collect();
        let (bytes, count) = match self.snapshotted {
            None => (self.snapshot(epoch), self.count_upto(epoch)),
            Some(prev) => self.encode_held(prev, epoch),
        };
        if count > 0 {
            self.increments.push_back(epoch);
        }
        self.snapshotted = Some(epoch);
        (bytes, earlier)
    }

    /// The last increment was lost: the next one holds everything again.
    pub fn increment_lost(&mut self) {
        self.snapshotted = None;
        self.increments.clear();
    }

    /// Encodes the held output of epochs `after < e <= upto`; returns it and how many
    /// messages.
    fn encode_held(&self, after: u64, upto: u64) -> (Vec<u8>, usize) {
        // An empty range, not a reversed one (which `BTreeMap::range` panics on).
        let held = self
            .held
            .range(after.saturating_add(1)..upto.max(after).saturating_add(1));
        let count = held.clone().map(|(_, v)| v.len()).sum();
        let mut out = Vec::with_capacity(1 + count * 64);
        encode_pending(count, held.flat_map(|(_, v)| v.iter()), &mut out);
        (out, count)
    }

    /// How many messages a full snapshot of `epoch` holds.
    fn count_upto(&self, epoch: u64) -> usize {
        self.in_flight.len()
            + self.committed.len()
            + self
                .held
                .range(..=epoch)
                .map(|(_, v)| v.len())
                .sum::<usize>()
    }

    /// The epoch of the oldest message not confirmed.
    fn oldest_unconfirmed(&self) -> Option<u64> {
        self.in_flight
            .front()
            .map(|(_, m)| m.epoch)
            .or_else(|| self.committed.front().map(|m| m.epoch))
            .or_else(|| self.held.keys().next().copied())
    }

    /// Holds the output a checkpoint's [`Pending::snapshot`] kept (to publish it again once
    /// the job is open).
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        for m in decode_pending(snapshot)? {
            self.hold(m);
        }
        Ok(())
    }

    /// The held output of epochs `<= epoch` is committed (its checkpoint is complete): it
    /// is published by [`Pending::publish`], in order.
    pub fn commit(&mut self, epoch: u64) {
        let later = self.held.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.held, later);
        self.next_seq = self.next_seq.split_off(&(epoch + 1));
        self.committed.extend(done.into_values().flatten());
    }

    /// Publishes committed output with `send` (which returns the sink's sequence number)
    /// while fewer than [`COMMIT_WINDOW`] are unconfirmed; returns how many it published.
    pub fn publish<E>(
        &mut self,
        mut send: impl FnMut(&PendingMessage) -> Result<u64, E>,
    ) -> Result<usize, E> {
        let mut n = 0;
        while self.in_flight.len() < COMMIT_WINDOW {
            let Some(m) = self.committed.pop_front() else {
                break;
            };
            match send(&m) {
                Ok(seq) => self.in_flight.push_back((seq, m)),
                Err(e) => {
                    self.committed.push_front(m);
                    return Err(e);
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// Everything up to the sink's number `seq` is confirmed.
    pub fn confirmed(&mut self, seq: u64) {
        while self.in_flight.front().is_some_and(|(s, _)| *s <= seq) {
            self.in_flight.pop_front();
        }
    }

    /// Committed output waits to be published.
    pub fn has_committed(&self) -> bool {
        !self.committed.is_empty()
    }

    /// Nothing held, committed or unconfirmed.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.committed.is_empty() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(epoch: u64, body: &str) -> PendingMessage {
        PendingMessage::new(
            ("wc", epoch, 0, 1),
            "out".into(),
            BasicProperties::default(),
            Bytes::from(body.to_owned()),
        )
    }

    fn snapshot_len(p: &Pending, epoch: u64) -> usize {
        decode_pending(&p.snapshot(epoch)).expect("decode").len()
    }

    #[test]
    fn pending_output_is_snapshotted_until_confirmed() {
        let mut p = Pending::default();
        p.hold(msg(1, "a"));
        p.hold(msg(2, "b"));
        p.hold(msg(3, "c"));
        assert_eq!(snapshot_len(&p, 2), 2);
        p.commit(2);
        // Committed but not yet published output stays in checkpoints.
        assert_eq!(snapshot_len(&p, 2), 2);
        let mut seq = 0;
        let mut send = |_: &PendingMessage| -> Result<u64, ()> {
            seq += 1;
            Ok(seq)
        };
        assert_eq!(p.publish(&mut send), Ok(2));
        // Published but unconfirmed output stays in later checkpoints.
        assert_eq!(snapshot_len(&p, 3), 3);
        p.confirmed(1);
        assert_eq!(snapshot_len(&p, 3), 2);
        p.confirmed(2);
        p.commit(3);
        assert_eq!(p.publish(&mut send), Ok(1));
        p.confirmed(3);
        assert!(p.is_empty());
    }

    /// What restoring an increment with the earlier ones it names gives back.
    fn restore_chain(chain: &[(u64, Vec<u8>, Vec<u64>)], at: u64) -> Vec<String> {
        let (_, last, earlier) = chain.iter().find(|(e, _, _)| *e == at).unwrap();
        let mut p = Pending::default();
        for e in earlier {
            let (_, bytes, _) = chain.iter().find(|(x, _, _)| x == e).unwrap();
            p.restore(bytes).unwrap();
        }
        p.restore(last).unwrap();
        p.commit(u64::MAX - 1);
        let mut bodies = Vec::new();
        p.publish(|m| {
            bodies.push(String::from_utf8(m.body.to_vec()).unwrap());
            Ok::<u64, ()>(bodies.len() as u64)
        })
        .unwrap();
        bodies
    }

    #[test]
    fn increments_hold_each_message_once_and_name_what_is_unconfirmed() {
        let mut p = Pending::default();
        let mut chain = Vec::new();
        let mut take = |p: &mut Pending, at: u64| {
            let (bytes, earlier) = p.increment(at);
            let n = decode_pending(&bytes).unwrap().len();
            chain.push((at, bytes, earlier.clone()));
            (n, earlier, chain.clone())
        };
        p.hold(msg(1, "a"));
        p.hold(msg(2, "b"));
        // The first increment of a run is full.
        assert_eq!(take(&mut p, 2).0, 2);
        p.hold(msg(3, "c"));
        p.hold(msg(4, "d"));
        let (n, earlier, _) = take(&mut p, 4);
        assert_eq!((n, earlier), (2, vec![2]));
        // Checkpoint 4 completes: everything is committed and published; "a" and "b" are
        // confirmed, so increment 2 is not needed any more.
        p.commit(4);
        let mut seq = 0;
        p.publish(|_| {
            seq += 1;
            Ok::<u64, ()>(seq)
        })
        .unwrap();
        p.confirmed(2);
        p.hold(msg(5, "e"));
        let (n, earlier, chain) = take(&mut p, 6);
        assert_eq!((n, earlier), (1, vec![4]));
        // Restoring checkpoint 6 brings back what is not confirmed, each once.
        assert_eq!(restore_chain(&chain, 6), ["c", "d", "e"]);
        // Nothing new: an empty increment, still naming what is needed.
        let (n, earlier, _) = take(&mut p, 8);
        assert_eq!((n, earlier), (0, vec![4, 6]));
        p.confirmed(4);
        p.commit(8);
        p.publish(|_| {
            seq += 1;
            Ok::<u64, ()>(seq)
        })
        .unwrap();
        p.confirmed(5);
        let (n, earlier, _) = take(&mut p, 10);
        assert_eq!((n, earlier), (0, vec![]));
        // After a lost increment, the next is full again.
        p.hold(msg(11, "f"));
        p.increment_lost();
        let (n, earlier, _) = take(&mut p, 12);
        assert_eq!((n, earlier), (1, vec![]));
    }

    #[test]
    fn committed_output_goes_out_within_the_window_and_in_order() {
        let mut p = Pending::default();
        for i in 0..(COMMIT_WINDOW + 10) {
            p.hold(msg(1, &i.to_string()));
        }
        p.commit(1);
        let mut sent = Vec::new();
        let mut send = |m: &PendingMessage| -> Result<u64, ()> {
            sent.push(m.body.clone());
            Ok(sent.len() as u64)
        };
        assert_eq!(p.publish(&mut send), Ok(COMMIT_WINDOW));
        assert_eq!(p.publish(&mut send), Ok(0));
        assert!(p.has_committed());
        p.confirmed(5);
        assert_eq!(p.publish(&mut send), Ok(5));
        p.confirmed(COMMIT_WINDOW as u64 + 5);
        assert_eq!(p.publish(&mut send), Ok(5));
        assert!(!p.has_committed());
        let bodies: Vec<String> = sent
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..(COMMIT_WINDOW + 10)).map(|i| i.to_string()).collect();
        assert_eq!(bodies, expected);
        // A refused send keeps the message, first in line.
        let mut q = Pending::default();
        q.hold(msg(1, "x"));
        q.commit(1);
        assert_eq!(q.publish(|_| Err::<u64, _>("down")), Err("down"));
        assert!(q.has_committed());
    }

    #[test]
    fn pending_output_round_trips_its_encoding() {
        let json = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let msgs = vec![
            PendingMessage::new(
                ("wc", 7, 1, 300),
                "out".into(),
                json.clone().with_message_id("1:a".into()),
                Bytes::from_static(b"{}"),
            ),
            PendingMessage::new(("wc", 7, 1, 301), "out".into(), json.clone(), Bytes::new()),
            PendingMessage::new(
                ("wc", u64::MAX, usize::MAX, 0),
                String::new(),
                json,
                Bytes::from(vec![0xff; 300]),
            ),
        ];
        let fields = OutgoingProperties::Encoded(msgs[1].properties.clone())
            .into_fields()
            .unwrap();
        assert_eq!(fields.message_id().as_ref().unwrap().as_str(), "wc/7/1/301");
        let mut bytes = Vec::new();
        encode_pending(msgs.len(), msgs.iter(), &mut bytes);
        assert_eq!(decode_pending(&bytes).expect("decode"), msgs);
        // Every cut is an error, never a panic or a shorter list taken for the whole.
        for cut in 1..bytes.len() {
            if let Ok(back) = decode_pending(&bytes[..cut]) {
                panic!("a cut at {cut} decoded as {} messages", back.len());
            }
        }
        assert!(decode_pending(&[9]).is_err());
        assert_eq!(decode_pending(&[]).expect("empty"), vec![]);
    }

    #[test]
    fn ids_survive_a_snapshot_roundtrip_and_merge() {
        let mut w = IdWindow::new(4);
        for (e, id) in [(1, 11), (2, 22), (3, 33)] {
            assert!(w.insert(e, id));
        }
        let bytes = w.snapshot(2).unwrap();
        let back: IdWindow = bincode::deserialize(&bytes).unwrap();
        let mut fresh = IdWindow::new(4);
        fresh.absorb(back);
        assert!(!fresh.insert(5, 11));
        assert!(!fresh.insert(5, 22));
        assert!(fresh.insert(5, 33)); // epoch 3 was after the snapshot
    }

    #[test]
    fn stamp_sets_the_dedup_header_and_a_message_id() {
        let p = stamp(BasicProperties::default(), "wc/1/0/1");
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some("wc/1/0/1")
        );
        let kept = stamp(
            BasicProperties::default().with_message_id("1:Hello".into()),
            "wc/1/0/1",
        );
        assert_eq!(
            kept.message_id().as_ref().map(|s| s.as_str()),
            Some("1:Hello")
        );
        let h = kept.headers().clone().unwrap();
        assert!(h.inner().contains_key(DEDUP_HEADER));
    }
}
