"""Message content: all 14 basic properties, header field types, bodies and frame splitting."""

import datetime
import decimal
import hashlib

import amqp
import pika
import pytest

from conftest import channel_closed, wait_until

MIB = 1024 * 1024
FRAME_MAX = 131072
BODY_FRAME_PAYLOAD = FRAME_MAX - 8  # frame header (7) + end octet (1)

UTC = datetime.timezone.utc

# Every field type pika encodes: str (S), int (I), big int (l), bool (t), Decimal (D),
# datetime (T), bytes (x), None (V), dict (F, nested), list (A, nested and empty).
PIKA_HEADERS = {
    "str": "héllo wörld",
    "int": 42,
    "neg": -7,
    "long": 2**40,
    "long-neg": -(2**62),
    "true": True,
    "false": False,
    "decimal": decimal.Decimal("3.14"),
    "decimal-neg": decimal.Decimal("-0.001"),
    "timestamp": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "bytes": b"\x00\x01\xfe\xff",
    "void": None,
    "table": {"nested": {"deeper": [1, "two", {"three": True}]}, "n": 1},
    "array": [1, "x", False, None, [2, 3], {"k": "v"}],
    "empty-table": {},
    "empty-array": [],
    "empty-str": "",
}


def expected_pika_headers():
    out = dict(PIKA_HEADERS)
    out["timestamp"] = out["timestamp"].replace(tzinfo=UTC)  # pika decodes 'T' as aware UTC
    return out


def all_properties(headers) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers=headers,
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply.queue",
        expiration="600000",
        message_id="msg-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",
        app_id="rill-tests",
        cluster_id="cluster-x",
    )


PROPERTY_NAMES = [
    "content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id",
]


def assert_all_properties(props):
    want = all_properties(expected_pika_headers())
    for name in PROPERTY_NAMES:
        assert getattr(props, name) == getattr(want, name), name
    # Field tables keep their key order end to end.
    assert list(props.headers) == list(PIKA_HEADERS)


def test_all_properties_round_trip_get(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"body", all_properties(PIKA_HEADERS))
    method, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"body"
    assert_all_properties(props)


def test_all_properties_round_trip_consume(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"body", all_properties(PIKA_HEADERS))
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append((p, b)), auto_ack=True)
    assert wait_until(lambda: got, conn=conn)
    assert_all_properties(got[0][0])


def test_no_properties(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"bare")
    _, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"bare"
    for name in PROPERTY_NAMES:
        assert getattr(props, name) is None, name


@pytest.mark.parametrize("name", PROPERTY_NAMES)
def test_each_property_alone(ch, name):
    # Each flag bit on its own: catches property-flag/field misalignment.
    value = getattr(all_properties({"k": "v"}), name)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"x", pika.BasicProperties(**{name: value}))
    _, props, _ = ch.basic_get(q, auto_ack=True)
    for other in PROPERTY_NAMES:
        assert getattr(props, other) == (value if other == name else None), other


def test_py_amqp_header_types(broker_addr):
    # py-amqp also sends floats (d) and encodes bytes as long strings.
    host, port = broker_addr
    c = amqp.Connection(host=f"{host}:{port}")
    c.connect()
    try:
        ch = c.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        headers = {
            "float": 1.5, "int": 7, "long": 2**40, "str": "x", "bool": True, "void": None,
            "decimal": decimal.Decimal("1.25"), "ts": datetime.datetime(2024, 1, 2, 3, 4, 5),
            "array": [1, 2.5, "x"], "table": {"k": -1},
        }
        ch.basic_publish(amqp.Message(b"x", application_headers=headers, priority=3), routing_key=q)
        m = ch.basic_get(q, no_ack=True)
        assert m.headers == headers
        assert m.properties["priority"] == 3
    finally:
        c.close()


def test_user_id_must_match_connection_user(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="bob"))
    with channel_closed(406, "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'guest'"):
        ch.queue_declare("", exclusive=True)
    assert conn.is_open


# ----------------------------------------------------------------- bodies


def body_of(size: int) -> bytes:
    # Not a repeated byte: a misplaced frame shows up as a content mismatch.
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize(
    "size",
    [0, 1, BODY_FRAME_PAYLOAD - 1, BODY_FRAME_PAYLOAD, BODY_FRAME_PAYLOAD + 1,
     2 * BODY_FRAME_PAYLOAD, 2 * BODY_FRAME_PAYLOAD + 1, MIB],
)
def test_body_sizes_around_frame_max(ch, size):
    q = ch.queue_declare("", exclusive=True).method.queue
    body = body_of(size)
    ch.basic_publish("", q, body)
    ch.basic_publish("", q, b"next")
    assert ch.basic_get(q, auto_ack=True)[2] == body
    assert ch.basic_get(q, auto_ack=True)[2] == b"next"


def test_small_frame_max_client(connect):
    # A client that negotiates a small frame_max gets deliveries split accordingly.
    c = connect(frame_max=4096)
    assert c._impl.params.frame_max == 4096
    ch = c.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    body = body_of(100_000)
    ch.basic_publish("", q, body)
    got = []
    ch.basic_consume(q, lambda c_, m, p, b: got.append(b), auto_ack=True)
    assert wait_until(lambda: got, conn=c)
    assert got == [body]


def test_16_mib_body(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    body = body_of(16 * MIB)
    ch.basic_publish("", q, body)
    got = []
    ch.basic_consume(q, lambda c_, m, p, b: got.append(b), auto_ack=True)
    assert wait_until(lambda: got, timeout=25, conn=conn)
    assert len(got[0]) == len(body) and got[0] == body


@pytest.mark.slow
def test_128_mib_body(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    body = b"\xa5" * (128 * MIB)
    ch.basic_publish("", q, body)
    _, _, got = ch.basic_get(q, auto_ack=True)
    assert len(got) == len(body) and got == body


@pytest.mark.slow
def test_body_over_128_mib_is_406(conn):
    ch = conn.channel()
    ch.basic_publish("", "whatever", b"\x00" * (128 * MIB + 1))
    with channel_closed(
        406, "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728"
    ):
        ch.queue_declare("", exclusive=True)
    assert conn.is_open


@pytest.mark.parametrize("expiration", ["abc", "-1", "1.5", ""])
def test_invalid_expiration_is_406(conn, expiration):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
    with channel_closed(406) as exc:
        ch.queue_declare("", exclusive=True)
    # RabbitMQ appends an Erlang reason (no_integer, {value_negative,-1}, ...).
    assert exc.value.reply_text.startswith(f"PRECONDITION_FAILED - invalid expiration '{expiration}'")
    assert conn.is_open
