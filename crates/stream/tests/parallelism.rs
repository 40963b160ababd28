//! The same job gives the same final results at parallelism 1, 2 and 4, and as two processes
//! talking over loopback TCP (this test binary re-runs itself as the two processes).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rill_stream::*;

/// Final results of the reference job, as sorted text lines (so processes can print them).
fn job(env: StreamExecutionEnvironment) -> Vec<String> {
    let counts = CollectSink::new();
    let windows = CollectSink::new();
    let totals = CollectSink::new();
    let (c, w, t) = (counts.clone(), windows.clone(), totals.clone());
    env.execute("reference", move |env| {
        // Parallel source, keyed running count.
        env.from_sequence(1, 20_000)
            .map(|id| (bench::word_of(id, 97), 1u64))
            .key_by(|t| t.0)
            .sum(|t| &mut t.1)
            .collect_into(&c);
        // Non-parallel, out-of-order event-time input with late records and lateness.
        let events: Vec<(u64, (u32, u64))> = (0..3_000u64)
            .map(|i| ((i * 37) % 1_000 + i, ((i % 13) as u32, i)))
            .collect();
        env.from_timestamped(
            events,
            WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_millis(200)),
        )
        .key_by(|t| t.0)
        .window(TumblingWindows::event_time(Duration::from_millis(250)))
        .allowed_lateness(Duration::from_millis(100))
        .process(
            |k: &u32, w: TimeWindow, rs: &[(u32, u64)], out: &mut Vec<(u32, u64, u64, u64)>| {
                out.push((*k, w.start, rs.len() as u64, rs.iter().map(|r| r.1).sum()));
            },
        )
        .collect_into(&w);
        env.from_sequence(1, 1_000)
            .fold_at_end(0u64, |a, x| *a += x, |a, b| *a += b)
            .collect_into(&t);
    })
    .expect("job runs");

    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (word, n) in counts.take() {
        let e = last.entry(format!("count {word}")).or_insert(0);
        *e = (*e).max(n);
    }
    let mut fin: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (k, start, n, sum) in windows.take() {
        let e = fin.entry(format!("window {k} {start}")).or_insert((0, 0));
        if n >= e.0 {
            *e = (n, sum);
        }
    }
    let mut lines: Vec<String> = last.into_iter().map(|(k, v)| format!("{k} {v}")).collect();
    lines.extend(fin.into_iter().map(|(k, (n, s))| format!("{k} {n} {s}")));
    lines.extend(totals.take().into_iter().map(|t| format!("total {t}")));
    lines.sort();
    lines
}

const CHILD_ENV: &str = "RILL_TEST_CLUSTER_PROCESS";
const HOSTS_ENV: &str = "RILL_TEST_CLUSTER_HOSTS";

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
fn cluster_child() {
    let (Ok(process), Ok(hosts)) = (std::env::var(CHILD_ENV), std::env::var(HOSTS_ENV)) else {
        return;
    };
    let process: usize = process.parse().expect("process index");
    let hosts: Vec<String> = hosts.split(',').map(String::from).collect();
    let env = StreamExecutionEnvironment::new()
        .with_parallelism(2)
        .with_cluster(ClusterConfig { process, hosts });
    for line in job(env) {
        println!("RESULT {line}");
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn same_results_at_any_parallelism_and_across_processes() {
    let reference = job(StreamExecutionEnvironment::new().with_parallelism(1));
    assert!(reference.iter().any(|l| l.starts_with("window")));
    assert!(reference.contains(&"total 500500".to_string()));
    for p in [2, 4] {
        assert_eq!(
            job(StreamExecutionEnvironment::new().with_parallelism(p)),
            reference,
            "parallelism {p}"
        );
    }

    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "cluster_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, i.to_string())
                .env(HOSTS_ENV, &hosts)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child process")
        })
        .collect();
    let mut lines = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("child finishes");
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // libtest may print "test cluster_child ... " on the same line as the first result.
        lines.extend(
            text.lines()
                .filter_map(|l| l.find("RESULT ").map(|i| l[i + 7..].to_string())),
        );
    }
    lines.sort();
    assert_eq!(lines, reference, "two processes");
}
