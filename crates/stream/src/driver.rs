//! The operator driver: the one frontier-and-timer loop behind every stateful keyed operator
//! (running aggregates, `aggregate`, `process`, time and count windows).
//!
//! An operator implements `Operator`'s lifecycle hooks — `open`, `element` (a batch),
//! `timer`, `input_ended`, `snapshot`/`restore`, `close` — as Arroyo's and Flink's operators
//! do; the `Driver` decides when each is called. It owns:
//!
//! - **Alignment.** Input is stashed by its time `(epoch, frontier)` and handled only once
//!   the input frontier allows: a batch of epoch `e` waits until every earlier epoch is
//!   complete at this operator, so records of a later epoch are never mixed into the state of
//!   an earlier one (Flink's barrier alignment). Batches are handled in `(epoch, frontier)`
//!   order.
//! - **Watermark order** (for `Operator::ORDERED` operators). Within the current epoch a
//!   batch also waits for the event-time frontier to reach its own, and the event-time timers
//!   due before it fire first, as Flink interleaves records and watermarks. The frontier the
//!   operator is at (timers below it have fired) is the minimum over the batch being handled,
//!   the input frontier and everything still stashed, so it never passes a record not yet
//!   handled; when one source alone feeds the operator that is exactly the batch's own
//!   frontier, as before epochs existed. Lateness stays judged against the frontier a record
//!   was emitted under (see the crate's "Time model").
//! - **Capabilities.** One capability per output, held at the meet of the input frontier and
//!   the stash. Element output goes out at the batch's time; timer output at the timer's time
//!   (or the current one), in the epoch being handled.
//! - **Processing time.** The clock is read once per activation; processing-time timers fire
//!   when it passes them, and the operator is re-activated for the earliest one.
//! - **Checkpoints.** When epochs complete (before any record of a later epoch is touched)
//!   the [`CheckpointPolicy`](crate::CheckpointPolicy) may ask for a snapshot: the operator's
//!   state and the timers, per key group.
//!
//! The driver is independent of timely (outputs go through `Emit`), so the tests below run
//! operators through scripted frontiers and compare a restored run with an uninterrupted one.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use timely::communication::Pull;
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::dataflow::channels::Message;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::InputHandleCore;
use timely::dataflow::operators::generic::{OutputBuilder, OutputBuilderSession};
use timely::dataflow::operators::Capability;
use timely::order::Product;
use timely::progress::frontier::MutableAntichain;
use timely::scheduling::Activator;

use crate::checkpoint::{decode, encode, Checkpointing, KeyGroupState, SnapshotState};
use crate::completion::Notice;
use crate::env::{JobEnv, Reporter};
use crate::epoch::{meet, Time};
use crate::error::{CheckpointError, StateError, StreamError};
use crate::keygroup::KeyGroups;
use crate::stream::{Builder, Inner};
use crate::timers::{Namespace, Timer, TimerService};
use crate::types::{Data, Key};
use crate::window::TimeDomain;

/// Milliseconds since the Unix epoch: processing time.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stateful keyed operator, as the driver sees it.
pub(crate) trait Operator: 'static {
    /// Input records.
    type In: Data;
    /// Output records.
    type Out: Data;
    /// The key state and timers are kept under.
    type Key: Key;
    /// Tells a key's timers apart (Flink's timer namespace).
    type Ns: Namespace;
    /// True if records must be handled in watermark order with event-time timers in between
    /// (process functions, time windows). False for operators that only need epoch
    /// alignment (running aggregates, count windows): they handle a batch as soon as its
    /// epoch is the current one, in arrival order.
    const ORDERED: bool;

    /// Called once before anything else, with the worker's place in the job.
    fn open(&mut self, _worker: usize, _groups: &KeyGroups) {}
    /// Handles a batch of records (all of one time); drains `batch`.
    fn element(&mut self, batch: &mut Vec<(u64, Self::In)>, cx: &mut Ctx<'_, Self>);
    /// A timer came due.
    fn timer(&mut self, _timer: Timer<Self::Key, Self::Ns>, _cx: &mut Ctx<'_, Self>) {}
    /// The input ended, after every remaining timer fired.
    fn input_ended(&mut self, _cx: &mut Ctx<'_, Self>) {}
    /// The operator's state, per key group (timers are the driver's).
    fn snapshot(&self, groups: &KeyGroups) -> Result<BTreeMap<u32, Vec<u8>>, StateError>;
    /// Adds one key group's state written by [`Self::snapshot`].
    fn restore(&mut self, group: &[u8]) -> Result<(), StateError>;
    /// Checkpoints go to storage: remember changes between snapshots from now on.
    fn track_changes(&mut self) {}
    /// What changed since the previous snapshot, per key group, if the operator can tell
    /// (see [`crate::StateBackend::snapshot_key_group_changes`]).
    fn snapshot_changes(
        &self,
        _groups: &KeyGroups,
    ) -> Result<Option<BTreeMap<u32, Vec<u8>>>, StateError> {
        Ok(None)
    }
    /// A snapshot (full or of changes) was taken.
    fn snapshot_taken(&mut self) {}
    /// Applies one key group's changes written by [`Self::snapshot_changes`].
    fn restore_changes(&mut self, _group: &[u8]) -> Result<(), StateError> {
        Err(StateError::Decode(
            "this operator cannot restore changes".into(),
        ))
    }
    /// Called once, after the input ended and everything was emitted.
    fn close(&mut self) {}
}

/// The [`Operator`] state hooks of an operator whose keyed state is the
/// [`crate::StateBackend`] in field `$field`.
macro_rules! state_in {
    ($field:ident) => {
        fn snapshot(
            &self,
            groups: &$crate::keygroup::KeyGroups,
        ) -> Result<std::collections::BTreeMap<u32, Vec<u8>>, $crate::error::StateError> {
            self.$field.snapshot_key_groups(groups)
        }
        fn restore(&mut self, group: &[u8]) -> Result<(), $crate::error::StateError> {
            self.$field.restore_key_group(group)
        }
        fn track_changes(&mut self) {
            self.$field.track_changes();
        }
        fn snapshot_changes(
            &self,
            groups: &$crate::keygroup::KeyGroups,
        ) -> Result<Option<std::collections::BTreeMap<u32, Vec<u8>>>, $crate::error::StateError> {
            self.$field.snapshot_key_group_changes(groups)
        }
        fn snapshot_taken(&mut self) {
            self.$field.snapshot_taken();
        }
        fn restore_changes(&mut self, group: &[u8]) -> Result<(), $crate::error::StateError> {
            self.$field.restore_key_group_changes(group)
        }
    };
}
pub(crate) use state_in;

/// What an operator hook sees: time, timers and outputs.
pub(crate) struct Ctx<'a, Op: Operator + ?Sized> {
    /// The operator's timers.
    pub(crate) timers: &'a mut TimerService<Op::Key, Op::Ns>,
    out: &'a mut Vec<(u64, Op::Out)>,
    out_now: &'a mut Vec<(u64, Op::Out)>,
    late: &'a mut Vec<(u64, Op::In)>,
    frontier: Option<u64>,
    batch_frontier: u64,
    now: u64,
}

impl<Op: Operator + ?Sized> Ctx<'_, Op> {
    /// Emits a record with event timestamp `ts`. From `element` it travels at the batch's
    /// time; from a timer at `ts` (if the operator's time allows), so that downstream it is
    /// not late.
    #[inline]
    pub(crate) fn emit(&mut self, ts: u64, value: Op::Out) {
        self.out.push((ts, value));
    }

    /// Emits a record that travels at the operator's current time whatever its timestamp
    /// (processing-time results, whose wall-clock timestamps must not move the watermark).
    pub(crate) fn emit_now(&mut self, ts: u64, value: Op::Out) {
        self.out_now.push((ts, value));
    }

    /// The output buffer itself, for tight loops.
    #[inline]
    pub(crate) fn out(&mut self) -> &mut Vec<(u64, Op::Out)> {
        self.out
    }

    /// The timers and the output buffer at once (a process function's context holds both).
    pub(crate) fn timers_and_out(&mut self) -> TimersAndOut<'_, Op> {
        (self.timers, self.out)
    }

    /// Sends an input record to the late side output.
    pub(crate) fn late(&mut self, ts: u64, value: Op::In) {
        self.late.push((ts, value));
    }

    /// The event-time frontier the operator is at: timers below it have fired (`u64::MAX`
    /// once the input ended).
    pub(crate) fn frontier(&self) -> u64 {
        self.frontier.unwrap_or(u64::MAX)
    }

    /// The event-time watermark: `frontier - 1`, or `u64::MAX` once the input ended.
    pub(crate) fn watermark(&self) -> u64 {
        self.frontier.map_or(u64::MAX, |f| f.saturating_sub(1))
    }

    /// The frontier the batch being handled was emitted under: its records are late if
    /// their timestamps are below it. Equals [`Self::frontier`] in timers.
    pub(crate) fn batch_frontier(&self) -> u64 {
        self.batch_frontier
    }

    /// True in the final round of timers, after the input ended.
    pub(crate) fn input_ended(&self) -> bool {
        self.frontier.is_none()
    }

    /// Processing time (ms since the Unix epoch), read once per activation.
    pub(crate) fn now(&self) -> u64 {
        self.now
    }
}

/// An operator's timers and output buffer, borrowed together.
pub(crate) type TimersAndOut<'a, Op> = (
    &'a mut TimerService<<Op as Operator>::Key, <Op as Operator>::Ns>,
    &'a mut Vec<(u64, <Op as Operator>::Out)>,
);

/// Where the driver sends output; implementations leave the vectors empty.
pub(crate) trait Emit<O, I> {
    /// Main output at `time`.
    fn give(&mut self, time: Time, data: &mut Vec<(u64, O)>);
    /// Late side output at `time` (dropped if the operator has none).
    fn give_late(&mut self, time: Time, data: &mut Vec<(u64, I)>);
}

/// Runs one [`Operator`]; see the module docs.
pub(crate) struct Driver<Op: Operator> {
    op: Op,
    stash: BTreeMap<Time, Vec<(u64, Op::In)>>,
    // How many stash keys have each frontier: the stash's lowest frontier in O(log n).
    stash_frontiers: BTreeMap<u64, usize>,
    timers: TimerService<Op::Key, Op::Ns>,
    out: Vec<(u64, Op::Out)>,
    out_now: Vec<(u64, Op::Out)>,
    late: Vec<(u64, Op::In)>,
    /// This activation's input frontier (its meet); `None` once the input ended.
    bound: Option<Time>,
    /// The event-time frontier the operator is at.
    frontier: u64,
    /// The epoch being handled: output goes out in it.
    epoch: u64,
    /// Where the capabilities are.
    hold: Time,
    /// Epochs below this were offered to the checkpoint policy.
    checked: u64,
    now: u64,
    groups: KeyGroups,
    worker: usize,
    checkpoint: Option<Checkpointing>,
    /// With storage: the parts of this run the next snapshot of changes stands on.
    chain: Option<Chain>,
    closed: bool,
}

/// An incremental checkpoint chain: a full snapshot, then the changes since each previous
/// part. Each checkpoint writes only what changed; restoring reads the chain.
#[derive(Debug, Default)]
struct Chain {
    /// The `from` epochs of the chain's parts, oldest (the full one) first.
    parts: Vec<u64>,
    /// Bytes of the full snapshot, and of the changes written since.
    full: usize,
    changes: usize,
}

impl Chain {
    /// Chains longer than this restart with a full snapshot (bounds the files a restore
    /// reads).
    const MAX_PARTS: usize = 64;

    /// Another part of changes, or a full snapshot? Once the changes add up to the full
    /// snapshot's size, a new full one costs no more than the changes already written, and
    /// restore never reads more than about twice the state.
    fn takes_changes(&self) -> bool {
        self.changes < self.full.max(1) && self.parts.len() < Self::MAX_PARTS
    }
}

impl<Op: Operator> Driver<Op> {
    pub(crate) fn new(
        mut op: Op,
        worker: usize,
        groups: KeyGroups,
        checkpoint: Option<Checkpointing>,
    ) -> Self {
        op.open(worker, &groups);
        if checkpoint.as_ref().is_some_and(Checkpointing::is_stored) {
            op.track_changes();
        }
        Driver {
            op,
            stash: BTreeMap::new(),
            stash_frontiers: BTreeMap::new(),
            timers: TimerService::default(),
            out: Vec::new(),
            out_now: Vec::new(),
            late: Vec::new(),
            bound: Some(Product::new(0, 0)),
            frontier: 0,
            epoch: 0,
            hold: Product::new(0, 0),
            checked: 0,
            now: 0,
            groups,
            worker,
            checkpoint,
            chain: None,
            closed: false,
        }
    }

    /// Where the capabilities are held.
    pub(crate) fn hold(&self) -> Time {
        self.hold
    }

    /// Starts an activation: `bound` is the meet of the input frontier (`None`: the input
    /// ended), `now` the processing time. Handles the stashed batches the frontier now
    /// allows.
    pub(crate) fn begin(
        &mut self,
        bound: Option<Time>,
        now: u64,
        em: &mut impl Emit<Op::Out, Op::In>,
    ) -> Result<(), StreamError> {
        self.bound = bound;
        self.now = now;
        while let Some((&t, _)) = self.stash.first_key_value() {
            if !self.processable(t) {
                break;
            }
            let Some(mut data) = self.stash.remove(&t) else {
                break;
            };
            self.unstash_frontier(t.inner);
            self.process(t, &mut data, em)?;
        }
        Ok(())
    }

    /// A batch pulled from the input in this activation (its time is not below `bound`).
    #[inline]
    pub(crate) fn batch(
        &mut self,
        t: Time,
        data: &mut Vec<(u64, Op::In)>,
        em: &mut impl Emit<Op::Out, Op::In>,
    ) -> Result<(), StreamError> {
        if self.closed {
            data.clear();
            return Ok(());
        }
        // `begin` handled every stashed batch the frontier allows; what is left sorts after
        // any input that is allowed now, so handling it at once keeps (epoch, frontier) order.
        if self.processable(t) {
            return self.process(t, data, em);
        }
        match self.stash.entry(t) {
            Entry::Vacant(v) => {
                *self.stash_frontiers.entry(t.inner).or_default() += 1;
                v.insert(std::mem::take(data));
            }
            Entry::Occupied(mut o) => o.get_mut().append(data),
        }
        Ok(())
    }

    /// Ends an activation: completes epochs, fires due timers, and returns where to hold
    /// the capabilities (`None`: the input ended and everything was emitted — drop them).
    pub(crate) fn finish(
        &mut self,
        em: &mut impl Emit<Op::Out, Op::In>,
    ) -> Result<Option<Time>, StreamError> {
        if self.closed {
            return Ok(None);
        }
        match self.bound {
            Some(b) => {
                // Every stashed batch of an epoch below the bound was processable, so those
                // epochs are complete and handled: a snapshot now sees exactly them.
                if b.outer > self.checked {
                    self.checkpoint_through(b.outer)?;
                }
                self.epoch = self.epoch.max(b.outer);
                let stashed = self.stash_frontiers.keys().next().copied();
                let f = stashed.map_or(b.inner, |s| s.min(b.inner));
                self.frontier = self.frontier.max(f);
                self.fire(false, em);
                self.hold = Product::new(self.hold.outer.max(b.outer), self.hold.inner.max(f));
                Ok(Some(self.hold))
            }
            None => self.end_of_input(em),
        }
    }

    /// The input ended: fire everything (unless a stopped job with checkpoints keeps it for
    /// its savepoint), write the final checkpoint part, close. Out of line: it runs once,
    /// and kept apart it leaves the per-activation path as small as it was.
    #[cold]
    #[inline(never)]
    fn end_of_input(
        &mut self,
        em: &mut impl Emit<Op::Out, Op::In>,
    ) -> Result<Option<Time>, StreamError> {
        // A stopped job with checkpoints is not drained: what has not fired stays in the
        // savepoint and fires in the restored job.
        let stopping = self
            .checkpoint
            .as_ref()
            .is_some_and(Checkpointing::stopping);
        if !stopping {
            self.fire(true, em);
            let mut cx = Ctx::<Op> {
                timers: &mut self.timers,
                out: &mut self.out,
                out_now: &mut self.out_now,
                late: &mut self.late,
                frontier: None,
                batch_frontier: u64::MAX,
                now: self.now,
            };
            self.op.input_ended(&mut cx);
            self.flush_timer_output(em);
        }
        if let Some(cp) = self.checkpoint.as_ref().filter(|c| c.is_stored()) {
            let groups = self.snapshot()?;
            let from = self.checked.max(self.epoch);
            cp.store_final(from, SnapshotState::KeyGroups(groups));
        }
        self.op.close();
        self.closed = true;
        Ok(None)
    }

    /// The earliest processing-time timer (ms since the Unix epoch), if any.
    pub(crate) fn next_wakeup(&self) -> Option<u64> {
        if self.closed {
            return None;
        }
        self.timers.processing.earliest()
    }

    #[inline]
    fn processable(&self, t: Time) -> bool {
        match self.bound {
            None => true,
            Some(b) if Op::ORDERED => {
                t.outer < b.outer || (t.outer == b.outer && t.inner <= b.inner)
            }
            Some(b) => t.outer <= b.outer,
        }
    }

    fn unstash_frontier(&mut self, f: u64) {
        if let Entry::Occupied(mut o) = self.stash_frontiers.entry(f) {
            *o.get_mut() -= 1;
            if *o.get() == 0 {
                o.remove();
            }
        }
    }

    fn process(
        &mut self,
        t: Time,
        data: &mut Vec<(u64, Op::In)>,
        em: &mut impl Emit<Op::Out, Op::In>,
    ) -> Result<(), StreamError> {
        if t.outer > self.checked {
            self.checkpoint_through(t.outer)?;
        }
        self.epoch = self.epoch.max(t.outer);
        if Op::ORDERED {
            let mut f = t.inner;
            if let Some(b) = self.bound {
                f = f.min(b.inner);
            }
            if let Some(&s) = self.stash_frontiers.keys().next() {
                f = f.min(s);
            }
            self.frontier = self.frontier.max(f);
            self.fire(false, em);
        }
        let mut cx = Ctx::<Op> {
            timers: &mut self.timers,
            out: &mut self.out,
            out_now: &mut self.out_now,
            late: &mut self.late,
            frontier: Some(self.frontier),
            batch_frontier: t.inner,
            now: self.now,
        };
        self.op.element(data, &mut cx);
        em.give(t, &mut self.out);
        em.give(t, &mut self.out_now);
        em.give_late(t, &mut self.late);
        Ok(())
    }

    /// Fires due timers: event time below the frontier, processing time up to now; all of
    /// them if `last` (the input ended).
    fn fire(&mut self, last: bool, em: &mut impl Emit<Op::Out, Op::In>) {
        let event_bound = (!last).then_some(self.frontier);
        let proc_bound = (!last).then_some(self.now.saturating_add(1));
        let mut fired = false;
        loop {
            let (domain, (ts, (key, ns))) =
                if let Some(t) = self.timers.event.pop_before(event_bound) {
                    (TimeDomain::EventTime, t)
                } else if let Some(t) = self.timers.processing.pop_before(proc_bound) {
                    (TimeDomain::ProcessingTime, t)
                } else {
                    break;
                };
            let mut cx = Ctx::<Op> {
                timers: &mut self.timers,
                out: &mut self.out,
                out_now: &mut self.out_now,
                late: &mut self.late,
                frontier: (!last).then_some(self.frontier),
                batch_frontier: self.frontier,
                now: self.now,
            };
            self.op.timer(
                Timer {
                    domain,
                    ts,
                    key,
                    ns,
                },
                &mut cx,
            );
            fired = true;
        }
        if fired {
            self.flush_timer_output(em);
        }
    }

    /// Sends what timers emitted: each record at its own timestamp (not below the held
    /// time), `emit_now` records at the held time, all in the current epoch.
    fn flush_timer_output(&mut self, em: &mut impl Emit<Op::Out, Op::In>) {
        let (epoch, floor) = (self.epoch, self.hold.inner);
        let mut run: Vec<(u64, Op::Out)> = Vec::new();
        let mut run_time: Option<Time> = None;
        for (ts, v) in self.out.drain(..) {
            let time = Product::new(epoch, ts.max(floor));
            if run_time != Some(time) {
                if let Some(t) = run_time {
                    em.give(t, &mut run);
                }
                run_time = Some(time);
            }
            run.push((ts, v));
        }
        if let Some(t) = run_time {
            em.give(t, &mut run);
        }
        let now = Product::new(epoch, floor);
        em.give(now, &mut self.out_now);
        em.give_late(now, &mut self.late);
    }

    /// Epochs `checked..upto` are complete and handled: snapshot if the policy asks.
    #[inline(never)]
    fn checkpoint_through(&mut self, upto: u64) -> Result<(), StreamError> {
        let completed = self.checked..upto;
        self.checked = upto;
        let Some(cp) = &self.checkpoint else {
            return Ok(());
        };
        let Some(due) = cp.due(completed) else {
            return Ok(());
        };
        if !cp.is_stored() {
            let groups = self.snapshot()?;
            return cp.store(due, SnapshotState::KeyGroups(groups)).map(|_| ());
        }
        // To storage: the changes since the previous part when the chain allows it.
        let chain = self.chain.take().filter(Chain::takes_changes);
        let changes = match &chain {
            Some(_) => self.snapshot_changes()?,
            None => None,
        };
        let (state, chain) = match (changes, chain) {
            (Some(groups), Some(mut chain)) => {
                let earlier = chain.parts.clone();
                chain.parts.push(due.from);
                chain.changes += groups.values().map(Vec::len).sum::<usize>();
                (SnapshotState::KeyGroupsChanges { groups, earlier }, chain)
            }
            _ => {
                let groups = self.snapshot()?;
                let chain = Chain {
                    parts: vec![due.from],
                    full: groups.values().map(Vec::len).sum(),
                    changes: 0,
                };
                (SnapshotState::KeyGroups(groups), chain)
            }
        };
        self.op.snapshot_taken();
        // A part that is not durable breaks the chain: the next one is full.
        if cp.store(due, state)? {
            self.chain = Some(chain);
        }
        Ok(())
    }

    /// Restores the key groups this worker owns now from the checkpoint the job was
    /// restored from (whichever old worker had them), if any.
    pub(crate) fn restore_checkpoint(&mut self) -> Result<(), StreamError> {
        let Some(cp) = self.checkpoint.clone() else {
            return Ok(());
        };
        let Some((id, parts)) = cp.restored() else {
            return Ok(());
        };
        let incompatible = |detail: String| CheckpointError::Incompatible { id, detail };
        // Each old worker's part, preceded by the chain it stands on (a full snapshot, then
        // changes); a key group came from exactly one old worker.
        let mut chain: Vec<(&[u8], bool)> = Vec::new();
        let mut last: Vec<(&[u8], bool)> = Vec::new();
        for (old, part) in parts.iter().enumerate() {
            let Some(part) = part else { continue };
            for (i, state) in cp
                .restored_earlier(old)
                .iter()
                .chain(std::iter::once(part))
                .enumerate()
            {
                let (groups, changes) = match state {
                    SnapshotState::KeyGroups(g) => (g, false),
                    SnapshotState::KeyGroupsChanges { groups, earlier } => {
                        if i == 0 || earlier.is_empty() {
                            return Err(incompatible(format!(
                                "{}: changes without the full snapshot they apply on",
                                cp.operator()
                            ))
                            .into());
                        }
                        (groups, true)
                    }
                    _ => {
                        return Err(
                            incompatible(format!("{} holds no keyed state", cp.operator())).into(),
                        )
                    }
                };
                let mine = groups
                    .iter()
                    .filter(|(g, _)| self.groups.worker_of(**g) == self.worker)
                    .map(|(_, b)| (b.as_slice(), changes));
                if std::ptr::eq(state, part) {
                    last.extend(mine);
                } else {
                    chain.extend(mine);
                }
            }
        }
        self.restore_chain(id, chain, last)?;
        Ok(())
    }

    /// What changed since the previous snapshot, with the timers in full, per key group; `None`
    /// if the operator cannot tell. Every group of this worker is there, so that a group
    /// whose timers are gone has them replaced by none.
    fn snapshot_changes(&self) -> Result<Option<BTreeMap<u32, Vec<u8>>>, StateError> {
        let Some(mut state) = self.op.snapshot_changes(&self.groups)? else {
            return Ok(None);
        };
        let mut timers = self.timers.snapshot(&self.groups)?;
        (0..self.groups.count())
            .filter(|g| self.groups.worker_of(*g) == self.worker)
            .map(|g| {
                let s = state.remove(&g).unwrap_or_default();
                let t = timers.remove(&g).unwrap_or_default();
                Ok((g, encode(&KeyGroupState(self.frontier, s, t))?))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// The operator's state and timers, per key group. Each group also records the
    /// operator's event-time frontier: it says which windows have already fired.
    pub(crate) fn snapshot(&self) -> Result<BTreeMap<u32, Vec<u8>>, StateError> {
        let mut state = self.op.snapshot(&self.groups)?;
        let mut timers = self.timers.snapshot(&self.groups)?;
        let groups: std::collections::BTreeSet<u32> =
            state.keys().chain(timers.keys()).copied().collect();
        groups
            .into_iter()
            .map(|g| {
                let s = state.remove(&g).unwrap_or_default();
                let t = timers.remove(&g).unwrap_or_default();
                Ok((g, encode(&KeyGroupState(self.frontier, s, t))?))
            })
            .collect()
    }

    /// Restores key groups snapshotted at the end of `epoch` into a fresh operator, which
    /// then continues with the records of later epochs. Groups from several workers (a
    /// restore at another parallelism) resume at the highest of their frontiers: a window
    /// that fired on any of them counts as fired (it may fire once more, never not at all).
    #[cfg(test)]
    pub(crate) fn restore<'a>(
        &mut self,
        epoch: u64,
        groups: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), StateError> {
        self.restore_chain(epoch, Vec::new(), groups.map(|g| (g, false)).collect())
    }

    /// [`Self::restore`] of the key groups of the parts incremental chains end with
    /// (`last`), after those of the parts before them (`chain`, in order); each group is a
    /// full snapshot (`false`) or changes (`true`). Timers are in full in every part: they
    /// come from `last` only.
    fn restore_chain(
        &mut self,
        epoch: u64,
        chain: Vec<(&[u8], bool)>,
        last: Vec<(&[u8], bool)>,
    ) -> Result<(), StateError> {
        for (bytes, changes) in chain {
            let KeyGroupState(frontier, state, _) = decode(bytes)?;
            self.frontier = self.frontier.max(frontier);
            self.restore_state(&state, changes)?;
        }
        let mut timers = Vec::new();
        for (bytes, changes) in last {
            let KeyGroupState(frontier, state, t) = decode(bytes)?;
            self.frontier = self.frontier.max(frontier);
            self.restore_state(&state, changes)?;
            if !t.is_empty() {
                timers.push(t);
            }
        }
        self.timers.restore(timers.iter().map(Vec::as_slice))?;
        // Everything from here on belongs to the epochs after the checkpoint, including
        // timers that were due but had not fired yet when it was taken.
        self.checked = self.checked.max(epoch.saturating_add(1));
        self.epoch = self.epoch.max(epoch.saturating_add(1));
        Ok(())
    }

    fn restore_state(&mut self, state: &[u8], changes: bool) -> Result<(), StateError> {
        match (state.is_empty(), changes) {
            (true, _) => Ok(()),
            (false, false) => self.op.restore(state),
            (false, true) => self.op.restore_changes(state),
        }
    }
}

/// Outputs of a keyed operator built by [`keyed_operator`].
pub(crate) struct Built<'s, O, I> {
    pub(crate) main: Inner<'s, O>,
    pub(crate) late: Option<Inner<'s, I>>,
}

/// Builds `op` into the dataflow on every worker: input exchanged by `pact` (by key), a main
/// output and (if `with_late`) a late side output.
pub(crate) fn keyed_operator<'s, Op: Operator, P>(
    env: &JobEnv<'s>,
    input: Inner<'s, Op::In>,
    pact: P,
    name: &str,
    op: Op,
    with_late: bool,
) -> Built<'s, Op::Out, Op::In>
where
    P: ParallelizationContract<Time, Vec<(u64, Op::In)>>,
{
    let scope = env.scope;
    let mut builder = OperatorBuilder::new(name.to_owned(), scope);
    let info = builder.operator_info();
    let input = builder.new_input(input, pact);
    let (main_out, main_stream) = builder.new_output::<Vec<(u64, Op::Out)>>();
    let main_out = OutputBuilder::<_, Builder<Op::Out>>::from(main_out);
    let (late_out, late_stream) = if with_late {
        let (o, s) = builder.new_output::<Vec<(u64, Op::In)>>();
        (Some(OutputBuilder::<_, Builder<Op::In>>::from(o)), Some(s))
    } else {
        (None, None)
    };
    let activator = scope.activator_for(info.address.clone());
    let checkpoint = env.checkpointing(name, &info.address);
    // With checkpoints in storage, a dataless output whose capability follows the others
    // tells the coordinator when this operator's parts are written, even if nothing
    // downstream of it reaches a sink.
    if checkpoint.as_ref().is_some_and(Checkpointing::is_stored) {
        let (_, parts) = builder.new_output::<Vec<Notice>>();
        env.registry.add_progress(parts);
    }
    let reporter = env.reporter();
    let (worker, groups) = (env.worker_index(), env.key_groups());
    builder.build(move |caps| -> Logic {
        let mut caps = caps.into_iter();
        let cap = caps.next();
        let late_cap = if with_late { caps.next() } else { None };
        let parts = caps.next();
        let mut driver = Driver::new(op, worker, groups, checkpoint);
        if let Err(e) = driver.restore_checkpoint() {
            reporter.report(e);
        }
        let running = Running {
            input,
            main_out,
            late_out,
            cap,
            late_cap,
            driver,
            activator,
            reporter,
        };
        // Two instances, so that the operator without checkpoint parts compiles exactly as
        // it would without them.
        match parts {
            Some(p) => Box::new(running.logic(Some(p))),
            None => Box::new(running.logic(())),
        }
    });
    Built {
        main: main_stream,
        late: late_stream,
    }
}

/// An operator's activation logic, as timely runs it.
type Logic = Box<dyn FnMut(&[MutableAntichain<Time>])>;

/// A capability held beside the outputs' and moved with them: the progress of the
/// operator's checkpoint parts, or `()` when there are none.
trait Held: 'static {
    fn downgrade(&mut self, hold: &Time);
    fn release(&mut self);
}

impl Held for () {
    #[inline(always)]
    fn downgrade(&mut self, _hold: &Time) {}
    #[inline(always)]
    fn release(&mut self) {}
}

impl Held for Option<Capability<Time>> {
    fn downgrade(&mut self, hold: &Time) {
        if let Some(c) = self.as_mut() {
            let _ = c.try_downgrade(hold);
        }
    }
    fn release(&mut self) {
        *self = None;
    }
}

/// What a keyed operator's activations work on.
struct Running<Op: Operator, Pl: Pull<Message<Time, Vec<(u64, Op::In)>>>> {
    input: InputHandleCore<Time, Vec<(u64, Op::In)>, Pl>,
    main_out: OutputBuilder<Time, Builder<Op::Out>>,
    late_out: Option<OutputBuilder<Time, Builder<Op::In>>>,
    cap: Option<Capability<Time>>,
    late_cap: Option<Capability<Time>>,
    driver: Driver<Op>,
    activator: Activator,
    reporter: Reporter,
}

impl<Op: Operator, Pl: Pull<Message<Time, Vec<(u64, Op::In)>>> + 'static> Running<Op, Pl> {
    /// One activation: input through the driver, outputs, capabilities, wake-ups.
    fn logic<H: Held>(self, mut held: H) -> impl FnMut(&[MutableAntichain<Time>]) + 'static {
        let Running {
            mut input,
            mut main_out,
            mut late_out,
            mut cap,
            mut late_cap,
            mut driver,
            activator,
            reporter,
        } = self;
        // When a wake-up for processing-time timers is already due: scheduling one per
        // activation would pile up timely timers on a busy operator.
        let mut wake_at: Option<u64> = None;
        move |frontiers| {
            let Some(c) = cap.as_mut() else {
                input.for_each(|_, data| data.clear());
                return;
            };
            let bound = meet(frontiers[0].frontier());
            let now = now_ms();
            let mut main = main_out.activate();
            let mut late = late_out.as_mut().map(|o| o.activate());
            let result = {
                let mut em = TimelyEmit {
                    cap: c,
                    main: &mut main,
                    late: late_cap.as_ref().zip(late.as_mut()),
                };
                let mut result = driver.begin(bound, now, &mut em);
                input.for_each(|incap, data| {
                    if result.is_err() {
                        data.clear();
                        return;
                    }
                    let t = stamp_meet(incap.stamp().iter()).unwrap_or(driver.hold());
                    result = driver.batch(t, data, &mut em);
                });
                result.and_then(|()| driver.finish(&mut em))
            };
            drop(main);
            drop(late);
            match result {
                Ok(Some(hold)) => {
                    // Never fails: the driver only moves the hold forward.
                    let _ = c.try_downgrade(&hold);
                    if let Some(lc) = late_cap.as_mut() {
                        let _ = lc.try_downgrade(&hold);
                    }
                    held.downgrade(&hold);
                    if wake_at.is_some_and(|w| w <= now) {
                        wake_at = None;
                    }
                    if let Some(t) = driver.next_wakeup() {
                        if wake_at.is_none_or(|w| t < w) {
                            activator.activate_after(Duration::from_millis(t.saturating_sub(now)));
                            wake_at = Some(t);
                        }
                    }
                }
                Ok(None) => {
                    cap = None;
                    late_cap = None;
                    held.release();
                }
                Err(e) => {
                    reporter.report(e);
                    cap = None;
                    late_cap = None;
                    held.release();
                }
            }
        }
    }
}

/// The time to handle a message at: the meet of its stamp (a single time, from our own
/// operators). `None` for an empty stamp.
fn stamp_meet<'a>(mut it: impl Iterator<Item = &'a Time>) -> Option<Time> {
    let first = *it.next()?;
    Some(it.fold(first, |m, t| {
        Product::new(m.outer.min(t.outer), m.inner.min(t.inner))
    }))
}

/// An output session and the capability it sends under.
type Port<'a, 'b, D> = (
    &'a Capability<Time>,
    &'a mut OutputBuilderSession<'b, Time, Builder<D>>,
);

struct TimelyEmit<'a, 'b, O: Data, I: Data> {
    cap: &'a Capability<Time>,
    main: &'a mut OutputBuilderSession<'b, Time, Builder<O>>,
    late: Option<Port<'a, 'b, I>>,
}

/// A capability for `time` (not below `cap`'s, which the driver guarantees; if it ever were,
/// the data goes out at `cap`'s time rather than panicking the worker).
fn at(cap: &Capability<Time>, time: Time) -> Option<Capability<Time>> {
    if *cap.time() == time {
        None
    } else {
        debug_assert!(timely::order::PartialOrder::less_equal(cap.time(), &time));
        Some(cap.try_delayed(&time).unwrap_or_else(|| cap.clone()))
    }
}

impl<O: Data, I: Data> Emit<O, I> for TimelyEmit<'_, '_, O, I> {
    #[inline]
    fn give(&mut self, time: Time, data: &mut Vec<(u64, O)>) {
        if data.is_empty() {
            return;
        }
        match at(self.cap, time) {
            None => self.main.session(self.cap).give_container(data),
            Some(c) => self.main.session(&c).give_container(data),
        }
        data.clear();
    }

    fn give_late(&mut self, time: Time, data: &mut Vec<(u64, I)>) {
        if data.is_empty() {
            return;
        }
        if let Some((cap, out)) = self.late.as_mut() {
            match at(cap, time) {
                None => out.session(*cap).give_container(data),
                Some(c) => out.session(&c).give_container(data),
            }
        }
        data.clear();
    }
}

#[cfg(test)]
mod tests;
