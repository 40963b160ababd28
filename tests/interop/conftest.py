"""Fixtures for the interop suite: a broker to talk to, and small client helpers.

Two modes:

* Rill mode (default): start the real binary ``$RILL_BIN`` (default
  ``target/debug/rill``) as ``rill server --port P --data-dir D`` on a free
  loopback port with a temporary data dir, and kill it at the end. Its stderr
  goes to a file whose tail is attached to every failing test's report.
* Reference mode: if ``AMQP_TEST_URL`` is set (e.g. a real RabbitMQ,
  ``amqp://guest:guest@127.0.0.1:5690/%2F``) every test runs against that
  broker and nothing is started. Tests that must start or stop the broker
  themselves are skipped. Every test in this suite passes against RabbitMQ
  3.10: that is what makes its expectations RabbitMQ's rather than ours.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

import pika
import pika.exceptions
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_URL = os.environ.get("AMQP_TEST_URL")
STARTUP_TIMEOUT = 30.0

# Brokers started by this session; their log tails go into failing reports.
_running: list["RillProcess"] = []


def rill_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("RILL_BIN", "target/debug/rill"))
    return path if path.is_absolute() else REPO_ROOT / path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class RillProcess:
    """One `rill server` child process on a loopback port."""

    port: int
    data_dir: pathlib.Path
    log_path: pathlib.Path
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)
    # More `rill server` flags, e.g. ["--memory-high-watermark", "0.5"].
    extra_args: list[str] = field(default_factory=list)
    # The management HTTP API's port: free, and the same across restarts.
    http_port: int = field(default_factory=lambda: free_port())

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> "RillProcess":
        binary = rill_bin()
        if not binary.exists():
            pytest.fail(
                f"broker binary {binary} not found: run `cargo build -p rill` "
                "or set AMQP_TEST_URL to test another broker",
                pytrace=False,
            )
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(binary), "server", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--http-port", str(self.http_port), *self.extra_args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=self.data_dir,
            env=dict(os.environ, NO_COLOR="1"),  # plain log lines in failure reports
        )
        _running.append(self)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"rill exited with {self.proc.returncode} during startup:\n{self.tail()}",
                    pytrace=False,
                )
            if port_open(self.port):
                return self
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"rill did not listen on port {self.port} within {STARTUP_TIMEOUT}s:\n{self.tail()}",
                    pytrace=False)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in _running:
            _running.remove(self)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])


def start_rill(tmp: pathlib.Path, port: int | None = None) -> RillProcess:
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    return RillProcess(port or free_port(), data_dir, tmp / "rill.stderr.log").start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _running:
        for broker in list(_running):
            report.sections.append((f"rill stderr (port {broker.port}, tail)", broker.tail()))


# --------------------------------------------------------------------------- brokers


@pytest.fixture(scope="session")
def amqp_url(tmp_path_factory) -> str:
    """URL of the broker shared by the whole session."""
    if REFERENCE_URL:
        yield REFERENCE_URL
        return
    broker = start_rill(tmp_path_factory.mktemp("rill-session"))
    yield broker.url
    broker.kill()


@pytest.fixture
def fresh_broker(tmp_path) -> RillProcess:
    """A broker of our own for tests that stop it or need a clean state."""
    if REFERENCE_URL:
        pytest.skip("starts and stops the broker itself: Rill mode only")
    broker = start_rill(tmp_path)
    yield broker
    broker.kill()


@pytest.fixture
def make_broker(tmp_path):
    """Factory for brokers a test kills (SIGKILL), stops and restarts on the same port and
    data dir: ``make_broker(extra_args=[...], start=True)``. Rill by default; a private
    RabbitMQ node per call if ``RABBITMQ_SH`` names rabbitmq.sh (see brokerproc.py).
    Every broker is killed at teardown."""
    import brokerproc

    if REFERENCE_URL and not brokerproc.RABBITMQ_SH:
        pytest.skip("restarts the broker itself: Rill mode, or RabbitMQ via RABBITMQ_SH")
    made = []

    def _make(extra_args: list[str] | None = None, start: bool = True):
        broker = brokerproc.new_broker(tmp_path / f"broker{len(made)}", extra_args)
        made.append(broker)
        return broker.start() if start else broker

    yield _make
    for broker in made:
        broker.close()


@pytest.fixture
def broker_addr(amqp_url) -> tuple[str, int]:
    u = urllib.parse.urlparse(amqp_url)
    return u.hostname or "127.0.0.1", u.port or 5672


# --------------------------------------------------------------------------- clients


def uniq(prefix: str = "t") -> str:
    return f"rilltest.{prefix}.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def name():
    """Factory for unique queue/exchange names: name('q') -> 'rilltest.q.<hex>'."""
    return uniq


def with_params(url: str, **query) -> str:
    """The URL with extra pika URLParameters query options (heartbeat=..., etc)."""
    sep = "&" if "?" in url else "?"
    return url + sep + urllib.parse.urlencode(query) if query else url


@pytest.fixture
def connect(amqp_url):
    """Factory for pika BlockingConnections, all closed at teardown."""
    opened: list[pika.BlockingConnection] = []

    def _connect(url: str | None = None, **query) -> pika.BlockingConnection:
        params = pika.URLParameters(with_params(url or amqp_url, **query))
        conn = pika.BlockingConnection(params)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        try:
            if conn.is_open:
                conn.close()
        except Exception:
            pass


@pytest.fixture
def conn(connect) -> pika.BlockingConnection:
    return connect()


@pytest.fixture
def ch(conn):
    return conn.channel()


def drain(ch, queue: str, limit: int = 10_000) -> list:
    """All messages currently in `queue` via basic.get with auto-ack: [(method, props, body)]."""
    out = []
    for _ in range(limit):
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((method, props, body))
    return out


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, conn=None) -> bool:
    """Poll until predicate() is true; pumps pika I/O if `conn` is given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if conn is not None:
            conn.process_data_events(time_limit=interval)
        else:
            time.sleep(interval)
    return predicate()


def message_count(connect, queue: str) -> int:
    """Ready-message count of `queue` via a passive declare on a throwaway connection."""
    c = connect()
    try:
        return c.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        c.close()


SIGTERM = signal.SIGTERM


@contextlib.contextmanager
def channel_closed(code: int, text: str | None = None):
    """Expect the block to end with the broker closing the channel (code, exact text)."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        yield exc
    assert (exc.value.reply_code, exc.value.reply_text) == (code, text if text is not None else exc.value.reply_text)


@contextlib.contextmanager
def connection_closed(code: int, text: str | None = None):
    """Expect the block to end with the broker closing the connection (code, exact text)."""
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as exc:
        yield exc
    assert (exc.value.reply_code, exc.value.reply_text) == (code, text if text is not None else exc.value.reply_text)


def ready(ch, queue: str) -> int:
    """Ready-message count via a passive declare on `ch`.

    RabbitMQ does not order a queue's statistics with publishes still in flight, so
    tests assert on counts through `wait_until(lambda: ready(ch, q) == n)`.
    """
    return ch.queue_declare(queue, passive=True).method.message_count


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    """A private RabbitMQ node for the module's tests (the jobs' interop against it)."""
    import rabbitnode  # here: it imports this module's helpers

    if not rabbitnode.available():
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is not installed (scripts/test.sh installs it)")
        pytest.skip("rabbitmq-server is not installed")
    node = rabbitnode.RabbitNode(tmp_path_factory.mktemp("rabbitmq")).start()
    yield node
    node.stop()
