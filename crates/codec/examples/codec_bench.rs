//! Throughput micro-benchmark of the hot path (a program, not a test).
//!
//! `cargo run --release -p rill-codec --example codec_bench`
//!
//! Prints ns per publish decode (split the method, header and body frames, decode
//! basic.publish and the content header, read delivery-mode) and per deliver encode
//! (basic.deliver + header + body into a reused buffer), each next to amq-protocol
//! doing the same work.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::basic;
use bytes::BytesMut;
use rill_codec::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;
const ROUNDS: usize = 2000;
const FRAME_MAX: u32 = 131072;
const BODY: &[u8; 16] = b"0123456789abcdef";

fn main() {
    let props = encode_properties(&BasicProperties::default().with_delivery_mode(1));

    // A batch of publishes as a client sends them.
    let mut template = BytesMut::new();
    for _ in 0..BATCH {
        encode_publish(&mut template, 1, "", "bench-queue", false, false);
        encode_content(&mut template, 1, &props, BODY, FRAME_MAX);
    }
    let template = template.freeze();

    // ---- publish decode, ours
    let mut elapsed = Duration::ZERO;
    let mut checksum = 0u64;
    for _ in 0..ROUNDS {
        let mut buf = BytesMut::from(&template[..]);
        let start = Instant::now();
        while let Ok(Some(frame)) = split_frame(&mut buf, FRAME_MAX) {
            match frame.kind {
                FRAME_METHOD => {
                    if let Ok(Method::Publish(p)) = decode_method(&frame.payload) {
                        checksum += p.routing_key.len() as u64;
                    }
                }
                FRAME_HEADER => {
                    if let Ok(h) = decode_content_header(frame.payload) {
                        let mode = PropertiesView::new(&h.properties)
                            .ok()
                            .and_then(|v| v.delivery_mode());
                        checksum += h.body_size + u64::from(mode.unwrap_or(0));
                    }
                }
                _ => checksum += frame.payload.len() as u64,
            }
        }
        elapsed += start.elapsed();
    }
    black_box(checksum);
    let ours_decode = per_msg(elapsed);

    // ---- publish decode, amq-protocol
    let start = Instant::now();
    for _ in 0..ROUNDS / 10 {
        let mut rest = &template[..];
        while let Ok((r, f)) = parse_frame(rest) {
            black_box(f);
            rest = r;
        }
    }
    let theirs_decode = per_msg(start.elapsed() * 10);

    // ---- deliver encode, ours
    let mut out = BytesMut::with_capacity(BATCH * 128);
    let start = Instant::now();
    for round in 0..ROUNDS {
        out.clear();
        for i in 0..BATCH {
            let tag = (round * BATCH + i) as u64;
            encode_deliver(
                &mut out,
                1,
                "amq.ctag-bench",
                tag,
                false,
                "",
                "bench-queue",
                &props,
                BODY,
                FRAME_MAX,
            );
        }
        black_box(&out);
    }
    let ours_encode = per_msg(start.elapsed());

    // ---- deliver encode, amq-protocol
    let decoded = decode_properties(&props).unwrap_or_default();
    let start = Instant::now();
    for round in 0..ROUNDS / 10 {
        let mut v: Vec<u8> = Vec::with_capacity(BATCH * 128);
        for i in 0..BATCH {
            let frames = [
                AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: ShortString::from("amq.ctag-bench"),
                        delivery_tag: (round * BATCH + i) as u64,
                        redelivered: false,
                        exchange: ShortString::default(),
                        routing_key: ShortString::from("bench-queue"),
                    })),
                ),
                AMQPFrame::Header(
                    1,
                    AMQPContentHeader {
                        class_id: 60,
                        body_size: 16,
                        properties: decoded.clone(),
                    },
                ),
                AMQPFrame::Body(1, BODY.to_vec()),
            ];
            for f in &frames {
                if let Ok(ctx) = gen_frame(f)(WriteContext::from(std::mem::take(&mut v))) {
                    v = ctx.into_inner().0;
                }
            }
        }
        black_box(&v);
    }
    let theirs_encode = per_msg(start.elapsed() * 10);

    // ---- frame splitting alone
    let mut elapsed = Duration::ZERO;
    let mut frames = 0u64;
    for _ in 0..ROUNDS {
        let mut buf = BytesMut::from(&template[..]);
        let start = Instant::now();
        while let Ok(Some(f)) = split_frame(&mut buf, FRAME_MAX) {
            frames += 1;
            black_box(f);
        }
        elapsed += start.elapsed();
    }
    let split_rate = frames as f64 / elapsed.as_secs_f64() / 1e6;

    println!("publish decode (3 frames, 16 B body): rill-codec {ours_decode:7.1} ns/msg   amq-protocol {theirs_decode:7.1} ns/msg");
    println!("deliver encode (3 frames, 16 B body): rill-codec {ours_encode:7.1} ns/msg   amq-protocol {theirs_encode:7.1} ns/msg");
    println!("split_frame alone: {split_rate:.0} M frames/s");
}

fn per_msg(d: Duration) -> f64 {
    d.as_nanos() as f64 / (ROUNDS * BATCH) as f64
}
