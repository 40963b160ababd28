//! Benchmark jobs shared by `rill bench` and the `bench_wordcount` example, so both measure
//! exactly the same code.
//!
//! The word count follows `../shared/bench/flink_wordcount.py`: ids `1..=N` from a parallel
//! sequence source, word = `"w" + (id * 7919 % V)`, keyed running count (`sum`), and a sink
//! that keeps each key's last running count so the final counts can be checked to sum to N.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::hash::FxHashMap;
use crate::{CollectSink, ShortStr, StreamError, StreamExecutionEnvironment};

/// What a word-count run measured.
#[derive(Clone, Debug)]
pub struct WordcountReport {
    /// Words processed (N).
    pub events: u64,
    /// Distinct words seen (only known in the process hosting worker 0).
    pub keys: Option<u64>,
    /// Sum of the final per-word counts (only known in the process hosting worker 0).
    pub sum_of_counts: Option<u64>,
    /// Wall time of the job.
    pub runtime: Duration,
}

impl WordcountReport {
    /// Events per second.
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.runtime.as_secs_f64().max(1e-9)
    }
}

/// The word with id `id`: `"w" + (id * 7919 % vocab)`.
#[inline]
pub fn word_of(id: u64, vocab: u64) -> ShortStr {
    let mut word = ShortStr::default();
    // "w" and a u64 always fit in 23 bytes.
    let _ = write!(word, "w{}", id.wrapping_mul(7919) % vocab.max(1));
    word
}

/// Runs the keyed running word count over `events` words on `env`.
pub fn wordcount(
    env: &StreamExecutionEnvironment,
    events: u64,
    vocab: u64,
) -> Result<WordcountReport, StreamError> {
    let totals = CollectSink::new();
    let sink = totals.clone();
    let result = env.execute("wordcount-bench", move |env| {
        env.from_sequence(1, events)
            .map(move |id| (word_of(id, vocab), 1u64))
            .key_by(|t| t.0)
            .sum(|t| &mut t.1)
            // Per worker: each key's last running count; then (keys, sum of counts) globally.
            .fold_at_end(
                (FxHashMap::<ShortStr, u64>::default(), 0u64, 0u64),
                |acc, (word, count)| {
                    acc.0.insert(word, count);
                },
                |acc, part| {
                    acc.1 += part.1 + part.0.len() as u64;
                    acc.2 += part.2 + part.0.values().sum::<u64>();
                },
            )
            .collect_into(&sink);
    })?;
    let total = totals.take().pop();
    Ok(WordcountReport {
        events,
        keys: total.as_ref().map(|t| t.1),
        sum_of_counts: total.as_ref().map(|t| t.2),
        runtime: result.net_runtime,
    })
}

/// The limit: generate and count the same words in a plain single-threaded loop over a std
/// `HashMap`, formatting each word into one reused buffer.
pub fn wordcount_baseline(events: u64, vocab: u64) -> WordcountReport {
    let start = Instant::now();
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut buf = String::new();
    for id in 1..=events {
        buf.clear();
        let _ = write!(buf, "w{}", id.wrapping_mul(7919) % vocab.max(1));
        match counts.get_mut(buf.as_str()) {
            Some(c) => *c += 1,
            None => {
                counts.insert(buf.clone(), 1);
            }
        }
    }
    let runtime = start.elapsed();
    WordcountReport {
        events,
        keys: Some(counts.len() as u64),
        sum_of_counts: Some(counts.values().sum()),
        runtime,
    }
}
