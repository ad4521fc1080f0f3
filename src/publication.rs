//! Making the publication match the selection (`--publication-mode`).
//!
//! - `create`: the publication is odoo-cdc's: created, or ALTERed, to hold exactly
//!   the selected tables that have a usable replica identity. Never `FOR ALL
//!   TABLES`: that would put tables without a primary key into a publication that
//!   publishes updates and deletes, and PostgreSQL would then reject every UPDATE
//!   and DELETE on them — breaking Odoo. Runs at every session start, so tables
//!   created since (a module install) join on the next start.
//! - `existing`: the operator's publication is used as it is; where it differs
//!   from the selection we warn (the describer still drops what the filters leave
//!   out). With `--create-publication` a missing one is created with the
//!   selected tables.
//!
//! Either way a publication is created only in the first session: one that
//! disappears while we run is reported, not silently re-created.
//!
//! Tables without a usable identity are skipped with a warning naming the fix,
//! or — with `--insert-only-tables-without-key` — put into a second publication
//! with `publish = 'insert'`, which the slot streams alongside the first.
//!
//! A publication is never dropped and re-created here: the slot decodes old WAL
//! with the catalog of that time, and a publication missing then fails decoding.

use std::collections::BTreeSet;

use crate::catalog::ident as quote_ident;
use crate::catalog::{self, PublicationFacts, TableFacts, within};
use crate::filter::{Decision, PublicationMode, SelectionConfig, no_identity_message};
use crate::replication::ReplicationError;
use crate::session::config::SessionConfig;
use crate::slot::SlotError;

const PUBLISH_ALL: &str = "insert, update, delete, truncate";

/// The selection decided for every table of the database.
pub struct Plan {
    pub decisions: Vec<(TableFacts, Decision)>,
}

impl Plan {
    /// Decides every table (filters, profile, identity).
    pub async fn load(
        client: &tokio_postgres::Client,
        selection: &SelectionConfig,
    ) -> Result<Plan, SlotError> {
        let odoo = catalog::odoo_profile(client, selection.profile)
            .await
            .map_err(|e| match e {
                catalog::ProfileError::Db(e) => SlotError::Replication(e),
                other => SlotError::Publication(other.to_string()),
            })?;
        let tables = within("listing tables", catalog::tables(client, None)).await?;
        let decisions = tables
            .into_iter()
            .map(|t| {
                let o = odoo
                    .as_ref()
                    .and_then(|o| o.table(&t.schema, &t.name, &t.column_refs()));
                let d = selection.decide(&t.schema, &t.name, t.identity(), o.as_ref());
                (t, d)
            })
            .collect();
        Ok(Plan { decisions })
    }

    fn with(&self, wanted: &Decision) -> Vec<&TableFacts> {
        self.decisions
            .iter()
            .filter(|(_, d)| d == wanted)
            .map(|(t, _)| t)
            .collect()
    }

    pub fn captured(&self) -> Vec<&TableFacts> {
        self.with(&Decision::Capture)
    }

    pub fn insert_only(&self) -> Vec<&TableFacts> {
        self.with(&Decision::InsertOnly)
    }

    pub fn without_identity(&self) -> impl Iterator<Item = (&TableFacts, crate::filter::Identity)> {
        self.decisions.iter().filter_map(|(t, d)| match d {
            Decision::NoIdentity(i) => Some((t, *i)),
            _ => None,
        })
    }
}

/// The main publication names of a session (the insert-only one left out).
pub fn main_publications(cfg: &SessionConfig) -> Vec<&str> {
    cfg.publication
        .split(',')
        .map(str::trim)
        .filter(|p| Some(*p) != cfg.selection.insert_only_publication.as_deref())
        .collect()
}

/// Ensures the publication(s) of a session exist and match the selection as
/// `--publication-mode` says.
pub async fn prepare(cfg: &SessionConfig) -> Result<(), SlotError> {
    let client = crate::replication::sql::connect(&cfg.source).await?;
    let sel = &cfg.selection;
    let plan = Plan::load(&client, sel).await?;
    let names = main_publications(cfg);
    match sel.publication_mode {
        PublicationMode::Create => {
            for (t, identity) in plan.without_identity() {
                tracing::warn!(
                    table = %t.qualified(),
                    "{}",
                    no_identity_message(&t.qualified(), identity)
                );
            }
            let [name] = names.as_slice() else {
                return Err(SlotError::Publication(format!(
                    "--publication-mode create manages exactly one publication, got {:?}",
                    cfg.publication
                )));
            };
            let captured = plan.captured();
            if captured.is_empty() {
                tracing::warn!(
                    publication = name,
                    "no table is selected: check --include/--exclude and the profile"
                );
            }
            let db = &cfg.source.dbname;
            sync(
                &client,
                db,
                cfg.create_publication,
                name,
                &captured,
                PUBLISH_ALL,
            )
            .await?;
            if let Some(io) = &sel.insert_only_publication {
                sync(
                    &client,
                    db,
                    cfg.create_publication,
                    io,
                    &plan.insert_only(),
                    "insert",
                )
                .await?;
            }
        }
        PublicationMode::Existing => {
            let mut published: BTreeSet<u32> = BTreeSet::new();
            let mut wanted: Vec<(&str, Vec<&TableFacts>, &str)> = names
                .iter()
                .map(|n| (*n, plan.captured(), PUBLISH_ALL))
                .collect();
            if let Some(io) = &sel.insert_only_publication {
                wanted.push((io.as_str(), plan.insert_only(), "insert"));
            }
            for (name, tables, publish) in wanted {
                match within(
                    "reading the publication",
                    catalog::publication(&client, name),
                )
                .await?
                {
                    Some(facts) => {
                        warn_unusable_members(name, &facts, &plan);
                        published.extend(facts.tables.iter().map(|(oid, _, _)| *oid));
                    }
                    // --create-publication: create what is missing, with the
                    // selected tables; an existing one is used as it is.
                    None if cfg.create_publication => {
                        create(&client, name, &tables, publish).await?;
                        published.extend(tables.iter().map(|t| t.oid));
                    }
                    None => {
                        return Err(SlotError::PublicationMissing {
                            publication: name.to_string(),
                            db: cfg.source.dbname.clone(),
                        });
                    }
                }
            }
            for (t, d) in &plan.decisions {
                let in_pub = published.contains(&t.oid);
                match d {
                    Decision::Capture | Decision::InsertOnly if !in_pub => tracing::warn!(
                        table = %t.qualified(),
                        "selected but not in the publication, so not captured: ALTER PUBLICATION {} ADD TABLE {};",
                        quote_ident(match (d, &sel.insert_only_publication) {
                            (Decision::InsertOnly, Some(io)) => io.as_str(),
                            _ => names.first().copied().unwrap_or_default(),
                        }),
                        t.qualified()
                    ),
                    // In a publication it is reported by warn_unusable_members.
                    Decision::NoIdentity(identity) if !in_pub => tracing::warn!(
                        table = %t.qualified(),
                        "{}",
                        no_identity_message(&t.qualified(), *identity)
                    ),
                    Decision::Excluded(why) if in_pub => tracing::info!(
                        table = %t.qualified(),
                        reason = %why,
                        "in the publication but not selected: its changes are received and dropped"
                    ),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// A table in the operator's publication that PostgreSQL cannot identify rows
/// of: Odoo's UPDATEs and DELETEs on it fail right now.
fn warn_unusable_members(name: &str, facts: &PublicationFacts, plan: &Plan) {
    if !facts.publishes_update_or_delete {
        return;
    }
    for (oid, _, _) in &facts.tables {
        if let Some((t, _)) = plan.decisions.iter().find(|(t, _)| t.oid == *oid) {
            let identity = t.identity();
            if identity != crate::filter::Identity::Usable {
                tracing::error!(
                    table = %t.qualified(),
                    publication = name,
                    "publication {name} publishes updates and deletes of {table}, which has no usable replica identity: PostgreSQL rejects UPDATE and DELETE on it now. Fix: ALTER TABLE {table} REPLICA IDENTITY FULL; or ALTER PUBLICATION {pubq} DROP TABLE {table};",
                    table = t.qualified(),
                    pubq = quote_ident(name),
                );
            }
        }
    }
}

/// Creates `name` (when `may_create`), or ALTERs it, so it holds exactly `tables`.
/// After the first session a missing publication is an error, not re-created:
/// it was dropped while we ran, and what it published in between is lost.
async fn sync(
    client: &tokio_postgres::Client,
    db: &str,
    may_create: bool,
    name: &str,
    tables: &[&TableFacts],
    publish: &str,
) -> Result<(), SlotError> {
    let list = tables
        .iter()
        .map(|t| t.qualified())
        .collect::<Vec<_>>()
        .join(", ");
    let pubq = quote_ident(name);
    let Some(facts) = within(
        "reading the publication",
        catalog::publication(client, name),
    )
    .await?
    else {
        if !may_create {
            return Err(SlotError::PublicationMissing {
                publication: name.to_string(),
                db: db.to_string(),
            });
        }
        return create(client, name, tables, publish).await;
    };
    if facts.all_tables {
        return Err(SlotError::Publication(format!(
            "publication {name} is FOR ALL TABLES, but --publication-mode create keeps it to the selected tables \
             (FOR ALL TABLES also publishes tables without a primary key, whose UPDATEs PostgreSQL then rejects). \
             Use --publication-mode existing, or use a new publication name with --publication-mode create"
        )));
    }
    let have: BTreeSet<u32> = facts.tables.iter().map(|(oid, _, _)| *oid).collect();
    let want: BTreeSet<u32> = tables.iter().map(|t| t.oid).collect();
    if have == want {
        return Ok(());
    }
    let sql = if tables.is_empty() {
        let current = facts
            .tables
            .iter()
            .map(|(_, s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ALTER PUBLICATION {pubq} DROP TABLE {current}")
    } else {
        format!("ALTER PUBLICATION {pubq} SET TABLE {list}")
    };
    execute(client, name, sql).await?;
    tracing::info!(
        publication = name,
        added = want.difference(&have).count(),
        removed = have.difference(&want).count(),
        "publication altered to the selected tables"
    );
    Ok(())
}

/// `CREATE PUBLICATION` with exactly `tables` (none is valid: nothing published yet).
async fn create(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[&TableFacts],
    publish: &str,
) -> Result<(), SlotError> {
    let pubq = quote_ident(name);
    let list = tables
        .iter()
        .map(|t| t.qualified())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = if tables.is_empty() {
        format!("CREATE PUBLICATION {pubq} WITH (publish = '{publish}')")
    } else {
        format!("CREATE PUBLICATION {pubq} FOR TABLE {list} WITH (publish = '{publish}')")
    };
    execute(client, name, sql).await?;
    tracing::info!(
        publication = name,
        tables = tables.len(),
        publish,
        "created publication"
    );
    Ok(())
}

async fn execute(
    client: &tokio_postgres::Client,
    name: &str,
    sql: String,
) -> Result<(), SlotError> {
    within(
        "changing the publication",
        client.batch_execute(sql.as_str()),
    )
    .await
    .map_err(|e| publication_error(name, &sql, e))
}

fn publication_error(name: &str, sql: &str, e: ReplicationError) -> SlotError {
    if e.is_retryable() {
        return SlotError::Replication(e);
    }
    let hint = if e.sqlstate() == Some("42501") {
        " (the role must own the tables and the publication, and have CREATE on the database; \
         or let the owner manage the publication and use --publication-mode existing)"
    } else {
        ""
    };
    let short: String = sql.chars().take(300).collect();
    SlotError::Publication(format!(
        "cannot make publication {name} match the selection: {e}{hint}. Statement: {short}"
    ))
}
