//! The table describer of `run` and `tail`: decides, once per `Relation`
//! message, how a table is captured — included or not (filters, profile),
//! which columns make up `key`, which columns are left out, and what the Odoo
//! profile adds (model name, many2many mark, translated fields).
//!
//! The catalog is loaded once per session and cached per relation OID. A
//! `Relation` message that no longer matches the cache (a table created or
//! altered since) refreshes that one table from the catalog, over a
//! connection of its own opened on first need. Describing is async: the WAL
//! reader awaits it like any other I/O, so the runtime thread (and with it
//! the standby status updates) never waits on the catalog. A refresh happens
//! once per new or altered table, not per row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::{self, TableFacts, within};
use crate::event::TableInfo;
use crate::filter::{Decision, Identity, SelectionConfig};
use crate::odoo::OdooCatalog;
use crate::replication::PgConfig;
use crate::schema::{Relation, ReplicaIdentity};
use crate::session::config::SessionConfig;
use crate::slot::SlotError;
use crate::transaction::TableDescriber;
use futures::future::BoxFuture;

/// jsonb: Odoo stores translated fields in it.
const JSONB_OID: u32 = 3802;

/// How long a Relation message may wait for its catalog refresh.
const REFRESH_WAIT: Duration = Duration::from_secs(90);

pub struct CatalogDescriber {
    selection: SelectionConfig,
    odoo: Option<OdooCatalog>,
    tables: HashMap<u32, TableFacts>,
    refresher: Refresher,
}

/// Loads the catalog for a session's describer.
pub async fn for_session(cfg: &SessionConfig) -> Result<Box<dyn TableDescriber>, SlotError> {
    let client = crate::replication::sql::connect(&cfg.source).await?;
    let odoo = catalog::odoo_profile(&client, cfg.selection.profile)
        .await
        .map_err(|e| match e {
            catalog::ProfileError::Db(e) => SlotError::Replication(e),
            other => SlotError::Publication(other.to_string()),
        })?;
    let tables = within("listing tables", catalog::tables(&client, None)).await?;
    match (&odoo, &cfg.selection.translation_lang) {
        (Some(o), _) => tracing::info!(schema = %o.schema, "Odoo profile active"),
        (None, Some(lang)) => tracing::warn!(
            lang = %lang,
            "--translation-lang needs the Odoo profile (a database with ir_model): translated fields are left as they are"
        ),
        (None, None) => {}
    }
    Ok(Box::new(CatalogDescriber {
        selection: cfg.selection.clone(),
        refresher: Refresher {
            source: cfg.source.clone(),
            odoo_schema: odoo.as_ref().map(|o| o.schema.clone()),
            client: None,
        },
        odoo,
        tables: tables.into_iter().map(|t| (t.oid, t)).collect(),
    }))
}

impl CatalogDescriber {
    /// A describer over already-loaded facts (no refresh connection is used
    /// unless a relation is missing from them).
    pub fn new(
        source: PgConfig,
        selection: SelectionConfig,
        odoo: Option<OdooCatalog>,
        tables: Vec<TableFacts>,
    ) -> Self {
        CatalogDescriber {
            selection,
            refresher: Refresher {
                source,
                odoo_schema: odoo.as_ref().map(|o| o.schema.clone()),
                client: None,
            },
            odoo,
            tables: tables.into_iter().map(|t| (t.oid, t)).collect(),
        }
    }

    /// Whether the cached facts still describe this relation.
    fn fresh(&self, relation: &Relation) -> bool {
        self.tables.get(&relation.oid).is_some_and(|f| {
            f.schema == relation.schema
                && f.name == relation.table
                && f.replident == replident_char(relation.replica_identity)
                && relation.columns.iter().all(|c| f.columns.contains(&c.name))
        })
    }

    async fn refresh(&mut self, relation: &Relation) {
        match self.refresher.fetch(relation.oid, &relation.table).await {
            Ok((facts, odoo)) => {
                match facts {
                    Some(f) => {
                        self.tables.insert(f.oid, f);
                    }
                    None => {
                        self.tables.remove(&relation.oid);
                    }
                }
                if let (Some(mine), Some(new)) = (self.odoo.as_mut(), odoo) {
                    mine.merge(new);
                }
            }
            Err(e) => tracing::warn!(
                table = %relation.qualified_name(),
                error = %e,
                "cannot refresh the table from the catalog; describing it from the Relation message \
                 (with REPLICA IDENTITY FULL its key is then every column)"
            ),
        }
    }

    /// The description of a relation from the cached facts.
    pub fn build(&self, relation: Arc<Relation>) -> TableInfo {
        let mut info = TableInfo::plain(relation.clone());
        let (schema, table) = (relation.schema.as_str(), relation.table.as_str());
        let facts = self.tables.get(&relation.oid);
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        let odoo = self
            .odoo
            .as_ref()
            .and_then(|o| o.table(schema, table, &names));
        let identity = facts
            .map(TableFacts::identity)
            .unwrap_or_else(|| identity_from_relation(&relation));
        match self
            .selection
            .decide(schema, table, identity, odoo.as_ref())
        {
            Decision::Capture | Decision::InsertOnly => {}
            Decision::Excluded(reason) => {
                tracing::debug!(table = %relation.qualified_name(), %reason, "not published");
                info.included = false;
            }
            Decision::NoIdentity(_) => {
                // Only an operator's publication (--publication-mode existing)
                // sends it: publish what arrives, and say what is wrong.
                tracing::warn!(
                    table = %relation.qualified_name(),
                    "the publication sends this table, which has no usable replica identity:                      PostgreSQL rejects its UPDATEs and DELETEs, so only inserts can arrive.                      Fix: ALTER TABLE {} REPLICA IDENTITY FULL; or drop it from the publication",
                    relation.qualified_name()
                );
            }
        }
        // pgoutput flags every column under REPLICA IDENTITY FULL; the primary
        // key is what identifies the row for a consumer.
        if relation.replica_identity == ReplicaIdentity::Full
            && let Some(f) = facts
            && !f.primary_key.is_empty()
            && let Some(key) = f
                .primary_key
                .iter()
                .map(|k| names.iter().position(|n| n == k))
                .collect::<Option<Vec<usize>>>()
        {
            info.key_columns = key;
        }
        for (i, name) in names.iter().enumerate() {
            if self.selection.column_excluded(schema, table, name) {
                info.skip_column[i] = true;
            }
        }
        if let Some(o) = odoo {
            if let Some(lang) = &self.selection.translation_lang {
                for (i, c) in relation.columns.iter().enumerate() {
                    info.translated_column[i] =
                        c.type_oid == JSONB_OID && o.translated.contains(&c.name);
                }
                info.flatten_translations = Some(lang.clone());
            }
            info.model = o.model;
            info.many2many = o.many2many;
        }
        info
    }
}

impl TableDescriber for CatalogDescriber {
    fn describe(&mut self, relation: Arc<Relation>) -> BoxFuture<'_, TableInfo> {
        Box::pin(async move {
            if !self.fresh(&relation) {
                self.refresh(&relation).await;
            }
            self.build(relation)
        })
    }
}

fn replident_char(r: ReplicaIdentity) -> char {
    match r {
        ReplicaIdentity::Default => 'd',
        ReplicaIdentity::Nothing => 'n',
        ReplicaIdentity::Full => 'f',
        ReplicaIdentity::Index => 'i',
    }
}

/// Identity as far as the Relation message tells (no catalog at hand).
fn identity_from_relation(relation: &Relation) -> Identity {
    match relation.replica_identity {
        ReplicaIdentity::Full => Identity::Usable,
        ReplicaIdentity::Nothing => Identity::Nothing,
        _ if relation.columns.iter().any(|c| c.is_key) => Identity::Usable,
        ReplicaIdentity::Default => Identity::NoPrimaryKey,
        ReplicaIdentity::Index => Identity::Nothing,
    }
}

type Fetched = (Option<TableFacts>, Option<OdooCatalog>);

/// Answers catalog refreshes over a connection of its own, opened on first
/// need and dropped after a failure (the next refresh reconnects).
struct Refresher {
    source: PgConfig,
    odoo_schema: Option<String>,
    client: Option<tokio_postgres::Client>,
}

impl Refresher {
    async fn fetch(&mut self, oid: u32, table: &str) -> Result<Fetched, String> {
        let result = match tokio::time::timeout(REFRESH_WAIT, self.try_fetch(oid, table)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no catalog answer within {REFRESH_WAIT:?}")),
        };
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn try_fetch(&mut self, oid: u32, table: &str) -> Result<Fetched, String> {
        if self.client.is_none() {
            self.client = Some(
                crate::replication::sql::connect(&self.source)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(c) = self.client.as_ref() else {
            return Err("no catalog connection".to_string());
        };
        let facts = within("refreshing a table", catalog::tables(c, Some(oid)))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next();
        let odoo = match &self.odoo_schema {
            Some(s) => Some(
                within(
                    "refreshing the Odoo model of a table",
                    OdooCatalog::load(c, s, Some(table)),
                )
                .await
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok((facts, odoo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{ColumnGlob, TableGlob};
    use crate::schema::Column;

    fn sale_order(identity: ReplicaIdentity) -> Arc<Relation> {
        let full = identity == ReplicaIdentity::Full;
        Arc::new(Relation::new(
            42,
            "public",
            "sale_order",
            identity,
            vec![
                Column::new("name", 25, -1, full),
                Column::new("id", 23, -1, true),
                Column::new("note", 25, -1, full),
            ],
        ))
    }

    fn facts() -> TableFacts {
        TableFacts {
            oid: 42,
            schema: "public".into(),
            name: "sale_order".into(),
            replident: 'f',
            primary_key: vec!["id".into()],
            has_identity_index: false,
            columns: vec!["name".into(), "id".into(), "note".into()],
            owned: true,
            can_select: true,
        }
    }

    fn describer(selection: SelectionConfig) -> CatalogDescriber {
        CatalogDescriber::new(
            "postgres://u@127.0.0.1:1/db".parse().unwrap(),
            selection,
            None,
            vec![facts()],
        )
    }

    #[test]
    fn full_identity_key_is_the_primary_key_and_excluded_columns_are_skipped() {
        let selection = SelectionConfig {
            exclude_columns: vec![ColumnGlob::parse("sale_order.note").unwrap()],
            ..SelectionConfig::default()
        };
        let d = describer(selection);
        let rel = sale_order(ReplicaIdentity::Full);
        assert!(d.fresh(&rel));
        let info = d.build(rel);
        assert!(info.included);
        assert_eq!(info.key_columns, vec![1]);
        assert_eq!(info.skip_column, vec![false, false, true]);
        assert!(info.model.is_none() && info.many2many.is_none());
    }

    #[test]
    fn filters_decide_inclusion_and_changed_relations_are_not_fresh() {
        let selection = SelectionConfig {
            include: vec![TableGlob::parse("public.stock_*").unwrap()],
            ..SelectionConfig::default()
        };
        let d = describer(selection);
        assert!(!d.build(sale_order(ReplicaIdentity::Full)).included);
        // DEFAULT identity differs from the cached FULL: the cache is stale.
        assert!(!d.fresh(&sale_order(ReplicaIdentity::Default)));
        let mut added = (*sale_order(ReplicaIdentity::Full)).clone();
        added.columns.push(Column::new("new_field", 25, -1, true));
        assert!(!d.fresh(&added));
    }
}
