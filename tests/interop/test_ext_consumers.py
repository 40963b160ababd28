"""RabbitMQ queue extensions, part 2: priority queues, single active consumer, consumer
priorities, x-cancel-on-ha-failover, direct reply-to, alternate exchanges.

Every expectation here was observed on RabbitMQ 3.10 (issue 6). Notable facts:

* x-max-priority: a message without a priority counts as 0, one above the maximum as the maximum
  (its `priority` property is delivered unchanged); FIFO within a level. 0 is accepted as a max.
* x-single-active-consumer must be a boolean; an exclusive consume on such a queue is refused
  with 403. The active consumer is the earliest registered one still present.
* Direct reply-to: publishing with reply_to=amq.rabbitmq.reply-to on a channel that is not
  consuming from it closes the channel (406); the reply consumer must be no-ack (406 otherwise);
  the reply arrives with exchange "" and the full generated reply-to name as routing key.
"""

import pika
import pika.exceptions
import pytest

from conftest import channel_closed, drain, ready, uniq, wait_until


def temp_queue(ch, **arguments) -> str:
    return ch.queue_declare("", exclusive=True, arguments=arguments or None).method.queue


def shared_queue(ch, **arguments) -> str:
    """A queue other connections may consume from; deleted with its last consumer."""
    q = uniq("shared")
    ch.queue_declare(q, auto_delete=True, arguments=arguments or None)
    return q


class Collector:
    """A pika consumer callback that records bodies (acking them if `ack`)."""

    def __init__(self, ack=True):
        self.ack = ack
        self.got = []  # (method, properties, body)

    def __call__(self, ch, method, properties, body):
        self.got.append((method, properties, body))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    @property
    def bodies(self):
        return [b.decode() for _, _, b in self.got]


def pump(*conns, seconds=0.3):
    """Let in-flight deliveries arrive on every connection."""
    for _ in range(max(1, int(seconds / 0.05))):
        for c in conns:
            c.process_data_events(time_limit=0.05 / len(conns))


# ----------------------------------------------------------------------------- priority queues


def test_priority_queue_order(ch):
    q = temp_queue(ch, **{"x-max-priority": 5})
    sent = [("a", None), ("b", 1), ("c", 5), ("d", 9), ("e", 1), ("f", 0), ("g", 5), ("h", 255),
            ("i", 3)]
    for body, priority in sent:
        ch.basic_publish("", q, body.encode(), pika.BasicProperties(priority=priority))
    assert wait_until(lambda: ready(ch, q) == len(sent))
    got = [(b.decode(), p.priority) for _, p, b in drain(ch, q)]
    # 9 and 255 rank as 5 (the max) and keep their arrival order among the 5s; none ranks as 0.
    assert got == [("c", 5), ("d", 9), ("g", 5), ("h", 255), ("i", 3), ("b", 1), ("e", 1),
                   ("a", None), ("f", 0)]


def test_priority_queue_orders_consumer_backlog(conn):
    ch = conn.channel()
    q = temp_queue(ch, **{"x-max-priority": 10})
    for i, priority in enumerate([1, 2, 3, 10, 0]):
        ch.basic_publish("", q, str(i).encode(), pika.BasicProperties(priority=priority))
    assert wait_until(lambda: ready(ch, q) == 5)
    c = Collector()
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(q, c)
    assert wait_until(lambda: len(c.got) == 5, conn=conn)
    assert c.bodies == ["3", "2", "1", "0", "4"]


@pytest.mark.parametrize(
    "value, detail",
    [(256, "{max_value_exceeded,256}"), (-1, "{value_negative,-1}"),
     ("5", '"expected integer, got longstr"')],
    ids=["256", "negative", "string"],
)
def test_max_priority_invalid(ch, value, detail):
    q = uniq("pri")
    with channel_closed(406, f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue "
                             f"'{q}' in vhost '/': {detail}"):
        ch.queue_declare(q, exclusive=True, arguments={"x-max-priority": value})


# ----------------------------------------------------------------------------- single active consumer


def test_single_active_consumer_takeover(connect):
    conn_a, conn_b = connect(), connect()
    ch_a, ch_b = conn_a.channel(), conn_b.channel()
    q = shared_queue(ch_a, **{"x-single-active-consumer": True})
    a, b, c = Collector(), Collector(), Collector()
    tag_a = ch_a.basic_consume(q, a)
    ch_b.basic_consume(q, b)
    ch_a.basic_consume(q, c)
    for i in range(3):
        ch_a.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: len(a.got) == 3, conn=conn_a)
    pump(conn_a, conn_b)
    assert (a.bodies, b.bodies, c.bodies) == (["0", "1", "2"], [], [])

    # Cancelling the active consumer hands over to the next in registration order (b, on
    # another connection), not to c on a's own channel.
    ch_a.basic_cancel(tag_a)
    for i in range(3, 6):
        ch_a.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: len(b.got) == 3, conn=conn_b)
    pump(conn_a, conn_b)
    assert (b.bodies, c.bodies) == (["3", "4", "5"], [])

    # Closing b's connection hands over to c.
    conn_b.close()
    for i in range(6, 9):
        ch_a.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: len(c.got) == 3, conn=conn_a)
    assert c.bodies == ["6", "7", "8"]
    assert ch_a.queue_declare(q, passive=True).method.consumer_count == 1


def test_single_active_consumer_unacked_go_to_next(connect):
    conn_a, conn_b = connect(), connect()
    ch_a, ch_b = conn_a.channel(), conn_b.channel()
    q = shared_queue(ch_b, **{"x-single-active-consumer": True})
    ch_a.basic_qos(prefetch_count=2)
    a, b = Collector(ack=False), Collector()
    ch_a.basic_consume(q, a)
    ch_b.basic_consume(q, b)
    for i in range(4):
        ch_b.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: len(a.got) == 2, conn=conn_a)
    pump(conn_a, conn_b)
    assert b.got == []  # b waits even though a is at its prefetch limit
    conn_a.close()
    assert wait_until(lambda: len(b.got) == 4, conn=conn_b)
    assert b.bodies == ["0", "1", "2", "3"]
    assert [m.redelivered for m, _, _ in b.got] == [True, True, False, False]


def test_single_active_consumer_refuses_exclusive_consume(ch):
    q = temp_queue(ch, **{"x-single-active-consumer": True})
    with channel_closed(403, f"ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use"):
        ch.basic_consume(q, Collector(), exclusive=True)


@pytest.mark.parametrize("value, kind", [("true", "longstr"), (1, "signedint")])
def test_single_active_consumer_must_be_boolean(ch, value, kind):
    q = uniq("sac")
    with channel_closed(406, f"PRECONDITION_FAILED - invalid arg 'x-single-active-consumer' for "
                             f"queue '{q}' in vhost '/': {{unacceptable_type,{kind}}}"):
        ch.queue_declare(q, exclusive=True, arguments={"x-single-active-consumer": value})


# ----------------------------------------------------------------------------- consumer priorities


def test_consumer_priorities_x_priority(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    ch.basic_qos(prefetch_count=2)
    low, mid, high = Collector(ack=False), Collector(ack=False), Collector(ack=False)
    ch.basic_consume(q, low, arguments={"x-priority": -5})
    ch.basic_consume(q, mid)  # default priority 0
    ch.basic_consume(q, high, arguments={"x-priority": 10})
    for i in range(7):
        ch.basic_publish("", q, str(i).encode())
    assert wait_until(lambda: len(low.got) + len(mid.got) + len(high.got) == 6, conn=conn)
    pump(conn)
    # Each takes up to its prefetch, highest priority first; the 7th waits.
    assert (high.bodies, mid.bodies, low.bodies) == (["0", "1"], ["2", "3"], ["4", "5"])
    # Capacity freed on the high-priority consumer goes to it.
    ch.basic_ack(high.got[0][0].delivery_tag)
    assert wait_until(lambda: len(high.got) == 3, conn=conn)
    assert high.bodies[-1] == "6"


def test_cancel_on_ha_failover_is_accepted(conn):
    ch = conn.channel()
    q = temp_queue(ch)
    c = Collector()
    ch.basic_consume(q, c, arguments={"x-cancel-on-ha-failover": True})
    ch.basic_publish("", q, b"ok")
    assert wait_until(lambda: c.got, conn=conn)
    assert c.bodies == ["ok"]


# ----------------------------------------------------------------------------- direct reply-to


def test_direct_reply_to_rpc_round_trip(connect):
    client_conn = connect()
    client = client_conn.channel()
    replies = Collector(ack=False)
    client.basic_consume("amq.rabbitmq.reply-to", replies, auto_ack=True)
    server = connect().channel()
    q = temp_queue(server)
    client.basic_publish("", q, b"request",
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="c1"))
    assert wait_until(lambda: ready(server, q) == 1)
    _, props, body = server.basic_get(q, auto_ack=True)
    assert (body, props.correlation_id) == (b"request", "c1")
    reply_to = props.reply_to
    assert reply_to.startswith("amq.rabbitmq.reply-to.") and len(reply_to) > len("amq.rabbitmq.reply-to.")
    server.basic_publish("", reply_to, b"response", pika.BasicProperties(correlation_id="c1"))
    assert wait_until(lambda: replies.got, conn=client_conn)
    [(method, rprops, rbody)] = replies.got
    assert (rbody, rprops.correlation_id) == (b"response", "c1")
    assert (method.exchange, method.routing_key, method.redelivered) == ("", reply_to, False)


def test_direct_reply_to_requires_a_reply_consumer(ch):
    q = temp_queue(ch)
    with channel_closed(406, "PRECONDITION_FAILED - fast reply consumer does not exist"):
        ch.basic_publish("", q, b"request", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        ch.queue_declare(q, passive=True)  # round trip: the error arrives asynchronously


def test_direct_reply_to_consumer_must_be_no_ack(ch):
    with channel_closed(406, "PRECONDITION_FAILED - reply consumer cannot acknowledge"):
        ch.basic_consume("amq.rabbitmq.reply-to", Collector(), auto_ack=False)


def test_direct_reply_to_unknown_name_is_dropped(ch):
    ch.basic_publish("", "amq.rabbitmq.reply-to.bogus", b"nobody")
    q = temp_queue(ch)  # the channel is still usable
    ch.basic_publish("", q, b"fine")
    assert drain(ch, q)[0][2] == b"fine"


# ----------------------------------------------------------------------------- alternate exchange


def test_alternate_exchange_receives_unroutable(ch):
    ae, x = uniq("ae"), uniq("x")
    ch.exchange_declare(ae, "fanout", auto_delete=True)
    ch.exchange_declare(x, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    routed, unrouted = temp_queue(ch), temp_queue(ch)
    ch.queue_bind(routed, x, "known")
    ch.queue_bind(unrouted, ae)
    ch.confirm_delivery()
    ch.basic_publish(x, "known", b"routed", mandatory=True)
    ch.basic_publish(x, "other", b"lost", mandatory=True)  # not returned: the AE took it
    assert [b for _, _, b in drain(ch, routed)] == [b"routed"]
    [(method, _, body)] = drain(ch, unrouted)
    assert (method.exchange, method.routing_key, body) == (x, "other", b"lost")
