//! What one replication session needs, validated beforehand: the library's
//! configuration types. The command line and the configuration file build a
//! [`SessionConfig`]; the session and what it uses (slot, publication,
//! describer) read it. Nothing here imports any of them back.

use std::time::Duration;

use crate::event::{EncodeOptions, Format};
use crate::replication::PgConfig;
use crate::routing::Routing;

/// One message per change, or one per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Row,
    Transaction,
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

    /// The publication names (`--publication` takes a comma-separated list).
    pub fn publications(&self) -> Vec<String> {
        self.publication
            .split(',')
            .map(|p| p.trim().to_string())
            .collect()
    }
}

/// `--on-oversized`: what happens to an event too large to publish. Never an
/// endless retry of a message the broker will refuse again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOversized {
    /// Stop with an error naming table, key and LSN (exit code 6).
    Fail,
    /// Publish an envelope (table, key, LSN, size) to `<prefix>.dead_letter`.
    DeadLetter,
}

/// `--on-decode-error`: what happens to a value or pgoutput message that
/// cannot be decoded. Never a silent null or a skipped event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDecodeError {
    /// Stop with an error naming table, column and LSN (exit code 5).
    Fail,
    /// Publish the event with the column's raw text, named in `source.raw_columns`.
    Raw,
    /// Publish the raw payload and the error to `<prefix>.dead_letter` instead.
    DeadLetter,
}
