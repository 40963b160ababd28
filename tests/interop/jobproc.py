"""Helpers for the stream-job tests: word-count input, `rill job run` processes, and
reading a word-count output queue back.

The built-in wordcount publishes one message per word occurrence,
``{"word":"<w>","count":<n>}``, so for a word seen n times in total, a clean run leaves
exactly the counts 1..n in the output queue.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import subprocess
import time

import pika

from conftest import rill_bin

# Unicode whitespace of several kinds: the job splits on all of them.
SEPARATORS = [" ", " ", "\t", "\u3000", "\u00a0", " \n "]


def wc_line(i: int, words: int = 5, vocab: int = 500) -> str:
    """Message i of a word-count input: `words` words from a vocabulary of `vocab`."""
    parts = [f"w{(i * 7919 + k * 104729) % vocab}" for k in range(words)]
    out = parts[0]
    for k, p in enumerate(parts[1:]):
        out += SEPARATORS[(i + k) % len(SEPARATORS)] + p
    return out


def expected_counts(lines: list[str]) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for line in lines:
        c.update(line.split())
    return c


class JobProcess:
    """A `rill job run` child process."""

    def __init__(self, args: list[str], log_path: pathlib.Path):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(rill_bin()), "job", "run", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=dict(os.environ, NO_COLOR="1", RILL_LOG=os.environ.get("RILL_LOG", "info")),
        )

    @classmethod
    def wordcount(cls, url: str, source: str, sink: str, log_path: pathlib.Path,
                  *extra: str) -> "JobProcess":
        return cls(["wordcount", "--uri", url, "--source-queue", source, "--sink-queue", sink,
                    *extra], log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the job finishes what it consumed and exits."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of `queue`."""
    with pika.BlockingConnection(pika.URLParameters(url)) as c:
        ok = c.channel().queue_declare(queue=queue, passive=True).method
        return ok.message_count, ok.consumer_count


def wait_for_consumer(url: str, queue: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if queue_counts(url, queue)[1] > 0:
                return
        except pika.exceptions.ChannelClosedByBroker:
            pass  # not declared yet
        time.sleep(0.05)
    raise AssertionError(f"nobody consumes {queue} after {timeout}s")


def wait_for_messages(url: str, queue: str, n: int, timeout: float) -> int:
    """Waits until `queue` holds at least `n` ready messages; returns how many it holds."""
    deadline = time.monotonic() + timeout
    have = 0
    while time.monotonic() < deadline:
        try:
            have = queue_counts(url, queue)[0]
        except pika.exceptions.ChannelClosedByBroker:
            have = 0  # not declared yet
        if have >= n:
            return have
        time.sleep(0.1)
    return have


def drain_counts(url: str, queue: str, expect: int | None = None, idle: float = 1.0,
                 timeout: float = 120.0) -> dict[str, list[int]]:
    """Consumes `queue` until `expect` messages came (or, without `expect`, until nothing
    came for `idle` seconds); returns, per word, the counts in arrival order. Every message
    must be the wordcount's JSON, persistent, with a message_id."""
    counts: dict[str, list[int]] = collections.defaultdict(list)
    got = 0
    deadline = time.monotonic() + timeout
    # The job's sink declares its queue when it connects, which may come after the source
    # consumes: wait for the queue rather than fail on a 404 from consuming it too early.
    while True:
        try:
            queue_counts(url, queue)
            break
        except pika.exceptions.ChannelClosedByBroker:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with pika.BlockingConnection(pika.URLParameters(url)) as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=2000)
        for method, props, body in ch.consume(queue, inactivity_timeout=idle):
            if method is None:
                if expect is None or got >= expect or time.monotonic() > deadline:
                    break
                continue
            msg = json.loads(body)
            assert set(msg) == {"word", "count"}, body
            assert props.message_id, f"no message_id on {body!r}"
            assert props.delivery_mode == 2, f"not persistent: {body!r}"
            counts[msg["word"]].append(msg["count"])
            got += 1
            if got % 500 == 0 or got == expect:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if expect is not None and got >= expect:
                break
        ch.cancel()
    return counts


def check_exact(counts: dict[str, list[int]], expected: collections.Counter) -> None:
    """Exactly the counts 1..n for every word seen n times, each once, in order per word."""
    assert set(counts) == set(expected), (
        f"words missing: {sorted(set(expected) - set(counts))[:10]}, "
        f"unexpected: {sorted(set(counts) - set(expected))[:10]}")
    for word, n in expected.items():
        assert counts[word] == list(range(1, n + 1)), (
            f"{word}: expected counts 1..{n} in order, got {counts[word][:20]}... "
            f"({len(counts[word])} messages)")


def check_at_least_once(counts: dict[str, list[int]], expected: collections.Counter) -> None:
    """Every count 1..n present for every word (duplicates allowed), none beyond n."""
    assert set(counts) >= set(expected), f"words missing: {sorted(set(expected) - set(counts))[:10]}"
    for word, n in expected.items():
        seen = set(counts[word])
        missing = set(range(1, n + 1)) - seen
        assert not missing, f"{word}: counts missing {sorted(missing)[:10]} of 1..{n}"


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a supervisor's workers)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def wait_for_workers(pid: int, n: int, timeout: float = 30.0, other_than: list[int] = ()) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [k for k in child_pids(pid) if k not in other_than]
        if len(kids) == n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"supervisor {pid} has workers {child_pids(pid)}, expected {n} new ones")
