//! [`DataStream`]: stateless transformations, `union`, `key_by` and side outputs.
//!
//! Stateless operators run on the worker that produced the record (timely's `Pipeline`
//! channel: no copy, no serialisation) and process whole batches; only `key_by` moves data.
//! They keep each batch's time, epoch included, so the epoch a record was read in follows it
//! to the sinks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::rc::Rc;

use timely::communication::Push;
use timely::container::buffer::default_capacity;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{DistributorPact, Exchange, Pipeline};
use timely::dataflow::channels::pushers::exchange::Distributor;
use timely::dataflow::channels::Message;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Concat;
use timely::dataflow::StreamVec;
use timely::progress::Stamp;

use timely::order::Product;

use crate::checkpoint::{decode, encode, Checkpointing, SnapshotState};
use crate::env::JobEnv;
use crate::epoch::{meet, Time};
use crate::error::{CheckpointError, StreamError};
use crate::keyed::KeyedStream;
use crate::keygroup::KeyGroups;
use crate::reader::{restored_sources, resumed_watermark};
use crate::types::{Data, Key};
use crate::watermark::{WatermarkGen, WatermarkState, WatermarkStrategy};

/// The timely stream behind a [`DataStream`]: records with their event timestamps.
pub(crate) type Inner<'s, T> = StreamVec<'s, Time, (u64, T)>;
pub(crate) type Builder<T> = CapacityContainerBuilder<Vec<(u64, T)>>;

/// A stream of records of type `T`, each with an event timestamp, partitioned over the
/// job's workers. Created from a [`JobEnv`] source; consumed by transformations and sinks.
pub struct DataStream<'s, T> {
    pub(crate) inner: Inner<'s, T>,
    pub(crate) env: JobEnv<'s>,
}

impl<'s, T: Data> Clone for DataStream<'s, T> {
    fn clone(&self) -> Self {
        DataStream {
            inner: self.inner.clone(),
            env: self.env.clone(),
        }
    }
}

/// Names a side output (Flink's `OutputTag`), e.g. the late records of a window.
///
/// ```
/// use rill_stream::*;
/// use std::time::Duration;
/// let late = CollectSink::new();
/// let late_sink = late.clone();
/// StreamExecutionEnvironment::new().with_parallelism(1).execute("late", move |env| {
///     let tag = OutputTag::new("late");
///     let counts = env
///         .from_timestamped(vec![(1000, 1u64), (7000, 1), (2000, 1)], WatermarkStrategy::for_monotonous_timestamps())
///         .key_by(|_| 0u8)
///         .window(TumblingWindows::event_time(Duration::from_secs(5)))
///         .side_output_late_data(&tag)
///         .reduce(|a, b| a + b);
///     counts.get_side_output(&tag).collect_into(&late_sink);
/// }).unwrap();
/// assert_eq!(late.take(), vec![1]); // the record at 2000 came after the watermark passed 5000
/// ```
pub struct OutputTag<'s, T> {
    name: String,
    stream: Rc<RefCell<Option<Inner<'s, T>>>>,
}

impl<'s, T> Clone for OutputTag<'s, T> {
    fn clone(&self) -> Self {
        OutputTag {
            name: self.name.clone(),
            stream: self.stream.clone(),
        }
    }
}

impl<'s, T: Data> OutputTag<'s, T> {
    /// A new, unattached tag.
    pub fn new(name: &str) -> Self {
        OutputTag {
            name: name.to_string(),
            stream: Rc::new(RefCell::new(None)),
        }
    }

    /// The tag's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn attach(&self, stream: Inner<'s, T>) {
        let mut slot = self.stream.borrow_mut();
        *slot = Some(match slot.take() {
            Some(existing) => existing.concat(stream),
            None => stream,
        });
    }
}

impl<'s, T: Data> DataStream<'s, T> {
    pub(crate) fn new(inner: Inner<'s, T>, env: JobEnv<'s>) -> Self {
        DataStream { inner, env }
    }

    /// The job environment this stream belongs to.
    pub fn env(&self) -> &JobEnv<'s> {
        &self.env
    }

    /// Applies `f` to every record.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(1).execute("m", move |env| {
    /// env.from_collection(vec![1, 2, 3]).map(|x: i32| x * 10).collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![10, 20, 30]);
    /// ```
    pub fn map<R: Data>(self, mut f: impl FnMut(T) -> R + 'static) -> DataStream<'s, R> {
        let inner = self
            .inner
            .unary::<Builder<R>, _, _, _>(Pipeline, "Map", |_, _| {
                move |input, output| {
                    input.for_each(|cap, data| {
                        let mut out: Vec<(u64, R)> =
                            data.drain(..).map(|(ts, d)| (ts, f(d))).collect();
                        output.session(&cap).give_container(&mut out);
                    });
                }
            });
        DataStream::new(inner, self.env)
    }

    /// Replaces every record by zero or more records.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(1).execute("fm", move |env| {
    /// env.from_collection(vec!["a b".to_string(), "c".to_string()])
    ///     .flat_map(|s: String| s.split(' ').map(String::from).collect::<Vec<_>>())
    ///     .collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec!["a", "b", "c"]);
    /// ```
    pub fn flat_map<R: Data, I>(self, mut f: impl FnMut(T) -> I + 'static) -> DataStream<'s, R>
    where
        I: IntoIterator<Item = R>,
    {
        let inner = self
            .inner
            .unary::<Builder<R>, _, _, _>(Pipeline, "FlatMap", |_, _| {
                move |input, output| {
                    input.for_each(|cap, data| {
                        let mut out = Vec::with_capacity(data.len());
                        for (ts, d) in data.drain(..) {
                            out.extend(f(d).into_iter().map(|r| (ts, r)));
                        }
                        output.session(&cap).give_container(&mut out);
                    });
                }
            });
        DataStream::new(inner, self.env)
    }

    /// Keeps the records for which `f` is true.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(1).execute("f", move |env| {
    /// env.from_collection(vec![1, 2, 3, 4]).filter(|x| x % 2 == 0).collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![2, 4]);
    /// ```
    pub fn filter(self, mut f: impl FnMut(&T) -> bool + 'static) -> DataStream<'s, T> {
        let inner = self
            .inner
            .unary::<Builder<T>, _, _, _>(Pipeline, "Filter", |_, _| {
                move |input, output| {
                    input.for_each(|cap, data| {
                        data.retain(|(_, d)| f(d));
                        if !data.is_empty() {
                            output.session(&cap).give_container(data);
                        }
                    });
                }
            });
        DataStream::new(inner, self.env)
    }

    /// Merges streams of the same type; the watermark is the minimum of the inputs'.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(2).execute("u", move |env| {
    /// let a = env.from_collection(vec![1, 2]);
    /// let b = env.from_collection(vec![3]);
    /// a.union(b).collect_into(&sink);
    /// # }).unwrap();
    /// # let mut v = out.take(); v.sort(); assert_eq!(v, vec![1, 2, 3]);
    /// ```
    pub fn union(self, other: DataStream<'s, T>) -> DataStream<'s, T> {
        DataStream::new(self.inner.concat(other.inner), self.env)
    }

    /// Partitions the stream by key: all records with the same key go to the same worker.
    ///
    /// The key selector runs once to route a record and once more in the keyed operator;
    /// keep it cheap (a field copy, a [`crate::ShortStr`]).
    pub fn key_by<K: Key, KF>(self, key: KF) -> KeyedStream<'s, T, K, KF>
    where
        KF: Fn(&T) -> K + Clone + 'static,
    {
        KeyedStream::new(self, key)
    }

    /// Re-stamps records with `strategy`'s timestamps and generates watermarks from them,
    /// replacing upstream watermarks (Flink's `assignTimestampsAndWatermarks`). The
    /// watermark advances record by record, in each worker's input order.
    ///
    /// With checkpoints the generator's state at the end of each checkpoint epoch is saved
    /// (exact when its input comes from one source in epoch order, as it does after a
    /// source or a chain of `map`s; after a `union` of sources it may be slightly ahead).
    pub fn assign_timestamps_and_watermarks(
        self,
        strategy: WatermarkStrategy<T>,
    ) -> DataStream<'s, T> {
        let env = self.env.clone();
        let (index, peers) = (env.worker_index(), env.parallelism());
        let reporter = env.reporter();
        // The capability's epoch follows the input frontier's (records keep the epoch they
        // were read in); its frontier is the generated one.
        let inner = self.inner.unary_frontier::<Builder<T>, _, _, _>(
            Pipeline,
            "AssignTimestamps",
            |cap, info| {
                let checkpoint = env.checkpointing("AssignTimestamps", &info.address);
                let mut cap = Some(cap);
                let mut gen = WatermarkGen::new(strategy);
                match restored_sources(checkpoint.as_ref()) {
                    Ok(Some((_, marks))) => {
                        gen.restore(resumed_watermark(checkpoint.as_ref(), &marks, index, peers))
                    }
                    Ok(None) => {}
                    Err(e) => reporter.report(e),
                }
                // The generator's state after the last record of each epoch handled, for
                // checkpoints (only kept with checkpoints on).
                let mut ends: BTreeMap<u64, WatermarkState> = BTreeMap::new();
                let mut done = gen.state();
                move |(input, frontier), output| {
                    let Some(c) = cap.as_mut() else {
                        input.for_each(|_, _| {});
                        return;
                    };
                    input.for_each(|incap, data| {
                        let epoch = incap
                            .stamp()
                            .iter()
                            .map(|t| t.outer)
                            .min()
                            .unwrap_or(c.outer);
                        let mut batch = Vec::with_capacity(data.len());
                        let mut at = c.delayed(&Product::new(epoch.max(c.outer), c.inner));
                        for (attached, item) in data.drain(..) {
                            let ts = gen.stamp(&item, attached);
                            batch.push((ts, item));
                            let f = gen.frontier();
                            if f > at.inner {
                                output.session(&at).give_container(&mut batch);
                                batch.clear();
                                at.downgrade(&Product::new(at.outer, f));
                                c.downgrade(&Product::new(c.outer, f));
                            }
                        }
                        if !batch.is_empty() {
                            output.session(&at).give_container(&mut batch);
                        }
                        if checkpoint.is_some() {
                            ends.insert(epoch, gen.state());
                        }
                    });
                    let bound = meet(frontier.frontier());
                    if let Some(cp) = &checkpoint {
                        let upto = bound.map_or(u64::MAX, |m| m.outer);
                        // The state at the end of every epoch before `upto`.
                        while let Some(entry) = ends.first_entry() {
                            if *entry.key() >= upto {
                                break;
                            }
                            done = entry.remove();
                        }
                        let state = done;
                        let position = Vec::new();
                        match bound {
                            Some(m) if m.outer > c.outer => {
                                if let Some(due) = cp.due(c.outer..m.outer) {
                                    let s = SnapshotState::Source {
                                        position,
                                        watermark: state,
                                    };
                                    if let Err(e) = cp.store(due, s) {
                                        reporter.report(e);
                                    }
                                }
                            }
                            Some(_) => {}
                            None => cp.store_final(
                                c.outer,
                                SnapshotState::Source {
                                    position,
                                    watermark: gen.state(),
                                },
                            ),
                        }
                    }
                    match bound {
                        Some(m) if m.outer > c.outer => {
                            c.downgrade(&Product::new(m.outer, c.inner));
                        }
                        Some(_) => {}
                        None => cap = None,
                    }
                }
            },
        );
        DataStream::new(inner, self.env)
    }

    /// The side output named by `tag` (empty if nothing was attached to it).
    pub fn get_side_output<U: Data>(&self, tag: &OutputTag<'s, U>) -> DataStream<'s, U> {
        let inner = match tag.stream.borrow().as_ref() {
            Some(s) => s.clone(),
            None => timely::dataflow::operators::generic::operator::empty(self.env.scope),
        };
        DataStream::new(inner, self.env.clone())
    }

    /// Splits records into two streams: `Ok` to the first, `Err` to the second.
    pub fn split<A: Data, B: Data>(
        self,
        mut f: impl FnMut(T) -> Result<A, B> + 'static,
    ) -> (DataStream<'s, A>, DataStream<'s, B>) {
        let mut builder = OperatorBuilder::new("Split".to_owned(), self.env.scope);
        let mut input = builder.new_input(self.inner, Pipeline);
        let (out_a, stream_a) = builder.new_output::<Vec<(u64, A)>>();
        let (out_b, stream_b) = builder.new_output::<Vec<(u64, B)>>();
        let mut out_a = OutputBuilder::<_, Builder<A>>::from(out_a);
        let mut out_b = OutputBuilder::<_, Builder<B>>::from(out_b);
        builder.build(move |_| {
            move |_frontiers| {
                let mut a = out_a.activate();
                let mut b = out_b.activate();
                input.for_each(|cap, data| {
                    let mut sa = a.session(&cap);
                    let mut sb = b.session(&cap);
                    for (ts, d) in data.drain(..) {
                        match f(d) {
                            Ok(x) => sa.give((ts, x)),
                            Err(y) => sb.give((ts, y)),
                        }
                    }
                });
            }
        });
        (
            DataStream::new(stream_a, self.env.clone()),
            DataStream::new(stream_b, self.env),
        )
    }

    /// Folds the whole stream into one value, emitted once by worker 0 when the input ends.
    ///
    /// Each worker folds its records locally with `fold` (no data moves per record), then
    /// the partial results go to worker 0, which combines them with `merge` — a global
    /// aggregate over a bounded stream (Flink's `windowAll(GlobalWindows)` with a combiner).
    ///
    /// With checkpoints in storage the partial results are checkpointed (the input of an
    /// epoch is folded once the epoch is complete), restored at any parallelism (an old
    /// worker's partial goes to worker `old % parallelism`, and on to the merge), and a
    /// stopped job emits nothing: its partial results stay in the savepoint. Without
    /// checkpoints its output holds the job's epochs until the end, as before.
    ///
    /// ```
    /// # use rill_stream::*;
    /// # let out = CollectSink::new(); let sink = out.clone();
    /// # StreamExecutionEnvironment::new().with_parallelism(3).execute("total", move |env| {
    /// env.from_sequence(1, 100)
    ///     .fold_at_end(0u64, |acc, x| *acc += x, |acc, other| *acc += other)
    ///     .collect_into(&sink);
    /// # }).unwrap();
    /// # assert_eq!(out.take(), vec![5050]);
    /// ```
    pub fn fold_at_end<A: Data>(
        self,
        init: A,
        mut fold: impl FnMut(&mut A, T) + 'static,
        mut merge: impl FnMut(&mut A, A) + 'static,
    ) -> DataStream<'s, A> {
        let local_init = init.clone();
        let env = self.env.clone();
        let (index, peers) = (env.worker_index(), env.parallelism());
        let reporter = env.reporter();
        let partials =
            self.inner
                .unary_frontier::<Builder<A>, _, _, _>(Pipeline, "FoldLocal", |cap, info| {
                    let checkpoint = env.checkpointing("FoldLocal", &info.address);
                    let mut cap = Some(cap);
                    let mut acc = Some(local_init);
                    // With checkpoints: the partial results of old workers this one took over
                    // (sent on at the end beside its own, for the global merge) and input held
                    // until its epoch is complete, so that a snapshot holds exactly the epochs
                    // before it.
                    let mut extra: Vec<A> = Vec::new();
                    let mut held: BTreeMap<u64, Vec<T>> = BTreeMap::new();
                    let mut passed: u64 = 0;
                    match restored_folds::<A>(checkpoint.as_ref(), index, peers) {
                        Ok(Some((own, others))) => {
                            if own.is_some() {
                                acc = own;
                            }
                            extra = others;
                        }
                        Ok(None) => {}
                        Err(e) => reporter.report(e),
                    }
                    move |(input, frontier), output| {
                        let Some(cp) = &checkpoint else {
                            input.for_each(|_, data| {
                                if let Some(a) = acc.as_mut() {
                                    for (_, d) in data.drain(..) {
                                        fold(a, d);
                                    }
                                }
                            });
                            if frontier.is_empty() {
                                if let (Some(c), Some(a)) = (cap.take(), acc.take()) {
                                    output.session(&c).give((u64::MAX, a));
                                }
                            }
                            return;
                        };
                        input.for_each(|incap, data| {
                            let epoch = incap.stamp().iter().map(|t| t.outer).min().unwrap_or(0);
                            held.entry(epoch)
                                .or_default()
                                .extend(data.drain(..).map(|(_, d)| d));
                        });
                        let bound = meet(frontier.frontier());
                        let upto = bound.map_or(u64::MAX, |m| m.outer);
                        while let Some(entry) = held.first_entry() {
                            if *entry.key() >= upto {
                                break;
                            }
                            let records = entry.remove();
                            if let Some(a) = acc.as_mut() {
                                for d in records {
                                    fold(a, d);
                                }
                            }
                        }
                        let state = |acc: &Option<A>, extra: &Vec<A>| encode(&(acc, extra));
                        match bound {
                            Some(m) if m.outer > passed => {
                                if let Some(due) = cp.due(passed..m.outer) {
                                    let stored = state(&acc, &extra)
                                        .map_err(StreamError::from)
                                        .and_then(|s| cp.store(due, SnapshotState::Worker(s)));
                                    if let Err(e) = stored {
                                        reporter.report(e);
                                    }
                                }
                                passed = m.outer;
                                // Its result comes at the end, but its epochs are done: let
                                // checkpoints downstream complete.
                                if let Some(c) = cap.as_mut() {
                                    c.downgrade(&Product::new(m.outer.max(c.outer), 0));
                                }
                            }
                            Some(_) => {}
                            None => {
                                // Once: the input ended.
                                let Some(c) = cap.take() else {
                                    return;
                                };
                                match state(&acc, &extra) {
                                    Ok(s) => cp.store_final(passed, SnapshotState::Worker(s)),
                                    Err(e) => reporter.report(e.into()),
                                }
                                // A stopped job is not drained: the partial result stays in the
                                // savepoint.
                                if let (false, Some(a)) = (cp.stopping(), acc.take()) {
                                    let mut session = output.session(&c);
                                    session.give((u64::MAX, a));
                                    for e in extra.drain(..) {
                                        session.give((u64::MAX, e));
                                    }
                                }
                            }
                        }
                    }
                });
        let is_zero = self.env.worker_index() == 0;
        // With checkpoints a stopped job emits no global result: its parts are in the
        // savepoint.
        let keep = self
            .env
            .stored_job()
            .is_some()
            .then(|| self.env.control().clone());
        let global = partials.unary_frontier::<Builder<A>, _, _, _>(
            Exchange::new(|_: &(u64, A)| 0u64),
            "FoldGlobal",
            move |cap, _| {
                let mut cap = is_zero.then_some(cap);
                let mut acc = Some(init);
                move |(input, frontier), output| {
                    input.for_each(|_, data| {
                        if let Some(a) = acc.as_mut() {
                            for (_, d) in data.drain(..) {
                                merge(a, d);
                            }
                        }
                    });
                    if keep.is_some() {
                        // As in the local fold: epochs pass, the result comes at the end.
                        if let (Some(m), Some(c)) = (meet(frontier.frontier()), cap.as_mut()) {
                            if m.outer > c.outer {
                                c.downgrade(&Product::new(m.outer, 0));
                            }
                        }
                    }
                    if frontier.is_empty() {
                        let stopped = keep.as_ref().is_some_and(|c| c.should_stop());
                        if let (Some(c), Some(a), false) = (cap.take(), acc.take(), stopped) {
                            output.session(&c).give((u64::MAX, a));
                        }
                    }
                }
            },
        );
        DataStream::new(global, self.env)
    }

    /// Pairs every record with its event timestamp (ms).
    pub fn with_timestamps(self) -> DataStream<'s, (u64, T)> {
        let inner =
            self.inner
                .unary::<Builder<(u64, T)>, _, _, _>(Pipeline, "WithTimestamps", |_, _| {
                    move |input, output| {
                        input.for_each(|cap, data| {
                            let mut out: Vec<_> =
                                data.drain(..).map(|(ts, d)| (ts, (ts, d))).collect();
                            output.session(&cap).give_container(&mut out);
                        });
                    }
                });
        DataStream::new(inner, self.env)
    }
}

/// The exchange of keyed operators: every record goes to the worker that owns its key's key
/// group.
pub(crate) fn key_exchange<T: Data, K: Hash + 'static, KF: Fn(&T) -> K + 'static>(
    groups: KeyGroups,
    key: KF,
) -> KeyPact<T, K, KF> {
    DistributorPact(Box::new(move |peers| KeyDistributor {
        groups,
        key,
        targets: Vec::new(),
        buffers: (0..peers).map(|_| Vec::new()).collect(),
        _k: std::marker::PhantomData,
    }))
}

/// The pact [`key_exchange`] builds.
pub(crate) type KeyPact<T, K, KF> =
    DistributorPact<Box<dyn FnOnce(usize) -> KeyDistributor<T, K, KF>>>;

/// Splits containers by key for [`key_exchange`], in two passes: first every record's
/// destination, computed from the record where it lies, then the moves. Timely's generic
/// distributor moves each record out before hashing its key, and re-reading the key from that
/// fresh copy stalled the loop (it cost a third of a two-worker word count's CPU).
pub(crate) struct KeyDistributor<T, K, KF> {
    groups: KeyGroups,
    key: KF,
    targets: Vec<usize>,
    /// One buffer per worker, sent when full (timely's 8 KiB buffers).
    buffers: Vec<Vec<(u64, T)>>,
    _k: std::marker::PhantomData<fn() -> K>,
}

impl<T, K: Hash, KF: Fn(&T) -> K> Distributor<Vec<(u64, T)>> for KeyDistributor<T, K, KF> {
    fn partition<Tm: Clone, P: Push<Message<Tm, Vec<(u64, T)>>>>(
        &mut self,
        container: &mut Vec<(u64, T)>,
        stamp: &Stamp<Tm>,
        pushers: &mut [P],
    ) {
        let last = pushers.len().min(self.buffers.len()).saturating_sub(1);
        let capacity = default_capacity::<(u64, T)>();
        self.targets.clear();
        let (groups, key) = (self.groups, &self.key);
        self.targets
            .extend(container.iter().map(|(_, d)| groups.worker_of_key(&key(d))));
        for (record, &to) in container.drain(..).zip(self.targets.iter()) {
            // The route is a worker index already; the clamp only guards the indexing.
            let to = to.min(last);
            let buffer = &mut self.buffers[to];
            if buffer.capacity() == 0 {
                buffer.reserve(capacity);
            }
            buffer.push(record);
            if buffer.len() >= capacity {
                Message::push_at(buffer, stamp.clone(), &mut pushers[to]);
                buffer.clear();
            }
        }
    }

    fn flush<Tm: Clone, P: Push<Message<Tm, Vec<(u64, T)>>>>(
        &mut self,
        stamp: &Stamp<Tm>,
        pushers: &mut [P],
    ) {
        for (buffer, pusher) in self.buffers.iter_mut().zip(pushers.iter_mut()) {
            if !buffer.is_empty() {
                Message::push_at(buffer, stamp.clone(), pusher);
                buffer.clear();
            }
        }
    }

    fn relax(&mut self) {
        self.targets = Vec::new();
    }
}

/// A `fold_at_end`'s partial results from the checkpoint the job was restored from: its own
/// old worker's (at the same index), and those of the old workers it takes over (old
/// worker `i` goes to worker `i % parallelism`).
#[allow(clippy::type_complexity)]
fn restored_folds<A: Data>(
    checkpoint: Option<&Checkpointing>,
    index: usize,
    peers: usize,
) -> Result<Option<(Option<A>, Vec<A>)>, StreamError> {
    let Some((id, parts)) = checkpoint.and_then(Checkpointing::restored) else {
        return Ok(None);
    };
    let (mut own, mut others) = (None, Vec::new());
    for (old, part) in parts.iter().enumerate() {
        if old % peers != index {
            continue;
        }
        let Some(SnapshotState::Worker(bytes)) = part else {
            return Err(CheckpointError::Incompatible {
                id,
                detail: "a fold's part holds no partial result".into(),
            }
            .into());
        };
        let (acc, extra): (Option<A>, Vec<A>) = decode(bytes)?;
        match (old == index, acc) {
            (true, a) => own = a,
            (false, Some(a)) => others.push(a),
            (false, None) => {}
        }
        others.extend(extra);
    }
    Ok(Some((own, others)))
}
