//! Sources: collections and iterators, parallel sequences, [`SourceFunction`]s and text files.
//!
//! In-memory sources run inside the worker and hand timely a batch of up to
//! [`SOURCE_BATCH`] records per activation, so they never starve the operators downstream.
//! A [`SourceFunction`] may block (sleep, read a socket); it therefore runs on a thread of its
//! own and reaches the worker through a bounded queue — the bound is the source's
//! backpressure — waking the worker with timely's `SyncActivator`.
//!
//! Every source holds one capability at `(epoch, frontier)`: the frontier follows its
//! watermark strategy record by record, the epoch follows the job's epoch clock (checked at
//! each activation; an idle source wakes itself at each epoch boundary to close the epoch).
//! A stopped or failed job makes every source finish at its next activation.
//! Connector sources ([`crate::SourceReader`]) live in [`crate::reader`].

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::operator::source;
use timely::order::Product;
use timely::scheduling::SyncActivator;

use crate::checkpoint::{Checkpointing, SnapshotState};
use crate::env::JobEnv;
use crate::error::{CheckpointError, StreamError};
use crate::reader::restored_sources;
use crate::stream::DataStream;
use crate::types::Data;
use crate::watermark::{WatermarkGen, WatermarkStrategy};

/// Records an in-worker source emits per activation.
pub const SOURCE_BATCH: usize = 4096;

type Builder<T> = CapacityContainerBuilder<Vec<(u64, T)>>;

impl<'s> JobEnv<'s> {
    /// A non-parallel source over an iterator (Flink's `fromCollection`): worker 0 emits every
    /// item, in order; records carry timestamp 0 until
    /// [`DataStream::assign_timestamps_and_watermarks`] gives them one.
    ///
    /// `iter` is built on every worker (the job closure runs on each) and dropped on all
    /// but worker 0.
    pub fn from_iter<T: Data, I>(&self, iter: I) -> DataStream<'s, T>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'static,
    {
        let it = (self.worker_index() == 0).then(|| iter.into_iter().map(|x| (0, x)));
        self.iter_source("FromIter", it, WatermarkStrategy::no_watermarks(), false)
    }

    /// [`Self::from_iter`] over a `Vec`.
    pub fn from_collection<T: Data>(&self, items: Vec<T>) -> DataStream<'s, T> {
        self.from_iter(items)
    }

    /// A non-parallel source of `(timestamp_ms, item)` pairs with a watermark strategy
    /// (worker 0 emits them in order).
    ///
    /// ```
    /// use rill_stream::{StreamExecutionEnvironment, CollectSink, WatermarkStrategy};
    /// let out = CollectSink::new();
    /// let sink = out.clone();
    /// StreamExecutionEnvironment::new().with_parallelism(1).execute("ts", move |env| {
    ///     env.from_timestamped(vec![(5, 'a'), (3, 'b')], WatermarkStrategy::for_monotonous_timestamps())
    ///         .collect_into(&sink);
    /// }).unwrap();
    /// assert_eq!(out.take(), vec!['a', 'b']);
    /// ```
    pub fn from_timestamped<T: Data>(
        &self,
        items: Vec<(u64, T)>,
        strategy: WatermarkStrategy<T>,
    ) -> DataStream<'s, T> {
        let it = (self.worker_index() == 0).then(|| items.into_iter());
        self.iter_source("FromTimestamped", it, strategy, false)
    }

    /// A parallel source of the numbers `start..=end` (Flink's `fromSequence`): each worker
    /// emits one contiguous slice.
    pub fn from_sequence(&self, start: u64, end: u64) -> DataStream<'s, u64> {
        let (index, peers) = (self.worker_index() as u128, self.parallelism() as u128);
        let total = if end >= start {
            u128::from(end - start) + 1
        } else {
            0
        };
        let lo = u128::from(start) + total * index / peers;
        let hi = u128::from(start) + total * (index + 1) / peers;
        let (lo, hi) = (lo as u64, hi as u64);
        self.iter_source(
            "FromSequence",
            Some((lo..hi).map(|x| (0, x))),
            WatermarkStrategy::no_watermarks(),
            true,
        )
    }

    /// A parallel source: `make(worker_index, parallelism)` builds each worker's share.
    pub fn from_parallel_iter<T: Data, I, F>(
        &self,
        make: F,
        strategy: WatermarkStrategy<T>,
    ) -> DataStream<'s, T>
    where
        F: FnOnce(usize, usize) -> I,
        I: IntoIterator<Item = T>,
        I::IntoIter: 'static,
    {
        let it = make(self.worker_index(), self.parallelism())
            .into_iter()
            .map(|x| (0, x));
        self.iter_source("FromParallelIter", Some(it), strategy, true)
    }

    /// An in-worker source over `iter` (`None` on workers where it is inactive). With
    /// checkpoints its position is how many records it emitted: restored by skipping them,
    /// which needs the same iterator on the same worker (`parallel` sources restore only at
    /// the parallelism they were checkpointed at).
    fn iter_source<T: Data, I>(
        &self,
        name: &str,
        iter: Option<I>,
        strategy: WatermarkStrategy<T>,
        parallel: bool,
    ) -> DataStream<'s, T>
    where
        I: Iterator<Item = (u64, T)> + 'static,
    {
        let scope = self.scope;
        let clock = self.clock();
        let control = self.control().clone();
        let reporter = self.reporter();
        let (index, peers) = (self.worker_index(), self.parallelism());
        let stream = source::<_, Builder<T>, _, _>(scope, name, |cap, info| {
            let checkpoint = self.checkpointing(name, &info.address);
            let activator = scope.activator_for(info.address);
            let mut iter = iter;
            let mut gen = WatermarkGen::new(strategy);
            let mut emitted: u64 = 0;
            let restored = restore_iter(
                checkpoint.as_ref(),
                iter.as_mut(),
                &mut gen,
                (index, peers, parallel),
            );
            match restored {
                Ok(n) => emitted = n,
                Err(e) => reporter.report(e),
            }
            let position = |emitted: u64, gen: &WatermarkGen<T>| SnapshotState::Source {
                position: emitted.to_le_bytes().to_vec(),
                watermark: gen.state(),
            };
            if let (None, Some(cp)) = (&iter, &checkpoint) {
                // Inactive here: an empty part stands for it in every checkpoint.
                cp.store_final(0, position(0, &gen));
            }
            let mut cap = iter.is_some().then_some(cap);
            move |output| {
                let (Some(c), Some(it)) = (cap.as_mut(), iter.as_mut()) else {
                    cap = None;
                    return;
                };
                // Never registered with the stop handle: it re-activates itself until done,
                // so it sees a stop at its next batch anyway.
                if control.should_stop() {
                    if let Some(cp) = checkpoint.as_ref().filter(|_| !reporter.failed()) {
                        cp.store_final(c.outer, position(emitted, &gen));
                    }
                    cap = None;
                    iter = None;
                    return;
                }
                let epoch = clock.epoch_at(Instant::now());
                if epoch > c.outer {
                    if let Some(cp) = &checkpoint {
                        if let Some(due) = cp.due(c.outer..epoch) {
                            if let Err(e) = cp.store(due, position(emitted, &gen)) {
                                reporter.report(e);
                            }
                        }
                    }
                    c.downgrade(&Product::new(epoch, c.inner));
                }
                let mut batch = Vec::with_capacity(SOURCE_BATCH);
                let mut exhausted = false;
                // Counted in a local: a captured counter would be stored on every record.
                let mut taken: u64 = 0;
                for _ in 0..SOURCE_BATCH {
                    let Some((attached, item)) = it.next() else {
                        exhausted = true;
                        break;
                    };
                    taken += 1;
                    let ts = gen.stamp(&item, attached);
                    batch.push((ts, item));
                    let f = gen.frontier();
                    if f > c.inner {
                        output.session(&*c).give_container(&mut batch);
                        batch.clear();
                        c.downgrade(&Product::new(c.outer, f));
                    }
                }
                if !batch.is_empty() {
                    output.session(&*c).give_container(&mut batch);
                }
                emitted += taken;
                if exhausted {
                    if let Some(cp) = &checkpoint {
                        cp.store_final(c.outer, position(emitted, &gen));
                    }
                    cap = None;
                    iter = None;
                } else {
                    activator.activate();
                }
            }
        });
        DataStream::new(stream, self.clone())
    }

    /// A non-parallel [`SourceFunction`] without watermarks (Flink's `addSource`).
    pub fn add_source<T: Data, S: SourceFunction<T>>(&self, source_fn: S) -> DataStream<'s, T> {
        self.from_source(source_fn, WatermarkStrategy::no_watermarks(), "Source")
    }

    /// A non-parallel [`SourceFunction`] with a watermark strategy (Flink's `fromSource`).
    /// It runs on its own thread, started on worker 0; the function is dropped unused on the
    /// other workers.
    pub fn from_source<T: Data, S: SourceFunction<T>>(
        &self,
        source_fn: S,
        strategy: WatermarkStrategy<T>,
        name: &str,
    ) -> DataStream<'s, T> {
        let scope = self.scope;
        let env = self.reporter();
        let clock = self.clock();
        let control = self.control().clone();
        let active = self.worker_index() == 0;
        let stream = source::<_, Builder<T>, _, _>(scope, name, move |cap, info| {
            let mut gen = WatermarkGen::new(strategy);
            let mut running = None;
            let activator = scope.activator_for(info.address.clone());
            if active {
                let sync = scope.worker().sync_activator_for(info.address.to_vec());
                control.stop.register(sync.clone());
                match spawn_source(source_fn, sync) {
                    Ok(r) => running = Some(r),
                    Err(e) => env.report(e),
                }
            }
            let mut cap = running.is_some().then_some(cap);
            let mut drained: Vec<SourceMsg<T>> = Vec::new();
            // The epoch whose end a wake-up is already scheduled for.
            let mut tick: Option<u64> = None;
            move |output| {
                let (Some(c), Some(r)) = (cap.as_mut(), running.as_mut()) else {
                    return;
                };
                if control.should_stop() {
                    // Dropping the source cancels it: `is_cancelled` turns true and a
                    // blocked `collect` returns. Its thread is not joined (that could block
                    // the worker); it ends on its own.
                    cap = None;
                    running = None;
                    return;
                }
                let now = Instant::now();
                let epoch = clock.epoch_at(now);
                if epoch > c.outer {
                    c.downgrade(&Product::new(epoch, c.inner));
                }
                let done = r.shared.drain_into(&mut drained);
                let mut batch = Vec::with_capacity(drained.len());
                for msg in drained.drain(..) {
                    match msg {
                        SourceMsg::Record(attached, item) => {
                            let ts = gen.stamp(&item, attached.unwrap_or(0));
                            batch.push((ts, item));
                            let f = gen.frontier();
                            if f > c.inner {
                                output.session(&*c).give_container(&mut batch);
                                batch.clear();
                                c.downgrade(&Product::new(c.outer, f));
                            }
                        }
                        SourceMsg::Watermark(w) => {
                            gen.explicit_watermark(w);
                            let f = gen.frontier();
                            if f > c.inner {
                                if !batch.is_empty() {
                                    output.session(&*c).give_container(&mut batch);
                                    batch.clear();
                                }
                                c.downgrade(&Product::new(c.outer, f));
                            }
                        }
                    }
                }
                if !batch.is_empty() {
                    output.session(&*c).give_container(&mut batch);
                }
                if done {
                    if let Some(handle) = r.thread.take() {
                        match handle.join() {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => env.report(e),
                            Err(_) => {
                                env.report(StreamError::Source("source thread panicked".into()))
                            }
                        }
                    }
                    cap = None;
                    running = None;
                } else if tick != Some(epoch) {
                    // The thread wakes the worker only when it queues records: close epochs
                    // while it is quiet.
                    activator.activate_after(clock.until_after(epoch, now));
                    tick = Some(epoch);
                }
            }
        });
        DataStream::new(stream, self.clone())
    }

    /// The lines of a text file, as a non-parallel source (Flink's `readTextFile`).
    /// A missing or unreadable file makes `execute` fail with [`StreamError::Io`].
    pub fn read_text_file(&self, path: impl Into<PathBuf>) -> DataStream<'s, String> {
        self.from_source(
            TextFileSource { path: path.into() },
            WatermarkStrategy::no_watermarks(),
            "TextFile",
        )
    }
}

/// A user-defined source (Flink's `SourceFunction`): `run` emits records through the context
/// and returns when the input is exhausted. It runs on a dedicated thread, so it may block or
/// sleep freely.
///
/// ```
/// use rill_stream::{SourceContext, SourceFunction, StreamError};
/// struct Hello { count: usize }
/// impl SourceFunction<String> for Hello {
///     fn run(&mut self, ctx: &mut SourceContext<String>) -> Result<(), StreamError> {
///         for _ in 0..self.count {
///             if ctx.is_cancelled() { break; }
///             ctx.collect("Hello Flink!".to_string());
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait SourceFunction<T>: Send + 'static {
    /// Emits the source's records; returning ends the source.
    fn run(&mut self, ctx: &mut SourceContext<T>) -> Result<(), StreamError>;
}

enum SourceMsg<T> {
    Record(Option<u64>, T),
    Watermark(u64),
}

/// Records queued by a source thread for its worker.
struct Queue<T> {
    msgs: Vec<SourceMsg<T>>,
    finished: bool,
    cancelled: bool,
}

/// The hand-off between a source thread and its worker: a queue behind a mutex (held only
/// to push one record or to swap the whole queue out, never while running user code or
/// dataflow operators) and a condvar on which a source waits while the queue is full.
struct Shared<T> {
    queue: Mutex<Queue<T>>,
    not_full: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        match self.queue.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Moves all queued messages into `out`; true once the source has finished and
    /// everything has been drained.
    fn drain_into(&self, out: &mut Vec<SourceMsg<T>>) -> bool {
        let mut q = self.lock();
        std::mem::swap(&mut q.msgs, out);
        let done = q.finished;
        drop(q);
        self.not_full.notify_all();
        done
    }

    fn cancel(&self) {
        self.lock().cancelled = true;
        self.not_full.notify_all();
    }
}

/// A [`SourceFunction`]'s way to emit records and watermarks.
///
/// Each record is queued for the worker at once (the worker is woken when the queue goes
/// from empty to non-empty and takes everything queued in one go), so a slow source is not
/// delayed and a fast one is batched. When [`SOURCE_QUEUE`] records are waiting, `collect`
/// blocks: that is the source's backpressure.
pub struct SourceContext<T> {
    shared: Arc<Shared<T>>,
    activator: SyncActivator,
    cancelled: bool,
}

/// Records a [`SourceFunction`] may queue before `collect` blocks.
pub const SOURCE_QUEUE: usize = 64 * 1024;

impl<T> SourceContext<T> {
    /// Emits a record; its timestamp comes from the strategy's assigner (or is 0).
    pub fn collect(&mut self, item: T) {
        self.push(SourceMsg::Record(None, item));
    }

    /// Emits a record with an event timestamp (ms).
    pub fn collect_with_timestamp(&mut self, item: T, timestamp: u64) {
        self.push(SourceMsg::Record(Some(timestamp), item));
    }

    /// Declares that no more records with timestamps `<= watermark` will follow.
    pub fn emit_watermark(&mut self, watermark: u64) {
        self.push(SourceMsg::Watermark(watermark));
    }

    /// True once the job no longer wants records (it failed); `run` should return.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    fn push(&mut self, msg: SourceMsg<T>) {
        if self.cancelled {
            return;
        }
        let mut q = self.shared.lock();
        while q.msgs.len() >= SOURCE_QUEUE && !q.cancelled {
            q = match self.shared.not_full.wait(q) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        if q.cancelled {
            self.cancelled = true;
            return;
        }
        let wake = q.msgs.is_empty();
        q.msgs.push(msg);
        drop(q);
        if wake && self.activator.activate().is_err() {
            self.cancelled = true;
        }
    }

    fn finish(&mut self) {
        self.shared.lock().finished = true;
        let _ = self.activator.activate();
    }
}

struct RunningSource<T> {
    shared: Arc<Shared<T>>,
    thread: Option<std::thread::JoinHandle<Result<(), StreamError>>>,
}

impl<T> Drop for RunningSource<T> {
    /// The worker is done with the source (finished, or the job is being torn down):
    /// release a source blocked on a full queue.
    fn drop(&mut self) {
        self.shared.cancel();
    }
}

fn spawn_source<T: Data, S: SourceFunction<T>>(
    mut source_fn: S,
    activator: SyncActivator,
) -> Result<RunningSource<T>, StreamError> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            msgs: Vec::new(),
            finished: false,
            cancelled: false,
        }),
        not_full: Condvar::new(),
    });
    let mut ctx = SourceContext {
        shared: shared.clone(),
        activator,
        cancelled: false,
    };
    let thread = std::thread::Builder::new()
        .name("rill-source".into())
        .spawn(move || {
            let result = source_fn.run(&mut ctx);
            ctx.finish();
            result
        })
        .map_err(|source| StreamError::Io {
            context: "spawning source thread".into(),
            source,
        })?;
    Ok(RunningSource {
        shared,
        thread: Some(thread),
    })
}

/// Reads a file line by line (without line terminators).
struct TextFileSource {
    path: PathBuf,
}

impl SourceFunction<String> for TextFileSource {
    fn run(&mut self, ctx: &mut SourceContext<String>) -> Result<(), StreamError> {
        let io = |source| StreamError::Io {
            context: format!("reading {}", self.path.display()),
            source,
        };
        let file = std::fs::File::open(&self.path).map_err(io)?;
        for line in std::io::BufReader::new(file).lines() {
            if ctx.is_cancelled() {
                break;
            }
            ctx.collect(line.map_err(io)?);
        }
        Ok(())
    }
}

/// Restores an in-memory source: skips what it emitted before and resumes its watermark.
/// Returns how many records it skipped.
fn restore_iter<T, I: Iterator>(
    checkpoint: Option<&Checkpointing>,
    iter: Option<&mut I>,
    gen: &mut WatermarkGen<T>,
    (index, peers, parallel): (usize, usize, bool),
) -> Result<u64, StreamError> {
    let Some(it) = iter else {
        return Ok(0);
    };
    let Some((positions, marks)) = restored_sources(checkpoint)? else {
        return Ok(0);
    };
    let old = match parallel {
        false => 0,
        true if checkpoint.and_then(Checkpointing::restored_parallelism) == Some(peers) => index,
        true => {
            return Err(CheckpointError::Incompatible {
                id: checkpoint
                    .and_then(Checkpointing::restored)
                    .map_or(0, |(id, _)| id),
                detail: format!(
                    "{} is an in-memory parallel source: it restores only at the parallelism \
                     it was checkpointed at",
                    checkpoint.map_or("", |c| c.operator())
                ),
            }
            .into())
        }
    };
    let n = positions
        .get(old)
        .and_then(|p| <[u8; 8]>::try_from(p.as_slice()).ok())
        .map_or(0, u64::from_le_bytes);
    if let Some(Some(w)) = marks.get(old) {
        gen.restore(*w);
    }
    for _ in 0..n {
        if it.next().is_none() {
            break;
        }
    }
    Ok(n)
}
