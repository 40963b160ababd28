//! Rill's stream processor: a Flink-style DataStream API executed on timely-dataflow.
//!
//! A job is written once and runs on one worker thread, many threads, or many cooperating
//! processes; results are the same for a given input regardless of the parallelism.
//! This crate owns the API, windows and keyed state; it must not know about the broker
//! (AMQP sources and sinks live in `connect`).
//!
//! # Layout
//! - [`env`](mod@env): [`StreamExecutionEnvironment`] (parallelism, cluster settings, `execute`) and the
//!   per-worker [`JobEnv`] handed to the job closure.
//! - [`source`]: collections, parallel sequences, [`SourceFunction`] (run on its own thread,
//!   bridged into the worker through a bounded queue) and text files.
//! - [`watermark`]: [`WatermarkStrategy`]; watermarks *are* timely frontiers (see below).
//! - [`stream`]: [`DataStream`] — `map`, `flat_map`, `filter`, `union`, `key_by`, sinks.
//! - [`keyed`]: [`KeyedStream`] — running `reduce`/`sum`/`min`/`max`/`aggregate`, and
//!   `process` with keyed state and timers.
//! - [`window`]: time windows (tumbling, sliding, session; event and processing time),
//!   count windows, allowed lateness and late-data side outputs.
//! - [`state`]: [`ValueState`], [`ListState`], [`MapState`] and the [`StateBackend`] trait.
//! - [`sink`]: print (Flink's `N> ` format), collect into a `Vec`, text and JSON-lines files.
//! - [`bench`](mod@bench): the jobs behind `rill bench wordcount` (shared with the `bench_wordcount` example).
//!
//! # Time model
//! Every record carries its event timestamp (milliseconds, `u64`). The timely timestamp of a
//! batch is the *watermark frontier* of the source that emitted it: frontier `F` means the
//! watermark is `F - 1`, i.e. no more records with timestamp `< F` are expected. A record whose
//! timestamp is below the frontier it travels at is late. Timely's progress tracking computes
//! the minimum over all upstream workers and channels, which is exactly Flink's watermark rule,
//! so event-time windows fire when the input frontier reaches their end. Because lateness is
//! judged against the watermark a record was emitted under (not against whatever a downstream
//! worker happens to have seen), results do not depend on scheduling or parallelism.
//! Stateful operators with timers (`process`, windows) handle their input in frontier order
//! and fire the timers that became due in between, as Flink interleaves records and
//! watermarks. Records without a timestamp carry 0; when a bounded input ends, the final
//! watermark is "infinity": every pending event-time window and timer fires (pending
//! processing-time windows and timers fire too).
//!
//! # Jobs are closures
//! Timely builds the dataflow once per worker, so a job is a closure
//! `Fn(&JobEnv) + Send + Sync` passed to [`StreamExecutionEnvironment::execute`] — where
//! Flink builds a graph on the environment and then calls `execute(name)`. Values captured by
//! the closure are shared by all workers (collect sinks, configuration); non-parallel sources
//! (`from_collection`, `add_source`, `read_text_file`) run on worker 0 only.
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
pub mod env;
pub mod error;
pub mod hash;
pub mod keyed;
pub mod sink;
pub mod source;
pub mod state;
pub mod stream;
pub mod types;
pub mod watermark;
pub mod window;

pub use env::{ClusterConfig, JobEnv, JobExecutionResult, StreamExecutionEnvironment};
pub use error::{StateError, StreamError};
pub use keyed::{AggregateFunction, KeyedProcessFunction, KeyedStream, ProcessContext};
pub use sink::{CollectSink, FlinkFormat, SinkFunction};
pub use source::{SourceContext, SourceFunction};
pub use state::{ListState, MapState, MemoryStateBackend, StateBackend, ValueState};
pub use stream::{DataStream, OutputTag};
pub use types::{Data, Key, ShortStr};
pub use watermark::WatermarkStrategy;
pub use window::{
    CountWindow, CountWindowedStream, ProcessWindowFunction, SessionWindows, SlidingWindows,
    TimeDomain, TimeWindow, TumblingWindows, WindowAssigner, WindowedStream,
};

/// Event timestamps and watermarks, in milliseconds.
pub type Timestamp = u64;
