//! The AMQP connection state machine: handshake, channel multiplexing, connection-level errors.
//!
//! Input is frames (already cut by the codec) and [`ConnEvent`]s from queues; output is bytes
//! appended to the caller's write buffer. The server owns the socket, the timers and the
//! decision when to write; this type never blocks and never sees I/O.

use crate::broker::{Broker, LoginError};
use crate::channel::Channel;
use crate::consumer::{ConnEvent, Outlet};
use crate::session::{poll_confirm_passes, Session, SessionCtx};
use bytes::BytesMut;
use rill_codec::amq_protocol::protocol::{channel as amqp_channel, connection as amqp_conn};
use rill_codec::{
    decode_method, encode_method, short_string_truncated, AMQPClass, AMQPValue, AmqpError,
    FieldTable, LongString, Method, RawFrame, ReplyCode, ShortString, FRAME_BODY, FRAME_HEADER,
    FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// The smallest frame_max a client may ask for (AMQP's frame-min-size).
const FRAME_MIN_SIZE: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent connection.start; waiting for start-ok.
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent connection.close and wait for close-ok; everything else is dropped.
    Closing,
    /// Done: the server should flush and close the socket.
    Closed,
}

/// What the server should do after feeding the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// We sent connection.close; close the socket when close-ok arrives or after a grace period.
    Closing,
    /// Flush what was written and close the socket.
    Closed,
}

/// Parameters fixed by tune/tune-ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub channel_max: u16,
    pub frame_max: u32,
    /// Seconds; 0 = no heartbeats.
    pub heartbeat: u16,
}

#[derive(Debug)]
pub struct Connection {
    broker: Broker,
    peer: Option<IpAddr>,
    /// This connection's id in the broker.
    id: u64,
    /// The authenticated user (after start-ok).
    user: String,
    /// Where queues deliver to this connection.
    outlet: Arc<dyn Outlet>,
    /// Who the channels act for, fixed at connection.open.
    session_ctx: Option<Arc<SessionCtx>>,
    state: State,
    tuning: Tuning,
    client_properties: FieldTable,
    /// Client announced `consumer_cancel_notify`: send basic.cancel when a queue goes away.
    cancel_notify: bool,
    /// Client announced `connection.blocked`: tell it when alarms block publishing.
    blocked_notify: bool,
    /// The resource alarm in force, if any: once this connection publishes, reading stops
    /// (RabbitMQ blocks only connections that publish).
    alarm: Option<String>,
    /// We sent connection.blocked and owe an unblocked.
    told_blocked: bool,
    /// Whether it ever published (RabbitMQ blocks only connections that publish).
    has_published: bool,
    channels: HashMap<u16, Channel>,
}

fn capabilities() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    caps
}

fn server_properties(cluster_name: &str) -> FieldTable {
    let mut t = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    t.insert("capabilities".into(), AMQPValue::FieldTable(capabilities()));
    t.insert("cluster_name".into(), s(cluster_name));
    t.insert("copyright".into(), s("Copyright (c) the Rill authors"));
    t.insert(
        "information".into(),
        s("Rill: an AMQP 0-9-1 broker and stream processor. Licensed under Apache-2.0"),
    );
    t.insert(
        "platform".into(),
        s(concat!("Rust ", env!("CARGO_PKG_RUST_VERSION"))),
    );
    t.insert("product".into(), s("Rill"));
    t.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    t
}

impl Connection {
    pub fn new(broker: Broker, outlet: Arc<dyn Outlet>, peer: Option<IpAddr>) -> Connection {
        let config = broker.config().clone();
        Connection {
            id: broker.next_connection_id(),
            user: String::new(),
            outlet,
            session_ctx: None,
            broker,
            peer,
            state: State::AwaitStartOk,
            tuning: Tuning {
                channel_max: config.channel_max,
                frame_max: config.frame_max,
                heartbeat: 0,
            },
            client_properties: FieldTable::default(),
            cancel_notify: false,
            blocked_notify: false,
            alarm: None,
            told_blocked: false,
            has_published: false,
            channels: HashMap::new(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tuning in force. Before tune-ok, frame_max is our proposal (the handshake must fit).
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn client_properties(&self) -> &FieldTable {
        &self.client_properties
    }

    /// Checks the 8-byte protocol header. On success writes connection.start; on failure the
    /// caller writes [`PROTOCOL_HEADER`] (what we speak) and closes, as the spec asks.
    pub fn accept_header(&mut self, header: &[u8], out: &mut BytesMut) -> bool {
        if header != PROTOCOL_HEADER {
            return false;
        }
        let config = self.broker.config();
        let start = amqp_conn::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(&config.cluster_name),
            mechanisms: LongString::from("PLAIN AMQPLAIN"),
            locales: LongString::from("en_US"),
        };
        encode_method(
            out,
            0,
            &AMQPClass::Connection(amqp_conn::AMQPMethod::Start(start)),
        );
        true
    }

    pub fn status(&self) -> Status {
        match self.state {
            State::Closing => Status::Closing,
            State::Closed => Status::Closed,
            _ => Status::Running,
        }
    }

    /// Feeds one frame.
    pub fn handle_frame(&mut self, frame: RawFrame, out: &mut BytesMut) -> Status {
        if let Err((channel, err)) = self.dispatch_frame(frame, out) {
            self.fail(channel, err, out);
        }
        self.status()
    }

    /// Ends the connection from the server's side (shutdown, operator), e.g. 320
    /// CONNECTION_FORCED.
    pub fn force_close(&mut self, code: ReplyCode, detail: &str, out: &mut BytesMut) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        self.fail(0, AmqpError::new(code, detail), out);
    }

    /// A framing error found by the server (bad frame end, oversize frame): connection.close.
    pub fn protocol_error(&mut self, err: AmqpError, out: &mut BytesMut) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        self.fail(0, err, out);
    }

    /// Whether the server should stop reading this connection's socket for now because queues
    /// it publishes to are backed up (flow control). Re-check periodically while true.
    pub fn reading_paused(&mut self) -> bool {
        if self.alarm.is_some() && self.has_published {
            return true;
        }
        self.channels.values_mut().any(|ch| ch.publish_paused())
    }

    /// Whether the handshake finished (connection.open-ok sent).
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The peer stopped heartbeating or the socket closed: nothing more to send.
    pub fn abort(&mut self) {
        self.state = State::Closed;
    }

    /// An event from a queue or the broker.
    pub fn handle_event(&mut self, event: ConnEvent, out: &mut BytesMut) {
        match event {
            ConnEvent::Deliver(d) => {
                let frame_max = self.tuning.frame_max;
                match self.channels.get_mut(&d.consumer.channel) {
                    Some(ch) if self.state == State::Open => ch.deliver(d, frame_max, out),
                    _ => d.bounce(),
                }
            }
            ConnEvent::ConsumerCancelled {
                channel,
                consumer_tag,
            } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.consumer_gone(
                        &consumer_tag,
                        self.cancel_notify && self.state == State::Open,
                        out,
                    );
                }
            }
            ConnEvent::ForceClose { code, text } => {
                let code = ReplyCode::from_code(code).unwrap_or(ReplyCode::ConnectionForced);
                self.force_close(code, &text, out);
            }
            ConnEvent::Synced(_) => self.flush(out),
            ConnEvent::Blocked(reason) => {
                self.alarm = reason;
                // A connection that publishes is blocked at once; others when they first do.
                if self.has_published {
                    self.tell_blocked(out);
                }
                if self.alarm.is_none() && self.told_blocked {
                    // Alarm over: reading resumes; tell the client if we told it before.
                    self.told_blocked = false;
                    encode_method(
                        out,
                        0,
                        &AMQPClass::Connection(amqp_conn::AMQPMethod::Unblocked(
                            amqp_conn::Unblocked {},
                        )),
                    );
                }
            }
        }
    }

    fn tell_blocked(&mut self, out: &mut BytesMut) {
        Self::tell_blocked_parts(
            &self.alarm,
            self.blocked_notify,
            &mut self.told_blocked,
            out,
        );
    }

    /// connection.blocked, once per alarm, to clients that asked for it.
    fn tell_blocked_parts(
        alarm: &Option<String>,
        notify: bool,
        told: &mut bool,
        out: &mut BytesMut,
    ) {
        let Some(reason) = alarm else {
            return;
        };
        if notify && !*told {
            *told = true;
            encode_method(
                out,
                0,
                &AMQPClass::Connection(amqp_conn::AMQPMethod::Blocked(amqp_conn::Blocked {
                    reason: short_string_truncated(reason),
                })),
            );
        }
    }

    /// Sends what was held back to coalesce (publisher confirms). Call after each batch of
    /// input frames.
    pub fn flush(&mut self, out: &mut BytesMut) {
        let mut failures = Vec::new();
        let channels = &mut self.channels;
        poll_confirm_passes(&self.broker, &self.outlet, |clock| {
            let mut waiting = false;
            for (&id, ch) in channels.iter_mut() {
                let f = ch.flush_confirms(clock, out);
                waiting |= f.waiting;
                failures.extend(f.failed.map(|e| (id, e)));
            }
            waiting
        });
        for (id, e) in failures {
            self.fail(id, e, out);
        }
    }

    fn fail(&mut self, channel: u16, err: AmqpError, out: &mut BytesMut) {
        if err.is_hard() || channel == 0 {
            tracing::debug!(connection = self.id, code = err.code.code(), text = %err.text, "closing connection");
            self.close_channels();
            encode_method(out, 0, &err.to_connection_close());
            self.state = State::Closing;
        } else if let Some(ch) = self.channels.get_mut(&channel) {
            tracing::debug!(connection = self.id, channel, code = err.code.code(), text = %err.text, "closing channel");
            ch.close();
            encode_method(out, channel, &err.to_close());
        }
    }

    fn dispatch_frame(
        &mut self,
        frame: RawFrame,
        out: &mut BytesMut,
    ) -> Result<(), (u16, AmqpError)> {
        let channel = frame.channel;
        match self.state {
            State::Closed => return Ok(()),
            State::Closing => {
                // Only the close handshake matters now.
                if frame.kind == FRAME_METHOD && channel == 0 {
                    match decode_method(&frame.payload) {
                        Ok(Method::Other(AMQPClass::Connection(
                            amqp_conn::AMQPMethod::CloseOk(_),
                        ))) => {
                            self.state = State::Closed;
                        }
                        Ok(Method::Other(AMQPClass::Connection(amqp_conn::AMQPMethod::Close(
                            _,
                        )))) => {
                            encode_method(out, 0, &close_ok());
                            self.state = State::Closed;
                        }
                        _ => {}
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        match frame.kind {
            FRAME_HEARTBEAT => {
                if channel != 0 {
                    return Err((
                        0,
                        AmqpError::new(
                            ReplyCode::UnexpectedFrame,
                            "heartbeat frame on non-zero channel",
                        ),
                    ));
                }
                Ok(())
            }
            FRAME_METHOD => {
                let method = decode_method(&frame.payload).map_err(|e| (0, e))?;
                if channel == 0 {
                    self.connection_method(method, out).map_err(|e| (0, e))
                } else {
                    self.channel_method(channel, method, out)
                }
            }
            FRAME_HEADER | FRAME_BODY => {
                if self.state != State::Open {
                    return Err((0, unexpected_frame()));
                }
                if channel == 0 {
                    return Err((0, unexpected_frame()));
                }
                let frame_max = self.tuning.frame_max;
                let Some(ch) = self.channels.get_mut(&channel) else {
                    return Err((
                        0,
                        AmqpError::new(ReplyCode::ChannelError, "expected 'channel.open'"),
                    ));
                };
                if ch.is_closing() {
                    return Ok(());
                }
                if frame.kind == FRAME_HEADER {
                    self.has_published = true;
                    Self::tell_blocked_parts(
                        &self.alarm,
                        self.blocked_notify,
                        &mut self.told_blocked,
                        out,
                    );
                }
                let r = if frame.kind == FRAME_HEADER {
                    ch.content_header(frame.payload, frame_max, out)
                } else {
                    ch.content_body(frame.payload, frame_max, out)
                };
                r.map_err(|e| (channel, e))
            }
            other => Err((
                0,
                AmqpError::new(ReplyCode::FrameError, format!("unknown frame type {other}")),
            )),
        }
    }

    fn connection_method(&mut self, method: Method, out: &mut BytesMut) -> Result<(), AmqpError> {
        let (class_id, method_id) = method.ids();
        let Method::Other(AMQPClass::Connection(m)) = method else {
            return Err(AmqpError::new(
                ReplyCode::ChannelError,
                format!(
                    "unexpected method in connection state {}",
                    self.state_name()
                ),
            )
            .with_method(class_id, method_id));
        };
        let with = |e: AmqpError| e.with_method(class_id, method_id);
        match (self.state, m) {
            (State::AwaitStartOk, amqp_conn::AMQPMethod::StartOk(ok)) => {
                // RabbitMQ reports login failures without a class/method.
                self.start_ok(ok)?;
                let c = self.broker.config();
                let tune = amqp_conn::Tune {
                    channel_max: c.channel_max,
                    frame_max: c.frame_max,
                    heartbeat: c.heartbeat,
                };
                encode_method(
                    out,
                    0,
                    &AMQPClass::Connection(amqp_conn::AMQPMethod::Tune(tune)),
                );
                self.state = State::AwaitTuneOk;
                Ok(())
            }
            (State::AwaitTuneOk, amqp_conn::AMQPMethod::TuneOk(ok)) => {
                let c = self.broker.config();
                negotiated("frame_max", ok.frame_max, FRAME_MIN_SIZE, c.frame_max).map_err(with)?;
                negotiated(
                    "channel_max",
                    u32::from(ok.channel_max),
                    1,
                    u32::from(c.channel_max),
                )
                .map_err(with)?;
                self.tuning = Tuning {
                    channel_max: ok.channel_max,
                    frame_max: ok.frame_max,
                    heartbeat: ok.heartbeat,
                };
                self.state = State::AwaitOpen;
                Ok(())
            }
            (State::AwaitOpen, amqp_conn::AMQPMethod::Open(open)) => {
                let name = open.virtual_host.as_str();
                let Some(vh) = self.broker.vhost(name) else {
                    return Err(with(AmqpError::new(
                        ReplyCode::NotAllowed,
                        format!("vhost {name} not found"),
                    )));
                };
                self.session_ctx = Some(Arc::new(SessionCtx {
                    broker: self.broker.clone(),
                    vhost: vh,
                    connection: self.id,
                    user: self.user.clone(),
                    outlet: self.outlet.clone(),
                    max_message_size: self.broker.config().max_message_size,
                }));
                self.state = State::Open;
                self.broker
                    .register_connection(self.id, self.outlet.clone());
                encode_method(
                    out,
                    0,
                    &AMQPClass::Connection(amqp_conn::AMQPMethod::OpenOk(amqp_conn::OpenOk {})),
                );
                Ok(())
            }
            (_, amqp_conn::AMQPMethod::Close(_)) => {
                self.close_channels();
                encode_method(out, 0, &close_ok());
                self.state = State::Closed;
                Ok(())
            }
            (State::Open, amqp_conn::AMQPMethod::UpdateSecret(_)) => {
                // Secrets are passwords here; there is no token to refresh, so accept as RabbitMQ
                // does for internal users.
                encode_method(
                    out,
                    0,
                    &AMQPClass::Connection(amqp_conn::AMQPMethod::UpdateSecretOk(
                        amqp_conn::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            (
                State::Open,
                amqp_conn::AMQPMethod::Blocked(_) | amqp_conn::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            (State::Open, amqp_conn::AMQPMethod::CloseOk(_)) => Ok(()),
            (_, _) => Err(with(AmqpError::new(
                ReplyCode::CommandInvalid,
                format!(
                    "unexpected method in connection state {}",
                    self.state_name()
                ),
            ))),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::AwaitStartOk => "starting",
            State::AwaitTuneOk => "tuning",
            State::AwaitOpen => "opening",
            State::Open => "running",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }

    fn start_ok(&mut self, ok: amqp_conn::StartOk) -> Result<(), AmqpError> {
        let mechanism = ok.mechanism.as_str();
        let (user, pass) = match mechanism {
            "PLAIN" => parse_plain(ok.response.as_bytes()),
            "AMQPLAIN" => parse_amqplain(ok.response.as_bytes()),
            other => {
                return Err(AmqpError::new(
                    ReplyCode::CommandInvalid,
                    format!("unknown authentication mechanism '{other}'"),
                ))
            }
        }
        .ok_or_else(|| refused(mechanism))?;
        match self.broker.login(&user, &pass, self.peer) {
            Ok(u) => self.user = u.name,
            Err(why) => {
                tracing::warn!(user = %user, reason = ?why, "login refused");
                return Err(match why {
                    LoginError::LoopbackOnly
                    | LoginError::UnknownUser
                    | LoginError::BadPassword => refused(mechanism),
                });
            }
        }
        if let Some(AMQPValue::FieldTable(caps)) = ok.client_properties.inner().get("capabilities")
        {
            self.blocked_notify = matches!(
                caps.inner().get("connection.blocked"),
                Some(AMQPValue::Boolean(true))
            );
            self.cancel_notify = matches!(
                caps.inner().get("consumer_cancel_notify"),
                Some(AMQPValue::Boolean(true))
            );
        }
        self.client_properties = ok.client_properties;
        Ok(())
    }

    fn channel_method(
        &mut self,
        channel: u16,
        method: Method,
        out: &mut BytesMut,
    ) -> Result<(), (u16, AmqpError)> {
        let (class_id, method_id) = method.ids();
        if self.state != State::Open {
            return Err((
                0,
                AmqpError::new(
                    ReplyCode::ChannelError,
                    format!(
                        "unexpected method on channel {channel} in connection state {}",
                        self.state_name()
                    ),
                )
                .with_method(class_id, method_id),
            ));
        }
        if let Method::Other(AMQPClass::Channel(amqp_channel::AMQPMethod::Open(_))) = method {
            if self.channels.contains_key(&channel) {
                return Err((
                    0,
                    AmqpError::new(ReplyCode::ChannelError, "second 'channel.open' seen")
                        .with_method(class_id, method_id),
                ));
            }
            // channel_max bounds how many channels are open, not their numbers (as RabbitMQ),
            // and RabbitMQ names no method in this error.
            let open = self.channels.len();
            let max = self.tuning.channel_max;
            if max != 0 && open >= usize::from(max) {
                return Err((
                    0,
                    AmqpError::new(
                        ReplyCode::NotAllowed,
                        format!(
                            "number of channels opened ({open}) has reached the negotiated channel_max ({max})"
                        ),
                    ),
                ));
            }
            let Some(ctx) = &self.session_ctx else {
                return Err((
                    0,
                    AmqpError::new(ReplyCode::InternalError, "connection has no vhost"),
                ));
            };
            self.channels
                .insert(channel, Channel::new(Session::new(ctx.clone(), channel)));
            encode_method(
                out,
                channel,
                &AMQPClass::Channel(amqp_channel::AMQPMethod::OpenOk(amqp_channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Err((
                0,
                AmqpError::new(ReplyCode::ChannelError, "expected 'channel.open'")
                    .with_method(class_id, method_id),
            ));
        };
        if ch.is_closing() {
            // Waiting for channel.close-ok: drop everything else, as RabbitMQ does.
            match method {
                Method::Other(AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(_))) => {
                    self.channels.remove(&channel);
                }
                Method::Other(AMQPClass::Channel(amqp_channel::AMQPMethod::Close(_))) => {
                    encode_method(out, channel, &channel_close_ok());
                    self.channels.remove(&channel);
                }
                _ => {}
            }
            return Ok(());
        }
        if let Method::Other(AMQPClass::Channel(amqp_channel::AMQPMethod::Close(_))) = method {
            ch.close();
            self.channels.remove(&channel);
            encode_method(out, channel, &channel_close_ok());
            return Ok(());
        }
        let r = ch.handle_method(method, self.tuning.frame_max, out);
        r.map_err(|e| {
            let e = if e.class_id == 0 {
                e.with_method(class_id, method_id)
            } else {
                e
            };
            (channel, e)
        })
    }

    fn close_channels(&mut self) {
        for (_, mut ch) in self.channels.drain() {
            ch.close();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.broker.deregister_connection(self.id);
        self.close_channels();
        if let Some(ctx) = &self.session_ctx {
            ctx.vhost.connection_closed(self.id);
        }
        self.broker.save_definitions_if_dirty();
    }
}

fn close_ok() -> AMQPClass {
    AMQPClass::Connection(amqp_conn::AMQPMethod::CloseOk(amqp_conn::CloseOk {}))
}

fn channel_close_ok() -> AMQPClass {
    AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(amqp_channel::CloseOk {}))
}

fn unexpected_frame() -> AmqpError {
    AmqpError::new(
        ReplyCode::UnexpectedFrame,
        "expected method frame, got non method frame instead",
    )
}

/// A value the client chose in connection.tune-ok, checked as RabbitMQ does: not below `min`
/// and, if the server has a limit (`server_max` not 0), neither 0 ("no limit") nor above it.
fn negotiated(field: &str, value: u32, min: u32, server_max: u32) -> Result<(), AmqpError> {
    let detail = if value == 0 { " (no limit)" } else { "" };
    let refuse = |how: &str, bound: u32| {
        Err(AmqpError::new(
            ReplyCode::NotAllowed,
            format!("negotiated {field} = {value}{detail} is {how} allowed value ({bound})"),
        ))
    };
    if value != 0 && value < min {
        return refuse("lower than the minimum", min);
    }
    if server_max != 0 && (value == 0 || value > server_max) {
        return refuse("higher than the maximum", server_max);
    }
    Ok(())
}

fn refused(mechanism: &str) -> AmqpError {
    AmqpError::new(
        ReplyCode::AccessRefused,
        format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
    )
}

/// PLAIN: `authzid \0 authcid \0 password` (authzid usually empty).
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// AMQPLAIN: a field table without its length prefix, holding LOGIN and PASSWORD.
fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    // The codec's decoder bounds nesting depth; this runs before login, on anyone's input.
    let table = rill_codec::decode_field_table_body(response).ok()?;
    let get = |k: &str| {
        rill_codec::value_as_bytes(table.inner().get(k)?)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain_parse() {
        assert_eq!(
            parse_plain(b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        assert_eq!(parse_plain(b"guest"), None);
        let amqplain = b"\x05LOGINS\x00\x00\x00\x05guest\x08PASSWORDS\x00\x00\x00\x02pw";
        assert_eq!(
            parse_amqplain(amqplain),
            Some(("guest".into(), "pw".into()))
        );
    }
}
