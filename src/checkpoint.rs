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
//! A positive confirm is only *provisional* until every delivery registered
//! before it was observed has been observed too (its *horizon*). RabbitMQ
//! sends the `basic.return` of an unroutable message before the ack that
//! covers it, but lapin hands that return to whichever pending confirm a
//! (multiple) ack completes first, in hash-map order: the returned message's
//! own confirm may resolve as a plain ack while a neighbour, published before
//! or after it, carries the return. That neighbour resolved no later than the
//! returned message did, so it was registered before the returned message's
//! ack was observed: waiting for the horizon means the return is seen (and the
//! session fails) before the checkpoint can move past the message.
//!
//! This type does no I/O and knows nothing of the sink: the publisher registers a
//! delivery when it hands a message to the sink and calls [`Checkpoint::confirm`]
//! when the sink's confirm resolves positively. A negative outcome is never fed
//! here: the session fails instead, and replication restarts from the last
//! confirmed LSN.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies one published message awaiting its confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(u64);

#[derive(Debug)]
enum Entry {
    /// `horizon`: set by a positive confirm, the number of entries registered
    /// when it was observed; final once every delivery before it is resolved.
    Delivery {
        horizon: Option<u64>,
    },
    Mark(Lsn),
}

impl Entry {
    fn resolved(&self) -> bool {
        !matches!(self, Entry::Delivery { horizon: None })
    }
}

#[derive(Debug)]
pub struct Checkpoint {
    /// Entries not yet behind the confirmed prefix; `queue[0]` has id `head_id`.
    queue: VecDeque<Entry>,
    head_id: u64,
    /// Unconfirmed deliveries in `queue` (the in-flight window).
    unconfirmed: usize,
    /// Absolute index of the first unresolved delivery (or the end of the
    /// queue): only moves forward, so finding it costs O(1) amortised.
    first_unresolved: u64,
    confirmed: Lsn,
}

impl Checkpoint {
    /// Starts from the LSN the slot already confirms (replication resumes there).
    pub fn new(start: Lsn) -> Self {
        Checkpoint {
            queue: VecDeque::new(),
            head_id: 0,
            unconfirmed: 0,
            first_unresolved: 0,
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
        let id = DeliveryId(self.end());
        self.queue.push_back(Entry::Delivery { horizon: None });
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
        self.skip_resolved();
        self.advance();
    }

    /// A positive confirm for `id`. Returns the new confirmed LSN if it moved.
    /// It becomes final once every delivery registered before this call is
    /// resolved too (see the module documentation).
    ///
    /// Confirming an id twice, or one that was never registered, is a bug in the
    /// caller and is reported as an error rather than silently ignored.
    pub fn confirm(&mut self, id: DeliveryId) -> Result<Option<Lsn>, CheckpointError> {
        let idx =
            id.0.checked_sub(self.head_id)
                .ok_or(CheckpointError::UnknownDelivery(id.0))? as usize;
        let end = self.end();
        match self.queue.get_mut(idx) {
            Some(Entry::Delivery { horizon }) if horizon.is_none() => {
                *horizon = Some(end);
                self.unconfirmed -= 1;
            }
            _ => return Err(CheckpointError::UnknownDelivery(id.0)),
        }
        let before = self.confirmed;
        self.skip_resolved();
        self.advance();
        Ok((self.confirmed > before).then_some(self.confirmed))
    }

    /// Absolute index of the next entry to be queued.
    fn end(&self) -> u64 {
        self.head_id + self.queue.len() as u64
    }

    fn skip_resolved(&mut self) {
        self.first_unresolved = self.first_unresolved.max(self.head_id);
        while let Some(e) = self
            .queue
            .get((self.first_unresolved - self.head_id) as usize)
        {
            if !e.resolved() {
                break;
            }
            self.first_unresolved += 1;
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.queue.front() {
            match front {
                Entry::Delivery { horizon: None } => break,
                Entry::Delivery {
                    horizon: Some(horizon),
                } => {
                    if self.first_unresolved < *horizon {
                        break;
                    }
                }
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

    /// lapin may hand the return of message `a` to the confirm of `b`, a
    /// message published after it: `a`'s own confirm then looks like a plain
    /// ack. The checkpoint must not pass `a` before `b`'s outcome is known.
    #[test]
    fn a_confirm_is_final_only_once_its_neighbours_are_known() {
        let mut cp = Checkpoint::new(Lsn(1));
        let a = cp.register();
        cp.mark(Lsn(10));
        let b = cp.register();
        cp.mark(Lsn(20));
        // `a` acked (lapin gave its return to `b`): not final while `b` is open.
        assert_eq!(cp.confirm(a).unwrap(), None);
        assert_eq!(cp.confirmed_lsn(), Lsn(1));
        // Had `b` carried the return, the session would have failed here.
        assert_eq!(cp.confirm(b).unwrap(), Some(Lsn(20)));

        // A delivery registered *after* a confirm was observed does not hold it.
        let c = cp.register();
        cp.mark(Lsn(30));
        assert_eq!(cp.confirm(c).unwrap(), Some(Lsn(30)));
        let d = cp.register();
        cp.mark(Lsn(40));
        assert_eq!(cp.confirm(d).unwrap(), Some(Lsn(40)));
        let e = cp.register();
        cp.mark(Lsn(50));
        assert_eq!(cp.confirmed_lsn(), Lsn(40));
        assert_eq!(cp.confirm(e).unwrap(), Some(Lsn(50)));
        assert!(cp.is_idle());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register,
        Mark,
        /// Confirm the n-th (modulo) unconfirmed delivery.
        Confirm(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Register),
            1 => Just(Op::Mark),
            3 => any::<usize>().prop_map(Op::Confirm),
        ]
    }

    proptest! {
        /// Whatever the order of registrations, marks and confirms, the
        /// confirmed LSN is the highest mark before which every delivery is
        /// confirmed *and* every delivery registered before each of those
        /// confirms is confirmed too; once all are confirmed it is the last
        /// mark.
        #[test]
        fn never_passes_an_unsettled_delivery(ops in prop::collection::vec(op(), 1..200)) {
            let mut cp = Checkpoint::new(Lsn(1));
            // The model: every entry in order; a delivery's horizon is the
            // number of entries that existed when it was confirmed.
            #[derive(Clone, Copy)]
            enum M { D(Option<usize>), Mark(Lsn) }
            let mut model: Vec<M> = Vec::new();
            let mut ids: Vec<(usize, DeliveryId)> = Vec::new();
            let mut next_lsn = 10;
            for op in ops {
                match op {
                    Op::Register => {
                        ids.push((model.len(), cp.register()));
                        model.push(M::D(None));
                    }
                    Op::Mark => {
                        cp.mark(Lsn(next_lsn));
                        model.push(M::Mark(Lsn(next_lsn)));
                        next_lsn += 10;
                    }
                    Op::Confirm(n) => {
                        if ids.is_empty() { continue; }
                        let (pos, id) = ids.swap_remove(n % ids.len());
                        cp.confirm(id).unwrap();
                        model[pos] = M::D(Some(model.len()));
                    }
                }
                let confirmed = |k: usize| matches!(model[k], M::D(Some(_)) | M::Mark(_));
                let mut expected = Lsn(1);
                for (p, e) in model.iter().enumerate() {
                    if let M::Mark(l) = e {
                        let safe = (0..p).all(|k| match model[k] {
                            M::D(Some(h)) => (0..h).all(confirmed),
                            M::D(None) => false,
                            M::Mark(_) => true,
                        });
                        if safe { expected = *l; }
                    }
                }
                prop_assert_eq!(cp.confirmed_lsn(), expected);
            }
            for (_, id) in ids.drain(..) {
                cp.confirm(id).unwrap();
            }
            if let Some(M::Mark(l)) = model.iter().rev().find(|e| matches!(e, M::Mark(_))) {
                prop_assert_eq!(cp.confirmed_lsn(), *l);
            }
            prop_assert_eq!(cp.in_flight(), 0);
        }
    }
}
