//! The WAL-retention guard: a slot must never silently fill Odoo's disk.
//!
//! Two periodic jobs on an ordinary SQL connection (not the replication one),
//! running beside the replication sessions for the life of the process:
//!
//! - **Measure** what the slot retains: `pg_current_wal_lsn() - restart_lsn`,
//!   and on PG13+ `wal_status` and `safe_wal_size` (how much more WAL may be
//!   written before `max_slot_wal_keep_size` invalidates the slot). The figures
//!   become metrics; above `--max-retained-wal-mb`, or when the slot is
//!   `unreserved`/`lost`, a warning says so.
//! - **Heartbeat**: `pg_logical_emit_message(false, 'odoo-cdc.heartbeat', ..)`
//!   writes a tiny non-transactional message into the WAL of the slot's
//!   database. When the captured tables are idle while the rest of the database
//!   writes, the walsender otherwise has nothing to send us, and the slot keeps
//!   pinning everything since the last captured change. The heartbeat comes
//!   back through the stream ([`crate::transaction::HEARTBEAT_PREFIX`]), is
//!   never published, and becomes a safe position once everything before it is
//!   confirmed, so the slot advances.
//!
//! Failures here are logged and retried on the next tick: the replication
//! session is what decides whether Postgres is reachable.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::replication::{PgConfig, sql};
use crate::transaction::HEARTBEAT_PREFIX;

/// Bounds every statement of the guard.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub source: PgConfig,
    pub slot: String,
    /// `None`: no measurements.
    pub check_interval: Option<Duration>,
    /// `None`: no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// Warn above this many bytes retained.
    pub max_retained: u64,
}

/// One measurement of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRetention {
    pub retained_bytes: u64,
    /// `reserved`, `extended`, `unreserved`, `lost`; `unknown` before PG13.
    pub wal_status: String,
    /// `None` when `max_slot_wal_keep_size` is unlimited or before PG13.
    pub safe_wal_size: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error(transparent)]
    Connect(#[from] crate::replication::ReplicationError),
    #[error("{0}")]
    Query(String),
    #[error("{what} timed out after {QUERY_TIMEOUT:?}")]
    Timeout { what: &'static str },
}

/// Runs until dropped. Does nothing if both jobs are off.
pub async fn run(cfg: RetentionConfig, metrics: Arc<Metrics>) {
    let period = match (cfg.check_interval, cfg.heartbeat_interval) {
        (None, None) => return std::future::pending().await,
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
    };
    let mut client: Option<(tokio_postgres::Client, i32)> = None;
    let mut next_check = tokio::time::Instant::now();
    let mut next_heartbeat =
        tokio::time::Instant::now() + cfg.heartbeat_interval.unwrap_or_default();
    let mut heartbeat_failures = 0u32;
    let mut ticker = tokio::time::interval(
        period
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(100)),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = tokio::time::Instant::now();
        let check_due = cfg.check_interval.is_some() && now >= next_check;
        let heartbeat_due = cfg.heartbeat_interval.is_some() && now >= next_heartbeat;
        if !check_due && !heartbeat_due {
            continue;
        }
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = match connect(&cfg.source).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "WAL-retention guard: cannot connect; trying again later");
                    continue;
                }
            };
        }
        let Some((c, version)) = client.as_ref() else {
            continue;
        };
        if check_due {
            if let Some(every) = cfg.check_interval {
                next_check = now + every;
            }
            match measure(c, *version, &cfg.slot).await {
                Ok(Some(r)) => report(&cfg, &metrics, &r),
                // Before the first session the slot may not be created yet.
                Ok(None) if metrics.sessions() == 0 => {}
                Ok(None) => {
                    tracing::warn!(slot = %cfg.slot, "WAL-retention guard: the slot does not exist")
                }
                Err(e) => {
                    tracing::warn!(error = %e, slot = %cfg.slot, "WAL-retention guard: measuring the slot failed");
                    client = None;
                    continue;
                }
            }
        }
        if heartbeat_due {
            if let Some(every) = cfg.heartbeat_interval {
                next_heartbeat = now + every;
            }
            match heartbeat(c).await {
                Ok(()) => {
                    heartbeat_failures = 0;
                    metrics.heartbeat_sent();
                }
                Err(e) => {
                    heartbeat_failures += 1;
                    // A missing privilege fails every time: say it once, loudly.
                    if heartbeat_failures == 1 {
                        tracing::warn!(error = %e, "heartbeat failed (pg_logical_emit_message): an idle slot may not advance");
                    }
                    client = None;
                }
            }
        }
    }
}

async fn connect(source: &PgConfig) -> Result<(tokio_postgres::Client, i32), GuardError> {
    let client = sql::connect(source).await?;
    let version: i32 = bounded("SHOW server_version_num", async {
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await?;
        Ok(row.get(0))
    })
    .await?;
    Ok((client, version))
}

async fn bounded<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, GuardError> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(GuardError::Query(
            crate::replication::ReplicationError::from(e).to_string(),
        )),
        Err(_) => Err(GuardError::Timeout { what }),
    }
}

/// The slot's retention now; `None` if the slot does not exist.
async fn measure(
    client: &tokio_postgres::Client,
    version: i32,
    slot: &str,
) -> Result<Option<SlotRetention>, GuardError> {
    // On a standby pg_current_wal_lsn() fails; the receive position stands in.
    let current = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END";
    let sql = if version >= 130000 {
        format!(
            "SELECT COALESCE(pg_wal_lsn_diff({current}, restart_lsn), 0)::int8, \
             COALESCE(wal_status, 'unknown'), safe_wal_size::int8 \
             FROM pg_replication_slots WHERE slot_name = $1"
        )
    } else {
        format!(
            "SELECT COALESCE(pg_wal_lsn_diff({current}, restart_lsn), 0)::int8, \
             'unknown'::text, NULL::int8 FROM pg_replication_slots WHERE slot_name = $1"
        )
    };
    let row = bounded("measuring the slot", client.query_opt(&sql, &[&slot])).await?;
    Ok(row.map(|r| SlotRetention {
        retained_bytes: r.get::<_, i64>(0).max(0) as u64,
        wal_status: r.get(1),
        safe_wal_size: r.get(2),
    }))
}

fn report(cfg: &RetentionConfig, metrics: &Metrics, r: &SlotRetention) {
    metrics.set_slot_retention(r.retained_bytes, r.safe_wal_size, &r.wal_status);
    let mb = r.retained_bytes / (1024 * 1024);
    if r.retained_bytes > cfg.max_retained {
        metrics.retention_warning();
        tracing::warn!(
            slot = %cfg.slot,
            retained_mb = mb,
            max_mb = cfg.max_retained / (1024 * 1024),
            wal_status = %r.wal_status,
            safe_wal_size = ?r.safe_wal_size,
            "the slot retains more WAL than --max-retained-wal-mb: the connector is behind or stopped; Postgres keeps this WAL on disk until the slot advances"
        );
    } else if r.wal_status == "unreserved" || r.wal_status == "lost" {
        tracing::error!(
            slot = %cfg.slot,
            retained_mb = mb,
            wal_status = %r.wal_status,
            "the slot is about to lose (or lost) WAL it needs: max_slot_wal_keep_size is exceeded"
        );
    } else {
        tracing::debug!(slot = %cfg.slot, retained_mb = mb, wal_status = %r.wal_status, "slot retention");
    }
}

async fn heartbeat(client: &tokio_postgres::Client) -> Result<(), GuardError> {
    // Non-transactional: decoded at once and not tied to any table, so it
    // reaches us through any publication.
    bounded(
        "heartbeat",
        client.execute(
            "SELECT pg_logical_emit_message(false, $1, now()::text)",
            &[&HEARTBEAT_PREFIX],
        ),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetentionConfig {
        RetentionConfig {
            source: "postgres://u@localhost/odoo".parse().unwrap(),
            slot: "s".into(),
            check_interval: Some(Duration::from_secs(1)),
            heartbeat_interval: None,
            max_retained: 1024 * 1024,
        }
    }

    #[test]
    fn measurements_become_metrics_and_warn_past_the_threshold() {
        let metrics = Metrics::new();
        let ok = SlotRetention {
            retained_bytes: 1000,
            wal_status: "reserved".into(),
            safe_wal_size: Some(5_000_000),
        };
        report(&cfg(), &metrics, &ok);
        let text = metrics.render();
        assert!(
            text.contains("odoo_cdc_slot_retained_wal_bytes 1000"),
            "{text}"
        );
        assert!(text.contains("odoo_cdc_slot_safe_wal_bytes 5000000"));
        assert!(text.contains("odoo_cdc_slot_wal_status{status=\"reserved\"} 1"));
        assert!(text.contains("odoo_cdc_slot_retention_warnings_total 0"));

        let behind = SlotRetention {
            retained_bytes: 3 * 1024 * 1024,
            wal_status: "extended".into(),
            safe_wal_size: None,
        };
        report(&cfg(), &metrics, &behind);
        let text = metrics.render();
        assert!(
            text.contains("odoo_cdc_slot_retention_warnings_total 1"),
            "{text}"
        );
        assert!(text.contains("odoo_cdc_slot_wal_status{status=\"extended\"} 1"));
        assert!(
            !text.contains("odoo_cdc_slot_safe_wal_bytes "),
            "unlimited: no gauge"
        );
    }
}
