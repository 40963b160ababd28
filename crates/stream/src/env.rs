//! The execution environment: how many workers, in how many processes, and running a job.
//!
//! A job is a closure that builds the dataflow; timely runs it once on every worker (thread),
//! in every process, and each worker instantiates its own copy of every operator. Sources
//! either split their input across workers (parallel) or run on worker 0 only (like Flink's
//! non-parallel sources); `key_by` routes every key to exactly one worker.

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::Scope;

use crate::error::StreamError;

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
#[derive(Clone, Debug)]
pub struct StreamExecutionEnvironment {
    parallelism: usize,
    cluster: Option<ClusterConfig>,
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
        let errors: Arc<Mutex<Option<StreamError>>> = Arc::default();
        let worker_errors = errors.clone();
        let name = job_name.to_string();
        // Connecting the processes is start-up, not job time (Flink's net runtime also
        // excludes deployment).
        let (allocators, others) = config
            .communication
            .try_build()
            .map_err(StreamError::Startup)?;
        let start = Instant::now();
        let guards =
            timely::execute::execute_from(allocators, others, config.worker, move |worker| {
                let index = worker.index();
                let peers = worker.peers();
                let errors = worker_errors.clone();
                let name = name.clone();
                worker.dataflow::<u64, _, _>(|scope| {
                    let env = JobEnv {
                        scope,
                        shared: Rc::new(Shared {
                            index,
                            peers,
                            errors,
                            job_name: name,
                        }),
                    };
                    job(&env);
                });
            })
            .map_err(StreamError::Startup)?;
        for result in guards.join() {
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

pub(crate) struct Shared {
    pub(crate) index: usize,
    pub(crate) peers: usize,
    pub(crate) errors: Arc<Mutex<Option<StreamError>>>,
    pub(crate) job_name: String,
}

/// One worker's handle on the job being built: create sources from it.
///
/// Cheap to clone; every [`crate::DataStream`] carries one.
#[derive(Clone)]
pub struct JobEnv<'s> {
    pub(crate) scope: Scope<'s, u64>,
    pub(crate) shared: Rc<Shared>,
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
        Reporter(self.shared.errors.clone())
    }
}

/// Reports a job error from inside an operator.
#[derive(Clone)]
pub(crate) struct Reporter(Arc<Mutex<Option<StreamError>>>);

impl Reporter {
    pub(crate) fn report(&self, error: StreamError) {
        report(&self.0, error);
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
