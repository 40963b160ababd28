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

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Capability;

use crate::keyed::{now_ms, AggregateFunction, KeyedStream, Timers};
use crate::state::MemoryStateBackend;
use crate::stream::{key_route, Builder, DataStream, OutputTag};
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
trait WinFn<K, T>: 'static {
    type Acc: Data;
    type Out: Data;
    fn create(&mut self) -> Self::Acc;
    fn add(&mut self, acc: &mut Self::Acc, value: T);
    fn merge(&mut self, acc: &mut Self::Acc, other: Self::Acc);
    fn emit(&mut self, key: &K, window: TimeWindow, acc: &Self::Acc, out: &mut Vec<Self::Out>);
}

struct ReduceFn<F>(F);
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

struct AggFn<A, ACC, OUT>(A, std::marker::PhantomData<(ACC, OUT)>);
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

struct ProcFn<P, R>(P, std::marker::PhantomData<R>);
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
        self.build("WindowAggregate", AggFn(agg, std::marker::PhantomData))
    }

    /// Hands all of a window's records to a [`ProcessWindowFunction`] when it fires.
    pub fn process<R: Data, P: ProcessWindowFunction<K, T, R>>(self, f: P) -> DataStream<'s, R> {
        self.build("WindowProcess", ProcFn(f, std::marker::PhantomData))
    }

    fn build<W: WinFn<K, T>>(self, name: &str, mut wf: W) -> DataStream<'s, W::Out> {
        let WindowedStream {
            keyed,
            assigner,
            lateness,
            late_tag,
        } = self;
        let env = keyed.stream.env.clone();
        let scope = env.scope;
        let kf = keyed.key.clone();
        let mut builder = OperatorBuilder::new(name.to_owned(), scope);
        let info = builder.operator_info();
        let mut input = builder.new_input(keyed.stream.inner, Exchange::new(key_route(keyed.key)));
        let (main_out, main_stream) = builder.new_output::<Vec<(u64, W::Out)>>();
        let (late_out, late_stream) = builder.new_output::<Vec<(u64, T)>>();
        let mut main_out = OutputBuilder::<_, Builder<W::Out>>::from(main_out);
        let mut late_out = OutputBuilder::<_, Builder<T>>::from(late_out);
        let activator = scope.activator_for(info.address);
        let event = assigner.domain == TimeDomain::EventTime;
        let session = assigner.is_session();
        let want_late = late_tag.is_some();

        builder.build(move |caps| {
            let mut caps = caps.into_iter();
            let mut cap: Option<Capability<u64>> = caps.next();
            let mut late_cap: Option<Capability<u64>> = caps.next();
            // Window contents per key, behind the state backend (snapshot/restore); the hot
            // path uses the map directly.
            let mut backend = MemoryStateBackend::<K, Vec<(TimeWindow, W::Acc)>>::default();
            let mut fire: Timers<(K, TimeWindow)> = Timers::default();
            let mut cleanup: Timers<(K, TimeWindow)> = Timers::default();
            let mut stash: BTreeMap<u64, Vec<(u64, T)>> = BTreeMap::new();
            let mut results: Vec<W::Out> = Vec::new();
            let mut fired: Vec<(u64, W::Out)> = Vec::new();
            let mut late_batch: Vec<(u64, T)> = Vec::new();
            move |frontiers| {
                let state = backend.map_mut();
                let bound = frontiers[0].frontier().iter().min().copied();
                let mut main = main_out.activate();
                let mut late = late_out.activate();
                // Input is handled in watermark order, firing the windows that became due in
                // between, as Flink interleaves records and watermarks.
                input.for_each(|incap, data| {
                    let t = incap.least().copied().unwrap_or(0);
                    stash.entry(t).or_default().append(data);
                });
                let (Some(c), Some(lc)) = (cap.as_mut(), late_cap.as_mut()) else {
                    stash.clear();
                    return;
                };
                let now = now_ms();
                loop {
                    let next = stash
                        .first_key_value()
                        .map(|(t, _)| *t)
                        .filter(|t| bound.is_none_or(|b| *t <= b));
                    // Fire what is due before the next batch: event-time windows whose end the
                    // watermark frontier has reached, processing-time ones the clock has;
                    // everything once the input has ended.
                    let frontier_now = next.or(bound);
                    let due = if event {
                        frontier_now.map(|f| f.saturating_add(1))
                    } else if bound.is_none() && next.is_none() {
                        None
                    } else {
                        Some(now.saturating_add(1))
                    };
                    while let Some((_, (k, w))) = fire.pop_before(due) {
                        let Some(wins) = state.get_mut(&k) else {
                            continue;
                        };
                        let Some(pos) = wins.iter().position(|(x, _)| *x == w) else {
                            continue;
                        };
                        wf.emit(&k, w, &wins[pos].1, &mut results);
                        if !event || frontier_now.is_none() {
                            wins.swap_remove(pos);
                            if wins.is_empty() {
                                state.remove(&k);
                            }
                        }
                        let ts = w.max_timestamp();
                        let time = if event { ts.max(*c.time()) } else { *c.time() };
                        let delayed = c.delayed(&time);
                        let mut session = main.session(&delayed);
                        for r in results.drain(..) {
                            session.give((ts, r));
                        }
                    }
                    if event {
                        while let Some((_, (k, w))) =
                            cleanup.pop_before(frontier_now.map(|f| f.saturating_add(1)))
                        {
                            if let Some(wins) = state.get_mut(&k) {
                                wins.retain(|(x, _)| *x != w);
                                if wins.is_empty() {
                                    state.remove(&k);
                                }
                            }
                        }
                    }
                    let Some(f_r) = next else { break };
                    let Some(batch) = stash.remove(&f_r) else {
                        break;
                    };
                    for (ts, d) in batch {
                        let k = kf(&d);
                        let t = if event { ts } else { now };
                        if session {
                            if event && t.saturating_add(lateness) < f_r {
                                late_batch.push((ts, d));
                                continue;
                            }
                            let mut w = assigner.assign(t)[0];
                            let wins = state.entry(k.clone()).or_default();
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
                            fire.register(w.end, &(k.clone(), w));
                            if event {
                                cleanup.register(
                                    w.end.saturating_add(lateness).saturating_add(1),
                                    &(k.clone(), w),
                                );
                                if w.end <= f_r {
                                    if let Some((_, acc)) = wins.last() {
                                        wf.emit(&k, w, acc, &mut results);
                                        fired.extend(
                                            results.drain(..).map(|r| (w.max_timestamp(), r)),
                                        );
                                    }
                                }
                            }
                        } else {
                            let windows = assigner.assign(t);
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
                                let wins = state.entry(k.clone()).or_default();
                                let pos = match wins.iter().position(|(x, _)| *x == w) {
                                    Some(p) => p,
                                    None => {
                                        wins.push((w, wf.create()));
                                        fire.register(w.end, &(k.clone(), w));
                                        if event {
                                            cleanup.register(
                                                w.end.saturating_add(lateness),
                                                &(k.clone(), w),
                                            );
                                        }
                                        wins.len() - 1
                                    }
                                };
                                let acc = &mut wins[pos].1;
                                wf.add(acc, v);
                                // A late record within the allowed lateness fires again.
                                if event && w.end <= f_r {
                                    wf.emit(&k, w, acc, &mut results);
                                    fired.extend(results.drain(..).map(|r| (w.max_timestamp(), r)));
                                }
                            }
                            if !placed {
                                if let Some(v) = d {
                                    late_batch.push((ts, v));
                                }
                            }
                        }
                    }
                    let time = f_r.max(*c.time());
                    if !late_batch.is_empty() {
                        if want_late {
                            late.session(&lc.delayed(&time))
                                .give_container(&mut late_batch);
                        }
                        late_batch.clear();
                    }
                    if !fired.is_empty() {
                        main.session(&c.delayed(&time)).give_container(&mut fired);
                        fired.clear();
                    }
                }
                match bound {
                    Some(b) => {
                        c.downgrade(&b.max(*c.time()));
                        if !event {
                            if let Some(next) = fire.earliest() {
                                activator.activate_after(Duration::from_millis(
                                    next.saturating_sub(now),
                                ));
                            }
                        }
                        lc.downgrade(&b.max(*lc.time()));
                    }
                    None => {
                        cap = None;
                        late_cap = None;
                        state.clear();
                    }
                }
            }
        });
        if let Some(tag) = late_tag.as_ref() {
            tag.attach(late_stream);
        }
        DataStream::new(main_stream, env)
    }
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
        self.build("CountWindowAggregate", AggFn(agg, std::marker::PhantomData))
    }

    /// Hands each count window's records to a [`ProcessWindowFunction`]; the window passed
    /// spans the records' timestamps (`[min, max + 1)`).
    pub fn process<R: Data, P: ProcessWindowFunction<K, T, R>>(self, f: P) -> DataStream<'s, R> {
        self.build("CountWindowProcess", ProcFn(f, std::marker::PhantomData))
    }

    fn build<W: WinFn<K, T>>(self, name: &str, mut wf: W) -> DataStream<'s, W::Out> {
        let (size, slide) = (self.size as usize, self.slide as usize);
        let kf = self.keyed.key.clone();
        let env = self.keyed.stream.env.clone();
        let pact = Exchange::new(key_route(self.keyed.key));
        let inner =
            self.keyed
                .stream
                .inner
                .unary::<Builder<W::Out>, _, _, _>(pact, name, move |_, _| {
                    let mut backend = MemoryStateBackend::<
                        K,
                        (std::collections::VecDeque<(u64, T)>, usize),
                    >::default();
                    let mut results = Vec::new();
                    move |input, output| {
                        input.for_each(|cap, data| {
                            let mut out = Vec::new();
                            for (ts, d) in data.drain(..) {
                                let k = kf(&d);
                                let (buf, since) = backend.map_mut().entry(k.clone()).or_default();
                                buf.push_back((ts, d));
                                if buf.len() > size {
                                    buf.pop_front();
                                }
                                *since += 1;
                                if *since == slide {
                                    *since = 0;
                                    let mut acc = wf.create();
                                    let (mut lo, mut hi) = (u64::MAX, 0);
                                    for (t, v) in buf.iter() {
                                        lo = lo.min(*t);
                                        hi = hi.max(*t);
                                        wf.add(&mut acc, v.clone());
                                    }
                                    let w = TimeWindow {
                                        start: lo,
                                        end: hi.saturating_add(1),
                                    };
                                    wf.emit(&k, w, &acc, &mut results);
                                    out.extend(results.drain(..).map(|r| (ts, r)));
                                    if size == slide {
                                        buf.clear();
                                    }
                                }
                            }
                            if !out.is_empty() {
                                output.session(&cap).give_container(&mut out);
                            }
                        });
                    }
                });
        DataStream::new(inner, env)
    }
}

/// Marker for count windows in docs: Flink's `GlobalWindow` with a count trigger.
pub type CountWindow = TimeWindow;
