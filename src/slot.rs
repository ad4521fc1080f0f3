//! The replication slot and publication a session streams from.
//!
//! Before `START_REPLICATION` we look the slot up ourselves so that the failure
//! modes an operator must act on are named precisely (missing, invalidated,
//! wrong plugin) instead of surfacing as a generic server error, and so that the
//! checkpoint starts from the slot's own `confirmed_flush_lsn` (reporting a lower
//! LSN than the slot already has must never happen).

use crate::lsn::Lsn;
use crate::replication::{ReplicationClient, ReplicationError, SnapshotAction};
use crate::session::config::SessionConfig;

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
    /// Set when an initial snapshot must be taken before streaming.
    pub export: Option<Export>,
}

/// A slot created with an exported snapshot. The replication connection that
/// created it must stay idle until the snapshot is imported, and runs
/// [`finish_snapshot`] afterwards.
#[derive(Debug, Clone)]
pub struct Export {
    pub snapshot_name: String,
    pub consistent_point: Lsn,
    /// The temporary slot created under a pending name, to be copied into the
    /// real slot once the snapshot is confirmed (`None`: the real slot itself
    /// is temporary and was created directly).
    pub pending_slot: Option<String>,
}

/// A pending slot name for `slot`: `<slot>_snap_<8 hex>`, within the 63-byte limit.
pub fn pending_slot_name(slot: &str) -> String {
    let keep = slot.len().min(63 - 14);
    format!("{}_snap_{:08x}", &slot[..keep], rand::random::<u32>())
}

/// Creates a temporary slot with an exported snapshot: `name` itself when the
/// session's slot is temporary, else a pending name.
async fn create_exported(
    client: &mut ReplicationClient,
    cfg: &SessionConfig,
    direct: bool,
) -> Result<Prepared, SlotError> {
    let name = if direct {
        cfg.slot.clone()
    } else {
        pending_slot_name(&cfg.slot)
    };
    let created = client
        .create_logical_slot(&name, true, SnapshotAction::Export)
        .await?;
    let snapshot_name = created
        .snapshot_name
        .clone()
        .ok_or_else(|| SlotError::Unexpected {
            slot: name.clone(),
            what: "CREATE_REPLICATION_SLOT exported no snapshot".into(),
        })?;
    tracing::info!(slot = %name, consistent_point = %created.consistent_point, "created a temporary slot with an exported snapshot for the initial snapshot");
    Ok(Prepared {
        start: created.consistent_point,
        created: true,
        export: Some(Export {
            snapshot_name,
            consistent_point: created.consistent_point,
            pending_slot: (!direct).then_some(name),
        }),
    })
}

/// After a confirmed initial snapshot: makes the pending slot the session's
/// real, permanent slot (same consistent point) and drops the pending one. Until
/// this ran, a crash leaves no slot behind and the next start snapshots again.
pub async fn finish_snapshot(
    client: &mut ReplicationClient,
    cfg: &SessionConfig,
    export: &Export,
) -> Result<(), SlotError> {
    let Some(pending) = &export.pending_slot else {
        return Ok(());
    };
    client
        .simple_query(&format!(
            "SELECT pg_copy_logical_replication_slot({}, {}, false)",
            quote_literal(pending),
            quote_literal(&cfg.slot)
        ))
        .await?;
    client.drop_slot(pending, false).await?;
    tracing::info!(slot = %cfg.slot, consistent_point = %export.consistent_point, "initial snapshot complete: slot created at its consistent point");
    Ok(())
}

pub use crate::replication::{quote_ident, quote_literal};

/// Ensures the slot exists (creating it when asked) and returns the LSN to
/// start from. The publication must be ready before (`publication::prepare`):
/// a slot created before its publication cannot decode the WAL in between.
pub async fn prepare(
    client: &mut ReplicationClient,
    cfg: &SessionConfig,
) -> Result<Prepared, SlotError> {
    use crate::snapshot::SnapshotMode;
    let db = cfg.source.dbname.clone();
    if cfg.snapshot == SnapshotMode::InitialOnly {
        // A one-off copy: the streaming slot is not created or touched.
        return create_exported(client, cfg, false).await;
    }
    let mut rows = client
        .simple_query(&format!(
            "SELECT plugin, confirmed_flush_lsn, wal_status, active_pid FROM pg_replication_slots \
             WHERE slot_name = {} AND database = current_database()",
            quote_literal(&cfg.slot)
        ))
        .await?;
    if cfg.snapshot == SnapshotMode::WhenNeeded
        && rows
            .first()
            .is_some_and(|r| r.get(2).cloned().flatten().as_deref() == Some("lost"))
    {
        tracing::warn!(slot = %cfg.slot, "the slot was invalidated (WAL lost): dropping it to re-create it with a fresh snapshot");
        client.drop_slot(&cfg.slot, false).await?;
        rows.clear();
    }
    let unexpected = |what: &str| SlotError::Unexpected {
        slot: cfg.slot.clone(),
        what: what.to_string(),
    };
    match rows.first() {
        None => {
            if !cfg.create_slot && cfg.snapshot != SnapshotMode::WhenNeeded {
                return Err(SlotError::Missing {
                    slot: cfg.slot.clone(),
                    db,
                });
            }
            if cfg.snapshot != SnapshotMode::Never {
                return create_exported(client, cfg, cfg.temporary_slot).await;
            }
            let created = client
                .create_logical_slot(&cfg.slot, cfg.temporary_slot, SnapshotAction::NoExport)
                .await?;
            tracing::info!(slot = %cfg.slot, temporary = cfg.temporary_slot, consistent_point = %created.consistent_point, "created replication slot");
            Ok(Prepared {
                start: created.consistent_point,
                created: true,
                export: None,
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
                export: None,
            })
        }
    }
}

/// `odoo-cdc slot create|drop|status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    Create,
    Drop,
    Status,
}

/// `odoo-cdc slot create|drop|status`: returns a human-readable report.
pub async fn command(
    action: SlotAction,
    source: &crate::replication::PgConfig,
    slot: &str,
) -> Result<String, SlotError> {
    let mut client = ReplicationClient::connect(source).await?;
    match action {
        SlotAction::Create => {
            let created = client
                .create_logical_slot(slot, false, SnapshotAction::NoExport)
                .await?;
            Ok(format!(
                "created slot {} (plugin {}) at consistent point {}",
                created.slot_name, created.output_plugin, created.consistent_point
            ))
        }
        SlotAction::Drop => match client.drop_slot(slot, false).await {
            Ok(_) => Ok(format!("dropped slot {}", slot)),
            // undefined_object: the same message (and exit code) as `run` and `status`.
            Err(e) if e.sqlstate() == Some("42704") => Err(SlotError::Missing {
                slot: slot.to_string(),
                db: source.dbname.clone(),
            }),
            Err(e) => Err(e.into()),
        },
        SlotAction::Status => {
            let rows = client
                .simple_query(&format!(
                    "SELECT slot_name, plugin, active, active_pid, restart_lsn, confirmed_flush_lsn, \
                     wal_status, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), \
                     pg_size_pretty(safe_wal_size) \
                     FROM pg_replication_slots WHERE slot_name = {} AND database = current_database()",
                    quote_literal(slot)
                ))
                .await?;
            let Some(r) = rows.first() else {
                return Err(SlotError::Missing {
                    slot: slot.to_string(),
                    db: source.dbname.clone(),
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
