"""kombu (Celery's messaging layer, py-amqp transport): producers, consumers, SimpleQueue."""

import socket

import kombu
import pytest

from conftest import uniq, wait_until


@pytest.fixture
def kconn(amqp_url):
    with kombu.Connection(amqp_url, connect_timeout=10) as c:
        c.connect()
        yield c


@pytest.mark.parametrize("login_method", ["PLAIN", "AMQPLAIN"])
def test_login_methods(amqp_url, login_method):
    with kombu.Connection(amqp_url, login_method=login_method) as c:
        c.connect()
        assert c.connected
        product = c.connection.server_properties["product"]
        assert isinstance(product, str) and product


def test_bad_password_is_access_refused(amqp_url):
    url = amqp_url.replace("guest:guest@", "guest:wrong@")
    with kombu.Connection(url, connect_timeout=10) as c:
        with pytest.raises(Exception) as exc:
            c.connect()
        # kombu re-raises py-amqp's AccessRefused (403).
        assert "ACCESS_REFUSED" in str(exc.value)


def test_simple_queue_json(kconn):
    name = uniq("kombu")
    q = kconn.SimpleQueue(name, queue_opts={"auto_delete": True})
    payloads = [{"n": i, "items": [1, 2, {"x": None}], "s": "é"} for i in range(5)]
    for p in payloads:
        q.put(p, headers={"trace": "t1"})
    got = []
    for _ in payloads:
        msg = q.get(timeout=5)
        got.append(msg.payload)
        assert msg.headers == {"trace": "t1"}
        assert msg.content_type == "application/json"
        msg.ack()
    assert got == payloads
    with pytest.raises(q.Empty):
        q.get(block=False)
    q.close()


def test_producer_consumer_topic(kconn):
    exchange = kombu.Exchange(uniq("kx"), type="topic", auto_delete=True)
    queue = kombu.Queue(uniq("kq"), exchange=exchange, routing_key="orders.*", auto_delete=True)
    received = []

    def on_message(body, message):
        received.append((message.delivery_info["routing_key"], body))
        message.ack()

    with kconn.Consumer(queue, callbacks=[on_message]):
        producer = kconn.Producer()
        for key in ["orders.new", "orders.paid", "orders.eu.new", "invoices.new"]:
            producer.publish({"key": key}, exchange=exchange, routing_key=key, declare=[queue])
        while len(received) < 2:
            kconn.drain_events(timeout=5)
        with pytest.raises(socket.timeout):
            kconn.drain_events(timeout=0.3)
    assert received == [("orders.new", {"key": "orders.new"}), ("orders.paid", {"key": "orders.paid"})]


def test_fanout_broadcast(kconn):
    exchange = kombu.Exchange(uniq("kfan"), type="fanout", auto_delete=True)
    queues = [kombu.Queue(uniq("kq"), exchange=exchange, exclusive=True) for _ in range(3)]
    ch = kconn.channel()
    for q in queues:
        q(ch).declare()
    kconn.Producer(ch).publish("hi", exchange=exchange, serializer="json")
    for q in queues:
        msg = q(ch).get(no_ack=True)
        assert msg is not None and msg.payload == "hi"


def test_reject_requeue_and_redelivered(kconn):
    name = uniq("krej")
    q = kconn.SimpleQueue(name, queue_opts={"auto_delete": True})
    q.put("once")
    msg = q.get(timeout=5)
    assert msg.delivery_info["redelivered"] is False
    msg.requeue()
    msg = q.get(timeout=5)
    assert msg.delivery_info["redelivered"] is True
    msg.reject()
    with pytest.raises(q.Empty):
        q.get(block=False)
    q.close()


def test_queue_declare_purge_delete(kconn):
    ch = kconn.channel()
    q = kombu.Queue(uniq("kpd"), durable=False)(ch)
    q.declare()
    producer = kconn.Producer(ch)
    for i in range(4):
        producer.publish(i, routing_key=q.name)
    assert wait_until(lambda: q.queue_declare(passive=True).message_count == 4)
    assert q.purge() == 4
    producer.publish("x", routing_key=q.name)
    q.delete()


def test_heartbeat_check(amqp_url):
    with kombu.Connection(amqp_url, heartbeat=10) as c:
        c.connect()
        assert c.connection.heartbeat == 10
        c.heartbeat_check()
        c.default_channel.queue_declare("", exclusive=True)
