//! What a snapshot reads: the publication's tables, each described the way
//! pgoutput's Relation message would describe it (same columns, same order, same
//! key flags), so snapshot rows and streamed rows become identical events.

use tokio_postgres::Client;

use super::{SnapshotError, bounded};
use crate::schema::{Column, Relation, ReplicaIdentity};

/// One table to copy.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// Columns as pgoutput publishes them: not dropped, not generated, limited
    /// to the publication's column list (PG15+).
    pub relation: Relation,
    /// `pg_class.relkind`: `r` plain (read with `ONLY`, as inheritance children
    /// are published on their own), `p` partitioned (read through the root).
    pub relkind: char,
    /// `pg_class.reltuples`, the planner's estimate (-1 or 0 when never analysed).
    pub estimated_rows: i64,
    /// The publications' row filter (PG15+), `None` when any of them has none.
    pub row_filter: Option<String>,
    /// Positions in `relation.columns` of the primary key (else the replica
    /// identity index): what on-demand snapshots chunk by.
    pub chunk_key: Vec<usize>,
    /// `format_type` of every column, for typed literals in chunk bounds.
    pub type_names: Vec<String>,
}

impl TableSpec {
    pub fn qualified(&self) -> String {
        self.relation.qualified_name()
    }

    /// `"schema"."table"` for SQL.
    pub fn sql_name(&self) -> String {
        format!(
            "{}.{}",
            crate::replication::quote_ident(&self.relation.schema),
            crate::replication::quote_ident(&self.relation.table)
        )
    }

    /// The column list of the snapshot `SELECT`.
    pub fn select_list(&self) -> String {
        // A table without columns: `SELECT FROM t` gives one empty line per row.
        self.relation
            .columns
            .iter()
            .map(|c| crate::replication::quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `FROM` target: `ONLY` for plain tables.
    pub fn from_target(&self) -> String {
        if self.relkind == 'p' {
            self.sql_name()
        } else {
            format!("ONLY {}", self.sql_name())
        }
    }
}

/// The tables of the publications, as `(schema, table)`, in a stable order.
pub async fn publication_tables(
    client: &Client,
    publications: &[String],
) -> Result<Vec<(String, String)>, SnapshotError> {
    const WHAT: &str = "listing the publication's tables";
    let rows = bounded(
        WHAT,
        client.query(
            "SELECT DISTINCT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = ANY($1) ORDER BY 1, 2",
            &[&publications],
        ),
    )
    .await?
    .map_err(SnapshotError::sql(WHAT))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Describes one published table. `None` when it is not in the publications.
pub async fn describe(
    client: &Client,
    publications: &[String],
    schema: &str,
    table: &str,
    server_version: u32,
) -> Result<Option<TableSpec>, SnapshotError> {
    let name = format!("{schema}.{table}");
    let what = format!("describing table {name}");
    // Column lists and row filters exist from PostgreSQL 15.
    let pub_sql = if server_version >= 150000 {
        "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
         WHERE pubname = ANY($1) AND schemaname = $2 AND tablename = $3"
    } else {
        "SELECT NULL::text[], NULL::text FROM pg_publication_tables \
         WHERE pubname = ANY($1) AND schemaname = $2 AND tablename = $3"
    };
    let pubs = bounded(
        &what,
        client.query(pub_sql, &[&publications, &schema, &table]),
    )
    .await?
    .map_err(SnapshotError::sql(what.clone()))?;
    if pubs.is_empty() {
        return Ok(None);
    }
    let mut column_list: Option<Vec<String>> = None;
    let mut filters = Vec::new();
    let mut unfiltered = false;
    for r in &pubs {
        if let Some(names) = r.get::<_, Option<Vec<String>>>(0) {
            column_list.get_or_insert_with(Vec::new).extend(names);
        }
        match r.get::<_, Option<String>>(1) {
            Some(f) => filters.push(format!("({f})")),
            None => unfiltered = true,
        }
    }
    let row_filter = (!unfiltered && !filters.is_empty()).then(|| filters.join(" OR "));

    let rel = bounded(
        &what,
        client.query_opt(
            "SELECT c.oid, c.relreplident::text, c.relkind::text, c.reltuples::float8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        ),
    )
    .await?
    .map_err(SnapshotError::sql(what.clone()))?;
    let Some(rel) = rel else {
        return Ok(None);
    };
    let oid: u32 = rel.get(0);
    let replident: String = rel.get(1);
    let relkind: String = rel.get(2);
    let reltuples: f64 = rel.get(3);
    let cols = bounded(
        &what,
        client.query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, NULL), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary \
                       AND a.attnum = ANY (i.indkey::int2[])), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisreplident \
                       AND a.attnum = ANY (i.indkey::int2[])) \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attgenerated = '' ORDER BY a.attnum",
            &[&oid],
        ),
    )
    .await?
    .map_err(SnapshotError::sql(what.clone()))?;

    let identity = match replident.as_str() {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let mut columns = Vec::new();
    let mut type_names = Vec::new();
    let mut pk = Vec::new();
    let mut ri = Vec::new();
    for c in &cols {
        let name: String = c.get(0);
        if let Some(list) = &column_list
            && !list.contains(&name)
        {
            continue;
        }
        let in_pk: bool = c.get(4);
        let in_ri: bool = c.get(5);
        // The key flags pgoutput sets for this replica identity.
        let is_key = match identity {
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Default => in_pk,
            ReplicaIdentity::Index => in_ri,
            ReplicaIdentity::Nothing => false,
        };
        if in_pk {
            pk.push(columns.len());
        }
        if in_ri {
            ri.push(columns.len());
        }
        columns.push(Column::new(name, c.get::<_, u32>(1), c.get(2), is_key));
        type_names.push(c.get(3));
    }
    Ok(Some(TableSpec {
        relation: Relation::new(oid, schema, table, identity, columns),
        relkind: relkind.chars().next().unwrap_or('r'),
        estimated_rows: reltuples.max(0.0) as i64,
        row_filter,
        chunk_key: if pk.is_empty() { ri } else { pk },
        type_names,
    }))
}

/// `public.sale_order` or `sale_order` (schema `public`) → (schema, table).
/// Quoted identifiers are not needed for Odoo's names and not supported.
pub fn parse_table_name(s: &str) -> Option<(String, String)> {
    let s = s.trim();
    let (schema, table) = s.split_once('.').unwrap_or(("public", s));
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return None;
    }
    Some((schema.to_string(), table.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(
            parse_table_name("public.sale_order"),
            Some(("public".into(), "sale_order".into()))
        );
        assert_eq!(
            parse_table_name(" res_partner "),
            Some(("public".into(), "res_partner".into()))
        );
        assert_eq!(parse_table_name("a.b.c"), None);
        assert_eq!(parse_table_name(".x"), None);
    }
}
