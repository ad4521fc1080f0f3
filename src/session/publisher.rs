//! The publisher: takes the reader's items in WAL order, encodes events (one
//! message per change, or transaction parts), hands them to the [`Sink`], keeps
//! a bounded window of unconfirmed messages, and feeds every confirm to the
//! [`Checkpoint`]. When the checkpoint's safe LSN moves, [`Progress`] tells the
//! status reporter.
//!
//! A failed publish, a negative confirm or a returned message ends the session
//! with an error: nothing after it is marked, so the slot never passes it.
//! Whatever the sink is (AMQP, the stream protocol, stdout), this file does not
//! change: a sink only implements [`Sink`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;

use super::config::{Granularity, OnDecodeError, OnOversized, SessionConfig};
use super::dead_letter::DeadLetters;
use super::error::SessionError;
use super::parts::{ENVELOPE_BYTES, TransactionParts};
use super::status::Progress;
use crate::checkpoint::{Checkpoint, DeliveryId};
use crate::event::{ChangeEvent, EncodeError, EncodeOptions, Format, encode_json};
use crate::lsn::Lsn;
use crate::metrics::{DecodeOutcome, Metrics, TableCounterCache};
use crate::queue::{Item, ItemReceiver};
use crate::routing::Routing;
use crate::sink::{Confirm, ConfirmFuture, HeaderValue, OutgoingMessage, Sink, SinkError};

/// Reader → publisher: stop taking new items (shutdown, or a failed read);
/// only what was already handed to the broker is still confirmed.
#[derive(Default)]
pub(crate) struct Intake {
    stop: AtomicBool,
    stopped: Notify,
}

impl Intake {
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stopped.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

type PendingConfirm = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (DeliveryId, Instant, usize, Result<(), SinkError>)>
            + Send,
    >,
>;

pub(crate) struct Publisher<S: Sink> {
    pub(crate) sink: S,
    checkpoint: Checkpoint,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
    window: usize,
    in_flight_bytes: usize,
    max_in_flight_bytes: usize,
    granularity: Granularity,
    format: Format,
    encode: EncodeOptions,
    routing: Routing,
    max_events_per_message: usize,
    max_message_bytes: usize,
    on_oversized: OnOversized,
    on_decode_error: OnDecodeError,
    dead_letters: DeadLetters,
    tables: TableCounterCache,
    pending: FuturesUnordered<PendingConfirm>,
    on_flush: Vec<DeliveryId>,
    txn: Option<TransactionParts>,
    buf: Vec<u8>,
    /// Answered when nothing is in flight any more.
    barriers: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl<S: Sink> Publisher<S> {
    pub(crate) fn new(
        cfg: &SessionConfig,
        sink: S,
        start: Lsn,
        progress: Arc<Progress>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Publisher {
            sink,
            checkpoint: Checkpoint::new(start),
            progress,
            metrics,
            window: cfg.window.max(1),
            in_flight_bytes: 0,
            max_in_flight_bytes: cfg.max_in_flight_bytes,
            granularity: cfg.granularity,
            format: cfg.format,
            encode: cfg.encode.clone(),
            routing: cfg.routing.clone(),
            max_events_per_message: cfg.max_events_per_message.max(1),
            max_message_bytes: cfg.max_message_bytes,
            on_oversized: cfg.on_oversized,
            on_decode_error: cfg.on_decode_error,
            dead_letters: DeadLetters::new(&cfg.routing, cfg.encode.clone(), cfg.max_message_bytes),
            tables: TableCounterCache::default(),
            pending: FuturesUnordered::new(),
            on_flush: Vec::new(),
            txn: None,
            buf: Vec::with_capacity(4096),
            barriers: Vec::new(),
        }
    }

    /// Publishes items until the channel closes (or the intake is stopped on
    /// shutdown) and every confirm is in.
    pub(crate) async fn run(
        &mut self,
        mut rx: ItemReceiver,
        intake: &Intake,
    ) -> Result<(), SessionError> {
        let mut open = true;
        // The broker connection is watched even when idle, so a broker that
        // went away ends the session (and readiness) without waiting for the
        // next event.
        let mut health = tokio::time::interval(Duration::from_secs(1));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if open && intake.is_stopped() {
                open = false;
                self.finish_published_work(&mut rx).await?;
            }
            if !open && self.pending.is_empty() {
                if !intake.is_stopped() {
                    self.flush_pending_writes().await?;
                }
                return Ok(());
            }
            let mut can_take = open && self.has_room();
            if !can_take && open && self.pending.is_empty() {
                // The window is full of write-then-flush deliveries: make them
                // durable to free it (a transaction larger than the window).
                self.flush_pending_writes().await?;
                can_take = self.has_room();
            }
            tokio::select! {
                biased;
                Some((id, started, bytes, res)) = self.pending.next(), if !self.pending.is_empty() => {
                    self.in_flight_bytes -= bytes;
                    res?;
                    self.metrics.observe_confirm(started.elapsed());
                    self.confirm(id)?;
                    self.metrics.set_in_flight(self.checkpoint.in_flight());
                }
                _ = intake.stopped.notified(), if open => {
                    // Shutdown: take nothing more; the loop head sees the flag.
                }
                item = rx.recv(), if can_take => {
                    match item {
                        // The item's bytes go back to the reader once handled.
                        Some(queued) => self.handle(queued.item).await?,
                        None => {
                            open = false;
                            self.flush_pending_writes().await?;
                        }
                    }
                }
                _ = health.tick() => {
                    let usable = self.sink.check().inspect_err(|_| {
                        self.metrics.sink_up.store(0, Ordering::Relaxed);
                    })?;
                    self.metrics.sink_up.store(u64::from(usable), Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether another message may be published before confirms come back.
    fn has_room(&self) -> bool {
        self.checkpoint.in_flight() < self.window
            && self.in_flight_bytes < self.max_in_flight_bytes.max(1)
    }

    /// On shutdown: takes the items already read that publish nothing new
    /// (the commit of a transaction whose events are out, safe positions), so
    /// the final flush covers every transaction fully handed to the broker.
    /// Stops at the first item that would start new work.
    async fn finish_published_work(&mut self, rx: &mut ItemReceiver) -> Result<(), SessionError> {
        while let Some(queued) = rx.try_recv() {
            match queued.item {
                Item::Commit { end_lsn } if self.granularity == Granularity::Row => {
                    self.flush_pending_writes().await?;
                    self.mark(end_lsn);
                }
                Item::Mark(lsn) | Item::Idle(lsn) => {
                    self.flush_pending_writes().await?;
                    self.mark(lsn);
                }
                _ => break,
            }
        }
        Ok(())
    }

    fn confirm(&mut self, id: DeliveryId) -> Result<(), SessionError> {
        match self.checkpoint.confirm(id) {
            Ok(Some(lsn)) => self.progress.advance(lsn),
            Ok(None) => {}
            Err(e) => return Err(SessionError::Internal(e.to_string())),
        }
        self.release_barriers();
        Ok(())
    }

    fn release_barriers(&mut self) {
        if !self.barriers.is_empty() && self.checkpoint.in_flight() == 0 {
            for b in self.barriers.drain(..) {
                let _ = b.send(());
            }
        }
    }

    async fn handle(&mut self, item: Item) -> Result<(), SessionError> {
        match item {
            Item::Begin {
                xid,
                commit_lsn,
                commit_ts,
            } => {
                self.metrics.transaction_read(commit_ts);
                if self.granularity == Granularity::Transaction {
                    self.txn = Some(TransactionParts::begin(xid, commit_lsn, commit_ts));
                }
            }
            Item::Event(ev) => match self.granularity {
                Granularity::Row => self.publish_row(&ev).await?,
                // Snapshot rows and non-transactional logical messages
                // belong to no transaction: one message each.
                Granularity::Transaction if ev.snapshot || self.txn.is_none() => {
                    self.publish_row(&ev).await?
                }
                Granularity::Transaction => self.add_to_txn(&ev).await?,
            },
            Item::Barrier(done) => {
                self.flush_pending_writes().await?;
                self.barriers.push(done);
                self.release_barriers();
            }
            Item::Commit { end_lsn } => {
                if self.granularity == Granularity::Transaction {
                    self.flush_txn_part(true).await?;
                    self.txn = None;
                }
                self.flush_pending_writes().await?;
                self.mark(end_lsn);
            }
            Item::Mark(lsn) => {
                self.flush_pending_writes().await?;
                self.mark(lsn);
            }
            Item::Idle(lsn) => {
                self.flush_pending_writes().await?;
                self.mark(lsn);
                if self.checkpoint.is_idle() {
                    self.metrics.caught_up();
                }
            }
            Item::DeadLetter(msg) => self.send(msg).await?,
        }
        Ok(())
    }

    fn mark(&mut self, lsn: Lsn) {
        let before = self.checkpoint.confirmed_lsn();
        self.checkpoint.mark(lsn);
        let after = self.checkpoint.confirmed_lsn();
        if after > before {
            self.progress.advance(after);
        }
    }

    /// Makes `OnFlush` deliveries durable and confirms them.
    async fn flush_pending_writes(&mut self) -> Result<(), SessionError> {
        if self.on_flush.is_empty() {
            return Ok(());
        }
        self.sink.flush().await?;
        for id in std::mem::take(&mut self.on_flush) {
            self.confirm(id)?;
        }
        Ok(())
    }

    fn encode_event(&mut self, ev: &ChangeEvent) -> Result<Bytes, SessionError> {
        self.buf.clear();
        match self.format {
            Format::Json => encode_json(ev, &self.encode, &mut self.buf)?,
            Format::Protobuf => {
                crate::protobuf::encode_event(ev, &self.encode, &mut self.buf)?;
            }
        }
        Ok(Bytes::copy_from_slice(&self.buf))
    }

    async fn publish_row(&mut self, ev: &ChangeEvent) -> Result<(), SessionError> {
        let body = match self.encode_event(ev) {
            Ok(body) => body,
            Err(SessionError::Encode(e)) => return self.publish_row_undecodable(ev, e).await,
            Err(e) => return Err(e),
        };
        if body.len() > self.max_message_bytes {
            return self.oversized(ev, body.len()).await;
        }
        self.tables.record(&self.metrics, ev, body.len());
        let msg = self
            .routing
            .row_message(ev, body, self.format.content_type());
        self.send(msg).await
    }

    /// `--on-decode-error` for an event with a value that cannot be encoded.
    async fn publish_row_undecodable(
        &mut self,
        ev: &ChangeEvent,
        e: EncodeError,
    ) -> Result<(), SessionError> {
        match self.on_decode_error {
            OnDecodeError::Fail => {
                self.metrics.decode_error(DecodeOutcome::Failed);
                Err(e.into())
            }
            OnDecodeError::Raw => {
                let (body, raw) = self.encode_raw(ev, &e)?;
                self.tables.record(&self.metrics, ev, body.len());
                let mut msg = self
                    .routing
                    .row_message(ev, body, self.format.content_type());
                msg.headers
                    .insert("x-raw-columns".into(), HeaderValue::Str(raw.join(",")));
                self.send(msg).await
            }
            OnDecodeError::DeadLetter => self.dead_letter(ev, &e).await,
        }
    }

    /// The event with undecodable values passed raw, and their column names.
    fn encode_raw(
        &mut self,
        ev: &ChangeEvent,
        e: &EncodeError,
    ) -> Result<(Bytes, Vec<String>), SessionError> {
        self.buf.clear();
        let raw = crate::event::encode_json_raw(ev, &self.encode, &mut self.buf)?;
        self.metrics.decode_error(DecodeOutcome::Raw);
        tracing::warn!(error = %e, raw_columns = ?raw, message_id = %ev.message_id(), "published with raw column values (--on-decode-error=raw)");
        Ok((Bytes::copy_from_slice(&self.buf), raw))
    }

    /// `--on-decode-error=dead-letter`: the event's envelope goes to the
    /// dead-letter key with the `message_id` the event would have had.
    async fn dead_letter(&mut self, ev: &ChangeEvent, e: &EncodeError) -> Result<(), SessionError> {
        self.metrics.decode_error(DecodeOutcome::DeadLetter);
        tracing::warn!(error = %e, message_id = %ev.message_id(), routing_key = %self.dead_letters.key(), "event sent to the dead-letter key (--on-decode-error=dead-letter)");
        let msg = self.dead_letters.encode_error(ev, e);
        self.send(msg).await
    }

    async fn send(&mut self, msg: OutgoingMessage) -> Result<(), SessionError> {
        let bytes = msg.body.len();
        let confirm = self.sink.publish(msg).await?;
        self.metrics.published(bytes);
        let id = self.checkpoint.register();
        self.metrics.set_in_flight(self.checkpoint.in_flight());
        match confirm {
            Confirm::OnFlush => self.on_flush.push(id),
            Confirm::Pending(fut) => {
                let started = Instant::now();
                let fut: ConfirmFuture = fut;
                self.in_flight_bytes += bytes;
                self.pending
                    .push(Box::pin(async move { (id, started, bytes, fut.await) }));
            }
        }
        Ok(())
    }

    async fn add_to_txn(&mut self, ev: &ChangeEvent) -> Result<(), SessionError> {
        if let Some(t) = self.txn.as_mut() {
            t.saw(ev.seq);
        }
        let encoded = match self.encode_event(ev) {
            Ok(body) => body,
            Err(SessionError::Encode(e)) => match self.on_decode_error {
                OnDecodeError::Fail => {
                    self.metrics.decode_error(DecodeOutcome::Failed);
                    return Err(e.into());
                }
                OnDecodeError::Raw => self.encode_raw(ev, &e)?.0,
                // The transaction goes on without it.
                OnDecodeError::DeadLetter => return self.dead_letter(ev, &e).await,
            },
            Err(e) => return Err(e),
        };
        if encoded.len() + ENVELOPE_BYTES > self.max_message_bytes {
            return self.oversized(ev, encoded.len() + ENVELOPE_BYTES).await;
        }
        let (max_events, max_bytes) = (self.max_events_per_message, self.max_message_bytes);
        if self
            .txn
            .as_ref()
            .is_some_and(|t| t.is_full(encoded.len(), max_events, max_bytes))
        {
            self.flush_txn_part(false).await?;
        }
        self.tables.record(&self.metrics, ev, encoded.len());
        let Some(t) = self.txn.as_mut() else {
            return Err(SessionError::Internal(
                "event outside a transaction in transaction granularity".into(),
            ));
        };
        t.add(ev.seq, &encoded, self.format);
        Ok(())
    }

    /// `--on-oversized` for an event whose message would need `size` bytes.
    async fn oversized(&mut self, ev: &ChangeEvent, size: usize) -> Result<(), SessionError> {
        let dead_letter = self.on_oversized == OnOversized::DeadLetter;
        self.metrics.oversized(dead_letter);
        if !dead_letter {
            return Err(self.dead_letters.oversized_error(ev, size));
        }
        let msg = self.dead_letters.oversized(ev, size);
        tracing::warn!(message_id = %ev.message_id(), lsn = %ev.lsn, size, limit = self.max_message_bytes, routing_key = %self.dead_letters.key(), "event too large: an envelope goes to the dead-letter key (--on-oversized=dead-letter)");
        self.send(msg).await
    }

    /// Publishes the current part of a transaction (the last one with `last`).
    async fn flush_txn_part(&mut self, last: bool) -> Result<(), SessionError> {
        let msg = match self.txn.as_mut() {
            Some(t) => t.take(last, self.format, &self.routing),
            None => None,
        };
        match msg {
            Some(msg) => self.send(msg).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TableInfo;
    use crate::pgoutput::{ColumnValue, TupleData};
    use crate::schema::{Column, Relation, ReplicaIdentity};
    use crate::session::exit_code;
    use std::sync::Mutex;

    /// Records what the publisher hands over; durable on flush (like stdout).
    #[derive(Clone, Default)]
    struct RecordingSink(Arc<Mutex<Vec<OutgoingMessage>>>);

    impl Sink for RecordingSink {
        async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
            self.0.lock().unwrap().push(msg);
            Ok(Confirm::OnFlush)
        }
        async fn flush(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// `public.line(id int4 key, qty int4)` with `qty` = "abc": not an integer.
    fn bad_event(seq: u64) -> ChangeEvent {
        line_event(seq, b"abc")
    }

    fn line_event(seq: u64, qty: &'static [u8]) -> ChangeEvent {
        typed_line_event(seq, 23, qty)
    }

    /// `public.line(id int4 key, qty <qty_type>)`.
    fn typed_line_event(seq: u64, qty_type: u32, qty: &'static [u8]) -> ChangeEvent {
        let rel = Arc::new(Relation::new(
            16400,
            "public",
            "line",
            ReplicaIdentity::Default,
            vec![
                Column::new("id", 23, -1, true),
                Column::new("qty", qty_type, -1, false),
            ],
        ));
        ChangeEvent {
            op: crate::event::Op::Insert,
            table: Some(Arc::new(TableInfo::plain(rel))),
            lsn: Lsn(0x1000 + seq),
            commit_lsn: Lsn(0x2000),
            xid: 7,
            commit_ts: 0,
            seq,
            snapshot: false,
            old: None,
            new: Some(TupleData {
                columns: vec![
                    ColumnValue::Text(Bytes::from_static(b"1")),
                    ColumnValue::Text(Bytes::from_static(qty)),
                ],
            }),
            truncate_options: 0,
            message: None,
        }
    }

    /// One transaction with the bad event through a publisher; returns the
    /// outcome, the messages handed to the sink and the LSN made safe.
    async fn publish_bad(
        policy: OnDecodeError,
        granularity: Granularity,
    ) -> (Result<(), SessionError>, Vec<OutgoingMessage>, Lsn) {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.on_decode_error = policy;
        cfg.granularity = granularity;
        publish_transaction(&cfg, vec![bad_event(0)]).await
    }

    /// One transaction of `events` through a publisher.
    async fn publish_transaction(
        cfg: &SessionConfig,
        events: Vec<ChangeEvent>,
    ) -> (Result<(), SessionError>, Vec<OutgoingMessage>, Lsn) {
        let sink = RecordingSink::default();
        let progress = Arc::new(Progress::new(Lsn(0x100)));
        let metrics = Arc::new(Metrics::new());
        let mut p = Publisher::new(cfg, sink.clone(), Lsn(0x100), progress.clone(), metrics);
        let (tx, rx) = crate::queue::channel(1024, 1 << 24);
        tx.send(Item::Begin {
            xid: 7,
            commit_lsn: Lsn(0x2000),
            commit_ts: 0,
        })
        .await
        .ok();
        for ev in events {
            tx.send(Item::Event(ev)).await.ok();
        }
        tx.send(Item::Commit {
            end_lsn: Lsn(0x2010),
        })
        .await
        .ok();
        drop(tx);
        let r = p.run(rx, &Intake::default()).await;
        let sent = sink.0.lock().unwrap().clone();
        (r, sent, progress.lsn())
    }

    /// A non-transactional logical message arrives outside any transaction:
    /// in transaction granularity it is published on its own (it stopped the
    /// session with "event outside a transaction" before).
    #[tokio::test]
    async fn a_non_transactional_message_is_published_alone_in_transaction_granularity() {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.granularity = Granularity::Transaction;
        let sink = RecordingSink::default();
        let progress = Arc::new(Progress::new(Lsn(0x100)));
        let mut p = Publisher::new(
            &cfg,
            sink.clone(),
            Lsn(0x100),
            progress.clone(),
            Arc::new(Metrics::new()),
        );
        let (tx, rx) = crate::queue::channel(16, 1 << 20);
        let message = ChangeEvent {
            op: crate::event::Op::Message,
            table: None,
            lsn: Lsn(0x3000),
            commit_lsn: Lsn(0x2FFF),
            xid: 0,
            commit_ts: 0,
            seq: 0,
            snapshot: false,
            old: None,
            new: None,
            truncate_options: 0,
            message: Some(crate::event::LogicalMessage {
                transactional: false,
                prefix: "app.note".into(),
                content: Bytes::from_static(b"x"),
            }),
        };
        tx.send(Item::Event(message)).await.ok();
        tx.send(Item::Mark(Lsn(0x3000))).await.ok();
        drop(tx);
        p.run(rx, &Intake::default()).await.unwrap();
        let sent = sink.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].message_id, "0000000000002FFF-00000000");
        assert_eq!(progress.lsn(), Lsn(0x3000));
    }

    /// Parts of two events; the third event goes to the dead-letter key. No
    /// two messages may share an id (an empty final part once took the
    /// dead-lettered event's).
    #[tokio::test]
    async fn every_message_of_a_transaction_has_its_own_id() {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.on_decode_error = OnDecodeError::DeadLetter;
        cfg.granularity = Granularity::Transaction;
        cfg.max_events_per_message = 2;
        for events in [
            vec![line_event(0, b"1"), line_event(1, b"2"), bad_event(2)],
            vec![
                line_event(0, b"1"),
                line_event(1, b"2"),
                line_event(2, b"3"),
                bad_event(3),
            ],
            vec![bad_event(0), line_event(1, b"2"), bad_event(2)],
        ] {
            let (r, sent, safe) = publish_transaction(&cfg, events).await;
            r.unwrap();
            assert_eq!(safe, Lsn(0x2010));
            let ids: std::collections::HashSet<&str> =
                sent.iter().map(|m| m.message_id.as_str()).collect();
            assert_eq!(
                ids.len(),
                sent.len(),
                "ids repeat: {:?}",
                sent.iter().map(|m| &m.message_id).collect::<Vec<_>>()
            );
        }
    }

    /// Parts are cut by bytes as well as events; one event over the limit
    /// fails with its table, key and LSN (exit 6) or becomes an envelope.
    #[tokio::test]
    async fn transaction_parts_stay_under_the_message_size_limit() {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.granularity = Granularity::Transaction;
        cfg.max_message_bytes = 4096;
        let events: Vec<ChangeEvent> = (0..100).map(|i| line_event(i, b"12345")).collect();
        let (r, sent, _) = publish_transaction(&cfg, events).await;
        r.unwrap();
        assert!(sent.len() > 1, "100 events do not fit in 4 KiB");
        assert!(sent.iter().all(|m| m.body.len() <= 4096));
        let total: usize = sent
            .iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
                v["events"].as_array().unwrap().len()
            })
            .sum();
        assert_eq!(total, 100);

        static BIG: [u8; 8000] = [b'7'; 8000];
        let big = || vec![typed_line_event(0, 25, &BIG)];
        let (r, _, safe) = publish_transaction(&cfg, big()).await;
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), exit_code::OVERSIZED);
        let text = e.to_string();
        assert!(
            text.contains("public.line") && text.contains("{\"id\":1}"),
            "{text}"
        );
        assert_eq!(safe, Lsn(0x100), "the slot holds");

        cfg.on_oversized = OnOversized::DeadLetter;
        let (r, sent, safe) = publish_transaction(&cfg, big()).await;
        r.unwrap();
        assert_eq!(safe, Lsn(0x2010));
        assert_eq!(sent.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&sent[0].body).unwrap();
        assert_eq!(v["error"], "oversized");
        assert_eq!(v["key"], serde_json::json!({"id": 1}));
    }

    #[tokio::test]
    async fn decode_error_fail_names_table_column_and_lsn_and_holds_the_slot() {
        let (r, sent, safe) = publish_bad(OnDecodeError::Fail, Granularity::Row).await;
        let e = r.unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("public.line") && text.contains("\"qty\"") && text.contains("0/1000"),
            "{text}"
        );
        assert!(!e.is_retryable());
        assert_eq!(e.exit_code(), exit_code::BAD_DATA);
        assert!(sent.is_empty());
        assert_eq!(
            safe,
            Lsn(0x100),
            "nothing after the bad event is acknowledged"
        );
    }

    #[tokio::test]
    async fn decode_error_raw_passes_the_text_and_flags_the_column() {
        for granularity in [Granularity::Row, Granularity::Transaction] {
            let (r, sent, safe) = publish_bad(OnDecodeError::Raw, granularity).await;
            r.unwrap();
            assert_eq!(sent.len(), 1);
            let body: serde_json::Value = serde_json::from_slice(&sent[0].body).unwrap();
            let ev = match granularity {
                Granularity::Row => {
                    assert_eq!(
                        sent[0].headers.get("x-raw-columns"),
                        Some(&HeaderValue::Str("qty".into()))
                    );
                    body
                }
                Granularity::Transaction => body["events"][0].clone(),
            };
            assert_eq!(ev["source"]["raw_columns"], serde_json::json!(["qty"]));
            assert_eq!(ev["after"], serde_json::json!({"id": 1, "qty": "abc"}));
            assert_eq!(safe, Lsn(0x2010));
        }
    }

    #[tokio::test]
    async fn decode_error_dead_letter_routes_the_raw_event_and_error_aside() {
        for granularity in [Granularity::Row, Granularity::Transaction] {
            let (r, sent, safe) = publish_bad(OnDecodeError::DeadLetter, granularity).await;
            r.unwrap();
            assert_eq!(
                sent.len(),
                1,
                "only the dead letter (the transaction has nothing else)"
            );
            let m = &sent[0];
            assert_eq!(m.routing_key, "odoo.dead_letter");
            assert_eq!(m.message_id, "0000000000002000-00000000");
            let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(body["table"], "public.line");
            assert_eq!(body["column"], "qty");
            assert_eq!(body["lsn"], "0/1000");
            assert!(
                body["error"].as_str().unwrap().contains("integer"),
                "{body}"
            );
            assert_eq!(body["event"]["after"]["qty"], "abc");
            assert_eq!(safe, Lsn(0x2010));
        }
    }

    #[test]
    fn raw_bytes_that_are_not_utf8_travel_as_base64() {
        let mut ev = bad_event(0);
        let rel = Arc::new(Relation::new(
            16401,
            "public",
            "t",
            ReplicaIdentity::Default,
            vec![
                Column::new("id", 23, -1, true),
                Column::new("note", 25, -1, false),
            ],
        ));
        ev.table = Some(Arc::new(TableInfo::plain(rel)));
        ev.new = Some(TupleData {
            columns: vec![
                ColumnValue::Text(Bytes::from_static(b"2")),
                ColumnValue::Text(Bytes::from_static(b"caf\xe9")),
            ],
        });
        let opts = EncodeOptions { db: "odoo".into() };
        assert!(encode_json(&ev, &opts, &mut Vec::new()).is_err());
        let mut out = Vec::new();
        let raw = crate::event::encode_json_raw(&ev, &opts, &mut out).unwrap();
        assert_eq!(raw, ["note"]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["after"], serde_json::json!({"id": 2, "note": "Y2Fm6Q=="}));
        assert_eq!(v["source"]["raw_columns"], serde_json::json!(["note"]));
        assert_eq!(v["source"]["table"], "t");
    }
}
