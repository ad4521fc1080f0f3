//! The WAL reader: reads the walsender's stream, assembles transactions
//! ([`Assembler`]), describes new or altered tables ([`TableDescriber`],
//! awaited like any I/O), lets on-demand snapshots take their signals and
//! watermarks ([`Incremental`]), and sends [`Item`]s to the publisher in WAL
//! order.
//!
//! The queue to the publisher is bounded (items and bytes): when it is full
//! the reader waits and stops reading the socket, so TCP backpressure reaches
//! the walsender instead of memory growing here. A walsender silent for half
//! the replication timeout is pinged; silent for all of it, the session ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::config::{OnDecodeError, SessionConfig};
use super::dead_letter::{self, undecodable};
use super::error::SessionError;
use super::status::Requests;
use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::queue::{Item, ItemSender};
use crate::replication::{ReplicationMessage, ReplicationReader};
use crate::snapshot::incremental::Incremental;
use crate::transaction::{Assembler, Output, TableDescriber};

/// Longest the reader runs before it lets the runtime poll its timers and the
/// other tasks, the standby status reporter first of all.
///
/// The connector runs on one thread. While the walsender keeps the socket
/// full, every read is ready at once, and a streamed transaction being
/// buffered sends nothing to the publisher: the reader never waits, and tokio
/// only makes it give way after 128 ready reads of up to 64 KiB each, then
/// polls timers only every 61 such turns. A debug build spilling a
/// million-row transaction on a slow machine went 5 s without a status update
/// and the walsender (`wal_sender_timeout = 5s`) closed the connection
/// (`tests/delivery_edges.rs`). `yield_now` defers the wake-up until the
/// runtime has polled its driver, so due timers fire and their tasks run.
const YIELD_EVERY: Duration = Duration::from_millis(10);

/// Whether reading goes on after an item was handed over.
enum Flow {
    Continue,
    /// The publisher stopped: its error is the one to report.
    PublisherGone,
}

pub(crate) struct Reader {
    stream: ReplicationReader,
    assembler: Assembler,
    describer: Box<dyn TableDescriber>,
    incremental: Incremental,
    tx: ItemSender,
    requests: Arc<Requests>,
    metrics: Arc<Metrics>,
    on_decode_error: OnDecodeError,
    dead_letter_key: String,
    replication_timeout: Duration,
    /// Rows of an on-demand snapshot chunk released by a watermark.
    snapshot_rows: Vec<ChangeEvent>,
}

impl Reader {
    /// A reader of `stream` for the session `cfg` on a server of `version`.
    pub(crate) fn new(
        cfg: &SessionConfig,
        version: u32,
        stream: ReplicationReader,
        describer: Box<dyn TableDescriber>,
        tx: ItemSender,
        requests: Arc<Requests>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let incremental = Incremental::new(
            crate::snapshot::incremental::Settings {
                source: cfg.source.clone(),
                publications: cfg.publications(),
                chunk_rows: cfg.snapshot_chunk_rows.max(1),
                server_version: version,
            },
            metrics.clone(),
        );
        Reader {
            stream,
            assembler: Assembler::new(cfg.stream_mem_budget, cfg.spill_dir.clone()),
            describer,
            incremental,
            tx,
            requests,
            metrics,
            on_decode_error: cfg.on_decode_error,
            dead_letter_key: dead_letter::routing_key(&cfg.routing),
            replication_timeout: cfg.replication_timeout,
            snapshot_rows: Vec::new(),
        }
    }

    /// Ends the reader's part: the queue to the publisher closes (it sees the
    /// end of its intake); the WAL stream is handed back, to stay open until
    /// the final standby status is out.
    pub(crate) fn into_stream(self) -> ReplicationReader {
        self.stream
    }

    /// Reads until the stream fails or ends (an error) or the publisher
    /// stops (`Ok`: the publisher's error is the one to report). Shutdown is
    /// the caller's: it stops awaiting this future, which may be dropped at
    /// any await (what was read and not handed over is simply replayed).
    pub(crate) async fn run(&mut self) -> Result<(), SessionError> {
        // Half the replication timeout without a message: ping (a status update
        // asking for a reply); the other half: the connection is dead.
        let half_timeout = self.replication_timeout / 2;
        let mut silent_since_ping = false;
        let mut deadline = tokio::time::Instant::now() + half_timeout;
        let mut yielded_at = tokio::time::Instant::now();
        loop {
            let msg = tokio::select! {
                biased;
                m = self.stream.next() => m?,
                // Do not wait for the next WAL message to find out.
                _ = self.tx.closed() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => {
                    if silent_since_ping {
                        return Err(SessionError::WalsenderSilent(self.replication_timeout));
                    }
                    silent_since_ping = true;
                    self.requests.ping();
                    deadline = tokio::time::Instant::now() + half_timeout;
                    continue;
                }
            };
            silent_since_ping = false;
            let now = tokio::time::Instant::now();
            deadline = now + half_timeout;
            if now - yielded_at >= YIELD_EVERY {
                tokio::task::yield_now().await;
                yielded_at = tokio::time::Instant::now();
            }
            let flow = match msg {
                None => return Err(SessionError::StreamEnded),
                Some(ReplicationMessage::XLogData {
                    wal_start, data, ..
                }) => self.on_wal(wal_start, data).await?,
                Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => self.on_keepalive(wal_end, reply_requested).await,
            };
            if let Flow::PublisherGone = flow {
                return Ok(());
            }
        }
    }

    /// One pgoutput message: decoded, its table described if it is a
    /// Relation message, and whatever it completes sent on.
    async fn on_wal(&mut self, lsn: Lsn, data: Bytes) -> Result<Flow, SessionError> {
        self.metrics.add_wal_bytes(data.len());
        if let Err(e) = self.assembler.push(lsn, &data) {
            let item = self.undecodable(e, Some(&data))?;
            return Ok(self.send(item).await);
        }
        if let Some(relation) = self.assembler.take_undescribed() {
            let info = self.describer.describe(relation).await;
            self.assembler.install(info);
        }
        loop {
            let out = match self.assembler.next() {
                Ok(Some(out)) => out,
                Ok(None) => return Ok(Flow::Continue),
                Err(e) => {
                    let item = self.undecodable(e, None)?;
                    if let Flow::PublisherGone = self.send(item).await {
                        return Ok(Flow::PublisherGone);
                    }
                    continue;
                }
            };
            let item = match out {
                Output::Begin {
                    xid,
                    commit_lsn,
                    commit_ts,
                } => Item::Begin {
                    xid,
                    commit_lsn,
                    commit_ts,
                },
                Output::Event(ev) => match self.on_event(ev).await {
                    Some(item) => item,
                    None => {
                        // A snapshot signal or watermark, consumed; a high
                        // watermark releases a chunk's rows in its place.
                        if let Flow::PublisherGone = self.send_snapshot_rows().await {
                            return Ok(Flow::PublisherGone);
                        }
                        continue;
                    }
                },
                Output::Commit { end_lsn, .. } => Item::Commit { end_lsn },
                Output::Progress(lsn) => Item::Mark(lsn),
            };
            if let Flow::PublisherGone = self.send(item).await {
                return Ok(Flow::PublisherGone);
            }
        }
    }

    /// The event as an item, or `None` when an on-demand snapshot consumed it.
    async fn on_event(&mut self, ev: ChangeEvent) -> Option<Item> {
        let consumed = self
            .incremental
            .on_event(&ev, self.describer.as_mut(), &mut self.snapshot_rows)
            .await;
        (!consumed).then_some(Item::Event(ev))
    }

    async fn send_snapshot_rows(&mut self) -> Flow {
        for row in std::mem::take(&mut self.snapshot_rows) {
            if let Flow::PublisherGone = self.send(Item::Event(row)).await {
                return Flow::PublisherGone;
            }
        }
        Flow::Continue
    }

    async fn on_keepalive(&mut self, wal_end: Lsn, reply_requested: bool) -> Flow {
        self.metrics.set_server_wal_end(wal_end);
        self.incremental.poll();
        let flow = if self.assembler.in_transaction() {
            Flow::Continue
        } else {
            self.send(Item::Idle(wal_end)).await
        };
        if reply_requested {
            self.requests.reply_now();
        }
        flow
    }

    fn undecodable(
        &self,
        e: crate::transaction::AssembleError,
        payload: Option<&Bytes>,
    ) -> Result<Item, SessionError> {
        undecodable(
            e,
            self.on_decode_error,
            &self.dead_letter_key,
            payload,
            &self.metrics,
        )
    }

    /// Hands an item to the publisher, waiting while its queue is full.
    async fn send(&self, item: Item) -> Flow {
        match self.tx.send(item).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::PublisherGone,
        }
    }
}
