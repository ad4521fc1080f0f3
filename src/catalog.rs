//! What the PostgreSQL catalog says about the tables a run may capture: replica
//! identity, primary key, columns, ownership and SELECT rights.
//!
//! The replica identity decides whether a table may join a publication that
//! publishes updates and deletes (see [`crate::filter`]); the primary key gives
//! events their `key` when the identity is FULL (pgoutput then flags every
//! column as part of the identity).

use crate::filter::Identity;

/// One ordinary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replident: char,
    /// Primary key columns, in key order; empty without a primary key.
    pub primary_key: Vec<String>,
    /// Whether a replica identity index is set and exists (`USING INDEX`).
    pub has_identity_index: bool,
    /// Live columns in attribute order.
    pub columns: Vec<String>,
    /// The current role owns the table (needed to add it to a publication).
    pub owned: bool,
    /// The current role may SELECT from it (needed by the snapshot).
    pub can_select: bool,
}

impl TableFacts {
    pub fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    /// Whether PostgreSQL can identify this table's old rows.
    pub fn identity(&self) -> Identity {
        match self.replident {
            'f' => Identity::Usable,
            'd' if !self.primary_key.is_empty() => Identity::Usable,
            'd' => Identity::NoPrimaryKey,
            'i' if self.has_identity_index => Identity::Usable,
            _ => Identity::Nothing,
        }
    }

    pub fn column_refs(&self) -> Vec<&str> {
        self.columns.iter().map(String::as_str).collect()
    }
}

const TABLES_SQL: &str = "\
SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'::text[]),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'::text[]),
       pg_has_role(c.relowner, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND ($1::oid IS NULL OR c.oid = $1::oid)
ORDER BY n.nspname, c.relname";

/// Every ordinary table outside the system schemas (`only` = one table by OID).
pub async fn tables(
    client: &tokio_postgres::Client,
    only: Option<u32>,
) -> Result<Vec<TableFacts>, tokio_postgres::Error> {
    let rows = client.query(TABLES_SQL, &[&only]).await?;
    Ok(rows
        .into_iter()
        .map(|r| TableFacts {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            replident: r.get::<_, String>(3).chars().next().unwrap_or('d'),
            primary_key: r.get(4),
            has_identity_index: r.get(5),
            columns: r.get(6),
            owned: r.get(7),
            can_select: r.get(8),
        })
        .collect())
}

/// Tables of a publication, as `(schema, table)`, and whether it publishes
/// updates or deletes (`None` when the publication does not exist).
pub struct PublicationFacts {
    pub all_tables: bool,
    pub publishes_update_or_delete: bool,
    pub tables: Vec<(u32, String, String)>,
}

pub async fn publication(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Option<PublicationFacts>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables, pubupdate OR pubdelete FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&name],
        )
        .await?;
    Ok(Some(PublicationFacts {
        all_tables: row.get(0),
        publishes_update_or_delete: row.get(1),
        tables: rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    }))
}

/// How long one catalog statement may take before the session gives up on it
/// (it is retried with the session).
pub const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a catalog statement with [`STATEMENT_TIMEOUT`]; errors become
/// [`ReplicationError`]s so the one retry policy classifies them.
pub async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, crate::replication::ReplicationError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Ok(r) => r.map_err(crate::replication::ReplicationError::from),
        Err(_) => Err(crate::replication::ReplicationError::Timeout {
            what: what.to_string(),
            after: STATEMENT_TIMEOUT,
        }),
    }
}

/// The Odoo profile's catalog when the profile is active (`--profile odoo`, or
/// `auto` on a database with `ir_model`). `odoo` without `ir_model` is an error
/// the operator must fix, not a silent fallback.
pub async fn odoo_profile(
    client: &tokio_postgres::Client,
    profile: crate::filter::Profile,
) -> Result<Option<crate::odoo::OdooCatalog>, ProfileError> {
    use crate::filter::Profile;
    if profile == Profile::None {
        return Ok(None);
    }
    let schema = within(
        "looking for ir_model",
        crate::odoo::OdooCatalog::detect(client),
    )
    .await?;
    match (schema, profile) {
        (None, Profile::Odoo) => Err(ProfileError::NotOdoo),
        (None, _) => Ok(None),
        (Some(schema), _) => Ok(Some(
            within(
                "loading ir_model",
                crate::odoo::OdooCatalog::load(client, &schema, None),
            )
            .await?,
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "--profile odoo, but the database has no ir_model table (is it an Odoo database, and is its schema on the search_path?); use --profile none"
    )]
    NotOdoo,
    #[error(transparent)]
    Db(#[from] crate::replication::ReplicationError),
}

/// An identifier as SQL text for statements and messages: bare when PostgreSQL
/// would read it back unchanged (`sale_order`), double-quoted otherwise
/// (`"Order"`, `"user"`), so the fixes `check` prints are both exact and readable.
pub fn ident(name: &str) -> String {
    const RESERVED: &[&str] = &[
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "asymmetric",
        "authorization",
        "binary",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "collation",
        "column",
        "concurrently",
        "constraint",
        "create",
        "cross",
        "current_catalog",
        "current_date",
        "current_role",
        "current_schema",
        "current_time",
        "current_timestamp",
        "current_user",
        "default",
        "deferrable",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "fetch",
        "for",
        "foreign",
        "freeze",
        "from",
        "full",
        "grant",
        "group",
        "having",
        "ilike",
        "in",
        "initially",
        "inner",
        "intersect",
        "into",
        "is",
        "isnull",
        "join",
        "lateral",
        "leading",
        "left",
        "like",
        "limit",
        "localtime",
        "localtimestamp",
        "natural",
        "not",
        "notnull",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "outer",
        "overlaps",
        "placing",
        "primary",
        "references",
        "returning",
        "right",
        "select",
        "session_user",
        "similar",
        "some",
        "symmetric",
        "system_user",
        "table",
        "tablesample",
        "then",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "variadic",
        "verbose",
        "when",
        "where",
        "window",
        "with",
    ];
    let simple = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if simple && !RESERVED.contains(&name) {
        name.to_string()
    } else {
        crate::replication::quote_ident(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(ident("sale_order"), "sale_order");
        assert_eq!(ident("user"), "\"user\"");
        assert_eq!(ident("Order"), "\"Order\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("1x"), "\"1x\"");
    }
}
