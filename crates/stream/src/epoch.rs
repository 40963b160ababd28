//! Timely timestamps: (epoch, event-time frontier) pairs, and the clock that advances epochs.
//!
//! Every batch travels at a `Time` = `Product(epoch, frontier)` in the product (partial)
//! order. The *frontier* coordinate is the event-time watermark frontier of the source that
//! emitted the batch (see the crate's "Time model"); the *epoch* coordinate is a counter the
//! sources advance on a shared wall-clock interval. An operator's input frontier, summarised
//! by its `meet`, answers both questions an operator asks:
//! - `meet.inner`: the event-time frontier (watermark + 1) — no record will arrive that was
//!   emitted under a lower frontier;
//! - `meet.outer`: every epoch below it is complete — all records of those epochs have
//!   arrived. That is the barrier of Flink's checkpoints and of at-least-once acks.
//!
//! The two coordinates move independently: a source with no watermarks stays at frontier 0
//! while its epochs advance, and an idle source closes epochs without sending anything.

use std::time::{Duration, Instant};

use timely::order::Product;
use timely::progress::frontier::AntichainRef;

/// A timely timestamp: `outer` is the epoch, `inner` the event-time frontier.
pub(crate) type Time = Product<u64, u64>;

/// The epoch interval when none is configured: acks and checkpoints wait at most about this
/// long for an epoch to close, and every source sends one progress update per interval.
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_millis(100);

/// The greatest time below every element of `frontier` (coordinate-wise minimum), or `None`
/// if the frontier is empty (the input has ended).
#[inline]
pub(crate) fn meet(frontier: AntichainRef<'_, Time>) -> Option<Time> {
    let mut it = frontier.iter();
    let first = *it.next()?;
    Some(it.fold(first, |m, t| {
        Product::new(m.outer.min(t.outer), m.inner.min(t.inner))
    }))
}

/// Epoch numbers as a function of wall time: `elapsed since the job started / interval`.
///
/// Every worker of a process shares the start instant, so their sources close the same epoch
/// at about the same moment (less time waiting for alignment); processes differ by their
/// start-up skew, which the frontier absorbs. A source that was busy or asleep over several
/// boundaries skips the epochs in between.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EpochClock {
    start: Instant,
    interval: Duration,
}

impl EpochClock {
    pub(crate) fn new(start: Instant, interval: Duration) -> Self {
        EpochClock {
            start,
            // A zero interval would divide by zero; a millisecond is already far more progress
            // traffic than any job needs.
            interval: interval.max(Duration::from_millis(1)),
        }
    }

    /// The epoch at `now`.
    #[inline]
    pub(crate) fn epoch_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        u64::try_from(elapsed / self.interval.as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long from `now` until the epoch after `epoch` starts.
    pub(crate) fn until_after(&self, epoch: u64, now: Instant) -> Duration {
        let next = self
            .interval
            .checked_mul(u32::try_from(epoch.saturating_add(1)).unwrap_or(u32::MAX))
            .and_then(|d| self.start.checked_add(d));
        next.map_or(self.interval, |at| at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::progress::Antichain;

    #[test]
    fn meet_is_the_coordinatewise_minimum() {
        let mut a = Antichain::new();
        a.insert(Product::new(3u64, 100u64));
        a.insert(Product::new(5, 50));
        assert_eq!(meet(a.borrow()), Some(Product::new(3, 50)));
        assert_eq!(meet(Antichain::<Time>::new().borrow()), None);
    }

    #[test]
    fn epochs_follow_the_interval() {
        let start = Instant::now();
        let clock = EpochClock::new(start, Duration::from_millis(10));
        assert_eq!(clock.epoch_at(start), 0);
        assert_eq!(clock.epoch_at(start + Duration::from_millis(25)), 2);
        assert_eq!(
            clock.until_after(2, start + Duration::from_millis(25)),
            Duration::from_millis(5)
        );
        // Before the start (another worker's clock): epoch 0, not a panic.
        assert_eq!(
            EpochClock::new(start + Duration::from_secs(1), Duration::ZERO).epoch_at(start),
            0
        );
    }
}
