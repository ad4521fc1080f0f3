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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;

use crate::checkpoint::{Checkpoint, DeliveryId};
use crate::config::{OnDecodeError, OnOversized};
use crate::event::{ChangeEvent, EncodeError, EncodeOptions, encode_json, write_pg_timestamp};
use crate::lsn::Lsn;
use crate::metrics::{CircuitState, DecodeOutcome, Metrics, ReconnectCause, TableCounterCache};
use crate::queue::{ItemReceiver, ItemSender};
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
    /// Bytes of unconfirmed message bodies allowed in flight (at least one
    /// message always is). The window alone counts messages, and a transaction
    /// granularity part holds up to `max_events_per_message` events: without
    /// this, a stalled broker let thousands of parts pile up in the AMQP
    /// client's write buffer instead of pushing back on the walsender.
    pub max_in_flight_bytes: usize,
    /// Items buffered between reader and publisher.
    pub channel_capacity: usize,
    /// Bytes of row data buffered between reader and publisher (see
    /// [`crate::queue`]).
    pub channel_bytes: usize,
    /// Memory budget for buffered streamed transactions, bytes.
    pub stream_mem_budget: usize,
    pub spill_dir: Option<std::path::PathBuf>,
    /// Standby status period (also the longest the server waits for news).
    pub status_interval: Duration,
    /// Transaction granularity: events per message part.
    pub max_events_per_message: usize,
    /// Largest message body published; transaction parts are cut below it.
    pub max_message_bytes: usize,
    /// What to do with a single event whose message would be larger.
    pub on_oversized: OnOversized,
    /// How long to wait for in-flight confirms on shutdown.
    pub shutdown_grace: Duration,
    /// When to take an initial snapshot.
    pub snapshot: crate::snapshot::SnapshotMode,
    /// Parallel connections of the initial snapshot.
    pub snapshot_workers: usize,
    /// Rows per chunk of an on-demand snapshot.
    pub snapshot_chunk_rows: usize,
    /// Silence from the walsender after which it is pinged (half of this) and
    /// then given up on (all of it).
    pub replication_timeout: Duration,
    /// What to do with a value or message that cannot be decoded.
    pub on_decode_error: OnDecodeError,
    /// Table/column filters, profile and publication mode.
    pub selection: crate::filter::SelectionConfig,
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
            max_in_flight_bytes: 16 * 1024 * 1024,
            channel_capacity: 4096,
            channel_bytes: 64 * 1024 * 1024,
            stream_mem_budget: 64 * 1024 * 1024,
            spill_dir: None,
            status_interval: Duration::from_secs(10),
            max_events_per_message: 1000,
            max_message_bytes: 16 * 1024 * 1024,
            on_oversized: OnOversized::Fail,
            shutdown_grace: Duration::from_secs(30),
            snapshot: crate::snapshot::SnapshotMode::Initial,
            snapshot_workers: 2,
            snapshot_chunk_rows: 4096,
            replication_timeout: Duration::from_secs(60),
            on_decode_error: OnDecodeError::Fail,
            selection: crate::filter::SelectionConfig::default(),
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
    #[error(
        "the walsender sent nothing for {0:?}, not even an answer to a ping: the connection is dead or stalled"
    )]
    WalsenderSilent(Duration),
    #[error(
        "event {message_id} ({table}, key {key}, LSN {lsn}) needs a message of {size} bytes, over --max-message-bytes={limit}: raise the limit (and the broker's max_message_size) or run with --on-oversized=dead-letter"
    )]
    Oversized {
        message_id: String,
        table: String,
        key: String,
        lsn: Lsn,
        size: usize,
        limit: usize,
    },
    #[error("configuration: {0}")]
    Config(String),
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
            PipelineError::StreamEnded | PipelineError::WalsenderSilent(_) => true,
            // A spill file that cannot be written (a full disk, ENOSPC) is the
            // machine's state, not the data's: the session starts over from
            // the slot once space is back, and the error names the spill.
            PipelineError::Assemble(AssembleError::Spill(crate::spill::SpillError::Io {
                ..
            })) => true,
            // A value that cannot be encoded will fail again on replay.
            PipelineError::Encode(_) | PipelineError::Assemble(_) => false,
            // The same event would be refused again.
            PipelineError::Oversized { .. } => false,
            PipelineError::Internal(_) | PipelineError::Config(_) => false,
        }
    }
}

/// Process exit codes (also in docs/operations.md and `main.rs`).
pub mod exit_code {
    /// Runtime failure that retrying cannot fix, not covered below.
    pub const RUNTIME: u8 = 1;
    /// Bad configuration or usage.
    pub const CONFIG: u8 = 2;
    /// The slot or publication is missing, was dropped or invalidated (or the
    /// slot uses another plugin): changes may have been lost on the server side.
    pub const SLOT_LOST: u8 = 3;
    /// Authentication failed (PostgreSQL or RabbitMQ credentials, TLS trust).
    pub const AUTH: u8 = 4;
    /// A value or pgoutput message could not be decoded (`--on-decode-error=fail`).
    pub const BAD_DATA: u8 = 5;
    /// An event too large to publish (`--on-oversized=fail`), or a message the
    /// broker refused for its size.
    pub const OVERSIZED: u8 = 6;
}

impl PipelineError {
    /// The exit code for this error when it stops the process (fatal errors).
    pub fn exit_code(&self) -> u8 {
        use exit_code::*;
        match self {
            PipelineError::Replication(e) | PipelineError::Slot(SlotError::Replication(e)) => {
                replication_exit_code(e)
            }
            // A publication that cannot be made to match the selection (rights,
            // FOR ALL TABLES in create mode, --profile odoo without ir_model).
            PipelineError::Slot(
                SlotError::InUse { .. } | SlotError::Unexpected { .. } | SlotError::Publication(_),
            ) => RUNTIME,
            PipelineError::Slot(_) => SLOT_LOST,
            PipelineError::Sink(SinkError::Connect { reason, .. })
                if reason.contains("ACCESS_REFUSED") =>
            {
                AUTH
            }
            PipelineError::Encode(_) | PipelineError::Assemble(_) => BAD_DATA,
            PipelineError::Oversized { .. } | PipelineError::Sink(SinkError::TooLarge { .. }) => {
                OVERSIZED
            }
            PipelineError::Config(_) => CONFIG,
            _ => RUNTIME,
        }
    }

    /// The label under which a retried failure is counted.
    pub fn reconnect_cause(&self) -> ReconnectCause {
        match self {
            PipelineError::Slot(SlotError::InUse { .. }) => ReconnectCause::SlotInUse,
            PipelineError::Replication(e) | PipelineError::Slot(SlotError::Replication(e)) => {
                if e.sqlstate() == Some("55006") {
                    ReconnectCause::SlotInUse
                } else {
                    ReconnectCause::Postgres
                }
            }
            PipelineError::WalsenderSilent(_) => ReconnectCause::ReplicationTimeout,
            PipelineError::StreamEnded => ReconnectCause::StreamEnded,
            PipelineError::Sink(_) => ReconnectCause::Rabbitmq,
            _ => ReconnectCause::Other,
        }
    }
}

fn replication_exit_code(e: &ReplicationError) -> u8 {
    use exit_code::*;
    match e {
        ReplicationError::Config(_)
        | ReplicationError::InvalidSlotName { .. }
        | ReplicationError::InvalidOption { .. }
        | ReplicationError::TlsConfig(_)
        | ReplicationError::TlsNotOffered { .. } => CONFIG,
        ReplicationError::Auth { .. }
        | ReplicationError::PasswordRequired { .. }
        | ReplicationError::TlsHandshake { .. } => AUTH,
        _ => match e.sqlstate() {
            // invalid_authorization_specification, invalid_password
            Some(code) if code.starts_with("28") => AUTH,
            // The slot or publication vanished under a running session:
            // "replication slot ... does not exist", "publication ... does not
            // exist", "can no longer get changes from replication slot".
            Some("42704") | Some("55000") if mentions_slot_or_publication(e) => SLOT_LOST,
            // Data exception while the walsender prepared a value for us
            // (e.g. 22021: bytes that are not UTF-8 in a SQL_ASCII database).
            Some(code) if code.starts_with("22") => BAD_DATA,
            _ => RUNTIME,
        },
    }
}

fn mentions_slot_or_publication(e: &ReplicationError) -> bool {
    let text = e.to_string();
    text.contains("replication slot") || text.contains("publication")
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

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; everything confirmed was reported.
    Shutdown { confirmed: Lsn },
}

/// Runs one replication session until `shutdown` resolves or a failure.
///
/// On shutdown: reading stops at once, the publisher stops taking new items
/// and waits (up to `shutdown_grace`) for the confirms of what it already
/// handed to the broker, the final standby status reports the LSN those
/// confirms made safe, and the sink and the replication connection are closed.
/// What was read but not published is simply not acknowledged: the next start
/// resumes from the slot's `confirmed_flush_lsn` and sends it again.
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
    let stop_intake = Arc::new(AtomicBool::new(false));
    let intake_stopped = Arc::new(Notify::new());
    let (tx, rx) = crate::queue::channel(cfg.channel_capacity, cfg.channel_bytes);
    let mut publisher = {
        let cfg = cfg.clone();
        let confirmed = confirmed.clone();
        let advanced = advanced.clone();
        let metrics = metrics.clone();
        let stop_intake = stop_intake.clone();
        let intake_stopped = intake_stopped.clone();
        tokio::spawn(async move {
            let mut p = Publisher::new(&cfg, sink, start, confirmed, advanced, metrics);
            let r = p.run(rx, &stop_intake, &intake_stopped).await;
            // Close the broker connection cleanly (bounded inside) once every
            // confirm is in; after a failure it is dropped instead.
            if r.is_ok()
                && let Err(e) = p.sink.close().await
            {
                tracing::debug!(error = %e, "closing the sink");
            }
            r
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
    let status_interval = status_period(&mut client, cfg.status_interval).await;
    let stream = client
        .start_logical_replication(&cfg.slot, start, &opts)
        .await?;
    let (mut reader, mut status) = stream.split();
    metrics.session_started();
    metrics.streaming.store(1, Ordering::Relaxed);
    metrics.set_confirmed_lsn(start);
    if metrics.set_circuit(CircuitState::Streaming) {
        tracing::info!(circuit = CircuitState::Streaming.label(), slot = %cfg.slot, "supervisor state");
    }
    let _streaming = StreamingFlag(&metrics);

    let reply_now = Arc::new(Notify::new());
    let ping = Arc::new(Notify::new());
    let stop_status = Arc::new(Notify::new());

    // Status task: owns the write half.
    let mut status_task = {
        let confirmed = confirmed.clone();
        let advanced = advanced.clone();
        let reply_now = reply_now.clone();
        let ping = ping.clone();
        let stop_status = stop_status.clone();
        let interval = status_interval;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut last_sent = Lsn(0);
            let mut last_time = Instant::now();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut finishing = false;
                let mut ask_reply = false;
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = reply_now.notified() => {}
                    _ = ping.notified() => { ask_reply = true; }
                    _ = advanced.notified() => {
                        // Report progress promptly, but at most twice a second.
                        let since = last_time.elapsed();
                        if since < Duration::from_millis(500) {
                            tokio::time::sleep(Duration::from_millis(500) - since).await;
                        }
                    }
                    _ = stop_status.notified() => { finishing = true; }
                }
                // Test builds only (`--features failpoints`): the status task
                // dies at once, as on a bug or a failed write (tests/failpoints.rs).
                #[cfg(feature = "failpoints")]
                if std::env::var_os("ODOO_CDC_FAILPOINT_STATUS_TASK_DIES").is_some() {
                    panic!("failpoint: the standby status task dies");
                }
                let lsn = Lsn(confirmed.load(Ordering::Acquire));
                status.send_status(lsn, lsn, lsn, ask_reply).await?;
                metrics.set_confirmed_lsn(lsn);
                if lsn != last_sent {
                    tracing::debug!(flush = %lsn, "reported flush LSN");
                }
                last_sent = lsn;
                last_time = Instant::now();
                if finishing {
                    tracing::info!(flush = %lsn, "final standby status sent");
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
    let policy = cfg.on_decode_error;
    let dead_letter_key = dead_letter_key(&cfg.routing);
    // Half the replication timeout without a message: ping (a status update
    // asking for a reply); the other half: the connection is dead.
    let half_timeout = cfg.replication_timeout / 2;
    let mut shutting_down = false;
    // Set when the status task ended before the session did.
    let mut status_early = None;
    let read_result: Result<(), PipelineError> = async {
        // Hands an item to the publisher; gives up at once on shutdown (even
        // while the publisher pushes back) or when the publisher has stopped.
        macro_rules! send {
            ($item:expr) => {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => {
                        shutting_down = true;
                        return Ok(());
                    }
                    r = tx.send($item) => {
                        if r.is_err() {
                            // The publisher stopped: its error is the one to report.
                            return Ok(());
                        }
                    }
                }
            };
        }
        let mut silent_since_ping = false;
        let mut deadline = tokio::time::Instant::now() + half_timeout;
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    shutting_down = true;
                    return Ok(());
                }
                m = reader.next() => m?,
                // The publisher stopped (its error is the one to report): do
                // not wait for the next WAL message to find out.
                _ = tx.closed() => return Ok(()),
                // Without status updates the walsender times us out and the
                // slot stops advancing: end the session at once instead.
                r = &mut status_task, if status_early.is_none() => {
                    let e = match &r {
                        Ok(Err(e)) => PipelineError::Internal(format!("the standby status task failed: {e}")),
                        Ok(Ok(_)) => PipelineError::Internal("the standby status task ended early".into()),
                        Err(join) => PipelineError::Internal(format!("the standby status task failed: {join}")),
                    };
                    status_early = Some(r);
                    return Err(e);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if silent_since_ping {
                        return Err(PipelineError::WalsenderSilent(cfg.replication_timeout));
                    }
                    silent_since_ping = true;
                    ping.notify_one();
                    deadline = tokio::time::Instant::now() + half_timeout;
                    continue;
                }
            };
            silent_since_ping = false;
            deadline = tokio::time::Instant::now() + half_timeout;
            match msg {
                None => return Err(PipelineError::StreamEnded),
                Some(ReplicationMessage::XLogData {
                    wal_start, data, ..
                }) => {
                    metrics.add_wal_bytes(data.len());
                    let pushed = if data.first() == Some(&RELATION_TAG) {
                        // Describing a table may query the catalog (up to
                        // 90 s): never on the runtime's only thread, where it
                        // would hold back the standby status updates too.
                        let chunk = data.clone();
                        let mut moved = std::mem::replace(
                            &mut assembler,
                            Assembler::new(Box::new(crate::transaction::PlainTables), 0, None),
                        );
                        let (back, r) = tokio::task::spawn_blocking(move || {
                            let r = moved.push(wal_start, &chunk);
                            (moved, r)
                        })
                        .await
                        .map_err(|e| {
                            PipelineError::Internal(format!("describing a table failed: {e}"))
                        })?;
                        assembler = back;
                        r
                    } else {
                        assembler.push(wal_start, &data)
                    };
                    if let Err(e) = pushed {
                        let item = undecodable(e, policy, &dead_letter_key, Some(&data), &metrics)?;
                        send!(item);
                    }
                    loop {
                        let out = match assembler.next() {
                            Ok(Some(out)) => out,
                            Ok(None) => break,
                            Err(e) => {
                                let item =
                                    undecodable(e, policy, &dead_letter_key, None, &metrics)?;
                                send!(item);
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
                            Output::Event(ev) => {
                                // Snapshot signals and watermarks are consumed
                                // here; a high watermark releases a chunk's rows.
                                let consumed = incremental.on_event(
                                    &ev,
                                    &mut |rel| assembler.describe_relation(rel),
                                    &mut snapshot_rows,
                                );
                                if consumed {
                                    let rows = std::mem::take(&mut snapshot_rows);
                                    for row in rows {
                                        send!(Item::Event(row));
                                    }
                                    continue;
                                }
                                Item::Event(ev)
                            }
                            Output::Commit { end_lsn, .. } => Item::Commit { end_lsn },
                            Output::Progress(lsn) => Item::Mark(lsn),
                        };
                        send!(item);
                    }
                }
                Some(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => {
                    metrics.set_server_wal_end(wal_end);
                    incremental.poll();
                    if !assembler.in_transaction() {
                        send!(Item::Idle(wal_end));
                    }
                    if reply_requested {
                        reply_now.notify_one();
                    }
                }
            }
        }
    }
    .await;
    if shutting_down || read_result.is_err() {
        // Stop reading (done) and stop publishing what was read but not yet
        // handed to the broker; only in-flight confirms are awaited. (After a
        // failed read the rest would only be published to be replayed.)
        stop_intake.store(true, Ordering::Release);
        intake_stopped.notify_one();
        if shutting_down {
            tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: waiting for in-flight confirms");
        }
    }
    drop(tx);
    drop(incremental);

    // The publisher finishes what it handed to the broker: it waits for the
    // confirms, on shutdown bounded by the grace period.
    let grace = if shutting_down {
        cfg.shutdown_grace
    } else {
        // A failed read: the publisher ends as soon as it sees the channel
        // close and its confirms settle (each bounded by the confirm timeout).
        cfg.shutdown_grace.max(Duration::from_secs(60))
    };
    let publish_result = match tokio::time::timeout(grace, &mut publisher).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(PipelineError::Internal(format!(
            "publisher task failed: {join}"
        ))),
        Err(_) => {
            publisher.abort();
            tracing::warn!(grace = ?grace, "in-flight confirms did not settle within the grace period: they will be sent again on the next start");
            Ok(())
        }
    };
    stop_status.notify_one();
    let status_result = match status_early {
        Some(r) => Ok(r),
        None => {
            let r = tokio::time::timeout(Duration::from_secs(10), &mut status_task).await;
            if r.is_err() {
                status_task.abort();
            }
            r
        }
    };
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

/// How often the standby status goes out: the configured interval, but at
/// most a third of the server's `wal_sender_timeout`. While the reader is held
/// back (a slow broker, a `tail` pipe nobody reads) it does not read the
/// walsender's keepalive requests, so only these periodic updates keep the
/// walsender from closing the connection as timed out.
async fn status_period(client: &mut ReplicationClient, configured: Duration) -> Duration {
    let timeout_ms = match client
        .simple_query("SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'")
        .await
    {
        Ok(rows) => rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse::<u64>().ok()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read wal_sender_timeout; using --status-interval-secs");
            None
        }
    };
    status_period_for(configured, timeout_ms)
}

fn status_period_for(configured: Duration, wal_sender_timeout_ms: Option<u64>) -> Duration {
    match wal_sender_timeout_ms {
        Some(ms) if ms > 0 => configured
            .min(Duration::from_millis(ms / 3))
            .max(Duration::from_millis(100)),
        _ => configured,
    }
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
    tx: &ItemSender,
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

/// Clears the streaming gauge however the session ends.
struct StreamingFlag<'a>(&'a Metrics);

impl Drop for StreamingFlag<'_> {
    fn drop(&mut self) {
        self.0.streaming.store(0, Ordering::Relaxed);
    }
}

/// `<prefix>.dead_letter`.
fn dead_letter_key(routing: &Routing) -> String {
    format!("{}.dead_letter", routing.prefix)
}

/// Applies `--on-decode-error` to a pgoutput message the assembler could not
/// take. `fail` (and every error that is not about decoding one message, such
/// as a protocol violation) stops the session; `raw` and `dead-letter` send the
/// message's bytes and the error to the dead-letter key (there is no column to
/// pass raw) and go on.
fn undecodable(
    e: AssembleError,
    policy: OnDecodeError,
    key: &str,
    payload: Option<&Bytes>,
    metrics: &Metrics,
) -> Result<Item, PipelineError> {
    let lsn = match (&e, policy) {
        (AssembleError::Decode { lsn, .. }, OnDecodeError::Raw | OnDecodeError::DeadLetter) => *lsn,
        (AssembleError::Decode { .. }, OnDecodeError::Fail) => {
            metrics.decode_error(DecodeOutcome::Failed);
            return Err(e.into());
        }
        _ => return Err(e.into()),
    };
    metrics.decode_error(DecodeOutcome::DeadLetter);
    tracing::warn!(lsn = %lsn, error = %e, routing_key = key, "undecodable pgoutput message sent to the dead-letter key");
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"error\":");
    json_str(&mut body, &e.to_string());
    body.extend_from_slice(b",\"lsn\":\"");
    body.extend_from_slice(lsn.to_string().as_bytes());
    body.extend_from_slice(b"\",\"payload_base64\":");
    match payload {
        Some(p) => {
            use base64::Engine;
            body.push(b'"');
            body.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(p)
                    .as_bytes(),
            );
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("x-lsn".into(), HeaderValue::Str(lsn.to_string()));
    headers.insert("x-error".into(), HeaderValue::Str(truncate(&e.to_string())));
    Ok(Item::DeadLetter(OutgoingMessage {
        routing_key: key.to_string(),
        body: Bytes::from(body),
        message_id: format!("{}-dead-letter", lsn.to_fixed_hex()),
        content_type: Format::Json.content_type(),
        timestamp: 0,
        kind: "dead_letter".into(),
        headers,
    }))
}

/// `,"lsn":"…","commit_lsn":"…","message_id":"…"` of an envelope that
/// stands for `ev` (dead letters, oversized events).
fn write_position(out: &mut Vec<u8>, lsn: Lsn, ev: &ChangeEvent) {
    out.extend_from_slice(b",\"lsn\":\"");
    out.extend_from_slice(lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"commit_lsn\":\"");
    out.extend_from_slice(ev.commit_lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"message_id\":");
    json_str(out, &ev.message_id());
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = crate::value::write_json_str(s.as_bytes(), out);
}

/// AMQP short strings in headers are fine long, but keep error headers readable.
fn truncate(s: &str) -> String {
    if s.len() <= 1000 {
        return s.to_string();
    }
    let mut end = 1000;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// pgoutput's Relation message tag: the one message whose handling may wait
/// for the catalog.
const RELATION_TAG: u8 = b'R';

/// Room kept in a transaction message for its envelope (xid, LSN, time,
/// part number) around the events.
const TXN_ENVELOPE_BYTES: usize = 256;

/// The publishing stage.
struct Publisher<S: Sink> {
    sink: S,
    checkpoint: Checkpoint,
    confirmed: Arc<AtomicU64>,
    advanced: Arc<Notify>,
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
    dead_letter_key: String,
    tables: TableCounterCache,
    pending: FuturesUnordered<PendingConfirm>,
    on_flush: Vec<DeliveryId>,
    txn: Option<TxnBatch>,
    buf: Vec<u8>,
    /// Answered when nothing is in flight any more.
    barriers: Vec<tokio::sync::oneshot::Sender<()>>,
}

type PendingConfirm = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (DeliveryId, Instant, usize, Result<(), SinkError>)>
            + Send,
    >,
>;

/// Transaction granularity: the part being filled.
struct TxnBatch {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    part: u32,
    first_seq: Option<u64>,
    /// Sequence number after the last event added, for an empty final part's id.
    next_seq: u64,
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
            dead_letter_key: dead_letter_key(&cfg.routing),
            tables: TableCounterCache::default(),
            pending: FuturesUnordered::new(),
            on_flush: Vec::new(),
            txn: None,
            buf: Vec::with_capacity(4096),
            barriers: Vec::new(),
        }
    }

    /// Publishes items until the channel closes (or `stop_intake` is set on
    /// shutdown) and every confirm is in.
    async fn run(
        &mut self,
        mut rx: ItemReceiver,
        stop_intake: &AtomicBool,
        intake_stopped: &Notify,
    ) -> Result<(), PipelineError> {
        let mut open = true;
        // The broker connection is watched even when idle, so a broker that
        // went away ends the session (and readiness) without waiting for the
        // next event.
        let mut health = tokio::time::interval(Duration::from_secs(1));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if open && stop_intake.load(Ordering::Acquire) {
                open = false;
                self.finish_published_work(&mut rx).await?;
            }
            if !open && self.pending.is_empty() {
                if !stop_intake.load(Ordering::Acquire) {
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
                _ = intake_stopped.notified(), if open => {
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
    async fn finish_published_work(&mut self, rx: &mut ItemReceiver) -> Result<(), PipelineError> {
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
                self.metrics.transaction_read(commit_ts);
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
        let body = match self.encode_event(ev) {
            Ok(body) => body,
            Err(PipelineError::Encode(e)) => return self.publish_row_undecodable(ev, e).await,
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
    ) -> Result<(), PipelineError> {
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
            OnDecodeError::DeadLetter => {
                let msg = self.dead_letter(ev, &e)?;
                self.send(msg).await
            }
        }
    }

    /// The event with undecodable values passed raw, and their column names.
    fn encode_raw(
        &mut self,
        ev: &ChangeEvent,
        e: &EncodeError,
    ) -> Result<(Bytes, Vec<String>), PipelineError> {
        self.buf.clear();
        let raw = crate::event::encode_json_raw(ev, &self.encode, &mut self.buf)?;
        self.metrics.decode_error(DecodeOutcome::Raw);
        tracing::warn!(error = %e, raw_columns = ?raw, message_id = %ev.message_id(), "published with raw column values (--on-decode-error=raw)");
        Ok((Bytes::copy_from_slice(&self.buf), raw))
    }

    /// A dead-letter message for an event that cannot be encoded: the error,
    /// where it happened, and the event with the bad values passed raw (or
    /// `null` if even that fails). Same `message_id` as the event would have.
    fn dead_letter(
        &mut self,
        ev: &ChangeEvent,
        e: &EncodeError,
    ) -> Result<OutgoingMessage, PipelineError> {
        self.metrics.decode_error(DecodeOutcome::DeadLetter);
        tracing::warn!(error = %e, message_id = %ev.message_id(), routing_key = %self.dead_letter_key, "event sent to the dead-letter key (--on-decode-error=dead-letter)");
        let d = &e.0;
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(b"{\"error\":");
        json_str(&mut body, &e.to_string());
        body.extend_from_slice(b",\"table\":");
        json_str(&mut body, &d.table);
        body.extend_from_slice(b",\"column\":");
        json_str(&mut body, &d.column);
        body.extend_from_slice(b",\"type\":");
        json_str(&mut body, &d.type_name);
        write_position(&mut body, d.lsn, ev);
        body.extend_from_slice(b",\"event\":");
        let mut raw = Vec::new();
        match crate::event::encode_json_raw(ev, &self.encode, &mut raw) {
            Ok(_) => body.extend_from_slice(&raw),
            Err(_) => body.extend_from_slice(b"null"),
        }
        body.push(b'}');
        let mut msg =
            self.dead_letter_message(ev, body, truncate(&e.to_string()), d.table.clone(), d.lsn);
        msg.headers
            .insert("x-column".into(), HeaderValue::Str(d.column.clone()));
        Ok(msg)
    }

    async fn send(&mut self, msg: OutgoingMessage) -> Result<(), PipelineError> {
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

    async fn add_to_txn(&mut self, ev: &ChangeEvent) -> Result<(), PipelineError> {
        // Whatever becomes of this event (added, dead-lettered, refused), an
        // empty final part must not take its id.
        if let Some(t) = self.txn.as_mut() {
            t.next_seq = t.next_seq.max(ev.seq + 1);
        }
        let encoded = match self.encode_event(ev) {
            Ok(body) => body,
            Err(PipelineError::Encode(e)) => match self.on_decode_error {
                OnDecodeError::Fail => {
                    self.metrics.decode_error(DecodeOutcome::Failed);
                    return Err(e.into());
                }
                OnDecodeError::Raw => self.encode_raw(ev, &e)?.0,
                OnDecodeError::DeadLetter => {
                    // The transaction goes on without it; the dead letter
                    // carries the same message_id the event would have had.
                    let msg = self.dead_letter(ev, &e)?;
                    return self.send(msg).await;
                }
            },
            Err(e) => return Err(e),
        };
        if encoded.len() + TXN_ENVELOPE_BYTES > self.max_message_bytes {
            return self.oversized(ev, encoded.len() + TXN_ENVELOPE_BYTES).await;
        }
        // A part is full by events or by bytes (the broker refuses bodies over
        // its max_message_size).
        let full = self.txn.as_ref().is_some_and(|t| {
            t.events as usize >= self.max_events_per_message
                || (t.events > 0
                    && t.body.len() + encoded.len() + 1 + TXN_ENVELOPE_BYTES
                        > self.max_message_bytes)
        });
        if full {
            self.flush_txn_part(false).await?;
        }
        self.tables.record(&self.metrics, ev, encoded.len());
        let Some(t) = self.txn.as_mut() else {
            return Err(PipelineError::Internal(
                "event outside a transaction in transaction granularity".into(),
            ));
        };
        if t.first_seq.is_none() {
            t.first_seq = Some(ev.seq);
        }
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

    /// `--on-oversized` for an event whose message would need `size` bytes.
    async fn oversized(&mut self, ev: &ChangeEvent, size: usize) -> Result<(), PipelineError> {
        let table = ev
            .table
            .as_ref()
            .map_or_else(String::new, |t| t.relation.qualified_name());
        let key = self.key_json(ev);
        let dead_letter = self.on_oversized == OnOversized::DeadLetter;
        self.metrics.oversized(dead_letter);
        if !dead_letter {
            return Err(PipelineError::Oversized {
                message_id: ev.message_id(),
                table,
                key,
                lsn: ev.lsn,
                size,
                limit: self.max_message_bytes,
            });
        }
        tracing::warn!(message_id = %ev.message_id(), table = %table, key = %key, lsn = %ev.lsn, size, limit = self.max_message_bytes, routing_key = %self.dead_letter_key, "event too large: an envelope goes to the dead-letter key (--on-oversized=dead-letter)");
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(b"{\"error\":\"oversized\",\"size\":");
        body.extend_from_slice(size.to_string().as_bytes());
        body.extend_from_slice(b",\"limit\":");
        body.extend_from_slice(self.max_message_bytes.to_string().as_bytes());
        body.extend_from_slice(b",\"table\":");
        json_str(&mut body, &table);
        body.extend_from_slice(b",\"op\":");
        json_str(&mut body, ev.op.code());
        body.extend_from_slice(b",\"key\":");
        body.extend_from_slice(key.as_bytes());
        write_position(&mut body, ev.lsn, ev);
        body.extend_from_slice(b",\"xid\":");
        body.extend_from_slice(ev.xid.to_string().as_bytes());
        body.push(b'}');
        let mut msg = self.dead_letter_message(ev, body, "oversized".into(), table, ev.lsn);
        msg.headers
            .insert("x-size".into(), HeaderValue::Int(size as i64));
        self.send(msg).await
    }

    /// A JSON envelope standing for `ev` on the dead-letter key, with the id
    /// the event itself would have had and the headers every envelope
    /// carries (`x-error`, `x-table`, `x-lsn`, `x-commit-lsn`, `x-op`).
    fn dead_letter_message(
        &self,
        ev: &ChangeEvent,
        body: Vec<u8>,
        error: String,
        table: String,
        lsn: Lsn,
    ) -> OutgoingMessage {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("x-error".into(), HeaderValue::Str(error));
        headers.insert("x-table".into(), HeaderValue::Str(table));
        headers.insert("x-lsn".into(), HeaderValue::Str(lsn.to_string()));
        headers.insert(
            "x-commit-lsn".into(),
            HeaderValue::Str(ev.commit_lsn.to_string()),
        );
        headers.insert("x-op".into(), HeaderValue::Str(ev.op.code().into()));
        OutgoingMessage {
            routing_key: self.dead_letter_key.clone(),
            body: Bytes::from(body),
            message_id: ev.message_id(),
            content_type: Format::Json.content_type(),
            timestamp: crate::event::pg_timestamp_unix_secs(ev.commit_ts),
            kind: "dead_letter".into(),
            headers,
        }
    }

    /// The event's key as JSON (`null` without one), at most ~1 KB.
    fn key_json(&self, ev: &ChangeEvent) -> String {
        let mut full = Vec::new();
        let key = match crate::event::encode_json_raw(ev, &self.encode, &mut full) {
            Ok(_) => serde_json::from_slice::<serde_json::Value>(&full)
                .ok()
                .map(|v| v["key"].clone())
                .unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        };
        let text = key.to_string();
        if text.len() > 1024 {
            serde_json::Value::String(truncate(&text)).to_string()
        } else {
            text
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TableInfo;
    use crate::pgoutput::{ColumnValue, TupleData};
    use crate::replication::ServerError;
    use crate::schema::{Column, Relation, ReplicaIdentity};
    use crate::transaction::PlainTables;
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
    ) -> (Result<(), PipelineError>, Vec<OutgoingMessage>, Lsn) {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.on_decode_error = policy;
        cfg.granularity = granularity;
        publish_transaction(&cfg, vec![bad_event(0)]).await
    }

    /// One transaction of `events` through a publisher.
    async fn publish_transaction(
        cfg: &SessionConfig,
        events: Vec<ChangeEvent>,
    ) -> (Result<(), PipelineError>, Vec<OutgoingMessage>, Lsn) {
        let sink = RecordingSink::default();
        let confirmed = Arc::new(AtomicU64::new(0x100));
        let metrics = Arc::new(Metrics::new());
        let mut p = Publisher::new(
            cfg,
            sink.clone(),
            Lsn(0x100),
            confirmed.clone(),
            Arc::new(Notify::new()),
            metrics,
        );
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
        let r = p.run(rx, &AtomicBool::new(false), &Notify::new()).await;
        let sent = sink.0.lock().unwrap().clone();
        (r, sent, Lsn(confirmed.load(Ordering::Acquire)))
    }

    /// A non-transactional logical message arrives outside any transaction:
    /// in transaction granularity it is published on its own (it stopped the
    /// session with "event outside a transaction" before).
    #[tokio::test]
    async fn a_non_transactional_message_is_published_alone_in_transaction_granularity() {
        let mut cfg = SessionConfig::new("postgres://u@localhost/odoo".parse().unwrap(), "s", "p");
        cfg.granularity = Granularity::Transaction;
        let sink = RecordingSink::default();
        let confirmed = Arc::new(AtomicU64::new(0x100));
        let mut p = Publisher::new(
            &cfg,
            sink.clone(),
            Lsn(0x100),
            confirmed.clone(),
            Arc::new(Notify::new()),
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
        p.run(rx, &AtomicBool::new(false), &Notify::new())
            .await
            .unwrap();
        let sent = sink.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].message_id, "0000000000002FFF-00000000");
        assert_eq!(Lsn(confirmed.load(Ordering::Acquire)), Lsn(0x3000));
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

    #[test]
    fn status_updates_go_out_well_within_wal_sender_timeout() {
        let ten = Duration::from_secs(10);
        assert_eq!(status_period_for(ten, Some(60_000)), ten);
        assert_eq!(
            status_period_for(ten, Some(5_000)),
            Duration::from_millis(1666)
        );
        assert_eq!(status_period_for(ten, Some(0)), ten, "0 = no timeout");
        assert_eq!(status_period_for(ten, None), ten);
        assert_eq!(status_period_for(ten, Some(1)), Duration::from_millis(100));
    }

    /// A full disk under the spill directory is retried (the slot holds the
    /// data), not reported as bad data.
    #[test]
    fn a_spill_write_failure_is_retryable_and_named() {
        let e = PipelineError::Assemble(AssembleError::Spill(crate::spill::SpillError::Io {
            xid: 42,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }));
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(text.contains("spill") && text.contains("42"), "{text}");
        let corrupt =
            PipelineError::Assemble(AssembleError::Spill(crate::spill::SpillError::Corrupt {
                xid: 42,
            }));
        assert!(!corrupt.is_retryable());
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

    #[test]
    fn an_unknown_pgoutput_message_fails_or_goes_to_the_dead_letter_key() {
        let metrics = Metrics::new();
        let data = Bytes::from_static(b"\x01future message");
        let mut a = Assembler::new(Box::new(PlainTables), 1 << 20, None);
        let e = a.push(Lsn(0x3000), &data).unwrap_err();
        let fail = undecodable(
            e,
            OnDecodeError::Fail,
            "odoo.dead_letter",
            Some(&data),
            &metrics,
        )
        .err()
        .unwrap();
        assert!(fail.to_string().contains("0/3000"), "{fail}");
        assert_eq!(fail.exit_code(), exit_code::BAD_DATA);

        for policy in [OnDecodeError::Raw, OnDecodeError::DeadLetter] {
            let e = a.push(Lsn(0x3000), &data).unwrap_err();
            let Ok(Item::DeadLetter(m)) =
                undecodable(e, policy, "odoo.dead_letter", Some(&data), &metrics)
            else {
                panic!("expected a dead letter");
            };
            assert_eq!(m.routing_key, "odoo.dead_letter");
            assert_eq!(m.message_id, "0000000000003000-dead-letter");
            let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(body["lsn"], "0/3000");
            assert_eq!(body["payload_base64"], "AWZ1dHVyZSBtZXNzYWdl");
            assert!(body["error"].as_str().unwrap().contains("0/3000"));
        }
        // A protocol violation is never dead-lettered: the stream is out of step.
        let commit = Bytes::from_static(&[
            b'C', 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        if let Err(e) = a.push(Lsn(0x4000), &commit) {
            assert!(undecodable(e, OnDecodeError::DeadLetter, "k", None, &metrics).is_err());
        }
    }

    fn server(code: &str, message: &str) -> PipelineError {
        PipelineError::Replication(ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }))
    }

    #[test]
    fn fatal_errors_map_to_their_exit_codes() {
        use exit_code::*;
        let slot = |e: SlotError| PipelineError::Slot(e);
        assert_eq!(
            slot(SlotError::Missing {
                slot: "s".into(),
                db: "d".into()
            })
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            slot(SlotError::PublicationMissing {
                publication: "p".into(),
                db: "d".into()
            })
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            slot(SlotError::Invalidated { slot: "s".into() }).exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server("42704", "replication slot \"s\" does not exist").exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server(
                "55000",
                "can no longer get changes from replication slot \"s\""
            )
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server("28P01", "password authentication failed").exit_code(),
            AUTH
        );
        assert_eq!(
            PipelineError::Replication(ReplicationError::Auth {
                user: "u".into(),
                reason: "bad".into()
            })
            .exit_code(),
            AUTH
        );
        assert_eq!(
            PipelineError::Sink(SinkError::Connect {
                url: "amqp://u:***@h".into(),
                reason: "ACCESS_REFUSED - Login was refused".into()
            })
            .exit_code(),
            AUTH
        );
        assert_eq!(
            server("22021", "invalid byte sequence").exit_code(),
            BAD_DATA
        );
        assert_eq!(PipelineError::Config("x".into()).exit_code(), CONFIG);
        assert_eq!(server("42501", "permission denied").exit_code(), RUNTIME);
        // Retryable ones are counted by cause.
        assert_eq!(
            slot(SlotError::InUse {
                slot: "s".into(),
                pid: "1".into()
            })
            .reconnect_cause(),
            ReconnectCause::SlotInUse
        );
        assert_eq!(
            PipelineError::WalsenderSilent(Duration::from_secs(1)).reconnect_cause(),
            ReconnectCause::ReplicationTimeout
        );
        assert!(PipelineError::WalsenderSilent(Duration::from_secs(1)).is_retryable());
    }
}
