//! An order read model rebuilt by replaying a RabbitMQ stream that odoo-cdc
//! writes (`--stream-url`, optionally `--stream-partitions N`), then kept
//! current by following the stream live.
//!
//! ```text
//! cargo run --example stream_replay -- \
//!     --stream-url 'rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f' \
//!     --stream odoo.cdc --partitions 4 --state orders.json --listen 127.0.0.1:8081
//! curl http://127.0.0.1:8081/orders/42     # the order and its lines
//! curl http://127.0.0.1:8081/stats         # applied / skipped, offsets
//! ```
//!
//! Unlike `examples/order_consumer.rs`, which reads its own queue and sees
//! only what is published after the queue exists, this service needs nothing
//! on the broker but the stream: a new instance, or one whose state file was
//! deleted, builds the same model from the stream's history alone, starting
//! at the first offset.
//!
//! How:
//! - **One reader per partition** (`<stream>-0` ... `<stream>-<N-1>`, or the
//!   stream itself without partitions), each a
//!   `odoo_cdc::sink::stream::consumer::Subscription` from its stored offset
//!   on: history first, then new messages as the broker stores them. A reader
//!   whose connection fails reconnects from where it was.
//! - **Order by WAL position, per row.** odoo-cdc puts every event of one row
//!   in one partition, in WAL order, but gives no order between partitions
//!   (a transaction's rows can be in several). The model therefore keeps, per
//!   row, the position (`<commit LSN>-<seq>`, from `message_id`) of the last
//!   event applied, and skips an event at or before it; deleted rows stay as
//!   tombstones, and a truncate (sent to every partition) records its position
//!   per table. Whatever the interleaving of the partitions, every row ends at
//!   its last change, so the model converges on the database's state.
//! - **The offsets and the model are saved together**: one JSON file,
//!   written to a temporary file and renamed over the old one, at most once a
//!   second. A restart loads it and resumes each partition at its saved
//!   offset; events after it that had been applied already are skipped by
//!   their positions. (A large model would live in a database, with the
//!   offsets updated in the same transaction as the rows.)
//!
//! It expects odoo-cdc's JSON events at row granularity (the only one
//! partitions allow). Updates that list `unchanged_toast` columns keep the
//! previous value of those columns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use odoo_cdc::sink::stream::StreamConfig;
use odoo_cdc::sink::stream::StreamMessage;
use odoo_cdc::sink::stream::consumer::Subscription;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The tables this read model keeps.
pub const TABLES: [&str; 2] = ["sale_order", "sale_order_line"];

#[derive(Parser, Debug, Clone)]
#[command(about = "Order read model replayed from odoo-cdc's RabbitMQ stream, then kept live")]
pub struct Args {
    /// The broker's stream port
    #[arg(
        long,
        env = "STREAM_REPLAY_URL",
        default_value = "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f"
    )]
    pub stream_url: String,
    /// The stream odoo-cdc writes (its --stream)
    #[arg(long, default_value = "odoo.cdc")]
    pub stream: String,
    /// odoo-cdc's --stream-partitions (0: one plain stream)
    #[arg(long, default_value_t = 0)]
    pub partitions: u16,
    /// Schema of Odoo's tables
    #[arg(long, default_value = "public")]
    pub schema: String,
    /// The state file: the model and each partition's next offset
    #[arg(long, default_value = "stream_replay.json")]
    pub state: PathBuf,
    /// Address of the read API (none without it)
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// Where an event sits in the WAL: its transaction's commit LSN and its
/// ordinal in the transaction (the row ordinal for snapshot rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit_lsn: u64,
    pub seq: u64,
}

impl Position {
    /// From odoo-cdc's `message_id` (`<commit LSN, 16 hex>-<seq>`), or, for
    /// snapshot rows (`<LSN>-r<table>-<row>`), from the body's `source`.
    fn of(message_id: Option<&str>, source: &Value) -> Option<Position> {
        if let Some((lsn, seq)) = message_id.and_then(|id| id.split_once('-'))
            && lsn.len() == 16
            && let (Ok(commit_lsn), Ok(seq)) = (u64::from_str_radix(lsn, 16), seq.parse())
        {
            return Some(Position { commit_lsn, seq });
        }
        let (hi, lo) = source.get("commit_lsn")?.as_str()?.split_once('/')?;
        Some(Position {
            commit_lsn: (u64::from_str_radix(hi, 16).ok()? << 32)
                | u64::from_str_radix(lo, 16).ok()?,
            seq: source.get("seq")?.as_u64()?,
        })
    }

    fn to_json(self) -> Value {
        json!([self.commit_lsn, self.seq])
    }

    fn from_json(v: &Value) -> Option<Position> {
        Some(Position {
            commit_lsn: v.get(0)?.as_u64()?,
            seq: v.get(1)?.as_u64()?,
        })
    }
}

/// One row, or the tombstone of a deleted one.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub position: Position,
    pub deleted: bool,
    pub data: Map<String, Value>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Model {
    tables: BTreeMap<String, BTreeMap<i64, Row>>,
    truncated: BTreeMap<String, Position>,
    /// Events that changed the model.
    pub applied: u64,
    /// Events at or before what their row already had (replays, the copies
    /// of a truncate in the other partitions), or of other tables.
    pub skipped: u64,
}

fn row_id(v: Option<&Value>) -> Option<i64> {
    v?.get("id")?.as_i64()
}

impl Model {
    /// The live rows of a table, by id.
    pub fn rows(&self, table: &str) -> BTreeMap<i64, &Map<String, Value>> {
        self.tables
            .get(table)
            .map(|t| {
                t.iter()
                    .filter(|(_, r)| !r.deleted)
                    .map(|(id, r)| (*id, &r.data))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies one stream message (an odoo-cdc JSON event).
    pub fn apply(&mut self, schema: &str, msg: &StreamMessage) -> Result<(), String> {
        let applied = self.apply_inner(schema, msg)?;
        if applied {
            self.applied += 1;
        } else {
            self.skipped += 1;
        }
        Ok(())
    }

    fn apply_inner(&mut self, schema: &str, msg: &StreamMessage) -> Result<bool, String> {
        let what = || msg.message_id.clone().unwrap_or_default();
        let event: Value = serde_json::from_slice(&msg.body)
            .map_err(|e| format!("message {} is not a JSON event: {e}", what()))?;
        let source = event.get("source").unwrap_or(&Value::Null);
        let (Some(table), Some(op)) = (
            source.get("table").and_then(Value::as_str),
            event.get("op").and_then(Value::as_str),
        ) else {
            return Ok(false); // logical messages, transaction messages
        };
        if !TABLES.contains(&table) || source.get("schema").and_then(Value::as_str) != Some(schema)
        {
            return Ok(false);
        }
        let pos = Position::of(msg.message_id.as_deref(), source)
            .ok_or_else(|| format!("message {} has no WAL position", what()))?;
        if self.truncated.get(table).is_some_and(|t| pos <= *t) {
            return Ok(false);
        }
        let rows = self.tables.entry(table.to_owned()).or_default();
        if op == "t" {
            rows.retain(|_, r| r.position > pos);
            self.truncated.insert(table.to_owned(), pos);
            return Ok(true);
        }
        if !matches!(op, "c" | "u" | "d" | "r") {
            return Ok(false);
        }
        let id = row_id(event.get("key"))
            .ok_or_else(|| format!("message {}: no integer key.id", what()))?;
        // An update that changed the key ends the old row here.
        if let Some(old) = row_id(event.get("before")).filter(|old| *old != id)
            && rows.get(&old).is_none_or(|r| r.position < pos)
        {
            let gone = Row {
                position: pos,
                deleted: true,
                data: Map::new(),
            };
            rows.insert(old, gone);
        }
        let previous = rows.get(&id);
        if previous.is_some_and(|r| pos <= r.position) {
            return Ok(false);
        }
        let row = if op == "d" {
            Row {
                position: pos,
                deleted: true,
                data: Map::new(),
            }
        } else {
            let mut data = event
                .get("after")
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| format!("message {}: no `after`", what()))?;
            if let (Some(cols), Some(prev)) = (
                event.get("unchanged_toast").and_then(Value::as_array),
                previous.filter(|p| !p.deleted),
            ) {
                for col in cols.iter().filter_map(Value::as_str) {
                    if let Some(v) = prev.data.get(col) {
                        data.insert(col.to_owned(), v.clone());
                    }
                }
            }
            Row {
                position: pos,
                deleted: false,
                data,
            }
        };
        rows.insert(id, row);
        Ok(true)
    }

    /// `GET /orders/<id>`: the order and its lines (by sequence, id).
    pub fn order_view(&self, id: i64) -> Option<Value> {
        let order = self.rows("sale_order").get(&id).copied()?.clone();
        let mut lines: Vec<&Map<String, Value>> = self
            .rows("sale_order_line")
            .into_values()
            .filter(|l| l.get("order_id").and_then(Value::as_i64) == Some(id))
            .collect();
        lines.sort_by_key(|l| {
            (
                l.get("sequence").and_then(Value::as_i64).unwrap_or(0),
                l.get("id").and_then(Value::as_i64).unwrap_or(0),
            )
        });
        Some(json!({ "order": order, "lines": lines }))
    }

    fn to_json(&self) -> Value {
        let tables: Map<String, Value> = self
            .tables
            .iter()
            .map(|(t, rows)| {
                let rows: Vec<Value> = rows
                    .iter()
                    .map(|(id, r)| json!([id, r.position.to_json(), r.deleted, r.data]))
                    .collect();
                (t.clone(), Value::Array(rows))
            })
            .collect();
        let truncated: Map<String, Value> = self
            .truncated
            .iter()
            .map(|(t, p)| (t.clone(), p.to_json()))
            .collect();
        json!({
            "tables": tables,
            "truncated": truncated,
            "applied": self.applied,
            "skipped": self.skipped,
        })
    }

    fn from_json(v: &Value) -> Option<Model> {
        let mut m = Model {
            applied: v.get("applied")?.as_u64()?,
            skipped: v.get("skipped")?.as_u64()?,
            ..Model::default()
        };
        for (t, rows) in v.get("tables")?.as_object()? {
            let table = m.tables.entry(t.clone()).or_default();
            for r in rows.as_array()? {
                let row = Row {
                    position: Position::from_json(r.get(1)?)?,
                    deleted: r.get(2)?.as_bool()?,
                    data: r.get(3)?.as_object()?.clone(),
                };
                table.insert(r.get(0)?.as_i64()?, row);
            }
        }
        for (t, p) in v.get("truncated")?.as_object()? {
            m.truncated.insert(t.clone(), Position::from_json(p)?);
        }
        Some(m)
    }
}

// ---------------------------------------------------------------------------
// The state file
// ---------------------------------------------------------------------------

/// The model and, per stream read, the next offset to read.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub streams: Vec<String>,
    pub offsets: Vec<u64>,
    pub model: Model,
}

impl State {
    fn new(streams: Vec<String>) -> State {
        State {
            offsets: vec![0; streams.len()],
            streams,
            model: Model::default(),
        }
    }

    /// The saved state, or a new one (from offset 0) if there is no file.
    pub fn load(path: &Path, streams: Vec<String>) -> Result<State> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::new(streams)),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let saved: Vec<String> = v
            .get("streams")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if saved != streams {
            bail!(
                "{} was built from streams {saved:?}, not {streams:?}: delete it to rebuild the model",
                path.display()
            );
        }
        let offsets: Vec<u64> = v
            .get("offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let model = v.get("model").and_then(Model::from_json);
        match model {
            Some(model) if offsets.len() == streams.len() => Ok(State {
                streams,
                offsets,
                model,
            }),
            _ => bail!("{} is not a state file of this service", path.display()),
        }
    }

    /// Writes the state to a temporary file next to `path`, syncs it and
    /// renames it over `path`: a crash leaves the old state or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(&json!({
            "streams": self.streams,
            "offsets": self.offsets,
            "model": self.model.to_json(),
        }))?;
        let tmp = path.with_extension("tmp");
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, &text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading and applying
// ---------------------------------------------------------------------------

/// The running service.
pub struct Running {
    pub state: Arc<RwLock<State>>,
    pub http_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    applier: JoinHandle<Result<()>>,
}

impl Running {
    /// Stops reading, applies what was read and saves the state.
    pub async fn stop(self) -> Result<()> {
        for t in &self.tasks {
            t.abort();
        }
        // The readers' senders are gone with them: the applier saves and ends.
        self.applier.await?
    }

    /// Stops at once, without saving (like a crash: the last save stands).
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.applier.abort();
    }

    /// Whether the applier stopped on an error (a message it cannot apply).
    pub fn failed(&self) -> bool {
        self.applier.is_finished()
    }
}

/// The streams a reader of `args` reads, in partition order.
pub fn streams(args: &Args) -> Result<(StreamConfig, Vec<String>)> {
    let cfg = StreamConfig::new(&args.stream_url, &args.stream, "stream-replay")
        .and_then(|c| c.with_partitions(args.partitions))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let streams = cfg.streams();
    Ok((cfg, streams))
}

/// Loads the state, starts one reader per stream from its saved offset, the
/// applier, and the read API.
pub async fn start(args: Args) -> Result<Running> {
    let (cfg, names) = streams(&args)?;
    let state = State::load(&args.state, names.clone())?;
    eprintln!(
        "stream_replay: {} streams from offsets {:?} ({} rows applied so far)",
        names.len(),
        state.offsets,
        state.model.applied
    );
    let offsets = state.offsets.clone();
    let state = Arc::new(RwLock::new(state));
    let (tx, rx) = mpsc::channel::<(usize, Vec<StreamMessage>)>(64);
    let mut tasks = Vec::new();
    for (i, offset) in offsets.into_iter().enumerate() {
        let mut cfg = if cfg.partitions == 0 {
            cfg.clone()
        } else {
            cfg.partition(i)
        };
        cfg.connection_name = format!("stream_replay {}", cfg.stream);
        tasks.push(tokio::spawn(read_partition(cfg, i, offset, tx.clone())));
    }
    drop(tx);
    let applier = tokio::spawn(apply_loop(
        rx,
        Arc::clone(&state),
        args.schema.clone(),
        args.state.clone(),
    ));
    let http_addr = match args.listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            let addr = listener.local_addr()?;
            tasks.push(tokio::spawn(serve(listener, Arc::clone(&state))));
            Some(addr)
        }
    };
    Ok(Running {
        state,
        http_addr,
        tasks,
        applier,
    })
}

/// Reads stream `i` from `offset` on, forever, reconnecting after a failure
/// from the offset after the last message handed on.
async fn read_partition(
    cfg: StreamConfig,
    i: usize,
    mut offset: u64,
    tx: mpsc::Sender<(usize, Vec<StreamMessage>)>,
) {
    let mut warned_gap = false;
    loop {
        let mut sub = match Subscription::open(&cfg, offset).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("stream_replay: {}: {e}; retrying", cfg.stream);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match sub.next_batch(Duration::from_secs(5)).await {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    if batch[0].offset > offset && !warned_gap {
                        // Retention removed offsets we never read: rows changed
                        // only there are missing or stale in the model.
                        eprintln!(
                            "stream_replay: {}: offsets {offset}..{} are gone from the stream",
                            cfg.stream, batch[0].offset
                        );
                        warned_gap = true;
                    }
                    offset = sub.next_offset();
                    if tx.send((i, batch)).await.is_err() {
                        return; // the applier stopped
                    }
                }
                Err(e) => {
                    eprintln!("stream_replay: {}: {e}; reconnecting", cfg.stream);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies what the readers deliver and saves the state at most once a
/// second (and when the readers stop).
async fn apply_loop(
    mut rx: mpsc::Receiver<(usize, Vec<StreamMessage>)>,
    state: Arc<RwLock<State>>,
    schema: String,
    path: PathBuf,
) -> Result<()> {
    let mut dirty = false;
    let mut saved = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let got = tokio::select! {
            got = rx.recv() => got,
            _ = tick.tick() => {
                if dirty && saved.elapsed() >= Duration::from_secs(1) {
                    let snapshot = state.read().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
                    let to = path.clone();
                    tokio::task::spawn_blocking(move || snapshot.save(&to)).await??;
                    dirty = false;
                    saved = Instant::now();
                }
                continue;
            }
        };
        let Some((i, batch)) = got else {
            let snapshot = state
                .read()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone();
            return snapshot.save(&path);
        };
        let mut s = state.write().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for msg in &batch {
            if let Err(e) = s.model.apply(&schema, msg) {
                eprintln!("stream_replay: stopped: {e}");
                bail!(e);
            }
        }
        if let Some(last) = batch.last() {
            s.offsets[i] = last.offset + 1;
        }
        dirty = true;
    }
}

// ---------------------------------------------------------------------------
// The read API (GET only, one request per connection)
// ---------------------------------------------------------------------------

async fn serve(listener: tokio::net::TcpListener, state: Arc<RwLock<State>>) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = respond(path, &state);
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

fn respond(path: &str, state: &RwLock<State>) -> (&'static str, String) {
    let Ok(s) = state.read() else {
        return ("500 Internal Server Error", "{}".into());
    };
    if path == "/stats" {
        let body = json!({
            "applied": s.model.applied,
            "skipped": s.model.skipped,
            "orders": s.model.rows("sale_order").len(),
            "lines": s.model.rows("sale_order_line").len(),
            "streams": s.streams,
            "offsets": s.offsets,
        });
        return ("200 OK", body.to_string());
    }
    match path
        .strip_prefix("/orders/")
        .and_then(|id| id.parse::<i64>().ok())
        .and_then(|id| s.model.order_view(id))
    {
        Some(v) => ("200 OK", v.to_string()),
        None => ("404 Not Found", "{\"error\":\"not found\"}".into()),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let running = start(args).await?;
    if let Some(addr) = running.http_addr {
        eprintln!("stream_replay: read API on http://{addr}");
    }
    tokio::signal::ctrl_c().await?;
    eprintln!("stream_replay: stopping");
    running.stop().await
}
