//! Message bodies that identify themselves on OUT, and the accounting of what came out:
//! end-to-end latency per message, messages lost, outputs duplicated.

use anyhow::Context as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// What the load generator sent and what came out of OUT, shared by the publisher (send
/// times), the OUT consumer (arrivals) and the clock.
pub(super) struct Tracker {
    epoch: Instant,
    words: u64,
    vocab: u64,
    /// Send time of message i, in ns since `epoch` (0: not sent yet).
    pub(super) sent_at: Vec<AtomicU64>,
    /// OUT deliveries so far, of any phase.
    pub(super) received: AtomicU64,
    /// When `received` reaches `target`, the time (ns since `epoch`) goes to `target_at`:
    /// the end of a phase, taken by the consumer rather than by a clock that polls.
    pub(super) target: AtomicU64,
    pub(super) target_at: AtomicU64,
    /// Per message: its latency (ns, 0: not seen) and how many marker outputs named it.
    /// Locked by the consumer for each marker output and by the clock between phases; never
    /// across an `.await`.
    markers: Mutex<Markers>,
}

pub(super) struct Markers {
    latency_ns: Vec<u64>,
    copies: Vec<u32>,
    /// Outputs that name a marker no message carried, or are not wordcount JSON.
    foreign: u64,
}

impl Tracker {
    pub(super) fn new(messages: u64, words: u64, vocab: u64) -> anyhow::Result<Tracker> {
        let n = usize::try_from(messages).context("too many messages for this machine")?;
        Ok(Tracker {
            epoch: Instant::now(),
            words,
            vocab,
            sent_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            target_at: AtomicU64::new(0),
            markers: Mutex::new(Markers {
                latency_ns: vec![0; n],
                copies: vec![0; n],
                foreign: 0,
            }),
        })
    }

    pub(super) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn markers(&self) -> std::sync::MutexGuard<'_, Markers> {
        // A panic while holding the lock leaves counts that are still worth reporting.
        self.markers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the body of message `i` into `buf` and notes its send time.
    pub(super) fn body(&self, i: u64, buf: &mut Vec<u8>) {
        buf.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(buf, "m{i}");
        for k in 1..self.words {
            let w =
                (i.wrapping_mul(self.words - 1).wrapping_add(k)).wrapping_mul(7919) % self.vocab;
            let _ = write!(buf, " w{w}");
        }
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| self.sent_at.get(i)) {
            slot.store(self.now_ns().max(1), Ordering::Release);
        }
    }

    /// Sees one OUT body.
    pub(super) fn on_out(&self, body: &[u8]) {
        let n = self.received.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ns();
        if n == self.target.load(Ordering::Relaxed) {
            self.target_at.store(now, Ordering::Relaxed);
        }
        // Vocabulary words start with `w`; only markers start with `m`.
        let Some(rest) = body.strip_prefix(br#"{"word":"m"#) else {
            if !body.starts_with(br#"{"word":""#) {
                self.markers().foreign += 1;
            }
            return;
        };
        let marker = parse_marker(rest);
        let mut markers = self.markers();
        let Some((i, count)) = marker.filter(|(i, _)| *i < markers.copies.len()) else {
            markers.foreign += 1;
            return;
        };
        markers.copies[i] = markers.copies[i].saturating_add(1);
        if count == 1 && markers.latency_ns[i] == 0 {
            let sent = self.sent_at[i].load(Ordering::Acquire);
            if sent > 0 {
                markers.latency_ns[i] = now.saturating_sub(sent).max(1);
            }
        }
    }

    /// Missing markers, extra copies and latency percentiles (ms) of messages `range`.
    pub(super) fn phase_markers(
        &self,
        range: std::ops::Range<usize>,
    ) -> (u64, u64, Option<f64>, Option<f64>) {
        let markers = self.markers();
        let mut missing = 0;
        let mut duplicates = 0;
        let mut latencies = Vec::with_capacity(range.len());
        for i in range {
            match markers.copies[i] {
                0 => missing += 1,
                c => duplicates += u64::from(c - 1),
            }
            if markers.latency_ns[i] > 0 {
                latencies.push(markers.latency_ns[i]);
            }
        }
        latencies.sort_unstable();
        let pct = |p: f64| {
            // Nearest rank.
            let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
            latencies
                .get(rank.saturating_sub(1))
                .map(|ns| *ns as f64 / 1e6)
        };
        (missing, duplicates, pct(50.0), pct(99.0))
    }
}

/// `(i, count)` from the rest of `{"word":"m<i>","count":<count>}` after `{"word":"m`.
pub(super) fn parse_marker(rest: &[u8]) -> Option<(usize, u64)> {
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let i: usize = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(br#"","count":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let count: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    (rest.get(digits..) == Some(b"}".as_slice())).then_some((i, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_from_wordcount_output() {
        assert_eq!(parse_marker(br#"17","count":1}"#), Some((17, 1)));
        assert_eq!(parse_marker(br#"17","count":12}"#), Some((17, 12)));
        assert_eq!(parse_marker(br#"17x","count":1}"#), None);
        assert_eq!(parse_marker(br#"17","count":1"#), None);
        assert_eq!(parse_marker(br#"","count":1}"#), None);
    }

    #[test]
    fn bodies_carry_the_marker_then_vocabulary_words() {
        let t = Tracker::new(10, 5, 1000).unwrap();
        let mut buf = Vec::new();
        t.body(3, &mut buf);
        let text = String::from_utf8(buf).unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words.len(), 5);
        assert_eq!(words[0], "m3");
        assert!(words[1..].iter().all(|w| w.starts_with('w')));
        assert!(t.sent_at[3].load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn missing_duplicate_and_latency_per_phase() {
        let t = Tracker::new(4, 2, 10).unwrap();
        let mut buf = Vec::new();
        for i in 0..4 {
            t.body(i, &mut buf);
        }
        t.on_out(br#"{"word":"m0","count":1}"#);
        t.on_out(br#"{"word":"w3","count":1}"#);
        t.on_out(br#"{"word":"m1","count":1}"#);
        t.on_out(br#"{"word":"m1","count":2}"#);
        t.on_out(br#"{"word":"m3","count":1}"#);
        let (missing, dups, p50, p99) = t.phase_markers(0..4);
        assert_eq!((missing, dups), (1, 1));
        assert!(p50.is_some() && p99 >= p50);
        assert_eq!(t.received.load(Ordering::Relaxed), 5);
        assert_eq!(t.markers().foreign, 0);
        t.on_out(br#"{"word":"m9","count":1}"#);
        t.on_out(b"not json");
        assert_eq!(t.markers().foreign, 2);
    }
}
