//! Shared fixtures for Rill's black-box interop tests.
//!
//! * [`Broker`] starts the real `rill` binary (`rill server --port P --data-dir D`) on a free
//!   loopback port and kills it on drop. If `AMQP_TEST_ADDR` is set (e.g. `127.0.0.1:5690`) the
//!   tests use that broker instead; this is how every expectation in these files was checked
//!   against a real RabbitMQ 3.10 first.
//! * [`unique`] makes queue/exchange names that never collide between tests or runs, so the
//!   same suite can run against a shared RabbitMQ.
//! * [`raw`] is a hand-written AMQP 0-9-1 client over `std::net::TcpStream` for sending bytes no
//!   real client would send (the bad-input tests). It encodes frames by hand on purpose: the
//!   point is to send *wrong* frames, which a correct codec refuses to build.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod raw;

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long any single protocol step may take before a test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(10);

/// A broker for one test: either a `rill server` child process or the external broker named by
/// `AMQP_TEST_ADDR`.
pub struct Broker {
    addr: SocketAddr,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    stderr_path: Option<PathBuf>,
}

impl Broker {
    /// Starts `rill server` on a free port (or uses `AMQP_TEST_ADDR`) and waits until the port
    /// accepts connections.
    pub fn start() -> Broker {
        if let Ok(addr) = std::env::var("AMQP_TEST_ADDR") {
            let addr: SocketAddr = addr
                .parse()
                .expect("AMQP_TEST_ADDR must look like 127.0.0.1:5672");
            return Broker {
                addr,
                child: None,
                data_dir: None,
                stderr_path: None,
            };
        }
        let port = free_port();
        let base = std::env::temp_dir().join(unique("rill-test"));
        let data_dir = base.join("data");
        fs::create_dir_all(&data_dir).expect("create temp data dir");
        let stderr_path = base.join("stderr.log");
        let child = spawn_server(port, &data_dir, &stderr_path);
        let mut broker = Broker {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            data_dir: Some(base),
            stderr_path: Some(stderr_path),
        };
        broker.wait_until_listening();
        broker
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + STEP;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "rill server exited during startup with {status}; stderr:\n{}",
                        self.stderr()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "rill server did not listen on {} within {STEP:?}; stderr:\n{}",
                self.addr,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether this is the broker named by `AMQP_TEST_ADDR`, which tests cannot kill or
    /// restart.
    pub fn is_external(&self) -> bool {
        self.child.is_none()
    }

    /// Kills the `rill server` child with SIGKILL (no clean shutdown: sockets reset, nothing
    /// flushed beyond what was synced) and waits for it to exit.
    pub fn kill(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("an external broker cannot be killed");
        child.kill().expect("kill rill server");
        child.wait().expect("reap rill server");
    }

    /// Starts `rill server` again on the same port and data directory (after [`Broker::kill`])
    /// and waits until it listens.
    pub fn revive(&mut self) {
        let base = self
            .data_dir
            .as_ref()
            .expect("an external broker cannot be revived");
        let stderr_path = self.stderr_path.clone().expect("a child broker logs");
        self.child = Some(spawn_server(
            self.addr.port(),
            &base.join("data"),
            &stderr_path,
        ));
        self.wait_until_listening();
    }

    /// [`Broker::kill`], then [`Broker::revive`].
    pub fn restart(&mut self) {
        self.kill();
        self.revive();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URI lapin connects to: user guest, vhost `/`.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// The broker's stderr so far (empty for an external broker).
    pub fn stderr(&self) -> String {
        self.stderr_path
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Asserts the broker survived whatever the test did: the process has not exited and the
    /// port still accepts TCP connections.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("rill server died with {status}; stderr:\n{}", self.stderr());
            }
        }
        TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .expect("broker no longer accepts connections");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr();
            if !stderr.is_empty() {
                eprintln!("---- rill server stderr ----\n{stderr}");
            }
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Runs `rill server` on `port` with `data_dir`, appending its stderr to `stderr_path` (a
/// restarted broker keeps one log).
fn spawn_server(port: u16, data_dir: &Path, stderr_path: &Path) -> Child {
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .expect("open stderr log");
    Command::new(env!("CARGO_BIN_EXE_rill"))
        .arg("server")
        .arg("--port")
        .arg(port.to_string())
        .arg("--http-port")
        .arg(free_port().to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn rill server")
}

/// A port that was free a moment ago. The broker binds it right after; the tiny race with other
/// processes is acceptable for tests.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A name unique across tests, test binaries and runs: `prefix-pid-nanos-counter`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Awaits `fut`, failing the test after [`STEP`] instead of hanging.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {STEP:?} waiting for {what}"),
    }
}
