//! Byte-level checks a client library would hide: the content header a consumer receives is
//! the publisher's, octet for octet (RabbitMQ forwards the encoded properties untouched — key
//! order, every field type, the property flags), and large bodies come back split into body
//! frames that respect frame_max.

mod common;

use common::raw::*;
use common::{unique, Broker};

/// Encoded entries of a headers table in deliberately unsorted key order, one per field type
/// RabbitMQ accepts (type letters as RabbitMQ uses them).
fn every_field_type() -> Vec<u8> {
    let entry = |name: &str, ty: u8, value: &[u8]| -> Vec<u8> {
        Args::new().short_str(name).u8(ty).bytes(value).0
    };
    let nested = [
        entry("z-last", b'S', &Args::new().long_str(b"deep").0),
        entry("a-first", b'I', &(-7i32).to_be_bytes()),
    ]
    .concat();
    let array = [
        vec![b'I'],
        1i32.to_be_bytes().to_vec(),
        vec![b'S'],
        Args::new().long_str(b"two").0,
        vec![b'V'],
        vec![b'F'],
        Args::new().long_str(&nested).0,
    ]
    .concat();
    [
        entry("zz-bool", b't', &[1]),
        entry("i8", b'b', &[0xF8]),
        entry("u8", b'B', &[200]),
        entry("i16", b's', &(-300i16).to_be_bytes()),
        entry("u16", b'u', &60000u16.to_be_bytes()),
        entry("i32", b'I', &(-70000i32).to_be_bytes()),
        entry("u32", b'i', &4_000_000_000u32.to_be_bytes()),
        entry("i64", b'l', &(-9_000_000_000_000i64).to_be_bytes()),
        entry("f32", b'f', &1.5f32.to_be_bytes()),
        entry("f64", b'd', &(-2.25f64).to_be_bytes()),
        entry("decimal", b'D', &[2, 0, 0, 0x30, 0x39]),
        entry(
            "longstr",
            b'S',
            &Args::new().long_str(b"\x00\xff\xce bin").0,
        ),
        entry("array", b'A', &Args::new().long_str(&array).0),
        entry("timestamp", b'T', &1_700_000_000u64.to_be_bytes()),
        entry("table", b'F', &Args::new().long_str(&nested).0),
        entry("bytes", b'x', &Args::new().long_str(&[1, 2, 3, 0]).0),
        entry("void", b'V', &[]),
        entry("a-bool", b't', &[0]),
    ]
    .concat()
}

/// All 14 basic properties: flags 0xFFFC, then each value in flag order.
fn all_properties() -> Vec<u8> {
    Args::new()
        .u16(0xFFFC)
        .short_str("application/json") // content-type
        .short_str("gzip") // content-encoding
        .table(&every_field_type()) // headers
        .u8(2) // delivery-mode
        .u8(7) // priority
        .short_str("corr-1") // correlation-id
        .short_str("reply-queue") // reply-to
        .short_str("600000") // expiration
        .short_str("msg-1") // message-id
        .u64(1_700_000_123) // timestamp
        .short_str("event.created") // type
        .short_str("guest") // user-id
        .short_str("rill-tests") // app-id
        .short_str("cluster-a") // cluster-id
        .0
}

/// Publishes `properties` + `body` on channel 1 (body split into `chunk`-sized frames), then
/// basic.get's it back on the same channel (so the get is ordered after the publish) and returns (content header payload, body frame sizes,
/// body).
fn publish_and_get(
    c: &mut RawClient,
    queue: &str,
    properties: &[u8],
    body_bytes: &[u8],
    chunk: usize,
) -> (Vec<u8>, Vec<usize>, Vec<u8>) {
    let mut out = basic_publish(1, "", queue, false);
    out.extend(content_header(1, body_bytes.len() as u64, properties));
    for part in body_bytes.chunks(chunk) {
        out.extend(body(1, part));
    }
    c.send(&out);
    c.send(&method(
        1,
        BASIC_GET,
        &Args::new().u16(0).short_str(queue).u8(1),
    ));
    let get_ok = c.expect_frame();
    assert_eq!(
        (get_ok.channel, get_ok.method_id()),
        (1, Some(BASIC_GET_OK)),
        "{get_ok:?}"
    );
    let header = c.expect_frame();
    assert_eq!((header.kind, header.channel), (FRAME_HEADER, 1));
    let mut r = Reader(&header.payload);
    assert_eq!((r.u16(), r.u16()), (60, 0), "class, weight");
    let size = r.u64() as usize;
    assert_eq!(size, body_bytes.len());
    let props = r.rest().to_vec();
    let mut sizes = Vec::new();
    let mut got = Vec::new();
    while got.len() < size {
        let f = c.expect_frame();
        assert_eq!(
            (f.kind, f.channel),
            (FRAME_BODY, 1),
            "expected a body frame"
        );
        sizes.push(f.payload.len());
        got.extend_from_slice(&f.payload);
    }
    (props, sizes, got)
}

fn open_with_queue(broker: &Broker) -> (RawClient, String) {
    let mut c = RawClient::open(broker.addr());
    c.open_channel();
    let queue = unique("wire");
    // exclusive queue
    c.send(&method(
        1,
        QUEUE_DECLARE,
        &Args::new().u16(0).short_str(&queue).u8(4).table(&[]),
    ));
    assert_eq!(c.expect_frame().method_id(), Some(QUEUE_DECLARE_OK));
    (c, queue)
}

#[test]
fn content_header_is_forwarded_byte_exact() {
    let broker = Broker::start();
    let (mut c, queue) = open_with_queue(&broker);
    let properties = all_properties();
    let (props, _, got) = publish_and_get(&mut c, &queue, &properties, b"{}", 1000);
    assert_eq!(props, properties, "properties were re-encoded");
    assert_eq!(got, b"{}");

    // No properties at all: flags 0.
    let (props, sizes, got) = publish_and_get(&mut c, &queue, &[0, 0], b"", 1000);
    assert_eq!(props, [0, 0]);
    assert!(sizes.is_empty(), "an empty body has no body frames");
    assert!(got.is_empty());
    c.close();
}

/// A 300 KB body published in 1000-octet frames comes back in frames of at most
/// frame_max - 8 octets (RabbitMQ: 131064-octet frames), reassembling to the same bytes.
#[test]
fn body_is_resplit_by_frame_max() {
    let broker = Broker::start();
    let (mut c, queue) = open_with_queue(&broker);
    let body_bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (_, sizes, got) = publish_and_get(&mut c, &queue, &[0, 0], &body_bytes, 1000);
    assert!(got == body_bytes, "body corrupted");
    let limit = FRAME_MAX as usize - 8;
    assert!(sizes.iter().all(|&n| n > 0 && n <= limit), "{sizes:?}");
    c.close();
}
