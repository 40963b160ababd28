//! The built-in `wordcount`: the user's two examples joined — pika's `send.py` feeding a
//! queue, Flink's WordCount counting it — as one job that reads a queue and writes a queue.
//!
//! The contract (tooling outside the repository relies on it):
//! - the source and sink queues are declared as durable classic queues if missing (with
//!   `durable_queues = false`, as transient ones; an existing queue is used as it is);
//! - each source message body is UTF-8 text, split on Unicode whitespace;
//! - each word occurrence bumps that word's running count and publishes one persistent
//!   message to the sink queue through the default exchange, with body
//!   `{"word":"<w>","count":<n>}` and a `message_id` (see [`message_id`]);
//! - a body that is not UTF-8 is bad input, handled by the job's `bad_input` policy;
//! - with checkpoints, a sink queue the job declares deduplicates on
//!   `x-deduplication-header`, which the job sets on every message (`job/epoch/worker/seq`),
//!   so that its output is exactly-once (`docs/exactly-once.md`).

use crate::spec::JobOptions;
use rill_broker::jobs::JobCounters;
use rill_codec::{AMQPValue, BasicProperties, FieldTable, ShortString};
use rill_connect::transport::QueueSetup;
use rill_connect::{Endpoint, QueueSink, QueueSource};
use rill_stream::JobEnv;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One output message: a word and its running count.
///
/// ```
/// use rill_jobs::wordcount::WordCount;
/// let wc = WordCount { word: "Hello".into(), count: 1 };
/// assert_eq!(serde_json::to_string(&wc).unwrap(), r#"{"word":"Hello","count":1}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WordCount {
    pub word: String,
    pub count: u64,
}

/// The words of a message body: split on Unicode whitespace (`char::is_whitespace`).
///
/// ```
/// use rill_jobs::wordcount::words;
/// assert_eq!(words("Hello World!"), ["Hello", "World!"]);
/// assert_eq!(words(" a\u{3000}b\u{a0}c\n"), ["a", "b", "c"]);
/// ```
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// The `message_id` of the message for `count` of `word`: the same every time that count is
/// published, so a consumer can drop a copy republished after a crash. `<count>:<word>`,
/// with words too long for the property (255 bytes) replaced by a hash of them.
///
/// ```
/// use rill_jobs::wordcount::message_id;
/// assert_eq!(message_id("Hello", 2), "2:Hello");
/// assert_eq!(message_id(&"x".repeat(300), 1).len(), "1:#".len() + 16);
/// ```
pub fn message_id(word: &str, count: u64) -> String {
    let id = format!("{count}:{word}");
    if id.len() <= 255 {
        return id;
    }
    // FNV-1a: stable across runs and builds (the std hasher is not).
    let hash = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{count}:#{hash:016x}")
}

/// A word count job: its name (in output ids) and queues.
#[derive(Debug, Clone, Copy)]
pub struct Wordcount<'a> {
    pub name: &'a str,
    pub source_queue: &'a str,
    pub sink_queue: &'a str,
    pub options: &'a JobOptions,
}

/// Keys a deduplicating sink queue remembers (`x-cache-size`), when the job declares it: it
/// must cover the output a restored job may publish again, the pending output of about two
/// checkpoints.
pub const SINK_DEDUP_CACHE: i32 = 1_000_000;

/// How long it remembers them (`x-cache-ttl`, ms): a republish follows a restart within
/// seconds; an hour leaves room for a broker that was down a while.
pub const SINK_DEDUP_TTL_MS: i32 = 3_600_000;

/// The arguments a job with checkpoints declares its sink queue with: deduplicating on the
/// message ids the two-phase commit stamps, remembering [`SINK_DEDUP_CACHE`] of them for
/// [`SINK_DEDUP_TTL_MS`]. A client that declares the queue first must use the same ones.
///
/// ```
/// let args = rill_jobs::wordcount::sink_queue_arguments();
/// assert_eq!(args.inner().len(), 3);
/// ```
pub fn sink_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    rill_codec::field_table_insert(
        &mut arguments,
        "x-message-deduplication",
        AMQPValue::Boolean(true),
    );
    // 32-bit integers, as pika and most clients send them: redeclaring the queue with the
    // same numbers from such a client is then equivalent (RabbitMQ compares argument types
    // too).
    rill_codec::field_table_insert(
        &mut arguments,
        "x-cache-size",
        AMQPValue::LongInt(SINK_DEDUP_CACHE),
    );
    rill_codec::field_table_insert(
        &mut arguments,
        "x-cache-ttl",
        AMQPValue::LongInt(SINK_DEDUP_TTL_MS),
    );
    arguments
}

/// Adds the word count to the job being built on `env`: the source queue → words → running
/// count per word → the sink queue. With checkpoints, exactly-once: the source remembers
/// input ids, the sink is a two-phase commit, and a sink queue the job declares
/// deduplicates (`x-message-deduplication`).
pub fn build(
    env: &JobEnv<'_>,
    endpoint: &Endpoint,
    wc: &Wordcount<'_>,
    counters: &Arc<JobCounters>,
) {
    let options = wc.options;
    let exactly_once = options.checkpointing();
    let setup = |dedup: bool| {
        if !options.declare_queues {
            return QueueSetup::Existing;
        }
        QueueSetup::DeclareIfMissing {
            durable: options.durable_queues,
            arguments: if dedup {
                sink_queue_arguments()
            } else {
                FieldTable::default()
            },
        }
    };
    let mut source = QueueSource::new(endpoint.clone(), wc.source_queue)
        .text()
        .prefetch(options.prefetch(endpoint.is_embedded()))
        .setup(setup(false))
        .bad_input(options.bad_input)
        .counters(counters.clone());
    if exactly_once {
        source = source.exactly_once(rill_connect::source::DEFAULT_REMEMBERED_CHECKPOINTS);
    }
    let lines = source.build(env);
    let counts = lines
        .flat_map(|line: String| {
            words(&line)
                .into_iter()
                .map(|w| (w.to_owned(), 1u64))
                .collect::<Vec<_>>()
        })
        .key_by(|(word, _)| word.clone())
        .sum(|t| &mut t.1)
        .map(|(word, count)| WordCount { word, count });
    let mut sink = QueueSink::to_queue(endpoint.clone(), wc.sink_queue)
        .json()
        .setup(setup(exactly_once))
        .properties(|wc: &WordCount| {
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(message_id(&wc.word, wc.count)))
        })
        .counters(counters.clone());
    if exactly_once {
        sink = sink.exactly_once(wc.name);
    }
    sink.build(counts);
}
