//! `rill bench amqp` end to end against the real broker: each client (the pipelined `wire`
//! client and lapin) on each queue kind publishes with confirms, consumes with acks and
//! reports its figures. Only that traffic flowed is checked, never how fast.

mod common;

use common::{unique, Broker};
use std::process::Command;

fn bench(broker: &Broker, kind: &str, client: &str, size: usize, ack_every: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rill"))
        .args(["bench", "amqp", "--duration", "1", "--kind", kind])
        .args(["--client", client, "--size", &size.to_string()])
        .args(["--ack-every", &ack_every.to_string()])
        .args(["--queue", &unique("bench")])
        .args(["--uri", &broker.uri()])
        .output()
        .expect("run rill bench amqp");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench {kind}/{client} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("JSON "))
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"))
        .to_owned()
}

/// The number after `"key":` in the bench's one-line JSON.
fn figure(json: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("{key} not a number in {json}"))
}

fn assert_traffic(json: &str) {
    assert!(figure(json, "pub_per_s") > 0.0, "nothing confirmed: {json}");
    assert!(figure(json, "con_per_s") > 0.0, "nothing consumed: {json}");
    assert_eq!(figure(json, "nacked"), 0.0, "{json}");
}

#[test]
fn wire_client_on_every_queue_kind() {
    let broker = Broker::start();
    for kind in ["classic", "priority", "stream"] {
        assert_traffic(&bench(&broker, kind, "wire", 16, 1));
    }
    // Bodies larger than frame_max are split into several body frames.
    assert_traffic(&bench(&broker, "classic", "wire", 300_000, 1));
    assert_traffic(&bench(&broker, "stream", "wire", 16, 100));
}

#[test]
fn lapin_client_on_streams_and_classic_queues_single_and_multiple_acks() {
    let broker = Broker::start();
    for kind in ["classic", "stream"] {
        assert_traffic(&bench(&broker, kind, "lapin", 16, 1));
    }
    // `multiple` acks: they must reach the broker in order.
    assert_traffic(&bench(&broker, "classic", "lapin", 16, 100));
}
