//! On-demand re-snapshot of one table while streaming continues (the watermark
//! approach of DBLog and Debezium's incremental snapshots).
//!
//! Trigger: a logical message with prefix [`SIGNAL_PREFIX`] and content
//! `{"snapshot": "public.sale_order"}` (or a list of names), written with
//! `pg_logical_emit_message(true, 'odoo-cdc.signal', ...)` or `odoo-cdc
//! snapshot`. Because it travels through the WAL, it reaches whichever
//! connector instance holds the slot, and needs no restart.
//!
//! For each chunk of at most `chunk_rows` rows in primary-key order a worker
//! task, on its own SQL connection:
//! 1. commits a **low watermark** message (`odoo-cdc.watermark`, `"w":"low"`);
//! 2. reads the chunk in a REPEATABLE READ transaction, noting its MVCC
//!    snapshot (`pg_current_snapshot()`);
//! 3. hands the rows to the reader, then commits a **high watermark**.
//!
//! The reader ([`Incremental`], driven by the session's WAL reader) sees the
//! watermarks in WAL order. Between low and high it records the keys of every
//! streamed change of the table; at the high watermark it drops those keys from
//! the chunk (the stream already carries a newer version) and publishes the rest
//! as `r` events right there, so they take their place in stream order and the
//! checkpoint cannot pass the high watermark before they are confirmed.
//!
//! Postgres makes a commit visible a moment *after* writing its commit record
//! (longer with synchronous replication), so a change committed just before the
//! low watermark can still be invisible to the chunk's snapshot. The reader
//! keeps the keys and xids of the table's recent changes; at the high watermark
//! a chunk row is also dropped when a change before the low watermark came from
//! a transaction the chunk's snapshot did not see.
//!
//! One table at a time; further requests queue. A session that ends (restart,
//! failure) abandons a running re-snapshot: send the signal again.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::catalog::{self, TableSpec};
use super::{SIGNAL_PREFIX, WATERMARK_PREFIX};
use crate::event::{ChangeEvent, Op, TableInfo};
use crate::metrics::Metrics;
use crate::pgoutput::TupleData;
use crate::replication::PgConfig;
use crate::transaction::TableDescriber;

/// Keys of recent changes kept for the visibility check (per running job).
mod worker;
pub use worker::send_signal;
use worker::{emit_watermark, key_of, run_worker};

const RECENT_CHANGES: usize = 100_000;
/// A chunk whose snapshot keeps missing recent commits is read again at most this often.
const MAX_CHUNK_RETRIES: u32 = 50;

/// Settings of on-demand snapshots in a session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: PgConfig,
    pub publications: Vec<String>,
    pub chunk_rows: usize,
    pub server_version: u32,
}

/// A transaction snapshot as `pg_current_snapshot()` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MvccSnapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl MvccSnapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    pub fn parse(s: &str) -> Option<MvccSnapshot> {
        let mut it = s.trim().splitn(3, ':');
        let xmin = it.next()?.parse().ok()?;
        let xmax = it.next()?.parse().ok()?;
        let xip = match it.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(MvccSnapshot { xmin, xmax, xip })
    }

    /// Whether the changes of a committed transaction are visible; `xid` is the
    /// 32-bit xid of the stream, widened with the epoch of `xmax`.
    pub fn sees(&self, xid: u32) -> bool {
        let epoch = self.xmax & !0xFFFF_FFFF;
        let mut full = epoch | u64::from(xid);
        if full > self.xmax + (1 << 31) && full >= 1 << 32 {
            full -= 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// Keys of the changes before the low watermark from transactions the
/// chunk's snapshot did not see (committed, but not yet visible when it was
/// taken): the chunk's rows for them are stale. `None` when such a change is
/// a truncate (an empty key): the whole chunk is stale.
fn unseen_keys<'a>(
    recent: &'a VecDeque<(u64, u32, Vec<u8>)>,
    low_seq: u64,
    snapshot: &MvccSnapshot,
) -> Option<HashSet<&'a [u8]>> {
    let mut unseen = HashSet::new();
    for (seq, xid, key) in recent {
        if *seq >= low_seq {
            break;
        }
        if !snapshot.sees(*xid) {
            if key.is_empty() {
                return None;
            }
            unseen.insert(key.as_slice());
        }
    }
    Some(unseen)
}

/// Worker → reader.
enum ToReader {
    Started {
        job: u64,
        spec: Box<TableSpec>,
        reply: oneshot::Sender<bool>,
    },
    Chunk(Chunk),
    Failed {
        job: u64,
        reason: String,
    },
}

struct Chunk {
    job: u64,
    chunk: u64,
    rows: Vec<TupleData>,
    snapshot: MvccSnapshot,
    first_ordinal: u64,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Published,
    Retry,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Watermark {
    session: String,
    job: u64,
    #[serde(default)]
    chunk: u64,
    w: String,
}

struct Active {
    job: u64,
    table: String,
    worker: tokio::task::JoinHandle<()>,
    /// Set once the worker wrote its end watermark (the reader then waits for it
    /// in the stream instead of treating the finished task as lost).
    end_written: Arc<std::sync::atomic::AtomicBool>,
    /// Known once the worker described the table.
    spec: Option<Box<TableSpec>>,
    /// The worker waits for this before reading: `false` when the filters exclude the table.
    start_reply: Option<oneshot::Sender<bool>>,
    info: Option<Arc<TableInfo>>,
    key_names: Vec<String>,
    /// Stream relation (by pointer) → positions of the key columns.
    key_positions: Option<(usize, Vec<usize>)>,
    window: Option<u64>,
    touched: HashSet<Vec<u8>>,
    truncated: bool,
    /// (sequence, xid, key) of the table's recent changes.
    recent: VecDeque<(u64, u32, Vec<u8>)>,
    recent_next: u64,
    recent_evicted: bool,
    low_seq: u64,
    published: u64,
    started: Instant,
}

/// The reader's side of on-demand snapshots in one session.
pub struct Incremental {
    settings: Settings,
    metrics: Arc<Metrics>,
    session: String,
    next_job: u64,
    queue: VecDeque<String>,
    active: Option<Active>,
    to_reader_tx: mpsc::UnboundedSender<ToReader>,
    to_reader: mpsc::UnboundedReceiver<ToReader>,
    /// Chunks received, waiting for their high watermark (at most one per job).
    chunks: Vec<Chunk>,
}

impl Drop for Incremental {
    fn drop(&mut self) {
        if let Some(a) = &self.active {
            a.worker.abort();
        }
    }
}

impl Incremental {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Self {
        let (to_reader_tx, to_reader) = mpsc::unbounded_channel();
        Incremental {
            settings,
            metrics,
            session: format!("{:016x}", rand::random::<u64>()),
            next_job: 1,
            queue: VecDeque::new(),
            active: None,
            to_reader_tx,
            to_reader,
            chunks: Vec::new(),
        }
    }

    /// Looks at one stream event. Returns `true` when it was a signal or
    /// watermark, consumed here; `out` then gets the snapshot rows to publish in
    /// its place. Other events of the table being snapshotted are recorded.
    pub async fn on_event(
        &mut self,
        ev: &ChangeEvent,
        describer: &mut dyn TableDescriber,
        out: &mut Vec<ChangeEvent>,
    ) -> bool {
        if ev.op == Op::Message {
            let Some(m) = &ev.message else { return false };
            if m.prefix == SIGNAL_PREFIX {
                self.on_signal(&m.content);
                return true;
            }
            if m.prefix == WATERMARK_PREFIX {
                self.on_watermark(ev, &m.content, describer, out).await;
                return true;
            }
            return false;
        }
        if let Some(a) = self.active.as_mut() {
            a.observe(ev);
        }
        false
    }

    /// Notices a worker that ended without saying so (connection lost).
    pub fn poll(&mut self) {
        let lost = self.active.as_ref().is_some_and(|a| {
            a.worker.is_finished() && !a.end_written.load(std::sync::atomic::Ordering::Acquire)
        });
        if lost {
            self.drain();
            if let Some(a) = self.active.take() {
                tracing::warn!(table = %a.table, "on-demand snapshot worker stopped before the end; send the signal again to redo it");
            }
            self.start_next();
        }
    }

    fn on_signal(&mut self, content: &[u8]) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_slice(content);
        let tables: Vec<String> = match parsed.as_ref().ok().and_then(|v| v.get("snapshot")) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => {
                tracing::warn!(
                    content = %String::from_utf8_lossy(content),
                    "ignoring an {SIGNAL_PREFIX} message: expected {{\"snapshot\": \"schema.table\"}}"
                );
                return;
            }
        };
        for t in tables {
            if catalog::parse_table_name(&t).is_none() {
                tracing::warn!(table = %t, "ignoring snapshot signal: not a schema.table name");
                continue;
            }
            let busy = self.active.as_ref().is_some_and(|a| a.table == t);
            if busy || self.queue.contains(&t) {
                tracing::info!(table = %t, "snapshot of this table already running or queued");
                continue;
            }
            tracing::info!(table = %t, "on-demand snapshot requested");
            self.queue.push_back(t);
        }
        if self.active.is_none() {
            self.start_next();
        }
    }

    fn start_next(&mut self) {
        let Some(table) = self.queue.pop_front() else {
            return;
        };
        let job = self.next_job;
        self.next_job += 1;
        let end_written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = {
            let settings = self.settings.clone();
            let session = self.session.clone();
            let tx = self.to_reader_tx.clone();
            let table = table.clone();
            let end_written = end_written.clone();
            tokio::spawn(async move {
                let result = run_worker(&settings, &session, job, &table, &tx).await;
                let client = match result {
                    Ok(client) => Some(client),
                    Err(e) => {
                        tracing::error!(table = %table, error = %e, "on-demand snapshot failed");
                        let _ = tx.send(ToReader::Failed {
                            job,
                            reason: e.to_string(),
                        });
                        crate::replication::sql::connect(&settings.source)
                            .await
                            .ok()
                    }
                };
                // The end travels through the stream, so the reader ends the job in order.
                if let Some(c) = client
                    && emit_watermark(&c, &session, job, 0, "end").await.is_ok()
                {
                    end_written.store(true, std::sync::atomic::Ordering::Release);
                }
            })
        };
        self.active = Some(Active {
            job,
            table,
            worker,
            end_written,
            spec: None,
            start_reply: None,
            info: None,
            key_names: Vec::new(),
            key_positions: None,
            window: None,
            touched: HashSet::new(),
            truncated: false,
            recent: VecDeque::new(),
            recent_next: 0,
            recent_evicted: false,
            low_seq: 0,
            published: 0,
            started: Instant::now(),
        });
    }

    /// Handles what workers sent (started, failed); chunks wait for their watermark.
    fn drain(&mut self) {
        while let Ok(msg) = self.to_reader.try_recv() {
            match msg {
                ToReader::Chunk(c) => self.chunks.push(c),
                ToReader::Started { job, spec, reply } => {
                    self.on_started(job, spec, reply);
                }
                ToReader::Failed { job, reason } => {
                    if self.active.as_ref().is_some_and(|a| a.job == job) {
                        tracing::warn!(reason = %reason, "on-demand snapshot abandoned");
                    }
                }
            }
        }
    }

    fn on_started(&mut self, job: u64, spec: Box<TableSpec>, reply: oneshot::Sender<bool>) {
        let Some(a) = self.active.as_mut().filter(|a| a.job == job) else {
            let _ = reply.send(false);
            return;
        };
        a.key_names = spec
            .chunk_key
            .iter()
            .map(|i| spec.relation.columns[*i].name.clone())
            .collect();
        a.spec = Some(spec);
        // Answered at the start watermark, once the table is described.
        a.start_reply = Some(reply);
    }

    async fn on_watermark(
        &mut self,
        ev: &ChangeEvent,
        content: &[u8],
        describer: &mut dyn TableDescriber,
        out: &mut Vec<ChangeEvent>,
    ) {
        let Ok(wm) = serde_json::from_slice::<Watermark>(content) else {
            tracing::warn!(content = %String::from_utf8_lossy(content), "ignoring a malformed watermark message");
            return;
        };
        // Watermarks of another session (replayed WAL, another instance) are not ours.
        if wm.session != self.session {
            return;
        }
        self.drain();
        let active_job = self.active.as_ref().map(|a| a.job);
        // Chunks of jobs that are over will never be published.
        self.chunks.retain(|c| Some(c.job) == active_job);
        let Some(a) = self.active.as_mut().filter(|a| a.job == wm.job) else {
            return;
        };
        match wm.w.as_str() {
            "start" => {
                // Changes are tracked from here on (`drain` saw the table's description).
                if let Some(spec) = &a.spec {
                    let info = Arc::new(describer.describe(Arc::new(spec.relation.clone())).await);
                    let included = info.included;
                    if included {
                        tracing::info!(table = %a.table, estimated_rows = spec.estimated_rows, "on-demand snapshot started");
                    }
                    a.info = Some(info);
                    if let Some(reply) = a.start_reply.take() {
                        let _ = reply.send(included);
                    }
                }
            }
            "low" => {
                a.window = Some(wm.chunk);
                a.touched.clear();
                a.truncated = false;
                a.low_seq = a.recent_next;
            }
            "high" => {
                let chunk = self
                    .chunks
                    .iter()
                    .position(|c| c.job == wm.job && c.chunk == wm.chunk)
                    .map(|i| self.chunks.swap_remove(i));
                match chunk {
                    Some(c) => {
                        let outcome = a.close_chunk(c.job, &c, ev, out);
                        if outcome == Outcome::Published {
                            let estimated = a.spec.as_ref().map_or(0, |s| s.estimated_rows.max(0));
                            self.metrics.snapshot_progress(
                                &a.table,
                                a.published,
                                (estimated as u64).max(a.published),
                            );
                        }
                        let _ = c.reply.send(outcome);
                    }
                    None => {
                        tracing::error!(table = %a.table, chunk = wm.chunk, "high watermark without its chunk")
                    }
                }
                a.window = None;
                a.touched.clear();
            }
            "end" => {
                let secs = a.started.elapsed().as_secs_f64();
                tracing::info!(
                    table = %a.table,
                    rows = a.published,
                    seconds = format!("{secs:.1}"),
                    "on-demand snapshot finished"
                );
                self.active = None;
                self.start_next();
            }
            other => tracing::warn!(w = other, "unknown watermark kind"),
        }
    }
}

impl Active {
    /// Records the key of a streamed change of the table being snapshotted.
    fn observe(&mut self, ev: &ChangeEvent) {
        let (Some(spec), Some(t)) = (&self.spec, &ev.table) else {
            return;
        };
        if t.relation.oid != spec.relation.oid {
            return;
        }
        if ev.op == Op::Truncate {
            if self.window.is_some() {
                self.truncated = true;
            }
            // A truncate committed before a low watermark can still be
            // invisible to that chunk's snapshot (committed in the WAL, not
            // yet in the snapshot): the chunk would bring the truncated rows
            // back. Remembered like a change with no key; see `unseen_keys`.
            self.remember(ev.xid, Vec::new());
            return;
        }
        let ptr = Arc::as_ptr(t) as usize;
        if self.key_positions.as_ref().is_none_or(|(p, _)| *p != ptr) {
            let positions: Option<Vec<usize>> = self
                .key_names
                .iter()
                .map(|n| t.relation.column_index(n))
                .collect();
            self.key_positions = Some((ptr, positions.unwrap_or_default()));
        }
        let positions = match &self.key_positions {
            Some((_, p)) if !p.is_empty() => p.clone(),
            _ => return,
        };
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(2);
        if let Some(new) = &ev.new
            && let Some(k) = key_of(new, &positions)
        {
            keys.push(k);
        }
        if let Some(old) = &ev.old
            && let Some(k) = key_of(old.tuple(), &positions)
            && !keys.contains(&k)
        {
            keys.push(k);
        }
        for k in keys {
            if self.window.is_some() {
                self.touched.insert(k.clone());
            }
            self.remember(ev.xid, k);
        }
    }

    fn remember(&mut self, xid: u32, key: Vec<u8>) {
        self.recent.push_back((self.recent_next, xid, key));
        self.recent_next += 1;
        if self.recent.len() > RECENT_CHANGES {
            self.recent.pop_front();
            self.recent_evicted = true;
        }
    }

    /// At the high watermark: filters the chunk and turns the rest into events.
    fn close_chunk(
        &mut self,
        _job: u64,
        c: &Chunk,
        high: &ChangeEvent,
        out: &mut Vec<ChangeEvent>,
    ) -> Outcome {
        let (Some(spec), Some(info)) = (&self.spec, &self.info) else {
            return Outcome::Retry;
        };
        if self.truncated {
            // The table was truncated inside the window: the chunk is stale.
            return Outcome::Retry;
        }
        let Some(unseen) = unseen_keys(&self.recent, self.low_seq, &c.snapshot) else {
            // A truncate the chunk's snapshot did not see: read it again.
            return Outcome::Retry;
        };
        if self.recent_evicted
            && self
                .recent
                .front()
                .is_some_and(|(seq, xid, _)| *seq < self.low_seq && !c.snapshot.sees(*xid))
        {
            // Older changes were forgotten and may be unseen too: read again.
            return Outcome::Retry;
        }
        if !info.included {
            return Outcome::Published;
        }
        let mut published = 0u64;
        for (i, row) in c.rows.iter().enumerate() {
            if let Some(k) = key_of(row, &spec.chunk_key)
                && (self.touched.contains(&k) || unseen.contains(k.as_slice()))
            {
                continue;
            }
            out.push(ChangeEvent {
                op: Op::Read,
                table: Some(info.clone()),
                lsn: high.lsn,
                commit_lsn: high.commit_lsn,
                xid: 0,
                commit_ts: high.commit_ts,
                seq: c.first_ordinal + i as u64,
                snapshot: true,
                old: None,
                new: Some(row.clone()),
                truncate_options: 0,
                message: None,
            });
            published += 1;
        }
        self.published += published;
        Outcome::Published
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::ColumnValue;

    #[test]
    fn snapshot_visibility() {
        let s = MvccSnapshot::parse("100:110:102,105").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(101));
        assert!(!s.sees(102));
        assert!(!s.sees(105));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
        let empty = MvccSnapshot::parse("7:7:").unwrap();
        assert!(empty.xip.is_empty());
        assert!(empty.sees(6));
        assert!(!empty.sees(7));
        // Epoch 1: xmax = 2^32 + 10; stream xid 5 is 2^32 + 5, visible.
        let e = MvccSnapshot::parse("4294967300:4294967306:").unwrap();
        assert!(e.sees(5));
        assert!(!e.sees(10));
        // An xid from the previous epoch (close to 2^32) is old, so visible.
        assert!(e.sees(u32::MAX - 3));
    }

    /// A truncate committed before the low watermark but invisible to the
    /// chunk's snapshot makes the chunk stale; a visible one does not, nor
    /// does one after the low watermark (the window's own check covers it).
    #[test]
    fn an_unseen_truncate_before_the_low_watermark_makes_the_chunk_stale() {
        let snapshot = MvccSnapshot::parse("100:110:105").unwrap();
        let recent: VecDeque<(u64, u32, Vec<u8>)> = VecDeque::from(vec![
            (0, 99, b"k1".to_vec()),
            (1, 105, b"k2".to_vec()),
            (2, 105, Vec::new()), // TRUNCATE by xid 105, not in the snapshot
            (3, 120, Vec::new()),
        ]);
        assert!(unseen_keys(&recent, 3, &snapshot).is_none());
        let unseen = unseen_keys(&recent, 2, &snapshot).unwrap();
        assert_eq!(unseen, HashSet::from([&b"k2"[..]]));
        let visible = MvccSnapshot::parse("200:210:").unwrap();
        assert!(unseen_keys(&recent, 3, &visible).unwrap().is_empty());
    }

    #[test]
    fn keys_are_unambiguous() {
        let t = |vals: &[&'static [u8]]| TupleData {
            columns: vals
                .iter()
                .map(|v| ColumnValue::Text(bytes::Bytes::from_static(v)))
                .collect(),
        };
        assert_ne!(
            key_of(&t(&[b"ab", b"c"]), &[0, 1]),
            key_of(&t(&[b"a", b"bc"]), &[0, 1])
        );
        let with_null = TupleData {
            columns: vec![ColumnValue::Null],
        };
        assert_eq!(key_of(&with_null, &[0]), None);
    }
}
