//! Benchmark jobs shared by `rill bench` and the `bench_wordcount` example, so both measure
//! exactly the same code: the keyed word count, its plain-loop baseline, and checkpointing a
//! large keyed state ([`checkpoint`]).
//!
//! The word count follows `../shared/bench/flink_wordcount.py`: ids `1..=N` from a parallel
//! sequence source, word = `"w" + (id * 7919 % V)`, keyed running count (`sum`), and a sink
//! that keeps each key's last running count so the final counts can be checked to sum to N.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::checkpoint::{CheckpointConfig, CompletedCheckpoint};
use crate::{
    CollectSink, ReaderOutput, ReaderStatus, ShortStr, SourceReader, StreamError,
    StreamExecutionEnvironment, WatermarkStrategy,
};

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

/// What the checkpoint benchmark measured.
#[derive(Clone, Debug)]
pub struct CheckpointReport {
    /// Distinct keys in the keyed state.
    pub keys: u64,
    /// The checkpoint triggered once every key was counted.
    pub checkpoint: CompletedCheckpoint,
    /// From calling `execute` on a new environment (restoring that state) until the first
    /// output of a new record reached the sink.
    pub restore_to_first_output: Duration,
    /// The count the new record's key had after the restore (2: the state came back).
    pub restored_count: u64,
}

/// Emits `(key, 1)` for keys `next..end`, then idles until stopped — or, if `finish`, emits
/// key 0 once more and finishes; its position is `next`.
struct Keys {
    worker: usize,
    next: u64,
    end: u64,
    finish: bool,
}

impl SourceReader<(ShortStr, u64)> for Keys {
    fn poll(
        &mut self,
        out: &mut ReaderOutput<'_, (ShortStr, u64)>,
    ) -> Result<ReaderStatus, StreamError> {
        for _ in 0..4096 {
            if self.next >= self.end {
                if !self.finish {
                    return Ok(ReaderStatus::Idle);
                }
                if self.worker == 0 {
                    out.collect((key_of(0), 1));
                }
                return Ok(ReaderStatus::Finished);
            }
            out.collect((key_of(self.next), 1));
            self.next += 1;
        }
        Ok(ReaderStatus::MoreAvailable)
    }

    fn snapshot(&mut self, _epoch: u64) -> Result<Vec<u8>, StreamError> {
        Ok(self.next.to_le_bytes().to_vec())
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        // Restored at the parallelism it ran at: its own position.
        if let Some(Ok(b)) = snapshots
            .get(self.worker)
            .map(|s| <[u8; 8]>::try_from(s.as_slice()))
        {
            self.next = u64::from_le_bytes(b);
        }
        Ok(())
    }
}

/// Running counts of `keys` distinct keys, split evenly over the workers' [`Keys`] readers.
fn key_counts<'s>(
    env: &crate::JobEnv<'s>,
    keys: u64,
    finish: bool,
) -> crate::DataStream<'s, (ShortStr, u64)> {
    env.from_reader(
        move |w, n| {
            let (w, n) = (w as u64, n as u64);
            Keys {
                worker: w as usize,
                next: keys * w / n,
                end: keys * (w + 1) / n,
                finish,
            }
        },
        WatermarkStrategy::no_watermarks(),
        "keys",
    )
    .key_by(|t| t.0)
    .sum(|t| &mut t.1)
}

fn key_of(i: u64) -> ShortStr {
    let mut k = ShortStr::default();
    let _ = write!(k, "k{i}");
    k
}

/// Builds keyed running counts of `keys` distinct keys, takes a checkpoint of them into
/// `dir` (triggered once every key is counted), stops with a savepoint, then restores in a
/// new environment and times how long until the first new record's count comes out.
pub fn checkpoint(dir: &Path, keys: u64, workers: usize) -> Result<CheckpointReport, StreamError> {
    let config = CheckpointConfig::new(dir).with_interval(Duration::from_secs(3600));
    let env = |config: &CheckpointConfig| {
        let mut env = StreamExecutionEnvironment::new()
            .with_parallelism(workers.max(1))
            .with_epoch_interval(Duration::from_millis(10));
        env.set_checkpointing(config.clone());
        env
    };

    // Build the state; checkpoint it once complete.
    let first = env(&config);
    let (trigger, stop) = (first.checkpoint_trigger(), first.stop_handle());
    let counted = Arc::new(AtomicU64::new(0));
    let c = counted.clone();
    let job = std::thread::spawn(move || {
        first.execute("checkpoint-bench", move |env| {
            let c = c.clone();
            key_counts(env, keys, false).add_sink(move |_: (ShortStr, u64), _| {
                c.fetch_add(1, Ordering::Relaxed);
            });
        })
    });
    while counted.load(Ordering::Relaxed) < keys && !job.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let id = trigger.trigger();
    let done = id.and_then(|id| trigger.wait_for(id, Duration::from_secs(600)));
    stop.stop();
    let ended = job
        .join()
        .map_err(|_| StreamError::Worker("the benchmark job panicked".into()))?;
    ended?;
    let checkpoint = done
        .ok_or_else(|| StreamError::Worker("the triggered checkpoint did not complete".into()))?;

    // Restore it and count one more record of key 0.
    let second = env(&config);
    let first_output: Arc<Mutex<Option<(Instant, u64)>>> = Arc::default();
    let out = first_output.clone();
    let started = Instant::now();
    second.execute("checkpoint-bench", move |env| {
        let out = out.clone();
        key_counts(env, keys, true).add_sink(move |(_, n): (ShortStr, u64), _| {
            let mut slot = match out.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            slot.get_or_insert((Instant::now(), n));
        });
    })?;
    let (at, restored_count) = match first_output.lock() {
        Ok(g) => *g,
        Err(p) => *p.into_inner(),
    }
    .ok_or_else(|| StreamError::Worker("the restored job emitted nothing".into()))?;
    Ok(CheckpointReport {
        keys,
        checkpoint,
        restore_to_first_output: at.saturating_duration_since(started),
        restored_count,
    })
}
