//! Watermark strategies: where event timestamps come from and how far the watermark trails.
//!
//! A source (or [`crate::DataStream::assign_timestamps_and_watermarks`]) holds a timely
//! capability at its *frontier* `F` (watermark `F - 1`) and sends every record under it; the
//! strategy decides how `F` follows the largest timestamp seen. The frontier is re-evaluated
//! after every record, so which records are late depends only on the input order — never on
//! batching, timing or parallelism. When the input ends the capability is dropped, which acts
//! as Flink's final `Long.MAX_VALUE` watermark: every pending event-time window fires.

use std::rc::Rc;

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    Monotonous,
    Bounded(u64),
}

/// How a source assigns event timestamps and generates watermarks (Flink's
/// `WatermarkStrategy`).
///
/// ```
/// use rill_stream::WatermarkStrategy;
/// use std::time::Duration;
/// // Records are (timestamp_ms, word); allow them to be up to 2 s out of order.
/// let s = WatermarkStrategy::<(u64, String)>::for_bounded_out_of_orderness(Duration::from_secs(2))
///     .with_timestamp_assigner(|r, _previous| r.0);
/// # let _ = s;
/// ```
pub struct WatermarkStrategy<T> {
    kind: Kind,
    assigner: Option<Assigner<T>>,
}

type Assigner<T> = Rc<dyn Fn(&T, u64) -> u64>;

impl<T> Clone for WatermarkStrategy<T> {
    fn clone(&self) -> Self {
        WatermarkStrategy {
            kind: self.kind,
            assigner: self.assigner.clone(),
        }
    }
}

impl<T> WatermarkStrategy<T> {
    /// No watermarks: event-time windows fire only when the input ends.
    pub fn no_watermarks() -> Self {
        WatermarkStrategy {
            kind: Kind::None,
            assigner: None,
        }
    }

    /// Timestamps never decrease: the watermark is the largest timestamp seen minus one.
    pub fn for_monotonous_timestamps() -> Self {
        WatermarkStrategy {
            kind: Kind::Monotonous,
            assigner: None,
        }
    }

    /// Records arrive at most `bound` late: watermark = largest timestamp − bound − 1 ms.
    pub fn for_bounded_out_of_orderness(bound: Duration) -> Self {
        WatermarkStrategy {
            kind: Kind::Bounded(duration_ms(bound)),
            assigner: None,
        }
    }

    /// Extracts a record's event timestamp (ms); the second argument is the timestamp the
    /// source attached, or 0.
    pub fn with_timestamp_assigner(mut self, f: impl Fn(&T, u64) -> u64 + 'static) -> Self {
        self.assigner = Some(Rc::new(f));
        self
    }
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a watermark generator needs to resume where it was: the largest timestamp seen and
/// the highest watermark emitted explicitly. Part of a source's checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkState {
    /// The largest timestamp seen (`None`: none yet).
    pub max_ts: Option<u64>,
    /// One above the highest explicit watermark (0: none).
    pub explicit: u64,
}

impl WatermarkState {
    /// The lowest of several generators' states: where one generator that takes over all
    /// their inputs resumes without turning late what none of them would have. Generators
    /// that saw nothing (finished or idle readers) have no say.
    ///
    /// ```
    /// use rill_stream::WatermarkState;
    /// let a = WatermarkState { max_ts: Some(50), explicit: 0 };
    /// let b = WatermarkState { max_ts: Some(30), explicit: 0 };
    /// let lowest = WatermarkState::lowest([a, WatermarkState::default(), b]);
    /// assert_eq!(lowest.max_ts, Some(30));
    /// ```
    pub fn lowest(states: impl IntoIterator<Item = WatermarkState>) -> WatermarkState {
        let mut it = states
            .into_iter()
            .filter(|s| *s != WatermarkState::default());
        let first = it.next().unwrap_or_default();
        it.fold(first, |a, b| WatermarkState {
            max_ts: a.max_ts.min(b.max_ts),
            explicit: a.explicit.min(b.explicit),
        })
    }
}

/// A strategy in action: the largest timestamp seen and the resulting frontier.
pub(crate) struct WatermarkGen<T> {
    strategy: WatermarkStrategy<T>,
    max_ts: Option<u64>,
    explicit: u64,
}

impl<T> WatermarkGen<T> {
    pub(crate) fn new(strategy: WatermarkStrategy<T>) -> Self {
        WatermarkGen {
            strategy,
            max_ts: None,
            explicit: 0,
        }
    }

    /// The state to checkpoint.
    pub(crate) fn state(&self) -> WatermarkState {
        WatermarkState {
            max_ts: self.max_ts,
            explicit: self.explicit,
        }
    }

    /// Resumes from a checkpoint.
    pub(crate) fn restore(&mut self, state: WatermarkState) {
        self.max_ts = state.max_ts;
        self.explicit = state.explicit;
    }

    /// The record's event timestamp; updates the largest timestamp seen.
    #[inline]
    pub(crate) fn stamp(&mut self, item: &T, attached: u64) -> u64 {
        let ts = match &self.strategy.assigner {
            Some(f) => f(item, attached),
            None => attached,
        };
        if self.strategy.kind != Kind::None {
            self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
        }
        ts
    }

    /// A watermark the source emitted itself (Flink's `SourceContext::emitWatermark`).
    pub(crate) fn explicit_watermark(&mut self, watermark: u64) {
        self.explicit = self.explicit.max(watermark.saturating_add(1));
    }

    /// The frontier: records with timestamps below it are late.
    #[inline]
    pub(crate) fn frontier(&self) -> u64 {
        let generated = match (self.strategy.kind, self.max_ts) {
            (Kind::None, _) | (_, None) => 0,
            (Kind::Monotonous, Some(m)) => m,
            (Kind::Bounded(b), Some(m)) => m.saturating_sub(b),
        };
        generated.max(self.explicit)
    }
}
