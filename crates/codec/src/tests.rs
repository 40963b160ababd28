//! Cross-module tests: every hand-written codec against amq-protocol in both
//! directions, hostile input (truncation at every length, arbitrary bytes, deep
//! nesting, oversize short strings), and byte-exact property pass-through.

use crate::*;
use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, tx};
use amq_protocol::types::{ByteArray, DecimalValue};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

const FRAME_MAX: u32 = 131072;

fn amq_gen(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .expect("amq-protocol generates")
        .into_inner()
        .0
}

/// Parses every frame in `bytes` with amq-protocol.
fn amq_parse_all(mut bytes: &[u8]) -> Vec<AMQPFrame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (rest, f) = parse_frame(bytes).expect("amq-protocol parses our output");
        frames.push(f);
        bytes = rest;
    }
    frames
}

/// Cuts every frame in `bytes` with our splitter.
fn split_all(bytes: &[u8], frame_max: u32) -> Vec<RawFrame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = split_frame(&mut buf, frame_max).expect("valid frames") {
        frames.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes");
    frames
}

fn decode_one(bytes: &[u8]) -> Method {
    let frames = split_all(bytes, FRAME_MAX);
    assert_eq!(frames.len(), 1);
    decode_method(&frames[0].payload).expect("decodes")
}

fn publish(exchange: &str, routing_key: &str, mandatory: bool, immediate: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: ShortString::try_new(exchange).unwrap(),
        routing_key: ShortString::try_new(routing_key).unwrap(),
        mandatory,
        immediate,
    }))
}

/// Every field type amq-protocol supports, nested in tables and arrays.
fn every_field_type() -> FieldTable {
    let mut inner = FieldTable::default();
    inner.insert("deep".into(), AMQPValue::LongString("down".into()));
    inner.insert("n".into(), AMQPValue::LongLongInt(-1));
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::FieldTable(inner.clone()));
    nested.insert(
        "arr".into(),
        AMQPValue::FieldArray(
            vec![
                AMQPValue::FieldTable(inner),
                AMQPValue::Void,
                AMQPValue::Boolean(false),
            ]
            .into(),
        ),
    );
    let mut t = FieldTable::default();
    let entries: Vec<(&str, AMQPValue)> = vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-1600)),
        ("u16", AMQPValue::ShortUInt(60000)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25e100)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        (
            "longstr",
            AMQPValue::LongString(LongString::from(vec![0u8, 0xff, b'a'])),
        ),
        (
            "array",
            AMQPValue::FieldArray(
                vec![
                    AMQPValue::LongInt(1),
                    AMQPValue::LongString("two".into()),
                    AMQPValue::FieldArray(vec![AMQPValue::Double(3.0)].into()),
                ]
                .into(),
            ),
        ),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
        ),
        ("void", AMQPValue::Void),
        ("x-death-like", AMQPValue::FieldArray(FieldArray::default())),
    ];
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(every_field_type())
        .with_delivery_mode(2)
        .with_priority(9)
        .with_correlation_id("corr-1".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_expiration("60000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("rill-test".into())
        .with_cluster_id("cluster".into())
}

// ---------------------------------------------------------------- hot method decode

#[test]
fn publish_generated_by_amq_protocol_decodes() {
    let long = "r".repeat(255);
    for (ex, rk, m, i) in [
        ("", "hello", false, false),
        ("amq.topic", "a.b.c", true, false),
        ("x", "", false, true),
        ("ex", long.as_str(), true, true),
        ("ünïcødé", "ключ", true, false),
    ] {
        let bytes = amq_gen(&AMQPFrame::Method(5, publish(ex, rk, m, i)));
        match decode_one(&bytes) {
            Method::Publish(p) => {
                assert_eq!(p.exchange_str().unwrap(), ex);
                assert_eq!(p.routing_key_str().unwrap(), rk);
                assert_eq!((p.mandatory, p.immediate), (m, i));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn publish_names_are_zero_copy_slices() {
    let bytes = amq_gen(&AMQPFrame::Method(1, publish("ex", "key", false, false)));
    let frame = split_all(&bytes, FRAME_MAX).remove(0);
    let Method::Publish(p) = decode_method(&frame.payload).unwrap() else {
        panic!()
    };
    let base = frame.payload.as_ptr() as usize;
    let ex = p.exchange.as_ptr() as usize;
    assert!(ex > base && ex < base + frame.payload.len());
}

#[test]
fn publish_encoded_by_us_parses_in_amq_protocol() {
    let mut out = BytesMut::new();
    encode_publish(&mut out, 3, "amq.direct", "rk", true, false);
    assert_eq!(
        amq_parse_all(&out),
        vec![AMQPFrame::Method(
            3,
            publish("amq.direct", "rk", true, false)
        )]
    );
}

#[test]
fn publish_with_invalid_utf8_name_is_a_syntax_error() {
    let payload = Bytes::from_static(&[0, 60, 0, 40, 0, 0, 1, 0xff, 1, b'k', 0]);
    let Method::Publish(p) = decode_method(&payload).unwrap() else {
        panic!()
    };
    let err = p.exchange_str().unwrap_err();
    assert_eq!(err.code, ReplyCode::FrameError);
    assert_eq!((err.class_id, err.method_id), (60, 40));
    assert_eq!(p.routing_key_str().unwrap(), "k");
}

#[test]
fn ack_nack_reject_both_directions() {
    for tag in [0u64, 1, 42, u64::MAX] {
        for multiple in [false, true] {
            for requeue in [false, true] {
                // amq-protocol → ours
                let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag,
                    multiple,
                }));
                match decode_one(&amq_gen(&AMQPFrame::Method(9, ack.clone()))) {
                    Method::Ack {
                        delivery_tag,
                        multiple: m,
                    } => assert_eq!((delivery_tag, m), (tag, multiple)),
                    other => panic!("{other:?}"),
                }
                let nack = AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: tag,
                    multiple,
                    requeue,
                }));
                match decode_one(&amq_gen(&AMQPFrame::Method(9, nack.clone()))) {
                    Method::Nack {
                        delivery_tag,
                        multiple: m,
                        requeue: r,
                    } => {
                        assert_eq!((delivery_tag, m, r), (tag, multiple, requeue))
                    }
                    other => panic!("{other:?}"),
                }
                let reject = AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                    delivery_tag: tag,
                    requeue,
                }));
                match decode_one(&amq_gen(&AMQPFrame::Method(9, reject.clone()))) {
                    Method::Reject {
                        delivery_tag,
                        requeue: r,
                    } => assert_eq!((delivery_tag, r), (tag, requeue)),
                    other => panic!("{other:?}"),
                }
                // ours → amq-protocol, and byte-identical to amq-protocol's output
                let mut out = BytesMut::new();
                encode_basic_ack(&mut out, 9, tag, multiple);
                assert_eq!(&out[..], &amq_gen(&AMQPFrame::Method(9, ack))[..]);
                let mut out = BytesMut::new();
                encode_basic_nack(&mut out, 9, tag, multiple, requeue);
                assert_eq!(&out[..], &amq_gen(&AMQPFrame::Method(9, nack))[..]);
                let mut out = BytesMut::new();
                encode_basic_reject(&mut out, 9, tag, requeue);
                assert_eq!(&out[..], &amq_gen(&AMQPFrame::Method(9, reject))[..]);
            }
        }
    }
}

// ---------------------------------------------------------------- control plane

fn control_methods() -> Vec<AMQPClass> {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(1000));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("dlx".into()),
    );
    vec![
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: every_field_type(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: args.clone(),
            mechanism: "PLAIN".into(),
            response: "\0guest\0guest".into(),
            locale: "en_US".into(),
        })),
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
        })),
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED - shutdown".into(),
            class_id: 0,
            method_id: 0,
        })),
        AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
            connection::UpdateSecret {
                new_secret: "s".into(),
                reason: "r".into(),
            },
        )),
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 404,
            reply_text: "NOT_FOUND".into(),
            class_id: 50,
            method_id: 10,
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "logs".into(),
            kind: "fanout".into(),
            durable: true,
            arguments: args.clone(),
            ..Default::default()
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "d".into(),
            source: "s".into(),
            routing_key: "k".into(),
            nowait: false,
            arguments: args.clone(),
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
            destination: "d".into(),
            source: "s".into(),
            routing_key: "k".into(),
            nowait: true,
            arguments: args.clone(),
        })),
        AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: "logs".into(),
            if_unused: true,
            nowait: false,
        })),
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "hello".into(),
            exclusive: true,
            auto_delete: true,
            arguments: args.clone(),
            ..Default::default()
        })),
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: "q".into(),
            exchange: "amq.topic".into(),
            routing_key: "a.#".into(),
            nowait: false,
            arguments: args.clone(),
        })),
        AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: "q".into(),
            exchange: "amq.topic".into(),
            routing_key: "a.#".into(),
            arguments: args.clone(),
        })),
        AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: "q".into(),
            nowait: false,
        })),
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "q".into(),
            if_unused: true,
            if_empty: true,
            nowait: false,
        })),
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: true,
        })),
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            consumer_tag: "ctag".into(),
            no_ack: true,
            exclusive: true,
            arguments: args,
            ..Default::default()
        })),
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "ctag".into(),
            nowait: false,
        })),
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "q".into(),
            no_ack: false,
        })),
        AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
        AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    ]
}

#[test]
fn control_methods_round_trip_through_amq_protocol() {
    for method in control_methods() {
        // ours encodes exactly what amq-protocol encodes
        let mut out = BytesMut::new();
        encode_method(&mut out, 7, &method);
        let theirs = amq_gen(&AMQPFrame::Method(7, method.clone()));
        assert_eq!(&out[..], &theirs[..], "{method:?}");
        // and decodes it back
        match (decode_one(&theirs), &method) {
            (Method::Other(m), _) => assert_eq!(m, method),
            (
                Method::Qos {
                    prefetch_size,
                    prefetch_count,
                    global,
                },
                AMQPClass::Basic(basic::AMQPMethod::Qos(q)),
            ) => assert_eq!(
                (prefetch_size, prefetch_count, global),
                (0, q.prefetch_count, q.global)
            ),
            (other, _) => panic!("{other:?}"),
        }
    }
}

#[test]
fn qos_keeps_prefetch_size() {
    // class 60, method 10, prefetch_size 10, prefetch_count 3, global
    let payload = Bytes::from_static(&[0, 60, 0, 10, 0, 0, 0, 10, 0, 3, 1]);
    match decode_method(&payload).unwrap() {
        Method::Qos {
            prefetch_size,
            prefetch_count,
            global,
        } => assert_eq!((prefetch_size, prefetch_count, global), (10, 3, true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_methods_fail_with_syntax_error_at_every_length() {
    let mut all = control_methods();
    all.push(publish("ex", "rk", true, false));
    all.push(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: 1,
        multiple: true,
    })));
    all.push(AMQPClass::Basic(basic::AMQPMethod::Nack(
        basic::Nack::default(),
    )));
    all.push(AMQPClass::Basic(basic::AMQPMethod::Reject(
        basic::Reject::default(),
    )));
    for method in all {
        let bytes = amq_gen(&AMQPFrame::Method(1, method.clone()));
        let payload = Bytes::copy_from_slice(&bytes[7..bytes.len() - 1]);
        assert!(decode_method(&payload).is_ok());
        for len in 0..payload.len() {
            let err = decode_method(&payload.slice(..len)).expect_err("truncated must fail");
            assert_eq!(err.code, ReplyCode::FrameError, "{method:?} at {len}");
            if len >= 4 {
                assert_eq!(
                    (err.class_id, err.method_id),
                    (method.get_amqp_class_id(), method.get_amqp_method_id())
                );
            }
        }
        // and one byte too many
        let mut long = payload.to_vec();
        long.push(0);
        let err = decode_method(&Bytes::from(long)).expect_err("trailing byte must fail");
        assert_eq!(err.code, ReplyCode::FrameError, "{method:?}");
    }
}

#[test]
fn unknown_class_or_method_is_not_implemented() {
    for (class, method) in [
        (60u16, 41u16),
        (99, 10),
        (0, 0),
        (10, 12),
        (40, 41),
        (85, 12),
    ] {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&method.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0]);
        let err = decode_method(&Bytes::from(p)).unwrap_err();
        assert_eq!(err.code, ReplyCode::NotImplemented);
        assert_eq!((err.class_id, err.method_id), (class, method));
        assert!(err.is_hard());
    }
}

fn nested_tables(depth: usize) -> Vec<u8> {
    // a table body: key "" → 'F' → the next table, `depth` levels down
    let mut body: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut outer = vec![0u8, b'F'];
        outer.extend_from_slice(&(body.len() as u32).to_be_bytes());
        outer.extend_from_slice(&body);
        body = outer;
    }
    let mut table = (body.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&body);
    table
}

#[test]
fn deeply_nested_arguments_are_rejected_without_overflowing_the_stack() {
    // queue.declare: ticket, queue "q", bits, arguments
    let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    p.extend(nested_tables(20_000));
    let err = decode_method(&Bytes::from(p)).unwrap_err();
    assert_eq!(err.code, ReplyCode::FrameError);
    assert_eq!((err.class_id, err.method_id), (50, 10));
    // within the bound it decodes
    let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    p.extend(nested_tables(MAX_TABLE_DEPTH - 1));
    assert!(decode_method(&Bytes::from(p)).is_ok());

    let mut props = vec![0b0010_0000, 0];
    props.extend(nested_tables(20_000));
    assert_eq!(
        decode_properties(&props).unwrap_err().code,
        ReplyCode::FrameError
    );
    let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    header.extend(props);
    assert!(decode_content_header(Bytes::from(header)).is_err());
}

// ---------------------------------------------------------------- content

/// The frames `encode_deliver` and friends produced, parsed by amq-protocol:
/// (method, header, concatenated body, number of body frames).
fn parse_delivery(bytes: &[u8]) -> (AMQPClass, AMQPContentHeader, Vec<u8>, usize) {
    let mut frames = amq_parse_all(bytes).into_iter();
    let Some(AMQPFrame::Method(_, method)) = frames.next() else {
        panic!("no method frame")
    };
    let Some(AMQPFrame::Header(_, header)) = frames.next() else {
        panic!("no header frame")
    };
    let mut body = Vec::new();
    let mut n = 0;
    for f in frames {
        let AMQPFrame::Body(_, chunk) = f else {
            panic!("not a body frame: {f:?}")
        };
        body.extend(chunk);
        n += 1;
    }
    (method, header, body, n)
}

#[test]
fn all_properties_pass_through_byte_exact() {
    let props = all_properties();
    let body = b"{\"id\": 1}".to_vec();
    // a publisher's header frame, as amq-protocol (lapin) writes it
    let header_frame = amq_gen(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: props.clone(),
        },
    ));
    let raw = split_all(&header_frame, FRAME_MAX).remove(0);
    assert_eq!(raw.kind, FRAME_HEADER);
    let header = decode_content_header(raw.payload.clone()).unwrap();
    assert_eq!((header.class_id, header.body_size), (60, body.len() as u64));

    // full decode gives back every property
    assert_eq!(decode_properties(&header.properties).unwrap(), props);
    assert_eq!(&encode_properties(&props)[..], &header.properties[..]);

    // the view reads single properties without decoding
    let view = header.view().unwrap();
    assert_eq!(view.delivery_mode(), Some(2));
    assert_eq!(view.priority(), Some(9));
    assert_eq!(view.expiration(), Some("60000"));
    assert_eq!(view.user_id(), Some(&b"guest"[..]));
    assert!(view.has_headers());
    assert_eq!(view.headers().unwrap(), Some(every_field_type()));
    assert_eq!(view.content_type(), Some("application/json"));
    assert_eq!(view.correlation_id(), Some("corr-1"));
    assert_eq!(view.reply_to(), Some("amq.rabbitmq.reply-to"));
    assert_eq!(view.message_id(), Some("msg-1"));
    assert_eq!(view.timestamp(), Some(1_700_000_123));
    assert_eq!(view.kind(), Some("order.created"));
    assert_eq!(view.app_id(), Some("rill-test"));

    // the deliver carries the publisher's header frame byte for byte (channel aside)
    let mut out = BytesMut::new();
    encode_deliver(
        &mut out,
        1,
        "ctag",
        7,
        true,
        "ex",
        "rk",
        &header.properties,
        &body,
        FRAME_MAX,
    );
    let frames = split_all(&out, FRAME_MAX);
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1].payload, raw.payload);
    assert_eq!(
        &out[frames_len(&frames[..1])..frames_len(&frames[..2])],
        &header_frame[..]
    );

    let (method, h, b, _) = parse_delivery(&out);
    assert_eq!(
        method,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag".into(),
            delivery_tag: 7,
            redelivered: true,
            exchange: "ex".into(),
            routing_key: "rk".into(),
        }))
    );
    assert_eq!(h.properties, props);
    assert_eq!(b, body);
}

fn frames_len(frames: &[RawFrame]) -> usize {
    frames
        .iter()
        .map(|f| f.payload.len() + FRAME_OVERHEAD)
        .sum()
}

#[test]
fn non_canonical_properties_pass_through_unchanged() {
    // headers amq-protocol would rewrite: keys out of order, a duplicate key, 'U' and 'L'
    // tags (it writes 's' and 'l'). We must hand them to consumers exactly as sent.
    let mut table = Vec::new();
    for (k, v) in [
        (&b"zz"[..], &b"U\x00\x07"[..]),
        (b"aa", b"L\x00\x00\x00\x00\x00\x00\x00\x01"),
        (b"zz", b"t\x01"),
    ] {
        table.push(k.len() as u8);
        table.extend_from_slice(k);
        table.extend_from_slice(v);
    }
    let mut props = vec![0b0011_0000, 0]; // headers + delivery-mode
    props.extend((table.len() as u32).to_be_bytes());
    props.extend(&table);
    props.push(1); // delivery-mode 1
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    payload.extend(&props);
    let header = decode_content_header(Bytes::from(payload)).unwrap();
    assert_eq!(&header.properties[..], &props[..]);
    let mut out = BytesMut::new();
    encode_deliver(
        &mut out,
        2,
        "c",
        1,
        false,
        "",
        "q",
        &header.properties,
        b"abc",
        FRAME_MAX,
    );
    let frames = split_all(&out, FRAME_MAX);
    assert_eq!(&frames[1].payload[12..], &props[..]);
    // amq-protocol still reads it (normalised)
    let decoded = decode_properties(&props).unwrap();
    assert_eq!(decoded.delivery_mode(), &Some(1));
    assert_eq!(decoded.headers().as_ref().map(|h| h.inner().len()), Some(2));
}

#[test]
fn get_ok_and_return_parse_in_amq_protocol() {
    let props = encode_properties(&BasicProperties::default().with_delivery_mode(1));
    let mut out = BytesMut::new();
    encode_get_ok(
        &mut out,
        4,
        99,
        false,
        "amq.direct",
        "k",
        12,
        &props,
        b"body",
        FRAME_MAX,
    );
    let (method, h, b, n) = parse_delivery(&out);
    assert_eq!(
        method,
        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 99,
            redelivered: false,
            exchange: "amq.direct".into(),
            routing_key: "k".into(),
            message_count: 12,
        }))
    );
    assert_eq!(
        (h.class_id, h.body_size, h.properties.delivery_mode()),
        (60, 4, &Some(1))
    );
    assert_eq!((b.as_slice(), n), (&b"body"[..], 1));

    let mut out = BytesMut::new();
    encode_return(
        &mut out,
        4,
        312,
        "NO_ROUTE",
        "ex",
        "nowhere",
        &[],
        b"",
        FRAME_MAX,
    );
    let (method, h, b, n) = parse_delivery(&out);
    assert_eq!(
        method,
        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "ex".into(),
            routing_key: "nowhere".into(),
        }))
    );
    assert_eq!(
        (h.body_size, h.properties, b.len(), n),
        (0, BasicProperties::default(), 0, 0)
    );
}

#[test]
fn deliver_is_byte_identical_to_amq_protocol() {
    let props = all_properties();
    let raw = encode_properties(&props);
    let body = vec![7u8; 10_000];
    let mut ours = BytesMut::new();
    encode_deliver(
        &mut ours,
        3,
        "amq.ctag-1",
        5,
        false,
        "",
        "q",
        &raw,
        &body,
        4096,
    );
    let mut theirs = amq_gen(&AMQPFrame::Method(
        3,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "amq.ctag-1".into(),
            delivery_tag: 5,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
    ));
    theirs.extend(amq_gen(&AMQPFrame::Header(
        3,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: props,
        },
    )));
    for chunk in body.chunks(4096 - 8) {
        theirs.extend(amq_gen(&AMQPFrame::Body(3, chunk.to_vec())));
    }
    assert_eq!(&ours[..], &theirs[..]);
}

#[test]
fn body_is_split_at_frame_max_boundaries() {
    let fm = 4096u32;
    let chunk = fm as usize - FRAME_OVERHEAD;
    for len in [
        0,
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        2 * chunk,
        2 * chunk + 1,
        5 * chunk - 3,
    ] {
        let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        encode_content(&mut out, 1, &[0, 0], &body, fm);
        let frames = split_all(&out, fm); // every frame fits frame_max
        let bodies: Vec<_> = frames.iter().filter(|f| f.kind == FRAME_BODY).collect();
        assert_eq!(bodies.len(), len.div_ceil(chunk), "len {len}");
        assert!(bodies
            .iter()
            .rev()
            .skip(1)
            .all(|f| f.payload.len() == chunk));
        let joined: Vec<u8> = bodies
            .iter()
            .flat_map(|f| f.payload.iter().copied())
            .collect();
        assert_eq!(joined, body);
        assert_eq!(
            decode_content_header(frames[0].payload.clone())
                .unwrap()
                .body_size,
            len as u64
        );
    }
    // frame_max 0 = unlimited: one body frame
    let body = vec![1u8; 300_000];
    let mut out = BytesMut::new();
    encode_content(&mut out, 1, &[0, 0], &body, 0);
    let frames = split_all(&out, 0);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1].payload.len(), 300_000);
    // absurd frame_max values never loop forever or panic
    for fm in [1u32, 7, 8, 9] {
        let mut out = BytesMut::new();
        encode_content(&mut out, 1, &[0, 0], b"abc", fm);
        assert!(!out.is_empty());
    }
}

#[test]
fn oversize_short_strings_are_truncated_not_panicking() {
    let long = "é".repeat(200); // 400 bytes, 2-byte chars
    let mut out = BytesMut::new();
    encode_deliver(
        &mut out,
        1,
        &long,
        1,
        false,
        &long,
        &long,
        &[],
        b"x",
        FRAME_MAX,
    );
    encode_get_ok(&mut out, 1, 1, false, &long, &long, 0, &[], b"x", FRAME_MAX);
    encode_return(&mut out, 1, 312, &long, &long, &long, &[], b"x", FRAME_MAX);
    encode_publish(&mut out, 1, &long, &long, false, false);
    // amq-protocol parses all of it, and every name is a 254-byte valid prefix
    let frames = amq_parse_all(&out);
    let AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) = &frames[0] else {
        panic!()
    };
    assert_eq!(d.consumer_tag.as_str(), &long[..254]);
    assert_eq!(d.routing_key.as_str(), &long[..254]);
    let ascii = "a".repeat(1000);
    assert_eq!(short_string_truncated(&ascii).as_str().len(), 255);
    let e = AmqpError::new(ReplyCode::NotFound, format_args!("no queue '{ascii}'"));
    let mut out = BytesMut::new();
    encode_method(&mut out, 1, &e.to_close());
    assert_eq!(amq_parse_all(&out).len(), 1);
}

#[test]
fn bad_content_headers_are_syntax_errors() {
    let ok = [0u8, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert!(decode_content_header(Bytes::copy_from_slice(&ok)).is_ok());
    for len in 0..ok.len() {
        let err = decode_content_header(Bytes::copy_from_slice(&ok[..len])).unwrap_err();
        assert_eq!(err.code, ReplyCode::FrameError);
    }
    // trailing garbage, continuation bit, truncated property, non-UTF-8 short string
    for bad in [
        &[0u8, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 9][..],
        &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
        &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0, 5, b'a'],
        &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0, 1, 0xff],
    ] {
        assert_eq!(
            decode_content_header(Bytes::copy_from_slice(bad))
                .unwrap_err()
                .code,
            ReplyCode::FrameError
        );
    }
}

#[test]
fn truncated_properties_fail_at_every_length() {
    let raw = encode_properties(&all_properties());
    for len in 0..raw.len() {
        assert!(PropertiesView::new(&raw[..len]).is_err(), "len {len}");
        assert!(decode_properties(&raw[..len]).is_err(), "len {len}");
    }
}

// ---------------------------------------------------------------- arbitrary input

fn known_prefix() -> impl Strategy<Value = Vec<u8>> {
    let ids: Vec<(u16, u16)> = [
        (10, 10),
        (10, 11),
        (10, 31),
        (10, 40),
        (10, 50),
        (10, 70),
        (20, 10),
        (20, 40),
        (40, 10),
        (40, 30),
        (50, 10),
        (50, 20),
        (50, 50),
        (60, 10),
        (60, 20),
        (60, 40),
        (60, 80),
        (60, 90),
        (60, 120),
        (85, 10),
        (90, 10),
    ]
    .to_vec();
    (
        proptest::sample::select(ids),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|((c, m), rest)| {
            let mut v = c.to_be_bytes().to_vec();
            v.extend_from_slice(&m.to_be_bytes());
            v.extend(rest);
            v
        })
}

proptest! {
    #[test]
    fn decode_method_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_method(&Bytes::from(bytes));
    }

    #[test]
    fn decode_method_never_panics_on_known_ids(bytes in known_prefix()) {
        if let Err(e) = decode_method(&Bytes::from(bytes)) {
            prop_assert_eq!(e.code, ReplyCode::FrameError);
        }
    }

    #[test]
    fn content_and_properties_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(h) = decode_content_header(Bytes::from(bytes.clone())) {
            // anything the view accepts, a full decode accepts too
            prop_assert!(decode_properties(&h.properties).is_ok());
            let v = h.view().unwrap();
            let _ = (v.delivery_mode(), v.priority(), v.expiration(), v.user_id(), v.headers());
        }
        if let Ok(v) = PropertiesView::new(&bytes) {
            prop_assert!(decode_properties(&bytes).is_ok());
            let _ = (v.timestamp(), v.message_id(), v.has_headers());
        }
    }

    #[test]
    fn split_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), fm in any::<u32>()) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        match split_frame(&mut buf, fm) {
            Ok(Some(f)) => prop_assert_eq!(before - buf.len(), f.payload.len() + FRAME_OVERHEAD),
            Ok(None) | Err(_) => prop_assert_eq!(buf.len(), before),
        }
    }

    #[test]
    fn publish_round_trips(ex in "\\PC{0,100}", rk in "\\PC{0,100}", m: bool, i: bool) {
        let mut out = BytesMut::new();
        encode_publish(&mut out, 1, &ex, &rk, m, i);
        let frame = split_frame(&mut out, 0).unwrap().unwrap();
        let Method::Publish(p) = decode_method(&frame.payload).unwrap() else { panic!() };
        let (ex_t, rk_t) = (short_string_truncated(&ex), short_string_truncated(&rk));
        prop_assert_eq!(p.exchange_str().unwrap(), ex_t.as_str());
        prop_assert_eq!(p.routing_key_str().unwrap(), rk_t.as_str());
        prop_assert_eq!((p.mandatory, p.immediate), (m, i));
    }

    #[test]
    fn deliver_parses_in_amq_protocol(
        ctag in "\\PC{0,300}", tag: u64, redelivered: bool, rk in "\\PC{0,80}",
        body in proptest::collection::vec(any::<u8>(), 0..3000), fm in 4096u32..5000,
    ) {
        let props = encode_properties(&BasicProperties::default().with_priority(3));
        let mut out = BytesMut::new();
        encode_deliver(&mut out, 9, &ctag, tag, redelivered, "ex", &rk, &props, &body, fm);
        let (method, h, b, n) = parse_delivery(&out);
        let AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) = method else { panic!() };
        prop_assert_eq!(d.consumer_tag, short_string_truncated(&ctag));
        prop_assert_eq!((d.delivery_tag, d.redelivered), (tag, redelivered));
        prop_assert_eq!(h.properties.priority(), &Some(3));
        prop_assert_eq!(n, body.len().div_ceil(fm as usize - 8));
        prop_assert_eq!(b, body);
    }
}

// ---------------------------------------------------------------- header rewriting

/// `all_properties()` with only the properties whose bit (15 = content-type … 2 = cluster-id)
/// is set in `mask`.
fn properties_subset(mask: u16) -> BasicProperties {
    let all = all_properties();
    let on = |bit: u16| mask & (1 << bit) != 0;
    let mut p = BasicProperties::default();
    if on(15) {
        p = p.with_content_type(all.content_type().clone().unwrap());
    }
    if on(14) {
        p = p.with_content_encoding(all.content_encoding().clone().unwrap());
    }
    if on(13) {
        p = p.with_headers(all.headers().clone().unwrap());
    }
    if on(12) {
        p = p.with_delivery_mode(2);
    }
    if on(11) {
        p = p.with_priority(9);
    }
    if on(10) {
        p = p.with_correlation_id(all.correlation_id().clone().unwrap());
    }
    if on(9) {
        p = p.with_reply_to(all.reply_to().clone().unwrap());
    }
    if on(8) {
        p = p.with_expiration(all.expiration().clone().unwrap());
    }
    if on(7) {
        p = p.with_message_id(all.message_id().clone().unwrap());
    }
    if on(6) {
        p = p.with_timestamp(1_700_000_123);
    }
    if on(5) {
        p = p.with_type(all.kind().clone().unwrap());
    }
    if on(4) {
        p = p.with_user_id(all.user_id().clone().unwrap());
    }
    if on(3) {
        p = p.with_app_id(all.app_id().clone().unwrap());
    }
    if on(2) {
        p = p.with_cluster_id(all.cluster_id().clone().unwrap());
    }
    p
}

#[test]
fn replace_headers_keeps_every_other_property_in_every_combination() {
    // "a" = long 1, "b" = long string "x": in this order, which a BTreeMap would not keep.
    let body: &[u8] = b"\x01bS\x00\x00\x00\x01x\x01al\x00\x00\x00\x00\x00\x00\x00\x01";
    let new_headers = decode_field_table_body(body).unwrap();
    for mask in (0u16..1 << 14).map(|m| m << 2) {
        let props = properties_subset(mask);
        let raw = encode_properties(&props);
        for (headers, drop_expiration) in [
            (Some(body), false),
            (Some(body), true),
            (None, false),
            (None, true),
        ] {
            let out = replace_headers(&raw, headers, drop_expiration).unwrap();
            let mut expected =
                properties_subset(mask & !(1 << 13) & if drop_expiration { !(1 << 8) } else { !0 });
            if headers.is_some() {
                expected = expected.with_headers(new_headers.clone());
            }
            assert_eq!(
                decode_properties(&out).unwrap(),
                expected,
                "mask {mask:#06x}"
            );
            assert_eq!(PropertiesView::new(&out).unwrap().headers_raw(), headers);
        }
    }
}
