//! An in-process AMQP client for the broker core: no sockets, no runtime.
//!
//! [`Client`] owns a [`Connection`] and plays both the client and the server's connection
//! task: it encodes client frames, cuts them back with `split_frame` and feeds them to the
//! connection as one input batch (then `flush`, as the server does after each read), pumps
//! queue events from its [`VecOutlet`] into the connection, and decodes everything written
//! into [`Reply`]s. Deliveries come back whole: method + content header + body.

#![allow(dead_code)] // each test binary uses a different subset

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rill_broker::{Broker, ConnEvent, Connection, Outlet};
use rill_codec::amq_protocol::protocol::{
    basic, channel, confirm, connection as conn, exchange, queue, tx,
};
use rill_codec::{
    decode_content_header, decode_method, encode_basic_ack, encode_basic_nack, encode_basic_reject,
    encode_content, encode_method, encode_publish, split_frame, AMQPClass, AMQPValue, FieldTable,
    LongString, Method, ShortString, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
    PROTOCOL_HEADER,
};
use std::sync::Arc;

/// Frame size both sides agree on in the handshake.
pub const FRAME_MAX: u32 = 131_072;

/// Collects what queues hand to a connection, as the server's event channel would.
#[derive(Debug, Default)]
pub struct VecOutlet(Mutex<Vec<ConnEvent>>);

impl Outlet for VecOutlet {
    fn push(&self, event: ConnEvent) {
        self.0.lock().push(event);
    }
}

impl VecOutlet {
    fn take(&self) -> Vec<ConnEvent> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// One thing the connection wrote, decoded. Bodies are UTF-8 in these tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Deliver {
        ch: u16,
        ctag: String,
        tag: u64,
        redelivered: bool,
        exchange: String,
        rk: String,
        body: String,
    },
    GetOk {
        ch: u16,
        tag: u64,
        redelivered: bool,
        left: u32,
        body: String,
    },
    GetEmpty {
        ch: u16,
    },
    Return {
        ch: u16,
        code: u16,
        text: String,
        exchange: String,
        rk: String,
        body: String,
    },
    /// A publisher confirm.
    Ack {
        ch: u16,
        tag: u64,
        multiple: bool,
    },
    Nack {
        ch: u16,
        tag: u64,
        multiple: bool,
    },
    /// Server-sent basic.cancel (consumer_cancel_notify).
    Cancel {
        ch: u16,
        ctag: String,
    },
    ChannelClose {
        ch: u16,
        code: u16,
        text: String,
        method: (u16, u16),
    },
    ConnectionClose {
        code: u16,
        text: String,
        method: (u16, u16),
    },
    Heartbeat,
    /// Any other method (the `-ok` replies, connection.start/tune, ...).
    Method {
        ch: u16,
        method: AMQPClass,
    },
}

impl Reply {
    /// The body of a delivery or get-ok.
    pub fn body(&self) -> Option<&str> {
        match self {
            Reply::Deliver { body, .. } | Reply::GetOk { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// Bodies of the deliveries and get-oks among `replies`, in order.
pub fn bodies(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| r.body().map(str::to_owned))
        .collect()
}

/// Delivery tags of the deliveries among `replies`, in order.
pub fn tags(replies: &[Reply]) -> Vec<u64> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Deliver { tag, .. } | Reply::GetOk { tag, .. } => Some(*tag),
            _ => None,
        })
        .collect()
}

/// A plain `-ok` (or other control) method on a channel.
pub fn ok(ch: u16, method: AMQPClass) -> Reply {
    Reply::Method { ch, method }
}

pub fn channel_close(ch: u16, code: u16, text: &str, method: (u16, u16)) -> Reply {
    Reply::ChannelClose {
        ch,
        code,
        text: text.to_owned(),
        method,
    }
}

pub fn connection_close(code: u16, text: &str, method: (u16, u16)) -> Reply {
    Reply::ConnectionClose {
        code,
        text: text.to_owned(),
        method,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decodes everything in `buf`. Panics on anything a correct server would not write.
pub fn decode_all(buf: &mut BytesMut) -> Vec<Reply> {
    let mut replies = Vec::new();
    let next = |buf: &mut BytesMut| {
        split_frame(buf, FRAME_MAX).unwrap_or_else(|e| panic!("server wrote a bad frame: {e}"))
    };
    while let Some(frame) = next(buf) {
        let ch = frame.channel;
        match frame.kind {
            FRAME_HEARTBEAT => {
                replies.push(Reply::Heartbeat);
                continue;
            }
            FRAME_METHOD => {}
            other => panic!("frame of type {other} outside a content sequence"),
        }
        let method = decode_method(&frame.payload)
            .unwrap_or_else(|e| panic!("server wrote an undecodable method: {e}"));
        // Content-carrying methods: the header and body frames must follow back-to-back.
        let content = |buf: &mut BytesMut| -> String {
            let header = next(buf).expect("content header after a content method");
            assert_eq!(
                (header.kind, header.channel),
                (FRAME_HEADER, ch),
                "content header must follow at once"
            );
            let header = decode_content_header(header.payload).expect("content header");
            let mut body = Vec::new();
            while (body.len() as u64) < header.body_size {
                let part = next(buf).expect("body frame");
                assert_eq!((part.kind, part.channel), (FRAME_BODY, ch));
                body.extend_from_slice(&part.payload);
            }
            assert_eq!(body.len() as u64, header.body_size);
            lossy(&body)
        };
        let reply = match method {
            Method::Ack {
                delivery_tag,
                multiple,
            } => Reply::Ack {
                ch,
                tag: delivery_tag,
                multiple,
            },
            Method::Nack {
                delivery_tag,
                multiple,
                ..
            } => Reply::Nack {
                ch,
                tag: delivery_tag,
                multiple,
            },
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => Reply::Deliver {
                ch,
                ctag: d.consumer_tag.to_string(),
                tag: d.delivery_tag,
                redelivered: d.redelivered,
                exchange: d.exchange.to_string(),
                rk: d.routing_key.to_string(),
                body: content(buf),
            },
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::GetOk(g))) => Reply::GetOk {
                ch,
                tag: g.delivery_tag,
                redelivered: g.redelivered,
                left: g.message_count,
                body: content(buf),
            },
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_))) => {
                Reply::GetEmpty { ch }
            }
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::Return(r))) => Reply::Return {
                ch,
                code: r.reply_code,
                text: r.reply_text.to_string(),
                exchange: r.exchange.to_string(),
                rk: r.routing_key.to_string(),
                body: content(buf),
            },
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::Cancel(c))) => Reply::Cancel {
                ch,
                ctag: c.consumer_tag.to_string(),
            },
            Method::Other(AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                Reply::ChannelClose {
                    ch,
                    code: c.reply_code,
                    text: c.reply_text.to_string(),
                    method: (c.class_id, c.method_id),
                }
            }
            Method::Other(AMQPClass::Connection(conn::AMQPMethod::Close(c))) => {
                assert_eq!(ch, 0, "connection.close on channel {ch}");
                Reply::ConnectionClose {
                    code: c.reply_code,
                    text: c.reply_text.to_string(),
                    method: (c.class_id, c.method_id),
                }
            }
            Method::Other(method) => Reply::Method { ch, method },
            other => panic!("server wrote a client-only method: {other:?}"),
        };
        replies.push(reply);
    }
    assert!(buf.is_empty(), "trailing partial frame: {buf:?}");
    replies
}

// ---- client frames ----

/// Frames for one method.
pub fn frame(ch: u16, method: AMQPClass) -> BytesMut {
    let mut b = BytesMut::new();
    encode_method(&mut b, ch, &method);
    b
}

/// basic.publish + content header + body.
pub fn publish_frames(
    ch: u16,
    exchange: &str,
    rk: &str,
    mandatory: bool,
    properties: &[u8],
    body: &str,
) -> BytesMut {
    let mut b = BytesMut::new();
    encode_publish(&mut b, ch, exchange, rk, mandatory, false);
    encode_content(&mut b, ch, properties, body.as_bytes(), FRAME_MAX);
    b
}

/// Encoded basic properties carrying `headers`.
pub fn props_with_headers(headers: FieldTable) -> Bytes {
    rill_codec::encode_properties(&rill_codec::BasicProperties::default().with_headers(headers))
}

pub fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// What a client announces in connection.start-ok.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub vhost: String,
    /// Announce `consumer_cancel_notify` in the client capabilities.
    pub cancel_notify: bool,
}

impl Default for Login {
    fn default() -> Self {
        Login {
            user: "guest".into(),
            password: "guest".into(),
            vhost: "/".into(),
            cancel_notify: true,
        }
    }
}

fn start_ok(login: &Login) -> AMQPClass {
    let mut caps = FieldTable::default();
    caps.insert(
        "consumer_cancel_notify".into(),
        AMQPValue::Boolean(login.cancel_notify),
    );
    caps.insert("publisher_confirms".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("product".into(), long_str("rill-broker tests"));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    let response = format!("\0{}\0{}", login.user, login.password);
    AMQPClass::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
        client_properties: props,
        mechanism: "PLAIN".into(),
        response: LongString::from(response.as_bytes()),
        locale: "en_US".into(),
    }))
}

/// One connection of an in-process client.
#[derive(Debug)]
pub struct Client {
    /// Always Some until drop; an Option so `Drop` can end the connection before it bounces
    /// the events left in the outlet, in the server's order.
    conn: Option<Connection>,
    outlet: Arc<VecOutlet>,
    out: BytesMut,
}

impl Client {
    /// A connection that has received the protocol header and answered connection.start.
    pub fn start(broker: &Broker) -> (Client, Vec<Reply>) {
        let outlet = Arc::new(VecOutlet::default());
        let mut c = Client {
            conn: Some(Connection::new(broker.clone(), outlet.clone(), None)),
            outlet,
            out: BytesMut::new(),
        };
        let mut out = std::mem::take(&mut c.out);
        assert!(c.conn().accept_header(&PROTOCOL_HEADER, &mut out));
        c.out = out;
        let replies = c.pump();
        (c, replies)
    }

    /// Runs the handshake with `login`; returns the client and every reply after start
    /// (tune, then open-ok; or a connection.close).
    pub fn handshake(broker: &Broker, login: &Login) -> (Client, Vec<Reply>) {
        let (mut c, start) = Client::start(broker);
        assert!(matches!(
            start.as_slice(),
            [Reply::Method {
                ch: 0,
                method: AMQPClass::Connection(conn::AMQPMethod::Start(_))
            }]
        ));
        let mut replies = c.send(frame(0, start_ok(login)));
        if !matches!(replies.as_slice(), [Reply::Method { .. }]) {
            return (c, replies);
        }
        let tune_ok = conn::TuneOk {
            channel_max: 2047,
            frame_max: FRAME_MAX,
            heartbeat: 60,
        };
        replies.extend(c.send(frame(
            0,
            AMQPClass::Connection(conn::AMQPMethod::TuneOk(tune_ok)),
        )));
        replies.extend(c.send(frame(
            0,
            AMQPClass::Connection(conn::AMQPMethod::Open(conn::Open {
                virtual_host: login.vhost.as_str().into(),
            })),
        )));
        (c, replies)
    }

    /// An open connection as guest on `/`, announcing consumer_cancel_notify.
    pub fn connect(broker: &Broker) -> Client {
        Client::connect_as(broker, &Login::default())
    }

    pub fn connect_as(broker: &Broker, login: &Login) -> Client {
        let (mut c, replies) = Client::handshake(broker, login);
        assert!(c.conn().is_open(), "handshake failed: {replies:?}");
        c
    }

    /// An open connection with channel `ch` open.
    pub fn with_channel(broker: &Broker, ch: u16) -> Client {
        let mut c = Client::connect(broker);
        c.open_channel(ch);
        c
    }

    /// The connection under test.
    pub fn conn(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connection dropped")
    }

    /// Feeds `bytes` as one input batch, flushes, pumps queue events; returns what was written.
    pub fn send(&mut self, mut bytes: BytesMut) -> Vec<Reply> {
        while let Some(f) = split_frame(&mut bytes, FRAME_MAX).expect("client frame") {
            let out = &mut self.out;
            self.conn.as_mut().expect("open").handle_frame(f, out);
        }
        assert!(bytes.is_empty());
        self.conn.as_mut().expect("open").flush(&mut self.out);
        self.pump()
    }

    /// Hands the queue events waiting in the outlet to the connection (as the server's
    /// connection task does) and decodes everything written so far.
    pub fn pump(&mut self) -> Vec<Reply> {
        loop {
            let events = self.outlet.take();
            if events.is_empty() {
                break;
            }
            for ev in events {
                self.conn
                    .as_mut()
                    .expect("open")
                    .handle_event(ev, &mut self.out);
            }
        }
        decode_all(&mut self.out)
    }

    /// Sends one method and returns the replies.
    pub fn call(&mut self, ch: u16, method: AMQPClass) -> Vec<Reply> {
        self.send(frame(ch, method))
    }

    /// Sends one method that must be answered by exactly `expected`.
    pub fn expect_ok(&mut self, ch: u16, method: AMQPClass, expected: AMQPClass) {
        assert_eq!(self.call(ch, method), vec![ok(ch, expected)]);
    }

    pub fn open_channel(&mut self, ch: u16) {
        self.expect_ok(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
    }

    pub fn close_channel(&mut self, ch: u16) -> Vec<Reply> {
        self.call(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
    }

    /// Declares a queue; returns all replies.
    pub fn declare_queue_with(&mut self, ch: u16, d: queue::Declare) -> Vec<Reply> {
        self.call(ch, AMQPClass::Queue(queue::AMQPMethod::Declare(d)))
    }

    /// Declares a plain queue that must succeed; returns (message_count, consumer_count).
    pub fn declare_queue(&mut self, ch: u16, name: &str) -> (u32, u32) {
        let replies = self.declare_queue_with(
            ch,
            queue::Declare {
                queue: name.into(),
                ..Default::default()
            },
        );
        match replies.as_slice() {
            [Reply::Method {
                method: AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)),
                ..
            }] => {
                assert_eq!(ok.queue.as_str(), name);
                (ok.message_count, ok.consumer_count)
            }
            other => panic!("queue.declare {name}: {other:?}"),
        }
    }

    /// Passive declare: (message_count, consumer_count), or the replies if it failed.
    pub fn queue_counts(&mut self, ch: u16, name: &str) -> Result<(u32, u32), Vec<Reply>> {
        let replies = self.declare_queue_with(
            ch,
            queue::Declare {
                queue: name.into(),
                passive: true,
                ..Default::default()
            },
        );
        match replies.as_slice() {
            [Reply::Method {
                method: AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)),
                ..
            }] => Ok((ok.message_count, ok.consumer_count)),
            _ => Err(replies),
        }
    }

    pub fn declare_exchange(&mut self, ch: u16, name: &str, kind: &str) {
        self.expect_ok(
            ch,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: name.into(),
                kind: kind.into(),
                ..Default::default()
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
        );
    }

    pub fn bind_with(&mut self, ch: u16, q: &str, x: &str, rk: &str, arguments: FieldTable) {
        self.expect_ok(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: q.into(),
                exchange: x.into(),
                routing_key: rk.into(),
                nowait: false,
                arguments,
            })),
            AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        );
    }

    pub fn bind(&mut self, ch: u16, q: &str, x: &str, rk: &str) {
        self.bind_with(ch, q, x, rk, FieldTable::default());
    }

    pub fn delete_queue(&mut self, ch: u16, q: &str) -> Vec<Reply> {
        self.call(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: q.into(),
                ..Default::default()
            })),
        )
    }

    pub fn publish(&mut self, ch: u16, exchange: &str, rk: &str, body: &str) -> Vec<Reply> {
        self.send(publish_frames(ch, exchange, rk, false, &[], body))
    }

    pub fn get(&mut self, ch: u16, q: &str, no_ack: bool) -> Vec<Reply> {
        self.call(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: q.into(),
                no_ack,
            })),
        )
    }

    /// basic.get with ack that must return a message: (tag, redelivered, body).
    pub fn get_one(&mut self, ch: u16, q: &str) -> (u64, bool, String) {
        match self.get(ch, q, false).as_slice() {
            [Reply::GetOk {
                tag,
                redelivered,
                body,
                ..
            }] => (*tag, *redelivered, body.clone()),
            other => panic!("basic.get {q}: {other:?}"),
        }
    }

    /// Takes everything left in `q` (no-ack); returns the bodies in order.
    pub fn drain(&mut self, ch: u16, q: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match self.get(ch, q, true).as_slice() {
                [Reply::GetOk { body, .. }] => out.push(body.clone()),
                [Reply::GetEmpty { .. }] => return out,
                other => panic!("basic.get {q}: {other:?}"),
            }
        }
    }

    pub fn qos(&mut self, ch: u16, prefetch_count: u16, global: bool) {
        self.expect_ok(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count,
                global,
            })),
            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        );
    }

    /// basic.consume; returns all replies (consume-ok first, then deliveries).
    pub fn consume_with(&mut self, ch: u16, c: basic::Consume) -> Vec<Reply> {
        self.call(ch, AMQPClass::Basic(basic::AMQPMethod::Consume(c)))
    }

    /// basic.consume with manual acks that must succeed; returns the deliveries it triggered.
    pub fn consume(&mut self, ch: u16, q: &str, ctag: &str) -> Vec<Reply> {
        self.consume_args(ch, q, ctag, FieldTable::default())
    }

    pub fn consume_args(&mut self, ch: u16, q: &str, ctag: &str, args: FieldTable) -> Vec<Reply> {
        let mut replies = self.consume_with(
            ch,
            basic::Consume {
                queue: q.into(),
                consumer_tag: ctag.into(),
                arguments: args,
                ..Default::default()
            },
        );
        assert_eq!(
            replies.first(),
            Some(&ok(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: ctag.into()
                }))
            )),
            "{replies:?}"
        );
        replies.remove(0);
        replies
    }

    pub fn cancel(&mut self, ch: u16, ctag: &str) -> Vec<Reply> {
        self.call(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: ctag.into(),
                nowait: false,
            })),
        )
    }

    pub fn ack(&mut self, ch: u16, tag: u64, multiple: bool) -> Vec<Reply> {
        let mut b = BytesMut::new();
        encode_basic_ack(&mut b, ch, tag, multiple);
        self.send(b)
    }

    pub fn nack(&mut self, ch: u16, tag: u64, multiple: bool, requeue: bool) -> Vec<Reply> {
        let mut b = BytesMut::new();
        encode_basic_nack(&mut b, ch, tag, multiple, requeue);
        self.send(b)
    }

    pub fn reject(&mut self, ch: u16, tag: u64, requeue: bool) -> Vec<Reply> {
        let mut b = BytesMut::new();
        encode_basic_reject(&mut b, ch, tag, requeue);
        self.send(b)
    }

    pub fn confirm_select(&mut self, ch: u16) {
        self.expect_ok(
            ch,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
        );
    }

    pub fn tx_select(&mut self, ch: u16) {
        self.expect_ok(
            ch,
            AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
            AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
        );
    }

    pub fn tx_commit(&mut self, ch: u16) -> Vec<Reply> {
        self.call(ch, AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})))
    }

    pub fn tx_rollback(&mut self, ch: u16) -> Vec<Reply> {
        self.call(ch, AMQPClass::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})))
    }
}

impl Drop for Client {
    /// What the server does when a connection ends: drop the `Connection` (its channels
    /// requeue, its exclusive queues go), then bounce deliveries it never took from the outlet.
    fn drop(&mut self) {
        drop(self.conn.take());
        for ev in self.outlet.take() {
            if let ConnEvent::Deliver(d) = ev {
                d.bounce();
            }
        }
    }
}

pub fn commit_ok(ch: u16) -> Reply {
    ok(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})))
}

pub fn rollback_ok(ch: u16) -> Reply {
    ok(
        ch,
        AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
    )
}

pub fn cancel_ok(ch: u16, ctag: &str) -> Reply {
    ok(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: ctag.into(),
        })),
    )
}

pub fn channel_close_ok(ch: u16) -> Reply {
    ok(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
}
