//! Published messages awaiting their confirms, kept for publishing again.
//!
//! Sinks number messages themselves (1, 2, ...); the broker numbers what it received on the
//! current channel. After a nack or a reconnection the same message goes out again under a
//! new broker number, so confirmation is tracked per message and reported as the highest
//! sink number with everything before it confirmed.

use crate::message::Outgoing;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug)]
struct Entry {
    msg: Outgoing,
    /// The broker's number for its latest publication; None while it waits to be (re)sent.
    wire: Option<u64>,
    confirmed: bool,
}

/// Every operation costs O(log n) at most in what is outstanding: sinks keep thousands of
/// messages in flight and call these once per message.
#[derive(Debug, Default)]
pub(crate) struct Unconfirmed {
    /// Sink number of `entries[0]`.
    first: u64,
    entries: VecDeque<Entry>,
    /// Sink numbers waiting to be (re)sent, in order.
    unsent: BTreeSet<u64>,
    /// Broker number → sink number, for what is out and unconfirmed.
    by_wire: BTreeMap<u64, u64>,
    /// Entries not confirmed.
    outstanding: u64,
}

impl Unconfirmed {
    pub(crate) fn new() -> Unconfirmed {
        Unconfirmed {
            first: 1,
            ..Unconfirmed::default()
        }
    }

    /// Adds a message to send; returns its sink number.
    pub(crate) fn push(&mut self, msg: Outgoing) -> u64 {
        self.entries.push_back(Entry {
            msg,
            wire: None,
            confirmed: false,
        });
        let seq = self.first + self.entries.len() as u64 - 1;
        self.unsent.insert(seq);
        self.outstanding += 1;
        seq
    }

    /// Messages waiting to be (re)sent, in sink order: (sink number, message).
    pub(crate) fn unsent(&self) -> impl Iterator<Item = (u64, &Outgoing)> + '_ {
        self.unsent
            .iter()
            .filter_map(|&seq| self.get(seq).map(|e| (seq, &e.msg)))
    }

    /// `seq` went out as the broker's number `wire`.
    pub(crate) fn sent(&mut self, seq: u64, wire: u64) {
        if let Some(e) = self.entry(seq) {
            e.wire = Some(wire);
            self.unsent.remove(&seq);
            self.by_wire.insert(wire, seq);
        }
    }

    /// Takes the broker numbers `wire` (and, with `multiple`, every one below) out of
    /// `by_wire`, returning their sink numbers.
    fn settle_wire(&mut self, wire: u64, multiple: bool) -> Vec<u64> {
        if multiple {
            let rest = self.by_wire.split_off(&wire.saturating_add(1));
            std::mem::replace(&mut self.by_wire, rest)
                .into_values()
                .collect()
        } else {
            self.by_wire.remove(&wire).into_iter().collect()
        }
    }

    /// A basic.ack from the broker.
    pub(crate) fn acked(&mut self, wire: u64, multiple: bool) {
        for seq in self.settle_wire(wire, multiple) {
            if let Some(e) = self.entry(seq) {
                if !e.confirmed {
                    e.confirmed = true;
                    self.outstanding -= 1;
                }
            }
        }
        self.trim();
    }

    /// A basic.nack: the broker did not take it; it goes out again.
    pub(crate) fn nacked(&mut self, wire: u64, multiple: bool) {
        for seq in self.settle_wire(wire, multiple) {
            if let Some(e) = self.entry(seq) {
                e.wire = None;
                self.unsent.insert(seq);
            }
        }
    }

    /// The channel is gone: everything unconfirmed goes out again on the next one.
    pub(crate) fn reset(&mut self) {
        self.by_wire.clear();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if !e.confirmed {
                e.wire = None;
                self.unsent.insert(self.first + i as u64);
            }
        }
    }

    /// The highest sink number confirmed together with all before it.
    pub(crate) fn confirmed_upto(&self) -> u64 {
        self.first - 1
    }

    /// Sink numbers given out and not confirmed.
    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding
    }

    fn get(&self, seq: u64) -> Option<&Entry> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.entries.get(i)
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.entries.get_mut(i)
    }

    fn trim(&mut self) {
        while self.entries.front().is_some_and(|e| e.confirmed) {
            self.entries.pop_front();
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(i: u64) -> Outgoing {
        Outgoing {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: Default::default(),
            body: Bytes::from(i.to_string()),
        }
    }

    fn send_all(u: &mut Unconfirmed, wire: &mut u64) {
        let unsent: Vec<u64> = u.unsent().map(|(s, _)| s).collect();
        for s in unsent {
            *wire += 1;
            u.sent(s, *wire);
        }
    }

    #[test]
    fn out_of_order_and_multiple_acks_report_a_prefix() {
        let mut u = Unconfirmed::new();
        let mut wire = 0;
        for i in 0..5 {
            assert_eq!(u.push(msg(i)), i + 1);
        }
        send_all(&mut u, &mut wire);
        u.acked(2, false);
        assert_eq!(u.confirmed_upto(), 0);
        u.acked(1, false);
        assert_eq!(u.confirmed_upto(), 2);
        u.acked(4, true);
        assert_eq!(u.confirmed_upto(), 4);
        assert_eq!(u.outstanding(), 1);
    }

    #[test]
    fn nacked_and_reset_messages_go_out_again_under_new_numbers() {
        let mut u = Unconfirmed::new();
        let mut wire = 0;
        for i in 0..4 {
            u.push(msg(i));
        }
        send_all(&mut u, &mut wire);
        u.nacked(2, false);
        assert_eq!(u.unsent().map(|(s, _)| s).collect::<Vec<_>>(), vec![2]);
        send_all(&mut u, &mut wire); // seq 2 is now wire 5
        u.acked(4, true); // 1, 3, 4 confirmed; 2 (wire 5) not
        assert_eq!(u.confirmed_upto(), 1);
        u.reset();
        assert_eq!(u.unsent().map(|(s, _)| s).collect::<Vec<_>>(), vec![2]);
        wire = 0; // a new channel numbers from 1 again
        send_all(&mut u, &mut wire);
        u.acked(1, false);
        assert_eq!(u.confirmed_upto(), 4);
        assert_eq!(u.outstanding(), 0);
    }
}
