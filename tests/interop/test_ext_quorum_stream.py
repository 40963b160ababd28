"""RabbitMQ queue extensions, part 3: quorum-queue declarations with x-delivery-limit, and
stream queues over AMQP 0-9-1 (offsets, retention, consumer rules).

Every expectation here was observed on RabbitMQ 3.10 (issue 6), which supports stream queues
over AMQP 0-9-1 without enabling any plugin. Notable facts:

* Quorum and stream queues must be durable, non-exclusive, non-auto-delete and client-named.
* Quorum x-delivery-limit N: a message is delivered at most N+1 times, then dead-lettered with
  reason `delivery_limit` (or dropped without a DLX). Redeliveries carry `x-delivery-count`
  (1, 2, ...); the first delivery carries none through basic.consume but `x-delivery-count: 0`
  through basic.get. The header is not kept on the dead-lettered copy.
* Streams: every delivery carries `x-stream-offset` (a long). Without x-stream-offset a consumer
  starts at `next` (only new messages). `last` starts at the last chunk (a batch of messages
  written together), so it delivers a suffix ending with the last message. A numeric offset
  below the start is clamped to `first`; one beyond the end waits until the log reaches it
  (messages before it are skipped). A timestamp starts at the first chunk written at or after it.
  Offsets are dense only within a segment: rolling a segment uses up an offset.
* Streams refuse basic.get and auto-ack consumers with a connection error (540), and a consumer
  without a prefetch with a channel error (406). Acks are only flow control.
* Retention applies when a segment rolls over: x-max-length-bytes / x-max-age drop whole
  old segments (x-stream-max-segment-size-bytes makes them small).
"""

import datetime
import math
import time

import pika
import pika.compat
import pika.exceptions
import pytest

from conftest import channel_closed, connection_closed, uniq, wait_until


@pytest.fixture
def durable(connect):
    """Factory for durable queues with the given x-queue-type, deleted at teardown."""
    made: list[str] = []

    def _declare(ch, queue_type, **arguments) -> str:
        q = uniq(queue_type)
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": queue_type, **arguments})
        made.append(q)
        return q

    yield _declare
    if made:
        cleanup = connect().channel()
        for q in made:
            cleanup.queue_delete(q)


def get_one(ch, queue, timeout=5.0):
    got = []

    def poll():
        method, props, body = ch.basic_get(queue)
        if method is not None:
            got.append((method, props, body))
        return bool(got)

    assert wait_until(poll, timeout=timeout, interval=0.05), f"nothing arrived in {queue}"
    return got[0]


class StreamReader:
    """A stream consumer on its own channel: records (body, x-stream-offset), acking if `ack`."""

    def __init__(self, conn, queue, offset=None, prefetch=1000, ack=True):
        self.conn = conn
        self.ch = conn.channel()
        self.ch.basic_qos(prefetch_count=prefetch)
        self.ack = ack
        self.got = []  # (method, body, offset)
        args = {} if offset is None else {"x-stream-offset": offset}
        self.tag = self.ch.basic_consume(queue, self._on, arguments=args)

    def _on(self, ch, method, props, body):
        assert props.headers and "x-stream-offset" in props.headers, \
            f"stream delivery without x-stream-offset: {props.headers!r}"
        offset = props.headers["x-stream-offset"]
        assert isinstance(offset, pika.compat.long)  # field type 'l'
        self.got.append((method, body.decode(), offset))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    @property
    def bodies(self):
        return [b for _, b, _ in self.got]

    @property
    def offsets(self):
        return [o for _, _, o in self.got]

    def wait(self, n, settle=0.3):
        """Wait for `n` deliveries, then a little longer to catch any extra."""
        assert wait_until(lambda: len(self.got) >= n, conn=self.conn), (n, self.bodies)
        self.conn.process_data_events(time_limit=settle)
        return self.bodies


def publish_confirmed(conn, q, bodies):
    ch = conn.channel()
    ch.confirm_delivery()
    for body in bodies:
        ch.basic_publish("", q, body.encode())
    ch.close()


# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("queue_type", ["quorum", "stream"])
@pytest.mark.parametrize(
    "flags, prop",
    [({"durable": False}, "non-durable"),
     ({"durable": True, "exclusive": True}, "exclusive-owner"),
     ({"durable": True, "auto_delete": True}, "auto-delete")],
    ids=["non-durable", "exclusive", "auto-delete"],
)
def test_replicated_queue_must_be_durable_shared(ch, queue_type, flags, prop):
    q = uniq(queue_type)
    with channel_closed(406, f"PRECONDITION_FAILED - invalid property '{prop}' for queue '{q}' "
                             f"in vhost '/'"):
        ch.queue_declare(q, arguments={"x-queue-type": queue_type}, **flags)


@pytest.mark.parametrize("queue_type", ["quorum", "stream"])
def test_replicated_queue_cannot_be_server_named(ch, queue_type):
    with channel_closed(406, f"PRECONDITION_FAILED - Cannot declare a server-named queue for "
                             f"type rabbit_{queue_type}_queue"):
        ch.queue_declare("", durable=True, arguments={"x-queue-type": queue_type})


def test_unknown_queue_type_refused(ch):
    q = uniq("bogus")
    with channel_closed(406, f"PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{q}' "
                             f"in vhost '/': \"unsupported queue type 'bogus'\""):
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "bogus"})


def test_quorum_queue_refuses_max_priority(ch):
    q = uniq("quorum")
    with channel_closed(406, f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue "
                             f"'{q}' in vhost '/' of queue type rabbit_quorum_queue"):
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum", "x-max-priority": 5})


# ----------------------------------------------------------------------------- quorum queues


def test_quorum_queue_declare_and_use(ch, durable):
    q = durable(ch, "quorum")
    ok = ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"}).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q, 0, 0)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"hello")
    method, _, body = get_one(ch, q)
    ch.basic_ack(method.delivery_tag)
    assert body == b"hello"


def test_quorum_delivery_limit_dead_letters(ch, durable):
    dlx = uniq("dlx")
    ch.exchange_declare(dlx, "fanout", auto_delete=True)
    dlq = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(dlq, dlx)
    q = durable(ch, "quorum", **{"x-delivery-limit": 2, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"k": "v"}))
    seen = []
    for _ in range(3):
        method, props, _ = get_one(ch, q)
        seen.append((method.redelivered, props.headers))
        ch.basic_nack(method.delivery_tag, requeue=True)
    assert seen == [(False, {"k": "v", "x-delivery-count": 0}),
                    (True, {"k": "v", "x-delivery-count": 1}),
                    (True, {"k": "v", "x-delivery-count": 2})]
    method, props, body = get_one(ch, dlq)
    assert (method.exchange, method.routing_key, body) == (dlx, q, b"poison")
    assert "x-delivery-count" not in props.headers
    [death] = props.headers["x-death"]
    assert (death["count"], death["reason"], death["queue"], death["exchange"],
            death["routing-keys"]) == (1, "delivery_limit", q, "", [q])
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert ch.basic_get(q) == (None, None, None)


def test_quorum_delivery_limit_drops_without_dlx(conn, durable):
    ch = conn.channel()
    q = durable(ch, "quorum", **{"x-delivery-limit": 2})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"poison")
    seen = []

    def on_message(c, method, props, body):
        seen.append((method.redelivered, props.headers))
        c.basic_nack(method.delivery_tag, requeue=True)

    ch.basic_consume(q, on_message)
    assert wait_until(lambda: len(seen) == 3, conn=conn)
    conn.process_data_events(time_limit=0.3)
    assert seen == [(False, None), (True, {"x-delivery-count": 1}), (True, {"x-delivery-count": 2})]
    ok = ch.queue_declare(q, passive=True).method
    assert (ok.message_count, ok.consumer_count) == (0, 1)


# ----------------------------------------------------------------------------- stream queues


def test_stream_offset_first_and_numeric(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, [f"m{i}" for i in range(5)])
    first = StreamReader(conn, q, "first")
    assert first.wait(5) == ["m0", "m1", "m2", "m3", "m4"]
    assert first.offsets == [0, 1, 2, 3, 4]
    assert [m.redelivered for m, _, _ in first.got] == [False] * 5
    from_two = StreamReader(conn, q, 2)
    assert from_two.wait(3) == ["m2", "m3", "m4"]
    assert from_two.offsets == [2, 3, 4]
    clamped = StreamReader(conn, q, -1)  # before the start: from the first message
    assert clamped.wait(5) == ["m0", "m1", "m2", "m3", "m4"]


def test_stream_offset_beyond_end_waits_for_it(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, ["m0", "m1", "m2"])
    ahead = StreamReader(conn, q, 5)
    conn.process_data_events(time_limit=0.3)
    assert ahead.got == []
    publish_confirmed(conn, q, ["m3", "m4", "m5", "m6"])
    assert ahead.wait(2) == ["m5", "m6"]
    assert ahead.offsets == [5, 6]


@pytest.mark.parametrize("offset", ["next", None], ids=["next", "default"])
def test_stream_offset_next_only_new_messages(conn, durable, offset):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, ["old0", "old1"])
    reader = StreamReader(conn, q, offset)
    conn.process_data_events(time_limit=0.3)
    assert reader.got == []
    publish_confirmed(conn, q, ["new"])
    assert reader.wait(1) == ["new"]
    assert reader.offsets == [2]


def test_stream_offset_last_starts_at_last_chunk(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, [f"m{i}" for i in range(5)])
    time.sleep(0.1)
    publish_confirmed(conn, q, ["final"])  # confirmed alone: in a chunk of its own or a later one
    reader = StreamReader(conn, q, "last")
    assert wait_until(lambda: reader.got, conn=reader.conn)
    conn.process_data_events(time_limit=0.3)
    everything = ["m0", "m1", "m2", "m3", "m4", "final"]
    # A non-empty suffix of the log ending with the last message, in order.
    assert reader.bodies[-1] == "final"
    assert reader.bodies == everything[len(everything) - len(reader.bodies):]
    assert reader.offsets == list(range(6 - len(reader.got), 6))


def test_stream_offset_timestamp(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, ["a0", "a1", "a2"])
    # AMQP timestamps are whole seconds: wait for the next second boundary before batch b.
    boundary = math.floor(time.time()) + 1
    while time.time() < boundary + 0.05:
        time.sleep(0.02)
    publish_confirmed(conn, q, ["b0", "b1", "b2"])
    at = datetime.datetime.fromtimestamp(boundary, datetime.timezone.utc)
    reader = StreamReader(conn, q, at)
    assert reader.wait(3) == ["b0", "b1", "b2"]
    assert reader.offsets == [3, 4, 5]
    earlier = StreamReader(conn, q, at - datetime.timedelta(seconds=60))
    assert earlier.wait(6) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    later = StreamReader(conn, q, at + datetime.timedelta(seconds=3600))
    conn.process_data_events(time_limit=0.3)
    assert later.got == []


def test_stream_backlog_larger_than_memory_reads_back_in_order(connect, durable):
    # 10 MiB of messages: Rill keeps only the newest 4 MiB of a stream in memory, so readers
    # starting at the beginning read the older part back from disk in runs.
    conn = connect()
    q = durable(conn.channel(), "stream")
    n, size = 2500, 4096
    body = lambda i: f"m{i}".ljust(size, ".")
    ch = conn.channel()
    for i in range(n):
        ch.basic_publish("", q, body(i).encode())
    first = StreamReader(conn, q, "first")
    assert first.wait(n, settle=0.1) == [body(i) for i in range(n)]
    assert first.offsets == list(range(n))
    middle = StreamReader(connect(), q, 1234)
    assert middle.wait(n - 1234, settle=0.1) == [body(i) for i in range(1234, n)]
    assert middle.offsets == list(range(1234, n))


def test_stream_consuming_does_not_remove(connect, durable):
    conn_a, conn_b = connect(), connect()
    q = durable(conn_a.channel(), "stream")
    publish_confirmed(conn_a, q, [f"m{i}" for i in range(4)])
    a = StreamReader(conn_a, q, "first")
    b = StreamReader(conn_b, q, "first")
    assert a.wait(4) == b.wait(4) == ["m0", "m1", "m2", "m3"]
    a.ch.close()
    again = StreamReader(conn_a, q, "first")
    assert again.wait(4) == ["m0", "m1", "m2", "m3"]


def test_stream_acks_are_flow_control(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, [f"m{i}" for i in range(5)])
    reader = StreamReader(conn, q, "first", prefetch=2, ack=False)
    assert reader.wait(2) == ["m0", "m1"]
    reader.ch.basic_ack(reader.got[1][0].delivery_tag, multiple=True)
    assert reader.wait(4) == ["m0", "m1", "m2", "m3"]
    # Nothing is removed by acking: a new reader still sees everything.
    assert StreamReader(conn, q, "first").wait(5) == ["m0", "m1", "m2", "m3", "m4"]


def test_stream_consumer_requires_prefetch(ch, durable):
    q = durable(ch, "stream")
    with channel_closed(406, f"PRECONDITION_FAILED - consumer prefetch count is not set for "
                             f"'queue '{q}' in vhost '/''"):
        ch.basic_consume(q, lambda *a: None)


def test_stream_refuses_auto_ack(conn, durable):
    q = durable(conn.channel(), "stream")
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    with connection_closed(540, f"NOT_IMPLEMENTED - automatic acknowledgement not supported by "
                                f"stream queues queue '{q}' in vhost '/'"):
        ch.basic_consume(q, lambda *a: None, auto_ack=True)


def test_stream_refuses_basic_get(conn, durable):
    q = durable(conn.channel(), "stream")
    publish_confirmed(conn, q, ["m0"])
    with connection_closed(540, f"NOT_IMPLEMENTED - basic.get not supported by stream queues "
                                f"queue '{q}' in vhost '/'"):
        conn.channel().basic_get(q)


def test_stream_retention_by_max_length_bytes(conn, durable):
    q = durable(conn.channel(), "stream",
                **{"x-max-length-bytes": 2000, "x-stream-max-segment-size-bytes": 500})
    publish_confirmed(conn, q, [f"r{i:03d}" + "x" * 96 for i in range(100)])
    reader = StreamReader(conn, q, "first")
    assert wait_until(lambda: reader.got and reader.got[-1][1].startswith("r099"), conn=conn)
    conn.process_data_events(time_limit=0.3)
    kept = [int(b[1:4]) for b in reader.bodies]
    # Old segments went: what is left is a contiguous tail of well under 100 messages.
    assert kept[-1] == 99 and 0 < len(kept) < 50
    assert kept == list(range(kept[0], 100))
    assert reader.offsets[0] > 0
    assert reader.offsets == sorted(set(reader.offsets))


def test_stream_retention_by_max_age(conn, durable):
    q = durable(conn.channel(), "stream",
                **{"x-max-age": "1s", "x-stream-max-segment-size-bytes": 500})
    publish_confirmed(conn, q, [f"o{i:03d}" + "x" * 96 for i in range(10)])
    time.sleep(1.5)
    publish_confirmed(conn, q, [f"n{i:03d}" + "x" * 96 for i in range(10)])  # rolls segments
    reader = StreamReader(conn, q, "first")
    assert wait_until(lambda: reader.got and reader.got[-1][1].startswith("n009"), conn=conn)
    conn.process_data_events(time_limit=0.3)
    assert [b[:4] for b in reader.bodies] == [f"n{i:03d}" for i in range(10)]


@pytest.mark.parametrize("age", ["1h", "7D", "10s", "1m", "1M", "1Y"])
def test_stream_max_age_units_accepted(ch, durable, age):
    q = durable(ch, "stream", **{"x-max-age": age})
    assert ch.queue_declare(q, passive=True).method.queue == q
