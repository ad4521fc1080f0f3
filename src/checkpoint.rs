//! Which LSN is safe to report to Postgres as flushed.
//!
//! The slot's `confirmed_flush_lsn` is a promise that we never need anything
//! before it again: once reported, Postgres may recycle that WAL and will not
//! resend it. So the checkpoint only ever moves over a *prefix* of the stream in
//! which every published message has a positive confirm (the ordered-finalizer
//! idea): a confirm that arrives out of order is remembered, but the reported LSN
//! waits until every earlier message is confirmed too.
//!
//! The stream is a sequence of *deliveries* (one per published message, confirmed
//! or not) and *marks* (an LSN that becomes safe once everything before it is
//! confirmed: a transaction's end LSN after its last message, or the server's WAL
//! end from a keepalive while no transaction is open).
//!
//! This type does no I/O and knows nothing of the sink: the pipeline registers a
//! delivery when it hands a message to the sink and calls [`Checkpoint::confirm`]
//! when the sink's confirm resolves positively. A negative outcome is never fed
//! here: the pipeline fails instead, and replication restarts from the last
//! confirmed LSN.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies one published message awaiting its confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(u64);

#[derive(Debug)]
enum Entry {
    Delivery { confirmed: bool },
    Mark(Lsn),
}

#[derive(Debug)]
pub struct Checkpoint {
    /// Entries not yet behind the confirmed prefix; `queue[0]` has id `head_id`.
    queue: VecDeque<Entry>,
    head_id: u64,
    /// Unconfirmed deliveries in `queue` (the in-flight window).
    unconfirmed: usize,
    confirmed: Lsn,
}

impl Checkpoint {
    /// Starts from the LSN the slot already confirms (replication resumes there).
    pub fn new(start: Lsn) -> Self {
        Checkpoint {
            queue: VecDeque::new(),
            head_id: 0,
            unconfirmed: 0,
            confirmed: start,
        }
    }

    /// The highest LSN that is safe to report as flushed.
    pub fn confirmed_lsn(&self) -> Lsn {
        self.confirmed
    }

    /// Messages handed to the sink and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.unconfirmed
    }

    /// True when nothing is waiting: every delivery confirmed, every mark reached.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Registers a message that was just handed to the sink.
    pub fn register(&mut self) -> DeliveryId {
        let id = DeliveryId(self.head_id + self.queue.len() as u64);
        self.queue.push_back(Entry::Delivery { confirmed: false });
        self.unconfirmed += 1;
        id
    }

    /// Records that everything registered so far, once confirmed, makes `lsn`
    /// safe. Marks must be given in non-decreasing order; a lower one is ignored
    /// (a replayed keepalive can report an older WAL end).
    pub fn mark(&mut self, lsn: Lsn) {
        if let Some(Entry::Mark(last)) = self.queue.back_mut() {
            // Consecutive marks collapse: only the highest can ever matter.
            if lsn > *last {
                *last = lsn;
            }
        } else {
            self.queue.push_back(Entry::Mark(lsn));
        }
        self.advance();
    }

    /// A positive confirm for `id`. Returns the new confirmed LSN if it moved.
    ///
    /// Confirming an id twice, or one that was never registered, is a bug in the
    /// caller and is reported as an error rather than silently ignored.
    pub fn confirm(&mut self, id: DeliveryId) -> Result<Option<Lsn>, CheckpointError> {
        let idx =
            id.0.checked_sub(self.head_id)
                .ok_or(CheckpointError::UnknownDelivery(id.0))? as usize;
        match self.queue.get_mut(idx) {
            Some(Entry::Delivery { confirmed }) if !*confirmed => {
                *confirmed = true;
                self.unconfirmed -= 1;
            }
            _ => return Err(CheckpointError::UnknownDelivery(id.0)),
        }
        let before = self.confirmed;
        self.advance();
        Ok((self.confirmed > before).then_some(self.confirmed))
    }

    fn advance(&mut self) {
        while let Some(front) = self.queue.front() {
            match front {
                Entry::Delivery { confirmed: false } => break,
                Entry::Delivery { confirmed: true } => {}
                Entry::Mark(lsn) => {
                    if *lsn > self.confirmed {
                        self.confirmed = *lsn;
                    }
                }
            }
            self.queue.pop_front();
            self.head_id += 1;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "confirm for delivery {0}, which is not awaiting a confirm (already confirmed or never registered)"
    )]
    UnknownDelivery(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_a_confirmed_prefix() {
        let mut cp = Checkpoint::new(Lsn(100));
        let a = cp.register();
        let b = cp.register();
        cp.mark(Lsn(200)); // end of transaction 1
        let c = cp.register();
        cp.mark(Lsn(300)); // end of transaction 2
        assert_eq!(cp.in_flight(), 3);

        // Out-of-order confirms of later messages do not move the LSN.
        assert_eq!(cp.confirm(c).unwrap(), None);
        assert_eq!(cp.confirm(b).unwrap(), None);
        assert_eq!(cp.confirmed_lsn(), Lsn(100));

        // The first message closes the gap: both transactions become safe at once.
        assert_eq!(cp.confirm(a).unwrap(), Some(Lsn(300)));
        assert!(cp.is_idle());
        assert_eq!(cp.in_flight(), 0);
    }

    #[test]
    fn a_mark_with_nothing_in_flight_is_safe_at_once() {
        let mut cp = Checkpoint::new(Lsn(10));
        cp.mark(Lsn(50));
        assert_eq!(cp.confirmed_lsn(), Lsn(50));
        // A lower mark (stale keepalive) never moves it backwards.
        cp.mark(Lsn(40));
        assert_eq!(cp.confirmed_lsn(), Lsn(50));
    }

    #[test]
    fn double_or_unknown_confirms_are_errors() {
        let mut cp = Checkpoint::new(Lsn(0));
        let a = cp.register();
        cp.confirm(a).unwrap();
        assert!(cp.confirm(a).is_err());
        assert!(cp.confirm(DeliveryId(99)).is_err());
    }

    proptest! {
        /// Whatever order confirms arrive in, the confirmed LSN never passes a
        /// mark that has an unconfirmed delivery before it, and ends at the last
        /// mark once all are confirmed.
        #[test]
        fn never_passes_an_unconfirmed_delivery(
            txn_sizes in prop::collection::vec(0usize..5, 1..20),
            order_seed in prop::collection::vec(any::<u32>(), 0..100),
        ) {
            let mut cp = Checkpoint::new(Lsn(1));
            let mut ids = Vec::new();
            // mark_after[i] = the LSN that becomes safe once deliveries 0..=i are confirmed
            let mut marks: Vec<(usize, Lsn)> = Vec::new();
            for (t, n) in txn_sizes.iter().enumerate() {
                for _ in 0..*n { ids.push(cp.register()); }
                let lsn = Lsn(10 * (t as u64 + 1));
                cp.mark(lsn);
                marks.push((ids.len(), lsn));
            }
            // confirm in a shuffled order
            let mut pending: Vec<usize> = (0..ids.len()).collect();
            let mut confirmed = vec![false; ids.len()];
            let mut k = 0;
            while !pending.is_empty() {
                let pick = order_seed.get(k).copied().unwrap_or(0) as usize % pending.len();
                k += 1;
                let i = pending.swap_remove(pick);
                cp.confirm(ids[i]).unwrap();
                confirmed[i] = true;
                let prefix = confirmed.iter().take_while(|c| **c).count();
                let expected = marks.iter().filter(|(n, _)| *n <= prefix).map(|(_, l)| *l).max().unwrap_or(Lsn(1));
                prop_assert_eq!(cp.confirmed_lsn(), expected);
            }
            prop_assert_eq!(cp.confirmed_lsn(), marks.last().unwrap().1);
            prop_assert!(cp.is_idle());
        }
    }
}
