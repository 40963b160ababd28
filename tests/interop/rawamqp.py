"""A minimal AMQP 0-9-1 client over a plain socket, for sending deliberately bad frames.

Frames are built and parsed with pika's codec (pika.frame / pika.spec), so only the
misbehaviour under test is hand-written.
"""

from __future__ import annotations

import socket
import struct
import time

import pika.frame
import pika.spec
from pika import amqp_object

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = b"\xce"


def frame(kind: int, channel: int, payload: bytes, end: bytes = FRAME_END) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + end


def method(channel: int, m: amqp_object.Method) -> bytes:
    return pika.frame.Method(channel, m).marshal()


def header(channel: int, body_size: int, props: pika.spec.BasicProperties | None = None) -> bytes:
    return pika.frame.Header(channel, body_size, props or pika.spec.BasicProperties()).marshal()


def body(channel: int, data: bytes) -> bytes:
    return frame(3, channel, data)


def heartbeat() -> bytes:
    return frame(8, 0, b"")


def plain_response(user: str = "guest", password: str = "guest") -> bytes:
    return b"\x00" + user.encode() + b"\x00" + password.encode()


class RawConnection:
    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.tune: pika.spec.Connection.Tune | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int = 65536) -> bytes:
        """Bytes received until EOF/timeout (for replies that are not frames)."""
        out = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(n)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out

    def read_frame(self, timeout: float = 10.0):
        """The next frame (pika.frame object), or None on EOF. Heartbeats are returned too."""
        deadline = time.monotonic() + timeout
        while True:
            if self.buf:
                consumed, f = pika.frame.decode_frame(self.buf)
                if f is not None:
                    self.buf = self.buf[consumed:]
                    return f
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def read_method(self, timeout: float = 10.0, skip_heartbeats: bool = True):
        while True:
            f = self.read_frame(timeout)
            if f is None:
                return None
            if isinstance(f, pika.frame.Heartbeat) and skip_heartbeats:
                continue
            return f

    def expect(self, cls, timeout: float = 10.0):
        f = self.read_method(timeout)
        assert f is not None, f"connection closed while waiting for {cls.NAME}"
        assert isinstance(f, pika.frame.Method) and isinstance(f.method, cls), f
        return f.method

    def handshake(self, vhost: str = "/", heartbeat: int = 0, frame_max: int = 131072,
                  channel_max: int = 2047) -> "RawConnection":
        self.send(PROTOCOL_HEADER)
        self.expect(pika.spec.Connection.Start)
        self.send(method(0, pika.spec.Connection.StartOk(
            client_properties={"product": "rill-raw-test"}, mechanism="PLAIN",
            response=plain_response(), locale="en_US")))
        self.tune = self.expect(pika.spec.Connection.Tune)
        self.send(method(0, pika.spec.Connection.TuneOk(channel_max, frame_max, heartbeat)))
        self.send(method(0, pika.spec.Connection.Open(vhost)))
        self.expect(pika.spec.Connection.OpenOk)
        return self

    def open_channel(self, channel: int = 1) -> None:
        self.send(method(channel, pika.spec.Channel.Open()))
        self.expect(pika.spec.Channel.OpenOk)

    def expect_connection_close(self, timeout: float = 10.0) -> tuple[int, str, int, int]:
        """(reply_code, reply_text, class_id, method_id) of the broker's connection.close;
        answers close-ok."""
        m = self.expect(pika.spec.Connection.Close, timeout)
        self.send(method(0, pika.spec.Connection.CloseOk()))
        return m.reply_code, m.reply_text, m.class_id, m.method_id

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True once the broker has closed the socket (after any frames it still sends)."""
        try:
            while True:
                if self.read_frame(timeout) is None:
                    return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
