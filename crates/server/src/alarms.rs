//! Resource alarms: the broker's memory use and the data directory's free space, sampled once a
//! second. Crossing a limit raises an alarm in the broker core, which blocks publishers
//! (connection.blocked) until it clears; consumers keep draining.

use rill_broker::Broker;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits, RabbitMQ's defaults.
#[derive(Debug, Clone)]
pub struct AlarmConfig {
    /// Fraction of total RAM the broker's resident memory may use before publishers block.
    pub memory_high_watermark: f64,
    /// Free bytes the data directory's file system must keep.
    pub disk_free_limit: u64,
    pub data_dir: PathBuf,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn watch(broker: Broker, config: AlarmConfig) {
    let total = total_memory().unwrap_or(0);
    let limit = (total as f64 * config.memory_high_watermark) as u64;
    tracing::info!(
        memory_limit_bytes = limit,
        total_memory_bytes = total,
        disk_free_limit_bytes = config.disk_free_limit,
        "resource limits"
    );
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        if total > 0 {
            if let Some(rss) = resident_memory() {
                broker.set_alarm("memory", rss > limit);
            }
        }
        match free_disk(&config.data_dir) {
            Some(free) => broker.set_alarm("disk", free < config.disk_free_limit),
            None => broker.set_alarm("disk", true),
        }
    }
}

fn read_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn total_memory() -> Option<u64> {
    read_kib("/proc/meminfo", "MemTotal:")
}

fn resident_memory() -> Option<u64> {
    read_kib("/proc/self/status", "VmRSS:")
}

fn free_disk(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        assert!(total_memory().unwrap_or(0) > 0);
        assert!(resident_memory().unwrap_or(0) > 0);
        assert!(free_disk(Path::new(".")).is_some());
    }
}
