//! The execution environment: how many workers, in how many processes, and running a job.
//!
//! A job is a closure that builds the dataflow; timely runs it once on every worker (thread),
//! in every process, and each worker instantiates its own copy of every operator. Sources
//! either split their input across workers (parallel) or run on worker 0 only (like Flink's
//! non-parallel sources); `key_by` routes every key to exactly one worker (through its key
//! group, see [`crate::KeyGroups`]).
//!
//! The environment also sets the job's epoch interval (how often sources close an epoch, see
//! the crate's "Time model"), the number of key groups, checkpoints (a [`CheckpointConfig`],
//! or a bare [`CheckpointPolicy`]), and hands out the [`StopHandle`] that ends a running job
//! cleanly and the [`CheckpointTrigger`] that takes a checkpoint now.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::Scope;

use crate::checkpoint::store::CheckpointStore;
use crate::checkpoint::{
    CheckpointConfig, CheckpointPolicy, CheckpointTrigger, Checkpointing, PartWriter, Schedule,
    StoredJob,
};
use crate::completion::{self, Registry};
use crate::epoch::{EpochClock, Time, DEFAULT_EPOCH_INTERVAL};
use crate::error::StreamError;
use crate::keygroup::{KeyGroups, DEFAULT_KEY_GROUPS};
use crate::stop::{JobControl, StopHandle};

/// Several cooperating processes: this process's index and every process's `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This process's index, `0..hosts.len()`.
    pub process: usize,
    /// `host:port` of every process, in process order (timely connects them over TCP).
    pub hosts: Vec<String>,
}

impl ClusterConfig {
    /// `processes` processes on `127.0.0.1`, ports `base_port..base_port + processes`.
    pub fn localhost(processes: usize, process: usize, base_port: u16) -> Self {
        let hosts = (0..processes)
            .map(|i| format!("127.0.0.1:{}", usize::from(base_port) + i))
            .collect();
        ClusterConfig { process, hosts }
    }

    /// Reads a host file: one `host:port` per line, in process order (timely's format).
    pub fn from_hostfile(path: &std::path::Path, process: usize) -> Result<Self, StreamError> {
        let text = std::fs::read_to_string(path).map_err(|source| StreamError::Io {
            context: format!("reading host file {}", path.display()),
            source,
        })?;
        let hosts: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        Ok(ClusterConfig { process, hosts })
    }

    /// Number of processes.
    pub fn processes(&self) -> usize {
        self.hosts.len()
    }
}

/// Where and how wide a job runs. The Rust counterpart of Flink's
/// `StreamExecutionEnvironment`.
///
/// ```
/// use rill_stream::{StreamExecutionEnvironment, CollectSink};
/// let out = CollectSink::new();
/// let sink = out.clone();
/// let mut env = StreamExecutionEnvironment::new();
/// env.set_parallelism(3);
/// env.execute("double", move |env| {
///     env.from_sequence(1, 100).map(|x| x * 2).collect_into(&sink);
/// }).unwrap();
/// assert_eq!(out.take().iter().sum::<u64>(), 10100);
/// ```
#[derive(Clone)]
pub struct StreamExecutionEnvironment {
    parallelism: usize,
    cluster: Option<ClusterConfig>,
    epoch_interval: Duration,
    key_groups: u32,
    checkpoint: Option<CheckpointSetting>,
    stop: StopHandle,
    trigger: CheckpointTrigger,
}

/// What `set_checkpoint_policy` or `set_checkpointing` chose (the later call wins).
#[derive(Clone)]
enum CheckpointSetting {
    Policy(Arc<dyn CheckpointPolicy>),
    Stored(CheckpointConfig),
}

impl std::fmt::Debug for StreamExecutionEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamExecutionEnvironment")
            .field("parallelism", &self.parallelism)
            .field("cluster", &self.cluster)
            .field("epoch_interval", &self.epoch_interval)
            .field("key_groups", &self.key_groups)
            .field(
                "checkpointing",
                &match &self.checkpoint {
                    None => "off",
                    Some(CheckpointSetting::Policy(_)) => "policy",
                    Some(CheckpointSetting::Stored(_)) => "stored",
                },
            )
            .field("stop", &self.stop)
            .finish()
    }
}

impl Default for StreamExecutionEnvironment {
    fn default() -> Self {
        Self::new()
    }
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobExecutionResult {
    /// The name given to `execute`.
    pub job_name: String,
    /// Wall time from starting the workers (processes already connected) until all of them
    /// finished.
    pub net_runtime: Duration,
}

impl StreamExecutionEnvironment {
    /// One process; parallelism = the number of cores, as in Flink's local environment.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        StreamExecutionEnvironment {
            parallelism: cores,
            cluster: None,
            epoch_interval: DEFAULT_EPOCH_INTERVAL,
            key_groups: DEFAULT_KEY_GROUPS,
            checkpoint: None,
            stop: StopHandle::new(),
            trigger: CheckpointTrigger::default(),
        }
    }

    /// Total number of parallel subtasks (worker threads over all processes).
    pub fn set_parallelism(&mut self, parallelism: usize) -> &mut Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// Builder form of [`Self::set_parallelism`].
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.set_parallelism(parallelism);
        self
    }

    /// The configured total parallelism.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// Run as one of several processes. Parallelism must be a multiple of the process count;
    /// each process runs `parallelism / processes` workers.
    pub fn set_cluster(&mut self, cluster: ClusterConfig) -> &mut Self {
        self.cluster = Some(cluster);
        self
    }

    /// Builder form of [`Self::set_cluster`].
    pub fn with_cluster(mut self, cluster: ClusterConfig) -> Self {
        self.set_cluster(cluster);
        self
    }

    /// How often sources close an epoch (default 100 ms, at least 1 ms).
    ///
    /// An epoch is the unit of progress that acks and checkpoints wait for: a queue
    /// reader's deliveries are acked once their epoch has gone through every sink, and a
    /// checkpoint is taken at an epoch's end. A shorter interval lowers that latency (and the
    /// number of unacked deliveries in flight); a longer one sends fewer progress updates —
    /// each source sends one per epoch, to every worker — and wakes idle sources less often.
    pub fn set_epoch_interval(&mut self, interval: Duration) -> &mut Self {
        self.epoch_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Builder form of [`Self::set_epoch_interval`].
    pub fn with_epoch_interval(mut self, interval: Duration) -> Self {
        self.set_epoch_interval(interval);
        self
    }

    /// The epoch interval.
    pub fn epoch_interval(&self) -> Duration {
        self.epoch_interval
    }

    /// The number of key groups (Flink's max parallelism, default 128): keyed state is
    /// routed and snapshotted in key groups, so a job can later be restored at any
    /// parallelism up to this. Must be at least the parallelism.
    pub fn set_max_parallelism(&mut self, key_groups: u32) -> &mut Self {
        self.key_groups = key_groups.max(1);
        self
    }

    /// The number of key groups.
    pub fn max_parallelism(&self) -> u32 {
        self.key_groups
    }

    /// Snapshots operator state at the epochs `policy` picks (default: never, at no cost),
    /// for inspection: nothing is written or restored. Replaces [`Self::set_checkpointing`].
    pub fn set_checkpoint_policy(&mut self, policy: Arc<dyn CheckpointPolicy>) -> &mut Self {
        self.checkpoint = Some(CheckpointSetting::Policy(policy));
        self
    }

    /// Takes checkpoints as `config` says and restores the newest complete one when a job
    /// starts: see [`crate::checkpoint`] for what that means for readers and writers.
    /// Replaces [`Self::set_checkpoint_policy`].
    ///
    /// ```
    /// use rill_stream::{checkpoint::*, CollectSink, StreamExecutionEnvironment};
    /// use std::sync::Arc;
    /// let storage = Arc::new(MemoryStorage::new());
    /// let run = |items: Vec<(char, u64)>| {
    ///     let mut env = StreamExecutionEnvironment::new().with_parallelism(2);
    ///     env.set_checkpointing(CheckpointConfig::with_storage(storage.clone()));
    ///     let out = CollectSink::new();
    ///     let sink = out.clone();
    ///     env.execute("counts", move |env| {
    ///         env.from_collection(items.clone()).key_by(|t| t.0).sum(|t| &mut t.1).collect_into(&sink);
    ///     }).unwrap();
    ///     out.take()
    /// };
    /// assert_eq!(run(vec![('a', 1), ('a', 1)]), vec![('a', 1), ('a', 2)]);
    /// // The second run resumes from the first one's final savepoint: the collection's two
    /// // records were emitted already, the third is new, and the count goes on.
    /// assert_eq!(run(vec![('a', 1), ('a', 1), ('a', 1)]), vec![('a', 3)]);
    /// ```
    pub fn set_checkpointing(&mut self, config: CheckpointConfig) -> &mut Self {
        self.checkpoint = Some(CheckpointSetting::Stored(config));
        self
    }

    /// Builder form of [`Self::set_checkpointing`].
    pub fn with_checkpointing(mut self, config: CheckpointConfig) -> Self {
        self.set_checkpointing(config);
        self
    }

    /// Takes a checkpoint of the running job now and reports completed ones (shared by
    /// every job of this environment).
    pub fn checkpoint_trigger(&self) -> CheckpointTrigger {
        self.trigger.clone()
    }

    /// Loads what a job with checkpoints needs before it starts: removes a crashed run's
    /// leftovers (in the process hosting the coordinator, worker 0, before any worker
    /// runs) and loads the newest complete checkpoint.
    fn prepare_checkpoints(
        &self,
        config: &CheckpointConfig,
        job_name: &str,
    ) -> Result<
        (
            Arc<CheckpointStore>,
            Option<crate::checkpoint::store::Restored>,
        ),
        StreamError,
    > {
        let store = Arc::new(CheckpointStore::new(
            config.storage.clone(),
            job_name,
            config.keep,
        ));
        if self.cluster.as_ref().is_none_or(|c| c.process == 0) {
            store.retain(None)?;
        }
        let restored = if config.restore {
            store.load_latest()?
        } else {
            None
        };
        if let Some(r) = &restored {
            if r.meta.key_groups != self.key_groups {
                return Err(crate::error::CheckpointError::Incompatible {
                    id: r.id(),
                    detail: format!(
                        "it has {} key groups, the job {}: max parallelism cannot change",
                        r.meta.key_groups, self.key_groups
                    ),
                }
                .into());
            }
            tracing::info!(
                job = job_name,
                checkpoint = r.id(),
                parallelism = r.parallelism(),
                savepoint = r.meta.savepoint,
                "restoring from checkpoint"
            );
        }
        Ok((store, restored))
    }

    /// A handle that stops this environment's jobs cleanly: sources finish, the job drains,
    /// sinks confirm, readers get their final epoch completion, and `execute` returns `Ok`.
    /// A stopped environment stays stopped (a later job's sources finish at once).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    fn timely_config(&self) -> Result<timely::Config, StreamError> {
        let communication = match &self.cluster {
            None if self.parallelism == 1 => timely::CommunicationConfig::Thread,
            None => timely::CommunicationConfig::Process(self.parallelism),
            Some(c) => {
                let n = c.processes();
                if n == 0 || c.process >= n {
                    return Err(StreamError::Config(format!(
                        "process index {} out of range for {} processes",
                        c.process, n
                    )));
                }
                if !self.parallelism.is_multiple_of(n) {
                    return Err(StreamError::Config(format!(
                        "parallelism {} is not a multiple of {} processes",
                        self.parallelism, n
                    )));
                }
                timely::CommunicationConfig::Cluster {
                    threads: self.parallelism / n,
                    process: c.process,
                    addresses: c.hosts.clone(),
                    report: false,
                    zerocopy: false,
                }
            }
        };
        Ok(timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        })
    }

    /// Builds the job on every worker with `job` and runs it to completion (all sources
    /// exhausted, all records processed). Returns the first error any source or sink hit.
    pub fn execute<F>(&self, job_name: &str, job: F) -> Result<JobExecutionResult, StreamError>
    where
        F: Fn(&JobEnv<'_>) + Send + Sync + 'static,
    {
        let config = self.timely_config()?;
        if (self.key_groups as usize) < self.parallelism {
            return Err(StreamError::Config(format!(
                "max parallelism (key groups) {} is below the parallelism {}",
                self.key_groups, self.parallelism
            )));
        }
        let errors: Arc<Mutex<Option<StreamError>>> = Arc::default();
        let reporter = Reporter {
            errors: errors.clone(),
            control: JobControl {
                stop: self.stop.clone(),
                failed: Arc::new(AtomicBool::new(false)),
            },
        };
        let name = job_name.to_string();
        let (interval, key_groups) = (self.epoch_interval, self.key_groups);
        let prepared = match &self.checkpoint {
            Some(CheckpointSetting::Stored(config)) => {
                Some((config.clone(), self.prepare_checkpoints(config, job_name)?))
            }
            _ => None,
        };
        let base = prepared
            .as_ref()
            .and_then(|(_, (_, r))| r.as_ref())
            .map_or(0, |r| r.id().saturating_add(1));
        // Connecting the processes is start-up, not job time (Flink's net runtime also
        // excludes deployment).
        let (allocators, others) = config
            .communication
            .try_build()
            .map_err(StreamError::Startup)?;
        let start = Instant::now();
        let clock = EpochClock::starting_at(start, interval, base);
        let mode = match (&self.checkpoint, prepared) {
            (Some(CheckpointSetting::Policy(p)), _) => Some(CheckpointMode::Policy(p.clone())),
            (Some(CheckpointSetting::Stored(_)), Some((config, (store, restored)))) => {
                // Checkpoints are whole epochs apart.
                let every = config
                    .interval
                    .as_nanos()
                    .div_ceil(interval.as_nanos().max(1))
                    .clamp(1, u128::from(u32::MAX)) as u64;
                self.trigger.start(clock.clone(), every, self.stop.clone());
                self.trigger.restored(restored.as_ref().map(|r| r.id()));
                Some(CheckpointMode::Stored(Arc::new(StoredJob {
                    store,
                    schedule: Schedule { every, base },
                    restored: restored.map(Arc::new),
                    trigger: self.trigger.clone(),
                    max_failures: config.max_consecutive_failures.max(1),
                    key_groups,
                })))
            }
            _ => None,
        };
        let guards =
            timely::execute::execute_from(allocators, others, config.worker, move |worker| {
                let index = worker.index();
                let peers = worker.peers();
                let shared = Rc::new(Shared {
                    index,
                    peers,
                    reporter: reporter.clone(),
                    job_name: name.clone(),
                    clock: clock.clone(),
                    key_groups: KeyGroups::new(key_groups, peers),
                    checkpoint: mode.clone(),
                    finishers: RefCell::default(),
                });
                let stored = matches!(mode, Some(CheckpointMode::Stored(_)));
                // Timely's root scope needs a timestamp that refines `()`, which `Product`
                // does not: the job runs in a child scope whose outer coordinate (the epoch)
                // is the root's time.
                let built = shared.clone();
                worker.dataflow::<u64, _, _>(|root| {
                    root.scoped::<Time, _, _>("Job", |scope| {
                        let env = JobEnv {
                            scope,
                            shared: built,
                            registry: Rc::new(Registry::default()),
                        };
                        job(&env);
                        completion::build_tracker(&env);
                    })
                });
                if stored {
                    while worker.has_dataflows() {
                        worker.step_or_park(None);
                    }
                    // The final savepoint is committed: wait until the writers' output is
                    // confirmed (a crash before that republishes it from the savepoint).
                    let finishers = std::mem::take(&mut *shared.finishers.borrow_mut());
                    for f in finishers {
                        loop {
                            if shared.reporter.failed() {
                                break;
                            }
                            match f.borrow_mut().finish_committed() {
                                Ok(true) => break,
                                Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                                Err(e) => {
                                    shared.reporter.report(e);
                                    break;
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|e| {
                self.trigger.finish();
                StreamError::Startup(e)
            })?;
        let joined: Vec<_> = guards.join();
        self.stop.clear();
        self.trigger.finish();
        for result in joined {
            result.map_err(StreamError::Worker)?;
        }
        let net_runtime = start.elapsed();
        let first_error = match errors.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match first_error {
            Some(e) => Err(e),
            None => Ok(JobExecutionResult {
                job_name: job_name.to_string(),
                net_runtime,
            }),
        }
    }
}

/// One worker's view of the job, shared by everything built on it.
pub(crate) struct Shared {
    pub(crate) index: usize,
    pub(crate) peers: usize,
    pub(crate) reporter: Reporter,
    pub(crate) job_name: String,
    pub(crate) clock: EpochClock,
    pub(crate) key_groups: KeyGroups,
    pub(crate) checkpoint: Option<CheckpointMode>,
    /// Writers to wait for once the dataflow ended (checkpoint mode).
    pub(crate) finishers: RefCell<Vec<Rc<RefCell<dyn completion::Finisher>>>>,
}

/// How the running job checkpoints.
#[derive(Clone)]
pub(crate) enum CheckpointMode {
    Policy(Arc<dyn CheckpointPolicy>),
    Stored(Arc<StoredJob>),
}

/// One worker's handle on the job being built: create sources from it.
///
/// Cheap to clone; every [`crate::DataStream`] carries one.
#[derive(Clone)]
pub struct JobEnv<'s> {
    pub(crate) scope: Scope<'s, Time>,
    pub(crate) shared: Rc<Shared>,
    /// What the epoch-completion tracker is built from once the job closure returns.
    pub(crate) registry: Rc<Registry<'s>>,
}

impl<'s> JobEnv<'s> {
    /// This worker's index in `0..parallelism()` (Flink's subtask index).
    pub fn worker_index(&self) -> usize {
        self.shared.index
    }

    /// Total number of workers over all processes.
    pub fn parallelism(&self) -> usize {
        self.shared.peers
    }

    /// The name passed to `execute`.
    pub fn job_name(&self) -> &str {
        &self.shared.job_name
    }

    /// A `'static` handle for operators to report errors from inside their closures.
    pub(crate) fn reporter(&self) -> Reporter {
        self.shared.reporter.clone()
    }

    /// What sources check to know they must finish.
    pub(crate) fn control(&self) -> &JobControl {
        &self.shared.reporter.control
    }

    pub(crate) fn clock(&self) -> EpochClock {
        self.shared.clock.clone()
    }

    pub(crate) fn key_groups(&self) -> KeyGroups {
        self.shared.key_groups
    }

    /// Where an operator named `name` at `address` sends snapshots, if checkpointing is on.
    /// With storage the operator is registered: every checkpoint needs a part from it on
    /// every worker.
    pub(crate) fn checkpointing(&self, name: &str, address: &[usize]) -> Option<Checkpointing> {
        let operator = format!("{name}@{address:?}");
        match self.shared.checkpoint.as_ref()? {
            CheckpointMode::Policy(policy) => Some(Checkpointing::policy(
                policy.clone(),
                &operator,
                self.shared.index,
            )),
            CheckpointMode::Stored(job) => {
                self.registry.add_operator(operator.clone());
                Some(Checkpointing::Stored(Rc::new(PartWriter {
                    job: job.clone(),
                    operator,
                    worker: self.shared.index,
                    control: self.control().clone(),
                })))
            }
        }
    }

    /// The job's checkpoints in storage, if on.
    pub(crate) fn stored_job(&self) -> Option<&Arc<StoredJob>> {
        match self.shared.checkpoint.as_ref()? {
            CheckpointMode::Stored(job) => Some(job),
            CheckpointMode::Policy(_) => None,
        }
    }
}

/// Reports a job error from inside an operator. The first error is what `execute` returns;
/// reporting also stops the job's sources, so that a failed job terminates instead of
/// running on.
#[derive(Clone)]
pub(crate) struct Reporter {
    errors: Arc<Mutex<Option<StreamError>>>,
    pub(crate) control: JobControl,
}

impl Reporter {
    pub(crate) fn report(&self, error: StreamError) {
        report(&self.errors, error);
        self.control.failed.store(true, Ordering::SeqCst);
        self.control.stop.wake_sources();
    }

    /// True once any operator of this process reported an error.
    pub(crate) fn failed(&self) -> bool {
        self.control.failed.load(Ordering::SeqCst)
    }
}

pub(crate) fn report(slot: &Mutex<Option<StreamError>>, error: StreamError) {
    // The lock is taken only on failure paths, never per record.
    let mut guard = match slot.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if guard.is_none() {
        *guard = Some(error);
    }
}
