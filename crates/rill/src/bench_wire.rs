//! A pipelined AMQP 0-9-1 load client on rill-codec, for `rill bench amqp --client wire`.
//!
//! Why it exists: lapin spends about 19 µs of client CPU per confirmed and acked message
//! (amqp-load against Rill: 78 k msg/s at 150 % of this machine's 200 %), so on two cores a
//! lapin client, not the broker under test, sets the figure. This client pre-encodes each
//! publish, writes publishes and acks in batches of one `write` each and reads deliveries in
//! place, so the broker is the bottleneck, whichever broker it is. It speaks only what a
//! benchmark needs (PLAIN login, one channel, confirms, qos, consume, ack, queue declare and
//! delete) and is no general-purpose client: tests use lapin, pika and the other real clients.
//!
//! `rill bench amqp` publishes one fixed body as fast as the confirm window allows;
//! `rill bench pipeline` needs more of the same client: a body per message (each carries a
//! marker that identifies it), an optional fixed rate (latency at a load the system under
//! test sustains) and a consumer that sees each body ([`publish_each`], [`consume_each`]).

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, BytesMut};
use rill_codec::amq_protocol::protocol::{basic, channel, confirm, connection, parse_class, queue};
use rill_codec::amq_protocol::uri::AMQPUri;
use rill_codec::{
    encode_basic_ack, encode_content, encode_method, encode_publish, split_frame, AMQPClass,
    FieldTable, RawFrame, CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, METHOD_BASIC_ACK,
    METHOD_BASIC_DELIVER, METHOD_BASIC_NACK, PROTOCOL_HEADER,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

    /// Declares a classic queue without arguments (durable or transient; a queue that exists
    /// with the same flags is left as it is) and returns its `(messages, consumers)`.
    pub async fn declare_queue(&mut self, name: &str, durable: bool) -> anyhow::Result<(u32, u32)> {
        self.declare_queue_with(name, durable, FieldTable::default())
            .await
    }

    /// [`WireConn::declare_queue`] with `arguments`.
    pub async fn declare_queue_with(
        &mut self,
        name: &str,
        durable: bool,
        arguments: FieldTable,
    ) -> anyhow::Result<(u32, u32)> {
        let reply = self
            .call(
                CHANNEL,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: short(name)?,
                    passive: false,
                    durable,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments,
                })),
            )
            .await?;
        match reply {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
                Ok((ok.message_count, ok.consumer_count))
            }
            other => bail!("expected queue.declare-ok, got {other:?}"),
        }
    }

    /// Deletes a queue (a missing one is no error on Rill or RabbitMQ); returns how many
    /// messages it held.
    pub async fn delete_queue(&mut self, name: &str) -> anyhow::Result<u32> {
        let reply = self
            .call(
                CHANNEL,
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: short(name)?,
                    if_unused: false,
                    if_empty: false,
                    nowait: false,
                })),
            )
            .await?;
        match reply {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => Ok(ok.message_count),
            other => bail!("expected queue.delete-ok, got {other:?}"),
        }
    }
}

/// A queue name as a short string; `From<&str>` would panic past 255 bytes.
fn short(name: &str) -> anyhow::Result<rill_codec::amq_protocol::types::ShortString> {
    if name.len() > 255 {
        bail!("queue name longer than 255 bytes: {name}");
    }
    Ok(name.into())
}

/// What one publisher or consumer counted; read by the benchmark's clock.
#[derive(Default)]
pub struct Counters {
    /// Publishes the broker confirmed with `basic.ack` (or consumed deliveries).
    pub done: AtomicU64,
    /// Publishes the broker refused with `basic.nack`.
    pub nacked: AtomicU64,
}

/// How a publisher paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Unconfirmed publishes allowed in flight.
    pub inflight: usize,
    /// Publishes in all (the publisher then waits for their confirms and returns); `None`:
    /// until `stop`.
    pub count: Option<u64>,
    /// Publishes per second, spread evenly from the first; `None`: as fast as the confirm
    /// window allows.
    pub rate: Option<f64>,
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
    let pace = Pace {
        inflight,
        count: None,
        rate: None,
    };
    // The buffer keeps the body from one publish to the next: one copy in all, not one per
    // message (bodies may be hundreds of kilobytes).
    let mut filled = false;
    let fixed = |_: u64, buf: &mut Vec<u8>| {
        if !filled {
            buf.extend_from_slice(body);
            filled = true;
        }
    };
    publish_each(uri, queue, properties, pace, fixed, counters, stop).await
}

/// [`publish`] with a body per message and a [`Pace`]: `body(i, buf)` leaves the body of the
/// i-th publish (0-based) in `buf` (which holds the previous body); it is called just before
/// that publish is written, so it may also note the send time.
pub async fn publish_each(
    uri: &str,
    queue: &str,
    properties: &[bytes::Bytes],
    pace: Pace,
    mut body: impl FnMut(u64, &mut Vec<u8>),
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    if properties.is_empty() {
        bail!("no message properties to publish with");
    }
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
    let mut confirms = tokio::spawn(read_confirms(
        reader,
        settled.clone(),
        wake.clone(),
        counters,
    ));
    let inflight = pace.inflight.max(1) as u64;
    let total = pace.count.unwrap_or(u64::MAX);
    let rate = pace.rate.filter(|r| *r > 0.0);
    let mut sent: u64 = 0;
    let mut buf = Vec::new();
    let started = Instant::now();
    // Waits for a confirm; a confirm reader that ended (the broker closed the connection or
    // the channel) ends the publisher with its error instead of leaving it waiting.
    async fn confirmed(
        wake: &Notify,
        confirms: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = wake.notified() => Ok(()),
            ended = confirms => match ended? {
                Ok(()) => bail!("the confirm reader ended"),
                Err(e) => Err(e),
            },
        }
    }
    let result = async {
        while !stop.load(Ordering::Relaxed) && sent < total {
            let mut room = inflight.saturating_sub(sent - settled.load(Ordering::Acquire));
            if room == 0 {
                confirmed(&wake, &mut confirms).await?;
                continue;
            }
            if let Some(rate) = rate {
                // The i-th publish is due i/rate seconds after the first: a late publisher
                // catches up in a burst rather than drifting below the rate.
                let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                if due <= sent {
                    let at = started + Duration::from_secs_f64(sent as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                    continue;
                }
                room = room.min(due - sent);
            }
            for _ in 0..room.min(total - sent).min(PUBLISH_BATCH as u64) {
                let props = &properties[(sent % properties.len() as u64) as usize];
                body(sent, &mut buf);
                encode_publish(&mut out, CHANNEL, "", queue, false, false);
                encode_content(&mut out, CHANNEL, props, &buf, frame_max);
                sent += 1;
            }
            writer.write_all(&out).await?;
            out.clear();
        }
        while !stop.load(Ordering::Relaxed) && settled.load(Ordering::Acquire) < sent {
            confirmed(&wake, &mut confirms).await?;
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
    let spec = ConsumeSpec {
        prefetch,
        ack_every,
        arguments,
    };
    consume_each(uri, queue, spec, counters, stop, None).await
}

/// How a consumer subscribes.
pub struct ConsumeSpec {
    /// `basic.qos` prefetch count.
    pub prefetch: u16,
    /// Ack each delivery (1), or every N deliveries with `multiple`.
    pub ack_every: u64,
    /// `basic.consume` arguments.
    pub arguments: FieldTable,
}

/// Sees the body of each delivery, in order, on the consumer's task.
pub type OnBody = Box<dyn FnMut(&[u8]) + Send>;

/// [`consume`], with `on_body` (if any) called with each delivery's body before it is
/// counted. A body that came in one frame is passed in place; only bodies split over several
/// frames are copied together, and only when there is an `on_body` to see them.
pub async fn consume_each(
    uri: &str,
    queue: &str,
    spec: ConsumeSpec,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    mut on_body: Option<OnBody>,
) -> anyhow::Result<()> {
    let mut conn = WireConn::connect(uri).await?;
    conn.call(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: spec.prefetch,
            global: false,
        })),
    )
    .await?;
    conn.call(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: short(queue)?,
            consumer_tag: "bench".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: spec.arguments,
        })),
    )
    .await?;
    let WireConn {
        mut reader,
        mut writer,
        mut out,
        ..
    } = conn;
    let ack_every = spec.ack_every.max(1);
    let mut body_left: u64 = 0;
    let mut partial: Vec<u8> = Vec::new();
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
                    partial.clear();
                    if body_left == 0 {
                        if let Some(f) = on_body.as_mut() {
                            f(&[]);
                        }
                    }
                    body_left == 0
                }
                FRAME_BODY => {
                    body_left = body_left.saturating_sub(frame.payload.len() as u64);
                    if let Some(f) = on_body.as_mut() {
                        if body_left == 0 && partial.is_empty() {
                            f(&frame.payload);
                        } else {
                            partial.extend_from_slice(&frame.payload);
                            if body_left == 0 {
                                f(&partial);
                            }
                        }
                    }
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
