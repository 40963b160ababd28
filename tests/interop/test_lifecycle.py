"""Whole-broker lifecycle: the tutorial scripts on port 5672, shutdown, many connections."""

import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pika
import pika.exceptions
import pytest

from conftest import REFERENCE_URL, port_open, start_rill, uniq, wait_until

TUTORIAL = pathlib.Path(__file__).parent / "tutorial"


def reference_on_5672() -> bool:
    if not REFERENCE_URL:
        return False
    u = urllib.parse.urlparse(REFERENCE_URL)
    return u.hostname in ("127.0.0.1", "localhost") and (u.port or 5672) == 5672


@pytest.fixture
def broker_on_5672(tmp_path):
    """A broker on localhost:5672, where the unmodified tutorial scripts connect."""
    if REFERENCE_URL:
        if not reference_on_5672():
            pytest.skip("needs a broker on localhost:5672 (AMQP_TEST_URL points elsewhere)")
        yield None
        return
    if port_open(5672):
        pytest.skip("port 5672 is busy")
    broker = start_rill(tmp_path, port=5672)
    yield broker
    broker.kill()


class LineReader:
    """Reads a child's stdout on a thread so the test can wait for lines with a timeout."""

    def __init__(self, proc):
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line == text:
                return
        raise AssertionError(f"never saw {text!r}; got {self.seen!r}")


def run_script(name: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # so receive.py's prints reach us promptly
    return subprocess.Popen(
        [sys.executable, str(TUTORIAL / name)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, cwd=TUTORIAL, **kw,
    )


def test_tutorial_send_and_receive_unmodified(broker_on_5672):
    # Start clean in reference mode (an earlier run may have left 'hello' behind).
    with pika.BlockingConnection(pika.ConnectionParameters("localhost")) as c:
        c.channel().queue_delete("hello")

    send = run_script("send.py")
    out, _ = send.communicate(timeout=20)
    assert send.returncode == 0, out

    receive = run_script("receive.py")
    try:
        reader = LineReader(receive)
        reader.expect(" [*] Waiting for messages. To exit press CTRL+C")
        reader.expect(" [x] Received b'Hello World!'")   # the message sent before it started
        send = run_script("send.py")
        out, _ = send.communicate(timeout=20)
        assert send.returncode == 0, out
        reader.expect(" [x] Received b'Hello World!'")   # and one sent while it consumes
        receive.send_signal(signal.SIGINT)
        reader.expect("Interrupted")
        assert receive.wait(timeout=15) == 0
    finally:
        if receive.poll() is None:
            receive.kill()
            receive.wait()
    with pika.BlockingConnection(pika.ConnectionParameters("localhost")) as c:
        ch = c.channel()
        assert ch.queue_declare("hello", passive=True).method.message_count == 0
        ch.queue_delete("hello")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_closes_connections_with_320(fresh_broker, sig):
    conns = [pika.BlockingConnection(pika.URLParameters(fresh_broker.url)) for _ in range(3)]
    for c in conns:
        c.channel().queue_declare("", exclusive=True)
    fresh_broker.signal(sig)
    for c in conns:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as exc:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                c.process_data_events(time_limit=0.1)
        assert exc.value.reply_code == 320
        assert exc.value.reply_text == "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    assert fresh_broker.wait(timeout=15) == 0


def test_client_close_and_reconnect(amqp_url):
    for _ in range(20):
        c = pika.BlockingConnection(pika.URLParameters(amqp_url))
        c.channel().queue_declare("", exclusive=True)
        c.close()
        assert c.is_closed


def test_many_connections(amqp_url):
    conns = [pika.BlockingConnection(pika.URLParameters(amqp_url)) for _ in range(50)]
    try:
        q = uniq("many")
        first = conns[0].channel()
        first.queue_declare(q, auto_delete=False)
        for i, c in enumerate(conns):
            c.channel().basic_publish("", q, str(i).encode())
        assert wait_until(lambda: first.queue_declare(q, passive=True).method.message_count == 50)
        first.queue_delete(q)
    finally:
        for c in conns:
            c.close()


def test_connection_blocked_capability_accepted(amqp_url):
    # pika announces connection.blocked in its client capabilities; with a blocked-connection
    # timeout and callbacks registered, the connection works normally while unblocked.
    params = pika.URLParameters(amqp_url + "?blocked_connection_timeout=10")
    c = pika.BlockingConnection(params)
    events = []
    c.add_on_connection_blocked_callback(lambda *a: events.append("blocked"))
    c.add_on_connection_unblocked_callback(lambda *a: events.append("unblocked"))
    ch = c.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"x")
    assert ch.basic_get(q, auto_ack=True)[2] == b"x"
    assert events == []
    assert c._impl.server_properties["capabilities"]["connection.blocked"] is True
    c.close()


def test_broker_survives_abrupt_client_disconnect(amqp_url):
    c = pika.BlockingConnection(pika.URLParameters(amqp_url))
    q = uniq("abrupt")
    ch = c.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"x")
    ch.basic_get(q)  # unacked
    c._impl._transport._sock.close()  # no connection.close: just drop the socket
    c2 = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch2 = c2.channel()
    assert wait_until(lambda: ch2.queue_declare(q, passive=True).method.message_count == 1)
    m, _, body = ch2.basic_get(q, auto_ack=True)
    assert body == b"x" and m.redelivered
    ch2.queue_delete(q)
    c2.close()
