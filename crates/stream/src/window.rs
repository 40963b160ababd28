//! Windows on keyed streams: tumbling, sliding and session windows in event or processing
//! time, count windows, allowed lateness and a side output for late records.
//!
//! # When windows fire (event time)
//! A window `[start, end)` fires when the operator's input frontier reaches `end`, i.e. the
//! watermark reaches `end - 1` (Flink's `maxTimestamp`). Its result carries timestamp
//! `end - 1`. Window state is kept for `allowed_lateness` more; a record that still falls
//! into a fired window fires it again with the updated result (a late firing).
//!
//! # Which records are late
//! Judged against the watermark the record was emitted under (its timely time `F`), so the
//! outcome is the same at every parallelism:
//! - tumbling/sliding: a record is dropped from window `w` if `w.end + lateness <= F`, and
//!   goes to the late side output if it was dropped from all of its windows (Flink's rule);
//! - sessions: a record is late if `ts + lateness < F` (Flink's `isElementLate`); a session
//!   is cleaned up once the frontier passes `end + lateness`, so a record that is not late
//!   can never need a session that is already gone.
//!
//! Processing-time windows are assigned by the wall clock on arrival and fire when the clock
//! passes their end; when the input ends, all pending windows fire.
//!
//! # Firing with epochs
//! The operator driver may handle a batch while its own frontier is still below the
//! batch's (when sources disagree about epochs and watermarks, see `driver`). Then
//! lateness is still judged against the batch's frontier as above, but a window fires only
//! once the operator's frontier has reached its end — a record for a window that has not
//! fired yet just joins it. With one source feeding the operator the two frontiers are the
//! same.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::driver::{keyed_operator, state_in, Ctx, Operator};
use crate::keyed::{AggregateFunction, KeyedStream};
use crate::state::{MemoryStateBackend, StateBackend};
use crate::stream::{key_exchange, DataStream, OutputTag};
use crate::timers::Timer;
use crate::types::{Data, Key};
use crate::watermark::duration_ms;

/// A time window `[start, end)` in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimeWindow {
    /// Inclusive start.
    pub start: u64,
    /// Exclusive end.
    pub end: u64,
}

impl TimeWindow {
    /// The largest timestamp inside the window: `end - 1`.
    pub fn max_timestamp(&self) -> u64 {
        self.end.saturating_sub(1)
    }
    /// Flink's `intersects`: overlapping or touching windows merge into one session.
    fn touches(&self, other: &TimeWindow) -> bool {
        self.start <= other.end && self.end >= other.start
    }
}

/// Event time (record timestamps, watermarks) or processing time (the wall clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeDomain {
    /// Record timestamps and watermarks.
    EventTime,
    /// The operator's wall clock.
    ProcessingTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Sliding { size: u64, slide: u64, offset: u64 },
    Session { gap: u64 },
}

/// Assigns records to windows; built by [`TumblingWindows`], [`SlidingWindows`] or
/// [`SessionWindows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowAssigner {
    shape: Shape,
    domain: TimeDomain,
}

impl WindowAssigner {
    /// Shifts tumbling/sliding window boundaries by `offset` (e.g. for time zones).
    pub fn with_offset(mut self, offset: Duration) -> Self {
        if let Shape::Sliding { offset: o, .. } = &mut self.shape {
            *o = duration_ms(offset);
        }
        self
    }

    /// The time domain windows are in.
    pub fn domain(&self) -> TimeDomain {
        self.domain
    }

    /// The windows a timestamp belongs to (for sessions: its own, not yet merged, window).
    pub fn assign(&self, ts: u64) -> Vec<TimeWindow> {
        match self.shape {
            Shape::Sliding {
                size,
                slide,
                offset,
            } => {
                let last_start = ts.saturating_sub((ts + slide - offset % slide) % slide);
                let mut out = Vec::with_capacity((size / slide.max(1)) as usize + 1);
                let mut start = last_start;
                loop {
                    if start + size <= ts {
                        break;
                    }
                    out.push(TimeWindow {
                        start,
                        end: start + size,
                    });
                    if start < slide {
                        break;
                    }
                    start -= slide;
                }
                out
            }
            Shape::Session { gap } => vec![TimeWindow {
                start: ts,
                end: ts.saturating_add(gap),
            }],
        }
    }

    fn is_session(&self) -> bool {
        matches!(self.shape, Shape::Session { .. })
    }
}

/// Fixed-size, non-overlapping windows.
pub struct TumblingWindows;
impl TumblingWindows {
    /// Tumbling event-time windows of `size`.
    pub fn event_time(size: Duration) -> WindowAssigner {
        let size = duration_ms(size).max(1);
        WindowAssigner {
            shape: Shape::Sliding {
                size,
                slide: size,
                offset: 0,
            },
            domain: TimeDomain::EventTime,
        }
    }
    /// Tumbling processing-time windows of `size`.
    pub fn processing_time(size: Duration) -> WindowAssigner {
        WindowAssigner {
            domain: TimeDomain::ProcessingTime,
            ..Self::event_time(size)
        }
    }
}

/// Fixed-size windows starting every `slide`.
pub struct SlidingWindows;
impl SlidingWindows {
    /// Sliding event-time windows.
    pub fn event_time(size: Duration, slide: Duration) -> WindowAssigner {
        let size = duration_ms(size).max(1);
        let slide = duration_ms(slide).clamp(1, size);
        WindowAssigner {
            shape: Shape::Sliding {
                size,
                slide,
                offset: 0,
            },
            domain: TimeDomain::EventTime,
        }
    }
    /// Sliding processing-time windows.
    pub fn processing_time(size: Duration, slide: Duration) -> WindowAssigner {
        WindowAssigner {
            domain: TimeDomain::ProcessingTime,
            ..Self::event_time(size, slide)
        }
    }
}

/// Windows that close after `gap` without records for a key.
pub struct SessionWindows;
impl SessionWindows {
    /// Event-time sessions.
    pub fn event_time_gap(gap: Duration) -> WindowAssigner {
        WindowAssigner {
            shape: Shape::Session {
                gap: duration_ms(gap).max(1),
            },
            domain: TimeDomain::EventTime,
        }
    }
    /// Processing-time sessions.
    pub fn processing_time_gap(gap: Duration) -> WindowAssigner {
        WindowAssigner {
            domain: TimeDomain::ProcessingTime,
            ..Self::event_time_gap(gap)
        }
    }
}

/// Full-window logic (Flink's `ProcessWindowFunction`): sees all of a window's records.
/// Closures `FnMut(&K, TimeWindow, &[T], &mut Vec<R>)` implement it.
pub trait ProcessWindowFunction<K, T, R>: 'static {
    /// Emits results for one firing of `window` into `out`.
    fn process(&mut self, key: &K, window: TimeWindow, elements: &[T], out: &mut Vec<R>);
}

impl<K, T, R, F: FnMut(&K, TimeWindow, &[T], &mut Vec<R>) + 'static> ProcessWindowFunction<K, T, R>
    for F
{
    fn process(&mut self, key: &K, window: TimeWindow, elements: &[T], out: &mut Vec<R>) {
        self(key, window, elements, out)
    }
}

/// How window contents are kept and turned into results.
pub(crate) trait WinFn<K, T>: 'static {
    type Acc: Data;
    type Out: Data;
    fn create(&mut self) -> Self::Acc;
    fn add(&mut self, acc: &mut Self::Acc, value: T);
    fn merge(&mut self, acc: &mut Self::Acc, other: Self::Acc);
    fn emit(&mut self, key: &K, window: TimeWindow, acc: &Self::Acc, out: &mut Vec<Self::Out>);
}

pub(crate) struct ReduceFn<F>(pub(crate) F);
impl<K, T: Data, F: FnMut(T, T) -> T + 'static> WinFn<K, T> for ReduceFn<F> {
    type Acc = Option<T>;
    type Out = T;
    fn create(&mut self) -> Option<T> {
        None
    }
    fn add(&mut self, acc: &mut Option<T>, value: T) {
        *acc = Some(match acc.take() {
            Some(a) => (self.0)(a, value),
            None => value,
        });
    }
    fn merge(&mut self, acc: &mut Option<T>, other: Option<T>) {
        if let Some(o) = other {
            *acc = Some(match acc.take() {
                Some(a) => (self.0)(a, o),
                None => o,
            });
        }
    }
    fn emit(&mut self, _: &K, _: TimeWindow, acc: &Option<T>, out: &mut Vec<T>) {
        out.extend(acc.iter().cloned());
    }
}

pub(crate) struct AggFn<A, ACC, OUT>(pub(crate) A, pub(crate) PhantomData<(ACC, OUT)>);
impl<K, T, ACC: Data, OUT: Data, A: AggregateFunction<T, ACC, OUT>> WinFn<K, T>
    for AggFn<A, ACC, OUT>
{
    type Acc = ACC;
    type Out = OUT;
    fn create(&mut self) -> ACC {
        self.0.create_accumulator()
    }
    fn add(&mut self, acc: &mut ACC, value: T) {
        self.0.add(value, acc);
    }
    fn merge(&mut self, acc: &mut ACC, other: ACC) {
        let a = std::mem::replace(acc, self.0.create_accumulator());
        *acc = self.0.merge(a, other);
    }
    fn emit(&mut self, _: &K, _: TimeWindow, acc: &ACC, out: &mut Vec<OUT>) {
        out.push(self.0.get_result(acc));
    }
}

pub(crate) struct ProcFn<P, R>(pub(crate) P, pub(crate) PhantomData<R>);
impl<K: 'static, T: Data, R: Data, P: ProcessWindowFunction<K, T, R>> WinFn<K, T> for ProcFn<P, R> {
    type Acc = Vec<T>;
    type Out = R;
    fn create(&mut self) -> Vec<T> {
        Vec::new()
    }
    fn add(&mut self, acc: &mut Vec<T>, value: T) {
        acc.push(value);
    }
    fn merge(&mut self, acc: &mut Vec<T>, other: Vec<T>) {
        acc.extend(other);
    }
    fn emit(&mut self, key: &K, window: TimeWindow, acc: &Vec<T>, out: &mut Vec<R>) {
        self.0.process(key, window, acc, out);
    }
}

/// A keyed stream cut into time windows. Created by [`KeyedStream::window`].
pub struct WindowedStream<'s, T, K, KF> {
    keyed: KeyedStream<'s, T, K, KF>,
    assigner: WindowAssigner,
    lateness: u64,
    late_tag: Option<OutputTag<'s, T>>,
}

impl<'s, T: Data, K: Key, KF: Fn(&T) -> K + Clone + 'static> KeyedStream<'s, T, K, KF> {
    /// Groups each key's records into windows.
    pub fn window(self, assigner: WindowAssigner) -> WindowedStream<'s, T, K, KF> {
        WindowedStream {
            keyed: self,
            assigner,
            lateness: 0,
            late_tag: None,
        }
    }

    /// Windows of `size` records per key, firing every `size` records (Flink's
    /// `countWindow(size)`).
    pub fn count_window(self, size: u64) -> CountWindowedStream<'s, T, K, KF> {
        CountWindowedStream {
            keyed: self,
            size: size.max(1),
            slide: size.max(1),
        }
    }

    /// Windows over the last `size` records of a key, firing every `slide` records (Flink's
    /// `countWindow(size, slide)`).
    pub fn count_window_sliding(self, size: u64, slide: u64) -> CountWindowedStream<'s, T, K, KF> {
        CountWindowedStream {
            keyed: self,
            size: size.max(1),
            slide: slide.max(1),
        }
    }
}

impl<'s, T: Data, K: Key, KF: Fn(&T) -> K + Clone + 'static> WindowedStream<'s, T, K, KF> {
    /// Keeps window state for `lateness` after the window fired; late records within it
    /// fire the window again.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = duration_ms(lateness);
        self
    }

    /// Sends records that are too late for every window to the side output `tag`
    /// (read it with [`DataStream::get_side_output`]).
    pub fn side_output_late_data(mut self, tag: &OutputTag<'s, T>) -> Self {
        self.late_tag = Some(tag.clone());
        self
    }

    /// Incrementally reduces each window to one record.
    ///
    /// ```
    /// use rill_stream::*;
    /// use std::time::Duration;
    /// let out = CollectSink::new();
    /// let sink = out.clone();
    /// StreamExecutionEnvironment::new().with_parallelism(2).execute("tumbling", move |env| {
    ///     env.from_timestamped(
    ///             vec![(1_000, ('a', 1)), (6_000, ('a', 1)), (2_000, ('a', 1)), (9_000, ('b', 1))],
    ///             WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_secs(5)))
    ///         .key_by(|t| t.0)
    ///         .window(TumblingWindows::event_time(Duration::from_secs(5)))
    ///         .reduce(|a, b| (a.0, a.1 + b.1))
    ///         .collect_into(&sink);
    /// }).unwrap();
    /// let mut got = out.take();
    /// got.sort();
    /// assert_eq!(got, vec![('a', 1), ('a', 2), ('b', 1)]);
    /// ```
    pub fn reduce(self, f: impl FnMut(T, T) -> T + 'static) -> DataStream<'s, T> {
        self.build("WindowReduce", ReduceFn(f))
    }

    /// Incrementally aggregates each window with an [`AggregateFunction`].
    pub fn aggregate<ACC: Data, OUT: Data, A: AggregateFunction<T, ACC, OUT>>(
        self,
        agg: A,
    ) -> DataStream<'s, OUT> {
        self.build("WindowAggregate", AggFn(agg, PhantomData))
    }

    /// Hands all of a window's records to a [`ProcessWindowFunction`] when it fires.
    pub fn process<R: Data, P: ProcessWindowFunction<K, T, R>>(self, f: P) -> DataStream<'s, R> {
        self.build("WindowProcess", ProcFn(f, PhantomData))
    }

    fn build<W: WinFn<K, T>>(self, name: &str, wf: W) -> DataStream<'s, W::Out> {
        let WindowedStream {
            keyed,
            assigner,
            lateness,
            late_tag,
        } = self;
        let env = keyed.stream.env.clone();
        let route = key_exchange(env.key_groups(), keyed.key.clone());
        let op = WindowOp::new(keyed.key, assigner, lateness, wf, late_tag.is_some());
        let built = keyed_operator(
            &env,
            keyed.stream.inner,
            route,
            name,
            op,
            late_tag.is_some(),
        );
        if let (Some(tag), Some(late)) = (late_tag.as_ref(), built.late) {
            tag.attach(late);
        }
        DataStream::new(built.main, env)
    }
}

/// Which timer of a window: the one that fires it, or the one that drops its state once the
/// allowed lateness has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct WindowTimer {
    window: TimeWindow,
    cleanup: bool,
}

/// Time windows of one keyed stream (see the module docs for when they fire).
pub(crate) struct WindowOp<T, K, KF, W: WinFn<K, T>> {
    key: KF,
    assigner: WindowAssigner,
    lateness: u64,
    wf: W,
    want_late: bool,
    /// Each key's open windows and their contents.
    state: MemoryStateBackend<K, Vec<(TimeWindow, W::Acc)>>,
    results: Vec<W::Out>,
    _t: PhantomData<T>,
}

impl<T, K: Key, KF, W: WinFn<K, T>> WindowOp<T, K, KF, W> {
    pub(crate) fn new(
        key: KF,
        assigner: WindowAssigner,
        lateness: u64,
        wf: W,
        want_late: bool,
    ) -> Self {
        WindowOp {
            key,
            assigner,
            lateness,
            wf,
            want_late,
            state: MemoryStateBackend::default(),
            results: Vec::new(),
            _t: PhantomData,
        }
    }

    fn event(&self) -> bool {
        self.assigner.domain == TimeDomain::EventTime
    }
}

impl<T, K, KF, W> Operator for WindowOp<T, K, KF, W>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + 'static,
    W: WinFn<K, T>,
{
    type In = T;
    type Out = W::Out;
    type Key = K;
    type Ns = WindowTimer;
    const ORDERED: bool = true;

    fn element(&mut self, batch: &mut Vec<(u64, T)>, cx: &mut Ctx<'_, Self>) {
        let event = self.event();
        let session = self.assigner.is_session();
        let lateness = self.lateness;
        // Lateness is judged against the frontier the batch was emitted under; whether a
        // window has fired against the operator's own frontier.
        let (f_r, fired_below, now) = (cx.batch_frontier(), cx.frontier(), cx.now());
        let mut state = self.state.map_mut();
        let wf = &mut self.wf;
        let results = &mut self.results;
        for (ts, d) in batch.drain(..) {
            let k = (self.key)(&d);
            let t = if event { ts } else { now };
            if session {
                if event && t.saturating_add(lateness) < f_r {
                    if self.want_late {
                        cx.late(ts, d);
                    }
                    continue;
                }
                let mut w = self.assigner.assign(t)[0];
                let wins = state.get_or_insert_with(k.clone(), Vec::new);
                let mut acc = wf.create();
                wf.add(&mut acc, d);
                let mut i = 0;
                while i < wins.len() {
                    if wins[i].0.touches(&w) {
                        let (ow, oacc) = wins.swap_remove(i);
                        w = TimeWindow {
                            start: w.start.min(ow.start),
                            end: w.end.max(ow.end),
                        };
                        wf.merge(&mut acc, oacc);
                    } else {
                        i += 1;
                    }
                }
                wins.push((w, acc));
                let fire = WindowTimer {
                    window: w,
                    cleanup: false,
                };
                if event {
                    cx.timers.register_event(w.max_timestamp(), &k, fire);
                    cx.timers.register_event(
                        w.end.saturating_add(lateness),
                        &k,
                        WindowTimer {
                            window: w,
                            cleanup: true,
                        },
                    );
                    if w.end <= fired_below {
                        if let Some((_, acc)) = wins.last() {
                            wf.emit(&k, w, acc, results);
                            for r in results.drain(..) {
                                cx.emit(w.max_timestamp(), r);
                            }
                        }
                    }
                } else {
                    cx.timers.register_processing(w.end, &k, fire);
                }
            } else {
                let windows = self.assigner.assign(t);
                let mut placed = false;
                let n = windows.len();
                let mut d = Some(d);
                for (i, w) in windows.into_iter().enumerate() {
                    if event && w.end.saturating_add(lateness) <= f_r {
                        continue;
                    }
                    placed = true;
                    let v = if i + 1 == n { d.take() } else { d.clone() };
                    let Some(v) = v else { continue };
                    let wins = state.get_or_insert_with(k.clone(), Vec::new);
                    let pos = match wins.iter().position(|(x, _)| *x == w) {
                        Some(p) => p,
                        None => {
                            wins.push((w, wf.create()));
                            let fire = WindowTimer {
                                window: w,
                                cleanup: false,
                            };
                            if event {
                                cx.timers.register_event(w.max_timestamp(), &k, fire);
                                cx.timers.register_event(
                                    w.end.saturating_add(lateness).saturating_sub(1),
                                    &k,
                                    WindowTimer {
                                        window: w,
                                        cleanup: true,
                                    },
                                );
                            } else {
                                cx.timers.register_processing(w.end, &k, fire);
                            }
                            wins.len() - 1
                        }
                    };
                    let acc = &mut wins[pos].1;
                    wf.add(acc, v);
                    // A late record within the allowed lateness fires the window again.
                    if event && w.end <= fired_below {
                        wf.emit(&k, w, acc, results);
                        for r in results.drain(..) {
                            cx.emit(w.max_timestamp(), r);
                        }
                    }
                }
                if !placed && self.want_late {
                    if let Some(v) = d {
                        cx.late(ts, v);
                    }
                }
            }
        }
    }

    fn timer(&mut self, timer: Timer<K, WindowTimer>, cx: &mut Ctx<'_, Self>) {
        let event = self.event();
        let (k, w) = (timer.key, timer.ns.window);
        let mut state = self.state.map_mut();
        let Some(wins) = state.get_mut(&k) else {
            return;
        };
        if timer.ns.cleanup {
            wins.retain(|(x, _)| *x != w);
            if wins.is_empty() {
                state.remove(&k);
            }
            return;
        }
        let Some(pos) = wins.iter().position(|(x, _)| *x == w) else {
            return;
        };
        self.wf.emit(&k, w, &wins[pos].1, &mut self.results);
        // Event-time windows stay for late firings until their cleanup timer; processing
        // time has no late records.
        if !event || cx.input_ended() {
            wins.swap_remove(pos);
            if wins.is_empty() {
                state.remove(&k);
            }
        }
        let ts = w.max_timestamp();
        for r in self.results.drain(..) {
            if event {
                cx.emit(ts, r);
            } else {
                // A wall-clock timestamp must not move the watermark downstream.
                cx.emit_now(ts, r);
            }
        }
    }

    fn input_ended(&mut self, _cx: &mut Ctx<'_, Self>) {
        self.state.clear();
    }

    state_in!(state);
}

/// A keyed stream cut into count windows. Created by [`KeyedStream::count_window`].
pub struct CountWindowedStream<'s, T, K, KF> {
    keyed: KeyedStream<'s, T, K, KF>,
    size: u64,
    slide: u64,
}

impl<'s, T: Data, K: Key, KF: Fn(&T) -> K + Clone + 'static> CountWindowedStream<'s, T, K, KF> {
    /// Reduces each count window to one record.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(2).execute("cw", move |env| {
    /// env.from_collection(vec![('a', 1), ('a', 2), ('a', 3), ('a', 4), ('a', 5)])
    ///     .key_by(|t| t.0)
    ///     .count_window(2)
    ///     .reduce(|x, y| (x.0, x.1 + y.1))
    ///     .collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![('a', 3), ('a', 7)]);
    /// ```
    pub fn reduce(self, f: impl FnMut(T, T) -> T + 'static) -> DataStream<'s, T> {
        self.build("CountWindowReduce", ReduceFn(f))
    }

    /// Aggregates each count window.
    pub fn aggregate<ACC: Data, OUT: Data, A: AggregateFunction<T, ACC, OUT>>(
        self,
        agg: A,
    ) -> DataStream<'s, OUT> {
        self.build("CountWindowAggregate", AggFn(agg, PhantomData))
    }

    /// Hands each count window's records to a [`ProcessWindowFunction`]; the window passed
    /// spans the records' timestamps (`[min, max + 1)`).
    pub fn process<R: Data, P: ProcessWindowFunction<K, T, R>>(self, f: P) -> DataStream<'s, R> {
        self.build("CountWindowProcess", ProcFn(f, PhantomData))
    }

    fn build<W: WinFn<K, T>>(self, name: &str, wf: W) -> DataStream<'s, W::Out> {
        let env = self.keyed.stream.env.clone();
        let route = key_exchange(env.key_groups(), self.keyed.key.clone());
        let op = CountWindowOp::new(self.keyed.key, self.size, self.slide, wf);
        let built = keyed_operator(&env, self.keyed.stream.inner, route, name, op, false);
        DataStream::new(built.main, env)
    }
}

/// Count windows of one keyed stream: the last `size` records of a key, fired every `slide`.
pub(crate) struct CountWindowOp<T, K, KF, W: WinFn<K, T>> {
    key: KF,
    size: usize,
    slide: usize,
    wf: W,
    /// Each key's last records and how many arrived since the last firing.
    state: MemoryStateBackend<K, (VecDeque<(u64, T)>, usize)>,
    results: Vec<W::Out>,
}

impl<T, K: Key, KF, W: WinFn<K, T>> CountWindowOp<T, K, KF, W> {
    pub(crate) fn new(key: KF, size: u64, slide: u64, wf: W) -> Self {
        CountWindowOp {
            key,
            size: usize::try_from(size).unwrap_or(usize::MAX),
            slide: usize::try_from(slide).unwrap_or(usize::MAX),
            wf,
            state: MemoryStateBackend::default(),
            results: Vec::new(),
        }
    }
}

impl<T, K, KF, W> Operator for CountWindowOp<T, K, KF, W>
where
    T: Data,
    K: Key,
    KF: Fn(&T) -> K + 'static,
    W: WinFn<K, T>,
{
    type In = T;
    type Out = W::Out;
    type Key = K;
    type Ns = ();
    const ORDERED: bool = false;

    fn element(&mut self, batch: &mut Vec<(u64, T)>, cx: &mut Ctx<'_, Self>) {
        let (size, slide) = (self.size, self.slide);
        let mut state = self.state.map_mut();
        for (ts, d) in batch.drain(..) {
            let k = (self.key)(&d);
            let (buf, since) = state.get_or_insert_with(k.clone(), Default::default);
            buf.push_back((ts, d));
            if buf.len() > size {
                buf.pop_front();
            }
            *since += 1;
            if *since == slide {
                *since = 0;
                let mut acc = self.wf.create();
                let (mut lo, mut hi) = (u64::MAX, 0);
                for (t, v) in buf.iter() {
                    lo = lo.min(*t);
                    hi = hi.max(*t);
                    self.wf.add(&mut acc, v.clone());
                }
                let w = TimeWindow {
                    start: lo,
                    end: hi.saturating_add(1),
                };
                self.wf.emit(&k, w, &acc, &mut self.results);
                for r in self.results.drain(..) {
                    cx.emit(ts, r);
                }
                if size == slide {
                    buf.clear();
                }
            }
        }
    }

    state_in!(state);
}

/// Marker for count windows in docs: Flink's `GlobalWindow` with a count trigger.
pub type CountWindow = TimeWindow;
