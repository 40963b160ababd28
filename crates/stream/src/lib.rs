//! Rill's stream processor: a Flink-style DataStream API executed on timely-dataflow.
//!
//! A job is written once and runs on one worker thread, many threads, or many cooperating
//! processes; results are the same for a given input regardless of the parallelism.
//! This crate owns the API, windows and keyed state; it must not know about the broker
//! (AMQP sources and sinks live in `connect`).
//!
//! # Layout
//! - [`env`](mod@env): [`StreamExecutionEnvironment`] (parallelism, cluster settings, epoch
//!   interval, key groups, checkpoint policy, [`StopHandle`], `execute`) and the per-worker
//!   [`JobEnv`] handed to the job closure.
//! - [`epoch`]: timely timestamps `(epoch, event-time frontier)` and the epoch clock.
//! - [`source`]: collections, parallel sequences, [`SourceFunction`] (run on its own thread,
//!   bridged into the worker through a bounded queue) and text files.
//! - [`reader`] / [`writer`]: the connector API — [`SourceReader`]s that run inside the
//!   worker and ack what went through, [`SinkWriter`]s that confirm asynchronously.
//! - `completion`: the epoch-completion tracker between writers and readers.
//! - [`watermark`]: [`WatermarkStrategy`]; watermarks *are* timely frontiers (see below).
//! - [`stream`]: [`DataStream`] — `map`, `flat_map`, `filter`, `union`, `key_by`, sinks.
//! - `driver`: the one loop behind every stateful operator — epoch alignment, watermark
//!   order, timers, capabilities, snapshots; `timers` is its timer service.
//! - [`keyed`]: [`KeyedStream`] — running `reduce`/`sum`/`min`/`max`/`aggregate`, and
//!   `process` with keyed state and timers.
//! - [`window`]: time windows (tumbling, sliding, session; event and processing time),
//!   count windows, allowed lateness and late-data side outputs.
//! - [`state`]: [`ValueState`], [`ListState`], [`MapState`] and the [`StateBackend`] trait;
//!   [`keygroup`]: [`KeyGroups`], how keys map to workers and snapshots.
//! - [`checkpoint`]: checkpoints — [`CheckpointConfig`], storage behind [`CheckpointStorage`]
//!   (file, memory, faulty), the on-disk layout, the coordinator's completion records,
//!   restore, [`CheckpointTrigger`]; and the bare [`CheckpointPolicy`] seam.
//! - [`stop`]: [`StopHandle`], stopping a job cleanly.
//! - [`sink`]: print (Flink's `N> ` format), collect into a `Vec`, text and JSON-lines files.
//! - [`bench`](mod@bench): the jobs behind `rill bench wordcount` (shared with the `bench_wordcount` example).
//!
//! # Time model
//! Every record carries its event timestamp (milliseconds, `u64`). Every batch travels at a
//! timely timestamp `(epoch, frontier)` (a `Product`, ordered coordinate by coordinate):
//!
//! **Watermarks.** `frontier` is the *watermark frontier* of the source that emitted the
//! batch: frontier `F` means the watermark is `F - 1`, i.e. no more records with timestamp
//! `< F` are expected. A record whose timestamp is below the frontier it travels at is late.
//! An operator's event-time frontier is the minimum of its input frontier's `frontier`
//! coordinates; timely's progress tracking computes it over all upstream workers and
//! channels, which is exactly Flink's watermark rule, so event-time windows fire when the
//! input frontier reaches their end. Because lateness is judged against the watermark a
//! record was emitted under (not against whatever a downstream worker happens to have seen),
//! results do not depend on scheduling or parallelism. Stateful operators with timers
//! (`process`, windows) handle their input in frontier order and fire the timers that became
//! due in between, as Flink interleaves records and watermarks. Records without a timestamp
//! carry 0; when a bounded input ends, the final watermark is "infinity": every pending
//! event-time window and timer fires (pending processing-time windows and timers fire too).
//!
//! **Epochs.** `epoch` is a counter that every source advances on the job's epoch interval
//! ([`StreamExecutionEnvironment::set_epoch_interval`]); workers close epochs at slightly
//! different moments and may skip some. The minimum `epoch` coordinate of an operator's input
//! frontier is the *completed-epoch bound*: every record of an earlier epoch has arrived —
//! a checkpoint barrier without barrier messages. Stateful operators handle a later epoch's
//! records only after every earlier epoch is complete (Flink's alignment), and can snapshot
//! their state right then ([`CheckpointPolicy`]). At the sinks, an epoch is complete once
//! every sink on every worker has confirmed its output for it; [`SourceReader`]s are told and
//! ack their deliveries (at-least-once). With checkpoints ([`CheckpointConfig`]) every
//! n-th epoch is a checkpoint, and readers and writers hear only of completed checkpoints:
//! acks and two-phase commits then give exactly-once results (see [`checkpoint`]). When sources disagree (one is in a later epoch with
//! a lower watermark), epoch order wins: the operator's frontier then stays below the later
//! epoch's watermark until it handled that epoch's records, so no record is ever handled
//! after timers beyond its own frontier fired.
//!
//! # Jobs are closures
//! Timely builds the dataflow once per worker, so a job is a closure
//! `Fn(&JobEnv) + Send + Sync` passed to [`StreamExecutionEnvironment::execute`] — where
//! Flink builds a graph on the environment and then calls `execute(name)`. Values captured by
//! the closure are shared by all workers (collect sinks, configuration); non-parallel sources
//! (`from_collection`, `add_source`, `read_text_file`) run on worker 0 only; readers and
//! writers are built once per worker.
//!
//! # Example
//! ```
//! use rill_stream::{StreamExecutionEnvironment, CollectSink};
//!
//! let out = CollectSink::new();
//! let sink = out.clone();
//! let env = StreamExecutionEnvironment::new().with_parallelism(2);
//! env.execute("WordCount", move |env| {
//!     env.from_collection(vec!["Hello Flink!".to_string(), "Hello Rill!".to_string()])
//!         .flat_map(|line: String| {
//!             line.split_whitespace().map(|w| (w.to_string(), 1u64)).collect::<Vec<_>>()
//!         })
//!         .key_by(|(word, _)| word.clone())
//!         .sum(|t| &mut t.1)
//!         .collect_into(&sink);
//! }).unwrap();
//! let mut counts = out.take();
//! counts.sort();
//! assert_eq!(counts.last(), Some(&("Rill!".to_string(), 1)));
//! assert!(counts.contains(&("Hello".to_string(), 2)));
//! ```

pub mod bench;
pub mod checkpoint;
pub(crate) mod completion;
pub(crate) mod driver;
pub mod env;
pub mod epoch;
pub mod error;
pub mod hash;
pub mod keyed;
pub mod keygroup;
pub mod reader;
pub mod sink;
pub mod source;
pub mod state;
pub mod stop;
pub mod stream;
pub(crate) mod timers;
pub mod types;
pub mod watermark;
pub mod window;
pub mod writer;

pub use checkpoint::{
    CheckpointConfig, CheckpointPolicy, CheckpointStorage, CheckpointTrigger, OperatorSnapshot,
    SnapshotState,
};
pub use env::{ClusterConfig, JobEnv, JobExecutionResult, StreamExecutionEnvironment};
pub use epoch::DEFAULT_EPOCH_INTERVAL;
pub use error::{CheckpointError, StateError, StreamError};
pub use keyed::{AggregateFunction, KeyedProcessFunction, KeyedStream, ProcessContext};
pub use keygroup::{KeyGroups, DEFAULT_KEY_GROUPS};
pub use reader::{ReaderContext, ReaderOutput, ReaderStatus, SourceReader, Waker};
pub use sink::{CollectSink, FlinkFormat, SinkFunction};
pub use source::{SourceContext, SourceFunction};
pub use state::{ListState, MapState, MemoryStateBackend, StateBackend, ValueState};
pub use stop::StopHandle;
pub use stream::{DataStream, OutputTag};
pub use types::{Data, Key, ShortStr};
pub use watermark::{WatermarkState, WatermarkStrategy};
pub use window::{
    CountWindow, CountWindowedStream, ProcessWindowFunction, SessionWindows, SlidingWindows,
    TimeDomain, TimeWindow, TumblingWindows, WindowAssigner, WindowedStream,
};
pub use writer::{Increment, SinkWriter, WriterContext};

/// Event timestamps and watermarks, in milliseconds.
pub type Timestamp = u64;
