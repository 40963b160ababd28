//! The queue source: a job consumes a queue with manual acks inside a prefetch window.
//!
//! Each worker runs one consumer ([`QueueReader`]) on the queue, so at parallelism N the
//! queue has N competing consumers and RabbitMQ's round robin spreads messages over them.
//! **Ordering:** each consumer sees its share in queue order, but the shares interleave
//! arbitrarily downstream; after a `key_by`, records of one key from different consumers
//! can swap places. Jobs that need the queue's order end to end run at parallelism 1 (or
//! read a stream queue, [`crate::stream_source`]), as with any competing consumers.
//!
//! **Acknowledgement:** a delivery is acked only when the epoch it was emitted in is
//! complete, i.e. every sink of the job confirmed everything the job produced in that epoch
//! (see `rill_stream::SourceReader::on_epoch_complete`); then one `multiple` ack covers the
//! epoch. A crash before that leaves the delivery unacked and the broker redelivers it:
//! at-least-once. The job never holds more than `prefetch` unacked deliveries per consumer,
//! which is its backpressure: a slow job slows its own consumption, never the producers.
//!
//! **With checkpoints** ([`QueueSource::exactly_once`]) epochs complete only when a
//! checkpoint covering them is durable, so a delivery is acked once its effect is in a
//! checkpoint; and the reader remembers the ids of what recent checkpoints covered (see
//! [`crate::exactly_once`]) to drop a redelivery whose ack was lost in a crash. The prefetch
//! window must then hold everything that arrives between two checkpoints; when it fills up
//! before a checkpoint completes, the reader says so in the log instead of stalling
//! silently.

use crate::endpoint::Endpoint;
use crate::error::ConnectError;
use crate::exactly_once::{input_id, IdWindow};
use crate::format::{BadInputPolicy, Decoder, Json, RawBytes, Text};
use crate::message::{DeliveryTag, Incoming};
use crate::transport::{ConsumeSpec, QueueSetup, SourceTransport};
use bytes::Bytes;
use rill_broker::jobs::JobCounters;
use rill_codec::FieldTable;
use rill_stream::{
    Data, DataStream, JobEnv, ReaderContext, ReaderOutput, ReaderStatus, SourceReader, StreamError,
    WatermarkStrategy,
};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Unacked deliveries per consumer when nothing is said.
pub const DEFAULT_PREFETCH: u32 = 2000;

/// How often a reader refreshes its lag gauge.
const LAG_EVERY: Duration = Duration::from_millis(500);

/// A queue as a job's input. Build it, then [`QueueSource::build`] it on the job's
/// environment to get a stream.
///
/// ```no_run
/// use rill_connect::{Endpoint, QueueSource, QueueSink};
/// use rill_stream::StreamExecutionEnvironment;
///
/// let broker = Endpoint::amqp("amqp://guest:guest@127.0.0.1:5672/%2F");
/// StreamExecutionEnvironment::new().with_parallelism(2).execute("lengths", move |env| {
///     let lines = QueueSource::new(broker.clone(), "lines").text().build(env);
///     QueueSink::to_queue(broker.clone(), "lengths")
///         .text()
///         .build(lines.map(|l: String| l.len().to_string()));
/// }).unwrap();
/// ```
pub struct QueueSource<T, D> {
    endpoint: Endpoint,
    spec: ConsumeSpec,
    decoder: D,
    bad_input: BadInputPolicy,
    counters: Option<Arc<JobCounters>>,
    /// With checkpoints: remember input ids for this many checkpoints.
    remember: Option<usize>,
    _t: PhantomData<fn() -> T>,
}

/// Checkpoints' worth of input ids a reader remembers when nothing is said: a lost ack is
/// redelivered as soon as the consumer is back, so a few checkpoints are plenty.
pub const DEFAULT_REMEMBERED_CHECKPOINTS: usize = 4;

impl QueueSource<Bytes, RawBytes> {
    /// Consumes `queue`, which must exist (see [`QueueSource::setup`]), with the default
    /// prefetch; records are the raw bodies until a format is chosen.
    pub fn new(endpoint: Endpoint, queue: &str) -> Self {
        QueueSource {
            endpoint,
            spec: ConsumeSpec {
                queue: queue.to_owned(),
                setup: QueueSetup::Existing,
                prefetch: DEFAULT_PREFETCH,
                arguments: FieldTable::default(),
            },
            decoder: RawBytes,
            bad_input: BadInputPolicy::Fail,
            counters: None,
            remember: None,
            _t: PhantomData,
        }
    }
}

impl<T: Data, D> QueueSource<T, D> {
    /// Records are decoded with `decoder`.
    pub fn format<U, E: Decoder<U> + Clone>(self, decoder: E) -> QueueSource<U, E> {
        QueueSource {
            endpoint: self.endpoint,
            spec: self.spec,
            decoder,
            bad_input: self.bad_input,
            counters: self.counters,
            remember: self.remember,
            _t: PhantomData,
        }
    }

    /// For jobs with checkpoints: remember the ids (`message_id`, or the
    /// `x-deduplication-header` header) of the inputs the last `checkpoints` checkpoints
    /// covered, in those checkpoints, and drop (ack) a delivery carrying one of them: it was
    /// redelivered because its ack was lost in a crash, and its effect is already in the
    /// restored state.
    pub fn exactly_once(mut self, checkpoints: usize) -> Self {
        self.remember = Some(checkpoints);
        self
    }

    /// Records are UTF-8 text.
    pub fn text(self) -> QueueSource<String, Text> {
        self.format(Text)
    }

    /// Records are JSON, decoded into `U` (`serde_json::Value` for any JSON).
    pub fn json<U: serde::de::DeserializeOwned + Data>(self) -> QueueSource<U, Json<U>> {
        self.format(Json::new())
    }

    /// Unacked deliveries each consumer may hold.
    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.spec.prefetch = prefetch.max(1);
        self
    }

    /// What to do about the queue before consuming (default: it must exist).
    pub fn setup(mut self, setup: QueueSetup) -> Self {
        self.spec.setup = setup;
        self
    }

    /// Consumer arguments (`x-priority`, ...).
    pub fn arguments(mut self, arguments: FieldTable) -> Self {
        self.spec.arguments = arguments;
        self
    }

    /// What to do with messages the format cannot read (default: fail the job).
    pub fn bad_input(mut self, policy: BadInputPolicy) -> Self {
        self.bad_input = policy;
        self
    }

    /// Where to count records, bad input, acks and lag.
    pub fn counters(mut self, counters: Arc<JobCounters>) -> Self {
        self.counters = Some(counters);
        self
    }
}

impl<T: Data, D: Decoder<T> + Clone> QueueSource<T, D> {
    /// This worker's reader.
    pub fn reader(&self) -> QueueReader<T, D> {
        QueueReader {
            endpoint: self.endpoint.clone(),
            spec: self.spec.clone(),
            decoder: self.decoder.clone(),
            bad_input: self.bad_input,
            counters: self.counters.clone(),
            worker: 0,
            transport: None,
            buf: Vec::new(),
            epochs: VecDeque::new(),
            lag_at: None,
            ids: self.remember.map(IdWindow::new),
            held: 0,
            full_since: None,
            warned_at: None,
            _t: PhantomData,
        }
    }

    /// The stream of records, one consumer per worker, without event-time watermarks.
    pub fn build<'s>(self, env: &JobEnv<'s>) -> DataStream<'s, T> {
        self.build_with_watermarks(env, WatermarkStrategy::no_watermarks())
    }

    /// The stream of records with event timestamps and watermarks from `strategy` (its
    /// timestamp assigner sees each record; messages carry no timestamp of their own here).
    pub fn build_with_watermarks<'s>(
        self,
        env: &JobEnv<'s>,
        strategy: WatermarkStrategy<T>,
    ) -> DataStream<'s, T> {
        let name = format!("queue:{}", self.spec.queue);
        let reader = self.reader();
        env.from_reader(move |_, _| reader, strategy, &name)
    }
}

/// One worker's consumer of a [`QueueSource`].
pub struct QueueReader<T, D> {
    endpoint: Endpoint,
    spec: ConsumeSpec,
    decoder: D,
    bad_input: BadInputPolicy,
    counters: Option<Arc<JobCounters>>,
    worker: usize,
    transport: Option<Box<dyn SourceTransport>>,
    buf: Vec<Incoming>,
    /// Per epoch still open: the highest delivery tag emitted in it and how many.
    epochs: VecDeque<(u64, DeliveryTag, u64)>,
    lag_at: Option<Instant>,
    /// With checkpoints: ids of inputs recent checkpoints covered.
    ids: Option<IdWindow>,
    /// Deliveries emitted (or skipped) and not acked yet.
    held: u64,
    /// Since when the window has been full.
    full_since: Option<Instant>,
    warned_at: Option<Instant>,
    _t: PhantomData<fn() -> T>,
}

/// A full window for this long with no checkpoint completing is worth a warning.
const FULL_WINDOW_WARNING: Duration = Duration::from_secs(5);

impl<T, D> QueueReader<T, D> {
    fn transport(&mut self) -> Result<&mut Box<dyn SourceTransport>, StreamError> {
        self.transport
            .as_mut()
            .ok_or_else(|| StreamError::Config("queue source polled before it was opened".into()))
    }

    /// Remembers that `tag` went out in `epoch` (to be acked with it).
    fn note(&mut self, epoch: u64, tag: DeliveryTag) {
        self.held += 1;
        match self.epochs.back_mut() {
            Some((e, last, n)) if *e == epoch => {
                *last = (*last).max(tag);
                *n += 1;
            }
            _ => self.epochs.push_back((epoch, tag, 1)),
        }
    }

    /// Says so when the prefetch window stays full: the job then consumes only as fast as
    /// its epochs (with checkpoints: its checkpoints) complete.
    fn watch_window(&mut self) {
        if self.held < u64::from(self.spec.prefetch) {
            self.full_since = None;
            return;
        }
        let since = *self.full_since.get_or_insert_with(Instant::now);
        let quiet = self
            .warned_at
            .is_none_or(|w| w.elapsed() >= Duration::from_secs(60));
        if since.elapsed() >= FULL_WINDOW_WARNING && quiet {
            self.warned_at = Some(Instant::now());
            tracing::warn!(
                queue = %self.spec.queue,
                prefetch = self.spec.prefetch,
                full_for_s = since.elapsed().as_secs(),
                "the prefetch window is full and no epoch completes: consumption waits for the job's next checkpoint; raise the prefetch above what arrives between two checkpoints, or checkpoint more often"
            );
        }
    }

    /// The queue depth, now and then (worker 0 only: every consumer sees the same queue).
    fn refresh_lag(&mut self) {
        if self.worker != 0 {
            return;
        }
        if self.lag_at.is_some_and(|at| at.elapsed() < LAG_EVERY) {
            return;
        }
        self.lag_at = Some(Instant::now());
        if let (Some(c), Some(t)) = (&self.counters, &self.transport) {
            if let Some(depth) = t.queue_depth() {
                c.set_source_lag(0, depth);
            }
        }
    }
}

impl<T: Data, D: Decoder<T>> SourceReader<T> for QueueReader<T, D> {
    fn open(&mut self, ctx: &ReaderContext) -> Result<(), StreamError> {
        self.worker = ctx.worker_index();
        let waker = ctx.waker().clone();
        let transport = self
            .endpoint
            .source(&self.spec, Arc::new(move || waker.wake()))?;
        self.transport = Some(transport);
        Ok(())
    }

    fn poll(&mut self, out: &mut ReaderOutput<'_, T>) -> Result<ReaderStatus, StreamError> {
        let mut buf = std::mem::take(&mut self.buf);
        let polled = self.transport()?.poll(&mut buf);
        if let Err(e) = polled {
            self.buf = buf;
            return Err(e.into());
        }
        let epoch = out.epoch();
        let (mut n, mut bad, mut seen) = (0u64, 0u64, 0u64);
        let mut result = Ok(());
        for msg in buf.drain(..) {
            if let Some(ids) = self.ids.as_mut() {
                if input_id(&msg).is_some_and(|id| !ids.insert(epoch, id)) {
                    // Already in the state: a redelivery after a lost ack. Acked with this
                    // epoch, not processed again.
                    self.note(epoch, msg.tag);
                    seen += 1;
                    continue;
                }
            }
            match self.decoder.decode(&msg) {
                Ok(value) => {
                    out.collect(value);
                    self.note(epoch, msg.tag);
                    n += 1;
                }
                Err(detail) => {
                    bad += 1;
                    match self.bad_input {
                        // Acked with its epoch, as if processed.
                        BadInputPolicy::Skip => self.note(epoch, msg.tag),
                        BadInputPolicy::DeadLetter => {
                            if let Err(e) = self.transport()?.reject(msg.tag) {
                                result = Err(e.into());
                                break;
                            }
                        }
                        BadInputPolicy::Fail => {
                            result = Err(ConnectError::BadInput {
                                queue: self.spec.queue.clone(),
                                delivery_tag: msg.tag.tag,
                                detail,
                            }
                            .into());
                            break;
                        }
                    }
                    if self.bad_input != BadInputPolicy::Fail {
                        tracing::warn!(queue = %self.spec.queue, delivery_tag = msg.tag.tag, policy = ?self.bad_input, error = %detail, "bad input");
                    }
                }
            }
        }
        buf.clear();
        self.buf = buf;
        if let Some(c) = &self.counters {
            c.add_in(n + bad);
            c.add_bad_input(bad);
        }
        if seen > 0 {
            tracing::info!(queue = %self.spec.queue, deliveries = seen, "dropped redeliveries of inputs a checkpoint already covers");
        }
        self.refresh_lag();
        self.watch_window();
        result.map(|()| ReaderStatus::Idle)
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        // Any consumer may get a redelivery, so every reader learns every old reader's ids.
        if let Some(ids) = self.ids.as_mut() {
            for s in snapshots.iter().filter(|s| !s.is_empty()) {
                let old: IdWindow = bincode::deserialize(s)
                    .map_err(|e| StreamError::Source(format!("restoring queue source ids: {e}")))?;
                ids.absorb(old);
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        match &self.ids {
            Some(ids) => ids
                .snapshot(epoch)
                .map_err(|e| StreamError::Serialize(e.to_string())),
            None => Ok(Vec::new()),
        }
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        if let Some(ids) = self.ids.as_mut() {
            // With checkpoints, only completed checkpoints are announced.
            ids.checkpointed(epoch);
        }
        let mut last: Option<DeliveryTag> = None;
        let mut n = 0;
        while self.epochs.front().is_some_and(|(e, _, _)| *e <= epoch) {
            if let Some((_, tag, count)) = self.epochs.pop_front() {
                last = last.max(Some(tag));
                n += count;
            }
        }
        if let Some(tag) = last {
            self.transport()?.ack_upto(tag)?;
            self.held = self.held.saturating_sub(n);
            self.full_since = None;
            if let Some(c) = &self.counters {
                c.add_acked(n);
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), StreamError> {
        match self.transport.as_mut() {
            Some(t) => Ok(t.close()?),
            None => Ok(()),
        }
    }
}
