"""basic.*: qos, consume/cancel, publish/return, get, ack/nack/reject, recover, ordering."""

import time

import amqp
import pika
import pytest

from conftest import channel_closed, connection_closed, drain, ready, uniq, wait_until


def temp_queue(ch) -> str:
    return ch.queue_declare("", exclusive=True).method.queue


def publish_n(ch, q, n, prefix=""):
    for i in range(n):
        ch.basic_publish("", q, f"{prefix}{i}".encode())


class Collector:
    """A pika consumer callback that records deliveries."""

    def __init__(self, ch=None, ack=False):
        self.ch = ch
        self.ack = ack
        self.got = []  # (method, properties, body)

    def __call__(self, ch, method, properties, body):
        self.got.append((method, properties, body))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    @property
    def bodies(self):
        return [b.decode() for _, _, b in self.got]


def settle(conn, seconds=0.3):
    """Let in-flight deliveries arrive (used before asserting that nothing more came)."""
    conn.process_data_events(time_limit=seconds)


# ----------------------------------------------------------------- qos


def test_prefetch_per_consumer(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    publish_n(ch, q, 5)
    ch.basic_qos(prefetch_count=2)
    c = Collector()
    ch.basic_consume(q, c)
    assert wait_until(lambda: len(c.got) >= 2, conn=conn)
    settle(conn)
    assert c.bodies == ["0", "1"]
    ch.basic_ack(c.got[0][0].delivery_tag)
    assert wait_until(lambda: len(c.got) >= 3, conn=conn)
    settle(conn)
    assert c.bodies == ["0", "1", "2"]
    ch.basic_ack(c.got[2][0].delivery_tag, multiple=True)
    assert wait_until(lambda: len(c.got) == 5, conn=conn)


def test_prefetch_applies_to_each_new_consumer(conn):
    # global=false (RabbitMQ's per_consumer_qos): each consumer gets its own limit.
    ch = conn.channel()
    q1, q2 = temp_queue(ch), temp_queue(ch)
    publish_n(ch, q1, 5)
    publish_n(ch, q2, 5)
    ch.basic_qos(prefetch_count=2)
    c1, c2 = Collector(), Collector()
    ch.basic_consume(q1, c1)
    ch.basic_consume(q2, c2)
    assert wait_until(lambda: len(c1.got) >= 2 and len(c2.got) >= 2, conn=conn)
    settle(conn)
    assert (len(c1.got), len(c2.got)) == (2, 2)


def test_global_prefetch_shared_by_channel(conn):
    ch = conn.channel()
    q1, q2 = temp_queue(ch), temp_queue(ch)
    publish_n(ch, q1, 5)
    publish_n(ch, q2, 5)
    ch.basic_qos(prefetch_count=3, global_qos=True)
    c1, c2 = Collector(), Collector()
    ch.basic_consume(q1, c1)
    ch.basic_consume(q2, c2)
    assert wait_until(lambda: len(c1.got) + len(c2.got) >= 3, conn=conn)
    settle(conn)
    assert len(c1.got) + len(c2.got) == 3
    ch.basic_ack(0, multiple=True)
    assert wait_until(lambda: len(c1.got) + len(c2.got) >= 6, conn=conn)
    settle(conn)
    assert len(c1.got) + len(c2.got) == 6


def test_global_and_per_consumer_prefetch_combine(conn):
    ch = conn.channel()
    q1, q2 = temp_queue(ch), temp_queue(ch)
    publish_n(ch, q1, 5)
    publish_n(ch, q2, 5)
    ch.basic_qos(prefetch_count=1)
    ch.basic_qos(prefetch_count=3, global_qos=True)
    c1, c2 = Collector(), Collector()
    ch.basic_consume(q1, c1)
    ch.basic_consume(q2, c2)
    assert wait_until(lambda: len(c1.got) + len(c2.got) >= 2, conn=conn)
    settle(conn)
    assert (len(c1.got), len(c2.got)) == (1, 1)


def test_prefetch_does_not_limit_no_ack_consumers(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    publish_n(ch, q, 10)
    ch.basic_qos(prefetch_count=1)
    c = Collector()
    ch.basic_consume(q, c, auto_ack=True)
    assert wait_until(lambda: len(c.got) == 10, conn=conn)


def test_prefetch_size_nonzero_is_540(conn):
    ch = conn.channel()
    with connection_closed(540, "NOT_IMPLEMENTED - prefetch_size!=0 (10)"):
        ch.basic_qos(prefetch_size=10)


# ----------------------------------------------------------------- consume / cancel


def test_consume_client_tag_and_cancel(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    c = Collector()
    tag = ch.basic_consume(q, c, auto_ack=True, consumer_tag="my-tag")
    assert tag == "my-tag"
    assert ch.queue_declare(q, passive=True).method.consumer_count == 1
    ch.basic_publish("", q, b"1")
    assert wait_until(lambda: len(c.got) == 1, conn=conn)
    assert c.got[0][0].consumer_tag == "my-tag"
    ch.basic_cancel(tag)
    assert ch.queue_declare(q, passive=True).method.consumer_count == 0
    ch.basic_publish("", q, b"2")
    assert wait_until(lambda: ready(ch, q) == 1)
    assert c.bodies == ["1"]


def test_cancel_unknown_tag_is_ok(ch):
    ch.basic_cancel("never-consumed")
    temp_queue(ch)


def test_consume_server_generated_tag(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        tag = ch.basic_consume(q, callback=lambda m: None)
        assert tag.startswith("amq.ctag-"), tag
        assert tag != ch.basic_consume(q, callback=lambda m: None)
        ch.basic_cancel(tag)
    finally:
        c.close()


def test_duplicate_consumer_tag_is_530(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
        with pytest.raises(amqp.exceptions.NotAllowed) as exc:
            ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
        assert exc.value.reply_code == 530
        assert exc.value.reply_text == "NOT_ALLOWED - attempt to reuse consumer tag 'dup'"
    finally:
        c.collect()


def test_consume_missing_queue_is_404(ch):
    with channel_closed(404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"):
        ch.basic_consume("rilltest.none", lambda *a: None)


def test_exclusive_consume_refused_when_others_consume(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    ch.basic_consume(q, lambda *a: None)
    with channel_closed(403, f"ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use"):
        conn.channel().basic_consume(q, lambda *a: None, exclusive=True)


def test_consume_refused_when_exclusive_consumer_exists(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    ch.basic_consume(q, lambda *a: None, exclusive=True)
    with channel_closed(403, f"ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use"):
        conn.channel().basic_consume(q, lambda *a: None)
    # After cancelling the exclusive consumer, others may consume.
    ch.basic_cancel(ch.consumer_tags[0])
    conn.channel().basic_consume(q, lambda *a: None)


def test_server_cancel_when_queue_deleted(connect):
    conn = connect()
    ch = conn.channel()
    q = uniq("sc")
    ch.queue_declare(q)
    cancels = []
    ch.add_on_cancel_callback(lambda frame: cancels.append(frame.method))
    tag = ch.basic_consume(q, lambda *a: None)
    connect().channel().queue_delete(q)
    assert wait_until(lambda: cancels, conn=conn)
    assert cancels[0].consumer_tag == tag
    assert ch.consumer_tags == []
    # The channel stays usable.
    temp_queue(ch)


def test_server_cancel_via_aio_pika_style_client_py_amqp(broker_addr, connect):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        q = uniq("sc")
        ch.queue_declare(q)
        cancelled = []
        tag = ch.basic_consume(q, callback=lambda m: None, on_cancel=cancelled.append)
        connect().channel().queue_delete(q)
        deadline = time.monotonic() + 10
        while not cancelled and time.monotonic() < deadline:
            try:
                c.drain_events(timeout=0.1)
            except TimeoutError:
                pass
        assert cancelled == [tag]
    finally:
        c.close()


# ----------------------------------------------------------------- publish


def test_mandatory_unroutable_is_returned(conn):
    ch = conn.channel()
    returns = []
    ch.add_on_return_callback(lambda ch_, method, props, body: returns.append((method, props, body)))
    ch.basic_publish("amq.direct", "nowhere", b"lost", pika.BasicProperties(message_id="m1"), mandatory=True)
    assert wait_until(lambda: returns, conn=conn)
    method, props, body = returns[0]
    assert (method.reply_code, method.reply_text) == (312, "NO_ROUTE")
    assert (method.exchange, method.routing_key) == ("amq.direct", "nowhere")
    assert props.message_id == "m1"
    assert body == b"lost"


def test_mandatory_default_exchange_missing_queue_is_returned(conn):
    ch = conn.channel()
    returns = []
    ch.add_on_return_callback(lambda ch_, method, props, body: returns.append(method))
    ch.basic_publish("", uniq("none"), b"lost", mandatory=True)
    assert wait_until(lambda: returns, conn=conn)
    assert returns[0].reply_code == 312
    assert returns[0].exchange == ""


def test_non_mandatory_unroutable_is_dropped_silently(conn):
    ch = conn.channel()
    returns = []
    ch.add_on_return_callback(lambda *a: returns.append(a))
    ch.basic_publish("amq.direct", "nowhere", b"lost")
    settle(conn)
    assert returns == []
    temp_queue(ch)


def test_mandatory_routed_is_not_returned(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    returns = []
    ch.add_on_return_callback(lambda *a: returns.append(a))
    ch.basic_publish("", q, b"kept", mandatory=True)
    settle(conn)
    assert returns == []
    assert drain(ch, q)[0][2] == b"kept"


def test_publish_immediate_is_540(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    ch = c.channel()
    ch.basic_publish(amqp.Message(b"x"), routing_key="whatever", immediate=True)
    with pytest.raises(amqp.exceptions.AMQPNotImplementedError) as exc:
        ch.queue_declare("", exclusive=True)
    assert exc.value.reply_code == 540
    assert exc.value.reply_text == "NOT_IMPLEMENTED - immediate=true"
    c.collect()


# ----------------------------------------------------------------- get


def test_get_message_count_and_empty(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 3)
    counts = []
    for i in range(3):
        method, _, body = ch.basic_get(q, auto_ack=True)
        assert body == str(i).encode()
        assert method.redelivered is False
        assert method.exchange == "" and method.routing_key == q
        counts.append(method.message_count)
    assert counts == [2, 1, 0]
    assert ch.basic_get(q) == (None, None, None)


def test_get_missing_queue_is_404(ch):
    with channel_closed(404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'"):
        ch.basic_get("rilltest.none")


def test_get_delivery_tags_increase_per_channel(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 3)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    assert tags == [1, 2, 3]
    ch.basic_ack(3, multiple=True)


# ----------------------------------------------------------------- ack / nack / reject


def test_requeued_messages_keep_position_and_are_redelivered(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 6)
    gets = [ch.basic_get(q) for _ in range(4)]
    ch.basic_reject(gets[2][0].delivery_tag, requeue=True)
    ch.basic_nack(gets[0][0].delivery_tag, requeue=True)
    got = [(b.decode(), m.redelivered) for m, _, b in drain(ch, q)]
    assert got == [("0", True), ("2", True), ("4", False), ("5", False)]


def test_ack_multiple(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 5)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(5)]
    ch.basic_ack(tags[2], multiple=True)
    ch.basic_recover(requeue=True)
    assert [b for _, _, b in drain(ch, q)] == [b"3", b"4"]


def test_ack_zero_multiple_acks_everything(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 3)
    for _ in range(3):
        ch.basic_get(q)
    ch.basic_ack(0, multiple=True)
    ch.basic_recover(requeue=True)
    assert drain(ch, q) == []


def test_nack_multiple_requeue(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 4)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(4)]
    ch.basic_nack(tags[2], multiple=True, requeue=True)
    got = [(b.decode(), m.redelivered) for m, _, b in drain(ch, q)]
    assert got == [("0", True), ("1", True), ("2", True)]
    ch.basic_ack(tags[3])


def test_nack_and_reject_without_requeue_discard(ch):
    q = temp_queue(ch)
    publish_n(ch, q, 3)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    ch.basic_reject(tags[0], requeue=False)
    ch.basic_nack(tags[2], multiple=True, requeue=False)
    ch.basic_recover(requeue=True)
    assert drain(ch, q) == []


@pytest.mark.parametrize("op", ["ack", "nack", "reject", "ack-multiple", "double-ack", "ack-auto-acked"])
def test_unknown_delivery_tag_is_406(conn, op):
    ch = conn.channel()
    q = temp_queue(ch)
    ch.basic_publish("", q, b"x")
    if op == "double-ack":
        tag = ch.basic_get(q)[0].delivery_tag
        ch.basic_ack(tag)
        ch.basic_ack(tag)
    elif op == "ack-auto-acked":
        tag = ch.basic_get(q, auto_ack=True)[0].delivery_tag
        ch.basic_ack(tag)
    else:
        tag = 5
        {
            "ack": lambda: ch.basic_ack(5),
            "nack": lambda: ch.basic_nack(5),
            "reject": lambda: ch.basic_reject(5),
            "ack-multiple": lambda: ch.basic_ack(5, multiple=True),
        }[op]()
    with channel_closed(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}"):
        ch.queue_declare("", exclusive=True)
    # Only the channel is gone; the message is back in the queue.
    assert conn.is_open
    left = 0 if op.startswith(("double", "ack-auto")) else 1
    check = conn.channel()
    assert wait_until(lambda: ready(check, q) == left)


def test_delivery_tag_from_another_channel_is_unknown(conn):
    ch1, ch2 = conn.channel(), conn.channel()
    q = temp_queue(ch1)
    publish_n(ch1, q, 2)
    ch1.basic_get(q)
    ch2.basic_get(q)
    ch2.basic_ack(1)
    with channel_closed(406, "PRECONDITION_FAILED - unknown delivery tag 2"):
        ch2.basic_ack(2)
        ch2.queue_declare("", exclusive=True)


def test_recover_requeue_redelivers(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    ch.basic_publish("", q, b"r")
    c = Collector()
    ch.basic_consume(q, c)
    assert wait_until(lambda: len(c.got) == 1, conn=conn)
    ch.basic_recover(requeue=True)
    assert wait_until(lambda: len(c.got) == 2, conn=conn)
    (m1, _, b1), (m2, _, b2) = c.got
    assert (b1, m1.redelivered, m1.delivery_tag) == (b"r", False, 1)
    assert (b2, m2.redelivered, m2.delivery_tag) == (b"r", True, 2)
    ch.basic_ack(2)


def test_recover_without_requeue_is_540(conn):
    # RabbitMQ 3.x does not implement basic.recover{requeue=false}: a connection error.
    ch = conn.channel()
    with connection_closed(540, "NOT_IMPLEMENTED - requeue=false"):
        ch.basic_recover(requeue=False)


def test_recover_async(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        ch.basic_publish(amqp.Message(b"r"), routing_key=q)
        m = ch.basic_get(q)
        assert m.body == b"r" and not m.delivery_info["redelivered"]
        ch.basic_recover_async(requeue=True)
        m2 = None
        deadline = time.monotonic() + 10
        while m2 is None and time.monotonic() < deadline:
            m2 = ch.basic_get(q)
        assert m2.body == b"r" and m2.delivery_info["redelivered"]
    finally:
        c.close()


# ----------------------------------------------------------------- distribution and order


def test_round_robin_between_consumers(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    a, b = Collector(), Collector()
    ch.basic_consume(q, a, auto_ack=True)
    ch.basic_consume(q, b, auto_ack=True)
    publish_n(ch, q, 10)
    assert wait_until(lambda: len(a.got) + len(b.got) == 10, conn=conn)
    assert a.bodies == ["0", "2", "4", "6", "8"]
    assert b.bodies == ["1", "3", "5", "7", "9"]


def test_round_robin_honours_prefetch(connect):
    conn = connect()
    slow_ch, fast_ch = conn.channel(), conn.channel()
    q = temp_queue(slow_ch)
    slow_ch.basic_qos(prefetch_count=1)
    fast_ch.basic_qos(prefetch_count=100)
    slow, fast = Collector(), Collector(ack=True)
    slow_ch.basic_consume(q, slow)        # never acks: gets exactly one
    fast_ch.basic_consume(q, fast)
    publish_n(fast_ch, q, 20)
    assert wait_until(lambda: len(slow.got) + len(fast.got) == 20, conn=conn)
    settle(conn)
    assert len(slow.got) == 1


def test_fifo_single_consumer(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    publish_n(ch, q, 1000)
    c = Collector()
    ch.basic_consume(q, c, auto_ack=True)
    assert wait_until(lambda: len(c.got) == 1000, conn=conn)
    assert c.bodies == [str(i) for i in range(1000)]


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_unacked_requeued_on_close(connect, closing):
    keeper = connect().channel()
    q = uniq("requeue")
    keeper.queue_declare(q, auto_delete=False)
    publish_n(keeper, q, 5)
    conn = connect()
    ch = conn.channel()
    ch.basic_qos(prefetch_count=3)
    c = Collector()
    tag = ch.basic_consume(q, c)
    assert wait_until(lambda: len(c.got) == 3, conn=conn)
    # Cancelling leaves the deliveries unacked; acking one after the cancel still counts.
    ch.basic_cancel(tag)
    ch.basic_ack(c.got[0][0].delivery_tag)
    if closing == "channel":
        ch.close()
    else:
        conn.close()
    assert wait_until(lambda: ready(keeper, q) == 4)
    got = [(b.decode(), m.redelivered) for m, _, b in drain(keeper, q)]
    assert got == [("1", True), ("2", True), ("3", False), ("4", False)]
    keeper.queue_delete(q)


def test_channel_error_keeps_other_channels(conn):
    ok = conn.channel()
    q = temp_queue(ok)
    bad = conn.channel()
    with channel_closed(404):
        bad.queue_declare("rilltest.none", passive=True)
    ok.basic_publish("", q, b"still fine")
    assert drain(ok, q)[0][2] == b"still fine"
    # A new channel can be opened after the error.
    again = conn.channel()
    again.basic_publish("", q, b"again")
    assert drain(again, q)[0][2] == b"again"


def test_consumer_priorities(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    low, high = Collector(), Collector()
    ch.basic_consume(q, low, auto_ack=True, arguments={"x-priority": 0})
    ch.basic_consume(q, high, auto_ack=True, arguments={"x-priority": 10})
    publish_n(ch, q, 10)
    assert wait_until(lambda: len(low.got) + len(high.got) == 10, conn=conn)
    assert (len(high.got), len(low.got)) == (10, 0)


def test_consumer_priority_falls_back_when_high_is_full(connect):
    conn = connect()
    high_ch, low_ch = conn.channel(), conn.channel()
    q = temp_queue(high_ch)
    high_ch.basic_qos(prefetch_count=2)
    high, low = Collector(), Collector()
    high_ch.basic_consume(q, high, arguments={"x-priority": 5})   # never acks
    low_ch.basic_consume(q, low, auto_ack=True)
    publish_n(high_ch, q, 6)
    assert wait_until(lambda: len(low.got) + len(high.got) == 6, conn=conn)
    assert high.bodies == ["0", "1"]
    assert low.bodies == ["2", "3", "4", "5"]


def test_nowait_methods(broker_addr):
    # Clients such as kombu and lapin may send declare/bind/consume with nowait=true;
    # the broker must apply them without replying.
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        x, q = uniq("nw"), uniq("nw")
        ch.exchange_declare(x, "direct", auto_delete=True, nowait=True)
        ch.queue_declare(q, auto_delete=True, nowait=True)
        ch.queue_bind(q, x, "k", nowait=True)
        got = []
        ch.basic_consume(q, consumer_tag="nw", no_ack=True, callback=got.append, nowait=True)
        ch.basic_publish(amqp.Message(b"through"), exchange=x, routing_key="k")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            try:
                c.drain_events(timeout=0.1)
            except TimeoutError:
                pass
        assert [m.body for m in got] == [b"through"]
        assert got[0].delivery_info["consumer_tag"] == "nw"
    finally:
        c.close()


def test_direct_reply_to(connect):
    # Advertised via the direct_reply_to capability; RPC clients rely on it.
    client_conn = connect()
    client = client_conn.channel()
    replies = Collector()
    client.basic_consume("amq.rabbitmq.reply-to", replies, auto_ack=True)
    server = connect().channel()
    q = temp_queue(server)
    client.basic_publish("", q, b"request", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    assert wait_until(lambda: ready(server, q) == 1)
    _, props, body = server.basic_get(q, auto_ack=True)
    assert body == b"request"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to.")
    server.basic_publish("", props.reply_to, b"response")
    assert wait_until(lambda: replies.got, conn=client_conn)
    assert replies.bodies == ["response"]


def test_qos_change_does_not_affect_existing_consumer(conn):
    # Per-consumer prefetch is fixed when the consumer starts (RabbitMQ's per_consumer_qos).
    ch = conn.channel()
    q = temp_queue(ch)
    publish_n(ch, q, 6)
    ch.basic_qos(prefetch_count=1)
    c = Collector()
    ch.basic_consume(q, c)
    assert wait_until(lambda: len(c.got) >= 1, conn=conn)
    ch.basic_qos(prefetch_count=4)
    ch.basic_ack(c.got[0][0].delivery_tag)
    assert wait_until(lambda: len(c.got) >= 2, conn=conn)
    settle(conn)
    assert len(c.got) == 2
