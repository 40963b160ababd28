"""RabbitMQ queue extensions, part 1: TTL, x-expires, length limits, dead-lettering, x-death.

Every expectation here was observed on RabbitMQ 3.10 (issue 6). Timing-based tests use TTLs of
100-300 ms and bounded waits; none asserts on speed.

Observed RabbitMQ facts these tests pin down:

* A dead-lettered message is published to the DLX with its original routing key (or
  x-dead-letter-routing-key), its properties and headers kept, and `expiration` removed (its
  value moves to the x-death entry as `original-expiration`, whatever the reason).
* x-death is an array of tables, most recent death first. A new entry written on a message with
  no x-death has the keys in the order count, reason, queue, time, exchange, routing-keys
  [, original-expiration]; any entry written or updated while x-death already exists has its keys
  sorted. `count` is a signed 64-bit ('l'), `time` a timestamp ('T') that is NOT updated when the
  count is incremented; entries are matched on (queue, reason, exchange).
* x-first-death-reason/queue/exchange are set on the first death and never changed.
* A message that would be dead-lettered back into a queue it already died in, with no rejection
  anywhere in the cycle, is dropped; a cycle that includes a rejection is not.
* Per-message TTL only expires messages at the head of the queue.
"""

import datetime
import time

import pika
import pika.compat
import pika.exceptions
import pytest

from conftest import channel_closed, drain, ready, uniq, wait_until

FIRST_ENTRY_KEYS = ["count", "reason", "queue", "time", "exchange", "routing-keys"]
SORTED_ENTRY_KEYS = sorted(FIRST_ENTRY_KEYS)


# ----------------------------------------------------------------------------- helpers


def temp_queue(ch, **arguments) -> str:
    return ch.queue_declare("", exclusive=True, arguments=arguments or None).method.queue


def dead_letter_target(ch, kind="fanout", key=""):
    """A DLX of `kind` and an exclusive queue bound to it with `key`: (exchange, queue)."""
    x = uniq("dlx")
    ch.exchange_declare(x, kind, auto_delete=True)
    q = temp_queue(ch)
    ch.queue_bind(q, x, key)
    return x, q


def get_one(ch, queue, timeout=5.0, auto_ack=True):
    """Poll basic.get until a message arrives: (method, props, body); fails after `timeout`."""
    got = []

    def poll():
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            got.append((method, props, body))
        return bool(got)

    assert wait_until(poll, timeout=timeout, interval=0.05), f"nothing arrived in {queue}"
    return got[0]


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def assert_recent(ts: datetime.datetime):
    # 'T' timestamps have whole-second resolution.
    assert isinstance(ts, datetime.datetime)
    assert abs((now_utc() - ts).total_seconds()) < 30


def assert_first_death(headers, reason, queue, exchange=""):
    assert headers["x-first-death-reason"] == reason
    assert headers["x-first-death-queue"] == queue
    assert headers["x-first-death-exchange"] == exchange


# ----------------------------------------------------------------------------- TTL


def test_message_ttl_expired_messages_are_never_delivered(conn):
    ch = conn.channel()
    q = temp_queue(ch, **{"x-message-ttl": 200})
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    time.sleep(0.5)
    assert ch.basic_get(q, auto_ack=True) == (None, None, None)
    assert ready(ch, q) == 0
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    conn.process_data_events(time_limit=0.3)
    assert got == []
    # A fresh message within its TTL is delivered normally.
    ch.basic_publish("", q, b"fresh")
    assert wait_until(lambda: got, conn=conn)
    assert got == [b"fresh"]


def test_message_ttl_dead_letters_with_reason_expired(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-message-ttl": 200, "x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"late", pika.BasicProperties(headers={"app": "kept"}, message_id="m1"))
    method, props, body = get_one(ch, dlq)
    assert ch.basic_get(q) == (None, None, None)
    assert body == b"late"
    assert (method.exchange, method.routing_key, method.redelivered) == (dlx, q, False)
    assert props.message_id == "m1"
    assert props.expiration is None
    h = props.headers
    assert list(h) == ["app", "x-death", "x-first-death-exchange", "x-first-death-queue",
                       "x-first-death-reason"]
    assert h["app"] == "kept"
    [death] = h["x-death"]
    assert list(death) == FIRST_ENTRY_KEYS  # no original-expiration: queue TTL, not per-message
    assert death["count"] == 1 and isinstance(death["count"], pika.compat.long)
    assert (death["reason"], death["queue"], death["exchange"], death["routing-keys"]) == \
        ("expired", q, "", [q])
    assert_recent(death["time"])
    assert_first_death(h, "expired", q)


def test_per_message_expiration_only_at_head(ch):
    # RabbitMQ drops an expired message when it reaches the head: one behind a long-lived
    # message stays until then, but is never delivered.
    q = temp_queue(ch)
    ch.basic_publish("", q, b"long", pika.BasicProperties(expiration="60000"))
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", q, b"none")
    time.sleep(0.4)
    _, props, body = ch.basic_get(q, auto_ack=True)
    assert (body, props.expiration) == (b"long", "60000")
    _, props, body = ch.basic_get(q, auto_ack=True)
    assert (body, props.expiration) == (b"none", None)
    assert ch.basic_get(q) == (None, None, None)


def test_per_message_expiration_dead_letter_records_original_expiration(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"b", pika.BasicProperties(expiration="200"))
    method, props, body = get_one(ch, dlq)
    assert (method.exchange, method.routing_key, body) == (dlx, q, b"b")
    assert props.expiration is None
    [death] = props.headers["x-death"]
    assert list(death) == FIRST_ENTRY_KEYS + ["original-expiration"]
    assert (death["count"], death["reason"], death["queue"], death["exchange"],
            death["routing-keys"], death["original-expiration"]) == (1, "expired", q, "", [q], "200")
    assert_first_death(props.headers, "expired", q)


def queue_gone(conn, q, timeout=6.0) -> bool:
    """Poll with passive declares, slower than the 200 ms lease: each declare renews it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.6)
        ch = conn.channel()
        try:
            ch.queue_declare(q, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert (e.reply_code, e.reply_text) == (404, f"NOT_FOUND - no queue '{q}' in vhost '/'")
            return True
        ch.close()
    return False


def test_x_expires_deletes_unused_queue(conn):
    ch = conn.channel()
    q = uniq("expires")
    ch.queue_declare(q, arguments={"x-expires": 200})
    assert queue_gone(conn, q)


def test_x_expires_waits_while_consumed(conn):
    ch = conn.channel()
    q = uniq("expires")
    ch.queue_declare(q, arguments={"x-expires": 200})
    tag = ch.basic_consume(q, lambda *a: None)
    conn.process_data_events(time_limit=0.8)
    ok = ch.queue_declare(q, passive=True).method
    assert (ok.consumer_count, ok.message_count) == (1, 0)
    ch.basic_cancel(tag)
    assert queue_gone(conn, q)


# ----------------------------------------------------------------------------- length limits


def test_max_length_drop_head_dead_letters_with_reason_maxlen(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-max-length": 2, "x-dead-letter-exchange": dlx})
    for i in range(4):
        ch.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: ready(ch, dlq) == 2)
    assert [b for _, _, b in drain(ch, q)] == [b"2", b"3"]
    dead = drain(ch, dlq)
    assert [b for _, _, b in dead] == [b"0", b"1"]
    for method, props, _ in dead:
        assert (method.exchange, method.routing_key) == (dlx, q)
        [death] = props.headers["x-death"]
        assert list(death) == FIRST_ENTRY_KEYS
        assert (death["count"], death["reason"], death["queue"], death["exchange"],
                death["routing-keys"]) == (1, "maxlen", q, "", [q])
        assert_first_death(props.headers, "maxlen", q)


def test_max_length_bytes_counts_body_bytes(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-max-length-bytes": 10, "x-dead-letter-exchange": dlx})
    for body in [b"aaaa", b"bbbb", b"cccc", b"dd"]:  # 14 bytes: the head (4) must go
        ch.basic_publish("", q, body)
    assert wait_until(lambda: ready(ch, dlq) == 1)
    assert [b for _, _, b in drain(ch, q)] == [b"bbbb", b"cccc", b"dd"]
    [(_, props, body)] = drain(ch, dlq)
    assert body == b"aaaa"
    assert props.headers["x-death"][0]["reason"] == "maxlen"


def test_overflow_reject_publish_nacks_without_dead_lettering(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-max-length": 1, "x-overflow": "reject-publish",
                          "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"2")
    assert [b for _, _, b in drain(ch, q)] == [b"1"]
    assert ready(ch, dlq) == 0
    ch.basic_publish("", q, b"3")  # room again: acked
    assert [b for _, _, b in drain(ch, q)] == [b"3"]


def test_overflow_reject_publish_dlx_nacks_and_dead_letters(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-max-length": 1, "x-overflow": "reject-publish-dlx",
                          "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"2")
    method, props, body = get_one(ch, dlq)
    assert (method.exchange, method.routing_key, body) == (dlx, q, b"2")
    [death] = props.headers["x-death"]
    assert (death["count"], death["reason"], death["queue"], death["exchange"],
            death["routing-keys"]) == (1, "maxlen", q, "", [q])
    assert_first_death(props.headers, "maxlen", q)
    assert [b for _, _, b in drain(ch, q)] == [b"1"]


# ----------------------------------------------------------------------------- dead-lettering


def test_reject_and_nack_dead_letter_with_routing_key(ch):
    dlx, dlq = dead_letter_target(ch, "direct", "dead")
    q = temp_queue(ch, **{"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    ch.basic_publish("", q, b"r")
    ch.basic_publish("", q, b"n1", pika.BasicProperties(expiration="60000"))
    ch.basic_publish("", q, b"n2")
    r = ch.basic_get(q)[0]
    ch.basic_reject(r.delivery_tag, requeue=False)
    ch.basic_get(q)
    n2 = ch.basic_get(q)[0]
    ch.basic_nack(n2.delivery_tag, multiple=True, requeue=False)
    assert wait_until(lambda: ready(ch, dlq) == 3)
    dead = drain(ch, dlq)
    assert [b for _, _, b in dead] == [b"r", b"n1", b"n2"]
    for method, props, body in dead:
        # Routed by x-dead-letter-routing-key; x-death keeps the original key.
        assert (method.exchange, method.routing_key) == (dlx, "dead")
        [death] = props.headers["x-death"]
        assert (death["count"], death["reason"], death["queue"], death["exchange"],
                death["routing-keys"]) == (1, "rejected", q, "", [q])
        assert_first_death(props.headers, "rejected", q)
        assert props.expiration is None
    # Expiration is moved into x-death on rejection too.
    assert list(dead[1][1].headers["x-death"][0]) == FIRST_ENTRY_KEYS + ["original-expiration"]
    assert dead[1][1].headers["x-death"][0]["original-expiration"] == "60000"
    assert list(dead[0][1].headers["x-death"][0]) == FIRST_ENTRY_KEYS
    assert ready(ch, q) == 0


def test_reject_requeue_true_does_not_dead_letter(ch):
    dlx, dlq = dead_letter_target(ch)
    q = temp_queue(ch, **{"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"again")
    ch.basic_reject(ch.basic_get(q)[0].delivery_tag, requeue=True)
    method, props, body = ch.basic_get(q, auto_ack=True)
    assert (body, method.redelivered, props.headers) == (b"again", True, None)
    assert ready(ch, dlq) == 0


def test_dead_letter_exchange_missing_drops_silently(ch):
    q = temp_queue(ch, **{"x-dead-letter-exchange": uniq("absent")})
    ch.basic_publish("", q, b"gone")
    ch.basic_reject(ch.basic_get(q)[0].delivery_tag, requeue=False)
    assert ready(ch, q) == 0
    ch.basic_publish("", q, b"channel still open")
    assert drain(ch, q)[0][2] == b"channel still open"


def test_x_death_counts_in_retry_loop(ch):
    # work queue --reject--> retry exchange --> retry queue (TTL) --expire--> work exchange --> work queue
    work_x, retry_x = uniq("work"), uniq("retry")
    ch.exchange_declare(work_x, "direct", auto_delete=True)
    ch.exchange_declare(retry_x, "direct", auto_delete=True)
    work_q = temp_queue(ch, **{"x-dead-letter-exchange": retry_x})
    retry_q = temp_queue(ch, **{"x-dead-letter-exchange": work_x, "x-message-ttl": 100})
    ch.queue_bind(work_q, work_x, "job")
    ch.queue_bind(retry_q, retry_x, "job")
    ch.basic_publish(work_x, "job", b"job", pika.BasicProperties(headers={"orig": "y"}))

    seen = []
    for attempt in range(4):
        method, props, body = get_one(ch, work_q, auto_ack=False)
        assert (method.exchange, method.routing_key, body) == (work_x, "job", b"job")
        seen.append(props.headers)
        ch.basic_reject(method.delivery_tag, requeue=False)

    assert seen[0] == {"orig": "y"}
    first_times = None
    for n, headers in enumerate(seen[1:], start=1):
        assert list(headers) == ["orig", "x-death", "x-first-death-exchange",
                                 "x-first-death-queue", "x-first-death-reason"]
        expired, rejected = headers["x-death"]  # most recent death first
        assert (expired["count"], expired["reason"], expired["queue"], expired["exchange"],
                expired["routing-keys"]) == (n, "expired", retry_q, retry_x, ["job"])
        assert (rejected["count"], rejected["reason"], rejected["queue"], rejected["exchange"],
                rejected["routing-keys"]) == (n, "rejected", work_q, work_x, ["job"])
        assert_first_death(headers, "rejected", work_q, work_x)
        # The very first entry keeps the insertion order; every later write sorts the keys.
        assert list(expired) == SORTED_ENTRY_KEYS
        assert list(rejected) == (FIRST_ENTRY_KEYS if n == 1 else SORTED_ENTRY_KEYS)
        times = (expired["time"], rejected["time"])
        first_times = first_times or times
        assert times == first_times  # time is the first death's, not refreshed with the count


def test_expiry_cycle_is_dropped(ch):
    # Expired back into its own queue with no rejection in the cycle: RabbitMQ drops it.
    q = uniq("cycle")
    ch.queue_declare(q, exclusive=True,
                     arguments={"x-message-ttl": 100, "x-dead-letter-exchange": ""})
    ch.basic_publish("", q, b"cycle")
    time.sleep(0.5)
    assert ready(ch, q) == 0
    assert ch.basic_get(q) == (None, None, None)


def test_rejection_cycle_is_not_dropped(ch):
    # A cycle that includes a rejection is allowed: the count keeps growing.
    q = uniq("cycle")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": ""})
    ch.basic_publish("", q, b"again")
    counts = []
    for _ in range(3):
        method, props, body = get_one(ch, q, auto_ack=False)
        assert (method.exchange, method.routing_key, body) == ("", q, b"again")
        counts.append(props.headers["x-death"][0]["count"] if props.headers else 0)
        ch.basic_reject(method.delivery_tag, requeue=False)
    assert counts == [0, 1, 2]
    [death] = get_one(ch, q)[1].headers["x-death"]
    assert (death["count"], death["reason"], death["queue"], death["exchange"],
            death["routing-keys"]) == (3, "rejected", q, "", [q])
