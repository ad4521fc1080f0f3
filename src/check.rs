//! `odoo-cdc check`: a preflight report before going live.
//!
//! Each finding says what is wrong and the exact SQL or setting that fixes it.
//! Exit 0 when ready, 1 when something blocks streaming.

use std::process::ExitCode;

use crate::config::Settings;
use crate::slot::quote_literal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Severity {
    Ok,
    Warning,
    Blocking,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub what: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Ok,
            what: what.into(),
            fix: None,
        }
    }
    fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Warning,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    fn block(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            severity: Severity::Blocking,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check; an error here means the database could not be inspected.
pub async fn findings(settings: &Settings) -> Result<Vec<Finding>, String> {
    let client = crate::replication::sql::connect(&settings.source)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", settings.source.redacted()))?;
    let q = |sql: String| {
        let client = &client;
        async move {
            // Every network await is bounded: a stalled server must not hang `check`.
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                client.simple_query(&sql),
            )
            .await
            .map_err(|_| format!("query timed out after 30 s ({sql})"))?
            .map_err(|e| format!("query failed ({sql}): {e}"))
            .map(|msgs| {
                msgs.into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                            (0..r.len())
                                .map(|i| r.get(i).map(str::to_string))
                                .collect::<Vec<_>>(),
                        ),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
        }
    };
    let one = |rows: Vec<Vec<Option<String>>>| {
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .unwrap_or_default()
    };
    let mut out = Vec::new();

    let version: i64 = one(q("SHOW server_version_num".into()).await?)
        .parse()
        .unwrap_or(0);
    if version >= 140000 {
        out.push(Finding::ok(format!(
            "server version {version}: streaming of large transactions available"
        )));
    } else if version >= 100000 {
        out.push(Finding::warn(
            format!("server version {version}: no streaming of in-progress transactions (PostgreSQL 14+)"),
            "upgrade to PostgreSQL 14 or later for bounded server-side decoding memory",
        ));
    } else {
        out.push(Finding::block(
            format!("server version {version} has no pgoutput logical replication"),
            "upgrade to PostgreSQL 10 or later (14+ recommended)",
        ));
    }

    let wal_level = one(q("SHOW wal_level".into()).await?);
    if wal_level == "logical" {
        out.push(Finding::ok("wal_level = logical"));
    } else {
        out.push(Finding::block(
            format!("wal_level = {wal_level}: logical decoding needs wal_level = logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        ));
    }

    let slots: i64 = one(q("SHOW max_replication_slots".into()).await?)
        .parse()
        .unwrap_or(0);
    let used: i64 = one(q("SELECT count(*) FROM pg_replication_slots".into()).await?)
        .parse()
        .unwrap_or(0);
    let slot_exists = !q(format!(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&settings.slot)
    ))
    .await?
    .is_empty();
    if slot_exists || used < slots {
        out.push(Finding::ok(format!(
            "replication slots: {used} of {slots} used"
        )));
    } else {
        out.push(Finding::block(
            format!("replication slots: all {slots} in use"),
            format!("ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL (or drop an unused slot)", slots + 2),
        ));
    }
    let senders: i64 = one(q("SHOW max_wal_senders".into()).await?)
        .parse()
        .unwrap_or(0);
    let active: i64 = one(q("SELECT count(*) FROM pg_stat_replication".into()).await?)
        .parse()
        .unwrap_or(0);
    if active < senders {
        out.push(Finding::ok(format!(
            "wal senders: {active} of {senders} in use"
        )));
    } else {
        out.push(Finding::block(
            format!("wal senders: all {senders} in use"),
            format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
                senders + 2
            ),
        ));
    }

    let role = q(
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
            .into(),
    )
    .await?;
    if let Some(r) = role.first() {
        let user = r[0].clone().unwrap_or_default();
        if r[1].as_deref() == Some("t") || r[2].as_deref() == Some("t") {
            out.push(Finding::ok(format!(
                "role {user} has the REPLICATION attribute"
            )));
        } else {
            out.push(Finding::block(
                format!("role {user} lacks the REPLICATION attribute"),
                format!(
                    "ALTER ROLE {} WITH REPLICATION;",
                    crate::slot::quote_ident(&user)
                ),
            ));
        }
    }

    for publication in settings.publication.split(',').map(str::trim) {
        let exists = !q(format!(
            "SELECT 1 FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?
        .is_empty();
        if exists {
            out.push(Finding::ok(format!("publication {publication} exists")));
            let bad = q(format!(
                "SELECT n.nspname || '.' || c.relname FROM pg_publication_tables pt \
                 JOIN pg_class c ON c.relname = pt.tablename JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = pt.schemaname \
                 JOIN pg_publication p ON p.pubname = pt.pubname \
                 WHERE pt.pubname = {} AND (p.pubupdate OR p.pubdelete) AND ( c.relreplident = 'n' OR \
                 (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))",
                quote_literal(publication)
            )).await?;
            for row in bad {
                let table = row[0].clone().unwrap_or_default();
                out.push(Finding::block(
                    format!("table {table} is in publication {publication} without a usable replica identity: PostgreSQL rejects its UPDATEs and DELETEs"),
                    format!("ALTER TABLE {table} REPLICA IDENTITY FULL;  -- or add a primary key, or remove it from the publication"),
                ));
            }
        } else {
            out.push(Finding::warn(
                format!("publication {publication} does not exist"),
                format!(
                    "CREATE PUBLICATION {} FOR TABLE ...;  (or run with --create-publication)",
                    crate::slot::quote_ident(publication)
                ),
            ));
        }
    }

    let retained = q("SELECT slot_name, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, active FROM pg_replication_slots".into()).await?;
    for r in retained {
        let name = r[0].clone().unwrap_or_default();
        let bytes: i64 = r[2].clone().unwrap_or_default().parse().unwrap_or(0);
        if r[1].as_deref() == Some("lost") {
            out.push(Finding::block(
                format!("slot {name} is invalidated (wal_status = lost)"),
                format!(
                    "SELECT pg_drop_replication_slot({});  and re-create it with a snapshot",
                    quote_literal(&name)
                ),
            ));
        } else if r[3].as_deref() != Some("t") && bytes > 1024 * 1024 * 1024 {
            out.push(Finding::warn(
                format!(
                    "inactive slot {name} retains {} MiB of WAL",
                    bytes / (1024 * 1024)
                ),
                format!(
                    "resume its consumer, or drop it: SELECT pg_drop_replication_slot({});",
                    quote_literal(&name)
                ),
            ));
        } else {
            out.push(Finding::ok(format!(
                "slot {name} retains {} KiB of WAL",
                bytes / 1024
            )));
        }
    }
    let keep = one(q("SHOW max_slot_wal_keep_size".into()).await?);
    if keep == "-1" {
        out.push(Finding::warn(
            "max_slot_wal_keep_size = -1: a stalled slot can fill the disk",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();  (size it to your disk)",
        ));
    } else {
        out.push(Finding::ok(format!("max_slot_wal_keep_size = {keep}")));
    }
    Ok(out)
}

pub async fn run(settings: &Settings) -> ExitCode {
    match findings(settings).await {
        Err(e) => {
            println!("BLOCKING  {e}");
            ExitCode::from(1)
        }
        Ok(list) => {
            let mut blocking = false;
            for f in &list {
                let tag = match f.severity {
                    Severity::Ok => "ok       ",
                    Severity::Warning => "WARNING  ",
                    Severity::Blocking => {
                        blocking = true;
                        "BLOCKING "
                    }
                };
                println!("{tag}{}", f.what);
                if let Some(fix) = &f.fix {
                    println!("          fix: {fix}");
                }
            }
            if blocking {
                println!("\nnot ready: fix the BLOCKING items above");
                ExitCode::from(1)
            } else {
                println!("\nready");
                ExitCode::SUCCESS
            }
        }
    }
}
