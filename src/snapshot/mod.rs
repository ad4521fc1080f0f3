//! Consistent copies of table contents, published as `op: "r"` events.
//!
//! Two kinds:
//!
//! - **Initial** ([`initial`]): when a session creates its slot, the slot is
//!   created with an exported snapshot (the database exactly as of the slot's
//!   consistent point). The publication's tables are read inside that snapshot on
//!   several REPEATABLE READ connections (`SET TRANSACTION SNAPSHOT`, `COPY ... TO
//!   STDOUT`), published with confirms, and only then does streaming start from
//!   the consistent point: no gap, no overlap.
//!
//!   Crash safety without touching Odoo's tables: the slot is first created as a
//!   *temporary* slot under a pending name (`<slot>_snap_<hex>`). Only once every
//!   snapshot row is confirmed is it copied to the real, permanent slot
//!   (`pg_copy_logical_replication_slot`, same consistent point) and the pending
//!   one dropped. A crash at any point before the copy takes the temporary slot
//!   with it, the real slot does not exist yet, and the next start redoes the
//!   snapshot. "The permanent slot exists" is the recorded state.
//!
//! - **On demand** ([`incremental`]): a signal in the WAL
//!   (`pg_logical_emit_message(true, 'odoo-cdc.signal', '{"snapshot":"public.sale_order"}')`,
//!   or `odoo-cdc snapshot`) re-reads one table while streaming continues, in
//!   primary-key chunks framed by watermark messages (the DBLog / Debezium
//!   incremental snapshot): rows that a streamed change touched between a chunk's
//!   low and high watermark are dropped from the chunk, the rest are published at
//!   the high watermark, in stream order.
//!
//! Message ids of snapshot events (see `ChangeEvent::message_id` in `event.rs`):
//! `<LSN, 16 hex>-r<table OID, 8 hex>-<row ordinal, 10 digits>`, where the LSN is
//! the consistent point (initial) or the commit LSN of the chunk's high watermark
//! (on demand). The `r` keeps them apart from stream ids (`<LSN>-<8 digits>`) and
//! sorts them after the stream events of that LSN.

pub mod catalog;
pub mod copy_text;
pub mod incremental;
pub mod initial;

use std::time::Duration;

use crate::replication::ReplicationError;

/// Prefix of the logical messages that ask for an on-demand snapshot.
pub const SIGNAL_PREFIX: &str = "odoo-cdc.signal";
/// Prefix of the watermark messages framing each on-demand snapshot chunk.
pub const WATERMARK_PREFIX: &str = "odoo-cdc.watermark";

/// Longest wait for the next piece of a snapshot query's result.
pub const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// When a session takes an initial snapshot (`--snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// When the session creates the slot (the default).
    Initial,
    /// Never; streaming starts from the slot.
    Never,
    /// When the slot is missing (created even without `--create-slot`) or
    /// invalidated (dropped and re-created).
    WhenNeeded,
    /// Snapshot through a temporary slot, then exit 0 without streaming; the
    /// streaming slot is neither created nor touched.
    InitialOnly,
}

impl SnapshotMode {
    pub const CHOICES: &'static [(&'static str, SnapshotMode)] = &[
        ("initial", SnapshotMode::Initial),
        ("never", SnapshotMode::Never),
        ("when_needed", SnapshotMode::WhenNeeded),
        ("initial_only", SnapshotMode::InitialOnly),
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("snapshot: {0}")]
    Connect(#[from] ReplicationError),
    #[error("snapshot of table {table}: {what}")]
    Table { table: String, what: String },
    #[error("snapshot: no data from the server for {after:?} while {what}")]
    Timeout { what: String, after: Duration },
    /// The publishing stage stopped; its own error is the one to report.
    #[error("snapshot: the publisher stopped")]
    PublisherGone,
}

impl SnapshotError {
    pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| SnapshotError::Sql { context, source }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            SnapshotError::Sql { source, .. } => match source.code() {
                // Missing rights, missing objects, bad filter SQL: retrying repeats them.
                Some(code) => {
                    let c = code.code();
                    !(c.starts_with("42") || c.starts_with("22") || c == "0A000")
                }
                None => true,
            },
            SnapshotError::Connect(e) => e.is_retryable(),
            SnapshotError::Table { .. } => false,
            SnapshotError::Timeout { .. } | SnapshotError::PublisherGone => true,
        }
    }
}

/// Runs `SET` commands every snapshot connection needs: Odoo roles often carry
/// a `statement_timeout`, and a snapshot transaction is long and partly idle.
pub(crate) async fn prepare_connection(
    client: &tokio_postgres::Client,
) -> Result<(), SnapshotError> {
    bounded(
        "preparing a snapshot connection",
        client.batch_execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0",
        ),
    )
    .await?
    .map_err(SnapshotError::sql("preparing a snapshot connection"))
}

/// Bounds one round trip of a snapshot connection.
pub(crate) async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, SnapshotError> {
    tokio::time::timeout(READ_TIMEOUT, fut)
        .await
        .map_err(|_| SnapshotError::Timeout {
            what: what.to_string(),
            after: READ_TIMEOUT,
        })
}
