//! The typed session API that embedded stream jobs use, without sockets: open, declare,
//! publish with confirms, consume within a prefetch window, settle, get, close.

use bytes::Bytes;
use rill_broker::session::{Confirm, ConsumeOptions, Delivered, Inbox, Session};
use rill_broker::vhost::{ExchangeDeclare, QueueDeclare};
use rill_broker::{Broker, BrokerConfig, ConnEvent};
use rill_codec::{BasicProperties, FieldTable, ReplyCode};
use std::sync::Arc;
use std::time::Duration;

fn open(broker: &Broker) -> (Session, Arc<Inbox>) {
    let inbox = Arc::new(Inbox::default());
    let s = Session::open(broker, "/", "guest", "guest", inbox.clone()).expect("open session");
    (s, inbox)
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Takes the deliveries waiting in the inbox, tagged by the session.
fn delivered(s: &mut Session, inbox: &Inbox) -> Vec<Delivered> {
    inbox
        .take()
        .into_iter()
        .filter_map(|e| match e {
            ConnEvent::Deliver(d) => s.deliver(d),
            _ => None,
        })
        .collect()
}

fn bodies(ds: &[Delivered]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
        .collect()
}

fn publish_n(s: &mut Session, queue: &str, n: usize) {
    for i in 0..n {
        s.publish_to(
            "",
            queue,
            &BasicProperties::default(),
            Bytes::from(format!("m{i}")),
        )
        .expect("publish");
    }
}

#[test]
fn open_refuses_bad_credentials_and_unknown_vhosts() {
    let broker = Broker::new(BrokerConfig::default());
    let inbox = Arc::new(Inbox::default());
    let e = Session::open(&broker, "/", "guest", "wrong", inbox.clone()).unwrap_err();
    assert_eq!(e.code, ReplyCode::AccessRefused);
    let e = Session::open(&broker, "/", "nobody", "guest", inbox.clone()).unwrap_err();
    assert_eq!(e.code, ReplyCode::AccessRefused);
    let e = Session::open(&broker, "/nope", "guest", "guest", inbox).unwrap_err();
    assert_eq!(e.code, ReplyCode::NotAllowed);
}

#[test]
fn consumer_holds_at_most_its_prefetch_window() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, inbox) = open(&broker);
    s.declare_queue(QueueDeclare::durable("in")).unwrap();
    publish_n(&mut s, "in", 10);
    s.qos(3, false).unwrap();
    s.consume(ConsumeOptions::new("in")).unwrap();
    let first = delivered(&mut s, &inbox);
    assert_eq!(bodies(&first), ["m0", "m1", "m2"]);
    assert_eq!(s.unacked_count(), 3);
    // Nothing more until something is settled.
    publish_n(&mut s, "in", 1);
    assert!(delivered(&mut s, &inbox).is_empty());
    // A multiple ack up to the second frees two slots.
    s.ack(first[1].tag, true).unwrap();
    assert_eq!(bodies(&delivered(&mut s, &inbox)), ["m3", "m4"]);
    assert_eq!(s.unacked_count(), 3);
    assert_eq!(s.queue("in").unwrap().message_count(), 6);
}

#[test]
fn nack_requeues_or_discards_and_unknown_tags_fail() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, inbox) = open(&broker);
    s.declare_queue(QueueDeclare::durable("q")).unwrap();
    publish_n(&mut s, "q", 2);
    s.qos(1, false).unwrap();
    s.consume(ConsumeOptions::new("q")).unwrap();
    let d = delivered(&mut s, &inbox);
    assert_eq!(bodies(&d), ["m0"]);
    // Requeued: back at the head, redelivered.
    s.nack(d[0].tag, false, true).unwrap();
    let again = delivered(&mut s, &inbox);
    assert_eq!(bodies(&again), ["m0"]);
    assert!(again[0].redelivered);
    // Discarded: gone; the next one comes.
    s.nack(again[0].tag, false, false).unwrap();
    let next = delivered(&mut s, &inbox);
    assert_eq!(bodies(&next), ["m1"]);
    assert!(!next[0].redelivered);
    let e = s.ack(9999, false).unwrap_err();
    assert_eq!(e.code, ReplyCode::PreconditionFailed);
}

#[test]
fn closing_requeues_what_was_not_settled_in_order() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, inbox) = open(&broker);
    s.declare_queue(QueueDeclare::durable("q")).unwrap();
    publish_n(&mut s, "q", 4);
    s.qos(3, false).unwrap();
    s.consume(ConsumeOptions::new("q")).unwrap();
    let d = delivered(&mut s, &inbox);
    s.ack(d[0].tag, false).unwrap();
    drop(s);
    let (mut other, inbox2) = open(&broker);
    other.qos(10, false).unwrap();
    other.consume(ConsumeOptions::new("q")).unwrap();
    let got = delivered(&mut other, &inbox2);
    assert_eq!(bodies(&got), ["m1", "m2", "m3"]);
    assert_eq!(
        got.iter().map(|d| d.redelivered).collect::<Vec<_>>(),
        [true, true, false]
    );
}

#[test]
fn get_takes_the_head_and_reports_what_is_left() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, _inbox) = open(&broker);
    s.declare_queue(QueueDeclare::durable("q")).unwrap();
    assert!(s.get("q", false).unwrap().is_none());
    publish_n(&mut s, "q", 2);
    let (d, left) = s.get("q", false).unwrap().expect("a message");
    assert_eq!(&d.message.body[..], b"m0");
    assert_eq!(left, 1);
    assert_eq!(d.consumer_tag(), "");
    s.nack(d.tag, false, true).unwrap();
    let (again, _) = s.get("q", true).unwrap().expect("requeued");
    assert!(again.redelivered);
    let e = s.get("missing", false).unwrap_err();
    assert_eq!(e.code, ReplyCode::NotFound);
}

#[test]
fn exchanges_route_and_mandatory_unroutable_messages_come_back() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, _inbox) = open(&broker);
    s.declare_exchange(ExchangeDeclare::durable("words", "direct"))
        .unwrap();
    s.declare_queue(QueueDeclare::durable("counts")).unwrap();
    s.bind_queue("counts", "words", "w", FieldTable::default())
        .unwrap();
    s.publish_to("words", "w", &BasicProperties::default(), "x".into())
        .unwrap();
    assert_eq!(s.queue("counts").unwrap().message_count(), 1);
    let publish = rill_codec::Publish {
        exchange: Bytes::from_static(b"words"),
        routing_key: Bytes::from_static(b"nowhere"),
        mandatory: true,
        immediate: false,
    };
    let p = s
        .publish(
            &publish,
            rill_codec::encode_properties(&BasicProperties::default()),
            "y".into(),
        )
        .unwrap();
    assert_eq!(p.returned.map(|m| m.body.clone()), Some(Bytes::from("y")));
    let e = s
        .publish_to("missing", "k", &BasicProperties::default(), "z".into())
        .unwrap_err();
    assert_eq!(e.code, ReplyCode::NotFound);
}

#[test]
fn persistent_publishes_are_confirmed_once_synced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::open(
        BrokerConfig::default(),
        dir.path(),
        rill_store::SyncPolicy::Always,
    )
    .expect("open broker");
    let (mut s, inbox) = open(&broker);
    s.declare_queue(QueueDeclare::durable("out")).unwrap();
    s.confirm_select().unwrap();
    for i in 0..5 {
        let p = s
            .publish_to("", "out", &persistent(), Bytes::from(format!("{i}")))
            .unwrap();
        assert_eq!(p.seq, Some(i + 1));
    }
    let mut confirmed = 0;
    let mut nacked = Vec::new();
    for _ in 0..500 {
        let poll = s.poll_confirms(&mut |c| match c {
            Confirm::Ack { upto, .. } => confirmed = upto,
            Confirm::Nack(seq) => nacked.push(seq),
        });
        if !poll.waiting {
            break;
        }
        // The group commit tells the outlet when a round ends.
        inbox.wait(Duration::from_millis(20));
        inbox.take();
    }
    assert_eq!(confirmed, 5);
    assert!(nacked.is_empty());
    assert_eq!(s.confirmed_seq(), 5);
    drop(s);
    drop(broker);
    // Confirmed means on disk: a new broker on the same directory has them.
    let broker = Broker::open(
        BrokerConfig::default(),
        dir.path(),
        rill_store::SyncPolicy::Always,
    )
    .expect("reopen broker");
    let (mut s, _inbox) = open(&broker);
    assert_eq!(s.queue("out").unwrap().message_count(), 5);
    let (d, _) = s.get("out", true).unwrap().expect("message");
    assert_eq!(&d.message.body[..], b"0");
}

#[test]
fn stream_queues_need_a_prefetch_and_serve_from_an_offset() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, inbox) = open(&broker);
    let mut args = FieldTable::default();
    rill_codec::field_table_insert(
        &mut args,
        "x-queue-type",
        rill_codec::AMQPValue::LongString("stream".into()),
    );
    s.declare_queue(QueueDeclare {
        arguments: args,
        ..QueueDeclare::durable("log")
    })
    .unwrap();
    publish_n(&mut s, "log", 5);
    let e = s.consume(ConsumeOptions::new("log")).unwrap_err();
    assert_eq!(e.code, ReplyCode::PreconditionFailed);
    s.qos(2, false).unwrap();
    let mut from = ConsumeOptions::new("log");
    rill_codec::field_table_insert(
        &mut from.arguments,
        "x-stream-offset",
        rill_codec::AMQPValue::LongLongInt(3),
    );
    s.consume(from).unwrap();
    let d = delivered(&mut s, &inbox);
    assert_eq!(bodies(&d), ["m3", "m4"]);
}

#[test]
fn exclusive_queues_go_with_their_session() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, _inbox) = open(&broker);
    s.declare_queue(QueueDeclare {
        exclusive: true,
        durable: false,
        ..QueueDeclare::durable("mine")
    })
    .unwrap();
    let (other, _i) = open(&broker);
    assert_eq!(
        other.queue("mine").unwrap_err().code,
        ReplyCode::ResourceLocked
    );
    drop(s);
    assert_eq!(other.queue("mine").unwrap_err().code, ReplyCode::NotFound);
}

/// A batch goes where the same publishes one by one would go, with the same confirms: runs
/// into one queue, messages for two queues, unroutable ones, copies a deduplicating queue
/// drops within the batch, and an invalid message that stops the batch after the ones before.
#[test]
fn a_batch_publishes_as_its_messages_one_by_one_would() {
    let broker = Broker::new(BrokerConfig::default());
    let (mut s, _inbox) = open(&broker);
    s.declare_exchange(ExchangeDeclare::durable("words", "direct"))
        .unwrap();
    let mut dedup = FieldTable::default();
    dedup.insert("x-message-deduplication".into(), true.into());
    s.declare_queue(QueueDeclare {
        arguments: dedup,
        ..QueueDeclare::durable("qa")
    })
    .unwrap();
    s.declare_queue(QueueDeclare::durable("qb")).unwrap();
    s.bind_queue("qa", "words", "a", FieldTable::default())
        .unwrap();
    s.bind_queue("qa", "words", "ab", FieldTable::default())
        .unwrap();
    s.bind_queue("qb", "words", "ab", FieldTable::default())
        .unwrap();
    s.confirm_select().unwrap();
    let props = |id: &str| {
        let mut h = FieldTable::default();
        h.insert(
            "x-deduplication-header".into(),
            rill_codec::AMQPValue::LongString(id.into()),
        );
        rill_codec::encode_properties(&BasicProperties::default().with_headers(h))
    };
    let msg = |rk: &'static str, id: &str, body: &'static str| {
        (
            Bytes::from_static(rk.as_bytes()),
            props(id),
            Bytes::from_static(body.as_bytes()),
        )
    };
    let bad =
        rill_codec::encode_properties(&BasicProperties::default().with_expiration("soon".into()));
    let batch = vec![
        msg("a", "1", "a1"),
        msg("a", "2", "a2"),
        msg("a", "1", "copy of a1"),
        msg("ab", "3", "ab3"),
        msg("nowhere", "4", "lost"),
        msg("a", "5", "a5"),
        (
            Bytes::from_static(b"a"),
            bad,
            Bytes::from_static(b"refused"),
        ),
        msg("a", "6", "never"),
    ];
    let mut published = Vec::new();
    let e = s
        .publish_batch(&Bytes::from_static(b"words"), batch, &mut published)
        .unwrap_err();
    assert_eq!(e.code, ReplyCode::PreconditionFailed, "{e:?}");
    let seqs: Vec<Option<u64>> = published.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=6).map(Some).collect::<Vec<_>>());
    let take_all = |s: &mut Session, q: &str| {
        let mut got = Vec::new();
        while let Some((d, _)) = s.get(q, true).unwrap() {
            got.push(String::from_utf8_lossy(&d.message.body).into_owned());
        }
        got
    };
    assert_eq!(take_all(&mut s, "qa"), ["a1", "a2", "ab3", "a5"]);
    assert_eq!(take_all(&mut s, "qb"), ["ab3"]);
    // All six are confirmed (transient: at once), the copy and the unroutable one too.
    let mut confirmed = 0;
    s.poll_confirms(&mut |c| {
        if let Confirm::Ack { upto, .. } = c {
            confirmed = upto;
        }
    });
    assert_eq!(confirmed, 6);
    let e = s
        .publish_batch(&Bytes::from_static(b"missing"), Vec::new(), &mut published)
        .unwrap_err();
    assert_eq!(e.code, ReplyCode::NotFound);
}
