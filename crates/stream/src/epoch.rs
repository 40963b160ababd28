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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Epoch numbers as a function of wall time: `base + shift + elapsed since the job started
/// / interval`.
///
/// Every worker of a process shares the start instant, so their sources close the same epoch
/// at about the same moment (less time waiting for alignment); processes differ by their
/// start-up skew, which the frontier absorbs. A source that was busy or asleep over several
/// boundaries skips the epochs in between.
///
/// `base` is where a restored job starts: after the epoch of the checkpoint it was restored
/// from, so that no epoch whose output was committed recurs (epochs end up in deduplication
/// ids; a crashed run's epochs after its last checkpoint recur, but committed nothing). `shift` moves the clock forward when a checkpoint is triggered by hand; it is shared
/// by every clone in the process.
#[derive(Clone, Debug)]
pub(crate) struct EpochClock {
    start: Instant,
    interval: Duration,
    base: u64,
    shift: Arc<AtomicU64>,
}

impl EpochClock {
    #[cfg(test)]
    pub(crate) fn new(start: Instant, interval: Duration) -> Self {
        Self::starting_at(start, interval, 0)
    }

    /// A clock whose first epoch is `base`.
    pub(crate) fn starting_at(start: Instant, interval: Duration, base: u64) -> Self {
        EpochClock {
            start,
            // A zero interval would divide by zero; a millisecond is already far more progress
            // traffic than any job needs.
            interval: interval.max(Duration::from_millis(1)),
            base,
            shift: Arc::default(),
        }
    }

    fn offset(&self) -> u64 {
        self.base.saturating_add(self.shift.load(Ordering::Relaxed))
    }

    /// The epoch at `now`.
    #[inline]
    pub(crate) fn epoch_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        u64::try_from(elapsed / self.interval.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(self.offset())
    }

    /// How long from `now` until the epoch after `epoch` starts.
    pub(crate) fn until_after(&self, epoch: u64, now: Instant) -> Duration {
        let Some(ticks) = epoch.saturating_add(1).checked_sub(self.offset()) else {
            return Duration::ZERO;
        };
        let next = self
            .interval
            .checked_mul(u32::try_from(ticks).unwrap_or(u32::MAX))
            .and_then(|d| self.start.checked_add(d));
        next.map_or(self.interval, |at| at.saturating_duration_since(now))
    }

    /// Moves the clock forward so that the epoch starting now is the next checkpoint epoch
    /// (one with `e % every == every - 1`) after the current one; returns it.
    pub(crate) fn jump_to_checkpoint(&self, now: Instant, every: u64) -> u64 {
        let every = every.max(1);
        let current = self.epoch_at(now);
        let next = current.saturating_add(1);
        let target = next.saturating_add((every - 1 + every - next % every) % every);
        self.shift.fetch_add(target - current, Ordering::Relaxed);
        target
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
        // A restored clock starts after its checkpoint; a trigger jumps to a checkpoint epoch.
        let restored = EpochClock::starting_at(start, Duration::from_millis(10), 100);
        assert_eq!(restored.epoch_at(start + Duration::from_millis(25)), 102);
        assert_eq!(
            restored.until_after(102, start + Duration::from_millis(25)),
            Duration::from_millis(5)
        );
        assert_eq!(restored.jump_to_checkpoint(start, 10), 109);
        assert_eq!(restored.epoch_at(start), 109);
        assert_eq!(restored.clone().jump_to_checkpoint(start, 10), 119);
        assert_eq!(restored.epoch_at(start), 119);
        // Before the start (another worker's clock): epoch 0, not a panic.
        assert_eq!(
            EpochClock::new(start + Duration::from_secs(1), Duration::ZERO).epoch_at(start),
            0
        );
    }
}
