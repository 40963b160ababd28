//! A deliberately naive AMQP 0-9-1 client over a blocking `TcpStream`, for bad-input tests.
//!
//! Frames are built by hand (`frame`, `method`, `content_header`, `body`, [`Args`]) so a test
//! can send exactly the bytes it wants, including wrong ones. Replies are parsed just enough to
//! check a reply code. Every read has a timeout: a broker that neither answers nor closes fails
//! the test instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lapin::types::{parsing::parse_field_table, AMQPValue, FieldTable};

use super::STEP;

/// The only protocol header an AMQP 0-9-1 server accepts, and the one it answers a wrong header
/// with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

/// The frame_max RabbitMQ offers in connection.tune, and which [`RawClient::open`] accepts.
pub const FRAME_MAX: u32 = 131_072;

// (class, method) ids used by the tests.
pub const CONNECTION_START: (u16, u16) = (10, 10);
pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
pub const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
pub const BASIC_GET: (u16, u16) = (60, 70);
pub const BASIC_GET_OK: (u16, u16) = (60, 71);
pub const BASIC_GET_EMPTY: (u16, u16) = (60, 72);

/// Method-argument encoder (big-endian, AMQP 0-9-1 field encodings).
#[derive(Default, Clone)]
pub struct Args(pub Vec<u8>);

impl Args {
    pub fn new() -> Args {
        Args::default()
    }
    pub fn u8(mut self, v: u8) -> Args {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Args {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Args {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Args {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn short_str(mut self, s: &str) -> Args {
        let len = u8::try_from(s.len()).expect("short string over 255 bytes");
        self.0.push(len);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn long_str(mut self, s: &[u8]) -> Args {
        let len = u32::try_from(s.len()).expect("long string over 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(s);
        self
    }
    /// A field table given as already-encoded entries (`name`, type octet, value).
    pub fn table(self, entries: &[u8]) -> Args {
        self.long_str(entries)
    }
    pub fn bytes(mut self, b: &[u8]) -> Args {
        self.0.extend_from_slice(b);
        self
    }
}

/// One table entry with a boolean value, for building tables by hand.
pub fn bool_entry(name: &str, v: bool) -> Vec<u8> {
    let mut out = Args::new().short_str(name).0;
    out.push(b't');
    out.push(u8::from(v));
    out
}

/// A whole frame: type, channel, size, payload, frame-end.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).expect("payload over 4 GiB");
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

/// A method frame.
pub fn method(channel: u16, id: (u16, u16), args: &Args) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.0.len());
    payload.extend_from_slice(&id.0.to_be_bytes());
    payload.extend_from_slice(&id.1.to_be_bytes());
    payload.extend_from_slice(&args.0);
    frame(FRAME_METHOD, channel, &payload)
}

/// A basic-class content header frame with the given encoded property flags + properties.
pub fn content_header(channel: u16, body_size: u64, properties: &[u8]) -> Vec<u8> {
    let payload = Args::new()
        .u16(60)
        .u16(0)
        .u64(body_size)
        .bytes(properties)
        .0;
    frame(FRAME_HEADER, channel, &payload)
}

/// A content body frame.
pub fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, data)
}

/// basic.publish (ticket 0) to `exchange` with `routing_key`.
pub fn basic_publish(channel: u16, exchange: &str, routing_key: &str, mandatory: bool) -> Vec<u8> {
    method(
        channel,
        BASIC_PUBLISH,
        &Args::new()
            .u16(0)
            .short_str(exchange)
            .short_str(routing_key)
            .u8(u8::from(mandatory)),
    )
}

/// queue.declare (ticket 0) with no flags set and no arguments.
pub fn queue_declare(channel: u16, queue: &str) -> Vec<u8> {
    method(
        channel,
        QUEUE_DECLARE,
        &Args::new().u16(0).short_str(queue).u8(0).table(&[]),
    )
}

/// channel.open on `channel`.
pub fn channel_open(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_OPEN, &Args::new().short_str(""))
}

/// One received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// (class, method) of a method frame.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            u16::from_be_bytes([self.payload[2], self.payload[3]]),
        ))
    }

    /// A reader over a method frame's arguments.
    pub fn args(&self) -> Reader<'_> {
        Reader(self.payload.get(4..).unwrap_or_default())
    }

    /// Parses connection.close or channel.close.
    pub fn close(&self) -> Option<Close> {
        let id = self.method_id()?;
        if id != CONNECTION_CLOSE && id != CHANNEL_CLOSE {
            return None;
        }
        let mut r = self.args();
        Some(Close {
            code: r.u16(),
            text: r.short_str(),
            class_id: r.u16(),
            method_id: r.u16(),
        })
    }
}

/// A connection.close or channel.close as sent by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl Close {
    /// Asserts code, the constant's name at the start of the text, and the failing method.
    #[track_caller]
    pub fn assert(&self, code: u16, name: &str, failing: (u16, u16)) {
        assert_eq!(
            (self.code, (self.class_id, self.method_id)),
            (code, failing),
            "unexpected close: {self:?}"
        );
        assert!(
            self.text.starts_with(name),
            "close text should start with {name:?}: {self:?}"
        );
    }
}

/// Big-endian argument decoder; panics on short input (a malformed reply fails the test).
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.0.len() >= n, "reply truncated: wanted {n} more bytes");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    pub fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    pub fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_be_bytes([b[0], b[1]])
    }
    pub fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8));
        u64::from_be_bytes(a)
    }
    pub fn short_str(&mut self) -> String {
        let n = usize::from(self.u8());
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    pub fn long_str(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        self.take(n).to_vec()
    }
    pub fn table(&mut self) -> FieldTable {
        let (rest, table) = parse_field_table(self.0).expect("malformed field table in reply");
        self.0 = rest;
        table
    }
    pub fn rest(&self) -> &[u8] {
        self.0
    }
}

/// Looks up a boolean in a table's nested `capabilities` table.
pub fn capability(server_properties: &FieldTable, name: &str) -> Option<bool> {
    match server_properties.inner().get("capabilities")? {
        AMQPValue::FieldTable(caps) => match caps.inner().get(name)? {
            AMQPValue::Boolean(b) => Some(*b),
            _ => None,
        },
        _ => None,
    }
}

/// How the peer ended a connection we were reading from.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Orderly FIN.
    Eof,
    /// RST — RabbitMQ closes with `linger {true, 0}`, so this is its usual way of hanging up.
    Reset,
}

/// Parameters of the handshake [`RawClient::handshake`] performs.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub vhost: String,
    /// Sent in tune-ok (seconds, 0 = off).
    pub heartbeat: u16,
}

impl Default for Login {
    fn default() -> Login {
        Login {
            user: "guest".into(),
            password: "guest".into(),
            vhost: "/".into(),
            heartbeat: 0,
        }
    }
}

/// A blocking raw connection.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    next_channel: u16,
}

impl RawClient {
    /// A TCP connection with nothing sent yet.
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, STEP).expect("connect to broker");
        stream
            .set_read_timeout(Some(STEP))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(STEP))
            .expect("set write timeout");
        stream.set_nodelay(true).expect("set nodelay");
        RawClient {
            stream,
            buf: Vec::new(),
            next_channel: 1,
        }
    }

    /// Connects and completes the handshake as guest on vhost `/`, heartbeats off.
    pub fn open(addr: SocketAddr) -> RawClient {
        let mut c = RawClient::connect(addr);
        let reply = c.handshake(&Login::default());
        assert_eq!(
            reply.method_id(),
            Some(CONNECTION_OPEN_OK),
            "handshake failed: {:?}",
            reply.close()
        );
        c
    }

    /// Sends the protocol header and reads connection.start; returns its frame.
    pub fn start(&mut self) -> Frame {
        self.send(PROTOCOL_HEADER);
        let start = self.expect_frame();
        assert_eq!(
            (start.channel, start.method_id()),
            (0, Some(CONNECTION_START)),
            "expected connection.start, got {start:?}"
        );
        start
    }

    /// Sends start-ok with PLAIN credentials and client capabilities like lapin's (including
    /// `authentication_failure_close`, without which RabbitMQ drops a failed login silently).
    pub fn start_ok(&mut self, user: &str, password: &str) {
        let mut caps = Vec::new();
        for name in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
        ] {
            caps.extend(bool_entry(name, true));
        }
        let client_properties = Args::new()
            .short_str("capabilities")
            .u8(b'F')
            .table(&caps)
            .short_str("product")
            .u8(b'S')
            .long_str(b"rill raw test client")
            .0;
        let response = [b"\0", user.as_bytes(), b"\0", password.as_bytes()].concat();
        self.send(&method(
            0,
            CONNECTION_START_OK,
            &Args::new()
                .table(&client_properties)
                .short_str("PLAIN")
                .long_str(&response)
                .short_str("en_US"),
        ));
    }

    /// The whole handshake; returns the server's last reply: connection.open-ok on success, or
    /// the connection.close that refused the login or the vhost.
    pub fn handshake(&mut self, login: &Login) -> Frame {
        self.start();
        self.start_ok(&login.user, &login.password);
        let tune = self.expect_frame();
        if tune.method_id() != Some(CONNECTION_TUNE) {
            return tune;
        }
        let mut r = tune.args();
        let (channel_max, frame_max, _heartbeat) = (r.u16(), r.u32(), r.u16());
        self.send(&method(
            0,
            CONNECTION_TUNE_OK,
            &Args::new()
                .u16(channel_max)
                .u32(frame_max)
                .u16(login.heartbeat),
        ));
        self.send(&method(
            0,
            CONNECTION_OPEN,
            &Args::new().short_str(&login.vhost).short_str("").u8(0),
        ));
        self.expect_frame()
    }

    /// Writes bytes; write errors are ignored because the server may legitimately have closed
    /// the socket already — the following read says what happened.
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads one frame; `Err` when the peer closed the connection. Panics if nothing arrives
    /// within the read timeout.
    pub fn next(&mut self) -> Result<Frame, Ended> {
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= size + 8 {
                    let end = self.buf[size + 7];
                    assert_eq!(end, FRAME_END, "server sent a bad frame-end octet");
                    let frame = Frame {
                        kind: self.buf[0],
                        channel: u16::from_be_bytes([self.buf[1], self.buf[2]]),
                        payload: self.buf[7..size + 7].to_vec(),
                    };
                    self.buf.drain(..size + 8);
                    return Ok(frame);
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Ended::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_reset(&e) => return Err(Ended::Reset),
                Err(e) if is_timeout(&e) => {
                    panic!("broker neither replied nor closed within {STEP:?}")
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// The next frame that is not a heartbeat; panics if the connection ends first.
    #[track_caller]
    pub fn expect_frame(&mut self) -> Frame {
        loop {
            match self.next() {
                Ok(f) if f.kind == FRAME_HEARTBEAT => continue,
                Ok(f) => return f,
                Err(ended) => panic!("connection ended ({ended:?}) while a frame was expected"),
            }
        }
    }

    /// Expects the server's connection.close (skipping heartbeats), answers close-ok and
    /// checks the server then closes the socket.
    #[track_caller]
    pub fn expect_connection_close(&mut self) -> Close {
        let frame = self.expect_frame();
        let close = match (frame.channel, frame.close()) {
            (0, Some(close)) if frame.method_id() == Some(CONNECTION_CLOSE) => close,
            _ => panic!("expected connection.close, got {frame:?}"),
        };
        self.send(&method(0, CONNECTION_CLOSE_OK, &Args::new()));
        self.expect_closed();
        close
    }

    /// Expects the server to end the connection, with or without a final connection.close
    /// (which is answered). Returns that close if there was one. Only heartbeats may precede it.
    #[track_caller]
    pub fn expect_end(&mut self) -> Option<Close> {
        loop {
            match self.next() {
                Ok(f) if f.kind == FRAME_HEARTBEAT => continue,
                Ok(f) if f.channel == 0 && f.method_id() == Some(CONNECTION_CLOSE) => {
                    self.send(&method(0, CONNECTION_CLOSE_OK, &Args::new()));
                    self.expect_closed();
                    return f.close();
                }
                Ok(f) => panic!("expected the connection to end, got {f:?}"),
                Err(_) => return None,
            }
        }
    }

    /// Expects EOF or RST with no further frames.
    #[track_caller]
    pub fn expect_closed(&mut self) -> Ended {
        match self.next() {
            Err(ended) => ended,
            Ok(f) => panic!("expected the socket to close, got {f:?}"),
        }
    }

    /// Reads raw bytes until the peer closes; returns them. Panics on timeout.
    pub fn read_to_close(&mut self) -> (Vec<u8>, Ended) {
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return (out, Ended::Eof),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if is_reset(&e) => return (out, Ended::Reset),
                Err(e) if is_timeout(&e) => {
                    panic!("broker did not close within {STEP:?}; got {out:?}")
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Waits for the server to hang up, allowing only heartbeat frames and at most one final
    /// connection.close meanwhile; returns when it did. Panics after `limit`.
    pub fn wait_for_hangup(&mut self, limit: Duration) -> Instant {
        self.stream
            .set_read_timeout(Some(limit))
            .expect("set read timeout");
        let ended = self.expect_end();
        let at = Instant::now();
        self.stream
            .set_read_timeout(Some(STEP))
            .expect("set read timeout");
        if let Some(close) = ended {
            // Not what RabbitMQ does (it just drops the socket), but a close frame first is
            // harmless; it must not claim success.
            assert_ne!(
                close.code, 200,
                "heartbeat timeout reported as a normal close"
            );
        }
        at
    }

    /// Opens the next unused channel and waits for open-ok; returns its number.
    pub fn open_channel(&mut self) -> u16 {
        let ch = self.next_channel;
        self.next_channel += 1;
        self.send(&channel_open(ch));
        let ok = self.expect_frame();
        assert_eq!(
            (ok.channel, ok.method_id()),
            (ch, Some(CHANNEL_OPEN_OK)),
            "expected channel.open-ok, got {ok:?}"
        );
        ch
    }

    /// Proves the connection works: opens a channel, declares a server-named exclusive queue,
    /// closes the channel.
    #[track_caller]
    pub fn ping(&mut self) {
        let ch = self.open_channel();
        // Flags octet: passive=1, durable=2, exclusive=4, auto-delete=8, no-wait=16.
        self.send(&method(
            ch,
            QUEUE_DECLARE,
            &Args::new().u16(0).short_str("").u8(4).table(&[]),
        ));
        let ok = self.expect_frame();
        assert_eq!(
            (ok.channel, ok.method_id()),
            (ch, Some(QUEUE_DECLARE_OK)),
            "expected queue.declare-ok, got {ok:?}"
        );
        self.send(&method(
            ch,
            CHANNEL_CLOSE,
            &Args::new().u16(200).short_str("bye").u16(0).u16(0),
        ));
        let ok = self.expect_frame();
        assert_eq!(
            (ok.channel, ok.method_id()),
            (ch, Some(CHANNEL_CLOSE_OK)),
            "expected channel.close-ok, got {ok:?}"
        );
    }

    /// Closes cleanly from the client side: connection.close, expect close-ok.
    pub fn close(mut self) {
        self.send(&method(
            0,
            CONNECTION_CLOSE,
            &Args::new().u16(200).short_str("bye").u16(0).u16(0),
        ));
        let ok = self.expect_frame();
        assert_eq!(ok.method_id(), Some(CONNECTION_CLOSE_OK), "got {ok:?}");
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
