"""Connection-level behaviour: handshake, auth, vhosts, tuning, heartbeats, channels."""

import amqp
import pika
import pika.exceptions
import pytest

from conftest import wait_until, with_params

CAPABILITIES = [
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
]


def test_server_properties(conn):
    props = conn._impl.server_properties
    for key in ("product", "version", "platform"):
        assert isinstance(props.get(key), str) and props[key], key
    caps = props["capabilities"]
    for cap in CAPABILITIES:
        assert caps.get(cap) is True, cap


def test_tune_defaults(conn):
    # pika asks for the maximum; the broker's own limits win.
    params = conn._impl.params
    assert params.channel_max == 2047
    assert params.frame_max == 131072
    assert params.heartbeat == 60


@pytest.mark.parametrize("heartbeat", [0, 5, 30])
def test_heartbeat_negotiation(connect, heartbeat):
    # A client's smaller heartbeat wins; 0 turns heartbeats off.
    c = connect(heartbeat=heartbeat)
    assert c._impl.params.heartbeat == heartbeat
    ch = c.channel()
    ch.queue_declare("", exclusive=True)
    c.process_data_events(time_limit=0.1)
    assert c.is_open


def test_heartbeats_keep_idle_connection_alive(connect):
    # heartbeat=1: both sides exchange heartbeats; two missed intervals would kill the
    # connection, so surviving ~3.5 s of pika-driven idleness shows the broker sends them.
    c = connect(heartbeat=1)
    c.process_data_events(time_limit=3.5)
    assert c.is_open
    c.channel().queue_declare("", exclusive=True)


def test_bad_password(amqp_url):
    url = amqp_url.replace("guest:guest@", "guest:wrong@")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as exc:
        pika.BlockingConnection(pika.URLParameters(url))
    assert "ACCESS_REFUSED" in str(exc.value)


def test_unknown_user(amqp_url):
    url = amqp_url.replace("guest:guest@", "nobody:guest@")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(url))


def test_unknown_vhost(amqp_url):
    url = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost"
    # pika wraps the 530 connection.close it gets in reply to connection.open.
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as exc:
        pika.BlockingConnection(pika.URLParameters(url))
    assert "(530) 'NOT_ALLOWED - vhost no-such-vhost not found'" in str(exc.value)


def test_unknown_vhost_py_amqp(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}", virtual_host="no-such-vhost")
    with pytest.raises(amqp.exceptions.NotAllowed) as exc:
        c.connect()
    assert exc.value.reply_code == 530
    assert exc.value.reply_text == "NOT_ALLOWED - vhost no-such-vhost not found"
    assert exc.value.method_name == "Connection.open"


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_py_amqp_login_mechanisms(broker_addr, mechanism):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}", login_method=mechanism)
    c.connect()
    try:
        ch = c.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        ch.basic_publish(amqp.Message(b"hi"), routing_key=q)
        assert ch.basic_get(q, no_ack=True).body == b"hi"
    finally:
        c.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_py_amqp_bad_password(broker_addr, mechanism):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}", password="wrong", login_method=mechanism)
    with pytest.raises(amqp.exceptions.AccessRefused) as exc:
        c.connect()
    assert exc.value.reply_code == 403
    assert exc.value.reply_text == (
        f"ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. "
        "For details see the broker logfile."
    )


def test_many_channels(conn):
    channels = [conn.channel() for _ in range(250)]
    assert len({c.channel_number for c in channels}) == 250
    q = channels[-1].queue_declare("", exclusive=True).method.queue
    for i, c in enumerate(channels):
        c.basic_publish("", q, str(i).encode())
    # Publishes on different channels are not ordered relative to each other.
    got = [c.basic_get(q, auto_ack=True)[2] for c in channels]
    assert sorted(got) == sorted(str(i).encode() for i in range(250))
    for c in channels:
        c.close()
    assert conn.is_open


def test_update_secret(conn):
    replies = []
    conn._impl.update_secret("guest", "rotation", callback=lambda frame: replies.append(frame.method))
    conn.process_data_events(time_limit=0.1)
    assert wait_until(lambda: replies, conn=conn)
    assert replies[0].NAME == "Connection.UpdateSecretOk"
    conn.channel().queue_declare("", exclusive=True)


def test_channel_flow(broker_addr):
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    ch = c.channel()
    assert ch.flow(True) is True
    # RabbitMQ 3.x refuses to stop a channel's deliveries: a connection error.
    with pytest.raises(amqp.exceptions.AMQPNotImplementedError) as exc:
        ch.flow(False)
    assert exc.value.reply_code == 540
    assert exc.value.reply_text == "NOT_IMPLEMENTED - active=false"
    c.collect()
