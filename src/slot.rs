//! The replication slot and publication a session streams from.
//!
//! Before `START_REPLICATION` we look the slot up ourselves so that the failure
//! modes an operator must act on are named precisely (missing, invalidated,
//! wrong plugin) instead of surfacing as a generic server error, and so that the
//! checkpoint starts from the slot's own `confirmed_flush_lsn` (reporting a lower
//! LSN than the slot already has must never happen).

use crate::lsn::Lsn;
use crate::pipeline::SessionConfig;
use crate::replication::{ReplicationClient, ReplicationError, SnapshotAction};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "replication slot {slot:?} does not exist in database {db:?}: create it with `odoo-cdc slot create` or pass --create-slot"
    )]
    Missing { slot: String, db: String },
    #[error(
        "publication {publication:?} does not exist in database {db:?}: create it (CREATE PUBLICATION {publication} FOR TABLE ...) or pass --create-publication"
    )]
    PublicationMissing { publication: String, db: String },
    #[error(
        "replication slot {slot:?} was invalidated (wal_status = lost): the WAL it needed is gone, so changes were lost on the server side. Drop it and re-create it with a fresh snapshot"
    )]
    Invalidated { slot: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, but odoo-cdc needs pgoutput")]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} is in use by another process (pid {pid}); waiting for it to be released"
    )]
    InUse { slot: String, pid: String },
    /// The publication cannot be made to match the selection (or the profile
    /// cannot be loaded): the message says what to change.
    #[error("{0}")]
    Publication(String),
    #[error("unexpected answer while inspecting slot {slot:?}: {what}")]
    Unexpected { slot: String, what: String },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

impl SlotError {
    pub fn is_retryable(&self) -> bool {
        match self {
            // Another instance holds the slot: a standby waits for it.
            SlotError::InUse { .. } => true,
            SlotError::Replication(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Where replication starts.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub start: Lsn,
    pub created: bool,
}

pub use crate::replication::{quote_ident, quote_literal};

/// Ensures the publication and slot exist (creating them when asked) and returns
/// the LSN to start from.
pub async fn prepare(
    client: &mut ReplicationClient,
    cfg: &SessionConfig,
) -> Result<Prepared, SlotError> {
    let db = cfg.source.dbname.clone();
    // Publications first: a slot created before its publication cannot decode
    // the WAL in between.
    crate::publication::prepare(cfg).await?;

    let rows = client
        .simple_query(&format!(
            "SELECT plugin, confirmed_flush_lsn, wal_status, active_pid FROM pg_replication_slots \
             WHERE slot_name = {} AND database = current_database()",
            quote_literal(&cfg.slot)
        ))
        .await?;
    let unexpected = |what: &str| SlotError::Unexpected {
        slot: cfg.slot.clone(),
        what: what.to_string(),
    };
    match rows.first() {
        None => {
            if !cfg.create_slot {
                return Err(SlotError::Missing {
                    slot: cfg.slot.clone(),
                    db,
                });
            }
            let created = client
                .create_logical_slot(&cfg.slot, cfg.temporary_slot, SnapshotAction::NoExport)
                .await?;
            tracing::info!(slot = %cfg.slot, temporary = cfg.temporary_slot, consistent_point = %created.consistent_point, "created replication slot");
            Ok(Prepared {
                start: created.consistent_point,
                created: true,
            })
        }
        Some(row) => {
            let plugin = row.first().cloned().flatten().unwrap_or_default();
            if plugin != "pgoutput" {
                return Err(SlotError::WrongPlugin {
                    slot: cfg.slot.clone(),
                    plugin,
                });
            }
            if row.get(2).cloned().flatten().as_deref() == Some("lost") {
                return Err(SlotError::Invalidated {
                    slot: cfg.slot.clone(),
                });
            }
            if let Some(pid) = row.get(3).cloned().flatten() {
                return Err(SlotError::InUse {
                    slot: cfg.slot.clone(),
                    pid,
                });
            }
            let lsn = row.get(1).cloned().flatten().ok_or_else(|| {
                unexpected("the slot has no confirmed_flush_lsn (not a logical slot?)")
            })?;
            let start: Lsn = lsn
                .parse()
                .map_err(|e: crate::lsn::ParseLsnError| unexpected(&e.to_string()))?;
            Ok(Prepared {
                start,
                created: false,
            })
        }
    }
}

/// `odoo-cdc slot create|drop|status`: returns a human-readable report.
pub async fn command(
    action: crate::cli::SlotAction,
    settings: &crate::config::Settings,
) -> Result<String, SlotError> {
    use crate::cli::SlotAction;
    let mut client = ReplicationClient::connect(&settings.source).await?;
    match action {
        SlotAction::Create => {
            let created = client
                .create_logical_slot(&settings.slot, false, SnapshotAction::NoExport)
                .await?;
            Ok(format!(
                "created slot {} (plugin {}) at consistent point {}",
                created.slot_name, created.output_plugin, created.consistent_point
            ))
        }
        SlotAction::Drop => {
            client.drop_slot(&settings.slot, false).await?;
            Ok(format!("dropped slot {}", settings.slot))
        }
        SlotAction::Status => {
            let rows = client
                .simple_query(&format!(
                    "SELECT slot_name, plugin, active, active_pid, restart_lsn, confirmed_flush_lsn, \
                     wal_status, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), \
                     pg_size_pretty(safe_wal_size) \
                     FROM pg_replication_slots WHERE slot_name = {}",
                    quote_literal(&settings.slot)
                ))
                .await?;
            let Some(r) = rows.first() else {
                return Err(SlotError::Missing {
                    slot: settings.slot.clone(),
                    db: settings.source.dbname.clone(),
                });
            };
            let f = |i: usize| r.get(i).cloned().flatten().unwrap_or_else(|| "-".into());
            Ok(format!(
                "slot {}\n  plugin: {}\n  active: {} (pid {})\n  restart_lsn: {}\n  confirmed_flush_lsn: {}\n  wal_status: {}\n  retained WAL: {}\n  safe_wal_size: {}",
                f(0),
                f(1),
                f(2),
                f(3),
                f(4),
                f(5),
                f(6),
                f(7),
                f(8)
            ))
        }
    }
}
