//! [`KeyedStream`]: running aggregations and keyed process functions with state and timers.
//!
//! Each operator is fed through timely's `Exchange` channel, routing a record to the worker
//! that owns its key's key group, so a key's state lives on exactly one worker and sees that
//! key's records in order. Running aggregations (`sum`, `reduce`, ...) emit the updated value
//! for every input record, as Flink's do.
//!
//! Every operator here is an `Operator` run by the `driver`: the driver aligns
//! epochs, orders input, fires timers and takes snapshots; the operators below only say what
//! a batch or a timer does to their state.

use std::marker::PhantomData;
use std::ops::AddAssign;

use crate::driver::{keyed_operator, state_in, Ctx, Operator};
use crate::state::{MemoryStateBackend, StateBackend};
use crate::stream::{key_exchange, DataStream};
use crate::timers::{Timer, TimerService};
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

/// What a [`KeyedProcessFunction`] sees: the current key, its state, time, timers, output.
pub struct ProcessContext<'a, K, S, O> {
    key: &'a K,
    state: &'a mut S,
    timestamp: u64,
    watermark: u64,
    now: u64,
    clear: bool,
    timers: &'a mut TimerService<K, ()>,
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
    /// Wall-clock time in ms since the Unix epoch (read once per batch of work).
    pub fn current_processing_time(&self) -> u64 {
        self.now
    }
    /// Calls `on_timer` once the watermark reaches `ts`.
    pub fn register_event_time_timer(&mut self, ts: u64) {
        self.timers.register_event(ts, self.key, ());
    }
    /// Cancels an event-time timer.
    pub fn delete_event_time_timer(&mut self, ts: u64) {
        self.timers.delete_event(ts, self.key, ());
    }
    /// Calls `on_timer` once the wall clock reaches `ts` (ms since the epoch). Pending
    /// processing-time timers fire when the input ends.
    pub fn register_processing_time_timer(&mut self, ts: u64) {
        self.timers.register_processing(ts, self.key, ());
    }
    /// Cancels a processing-time timer.
    pub fn delete_processing_time_timer(&mut self, ts: u64) {
        self.timers.delete_processing(ts, self.key, ());
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

/// A running aggregate per key (`sum`, `reduce`, `min`, ...): the first record of a key
/// becomes its state, every later one is folded in with `update`; the state is emitted after
/// each record.
pub(crate) struct RunningOp<T, K, KF, U> {
    key: KF,
    update: U,
    state: MemoryStateBackend<K, T>,
}

impl<T, K, KF, U> RunningOp<T, K, KF, U> {
    pub(crate) fn new(key: KF, update: U) -> Self {
        RunningOp {
            key,
            update,
            state: MemoryStateBackend::default(),
        }
    }
}

impl<T, K, KF, U> Operator for RunningOp<T, K, KF, U>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + 'static,
    U: FnMut(&mut T, T) + 'static,
{
    type In = T;
    type Out = T;
    type Key = K;
    type Ns = ();
    const ORDERED: bool = false;

    // Out of line on purpose: inlined into the driver, the loop lost the inlining of the map
    // lookup (a call per record, ~4% of a word count); on its own it keeps it.
    #[inline(never)]
    fn element(&mut self, batch: &mut Vec<(u64, T)>, cx: &mut Ctx<'_, Self>) {
        // The hot path of a keyed count: one hash lookup per record, no dynamic dispatch.
        let mut map = self.state.map_mut();
        let out = cx.out();
        out.reserve(batch.len());
        for (ts, d) in batch.drain(..) {
            let k = (self.key)(&d);
            match map.get_mut(&k) {
                Some(state) => {
                    (self.update)(state, d);
                    out.push((ts, state.clone()));
                }
                None => {
                    out.push((ts, d.clone()));
                    map.insert(k, d);
                }
            }
        }
    }

    state_in!(state);
}

/// A running [`AggregateFunction`] per key: emits the result after every record.
pub(crate) struct AggregateOp<T, K, KF, A, ACC, OUT> {
    key: KF,
    agg: A,
    state: MemoryStateBackend<K, ACC>,
    _t: PhantomData<(T, OUT)>,
}

impl<T, K, KF, A, ACC, OUT> AggregateOp<T, K, KF, A, ACC, OUT> {
    pub(crate) fn new(key: KF, agg: A) -> Self {
        AggregateOp {
            key,
            agg,
            state: MemoryStateBackend::default(),
            _t: PhantomData,
        }
    }
}

impl<T, K, KF, A, ACC, OUT> Operator for AggregateOp<T, K, KF, A, ACC, OUT>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + 'static,
    A: AggregateFunction<T, ACC, OUT>,
    ACC: Data,
    OUT: Data,
{
    type In = T;
    type Out = OUT;
    type Key = K;
    type Ns = ();
    const ORDERED: bool = false;

    fn element(&mut self, batch: &mut Vec<(u64, T)>, cx: &mut Ctx<'_, Self>) {
        let mut map = self.state.map_mut();
        let out = cx.out();
        out.reserve(batch.len());
        for (ts, d) in batch.drain(..) {
            let k = (self.key)(&d);
            let acc = map.get_or_insert_with(k, || self.agg.create_accumulator());
            self.agg.add(d, acc);
            out.push((ts, self.agg.get_result(acc)));
        }
    }

    state_in!(state);
}

/// Runs a [`KeyedProcessFunction`] over per-key state in a [`StateBackend`].
pub(crate) struct ProcessOp<T, K, O, KF, F, B> {
    key: KF,
    f: F,
    backend: B,
    _t: PhantomData<(T, K, O)>,
}

impl<T, K, O, KF, F, B> ProcessOp<T, K, O, KF, F, B> {
    pub(crate) fn new(key: KF, f: F, backend: B) -> Self {
        ProcessOp {
            key,
            f,
            backend,
            _t: PhantomData,
        }
    }
}

impl<T, K, O, KF, F, B> Operator for ProcessOp<T, K, O, KF, F, B>
where
    T: Data,
    K: Key,
    O: Data,
    KF: Fn(&T) -> K + 'static,
    F: KeyedProcessFunction<K, T, O>,
    B: StateBackend<K, F::State>,
{
    type In = T;
    type Out = O;
    type Key = K;
    type Ns = ();
    const ORDERED: bool = true;

    fn element(&mut self, batch: &mut Vec<(u64, T)>, cx: &mut Ctx<'_, Self>) {
        let (watermark, now) = (cx.watermark(), cx.now());
        let (timers, out) = cx.timers_and_out();
        for (ts, d) in batch.drain(..) {
            let k = (self.key)(&d);
            let state = self.backend.get_or_insert_with(&k, &mut Default::default);
            let mut ctx = ProcessContext {
                key: &k,
                state,
                timestamp: ts,
                watermark,
                now,
                clear: false,
                timers: &mut *timers,
                out: &mut *out,
            };
            self.f.process_element(d, &mut ctx);
            if ctx.clear {
                self.backend.remove(&k);
            }
        }
    }

    fn timer(&mut self, timer: Timer<K, ()>, cx: &mut Ctx<'_, Self>) {
        let (watermark, now) = (cx.watermark(), cx.now());
        let (timers, out) = cx.timers_and_out();
        let k = timer.key;
        let state = self.backend.get_or_insert_with(&k, &mut Default::default);
        let mut ctx = ProcessContext {
            key: &k,
            state,
            timestamp: timer.ts,
            watermark,
            now,
            clear: false,
            timers,
            out,
        };
        self.f.on_timer(timer.ts, &mut ctx);
        if ctx.clear {
            self.backend.remove(&k);
        }
    }

    state_in!(backend);
}

impl<'s, T: Data, K: Key, KF: Fn(&T) -> K + Clone + 'static> KeyedStream<'s, T, K, KF> {
    pub(crate) fn new(stream: DataStream<'s, T>, key: KF) -> Self {
        KeyedStream {
            stream,
            key,
            _k: std::marker::PhantomData,
        }
    }

    /// Builds a keyed operator on this stream (exchanged by key group).
    fn keyed<Op: Operator<In = T>>(self, name: &str, op: Op) -> DataStream<'s, Op::Out> {
        let env = self.stream.env.clone();
        let route = key_exchange(env.key_groups(), self.key);
        let built = keyed_operator(&env, self.stream.inner, route, name, op, false);
        DataStream::new(built.main, env)
    }

    /// A running aggregate kept per key: the first record of a key becomes its state,
    /// every later record is folded in with `update`; the state is emitted after each record.
    fn running(self, name: &str, update: impl FnMut(&mut T, T) + 'static) -> DataStream<'s, T> {
        let op = RunningOp::new(self.key.clone(), update);
        self.keyed(name, op)
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
        let op = AggregateOp::new(self.key.clone(), agg);
        self.keyed("Aggregate", op)
    }

    /// Runs a [`KeyedProcessFunction`] with per-key state and event/processing-time timers.
    pub fn process<O: Data, F>(self, f: F) -> DataStream<'s, O>
    where
        F: KeyedProcessFunction<K, T, O>,
    {
        self.process_with_backend(f, MemoryStateBackend::<K, F::State>::default())
    }

    /// [`Self::process`] with an explicit state backend.
    pub fn process_with_backend<O: Data, F, B>(self, f: F, backend: B) -> DataStream<'s, O>
    where
        F: KeyedProcessFunction<K, T, O>,
        B: StateBackend<K, F::State>,
    {
        let op = ProcessOp::new(self.key.clone(), f, backend);
        self.keyed("Process", op)
    }
}
