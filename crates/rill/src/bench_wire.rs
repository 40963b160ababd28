//! A pipelined AMQP 0-9-1 load client on rill-codec, for `rill bench amqp --client wire`.
//!
//! Why it exists: lapin spends about 19 µs of client CPU per confirmed and acked message
//! (amqp-load against Rill: 78 k msg/s at 150 % of this machine's 200 %), so on two cores a
//! lapin client, not the broker under test, sets the figure. This client pre-encodes each
//! publish, writes publishes and acks in batches of one `write` each and reads deliveries in
//! place, so the broker is the bottleneck, whichever broker it is. It speaks only what a
//! benchmark needs (PLAIN login, one channel, confirms, qos, consume, ack) and is no
//! general-purpose client: tests use lapin, pika and the other real clients.

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, BytesMut};
use rill_codec::amq_protocol::protocol::{basic, channel, confirm, connection, parse_class};
use rill_codec::amq_protocol::uri::AMQPUri;
use rill_codec::{
    encode_basic_ack, encode_content, encode_method, encode_publish, split_frame, AMQPClass,
    FieldTable, RawFrame, CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, METHOD_BASIC_ACK,
    METHOD_BASIC_DELIVER, METHOD_BASIC_NACK, PROTOCOL_HEADER,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The channel every benchmark connection works on.
const CHANNEL: u16 = 1;
/// The largest frame this client asks for (RabbitMQ's default).
const FRAME_MAX: u32 = 131_072;
/// Publishes encoded into one socket write at most.
const PUBLISH_BATCH: usize = 256;

/// Frames in from one socket half.
struct FrameReader<R> {
    socket: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(socket: R) -> Self {
        FrameReader {
            socket,
            buf: BytesMut::with_capacity(256 * 1024),
        }
    }

    /// The next frame already buffered, without reading.
    fn buffered(&mut self) -> anyhow::Result<Option<RawFrame>> {
        split_frame(&mut self.buf, FRAME_MAX).map_err(|e| anyhow!("bad frame from broker: {e}"))
    }

    /// Reads once more from the socket; an error at end of stream.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.capacity() - self.buf.len() < 64 * 1024 {
            self.buf.reserve(256 * 1024);
        }
        if self.socket.read_buf(&mut self.buf).await? == 0 {
            bail!("broker closed the connection");
        }
        Ok(())
    }

    async fn next(&mut self) -> anyhow::Result<RawFrame> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next method on any channel, skipping heartbeats; a close from the broker is an
    /// error carrying its reply code and text.
    async fn next_method(&mut self) -> anyhow::Result<AMQPClass> {
        loop {
            let frame = self.next().await?;
            if frame.kind != FRAME_METHOD {
                continue;
            }
            let method = parse_method(&frame.payload)?;
            match &method {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                    bail!("connection closed: {} {}", c.reply_code, c.reply_text)
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                    bail!("channel closed: {} {}", c.reply_code, c.reply_text)
                }
                _ => return Ok(method),
            }
        }
    }
}

fn parse_method(payload: &[u8]) -> anyhow::Result<AMQPClass> {
    parse_class(payload)
        .map(|(_, class)| class)
        .map_err(|e| anyhow!("undecodable method from broker: {e}"))
}

/// An open connection with channel 1 open, not yet split into halves.
pub struct WireConn {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: BytesMut,
    frame_max: u32,
}

impl WireConn {
    /// Connects, logs in with PLAIN and opens channel 1.
    pub async fn connect(uri: &str) -> anyhow::Result<WireConn> {
        let uri: AMQPUri = uri.parse().map_err(|e| anyhow!("bad AMQP URI: {e}"))?;
        let socket = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
            .await
            .context("connect")?;
        socket.set_nodelay(true)?;
        let (read, write) = socket.into_split();
        let mut conn = WireConn {
            reader: FrameReader::new(read),
            writer: write,
            out: BytesMut::with_capacity(64 * 1024),
            frame_max: FRAME_MAX,
        };
        conn.writer.write_all(&PROTOCOL_HEADER).await?;
        let AMQPClass::Connection(connection::AMQPMethod::Start(_)) =
            conn.reader.next_method().await?
        else {
            bail!("expected connection.start");
        };
        let user = &uri.authority.userinfo;
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{}\0{}", user.username, user.password).into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) =
            conn.reader.next_method().await?
        else {
            bail!("expected connection.tune");
        };
        conn.frame_max = match tune.frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: conn.frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        conn.call(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: uri.vhost.as_str().into(),
            })),
        )
        .await?;
        conn.call(
            CHANNEL,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        Ok(conn)
    }

    async fn send(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        encode_method(&mut self.out, channel, &method);
        self.writer.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Sends a synchronous method and returns the broker's reply.
    pub async fn call(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<AMQPClass> {
        self.send(channel, method).await?;
        self.reader.next_method().await
    }
}

/// What one publisher or consumer counted; read by the benchmark's clock.
#[derive(Default)]
pub struct Counters {
    /// Publishes the broker confirmed with `basic.ack` (or consumed deliveries).
    pub done: AtomicU64,
    /// Publishes the broker refused with `basic.nack`.
    pub nacked: AtomicU64,
}

/// Publishes confirmed messages to `queue` through the default exchange until `stop`, with
/// at most `inflight` unconfirmed; `properties[i % len]` are the raw properties of the i-th.
pub async fn publish(
    uri: &str,
    queue: &str,
    body: &[u8],
    properties: &[bytes::Bytes],
    inflight: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut conn = WireConn::connect(uri).await?;
    conn.call(
        CHANNEL,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await?;
    let WireConn {
        reader,
        mut writer,
        mut out,
        frame_max,
    } = conn;
    let settled = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let confirms = tokio::spawn(read_confirms(
        reader,
        settled.clone(),
        wake.clone(),
        counters,
    ));
    let inflight = inflight.max(1) as u64;
    let mut sent: u64 = 0;
    let result = async {
        while !stop.load(Ordering::Relaxed) {
            let room = inflight.saturating_sub(sent - settled.load(Ordering::Acquire));
            if room == 0 {
                wake.notified().await;
                continue;
            }
            for _ in 0..room.min(PUBLISH_BATCH as u64) {
                let props = &properties[(sent % properties.len() as u64) as usize];
                encode_publish(&mut out, CHANNEL, "", queue, false, false);
                encode_content(&mut out, CHANNEL, props, body, frame_max);
                sent += 1;
            }
            writer.write_all(&out).await?;
            out.clear();
        }
        anyhow::Ok(())
    }
    .await;
    confirms.abort();
    result
}

/// Counts `basic.ack`/`nack` confirms, which may be `multiple` and may settle tags out of
/// order, and wakes the writer as room frees up.
async fn read_confirms(
    mut reader: FrameReader<OwnedReadHalf>,
    settled: Arc<AtomicU64>,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let mut ledger = ConfirmLedger::default();
    loop {
        let frame = reader.next().await?;
        if frame.kind != FRAME_METHOD {
            continue;
        }
        let p = &frame.payload[..];
        let (class, method) = (u16_at(p, 0), u16_at(p, 2));
        if class != Some(CLASS_BASIC)
            || !matches!(method, Some(METHOD_BASIC_ACK | METHOD_BASIC_NACK))
        {
            let m = parse_method(p)?;
            bail!("unexpected method on the publishing channel: {m:?}");
        }
        let (Some(tag), Some(&bits)) = (u64_at(p, 4), p.get(12)) else {
            bail!("truncated confirm");
        };
        let newly = ledger.settle(tag, bits & 1 != 0);
        if method == Some(METHOD_BASIC_ACK) {
            counters.done.fetch_add(newly, Ordering::Relaxed);
        } else {
            counters.nacked.fetch_add(newly, Ordering::Relaxed);
        }
        settled.store(ledger.settled(), Ordering::Release);
        wake.notify_one();
    }
}

/// Which publish sequence numbers (1, 2, …) the broker has confirmed.
#[derive(Default)]
struct ConfirmLedger {
    /// Every tag up to here is settled.
    upto: u64,
    /// Tags above `upto` settled one by one.
    above: BTreeSet<u64>,
}

impl ConfirmLedger {
    /// Settles `tag` (and every lower one if `multiple`); returns how many were new.
    fn settle(&mut self, tag: u64, multiple: bool) -> u64 {
        if tag <= self.upto {
            return 0;
        }
        let newly = if multiple {
            let singles = self.above.range(..=tag).count() as u64;
            self.above = self.above.split_off(&(tag + 1));
            let n = tag - self.upto - singles;
            self.upto = tag;
            n
        } else if self.above.insert(tag) {
            1
        } else {
            0
        };
        while self.above.first() == Some(&(self.upto + 1)) {
            self.above.pop_first();
            self.upto += 1;
        }
        newly
    }

    fn settled(&self) -> u64 {
        self.upto + self.above.len() as u64
    }
}

/// Consumes from `queue` with `prefetch` and manual acks until `stop`: one `basic.ack` per
/// delivery, or a `multiple` ack every `ack_every` deliveries. All acks produced by one read
/// go out in one write.
pub async fn consume(
    uri: &str,
    queue: &str,
    prefetch: u16,
    ack_every: u64,
    arguments: FieldTable,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut conn = WireConn::connect(uri).await?;
    conn.call(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })),
    )
    .await?;
    conn.call(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: "bench".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments,
        })),
    )
    .await?;
    let WireConn {
        mut reader,
        mut writer,
        mut out,
        ..
    } = conn;
    let ack_every = ack_every.max(1);
    let mut body_left: u64 = 0;
    let mut last_tag: u64 = 0;
    let mut unacked: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        reader.fill().await?;
        while let Some(frame) = reader.buffered()? {
            let complete = match frame.kind {
                FRAME_METHOD => {
                    last_tag = deliver_tag(&frame.payload)?;
                    false
                }
                FRAME_HEADER => {
                    body_left = u64_at(&frame.payload, 4).context("truncated content header")?;
                    body_left == 0
                }
                FRAME_BODY => {
                    body_left = body_left.saturating_sub(frame.payload.len() as u64);
                    body_left == 0
                }
                _ => false,
            };
            if complete {
                counters.done.fetch_add(1, Ordering::Relaxed);
                unacked += 1;
                if unacked == ack_every {
                    encode_basic_ack(&mut out, CHANNEL, last_tag, ack_every > 1);
                    unacked = 0;
                }
            }
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            out.clear();
        }
    }
    Ok(())
}

/// The delivery tag of a `basic.deliver`; any other method here is an error.
fn deliver_tag(payload: &[u8]) -> anyhow::Result<u64> {
    if (u16_at(payload, 0), u16_at(payload, 2)) != (Some(CLASS_BASIC), Some(METHOD_BASIC_DELIVER)) {
        let m = parse_method(payload)?;
        bail!("unexpected method on the consuming channel: {m:?}");
    }
    let tag_len = usize::from(*payload.get(4).context("truncated basic.deliver")?);
    u64_at(payload, 5 + tag_len).context("truncated basic.deliver")
}

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(p: &[u8], at: usize) -> Option<u64> {
    let mut b = p.get(at..at + 8)?;
    Some(b.get_u64())
}

#[cfg(test)]
mod tests {
    use super::ConfirmLedger;

    #[test]
    fn ledger_counts_each_tag_once_in_any_order() {
        let mut l = ConfirmLedger::default();
        assert_eq!(l.settle(3, false), 1);
        assert_eq!(l.settle(1, false), 1);
        assert_eq!(l.settled(), 2);
        assert_eq!(l.settle(5, true), 3); // 2, 4, 5
        assert_eq!(l.settled(), 5);
        assert_eq!(l.settle(5, false), 0);
        assert_eq!(l.settle(4, true), 0);
        assert_eq!(l.settle(6, false), 1);
        assert_eq!(l.settled(), 6);
        assert_eq!((l.upto, l.above.len()), (6, 0));
    }
}
