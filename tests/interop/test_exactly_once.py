"""Exactly-once results from queue to queue, through kill -9 of the job and of the broker.

> For every input message in a queue, the job's output in another queue reflects it
> exactly once, across any number of kill -9 of the job's processes or of the broker.

The built-in wordcount with checkpoints: input is still being published while the job and
the broker are killed at random moments; at the end, for every word w seen n_w times, the
output queue holds exactly one message for each count 1..n_w, and nothing else.

Input messages carry ids (`message_id`, and `x-deduplication-header` for the input queue's
own deduplication of a producer's retries), which is what lets the job recognise a delivery
it already took into account when its ack was lost in a crash (docs/exactly-once.md).

Against RabbitMQ, which has no deduplication, the guarantee is at-least-once: no count is
missing, and a repeated count carries the same message_id as its first copy.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import pika
import pika.exceptions
import pytest

from conftest import REFERENCE_URL, RillProcess, free_port, uniq
from jobproc import (
    JobProcess, check_at_least_once, check_exact, expected_counts, queue_counts,
    wait_for_workers, wc_line,
)

pytestmark = pytest.mark.skipif(
    bool(REFERENCE_URL), reason="kills and restarts brokers and jobs itself: Rill mode only")

MESSAGES = 20_000  # x 5 words = 100k words
DEDUP_IN = {"x-message-deduplication": True, "x-cache-size": 200_000}


class ResilientPublisher(threading.Thread):
    """Publishes `texts` in order with confirms, each with a stable id; when the broker
    goes away it reconnects and publishes again whatever was not confirmed (so the input
    queue may get a message twice: its deduplication, keyed on the id, drops the copy).
    Publishes are mandatory: a message published before the job has declared its queue
    comes back (pika raises UnroutableError) and is sent again, where RabbitMQ would
    otherwise confirm it and drop it silently."""

    def __init__(self, url_fn, queue: str, texts: list[str], run_id: str):
        super().__init__(daemon=True)
        self.url_fn, self.queue, self.texts, self.run_id = url_fn, queue, texts, run_id
        self.confirmed = 0
        self.error: BaseException | None = None
        self.reconnects = 0

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while self.confirmed < len(self.texts) and time.monotonic() < deadline:
            try:
                with pika.BlockingConnection(pika.URLParameters(self.url_fn())) as c:
                    ch = c.channel()
                    ch.confirm_delivery()
                    while self.confirmed < len(self.texts):
                        i = self.confirmed
                        mid = f"{self.run_id}-{i}"
                        ch.basic_publish("", self.queue, self.texts[i].encode(),
                                         pika.BasicProperties(
                                             delivery_mode=2, message_id=mid,
                                             headers={"x-deduplication-header": mid}),
                                         mandatory=True)
                        self.confirmed += 1
            except (pika.exceptions.AMQPError, OSError):
                self.reconnects += 1
                time.sleep(0.2)
            except BaseException as e:  # noqa: BLE001 - reported to the test thread
                self.error = e
                return


def drain_all(url: str, queue: str, idle: float = 2.0) -> tuple[dict[str, list[int]], dict]:
    """Every message in `queue`: counts per word in arrival order, and message ids per
    (word, count)."""
    counts: dict[str, list[int]] = collections.defaultdict(list)
    ids: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
    dedup: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    with pika.BlockingConnection(pika.URLParameters(url)) as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=5000)
        n = 0
        for method, props, body in ch.consume(queue, inactivity_timeout=idle):
            if method is None:
                # A pause in deliveries (a loaded broker reading its queue back from disk)
                # is not the end: stop only once nothing is left to deliver.
                if queue_counts(url, queue)[0] == 0:
                    break
                continue
            m = json.loads(body)
            counts[m["word"]].append(m["count"])
            ids[(m["word"], m["count"])].add(props.message_id)
            dedup[(m["word"], m["count"])].append((props.headers or {}).get("x-deduplication-header"))
            n += 1
            if n % 1000 == 0:
                ch.basic_ack(method.delivery_tag, multiple=True)
        ch.cancel()
    for k, v in dedup.items():
        if len(v) > 1:
            print("DUPLICATE", k, v)
    return counts, ids


def wait_drained(url_fn, queue: str, timeout: float) -> None:
    """Until `queue` is empty (the job consumed everything)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if queue_counts(url_fn(), queue)[0] == 0:
                return
        except (pika.exceptions.AMQPError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{queue} not drained after {timeout}s")


def quiesce(url: str, queue: str, settle: float = 3.0, timeout: float = 120.0) -> None:
    """Until `queue`'s depth stops changing for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = queue_counts(url, queue)[0]
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
        time.sleep(0.2)


def settled_output(pub: "ResilientPublisher", url_fn, src: str, out: str,
                   job: JobProcess | None = None) -> tuple[dict[str, list[int]], dict]:
    """After the kills: every input confirmed and consumed, OUT quiet, the job (if it runs
    standalone) stopped cleanly; then OUT's counts and ids (as `drain_all`)."""
    pub.join(600)
    assert pub.error is None and pub.confirmed == len(pub.texts), pub.error
    wait_drained(url_fn, src, timeout=300)
    quiesce(url_fn(), out)
    if job is not None:
        assert job.stop(timeout=120) == 0, job.log_text()[-4000:]
    return drain_all(url_fn(), out)


@pytest.mark.timeout(900)
def test_standalone_exactly_once_through_job_and_broker_kills(make_broker, tmp_path):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "11")))
    broker = make_broker()
    src, out = uniq("in"), uniq("out")
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as c:
        c.channel().queue_declare(src, durable=True, arguments=DEDUP_IN)
    texts = [wc_line(i) for i in range(MESSAGES)]
    job = JobProcess.wordcount(broker.url, src, out, tmp_path / "job.log",
                               "--checkpoint-dir", str(tmp_path / "ckpt"),
                               "--checkpoint-interval-ms", "300", "--restart-delay-ms", "100")
    try:
        wait_for_workers(job.proc.pid, 1)
        pub = ResilientPublisher(lambda: broker.url, src, texts, uniq("run"))
        pub.start()
        job_kills = broker_kills = 0
        while job_kills < 5 or broker_kills < 2:
            time.sleep(rng.uniform(0.5, 2.5))
            if broker_kills < 2 and (job_kills >= 2 * (broker_kills + 1) or rng.random() < 0.25):
                broker.kill()
                time.sleep(rng.uniform(0.2, 1.0))
                broker.start()
                broker_kills += 1
            else:
                workers = wait_for_workers(job.proc.pid, 1, timeout=60)
                os.kill(workers[0], signal.SIGKILL)
                wait_for_workers(job.proc.pid, 1, other_than=workers, timeout=60)
                job_kills += 1
        counts, _ = settled_output(pub, lambda: broker.url, src, out, job)
        check_exact(counts, expected_counts(texts))
    finally:
        job.kill()


@pytest.mark.timeout(900)
def test_embedded_exactly_once_through_broker_kills(tmp_path):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "7")))
    src, out = uniq("in"), uniq("out")
    jf = tmp_path / "wc.toml"
    jf.write_text(f'name = "wc"\njob = "wordcount"\nsource_queue = "{src}"\n'
                  f'sink_queue = "{out}"\ncheckpoint_interval_ms = 300\nparallelism = 1\n')
    data = tmp_path / "data"
    data.mkdir()
    broker = RillProcess(free_port(), data, tmp_path / "rill.log")
    broker.start()
    try:
        # The input queue first (deduplicating a producer's retries), then the job.
        with pika.BlockingConnection(pika.URLParameters(broker.url)) as c:
            c.channel().queue_declare(src, durable=True, arguments=DEDUP_IN)
        broker.kill()
        broker.extra_args = ["--job", str(jf)]
        broker.start()
        texts = [wc_line(i) for i in range(MESSAGES)]
        pub = ResilientPublisher(lambda: broker.url, src, texts, uniq("run"))
        pub.start()
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            broker.kill()
            broker.start()
        counts, _ = settled_output(pub, lambda: broker.url, src, out)
        check_exact(counts, expected_counts(texts))
    finally:
        broker.kill()


@pytest.mark.timeout(600)
def test_against_rabbitmq_nothing_is_lost_and_copies_keep_their_ids(rabbitmq, tmp_path):
    rng = random.Random(3)
    src, out = uniq("in"), uniq("out")
    texts = [wc_line(i) for i in range(MESSAGES // 2)]
    job = JobProcess.wordcount(rabbitmq.url, src, out, tmp_path / "job.log",
                               "--checkpoint-dir", str(tmp_path / "ckpt"),
                               "--checkpoint-interval-ms", "300", "--restart-delay-ms", "100")
    try:
        wait_for_workers(job.proc.pid, 1)
        pub = ResilientPublisher(lambda: rabbitmq.url, src, texts, uniq("run"))
        pub.start()
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.0))
            workers = wait_for_workers(job.proc.pid, 1, timeout=60)
            os.kill(workers[0], signal.SIGKILL)
            wait_for_workers(job.proc.pid, 1, other_than=workers, timeout=60)
        counts, ids = settled_output(pub, lambda: rabbitmq.url, src, out, job)
        check_at_least_once(counts, expected_counts(texts))
        for (word, count), seen in ids.items():
            assert len(seen) == 1, f"copies of {word}:{count} carry different ids {seen}"
    finally:
        job.kill()


@pytest.mark.timeout(600)
def test_two_process_job_killed_and_restarted_together_counts_exactly(make_broker, tmp_path):
    """One of a 2-process job's processes is killed -9: the supervisor stops the other and
    restarts both from the last checkpoint; the results are exact."""
    broker = make_broker()
    src, out = uniq("in"), uniq("out")
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as c:
        c.channel().queue_declare(src, durable=True, arguments=DEDUP_IN)
    texts = [wc_line(i) for i in range(MESSAGES // 2)]
    job = JobProcess.wordcount(broker.url, src, out, tmp_path / "job.log",
                               "--processes", "2", "--parallelism", "2",
                               "--checkpoint-dir", str(tmp_path / "ckpt"),
                               "--checkpoint-interval-ms", "300", "--restart-delay-ms", "100")
    try:
        workers = wait_for_workers(job.proc.pid, 2)
        pub = ResilientPublisher(lambda: broker.url, src, texts, uniq("run"))
        pub.start()
        for victim in (1, 0):
            time.sleep(1.5)
            os.kill(workers[victim], signal.SIGKILL)
            workers = wait_for_workers(job.proc.pid, 2, other_than=workers, timeout=60)
        counts, _ = settled_output(pub, lambda: broker.url, src, out, job)
        check_exact(counts, expected_counts(texts))
    finally:
        job.kill()


@pytest.mark.timeout(600)
def test_killing_the_whole_standalone_job_loses_nothing(make_broker, tmp_path):
    """kill -9 of `rill job run` itself (supervisor and workers), then started again: every
    count of every word is there (at-least-once holds, and with checkpoints it is exact)."""
    broker = make_broker()
    src, out = uniq("in"), uniq("out")
    texts = [wc_line(i) for i in range(MESSAGES // 2)]
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-interval-ms", "300")
    job = JobProcess.wordcount(broker.url, src, out, tmp_path / "job0.log", *args)
    try:
        wait_for_workers(job.proc.pid, 1)
        pub = ResilientPublisher(lambda: broker.url, src, texts, uniq("run"))
        pub.start()
        for i in range(1, 4):
            time.sleep(1.5)
            workers = wait_for_workers(job.proc.pid, 1)
            # Supervisor and worker alike: no clean stop, no savepoint.
            os.kill(workers[0], signal.SIGKILL)
            job.proc.kill()
            job.proc.wait(10)
            from brokerproc import wait_dead
            wait_dead(workers[0], timeout=30)
            job = JobProcess.wordcount(broker.url, src, out, tmp_path / f"job{i}.log", *args)
            wait_for_workers(job.proc.pid, 1)
        counts, _ = settled_output(pub, lambda: broker.url, src, out, job)
        check_exact(counts, expected_counts(texts))
    finally:
        job.kill()
