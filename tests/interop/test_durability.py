"""Durability (issue 5): what a broker promises across kill -9, clean restarts and alarms.

Every test here starts its own broker (``make_broker``) and kills, stops and restarts it
on the same port and data dir. In Rill mode that is ``rill server``; with
``RABBITMQ_SH=/work/shared/bench/rabbitmq.sh`` it is a private RabbitMQ 3.10 node, and
every test not marked Rill-only passes there: the expectations are RabbitMQ's.

The guarantees checked:

* A persistent message in a durable queue whose confirm arrived survives SIGKILL at any
  moment, once; unconfirmed messages may be lost but never appear out of nowhere.
* Recovered messages come back in publish order. A message delivered but not acked
  before a crash comes back with redelivered=True. An ack may be lost in a crash only if
  it is younger than the broker's sync interval (``ACK_SYNC_GRACE`` is the bound we
  assume); such a message comes back with redelivered=True, never as new.
* After a clean stop exactly the unacked messages remain.
* A torn or corrupt last record costs that record only, and the log says so (Rill only:
  it pokes at Rill's segment files).
* Durable definitions survive a restart, transient ones and transient messages do not.
* A backlog lives on disk, not in RSS (Rill only: RabbitMQ's own RSS is ~150 MB).
* Memory and disk alarms block publishing connections (connection.blocked) while
  consumers drain.
* An unusable --data-dir stops the broker at once with an error naming it (Rill only).

Environment knobs: ``RILL_CRASH_CYCLES`` (default 10), ``RILL_CRASH_SEED`` (default
random; printed in every crash-loop failure).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import re
import shutil
import subprocess
import time

import pika
import pika.exceptions
import pytest

from brokerproc import (
    RABBITMQ_SH,
    ConfirmingPublisher,
    body_number,
    numbered_body,
    proc_status,
    publish_confirmed,
)
from conftest import REFERENCE_URL, free_port, port_open, rill_bin, uniq, wait_until

CRASH_CYCLES = int(os.environ.get("RILL_CRASH_CYCLES", "10"))
# An ack older than this is assumed synced: it must not be undone by a kill -9.
ACK_SYNC_GRACE = 2.0
# RabbitMQ writes definitions (mnesia's log) lazily: a queue declared just before a
# kill -9 can be lost with the confirmed messages in it. Rill must not lose a declaration
# that was answered (declare-ok), so only RabbitMQ gets this grace before the kill.
DEFINITIONS_GRACE = 2.0 if RABBITMQ_SH else 0.0
MiB = 1024 * 1024

rill_only = pytest.mark.skipif(bool(RABBITMQ_SH), reason="inspects Rill's own files, flags or RSS")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def blocking(url: str, **params):
    """A pika BlockingConnection that is closed (quietly, the broker may be dead) on exit."""
    p = pika.URLParameters(url)
    p.connection_attempts = 1
    p.socket_timeout = 10
    for k, v in params.items():
        setattr(p, k, v)
    conn = pika.BlockingConnection(p)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            if conn.is_open:
                conn.close()


def quiet_close(conn) -> None:
    with contextlib.suppress(Exception):
        if conn.is_open:
            conn.close()


def get_all(ch, queue: str, ack: bool = True, limit: int = 1_000_000) -> list[tuple[int, bool, int]]:
    """Every ready message of `queue` via basic.get: [(number, redelivered, delivery tag)].

    With ack=True each is acked after it is received; otherwise they stay unacked."""
    out = []
    for _ in range(limit):
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        out.append((body_number(body), method.redelivered, method.delivery_tag))
        if ack:
            ch.basic_ack(method.delivery_tag)
    return out


def consume_all(ch, queue: str) -> list[tuple[int, bool, int]]:
    """Every ready message of `queue` via basic.consume, none acked: [(number, redelivered, tag)].

    Faster than basic.get for large backlogs; only for a queue nobody publishes to (it
    consumes as many messages as a passive declare reports)."""
    count = ch.queue_declare(queue, passive=True).method.message_count
    out = []
    if count == 0:
        return out
    ch.basic_qos(prefetch_count=0)  # unlimited: nothing is acked while consuming
    for method, _props, body in ch.consume(queue, inactivity_timeout=10):
        assert method is not None, f"consume stalled after {len(out)} of {count} messages"
        out.append((body_number(body), method.redelivered, method.delivery_tag))
        if len(out) == count:
            break
    ch.cancel()  # unacked deliveries stay with the channel
    more = ch.queue_declare(queue, passive=True).method.message_count
    assert more == 0, f"{more} more messages after consuming the {count} reported ready"
    return out


def numbers(got) -> list[int]:
    return [n for n, *_ in got]


def passive_exists(conn, *, queue: str | None = None, exchange: str | None = None) -> bool:
    """Passive declare on a throwaway channel: False on 404 NOT_FOUND."""
    ch = conn.channel()
    try:
        if queue is not None:
            ch.queue_declare(queue, passive=True)
        else:
            ch.exchange_declare(exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
        return False
    ch.close()
    return True


def restart(broker, how: str) -> None:
    """Stop the broker (how = 'kill' for SIGKILL, 'term' for a clean stop) and start it again."""
    if how == "kill":
        broker.kill()
    else:
        broker.stop()
    broker.start()


def declare_durable_queue(url: str, queue: str, **arguments) -> None:
    with blocking(url) as c:
        c.channel().queue_declare(queue, durable=True, arguments=arguments or None)


# --------------------------------------------------------------------------- 1. crash loop


@pytest.mark.timeout(300)
def test_crash_loop_keeps_every_confirmed_message(make_broker):
    """Publish with pipelined confirms, SIGKILL the broker at a random moment, restart, drain;
    repeated. Each drain holds a few messages unacked across the next kill."""
    seed = int(os.environ.get("RILL_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    broker = make_broker()
    q = uniq("crash")
    declare_durable_queue(broker.url, q)

    received: set[int] = set()       # every number received so far
    held: list[int] = []             # delivered, never acked, when the broker was killed
    confirmed_last: set[int] = set() # confirmed by the last publish phase
    published_last = range(0)        # numbers the last publish phase sent
    next_n = 0
    total_confirmed = 0
    history = []

    for cycle in range(CRASH_CYCLES + 1):
        where = f"seed={seed} cycle={cycle} history={history}"
        if cycle > 0:
            broker.start()
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        ch = conn.channel()
        got = consume_all(ch, q)
        ns = numbers(got)

        bad = next((i for i in range(1, len(ns)) if ns[i] <= ns[i - 1]), None)
        assert bad is None, f"recovered out of publish order or twice: ...{ns[max(0, bad - 5):bad + 5]}... ({where})"
        missing = sorted(confirmed_last - set(ns))
        assert not missing, f"confirmed messages lost: {missing[:20]} ({len(missing)}) ({where})"
        lost_held = sorted(set(held) - set(ns))
        assert not lost_held, f"delivered-unacked messages lost: {lost_held} ({where})"
        for n, redelivered, _tag in got:
            if n in received:
                assert redelivered, f"message {n} delivered again with redelivered=False ({where})"
            else:
                assert n in published_last, f"message {n} appeared out of nowhere ({where})"
        received.update(ns)

        if cycle == CRASH_CYCLES:
            for *_, tag in got:
                ch.basic_ack(tag)
            assert wait_until(lambda: ch.queue_declare(q, passive=True).method.message_count == 0,
                              timeout=10), where
            conn.close()
            break

        # Hold the first few unacked across the kill; ack the rest.
        k = min(rng.randint(1, 3), len(got))
        held = ns[:k]
        for *_, tag in got[k:]:
            ch.basic_ack(tag)
        ch.queue_declare(q, passive=True)  # a round trip: the acks have been read

        pub = ConfirmingPublisher(broker.url, q, first=next_n, window=rng.choice([1, 32, 512]))
        pub.start()
        assert pub.opened.wait(15), f"publisher did not open: {pub.error!r} ({where})"
        time.sleep(rng.uniform(0.2, 1.0))
        broker.kill()
        pub.finish(15)
        quiet_close(conn)

        confirmed_last = set(pub.confirmed)
        published_last = range(next_n, pub.next)
        next_n = pub.next
        total_confirmed += len(confirmed_last)
        history.append((len(got), k, pub.published, len(confirmed_last), len(pub.nacked)))

    print(f"crash loop seed={seed}: (drained, held, published, confirmed, nacked) per cycle: {history}")
    # A run in which nothing was ever confirmed would prove nothing.
    assert total_confirmed >= CRASH_CYCLES, f"only {total_confirmed} confirms (seed={seed} {history})"


# --------------------------------------------------------------------------- 2. acks


def _deliver_and_ack_some(url: str, q: str):
    """100 persistent messages; 80 delivered, 60 of those acked (a fixed random pick).
    Returns (open connection holding the 20 unacked, expected remaining, delivered-unacked)."""
    publish_confirmed(url, q, 100)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    got = []
    for _ in range(80):
        method, _props, body = ch.basic_get(q, auto_ack=False)
        got.append((body_number(body), method.delivery_tag))
    assert numbers(got) == list(range(80))
    acked = set(random.Random(5).sample(range(80), 60))
    for n, tag in got:
        if n in acked:
            ch.basic_ack(tag)
    ch.queue_declare(q, passive=True)  # a round trip: the acks have been read
    delivered_unacked = [n for n in range(80) if n not in acked]
    return conn, delivered_unacked + list(range(80, 100)), set(delivered_unacked)


@pytest.mark.timeout(120)
def test_acks_survive_clean_restart(make_broker):
    broker = make_broker()
    q = uniq("acks")
    declare_durable_queue(broker.url, q)
    conn, expected, delivered = _deliver_and_ack_some(broker.url, q)
    broker.stop()  # with 20 messages still unacked on an open channel
    quiet_close(conn)
    log_before = len(broker.log_text())
    broker.start()
    with blocking(broker.url) as c:
        got = get_all(c.channel(), q)
    assert numbers(got) == expected
    if broker.kind == "rill":  # "Startup logs how many messages each queue recovered"
        log = broker.log_text()[log_before:]
        assert any(q in line and re.search(r"\b40\b", line) for line in log.splitlines()), \
            f"no startup line saying {q} recovered 40 messages:\n{log}"
    assert [n for n, redelivered, _ in got if redelivered] == sorted(delivered), \
        "exactly the delivered-unacked messages come back with redelivered=True"


@pytest.mark.timeout(120)
def test_acks_older_than_sync_interval_survive_kill(make_broker):
    broker = make_broker()
    q = uniq("acks")
    declare_durable_queue(broker.url, q)
    conn, expected, delivered = _deliver_and_ack_some(broker.url, q)
    time.sleep(ACK_SYNC_GRACE)
    broker.kill()
    quiet_close(conn)
    broker.start()
    with blocking(broker.url) as c:
        got = get_all(c.channel(), q)
    assert numbers(got) == expected
    not_flagged = [n for n, redelivered, _ in got if n in delivered and not redelivered]
    assert not not_flagged, f"delivered before the crash but redelivered=False: {not_flagged}"


# --------------------------------------------------------------------------- 3. torn tail


def _segment_holding(data_dir: pathlib.Path, needle: bytes) -> tuple[pathlib.Path, int]:
    """The newest *.seg file under data_dir containing `needle`, and its last offset there."""
    segs = sorted(data_dir.glob("**/*.seg"), key=lambda p: p.stat().st_mtime_ns)
    assert segs, f"no *.seg files under {data_dir}: {sorted(str(p) for p in data_dir.rglob('*'))}"
    for seg in reversed(segs):
        at = seg.read_bytes().rfind(needle)
        if at >= 0:
            return seg, at
    pytest.fail(f"the last message body is in no segment file (bodies not stored verbatim?): {segs}")


@rill_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", ["kill", "term"])
@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_torn_tail_loses_only_the_last_record(make_broker, damage, stop):
    broker = make_broker()
    other, q = uniq("torn-other"), uniq("torn")
    n, size = 20, 200
    declare_durable_queue(broker.url, other)
    declare_durable_queue(broker.url, q)
    publish_confirmed(broker.url, other, 5, first=500, body_size=size)
    publish_confirmed(broker.url, q, n, body_size=size)
    if stop == "kill":
        broker.kill()
    else:
        broker.stop()

    last = numbered_body(n - 1, size)
    seg, at = _segment_holding(broker.data_dir, last)
    middle = at + len(last) // 2
    if damage == "truncate":
        os.truncate(seg, middle)
    else:
        with open(seg, "r+b") as f:
            f.seek(middle)
            byte = f.read(1)
            f.seek(middle)
            f.write(bytes([byte[0] ^ 0xFF]))
    log_before = len(broker.log_text())

    broker.start()
    with blocking(broker.url) as c:
        ch = c.channel()
        assert numbers(get_all(ch, q)) == list(range(n - 1))
        assert numbers(get_all(ch, other)) == list(range(500, 505)), "another queue was damaged"
    log = broker.log_text()[log_before:]
    warned = [line for line in log.splitlines() if seg.name in line and ("WARN" in line or "ERROR" in line)]
    assert warned, f"no warning naming {seg.name} in the log after restart:\n{log}"

    # The repaired segment takes new records that survive another crash.
    publish_confirmed(broker.url, q, 1, first=1000, body_size=size)
    time.sleep(ACK_SYNC_GRACE)  # the acks above are old enough to be synced
    broker.kill()
    broker.start()
    with blocking(broker.url) as c:
        assert numbers(get_all(c.channel(), q)) == [1000]


# --------------------------------------------------------------------------- 4. definitions


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["term", "kill"])
def test_definitions_survive_restart_transient_ones_do_not(make_broker, how):
    broker = make_broker()
    dx, fx, tx = uniq("dx"), uniq("fx"), uniq("tx")
    q, dq, tq = uniq("q"), uniq("dq"), uniq("tq")
    transient = pika.BasicProperties(delivery_mode=1)
    persistent = pika.BasicProperties(delivery_mode=2)
    with blocking(broker.url) as c:
        ch = c.channel()
        ch.exchange_declare(dx, "direct", durable=True)
        ch.exchange_declare(fx, "fanout", durable=True)
        ch.queue_declare(q, durable=True, arguments={"x-max-length": 5})
        ch.queue_bind(q, dx, "k")
        ch.exchange_bind(destination=dx, source=fx, routing_key="k")
        ch.exchange_declare(tx, "direct", durable=False)
        ch.queue_bind(q, tx, "t")                  # a binding from a transient exchange
        ch.queue_declare(tq, durable=False)
        ch.queue_bind(tq, dx, "k")                 # a binding to a transient queue
        ch.queue_declare(dq, durable=True)
        ch.confirm_delivery()
        for i in range(5):                         # persistent 0, 2, 4; transient 1, 3
            ch.basic_publish("", dq, numbered_body(i, 16), persistent if i % 2 == 0 else transient)
        ch.basic_publish("", tq, numbered_body(9, 16), persistent)
        assert ch.queue_declare(dq, passive=True).method.message_count == 5
        assert ch.queue_declare(tq, passive=True).method.message_count == 1
    time.sleep(DEFINITIONS_GRACE)
    restart(broker, how)

    with blocking(broker.url) as c:
        for x in (dx, fx):
            assert passive_exists(c, exchange=x), f"durable exchange {x} lost"
        for x in (q, dq):
            assert passive_exists(c, queue=x), f"durable queue {x} lost"
        assert not passive_exists(c, exchange=tx), "transient exchange restored"
        assert not passive_exists(c, queue=tq), "transient queue restored"

        ch = c.channel()
        assert numbers(get_all(ch, dq)) == [0, 2, 4], "transient messages must not survive a restart"
        # The queue's arguments survived: the same declaration is equivalent, another is not.
        ch.queue_declare(q, durable=True, arguments={"x-max-length": 5})
        bad = c.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            bad.queue_declare(q, durable=True, arguments={"x-max-length": 6})
        assert exc.value.reply_code == 406

        # fx -> dx -> q routes (exchange-to-exchange and queue bindings), and x-max-length
        # still drops from the head.
        ch.confirm_delivery()
        for i in range(7):
            ch.basic_publish(fx, "k", numbered_body(100 + i, 16), persistent)
        assert wait_until(lambda: ch.queue_declare(q, passive=True).method.message_count == 5, timeout=10)
        assert numbers(get_all(ch, q)) == list(range(102, 107))

        # A re-declared transient exchange has none of the old one's bindings.
        ch.exchange_declare(tx, "direct", durable=False)
        ch.basic_publish(tx, "t", numbered_body(200, 16), persistent)
        ch.queue_declare(q, passive=True)
        assert numbers(get_all(ch, q)) == []


@pytest.mark.parametrize("how", ["term", "kill"])
def test_priority_queue_keeps_priorities_across_restart(make_broker, how):
    broker = make_broker()
    q = uniq("prio")
    declare_durable_queue(broker.url, q, **{"x-max-priority": 9})
    priorities = [1, 5, 3, 9, 0, 5, 12, 1]  # 12 is above the maximum: it counts as 9
    with blocking(broker.url) as c:
        ch = c.channel()
        ch.confirm_delivery()
        for i, p in enumerate(priorities):
            ch.basic_publish("", q, numbered_body(i, 16), pika.BasicProperties(delivery_mode=2, priority=p))
    restart(broker, how)
    with blocking(broker.url) as c:
        got = numbers(get_all(c.channel(), q))
    # Highest first, publish order within a level.
    assert got == sorted(range(len(priorities)), key=lambda i: (-min(priorities[i], 9), i))


# --------------------------------------------------------------------------- 5. memory

# 200 MiB of bodies: far above the RSS limit if they were kept in memory.
MEM_MESSAGES = int(os.environ.get("RILL_MEM_MESSAGES", "200000"))
MEM_BODY = int(os.environ.get("RILL_MEM_BODY", "1024"))
RSS_LIMIT = 120 * MiB


@pytest.mark.timeout(300)
def test_backlog_bodies_stay_out_of_memory(make_broker):
    assert MEM_MESSAGES * MEM_BODY > 1.5 * RSS_LIMIT, "the test must fail if bodies stayed in RAM"
    broker = make_broker()
    q = uniq("backlog")
    declare_durable_queue(broker.url, q)
    pub = ConfirmingPublisher(broker.url, q, count=MEM_MESSAGES, window=1000, body_size=MEM_BODY)
    pub.start()
    peak = {}
    deadline = time.monotonic() + 240
    while pub.is_alive() and time.monotonic() < deadline:
        status = proc_status(broker.pid)
        if status["VmRSS"] > peak.get("VmRSS", 0):
            peak = status
        time.sleep(0.1)
    pub.finish(10)
    assert pub.error is None, f"publisher failed: {pub.error!r}"
    assert len(pub.confirmed) == MEM_MESSAGES and not pub.nacked
    time.sleep(0.5)
    status = proc_status(broker.pid)
    if status["VmRSS"] > peak.get("VmRSS", 0):
        peak = status
    detail = ", ".join(f"{k}={peak.get(k, 0) // MiB} MiB" for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"))
    print(f"{broker.kind} with {MEM_MESSAGES} x {MEM_BODY} B queued: {detail}")
    if broker.kind == "rill":
        assert peak["VmRSS"] < RSS_LIMIT, f"RSS while {MEM_MESSAGES} x {MEM_BODY} B were queued: {detail}"

    # Every message is still there, in order.
    with blocking(broker.url) as c:
        ch = c.channel()
        ch.basic_qos(prefetch_count=1000)
        expect = 0
        for method, _props, body in ch.consume(q, inactivity_timeout=10):
            assert method is not None, f"consume stalled after {expect} of {MEM_MESSAGES}"
            assert body_number(body) == expect and len(body) == MEM_BODY
            expect += 1
            if expect % 500 == 0 or expect == MEM_MESSAGES:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if expect == MEM_MESSAGES:
                break
        ch.cancel()
        assert ch.queue_declare(q, passive=True).method.message_count == 0


# --------------------------------------------------------------------------- 6. alarms

ALARM_FLAGS = {"memory": ["--memory-high-watermark", "0.0000001"],
               "disk": ["--disk-free-limit", str(10**18)]}
RABBIT_ALARM_ON = {"memory": ["set_vm_memory_high_watermark", "0.0000001"],
                   "disk": ["set_disk_free_limit", str(10**18)]}
RABBIT_ALARM_OFF = {"memory": ["set_vm_memory_high_watermark", "0.4"],
                    "disk": ["set_disk_free_limit", "50000000"]}


def publish_until_blocked(conn, queue: str, first: int, log: "BlockedLog", timeout: float = 30.0) -> list[int]:
    """Publish numbered persistent messages every 0.5 s until connection.blocked arrives.

    RabbitMQ blocks a connection when it publishes while an alarm is on, so one publish made
    before the broker noticed the alarm would never be answered. Returns the numbers sent."""
    ch = conn.channel()
    sent: list[int] = []

    def blocked() -> bool:
        if "blocked" in log.events:
            return True
        sent.append(first + len(sent))
        ch.basic_publish("", queue, numbered_body(sent[-1], 32), pika.BasicProperties(delivery_mode=2))
        return False

    assert wait_until(blocked, timeout=timeout, interval=0.5, conn=conn), \
        f"no connection.blocked after publishing {len(sent)} messages over {timeout} s"
    return sent


def collect(url: str, queue: str, got: list[int], want: list[int], timeout: float = 10.0) -> list[int]:
    """Keep draining `queue` into `got` until it holds `want` (or `timeout`)."""
    with blocking(url) as c:
        ch = c.channel()

        def done() -> bool:
            got.extend(numbers(get_all(ch, queue)))
            return len(got) >= len(want)

        wait_until(done, timeout=timeout, interval=0.1)
    return got


# pika's blocked_connection_timeout: long enough for the steps made while blocked.
BLOCKED_TIMEOUT = 10


class BlockedLog:
    def __init__(self, conn):
        self.events: list[str] = []
        conn.add_on_connection_blocked_callback(lambda _c, _f: self.events.append("blocked"))
        conn.add_on_connection_unblocked_callback(lambda _c, _f: self.events.append("unblocked"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("alarm", ["memory", "disk"])
def test_alarm_blocks_publishers_while_consumers_drain(make_broker, alarm):
    broker = make_broker()
    q = uniq(f"alarm-{alarm}")
    declare_durable_queue(broker.url, q)

    # Default limits: publishing is not blocked.
    publish_confirmed(broker.url, q, 20)
    with blocking(broker.url, blocked_connection_timeout=30) as c:
        log = BlockedLog(c)
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, numbered_body(20, 32), pika.BasicProperties(delivery_mode=2))
        c.process_data_events(time_limit=0.5)
        assert log.events == []

    # Raise the alarm: Rill by a restart with a limit it exceeds at once (the 21 messages
    # are persistent), RabbitMQ at run time.
    if broker.kind == "rill":
        broker.stop()
        broker.extra_args = ALARM_FLAGS[alarm]
        broker.start()
    else:
        broker.ctl(*RABBIT_ALARM_ON[alarm])

    with blocking(broker.url, blocked_connection_timeout=BLOCKED_TIMEOUT) as pub:
        log = BlockedLog(pub)
        sent = publish_until_blocked(pub, q, 21, log)

        # Another connection still consumes.
        with blocking(broker.url) as c:
            got = numbers(get_all(c.channel(), q))
        assert got[:21] == list(range(21)), got
        pub.process_data_events(time_limit=0.5)
        assert log.events == ["blocked"], "unblocked while the alarm is still on"

        if broker.kind == "rill":
            # Rill's limits are start-time flags: no way to clear the alarm at run time. The
            # connection stays blocked until pika gives up on it (a blocked connection does not
            # even read connection.close, in RabbitMQ too).
            with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
                pub.process_data_events(time_limit=BLOCKED_TIMEOUT + 5)
            assert log.events == ["blocked"]
            return
        broker.ctl(*RABBIT_ALARM_OFF[alarm])
        assert wait_until(lambda: "unblocked" in log.events, timeout=20, conn=pub), log.events
        collect(broker.url, q, got, list(range(21)) + sent)
        assert got == list(range(21)) + sent, "publishes made while blocked arrive once the alarm clears"


GiB = 1024 * MiB


def free_bytes(path: pathlib.Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.timeout(120)
def test_disk_alarm_blocks_then_unblocks_when_space_returns(make_broker, tmp_path):
    """The one alarm a test can clear at run time in both brokers: set the free-disk limit a
    little below what is free, take space away with a big fallocate'd file, give it back."""
    free = free_bytes(tmp_path)
    if free < 12 * GiB:
        pytest.skip(f"needs 12 GiB free on {tmp_path}'s file system, has {free // GiB}")
    limit = free - 2 * GiB  # 2 GiB of slack for whatever else writes to this disk
    broker = make_broker(extra_args=["--disk-free-limit", str(limit)])
    assert os.stat(broker.data_dir).st_dev == os.stat(tmp_path).st_dev
    if broker.kind != "rill":
        broker.ctl("set_disk_free_limit", str(limit))
    q = uniq("disk-alarm")
    declare_durable_queue(broker.url, q)
    publish_confirmed(broker.url, q, 5)

    filler = tmp_path / "filler"
    try:
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 5 * GiB)
        with blocking(broker.url, blocked_connection_timeout=60) as pub:
            log = BlockedLog(pub)
            sent = publish_until_blocked(pub, q, 5, log)
            with blocking(broker.url) as c:
                got = numbers(get_all(c.channel(), q))
            assert got[:5] == list(range(5)), got
            filler.unlink()
            assert wait_until(lambda: "unblocked" in log.events, timeout=30, conn=pub), \
                f"no connection.unblocked after the space came back: {log.events}"
            assert log.events == ["blocked", "unblocked"]
        collect(broker.url, q, got, list(range(5)) + sent)
        assert got == list(range(5)) + sent, "publishes made while blocked arrive once the alarm clears"
    finally:
        filler.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 7. bad data dir


@rill_only
@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_unusable_data_dir_fails_at_start(tmp_path, kind):
    if REFERENCE_URL:
        pytest.skip("runs the rill binary itself")
    path = tmp_path / "data"
    undo = None
    if kind == "file":
        path.write_text("not a directory\n")
    elif kind == "under-a-file":
        (tmp_path / "plain").write_text("not a directory\n")
        path = tmp_path / "plain" / "data"
    else:
        path.mkdir()
        if os.geteuid() == 0:  # root writes through mode bits; the immutable flag stops it
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("cannot make a directory read-only for root here")
            undo = ["chattr", "-i", str(path)]
        else:
            path.chmod(0o555)
    port = free_port()
    try:
        res = subprocess.run([str(rill_bin()), "server", "--port", str(port), "--data-dir", str(path),
                              "--http-port", str(free_port())],
                             capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, NO_COLOR="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"rill still running 20 s after start with --data-dir {path} ({kind})")
    finally:
        if undo:
            subprocess.run(undo)
    assert res.returncode != 0, res.stderr
    assert str(path) in res.stderr, f"stderr does not name {path}:\n{res.stderr}"
    assert not port_open(port)


@rill_only
@pytest.mark.timeout(60)
def test_segment_from_a_newer_format_version_refuses_start(make_broker):
    """Rill's segment header is magic[8] "RILLSEG\\0" + version u32 LE (docs/storage.md): a
    version this build does not know must stop the broker, not be read as garbage or
    truncated away."""
    broker = make_broker()
    q = uniq("future")
    declare_durable_queue(broker.url, q)
    publish_confirmed(broker.url, q, 3)
    broker.stop()
    seg, _ = _segment_holding(broker.data_dir, numbered_body(2, 32))
    data = bytearray(seg.read_bytes())
    assert data[:8] == b"RILLSEG\0", f"unexpected segment header {bytes(data[:12])!r}"
    data[8:12] = (0x7FFF_0000).to_bytes(4, "little")
    seg.write_bytes(bytes(data))
    try:
        res = subprocess.run([str(rill_bin()), "server", "--port", str(broker.port),
                              "--data-dir", str(broker.data_dir),
                              "--http-port", str(free_port())],
                             capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, NO_COLOR="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"rill started on a segment of an unknown format version ({seg})")
    assert res.returncode != 0, res.stderr
    assert seg.name in res.stderr and "version" in res.stderr.lower(), res.stderr
    assert seg.read_bytes() == bytes(data), "the unknown file must be left as it was"
