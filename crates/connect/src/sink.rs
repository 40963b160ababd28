//! The queue sink: a job publishes its records to an exchange (the default exchange routes by
//! queue name) as persistent messages with publisher confirms.
//!
//! Each worker has its own confirming publisher ([`QueueWriter`]). An epoch is confirmed
//! once every message the worker published in it (and before) is confirmed by the broker;
//! the job's sources ack their deliveries only then, so what a delivery produced is safe
//! before the delivery goes (at-least-once). A nacked message, or one unconfirmed when the
//! connection broke, is published again. Backpressure: while confirms are outstanding the
//! epochs stay open, so the sources' prefetch windows fill up and consumption pauses until
//! the broker catches up; a resource alarm in the broker holds the publisher back as it
//! holds back any client.
//!
//! **With checkpoints** ([`QueueSink::exactly_once`]) the sink is a two-phase commit, as
//! Flink's `TwoPhaseCommitSinkFunction`: a record's message is held, goes into the next
//! checkpoint, and is published only once that checkpoint is complete, with the id
//! `job/epoch/worker/sequence` in its `x-deduplication-header` (see
//! [`crate::exactly_once`]). After a crash the restored checkpoint's messages are published
//! again under the same ids, and a deduplicating target drops the copies.

use crate::endpoint::Endpoint;
use crate::exactly_once::{Pending, PendingMessage};
use crate::format::{Encoder, Json, RawBytes, Text};
use crate::message::Outgoing;
use crate::transport::{PublishSpec, QueueSetup, SinkTransport};
use bytes::Bytes;
use rill_broker::jobs::JobCounters;
use rill_codec::{BasicProperties, ShortString};
use rill_stream::{Data, DataStream, Increment, SinkWriter, StreamError, Waker, WriterContext};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

/// The routing key of each message.
pub enum Routing<T> {
    Fixed(String),
    /// Computed from the record.
    Computed(Arc<dyn Fn(&T) -> String + Send + Sync>),
}

impl<T> Clone for Routing<T> {
    fn clone(&self) -> Self {
        match self {
            Routing::Fixed(k) => Routing::Fixed(k.clone()),
            Routing::Computed(f) => Routing::Computed(f.clone()),
        }
    }
}

type PropertiesFn<T> = Arc<dyn Fn(&T) -> BasicProperties + Send + Sync>;

/// A queue or exchange as a job's output. See [`crate::QueueSource`] for an example.
pub struct QueueSink<T, E> {
    endpoint: Endpoint,
    spec: PublishSpec,
    routing: Routing<T>,
    encoder: E,
    properties: Option<PropertiesFn<T>>,
    counters: Option<Arc<JobCounters>>,
    /// With checkpoints: the job name in output ids.
    two_phase: Option<String>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Data> QueueSink<T, RawBytes> {
    /// Publishes to `queue` through the default exchange. The queue must exist (see
    /// [`QueueSink::setup`]).
    pub fn to_queue(endpoint: Endpoint, queue: &str) -> Self {
        QueueSink {
            endpoint,
            spec: PublishSpec {
                exchange: String::new(),
                queue: Some((queue.to_owned(), QueueSetup::Existing)),
            },
            routing: Routing::Fixed(queue.to_owned()),
            encoder: RawBytes,
            properties: None,
            counters: None,
            two_phase: None,
            _t: PhantomData,
        }
    }

    /// Publishes to `exchange` with `routing` keys.
    pub fn to_exchange(endpoint: Endpoint, exchange: &str, routing: Routing<T>) -> Self {
        QueueSink {
            endpoint,
            spec: PublishSpec {
                exchange: exchange.to_owned(),
                queue: None,
            },
            routing,
            encoder: RawBytes,
            properties: None,
            counters: None,
            two_phase: None,
            _t: PhantomData,
        }
    }
}

impl<T: Data, E> QueueSink<T, E> {
    /// Bodies are encoded with `encoder`.
    pub fn format<F: Encoder<T> + Clone>(self, encoder: F) -> QueueSink<T, F> {
        QueueSink {
            endpoint: self.endpoint,
            spec: self.spec,
            routing: self.routing,
            encoder,
            properties: self.properties,
            counters: self.counters,
            two_phase: self.two_phase,
            _t: PhantomData,
        }
    }

    /// For jobs with checkpoints: a two-phase commit (see the module docs); `job` names the
    /// job in the output ids, so it must stay the same across restarts.
    pub fn exactly_once(mut self, job: &str) -> Self {
        self.two_phase = Some(job.to_owned());
        self
    }

    /// Bodies are the records as text.
    pub fn text(self) -> QueueSink<T, Text>
    where
        T: AsRef<str>,
    {
        self.format(Text)
    }

    /// Bodies are the records as JSON.
    pub fn json(self) -> QueueSink<T, Json<T>>
    where
        T: serde::Serialize,
    {
        self.format(Json::new())
    }

    /// Properties of each message (headers, message id, ...); the sink makes them persistent
    /// and sets the content type unless these say otherwise.
    pub fn properties(mut self, f: impl Fn(&T) -> BasicProperties + Send + Sync + 'static) -> Self {
        self.properties = Some(Arc::new(f));
        self
    }

    /// What to do about the target queue first (default: it must exist).
    pub fn setup(mut self, setup: QueueSetup) -> Self {
        if let Some((_, s)) = &mut self.spec.queue {
            *s = setup;
        }
        self
    }

    /// Where to count published and confirmed messages.
    pub fn counters(mut self, counters: Arc<JobCounters>) -> Self {
        self.counters = Some(counters);
        self
    }
}

impl<T: Data, E: Encoder<T> + Clone> QueueSink<T, E> {
    /// This worker's publisher.
    pub fn writer(&self) -> QueueWriter<T, E> {
        QueueWriter {
            endpoint: self.endpoint.clone(),
            spec: self.spec.clone(),
            routing: self.routing.clone(),
            encoder: self.encoder.clone(),
            properties: self.properties.clone(),
            counters: self.counters.clone(),
            worker: 0,
            transport: None,
            waker: None,
            epochs: VecDeque::new(),
            ended: None,
            confirmed_seq: 0,
            body: Vec::new(),
            exchange: Arc::from(self.spec.exchange.as_str()),
            two_phase: self.two_phase.clone().map(|job| TwoPhase {
                job,
                pending: Pending::default(),
            }),
        }
    }

    /// Sends `stream` to the queue or exchange (one publisher per worker).
    pub fn build(self, stream: DataStream<'_, T>) {
        let writer = self.writer();
        stream.sink_to(move |_, _| writer);
    }
}

/// One worker's confirming publisher of a [`QueueSink`].
pub struct QueueWriter<T, E> {
    endpoint: Endpoint,
    spec: PublishSpec,
    routing: Routing<T>,
    encoder: E,
    properties: Option<PropertiesFn<T>>,
    counters: Option<Arc<JobCounters>>,
    worker: usize,
    transport: Option<Box<dyn SinkTransport>>,
    /// Wakes this worker's sink operator (to go on publishing committed output).
    waker: Option<Waker>,
    /// Per epoch with output not yet confirmed: the sequence number of its last message.
    epochs: VecDeque<(u64, u64)>,
    /// Every record of epochs up to here has been written.
    ended: Option<u64>,
    confirmed_seq: u64,
    body: Vec<u8>,
    /// `spec.exchange`, shared by every message.
    exchange: Arc<str>,
    two_phase: Option<TwoPhase>,
}

/// A two-phase-commit writer's state.
struct TwoPhase {
    job: String,
    pending: Pending,
}

impl<T, E> QueueWriter<T, E> {
    fn transport(&mut self) -> Result<&mut Box<dyn SinkTransport>, StreamError> {
        self.transport
            .as_mut()
            .ok_or_else(|| StreamError::Config("queue sink used before it was opened".into()))
    }

    /// Publishes committed output the window has room for, lets the transport send and
    /// take confirms, and fills the room the confirms made (sent on the next run, which it
    /// asks for).
    fn poll(&mut self) -> Result<(), StreamError> {
        self.publish_committed()?;
        let confirmed = self.transport()?.poll_confirmed()?;
        if let Some(c) = &self.counters {
            c.add_confirmed(confirmed.saturating_sub(self.confirmed_seq));
            let outstanding = self.transport.as_ref().map_or(0, |t| t.outstanding());
            c.set_confirms_outstanding(self.worker, outstanding);
        }
        self.confirmed_seq = confirmed;
        if let Some(tp) = self.two_phase.as_mut() {
            tp.pending.confirmed(confirmed);
        }
        if self.publish_committed()? > 0 {
            if let Some(w) = &self.waker {
                w.wake();
            }
        }
        Ok(())
    }

    /// Publishes committed output (two-phase mode) within the window; returns how many.
    fn publish_committed(&mut self) -> Result<usize, StreamError> {
        let Some(TwoPhase { pending, .. }) = self.two_phase.as_mut() else {
            return Ok(0);
        };
        if !pending.has_committed() {
            return Ok(0);
        }
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| StreamError::Config("queue sink used before it was opened".into()))?;
        let exchange = &self.exchange;
        let n = pending.publish(|m| transport.publish(m.outgoing(exchange)))?;
        if let Some(c) = &self.counters {
            c.add_out(n as u64);
        }
        Ok(n)
    }
}

impl<T: Data, E: Encoder<T>> SinkWriter<T> for QueueWriter<T, E> {
    fn open(&mut self, ctx: &WriterContext) -> Result<(), StreamError> {
        self.worker = ctx.worker_index();
        self.waker = Some(ctx.waker().clone());
        let waker = ctx.waker().clone();
        self.transport = Some(
            self.endpoint
                .sink(&self.spec, Arc::new(move || waker.wake()))?,
        );
        Ok(())
    }

    fn write(&mut self, epoch: u64, value: T, _timestamp: u64) -> Result<(), StreamError> {
        self.body.clear();
        self.encoder
            .encode(&value, &mut self.body)
            .map_err(StreamError::Serialize)?;
        let mut properties = match &self.properties {
            Some(f) => f(&value),
            None => BasicProperties::default(),
        };
        if properties.delivery_mode().is_none() {
            properties = properties.with_delivery_mode(2);
        }
        if let (None, Some(ct)) = (properties.content_type(), self.encoder.content_type()) {
            properties = properties.with_content_type(ShortString::from(ct));
        }
        let routing_key = match &self.routing {
            Routing::Fixed(k) => k.clone(),
            Routing::Computed(f) => f(&value),
        };
        if let Some(tp) = self.two_phase.as_mut() {
            let seq = tp.pending.next_seq(epoch);
            tp.pending.hold(PendingMessage::new(
                (&tp.job, epoch, self.worker, seq),
                routing_key,
                properties,
                Bytes::copy_from_slice(&self.body),
            ));
            return Ok(());
        }
        let msg = Outgoing {
            exchange: self.exchange.clone(),
            routing_key,
            properties: properties.into(),
            body: Bytes::copy_from_slice(&self.body),
        };
        let seq = self.transport()?.publish(msg)?;
        match self.epochs.back_mut() {
            Some((e, last)) if *e == epoch => *last = seq,
            _ => self.epochs.push_back((epoch, seq)),
        }
        if let Some(c) = &self.counters {
            c.add_out(1);
        }
        Ok(())
    }

    fn end_epoch(&mut self, epoch: u64) -> Result<(), StreamError> {
        self.ended = self.ended.max(Some(epoch));
        Ok(())
    }

    fn confirmed_epoch(&mut self) -> Result<Option<u64>, StreamError> {
        self.poll()?;
        let Some(ended) = self.ended else {
            return Ok(None);
        };
        while self
            .epochs
            .front()
            .is_some_and(|(e, last)| *e <= ended && *last <= self.confirmed_seq)
        {
            self.epochs.pop_front();
        }
        // Epochs without output are confirmed as soon as they ended.
        Ok(match self.epochs.front() {
            Some((e, _)) if *e <= ended => e.checked_sub(1),
            _ => Some(ended),
        })
    }

    fn snapshot(&mut self, epoch: u64) -> Result<Vec<u8>, StreamError> {
        // What the broker confirmed meanwhile need not be in the checkpoint.
        if self.transport.is_some() {
            self.poll()?;
        }
        Ok(match &self.two_phase {
            Some(tp) => tp.pending.snapshot(epoch),
            None => Vec::new(),
        })
    }

    fn on_epoch_complete(&mut self, epoch: u64) -> Result<(), StreamError> {
        let Some(tp) = self.two_phase.as_mut() else {
            return Ok(());
        };
        // Checkpoint `epoch` is complete: its held output is committed; publish it.
        tp.pending.commit(epoch);
        self.poll()
    }

    fn snapshot_increment(&mut self, epoch: u64) -> Result<Option<Increment>, StreamError> {
        if self.transport.is_some() {
            self.poll()?;
        }
        Ok(self.two_phase.as_mut().map(|tp| {
            let (bytes, earlier) = tp.pending.increment(epoch);
            Increment { bytes, earlier }
        }))
    }

    fn increment_lost(&mut self) {
        if let Some(tp) = self.two_phase.as_mut() {
            tp.pending.increment_lost();
        }
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if self.transport.is_some() {
            self.poll()?;
        }
        Ok(())
    }

    fn restore(&mut self, snapshots: &[Vec<u8>]) -> Result<(), StreamError> {
        let Some(tp) = self.two_phase.as_mut() else {
            return Ok(());
        };
        // Output of a completed checkpoint: committed right after open, under its ids.
        for s in snapshots.iter().filter(|s| !s.is_empty()) {
            tp.pending
                .restore(s)
                .map_err(|e| StreamError::Source(format!("restoring pending output: {e}")))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<bool, StreamError> {
        self.poll()?;
        if self.transport.as_ref().is_some_and(|t| t.outstanding() > 0)
            || self
                .two_phase
                .as_ref()
                .is_some_and(|tp| !tp.pending.is_empty())
        {
            return Ok(false);
        }
        if let Some(t) = self.transport.as_mut() {
            t.close()?;
        }
        Ok(true)
    }
}
