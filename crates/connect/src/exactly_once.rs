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

use crate::message::{Incoming, Outgoing};
use bytes::Bytes;
use rill_codec::{BasicProperties, ShortString};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
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

    /// The part of the window a checkpoint of `epoch` keeps: ids of epochs `<= epoch`.
    pub fn snapshot(&self, epoch: u64) -> IdWindow {
        IdWindow {
            keep: self.keep,
            by_epoch: self
                .by_epoch
                .range(..=epoch)
                .map(|(e, ids)| (*e, ids.clone()))
                .collect(),
            checkpoints: self.checkpoints.clone(),
            seen: HashSet::new(),
            fresh: false,
        }
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

/// A message held for publishing, as a checkpoint stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingMessage {
    pub epoch: u64,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Bytes,
}

impl PendingMessage {
    pub fn outgoing(&self, exchange: &Arc<str>) -> Outgoing {
        Outgoing {
            exchange: exchange.clone(),
            routing_key: self.routing_key.clone(),
            properties: self.properties.clone(),
            body: self.body.clone(),
        }
    }
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

/// Output held until its checkpoint completes, then published and kept until confirmed.
#[derive(Debug, Default)]
pub struct Pending {
    /// Not published yet, by epoch.
    held: BTreeMap<u64, Vec<PendingMessage>>,
    /// Published (committed), by the sink's sequence number, until confirmed.
    in_flight: BTreeMap<u64, PendingMessage>,
    /// Per (epoch): how many messages were made in it by this worker (for ids).
    next_seq: BTreeMap<u64, u64>,
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

    /// What a checkpoint of `epoch` must keep: held output of epochs `<= epoch`, and
    /// published output not confirmed yet.
    pub fn snapshot(&self, epoch: u64) -> Vec<PendingMessage> {
        self.in_flight
            .values()
            .cloned()
            .chain(
                self.held
                    .range(..=epoch)
                    .flat_map(|(_, v)| v.iter().cloned()),
            )
            .collect()
    }

    /// Takes the held output of epochs `<= epoch` (its checkpoint is complete) to publish.
    pub fn commit(&mut self, epoch: u64) -> Vec<PendingMessage> {
        let later = self.held.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.held, later);
        self.next_seq = self.next_seq.split_off(&(epoch + 1));
        done.into_values().flatten().collect()
    }

    /// `msg` was published as the sink's number `seq`.
    pub fn published(&mut self, seq: u64, msg: PendingMessage) {
        self.in_flight.insert(seq, msg);
    }

    /// Everything up to the sink's number `seq` is confirmed.
    pub fn confirmed(&mut self, seq: u64) {
        self.in_flight = self.in_flight.split_off(&(seq + 1));
    }

    /// Nothing held or unconfirmed.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(epoch: u64, body: &str) -> PendingMessage {
        PendingMessage {
            epoch,
            routing_key: "out".into(),
            properties: BasicProperties::default(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn pending_output_is_snapshotted_until_confirmed() {
        let mut p = Pending::default();
        p.hold(msg(1, "a"));
        p.hold(msg(2, "b"));
        p.hold(msg(3, "c"));
        assert_eq!(p.snapshot(2).len(), 2);
        let committed = p.commit(2);
        assert_eq!(committed.len(), 2);
        for (i, m) in committed.into_iter().enumerate() {
            p.published(i as u64 + 1, m);
        }
        // Published but unconfirmed output stays in later checkpoints.
        assert_eq!(p.snapshot(3).len(), 3);
        p.confirmed(1);
        assert_eq!(p.snapshot(3).len(), 2);
        p.confirmed(2);
        let left = p.commit(3);
        assert_eq!(left.len(), 1);
        p.published(3, left.into_iter().next().unwrap());
        p.confirmed(3);
        assert!(p.is_empty());
    }

    #[test]
    fn ids_survive_a_snapshot_roundtrip_and_merge() {
        let mut w = IdWindow::new(4);
        for (e, id) in [(1, 11), (2, 22), (3, 33)] {
            assert!(w.insert(e, id));
        }
        let snap = w.snapshot(2);
        let bytes = bincode::serialize(&snap).unwrap();
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
