//! Benchmark jobs shared by `rill bench` and the `bench_wordcount` example, so both measure
//! exactly the same code.
//!
//! The word count follows `../shared/bench/flink_wordcount.py`: ids `1..=N` from a parallel
//! sequence source, word = `"w" + (id * 7919 % V)`, keyed running count (`sum`), and a sink
//! that keeps each key's last running count so the final counts can be checked to sum to N.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

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

/// The number in a word `"w<number>"`.
#[inline]
fn word_number(word: &ShortStr) -> Option<usize> {
    let digits = word.as_bytes().strip_prefix(b"w")?;
    let mut n: usize = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    Some(n)
}

/// Runs the keyed running word count over `events` words on `env`.
///
/// The job keys by the word string itself; only the checking sink uses the number inside
/// a word, to keep each word's last running count in a dense array instead of a second
/// hash map (its cost is not the engine's).
pub fn wordcount(
    env: &StreamExecutionEnvironment,
    events: u64,
    vocab: u64,
) -> Result<WordcountReport, StreamError> {
    let totals = CollectSink::new();
    let sink = totals.clone();
    let slots =
        usize::try_from(vocab.max(1)).map_err(|_| StreamError::Config("vocab too large".into()))?;
    let result = env.execute("wordcount-bench", move |env| {
        env.from_sequence(1, events)
            .map(move |id| (word_of(id, vocab), 1u64))
            .key_by(|t| t.0)
            .sum(|t| &mut t.1)
            // Each word's last running count (per worker, then merged on worker 0: every word
            // is counted by exactly one worker).
            .fold_at_end(
                vec![0u64; slots],
                |last, (word, count)| {
                    if let Some(slot) = word_number(&word).and_then(|i| last.get_mut(i)) {
                        *slot = count;
                    }
                },
                |last, part| {
                    for (a, b) in last.iter_mut().zip(part) {
                        *a = (*a).max(b);
                    }
                },
            )
            .collect_into(&sink);
    })?;
    let total = totals.take().pop();
    Ok(WordcountReport {
        events,
        keys: total
            .as_ref()
            .map(|t| t.iter().filter(|c| **c > 0).count() as u64),
        sum_of_counts: total.as_ref().map(|t| t.iter().sum()),
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
