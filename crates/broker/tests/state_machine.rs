//! The broker core driven frame by frame, without sockets: handshake, routing, acks, prefetch,
//! exclusivity, auto-delete, confirms, transactions and protocol errors. Reply codes and texts
//! are RabbitMQ's (see tests/interop and crates/rill/tests for the same texts over a socket).

#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use proptest::prelude::*;
use rill_broker::{Broker, BrokerConfig, Status, Tuning};
use rill_codec::amq_protocol::protocol::{basic, connection as conn, exchange, queue};
use rill_codec::{AMQPClass, AMQPValue, FRAME_BODY, FRAME_END, FRAME_HEADER};
use std::collections::BTreeMap;

fn broker() -> Broker {
    Broker::new(BrokerConfig::default())
}

fn locked_text(q: &str) -> String {
    format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. \
         It could be originally declared on another connection or the exclusive property value \
         does not match that of the original declaration."
    )
}

fn deliver(ch: u16, ctag: &str, tag: u64, redelivered: bool, rk: &str, body: &str) -> Reply {
    Reply::Deliver {
        ch,
        ctag: ctag.into(),
        tag,
        redelivered,
        exchange: String::new(),
        rk: rk.into(),
        body: body.into(),
    }
}

/// A raw frame (for content frames the client encoders would not produce out of order).
fn raw_frame(kind: u8, ch: u16, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    b.put_u16(ch);
    b.put_u32(u32::try_from(payload.len()).unwrap());
    b.put_slice(payload);
    b.put_u8(FRAME_END);
    b
}

/// A content header announcing `body_size` bytes, no properties.
fn content_header(ch: u16, body_size: u64) -> BytesMut {
    let mut p = Vec::new();
    p.extend_from_slice(&60u16.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    raw_frame(FRAME_HEADER, ch, &p)
}

fn publish_method(ch: u16, exchange: &str, rk: &str) -> BytesMut {
    let mut b = BytesMut::new();
    rill_codec::encode_publish(&mut b, ch, exchange, rk, false, false);
    b
}

fn channel_close_ok_frame(ch: u16) -> BytesMut {
    frame(
        ch,
        AMQPClass::Channel(
            rill_codec::amq_protocol::protocol::channel::AMQPMethod::CloseOk(
                rill_codec::amq_protocol::protocol::channel::CloseOk {},
            ),
        ),
    )
}

// ---- handshake ----

#[test]
fn handshake_announces_capabilities_and_tuning() {
    let b = broker();
    let (_, start) = Client::start(&b);
    let [Reply::Method {
        ch: 0,
        method: AMQPClass::Connection(conn::AMQPMethod::Start(s)),
    }] = start.as_slice()
    else {
        panic!("expected connection.start, got {start:?}");
    };
    assert_eq!((s.version_major, s.version_minor), (0, 9));
    assert_eq!(s.mechanisms.as_bytes(), b"PLAIN AMQPLAIN");
    assert_eq!(s.locales.as_bytes(), b"en_US");
    let props = s.server_properties.inner();
    assert_eq!(props.get("product"), Some(&long_str("Rill")));
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!("no capabilities in {props:?}");
    };
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
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }

    let (mut c, replies) = Client::handshake(&b, &Login::default());
    assert_eq!(
        replies,
        vec![
            ok(
                0,
                AMQPClass::Connection(conn::AMQPMethod::Tune(conn::Tune {
                    channel_max: 2047,
                    frame_max: 131_072,
                    heartbeat: 60,
                }))
            ),
            ok(
                0,
                AMQPClass::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {}))
            ),
        ]
    );
    assert!(c.conn().is_open());
    assert_eq!(c.conn().user(), "guest");
    assert_eq!(
        c.conn().tuning(),
        Tuning {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60
        }
    );
}

#[test]
fn bad_password_is_403_without_class_and_method() {
    let b = broker();
    let login = Login {
        password: "wrong".into(),
        ..Login::default()
    };
    let (mut c, replies) = Client::handshake(&b, &login);
    assert_eq!(
        replies,
        vec![connection_close(
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. \
             For details see the broker logfile.",
            (0, 0)
        )]
    );
    assert_eq!(c.conn().status(), Status::Closing);
    let close_ok = frame(
        0,
        AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
    );
    assert_eq!(c.send(close_ok), vec![]);
    assert_eq!(c.conn().status(), Status::Closed);
}

#[test]
fn unknown_user_gets_the_same_403() {
    let login = Login {
        user: "nobody".into(),
        ..Login::default()
    };
    let (mut c, replies) = Client::handshake(&broker(), &login);
    assert!(matches!(
        replies.as_slice(),
        [Reply::ConnectionClose {
            code: 403,
            method: (0, 0),
            ..
        }]
    ));
    assert!(!c.conn().is_open());
}

#[test]
fn unknown_vhost_is_530() {
    let login = Login {
        vhost: "nosuch".into(),
        ..Login::default()
    };
    let (mut c, replies) = Client::handshake(&broker(), &login);
    assert_eq!(
        replies.last(),
        Some(&connection_close(
            530,
            "NOT_ALLOWED - vhost nosuch not found",
            (10, 40)
        ))
    );
    assert_eq!(c.conn().status(), Status::Closing);
}

// ---- routing ----

#[test]
fn declare_bind_publish_get_round_trip() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    assert_eq!(c.declare_queue(1, "rt"), (0, 0));
    c.bind(1, "rt", "amq.direct", "key");
    assert_eq!(c.publish(1, "amq.direct", "key", "hello"), vec![]);
    assert_eq!(c.publish(1, "amq.direct", "other", "lost"), vec![]);
    assert_eq!(c.queue_counts(1, "rt"), Ok((1, 0)));
    assert_eq!(
        c.get(1, "rt", false),
        vec![Reply::GetOk {
            ch: 1,
            tag: 1,
            redelivered: false,
            left: 0,
            body: "hello".into()
        }]
    );
    assert_eq!(c.get(1, "rt", false), vec![Reply::GetEmpty { ch: 1 }]);
    assert_eq!(c.ack(1, 1, false), vec![]);
}

#[test]
fn default_exchange_routes_by_queue_name() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "dq");
    c.publish(1, "", "dq", "one");
    c.publish(1, "", "nosuch", "dropped");
    c.publish(1, "", "dq", "two");
    assert_eq!(c.drain(1, "dq"), ["one", "two"]);
}

#[test]
fn topic_routing() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_exchange(1, "topics", "topic");
    for (q, pattern) in [("t.star", "a.*"), ("t.hash", "a.#"), ("t.end", "#.z")] {
        c.declare_queue(1, q);
        c.bind(1, q, "topics", pattern);
    }
    for rk in ["a.b", "a.b.z", "a", "z", "b.a"] {
        c.publish(1, "topics", rk, rk);
    }
    assert_eq!(c.drain(1, "t.star"), ["a.b"]);
    assert_eq!(c.drain(1, "t.hash"), ["a.b", "a.b.z", "a"]);
    assert_eq!(c.drain(1, "t.end"), ["a.b.z", "z"]);
}

#[test]
fn headers_routing_all_and_any() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "h.all");
    c.declare_queue(1, "h.any");
    c.bind_with(
        1,
        "h.all",
        "amq.headers",
        "",
        table(&[
            ("x-match", long_str("all")),
            ("format", long_str("pdf")),
            ("type", long_str("report")),
        ]),
    );
    c.bind_with(
        1,
        "h.any",
        "amq.headers",
        "",
        table(&[
            ("x-match", long_str("any")),
            ("format", long_str("pdf")),
            ("type", long_str("log")),
        ]),
    );
    let send = |c: &mut Client, headers: &[(&str, AMQPValue)], body: &str| {
        let props = props_with_headers(table(headers));
        assert_eq!(
            c.send(publish_frames(1, "amq.headers", "", false, &props, body)),
            vec![]
        );
    };
    send(
        &mut c,
        &[("format", long_str("pdf")), ("type", long_str("report"))],
        "m1",
    );
    send(&mut c, &[("format", long_str("pdf"))], "m2");
    send(&mut c, &[("type", long_str("log"))], "m3");
    send(&mut c, &[("other", long_str("x"))], "m4");
    c.publish(1, "amq.headers", "", "no headers");
    assert_eq!(c.drain(1, "h.all"), ["m1"]);
    assert_eq!(c.drain(1, "h.any"), ["m1", "m2", "m3"]);
}

#[test]
fn fanout_ignores_the_routing_key() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    for q in ["f1", "f2"] {
        c.declare_queue(1, q);
        c.bind(1, q, "amq.fanout", "ignored");
    }
    c.publish(1, "amq.fanout", "anything", "all");
    assert_eq!(c.drain(1, "f1"), ["all"]);
    assert_eq!(c.drain(1, "f2"), ["all"]);
}

// ---- consumers, prefetch, acks ----

#[test]
fn prefetch_two_gets_two_until_ack() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "pf");
    c.qos(1, 2, false);
    assert_eq!(c.consume(1, "pf", "c"), vec![]);
    let mut got = Vec::new();
    for i in 0..5 {
        got.extend(c.publish(1, "", "pf", &format!("m{i}")));
    }
    assert_eq!(
        got,
        vec![
            deliver(1, "c", 1, false, "pf", "m0"),
            deliver(1, "c", 2, false, "pf", "m1"),
        ]
    );
    assert_eq!(c.pump(), vec![]);
    assert_eq!(c.queue_counts(1, "pf"), Ok((3, 1)));
    assert_eq!(
        c.ack(1, 1, false),
        vec![deliver(1, "c", 3, false, "pf", "m2")]
    );
    assert_eq!(
        c.ack(1, 3, false),
        vec![deliver(1, "c", 4, false, "pf", "m3")]
    );
}

#[test]
fn ack_multiple_settles_up_to_the_tag() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "am");
    for i in 0..5 {
        c.publish(2, "", "am", &format!("m{i}"));
    }
    c.qos(1, 3, false);
    assert_eq!(tags(&c.consume(1, "am", "c")), [1, 2, 3]);
    // Acking 1..=2 frees two credits: m3 and m4 follow.
    let more = c.ack(1, 2, true);
    assert_eq!(bodies(&more), ["m3", "m4"]);
    assert_eq!(tags(&more), [4, 5]);
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    assert_eq!(c.drain(2, "am"), ["m2", "m3", "m4"]);
}

#[test]
fn nack_requeue_keeps_position_and_marks_redelivered() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "nq");
    for m in ["a", "b", "c"] {
        c.publish(1, "", "nq", m);
    }
    assert_eq!(c.get_one(1, "nq"), (1, false, "a".into()));
    assert_eq!(c.get_one(1, "nq"), (2, false, "b".into()));
    // Requeued out of order, they still go back to their original places.
    assert_eq!(c.nack(1, 2, false, true), vec![]);
    assert_eq!(c.nack(1, 1, false, true), vec![]);
    assert_eq!(
        c.get(1, "nq", true),
        vec![Reply::GetOk {
            ch: 1,
            tag: 3,
            redelivered: true,
            left: 2,
            body: "a".into()
        }]
    );
    assert_eq!(c.get_one(1, "nq"), (4, true, "b".into()));
    assert_eq!(c.get_one(1, "nq"), (5, false, "c".into()));
}

#[test]
fn nack_multiple_requeues_to_a_consumer_in_order() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "nm");
    for m in ["a", "b", "c"] {
        c.publish(2, "", "nm", m);
    }
    c.qos(1, 3, false);
    assert_eq!(tags(&c.consume(1, "nm", "c")), [1, 2, 3]);
    let again = c.nack(1, 3, true, true);
    assert_eq!(
        again,
        vec![
            deliver(1, "c", 4, true, "nm", "a"),
            deliver(1, "c", 5, true, "nm", "b"),
            deliver(1, "c", 6, true, "nm", "c"),
        ]
    );
}

#[test]
fn reject_without_requeue_drops() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "rj");
    c.publish(1, "", "rj", "bad");
    c.publish(1, "", "rj", "good");
    let (tag, _, body) = c.get_one(1, "rj");
    assert_eq!(body, "bad");
    assert_eq!(c.reject(1, tag, false), vec![]);
    assert_eq!(c.queue_counts(1, "rj"), Ok((1, 0)));
    // Nothing left to requeue when the channel goes.
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    c.open_channel(1);
    assert_eq!(c.drain(1, "rj"), ["good"]);
}

#[test]
fn unknown_delivery_tag_is_406() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    assert_eq!(
        c.ack(1, 42, false),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - unknown delivery tag 42",
            (60, 80)
        )]
    );
    // A tag settled twice is unknown the second time.
    c.send(channel_close_ok_frame(1));
    c.open_channel(1);
    c.declare_queue(1, "twice");
    c.publish(1, "", "twice", "x");
    let (tag, _, _) = c.get_one(1, "twice");
    assert_eq!(c.ack(1, tag, false), vec![]);
    assert_eq!(
        c.reject(1, tag, true),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - unknown delivery tag 1",
            (60, 90)
        )]
    );
}

#[test]
fn channel_close_requeues_unacked_to_original_positions() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(2, "cc");
    for i in 0..4 {
        c.publish(2, "", "cc", &format!("m{i}"));
    }
    let got = c.consume(1, "cc", "c");
    assert_eq!(bodies(&got), ["m0", "m1", "m2", "m3"]);
    c.ack(1, 2, false);
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    c.publish(2, "", "cc", "m4");
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(c.get_one(2, "cc"));
    }
    assert_eq!(
        rest,
        [
            (1, true, "m0".into()),
            (2, true, "m2".into()),
            (3, true, "m3".into()),
            (4, false, "m4".into()),
        ]
    );
}

#[test]
fn connection_drop_requeues_unacked_and_deletes_exclusive_queues() {
    let b = broker();
    let mut other = Client::with_channel(&b, 1);
    other.declare_queue(1, "shared");
    let mut owner = Client::with_channel(&b, 1);
    assert!(matches!(
        owner
            .declare_queue_with(
                1,
                queue::Declare {
                    queue: "mine".into(),
                    exclusive: true,
                    ..Default::default()
                }
            )
            .as_slice(),
        [Reply::Method { .. }]
    ));
    owner.publish(1, "", "mine", "private");
    for m in ["a", "b", "c"] {
        other.publish(1, "", "shared", m);
    }
    assert_eq!(bodies(&owner.consume(1, "shared", "c")), ["a", "b", "c"]);
    owner.ack(1, 2, false);
    drop(owner);
    assert_eq!(other.queue_counts(1, "shared"), Ok((2, 0)));
    assert_eq!(other.get_one(1, "shared"), (1, true, "a".into()));
    assert_eq!(other.get_one(1, "shared"), (2, true, "c".into()));
    assert_eq!(
        other.queue_counts(1, "mine"),
        Err(vec![channel_close(
            1,
            404,
            "NOT_FOUND - no queue 'mine' in vhost '/'",
            (50, 10)
        )])
    );
}

#[test]
fn exclusive_queue_of_another_connection_is_405() {
    let b = broker();
    let mut owner = Client::with_channel(&b, 1);
    owner.declare_queue_with(
        1,
        queue::Declare {
            queue: "excl".into(),
            exclusive: true,
            ..Default::default()
        },
    );
    let mut c = Client::with_channel(&b, 1);
    let attempts: [(AMQPClass, (u16, u16)); 3] = [
        (
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "excl".into(),
                ..Default::default()
            })),
            (50, 10),
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: "excl".into(),
                no_ack: false,
            })),
            (60, 70),
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "excl".into(),
                ..Default::default()
            })),
            (60, 20),
        ),
    ];
    for (method, ids) in attempts {
        assert_eq!(
            c.call(1, method),
            vec![channel_close(1, 405, &locked_text("excl"), ids)]
        );
        c.send(channel_close_ok_frame(1));
        c.open_channel(1);
    }
    // The owner still uses it.
    owner.publish(1, "", "excl", "x");
    assert_eq!(owner.drain(1, "excl"), ["x"]);
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue_with(
        1,
        queue::Declare {
            queue: "ad".into(),
            auto_delete: true,
            ..Default::default()
        },
    );
    c.consume(1, "ad", "c1");
    c.consume(1, "ad", "c2");
    assert_eq!(c.cancel(1, "c1"), vec![cancel_ok(1, "c1")]);
    assert_eq!(c.queue_counts(1, "ad"), Ok((0, 1)));
    assert_eq!(c.cancel(1, "c2"), vec![cancel_ok(1, "c2")]);
    assert_eq!(
        c.queue_counts(1, "ad"),
        Err(vec![channel_close(
            1,
            404,
            "NOT_FOUND - no queue 'ad' in vhost '/'",
            (50, 10)
        )])
    );
}

#[test]
fn exclusive_consume_conflicts_are_403() {
    let b = broker();
    let mut a = Client::with_channel(&b, 1);
    let mut c = Client::with_channel(&b, 1);
    a.declare_queue(1, "xc");
    a.declare_queue(1, "shared");
    a.consume_with(
        1,
        basic::Consume {
            queue: "xc".into(),
            consumer_tag: "only".into(),
            exclusive: true,
            ..Default::default()
        },
    );
    a.consume(1, "shared", "plain");
    assert_eq!(
        c.consume_with(
            1,
            basic::Consume {
                queue: "xc".into(),
                consumer_tag: "second".into(),
                ..Default::default()
            }
        ),
        vec![channel_close(
            1,
            403,
            "ACCESS_REFUSED - queue 'xc' in vhost '/' in exclusive use",
            (60, 20)
        )]
    );
    c.send(channel_close_ok_frame(1));
    c.open_channel(1);
    // Asking for exclusivity where someone already consumes: the same refusal.
    assert_eq!(
        c.consume_with(
            1,
            basic::Consume {
                queue: "shared".into(),
                consumer_tag: "greedy".into(),
                exclusive: true,
                ..Default::default()
            }
        ),
        vec![channel_close(
            1,
            403,
            "ACCESS_REFUSED - queue 'shared' in vhost '/' in exclusive use",
            (60, 20)
        )]
    );
}

#[test]
fn round_robin_across_two_connections() {
    let b = broker();
    let mut a = Client::with_channel(&b, 1);
    let mut z = Client::with_channel(&b, 1);
    let mut p = Client::with_channel(&b, 1);
    p.declare_queue(1, "rr");
    a.consume(1, "rr", "a");
    z.consume(1, "rr", "z");
    for i in 0..6 {
        assert_eq!(p.publish(1, "", "rr", &format!("m{i}")), vec![]);
    }
    assert_eq!(bodies(&a.pump()), ["m0", "m2", "m4"]);
    assert_eq!(bodies(&z.pump()), ["m1", "m3", "m5"]);
}

#[test]
fn consumer_priorities_prefer_the_higher_while_it_has_credit() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "prio");
    c.qos(1, 1, false);
    let prio = |n: i32| table(&[("x-priority", AMQPValue::LongInt(n))]);
    c.consume_args(1, "prio", "low", prio(1));
    c.consume_args(1, "prio", "high", prio(10));
    let mut got = Vec::new();
    for m in ["m0", "m1", "m2"] {
        got.extend(c.publish(2, "", "prio", m));
    }
    assert_eq!(
        got,
        vec![
            deliver(1, "high", 1, false, "prio", "m0"),
            deliver(1, "low", 2, false, "prio", "m1"),
        ]
    );
    assert_eq!(
        c.ack(1, 1, false),
        vec![deliver(1, "high", 3, false, "prio", "m2")]
    );
}

#[test]
fn queue_deletion_cancels_consumers_that_asked_to_know() {
    let b = broker();
    let mut admin = Client::with_channel(&b, 1);
    admin.declare_queue(1, "gone");
    let mut notified = Client::with_channel(&b, 1);
    let quiet_login = Login {
        cancel_notify: false,
        ..Login::default()
    };
    let mut quiet = Client::connect_as(&b, &quiet_login);
    quiet.open_channel(1);
    notified.consume(1, "gone", "n");
    quiet.consume(1, "gone", "q");
    admin.publish(1, "", "gone", "x");
    assert_eq!(notified.pump().len(), 1);
    assert_eq!(
        admin.delete_queue(1, "gone"),
        vec![ok(
            1,
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                message_count: 0
            }))
        )]
    );
    assert_eq!(
        notified.pump(),
        vec![Reply::Cancel {
            ch: 1,
            ctag: "n".into()
        }]
    );
    assert_eq!(quiet.pump(), vec![]);
    // The consumer is gone on both: a later cancel is a plain cancel-ok, and the tag is free.
    assert_eq!(notified.cancel(1, "n"), vec![cancel_ok(1, "n")]);
    assert_eq!(quiet.cancel(1, "q"), vec![cancel_ok(1, "q")]);
}

// ---- confirms and transactions ----

#[test]
fn confirms_coalesce_one_batch_into_one_multiple_ack() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "cf");
    c.confirm_select(1);
    let mut batch = BytesMut::new();
    for i in 0..5 {
        batch.extend_from_slice(&publish_frames(1, "", "cf", false, &[], &format!("m{i}")));
    }
    assert_eq!(
        c.send(batch),
        vec![Reply::Ack {
            ch: 1,
            tag: 5,
            multiple: true
        }]
    );
    assert_eq!(
        c.publish(1, "", "cf", "m5"),
        vec![Reply::Ack {
            ch: 1,
            tag: 6,
            multiple: false
        }]
    );
    assert_eq!(c.queue_counts(1, "cf"), Ok((6, 0)));
}

#[test]
fn mandatory_unroutable_returns_312_before_the_ack() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "mq");
    c.confirm_select(1);
    let mut batch = publish_frames(1, "", "mq", true, &[], "routed");
    batch.extend_from_slice(&publish_frames(1, "", "nowhere", true, &[], "lost"));
    assert_eq!(
        c.send(batch),
        vec![
            Reply::Return {
                ch: 1,
                code: 312,
                text: "NO_ROUTE".into(),
                exchange: String::new(),
                rk: "nowhere".into(),
                body: "lost".into()
            },
            Reply::Ack {
                ch: 1,
                tag: 2,
                multiple: true
            },
        ]
    );
    // Without mandatory an unroutable message is dropped silently but still confirmed.
    assert_eq!(
        c.publish(1, "", "nowhere", "gone"),
        vec![Reply::Ack {
            ch: 1,
            tag: 3,
            multiple: false
        }]
    );
}

#[test]
fn tx_publishes_are_invisible_until_commit_and_rollback_discards() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(2, "txq");
    c.tx_select(1);
    c.publish(1, "", "txq", "a");
    c.publish(1, "", "txq", "b");
    assert_eq!(c.queue_counts(2, "txq"), Ok((0, 0)));
    assert_eq!(c.tx_commit(1), vec![commit_ok(1)]);
    assert_eq!(c.queue_counts(2, "txq"), Ok((2, 0)));
    c.publish(1, "", "txq", "discarded");
    assert_eq!(c.tx_rollback(1), vec![rollback_ok(1)]);
    assert_eq!(c.tx_commit(1), vec![commit_ok(1)]);
    assert_eq!(c.drain(2, "txq"), ["a", "b"]);
}

#[test]
fn tx_acks_are_restored_on_rollback() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(2, "txa");
    for m in ["a", "b", "c"] {
        c.publish(2, "", "txa", m);
    }
    c.tx_select(1);
    assert_eq!(c.get_one(1, "txa").0, 1);
    assert_eq!(c.get_one(1, "txa").0, 2);
    assert_eq!(c.ack(1, 2, true), vec![]);
    assert_eq!(c.tx_rollback(1), vec![rollback_ok(1)]);
    // Both tags are unacked again: acking 1 alone is valid, and 2 stays outstanding.
    assert_eq!(c.ack(1, 1, false), vec![]);
    assert_eq!(c.tx_commit(1), vec![commit_ok(1)]);
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    assert_eq!(c.get_one(2, "txa"), (1, true, "b".into()));
    assert_eq!(c.get_one(2, "txa"), (2, false, "c".into()));
}

// ---- protocol errors ----

#[test]
fn frames_after_channel_close_are_ignored_until_close_ok() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "after");
    assert_eq!(
        c.get(1, "nosuch", false),
        vec![channel_close(
            1,
            404,
            "NOT_FOUND - no queue 'nosuch' in vhost '/'",
            (60, 70)
        )]
    );
    // Everything but close-ok is dropped: methods, content, acks.
    assert_eq!(c.get(1, "after", false), vec![]);
    assert_eq!(c.publish(1, "", "after", "dropped"), vec![]);
    assert_eq!(c.ack(1, 99, false), vec![]);
    assert_eq!(c.send(channel_close_ok_frame(1)), vec![]);
    c.open_channel(1);
    assert_eq!(c.queue_counts(1, "after"), Ok((0, 0)));
    assert!(c.conn().is_open());
}

#[test]
fn method_instead_of_content_header_is_505() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let mut bytes = publish_method(1, "", "x");
    bytes.extend_from_slice(&frame(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare::default())),
    ));
    assert_eq!(
        c.send(bytes),
        vec![connection_close(
            505,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
            (60, 40)
        )]
    );
    assert_eq!(c.conn().status(), Status::Closing);
}

#[test]
fn method_instead_of_content_body_is_505() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let mut bytes = publish_method(1, "", "x");
    bytes.extend_from_slice(&content_header(1, 3));
    bytes.extend_from_slice(&raw_frame(FRAME_BODY, 1, b"ab"));
    bytes.extend_from_slice(&frame(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare::default())),
    ));
    assert_eq!(
        c.send(bytes),
        vec![connection_close(
            505,
            "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
            (60, 40)
        )]
    );
}

#[test]
fn content_without_publish_is_505() {
    for stray in [content_header(1, 3), raw_frame(FRAME_BODY, 1, b"abc")] {
        let mut c = Client::with_channel(&broker(), 1);
        assert_eq!(
            c.send(stray),
            vec![connection_close(
                505,
                "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
                (0, 0)
            )]
        );
        assert_eq!(c.conn().status(), Status::Closing);
    }
}

// ---- property: one queue under random settle interleavings ----

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Get,
    Ack { pick: usize, multiple: bool },
    Nack { pick: usize, multiple: bool },
    Reject { pick: usize, requeue: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Publish),
        3 => Just(Op::Get),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, multiple)| Op::Ack { pick, multiple }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, multiple)| Op::Nack { pick, multiple }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, requeue)| Op::Reject { pick, requeue }),
    ]
}

/// Where a message is, by its publish order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    Ready { redelivered: bool },
    Unacked { tag: u64 },
    Gone,
}

/// The model's unacked tags, ascending, and the settle targets of `pick`.
fn targets(model: &BTreeMap<u64, At>, pick: usize, multiple: bool) -> Option<(u64, Vec<u64>)> {
    let mut unacked: Vec<(u64, u64)> = model
        .iter()
        .filter_map(|(&id, at)| match at {
            At::Unacked { tag } => Some((*tag, id)),
            _ => None,
        })
        .collect();
    if unacked.is_empty() {
        return None;
    }
    unacked.sort_unstable();
    let (tag, id) = unacked[pick % unacked.len()];
    let ids = if multiple {
        unacked
            .iter()
            .filter(|(t, _)| *t <= tag)
            .map(|(_, id)| *id)
            .collect()
    } else {
        vec![id]
    };
    Some((tag, ids))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_settles_keep_fifo_and_lose_nothing(ops in proptest::collection::vec(op(), 1..60)) {
        let b = broker();
        let mut c = Client::with_channel(&b, 1);
        c.declare_queue(1, "p");
        let mut model: BTreeMap<u64, At> = BTreeMap::new();
        let mut last_tag = 0;
        for op in ops {
            match op {
                Op::Publish => {
                    let id = model.len() as u64;
                    prop_assert_eq!(c.publish(1, "", "p", &id.to_string()), vec![]);
                    model.insert(id, At::Ready { redelivered: false });
                }
                Op::Get => {
                    let head = model
                        .iter()
                        .find_map(|(&id, at)| match at {
                            At::Ready { redelivered } => Some((id, *redelivered)),
                            _ => None,
                        });
                    let replies = c.get(1, "p", false);
                    match head {
                        None => prop_assert_eq!(replies, vec![Reply::GetEmpty { ch: 1 }]),
                        Some((id, redelivered)) => {
                            last_tag += 1;
                            model.insert(id, At::Unacked { tag: last_tag });
                            let left = model
                                .values()
                                .filter(|a| matches!(a, At::Ready { .. }))
                                .count() as u32;
                            prop_assert_eq!(
                                replies,
                                vec![Reply::GetOk {
                                    ch: 1,
                                    tag: last_tag,
                                    redelivered,
                                    left,
                                    body: id.to_string()
                                }]
                            );
                        }
                    }
                }
                Op::Ack { pick, multiple } => {
                    if let Some((tag, ids)) = targets(&model, pick, multiple) {
                        prop_assert_eq!(c.ack(1, tag, multiple), vec![]);
                        for id in ids {
                            model.insert(id, At::Gone);
                        }
                    }
                }
                Op::Nack { pick, multiple } => {
                    if let Some((tag, ids)) = targets(&model, pick, multiple) {
                        prop_assert_eq!(c.nack(1, tag, multiple, true), vec![]);
                        for id in ids {
                            model.insert(id, At::Ready { redelivered: true });
                        }
                    }
                }
                Op::Reject { pick, requeue } => {
                    if let Some((tag, ids)) = targets(&model, pick, false) {
                        prop_assert_eq!(c.reject(1, tag, requeue), vec![]);
                        let to = if requeue { At::Ready { redelivered: true } } else { At::Gone };
                        for id in ids {
                            model.insert(id, to);
                        }
                    }
                }
            }
            let ready = model.values().filter(|a| matches!(a, At::Ready { .. })).count() as u32;
            prop_assert_eq!(c.queue_counts(1, "p"), Ok((ready, 0)));
        }
        // Everything outstanding goes back (multiple with tag 0 = all), then the queue must
        // hold exactly what was neither acked nor dropped, in publish order, once each.
        prop_assert_eq!(c.nack(1, 0, true, true), vec![]);
        let expected: Vec<String> = model
            .iter()
            .filter(|(_, at)| **at != At::Gone)
            .map(|(id, _)| id.to_string())
            .collect();
        prop_assert_eq!(c.drain(1, "p"), expected);
        prop_assert_eq!(c.queue_counts(1, "p"), Ok((0, 0)));
    }
}

// ---- more lifecycle: auto-delete, undelivered events, cancel, recover ----

#[test]
fn auto_delete_queue_goes_when_its_consumers_channel_or_connection_closes() {
    let b = broker();
    let mut admin = Client::with_channel(&b, 1);
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    for q in ["ad.ch", "ad.conn"] {
        c.declare_queue_with(
            1,
            queue::Declare {
                queue: q.into(),
                auto_delete: true,
                ..Default::default()
            },
        );
    }
    c.consume(1, "ad.ch", "a");
    c.consume(2, "ad.conn", "b");
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    assert!(admin.queue_counts(1, "ad.ch").is_err());
    admin.open_channel(2);
    assert_eq!(admin.queue_counts(2, "ad.conn"), Ok((0, 1)));
    drop(c);
    assert_eq!(
        admin.queue_counts(2, "ad.conn"),
        Err(vec![channel_close(
            2,
            404,
            "NOT_FOUND - no queue 'ad.conn' in vhost '/'",
            (50, 10)
        )])
    );
}

#[test]
fn deliveries_not_yet_written_go_back_unmarked_when_the_channel_closes() {
    let b = broker();
    let mut p = Client::with_channel(&b, 1);
    let mut c = Client::with_channel(&b, 1);
    p.declare_queue(1, "bounce");
    c.consume(1, "bounce", "c");
    for m in ["a", "b", "c"] {
        p.publish(1, "", "bounce", m);
    }
    // The queue handed all three to c's outlet, but c never wrote them: closing the channel
    // must put them back where they were, not marked redelivered.
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    assert_eq!(p.get_one(1, "bounce"), (1, false, "a".into()));
    assert_eq!(p.get_one(1, "bounce"), (2, false, "b".into()));
    assert_eq!(p.get_one(1, "bounce"), (3, false, "c".into()));
}

#[test]
fn cancelled_consumer_gets_nothing_more_and_keeps_its_unacked() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "cn");
    c.publish(2, "", "cn", "m0");
    assert_eq!(bodies(&c.consume(1, "cn", "c")), ["m0"]);
    assert_eq!(c.cancel(1, "c"), vec![cancel_ok(1, "c")]);
    assert_eq!(c.publish(2, "", "cn", "m1"), vec![]);
    assert_eq!(c.queue_counts(2, "cn"), Ok((1, 0)));
    // The delivery made before the cancel can still be settled.
    assert_eq!(c.ack(1, 1, false), vec![]);
    assert_eq!(c.drain(2, "cn"), ["m1"]);
}

#[test]
fn recover_requeues_and_redelivers() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "rc");
    c.publish(1, "", "rc", "a");
    c.publish(1, "", "rc", "b");
    assert_eq!(bodies(&c.consume(1, "rc", "c")), ["a", "b"]);
    let replies = c.call(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
    );
    assert_eq!(
        replies,
        vec![
            ok(
                1,
                AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {}))
            ),
            deliver(1, "c", 3, true, "rc", "a"),
            deliver(1, "c", 4, true, "rc", "b"),
        ]
    );
}

#[test]
fn global_qos_is_shared_by_the_channels_consumers() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "g1");
    c.declare_queue(1, "g2");
    c.qos(1, 2, true);
    c.consume(1, "g1", "c1");
    c.consume(1, "g2", "c2");
    let mut got = Vec::new();
    for q in ["g1", "g2", "g1", "g2"] {
        got.extend(c.publish(2, "", q, q));
    }
    assert_eq!(
        got,
        vec![
            deliver(1, "c1", 1, false, "g1", "g1"),
            deliver(1, "c2", 2, false, "g2", "g2"),
        ]
    );
    // Credit freed by c1's ack may go to either queue's waiting message; exactly one comes.
    let next = c.ack(1, 1, false);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(tags(&next), [3]);
}

#[test]
fn prefetch_one_redelivers_a_nacked_message_to_the_same_consumer() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "p1");
    c.qos(1, 1, false);
    c.consume(1, "p1", "c");
    assert_eq!(
        c.publish(1, "", "p1", "a"),
        vec![deliver(1, "c", 1, false, "p1", "a")]
    );
    assert_eq!(c.publish(1, "", "p1", "b"), vec![]);
    assert_eq!(
        c.nack(1, 1, false, true),
        vec![deliver(1, "c", 2, true, "p1", "a")]
    );
    assert_eq!(
        c.ack(1, 2, false),
        vec![deliver(1, "c", 3, false, "p1", "b")]
    );
}

#[test]
fn no_ack_consumer_drains_a_backlog_larger_than_its_buffer() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "big");
    let mut batch = BytesMut::new();
    for i in 0..3000 {
        batch.extend_from_slice(&publish_frames(1, "", "big", false, &[], &i.to_string()));
    }
    c.send(batch);
    let got = c.consume_with(
        1,
        basic::Consume {
            queue: "big".into(),
            consumer_tag: "fast".into(),
            no_ack: true,
            ..Default::default()
        },
    );
    let expected: Vec<String> = (0..3000).map(|i: i32| i.to_string()).collect();
    assert_eq!(bodies(&got), expected);
    assert_eq!(c.queue_counts(1, "big"), Ok((0, 1)));
}

#[test]
fn settling_after_the_queue_was_deleted_is_allowed() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(1, "del");
    c.publish(1, "", "del", "x");
    let (tag, _, _) = c.get_one(1, "del");
    assert_eq!(c.delete_queue(2, "del").len(), 1);
    assert_eq!(c.ack(1, tag, false), vec![]);
    assert!(c.conn().is_open());
}

// ---- more publishing: overflow, tx + return, mode switches, errors ----

#[test]
fn reject_publish_overflow_nacks_in_confirm_mode() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue_with(
        1,
        queue::Declare {
            queue: "full".into(),
            arguments: table(&[
                ("x-max-length", AMQPValue::LongInt(1)),
                ("x-overflow", long_str("reject-publish")),
            ]),
            ..Default::default()
        },
    );
    c.confirm_select(1);
    let mut batch = BytesMut::new();
    for m in ["a", "b", "c"] {
        batch.extend_from_slice(&publish_frames(1, "", "full", false, &[], m));
    }
    assert_eq!(
        c.send(batch),
        vec![
            Reply::Ack {
                ch: 1,
                tag: 1,
                multiple: false
            },
            Reply::Nack {
                ch: 1,
                tag: 2,
                multiple: false
            },
            Reply::Nack {
                ch: 1,
                tag: 3,
                multiple: false
            },
        ]
    );
    assert_eq!(c.drain(1, "full"), ["a"]);
}

#[test]
fn drop_head_overflow_keeps_the_newest() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue_with(
        1,
        queue::Declare {
            queue: "dh".into(),
            arguments: table(&[("x-max-length", AMQPValue::LongInt(2))]),
            ..Default::default()
        },
    );
    for m in ["a", "b", "c"] {
        c.publish(1, "", "dh", m);
    }
    assert_eq!(c.drain(1, "dh"), ["b", "c"]);
}

#[test]
fn tx_commit_returns_unroutable_mandatory_before_commit_ok() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.tx_select(1);
    assert_eq!(
        c.send(publish_frames(1, "", "nowhere", true, &[], "lost")),
        vec![]
    );
    assert_eq!(
        c.tx_commit(1),
        vec![
            Reply::Return {
                ch: 1,
                code: 312,
                text: "NO_ROUTE".into(),
                exchange: String::new(),
                rk: "nowhere".into(),
                body: "lost".into()
            },
            commit_ok(1),
        ]
    );
}

#[test]
fn uncommitted_acks_are_requeued_when_the_channel_closes() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.declare_queue(2, "txc");
    c.publish(2, "", "txc", "a");
    c.tx_select(1);
    let (tag, _, _) = c.get_one(1, "txc");
    assert_eq!(c.ack(1, tag, false), vec![]);
    assert_eq!(c.close_channel(1), vec![channel_close_ok(1)]);
    assert_eq!(c.get_one(2, "txc"), (1, true, "a".into()));
}

#[test]
fn tx_and_confirm_modes_exclude_each_other() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.open_channel(2);
    c.tx_select(1);
    assert_eq!(
        c.call(
            1,
            AMQPClass::Confirm(
                rill_codec::amq_protocol::protocol::confirm::AMQPMethod::Select(
                    rill_codec::amq_protocol::protocol::confirm::Select { nowait: false }
                )
            )
        ),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
            (85, 10)
        )]
    );
    c.confirm_select(2);
    assert_eq!(
        c.call(
            2,
            AMQPClass::Tx(rill_codec::amq_protocol::protocol::tx::AMQPMethod::Select(
                rill_codec::amq_protocol::protocol::tx::Select {}
            ))
        ),
        vec![channel_close(
            2,
            406,
            "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
            (90, 10)
        )]
    );
}

#[test]
fn publish_to_a_missing_exchange_is_404() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    assert_eq!(
        c.publish(1, "nosuch", "k", "x"),
        vec![channel_close(
            1,
            404,
            "NOT_FOUND - no exchange 'nosuch' in vhost '/'",
            (60, 40)
        )]
    );
}

#[test]
fn nothing_follows_a_channel_close_in_confirm_mode() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "cfe");
    c.confirm_select(1);
    let mut batch = publish_frames(1, "", "cfe", false, &[], "ok");
    batch.extend_from_slice(&publish_frames(1, "nosuch", "k", false, &[], "bad"));
    let replies = c.send(batch);
    // RabbitMQ may or may not confirm the first publish, but never after channel.close.
    assert_eq!(
        replies.last(),
        Some(&channel_close(
            1,
            404,
            "NOT_FOUND - no exchange 'nosuch' in vhost '/'",
            (60, 40)
        )),
        "{replies:?}"
    );
}

#[test]
fn queue_delete_if_unused_and_if_empty() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "busy");
    c.consume(1, "busy", "c");
    assert_eq!(
        c.call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: "busy".into(),
                if_unused: true,
                ..Default::default()
            }))
        ),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - queue 'busy' in vhost '/' in use",
            (50, 40)
        )]
    );
    c.send(channel_close_ok_frame(1));
    c.open_channel(1);
    c.declare_queue(1, "full");
    c.publish(1, "", "full", "x");
    assert_eq!(
        c.call(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: "full".into(),
                if_empty: true,
                ..Default::default()
            }))
        ),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - queue 'full' in vhost '/' not empty",
            (50, 40)
        )]
    );
}

#[test]
fn inequivalent_redeclare_is_406() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "eq");
    assert_eq!(
        c.declare_queue_with(
            1,
            queue::Declare {
                queue: "eq".into(),
                durable: true,
                ..Default::default()
            }
        ),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'eq' in vhost '/': \
             received 'true' but current is 'false'",
            (50, 10)
        )]
    );
}

#[test]
fn server_named_queue_is_the_default_for_later_methods() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let replies = c.declare_queue_with(
        1,
        queue::Declare {
            exclusive: true,
            ..Default::default()
        },
    );
    let [Reply::Method {
        method: AMQPClass::Queue(queue::AMQPMethod::DeclareOk(d)),
        ..
    }] = replies.as_slice()
    else {
        panic!("{replies:?}");
    };
    let name = d.queue.to_string();
    assert!(name.starts_with("amq.gen-") && name.len() == 30, "{name}");
    // Empty queue name and routing key: the last declared queue, bound by its own name.
    c.bind(1, "", "amq.direct", "");
    c.publish(1, "amq.direct", &name, "x");
    assert_eq!(c.drain(1, ""), ["x"]);
}

#[test]
fn consumer_tag_reuse_closes_the_connection_with_530() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "tagq");
    c.consume(1, "tagq", "same");
    assert_eq!(
        c.consume_with(
            1,
            basic::Consume {
                queue: "tagq".into(),
                consumer_tag: "same".into(),
                ..Default::default()
            }
        ),
        vec![connection_close(
            530,
            "NOT_ALLOWED - attempt to reuse consumer tag 'same'",
            (60, 20)
        )]
    );
}

// ---- connection-level frames and events ----

#[test]
fn channel_open_errors_close_the_connection_with_504() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    assert_eq!(
        c.call(
            1,
            AMQPClass::Channel(
                rill_codec::amq_protocol::protocol::channel::AMQPMethod::Open(
                    rill_codec::amq_protocol::protocol::channel::Open {}
                )
            )
        ),
        vec![connection_close(
            504,
            "CHANNEL_ERROR - second 'channel.open' seen",
            (20, 10)
        )]
    );
    let mut c = Client::connect(&b);
    assert_eq!(
        c.declare_queue_with(5, queue::Declare::default()),
        vec![connection_close(
            504,
            "CHANNEL_ERROR - expected 'channel.open'",
            (50, 10)
        )]
    );
}

#[test]
fn immediate_publish_is_540() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let mut bytes = BytesMut::new();
    rill_codec::encode_publish(&mut bytes, 1, "", "q", false, true);
    assert_eq!(
        c.send(bytes),
        vec![connection_close(
            540,
            "NOT_IMPLEMENTED - immediate=true",
            (60, 40)
        )]
    );
}

#[test]
fn heartbeats_on_channel_zero_are_accepted() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let mut hb = BytesMut::new();
    rill_codec::encode_heartbeat(&mut hb);
    assert_eq!(c.send(hb), vec![]);
    assert!(c.conn().is_open());
}

#[test]
fn connection_close_requeues_and_answers_close_ok() {
    let b = broker();
    let mut p = Client::with_channel(&b, 1);
    p.declare_queue(1, "cq");
    p.publish(1, "", "cq", "a");
    let mut c = Client::with_channel(&b, 1);
    c.get_one(1, "cq");
    assert_eq!(
        c.call(
            0,
            AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            }))
        ),
        vec![ok(
            0,
            AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {}))
        )]
    );
    assert_eq!(c.conn().status(), Status::Closed);
    assert_eq!(p.get_one(1, "cq"), (1, true, "a".into()));
}

#[test]
fn force_close_event_sends_connection_close_320() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let mut out = BytesMut::new();
    c.conn().handle_event(
        rill_broker::ConnEvent::ForceClose {
            code: 320,
            text: "broker shutdown".into(),
        },
        &mut out,
    );
    assert_eq!(
        decode_all(&mut out),
        vec![connection_close(
            320,
            "CONNECTION_FORCED - broker shutdown",
            (0, 0)
        )]
    );
    assert_eq!(c.conn().status(), Status::Closing);
}

#[test]
fn dropped_connection_returns_deliveries_it_never_wrote() {
    let b = broker();
    let mut p = Client::with_channel(&b, 1);
    p.declare_queue(1, "unsent");
    let mut c = Client::with_channel(&b, 1);
    c.consume(1, "unsent", "c");
    for m in ["a", "b"] {
        p.publish(1, "", "unsent", m);
    }
    drop(c);
    assert_eq!(p.get_one(1, "unsent"), (1, false, "a".into()));
    assert_eq!(p.get_one(1, "unsent"), (2, false, "b".into()));
}

#[test]
fn deliveries_to_a_channel_closed_by_an_error_go_to_the_next_consumer() {
    let b = broker();
    let mut p = Client::with_channel(&b, 1);
    p.declare_queue(1, "err");
    let mut c = Client::with_channel(&b, 1);
    let mut other = Client::with_channel(&b, 1);
    c.consume(1, "err", "c");
    p.publish(1, "", "err", "m");
    // c fails its channel before taking the delivery from its outlet.
    let mut bad = BytesMut::new();
    rill_codec::encode_basic_ack(&mut bad, 1, 99, false);
    let out = c.send(bad);
    assert_eq!(
        out,
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - unknown delivery tag 99",
            (60, 80)
        )]
    );
    assert_eq!(
        other.consume(1, "err", "o"),
        vec![deliver(1, "o", 1, false, "err", "m")]
    );
}

#[test]
fn alternate_and_exchange_to_exchange_routing() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_exchange(1, "ae", "fanout");
    c.expect_ok(
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "main".into(),
            kind: "direct".into(),
            arguments: table(&[("alternate-exchange", long_str("ae"))]),
            ..Default::default()
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
    );
    c.declare_exchange(1, "dst", "fanout");
    c.expect_ok(
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "dst".into(),
            source: "amq.topic".into(),
            routing_key: "a.#".into(),
            ..Default::default()
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
    );
    for (q, x, rk) in [
        ("unrouted", "ae", ""),
        ("routed", "main", "k"),
        ("via", "dst", ""),
    ] {
        c.declare_queue(1, q);
        c.bind(1, q, x, rk);
    }
    c.confirm_select(1);
    // Mandatory messages caught by the alternate exchange are routed, not returned.
    let mut batch = publish_frames(1, "main", "k", true, &[], "direct");
    batch.extend_from_slice(&publish_frames(1, "main", "other", true, &[], "fallback"));
    batch.extend_from_slice(&publish_frames(1, "amq.topic", "a.b", true, &[], "e2e"));
    batch.extend_from_slice(&publish_frames(1, "amq.topic", "b", false, &[], "none"));
    assert_eq!(
        c.send(batch),
        vec![Reply::Ack {
            ch: 1,
            tag: 4,
            multiple: true
        }]
    );
    assert_eq!(c.drain(1, "routed"), ["direct"]);
    assert_eq!(c.drain(1, "unrouted"), ["fallback"]);
    assert_eq!(c.drain(1, "via"), ["e2e"]);
}

#[test]
fn bodies_span_frames_both_ways() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "large");
    let body: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    c.publish(1, "", "large", &body);
    let got = c.get(1, "large", true);
    assert_eq!(bodies(&got), [body]);
}

#[test]
fn oversize_message_is_406_after_its_body() {
    let b = Broker::new(BrokerConfig {
        max_message_size: 10,
        ..BrokerConfig::default()
    });
    let mut c = Client::with_channel(&b, 1);
    c.declare_queue(1, "small");
    assert_eq!(c.publish(1, "", "small", "0123456789"), vec![]);
    assert_eq!(
        c.publish(1, "", "small", "0123456789x"),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - message size 11 is larger than configured max size 10",
            (60, 40)
        )]
    );
}

#[test]
fn user_id_must_match_the_login() {
    let b = broker();
    let mut c = Client::with_channel(&b, 1);
    let props = rill_codec::encode_properties(
        &rill_codec::BasicProperties::default().with_user_id("bob".into()),
    );
    assert_eq!(
        c.send(publish_frames(1, "", "q", false, &props, "x")),
        vec![channel_close(
            1,
            406,
            "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'guest'",
            (60, 40)
        )]
    );
}
