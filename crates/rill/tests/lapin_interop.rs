//! lapin 4.12 against the broker: the AMQP behaviour a real Rust client relies on. Every
//! expectation was checked against RabbitMQ 3.10.8 first (`AMQP_TEST_ADDR=127.0.0.1:PORT`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{unique, within, Broker};
use futures_lite::StreamExt;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::*;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

async fn connect(broker: &Broker) -> Connection {
    within(
        "connect",
        Connection::connect(&broker.uri(), ConnectionProperties::default()),
    )
    .await
    .expect("connect with lapin")
}

async fn channel(conn: &Connection) -> Channel {
    within("channel.open", conn.create_channel())
        .await
        .expect("open channel")
}

/// Declares an exclusive queue (deleted with the connection, so shared brokers stay clean).
async fn exclusive_queue(ch: &Channel, name: &str) {
    within(
        "queue.declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare queue");
}

async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    publish_with(ch, exchange, routing_key, body, BasicProperties::default()).await;
}

async fn publish_with(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        ),
    )
    .await
    .expect("publish");
}

async fn get(ch: &Channel, queue: &str, no_ack: bool) -> Option<BasicGetMessage> {
    within(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack }),
    )
    .await
    .expect("basic.get")
}

/// Drains `queue` with basic.get(no_ack) and returns the bodies in order.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(msg) = get(ch, queue, true).await {
        out.push(String::from_utf8_lossy(&msg.delivery.data).into_owned());
    }
    out
}

/// Message count of a queue, via a passive declare.
async fn message_count(ch: &Channel, queue: &str) -> u32 {
    within(
        "queue.declare passive",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive declare")
    .message_count()
}

async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    within(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic.consume")
}

async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    within("a delivery", consumer.next())
        .await
        .expect("consumer ended")
        .expect("delivery error")
}

/// Asserts no delivery arrives within a short grace period (used for prefetch limits).
async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
        panic!("unexpected delivery: {d:?}");
    }
}

async fn close(conn: Connection) {
    within("connection.close", conn.close(200, "bye".into()))
        .await
        .expect("close connection");
}

fn amqp_error(err: &lapin::Error) -> (u16, String) {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => (e.get_id(), e.get_message().to_string()),
        other => panic!("expected an AMQP error, got {other:?}"),
    }
}

/// Runs `bad`, a method the broker answers asynchronously with channel.close (a publish, an
/// ack), and returns that close's (code, text) as lapin reports it on the connection's event
/// stream. Waiting for the event rather than failing the next call avoids racing the close.
async fn async_channel_error(
    conn: &Connection,
    bad: impl std::future::Future<Output = ()>,
) -> (u16, String) {
    let mut events = Box::pin(conn.events_listener());
    bad.await;
    loop {
        match within("the channel error", events.next()).await {
            Some(lapin::Event::Error(e)) => return amqp_error(&e),
            Some(_) => continue,
            None => panic!("connection event stream ended"),
        }
    }
}

// basic.ack/nack/reject sent on the channel itself. lapin's `Acker` (`delivery.ack()`) goes
// through an internal task, so its frame can reach the wire after a later call on the same
// channel; tests whose next step depends on the ack having been processed use these.

async fn ack(ch: &Channel, delivery_tag: u64, multiple: bool) {
    within(
        "basic.ack",
        ch.basic_ack(delivery_tag, BasicAckOptions { multiple }),
    )
    .await
    .expect("basic.ack");
}

async fn nack(ch: &Channel, delivery_tag: u64, multiple: bool, requeue: bool) {
    within(
        "basic.nack",
        ch.basic_nack(delivery_tag, BasicNackOptions { multiple, requeue }),
    )
    .await
    .expect("basic.nack");
}

async fn reject(ch: &Channel, delivery_tag: u64, requeue: bool) {
    within(
        "basic.reject",
        ch.basic_reject(delivery_tag, BasicRejectOptions { requeue }),
    )
    .await
    .expect("basic.reject");
}

#[tokio::test]
async fn publish_consume_round_trip() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("roundtrip");
    exclusive_queue(&ch, &queue).await;
    for body in ["one", "two", "three"] {
        publish(&ch, "", &queue, body.as_bytes()).await;
    }
    let mut consumer = consume(&ch, &queue, false).await;
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, body.as_bytes());
        assert_eq!(d.delivery_tag, i as u64 + 1);
        assert_eq!(d.exchange.as_str(), "");
        assert_eq!(d.routing_key.as_str(), queue);
        assert!(!d.redelivered);
        within("ack", d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    assert_eq!(message_count(&ch, &queue).await, 0);
    close(conn).await;
}

#[tokio::test]
async fn publisher_confirms_and_mandatory_return() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("confirms");
    exclusive_queue(&ch, &queue).await;
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");

    let mut confirms = Vec::new();
    for i in 0..20 {
        confirms.push(
            within(
                "publish",
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("m{i}").as_bytes(),
                    BasicProperties::default(),
                ),
            )
            .await
            .expect("publish"),
        );
    }
    for confirm in confirms {
        let confirmation = within("confirm", confirm).await.expect("confirmation");
        assert!(confirmation.is_ack());
    }
    let returned = within("wait_for_confirms", ch.wait_for_confirms())
        .await
        .expect("wait_for_confirms");
    assert!(returned.is_empty());
    assert_eq!(message_count(&ch, &queue).await, 20);

    // Unroutable + mandatory: basic.return 312 NO_ROUTE, then still basic.ack.
    let missing = unique("no-such-queue");
    let confirm = within(
        "publish",
        ch.basic_publish(
            "".into(),
            missing.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"lost",
            BasicProperties::default().with_priority(3),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within("confirm", confirm).await.expect("confirmation");
    assert!(
        confirmation.is_ack(),
        "unroutable publish must still be acked"
    );
    let returned = confirmation.take_message().expect("a basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.routing_key.as_str(), missing);
    assert_eq!(returned.delivery.data, b"lost");
    assert_eq!(returned.delivery.properties.priority(), &Some(3));
    assert_eq!(
        returned.error().map(|e| e.kind().clone()),
        Some(AMQPErrorKind::Soft(AMQPSoftError::NOROUTE))
    );

    // Unroutable without mandatory: silently dropped, still acked.
    let confirm = within(
        "publish",
        ch.basic_publish(
            "".into(),
            missing.as_str().into(),
            BasicPublishOptions::default(),
            b"dropped",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within("confirm", confirm).await.expect("confirmation");
    assert!(confirmation.is_ack());
    assert!(confirmation.take_message().is_none());
    close(conn).await;
}

#[tokio::test]
async fn basic_get_reports_message_count() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("get");
    exclusive_queue(&ch, &queue).await;
    assert!(get(&ch, &queue, false).await.is_none(), "get-empty");
    for body in ["a", "b", "c"] {
        publish(&ch, "", &queue, body.as_bytes()).await;
    }
    for (body, remaining) in [("a", 2), ("b", 1), ("c", 0)] {
        let msg = get(&ch, &queue, false).await.expect("get-ok");
        assert_eq!(msg.delivery.data, body.as_bytes());
        assert_eq!(msg.message_count, remaining);
        assert!(!msg.delivery.redelivered);
        within("ack", msg.delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    assert!(get(&ch, &queue, false).await.is_none(), "get-empty");
    close(conn).await;
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("qos");
    exclusive_queue(&ch, &queue).await;
    within("basic.qos", ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos");
    for i in 0..5 {
        publish(&ch, "", &queue, format!("m{i}").as_bytes()).await;
    }
    let mut consumer = consume(&ch, &queue, false).await;
    let first = next_delivery(&mut consumer).await;
    let second = next_delivery(&mut consumer).await;
    assert_eq!(
        (first.data.as_slice(), second.data.as_slice()),
        (&b"m0"[..], &b"m1"[..])
    );
    assert_no_delivery(&mut consumer).await;

    within("ack", first.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let third = next_delivery(&mut consumer).await;
    assert_eq!(third.data, b"m2");
    assert_no_delivery(&mut consumer).await;

    // Ack both outstanding with multiple=true: two more may come.
    within(
        "ack multiple",
        third.ack(BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack");
    let d3 = next_delivery(&mut consumer).await;
    let d4 = next_delivery(&mut consumer).await;
    assert_eq!(
        (d3.data.as_slice(), d4.data.as_slice()),
        (&b"m3"[..], &b"m4"[..])
    );
    close(conn).await;
}

#[tokio::test]
async fn nack_requeue_redelivers_and_reject_drops() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("nack");
    exclusive_queue(&ch, &queue).await;
    publish(&ch, "", &queue, b"first").await;
    publish(&ch, "", &queue, b"second").await;

    let mut consumer = consume(&ch, &queue, false).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!((d.data.as_slice(), d.redelivered), (&b"first"[..], false));
    within(
        "nack",
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        }),
    )
    .await
    .expect("nack");
    // "second" was delivered right after "first" (no prefetch limit); the requeued "first" comes
    // back after it, marked redelivered.
    let d2 = next_delivery(&mut consumer).await;
    assert_eq!(
        (d2.data.as_slice(), d2.redelivered),
        (&b"second"[..], false)
    );
    let again = next_delivery(&mut consumer).await;
    assert_eq!(
        (again.data.as_slice(), again.redelivered),
        (&b"first"[..], true)
    );

    reject(&ch, again.delivery_tag, false).await;
    ack(&ch, d2.delivery_tag, false).await;
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&ch, &queue).await, 0);
    close(conn).await;
}

#[tokio::test]
async fn requeued_message_keeps_its_position_for_basic_get() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("requeue-pos");
    exclusive_queue(&ch, &queue).await;
    for body in ["a", "b", "c"] {
        publish(&ch, "", &queue, body.as_bytes()).await;
    }
    let a = get(&ch, &queue, false).await.expect("a");
    let b = get(&ch, &queue, false).await.expect("b");
    assert_eq!(b.message_count, 1);
    // Requeue b then a: RabbitMQ puts each back at its original position, so a, b, c.
    nack(&ch, b.delivery.delivery_tag, false, true).await;
    nack(&ch, a.delivery.delivery_tag, false, true).await;
    let mut seen = Vec::new();
    while let Some(msg) = get(&ch, &queue, true).await {
        seen.push((
            String::from_utf8_lossy(&msg.delivery.data).into_owned(),
            msg.delivery.redelivered,
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("a".to_string(), true),
            ("b".to_string(), true),
            ("c".to_string(), false)
        ]
    );
    close(conn).await;
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare exchange");
}

async fn delete_exchange(ch: &Channel, name: &str) {
    within(
        "exchange.delete",
        ch.exchange_delete(name.into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("delete exchange");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
    .expect("bind");
}

/// Declares one exclusive queue per binding key, binds it, publishes each routing key (body =
/// routing key) and returns which routing keys each queue received, in binding order.
async fn route(
    kind: ExchangeKind,
    bindings: &[&str],
    routing_keys: &[&str],
) -> Vec<(String, Vec<String>)> {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let exchange = unique("x");
    declare_exchange(&ch, &exchange, kind).await;
    let mut queues = Vec::new();
    for key in bindings {
        let q = unique("bound");
        exclusive_queue(&ch, &q).await;
        bind(&ch, &q, &exchange, key, FieldTable::default()).await;
        queues.push((key.to_string(), q));
    }
    for rk in routing_keys {
        publish(&ch, &exchange, rk, rk.as_bytes()).await;
    }
    let mut out = Vec::new();
    for (key, q) in queues {
        out.push((key, drain(&ch, &q).await));
    }
    delete_exchange(&ch, &exchange).await;
    close(conn).await;
    out
}

fn expected(rows: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    rows.iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let got = route(
        ExchangeKind::Direct,
        &["red", "green", "red"],
        &["red", "green", "blue", "RED", ""],
    )
    .await;
    assert_eq!(
        got,
        expected(&[("red", &["red"]), ("green", &["green"]), ("red", &["red"])])
    );
}

#[tokio::test]
async fn default_exchange_routes_to_queue_by_name() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("default-x");
    exclusive_queue(&ch, &queue).await;
    publish(&ch, "", &queue, b"direct").await;
    publish(&ch, "amq.direct", &queue, b"not bound").await;
    bind(&ch, &queue, "amq.direct", "k", FieldTable::default()).await;
    publish(&ch, "amq.direct", "k", b"via amq.direct").await;
    assert_eq!(drain(&ch, &queue).await, ["direct", "via amq.direct"]);
    close(conn).await;
}

#[tokio::test]
async fn fanout_exchange_ignores_routing_key() {
    let got = route(ExchangeKind::Fanout, &["a", ""], &["x", "", "y.z"]).await;
    assert_eq!(
        got,
        expected(&[("a", &["x", "", "y.z"]), ("", &["x", "", "y.z"])])
    );
}

/// RabbitMQ's topic matching, including empty words: `*` matches exactly one (possibly empty)
/// word, `#` zero or more words. Observed on RabbitMQ: the empty routing key has zero words (so
/// `*` does not match it, `#` does), while "a..c" has an empty middle word that `*` matches.
#[tokio::test]
async fn topic_exchange_matches_star_and_hash() {
    let got = route(
        ExchangeKind::Topic,
        &["a.*.c", "a.#", "#.z", "*", "#", "a.#.c", "*.*"],
        &[
            "a.b.c", "a", "a.b", "x.z", "z", "a..c", "", "a.c", "a.b.b.c", ".", "b",
        ],
    )
    .await;
    assert_eq!(
        got,
        expected(&[
            ("a.*.c", &["a.b.c", "a..c"]),
            ("a.#", &["a.b.c", "a", "a.b", "a..c", "a.c", "a.b.b.c"]),
            ("#.z", &["x.z", "z"]),
            ("*", &["a", "z", "b"]),
            (
                "#",
                &["a.b.c", "a", "a.b", "x.z", "z", "a..c", "", "a.c", "a.b.b.c", ".", "b"]
            ),
            ("a.#.c", &["a.b.c", "a..c", "a.c", "a.b.b.c"]),
            ("*.*", &["a.b", "x.z", "a.c", "."]),
        ])
    );
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[tokio::test]
async fn headers_exchange_matches_all_and_any() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let exchange = unique("hx");
    declare_exchange(&ch, &exchange, ExchangeKind::Headers).await;
    let q_all = unique("h-all");
    let q_any = unique("h-any");
    let q_int = unique("h-int");
    for q in [&q_all, &q_any, &q_int] {
        exclusive_queue(&ch, q).await;
    }
    bind(
        &ch,
        &q_all,
        &exchange,
        "",
        table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    bind(
        &ch,
        &q_any,
        &exchange,
        "",
        table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    // No x-match: defaults to all. Typed values compare by value and type.
    bind(
        &ch,
        &q_int,
        &exchange,
        "",
        table(&[("n", AMQPValue::LongInt(42))]),
    )
    .await;
    let cases: [(&str, FieldTable); 5] = [
        (
            "both",
            table(&[("format", s("pdf")), ("type", s("report"))]),
        ),
        ("format", table(&[("format", s("pdf"))])),
        ("wrong", table(&[("format", s("zip")), ("type", s("log"))])),
        ("n42", table(&[("n", AMQPValue::LongInt(42))])),
        ("none", FieldTable::default()),
    ];
    for (body, headers) in cases {
        publish_with(
            &ch,
            &exchange,
            "ignored",
            body.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
    }
    // A message without a headers property at all.
    publish(&ch, &exchange, "", b"no-headers").await;
    assert_eq!(drain(&ch, &q_all).await, ["both"]);
    assert_eq!(drain(&ch, &q_any).await, ["both", "format"]);
    assert_eq!(drain(&ch, &q_int).await, ["n42"]);
    delete_exchange(&ch, &exchange).await;
    close(conn).await;
}

#[tokio::test]
async fn exchange_to_exchange_binding_routes_and_unbinds() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let source = unique("e2e-src");
    let dest = unique("e2e-dst");
    declare_exchange(&ch, &source, ExchangeKind::Topic).await;
    declare_exchange(&ch, &dest, ExchangeKind::Fanout).await;
    let queue = unique("e2e-q");
    exclusive_queue(&ch, &queue).await;
    bind(&ch, &queue, &dest, "", FieldTable::default()).await;
    within(
        "exchange.bind",
        ch.exchange_bind(
            dest.as_str().into(),
            source.as_str().into(),
            "logs.*".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind");
    publish(&ch, &source, "logs.error", b"match").await;
    publish(&ch, &source, "metrics.cpu", b"no match").await;
    assert_eq!(drain(&ch, &queue).await, ["match"]);

    within(
        "exchange.unbind",
        ch.exchange_unbind(
            dest.as_str().into(),
            source.as_str().into(),
            "logs.*".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.unbind");
    publish(&ch, &source, "logs.error", b"after unbind").await;
    assert!(drain(&ch, &queue).await.is_empty());
    delete_exchange(&ch, &source).await;
    delete_exchange(&ch, &dest).await;
    close(conn).await;
}

#[tokio::test]
async fn channel_error_leaves_connection_and_other_channels_usable() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let bad = channel(&conn).await;
    let good = channel(&conn).await;
    let missing = unique("missing");
    let err = within(
        "passive declare",
        bad.queue_declare(
            missing.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect_err("passive declare of a missing queue must fail");
    // RabbitMQ: channel.close 404 "NOT_FOUND - no queue '<name>' in vhost '/'".
    assert_eq!(
        amqp_error(&err),
        (
            404,
            format!("NOT_FOUND - no queue '{missing}' in vhost '/'")
        )
    );
    assert!(!bad.status().connected(), "the failed channel is closed");
    assert!(conn.status().connected(), "the connection survives");

    let queue = unique("survivor");
    exclusive_queue(&good, &queue).await;
    publish(&good, "", &queue, b"still here").await;
    assert_eq!(drain(&good, &queue).await, ["still here"]);
    let fresh = channel(&conn).await;
    assert_eq!(message_count(&fresh, &queue).await, 0);

    // Publishing to a missing exchange closes that channel with 404 too.
    let missing_x = unique("missing-x");
    // RabbitMQ: 404 "NOT_FOUND - no exchange '<name>' in vhost '/'".
    let got = async_channel_error(&conn, publish(&fresh, &missing_x, "k", b"x")).await;
    assert_eq!(
        got,
        (
            404,
            format!("NOT_FOUND - no exchange '{missing_x}' in vhost '/'")
        )
    );
    assert!(conn.status().connected());
    let last = channel(&conn).await;
    assert_eq!(message_count(&last, &queue).await, 0);
    close(conn).await;
}

async fn message_count_result(ch: &Channel, queue: &str) -> lapin::Result<u32> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
}

#[tokio::test]
async fn tx_commit_publishes_and_rollback_discards() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let tx = channel(&conn).await;
    let observer = channel(&conn).await;
    let queue = unique("tx");
    exclusive_queue(&observer, &queue).await;
    within("tx.select", tx.tx_select())
        .await
        .expect("tx.select");

    publish(&tx, "", &queue, b"committed").await;
    assert_eq!(
        message_count(&observer, &queue).await,
        0,
        "buffered until commit"
    );
    within("tx.commit", tx.tx_commit()).await.expect("commit");
    assert_eq!(message_count(&observer, &queue).await, 1);

    publish(&tx, "", &queue, b"rolled back").await;
    within("tx.rollback", tx.tx_rollback())
        .await
        .expect("rollback");
    assert_eq!(message_count(&observer, &queue).await, 1);

    // Acks are transactional too: an ack rolled back leaves the message unacked, so it returns
    // to the queue when the channel closes.
    let msg = get(&tx, &queue, false).await.expect("get");
    assert_eq!(msg.delivery.data, b"committed");
    ack(&tx, msg.delivery.delivery_tag, false).await;
    within("tx.rollback", tx.tx_rollback())
        .await
        .expect("rollback");
    within("channel.close", tx.close(200, "bye".into()))
        .await
        .expect("close tx channel");
    // ...and a committed ack removes it for good: after commit, closing the channel does not
    // bring it back.
    let tx2 = channel(&conn).await;
    within("tx.select", tx2.tx_select())
        .await
        .expect("tx.select");
    let back = get(&tx2, &queue, false).await.expect("requeued");
    assert_eq!(back.delivery.data, b"committed");
    assert!(back.delivery.redelivered);
    ack(&tx2, back.delivery.delivery_tag, false).await;
    within("tx.commit", tx2.tx_commit()).await.expect("commit");
    within("channel.close", tx2.close(200, "bye".into()))
        .await
        .expect("close tx2 channel");
    assert_eq!(message_count(&observer, &queue).await, 0);
    close(conn).await;
}

/// Every one of the 14 basic properties, and a headers table holding every field type
/// RabbitMQ's clients send, must reach the consumer exactly as published.
#[tokio::test]
async fn all_properties_round_trip() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("props");
    exclusive_queue(&ch, &queue).await;

    let mut nested = FieldTable::default();
    nested.insert("inner-str".into(), s("deep"));
    nested.insert("inner-int".into(), AMQPValue::LongInt(-7));
    let mut deeper = FieldTable::default();
    deeper.insert("level".into(), AMQPValue::ShortShortUInt(3));
    nested.insert("deeper".into(), AMQPValue::FieldTable(deeper));

    let array = FieldArray::from(vec![
        AMQPValue::LongInt(1),
        s("two"),
        AMQPValue::Boolean(true),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
        AMQPValue::FieldTable(nested.clone()),
    ]);

    let mut headers = FieldTable::default();
    for (k, v) in [
        ("bool-true", AMQPValue::Boolean(true)),
        ("bool-false", AMQPValue::Boolean(false)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-300)),
        ("u16", AMQPValue::ShortUInt(60000)),
        ("i32", AMQPValue::LongInt(-70000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(-9_000_000_000_000)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        ("longstr", s("hello \u{e9}\u{1F600}")),
        (
            "longstr-bin",
            AMQPValue::LongString(LongString::from(vec![0u8, 255, 1, 0xCE])),
        ),
        ("array", AMQPValue::FieldArray(array)),
        ("empty-array", AMQPValue::FieldArray(FieldArray::default())),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        ("empty-table", AMQPValue::FieldTable(FieldTable::default())),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3, 0])),
        ),
        ("void", AMQPValue::Void),
    ] {
        headers.insert(k.into(), v);
    }

    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_123)
        .with_type("event.created".into())
        .with_user_id("guest".into())
        .with_app_id("rill-tests".into())
        .with_cluster_id("cluster-a".into());

    publish_with(&ch, "", &queue, b"{}", properties.clone()).await;
    let mut consumer = consume(&ch, &queue, true).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.properties, properties);
    assert_eq!(d.data, b"{}");

    // The same through basic.get, and with no properties at all.
    publish_with(&ch, "", &queue, b"", BasicProperties::default()).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.properties, BasicProperties::default());
    assert!(d.data.is_empty());
    close(conn).await;
}

/// A user_id that is not the connection's user is refused.
/// RabbitMQ: channel.close 406 "PRECONDITION_FAILED - user_id property set to 'someone-else'
/// but authenticated user was 'guest'".
#[tokio::test]
async fn foreign_user_id_is_406() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("userid");
    exclusive_queue(&ch, &queue).await;
    let got = async_channel_error(
        &conn,
        publish_with(
            &ch,
            "",
            &queue,
            b"x",
            BasicProperties::default().with_user_id("someone-else".into()),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            "PRECONDITION_FAILED - user_id property set to 'someone-else' but authenticated \
             user was 'guest'"
                .to_string()
        )
    );
    let other = channel(&conn).await;
    assert_eq!(message_count(&other, &queue).await, 0);
    close(conn).await;
}

#[tokio::test]
async fn two_mib_body_round_trips() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("big");
    exclusive_queue(&ch, &queue).await;
    let body: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    publish(&ch, "", &queue, &body).await;
    let mut consumer = consume(&ch, &queue, true).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data.len(), body.len());
    assert!(d.data == body, "2 MiB body corrupted");
    // An odd size that does not fill the last body frame.
    publish(&ch, "", &queue, &body[..1_000_001]).await;
    let d = next_delivery(&mut consumer).await;
    assert!(d.data == body[..1_000_001]);
    close(conn).await;
}

#[tokio::test]
async fn two_hundred_fifty_channels_on_one_connection() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let queue = unique("many-ch");
    let first = channel(&conn).await;
    exclusive_queue(&first, &queue).await;
    let mut channels = vec![first];
    for _ in 1..250 {
        channels.push(channel(&conn).await);
    }
    let mut ids: Vec<u16> = channels.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 250);
    for (i, ch) in channels.iter().enumerate() {
        publish(ch, "", &queue, format!("{i}").as_bytes()).await;
    }
    // Each channel takes one message with basic.get. Publishes on different channels are not
    // ordered relative to each other (RabbitMQ runs a process per channel), so compare sets.
    let mut got = Vec::new();
    for ch in &channels {
        let msg = get(ch, &queue, true).await.expect("a message per channel");
        let body = String::from_utf8_lossy(&msg.delivery.data).into_owned();
        got.push(body.parse::<usize>().expect("numeric body"));
    }
    got.sort_unstable();
    assert_eq!(got, (0..250).collect::<Vec<_>>());
    for ch in &channels[..125] {
        within("channel.close", ch.close(200, "bye".into()))
            .await
            .expect("close channel");
    }
    // The rest still work after half were closed.
    for ch in &channels[125..] {
        assert_eq!(message_count(ch, &queue).await, 0);
    }
    close(conn).await;
}

#[tokio::test]
async fn purge_and_delete_return_counts() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("purge");
    exclusive_queue(&ch, &queue).await;
    for _ in 0..4 {
        publish(&ch, "", &queue, b"x").await;
    }
    let purged = within(
        "queue.purge",
        ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 4);
    for _ in 0..2 {
        publish(&ch, "", &queue, b"x").await;
    }
    let deleted = within(
        "queue.delete",
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete");
    assert_eq!(deleted, 2);
    close(conn).await;
}

/// Unacked deliveries go back to the queue when their channel closes.
#[tokio::test]
async fn unacked_deliveries_requeued_on_channel_close() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let keeper = channel(&conn).await;
    let queue = unique("unacked");
    exclusive_queue(&keeper, &queue).await;
    for body in ["a", "b"] {
        publish(&keeper, "", &queue, body.as_bytes()).await;
    }
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, &queue, false).await;
    let _a = next_delivery(&mut consumer).await;
    let _b = next_delivery(&mut consumer).await;
    assert_eq!(message_count(&keeper, &queue).await, 0);
    within("channel.close", consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    let mut seen = BTreeMap::new();
    while let Some(msg) = get(&keeper, &queue, true).await {
        seen.insert(
            String::from_utf8_lossy(&msg.delivery.data).into_owned(),
            msg.delivery.redelivered,
        );
    }
    assert_eq!(
        seen,
        BTreeMap::from([("a".to_string(), true), ("b".to_string(), true)])
    );
    close(conn).await;
}

// ---- error codes ------------------------------------------------------------------------------

/// Awaits an operation that must fail with a channel error; returns (code, text).
async fn channel_error<T: std::fmt::Debug>(
    what: &str,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> (u16, String) {
    let err = within(what, fut)
        .await
        .expect_err("the broker must refuse this");
    amqp_error(&err)
}

fn queue_args(entries: &[(&str, AMQPValue)]) -> FieldTable {
    table(entries)
}

async fn declare_queue_with(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(name.into(), options, args).await
}

#[tokio::test]
async fn exchange_declare_errors() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let exchange = unique("redeclare-x");
    declare_exchange(&ch, &exchange, ExchangeKind::Direct).await;
    // Same properties again: fine.
    declare_exchange(&ch, &exchange, ExchangeKind::Direct).await;

    // RabbitMQ: 406 "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '<x>' in vhost
    // '/': received 'fanout' but current is 'direct'".
    let ch = channel(&conn).await;
    let got = channel_error(
        "redeclare as fanout",
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{exchange}' in \
                 vhost '/': received 'fanout' but current is 'direct'"
            )
        )
    );

    // RabbitMQ: 403 "ACCESS_REFUSED - exchange name 'amq.<x>' contains reserved prefix 'amq.*'".
    let ch = channel(&conn).await;
    let reserved = format!("amq.{}", unique("mine"));
    let got = channel_error(
        "declare amq.*",
        ch.exchange_declare(
            reserved.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            403,
            format!("ACCESS_REFUSED - exchange name '{reserved}' contains reserved prefix 'amq.*'")
        )
    );

    // RabbitMQ: connection error 503 "COMMAND_INVALID - unknown exchange type 'x-no-such-type'".
    // It closes the whole connection, so it is checked on a connection of its own.
    let doomed = connect(&broker).await;
    let dch = channel(&doomed).await;
    let got = channel_error(
        "unknown exchange type",
        dch.exchange_declare(
            unique("typeless").as_str().into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            503,
            "COMMAND_INVALID - unknown exchange type 'x-no-such-type'".to_string()
        )
    );

    // RabbitMQ: 404 "NOT_FOUND - no exchange '<x>' in vhost '/'".
    let ch = channel(&conn).await;
    let missing = unique("missing-x");
    let got = channel_error(
        "passive declare",
        ch.exchange_declare(
            missing.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            404,
            format!("NOT_FOUND - no exchange '{missing}' in vhost '/'")
        )
    );

    let ch = channel(&conn).await;
    delete_exchange(&ch, &exchange).await;
    close(conn).await;
}

#[tokio::test]
async fn queue_redeclare_with_other_arguments_is_406() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("args");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    within(
        "declare",
        declare_queue_with(
            &ch,
            &queue,
            exclusive,
            queue_args(&[("x-max-length", AMQPValue::LongInt(10))]),
        ),
    )
    .await
    .expect("declare with x-max-length");
    // RabbitMQ: 406 "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '<q>' in
    // vhost '/': received '20' but current is '10'".
    let got = channel_error(
        "redeclare",
        declare_queue_with(
            &ch,
            &queue,
            exclusive,
            queue_args(&[("x-max-length", AMQPValue::LongInt(20))]),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{queue}' in \
                 vhost '/': received '20' but current is '10'"
            )
        )
    );
    close(conn).await;
}

#[tokio::test]
async fn server_named_queue_gets_amq_gen_name() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let q = within(
        "declare",
        declare_queue_with(
            &ch,
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare server-named");
    assert!(q.name().as_str().starts_with("amq.gen-"), "{:?}", q.name());
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    publish(&ch, "", q.name().as_str(), b"hi").await;
    assert_eq!(drain(&ch, q.name().as_str()).await, ["hi"]);
    close(conn).await;
}

/// RabbitMQ: 405 "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '<q>' in
/// vhost '/'. It could be originally declared on another connection or the exclusive property
/// value does not match that of the original declaration."
#[tokio::test]
async fn exclusive_queue_is_locked_to_its_connection() {
    let broker = Broker::start();
    let owner = connect(&broker).await;
    let och = channel(&owner).await;
    let queue = unique("locked");
    exclusive_queue(&och, &queue).await;

    let other = connect(&broker).await;
    let ch = channel(&other).await;
    let got = channel_error(
        "consume another connection's exclusive queue",
        ch.basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            405,
            format!(
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in \
                 vhost '/'. It could be originally declared on another connection or the \
                 exclusive property value does not match that of the original declaration."
            )
        )
    );

    // Deleted with its connection.
    close(owner).await;
    let ch = channel(&other).await;
    let got = channel_error("passive declare", message_count_result(&ch, &queue)).await;
    assert_eq!(
        got,
        (404, format!("NOT_FOUND - no queue '{queue}' in vhost '/'"))
    );
    close(other).await;
}

/// RabbitMQ: 403 "ACCESS_REFUSED - queue '<q>' in vhost '/' in exclusive use".
#[tokio::test]
async fn exclusive_consumer_refuses_a_second_consumer() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("excl-consumer");
    exclusive_queue(&ch, &queue).await;
    let _first = within(
        "exclusive consume",
        ch.basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exclusive consume");
    let ch2 = channel(&conn).await;
    let got = channel_error(
        "second consumer",
        ch2.basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            403,
            format!("ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use")
        )
    );
    close(conn).await;
}

/// RabbitMQ: 406 "PRECONDITION_FAILED - unknown delivery tag 42".
#[tokio::test]
async fn unknown_delivery_tag_is_406() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let got = async_channel_error(&conn, ack(&ch, 42, false)).await;
    assert_eq!(
        got,
        (
            406,
            "PRECONDITION_FAILED - unknown delivery tag 42".to_string()
        )
    );
    close(conn).await;
}

/// RabbitMQ: 406 "PRECONDITION_FAILED - queue '<q>' in vhost '/' not empty" and
/// 406 "PRECONDITION_FAILED - queue '<q>' in vhost '/' in use".
#[tokio::test]
async fn queue_delete_if_empty_and_if_unused() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("del");
    exclusive_queue(&ch, &queue).await;
    publish(&ch, "", &queue, b"x").await;
    let got = channel_error(
        "delete if-empty",
        ch.queue_delete(
            queue.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            format!("PRECONDITION_FAILED - queue '{queue}' in vhost '/' not empty")
        )
    );

    let ch = channel(&conn).await;
    let _consumer = consume(&ch, &queue, false).await;
    let ch2 = channel(&conn).await;
    let got = channel_error(
        "delete if-unused",
        ch2.queue_delete(
            queue.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..QueueDeleteOptions::default()
            },
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            format!("PRECONDITION_FAILED - queue '{queue}' in vhost '/' in use")
        )
    );
    close(conn).await;
}

// ---- consumers --------------------------------------------------------------------------------

#[tokio::test]
async fn consumers_share_a_queue_round_robin() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("rr");
    exclusive_queue(&ch, &queue).await;
    let mut a = consume(&ch, &queue, true).await;
    let mut b = consume(&ch, &queue, true).await;
    for i in 0..6 {
        publish(&ch, "", &queue, format!("{i}").as_bytes()).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..3 {
        got_a.push(next_delivery(&mut a).await.data);
        got_b.push(next_delivery(&mut b).await.data);
    }
    let as_str = |v: Vec<Vec<u8>>| -> Vec<String> {
        v.into_iter()
            .map(|d| String::from_utf8_lossy(&d).into_owned())
            .collect()
    };
    assert_eq!(as_str(got_a), ["0", "2", "4"]);
    assert_eq!(as_str(got_b), ["1", "3", "5"]);
    close(conn).await;
}

/// Deleting a queue sends basic.cancel to its consumers (lapin announces
/// consumer_cancel_notify): the consumer stream ends.
#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("cancel-notify");
    exclusive_queue(&ch, &queue).await;
    let mut consumer = consume(&ch, &queue, true).await;
    let other = channel(&conn).await;
    within(
        "queue.delete",
        other.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete");
    let end = within("consumer end", consumer.next()).await;
    assert!(end.is_none(), "consumer should end, got {end:?}");
    // The consuming channel stays open.
    assert!(ch.status().connected());
    let q2 = unique("after-cancel");
    exclusive_queue(&ch, &q2).await;
    close(conn).await;
}

/// An auto-delete queue disappears when its last consumer is cancelled.
#[tokio::test]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("autodel");
    within(
        "declare",
        declare_queue_with(
            &ch,
            &queue,
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare auto-delete");
    let consumer = within(
        "consume",
        ch.basic_consume(
            queue.as_str().into(),
            "tag-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    assert_eq!(consumer.tag().as_str(), "tag-1");
    // Still there while consumed.
    assert_eq!(message_count(&ch, &queue).await, 0);
    within(
        "cancel",
        ch.basic_cancel("tag-1".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");
    let got = channel_error("passive declare", message_count_result(&ch, &queue)).await;
    assert_eq!(
        got,
        (404, format!("NOT_FOUND - no queue '{queue}' in vhost '/'"))
    );
    close(conn).await;
}

#[tokio::test]
async fn basic_recover_redelivers_unacked() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("recover");
    exclusive_queue(&ch, &queue).await;
    publish(&ch, "", &queue, b"once").await;
    let mut consumer = consume(&ch, &queue, false).await;
    let first = next_delivery(&mut consumer).await;
    assert!(!first.redelivered);
    within(
        "basic.recover",
        ch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await
    .expect("recover");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(
        (again.data.as_slice(), again.redelivered),
        (&b"once"[..], true)
    );
    within("ack", again.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    close(conn).await;
}

// ---- more exchange features -------------------------------------------------------------------

async fn declare_exchange_with(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
    args: FieldTable,
) -> lapin::Result<()> {
    ch.exchange_declare(name.into(), kind, options, args).await
}

#[tokio::test]
async fn alternate_exchange_takes_unroutable_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");
    let ae = unique("ae");
    declare_exchange(&ch, &ae, ExchangeKind::Fanout).await;
    let main = unique("with-ae");
    within(
        "declare with alternate-exchange",
        declare_exchange_with(
            &ch,
            &main,
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            table(&[("alternate-exchange", s(&ae))]),
        ),
    )
    .await
    .expect("declare");
    let routed = unique("routed");
    let fallback = unique("fallback");
    exclusive_queue(&ch, &routed).await;
    exclusive_queue(&ch, &fallback).await;
    bind(&ch, &routed, &main, "known", FieldTable::default()).await;
    bind(&ch, &fallback, &ae, "", FieldTable::default()).await;

    for key in ["known", "unknown"] {
        let confirm = within(
            "publish",
            ch.basic_publish(
                main.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                key.as_bytes(),
                BasicProperties::default(),
            ),
        )
        .await
        .expect("publish");
        let confirmation = within("confirm", confirm).await.expect("confirmation");
        assert!(confirmation.is_ack());
        assert!(
            confirmation.take_message().is_none(),
            "routed via the alternate exchange, so not returned"
        );
    }
    assert_eq!(drain(&ch, &routed).await, ["known"]);
    assert_eq!(drain(&ch, &fallback).await, ["unknown"]);
    delete_exchange(&ch, &main).await;
    delete_exchange(&ch, &ae).await;
    close(conn).await;
}

/// RabbitMQ: 403 "ACCESS_REFUSED - cannot publish to internal exchange '<x>' in vhost '/'";
/// an internal exchange still routes what reaches it through an exchange-to-exchange binding.
#[tokio::test]
async fn internal_exchange_refuses_direct_publish() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let internal = unique("internal");
    within(
        "declare internal",
        declare_exchange_with(
            &ch,
            &internal,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                internal: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare internal");
    let front = unique("front");
    declare_exchange(&ch, &front, ExchangeKind::Fanout).await;
    let queue = unique("behind-internal");
    exclusive_queue(&ch, &queue).await;
    bind(&ch, &queue, &internal, "", FieldTable::default()).await;
    within(
        "exchange.bind",
        ch.exchange_bind(
            internal.as_str().into(),
            front.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind");
    publish(&ch, &front, "", b"via front").await;
    assert_eq!(drain(&ch, &queue).await, ["via front"]);

    let pch = channel(&conn).await;
    let got = async_channel_error(&conn, publish(&pch, &internal, "", b"direct")).await;
    assert_eq!(
        got,
        (
            403,
            format!(
                "ACCESS_REFUSED - cannot publish to internal exchange '{internal}' in vhost '/'"
            )
        )
    );
    let ch = channel(&conn).await;
    assert!(drain(&ch, &queue).await.is_empty());
    delete_exchange(&ch, &front).await;
    delete_exchange(&ch, &internal).await;
    close(conn).await;
}

/// RabbitMQ: 406 "PRECONDITION_FAILED - exchange '<x>' in vhost '/' in use".
#[tokio::test]
async fn exchange_delete_if_unused_and_queue_unbind() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let exchange = unique("del-x");
    declare_exchange(&ch, &exchange, ExchangeKind::Direct).await;
    let queue = unique("unbind-q");
    exclusive_queue(&ch, &queue).await;
    bind(&ch, &queue, &exchange, "k", FieldTable::default()).await;
    publish(&ch, &exchange, "k", b"bound").await;
    assert_eq!(drain(&ch, &queue).await, ["bound"]);

    let got = channel_error(
        "delete if-unused",
        ch.exchange_delete(
            exchange.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..ExchangeDeleteOptions::default()
            },
        ),
    )
    .await;
    assert_eq!(
        got,
        (
            406,
            format!("PRECONDITION_FAILED - exchange '{exchange}' in vhost '/' in use")
        )
    );

    let ch = channel(&conn).await;
    within(
        "queue.unbind",
        ch.queue_unbind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    publish(&ch, &exchange, "k", b"unbound").await;
    assert!(drain(&ch, &queue).await.is_empty());
    within(
        "delete if-unused",
        ch.exchange_delete(
            exchange.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..ExchangeDeleteOptions::default()
            },
        ),
    )
    .await
    .expect("unused now");
    close(conn).await;
}

/// x-match all-with-x / any-with-x also compare the `x-` headers (RabbitMQ 3.10+); plain
/// all/any ignore them.
#[tokio::test]
async fn headers_exchange_with_x_variants() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let exchange = unique("hx-x");
    declare_exchange(&ch, &exchange, ExchangeKind::Headers).await;
    let mut queues = Vec::new();
    for mode in ["all", "any", "all-with-x", "any-with-x"] {
        let q = unique(mode);
        exclusive_queue(&ch, &q).await;
        bind(
            &ch,
            &q,
            &exchange,
            "",
            table(&[
                ("x-match", s(mode)),
                ("x-tenant", s("t1")),
                ("kind", s("a")),
            ]),
        )
        .await;
        queues.push(q);
    }
    let cases: [(&str, FieldTable); 3] = [
        ("kind-only", table(&[("kind", s("a"))])),
        ("tenant-only", table(&[("x-tenant", s("t1"))])),
        ("both", table(&[("kind", s("a")), ("x-tenant", s("t1"))])),
    ];
    for (body, headers) in cases {
        publish_with(
            &ch,
            &exchange,
            "",
            body.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
    }
    let mut got = Vec::new();
    for q in &queues {
        got.push(drain(&ch, q).await);
    }
    assert_eq!(
        got,
        vec![
            vec!["kind-only", "both"],
            vec!["kind-only", "both"],
            vec!["both"],
            vec!["kind-only", "tenant-only", "both"],
        ]
    );
    delete_exchange(&ch, &exchange).await;
    close(conn).await;
}

/// basic.qos with global=true limits all consumers of the channel together.
#[tokio::test]
async fn global_qos_is_shared_by_the_channel() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let (q1, q2) = (unique("gq1"), unique("gq2"));
    exclusive_queue(&ch, &q1).await;
    exclusive_queue(&ch, &q2).await;
    for i in 0..4 {
        publish(&ch, "", &q1, format!("a{i}").as_bytes()).await;
        publish(&ch, "", &q2, format!("b{i}").as_bytes()).await;
    }
    within(
        "basic.qos global",
        ch.basic_qos(3, BasicQosOptions { global: true }),
    )
    .await
    .expect("qos");
    let mut c1 = consume(&ch, &q1, false).await;
    let mut c2 = consume(&ch, &q2, false).await;
    // c1 subscribes first and takes the whole shared window of 3.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut c1).await);
    }
    assert_no_delivery(&mut c2).await;
    assert_no_delivery(&mut c1).await;
    within("ack one", held[0].ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    // Exactly one more delivery, to either consumer.
    let extra = tokio::select! {
        d = c1.next() => d,
        d = c2.next() => d,
        _ = tokio::time::sleep(common::STEP) => None,
    };
    assert!(extra.is_some(), "one slot was freed");
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
    close(conn).await;
}

#[tokio::test]
async fn nack_multiple_requeues_all_up_to_tag() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ch = channel(&conn).await;
    let queue = unique("nack-multi");
    exclusive_queue(&ch, &queue).await;
    for body in ["a", "b", "c"] {
        publish(&ch, "", &queue, body.as_bytes()).await;
    }
    let _a = get(&ch, &queue, false).await.expect("a");
    let b = get(&ch, &queue, false).await.expect("b");
    nack(&ch, b.delivery.delivery_tag, true, true).await;
    let mut seen = Vec::new();
    while let Some(m) = get(&ch, &queue, true).await {
        seen.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("a".to_string(), true),
            ("b".to_string(), true),
            ("c".to_string(), false)
        ]
    );
    close(conn).await;
}
