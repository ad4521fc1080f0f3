//! The initial snapshot: every published table, read inside the snapshot the
//! slot exported at its consistent point, on a few parallel connections.
//!
//! Each worker connection imports the snapshot (`BEGIN ISOLATION LEVEL
//! REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT`), then takes tables from
//! a shared queue (largest first) and streams each with `COPY (SELECT ...) TO
//! STDOUT`. Rows become `r` events on the session's bounded queue, so a slow
//! broker slows the COPY down instead of filling memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::catalog::{self, TableSpec};
use super::copy_text::CopyRows;
use super::{SnapshotError, bounded, prepare_connection};
use crate::event::{ChangeEvent, Op, TableInfo};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::queue::{Item, ItemSender};
use crate::replication::{PgConfig, quote_literal};
use crate::transaction::TableDescriber;

/// What to snapshot and from where.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: PgConfig,
    pub publications: Vec<String>,
    /// Name of the snapshot the replication connection exported.
    pub snapshot_name: String,
    pub consistent_point: Lsn,
    /// Parallel connections (at most one per table).
    pub workers: usize,
    pub server_version: u32,
}

struct Job {
    spec: TableSpec,
    info: Arc<TableInfo>,
}

/// Reads every published (and included) table and sends its rows down `tx`.
/// Returns the number of rows. The caller waits for their confirms.
pub(crate) async fn run(
    plan: &Plan,
    describer: &mut dyn TableDescriber,
    tx: &ItemSender,
    metrics: &Arc<Metrics>,
) -> Result<u64, SnapshotError> {
    let started = Instant::now();
    let catalog_conn = open(plan).await?;
    let mut jobs = Vec::new();
    for (schema, table) in catalog::publication_tables(&catalog_conn, &plan.publications).await? {
        let Some(spec) = catalog::describe(
            &catalog_conn,
            &plan.publications,
            &schema,
            &table,
            plan.server_version,
        )
        .await?
        else {
            continue;
        };
        let info = Arc::new(describer.describe(Arc::new(spec.relation.clone())).await);
        if !info.included {
            tracing::debug!(table = %spec.qualified(), "not snapshotted: excluded");
            continue;
        }
        jobs.push(Job { spec, info });
    }
    drop(catalog_conn);
    jobs.sort_by_key(|j| std::cmp::Reverse(j.spec.estimated_rows));
    let estimated: i64 = jobs.iter().map(|j| j.spec.estimated_rows).sum();
    tracing::info!(
        tables = jobs.len(),
        estimated_rows = estimated,
        consistent_point = %plan.consistent_point,
        "initial snapshot started"
    );
    for j in &jobs {
        metrics.snapshot_progress(&j.spec.qualified(), 0, j.spec.estimated_rows.max(0) as u64);
    }

    let n_workers = plan.workers.max(1).min(jobs.len());
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let ts = crate::replication::pg_now_micros();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n_workers {
        let (plan, queue, tx, metrics) = (plan.clone(), queue.clone(), tx.clone(), metrics.clone());
        set.spawn(async move { worker(&plan, queue, tx, metrics, ts).await });
    }
    let mut total = 0u64;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            Err(join) => {
                set.abort_all();
                return Err(SnapshotError::Table {
                    table: "-".into(),
                    what: format!("snapshot worker failed: {join}"),
                });
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        rows = total,
        seconds = format!("{secs:.1}"),
        rows_per_sec = (total as f64 / secs.max(1e-3)) as u64,
        "initial snapshot read; waiting for the last confirms"
    );
    Ok(total)
}

/// A SQL connection inside the exported snapshot.
async fn open(plan: &Plan) -> Result<tokio_postgres::Client, SnapshotError> {
    let client = crate::replication::sql::connect(&plan.source).await?;
    prepare_connection(&client).await?;
    const WHAT: &str = "importing the slot's exported snapshot";
    bounded(
        WHAT,
        client.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&plan.snapshot_name)
        )),
    )
    .await?
    .map_err(SnapshotError::sql(WHAT))?;
    Ok(client)
}

async fn worker(
    plan: &Plan,
    queue: Arc<Mutex<VecDeque<Job>>>,
    tx: ItemSender,
    metrics: Arc<Metrics>,
    ts: i64,
) -> Result<u64, SnapshotError> {
    let client = open(plan).await?;
    let mut total = 0;
    loop {
        let job = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(job) = job else { break };
        total += copy_table(&client, plan.consistent_point, ts, &job, &tx, &metrics).await?;
    }
    let _ = bounded(
        "ending the snapshot transaction",
        client.batch_execute("COMMIT"),
    )
    .await;
    Ok(total)
}

async fn copy_table(
    client: &tokio_postgres::Client,
    consistent_point: Lsn,
    ts: i64,
    job: &Job,
    tx: &ItemSender,
    metrics: &Metrics,
) -> Result<u64, SnapshotError> {
    let spec = &job.spec;
    let table = spec.qualified();
    let estimated = spec.estimated_rows.max(0) as u64;
    let filter = spec
        .row_filter
        .as_ref()
        .map(|f| format!(" WHERE {f}"))
        .unwrap_or_default();
    let sql = format!(
        "COPY (SELECT {} FROM {}{filter}) TO STDOUT",
        spec.select_list(),
        spec.from_target()
    );
    let what = format!("reading table {table}");
    let stream = bounded(&what, client.copy_out(&sql))
        .await?
        .map_err(SnapshotError::sql(what.clone()))?;
    futures::pin_mut!(stream);
    let mut parser = CopyRows::new(spec.relation.columns.len());
    let mut rows = Vec::with_capacity(64);
    let mut n: u64 = 0;
    let started = Instant::now();
    let mut last_log = Instant::now();
    while let Some(chunk) = bounded(&what, stream.next()).await? {
        let chunk = chunk.map_err(SnapshotError::sql(what.clone()))?;
        parser
            .push(chunk, &mut rows)
            .map_err(|e| SnapshotError::Table {
                table: table.clone(),
                what: e.to_string(),
            })?;
        metrics
            .snapshot_rows
            .fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for tuple in rows.drain(..) {
            let ev = ChangeEvent {
                op: Op::Read,
                table: Some(job.info.clone()),
                lsn: consistent_point,
                commit_lsn: consistent_point,
                xid: 0,
                commit_ts: ts,
                seq: n,
                snapshot: true,
                old: None,
                new: Some(tuple),
                truncate_options: 0,
                message: None,
            };
            n += 1;
            tx.send(Item::Event(ev))
                .await
                .map_err(|_| SnapshotError::PublisherGone)?;
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            metrics.snapshot_progress(&table, n, estimated);
            tracing::info!(table = %table, rows = n, estimated, "snapshot progress");
        }
    }
    parser.finish().map_err(|e| SnapshotError::Table {
        table: table.clone(),
        what: e.to_string(),
    })?;
    metrics.snapshot_progress(&table, n, n.max(estimated));
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        table = %table,
        rows = n,
        seconds = format!("{secs:.1}"),
        "table snapshot read"
    );
    Ok(n)
}
