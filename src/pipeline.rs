//! One replication session, end to end: slot → events → sink → checkpoint →
//! standby status.
//!
//! Three concurrent parts, joined by a bounded channel:
//! - the **reader** (this task) reads the walsender stream, assembles
//!   transactions and sends [`Item`]s down the channel. When the channel is full
//!   it stops reading, so TCP backpressure reaches the walsender instead of
//!   memory growing here;
//! - the **publisher** task encodes events, hands them to the sink, keeps a
//!   bounded window of unconfirmed messages and feeds positive confirms to the
//!   [`Checkpoint`];
//! - the **status** task reports the checkpoint's LSN to Postgres on a timer,
//!   promptly after it advances, and at once when the server asks for a reply. It
//!   runs on the write half of the connection, so the walsender hears from us
//!   even while the reader is blocked on a full channel.
//!
//! A session ends with an error on any failure; the caller (supervisor)
//! reconnects and resumes from the slot's `confirmed_flush_lsn`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use crate::checkpoint::{Checkpoint, DeliveryId};
use crate::event::{ChangeEvent, EncodeError, EncodeOptions, encode_json, write_pg_timestamp};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::replication::{PgConfig, ReplicationClient, ReplicationError, ReplicationMessage};
use crate::routing::Routing;
use crate::sink::{Confirm, ConfirmFuture, HeaderValue, OutgoingMessage, Sink, SinkError};
use crate::slot::{self, SlotError};
use crate::transaction::{AssembleError, Assembler, Output, TableDescriber};

/// One message per change, or one per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Row,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Protobuf => "application/x-protobuf",
        }
    }
}

/// Everything a session needs, validated beforehand.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub source: PgConfig,
    pub slot: String,
    pub publication: String,
    pub create_slot: bool,
    pub temporary_slot: bool,
    pub create_publication: bool,
    /// Ask for `streaming 'on'` when the server supports it (PG14+).
    pub streaming: bool,
    pub granularity: Granularity,
    pub format: Format,
    pub encode: EncodeOptions,
    pub routing: Routing,
    /// Unconfirmed messages allowed in flight.
    pub window: usize,
    /// Items buffered between reader and publisher.
    pub channel_capacity: usize,
    /// Memory budget for buffered streamed transactions, bytes.
    pub stream_mem_budget: usize,
    pub spill_dir: Option<std::path::PathBuf>,
    /// Standby status period (also the longest the server waits for news).
    pub status_interval: Duration,
    /// Transaction granularity: events per message part.
    pub max_events_per_message: usize,
    /// How long to wait for in-flight confirms on shutdown.
    pub shutdown_grace: Duration,
}

impl SessionConfig {
    /// Defaults sized for throughput on a small machine; callers override.
    pub fn new(source: PgConfig, slot: impl Into<String>, publication: impl Into<String>) -> Self {
        let db = source.dbname.clone();
        SessionConfig {
            source,
            slot: slot.into(),
            publication: publication.into(),
            create_slot: false,
            temporary_slot: false,
            create_publication: false,
            streaming: true,
            granularity: Granularity::Row,
            format: Format::Json,
            encode: EncodeOptions { db: db.clone() },
            routing: Routing::new(db, None),
            window: 2048,
            channel_capacity: 4096,
            stream_mem_budget: 64 * 1024 * 1024,
            spill_dir: None,
            status_interval: Duration::from_secs(10),
            max_events_per_message: 1000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the replication stream ended: the server closed it (shutdown or slot taken over?)")]
    StreamEnded,
    #[error("internal: {0}")]
    Internal(String),
}

impl PipelineError {
    /// Whether reconnecting and resuming can help (the error policy in one place).
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Replication(e) => e.is_retryable(),
            PipelineError::Slot(e) => e.is_retryable(),
            PipelineError::Sink(e) => e.is_retryable(),
            PipelineError::StreamEnded => true,
            // A value that cannot be encoded will fail again on replay.
            PipelineError::Encode(_) | PipelineError::Assemble(_) => false,
            PipelineError::Internal(_) => false,
        }
    }
}

/// What the reader sends to the publisher, in WAL order.
enum Item {
    Begin {
        xid: u32,
        commit_lsn: Lsn,
        commit_ts: i64,
    },
    Event(ChangeEvent),
    Commit {
        end_lsn: Lsn,
    },
    /// A safe position with nothing to publish (idle keepalive, heartbeat).
    Mark(Lsn),
}

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; everything confirmed was reported.
    Shutdown { confirmed: Lsn },
}

/// Runs one replication session until `shutdown` resolves or a failure.
pub async fn run_session<S, F>(
    cfg: &SessionConfig,
    sink: S,
    describer: Box<dyn TableDescriber>,
    metrics: Arc<Metrics>,
    shutdown: F,
) -> Result<Stopped, PipelineError>
where
    S: Sink + 'static,
    F: std::future::Future<Output = ()>,
{
    let mut client = ReplicationClient::connect(&cfg.source).await?;
    let version = client.server_version_num();
    let prepared = slot::prepare(&mut client, cfg).await?;
    let start = prepared.start;
    tracing::info!(
        slot = %cfg.slot,
        publication = %cfg.publication,
        start = %start,
        server_version = version,
        "starting replication"
    );

    let mut options: Vec<(&str, String)> = Vec::new();
    let streaming = cfg.streaming && version >= 140000;
    options.push((
        "proto_version",
        if streaming { "2" } else { "1" }.to_string(),
    ));
    let publications: Vec<&str> = cfg.publication.split(',').map(str::trim).collect();
    options.push((
        "publication_names",
        crate::replication::publication_names_value(&publications),
    ));
    if version >= 140000 {
        options.push(("messages", "true".to_string()));
    }
    if streaming {
        options.push(("streaming", "on".to_string()));
    }
    let opts: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stream = client
        .start_logical_replication(&cfg.slot, start, &opts)
        .await?;
    let (mut reader, mut status) = stream.split();

    let confirmed = Arc::new(AtomicU64::new(start.0));
    let advanced = Arc::new(Notify::new());
    let reply_now = Arc::new(Notify::new());
    let stop_status = Arc::new(Notify::new());

    // Status task: owns the write half.
    let status_task = {
        let confirmed = confirmed.clone();
        let advanced = advanced.clone();
        let reply_now = reply_now.clone();
        let stop_status = stop_status.clone();
        let interval = cfg.status_interval;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut last_sent = Lsn(0);
            let mut last_time = Instant::now();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut finishing = false;
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = reply_now.notified() => {}
                    _ = advanced.notified() => {
                        // Report progress promptly, but at most twice a second.
                        let since = last_time.elapsed();
                        if since < Duration::from_millis(500) {
                            tokio::time::sleep(Duration::from_millis(500) - since).await;
                        }
                    }
                    _ = stop_status.notified() => { finishing = true; }
                }
                let lsn = Lsn(confirmed.load(Ordering::Acquire));
                status.send_status(lsn, lsn, lsn, false).await?;
                metrics.set_confirmed_lsn(lsn);
                if lsn != last_sent {
                    tracing::debug!(flush = %lsn, "reported flush LSN");
                }
                last_sent = lsn;
                last_time = Instant::now();
                if finishing {
                    let _ = status.finish().await;
                    return Ok::<Lsn, ReplicationError>(last_sent);
                }
            }
        })
    };

    // Items travel in batches of what the socket already holds, so a busy
    // stream costs one channel hand-off (and at most one wake-up of the
    // publisher's thread) per batch instead of per change; the bound in items
    // stays about `channel_capacity`.
    let (tx, rx) = mpsc::channel::<Vec<Item>>((cfg.channel_capacity / BATCH).max(1));
    let publisher = {
        let cfg = cfg.clone();
        let confirmed = confirmed.clone();
        let advanced = advanced.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut p = Publisher::new(&cfg, sink, start, confirmed, advanced, metrics);
            p.run(rx).await
        })
    };

    let mut assembler = Assembler::new(describer, cfg.stream_mem_budget, cfg.spill_dir.clone());
    tokio::pin!(shutdown);
    let read_result: Result<(), PipelineError> = async {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                m = reader.next() => m?,
            };
            let mut next = Some(msg);
            // Back to the shutdown check after at most BATCH messages.
            let mut budget = BATCH;
            while let Some(msg) = next.take() {
                budget -= 1;
                let Some(msg) = msg else {
                    return Err(PipelineError::StreamEnded);
                };
                read_one(msg, &mut assembler, &mut batch, &metrics, &reply_now)?;
                // Drain everything the message released (a streamed
                // transaction's commit replays all of it) in bounded batches.
                while let Some(out) = assembler.next()? {
                    batch.push(item_of(out));
                    if batch.len() >= BATCH && !send(&tx, &mut batch).await {
                        return Ok(());
                    }
                }
                if budget == 0 {
                    break;
                }
                // `next` is cancel-safe: a message not complete yet stays buffered.
                next = match reader.next().now_or_never() {
                    Some(m) => Some(m?),
                    None => None,
                };
            }
            if !batch.is_empty() && !send(&tx, &mut batch).await {
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);

    // The publisher drains what was read, then waits for confirms (bounded by the grace period).
    let publish_result = match tokio::time::timeout(cfg.shutdown_grace, publisher).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(PipelineError::Internal(format!(
            "publisher task failed: {join}"
        ))),
        Err(_) => Err(PipelineError::Internal(format!(
            "in-flight confirms not settled within the {:?} grace period",
            cfg.shutdown_grace
        ))),
    };
    stop_status.notify_one();
    let status_result = tokio::time::timeout(Duration::from_secs(10), status_task).await;
    drop(reader);
    read_result?;
    publish_result?;
    let final_lsn = match status_result {
        Ok(Ok(Ok(lsn))) => lsn,
        Ok(Ok(Err(e))) => return Err(e.into()),
        _ => Lsn(confirmed.load(Ordering::Acquire)),
    };
    if cfg.temporary_slot {
        tracing::info!(slot = %cfg.slot, "temporary slot is dropped with the connection");
    }
    Ok(Stopped::Shutdown {
        confirmed: final_lsn,
    })
}

/// Most items sent to the publisher in one batch.
const BATCH: usize = 256;

/// Sends a batch to the publisher; false once the publisher has stopped (its
/// error is the one to report).
async fn send(tx: &mpsc::Sender<Vec<Item>>, batch: &mut Vec<Item>) -> bool {
    let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
    tx.send(full).await.is_ok()
}

fn item_of(out: Output) -> Item {
    match out {
        Output::Begin {
            xid,
            commit_lsn,
            commit_ts,
        } => Item::Begin {
            xid,
            commit_lsn,
            commit_ts,
        },
        Output::Event(ev) => Item::Event(ev),
        Output::Commit { end_lsn, .. } => Item::Commit { end_lsn },
        Output::Progress(lsn) => Item::Mark(lsn),
    }
}

/// Feeds one replication message to the assembler (whose outputs the caller
/// drains before the next one), or turns a keepalive into a safe position.
fn read_one(
    msg: ReplicationMessage,
    assembler: &mut Assembler,
    batch: &mut Vec<Item>,
    metrics: &Metrics,
    reply_now: &Notify,
) -> Result<(), PipelineError> {
    match msg {
        ReplicationMessage::XLogData {
            wal_start, data, ..
        } => {
            metrics.add_wal_bytes(data.len());
            assembler.push(wal_start, &data)?;
        }
        ReplicationMessage::Keepalive {
            wal_end,
            reply_requested,
            ..
        } => {
            metrics.set_server_wal_end(wal_end);
            if !assembler.in_transaction() {
                batch.push(Item::Mark(wal_end));
            }
            if reply_requested {
                reply_now.notify_one();
            }
        }
    }
    Ok(())
}

/// The publishing stage.
struct Publisher<S: Sink> {
    sink: S,
    checkpoint: Checkpoint,
    confirmed: Arc<AtomicU64>,
    advanced: Arc<Notify>,
    metrics: Arc<Metrics>,
    window: usize,
    granularity: Granularity,
    format: Format,
    encode: EncodeOptions,
    routing: Routing,
    max_events_per_message: usize,
    pending: FuturesUnordered<PendingConfirm>,
    on_flush: Vec<DeliveryId>,
    txn: Option<TxnBatch>,
    buf: Vec<u8>,
    /// The last transaction's part buffer, reused by the next one.
    spare_body: Vec<u8>,
}

type PendingConfirm = std::pin::Pin<
    Box<dyn std::future::Future<Output = (DeliveryId, Instant, Result<(), SinkError>)> + Send>,
>;

/// Transaction granularity: the part being filled.
struct TxnBatch {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    part: u32,
    first_seq: Option<u32>,
    /// Sequence number after the last event added, for an empty final part's id.
    next_seq: u32,
    events: u32,
    body: Vec<u8>,
}

impl<S: Sink> Publisher<S> {
    fn new(
        cfg: &SessionConfig,
        sink: S,
        start: Lsn,
        confirmed: Arc<AtomicU64>,
        advanced: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Publisher {
            sink,
            checkpoint: Checkpoint::new(start),
            confirmed,
            advanced,
            metrics,
            window: cfg.window.max(1),
            granularity: cfg.granularity,
            format: cfg.format,
            encode: cfg.encode.clone(),
            routing: cfg.routing.clone(),
            max_events_per_message: cfg.max_events_per_message.max(1),
            pending: FuturesUnordered::new(),
            on_flush: Vec::new(),
            txn: None,
            buf: Vec::with_capacity(4096),
            spare_body: Vec::new(),
        }
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Vec<Item>>) -> Result<(), PipelineError> {
        let mut open = true;
        // The batch being handled, one item at a time so the window holds.
        let mut items = Vec::new().into_iter();
        loop {
            if !open && items.len() == 0 && self.pending.is_empty() {
                return Ok(());
            }
            let mut can_take = self.checkpoint.in_flight() < self.window;
            if !can_take && self.pending.is_empty() {
                // The window is full of write-then-flush deliveries: make them
                // durable to free it (a transaction larger than the window).
                self.flush_pending_writes().await?;
                can_take = self.checkpoint.in_flight() < self.window;
            }
            if can_take && let Some(item) = items.next() {
                self.handle(item).await?;
                continue;
            }
            tokio::select! {
                biased;
                Some((id, started, res)) = self.pending.next(), if !self.pending.is_empty() => {
                    res?;
                    self.metrics.observe_confirm(started.elapsed());
                    self.confirm(id)?;
                }
                batch = rx.recv(), if open && can_take => {
                    match batch {
                        Some(batch) => items = batch.into_iter(),
                        None => {
                            open = false;
                            self.flush_pending_writes().await?;
                        }
                    }
                }
            }
        }
    }

    fn confirm(&mut self, id: DeliveryId) -> Result<(), PipelineError> {
        match self.checkpoint.confirm(id) {
            Ok(Some(lsn)) => self.publish_lsn(lsn),
            Ok(None) => {}
            Err(e) => return Err(PipelineError::Internal(e.to_string())),
        }
        Ok(())
    }

    fn publish_lsn(&self, lsn: Lsn) {
        self.confirmed.store(lsn.0, Ordering::Release);
        self.advanced.notify_one();
    }

    async fn handle(&mut self, item: Item) -> Result<(), PipelineError> {
        match item {
            Item::Begin {
                xid,
                commit_lsn,
                commit_ts,
            } => {
                if self.granularity == Granularity::Transaction {
                    self.txn = Some(TxnBatch {
                        xid,
                        commit_lsn,
                        commit_ts,
                        part: 0,
                        first_seq: None,
                        next_seq: 0,
                        events: 0,
                        body: std::mem::take(&mut self.spare_body),
                    });
                }
            }
            Item::Event(ev) => {
                self.metrics.event(&ev);
                match self.granularity {
                    Granularity::Row => self.publish_row(&ev).await?,
                    Granularity::Transaction => self.add_to_txn(&ev).await?,
                }
            }
            Item::Commit { end_lsn } => {
                if self.granularity == Granularity::Transaction {
                    self.flush_txn_part(true).await?;
                    if let Some(mut t) = self.txn.take() {
                        t.body.clear();
                        self.spare_body = t.body;
                    }
                }
                self.flush_pending_writes().await?;
                self.mark(end_lsn);
            }
            Item::Mark(lsn) => {
                self.flush_pending_writes().await?;
                self.mark(lsn);
            }
        }
        Ok(())
    }

    fn mark(&mut self, lsn: Lsn) {
        let before = self.checkpoint.confirmed_lsn();
        self.checkpoint.mark(lsn);
        let after = self.checkpoint.confirmed_lsn();
        if after > before {
            self.publish_lsn(after);
        }
    }

    /// Makes `OnFlush` deliveries durable and confirms them.
    async fn flush_pending_writes(&mut self) -> Result<(), PipelineError> {
        if self.on_flush.is_empty() {
            return Ok(());
        }
        self.sink.flush().await?;
        for id in std::mem::take(&mut self.on_flush) {
            self.confirm(id)?;
        }
        Ok(())
    }

    fn encode_event(&mut self, ev: &ChangeEvent) -> Result<Bytes, PipelineError> {
        self.buf.clear();
        match self.format {
            Format::Json => encode_json(ev, &self.encode, &mut self.buf)?,
            Format::Protobuf => {
                crate::protobuf::encode_event(ev, &self.encode, &mut self.buf)?;
            }
        }
        Ok(Bytes::copy_from_slice(&self.buf))
    }

    async fn publish_row(&mut self, ev: &ChangeEvent) -> Result<(), PipelineError> {
        let body = self.encode_event(ev)?;
        let msg = self
            .routing
            .row_message(ev, body, self.format.content_type());
        self.send(msg).await
    }

    async fn send(&mut self, msg: OutgoingMessage) -> Result<(), PipelineError> {
        let bytes = msg.body.len();
        let confirm = self.sink.publish(msg).await?;
        self.metrics.published(bytes);
        let id = self.checkpoint.register();
        match confirm {
            Confirm::OnFlush => self.on_flush.push(id),
            Confirm::Pending(fut) => {
                let started = Instant::now();
                let fut: ConfirmFuture = fut;
                self.pending
                    .push(Box::pin(async move { (id, started, fut.await) }));
            }
        }
        Ok(())
    }

    async fn add_to_txn(&mut self, ev: &ChangeEvent) -> Result<(), PipelineError> {
        let full = self
            .txn
            .as_ref()
            .is_some_and(|t| t.events as usize >= self.max_events_per_message);
        if full {
            self.flush_txn_part(false).await?;
        }
        let Some(t) = self.txn.as_mut() else {
            return Err(PipelineError::Internal(
                "event outside a transaction in transaction granularity".into(),
            ));
        };
        // Encoded straight into the part's body: no per-event buffer or copy.
        let start = t.body.len();
        let encoded = match self.format {
            Format::Json => {
                if t.events > 0 {
                    t.body.push(b',');
                }
                encode_json(ev, &self.encode, &mut t.body)
            }
            Format::Protobuf => {
                self.buf.clear();
                crate::protobuf::encode_event(ev, &self.encode, &mut self.buf).map(|()| {
                    crate::protobuf::append_to_transaction(&mut t.body, &self.buf);
                })
            }
        };
        if let Err(e) = encoded {
            t.body.truncate(start);
            return Err(e.into());
        }
        if t.first_seq.is_none() {
            t.first_seq = Some(ev.seq);
        }
        t.next_seq = ev.seq + 1;
        t.events += 1;
        Ok(())
    }

    /// Publishes the current part of a transaction (the last one with `final`).
    async fn flush_txn_part(&mut self, last: bool) -> Result<(), PipelineError> {
        let Some(t) = self.txn.as_mut() else {
            return Ok(());
        };
        // An empty transaction (everything filtered) publishes nothing.
        if t.events == 0 && (t.part == 0 || !last) {
            return Ok(());
        }
        let mut body = Vec::with_capacity(t.body.len() + 160);
        match self.format {
            Format::Json => {
                body.extend_from_slice(b"{\"xid\":");
                body.extend_from_slice(t.xid.to_string().as_bytes());
                body.extend_from_slice(b",\"commit_lsn\":\"");
                body.extend_from_slice(t.commit_lsn.to_string().as_bytes());
                body.extend_from_slice(b"\",\"commit_ts\":\"");
                write_pg_timestamp(t.commit_ts, &mut body);
                body.extend_from_slice(b"\",\"part\":");
                body.extend_from_slice(t.part.to_string().as_bytes());
                body.extend_from_slice(if last {
                    b",\"final\":true,\"events\":["
                } else {
                    b",\"final\":false,\"events\":["
                });
                body.extend_from_slice(&t.body);
                body.extend_from_slice(b"]}");
            }
            Format::Protobuf => {
                crate::protobuf::finish_transaction(
                    &mut body,
                    t.xid,
                    t.commit_lsn,
                    t.commit_ts,
                    t.part,
                    last,
                    &t.body,
                );
            }
        }
        let seq = t.first_seq.unwrap_or(t.next_seq);
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(
            "x-commit-lsn".into(),
            HeaderValue::Str(t.commit_lsn.to_string()),
        );
        headers.insert("x-xid".into(), HeaderValue::Int(i64::from(t.xid)));
        headers.insert("x-part".into(), HeaderValue::Int(i64::from(t.part)));
        headers.insert("x-parts-final".into(), HeaderValue::Bool(last));
        headers.insert("x-events".into(), HeaderValue::Int(i64::from(t.events)));
        if self.format == Format::Protobuf {
            headers.insert(
                "x-protobuf-type".into(),
                HeaderValue::Str(crate::protobuf::TRANSACTION_TYPE_NAME.into()),
            );
        }
        let msg = OutgoingMessage {
            routing_key: self.routing.transaction_key(),
            body: Bytes::from(body),
            message_id: crate::event::message_id(t.commit_lsn, seq),
            content_type: self.format.content_type(),
            timestamp: crate::event::pg_timestamp_unix_secs(t.commit_ts),
            kind: "transaction".into(),
            headers,
        };
        t.part += 1;
        t.events = 0;
        t.first_seq = None;
        t.body.clear();
        self.send(msg).await
    }
}
