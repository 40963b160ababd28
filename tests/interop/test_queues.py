"""Queues: declare flavours, exclusivity, auto-delete, bindings, purge and delete."""

import re

import pika
import pytest

from conftest import channel_closed, drain, ready, uniq, wait_until


def locked(q: str) -> str:
    return (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. "
        "It could be originally declared on another connection or the exclusive property value "
        "does not match that of the original declaration."
    )


def test_declare_returns_counts(ch):
    q = uniq("q")
    ok = ch.queue_declare(q, auto_delete=True).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q, 0, 0)
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    ch.basic_consume(q, lambda *a: None)
    ok = ch.queue_declare(q, passive=True).method
    # Ready messages only: the consumer took both (unacked) — so zero ready, one consumer.
    assert ok.consumer_count == 1
    ok = ch.queue_declare(q, auto_delete=True).method
    assert ok.consumer_count == 1


def test_declare_message_count_counts_ready(ch):
    q = uniq("q")
    ch.queue_declare(q, auto_delete=True)
    for i in range(5):
        ch.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: ready(ch, q) == 5)
    ch.basic_get(q, auto_ack=False)
    assert ready(ch, q) == 4
    ch.queue_delete(q)


def test_passive_declare_missing_is_404(conn):
    ch = conn.channel()
    with channel_closed(404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"):
        ch.queue_declare("rilltest.none", passive=True)
    assert conn.is_open


def test_server_named_queue(ch):
    names = {ch.queue_declare("", exclusive=True).method.queue for _ in range(5)}
    assert len(names) == 5
    for n in names:
        assert re.fullmatch(r"amq\.gen-[A-Za-z0-9_\-]{22}", n), n
        ch.queue_declare(n, passive=True)


def test_amq_prefix_is_reserved(ch):
    with channel_closed(403, "ACCESS_REFUSED - queue name 'amq.rilltest' contains reserved prefix 'amq.*'"):
        ch.queue_declare("amq.rilltest")


def test_durable_queue(ch):
    q = uniq("durable")
    ch.queue_declare(q, durable=True)
    ch.queue_declare(q, durable=True)
    ch.queue_declare(q, passive=True)
    ch.basic_publish("", q, b"x", pika.BasicProperties(delivery_mode=2))
    assert wait_until(lambda: ready(ch, q) == 1)
    assert ch.queue_delete(q).method.message_count == 1


@pytest.mark.parametrize(
    "first, second, arg, received, current",
    [
        ({}, {"durable": True}, "durable", "'true'", "'false'"),
        ({"auto_delete": True}, {}, "auto_delete", "'false'", "'true'"),
        ({"arguments": {"x-max-length": 10}}, {"arguments": {"x-max-length": 11}},
         "x-max-length", "'11'", "'10'"),
        ({"arguments": {"x-message-ttl": 1000}}, {},
         "x-message-ttl", "none", "the value '1000' of type 'signedint'"),
    ],
    ids=["durable", "auto_delete", "x-max-length", "x-message-ttl-missing"],
)
def test_redeclare_mismatch_is_406(connect, first, second, arg, received, current):
    conn = connect()
    q = uniq("q")
    conn.channel().queue_declare(q, **first)
    ch = conn.channel()
    try:
        with channel_closed(
            406,
            f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{q}' in vhost '/': "
            f"received {received} but current is {current}",
        ):
            ch.queue_declare(q, **second)
    finally:
        conn.channel().queue_delete(q)


def test_redeclare_with_same_arguments_is_ok(ch):
    q = uniq("q")
    args = {"x-max-length": 10, "x-message-ttl": 60000, "x-custom": "kept"}
    ch.queue_declare(q, auto_delete=True, arguments=args)
    ch.queue_declare(q, auto_delete=True, arguments=args)


def test_redeclare_ignores_unknown_arguments(ch):
    # RabbitMQ only compares the x-arguments it knows; others may differ on redeclare.
    q = uniq("q")
    ch.queue_declare(q, auto_delete=True, arguments={"x-rilltest": 1})
    ch.queue_declare(q, auto_delete=True, arguments={"x-rilltest": 2})
    ch.queue_declare(q, auto_delete=True)


# ----------------------------------------------------------------- exclusive


@pytest.mark.parametrize("op", ["passive", "declare", "consume", "get", "bind", "purge", "delete"])
def test_exclusive_queue_locked_to_its_connection(connect, op):
    owner = connect().channel()
    q = uniq("excl")
    owner.queue_declare(q, exclusive=True)
    other = connect().channel()
    action = {
        "passive": lambda: other.queue_declare(q, passive=True),
        "declare": lambda: other.queue_declare(q, exclusive=True),
        "consume": lambda: other.basic_consume(q, lambda *a: None),
        "get": lambda: other.basic_get(q),
        "bind": lambda: other.queue_bind(q, "amq.direct", "k"),
        "purge": lambda: other.queue_purge(q),
        "delete": lambda: other.queue_delete(q),
    }[op]
    with channel_closed(405, locked(q)):
        action()
    # The owner is unaffected.
    owner.queue_declare(q, passive=True)


def test_exclusive_queue_accepts_publishes_from_others(connect):
    owner = connect().channel()
    q = owner.queue_declare("", exclusive=True).method.queue
    other = connect().channel()
    other.basic_publish("", q, b"from elsewhere")
    assert wait_until(lambda: ready(owner, q) == 1)
    assert owner.basic_get(q, auto_ack=True)[2] == b"from elsewhere"


def test_exclusive_queue_shared_by_channels_of_owner(conn):
    q = conn.channel().queue_declare("", exclusive=True).method.queue
    ch2 = conn.channel()
    ch2.basic_publish("", q, b"x")
    assert ch2.basic_get(q, auto_ack=True)[2] == b"x"


def test_exclusive_queue_deleted_with_connection(connect):
    owner = connect()
    q = uniq("excl")
    owner.channel().queue_declare(q, exclusive=True)
    owner.close()
    ch = connect().channel()

    def gone():
        c = connect().channel()
        try:
            c.queue_declare(q, passive=True)
            return False
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
            return True

    assert wait_until(gone)
    # The name is free again.
    ch.queue_declare(q, exclusive=True)


# ----------------------------------------------------------------- auto-delete


def test_auto_delete_when_last_consumer_cancels(connect):
    conn = connect()
    ch = conn.channel()
    q = uniq("ad")
    ch.queue_declare(q, auto_delete=True)
    # Never consumed: an auto-delete queue stays.
    ch.queue_declare(q, passive=True)
    t1 = ch.basic_consume(q, lambda *a: None)
    t2 = ch.basic_consume(q, lambda *a: None)
    ch.basic_cancel(t1)
    assert ch.queue_declare(q, passive=True).method.consumer_count == 1
    ch.basic_cancel(t2)
    with channel_closed(404, f"NOT_FOUND - no queue '{q}' in vhost '/'"):
        conn.channel().queue_declare(q, passive=True)


def test_auto_delete_when_consumer_channel_closes(connect):
    c1 = connect()
    q = uniq("ad")
    ch = c1.channel()
    ch.queue_declare(q, auto_delete=True)
    ch.basic_consume(q, lambda *a: None)
    ch.close()

    def gone():
        try:
            connect().channel().queue_declare(q, passive=True)
            return False
        except pika.exceptions.ChannelClosedByBroker as e:
            return e.reply_code == 404

    assert wait_until(gone)


# ----------------------------------------------------------------- bind / unbind


def test_bind_unbind(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.direct", q)
    ch.queue_bind(q, "amq.direct", q)  # idempotent
    ch.basic_publish("amq.direct", q, b"1")
    ch.queue_unbind(q, "amq.direct", q)
    ch.basic_publish("amq.direct", q, b"2")
    assert [b for _, _, b in drain(ch, q)] == [b"1"]


def test_unbind_missing_binding_is_ok(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_unbind(q, "amq.direct", "never-bound")


def test_bind_with_arguments_is_a_distinct_binding(ch):
    x = uniq("x")
    ch.exchange_declare(x, "direct")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, x, "k", arguments={"tag": "a"})
    ch.queue_bind(q, x, "k", arguments={"tag": "b"})
    ch.queue_unbind(q, x, "k", arguments={"tag": "a"})
    ch.basic_publish(x, "k", b"still bound")
    ch.queue_unbind(q, x, "k", arguments={"tag": "b"})
    ch.basic_publish(x, "k", b"unbound")
    assert [b for _, _, b in drain(ch, q)] == [b"still bound"]
    ch.exchange_delete(x)


def test_bind_missing_queue_or_exchange_is_404(conn):
    ch = conn.channel()
    with channel_closed(404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"):
        ch.queue_bind("rilltest.none", "amq.direct", "k")
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    with channel_closed(404, "NOT_FOUND - no exchange 'rilltest.none' in vhost '/'"):
        ch.queue_bind(q, "rilltest.none", "k")


# ----------------------------------------------------------------- purge / delete


def test_purge_returns_count(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    for i in range(7):
        ch.basic_publish("", q, b"x")
    assert wait_until(lambda: ready(ch, q) == 7)
    # Unacked messages are not purged.
    method, _, _ = ch.basic_get(q)
    assert ch.queue_purge(q).method.message_count == 6
    assert ch.queue_purge(q).method.message_count == 0
    ch.basic_reject(method.delivery_tag, requeue=True)
    assert wait_until(lambda: ready(ch, q) == 1)


def test_purge_missing_is_404(ch):
    with channel_closed(404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"):
        ch.queue_purge("rilltest.none")


def test_delete_returns_count(ch):
    q = uniq("q")
    ch.queue_declare(q)
    for _ in range(3):
        ch.basic_publish("", q, b"x")
    assert wait_until(lambda: ready(ch, q) == 3)
    assert ch.queue_delete(q).method.message_count == 3
    with channel_closed(404):
        ch.queue_declare(q, passive=True)


def test_delete_missing_queue_is_ok(ch):
    assert ch.queue_delete(uniq("none")).method.message_count == 0


def test_delete_if_unused(connect):
    conn = connect()
    ch = conn.channel()
    q = uniq("q")
    ch.queue_declare(q, auto_delete=False)
    tag = ch.basic_consume(q, lambda *a: None)
    with channel_closed(406, f"PRECONDITION_FAILED - queue '{q}' in vhost '/' in use"):
        conn.channel().queue_delete(q, if_unused=True)
    ch.basic_cancel(tag)
    assert ch.queue_delete(q, if_unused=True).method.message_count == 0


def test_delete_if_empty(connect):
    conn = connect()
    ch = conn.channel()
    q = uniq("q")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"x")
    assert wait_until(lambda: ready(ch, q) == 1)
    with channel_closed(406, f"PRECONDITION_FAILED - queue '{q}' in vhost '/' not empty"):
        conn.channel().queue_delete(q, if_empty=True)
    ch.queue_purge(q)
    assert ch.queue_delete(q, if_empty=True).method.message_count == 0


def test_delete_removes_bindings(ch):
    x = uniq("x")
    ch.exchange_declare(x, "fanout")
    q = uniq("q")
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.queue_delete(q)
    ch.queue_declare(q)
    ch.basic_publish(x, "", b"x")
    assert ch.queue_delete(q).method.message_count == 0
    ch.exchange_delete(x)
