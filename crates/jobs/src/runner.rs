//! Running a job: standalone against any broker (`rill job run`), or inside `rill server`.
//!
//! **Standalone:** the job connects over TCP. A lost connection is the transports' business
//! (they reconnect with backoff; the job carries on). If the broker cannot be reached at all
//! when the job starts, the job tries again with backoff instead of exiting. SIGTERM (or
//! SIGINT) stops it cleanly: its sources stop consuming, everything consumed so far is
//! processed, published and confirmed, the deliveries are acked, and it exits 0.
//!
//! **Embedded:** `rill server --job FILE` runs the job on threads of its own over in-process
//! sessions; the server starts it after recovery and stops it (the same clean stop) before
//! it closes client connections. Its progress counters are registered with the broker.
//!
//! Either way it logs its progress every few seconds ([`crate::progress`]).
//!
//! **Checkpoints** (a checkpoint interval or directory given): the job restores its newest
//! complete checkpoint when it starts, takes one every interval, and a final one (a
//! savepoint) when it is stopped; its sources ack and its sinks publish per completed
//! checkpoint, which gives exactly-once results into deduplicating queues
//! (`docs/exactly-once.md`). A standalone job keeps them in `--checkpoint-dir` (default
//! `./rill-checkpoints/<name>`); an embedded one under the broker's data directory,
//! `<data-dir>/jobs/<name>/checkpoints`, so it restarts with the broker from where it was.

use crate::progress::{ProgressLogger, PROGRESS_EVERY};
use crate::spec::{BuiltinJob, JobSpec};
use parking_lot::Mutex;
use rill_broker::jobs::JobCounters;
use rill_broker::Broker;
use rill_connect::transport::Credentials;
use rill_connect::{ConnectError, Endpoint};
use rill_stream::checkpoint::CheckpointConfig;
use rill_stream::{ClusterConfig, JobEnv, StopHandle, StreamError, StreamExecutionEnvironment};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Epochs of a job without checkpoints: how often deliveries can be acked. Short, so that
/// the prefetch window turns over quickly.
const ACK_EPOCH: Duration = Duration::from_millis(20);

/// First pause before starting a job again when its broker was unreachable; doubles up to
/// [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why a job ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Stream(StreamError),
    #[error("{0}")]
    Setup(String),
}

impl From<StreamError> for JobError {
    fn from(e: StreamError) -> Self {
        // Connector errors travel through the stream engine wrapped; unwrap them so that
        // callers see the broker's reply code.
        match connect_error(&e) {
            Some(c) => JobError::Connect(c.clone()),
            None => JobError::Stream(e),
        }
    }
}

fn connect_error(e: &StreamError) -> Option<&ConnectError> {
    match e {
        StreamError::External(inner) => inner.downcast_ref::<ConnectError>(),
        _ => None,
    }
}

impl JobError {
    /// The process exit code `rill job run` ends with: 3 when the broker refused the login,
    /// the vhost or a permission (403, 530), 4 when a queue or exchange is missing (404),
    /// 5 for bad input under the `fail` policy, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobError::Connect(ConnectError::Refused {
                code: 403 | 530, ..
            }) => 3,
            JobError::Connect(ConnectError::Refused { code: 404, .. }) => 4,
            JobError::Connect(ConnectError::BadInput { .. }) => 5,
            _ => 1,
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, JobError::Connect(e) if e.is_retryable())
    }
}

/// Checkpoint interval when only a directory is given.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The environment a job runs in, checkpointing into `checkpoints` if given.
fn environment(spec: &JobSpec, checkpoints: Option<PathBuf>) -> StreamExecutionEnvironment {
    let mut env = StreamExecutionEnvironment::new();
    env.set_parallelism(spec.options.parallelism);
    env.set_epoch_interval(ACK_EPOCH);
    if let Some(dir) = checkpoints {
        let interval = spec
            .options
            .checkpoint_interval_ms
            .map_or(DEFAULT_CHECKPOINT_INTERVAL, Duration::from_millis);
        tracing::info!(job = %spec.name, dir = %dir.display(), interval_ms = interval.as_millis() as u64, "checkpoints");
        env.set_checkpointing(CheckpointConfig::new(dir).with_interval(interval));
    }
    env
}

/// Where a standalone job keeps its checkpoints, if it takes any.
pub fn standalone_checkpoint_dir(spec: &JobSpec) -> Option<PathBuf> {
    match &spec.options.checkpoint_dir {
        Some(dir) => Some(dir.clone()),
        None if spec.options.checkpointing() => {
            Some(PathBuf::from("rill-checkpoints").join(&spec.name))
        }
        None => None,
    }
}

/// What builds a job's dataflow on each worker, given where its connectors connect and
/// where it counts its progress.
pub type BuildFn = dyn Fn(&JobEnv<'_>, &Endpoint, &Arc<JobCounters>) + Send + Sync;

/// The dataflow of a built-in job.
fn builtin(spec: &JobSpec) -> Arc<BuildFn> {
    let job = spec.job.clone();
    let options = spec.options.clone();
    let name = spec.name.clone();
    Arc::new(move |jenv, endpoint, counters| match &job {
        BuiltinJob::Wordcount {
            source_queue,
            sink_queue,
        } => crate::wordcount::build(
            jenv,
            endpoint,
            &crate::wordcount::Wordcount {
                name: &name,
                source_queue,
                sink_queue,
                options: &options,
            },
            counters,
        ),
    })
}

/// Runs `build` on `env` against `endpoint` until its input ends or it is stopped.
pub fn execute(
    name: &str,
    env: &StreamExecutionEnvironment,
    endpoint: Endpoint,
    counters: Arc<JobCounters>,
    build: Arc<BuildFn>,
) -> Result<(), JobError> {
    env.execute(name, move |jenv| build(jenv, &endpoint, &counters))?;
    Ok(())
}

/// Runs `spec` against the broker at `uri` until SIGTERM/SIGINT (see the module docs), as
/// one worker process of a supervised job (`cluster`: its place among several), stopping
/// too when the supervisor goes away.
pub fn run_standalone(
    spec: &JobSpec,
    uri: &str,
    cluster: Option<ClusterConfig>,
) -> Result<(), JobError> {
    let mut env = environment(spec, standalone_checkpoint_dir(spec));
    if let Some(c) = cluster {
        env.set_cluster(c);
    }
    crate::signals::stop_on_terminate(env.stop_handle());
    let trigger = env.checkpoint_trigger();
    crate::signals::on_user1(move || {
        if let Some(id) = trigger.trigger() {
            tracing::info!(checkpoint = id, "checkpoint requested");
        }
    });
    let orphaned = env.stop_handle();
    crate::supervisor::stop_when_orphaned(move || orphaned.stop());
    let counters = Arc::new(JobCounters::new(&spec.name, spec.options.parallelism));
    let _progress = ProgressLogger::start(counters.clone(), PROGRESS_EVERY);
    let stop = env.stop_handle();
    let build = builtin(spec);
    let mut pause = RETRY_INITIAL;
    loop {
        tracing::info!(job = %spec.name, kind = spec.job.kind(), parallelism = spec.options.parallelism, "job starting");
        match execute(
            &spec.name,
            &env,
            Endpoint::amqp(uri),
            counters.clone(),
            build.clone(),
        ) {
            Err(e) if e.is_retryable() && !stop.is_stopped() => {
                counters.add_reconnect();
                tracing::warn!(job = %spec.name, error = %e, retry_in_ms = pause.as_millis() as u64, "broker unreachable; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e),
            Ok(()) => {
                tracing::info!(job = %spec.name, "job stopped");
                return Ok(());
            }
        }
    }
}

/// A job run inside the broker process: a job file's built-in job (`rill server --job`), or
/// a job of your own in a program that embeds `rill-server`.
///
/// ```no_run
/// use rill_connect::{QueueSink, QueueSource};
/// use rill_connect::transport::{Credentials, QueueSetup};
/// use rill_jobs::runner::EmbeddedJobRun;
/// use rill_stream::StreamExecutionEnvironment;
///
/// let upper = EmbeddedJobRun::new("upper", StreamExecutionEnvironment::new(), Credentials::default(),
///     |env, broker, _counters| {
///         let lines = QueueSource::new(broker.clone(), "lines").text().setup(QueueSetup::durable()).build(env);
///         QueueSink::to_queue(broker.clone(), "upper").text().setup(QueueSetup::durable())
///             .build(lines.map(|l: String| l.to_uppercase()));
///     });
/// # let config: rill_server::ServerConfig = unimplemented!();
/// rill_server::Server::new(config).job(Box::new(upper)).run_blocking().unwrap();
/// ```
pub struct EmbeddedJobRun {
    name: String,
    parallelism: usize,
    env: StreamExecutionEnvironment,
    credentials: Credentials,
    build: Arc<BuildFn>,
}

impl EmbeddedJobRun {
    /// A job of your own: `build` adds its dataflow on each worker of `env`; its connectors
    /// log in to the broker as `credentials`.
    pub fn new(
        name: &str,
        env: StreamExecutionEnvironment,
        credentials: Credentials,
        build: impl Fn(&JobEnv<'_>, &Endpoint, &Arc<JobCounters>) + Send + Sync + 'static,
    ) -> EmbeddedJobRun {
        EmbeddedJobRun {
            name: name.to_owned(),
            parallelism: env.parallelism(),
            env,
            credentials,
            build: Arc::new(build),
        }
    }

    /// A job file's built-in job; with checkpoints, they live under `data_dir` (the broker's)
    /// unless the job file names a directory.
    pub fn from_spec(spec: &JobSpec, data_dir: &Path) -> EmbeddedJobRun {
        let checkpoints = spec.options.checkpointing().then(|| {
            spec.options
                .checkpoint_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("jobs").join(&spec.name).join("checkpoints"))
        });
        EmbeddedJobRun {
            name: spec.name.clone(),
            parallelism: spec.options.parallelism,
            env: environment(spec, checkpoints),
            credentials: spec.options.credentials.clone(),
            build: builtin(spec),
        }
    }
}

impl rill_server::EmbeddedJob for EmbeddedJobRun {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(self: Box<Self>, broker: Broker) -> Result<Box<dyn rill_server::RunningJob>, String> {
        let EmbeddedJobRun {
            name,
            parallelism,
            env,
            credentials,
            build,
        } = *self;
        let stop = env.stop_handle();
        let counters = Arc::new(JobCounters::new(&name, parallelism));
        broker.register_job(counters.clone());
        let endpoint = Endpoint::embedded(broker.clone(), credentials);
        let (done_tx, done_rx) = mpsc::channel();
        let job_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rill-job-{name}"))
            .spawn(move || {
                let _progress = ProgressLogger::start(counters.clone(), PROGRESS_EVERY);
                let result =
                    execute(&job_name, &env, endpoint, counters, build).map_err(|e| e.to_string());
                if let Err(e) = &result {
                    tracing::error!(job = %job_name, error = %e, "job failed");
                }
                broker.deregister_job(&job_name);
                let _ = done_tx.send(result);
            })
            .map_err(|e| format!("cannot start the job's thread: {e}"))?;
        Ok(Box::new(RunningEmbedded {
            name,
            stop,
            done: Mutex::new(Some(done_rx)),
            finished: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            thread: Some(thread),
        }))
    }
}
struct RunningEmbedded {
    name: String,
    stop: StopHandle,
    done: Mutex<Option<mpsc::Receiver<Result<(), String>>>>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl rill_server::RunningJob for RunningEmbedded {
    fn name(&self) -> &str {
        &self.name
    }

    fn stop(&self) {
        self.stop.stop();
    }

    fn is_finished(&self) -> bool {
        self.finished.load(std::sync::atomic::Ordering::Acquire)
            || self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    fn join(mut self: Box<Self>, timeout: Duration) -> Result<(), String> {
        let Some(done) = self.done.lock().take() else {
            return Ok(());
        };
        let result = match done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("still running after {} s", timeout.as_secs()))
            }
            // The thread ended without a word: it panicked (already logged by the hook).
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the job's thread panicked".into()),
        };
        self.finished
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        result
    }
}
