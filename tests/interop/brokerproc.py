"""Brokers a test may kill -9, stop and restart, and a pipelined confirming publisher.

The durability tests (test_durability.py) restart the broker on the same port and
data dir. They run against Rill by default. To check that their expectations are
RabbitMQ's, set ``RABBITMQ_SH`` to ``/work/shared/bench/rabbitmq.sh``: each test then
starts a private RabbitMQ node of its own (under the test's tmp dir, on a free
port), kills its ``beam.smp`` with SIGKILL for crash tests and restarts it::

    RABBITMQ_SH=/work/shared/bench/rabbitmq.sh \\
        .venv/bin/python -m pytest tests/interop/test_durability.py

Both kinds offer the same small interface: ``url``, ``port``, ``pid``, ``start()``
(again on the same port and data), ``kill()`` (SIGKILL), ``stop()`` (clean),
``log_text()``.
"""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import subprocess
import threading
import time
from typing import Callable

import pika
import pika.exceptions
import pika.spec
import pytest

from conftest import RillProcess, _running, free_port, port_open

RABBITMQ_SH = os.environ.get("RABBITMQ_SH")
RABBITMQ_START_TIMEOUT = 120.0


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in bytes."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), f"process {pid} still alive {timeout}s after SIGKILL"


class RillBroker:
    """`rill server` on a fixed port and data dir, restartable (wraps conftest.RillProcess)."""

    kind = "rill"

    def __init__(self, tmp: pathlib.Path, extra_args: list[str] | None = None):
        data_dir = tmp / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = RillProcess(free_port(), data_dir, tmp / "rill.stderr.log",
                                extra_args=list(extra_args or []))

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def http_url(self) -> str:
        """The management HTTP API."""
        return self.proc.http_url

    @property
    def data_dir(self) -> pathlib.Path:
        return self.proc.data_dir

    @property
    def extra_args(self) -> list[str]:
        return self.proc.extra_args

    @extra_args.setter
    def extra_args(self, args: list[str]) -> None:
        self.proc.extra_args = list(args)

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def start(self) -> "RillBroker":
        self.proc.start()
        return self

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        self.proc.kill()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (a clean shutdown); returns the exit code."""
        self.proc.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.kill()  # closes the log; no-op on an exited process

    def log_text(self) -> str:
        try:
            return self.proc.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.proc.kill()


class RabbitBroker:
    """A private RabbitMQ node driven by rabbitmq.sh (reference mode for the durability tests)."""

    kind = "rabbitmq"

    def __init__(self, tmp: pathlib.Path, extra_args: list[str] | None = None):
        assert RABBITMQ_SH
        self.script = RABBITMQ_SH
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = tmp / "rmq"
        self.data_dir = self.dir
        self.extra_args = list(extra_args or [])  # Rill flags: ignored here
        self._pid: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def pid(self) -> int:
        assert self._pid is not None
        return self._pid

    def _run(self, *args: str, timeout: float = RABBITMQ_START_TIMEOUT) -> str:
        env = dict(os.environ, DIST_PORT=str(self.dist_port))
        res = subprocess.run([self.script, *args], capture_output=True, text=True,
                             timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            pytest.fail(f"rabbitmq.sh {' '.join(args)} failed ({res.returncode}):\n"
                        f"{res.stdout}\n{res.stderr}", pytrace=False)
        return res.stdout

    def start(self) -> "RabbitBroker":
        # A SIGKILLed node leaves its pid files behind; `start` would wait on them.
        for f in ("rabbit.pid", "wrapper.pid"):
            (self.dir / f).unlink(missing_ok=True)
        self._run("start", str(self.port), str(self.dir))
        self._pid = int((self.dir / "rabbit.pid").read_text().strip())
        if self not in _running:
            _running.append(self)
        return self

    def ctl(self, *args: str) -> str:
        return self._run("ctl", str(self.dir), *args, timeout=60)

    def kill(self) -> None:
        if self._pid is not None and pid_alive(self._pid):
            os.kill(self._pid, signal.SIGKILL)
            wait_dead(self._pid)
        try:
            wrapper = int((self.dir / "wrapper.pid").read_text().strip())
            os.kill(wrapper, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        self._pid = None
        if self in _running:
            _running.remove(self)

    def stop(self, timeout: float = 60.0) -> int:
        self._run("stop", str(self.dir), timeout=timeout)
        self._pid = None
        if self in _running:
            _running.remove(self)
        return 0

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.dir / "log").glob("*.log")))

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        if self._pid is not None:
            try:
                self.stop()
            except BaseException:
                self.kill()


def new_broker(tmp: pathlib.Path, extra_args: list[str] | None = None):
    """A not yet started broker of the configured kind."""
    return (RabbitBroker if RABBITMQ_SH else RillBroker)(tmp, extra_args)


# --------------------------------------------------------------------------- publishing


def numbered_body(n: int, size: int) -> bytes:
    head = b"%010d" % n
    return head + b"." * max(0, size - len(head))


def body_number(body: bytes) -> int:
    return int(body[:10])


PERSISTENT = pika.BasicProperties(delivery_mode=2)


class ConfirmingPublisher(threading.Thread):
    """Publishes numbered messages with confirms, keeping up to `window` unconfirmed.

    Runs a pika SelectConnection on its own thread so confirms are pipelined (the
    broker can group-commit them) and the test thread is free to kill the broker.
    Message n has body ``numbered_body(n, body_size)`` (or ``body(n)`` if `body` is given)
    and properties `properties`, or `properties(n)` if that is callable. Stops after `count` messages
    are confirmed, when `stop()` is called, or when the connection drops (a killed
    broker): `confirmed`/`nacked` hold the numbers the broker settled by then.
    """

    def __init__(self, url: str, routing_key: str, *, first: int = 0, count: int | None = None,
                 window: int = 256, body_size: int = 32, exchange: str = "",
                 properties: pika.BasicProperties | Callable[[int], pika.BasicProperties] = PERSISTENT,
                 body: Callable[[int], bytes] | None = None):
        super().__init__(daemon=True)
        self.body = body
        self.url, self.routing_key, self.exchange = url, routing_key, exchange
        self.next, self.end = first, None if count is None else first + count
        self.window, self.body_size, self.properties = window, body_size, properties
        self.confirmed: set[int] = set()
        self.nacked: set[int] = set()
        self.published = 0
        self.error: BaseException | None = None
        self.opened = threading.Event()
        self._pending: "collections.OrderedDict[int, int]" = collections.OrderedDict()
        self._tag = 0
        self._stopping = False
        self._conn: pika.SelectConnection | None = None
        self._ch = None

    # -- test thread
    def stop(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(self._close)
            except Exception:
                pass

    def finish(self, timeout: float) -> None:
        """Join within `timeout`, stopping the publisher if it is still running."""
        self.join(timeout)
        if self.is_alive():
            self.stop()
            self.join(10)
        assert not self.is_alive(), "publisher thread did not stop"

    # -- publisher thread
    def run(self) -> None:
        params = pika.URLParameters(self.url)
        params.connection_attempts = 1
        params.socket_timeout = 10
        params.blocked_connection_timeout = None
        try:
            self._conn = pika.SelectConnection(
                params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_close,
            )
            self._conn.ioloop.start()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e

    def _on_open(self, conn) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn, err) -> None:
        self.error = err
        conn.ioloop.stop()

    def _on_close(self, conn, reason) -> None:
        if not self._stopping:
            self.error = reason
        conn.ioloop.stop()

    def _on_channel(self, ch) -> None:
        self._ch = ch
        ch.confirm_delivery(self._on_confirm, callback=lambda _frame: self._on_select_ok())

    def _on_select_ok(self) -> None:
        self.opened.set()
        self._fill()

    def _fill(self) -> None:
        while not self._stopping and len(self._pending) < self.window and (self.end is None or self.next < self.end):
            n = self.next
            self.next += 1
            self._tag += 1
            self._pending[self._tag] = n
            props = self.properties(n) if callable(self.properties) else self.properties
            body = self.body(n) if self.body is not None else numbered_body(n, self.body_size)
            self._ch.basic_publish(self.exchange, self.routing_key, body, props)
            self.published += 1
        if self.end is not None and self.next >= self.end and not self._pending:
            self._close()

    def _on_confirm(self, frame) -> None:
        m = frame.method
        into = self.confirmed if isinstance(m, pika.spec.Basic.Ack) else self.nacked
        if m.multiple:
            while self._pending and next(iter(self._pending)) <= m.delivery_tag:
                into.add(self._pending.popitem(last=False)[1])
        elif m.delivery_tag in self._pending:
            into.add(self._pending.pop(m.delivery_tag))
        self._fill()

    def _close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        elif self._conn is not None:
            self._conn.ioloop.stop()


def publish_confirmed(url: str, queue: str, count: int, *, first: int = 0, body_size: int = 32,
                      window: int = 256, timeout: float = 60.0, exchange: str = "",
                      properties: pika.BasicProperties = PERSISTENT,
                      body: Callable[[int], bytes] | None = None) -> ConfirmingPublisher:
    """Publish `count` numbered messages (or ``body(n)``) and wait until every one is
    confirmed (acked)."""
    pub = ConfirmingPublisher(url, queue, first=first, count=count, window=window,
                              body_size=body_size, exchange=exchange, properties=properties,
                              body=body)
    pub.start()
    pub.finish(timeout)
    assert pub.error is None, f"publisher failed: {pub.error!r}"
    assert not pub.nacked, f"broker nacked {len(pub.nacked)} messages"
    assert len(pub.confirmed) == count, f"{len(pub.confirmed)} of {count} confirmed"
    return pub


def wait_port_closed(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not port_open(port)
