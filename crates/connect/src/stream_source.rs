//! The stream-queue source: a job reads stream queues (`x-queue-type=stream`) from an
//! `x-stream-offset`, and tracks its position in each.
//!
//! Several stream queues are the partitions of one input; each is owned by exactly one worker
//! (partition `i` by worker `i % parallelism`), so each partition is read in order by one
//! consumer, and a worker may own several. A stream is never consumed away: acks are flow
//! control (the prefetch window) and are given when an epoch completes, like a queue
//! source's, so the job never holds more than `prefetch` undone deliveries per partition.
//!
//! **Position:** for each partition the reader knows the offset after the last record it
//! emitted and the offset after the last record whose epoch completed (everything before it
//! went all the way through the job). After a lost connection it resumes just after what it
//! emitted (a stream does not redeliver by itself). With checkpoints, the positions are in
//! every checkpoint, and a restored job reads each partition again from exactly where its
//! checkpoint was: a stream keeps its messages, so this is exactly-once without any ids.
//! [`StreamReader::positions`] gives the completed positions.

use crate::endpoint::Endpoint;
use crate::error::ConnectError;
use crate::format::{BadInputPolicy, Decoder, Json, RawBytes, Text};
use crate::message::{DeliveryTag, Incoming};
use crate::transport::{ConsumeSpec, QueueSetup, SourceTransport};
use bytes::Bytes;
use rill_broker::jobs::JobCounters;
use rill_codec::{AMQPValue, FieldTable, LongString};
use rill_stream::{
    Data, DataStream, JobEnv, ReaderContext, ReaderOutput, ReaderStatus, SourceReader, StreamError,
    WatermarkStrategy,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;

/// Where reading a partition starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartOffset {
    /// The oldest message retained.
    First,
    /// The last chunk.
    Last,
    /// Only what is published from now on.
    Next,
    /// This offset.
    Offset(u64),
    /// The first message published at or after this time (ms since the epoch; streams keep
    /// seconds).
    Timestamp(u64),
}

impl StartOffset {
    /// The consumer argument.
    ///
    /// ```
    /// use rill_connect::stream_source::StartOffset;
    /// use rill_codec::AMQPValue;
    /// assert_eq!(StartOffset::Offset(7).argument(), AMQPValue::LongLongInt(7));
    /// ```
    pub fn argument(self) -> AMQPValue {
        let word = |w: &str| AMQPValue::LongString(LongString::from(w));
        match self {
            StartOffset::First => word("first"),
            StartOffset::Last => word("last"),
            StartOffset::Next => word("next"),
            StartOffset::Offset(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            StartOffset::Timestamp(ms) => AMQPValue::Timestamp(ms / 1000),
        }
    }
}

/// Stream queues as a job's input.
pub struct StreamSource<T, D> {
    endpoint: Endpoint,
    partitions: Vec<String>,
    start: StartOffset,
    /// Per partition, where to resume instead of `start` (a restored position).
    resume: BTreeMap<String, u64>,
    prefetch: u32,
    decoder: D,
    bad_input: BadInputPolicy,
    counters: Option<Arc<JobCounters>>,
    _t: PhantomData<fn() -> T>,
}

impl StreamSource<Bytes, RawBytes> {
    /// Reads the stream queues `partitions` (which must exist) from `start`.
    pub fn new(endpoint: Endpoint, partitions: &[&str], start: StartOffset) -> Self {
        StreamSource {
            endpoint,
            partitions: partitions.iter().map(|p| (*p).to_owned()).collect(),
            start,
            resume: BTreeMap::new(),
            prefetch: crate::source::DEFAULT_PREFETCH,
            decoder: RawBytes,
            bad_input: BadInputPolicy::Fail,
            counters: None,
            _t: PhantomData,
        }
    }
}

impl<T: Data, D> StreamSource<T, D> {
    pub fn format<U, E: Decoder<U> + Clone>(self, decoder: E) -> StreamSource<U, E> {
        StreamSource {
            endpoint: self.endpoint,
            partitions: self.partitions,
            start: self.start,
            resume: self.resume,
            prefetch: self.prefetch,
            decoder,
            bad_input: self.bad_input,
            counters: self.counters,
            _t: PhantomData,
        }
    }

    pub fn text(self) -> StreamSource<String, Text> {
        self.format(Text)
    }

    pub fn json<U: serde::de::DeserializeOwned + Data>(self) -> StreamSource<U, Json<U>> {
        self.format(Json::new())
    }

    /// Undone deliveries each partition's consumer may hold.
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Resume these partitions at these offsets (e.g. positions a previous run completed).
    pub fn resume_at(mut self, positions: BTreeMap<String, u64>) -> Self {
        self.resume = positions;
        self
    }

    pub fn bad_input(mut self, policy: BadInputPolicy) -> Self {
        self.bad_input = policy;
        self
    }

    pub fn counters(mut self, counters: Arc<JobCounters>) -> Self {
        self.counters = Some(counters);
        self
    }
}

impl<T: Data, D: Decoder<T> + Clone> StreamSource<T, D> {
    /// The reader of worker `worker` of `parallelism`: it owns partitions `i` with
    /// `i % parallelism == worker`.
    pub fn reader(&self, worker: usize, parallelism: usize) -> StreamReader<T, D> {
        let owned = self
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % parallelism.max(1) == worker)
            .map(|(_, p)| PartitionState {
                queue: p.clone(),
                start: self
                    .resume
                    .get(p)
                    .map_or(self.start, |&o| StartOffset::Offset(o)),
                transport: None,
                emitted_to: None,
                completed_to: self.resume.get(p).copied(),
                epochs: VecDeque::new(),
            })
            .collect();
        StreamReader {
            endpoint: self.endpoint.clone(),
            prefetch: self.prefetch,
            decoder: self.decoder.clone(),
            bad_input: self.bad_input,
            counters: self.counters.clone(),
            worker,
            partitions: owned,
            buf: Vec::new(),
            _t: PhantomData,
        }
    }

    pub fn build<'s>(self, env: &JobEnv<'s>) -> DataStream<'s, T> {
        self.build_with_watermarks(env, WatermarkStrategy::no_watermarks())
    }

    pub fn build_with_watermarks<'s>(
        self,
        env: &JobEnv<'s>,
        strategy: WatermarkStrategy<T>,
    ) -> DataStream<'s, T> {
        let name = format!("stream:{}", self.partitions.join(","));
        env.from_reader(move |w, p| self.reader(w, p), strategy, &name)
    }
}

struct PartitionState {
    queue: String,
    start: StartOffset,
    transport: Option<Box<dyn SourceTransport>>,
    /// The offset after the last record emitted.
    emitted_to: Option<u64>,
    /// The offset after the last record whose epoch completed.
    completed_to: Option<u64>,
    /// Per open epoch: the last delivery tag, the offset after the last record, and how
    /// many deliveries.
    epochs: VecDeque<(u64, DeliveryTag, u64, u64)>,
}

fn offset_arguments(start: StartOffset) -> FieldTable {
    let mut args = FieldTable::default();
    rill_codec::field_table_insert(&mut args, "x-stream-offset", start.argument());
    args
}

/// One worker's reader of a [`StreamSource`].
pub struct StreamReader<T, D> {
    endpoint: Endpoint,
    prefetch: u32,
    decoder: D,
    bad_input: BadInputPolicy,
    counters: Option<Arc<JobCounters>>,
    worker: usize,
    partitions: Vec<PartitionState>,
    buf: Vec<Incoming>,
    _t: PhantomData<fn() -> T>,
}

impl<T, D> StreamReader<T, D> {
    /// Per owned partition, the offset to resume at so that nothing completed is read again.
    pub fn positions(&self) -> BTreeMap<String, u64> {
        self.partitions
            .iter()
            .filter_map(|p| p.completed_to.map(|o| (p.queue.clone(), o)))
            .collect()
    }
}

impl<T: Data, D: Decoder<T>> SourceReader<T> for StreamReader<T, D> {
    fn open(&mut self, ctx: &ReaderContext) -> Result<(), StreamError> {
        for p in &mut self.partitions {
            let waker = ctx.waker().clone();
            let spec = ConsumeSpec {
                queue: p.queue.clone(),
                setup: QueueSetup::Existing,
                prefetch: self.prefetch,
                arguments: offset_arguments(p.start),
            };
            p.transport = Some(
                self.endpoint
                    .source(&spec, Arc::new(move || waker.wake()))?,
            );
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut ReaderOutput<'_, T>) -> Result<ReaderStatus, StreamError> {
        if self.partitions.is_empty() {
            // More workers than partitions: this one has nothing to read.
            return Ok(ReaderStatus::Finished);
        }
        let epoch = out.epoch();
        let (mut n, mut bad) = (0u64, 0u64);
        for p in &mut self.partitions {
            let Some(t) = p.transport.as_mut() else {
                continue;
            };
            t.poll(&mut self.buf)?;
            let before = p.emitted_to;
            for msg in self.buf.drain(..) {
                let offset = msg.stream_offset();
                match self.decoder.decode(&msg) {
                    Ok(v) => {
                        out.collect(v);
                        n += 1;
                    }
                    Err(detail) => {
                        bad += 1;
                        match self.bad_input {
                            BadInputPolicy::Fail => {
                                return Err(ConnectError::BadInput {
                                    queue: p.queue.clone(),
                                    delivery_tag: msg.tag.tag,
                                    detail,
                                }
                                .into())
                            }
                            // A stream keeps its messages: nothing to dead-letter, so a bad
                            // one is skipped either way.
                            BadInputPolicy::Skip | BadInputPolicy::DeadLetter => {
                                tracing::warn!(queue = %p.queue, offset = ?offset, error = %detail, "bad input skipped");
                            }
                        }
                    }
                }
                if let Some(o) = offset {
                    p.emitted_to = Some(o + 1);
                }
                let to = p.emitted_to.unwrap_or(0);
                match p.epochs.back_mut() {
                    Some((e, tag, off, count)) if *e == epoch => {
                        *tag = (*tag).max(msg.tag);
                        *off = to;
                        *count += 1;
                    }
                    _ => p.epochs.push_back((epoch, msg.tag, to, 1)),
                }
            }
            if p.emitted_to != before {
                if let Some(o) = p.emitted_to {
                    t.resume_with(offset_arguments(StartOffset::Offset(o)));
                }
            }
        }
        if let Some(c) = &self.counters {
            c.add_in(n + bad);
            c.add_bad_input(bad);
            // The offset gap: how far the end of each stream is ahead of what was read.
            let gap = self
                .partitions
                .iter()
                .filter_map(|p| {
                    let end = p.transport.as_ref()?.stream_end()?;
                    Some(end.saturating_sub(p.emitted_to.unwrap_or(0)))
                })
                .sum();
            c.set_source_lag(self.worker, gap);
        }
        Ok(ReaderStatus::Idle)
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let mut acked = 0;
        for p in &mut self.partitions {
            let mut last = None;
            while p.epochs.front().is_some_and(|(e, _, _, _)| *e <= epoch) {
                if let Some((_, tag, to, count)) = p.epochs.pop_front() {
                    last = last.max(Some(tag));
                    p.completed_to = Some(to);
                    acked += count;
                }
            }
            if let (Some(tag), Some(t)) = (last, p.transport.as_mut()) {
                // Stream acks return credit: the consumer reads on.
                t.ack_upto(tag)?;
            }
        }
        if let Some(c) = &self.counters {
            c.add_acked(acked);
        }
        Ok(())
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        // Every old reader's positions: this reader takes those of the partitions it owns
        // now (at another parallelism they may have been another worker's).
        for s in snapshots.iter().filter(|s| !s.is_empty()) {
            let positions: BTreeMap<String, u64> = serde_json::from_slice(s)
                .map_err(|e| StreamError::Source(format!("restoring stream positions: {e}")))?;
            for p in &mut self.partitions {
                if let Some(&at) = positions.get(&p.queue) {
                    p.start = StartOffset::Offset(at);
                    p.completed_to = Some(at);
                }
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        // Positions after everything emitted in epochs <= `epoch`.
        let positions: BTreeMap<&str, u64> = self
            .partitions
            .iter()
            .filter_map(|p| {
                let at = p
                    .epochs
                    .iter()
                    .take_while(|(e, _, _, _)| *e <= epoch)
                    .last()
                    .map(|(_, _, to, _)| *to)
                    .or(p.completed_to)?;
                Some((p.queue.as_str(), at))
            })
            .collect();
        serde_json::to_vec(&positions).map_err(|e| StreamError::Serialize(e.to_string()))
    }

    fn close(&mut self) -> Result<(), StreamError> {
        for p in &mut self.partitions {
            if let Some(t) = p.transport.as_mut() {
                t.close()?;
            }
        }
        Ok(())
    }
}
