//! The table, the ratios against the targets and the JSON lines of `rill bench pipeline`.

use super::{checkpoint_suffix, PipelineArgs, Plan, Row};
use crate::bench_amqp;
use anyhow::bail;

/// What a row produced.
pub(super) enum Outcome {
    Base(bench_amqp::Figures, Cpu),
    Pipeline(Box<PipelineResult>),
    Skipped(String),
    Failed(String),
}

/// CPU used during a measurement, as fractions of one core.
#[derive(Default, Clone, Copy, Debug)]
pub(super) struct Cpu {
    pub(super) broker: Option<f64>,
    pub(super) job: Option<f64>,
    pub(super) client: Option<f64>,
}

/// The figures of one phase of a pipeline row.
#[derive(Debug, Default, Clone)]
pub(super) struct Phase {
    pub(super) messages: u64,
    pub(super) out_expected: u64,
    pub(super) out_received: u64,
    /// Markers that never came out, and extra copies of markers that did.
    pub(super) missing: u64,
    pub(super) duplicates: u64,
    /// OUT stopped growing before `out_expected`.
    pub(super) stalled: bool,
    /// From the first publish until OUT had every expected output.
    pub(super) seconds: f64,
    pub(super) p50_ms: Option<f64>,
    pub(super) p99_ms: Option<f64>,
    pub(super) cpu: Cpu,
}

impl Phase {
    pub(super) fn clean(&self) -> bool {
        !self.stalled
            && self.out_received == self.out_expected
            && self.missing == 0
            && self.duplicates == 0
    }

    pub(super) fn in_per_s(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }

    pub(super) fn words_per_s(&self) -> f64 {
        self.out_expected as f64 / self.seconds.max(1e-9)
    }
}

pub(super) struct PipelineResult {
    pub(super) throughput: Phase,
    pub(super) latency: Option<Phase>,
    /// Anything wrong besides counts: a job or broker that did not stop cleanly.
    pub(super) notes: Vec<String>,
}

impl PipelineResult {
    pub(super) fn clean(&self) -> bool {
        self.throughput.clean()
            && self.latency.as_ref().is_none_or(Phase::clean)
            && self.notes.is_empty()
    }
}

/// One line about a row's outcome, for the progress log.
pub(super) fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Base(f, _) => format!("{:.0} msg/s consumed", f.con_per_s),
        Outcome::Pipeline(r) => {
            let t = &r.throughput;
            format!(
                "{:.0} msg/s in, {:.0} words/s out, OUT {}/{}{}",
                t.in_per_s(),
                t.words_per_s(),
                t.out_received,
                t.out_expected,
                if r.clean() { "" } else { " (NOT CLEAN)" }
            )
        }
        Outcome::Skipped(why) => format!("skipped: {why}"),
        Outcome::Failed(why) => format!("FAILED: {why}"),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0}", v * 100.0))
}

fn json_num(v: Option<f64>, decimals: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("null".into(), |v| format!("{v:.decimals$}"))
}

/// The table, the ratios against the targets, a JSON line per row and `events_per_s`.
pub(super) fn report(args: &PipelineArgs, results: &[(Plan, Outcome)]) -> anyhow::Result<()> {
    println!(
        "rill bench pipeline: {} messages x {} words (vocabulary {}), confirmed persistent; \
         job parallelism {}, prefetch {}; publisher window {}; OUT prefetch {}, ack every {}",
        args.messages,
        args.words,
        args.vocab,
        args.parallelism,
        args.prefetch
            .map_or_else(|| "the job's default".to_owned(), |p| p.to_string()),
        args.inflight,
        args.out_prefetch,
        args.out_ack_every
    );
    let rate_col = if args.rate > 0.0 {
        format!("@{}/s p50/p99", args.rate)
    } else {
        "no rate phase".into()
    };
    println!(
        "{:<14} {:<34} {:>9} {:>10} {:>17} {:>16} {:>18} {:>18}",
        "row",
        "configuration",
        "in msg/s",
        "words/s",
        "OUT got/expected",
        "sat. p50/p99 ms",
        format!("{rate_col} ms"),
        "CPU% broker/job/cli"
    );
    let mut failures = Vec::new();
    for (plan, outcome) in results {
        let name = format!(
            "{}{}",
            plan.row.key(),
            checkpoint_suffix(plan.checkpoint_ms)
        );
        match outcome {
            Outcome::Base(f, cpu) => println!(
                "{:<14} {:<34} {:>9.0} {:>10} {:>17} {:>16} {:>18} {:>18}",
                name,
                plan.row.label(),
                f.con_per_s,
                "-",
                format!("(pub {:.0}/s)", f.pub_per_s),
                "-",
                "-",
                format!("{}/{}/{}", pct(cpu.broker), pct(cpu.job), pct(cpu.client)),
            ),
            Outcome::Pipeline(r) => {
                let t = &r.throughput;
                let l = r.latency.as_ref();
                println!(
                    "{:<14} {:<34} {:>9.0} {:>10.0} {:>17} {:>16} {:>18} {:>18}",
                    name,
                    plan.row.label(),
                    t.in_per_s(),
                    t.words_per_s(),
                    format!("{}/{}", t.out_received, t.out_expected),
                    format!("{}/{}", ms(t.p50_ms), ms(t.p99_ms)),
                    l.map_or("-".into(), |l| format!("{}/{}", ms(l.p50_ms), ms(l.p99_ms))),
                    format!(
                        "{}/{}/{}",
                        pct(t.cpu.broker),
                        pct(t.cpu.job),
                        pct(t.cpu.client)
                    ),
                );
                for (what, p) in [("throughput", Some(t)), ("latency", l)] {
                    let Some(p) = p else { continue };
                    if !p.clean() {
                        let problem = format!(
                            "{what} phase: OUT got {} of {} expected outputs, {} messages missing, \
                             {} duplicate marker outputs{}",
                            p.out_received,
                            p.out_expected,
                            p.missing,
                            p.duplicates,
                            if p.stalled { ", OUT stalled" } else { "" }
                        );
                        println!("{:<14}   ! {problem}", "");
                        failures.push(format!("row {name}: {problem}"));
                    }
                }
                if l.is_none() && args.rate > 0.0 {
                    println!(
                        "{:<14}   ! no latency phase: the throughput phase was not clean",
                        ""
                    );
                }
                for note in &r.notes {
                    println!("{:<14}   ! {note}", "");
                    failures.push(format!("row {name}: {note}"));
                }
            }
            Outcome::Skipped(why) => {
                println!("{:<14} {:<34} skipped: {why}", name, plan.row.label())
            }
            Outcome::Failed(why) => {
                println!("{:<14} {:<34} FAILED: {why}", name, plan.row.label());
                failures.push(format!("row {name} failed"));
            }
        }
    }
    println!(
        "(in msg/s and words/s: throughput phase, first publish to last output; sat. = its \
         latencies, mostly queueing; {}; CPU%: throughput phase, 100 = one core, of {} cores)",
        if args.rate > 0.0 {
            format!(
                "@rate = latency phase of {} s at a fixed rate, the latency to compare",
                args.rate_secs
            )
        } else {
            "no latency phase (--rate 0)".into()
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let rate_of = |row: Row, ckpt: Option<u64>| {
        results.iter().find_map(|(p, o)| match o {
            Outcome::Pipeline(r) if p.row == row && p.checkpoint_ms == ckpt => {
                Some(r.throughput.in_per_s())
            }
            Outcome::Base(f, _) if p.row == row => Some(f.con_per_s),
            _ => None,
        })
    };
    let ckpt = first_checkpoint(args);
    match args.compare_checkpoints {
        None => {
            let a = rate_of(Row::A, ckpt);
            for (what, other, target) in [
                ("(a)/(b)", rate_of(Row::B, ckpt), 2.0),
                ("(a)/(c)", rate_of(Row::C, ckpt), 10.0),
                ("(a)/base", rate_of(Row::Base, None), 0.5),
            ] {
                match (a, other) {
                    (Some(a), Some(o)) if o > 0.0 => {
                        let ratio = a / o;
                        println!(
                            "{what:<9} input msg/s: {ratio:>6.2}x   target >= {target}x: {}",
                            if ratio >= target { "met" } else { "MISSED" }
                        );
                    }
                    _ => println!("{what:<9} input msg/s: n/a (a row was not measured)"),
                }
            }
        }
        Some(ms) => {
            for row in [Row::A, Row::B] {
                if let (Some(off), Some(on)) = (rate_of(row, None), rate_of(row, Some(ms))) {
                    println!(
                        "({}) checkpoints every {ms} ms: {on:.0} vs {off:.0} msg/s without, \
                         throughput loss {:.1}%",
                        row.key(),
                        (1.0 - on / off) * 100.0
                    );
                }
            }
        }
    }

    for (plan, outcome) in results {
        println!("JSON {}", row_json(plan, outcome));
    }
    // (a)'s input rate; without (a), the first row measured, so that the line is always there.
    let headline = rate_of(Row::A, first_checkpoint(args)).or_else(|| {
        results.iter().find_map(|(_, o)| match o {
            Outcome::Pipeline(r) => Some(r.throughput.in_per_s()),
            Outcome::Base(f, _) => Some(f.con_per_s),
            _ => None,
        })
    });
    println!("events_per_s {:.0}", headline.unwrap_or(0.0));
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// The checkpoint setting of the rows the targets are read on: the one asked for, or in
/// `--compare-checkpoints` mode the runs without.
fn first_checkpoint(args: &PipelineArgs) -> Option<u64> {
    match args.compare_checkpoints {
        Some(_) => None,
        None => args.checkpoint_interval_ms,
    }
}

fn row_json(plan: &Plan, outcome: &Outcome) -> String {
    let head = format!(
        "\"row\":\"{}\",\"checkpoint_ms\":{}",
        plan.row.key(),
        plan.checkpoint_ms
            .map_or("null".into(), |ms| ms.to_string())
    );
    let cpu = |c: &Cpu| {
        format!(
            "\"cpu_broker_pct\":{},\"cpu_job_pct\":{},\"cpu_client_pct\":{}",
            json_num(c.broker.map(|v| v * 100.0), 0),
            json_num(c.job.map(|v| v * 100.0), 0),
            json_num(c.client.map(|v| v * 100.0), 0)
        )
    };
    let phase = |p: &Phase| {
        format!(
            "{{\"messages\":{},\"seconds\":{:.3},\"in_per_s\":{:.0},\"words_per_s\":{:.0},\
             \"out_expected\":{},\"out_received\":{},\"missing\":{},\"duplicates\":{},\
             \"stalled\":{},\"p50_ms\":{},\"p99_ms\":{},{}}}",
            p.messages,
            p.seconds,
            p.in_per_s(),
            p.words_per_s(),
            p.out_expected,
            p.out_received,
            p.missing,
            p.duplicates,
            p.stalled,
            json_num(p.p50_ms, 3),
            json_num(p.p99_ms, 3),
            cpu(&p.cpu)
        )
    };
    match outcome {
        Outcome::Base(f, c) => format!(
            "{{{head},\"pub_per_s\":{:.0},\"con_per_s\":{:.0},\"nacked\":{},{}}}",
            f.pub_per_s,
            f.con_per_s,
            f.nacked,
            cpu(c)
        ),
        Outcome::Pipeline(r) => format!(
            "{{{head},\"clean\":{},\"throughput\":{},\"latency\":{}}}",
            r.clean(),
            phase(&r.throughput),
            r.latency.as_ref().map_or("null".into(), phase)
        ),
        Outcome::Skipped(why) => format!("{{{head},\"skipped\":{:?}}}", why),
        Outcome::Failed(why) => format!("{{{head},\"failed\":{:?}}}", why),
    }
}
