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
use futures::StreamExt;
use futures::stream::FuturesUnordered;
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
    /// When to take an initial snapshot.
    pub snapshot: crate::snapshot::SnapshotMode,
    /// Parallel connections of the initial snapshot.
    pub snapshot_workers: usize,
    /// Rows per chunk of an on-demand snapshot.
    pub snapshot_chunk_rows: usize,
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
            snapshot: crate::snapshot::SnapshotMode::Initial,
            snapshot_workers: 2,
            snapshot_chunk_rows: 4096,
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
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
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
            PipelineError::Snapshot(e) => e.is_retryable(),
            PipelineError::StreamEnded => true,
            // A value that cannot be encoded will fail again on replay.
            PipelineError::Encode(_) | PipelineError::Assemble(_) => false,
            PipelineError::Internal(_) => false,
        }
    }
}

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
    /// A safe position with nothing to publish (idle keepalive, heartbeat).
    Mark(Lsn),
    /// Answered once everything sent before is confirmed (end of a snapshot).
    Barrier(tokio::sync::oneshot::Sender<()>),
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
    let mut describer = describer;
    tokio::pin!(shutdown);

    // The publisher runs from the start: an initial snapshot goes through it too.
    let confirmed = Arc::new(AtomicU64::new(start.0));
    let advanced = Arc::new(Notify::new());
    let (tx, rx) = mpsc::channel::<Item>(cfg.channel_capacity);
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

    if let Some(export) = &prepared.export {
        let done = tokio::select! {
            biased;
            _ = &mut shutdown => None,
            r = initial_snapshot(cfg, export, version, describer.as_mut(), &tx, &metrics) => Some(r),
        };
        let outcome = match done {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            // Shutdown mid-snapshot: the temporary slot goes with the
            // connection, so the next start snapshots again.
            None => Ok(false),
        };
        let finished = match outcome {
            Ok(true) if cfg.snapshot != crate::snapshot::SnapshotMode::InitialOnly => {
                slot::finish_snapshot(&mut client, cfg, export).await?;
                true
            }
            Ok(_) => false,
            Err(e) => {
                drop(tx);
                let publisher_error =
                    match tokio::time::timeout(cfg.shutdown_grace, publisher).await {
                        Ok(Ok(Err(p))) => Some(p),
                        _ => None,
                    };
                return Err(match (e, publisher_error) {
                    (
                        PipelineError::Snapshot(crate::snapshot::SnapshotError::PublisherGone),
                        Some(p),
                    ) => p,
                    (e, _) => e,
                });
            }
        };
        if !finished {
            drop(tx);
            let r = tokio::time::timeout(cfg.shutdown_grace, publisher).await;
            client.close().await;
            if let Ok(Ok(Err(e))) = r {
                return Err(e);
            }
            return Ok(Stopped::Shutdown { confirmed: start });
        }
    }

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

    let mut assembler = Assembler::new(describer, cfg.stream_mem_budget, cfg.spill_dir.clone());
    let mut incremental = crate::snapshot::incremental::Incremental::new(
        crate::snapshot::incremental::Settings {
            source: cfg.source.clone(),
            publications: publication_list(cfg),
            chunk_rows: cfg.snapshot_chunk_rows.max(1),
            server_version: version,
        },
        metrics.clone(),
    );
    let mut snapshot_rows: Vec<ChangeEvent> = Vec::new();
    let read_result: Result<(), PipelineError> = async {
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                m = reader.next() => m?,
            };
            match msg {
                None => return Err(PipelineError::StreamEnded),
                Some(ReplicationMessage::XLogData {
                    wal_start, data, ..
                }) => {
                    metrics.add_wal_bytes(data.len());
                    assembler.push(wal_start, &data)?;
                    while let Some(out) = assembler.next()? {
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
                            Output::Event(ev) => {
                                // Snapshot signals and watermarks are consumed
                                // here; a high watermark releases a chunk's rows.
                                let consumed = incremental.on_event(
                                    &ev,
                                    &mut |rel| assembler.describe_relation(rel),
                                    &mut snapshot_rows,
                                );
                                if consumed {
                                    for row in snapshot_rows.drain(..) {
                                        if tx.send(Item::Event(row)).await.is_err() {
                                            return Ok(());
                                        }
                                    }
                                    continue;
                                }
                                Item::Event(ev)
                            }
                            Output::Commit { end_lsn, .. } => Item::Commit { end_lsn },
                            Output::Progress(lsn) => Item::Mark(lsn),
                        };
                        if tx.send(item).await.is_err() {
                            // The publisher stopped: its error is the one to report.
                            return Ok(());
                        }
                    }
                }
                Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => {
                    metrics.set_server_wal_end(wal_end);
                    incremental.poll();
                    if !assembler.in_transaction() && tx.send(Item::Mark(wal_end)).await.is_err() {
                        return Ok(());
                    }
                    if reply_requested {
                        reply_now.notify_one();
                    }
                }
            }
        }
    }
    .await;
    drop(tx);
    drop(incremental);

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

fn publication_list(cfg: &SessionConfig) -> Vec<String> {
    cfg.publication
        .split(',')
        .map(|p| p.trim().to_string())
        .collect()
}

/// Reads the tables inside the exported snapshot and waits until the broker
/// confirmed every row.
async fn initial_snapshot(
    cfg: &SessionConfig,
    export: &slot::Export,
    version: u32,
    describer: &mut dyn TableDescriber,
    tx: &mpsc::Sender<Item>,
    metrics: &Arc<Metrics>,
) -> Result<(), PipelineError> {
    let plan = crate::snapshot::initial::Plan {
        source: cfg.source.clone(),
        publications: publication_list(cfg),
        snapshot_name: export.snapshot_name.clone(),
        consistent_point: export.consistent_point,
        workers: cfg.snapshot_workers,
        server_version: version,
    };
    crate::snapshot::initial::run(&plan, describer, tx, metrics).await?;
    let (done, confirmed) = tokio::sync::oneshot::channel();
    tx.send(Item::Barrier(done))
        .await
        .map_err(|_| crate::snapshot::SnapshotError::PublisherGone)?;
    confirmed
        .await
        .map_err(|_| crate::snapshot::SnapshotError::PublisherGone)?;
    tracing::info!(consistent_point = %export.consistent_point, "initial snapshot confirmed by the sink");
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
    /// Answered when nothing is in flight any more.
    barriers: Vec<tokio::sync::oneshot::Sender<()>>,
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
            barriers: Vec::new(),
        }
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Item>) -> Result<(), PipelineError> {
        let mut open = true;
        loop {
            if !open && self.pending.is_empty() {
                return Ok(());
            }
            let mut can_take = open && self.checkpoint.in_flight() < self.window;
            if !can_take && open && self.pending.is_empty() {
                // The window is full of write-then-flush deliveries: make them
                // durable to free it (a transaction larger than the window).
                self.flush_pending_writes().await?;
                can_take = self.checkpoint.in_flight() < self.window;
            }
            tokio::select! {
                biased;
                Some((id, started, res)) = self.pending.next(), if !self.pending.is_empty() => {
                    res?;
                    self.metrics.observe_confirm(started.elapsed());
                    self.confirm(id)?;
                }
                item = rx.recv(), if can_take => {
                    match item {
                        Some(item) => self.handle(item).await?,
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
                        body: Vec::new(),
                    });
                }
            }
            Item::Event(ev) => {
                self.metrics.event(&ev);
                // Snapshot rows belong to no transaction: one message each.
                match self.granularity {
                    Granularity::Row => self.publish_row(&ev).await?,
                    Granularity::Transaction if ev.snapshot => self.publish_row(&ev).await?,
                    Granularity::Transaction => self.add_to_txn(&ev).await?,
                }
            }
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
        let encoded = self.encode_event(ev)?;
        let Some(t) = self.txn.as_mut() else {
            return Err(PipelineError::Internal(
                "event outside a transaction in transaction granularity".into(),
            ));
        };
        if t.first_seq.is_none() {
            t.first_seq = Some(ev.seq);
        }
        t.next_seq = ev.seq + 1;
        match self.format {
            Format::Json => {
                if t.events > 0 {
                    t.body.push(b',');
                }
                t.body.extend_from_slice(&encoded);
            }
            Format::Protobuf => crate::protobuf::append_to_transaction(&mut t.body, &encoded),
        }
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
