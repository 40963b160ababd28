//! Exchanges: bindings and routing. One module per matching rule (`topic`, `headers`); direct
//! and fanout are small enough to live here, and so is the deduplication plugin's type, which
//! routes like fanout (its cache lives in [`crate::dedup`]; any exchange may have one).

pub mod headers;
pub mod topic;

use crate::dedup::{DedupArgs, SharedDeduplicator};
use crate::queue::Queue;
use parking_lot::RwLock;
use rill_codec::FieldTable;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
    /// The message-deduplication plugin's `x-message-deduplication`: drops duplicates, then
    /// routes like fanout.
    Deduplication,
}

impl ExchangeKind {
    /// Recognises the exchange types we implement, as named on the wire.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            crate::dedup::EXCHANGE_TYPE => Self::Deduplication,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::Deduplication => crate::dedup::EXCHANGE_TYPE,
        }
    }
}

/// Declared properties of an exchange, compared on redeclaration.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeConfig {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// Where a binding leads.
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(Arc<str>),
}

impl Destination {
    fn same(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => Arc::ptr_eq(a, b),
            (Destination::Exchange(a), Destination::Exchange(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
    /// Pre-split topic pattern (topic exchanges only).
    topic_words: Vec<String>,
}

impl Binding {
    pub fn new(destination: Destination, routing_key: String, arguments: FieldTable) -> Self {
        let topic_words = topic::split_words(&routing_key);
        Binding {
            destination,
            routing_key,
            arguments,
            topic_words,
        }
    }

    fn same(&self, other: &Binding) -> bool {
        self.destination.same(&other.destination)
            && self.routing_key == other.routing_key
            && self.arguments == other.arguments
    }
}

#[derive(Debug)]
pub struct Exchange {
    pub config: ExchangeConfig,
    bindings: RwLock<Bindings>,
    /// Keys of recent messages, for the deduplication type or `x-message-deduplication`.
    dedup: Option<SharedDeduplicator>,
}

/// Bindings of one exchange. Direct exchanges index by routing key so a publish costs one hash
/// lookup; the others scan (fanout takes all, topic and headers test each binding).
#[derive(Debug, Default)]
struct Bindings {
    by_key: HashMap<String, Vec<Binding>>,
    list: Vec<Binding>,
}

impl Exchange {
    /// An exchange; its deduplication settings come from its arguments, which a declaration
    /// has validated ([`DedupArgs::for_exchange`]).
    pub fn new(config: ExchangeConfig) -> Arc<Exchange> {
        let dedup = match DedupArgs::for_exchange(
            config.kind == ExchangeKind::Deduplication,
            &config.arguments,
        ) {
            Ok(d) => d.map(SharedDeduplicator::new),
            Err(e) => {
                tracing::warn!(exchange = %config.name, error = %e, "invalid deduplication arguments; not deduplicating");
                None
            }
        };
        Arc::new(Exchange {
            config,
            bindings: RwLock::new(Bindings::default()),
            dedup,
        })
    }

    /// Its deduplication cache, if it has one.
    pub fn dedup(&self) -> Option<&SharedDeduplicator> {
        self.dedup.as_ref()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The alternate exchange named in the declaration arguments, if any.
    pub fn alternate_exchange(&self) -> Option<String> {
        match self.config.arguments.inner().get("alternate-exchange")? {
            rill_codec::AMQPValue::LongString(s) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            rill_codec::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    /// Adds a binding; binding the same thing twice is a no-op.
    pub fn bind(&self, binding: Binding) {
        let mut b = self.bindings.write();
        if self.config.kind == ExchangeKind::Direct {
            let list = b.by_key.entry(binding.routing_key.clone()).or_default();
            if !list.iter().any(|x| x.same(&binding)) {
                list.push(binding);
            }
        } else if !b.list.iter().any(|x| x.same(&binding)) {
            b.list.push(binding);
        }
    }

    /// Removes a binding; returns whether it existed.
    pub fn unbind(&self, binding: &Binding) -> bool {
        let mut b = self.bindings.write();
        if self.config.kind == ExchangeKind::Direct {
            let Some(list) = b.by_key.get_mut(&binding.routing_key) else {
                return false;
            };
            let before = list.len();
            list.retain(|x| !x.same(binding));
            let removed = list.len() != before;
            if list.is_empty() {
                b.by_key.remove(&binding.routing_key);
            }
            removed
        } else {
            let before = b.list.len();
            b.list.retain(|x| !x.same(binding));
            b.list.len() != before
        }
    }

    /// Removes every binding to `destination`; returns how many went.
    pub fn unbind_destination(&self, destination: &Destination) -> usize {
        let mut b = self.bindings.write();
        let mut removed = 0;
        b.by_key.retain(|_, list| {
            let before = list.len();
            list.retain(|x| !x.destination.same(destination));
            removed += before - list.len();
            !list.is_empty()
        });
        let before = b.list.len();
        b.list.retain(|x| !x.destination.same(destination));
        removed + before - b.list.len()
    }

    pub fn has_bindings(&self) -> bool {
        let b = self.bindings.read();
        !b.by_key.is_empty() || !b.list.is_empty()
    }

    pub fn has_binding(&self, binding: &Binding) -> bool {
        let b = self.bindings.read();
        b.by_key
            .get(&binding.routing_key)
            .is_some_and(|l| l.iter().any(|x| x.same(binding)))
            || b.list.iter().any(|x| x.same(binding))
    }

    pub fn bindings(&self) -> Vec<Binding> {
        let b = self.bindings.read();
        b.by_key
            .values()
            .flatten()
            .chain(&b.list)
            .cloned()
            .collect()
    }

    /// Appends the destinations this exchange itself selects for a message.
    /// `headers` is only consulted by headers exchanges; pass `None` when the message has none.
    pub fn route(
        &self,
        routing_key: &str,
        headers: impl FnOnce() -> Option<FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        let b = self.bindings.read();
        match self.config.kind {
            ExchangeKind::Direct => {
                if let Some(list) = b.by_key.get(routing_key) {
                    out.extend(list.iter().map(|x| x.destination.clone()));
                }
            }
            ExchangeKind::Fanout | ExchangeKind::Deduplication => {
                out.extend(b.list.iter().map(|x| x.destination.clone()))
            }
            ExchangeKind::Topic => out.extend(
                b.list
                    .iter()
                    .filter(|x| topic::matches(&x.topic_words, routing_key))
                    .map(|x| x.destination.clone()),
            ),
            ExchangeKind::Headers => {
                let h = headers();
                out.extend(
                    b.list
                        .iter()
                        .filter(|x| headers::matches(&x.arguments, h.as_ref()))
                        .map(|x| x.destination.clone()),
                );
            }
        }
    }
}
