"""Message deduplication (docs/deduplication.md): the queue argument
``x-message-deduplication``, the plugin's exchange type ``x-message-deduplication``
(and LavinMQ's exchange argument), cache size and TTLs, confirms for duplicates, and keys
that survive a clean restart and a kill -9.

These need the rabbitmq-message-deduplication plugin's behaviour, which a stock RabbitMQ
lacks, and Rill's choice to remember keys beyond consumption (the plugin's queues forget a
key once its message is acked): Rill mode only.

TTL tests never time anything: they publish with a short TTL and poll with a deadline until
the same key is accepted again, and show that a key is still remembered with a long TTL.
"""

from __future__ import annotations

import random
import time

import pika
import pika.exceptions
import pytest

from brokerproc import RABBITMQ_SH, ConfirmingPublisher, body_number
from conftest import REFERENCE_URL, channel_closed, drain, ready

pytestmark = pytest.mark.skipif(
    bool(REFERENCE_URL or RABBITMQ_SH),
    reason="needs the message-deduplication plugin's behaviour (not in stock RabbitMQ) "
    "and Rill's keys-outlive-consumption semantics: Rill mode only",
)

KEY = "x-deduplication-header"
DEDUP = {"x-message-deduplication": True}
DEADLINE = 10.0


def props(key=None, *, persistent=False, ttl=None, **headers) -> pika.BasicProperties:
    if key is not None:
        headers[KEY] = key
    if ttl is not None:
        headers["x-cache-ttl"] = ttl
    return pika.BasicProperties(delivery_mode=2 if persistent else 1, headers=headers or None)


def confirming(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    return ch


def publish(ch, routing_key, body, key=None, *, exchange="", persistent=False, ttl=None,
            mandatory=False, **headers):
    """basic.publish; on a confirming channel it returns once the broker acked it."""
    ch.basic_publish(exchange, routing_key, body,
                     props(key, persistent=persistent, ttl=ttl, **headers), mandatory=mandatory)


def bodies(ch, queue) -> list[str]:
    return [body.decode() for _, _, body in drain(ch, queue)]


def eventually_accepted(ch, queue, key, **kw) -> bool:
    """Publishes `key` until the queue takes it (its remembered copy expired), or the deadline."""
    before = ready(ch, queue)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        publish(ch, queue, b"again", key, **kw)
        if ready(ch, queue) > before:
            return True
        time.sleep(0.02)
    return False


def dedup_queue(ch, name, durable=False, **arguments) -> str:
    q = name("dedup")
    ch.queue_declare(q, durable=durable, arguments={**DEDUP, **arguments})
    return q


# ------------------------------------------------------------------------ queue argument


def test_queue_drops_duplicates_and_keeps_other_keys(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name)
    for body, key in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a"), ("c1", "c")]:
        publish(ch, q, body.encode(), key)
    assert bodies(ch, q) == ["a1", "b1", "c1"]


def test_messages_without_the_header_are_never_deduplicated(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name)
    for _ in range(3):
        publish(ch, q, b"same body")
    publish(ch, q, b"other header", None, **{"x-other": "a"})
    publish(ch, q, b"other header", None, **{"x-other": "a"})
    assert bodies(ch, q) == ["same body"] * 3 + ["other header"] * 2


def test_keys_of_different_types_are_different_keys(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name)
    publish(ch, q, b"int", 42)
    publish(ch, q, b"str", "42")
    publish(ch, q, b"int again", 42)
    publish(ch, q, b"bool", True)
    publish(ch, q, b"bool again", True)
    assert bodies(ch, q) == ["int", "str", "bool"]


def test_a_key_is_remembered_after_its_message_was_consumed(conn, name):
    """Rill's choice (the plugin's queues forget a key once its message is acked): a copy
    republished after the original was consumed is still dropped."""
    ch = confirming(conn)
    q = dedup_queue(ch, name)
    publish(ch, q, b"first", "order-1")
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"first"
    ch.basic_ack(method.delivery_tag)
    publish(ch, q, b"copy", "order-1")
    ch.queue_purge(q)
    publish(ch, q, b"copy after purge", "order-1")
    assert ready(ch, q) == 0


def test_duplicates_are_confirmed_with_basic_ack(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name, durable=True)
    try:
        # pika raises NackError on a basic.nack: each of these must be acked.
        publish(ch, q, b"one", "k", persistent=True)
        publish(ch, q, b"two", "k", persistent=True)
        publish(ch, q, b"three", "k")
        assert bodies(ch, q) == ["one"]
    finally:
        ch.queue_delete(q)


def test_a_publish_the_queue_refused_is_not_remembered(conn, name):
    """A nacked publish (queue full, x-overflow=reject-publish) can be retried: its key was
    not remembered."""
    ch = confirming(conn)
    q = dedup_queue(ch, name, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    publish(ch, q, b"fills", "a")
    with pytest.raises(pika.exceptions.NackError):
        publish(ch, q, b"refused", "b")
    drain(ch, q)
    publish(ch, q, b"retried", "b")
    assert bodies(ch, q) == ["retried"]


def test_custom_key_header(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name, **{"x-deduplication-header": "msg-id"})
    publish(ch, q, b"1", None, **{"msg-id": "m1"})
    publish(ch, q, b"2", None, **{"msg-id": "m1"})
    # The default header means nothing to this queue.
    publish(ch, q, b"3", "m2")
    publish(ch, q, b"4", "m2")
    assert bodies(ch, q) == ["1", "3", "4"]


def test_cache_size_evicts_the_oldest_key(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name, **{"x-cache-size": 2})
    for key in ["a", "b", "c"]:
        publish(ch, q, key.encode(), key)
    assert bodies(ch, q) == ["a", "b", "c"]
    # "a" was the oldest of three in a cache of two.
    publish(ch, q, b"a again", "a")
    # Now "b" is the oldest and went; "c" and "a" are remembered.
    publish(ch, q, b"c again", "c")
    publish(ch, q, b"b again", "b")
    assert bodies(ch, q) == ["a again", "b again"]


def test_cache_ttl_argument_expires_keys(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name, **{"x-cache-ttl": 50})
    publish(ch, q, b"short", "short")
    # A message's own x-cache-ttl beats the argument: this one is remembered for minutes.
    publish(ch, q, b"long", "long", ttl=600_000)
    assert eventually_accepted(ch, q, "short"), "key not forgotten after x-cache-ttl"
    publish(ch, q, b"long again", "long")
    assert bodies(ch, q) == ["short", "long", "again"]


def test_per_message_cache_ttl_header_expires_its_key(conn, name):
    ch = confirming(conn)
    q = dedup_queue(ch, name, **{"x-cache-ttl": 600_000})
    publish(ch, q, b"brief", "brief", ttl=50)
    publish(ch, q, b"kept", "kept")
    assert eventually_accepted(ch, q, "brief"), "key not forgotten after its x-cache-ttl header"
    publish(ch, q, b"kept again", "kept")
    assert bodies(ch, q) == ["brief", "kept", "again"]


@pytest.mark.parametrize(
    "arguments, text",
    [
        ({"x-cache-size": 0},
         "PRECONDITION_FAILED - Invalid argument, 'x-cache-size' must be an integer greater than 0"),
        ({"x-cache-ttl": "soon"},
         "PRECONDITION_FAILED - Invalid argument, 'x-cache-ttl' must be an integer greater than 0"),
        ({"x-cache-persistence": "tape"},
         "PRECONDITION_FAILED - Invalid argument, 'x-cache-persistence' must be either 'disk' or 'memory'"),
        ({"x-message-deduplication": "yes"},
         "PRECONDITION_FAILED - Invalid argument, 'x-message-deduplication' must be a boolean, not longstr"),
    ],
)
def test_invalid_queue_arguments_are_refused(conn, name, arguments, text):
    ch = conn.channel()
    with channel_closed(406, text):
        ch.queue_declare(name("bad"), arguments={**DEDUP, **arguments})


def test_stream_queues_refuse_deduplication(conn, name):
    ch = conn.channel()
    q = name("stream")
    with channel_closed(406, f"PRECONDITION_FAILED - invalid arg 'x-message-deduplication' for "
                             f"queue '{q}' in vhost '/' of queue type rabbit_stream_queue"):
        ch.queue_declare(q, durable=True, arguments={**DEDUP, "x-queue-type": "stream"})


def test_quorum_queues_deduplicate(conn, name):
    ch = confirming(conn)
    q = name("quorum")
    ch.queue_declare(q, durable=True, arguments={**DEDUP, "x-queue-type": "quorum"})
    try:
        publish(ch, q, b"1", "k", persistent=True)
        publish(ch, q, b"2", "k", persistent=True)
        assert bodies(ch, q) == ["1"]
    finally:
        ch.queue_delete(q)


def test_redeclaring_with_other_cache_arguments_is_refused(conn, name):
    ch = conn.channel()
    q = dedup_queue(ch, name, **{"x-cache-size": 5})
    ch.queue_declare(q, arguments={**DEDUP, "x-cache-size": 5})
    with channel_closed(406, f"PRECONDITION_FAILED - inequivalent arg 'x-cache-size' for queue "
                             f"'{q}' in vhost '/': received '6' but current is '5'"):
        ch.queue_declare(q, arguments={**DEDUP, "x-cache-size": 6})


# ------------------------------------------------------------------------ exchanges


def dedup_exchange(ch, name, durable=False, **arguments) -> str:
    x = name("dedupx")
    ch.exchange_declare(x, "x-message-deduplication", durable=durable,
                        arguments={"x-cache-size": 100, **arguments})
    return x


def bound_queue(ch, name, exchange, durable=False, routing_key="ignored") -> str:
    q = name("q")
    ch.queue_declare(q, durable=durable)
    ch.queue_bind(q, exchange, routing_key)
    return q


def test_exchange_type_routes_no_copy_to_any_queue(conn, name):
    ch = confirming(conn)
    x = dedup_exchange(ch, name)
    q1 = bound_queue(ch, name, x, routing_key="one")
    q2 = bound_queue(ch, name, x, routing_key="two")
    # Fanout routing: the routing key does not matter.
    for body, key in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("none", None)]:
        publish(ch, "anything", body.encode(), key, exchange=x)
    assert bodies(ch, q1) == ["a1", "b1", "none"]
    assert bodies(ch, q2) == ["a1", "b1", "none"]


def test_exchange_duplicate_with_mandatory_is_returned_and_acked(conn, name):
    """As with the plugin: a duplicate routes to no queue, so a mandatory one comes back
    (basic.return 312 NO_ROUTE); it is still confirmed with basic.ack."""
    ch = confirming(conn)
    x = dedup_exchange(ch, name)
    q = bound_queue(ch, name, x)
    publish(ch, "", b"first", "k", exchange=x, mandatory=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        publish(ch, "", b"copy", "k", exchange=x, mandatory=True)
    assert bodies(ch, q) == ["first"]


def test_exchange_cache_size_and_ttl(conn, name):
    ch = confirming(conn)
    x = dedup_exchange(ch, name, **{"x-cache-size": 2, "x-cache-ttl": 600_000})
    q = bound_queue(ch, name, x)
    for key in ["a", "b", "c", "a", "c"]:
        publish(ch, "", key.encode(), key, exchange=x)
    assert bodies(ch, q) == ["a", "b", "c", "a"]
    publish(ch, "", b"brief", "brief", exchange=x, ttl=50)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and ready(ch, q) < 2:
        publish(ch, "", b"brief again", "brief", exchange=x)
        time.sleep(0.02)
    assert bodies(ch, q) == ["brief", "brief again"]


def test_exchange_type_requires_a_cache_size(conn, name):
    ch = conn.channel()
    with channel_closed(406, "PRECONDITION_FAILED - Missing or invalid argument, 'x-cache-size' "
                             "must be an integer greater than 0"):
        ch.exchange_declare(name("x"), "x-message-deduplication")


def test_exchange_type_takes_numbers_written_as_strings(conn, name):
    ch = confirming(conn)
    x = dedup_exchange(ch, name, **{"x-cache-size": "1", "x-cache-ttl": "600000"})
    q = bound_queue(ch, name, x)
    for key in ["a", "a", "b", "a"]:
        publish(ch, "", key.encode(), key, exchange=x)
    assert bodies(ch, q) == ["a", "b", "a"]


def test_lavinmq_exchange_argument_on_a_direct_exchange(conn, name):
    ch = confirming(conn)
    x = name("direct")
    ch.exchange_declare(x, "direct", arguments=DEDUP)
    q = bound_queue(ch, name, x, routing_key="k")
    other = bound_queue(ch, name, x, routing_key="other")
    publish(ch, "k", b"1", "a", exchange=x)
    publish(ch, "k", b"2", "a", exchange=x)
    # The key is the exchange's, whatever the routing key.
    publish(ch, "other", b"3", "a", exchange=x)
    publish(ch, "other", b"4", "b", exchange=x)
    assert bodies(ch, q) == ["1"]
    assert bodies(ch, other) == ["4"]


def test_exchange_redeclare_compares_cache_arguments(conn, name):
    ch = conn.channel()
    x = dedup_exchange(ch, name)
    ch.exchange_declare(x, "x-message-deduplication", arguments={"x-cache-size": 100})
    with channel_closed(406, f"PRECONDITION_FAILED - inequivalent arg 'x-cache-size' for exchange "
                             f"'{x}' in vhost '/': received '7' but current is '100'"):
        ch.exchange_declare(x, "x-message-deduplication", arguments={"x-cache-size": 7})


# ------------------------------------------------------------------------ restarts


def open_channel(broker):
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    return conn, confirming(conn)


def restart(broker, how):
    if how == "kill":
        broker.kill()
    else:
        broker.stop()
    broker.start()


@pytest.mark.parametrize("how", ["kill", "term"])
def test_queue_keys_survive_a_restart(make_broker, how):
    broker = make_broker()
    conn, ch = open_channel(broker)
    q = "dedup.durable"
    ch.queue_declare(q, durable=True, arguments={**DEDUP, "x-cache-size": 1000})
    for i in range(20):
        publish(ch, q, f"m{i}".encode(), f"k{i}", persistent=True)
    # Half of them consumed before the restart: their keys must survive all the same.
    for _ in range(10):
        method, _, _ = ch.basic_get(q, auto_ack=False)
        ch.basic_ack(method.delivery_tag)
    # Acks reach the OS with the next sync round (a confirmed persistent publish), so the
    # consumed messages stay consumed across a kill -9.
    publish(ch, q, b"last", "k-last", persistent=True)
    conn.close()
    restart(broker, how)
    conn, ch = open_channel(broker)
    for i in range(20):
        publish(ch, q, b"copy", f"k{i}", persistent=True)
    publish(ch, q, b"copy", "k-last", persistent=True)
    publish(ch, q, b"new", "k-new", persistent=True)
    assert bodies(ch, q) == [f"m{i}" for i in range(10, 20)] + ["last", "new"]
    conn.close()


def test_exchange_keys_survive_kill_9(make_broker):
    broker = make_broker()
    conn, ch = open_channel(broker)
    x, q = "dedupx.durable", "dedupx.target"
    ch.exchange_declare(x, "x-message-deduplication", durable=True, arguments={"x-cache-size": 100})
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x)
    publish(ch, "", b"original", "k", exchange=x, persistent=True)
    conn.close()
    broker.kill()
    broker.start()
    conn, ch = open_channel(broker)
    publish(ch, "", b"copy", "k", exchange=x, persistent=True)
    assert bodies(ch, q) == ["original"]
    conn.close()


def test_only_persistent_keys_of_disk_caches_survive(make_broker):
    """A transient message does not survive a restart, nor does its key (a copy
    republished afterwards must not be dropped); `x-cache-persistence: memory` keeps no key
    on disk at all."""
    broker = make_broker()
    conn, ch = open_channel(broker)
    disk, memory = "dedup.disk", "dedup.memory"
    ch.queue_declare(disk, durable=True, arguments=DEDUP)
    ch.queue_declare(memory, durable=True, arguments={**DEDUP, "x-cache-persistence": "memory"})
    for q in (disk, memory):
        publish(ch, q, b"persistent", "p", persistent=True)
        publish(ch, q, b"transient", "t")
    conn.close()
    broker.kill()
    broker.start()
    conn, ch = open_channel(broker)
    for q in (disk, memory):
        publish(ch, q, b"p copy", "p", persistent=True)
        publish(ch, q, b"t copy", "t")
    assert bodies(ch, disk) == ["persistent", "t copy"]
    assert bodies(ch, memory) == ["persistent", "p copy", "t copy"]
    conn.close()


def test_a_compacted_key_log_keeps_the_newest_keys(make_broker):
    """Thousands of keys through a cache of 100: the key log is rewritten on the way (one
    generation file is left, far smaller than every record), and after a kill -9 exactly the
    newest 100 keys drop their copies."""
    broker = make_broker()
    q, n, size = "dedup.compact", 5000, 100
    conn, ch = open_channel(broker)
    ch.queue_declare(q, durable=True, arguments={**DEDUP, "x-cache-size": size})
    conn.close()
    pub = ConfirmingPublisher(broker.url, q, count=n, window=256,
                              properties=lambda i: props(f"k{i}", persistent=True))
    pub.start()
    pub.finish(60)
    assert pub.error is None and len(pub.confirmed) == n, (pub.error, len(pub.confirmed))
    broker.kill()
    key_logs = list(broker.data_dir.glob("queues/*/*.keys"))
    assert len(key_logs) == 1, key_logs
    assert key_logs[0].name != "0000000000.keys", "never rewritten"
    # 23 bytes a record: all of them would be 115 kB.
    assert key_logs[0].stat().st_size < n * 23 // 2, key_logs[0].stat().st_size
    broker.start()
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    ch.queue_purge(q)
    # Newest first: a copy of an older key, once accepted, would evict one of them.
    for i in range(n - size, n):
        ch.basic_publish("", q, b"copy", props(f"k{i}", persistent=True))
    assert ready(ch, q) == 0
    ch.basic_publish("", q, b"older", props(f"k{n - size - 1}", persistent=True))
    assert bodies(ch, q) == ["older"]
    conn.close()


@pytest.mark.timeout(120)
def test_kill_9_while_publishing_loses_no_message_and_duplicates_no_confirmed_one(make_broker):
    """Pipelined confirmed publishes of distinct keys, SIGKILL at a random moment, restart,
    then every key republished: each confirmed message is there exactly once, and no message
    is missing (a key on disk without its message would drop the republished copy)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    broker = make_broker()
    q = "dedup.crash"
    conn, ch = open_channel(broker)
    ch.queue_declare(q, durable=True, arguments={**DEDUP, "x-cache-size": 1_000_000})
    conn.close()
    pub = ConfirmingPublisher(broker.url, q, window=rng.choice([8, 64, 256]),
                              properties=lambda n: props(f"k{n}", persistent=True))
    pub.start()
    assert pub.opened.wait(15), f"publisher did not open: {pub.error!r}"
    time.sleep(rng.uniform(0.2, 0.8))
    broker.kill()
    pub.finish(15)
    published = pub.next
    assert pub.confirmed, f"nothing confirmed before the kill (seed={seed})"
    broker.start()
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()  # no confirms: the gets below come after the publishes anyway
    for n in range(published):
        ch.basic_publish("", q, b"%010d" % n, props(f"k{n}", persistent=True))
    counts: dict[int, int] = {}
    for _, _, body in drain(ch, q, limit=10 * published + 10):
        n = body_number(body)
        counts[n] = counts.get(n, 0) + 1
    conn.close()
    missing = [n for n in range(published) if n not in counts]
    assert not missing, f"lost: {missing[:20]} of {published} (seed={seed})"
    twice = [n for n in sorted(pub.confirmed) if counts[n] != 1]
    assert not twice, f"confirmed messages present {[(n, counts[n]) for n in twice[:20]]} times (seed={seed})"
    print(f"seed={seed}: {published} published, {len(pub.confirmed)} confirmed before the kill, "
          f"{sum(c > 1 for c in counts.values())} unconfirmed ones twice")
