//! Message rates: the broker keeps monotonic counters; every [`crate::SAMPLE_INTERVAL`] a
//! sampler reads them and keeps the per-second rate over the last interval, as RabbitMQ's
//! statistics collector does (`rates_mode: basic`). Handlers read the last rates without
//! touching a queue.

use rill_broker::Broker;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The counters of one queue at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub publish: u64,
    pub deliver_get: u64,
    pub ack: u64,
    pub messages: u64,
    pub ready: u64,
    pub unacked: u64,
}

/// Per-second rates of the same.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerSecond {
    pub publish: f64,
    pub deliver_get: f64,
    pub ack: f64,
    pub messages: f64,
    pub ready: f64,
    pub unacked: f64,
}

impl PerSecond {
    /// From two samples `elapsed` apart (gauges can fall: their rate is negative then).
    pub fn between(old: &Counts, new: &Counts, elapsed: Duration) -> PerSecond {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return PerSecond::default();
        }
        let r = |a: u64, b: u64| (b as f64 - a as f64) / secs;
        PerSecond {
            publish: r(old.publish, new.publish),
            deliver_get: r(old.deliver_get, new.deliver_get),
            ack: r(old.ack, new.ack),
            messages: r(old.messages, new.messages),
            ready: r(old.ready, new.ready),
            unacked: r(old.unacked, new.unacked),
        }
    }

    fn add(&mut self, o: &PerSecond) {
        self.publish += o.publish;
        self.deliver_get += o.deliver_get;
        self.ack += o.ack;
        self.messages += o.messages;
        self.ready += o.ready;
        self.unacked += o.unacked;
    }
}

/// Each queue's last sample (when, counts) and rates, by (vhost, queue).
type Samples = HashMap<(String, String), (Instant, Counts, PerSecond)>;

/// The last samples and rates, by (vhost, queue).
#[derive(Debug, Default)]
pub struct Rates {
    inner: Mutex<Samples>,
}

impl Rates {
    /// The rates of a queue over the last interval (zero until two samples exist).
    pub fn queue(&self, vhost: &str, name: &str) -> PerSecond {
        let map = self.lock();
        map.get(&(vhost.to_string(), name.to_string()))
            .map(|e| e.2)
            .unwrap_or_default()
    }

    /// The sum over every queue (for `/api/overview`).
    pub fn total(&self) -> PerSecond {
        let mut sum = PerSecond::default();
        for (_, _, r) in self.lock().values() {
            sum.add(r);
        }
        sum
    }

    /// Records a sample of every queue taken `now`; queues gone since are forgotten.
    pub fn record(&self, now: Instant, samples: Vec<((String, String), Counts)>) {
        let mut map = self.lock();
        let mut next = HashMap::with_capacity(samples.len());
        for (key, counts) in samples {
            let rate = match map.remove(&key) {
                Some((at, old, _)) => PerSecond::between(&old, &counts, now - at),
                None => PerSecond::default(),
            };
            next.insert(key, (now, counts, rate));
        }
        *map = next;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Samples> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// The counters of one queue now.
pub fn counts(q: &rill_broker::queue::Queue) -> Counts {
    let c = q.counters();
    let ready = c.ready.load(Ordering::Relaxed);
    let unacked = c.unacked.load(Ordering::Relaxed);
    Counts {
        publish: c.published.load(Ordering::Relaxed),
        deliver_get: c.delivered.load(Ordering::Relaxed),
        ack: c.acked.load(Ordering::Relaxed),
        messages: ready + unacked,
        ready,
        unacked,
    }
}

/// Samples every queue of `broker` into `rates` every `every`, forever.
pub async fn sample_forever(broker: Broker, rates: std::sync::Arc<Rates>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let samples = broker
            .vhosts()
            .into_iter()
            .flat_map(|v| {
                v.queues()
                    .into_iter()
                    .map(move |q| ((v.name.clone(), q.name().to_string()), counts(&q)))
                    .collect::<Vec<_>>()
            })
            .collect();
        rates.record(Instant::now(), samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_consecutive_samples() {
        let rates = Rates::default();
        let key = ("/".to_string(), "q".to_string());
        let t0 = Instant::now();
        let c0 = Counts {
            publish: 100,
            ready: 10,
            ..Counts::default()
        };
        rates.record(t0, vec![(key.clone(), c0)]);
        assert_eq!(rates.queue("/", "q"), PerSecond::default());
        let c1 = Counts {
            publish: 150,
            ready: 5,
            ..Counts::default()
        };
        rates.record(t0 + Duration::from_secs(5), vec![(key, c1)]);
        let r = rates.queue("/", "q");
        assert_eq!(r.publish, 10.0);
        assert_eq!(r.ready, -1.0);
        assert_eq!(rates.total().publish, 10.0);
        rates.record(t0 + Duration::from_secs(10), vec![]);
        assert_eq!(rates.queue("/", "q"), PerSecond::default());
    }
}
