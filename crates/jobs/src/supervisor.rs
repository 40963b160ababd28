//! Supervision: `rill job run` runs its job in worker processes and restarts them, as Flink
//! restarts a job, when one fails: a worker killed (even with SIGKILL), a panic in job code,
//! an error the job cannot get past by itself. With checkpoints, restarted workers resume
//! from the last completed one.
//!
//! A job of `--processes N` is N worker processes forming one timely cluster over loopback
//! ports. When one of them dies the others cannot go on (timely has no fault tolerance of
//! its own), so the supervisor stops them all and starts all N again.
//!
//! Workers watch the supervisor through their stdin, a pipe it holds open: when the
//! supervisor is gone (even after SIGKILL), the pipe closes and they stop instead of running
//! on unsupervised.
//!
//! SIGTERM or SIGINT to the supervisor is passed on to the workers, which stop cleanly (and
//! take a final checkpoint); the supervisor exits 0 once they all did. SIGUSR1 is passed on
//! too: it asks every worker for a checkpoint now (`rill job savepoint`, which finds the
//! supervisor through the pid file it keeps in the checkpoint directory).

use rustix::process::{kill_process, Pid, Signal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How failed workers are started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartStrategy {
    /// Always the same pause.
    FixedDelay {
        delay: Duration,
        /// Give up after this many restarts in a row (None: never).
        max_attempts: Option<u32>,
    },
    /// A pause that doubles from `initial` up to `max`.
    ExponentialBackoff {
        initial: Duration,
        max: Duration,
        max_attempts: Option<u32>,
    },
}

impl Default for RestartStrategy {
    fn default() -> Self {
        RestartStrategy::ExponentialBackoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl RestartStrategy {
    /// The pause before restart number `attempt` (1, 2, ...), or None once attempts run out.
    ///
    /// ```
    /// use rill_jobs::supervisor::RestartStrategy;
    /// use std::time::Duration;
    /// let s = RestartStrategy::ExponentialBackoff {
    ///     initial: Duration::from_millis(100), max: Duration::from_millis(350), max_attempts: Some(4) };
    /// let pauses: Vec<_> = (1..=5).map(|a| s.delay(a).map(|d| d.as_millis())).collect();
    /// assert_eq!(pauses, [Some(100), Some(200), Some(350), Some(350), None]);
    /// ```
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        match *self {
            RestartStrategy::FixedDelay {
                delay,
                max_attempts,
            } => (max_attempts.is_none_or(|m| attempt <= m)).then_some(delay),
            RestartStrategy::ExponentialBackoff {
                initial,
                max,
                max_attempts,
            } => (max_attempts.is_none_or(|m| attempt <= m)).then(|| {
                let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
                initial.saturating_mul(factor).min(max)
            }),
        }
    }
}

/// Exit codes of a worker that restarting cannot help: a bad command line (2), a refusal by
/// the broker (3, 4), bad input under the `fail` policy (5).
fn is_final(code: i32) -> bool {
    matches!(code, 2..=5)
}

/// How long a run must last before its failure no longer counts as "in a row".
const STABLE_RUN: Duration = Duration::from_secs(60);

/// How often the supervisor looks at its workers.
const POLL: Duration = Duration::from_millis(50);

/// Runs `processes` workers made by `worker(index, hosts)` (hosts: one `127.0.0.1:port` per
/// process when there are several, empty otherwise) until they all end cleanly, restarting
/// them all as `restart` says when one fails. Returns the exit code for the supervisor.
pub fn supervise(
    name: &str,
    processes: usize,
    restart: RestartStrategy,
    pid_file: Option<&Path>,
    worker: impl Fn(usize, &[String]) -> Command,
) -> i32 {
    let _pid_file = pid_file.map(PidFile::write);
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    crate::signals::on_terminate(move || flag.store(true, Ordering::Release));
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    crate::signals::on_user1(move || {
        counter.fetch_add(1, Ordering::AcqRel);
    });
    let signals = Signals {
        stopping,
        checkpoint_requests: requests,
    };
    let mut attempt = 0u32;
    loop {
        let hosts = match cluster_hosts(processes) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(job = name, error = %e, "cannot find ports for the worker processes");
                return 1;
            }
        };
        let started = Instant::now();
        let mut children = Vec::new();
        for i in 0..processes {
            let mut cmd = worker(i, &hosts);
            // Stdin is our lifeline to them (see the module docs).
            cmd.stdin(Stdio::piped());
            match cmd.spawn() {
                Ok(c) => children.push(c),
                Err(e) => {
                    tracing::error!(job = name, process = i, error = %e, "cannot start a worker process");
                    kill_all(&mut children);
                    return 1;
                }
            }
        }
        tracing::info!(job = name, processes, pids = ?children.iter().map(Child::id).collect::<Vec<_>>(), "workers started");
        let failure = watch(name, &mut children, &signals);
        let code = match failure {
            Outcome::Done(code) => return code,
            Outcome::Failed(code) => code,
        };
        if is_final(code) {
            tracing::error!(
                job = name,
                exit_code = code,
                "a worker failed in a way restarting cannot fix"
            );
            return code;
        }
        attempt = if started.elapsed() >= STABLE_RUN {
            1
        } else {
            attempt + 1
        };
        let Some(pause) = restart.delay(attempt) else {
            tracing::error!(
                job = name,
                attempts = attempt - 1,
                "giving up: restart attempts used up"
            );
            return code.max(1);
        };
        tracing::warn!(
            job = name,
            exit_code = code,
            attempt,
            pause_ms = pause.as_millis() as u64,
            "a worker failed: restarting all workers"
        );
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if signals.stopping.load(Ordering::Acquire) {
                return 0;
            }
            std::thread::sleep(POLL);
        }
    }
}

enum Outcome {
    /// The supervisor is done, with this exit code.
    Done(i32),
    /// A worker failed with this code (-1: killed by a signal): restart.
    Failed(i32),
}

/// What the supervisor was asked from outside.
struct Signals {
    stopping: Arc<AtomicBool>,
    /// SIGUSR1s received: each is passed on to the workers.
    checkpoint_requests: Arc<AtomicU64>,
}

fn watch(name: &str, children: &mut [Child], signals: &Signals) -> Outcome {
    let mut signalled = false;
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    let mut forwarded = signals.checkpoint_requests.load(Ordering::Acquire);
    loop {
        let requested = signals.checkpoint_requests.load(Ordering::Acquire);
        if requested != forwarded {
            forwarded = requested;
            tracing::info!(
                job = name,
                "checkpoint requested: passing it on to the workers"
            );
            for c in children.iter() {
                send(c, Signal::USR1);
            }
        }
        if signals.stopping.load(Ordering::Acquire) && !signalled {
            signalled = true;
            tracing::info!(job = name, "stopping the workers");
            for c in children.iter() {
                terminate(c);
            }
        }
        for (i, c) in children.iter_mut().enumerate() {
            if codes[i].is_some() {
                continue;
            }
            match c.try_wait() {
                Ok(Some(status)) => codes[i] = Some(status.code().unwrap_or(-1)),
                Ok(None) => {}
                Err(_) => codes[i] = Some(-1),
            }
        }
        let failed = codes.iter().flatten().find(|&&c| c != 0).copied();
        if let (Some(code), false) = (failed, signalled) {
            // One failed: the others cannot go on without it.
            tracing::warn!(job = name, exit_code = code, "worker process ended");
            kill_all(children);
            return Outcome::Failed(code);
        }
        if codes.iter().all(Option::is_some) {
            let worst = codes
                .iter()
                .flatten()
                .copied()
                .find(|&c| c != 0)
                .unwrap_or(0);
            return Outcome::Done(worst);
        }
        if codes.iter().any(Option::is_some) && !signalled {
            // One ended cleanly on its own (its input ended): let the rest finish too.
            signalled = true;
            for c in children.iter() {
                terminate(c);
            }
        }
        std::thread::sleep(POLL);
    }
}

fn terminate(child: &Child) {
    send(child, Signal::TERM);
}

fn send(child: &Child, signal: Signal) {
    if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}

/// The supervisor's pid in a file, removed when it exits.
struct PidFile(PathBuf);

/// Its name in the checkpoint directory.
pub const PID_FILE: &str = "supervisor.pid";

impl PidFile {
    fn write(path: &Path) -> PidFile {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(path, std::process::id().to_string()) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file: rill job savepoint will not find this job");
        }
        PidFile(path.to_path_buf())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Asks the job supervised from `checkpoint_dir` for a checkpoint now and waits up to
/// `timeout` for it to complete; returns its id.
pub fn request_checkpoint(checkpoint_dir: &Path, timeout: Duration) -> Result<u64, String> {
    let pid_path = checkpoint_dir.join(PID_FILE);
    let text = std::fs::read_to_string(&pid_path)
        .map_err(|e| format!("no running job found ({}: {e})", pid_path.display()))?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("{} does not hold a pid", pid_path.display()))?;
    let before = latest_checkpoint(checkpoint_dir);
    kill_process(pid, Signal::USR1).map_err(|e| {
        format!(
            "cannot signal the job's supervisor (pid {}): {e}",
            pid.as_raw_nonzero()
        )
    })?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match latest_checkpoint(checkpoint_dir) {
            Some(id) if Some(id) > before => return Ok(id),
            _ => std::thread::sleep(POLL),
        }
    }
    Err(format!(
        "no new checkpoint completed within {} s",
        timeout.as_secs()
    ))
}

/// The id of the newest completed checkpoint in `dir` (its completion records are
/// `checkpoints/<id>.meta`).
pub fn latest_checkpoint(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.strip_suffix(".meta")?.parse::<u64>().ok()
        })
        .max()
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// One free loopback address per process for timely's connections (none for one process).
fn cluster_hosts(processes: usize) -> std::io::Result<Vec<String>> {
    if processes <= 1 {
        return Ok(Vec::new());
    }
    // Bound together so no two get the same port; released just before the workers bind
    // them (a small window another program could steal one in: the run then fails and is
    // restarted on new ports).
    let listeners: Vec<std::net::TcpListener> = (0..processes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect()
}

/// In a worker: stops the job (via `stop`) when the supervisor goes away, which closes our
/// stdin.
pub fn stop_when_orphaned(stop: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("rill-supervisor-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            tracing::warn!("the supervisor is gone: stopping");
            stop();
        });
    if spawned.is_err() {
        tracing::warn!("cannot watch the supervisor");
    }
}
