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
//! take a final checkpoint); the supervisor exits 0 once they all did.

use rustix::process::{kill_process, Pid, Signal};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
    worker: impl Fn(usize, &[String]) -> Command,
) -> i32 {
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    crate::signals::on_terminate(move || flag.store(true, Ordering::Release));
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
        let failure = watch(name, &mut children, &stopping);
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
            if stopping.load(Ordering::Acquire) {
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

fn watch(name: &str, children: &mut [Child], stopping: &AtomicBool) -> Outcome {
    let mut signalled = false;
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    loop {
        if stopping.load(Ordering::Acquire) && !signalled {
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
    if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::TERM);
    }
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
