"""Stream jobs over queues: the built-in wordcount standalone (`rill job run`, over TCP)
and embedded (`rill server --job`), against Rill and against a real RabbitMQ; clean stops,
bad input, refusals and exit codes, reconnection, backpressure, job files.

These start their own brokers and jobs, so they run in Rill mode only (the RabbitMQ
comparison starts a private RabbitMQ node of its own).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import threading
import time

import pika
import pytest

import brokerproc
from brokerproc import ConfirmingPublisher, proc_status, publish_confirmed
from conftest import REFERENCE_URL, RillProcess, free_port, rill_bin, uniq
from jobproc import (
    JobProcess, check_exact, drain_counts, expected_counts, queue_counts, wait_for_consumer,
    wait_for_messages, wc_line,
)

pytestmark = pytest.mark.skipif(
    bool(REFERENCE_URL), reason="starts rill servers and jobs itself: Rill mode only")

PERSISTENT = pika.BasicProperties(delivery_mode=2)
WORDS_100K = 20_000  # messages of 5 words


def lines(n: int, **kw) -> list[str]:
    return [wc_line(i, **kw) for i in range(n)]


def publish_lines(url: str, queue: str, text: list[str]) -> None:
    publish_confirmed(url, queue, len(text), window=512, timeout=120,
                      body=lambda n: text[n].encode())


def declare(url: str, queue: str, durable: bool = True, arguments: dict | None = None) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as c:
        c.channel().queue_declare(queue=queue, durable=durable, arguments=arguments)


def start_rill(tmp: pathlib.Path, *args: str) -> RillProcess:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    return RillProcess(free_port(), data, tmp / "rill.log", extra_args=list(args)).start()


def job_file(tmp: pathlib.Path, text: str) -> pathlib.Path:
    p = tmp / "job.toml"
    p.write_text(text)
    return p


@pytest.fixture
def rill(tmp_path):
    broker = start_rill(tmp_path / "rill")
    yield broker
    broker.kill()


@pytest.fixture
def jobs(tmp_path):
    """Factory for `rill job run wordcount` processes, all killed at teardown."""
    started: list[JobProcess] = []

    def _job(url: str, source: str, sink: str, *extra: str) -> JobProcess:
        j = JobProcess.wordcount(url, source, sink, tmp_path / f"job{len(started)}.log", *extra)
        started.append(j)
        return j

    yield _job
    for j in started:
        j.kill()


def run_wordcount_100k(url: str, job, tmp_path) -> None:
    src, out = uniq("in"), uniq("out")
    text = lines(WORDS_100K)
    expected = expected_counts(text)
    assert sum(expected.values()) == 100_000
    j = job(url, src, out)
    wait_for_consumer(url, src)
    publish_lines(url, src, text)
    counts = drain_counts(url, out, expect=100_000, timeout=300)
    check_exact(counts, expected)
    assert j.stop() == 0, j.log_text()[-3000:]
    # Nothing beyond one message per occurrence, and the input is all consumed.
    assert drain_counts(url, out, idle=0.5) == {}
    assert queue_counts(url, src)[0] == 0


@pytest.mark.timeout(300)
def test_standalone_wordcount_over_tcp_counts_100k_words(rill, jobs, tmp_path):
    run_wordcount_100k(rill.url, jobs, tmp_path)


@pytest.mark.timeout(300)
def test_embedded_wordcount_counts_100k_words(tmp_path):
    src, out = uniq("in"), uniq("out")
    jf = job_file(tmp_path, f'name = "wc"\njob = "wordcount"\nsource_queue = "{src}"\n'
                            f'sink_queue = "{out}"\ncheckpoint_interval_ms = 1000\nparallelism = 1\n')
    broker = start_rill(tmp_path / "rill", "--job", str(jf))
    try:
        wait_for_consumer(broker.url, src)
        # Declared by the job as durable classic queues; with checkpoints (this job file has
        # an interval) the sink queue deduplicates. Redeclaring equivalently succeeds.
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as c:
            ch = c.channel()
            ch.queue_declare(queue=src, durable=True, passive=False)
            ch.queue_declare(queue=out, durable=True, passive=False, arguments={
                "x-message-deduplication": True, "x-cache-size": 1_000_000,
                "x-cache-ttl": 3_600_000})
        text = lines(WORDS_100K)
        publish_lines(broker.url, src, text)
        counts = drain_counts(broker.url, out, expect=100_000, timeout=300)
        check_exact(counts, expected_counts(text))
        assert "job started" in broker.tail(200)
        # SIGTERM: the broker stops the job (cleanly) before it closes.
        broker.signal(signal.SIGTERM)
        assert broker.wait(30) == 0
        log = broker.log_path.read_text(errors="replace")
        assert "job stopped" in log, log[-3000:]
    finally:
        broker.kill()


@pytest.mark.timeout(300)
def test_embedded_wordcount_at_parallelism_2(tmp_path):
    src, out = uniq("in"), uniq("out")
    jf = job_file(tmp_path, f'name = "wc2"\njob = "wordcount"\nsource_queue = "{src}"\n'
                            f'sink_queue = "{out}"\nparallelism = 2\n')
    broker = start_rill(tmp_path / "rill", "--job", str(jf))
    try:
        wait_for_consumer(broker.url, src)
        text = lines(4000)
        publish_lines(broker.url, src, text)
        counts = drain_counts(broker.url, out, expect=20_000, timeout=200)
        # Two competing consumers: each word's counts are still 1..n, in order (a word
        # lives on one worker, whose publisher keeps its order).
        check_exact(counts, expected_counts(text))
    finally:
        broker.kill()


@pytest.mark.timeout(300)
def test_standalone_wordcount_against_rabbitmq(rabbitmq, jobs, tmp_path):
    run_wordcount_100k(rabbitmq.url, jobs, tmp_path)


@pytest.mark.timeout(120)
def test_sigterm_acks_what_was_consumed_and_confirms_what_was_produced(rill, jobs):
    """Stop mid-stream: every input message is either still in IN, untouched, or fully
    counted in OUT; nothing is half done, lost or doubled."""
    src, out = uniq("in"), uniq("out")
    text = lines(10_000)
    declare(rill.url, src)
    publish_lines(rill.url, src, text)
    j = jobs(rill.url, src, out, "--prefetch", "100")
    assert wait_for_messages(rill.url, out, 500, timeout=60) >= 500
    assert j.stop() == 0, j.log_text()[-3000:]
    left = queue_counts(rill.url, src)[0]
    consumed = len(text) - left
    assert 0 < consumed < len(text) or consumed == len(text)
    counts = drain_counts(rill.url, out, idle=1.0)
    # What the job consumed is the head of IN (one consumer, in order).
    check_exact(counts, expected_counts(text[:consumed]))


@pytest.mark.timeout(60)
def test_bad_input_skip_acks_and_counts_it(rill, jobs):
    src, out = uniq("in"), uniq("out")
    declare(rill.url, src)
    j = jobs(rill.url, src, out, "--bad-input", "skip")
    wait_for_consumer(rill.url, src)
    with pika.BlockingConnection(pika.URLParameters(rill.url)) as c:
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", src, "one two", PERSISTENT)
        ch.basic_publish("", src, b"\xff\xfe not utf-8", PERSISTENT)
        ch.basic_publish("", src, "two", PERSISTENT)
    counts = drain_counts(rill.url, out, expect=3, timeout=30)
    assert counts == {"one": [1], "two": [1, 2]}
    assert j.alive()
    assert j.stop() == 0
    assert queue_counts(rill.url, src)[0] == 0
    assert "bad input" in j.log_text()


@pytest.mark.timeout(60)
def test_bad_input_dead_letter_goes_to_the_dlx(rill, jobs):
    src, out, dlq = uniq("in"), uniq("out"), uniq("dlq")
    declare(rill.url, dlq)
    declare(rill.url, src, arguments={"x-dead-letter-exchange": "",
                                      "x-dead-letter-routing-key": dlq})
    j = jobs(rill.url, src, out, "--bad-input", "dead-letter")
    wait_for_consumer(rill.url, src)
    with pika.BlockingConnection(pika.URLParameters(rill.url)) as c:
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", src, b"\xc3\x28", PERSISTENT)
        ch.basic_publish("", src, "ok", PERSISTENT)
    assert drain_counts(rill.url, out, expect=1, timeout=30) == {"ok": [1]}
    assert wait_for_messages(rill.url, dlq, 1, timeout=10) == 1
    with pika.BlockingConnection(pika.URLParameters(rill.url)) as c:
        method, props, body = c.channel().basic_get(dlq, auto_ack=True)
        assert body == b"\xc3\x28"
        assert props.headers["x-death"][0]["reason"] == "rejected"
    assert j.stop() == 0


@pytest.mark.timeout(60)
def test_bad_input_fail_stops_with_a_clear_error_and_keeps_the_message(rill, jobs):
    src, out = uniq("in"), uniq("out")
    declare(rill.url, src)
    j = jobs(rill.url, src, out)  # fail is the default
    wait_for_consumer(rill.url, src)
    with pika.BlockingConnection(pika.URLParameters(rill.url)) as c:
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", src, b"\xff", PERSISTENT)
    assert j.wait(30) == 5
    log = j.log_text()
    assert f"bad input in queue '{src}'" in log and "not UTF-8" in log, log[-2000:]
    # Not acked: the message is back in the queue for whoever fixes the job.
    assert queue_counts(rill.url, src)[0] == 1


@pytest.mark.timeout(60)
def test_refusals_give_clear_errors_and_exit_codes(rill, jobs, tmp_path):
    src, out = uniq("in"), uniq("out")
    bad_password = rill.url.replace("guest:guest", "guest:wrong")
    j = jobs(bad_password, src, out)
    assert j.wait(30) == 3
    assert "403 ACCESS_REFUSED" in j.log_text(), j.log_text()[-2000:]
    no_vhost = rill.url.replace("%2F", "nope")
    j = jobs(no_vhost, src, out)
    assert j.wait(30) == 3
    assert "530 NOT_ALLOWED" in j.log_text(), j.log_text()[-2000:]
    j = jobs(rill.url, src, out, "--no-declare")
    assert j.wait(30) == 4
    assert f"queue '{src}'" in j.log_text() and "404 NOT_FOUND" in j.log_text(), j.log_text()[-2000:]


@pytest.mark.timeout(120)
def test_a_refused_permission_is_a_clear_error_against_rabbitmq(rabbitmq, jobs):
    """Rill has no per-user permissions yet; RabbitMQ refuses a user without configure
    rights the declaration of the job's queue (403)."""
    user = f"bob{free_port()}"
    rabbitmq.ctl("add_user", user, "secret")
    rabbitmq.ctl("set_permissions", "-p", "/", user, "^$", ".*", ".*")
    url = rabbitmq.url.replace("guest:guest", f"{user}:secret")
    j = jobs(url, uniq("in"), uniq("out"))
    assert j.wait(60) == 3
    assert "403 ACCESS_REFUSED" in j.log_text(), j.log_text()[-2000:]


@pytest.mark.timeout(120)
def test_standalone_job_survives_its_broker_being_killed(tmp_path, jobs, make_broker):
    broker = make_broker()
    src, out = uniq("in"), uniq("out")
    j = jobs(broker.url, src, out)
    wait_for_consumer(broker.url, src)
    publish_lines(broker.url, src, ["before the crash"])
    assert drain_counts(broker.url, out, expect=3, timeout=30) == {
        "before": [1], "the": [1], "crash": [1]}
    broker.kill()
    time.sleep(1.0)  # the job sees the connection go and backs off
    assert j.alive(), "the job exited when its broker went away"
    broker.start()
    wait_for_consumer(broker.url, src, timeout=60)
    publish_lines(broker.url, src, ["after the crash"])
    assert wait_for_messages(broker.url, out, 3, timeout=30) >= 3
    counts = drain_counts(broker.url, out, idle=1.0)
    # The job kept its counts across the broker's crash. Acks not yet on the broker's disk
    # when it died come back (the job's input and our reads of OUT alike): at-least-once
    # may repeat a count, never lose one.
    assert counts["after"] == [1], counts
    assert max(counts["the"]) >= 2 and max(counts["crash"]) >= 2, counts
    assert j.stop() == 0
    assert "reconnect" in j.log_text().lower() or "connection" in j.log_text().lower()


@pytest.mark.timeout(180)
def test_backpressure_a_slow_job_holds_only_its_window(rill, jobs):
    """A job far slower than its producer: 200 words a message, each a confirmed
    persistent publish. The producer is never held back (no alarm, no flow control: it
    publishes everything at its own pace); the job holds at most its prefetch window of
    unacked deliveries; the backlog pages out, so the broker's memory stays within its
    paging window plus a bound."""
    src, out = uniq("in"), uniq("out")
    prefetch = 50
    declare(rill.url, src)
    declare(rill.url, out)
    pid = rill.proc.pid
    rss_before = proc_status(pid)["VmRSS"]
    j = jobs(rill.url, src, out, "--prefetch", str(prefetch))
    wait_for_consumer(rill.url, src)
    n = 30_000
    body = " ".join(f"w{k}" for k in range(200)).encode()  # ~1 KiB
    pub = ConfirmingPublisher(rill.url, src, count=n, window=512, body=lambda _i: body)
    pub.start()
    peak_held = 0
    rss_peak = rss_before
    while pub.is_alive():
        # Held = delivered - acked <= delivered - processed. Read in this order, each
        # figure errs low: confirmed (in IN by now) <= arrived by the next read, and
        # outputs (processed, as whole input messages) only grow after it.
        confirmed = len(pub.confirmed)
        ready = queue_counts(rill.url, src)[0]
        done_msgs = queue_counts(rill.url, out)[0] // 200
        peak_held = max(peak_held, confirmed - ready - done_msgs)
        rss_peak = max(rss_peak, proc_status(pid)["VmRSS"])
        time.sleep(0.2)
    pub.finish(120)
    assert pub.error is None and len(pub.confirmed) == n
    processed = queue_counts(rill.url, out)[0] // 200
    # The producer finished long before the job could: it was not held to the job's pace.
    assert processed < n // 2, f"job processed {processed} of {n}: not slow enough to test"
    # The window, plus the one input message whose 200 outputs may be half published.
    assert peak_held <= prefetch + 1, f"job held {peak_held} deliveries (prefetch {prefetch})"
    # ~30 MB of backlog; bodies beyond the queue's 4 MiB window live on disk. The bound:
    # 64 MiB over the broker's RSS before the backlog (indexes, buffers, OUT's window).
    assert rss_peak - rss_before < 64 * 1024 * 1024, (
        f"broker RSS grew by {(rss_peak - rss_before) >> 20} MiB")
    assert j.alive()
    assert j.stop(timeout=120) == 0


def test_malformed_job_file_names_the_key_and_line(tmp_path):
    jf = job_file(tmp_path, 'name = "wc"\njob = "wordcount"\nsource_queue = "in"\n'
                            'sink_queue = "out"\nparallelism = 0\n')
    res = subprocess.run([str(rill_bin()), "server", "--port", str(free_port()),
                          "--http-port", str(free_port()),
                          "--data-dir", str(tmp_path / "d"), "--job", str(jf)],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert f"job file {jf}, line 5: key `parallelism`: must be at least 1" in res.stderr, res.stderr
    jf.write_text('name = "wc"\njob = "wordcount"\nsource_queue = "in"\nsink_queue = "out"\n'
                  'prefech = 10\n')
    res = subprocess.run([str(rill_bin()), "server", "--port", str(free_port()),
                          "--http-port", str(free_port()),
                          "--data-dir", str(tmp_path / "d"), "--job", str(jf)],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert "line 5" in res.stderr and "prefech" in res.stderr, res.stderr


def example_bin(name: str) -> pathlib.Path:
    path = rill_bin().parent / "examples" / name
    if not path.exists():
        pytest.fail(f"{path} not built: cargo build -p rill-jobs --example {name}", pytrace=False)
    return path


def order_totals_check(url: str) -> None:
    """Orders every 500 ms of event time for 30 s, three items; the windows [0, 10 s) and
    [10 s, 20 s) fire (the watermark trails the newest order by 2 s), [20 s, 30 s) not yet."""
    import json
    items = ["tea", "cake", "jam"]
    orders = [{"item": items[i % 3], "amount": i, "ts": i * 500} for i in range(60)]
    declare(url, "orders")
    publish_confirmed(url, "orders", len(orders), body=lambda n: json.dumps(orders[n]).encode())
    assert wait_for_messages(url, "order-totals", 6, timeout=30) == 6
    with pika.BlockingConnection(pika.URLParameters(url)) as c:
        ch = c.channel()
        got = []
        while (m := ch.basic_get("order-totals", auto_ack=True))[0]:
            got.append(json.loads(m[2]))
    expected = []
    for start in (0, 10_000):
        for item in items:
            total = sum(o["amount"] for o in orders
                        if o["item"] == item and start <= o["ts"] < start + 10_000)
            expected.append({"item": item, "window_start": start, "window_end": start + 10_000,
                             "total": total})
    key = lambda t: (t["window_start"], t["item"])
    assert sorted(got, key=key) == sorted(expected, key=key)


@pytest.mark.timeout(60)
def test_a_job_with_its_own_main_standalone(rill, tmp_path):
    log = open(tmp_path / "example.log", "wb")
    proc = subprocess.Popen([str(example_bin("order_totals")), rill.url], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    try:
        wait_for_consumer(rill.url, "orders")
        order_totals_check(rill.url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.timeout(60)
def test_a_program_embedding_the_broker_with_its_job(tmp_path):
    port = free_port()
    log = open(tmp_path / "example.log", "wb")
    proc = subprocess.Popen([str(example_bin("order_totals")), "--embedded", str(port),
                             str(tmp_path / "data")], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=log)
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    try:
        deadline = time.monotonic() + 30
        while not brokerproc.port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "example.log").read_text()
            time.sleep(0.05)
        wait_for_consumer(url, "orders")
        order_totals_check(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.timeout(120)
def test_supervisor_restarts_a_killed_worker(rill, jobs):
    from jobproc import wait_for_workers
    src, out = uniq("in"), uniq("out")
    j = jobs(rill.url, src, out, "--restart-delay-ms", "100")
    [worker] = wait_for_workers(j.proc.pid, 1)
    wait_for_consumer(rill.url, src)
    os.kill(worker, signal.SIGKILL)
    [again] = wait_for_workers(j.proc.pid, 1, other_than=[worker])
    assert again != worker
    wait_for_consumer(rill.url, src)
    publish_lines(rill.url, src, ["still counting"])
    assert drain_counts(rill.url, out, expect=2, timeout=30) == {"still": [1], "counting": [1]}
    assert j.stop() == 0
    assert "restarting all workers" in j.log_text(), j.log_text()[-3000:]


@pytest.mark.timeout(120)
def test_workers_stop_when_their_supervisor_is_killed(rill, jobs):
    from jobproc import wait_for_workers
    from brokerproc import pid_alive, wait_dead
    src, out = uniq("in"), uniq("out")
    j = jobs(rill.url, src, out)
    [worker] = wait_for_workers(j.proc.pid, 1)
    wait_for_consumer(rill.url, src)
    j.proc.kill()
    j.proc.wait(10)
    wait_dead(worker, timeout=30)
    assert not pid_alive(worker)


@pytest.mark.timeout(300)
def test_a_two_process_job_counts_exactly_and_restarts_together(rill, jobs):
    from jobproc import wait_for_workers
    src, out = uniq("in"), uniq("out")
    j = jobs(rill.url, src, out, "--processes", "2", "--parallelism", "2",
             "--restart-delay-ms", "100")
    workers = wait_for_workers(j.proc.pid, 2)
    wait_for_consumer(rill.url, src)
    text = lines(2000)
    publish_lines(rill.url, src, text)
    # Two processes, one timely cluster: each word on one worker, counts exact.
    check_exact(drain_counts(rill.url, out, expect=10_000, timeout=200), expected_counts(text))
    os.kill(workers[1], signal.SIGKILL)
    # The other cannot go on alone: both are replaced.
    wait_for_workers(j.proc.pid, 2, other_than=workers, timeout=60)
    assert j.stop() == 0, j.log_text()[-3000:]
