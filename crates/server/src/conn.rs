//! One AMQP connection task: reads frames, feeds the broker core, writes what it produces.
//!
//! A single task owns both socket halves and the connection state, so delivery tags and acks
//! need no locks. Reading, writing and queue events are multiplexed with `select!`; output is
//! gathered in one buffer and written with one syscall per wake-up, so a burst of deliveries
//! or confirms costs one `write`.

use bytes::{Buf, BytesMut};
use rill_broker::{Broker, ConnEvent, Connection, Outlet, Status};
use rill_codec::{encode_heartbeat, split_frame, ReplyCode, PROTOCOL_HEADER};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

/// RabbitMQ's handshake_timeout: the client must finish connection.open within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for connection.close-ok after sending connection.close.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Stop taking queue events while this much output waits for the socket.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Stop reading while this much unparsed input is buffered (a body frame can be up to frame_max).
const READ_BUF: usize = 256 * 1024;

/// How often a flow-paused connection checks whether it may read again.
const FLOW_RECHECK: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct TaskOutlet(mpsc::UnboundedSender<ConnEvent>);

impl Outlet for TaskOutlet {
    fn push(&self, event: ConnEvent) {
        // Fails only once the task has ended; by then its consumers were removed from their
        // queues (see the end of `run`), so nothing that must survive is sent here.
        let _ = self.0.send(event);
    }
}

pub(crate) async fn run(
    socket: TcpStream,
    peer: SocketAddr,
    broker: Broker,
    mut stop: broadcast::Receiver<()>,
) {
    let _ = socket.set_nodelay(true);
    let (mut rd, mut wr) = socket.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut conn = Connection::new(broker, Arc::new(TaskOutlet(tx)), Some(peer.ip()));
    let id = conn.id();
    tracing::debug!(connection = id, %peer, "accepted");

    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);

    // Protocol header.
    let header_ok = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while rbuf.len() < PROTOCOL_HEADER.len() {
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !header_ok {
        return;
    }
    let header = rbuf.split_to(PROTOCOL_HEADER.len());
    if !conn.accept_header(&header, &mut wbuf) {
        tracing::debug!(connection = id, "bad protocol header");
        let _ = wr.write_all(&PROTOCOL_HEADER).await;
        let _ = wr.shutdown().await;
        return;
    }

    let started = Instant::now();
    let mut last_read = Instant::now();
    let mut last_write = Instant::now();
    let mut closing_since: Option<Instant> = None;
    let mut input_broken = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let status = conn.status();
        if status == Status::Closed {
            break;
        }
        if status == Status::Closing && closing_since.is_none() {
            closing_since = Some(Instant::now());
        }
        let flow_paused = status == Status::Running && conn.reading_paused();
        let can_read = rbuf.len() < READ_BUF && !flow_paused;
        if flow_paused {
            // Not reading is our choice, not the peer's silence: don't count it as missed
            // heartbeats (RabbitMQ pauses its heartbeat monitor the same way).
            last_read = Instant::now();
        }
        let can_take_events = wbuf.len() < WRITE_HIGH_WATER && status == Status::Running;
        tokio::select! {
            r = rd.read_buf(&mut rbuf), if can_read => {
                match r {
                    Ok(0) | Err(_) => {
                        conn.abort();
                        break;
                    }
                    Ok(_) => {
                        last_read = Instant::now();
                        if input_broken {
                            rbuf.clear();
                            continue;
                        }
                        // One sync round for the whole read, started after its deliveries.
                        let _batch = rill_store::SyncGroup::defer_start();
                        loop {
                            match split_frame(&mut rbuf, conn.tuning().frame_max) {
                                Ok(Some(frame)) => {
                                    if conn.handle_frame(frame, &mut wbuf) == Status::Closed {
                                        break;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    conn.protocol_error(e, &mut wbuf);
                                    input_broken = true;
                                    rbuf.clear();
                                    break;
                                }
                            }
                        }
                        conn.flush(&mut wbuf);
                    }
                }
            }
            w = wr.write(&wbuf), if !wbuf.is_empty() => {
                match w {
                    Ok(0) | Err(_) => {
                        conn.abort();
                        break;
                    }
                    Ok(n) => {
                        wbuf.advance(n);
                        last_write = Instant::now();
                    }
                }
            }
            ev = rx.recv(), if can_take_events => {
                if let Some(ev) = ev {
                    conn.handle_event(ev, &mut wbuf);
                    // Drain what is already queued so it goes out in the same write.
                    while wbuf.len() < WRITE_HIGH_WATER {
                        match rx.try_recv() {
                            Ok(ev) => conn.handle_event(ev, &mut wbuf),
                            Err(_) => break,
                        }
                    }
                }
            }
            // Flow control: look again soon whether the queues we publish to have drained.
            _ = tokio::time::sleep(FLOW_RECHECK), if flow_paused => {}
            _ = stop.recv() => {
                conn.force_close(
                    ReplyCode::ConnectionForced,
                    "broker forced connection closure with reason 'shutdown'",
                    &mut wbuf,
                );
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if !conn.is_open() && status == Status::Running && now - started > HANDSHAKE_TIMEOUT {
                    tracing::info!(connection = id, "handshake timeout");
                    break;
                }
                if closing_since.is_some_and(|t| now - t > CLOSE_GRACE) {
                    break;
                }
                let hb = conn.tuning().heartbeat;
                if hb > 0 && conn.is_open() {
                    let interval = Duration::from_secs(u64::from(hb));
                    if now - last_write >= interval / 2 && wbuf.is_empty() {
                        encode_heartbeat(&mut wbuf);
                    }
                    if now - last_read > interval * 2 {
                        tracing::warn!(connection = id, %peer, timeout_s = hb, "missed heartbeats from client, closing");
                        conn.abort();
                        break;
                    }
                }
            }
        }
    }
    // Last words (close-ok, close) go out before the socket closes.
    if !wbuf.is_empty() {
        let _ = tokio::time::timeout(CLOSE_GRACE, wr.write_all(&wbuf)).await;
    }
    let _ = wr.shutdown().await;
    // Dropping the connection removes its consumers from their queues (under each queue's
    // lock), so no queue pushes to `rx` after this; what is already there goes back.
    drop(conn);
    rx.close();
    while let Ok(ev) = rx.try_recv() {
        if let ConnEvent::Deliver(d) = ev {
            d.bounce();
        }
    }
    tracing::debug!(connection = id, "closed");
}
