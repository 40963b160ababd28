//! The seed WordCount example runs (no delay) and prints the expected running counts.

use std::process::Command;

#[test]
fn wordcount_example_prints_flink_style_counts() {
    // Cargo builds examples for `cargo test`; they sit next to the test binary's directory.
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let example = dir
        .join("examples")
        .join(format!("wordcount{}", std::env::consts::EXE_SUFFIX));
    let out = Command::new(&example)
        .args(["--no-delay", "--count", "5", "--parallelism", "2"])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", example.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut records: Vec<(String, String)> = Vec::new();
    for line in stdout.lines() {
        let (subtask, record) = line
            .split_once("> ")
            .unwrap_or_else(|| panic!("not `N> record`: {line}"));
        assert!(matches!(subtask, "1" | "2"), "subtask in {line}");
        records.push((record.to_string(), subtask.to_string()));
    }
    let mut got: Vec<&str> = records.iter().map(|r| r.0.as_str()).collect();
    got.sort();
    let mut want: Vec<String> = (1..=5)
        .flat_map(|i| [format!("(Hello,{i})"), format!("(Flink!,{i})")])
        .collect();
    want.sort();
    assert_eq!(got, want);
    // Each word is counted by one subtask, in order.
    for word in ["Hello", "Flink!"] {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r.0.starts_with(&format!("({word},")))
            .collect();
        assert!(mine.iter().all(|r| r.1 == mine[0].1));
        let counts: Vec<String> = mine.iter().map(|r| r.0.clone()).collect();
        assert_eq!(
            counts,
            (1..=5).map(|i| format!("({word},{i})")).collect::<Vec<_>>()
        );
    }
}
