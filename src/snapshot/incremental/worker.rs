//! The snapshot worker of an on-demand snapshot: its own SQL connection,
//! reading a table in chunks by primary key between two watermarks, and the
//! `odoo-cdc snapshot` signal that asks a running connector for one.

use super::*;
use crate::pgoutput::{ColumnValue, TupleData};
use crate::replication::{PgConfig, quote_literal};
use crate::snapshot::catalog::{self, TableSpec};
use crate::snapshot::copy_text::CopyRows;
use crate::snapshot::{
    SIGNAL_PREFIX, SnapshotError, WATERMARK_PREFIX, bounded, prepare_connection,
};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

/// The key of a tuple: its key columns' text, length-prefixed. `None` when a
/// key column is not there as text.
pub(super) fn key_of(tuple: &TupleData, positions: &[usize]) -> Option<Vec<u8>> {
    let mut k = Vec::with_capacity(16);
    for p in positions {
        match tuple.columns.get(*p) {
            Some(ColumnValue::Text(b)) => {
                k.extend_from_slice(&(b.len() as u32).to_le_bytes());
                k.extend_from_slice(b);
            }
            _ => return None,
        }
    }
    Some(k)
}

pub(super) async fn emit_watermark(
    client: &tokio_postgres::Client,
    session: &str,
    job: u64,
    chunk: u64,
    w: &str,
) -> Result<(), SnapshotError> {
    let body = serde_json::to_string(&Watermark {
        session: session.to_string(),
        job,
        chunk,
        w: w.to_string(),
    })
    .unwrap_or_default();
    const WHAT: &str = "writing a watermark message";
    // Transactional and committed: the commit also flushes the WAL up to it.
    bounded(
        WHAT,
        client.execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&WATERMARK_PREFIX, &body],
        ),
    )
    .await?
    .map_err(SnapshotError::sql(WHAT))?;
    Ok(())
}

/// Emits the signal asking the connector that holds the slot to re-snapshot `tables`.
pub async fn send_signal(source: &PgConfig, tables: &[String]) -> Result<String, SnapshotError> {
    let client = crate::replication::sql::connect(source).await?;
    let body = serde_json::json!({ "snapshot": tables }).to_string();
    const WHAT: &str = "writing the snapshot signal";
    let row = bounded(
        WHAT,
        client.query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&SIGNAL_PREFIX, &body],
        ),
    )
    .await?
    .map_err(SnapshotError::sql(WHAT))?;
    Ok(row.get(0))
}

pub(super) async fn run_worker(
    settings: &Settings,
    session: &str,
    job: u64,
    table: &str,
    tx: &mpsc::UnboundedSender<ToReader>,
) -> Result<tokio_postgres::Client, SnapshotError> {
    let gone = || SnapshotError::PublisherGone;
    let (schema, name) = catalog::parse_table_name(table).ok_or_else(|| SnapshotError::Table {
        table: table.to_string(),
        what: "not a schema.table name".into(),
    })?;
    let client = crate::replication::sql::connect(&settings.source).await?;
    prepare_connection(&client).await?;
    let spec = catalog::describe(
        &client,
        &settings.publications,
        &schema,
        &name,
        settings.server_version,
    )
    .await?
    .ok_or_else(|| SnapshotError::Table {
        table: table.to_string(),
        what: format!(
            "not in publication {}: nothing to snapshot",
            settings.publications.join(",")
        ),
    })?;
    if spec.chunk_key.is_empty() {
        return Err(SnapshotError::Table {
            table: table.to_string(),
            what: "has no primary key or replica identity index to chunk by".into(),
        });
    }
    let (reply, accepted) = oneshot::channel();
    tx.send(ToReader::Started {
        job,
        spec: Box::new(spec.clone()),
        reply,
    })
    .map_err(|_| gone())?;
    emit_watermark(&client, session, job, 0, "start").await?;
    // The reader answers at the start watermark, once it described the table.
    if !accepted.await.map_err(|_| gone())? {
        return Err(SnapshotError::Table {
            table: table.to_string(),
            what: "excluded by the table filters: nothing to snapshot".into(),
        });
    }

    let key_cols: Vec<String> = spec
        .chunk_key
        .iter()
        .map(|i| crate::replication::quote_ident(&spec.relation.columns[*i].name))
        .collect();
    let order = key_cols.join(", ");
    let mut last_key: Option<Vec<String>> = None;
    let mut ordinal = 0u64;
    let mut chunk_no = 0u64;
    let mut retries = 0;
    loop {
        let mut conds = Vec::new();
        if let Some(last) = &last_key {
            let lits: Vec<String> = last
                .iter()
                .zip(&spec.chunk_key)
                .map(|(v, i)| format!("{}::{}", quote_literal(v), spec.type_names[*i]))
                .collect();
            conds.push(format!("({order}) > ({})", lits.join(", ")));
        }
        if let Some(f) = &spec.row_filter {
            conds.push(format!("({f})"));
        }
        let where_clause = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "COPY (SELECT {} FROM {}{where_clause} ORDER BY {order} LIMIT {}) TO STDOUT",
            spec.select_list(),
            spec.from_target(),
            settings.chunk_rows
        );

        emit_watermark(&client, session, job, chunk_no, "low").await?;
        let (rows, snapshot) = read_chunk(&client, &spec, &sql, settings.server_version).await?;
        let n = rows.len();
        let last = rows.last().map(|r| {
            spec.chunk_key
                .iter()
                .map(|i| match &r.columns[*i] {
                    ColumnValue::Text(b) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
        });
        let (reply, outcome) = oneshot::channel();
        tx.send(ToReader::Chunk(Chunk {
            job,
            chunk: chunk_no,
            rows,
            snapshot,
            first_ordinal: ordinal,
            reply,
        }))
        .map_err(|_| gone())?;
        emit_watermark(&client, session, job, chunk_no, "high").await?;
        match outcome.await.map_err(|_| gone())? {
            Outcome::Published => {
                retries = 0;
                ordinal += n as u64;
                chunk_no += 1;
                if n < settings.chunk_rows {
                    break;
                }
                last_key = last;
            }
            Outcome::Retry => {
                retries += 1;
                chunk_no += 1;
                if retries > MAX_CHUNK_RETRIES {
                    return Err(SnapshotError::Table {
                        table: table.to_string(),
                        what: format!("chunk read {retries} times without a consistent result"),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(20 * retries as u64)).await;
            }
        }
    }
    Ok(client)
}

async fn read_chunk(
    client: &tokio_postgres::Client,
    spec: &TableSpec,
    sql: &str,
    server_version: u32,
) -> Result<(Vec<TupleData>, MvccSnapshot), SnapshotError> {
    // Same text form; pg_current_snapshot() is the PostgreSQL 13+ name.
    let snapshot_sql = if server_version >= 130000 {
        "SELECT pg_current_snapshot()::text"
    } else {
        "SELECT txid_current_snapshot()::text"
    };
    let what = format!("reading a chunk of {}", spec.qualified());
    bounded(
        &what,
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await?
    .map_err(SnapshotError::sql(what.clone()))?;
    let result = async {
        // The first statement fixes the transaction's snapshot; the COPY uses it.
        let row = bounded(&what, client.query_one(snapshot_sql, &[]))
            .await?
            .map_err(SnapshotError::sql(what.clone()))?;
        let text: String = row.get(0);
        let snapshot = MvccSnapshot::parse(&text).ok_or_else(|| SnapshotError::Table {
            table: spec.qualified(),
            what: format!("unreadable snapshot {text:?}"),
        })?;
        let stream = bounded(&what, client.copy_out(sql))
            .await?
            .map_err(SnapshotError::sql(what.clone()))?;
        futures::pin_mut!(stream);
        let mut parser = CopyRows::new(spec.relation.columns.len());
        let mut rows = Vec::new();
        while let Some(chunk) = bounded(&what, stream.next()).await? {
            let chunk = chunk.map_err(SnapshotError::sql(what.clone()))?;
            parser
                .push(chunk, &mut rows)
                .map_err(|e| SnapshotError::Table {
                    table: spec.qualified(),
                    what: e.to_string(),
                })?;
        }
        parser.finish().map_err(|e| SnapshotError::Table {
            table: spec.qualified(),
            what: e.to_string(),
        })?;
        Ok::<_, SnapshotError>((rows, snapshot))
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    bounded(&what, client.batch_execute(end))
        .await?
        .map_err(SnapshotError::sql(what.clone()))?;
    result
}
