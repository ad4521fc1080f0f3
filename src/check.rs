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
            let msgs = crate::catalog::within("a check query", client.simple_query(&sql))
                .await
                .map_err(|e| format!("query failed ({sql}): {e}"))?;
            Ok::<_, String>(
                msgs.into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                            (0..r.len())
                                .map(|i| r.get(i).map(str::to_string))
                                .collect::<Vec<_>>(),
                        ),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            )
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
    let version_text = one(q("SHOW server_version".into()).await?);
    if version >= 140000 {
        out.push(Finding::ok(format!(
            "PostgreSQL {version_text}: streaming of large transactions available"
        )));
    } else if version >= 100000 {
        out.push(Finding::warn(
            format!("PostgreSQL {version_text}: no streaming of in-progress transactions (PostgreSQL 14+)"),
            "upgrade to PostgreSQL 14 or later for bounded server-side decoding memory",
        ));
    } else {
        out.push(Finding::block(
            format!("PostgreSQL {version_text} has no pgoutput logical replication"),
            "upgrade to PostgreSQL 10 or later (14+ recommended)",
        ));
    }

    let wal_level = one(q("SHOW wal_level".into()).await?);
    if wal_level == "logical" {
        out.push(Finding::ok("wal_level = logical"));
    } else {
        out.push(Finding::block(
            format!("wal_level = {wal_level}: logical decoding needs wal_level = logical"),
            "ALTER SYSTEM SET wal_level = logical;  then restart PostgreSQL",
        ));
    }

    let slots: i64 = one(q("SHOW max_replication_slots".into()).await?)
        .parse()
        .unwrap_or(0);
    let used: i64 = one(q("SELECT count(*) FROM pg_replication_slots".into()).await?)
        .parse()
        .unwrap_or(0);
    let slot_exists = !q(format!(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = {} AND database = current_database()",
        quote_literal(&settings.slot)
    ))
    .await?
    .is_empty();
    if slot_exists || used < slots {
        out.push(Finding::ok(format!(
            "replication slots: {used} of {slots} used{}",
            if slot_exists {
                format!(", slot {} exists", settings.slot)
            } else {
                String::new()
            }
        )));
    } else {
        out.push(Finding::block(
            format!("replication slots: all {slots} in use, none left for slot {}", settings.slot),
            format!("ALTER SYSTEM SET max_replication_slots = {};  then restart PostgreSQL (or drop an unused slot)", slots + 2),
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
                "ALTER SYSTEM SET max_wal_senders = {};  then restart PostgreSQL",
                senders + 2
            ),
        ));
    }

    let role = q(
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
            .into(),
    )
    .await?;
    let user = role.first().and_then(|r| r[0].clone()).unwrap_or_default();
    let user_q = crate::catalog::ident(&user);
    if let Some(r) = role.first() {
        if r[1].as_deref() == Some("t") || r[2].as_deref() == Some("t") {
            out.push(Finding::ok(format!(
                "role {user} has the REPLICATION attribute"
            )));
        } else {
            out.push(Finding::block(
                format!("role {user} lacks the REPLICATION attribute: it cannot open a replication connection"),
                format!("ALTER ROLE {user_q} WITH REPLICATION;"),
            ));
        }
    }

    if let Err(e) = selection_findings(settings, &client, &user_q, &mut out).await {
        out.push(Finding::block(
            format!("cannot inspect the tables to capture: {e}"),
            format!(
                "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {user_q};  (or fix the error above)"
            ),
        ));
    }

    let has_wal_status = version >= 130000;
    let retained = q(format!(
        "SELECT slot_name, {}, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, active, \
         database = current_database(), coalesce(database, '-') FROM pg_replication_slots ORDER BY database = current_database() DESC, slot_name",
        if has_wal_status { "wal_status" } else { "NULL" }
    ))
    .await?;
    for r in retained {
        let slot = r[0].clone().unwrap_or_default();
        let name = format!("{slot} (database {})", r[5].clone().unwrap_or_default());
        let bytes: i64 = r[2].clone().unwrap_or_default().parse().unwrap_or(0);
        let ours = slot == settings.slot && r[4].as_deref() == Some("t");
        let drop = format!("SELECT pg_drop_replication_slot({});", quote_literal(&slot));
        if r[1].as_deref() == Some("lost") {
            let what = format!(
                "slot {name} is invalidated (wal_status = lost): the WAL it needed is gone"
            );
            if ours {
                out.push(Finding::block(
                    what,
                    format!("{drop}  then start again with a fresh snapshot"),
                ));
            } else {
                out.push(Finding::warn(what, drop));
            }
        } else if r[3].as_deref() != Some("t") && bytes > 1024 * 1024 * 1024 {
            out.push(Finding::warn(
                format!(
                    "inactive slot {name} retains {} MiB of WAL",
                    bytes / (1024 * 1024)
                ),
                format!("resume its consumer, or drop it: {drop}"),
            ));
        } else {
            out.push(Finding::ok(format!(
                "slot {name}, {}, retains {} KiB of WAL",
                if r[3].as_deref() == Some("t") {
                    "active"
                } else {
                    "inactive"
                },
                bytes / 1024
            )));
        }
    }
    if version >= 130000 {
        let keep = one(q("SHOW max_slot_wal_keep_size".into()).await?);
        if keep == "-1" {
            out.push(Finding::warn(
                "max_slot_wal_keep_size = -1: a stalled slot can fill the disk",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();  (size it to your disk)",
            ));
        } else {
            out.push(Finding::ok(format!("max_slot_wal_keep_size = {keep}")));
        }
    }
    if let Some(cfg) = crate::supervisor::stream_config(settings) {
        let cfg = cfg?;
        if cfg.partitions == 0 {
            out.push(stream_finding(cfg).await);
        } else {
            out.extend(super_stream_findings(cfg).await);
        }
    }
    Ok(out)
}

/// `--stream-url`: the stream port answers, and the stream is there (or run
/// may create it). See docs/streams.md.
async fn stream_finding(cfg: crate::sink::stream::StreamConfig) -> Finding {
    let at = format!("{} (stream {:?})", cfg.redacted_url(), cfg.stream);
    match crate::sink::stream::probe(&cfg)
        .await
        .map(|mut p| p.remove(0))
    {
        Err(e) => Finding::block(
            format!("RabbitMQ stream port at {at}: {e}"),
            "rabbitmq-plugins enable rabbitmq_stream (listens on 5552); check host, port, user and vhost in --stream-url",
        ),
        Ok(p) if p.stream_exists => Finding::ok(format!(
            "RabbitMQ stream {at} reachable; producer {:?} last stored publishing id {}",
            cfg.producer, p.last_publishing_id
        )),
        Ok(_) if cfg.declare => Finding::ok(format!(
            "RabbitMQ stream port reachable; stream {:?} does not exist yet: run creates it",
            cfg.stream
        )),
        Ok(_) => Finding::block(
            format!("stream {at} does not exist and --no-declare is set"),
            format!(
                "create it, e.g. rabbitmqadmin declare queue name={} queue_type=stream durable=true",
                cfg.stream
            ),
        ),
    }
}

/// `--stream-partitions`: which partition streams exist, with each
/// producer's last stored id, and the super stream's exchange (over AMQP).
async fn super_stream_findings(cfg: crate::sink::stream::StreamConfig) -> Vec<Finding> {
    use crate::sink::stream::partition;
    let name = &cfg.stream;
    let n = cfg.partitions;
    let at = format!(
        "{} (super stream {name:?}, {n} partitions)",
        cfg.redacted_url()
    );
    let create = format!(
        "rabbitmq-streams add_super_stream {name} --partitions {n} (RabbitMQ 3.11+), or run without --no-declare once"
    );
    let probes = match crate::sink::stream::probe(&cfg).await {
        Err(e) => {
            return vec![Finding::block(
                format!("RabbitMQ stream port at {at}: {e}"),
                "rabbitmq-plugins enable rabbitmq_stream (listens on 5552); check host, port, user and vhost in --stream-url",
            )];
        }
        Ok(p) => p,
    };
    let mut out = Vec::new();
    let missing: Vec<&str> = probes
        .iter()
        .filter(|p| !p.stream_exists)
        .map(|p| p.stream.as_str())
        .collect();
    let ids: Vec<String> = probes
        .iter()
        .filter(|p| p.stream_exists)
        .map(|p| format!("{} {}", p.stream, p.last_publishing_id))
        .collect();
    if missing.is_empty() {
        out.push(Finding::ok(format!(
            "RabbitMQ super stream at {at}: every partition exists; last stored publishing id of each partition's producer: {}",
            ids.join(", ")
        )));
    } else if cfg.declare {
        out.push(Finding::ok(format!(
            "RabbitMQ stream port reachable at {at}; {} of {n} partitions do not exist yet ({}): run creates them",
            missing.len(),
            missing.join(", ")
        )));
    } else {
        out.push(Finding::block(
            format!(
                "partitions {} of super stream {name:?} do not exist and --no-declare is set",
                missing.join(", ")
            ),
            create.clone(),
        ));
    }
    let uri = cfg.amqp_uri();
    let amqp = partition::describe(&uri);
    out.push(
        match partition::exchange_exists(&uri, name, cfg.connect_timeout).await {
            Ok(true) => Finding::ok(format!(
                "super stream exchange {name:?} exists (checked over AMQP at {amqp})"
            )),
            Ok(false) if cfg.declare => Finding::ok(format!(
                "super stream exchange {name:?} does not exist yet: run declares it over AMQP at {amqp}"
            )),
            Ok(false) => Finding::warn(
                format!(
                    "super stream exchange {name:?} does not exist (--no-declare): readers of the partition streams are not affected, super stream clients (RabbitMQ 3.11+) find no partitions"
                ),
                create,
            ),
            Err(e) if cfg.declare => Finding::block(
                format!("run declares the super stream exchange over AMQP at {amqp} and cannot: {e}"),
                "give --amqp with the broker's AMQP URL, or create the topology yourself and run with --no-declare",
            ),
            Err(e) => Finding::warn(
                format!("cannot check the super stream exchange {name:?} over AMQP at {amqp}: {e}"),
                "give --amqp with the broker's AMQP URL",
            ),
        },
    );
    out
}

/// Tables the run would capture, and what stands in the way: the profile,
/// the filters, replica identities, rights, the publication's contents.
async fn selection_findings(
    settings: &Settings,
    client: &tokio_postgres::Client,
    user_q: &str,
    out: &mut Vec<Finding>,
) -> Result<(), String> {
    use crate::filter::{Decision, PublicationMode};
    use crate::publication::Plan;
    let mut sel = settings.selection.clone();
    let odoo = match crate::catalog::odoo_profile(client, sel.profile).await {
        Ok(o) => o,
        Err(crate::catalog::ProfileError::Db(e)) if e.sqlstate() == Some("42501") => {
            out.push(Finding::block(
                format!("the role cannot read ir_model / ir_model_fields, which the Odoo profile needs: {e}"),
                format!("GRANT SELECT ON ir_model, ir_model_fields TO {user_q};  (or --profile none)"),
            ));
            sel.profile = crate::filter::Profile::None;
            None
        }
        Err(e @ crate::catalog::ProfileError::NotOdoo) => {
            out.push(Finding::block(
                e.to_string(),
                "--profile none, or point --source at the Odoo database",
            ));
            sel.profile = crate::filter::Profile::None;
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    let sel = &sel;
    let plan = Plan::load(client, sel).await.map_err(|e| e.to_string())?;
    let excluded: Vec<String> = plan
        .decisions
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Excluded(_)))
        .map(|(t, _)| t.qualified())
        .collect();
    let captured = plan.captured();
    let insert_only = plan.insert_only();
    out.push(Finding::ok(format!(
        "profile: {}; {} tables selected, {} left out by filters and profile{}",
        match &odoo {
            Some(o) => format!("odoo (ir_model in schema {})", o.schema),
            None => "none".into(),
        },
        captured.len() + insert_only.len(),
        excluded.len(),
        list_some(&excluded)
    )));
    // Existing mode: a table without identity that is already in a publication
    // publishing updates is reported below, as breaking Odoo now.
    let mut in_update_publication = std::collections::BTreeSet::new();
    if sel.publication_mode == PublicationMode::Existing {
        for name in settings.publication.split(',').map(str::trim) {
            if let Some(f) = crate::catalog::within(
                "reading the publication",
                crate::catalog::publication(client, name),
            )
            .await
            .map_err(|e| e.to_string())?
                && f.publishes_update_or_delete
            {
                in_update_publication.extend(f.tables.iter().map(|(oid, _, _)| *oid));
            }
        }
    }
    for (t, identity) in plan.without_identity() {
        if in_update_publication.contains(&t.oid) {
            continue;
        }
        out.push(Finding::block(
            format!(
                "selected table {} {}: it cannot go into a publication that publishes updates and deletes (PostgreSQL would reject Odoo's UPDATEs and DELETEs on it), so it would not be captured",
                t.qualified(),
                match identity {
                    crate::filter::Identity::Nothing => "has REPLICA IDENTITY NOTHING",
                    _ => "has no primary key",
                }
            ),
            format!(
                "ALTER TABLE {0} REPLICA IDENTITY FULL;  (or add a primary key, or ALTER TABLE {0} REPLICA IDENTITY USING INDEX <unique index>; or --exclude {0}; or --insert-only-tables-without-key)",
                t.qualified()
            ),
        ));
    }
    for t in &insert_only {
        out.push(Finding::warn(
            format!(
                "table {} has no usable replica identity: only its inserts are captured",
                t.qualified()
            ),
            format!(
                "ALTER TABLE {} REPLICA IDENTITY FULL;  to capture its updates and deletes",
                t.qualified()
            ),
        ));
    }
    let unreadable: Vec<String> = captured
        .iter()
        .chain(insert_only.iter())
        .filter(|t| !t.can_select)
        .map(|t| t.qualified())
        .collect();
    if unreadable.is_empty() {
        out.push(Finding::ok("SELECT granted on every selected table"));
    } else {
        out.push(Finding::block(
            format!(
                "no SELECT right on {} selected tables (the snapshot reads them){}",
                unreadable.len(),
                list_some(&unreadable)
            ),
            format!("GRANT SELECT ON {} TO {user_q};", unreadable.join(", ")),
        ));
    }

    let pubs: Vec<&str> = settings.publication.split(',').map(str::trim).collect();
    let mut names: Vec<(&str, Vec<&crate::catalog::TableFacts>, &str)> = pubs
        .iter()
        .map(|p| (*p, captured.clone(), "insert, update, delete, truncate"))
        .collect();
    if let Some(io) = &sel.insert_only_publication {
        names.push((io.as_str(), insert_only.clone(), "insert"));
    }
    for (name, wanted, publish) in names {
        let pubq = crate::catalog::ident(name);
        let facts = crate::catalog::within(
            "reading the publication",
            crate::catalog::publication(client, name),
        )
        .await
        .map_err(|e| e.to_string())?;
        let wanted_list = wanted
            .iter()
            .map(|t| t.qualified())
            .collect::<Vec<_>>()
            .join(", ");
        match (sel.publication_mode, facts) {
            (mode, None) if mode == PublicationMode::Create || settings.create_publication => {
                let can_create: bool = client
                    .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
                    .await
                    .map(|r| r.get(0))
                    .map_err(|e| e.to_string())?;
                if can_create {
                    out.push(Finding::ok(format!(
                        "publication {name} does not exist yet: run creates it with {} tables",
                        wanted.len()
                    )));
                } else {
                    out.push(Finding::block(
                        format!("publication {name} does not exist and role {user_q} may not create it"),
                        format!("GRANT CREATE ON DATABASE {} TO {user_q};  or have the owner run: CREATE PUBLICATION {pubq} FOR TABLE {wanted_list} WITH (publish = '{publish}');  and use --publication-mode existing",
                            crate::catalog::ident(&settings.source.dbname)),
                    ));
                }
                not_owned(&wanted, name, &pubq, &wanted_list, publish, out);
            }
            (PublicationMode::Create, Some(f)) if f.all_tables => out.push(Finding::block(
                format!("publication {name} is FOR ALL TABLES: --publication-mode create keeps a publication to the selected tables"),
                "use --publication-mode existing, or another publication name with --publication-mode create",
            )),
            (PublicationMode::Create, Some(f)) => {
                let have: std::collections::BTreeSet<u32> = f.tables.iter().map(|(o, _, _)| *o).collect();
                let want: std::collections::BTreeSet<u32> = wanted.iter().map(|t| t.oid).collect();
                out.push(Finding::ok(if have == want {
                    format!("publication {name} holds exactly the {} selected tables", want.len())
                } else {
                    format!(
                        "publication {name}: run will add {} and remove {} tables to match the selection",
                        want.difference(&have).count(),
                        have.difference(&want).count()
                    )
                }));
                not_owned(&wanted, name, &pubq, &wanted_list, publish, out);
            }
            (_, None) => out.push(Finding::block(
                format!("publication {name} does not exist (--publication-mode existing)"),
                format!("CREATE PUBLICATION {pubq} FOR TABLE {wanted_list} WITH (publish = '{publish}');  or run with --create-publication"),
            )),
            (PublicationMode::Existing, Some(f)) => {
                let have: std::collections::BTreeSet<u32> = f.tables.iter().map(|(o, _, _)| *o).collect();
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|t| !have.contains(&t.oid))
                    .map(|t| t.qualified())
                    .collect();
                if missing.is_empty() {
                    out.push(Finding::ok(format!(
                        "publication {name} has every selected table ({} tables published)",
                        have.len()
                    )));
                } else {
                    out.push(Finding::warn(
                        format!(
                            "publication {name} lacks {} selected tables, which will not be captured{}",
                            missing.len(),
                            list_some(&missing)
                        ),
                        format!("ALTER PUBLICATION {pubq} ADD TABLE {};", missing.join(", ")),
                    ));
                }
                let extra: Vec<String> = plan
                    .decisions
                    .iter()
                    .filter(|(t, d)| have.contains(&t.oid) && matches!(d, Decision::Excluded(_)))
                    .map(|(t, _)| t.qualified())
                    .collect();
                if !extra.is_empty() {
                    out.push(Finding::warn(
                        format!(
                            "publication {name} also publishes {} tables the filters leave out (decoded, then dropped){}",
                            extra.len(),
                            list_some(&extra)
                        ),
                        format!("ALTER PUBLICATION {pubq} DROP TABLE {};", extra.join(", ")),
                    ));
                }
                if f.publishes_update_or_delete {
                    for (t, _) in &plan.decisions {
                        if have.contains(&t.oid)
                            && t.identity() != crate::filter::Identity::Usable
                        {
                            out.push(Finding::block(
                                format!("publication {name} publishes updates and deletes of {}, which has no usable replica identity: PostgreSQL rejects UPDATE and DELETE on it now", t.qualified()),
                                format!("ALTER TABLE {0} REPLICA IDENTITY FULL;  or ALTER PUBLICATION {pubq} DROP TABLE {0};", t.qualified()),
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// In create mode the role must own every table it puts in the publication.
fn not_owned(
    wanted: &[&crate::catalog::TableFacts],
    name: &str,
    pubq: &str,
    wanted_list: &str,
    publish: &str,
    out: &mut Vec<Finding>,
) {
    let not_owned: Vec<String> = wanted
        .iter()
        .filter(|t| !t.owned)
        .map(|t| t.qualified())
        .collect();
    if !not_owned.is_empty() {
        out.push(Finding::block(
            format!(
                "--publication-mode create: the role does not own {} selected tables, so it cannot put them into publication {name}{}",
                not_owned.len(),
                list_some(&not_owned)
            ),
            format!("run odoo-cdc as the tables' owner, or have the owner run: CREATE PUBLICATION {pubq} FOR TABLE {wanted_list} WITH (publish = '{publish}');  and use --publication-mode existing"),
        ));
    }
}

/// `: a, b, c and 12 more` for a message.
fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 8;
    if names.is_empty() {
        return String::new();
    }
    let mut s = format!(
        ": {}",
        names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
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
