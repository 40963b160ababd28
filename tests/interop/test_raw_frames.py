"""Bad input as raw bytes: the broker answers as RabbitMQ does, never hangs or panics,
and other connections are unaffected (each test ends by using a fresh connection)."""

import struct
import time

import pika
import pika.spec as S
import pytest

from rawamqp import (
    PROTOCOL_HEADER, RawConnection, body, frame, header, heartbeat, method, plain_response,
)


@pytest.fixture
def raw(broker_addr):
    conns = []

    def _open():
        c = RawConnection(*broker_addr)
        conns.append(c)
        return c

    yield _open
    for c in conns:
        c.close()


@pytest.fixture(autouse=True)
def broker_still_serves(amqp_url):
    yield
    c = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = c.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"alive")
    assert ch.basic_get(q, auto_ack=True)[2] == b"alive"
    c.close()


def opened(raw):
    c = raw().handshake()
    c.open_channel(1)
    return c


def declare_temp(c, channel=1) -> str:
    c.send(method(channel, S.Queue.Declare(queue="", exclusive=True)))
    return c.expect(S.Queue.DeclareOk).queue


# ----------------------------------------------------------------- protocol header


@pytest.mark.parametrize("greeting", [b"AMQP\x00\x00\x09\x00", b"AMQP\x01\x01\x00\x0a", b"GET / HTTP/1.1\r\n\r\n"],
                         ids=["0-9-0", "1-0", "http"])
def test_wrong_protocol_header_gets_ours_and_close(raw, greeting):
    c = raw()
    c.send(greeting)
    assert c.recv_raw() == PROTOCOL_HEADER


# ----------------------------------------------------------------- handshake


def test_unknown_mechanism_closes_socket(raw):
    c = raw()
    c.send(PROTOCOL_HEADER)
    start = c.expect(S.Connection.Start)
    assert set(start.mechanisms.split()) >= {b"PLAIN", b"AMQPLAIN"} or set(start.mechanisms.split()) >= {"PLAIN", "AMQPLAIN"}
    c.send(method(0, S.Connection.StartOk(client_properties={}, mechanism="NOPE", response=b"x", locale="en_US")))
    assert c.closed_by_peer()


def test_bad_credentials_raw_403(raw):
    c = raw()
    c.send(PROTOCOL_HEADER)
    c.expect(S.Connection.Start)
    c.send(method(0, S.Connection.StartOk(client_properties={"capabilities": {"authentication_failure_close": True}},
                                         mechanism="PLAIN", response=plain_response("guest", "bad"),
                                         locale="en_US")))
    code, text, _, _ = c.expect_connection_close()
    assert (code, text) == (403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
                                 "For details see the broker logfile.")
    assert c.closed_by_peer()


def test_channel_open_before_handshake_closes_socket(raw):
    c = raw()
    c.send(PROTOCOL_HEADER)
    c.expect(S.Connection.Start)
    c.send(method(1, S.Channel.Open()))
    assert c.closed_by_peer()


def test_connection_start_properties_raw(raw):
    c = raw()
    c.send(PROTOCOL_HEADER)
    start = c.expect(S.Connection.Start)
    assert (start.version_major, start.version_minor) == (0, 9)
    assert start.locales in (b"en_US", "en_US")


def test_client_initiated_close(raw):
    c = raw().handshake()
    c.send(method(0, S.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)))
    c.expect(S.Connection.CloseOk)
    # The closing side (us) closes the socket after close-ok.


# ----------------------------------------------------------------- heartbeats


def test_silent_client_is_disconnected_after_missed_heartbeats(raw):
    c = raw().handshake(heartbeat=1)
    start = time.monotonic()
    # The broker sends heartbeats, then gives up on us after two missed intervals.
    got_heartbeat = False
    while True:
        f = c.read_frame(timeout=15)
        if f is None:
            break
        got_heartbeat |= isinstance(f, pika.frame.Heartbeat)
    assert got_heartbeat
    assert time.monotonic() - start < 15


def test_client_heartbeats_keep_connection(raw):
    c = raw().handshake(heartbeat=1)
    for _ in range(8):
        c.send(heartbeat())
        time.sleep(0.4)
    c.open_channel(1)
    declare_temp(c)


# ----------------------------------------------------------------- framing errors


def test_frame_larger_than_frame_max_is_501(raw):
    c = opened(raw)
    c.send(frame(3, 1, b"x" * 200_000))
    code, text, _, _ = c.expect_connection_close()
    assert code == 501 and text.startswith("FRAME_ERROR"), text


def test_frame_claiming_4_gib_is_refused_before_buffering(raw):
    c = opened(raw)
    c.send(struct.pack(">BHI", 1, 1, 0xFFFFFFF0))  # header only: no payload follows
    code, text, _, _ = c.expect_connection_close()
    assert code == 501 and text.startswith("FRAME_ERROR"), text


def test_bad_frame_end_is_501(raw):
    c = opened(raw)
    c.send(frame(8, 0, b"", end=b"\x00"))
    code, text, _, _ = c.expect_connection_close()
    assert code == 501 and text.startswith("FRAME_ERROR"), text


def test_unknown_frame_type_is_501(raw):
    c = opened(raw)
    c.send(frame(9, 1, b""))
    code, text, _, _ = c.expect_connection_close()
    assert code == 501 and text.startswith("FRAME_ERROR"), text


def test_heartbeat_on_nonzero_channel_is_505(raw):
    c = opened(raw)
    c.send(frame(8, 1, b""))
    code, text, _, _ = c.expect_connection_close()
    assert code == 505 and text.startswith("UNEXPECTED_FRAME"), text


def test_channel_method_on_channel_zero_is_504(raw):
    c = raw().handshake()
    c.send(method(0, S.Queue.Declare(queue="x")))
    assert c.expect_connection_close() == (
        504, "CHANNEL_ERROR - unexpected method in connection state running", 50, 10)


def test_method_on_unopened_channel_is_504(raw):
    c = raw().handshake()
    c.send(method(5, S.Queue.Declare(queue="", exclusive=True)))
    assert c.expect_connection_close() == (504, "CHANNEL_ERROR - expected 'channel.open'", 50, 10)


def test_second_channel_open_is_504(raw):
    c = opened(raw)
    c.send(method(1, S.Channel.Open()))
    assert c.expect_connection_close() == (504, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10)


def test_channel_max_limits_open_channels_not_channel_numbers(raw):
    # RabbitMQ counts open channels against channel_max; any channel number may be used.
    c = raw().handshake(channel_max=3)
    for ch in (10, 2, 3000):
        c.open_channel(ch)
    c.send(method(1, S.Channel.Close(200, "bye", 0, 0)))  # channel 1 was never opened
    assert c.expect_connection_close() == (504, "CHANNEL_ERROR - expected 'channel.open'", 20, 40)
    c = raw().handshake(channel_max=3)
    for ch in (1, 2, 3):
        c.open_channel(ch)
    c.send(method(4, S.Channel.Open()))
    assert c.expect_connection_close() == (
        530, "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)", 0, 0)
    # A closed channel frees its place.
    c = raw().handshake(channel_max=2)
    c.open_channel(1)
    c.send(method(1, S.Channel.Close(200, "bye", 0, 0)))
    c.expect(S.Channel.CloseOk)
    for ch in (2, 7):
        c.open_channel(ch)


@pytest.mark.parametrize("channel_max, frame_max", [(0, 131072), (2048, 131072), (2047, 0), (2047, 131073), (2047, 4095)],
                         ids=["channel_max-0", "channel_max-too-high", "frame_max-0", "frame_max-too-high", "frame_max-too-low"])
def test_tune_ok_beyond_the_servers_limits_ends_the_connection(raw, channel_max, frame_max):
    # RabbitMQ refuses "no limit" (0) and anything above what it offered; it closes the socket.
    c = raw()
    c.send(PROTOCOL_HEADER)
    c.expect(S.Connection.Start)
    c.send(method(0, S.Connection.StartOk(client_properties={}, mechanism="PLAIN",
                                          response=plain_response(), locale="en_US")))
    c.expect(S.Connection.Tune)
    c.send(method(0, S.Connection.TuneOk(channel_max, frame_max, 0)))
    c.send(method(0, S.Connection.Open("/")))
    got = []
    try:
        while (f := c.read_frame(10)) is not None:
            got.append(getattr(f, "method", f))
    except (ConnectionError, OSError):
        pass
    assert not any(isinstance(m, S.Connection.OpenOk) for m in got), got
    assert all(isinstance(m, S.Connection.Close) and m.reply_code == 530 for m in got), got


def test_body_without_publish_is_505(raw):
    c = opened(raw)
    c.send(body(1, b"abc"))
    assert c.expect_connection_close() == (
        505, "UNEXPECTED_FRAME - expected method frame, got non method frame instead", 0, 0)


def test_header_without_publish_is_505(raw):
    c = opened(raw)
    c.send(header(1, 3))
    assert c.expect_connection_close() == (
        505, "UNEXPECTED_FRAME - expected method frame, got non method frame instead", 0, 0)


def test_method_instead_of_content_header_is_505(raw):
    c = opened(raw)
    c.send(method(1, S.Basic.Publish(exchange="", routing_key="x")))
    c.send(method(1, S.Queue.Declare(queue="", exclusive=True)))
    assert c.expect_connection_close() == (
        505, "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
        60, 40)


def test_method_instead_of_content_body_is_505(raw):
    c = opened(raw)
    c.send(method(1, S.Basic.Publish(exchange="", routing_key="x")) + header(1, 3) + body(1, b"ab"))
    c.send(method(1, S.Queue.Declare(queue="", exclusive=True)))
    assert c.expect_connection_close() == (
        505, "UNEXPECTED_FRAME - expected content body, got non content body frame instead", 60, 40)


def test_body_longer_than_announced_closes_connection(raw):
    # RabbitMQ 3.10 keeps waiting for the "rest" and then fails the next method with 505;
    # a broker that detects the overrun at once answers 501. Either way: connection error.
    c = opened(raw)
    q = declare_temp(c)
    c.send(method(1, S.Basic.Publish(exchange="", routing_key=q)) + header(1, 3) + body(1, b"abcdef"))
    c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
    code, text, _, _ = c.expect_connection_close()
    assert code in (501, 505), (code, text)


@pytest.mark.parametrize("payload", [struct.pack(">HH", 99, 1), struct.pack(">HH", 50, 99)],
                         ids=["unknown-class", "unknown-method"])
def test_unknown_method_closes_connection(raw, payload):
    # RabbitMQ 3.10 drops the TCP connection without a connection.close; 540 NOT_IMPLEMENTED
    # with a close is the spec's answer. Either is accepted; hanging is not.
    c = opened(raw)
    c.send(frame(1, 1, payload))
    f = c.read_method(timeout=10)
    if f is not None:
        assert isinstance(f.method, S.Connection.Close), f
        assert f.method.reply_code == 540, f
    assert c.closed_by_peer() or f is not None


# ----------------------------------------------------------------- well-formed edge cases


def test_empty_body_has_no_body_frames(raw):
    c = opened(raw)
    q = declare_temp(c)
    c.send(method(1, S.Basic.Publish(exchange="", routing_key=q)) + header(1, 0))
    c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
    c.expect(S.Basic.GetOk)
    h = c.read_frame()
    assert isinstance(h, pika.frame.Header) and h.body_size == 0
    c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
    c.expect(S.Basic.GetEmpty)  # next frame is the reply, not a body frame


def test_empty_body_frame_and_heartbeat_inside_content(raw):
    c = opened(raw)
    q = declare_temp(c)
    c.send(method(1, S.Basic.Publish(exchange="", routing_key=q)) + header(1, 4)
           + body(1, b"") + heartbeat() + body(1, b"ab") + body(1, b"cd"))
    c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
    c.expect(S.Basic.GetOk)
    h = c.read_frame()
    assert h.body_size == 4
    data = b""
    while len(data) < 4:
        f = c.read_frame()
        assert isinstance(f, pika.frame.Body), f
        data += f.fragment
    assert data == b"abcd"


def test_frames_after_channel_close_are_ignored_until_close_ok(raw):
    c = opened(raw)
    c.send(method(1, S.Queue.Declare(queue="rilltest.none", passive=True)))
    close = c.expect(S.Channel.Close)
    assert (close.reply_code, close.reply_text) == (404, "NOT_FOUND - no queue 'rilltest.none' in vhost '/'")
    assert (close.class_id, close.method_id) == (50, 10)
    # Until we answer close-ok, the broker drops whatever we send on that channel.
    c.send(method(1, S.Queue.Declare(queue="", exclusive=True)))
    c.send(method(1, S.Basic.Publish(exchange="", routing_key="x")) + header(1, 1) + body(1, b"x"))
    c.send(method(1, S.Channel.CloseOk()))
    c.send(method(1, S.Channel.Open()))
    c.expect(S.Channel.OpenOk)
    declare_temp(c)


def test_publish_frames_interleaved_across_channels(raw):
    c = raw().handshake()
    c.open_channel(1)
    c.open_channel(2)
    q = declare_temp(c, 1)
    # Content of two publishes on different channels may interleave frame by frame.
    c.send(method(1, S.Basic.Publish(exchange="", routing_key=q)) + method(2, S.Basic.Publish(exchange="", routing_key=q))
           + header(1, 2) + header(2, 2) + body(2, b"2") + body(1, b"1") + body(1, b"1") + body(2, b"2"))
    got = set()
    for _ in range(2):
        c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
        c.expect(S.Basic.GetOk)
        c.read_frame()
        got.add(c.read_frame().fragment)
    assert got == {b"11", b"22"}


def short_str(s: bytes) -> bytes:
    return bytes([len(s)]) + s


def exotic_headers_table() -> bytes:
    """A field table with every AMQP 0-9-1 / RabbitMQ field type, keys deliberately unsorted."""
    fields = [
        (b"z-bool", b"t\x01"),
        (b"b-int8", b"b\xfe"),
        (b"B-uint8", b"B\xfe"),
        (b"s-int16", b"s\xff\xfe"),
        (b"u-uint16", b"u\xff\xfe"),
        (b"I-int32", b"I" + struct.pack(">i", -123456)),
        (b"i-uint32", b"i" + struct.pack(">I", 4000000000)),
        (b"l-int64", b"l" + struct.pack(">q", -(2**60))),
        (b"f-float", b"f" + struct.pack(">f", 1.5)),
        (b"d-double", b"d" + struct.pack(">d", -2.25)),
        (b"D-decimal", b"D\x02" + struct.pack(">I", 314)),
        (b"S-longstr", b"S" + struct.pack(">I", 5) + b"hello"),
        (b"x-bytes", b"x" + struct.pack(">I", 3) + b"\x00\x01\x02"),
        (b"T-timestamp", b"T" + struct.pack(">Q", 1700000000)),
        (b"V-void", b"V"),
        (b"A-array", b"A" + struct.pack(">I", 8) + b"I\x00\x00\x00\x01" + b"V" + b"t\x00"),
        (b"F-table", b"F" + struct.pack(">I", 7) + short_str(b"k") + b"t\x01" + short_str(b"v") + b"V"),
        (b"a-last", b"S" + struct.pack(">I", 0)),
    ]
    payload = b"".join(short_str(k) + v for k, v in fields)
    return struct.pack(">I", len(payload)) + payload


def test_content_header_passes_through_byte_exact(raw):
    c = opened(raw)
    q = declare_temp(c)
    # Property flags: content-type(15) | headers(13) | delivery-mode(12) | message-id(7) | app-id(3)
    flags = (1 << 15) | (1 << 13) | (1 << 12) | (1 << 7) | (1 << 3)
    props = (struct.pack(">H", flags) + short_str(b"application/x-rill") + exotic_headers_table()
             + b"\x02" + short_str(b"id-1") + short_str(b"raw-test"))
    content_header = struct.pack(">HHQ", 60, 0, 5) + props
    c.send(method(1, S.Basic.Publish(exchange="", routing_key=q)) + frame(2, 1, content_header) + body(1, b"bytes"))
    c.send(method(1, S.Basic.Get(queue=q, no_ack=True)))
    c.expect(S.Basic.GetOk)
    # Read the raw header frame ourselves to compare bytes.
    while len(c.buf) < 7:
        c.buf += c.sock.recv(65536)
    kind, channel, size = struct.unpack(">BHI", c.buf[:7])
    while len(c.buf) < 8 + size:
        c.buf += c.sock.recv(65536)
    payload = c.buf[7:7 + size]
    c.buf = c.buf[8 + size:]
    assert (kind, channel) == (2, 1)
    assert payload == content_header
    assert c.read_frame().fragment == b"bytes"
