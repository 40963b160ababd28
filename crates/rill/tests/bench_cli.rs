//! `rill bench amqp` end to end against the real broker: each client (the pipelined `wire`
//! client and lapin) on each queue kind publishes with confirms, consumes with acks and
//! reports its figures; `rill bench pipeline` runs its rows at toy sizes. Only that traffic
//! flowed (and, for the pipeline, exactly the outputs expected) is checked, never how fast.

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

/// `rill bench pipeline` at toy sizes: every row it can run here (base, embedded, standalone
/// against Rill) reports its figures, OUT receives exactly one output per word, the
/// RabbitMQ row says why it was skipped, and `events_per_s` is the last line.
#[test]
fn pipeline_rows_report_exact_counts() {
    let out = Command::new(env!("CARGO_BIN_EXE_rill"))
        .args(["bench", "pipeline", "--messages", "300", "--words", "5"])
        .args(["--rate", "100", "--rate-secs", "1", "--base-secs", "1"])
        .args(["--stall-secs", "20", "--only", "a,b,c,base"])
        .output()
        .expect("run rill bench pipeline");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench pipeline failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = |row: &str| {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix("JSON "))
            .find(|j| j.starts_with(&format!("{{\"row\":\"{row}\"")))
            .unwrap_or_else(|| panic!("no JSON line for row {row} in {stdout}"))
            .to_owned()
    };
    for row in ["a", "b"] {
        let j = json(row);
        assert!(j.contains("\"clean\":true"), "{j}");
        // Both phases: 300 messages, then 100 at 100/s; five outputs each.
        assert!(
            j.contains("\"out_expected\":1500,\"out_received\":1500"),
            "{j}"
        );
        assert!(
            j.contains("\"out_expected\":500,\"out_received\":500"),
            "{j}"
        );
        assert!(figure(&j, "in_per_s") > 0.0, "{j}");
        assert!(figure(&j, "p99_ms") >= figure(&j, "p50_ms"), "{j}");
    }
    assert!(json("c").contains("\"skipped\":"), "{stdout}");
    assert!(figure(&json("base"), "con_per_s") > 0.0, "{stdout}");
    assert!(stdout.contains("(a)/(b)"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("events_per_s "), "last line: {last}");
}
