//! [`KeyedStream`]: running aggregations and keyed process functions with state and timers.
//!
//! Each operator is fed through timely's `Exchange` channel, routing a record by the hash of
//! its key, so a key's state lives on exactly one worker and sees that key's records in
//! order. Running aggregations (`sum`, `reduce`, ...) emit the updated value for every input
//! record, as Flink's do.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::time::{SystemTime, UNIX_EPOCH};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::hash::FxHashSet;
use crate::state::{MemoryStateBackend, StateBackend};
use crate::stream::{key_route, Builder, DataStream};
use crate::types::{Data, Key};

/// A stream partitioned by key `K` (extracted by `KF`). Created by
/// [`DataStream::key_by`].
pub struct KeyedStream<'s, T, K, KF> {
    pub(crate) stream: DataStream<'s, T>,
    pub(crate) key: KF,
    _k: std::marker::PhantomData<K>,
}

/// An incremental aggregation (Flink's `AggregateFunction`): values are added into an
/// accumulator, accumulators can be merged, and a result is read from one.
///
/// ```
/// use rill_stream::AggregateFunction;
/// /// Average of the values.
/// struct Avg;
/// impl AggregateFunction<f64, (f64, u64), f64> for Avg {
///     fn create_accumulator(&self) -> (f64, u64) { (0.0, 0) }
///     fn add(&self, v: f64, acc: &mut (f64, u64)) { acc.0 += v; acc.1 += 1; }
///     fn get_result(&self, acc: &(f64, u64)) -> f64 { acc.0 / acc.1 as f64 }
///     fn merge(&self, a: (f64, u64), b: (f64, u64)) -> (f64, u64) { (a.0 + b.0, a.1 + b.1) }
/// }
/// ```
pub trait AggregateFunction<T, ACC, OUT>: 'static {
    /// A fresh, empty accumulator.
    fn create_accumulator(&self) -> ACC;
    /// Adds a value.
    fn add(&self, value: T, acc: &mut ACC);
    /// The result for an accumulator.
    fn get_result(&self, acc: &ACC) -> OUT;
    /// Combines two accumulators (session windows merge).
    fn merge(&self, a: ACC, b: ACC) -> ACC;
}

/// Per-key logic with state and timers (Flink's `KeyedProcessFunction`).
///
/// ```
/// use rill_stream::*;
/// use serde::{Serialize, Deserialize};
/// use std::time::Duration;
///
/// /// Emits (key, count) once no record arrived for a key for 10 s of event time.
/// struct Timeout;
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// struct St { count: ValueState<u64>, last: ValueState<u64> }
/// impl KeyedProcessFunction<String, (u64, String), (String, u64)> for Timeout {
///     type State = St;
///     fn process_element(&mut self, v: (u64, String), ctx: &mut ProcessContext<'_, String, St, (String, u64)>) {
///         let n = ctx.state().count.value().copied().unwrap_or(0) + 1;
///         ctx.state().count.update(n);
///         ctx.state().last.update(v.0);
///         ctx.register_event_time_timer(v.0 + 10_000);
///     }
///     fn on_timer(&mut self, ts: u64, ctx: &mut ProcessContext<'_, String, St, (String, u64)>) {
///         if ctx.state().last.value().map(|l| l + 10_000) == Some(ts) {
///             let n = ctx.state().count.value().copied().unwrap_or(0);
///             let k = ctx.key().clone();
///             ctx.collect((k, n));
///         }
///     }
/// }
///
/// let out = CollectSink::new();
/// let sink = out.clone();
/// StreamExecutionEnvironment::new().with_parallelism(2).execute("timeout", move |env| {
///     env.from_timestamped(
///             vec![(0, (0, "a".to_string())), (5_000, (5_000, "a".to_string())), (30_000, (30_000, "b".to_string()))],
///             WatermarkStrategy::for_monotonous_timestamps())
///         .key_by(|v| v.1.clone())
///         .process(Timeout)
///         .collect_into(&sink);
/// }).unwrap();
/// let mut got = out.take();
/// got.sort();
/// assert_eq!(got, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
/// ```
pub trait KeyedProcessFunction<K, I, O>: 'static {
    /// The per-key state, typically a struct of [`crate::ValueState`], [`crate::ListState`]
    /// and [`crate::MapState`] fields.
    type State: Data + Default;
    /// Called for every record of a key.
    fn process_element(&mut self, value: I, ctx: &mut ProcessContext<'_, K, Self::State, O>);
    /// Called when a timer of this key fires; `ctx.timestamp()` is the timer's time.
    fn on_timer(&mut self, timestamp: u64, ctx: &mut ProcessContext<'_, K, Self::State, O>) {
        let _ = (timestamp, ctx);
    }
}

/// Registered timers of one operator, per key. Serialisable, to be snapshotted with the
/// operator's state.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(bound(serialize = "K: Key", deserialize = "K: Key"))]
pub(crate) struct Timers<K> {
    by_time: BTreeMap<u64, Vec<K>>,
    live: FxHashSet<(u64, K)>,
}

impl<K: Key> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            by_time: BTreeMap::new(),
            live: FxHashSet::default(),
        }
    }
}

impl<K: Key> Timers<K> {
    pub(crate) fn register(&mut self, ts: u64, key: &K) {
        if self.live.insert((ts, key.clone())) {
            self.by_time.entry(ts).or_default().push(key.clone());
        }
    }
    fn delete(&mut self, ts: u64, key: &K) {
        self.live.remove(&(ts, key.clone()));
    }
    /// Removes and returns one due timer (`ts < bound`), if any.
    pub(crate) fn pop_before(&mut self, bound: Option<u64>) -> Option<(u64, K)> {
        loop {
            let mut entry = self.by_time.first_entry()?;
            let ts = *entry.key();
            if bound.is_some_and(|b| ts >= b) {
                return None;
            }
            match entry.get_mut().pop() {
                Some(k) => {
                    if self.live.remove(&(ts, k.clone())) {
                        return Some((ts, k));
                    }
                }
                None => {
                    entry.remove();
                }
            }
        }
    }
    pub(crate) fn earliest(&self) -> Option<u64> {
        self.by_time.keys().next().copied()
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a [`KeyedProcessFunction`] sees: the current key, its state, time, timers, output.
pub struct ProcessContext<'a, K, S, O> {
    key: &'a K,
    state: &'a mut S,
    timestamp: u64,
    watermark: u64,
    clear: bool,
    event_timers: &'a mut Timers<K>,
    proc_timers: &'a mut Timers<K>,
    out: &'a mut Vec<(u64, O)>,
}

impl<'a, K: Key, S, O> ProcessContext<'a, K, S, O> {
    /// The key being processed.
    pub fn key(&self) -> &K {
        self.key
    }
    /// This key's state.
    pub fn state(&mut self) -> &mut S {
        self.state
    }
    /// Drops this key's state after the call returns.
    pub fn clear_state(&mut self) {
        self.clear = true;
    }
    /// The record's event timestamp, or the firing timer's time.
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }
    /// The operator's current event-time watermark.
    pub fn current_watermark(&self) -> u64 {
        self.watermark
    }
    /// Wall-clock time in ms since the epoch.
    pub fn current_processing_time(&self) -> u64 {
        now_ms()
    }
    /// Calls `on_timer` once the watermark reaches `ts`.
    pub fn register_event_time_timer(&mut self, ts: u64) {
        self.event_timers.register(ts, self.key);
    }
    /// Cancels an event-time timer.
    pub fn delete_event_time_timer(&mut self, ts: u64) {
        self.event_timers.delete(ts, self.key);
    }
    /// Calls `on_timer` once the wall clock reaches `ts` (ms since the epoch). Pending
    /// processing-time timers fire when the input ends.
    pub fn register_processing_time_timer(&mut self, ts: u64) {
        self.proc_timers.register(ts, self.key);
    }
    /// Cancels a processing-time timer.
    pub fn delete_processing_time_timer(&mut self, ts: u64) {
        self.proc_timers.delete(ts, self.key);
    }
    /// Emits a record with the current timestamp.
    pub fn collect(&mut self, value: O) {
        self.out.push((self.timestamp, value));
    }
    /// Emits a record with an explicit timestamp.
    pub fn collect_with_timestamp(&mut self, value: O, timestamp: u64) {
        self.out.push((timestamp, value));
    }
}

impl<'s, T: Data, K: Key, KF: Fn(&T) -> K + Clone + 'static> KeyedStream<'s, T, K, KF> {
    pub(crate) fn new(stream: DataStream<'s, T>, key: KF) -> Self {
        KeyedStream {
            stream,
            key,
            _k: std::marker::PhantomData,
        }
    }

    /// A running aggregate kept per key: the first record of a key becomes its state,
    /// every later record is folded in with `update`; the state is emitted after each record.
    fn running(self, name: &str, mut update: impl FnMut(&mut T, T) + 'static) -> DataStream<'s, T> {
        let kf = self.key.clone();
        let pact = Exchange::new(key_route(self.key.clone()));
        let env = self.stream.env.clone();
        let inner = self
            .stream
            .inner
            .unary::<Builder<T>, _, _, _>(pact, name, move |_, _| {
                let mut backend = MemoryStateBackend::<K, T>::default();
                move |input, output| {
                    input.for_each(|cap, data| {
                        let map = backend.map_mut();
                        let mut out = Vec::with_capacity(data.len());
                        for (ts, d) in data.drain(..) {
                            let k = kf(&d);
                            match map.get_mut(&k) {
                                Some(state) => {
                                    update(state, d);
                                    out.push((ts, state.clone()));
                                }
                                None => {
                                    out.push((ts, d.clone()));
                                    map.insert(k, d);
                                }
                            }
                        }
                        output.session(&cap).give_container(&mut out);
                    });
                }
            });
        DataStream::new(inner, env)
    }

    /// Running reduce: emits `f(previous, record)` for every record of a key.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(1).execute("r", move |env| {
    /// env.from_collection(vec![('a', 1), ('a', 2), ('b', 5)])
    ///     .key_by(|t| t.0)
    ///     .reduce(|acc, v| (acc.0, acc.1 + v.1))
    ///     .collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![('a', 1), ('a', 3), ('b', 5)]);
    /// ```
    pub fn reduce(self, mut f: impl FnMut(T, T) -> T + 'static) -> DataStream<'s, T> {
        self.running("Reduce", move |state, v| *state = f(state.clone(), v))
    }

    /// Running sum of one field (Flink's `sum(pos)`): `field` selects it; other fields keep
    /// the key's first record's values.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(2).execute("s", move |env| {
    /// env.from_collection(vec![('a', 1u64), ('a', 1), ('a', 1)])
    ///     .key_by(|t| t.0)
    ///     .sum(|t| &mut t.1)
    ///     .collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![('a', 1), ('a', 2), ('a', 3)]);
    /// ```
    pub fn sum<N: AddAssign + Copy + 'static>(
        self,
        field: fn(&mut T) -> &mut N,
    ) -> DataStream<'s, T> {
        self.running("Sum", move |state, mut v| *field(state) += *field(&mut v))
    }

    /// Running minimum of one field (Flink's `min(pos)`; other fields keep the first record's).
    pub fn min<N: PartialOrd + Copy + 'static>(
        self,
        field: fn(&mut T) -> &mut N,
    ) -> DataStream<'s, T> {
        self.running("Min", move |state, mut v| {
            let x = *field(&mut v);
            if x < *field(state) {
                *field(state) = x;
            }
        })
    }

    /// Running maximum of one field (Flink's `max(pos)`).
    pub fn max<N: PartialOrd + Copy + 'static>(
        self,
        field: fn(&mut T) -> &mut N,
    ) -> DataStream<'s, T> {
        self.running("Max", move |state, mut v| {
            let x = *field(&mut v);
            if x > *field(state) {
                *field(state) = x;
            }
        })
    }

    /// The whole record with the smallest field so far (Flink's `minBy`; first one on ties).
    pub fn min_by<N: PartialOrd + Copy + 'static>(
        self,
        field: fn(&mut T) -> &mut N,
    ) -> DataStream<'s, T> {
        self.running("MinBy", move |state, mut v| {
            if *field(&mut v) < *field(state) {
                *state = v;
            }
        })
    }

    /// The whole record with the largest field so far (Flink's `maxBy`).
    pub fn max_by<N: PartialOrd + Copy + 'static>(
        self,
        field: fn(&mut T) -> &mut N,
    ) -> DataStream<'s, T> {
        self.running("MaxBy", move |state, mut v| {
            if *field(&mut v) > *field(state) {
                *state = v;
            }
        })
    }

    /// Running aggregate: emits the aggregate's result for the key after every record.
    pub fn aggregate<ACC: Data, OUT: Data, A>(self, agg: A) -> DataStream<'s, OUT>
    where
        A: AggregateFunction<T, ACC, OUT>,
    {
        let kf = self.key.clone();
        let pact = Exchange::new(key_route(self.key.clone()));
        let env = self.stream.env.clone();
        let inner =
            self.stream
                .inner
                .unary::<Builder<OUT>, _, _, _>(pact, "Aggregate", move |_, _| {
                    let mut backend = MemoryStateBackend::<K, ACC>::default();
                    move |input, output| {
                        input.for_each(|cap, data| {
                            let mut out = Vec::with_capacity(data.len());
                            for (ts, d) in data.drain(..) {
                                let k = kf(&d);
                                let acc = backend
                                    .get_or_insert_with(&k, &mut || agg.create_accumulator());
                                agg.add(d, acc);
                                out.push((ts, agg.get_result(acc)));
                            }
                            output.session(&cap).give_container(&mut out);
                        });
                    }
                });
        DataStream::new(inner, env)
    }

    /// Runs a [`KeyedProcessFunction`] with per-key state and event/processing-time timers.
    pub fn process<O: Data, F>(self, f: F) -> DataStream<'s, O>
    where
        F: KeyedProcessFunction<K, T, O>,
    {
        self.process_with_backend(f, MemoryStateBackend::<K, F::State>::default())
    }

    /// [`Self::process`] with an explicit state backend.
    pub fn process_with_backend<O: Data, F, B>(self, mut f: F, backend: B) -> DataStream<'s, O>
    where
        F: KeyedProcessFunction<K, T, O>,
        B: StateBackend<K, F::State>,
    {
        let kf = self.key.clone();
        let pact = Exchange::new(key_route(self.key.clone()));
        let env = self.stream.env.clone();
        let scope = env.scope;
        let inner = self.stream.inner.unary_frontier::<Builder<O>, _, _, _>(
            pact,
            "Process",
            move |cap, info| {
                let activator = scope.activator_for(info.address);
                let mut cap: Option<Capability<u64>> = Some(cap);
                let mut backend = backend;
                let mut event_timers = Timers::<K>::default();
                let mut proc_timers = Timers::<K>::default();
                let mut out: Vec<(u64, O)> = Vec::new();
                let mut stash: BTreeMap<u64, Vec<(u64, T)>> = BTreeMap::new();
                move |(input, frontier), output| {
                    let bound = frontier.frontier().iter().min().copied();
                    // Input is handled in timestamp (watermark) order, with the event-time
                    // timers that became due in between, as Flink interleaves records and
                    // watermarks: what a timer sees does not depend on scheduling.
                    input.for_each(|incap, data| {
                        let t = incap.least().copied().unwrap_or(0);
                        stash.entry(t).or_default().append(data);
                    });
                    let Some(c) = cap.as_mut() else {
                        stash.clear();
                        return;
                    };
                    let now = now_ms();
                    loop {
                        let next = stash
                            .first_key_value()
                            .map(|(t, _)| *t)
                            .filter(|t| bound.is_none_or(|b| *t <= b));
                        // Timers due before the next batch (or before the frontier).
                        let timer_bound = match (next, bound) {
                            (Some(t), _) => Some(t),
                            (None, b) => b,
                        };
                        let watermark = timer_bound.map_or(u64::MAX, |f| f.saturating_sub(1));
                        loop {
                            let (ts, k) = if let Some(t) = event_timers.pop_before(timer_bound) {
                                t
                            } else if let Some(t) =
                                proc_timers.pop_before(if bound.is_none() && next.is_none() {
                                    None
                                } else {
                                    Some(now.saturating_add(1))
                                })
                            {
                                t
                            } else {
                                break;
                            };
                            let state = backend.get_or_insert_with(&k, &mut Default::default);
                            let mut ctx = ProcessContext {
                                key: &k,
                                state,
                                timestamp: ts,
                                watermark,
                                clear: false,
                                event_timers: &mut event_timers,
                                proc_timers: &mut proc_timers,
                                out: &mut out,
                            };
                            f.on_timer(ts, &mut ctx);
                            if ctx.clear {
                                backend.remove(&k);
                            }
                            for (ots, o) in out.drain(..) {
                                let time = ots.max(*c.time());
                                output.session(&c.delayed(&time)).give((ots, o));
                            }
                        }
                        let Some(t) = next else { break };
                        let Some(batch) = stash.remove(&t) else { break };
                        for (ts, d) in batch {
                            let k = kf(&d);
                            let state = backend.get_or_insert_with(&k, &mut Default::default);
                            let mut ctx = ProcessContext {
                                key: &k,
                                state,
                                timestamp: ts,
                                watermark,
                                clear: false,
                                event_timers: &mut event_timers,
                                proc_timers: &mut proc_timers,
                                out: &mut out,
                            };
                            f.process_element(d, &mut ctx);
                            if ctx.clear {
                                backend.remove(&k);
                            }
                        }
                        if !out.is_empty() {
                            let time = t.max(*c.time());
                            output.session(&c.delayed(&time)).give_container(&mut out);
                            out.clear();
                        }
                    }
                    match bound {
                        Some(b) => {
                            c.downgrade(&b.max(*c.time()));
                            if let Some(next) = proc_timers.earliest() {
                                activator.activate_after(std::time::Duration::from_millis(
                                    next.saturating_sub(now),
                                ));
                            }
                        }
                        None => cap = None,
                    }
                }
            },
        );
        DataStream::new(inner, env)
    }
}
