//! The queue between the WAL reader and the publisher, bounded in items *and*
//! in bytes.
//!
//! A count alone does not bound memory: Odoo rows can carry megabytes (mail
//! bodies, attachments stored in the database), and 4,096 of them would hold
//! gigabytes. Each item takes permits for its approximate size from a
//! semaphore before it is queued and gives them back once the publisher has
//! handled it (encoded it and handed it to the broker, whose own in-flight
//! bytes are bounded separately). When the budget is spent, the reader waits,
//! stops reading the socket, and the walsender is held back by TCP: the
//! backlog stays in WAL, not in our memory. An item larger than the whole
//! budget still passes, alone.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::sink::OutgoingMessage;

/// What the reader (and the snapshot) sends to the publisher, in WAL order.
pub(crate) enum Item {
    Begin {
        xid: u32,
        commit_lsn: Lsn,
        commit_ts: i64,
    },
    Event(ChangeEvent),
    Commit {
        end_lsn: Lsn,
    },
    /// A safe position with nothing to publish (heartbeat, unpublished message).
    Mark(Lsn),
    /// Answered once everything sent before is confirmed (end of a snapshot).
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// The server's WAL end from a keepalive while no transaction is open:
    /// safe once everything before is confirmed, and then we are caught up.
    Idle(Lsn),
    /// A pgoutput message that could not be decoded, for the dead-letter key
    /// (`--on-decode-error=raw|dead-letter`).
    DeadLetter(OutgoingMessage),
}

/// Bytes counted for an item that carries no row data (begin, commit, marks).
const SMALL_ITEM: usize = 64;

/// Creates the queue: at most `items` queued items and `bytes` of their data.
pub(crate) fn channel(items: usize, bytes: usize) -> (ItemSender, ItemReceiver) {
    let (tx, rx) = mpsc::channel(items.max(1));
    let budget = bytes.clamp(SMALL_ITEM, u32::MAX as usize);
    let sender = ItemSender {
        tx,
        bytes: Arc::new(Semaphore::new(budget)),
        budget,
    };
    (sender, ItemReceiver { rx })
}

/// An item with the bytes it holds of the budget, released when `permit` is
/// dropped (once the publisher has handled the item).
pub(crate) struct Queued {
    pub(crate) item: Item,
    _permit: OwnedSemaphorePermit,
}

#[derive(Clone)]
pub(crate) struct ItemSender {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget: usize,
}

/// The publisher is gone.
#[derive(Debug)]
pub(crate) struct Closed;

impl ItemSender {
    /// Queues `item`, waiting first for room in bytes, then in items.
    pub(crate) async fn send(&self, item: Item) -> Result<(), Closed> {
        let cost = item.approx_bytes().clamp(1, self.budget) as u32;
        let permit = tokio::select! {
            p = Arc::clone(&self.bytes).acquire_many_owned(cost) => p.map_err(|_| Closed)?,
            _ = self.tx.closed() => return Err(Closed),
        };
        self.tx
            .send(Queued {
                item,
                _permit: permit,
            })
            .await
            .map_err(|_| Closed)
    }

    /// Resolves once the publisher has stopped taking items.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await
    }
}

pub(crate) struct ItemReceiver {
    rx: mpsc::Receiver<Queued>,
}

impl ItemReceiver {
    pub(crate) async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }

    pub(crate) fn try_recv(&mut self) -> Option<Queued> {
        self.rx.try_recv().ok()
    }
}

impl Item {
    /// Roughly the memory the item holds: the row data it carries.
    pub(crate) fn approx_bytes(&self) -> usize {
        match self {
            Item::Event(ev) => approx_event_bytes(ev),
            Item::DeadLetter(msg) => SMALL_ITEM + msg.body.len() + msg.routing_key.len(),
            _ => SMALL_ITEM,
        }
    }
}

/// The column values and message content of an event, plus a fixed overhead.
pub(crate) fn approx_event_bytes(ev: &ChangeEvent) -> usize {
    use crate::pgoutput::{ColumnValue, OldTuple, TupleData};
    fn tuple(t: &TupleData) -> usize {
        t.columns
            .iter()
            .map(|c| match c {
                ColumnValue::Text(b) | ColumnValue::Binary(b) => b.len() + 16,
                ColumnValue::Null | ColumnValue::UnchangedToast => 16,
            })
            .sum()
    }
    let old = match &ev.old {
        Some(OldTuple::Key(t) | OldTuple::Full(t)) => tuple(t),
        None => 0,
    };
    let new = ev.new.as_ref().map_or(0, tuple);
    let message = ev.message.as_ref().map_or(0, |m| m.content.len());
    SMALL_ITEM * 4 + old + new + message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    #[tokio::test]
    async fn the_byte_budget_holds_the_sender_until_items_are_handled() {
        let (tx, mut rx) = channel(100, 1000);
        // Fifteen marks fit (64 bytes each); the sixteenth would not.
        for i in 0..15 {
            tx.send(Item::Mark(Lsn(i))).await.unwrap();
        }
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send(Item::Mark(Lsn(99))),
        )
        .await;
        assert!(blocked.is_err(), "the byte budget must hold the sender");
        let first = rx.recv().await.unwrap();
        drop(first);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tx.send(Item::Mark(Lsn(99))),
        )
        .await
        .expect("room again once an item was handled")
        .unwrap();
    }

    #[tokio::test]
    async fn an_item_larger_than_the_budget_passes_alone() {
        let (tx, mut rx) = channel(100, 100);
        let msg = crate::sink::OutgoingMessage {
            routing_key: "k".into(),
            body: bytes::Bytes::from(vec![0u8; 10_000]),
            message_id: "id".into(),
            content_type: "application/json",
            timestamp: 0,
            kind: "dead_letter".into(),
            headers: Default::default(),
        };
        tx.send(Item::DeadLetter(msg)).await.unwrap();
        let q = rx.recv().await.unwrap();
        assert!(matches!(q.item, Item::DeadLetter(_)));
    }
}
