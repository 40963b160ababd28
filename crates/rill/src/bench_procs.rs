//! Child processes of `rill bench pipeline`: `rill server`, `rill job run` and a private
//! RabbitMQ node, each owned by a guard that stops it when dropped.
//!
//! A benchmark that leaves brokers behind spoils the next measurement on a small machine
//! (and holds ports and disk), so every child is stopped on success, on error and on
//! Ctrl-C: the bench's future is dropped on a signal, and with it these guards. Children
//! run in process groups of their own, so a Ctrl-C in the terminal reaches only the bench,
//! which then stops them in order (the job before its broker) instead of all of them racing
//! to shut down at once. Ports come from binding `127.0.0.1:0`; readiness is waited for (the
//! port accepts connections; `rabbitmqctl wait` for RabbitMQ), never slept for.

use anyhow::{anyhow, bail, Context as _};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a child may take to stop after SIGTERM before it is killed. A standalone job
/// stops cleanly by waiting for its last publishes to be confirmed, which takes a moment on a
/// loaded broker.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How long a `rill server` may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the Debian package keeps RabbitMQ's own scripts (its `/usr/sbin` wrapper insists on
/// `su rabbitmq`, so the bench calls these directly, as `tests/interop/rabbitnode.py` does).
const RMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// How long RabbitMQ may take to boot or to stop.
const RMQ_TIMEOUT: Duration = Duration::from_secs(120);

/// A free loopback port: bound, read and released (another process could take it in
/// between, but nothing else on this machine picks ports that way in that instant).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pid_of(pid: u32) -> anyhow::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| anyhow!("not a process id: {pid}"))
}

/// CPU seconds used so far by `pid` and its live descendants: `rill job run` is a supervisor
/// whose `rill job worker` children do the work.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let own = crate::bench_amqp::cpu_seconds(pid)?;
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, parent_pid(p)?)))
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&t) = tree.get(i) {
        tree.extend(parents.iter().filter(|(_, pp)| *pp == t).map(|(p, _)| *p));
        i += 1;
    }
    let descendants: f64 = tree[1..]
        .iter()
        .filter_map(|p| crate::bench_amqp::cpu_seconds(*p))
        .sum();
    Some(own + descendants)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, then the parent's pid.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A child process with its output in a log file; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` in a process group of its own, stdout and stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the child and the end of its log if it has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        match self.status {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited with {status}; end of its log:\n{}",
                self.name,
                log_tail(&self.log, 30)
            ),
        }
    }

    /// Stops the child (SIGTERM; SIGKILL after [`STOP_GRACE`]) and returns how it ended;
    /// `Err` says why that was not a clean exit 0.
    pub fn stop(&mut self) -> Result<(), String> {
        let status = match self.status {
            Some(s) => s,
            None => {
                let s = self.terminate();
                self.status = Some(s);
                s
            }
        };
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} ended with {status} when stopped; end of its log:\n{}",
                self.name,
                log_tail(&self.log, 10)
            ))
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        if let Ok(Some(s)) = self.child.try_wait() {
            return s;
        }
        if let Ok(pid) = pid_of(self.child.id()) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(s)) => return s,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!(
            "{} did not stop within {STOP_GRACE:?}: killing it",
            self.name
        );
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(s) => s,
            // Unreachable in practice (the child is ours and not yet reaped); any status
            // that is not success reports it.
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(9),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.stop();
        }
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `port` accepts connections, failing early if `proc` exits.
pub async fn wait_listening(port: u16, proc: &mut Proc, timeout: Duration) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    loop {
        proc.check()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on {addr} within {timeout:?}; end of its log:\n{}",
                proc.name,
                log_tail(&proc.log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `rill server` (this very binary) on a free port with its data under `dir`.
pub struct RillServer {
    pub proc: Proc,
    pub port: u16,
}

impl RillServer {
    /// Starts the server, with a job file if given, and waits until it listens.
    pub async fn start(dir: &Path, job: Option<&Path>) -> anyhow::Result<RillServer> {
        let port = free_port()?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let mut cmd = Command::new(std::env::current_exe().context("locate the rill binary")?);
        cmd.arg("server")
            .args(["--port", &port.to_string()])
            .args(["--http-port", &free_port()?.to_string()])
            .arg("--data-dir")
            .arg(&data);
        if let Some(job) = job {
            cmd.arg("--job").arg(job);
        }
        let mut proc = Proc::spawn("rill server", &mut cmd, &dir.join("server.log"))?;
        wait_listening(port, &mut proc, LISTEN_TIMEOUT).await?;
        Ok(RillServer { proc, port })
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// A private RabbitMQ node: its own AMQP and distribution ports, cookie, mnesia and logs
/// under a directory of its own, listening on loopback only. Stopped with `rabbitmqctl stop`
/// (its process group is killed if that fails) when dropped.
pub struct RabbitNode {
    dir: PathBuf,
    pub port: u16,
    dist_port: u16,
    node: String,
    wrapper: Option<Child>,
    /// Whether epmd (which Erlang starts on demand and which outlives the node) was already
    /// running: if it was not, the node's stop also stops it, unless other nodes use it.
    epmd_was_running: bool,
}

impl RabbitNode {
    /// Whether RabbitMQ's scripts are installed.
    pub fn available() -> bool {
        Path::new(RMQ_BIN).join("rabbitmq-server").exists()
    }

    /// Starts a node under `dir` and waits until it is booted and listens. Blocking (tens of
    /// seconds): call it from `spawn_blocking`.
    pub fn start(dir: &Path) -> anyhow::Result<RabbitNode> {
        let port = free_port()?;
        let dist_port = free_port()?;
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n\
                 log.file.level = warning\nlog.console = false\n"
            ),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let epmd_was_running = epmd_running();
        let mut node = RabbitNode {
            dir: dir.to_path_buf(),
            port,
            dist_port,
            node: format!("rillbench{port}@localhost"),
            wrapper: None,
            epmd_was_running,
        };
        let log = File::create(dir.join("log").join("startup.log"))?;
        let mut cmd = Command::new(Path::new(RMQ_BIN).join("rabbitmq-server"));
        node.env(&mut cmd);
        node.wrapper = Some(
            cmd.current_dir(dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("start rabbitmq-server")?,
        );
        // From here on, a failure drops `node`, which stops what did start.
        let pid_file = dir.join("rabbit.pid");
        let deadline = Instant::now() + RMQ_TIMEOUT;
        while std::fs::read_to_string(&pid_file)
            .map(|s| s.trim().is_empty())
            .unwrap_or(true)
        {
            if let Some(w) = node.wrapper.as_mut() {
                if let Some(status) = w.try_wait()? {
                    bail!(
                        "rabbitmq-server exited with {status} during start:\n{}",
                        node.log_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("rabbitmq-server wrote no pid file:\n{}", node.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        node.ctl(&[
            "wait",
            "--timeout",
            &RMQ_TIMEOUT.as_secs().to_string(),
            &pid_file.to_string_lossy(),
        ])?;
        while TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            if Instant::now() > deadline {
                bail!("RabbitMQ does not listen on {port}:\n{}", node.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(node)
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang VM's process id (for CPU figures).
    pub fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("rabbit.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", d) // the Erlang cookie lives in $HOME
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
    }

    /// Runs `rabbitmqctl -n NODE ARGS…`, killed after [`RMQ_TIMEOUT`].
    fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new(Path::new(RMQ_BIN).join("rabbitmqctl"));
        self.env(&mut cmd);
        let log = self.dir.join("log").join("rabbitmqctl.log");
        let mut child = Proc::spawn("rabbitmqctl", cmd.args(["-n", &self.node]).args(args), &log)?;
        let deadline = Instant::now() + RMQ_TIMEOUT;
        loop {
            if let Some(status) = child.child.try_wait()? {
                child.status = Some(status);
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "rabbitmqctl {} failed ({status}):\n{}",
                    args.join(" "),
                    log_tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("rabbitmqctl {} did not finish", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir.join("log").join("startup.log"), 30)
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let Some(mut wrapper) = self.wrapper.take() else {
            return;
        };
        let pid_file = self.dir.join("rabbit.pid").to_string_lossy().into_owned();
        let mut stopped = false;
        if matches!(wrapper.try_wait(), Ok(None)) {
            // `stop` with the pid file waits until the VM has exited.
            stopped = self.ctl(&["stop", &pid_file]).is_ok();
        }
        let deadline = Instant::now() + STOP_GRACE;
        while stopped && matches!(wrapper.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(wrapper.try_wait(), Ok(None)) {
            eprintln!("RabbitMQ did not stop cleanly: killing its process group");
            if let Ok(pid) = pid_of(wrapper.id()) {
                let _ = kill_process_group(pid, Signal::KILL);
            }
            let _ = wrapper.wait();
        }
        if !self.epmd_was_running && epmd_running() && !epmd_has_names() {
            let _ = Command::new("epmd")
                .arg("-kill")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether an epmd answers on the default port.
fn epmd_running() -> bool {
    Command::new("epmd")
        .arg("-names")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether any Erlang node is registered with epmd.
fn epmd_has_names() -> bool {
    Command::new("epmd")
        .arg("-names")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("name "))
        })
        .unwrap_or(true)
}
