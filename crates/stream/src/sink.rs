//! Sinks: print (Flink's format), collect into a `Vec`, text and JSON-lines files, and
//! user [`SinkFunction`]s.
//!
//! These sinks write synchronously, so they count as confirming at once: an epoch is done
//! with them when their input frontier passes it (their progress output tells the
//! epoch-completion tracker so, see `completion`). Sinks that confirm
//! asynchronously implement [`crate::SinkWriter`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::completion::Notice;
use crate::error::StreamError;
use crate::stream::DataStream;
use crate::types::{Data, ShortStr};

/// How a record prints, following Flink's `toString` (tuples print as `(a,b)`).
///
/// ```
/// use rill_stream::FlinkFormat;
/// assert_eq!(("Hello".to_string(), 3u64).flink_string(), "(Hello,3)");
/// ```
pub trait FlinkFormat {
    /// Appends the record's text to `out`.
    fn flink_fmt(&self, out: &mut String);
    /// The record's text.
    fn flink_string(&self) -> String {
        let mut s = String::new();
        self.flink_fmt(&mut s);
        s
    }
}

macro_rules! display_format {
    ($($t:ty),*) => {$(
        impl FlinkFormat for $t {
            fn flink_fmt(&self, out: &mut String) { let _ = write!(out, "{}", self); }
        }
    )*};
}
display_format!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64, bool, char, String,
    str, ShortStr
);

impl<T: FlinkFormat + ?Sized> FlinkFormat for &T {
    fn flink_fmt(&self, out: &mut String) {
        (**self).flink_fmt(out);
    }
}

impl<T: FlinkFormat> FlinkFormat for Option<T> {
    fn flink_fmt(&self, out: &mut String) {
        match self {
            Some(x) => x.flink_fmt(out),
            None => out.push_str("null"),
        }
    }
}

impl<T: FlinkFormat> FlinkFormat for Vec<T> {
    fn flink_fmt(&self, out: &mut String) {
        out.push('[');
        for (i, x) in self.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            x.flink_fmt(out);
        }
        out.push(']');
    }
}

macro_rules! tuple_format {
    ($($name:ident $idx:tt),+) => {
        impl<$($name: FlinkFormat),+> FlinkFormat for ($($name,)+) {
            fn flink_fmt(&self, out: &mut String) {
                out.push('(');
                let mut _first = true;
                $(
                    if !_first { out.push(','); }
                    _first = false;
                    self.$idx.flink_fmt(out);
                )+
                out.push(')');
            }
        }
    };
}
tuple_format!(A 0);
tuple_format!(A 0, B 1);
tuple_format!(A 0, B 1, C 2);
tuple_format!(A 0, B 1, C 2, D 3);
tuple_format!(A 0, B 1, C 2, D 3, E 4);

/// A sink that collects records into a shared `Vec` (for tests and small results).
/// Records from all workers of this process end up in it; order across workers is arbitrary.
///
/// ```
/// use rill_stream::*;
/// let out = CollectSink::new();
/// let sink = out.clone();
/// StreamExecutionEnvironment::new().with_parallelism(1).execute("c", move |env| {
///     env.from_collection(vec![1, 2]).collect_into(&sink);
/// }).unwrap();
/// assert_eq!(out.take(), vec![1, 2]);
/// ```
pub struct CollectSink<T> {
    // Shared by all workers of the process; locked once per batch, never per record.
    items: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        CollectSink {
            items: self.items.clone(),
        }
    }
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        CollectSink {
            items: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl<T> CollectSink<T> {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the collected records.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        match self.items.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A user sink (Flink's `SinkFunction`), one instance per worker.
pub trait SinkFunction<T>: 'static {
    /// Called for every record with its event timestamp.
    fn invoke(&mut self, value: T, timestamp: u64);
    /// Called once when the input has ended.
    fn finish(&mut self) {}
}

impl<T, F: FnMut(T, u64) + 'static> SinkFunction<T> for F {
    fn invoke(&mut self, value: T, timestamp: u64) {
        self(value, timestamp)
    }
}

impl<'s, T: Data> DataStream<'s, T> {
    /// A sink operator: `on_batch` for every batch, `on_end` once the input has ended. Its
    /// dataless progress output follows its input frontier (it holds no capability) and is
    /// registered with the epoch-completion tracker.
    fn terminal(
        self,
        name: &str,
        mut on_batch: impl FnMut(&mut Vec<(u64, T)>) + 'static,
        mut on_end: impl FnMut() + 'static,
    ) {
        let registry = self.env.registry.clone();
        let mut ended = false;
        let progress = self
            .inner
            .unary_frontier::<CapacityContainerBuilder<Vec<Notice>>, _, _, _>(
                Pipeline,
                name,
                move |_cap, _| {
                    move |(input, frontier), _| {
                        input.for_each(|_, data| on_batch(data));
                        if frontier.is_empty() && !ended {
                            ended = true;
                            on_end();
                        }
                    }
                },
            );
        registry.add_progress(progress);
    }

    /// Sends every record to `sink` (one instance per worker).
    pub fn add_sink(self, sink: impl SinkFunction<T>) {
        let sink = std::rc::Rc::new(std::cell::RefCell::new(sink));
        let at_end = sink.clone();
        self.terminal(
            "Sink",
            move |data| {
                let mut s = sink.borrow_mut();
                for (ts, d) in data.drain(..) {
                    s.invoke(d, ts);
                }
            },
            move || at_end.borrow_mut().finish(),
        );
    }

    /// Collects records into `sink`.
    pub fn collect_into(self, sink: &CollectSink<T>) {
        let items = sink.items.clone();
        self.terminal(
            "Collect",
            move |data| {
                let mut guard = match items.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                guard.extend(data.drain(..).map(|(_, d)| d));
            },
            || {},
        );
    }

    /// Prints records to stdout as Flink does: `N> record` with `N` the 1-based subtask,
    /// without the prefix when the job runs with parallelism 1.
    pub fn print(self)
    where
        T: FlinkFormat,
    {
        let prefix =
            (self.env.parallelism() > 1).then(|| format!("{}> ", self.env.worker_index() + 1));
        let env = self.env.reporter();
        let mut line = String::new();
        let mut failed = false;
        self.terminal(
            "Print",
            move |data| {
                line.clear();
                for (_, d) in data.drain(..) {
                    if let Some(p) = &prefix {
                        line.push_str(p);
                    }
                    d.flink_fmt(&mut line);
                    line.push('\n');
                }
                let mut stdout = std::io::stdout().lock();
                if !failed {
                    if let Err(source) = stdout
                        .write_all(line.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        failed = true;
                        env.report(StreamError::Io {
                            context: "printing".into(),
                            source,
                        });
                    }
                }
            },
            || {},
        );
    }

    /// Writes records as lines of text (Flink's `writeAsText`): at parallelism 1 `path` is the
    /// file; otherwise `path` is a directory with one file per subtask, named `1`, `2`, ...
    pub fn write_as_text(self, path: impl Into<PathBuf>)
    where
        T: FlinkFormat,
    {
        self.write_lines(path.into(), |d: &T, out: &mut String| {
            d.flink_fmt(out);
            Ok(())
        });
    }

    /// Writes records as JSON, one object per line; same file layout as
    /// [`Self::write_as_text`].
    pub fn write_as_json_lines(self, path: impl Into<PathBuf>) {
        self.write_lines(path.into(), |d: &T, out: &mut String| {
            let s = serde_json::to_string(d).map_err(|e| StreamError::Serialize(e.to_string()))?;
            out.push_str(&s);
            Ok(())
        });
    }

    fn write_lines(
        self,
        path: PathBuf,
        fmt: impl Fn(&T, &mut String) -> Result<(), StreamError> + 'static,
    ) {
        let env = self.env.reporter();
        let file_path = if self.env.parallelism() > 1 {
            path.join(format!("{}", self.env.worker_index() + 1))
        } else {
            path
        };
        // Shared by the batch and end-of-input callbacks, which never run at the same time.
        let state = std::rc::Rc::new(std::cell::RefCell::new(FileState {
            writer: None,
            failed: false,
        }));
        let at_end = state.clone();
        let (env_end, path_end) = (env.clone(), file_path.clone());
        let mut line = String::new();
        self.terminal(
            "WriteFile",
            move |data| {
                let mut st = state.borrow_mut();
                if st.failed {
                    data.clear();
                    return;
                }
                let result = (|| -> Result<(), StreamError> {
                    if st.writer.is_none() {
                        st.writer = Some(open(&file_path)?);
                    }
                    let w = st
                        .writer
                        .as_mut()
                        .ok_or_else(|| StreamError::Config("no writer".into()))?;
                    for (_, d) in data.drain(..) {
                        line.clear();
                        fmt(&d, &mut line)?;
                        line.push('\n');
                        w.write_all(line.as_bytes())
                            .map_err(|source| io_err(&file_path, source))?;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    st.failed = true;
                    env.report(e);
                }
            },
            move || {
                let mut st = at_end.borrow_mut();
                if st.failed {
                    return;
                }
                let result = match st.writer.take() {
                    Some(mut w) => w.flush().map_err(|source| io_err(&path_end, source)),
                    // Create the (empty) file even if this worker saw no records.
                    None => open(&path_end).map(|_| ()),
                };
                if let Err(e) = result {
                    env_end.report(e);
                }
                st.failed = true; // done: ignore further calls
            },
        );
    }
}

/// A file sink's writer, opened on the first record.
struct FileState {
    writer: Option<std::io::BufWriter<std::fs::File>>,
    failed: bool,
}

fn io_err(path: &std::path::Path, source: std::io::Error) -> StreamError {
    StreamError::Io {
        context: format!("writing {}", path.display()),
        source,
    }
}

fn open(path: &std::path::Path) -> Result<std::io::BufWriter<std::fs::File>, StreamError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| io_err(dir, source))?;
        }
    }
    let f = std::fs::File::create(path).map_err(|source| io_err(path, source))?;
    Ok(std::io::BufWriter::new(f))
}
