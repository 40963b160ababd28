//! Message deduplication, as the RabbitMQ message-deduplication plugin and LavinMQ offer it:
//! a queue declared with `x-message-deduplication: true`, or an exchange of type
//! `x-message-deduplication` (or any exchange with that argument, as in LavinMQ), drops a
//! message whose `x-deduplication-header` value it has seen before. `docs/deduplication.md`
//! has the rules and where Rill differs from both.
//!
//! The semantics in one paragraph: each queue or exchange keeps a cache of keys. A key is
//! remembered from the moment its message is accepted until `x-cache-ttl` (or the message's
//! own `x-cache-ttl` header) has passed, or until `x-cache-size` newer keys have been
//! remembered after it (oldest first out) — whether or not the message was consumed in the
//! meantime. Rill's exactly-once sinks republish after a crash and rely on exactly that.
//!
//! # Layout
//! - [`DedupArgs`]: the declaration arguments, validated with the plugin's error texts.
//! - [`MessageKey`]: a message's key, normalised so that equal header values of different
//!   wire types (short and long strings, integer widths) are the same key, as in RabbitMQ.
//! - [`Cache`]: the keys: O(1) lookup, eviction by insertion order, lazy expiry; no I/O.
//! - [`Deduplicator`]: a cache and, for durable queues and exchanges, its on-disk
//!   [`DurableKeys`]. A classic queue keeps one under its own lock; an exchange keeps a
//!   [`SharedDeduplicator`].
//! - [`Routed`]: what a deduplicating exchange did with a message while it was routed, settled
//!   once the queues have it ([`Routed::finish`]): the key is written only after the message,
//!   and forgotten if the publish failed so that the publisher's retry is not dropped.

use crate::args::QueueType;
use crate::durable::DurableKeys;
use crate::exchange::Exchange;
use crate::message::Message;
use crate::queue::PublishOutcome;
use crate::vhost::type_name;
use hashbrown::HashTable;
use parking_lot::Mutex;
use rill_codec::{AMQPValue, AmqpError, FieldTable, PropertiesView, ReplyCode};
use rill_store::{KeyRecord, StoreError};
use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// Queue argument (and LavinMQ's exchange argument) that turns deduplication on.
pub const DEDUP_ARG: &str = "x-message-deduplication";
/// Exchange type of the plugin: deduplicates, then routes like `fanout`.
pub const EXCHANGE_TYPE: &str = "x-message-deduplication";
/// The header holding a message's key, unless `x-deduplication-header` names another.
pub const DEFAULT_HEADER: &str = "x-deduplication-header";
/// Argument naming the key header (LavinMQ).
pub const HEADER_ARG: &str = "x-deduplication-header";
/// Argument: how many keys the cache holds.
pub const SIZE_ARG: &str = "x-cache-size";
/// Argument, and message header overriding it: how long a key is remembered, ms.
pub const TTL_ARG: &str = "x-cache-ttl";
/// Argument: `disk` (the default for durable queues and exchanges in Rill) or `memory`.
pub const PERSISTENCE_ARG: &str = "x-cache-persistence";
/// Cache size when a queue (or a non-plugin exchange type) does not say: LavinMQ's default.
pub const DEFAULT_CACHE_SIZE: usize = 128;
/// Arguments compared on redeclaration, like RabbitMQ's own queue arguments.
pub const COMPARED_ARGS: [&str; 5] = [DEDUP_ARG, SIZE_ARG, TTL_ARG, PERSISTENCE_ARG, HEADER_ARG];

/// A key log is rewritten once it holds this many records more than twice the live keys.
const REWRITE_SLACK: u64 = 1024;

/// Validated deduplication settings of one queue or exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupArgs {
    /// The header whose value is the key.
    pub header: String,
    /// Keys remembered at most; the oldest goes first.
    pub cache_size: usize,
    /// How long a key is remembered (ms), unless its message says otherwise; `None`: until
    /// evicted by size.
    pub cache_ttl_ms: Option<u64>,
    /// Keys of persistent messages are written to disk when the queue or exchange is durable
    /// (`x-cache-persistence` is not `memory`).
    pub persist: bool,
}

fn precondition(text: &str) -> AmqpError {
    AmqpError::new(ReplyCode::PreconditionFailed, text)
}

/// A positive integer argument; the plugin also takes one written as a string.
fn positive(v: &AMQPValue) -> Option<u64> {
    match rill_codec::value_as_i64(v) {
        Some(n) => u64::try_from(n).ok().filter(|&n| n > 0),
        None => rill_codec::value_as_bytes(v)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&n| n > 0),
    }
}

impl DedupArgs {
    /// The settings a queue declares, `None` without `x-message-deduplication: true`. `what`
    /// names the queue for RabbitMQ-style texts ("queue 'q' in vhost '/'").
    ///
    /// ```
    /// use rill_broker::dedup::DedupArgs;
    /// use rill_broker::args::QueueType;
    /// use rill_codec::{AMQPValue, FieldTable};
    /// let mut args = FieldTable::default();
    /// args.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    /// args.insert("x-cache-size".into(), AMQPValue::LongInt(0));
    /// let err = DedupArgs::for_queue(&args, QueueType::Classic, "queue 'q' in vhost '/'").unwrap_err();
    /// assert_eq!(err.text, "PRECONDITION_FAILED - Invalid argument, 'x-cache-size' must be an integer greater than 0");
    /// ```
    pub fn for_queue(
        args: &FieldTable,
        queue_type: QueueType,
        what: &str,
    ) -> Result<Option<DedupArgs>, AmqpError> {
        if !enabled(args)? {
            return Ok(None);
        }
        if queue_type == QueueType::Stream {
            // The plugin and LavinMQ ignore the argument on streams; a publisher relying on
            // it would get duplicates without notice, so the declaration fails instead.
            return Err(precondition(&format!(
                "invalid arg '{DEDUP_ARG}' for {what} of queue type {}",
                queue_type.module_name()
            )));
        }
        Self::parse(args, false).map(Some)
    }

    /// The settings of an exchange: always for the plugin's exchange type (which requires
    /// `x-cache-size`), for other types only with `x-message-deduplication: true` (LavinMQ).
    pub fn for_exchange(
        is_dedup_type: bool,
        args: &FieldTable,
    ) -> Result<Option<DedupArgs>, AmqpError> {
        if !is_dedup_type && !enabled(args)? {
            return Ok(None);
        }
        Self::parse(args, is_dedup_type).map(Some)
    }

    fn parse(args: &FieldTable, size_required: bool) -> Result<DedupArgs, AmqpError> {
        let get = |k: &str| args.inner().get(k);
        let cache_size = match (get(SIZE_ARG), size_required) {
            (Some(v), _) => positive(v).ok_or(()),
            (None, true) => Err(()),
            (None, false) => Ok(DEFAULT_CACHE_SIZE as u64),
        }
        .map_err(|()| {
            precondition(&format!(
                "{}, '{SIZE_ARG}' must be an integer greater than 0",
                if size_required {
                    "Missing or invalid argument"
                } else {
                    "Invalid argument"
                }
            ))
        })?;
        let cache_ttl_ms = get(TTL_ARG)
            .map(|v| {
                positive(v).ok_or_else(|| {
                    precondition(&format!(
                        "Invalid argument, '{TTL_ARG}' must be an integer greater than 0"
                    ))
                })
            })
            .transpose()?;
        let persist = match get(PERSISTENCE_ARG) {
            None => true,
            Some(v) => match rill_codec::value_as_bytes(v) {
                Some(b"disk") => true,
                Some(b"memory") => false,
                _ => {
                    return Err(precondition(&format!(
                        "Invalid argument, '{PERSISTENCE_ARG}' must be either 'disk' or 'memory'"
                    )))
                }
            },
        };
        let header = match get(HEADER_ARG) {
            None => DEFAULT_HEADER.to_owned(),
            Some(v) => rill_codec::value_as_bytes(v)
                .and_then(|b| std::str::from_utf8(b).ok())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    precondition(&format!(
                        "Invalid argument, '{HEADER_ARG}' must be a non-empty string, not {}",
                        type_name(v)
                    ))
                })?,
        };
        Ok(DedupArgs {
            header,
            cache_size: usize::try_from(cache_size).unwrap_or(usize::MAX),
            cache_ttl_ms,
            persist,
        })
    }

    /// The key `msg` carries in [`DedupArgs::header`], with its own `x-cache-ttl`; `None` if
    /// it has none (such a message is never a duplicate). Reads only the raw headers table.
    pub fn key_of(&self, msg: &Message) -> Option<MessageKey> {
        let view = PropertiesView::new(&msg.properties).ok()?;
        let entries = rill_codec::table_entries(view.headers_raw()?).ok()?;
        let mut key = None;
        let mut ttl_ms = None;
        for (name, raw) in entries {
            if name == self.header {
                key = Some(canonical_key(raw));
            } else if name == TTL_ARG {
                ttl_ms = raw_integer(raw).and_then(|n| u64::try_from(n).ok());
            }
        }
        Some(MessageKey::new(key?, ttl_ms))
    }
}

/// `x-message-deduplication`: absent is off; anything but a boolean is refused.
fn enabled(args: &FieldTable) -> Result<bool, AmqpError> {
    match args.inner().get(DEDUP_ARG) {
        None => Ok(false),
        Some(AMQPValue::Boolean(b)) => Ok(*b),
        Some(v) => Err(precondition(&format!(
            "Invalid argument, '{DEDUP_ARG}' must be a boolean, not {}",
            type_name(v)
        ))),
    }
}

/// One message's key and its own TTL (the `x-cache-ttl` header, ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageKey {
    /// The header value, normalised (see [`canonical_key`]).
    pub key: Arc<[u8]>,
    pub ttl_ms: Option<u64>,
    /// The key's hash ([`key_hash`]), taken once, before the queue's lock.
    pub hash: u64,
}

impl MessageKey {
    pub fn new(key: Arc<[u8]>, ttl_ms: Option<u64>) -> MessageKey {
        let hash = key_hash(&key);
        MessageKey { key, ttl_ms, hash }
    }
}

/// The hash every [`Cache`] keys on: SipHash with random keys chosen once per process (keys
/// come from clients), so that a message's key is hashed once, outside any lock.
pub fn key_hash(key: &[u8]) -> u64 {
    static HASHER: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);
    HASHER.hash_one(key)
}

/// An integer field value of any width (the raw tag and big-endian payload).
fn raw_integer(raw: &[u8]) -> Option<i128> {
    let (&tag, p) = raw.split_first()?;
    let bytes = |n: usize| p.get(..n);
    Some(match tag {
        b'b' => i128::from(*p.first()? as i8),
        b'B' => i128::from(*p.first()?),
        b's' => i128::from(i16::from_be_bytes(bytes(2)?.try_into().ok()?)),
        b'u' => i128::from(u16::from_be_bytes(bytes(2)?.try_into().ok()?)),
        b'I' => i128::from(i32::from_be_bytes(bytes(4)?.try_into().ok()?)),
        b'i' => i128::from(u32::from_be_bytes(bytes(4)?.try_into().ok()?)),
        b'l' | b'L' => i128::from(i64::from_be_bytes(bytes(8)?.try_into().ok()?)),
        b'T' => i128::from(u64::from_be_bytes(bytes(8)?.try_into().ok()?)),
        _ => return None,
    })
}

/// A header value (raw tag + payload) as a cache key. RabbitMQ compares the decoded Erlang
/// terms, so strings (long, or byte arrays) are one kind, integers of every width and
/// timestamps another, floats widened to doubles a third; `"1"`, `1` and `1.0` stay apart.
/// Other values (decimals, tables, arrays) are compared by their encoding.
///
/// ```
/// use rill_broker::dedup::canonical_key;
/// assert_eq!(canonical_key(b"S\0\0\0\x0242"), canonical_key(b"x\0\0\0\x0242"));
/// assert_eq!(canonical_key(b"b\x2a"), canonical_key(b"l\0\0\0\0\0\0\0\x2a"));
/// assert_ne!(canonical_key(b"S\0\0\0\x0242"), canonical_key(b"b\x2a"));
/// ```
pub fn canonical_key(raw: &[u8]) -> Arc<[u8]> {
    let Some((&tag, p)) = raw.split_first() else {
        return Arc::from(&b"R"[..]);
    };
    let mut out = Vec::with_capacity(p.len() + 1);
    if let Some(n) = raw_integer(raw) {
        out.push(b'I');
        out.extend_from_slice(&n.to_be_bytes());
        return out.into();
    }
    let float = match tag {
        b'f' => p
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(|b| f64::from(f32::from_be_bytes(b))),
        b'd' => p
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(f64::from_be_bytes),
        _ => None,
    };
    match (tag, float) {
        (_, Some(f)) => {
            out.push(b'F');
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        (b'S' | b'x', _) => {
            out.push(b'S');
            out.extend_from_slice(p.get(4..).unwrap_or_default());
        }
        (b't', _) => out.extend_from_slice(&[b't', u8::from(p.first() != Some(&0))]),
        (b'V', _) => out.push(b'V'),
        _ => {
            out.push(b'R');
            out.extend_from_slice(raw);
        }
    }
    out.into()
}

/// A remembered key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Insertion order (the cache's own counter).
    order: u64,
    /// When it is forgotten (ms since the epoch); `None`: only by size.
    pub expires_at: Option<u64>,
    /// The sync round after which the original message (and its written key) is durable: a
    /// duplicate is confirmed only then.
    pub durable_at: Option<u64>,
    /// The sequence number of its key log record, for a key kept on disk.
    pub logged: Option<u64>,
    /// The original publish is still being routed through an exchange: whether it is
    /// accepted is not known yet.
    pub pending: bool,
}

impl Entry {
    /// A key accepted now, not (yet) on disk.
    pub fn new(expires_at: Option<u64>, durable_at: Option<u64>) -> Entry {
        Entry {
            order: 0,
            expires_at,
            durable_at,
            logged: None,
            pending: false,
        }
    }

    fn live(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// Remembered keys in insertion order. Lookups are one hash probe; when more than `size`
/// keys are held, the oldest insertion goes, expired or not (so what survives depends only on
/// the order of insertions, which a replay after a restart repeats). Expired keys are
/// dropped lazily: a lookup ignores them, and re-remembering one moves it to the newest end.
///
/// ```
/// use rill_broker::dedup::{Cache, Entry};
/// let mut c = Cache::new(2);
/// c.insert(b"a"[..].into(), Entry::new(None, None));
/// c.insert(b"b"[..].into(), Entry::new(Some(100), None));
/// c.insert(b"c"[..].into(), Entry::new(None, None));
/// assert!(c.get(b"a", 0).is_none()); // evicted: oldest
/// assert!(c.get(b"b", 99).is_some());
/// assert!(c.get(b"b", 100).is_none()); // expired
/// ```
#[derive(Debug, Default)]
pub struct Cache {
    size: usize,
    /// Entries with their keys' hashes: growing the table moves them without hashing the
    /// keys again (with millions of ids, re-hashing at each doubling cost a deduplicating
    /// sink a tenth of its time).
    entries: HashTable<Slot>,
    /// Insertion order; an element is stale when its key was re-inserted later (its entry's
    /// `order` differs). Compacted when mostly stale.
    order: VecDeque<(u64, u64, Arc<[u8]>)>,
    next_order: u64,
    /// Entries with `logged` set, for deciding when to rewrite the key log.
    logged: usize,
}

#[derive(Debug)]
struct Slot {
    hash: u64,
    key: Arc<[u8]>,
    entry: Entry,
}

impl Cache {
    /// A cache holding at most `size` keys (at least one).
    pub fn new(size: usize) -> Cache {
        Cache {
            size: size.max(1),
            ..Cache::default()
        }
    }

    /// Keys held, expired ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<&Slot> {
        self.entries.find(hash, |s| *s.key == *key)
    }

    /// The entry for `key`, expired or not.
    pub fn peek(&self, key: &[u8]) -> Option<&Entry> {
        self.find(key_hash(key), key).map(|s| &s.entry)
    }

    /// The entry for `key` unless it is absent or expired at `now`.
    pub fn get(&self, key: &[u8], now: u64) -> Option<&Entry> {
        self.peek(key).filter(|e| e.live(now))
    }

    /// [`Cache::get`] of a key whose [`key_hash`] is `hash`.
    pub fn get_hashed(&self, hash: u64, key: &[u8], now: u64) -> Option<&Entry> {
        self.find(hash, key)
            .map(|s| &s.entry)
            .filter(|e| e.live(now))
    }

    /// Remembers `key` as the newest entry (replacing an older entry for it) and evicts the
    /// oldest entries beyond the size.
    pub fn insert(&mut self, key: Arc<[u8]>, entry: Entry) {
        self.insert_hashed(key_hash(&key), key, entry);
    }

    /// [`Cache::insert`] of a key whose [`key_hash`] is `hash`.
    pub fn insert_hashed(&mut self, hash: u64, key: Arc<[u8]>, mut entry: Entry) {
        entry.order = self.next_order;
        self.next_order += 1;
        self.order.push_back((entry.order, hash, key.clone()));
        let old = match self.entries.find_mut(hash, |s| *s.key == *key) {
            Some(slot) => Some(std::mem::replace(&mut slot.entry, entry)),
            None => {
                self.entries
                    .insert_unique(hash, Slot { hash, key, entry }, |s| s.hash);
                None
            }
        };
        if let Some(old) = old {
            self.logged -= usize::from(old.logged.is_some());
        }
        self.logged += usize::from(entry.logged.is_some());
        while self.entries.len() > self.size {
            let Some((order, hash, key)) = self.order.pop_front() else {
                break;
            };
            if self
                .find(hash, &key)
                .is_some_and(|s| s.entry.order == order)
            {
                self.remove_hashed(hash, &key);
            }
        }
        if self.order.len() > 2 * self.entries.len() + 32 {
            let entries = &self.entries;
            self.order.retain(|(order, hash, key)| {
                entries
                    .find(*hash, |s| *s.key == **key)
                    .is_some_and(|s| s.entry.order == *order)
            });
        }
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        self.remove_hashed(key_hash(key), key)
    }

    fn remove_hashed(&mut self, hash: u64, key: &[u8]) -> Option<Entry> {
        let (old, _) = self
            .entries
            .find_entry(hash, |s| *s.key == *key)
            .ok()?
            .remove();
        self.logged -= usize::from(old.entry.logged.is_some());
        Some(old.entry)
    }

    /// Entries written to the key log.
    pub fn logged(&self) -> usize {
        self.logged
    }

    /// Entries oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.order.iter().filter_map(|(order, hash, key)| {
            self.find(*hash, key)
                .filter(|s| s.entry.order == *order)
                .map(|s| (&key[..], &s.entry))
        })
    }
}

/// What a cache says about a message's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not remembered (or expired): the message goes through.
    New,
    /// Remembered: drop the message; confirm it once the original is durable.
    Duplicate { durable_at: Option<u64> },
    /// The original is still being routed through an exchange and may yet be refused.
    InFlight,
}

/// A cache plus, for a durable queue or exchange, the log that keeps its keys across
/// restarts.
#[derive(Debug)]
pub struct Deduplicator {
    ttl_ms: Option<u64>,
    cache: Cache,
    log: Option<DurableKeys>,
}

impl Deduplicator {
    pub fn new(args: &DedupArgs) -> Deduplicator {
        Deduplicator {
            ttl_ms: args.cache_ttl_ms,
            cache: Cache::new(args.cache_size),
            log: None,
        }
    }

    /// Keeps keys in `log` from now on, after replaying the ones it recovered (in log order,
    /// so the newest `x-cache-size` survive; expired ones are dropped lazily).
    pub fn attach_log(&mut self, log: DurableKeys, recovered: Vec<KeyRecord>) {
        for r in recovered {
            let mut e = Entry::new(r.expires_at_ms, None);
            e.logged = Some(0);
            self.cache.insert(r.key.into(), e);
        }
        self.log = Some(log);
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn check(&self, key: &MessageKey, now: u64) -> Check {
        match self.cache.get_hashed(key.hash, &key.key, now) {
            None => Check::New,
            Some(e) if e.pending => Check::InFlight,
            Some(e) => Check::Duplicate {
                durable_at: e.durable_at,
            },
        }
    }

    fn expiry(&self, key: &MessageKey, now: u64) -> Option<u64> {
        key.ttl_ms.or(self.ttl_ms).map(|t| now.saturating_add(t))
    }

    /// Remembers the key of a message a queue accepted. `message_at` is the sync round its
    /// message is durable at; a `persistent` message's key is written to the log (after that
    /// round). Returns the round the publish may be confirmed after. On error nothing is
    /// remembered and the publish must be refused.
    pub fn remember(
        &mut self,
        key: &MessageKey,
        now: u64,
        message_at: Option<u64>,
        persistent: bool,
    ) -> Result<Option<u64>, StoreError> {
        let expires_at = self.expiry(key, now);
        self.keep(key, expires_at, message_at, persistent)
    }

    /// First step at an exchange: remembers the key before the message reaches its queues,
    /// so a concurrent copy is stopped; [`Deduplicator::settle`] completes it.
    pub fn remember_pending(&mut self, key: &MessageKey, now: u64) {
        let mut e = Entry::new(self.expiry(key, now), None);
        e.pending = true;
        self.cache.insert_hashed(key.hash, key.key.clone(), e);
    }

    /// Completes a key [`Deduplicator::remember_pending`] remembered, once its publish is
    /// decided: forgotten if it was refused (the publisher will retry), else kept as with
    /// [`Deduplicator::remember`]. Returns the round the publish may be confirmed after.
    pub fn settle(
        &mut self,
        key: &MessageKey,
        accepted: bool,
        message_at: Option<u64>,
        persistent: bool,
    ) -> Result<Option<u64>, StoreError> {
        let Some(entry) = self.cache.peek(&key.key).filter(|e| e.pending).copied() else {
            // Evicted meanwhile (or expired and remembered again): nothing to keep.
            return Ok(message_at);
        };
        self.cache.remove(&key.key);
        if !accepted {
            return Ok(message_at);
        }
        // Kept as the newest entry: the order keys reach the log is the order a restart
        // replays, and the cache evicts in the same order.
        self.keep(key, entry.expires_at, message_at, persistent)
    }

    /// Remembers `key` as the newest entry, writing it to the log (after round `message_at`)
    /// if `persistent`. On a log error nothing is remembered.
    fn keep(
        &mut self,
        key: &MessageKey,
        expires_at: Option<u64>,
        message_at: Option<u64>,
        persistent: bool,
    ) -> Result<Option<u64>, StoreError> {
        let mut entry = Entry::new(expires_at, message_at);
        if let (true, Some(log)) = (persistent, &self.log) {
            let (seq, epoch) = log.append(&key.key, expires_at, message_at.unwrap_or(0))?;
            entry.logged = Some(seq);
            entry.durable_at = entry.durable_at.max(Some(epoch));
        }
        self.cache.insert_hashed(key.hash, key.key.clone(), entry);
        if entry.logged.is_some() {
            self.maybe_rewrite();
        }
        Ok(entry.durable_at)
    }

    /// Rewrites the key log once most of its records are dead (evicted or replaced keys).
    /// Costs a pass over the cache, at most once per `REWRITE_SLACK` + live appends.
    fn maybe_rewrite(&mut self) {
        let Some(log) = &self.log else {
            return;
        };
        let live = self.cache.logged() as u64;
        if log.records() < 2 * live + REWRITE_SLACK {
            return;
        }
        let now = crate::queue::now_ms();
        let entries = self
            .cache
            .iter()
            .filter(|(_, e)| e.live(now))
            .filter_map(|(k, e)| e.logged.map(|seq| (k, e.expires_at, seq)));
        if let Err(e) = log.rewrite(entries) {
            tracing::error!(error = %e, "cannot rewrite a deduplication key log");
        }
    }

    /// The queue or exchange was deleted: its key log goes.
    pub fn destroy(&mut self) {
        if let Some(log) = self.log.take() {
            log.destroy();
        }
    }
}

/// An exchange's deduplicator, shared by every channel publishing through it.
#[derive(Debug)]
pub struct SharedDeduplicator {
    pub args: DedupArgs,
    /// One lock per deduplicating exchange: checking and remembering a key must be one step,
    /// or two copies published at once could both pass. Held for a hash probe and a buffered
    /// append, never across routing or I/O.
    inner: Mutex<Deduplicator>,
}

impl SharedDeduplicator {
    pub fn new(args: DedupArgs) -> SharedDeduplicator {
        let inner = Mutex::new(Deduplicator::new(&args));
        SharedDeduplicator { args, inner }
    }

    pub fn attach_log(&self, log: DurableKeys, recovered: Vec<KeyRecord>) {
        self.inner.lock().attach_log(log, recovered);
    }

    /// Keys held (tests, management).
    pub fn len(&self) -> usize {
        self.inner.lock().cache().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn destroy(&self) {
        self.inner.lock().destroy();
    }
}

/// What deduplicating exchanges did to a message on its way to its queues. Call
/// [`Routed::finish`] with the queues' outcome: keys remembered on the way are written to disk
/// only after the message (a key on disk without its message would drop the publisher's
/// retry after a crash), and forgotten if the publish is refused.
#[must_use = "finish() settles the keys deduplicating exchanges remembered"]
#[derive(Debug, Default)]
pub struct Routed {
    /// An exchange dropped the message as a copy of one durable at this round.
    durable_at: Option<u64>,
    /// An exchange dropped it as a copy of a publish still in flight: nack, so the
    /// publisher retries once that one is decided.
    refused: bool,
    persistent: bool,
    remembered: Vec<(Arc<Exchange>, MessageKey)>,
}

impl Routed {
    /// Whether `exchange` lets `msg` through. Called once per exchange the message visits.
    pub(crate) fn admit(&mut self, exchange: &Arc<Exchange>, msg: &Message, now: u64) -> bool {
        let Some(dedup) = exchange.dedup() else {
            return true;
        };
        let Some(key) = dedup.args.key_of(msg) else {
            return true;
        };
        let mut d = dedup.inner.lock();
        match d.check(&key, now) {
            Check::New => {
                d.remember_pending(&key, now);
                drop(d);
                self.persistent = msg.persistent;
                self.remembered.push((exchange.clone(), key));
                true
            }
            Check::Duplicate { durable_at } => {
                self.durable_at = self.durable_at.max(durable_at);
                false
            }
            Check::InFlight => {
                self.refused = true;
                false
            }
        }
    }

    /// No deduplicating exchange saw the message: finishing it later changes nothing.
    pub(crate) fn is_plain(&self) -> bool {
        self.remembered.is_empty() && !self.refused && self.durable_at.is_none()
    }

    /// Settles the remembered keys given what the queues did, and returns the outcome to
    /// confirm: the later of the queues' round and the keys' (or a copy's original's).
    pub fn finish(mut self, mut outcome: PublishOutcome) -> PublishOutcome {
        outcome.accepted &= !self.refused;
        outcome.durable_at = outcome.durable_at.max(self.durable_at);
        let message_at = outcome.durable_at;
        for (exchange, key) in std::mem::take(&mut self.remembered) {
            let Some(dedup) = exchange.dedup() else {
                continue;
            };
            let settled =
                dedup
                    .inner
                    .lock()
                    .settle(&key, outcome.accepted, message_at, self.persistent);
            match settled {
                Ok(at) => outcome.durable_at = outcome.durable_at.max(at),
                // A deleted exchange's keys need no disk.
                Err(StoreError::Destroyed { .. }) => {}
                Err(e) => {
                    tracing::error!(exchange = %exchange.name(), error = %e, "cannot write a deduplication key; refusing the publish");
                    outcome.accepted = false;
                }
            }
        }
        outcome
    }
}

impl Drop for Routed {
    /// A caller that never finished: settle as accepted with nothing to wait for, so the
    /// keys do not stay in flight (and refuse every copy) for ever.
    fn drop(&mut self) {
        if !self.remembered.is_empty() {
            let _ = std::mem::take(self).finish(PublishOutcome::ACCEPTED);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry() -> Entry {
        Entry::new(None, None)
    }

    fn key(k: &str) -> Arc<[u8]> {
        k.as_bytes().into()
    }

    fn keys(c: &Cache) -> Vec<String> {
        c.iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn eviction_goes_by_insertion_order() {
        let mut c = Cache::new(3);
        for k in ["a", "b", "c", "d", "e"] {
            c.insert(key(k), entry());
        }
        assert_eq!(keys(&c), ["c", "d", "e"]);
        assert_eq!(c.len(), 3);
        // Looking a key up does not make it newer.
        assert!(c.get(b"c", 0).is_some());
        c.insert(key("f"), entry());
        assert_eq!(keys(&c), ["d", "e", "f"]);
    }

    #[test]
    fn an_expired_key_stays_in_its_slot_until_remembered_again() {
        let mut c = Cache::new(3);
        c.insert(key("a"), Entry::new(Some(10), None));
        c.insert(key("b"), entry());
        assert!(c.get(b"a", 9).is_some());
        assert!(c.get(b"a", 10).is_none());
        assert_eq!(c.len(), 2);
        c.insert(key("a"), Entry::new(Some(50), None));
        assert_eq!(keys(&c), ["b", "a"]);
        assert!(c.get(b"a", 10).is_some());
    }

    #[test]
    fn re_insertions_do_not_grow_the_order_queue_without_bound() {
        let mut c = Cache::new(4);
        for k in ["w", "x", "y"] {
            c.insert(key(k), entry());
        }
        for _ in 0..10_000 {
            c.insert(key("hot"), Entry::new(Some(0), None));
        }
        assert_eq!(keys(&c), ["w", "x", "y", "hot"]);
        assert!(c.order.len() <= 2 * c.len() + 33, "{}", c.order.len());
    }

    #[test]
    fn logged_count_follows_inserts_updates_and_evictions() {
        let mut c = Cache::new(2);
        let mut e = entry();
        e.logged = Some(1);
        c.insert(key("a"), e);
        c.insert(key("b"), entry());
        assert_eq!(c.logged(), 1);
        // Remembered again, now written to the log: it becomes the newest.
        let mut e = entry();
        e.logged = Some(2);
        c.insert(key("b"), e);
        assert_eq!(c.logged(), 2);
        c.insert(key("c"), entry());
        assert_eq!(
            (c.logged(), keys(&c)),
            (1, vec!["b".to_owned(), "c".to_owned()])
        );
        c.remove(b"b");
        assert_eq!(c.logged(), 0);
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn msg_with(headers: &[(&str, AMQPValue)], persistent: bool) -> Message {
        let props = rill_codec::BasicProperties::default()
            .with_headers(table(headers))
            .with_delivery_mode(if persistent { 2 } else { 1 });
        Message::new(
            "".into(),
            Bytes::from_static(b"q"),
            rill_codec::encode_properties(&props),
            Bytes::from_static(b"body"),
        )
    }

    fn args(size: usize, ttl: Option<u64>) -> DedupArgs {
        DedupArgs {
            header: DEFAULT_HEADER.into(),
            cache_size: size,
            cache_ttl_ms: ttl,
            persist: true,
        }
    }

    #[test]
    fn keys_are_equal_across_wire_types_as_in_rabbitmq() {
        let a = args(8, None);
        let k = |v: AMQPValue| {
            a.key_of(&msg_with(&[(DEFAULT_HEADER, v)], false))
                .unwrap()
                .key
        };
        // (Short strings are not a field type in RabbitMQ's tables; byte arrays are.)
        assert_eq!(
            k(AMQPValue::LongString("42".into())),
            k(AMQPValue::ByteArray(b"42".to_vec().into()))
        );
        assert_eq!(
            k(AMQPValue::ShortShortInt(42)),
            k(AMQPValue::LongLongInt(42))
        );
        assert_eq!(k(AMQPValue::LongUInt(42)), k(AMQPValue::ShortUInt(42)));
        assert_ne!(
            k(AMQPValue::LongString("42".into())),
            k(AMQPValue::LongInt(42))
        );
        assert_ne!(k(AMQPValue::LongInt(42)), k(AMQPValue::Double(42.0)));
        assert_eq!(k(AMQPValue::Float(4.5)), k(AMQPValue::Double(4.5)));
        assert_eq!(k(AMQPValue::Void), k(AMQPValue::Void));
        assert_ne!(k(AMQPValue::Boolean(true)), k(AMQPValue::Boolean(false)));
    }

    #[test]
    fn messages_without_the_header_have_no_key() {
        let a = args(8, None);
        assert_eq!(a.key_of(&msg_with(&[], false)), None);
        assert_eq!(
            a.key_of(&msg_with(&[("other", AMQPValue::LongInt(1))], false)),
            None
        );
        let custom = DedupArgs {
            header: "id".into(),
            ..args(8, None)
        };
        let m = msg_with(
            &[
                ("id", AMQPValue::LongString("x".into())),
                (TTL_ARG, AMQPValue::ShortShortUInt(7)),
            ],
            false,
        );
        let k = custom.key_of(&m).unwrap();
        assert_eq!(k.ttl_ms, Some(7));
        assert_eq!(a.key_of(&m), None);
    }

    fn mk(k: &str, ttl: Option<u64>) -> MessageKey {
        MessageKey::new(key(k), ttl)
    }

    #[test]
    fn remembered_keys_are_duplicates_until_their_ttl_passes() {
        let mut d = Deduplicator::new(&args(8, Some(100)));
        assert_eq!(d.check(&mk("a", None), 0), Check::New);
        assert_eq!(
            d.remember(&mk("a", None), 0, Some(3), true).unwrap(),
            Some(3)
        );
        assert_eq!(
            d.remember(&mk("b", Some(10)), 0, None, false).unwrap(),
            None
        );
        assert_eq!(
            d.check(&mk("a", None), 99),
            Check::Duplicate {
                durable_at: Some(3)
            }
        );
        assert_eq!(
            d.check(&mk("b", None), 9),
            Check::Duplicate { durable_at: None }
        );
        // The message's own x-cache-ttl beat the argument.
        assert_eq!(d.check(&mk("b", None), 10), Check::New);
        assert_eq!(d.check(&mk("a", None), 100), Check::New);
    }

    #[test]
    fn a_key_in_flight_is_settled_or_forgotten() {
        let mut d = Deduplicator::new(&args(8, None));
        d.remember_pending(&mk("a", None), 0);
        d.remember_pending(&mk("b", None), 0);
        assert_eq!(d.check(&mk("a", None), 0), Check::InFlight);
        assert_eq!(
            d.settle(&mk("a", None), true, Some(5), false).unwrap(),
            Some(5)
        );
        assert_eq!(
            d.check(&mk("a", None), 0),
            Check::Duplicate {
                durable_at: Some(5)
            }
        );
        // Refused (e.g. a full queue nacked it): the retry must go through.
        d.settle(&mk("b", None), false, None, false).unwrap();
        assert_eq!(d.check(&mk("b", None), 0), Check::New);
    }

    /// Publishes like a channel does: route, offer to each queue, settle.
    fn publish(vh: &crate::vhost::VHost, x: &Arc<Exchange>, key: &str) -> (usize, PublishOutcome) {
        let msg = Arc::new(msg_with(
            &[(DEFAULT_HEADER, AMQPValue::LongString(key.into()))],
            false,
        ));
        let mut queues = Vec::new();
        let routed = vh.route_message(x, &msg, &mut queues);
        let mut outcome = PublishOutcome::ACCEPTED;
        for q in &queues {
            let o = q.publish(msg.clone());
            outcome.accepted &= o.accepted;
        }
        (queues.len(), routed.finish(outcome))
    }

    #[test]
    fn an_exchange_routes_no_copy_and_forgets_the_keys_of_refused_publishes() {
        use crate::vhost::{ExchangeDeclare, QueueDeclare, VHost};
        let vh = VHost::new("/", None);
        let x = vh
            .declare_exchange(ExchangeDeclare {
                name: "x",
                kind: EXCHANGE_TYPE,
                passive: false,
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: fields(&[(SIZE_ARG, AMQPValue::LongInt(10))]),
            })
            .unwrap();
        let full_args = fields(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]);
        let q = vh
            .declare_queue(
                1,
                QueueDeclare {
                    name: "q",
                    passive: false,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    arguments: full_args,
                },
            )
            .unwrap();
        vh.bind_queue(1, "q", "x", "", FieldTable::default())
            .unwrap();
        assert_eq!(publish(&vh, &x, "a"), (1, PublishOutcome::ACCEPTED));
        // A copy reaches no queue and is confirmed.
        assert_eq!(publish(&vh, &x, "a"), (0, PublishOutcome::ACCEPTED));
        // The full queue refuses "b": nacked, and not remembered, so the retry gets through.
        assert_eq!(publish(&vh, &x, "b"), (1, PublishOutcome::REFUSED));
        assert_eq!(q.purge(), 1);
        assert_eq!(publish(&vh, &x, "b"), (1, PublishOutcome::ACCEPTED));
        assert_eq!(x.dedup().map(SharedDeduplicator::len), Some(2));
    }

    #[test]
    fn a_queue_drops_copies_and_counts_them() {
        use crate::queue::{Queue, QueueConfig};
        let q = Queue::new(QueueConfig {
            name: "q".into(),
            durable: false,
            auto_delete: false,
            exclusive_owner: None,
            arguments: fields(&[(DEDUP_ARG, AMQPValue::Boolean(true))]),
        });
        let m = |k: &str| {
            Arc::new(msg_with(
                &[(DEFAULT_HEADER, AMQPValue::LongString(k.into()))],
                false,
            ))
        };
        for k in ["a", "a", "b", "a"] {
            assert!(q.publish(m(k)).accepted);
        }
        assert!(q.publish(Arc::new(msg_with(&[], false))).accepted);
        assert_eq!(q.message_count(), 3);
        assert_eq!(
            q.counters()
                .deduplicated
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    fn fields(entries: &[(&str, AMQPValue)]) -> FieldTable {
        table(entries)
    }

    fn queue_err(entries: &[(&str, AMQPValue)]) -> String {
        DedupArgs::for_queue(
            &fields(entries),
            QueueType::Classic,
            "queue 'q' in vhost '/'",
        )
        .unwrap_err()
        .text
    }

    #[test]
    fn arguments_are_validated_with_the_plugins_texts() {
        let on = (DEDUP_ARG, AMQPValue::Boolean(true));
        assert_eq!(
            DedupArgs::for_queue(&fields(std::slice::from_ref(&on)), QueueType::Classic, "q")
                .unwrap(),
            Some(DedupArgs {
                header: DEFAULT_HEADER.into(),
                cache_size: DEFAULT_CACHE_SIZE,
                cache_ttl_ms: None,
                persist: true
            })
        );
        assert_eq!(
            DedupArgs::for_queue(
                &fields(&[(SIZE_ARG, AMQPValue::LongInt(-1))]),
                QueueType::Classic,
                "q"
            )
            .unwrap(),
            None,
            "without x-message-deduplication the cache arguments are someone else's"
        );
        assert_eq!(
            queue_err(&[on.clone(), (TTL_ARG, AMQPValue::LongString("soon".into()))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-cache-ttl' must be an integer greater than 0"
        );
        assert_eq!(
            queue_err(&[on.clone(), (PERSISTENCE_ARG, AMQPValue::LongString("tape".into()))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-cache-persistence' must be either 'disk' or 'memory'"
        );
        assert_eq!(
            queue_err(&[(DEDUP_ARG, AMQPValue::LongString("yes".into()))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-message-deduplication' must be a boolean, not longstr"
        );
        assert_eq!(
            queue_err(&[on.clone(), (HEADER_ARG, AMQPValue::LongInt(1))]),
            "PRECONDITION_FAILED - Invalid argument, 'x-deduplication-header' must be a non-empty string, not signedint"
        );
        assert_eq!(
            DedupArgs::for_queue(&fields(std::slice::from_ref(&on)), QueueType::Stream, "queue 's' in vhost '/'")
                .unwrap_err()
                .text,
            "PRECONDITION_FAILED - invalid arg 'x-message-deduplication' for queue 's' in vhost '/' of queue type rabbit_stream_queue"
        );
        // The plugin's exchange type needs a size; numbers may come as strings.
        assert_eq!(
            DedupArgs::for_exchange(true, &FieldTable::default()).unwrap_err().text,
            "PRECONDITION_FAILED - Missing or invalid argument, 'x-cache-size' must be an integer greater than 0"
        );
        let x = DedupArgs::for_exchange(
            true,
            &fields(&[
                (SIZE_ARG, AMQPValue::LongString("10".into())),
                (TTL_ARG, AMQPValue::ShortInt(1000)),
                (PERSISTENCE_ARG, AMQPValue::LongString("memory".into())),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (x.cache_size, x.cache_ttl_ms, x.persist),
            (10, Some(1000), false)
        );
        assert_eq!(
            DedupArgs::for_exchange(false, &FieldTable::default()).unwrap(),
            None
        );
        assert!(DedupArgs::for_exchange(false, &fields(&[on]))
            .unwrap()
            .is_some());
    }
}
