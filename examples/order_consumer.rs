//! A downstream order-management read model fed only by odoo-cdc events.
//!
//! This is what a service that today queries Odoo's database for sales orders
//! looks like once it consumes change events instead. It never connects to
//! PostgreSQL: it reads RabbitMQ, keeps its own copy of the three tables it
//! needs (`sale_order`, `sale_order_line`, `res_partner`), and answers reads
//! from that copy, so it keeps working while Odoo or its database is slow,
//! down or being upgraded.
//!
//! ```text
//! cargo run --example order_consumer -- \
//!     --amqp amqp://guest:guest@127.0.0.1:5672/%2f --prefix odoo \
//!     --sqlite orders.sqlite --listen 127.0.0.1:8080
//! curl http://127.0.0.1:8080/orders/42      # the order, its lines and its customer
//! curl http://127.0.0.1:8080/stats          # applied / duplicate / stale counters
//! ```
//!
//! How it stays correct under at-least-once delivery:
//! - **Its own durable queue** (quorum by default), bound on the `odoo.cdc`
//!   topic exchange to `<prefix>.<schema>.{sale_order,sale_order_line,res_partner}.*`.
//!   It declares the queue itself, so events published while it is stopped wait
//!   for it in RabbitMQ.
//! - **Deduplication and ordering by `message_id`.** odoo-cdc's id is
//!   `<commit LSN, 16 hex digits>-<seq, 8 digits>`, the event's position in the
//!   WAL, identical on every replay. The model stores, per row, the position of
//!   the last event applied to it. An event at that position is a duplicate (a
//!   redelivery or a replay after a connector crash); one before it is stale
//!   (older than what is already applied). Both are skipped and counted.
//!   Deleted rows stay as tombstones so a replayed insert cannot resurrect them;
//!   a truncate records its position per table for the same reason.
//! - **Ack after apply.** A batch of deliveries is applied to memory and written
//!   to the SQLite file in one transaction, and only then acknowledged (one
//!   `basic.ack` with `multiple`). A crash before the ack means RabbitMQ
//!   redelivers, and the positions make the redelivery harmless.
//! - **A message it cannot apply stops it** (the message stays in the queue)
//!   instead of silently diverging from Odoo; reads keep being served.
//!
//! It expects odoo-cdc's defaults for this: row granularity, JSON, the default
//! routing template. Updates whose unchanged TOASTed columns are listed in
//! `unchanged_toast` keep the previous value of those columns.
//!
//! HTTP (one request per connection, GET only): `/orders/<id>`, `/orders` (id,
//! name, state, amount_total of every order), `/partners/<id>`, `/stats`,
//! `/healthz`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The tables this read model keeps.
pub const TABLES: [&str; 3] = ["sale_order", "sale_order_line", "res_partner"];

/// Every broker round trip is bounded: a broker that stops answering must not
/// hang the consumer.
const NET_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(about = "Order-management read model fed by odoo-cdc events (never touches PostgreSQL)")]
pub struct Args {
    /// RabbitMQ URL
    #[arg(
        long,
        env = "ORDER_CONSUMER_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp: String,
    /// Topic exchange odoo-cdc publishes to
    #[arg(long, default_value = "odoo.cdc")]
    pub exchange: String,
    /// odoo-cdc's routing prefix (its --routing-prefix, by default the database name)
    #[arg(long, default_value = "odoo")]
    pub prefix: String,
    /// Schema of Odoo's tables
    #[arg(long, default_value = "public")]
    pub schema: String,
    /// This service's own durable queue
    #[arg(long, default_value = "order_consumer")]
    pub queue: String,
    /// quorum or classic
    #[arg(long, default_value = "quorum")]
    pub queue_type: String,
    /// Keep the model in this SQLite file too (loaded on start); memory only without it
    #[arg(long)]
    pub sqlite: Option<PathBuf>,
    /// Address of the read API
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Unacknowledged deliveries in flight (also the largest batch applied at once)
    #[arg(long, default_value_t = 500)]
    pub prefetch: u16,
}

impl Args {
    /// The binding keys of the queue: every operation on the three tables.
    pub fn binding_keys(&self) -> Vec<String> {
        TABLES
            .iter()
            .map(|t| format!("{}.{}.{t}.*", self.prefix, self.schema))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------

/// Where an event sits in the WAL: its transaction's commit LSN and its ordinal
/// in the transaction. Ordered like the WAL, so "newer" is simply "greater".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: u64,
    pub seq: u32,
}

impl Position {
    /// Parses odoo-cdc's `message_id`: `<commit LSN as 16 hex digits>-<seq>`.
    pub fn from_message_id(id: &str) -> Option<Position> {
        let (lsn, seq) = id.split_once('-')?;
        if lsn.len() != 16 {
            return None;
        }
        Some(Position {
            commit_lsn: u64::from_str_radix(lsn, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// Falls back to the body's `source.commit_lsn` (`X/Y`) and `source.seq`.
    fn from_source(source: &Value) -> Option<Position> {
        let (hi, lo) = source.get("commit_lsn")?.as_str()?.split_once('/')?;
        let lsn = (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
        Some(Position {
            commit_lsn: lsn,
            seq: u32::try_from(source.get("seq")?.as_u64()?).ok()?,
        })
    }

    pub fn message_id(&self) -> String {
        format!("{:016X}-{:08}", self.commit_lsn, self.seq)
    }
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// One row of a captured table, or the tombstone of a deleted one.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub position: Position,
    pub deleted: bool,
    pub data: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events that changed the model.
    pub applied: u64,
    /// Events whose position equals the one already applied to their row (redelivery, replay).
    pub duplicates: u64,
    /// Events older than what is already applied to their row.
    pub stale: u64,
    /// Events of tables or operations this model does not keep.
    pub ignored: u64,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Stale,
    Ignored,
}

/// A change the store must persist, produced by [`Model::apply`].
#[derive(Debug, Clone)]
pub enum Write {
    Row { table: String, id: i64, row: Row },
    Truncate { table: String, position: Position },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot apply message {message_id} (routing key {routing_key}): {reason}")]
pub struct ApplyError {
    pub message_id: String,
    pub routing_key: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Model {
    tables: HashMap<String, BTreeMap<i64, Row>>,
    truncated: HashMap<String, Position>,
    pub counters: Counters,
    pub last_applied: Option<Position>,
}

impl Model {
    fn rows(&self, table: &str) -> Option<&BTreeMap<i64, Row>> {
        self.tables.get(table)
    }

    /// A live (not deleted) row.
    pub fn get(&self, table: &str, id: i64) -> Option<&Row> {
        self.rows(table)?.get(&id).filter(|r| !r.deleted)
    }

    /// Live rows of a table.
    pub fn count(&self, table: &str) -> usize {
        self.rows(table)
            .map(|t| t.values().filter(|r| !r.deleted).count())
            .unwrap_or(0)
    }

    /// Applies one event (a JSON change event of odoo-cdc) at `pos`. Returns
    /// what happened and appends what must be persisted to `writes`.
    pub fn apply(
        &mut self,
        pos: Position,
        event: &Value,
        writes: &mut Vec<Write>,
    ) -> Result<Outcome, String> {
        let outcome = self.apply_inner(pos, event, writes)?;
        match outcome {
            Outcome::Applied => {
                self.counters.applied += 1;
                self.last_applied = Some(self.last_applied.map_or(pos, |p| p.max(pos)));
            }
            Outcome::Duplicate => self.counters.duplicates += 1,
            Outcome::Stale => self.counters.stale += 1,
            Outcome::Ignored => self.counters.ignored += 1,
        }
        Ok(outcome)
    }

    fn apply_inner(
        &mut self,
        pos: Position,
        event: &Value,
        writes: &mut Vec<Write>,
    ) -> Result<Outcome, String> {
        let source = event.get("source").ok_or("no `source` in the event")?;
        let Some(table) = source.get("table").and_then(Value::as_str) else {
            // Logical messages and heartbeats have no table.
            return Ok(Outcome::Ignored);
        };
        if !TABLES.contains(&table) {
            return Ok(Outcome::Ignored);
        }
        let op = event
            .get("op")
            .and_then(Value::as_str)
            .ok_or("no `op` in the event")?;
        if let Some(t) = self.truncated.get(table)
            && pos <= *t
        {
            return Ok(if pos == *t {
                Outcome::Duplicate
            } else {
                Outcome::Stale
            });
        }
        if op == "t" {
            let rows = self.tables.entry(table.to_string()).or_default();
            rows.retain(|_, r| r.position > pos);
            self.truncated.insert(table.to_string(), pos);
            writes.push(Write::Truncate {
                table: table.to_string(),
                position: pos,
            });
            return Ok(Outcome::Applied);
        }
        if !matches!(op, "c" | "u" | "d" | "r") {
            return Ok(Outcome::Ignored);
        }
        let id = row_id(event.get("key")).ok_or_else(|| {
            format!("table {table}: the event has no integer `key.id` (Odoo tables have one)")
        })?;
        let rows = self.tables.entry(table.to_string()).or_default();
        let previous = rows.get(&id);
        if let Some(prev) = previous
            && pos <= prev.position
        {
            return Ok(if pos == prev.position {
                Outcome::Duplicate
            } else {
                Outcome::Stale
            });
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
                .ok_or_else(|| format!("table {table}, id {id}: `after` is missing"))?;
            // A TOASTed value the update did not touch is not in the WAL: keep ours.
            if let Some(cols) = event.get("unchanged_toast").and_then(Value::as_array)
                && let Some(prev) = previous.filter(|p| !p.deleted)
            {
                for col in cols.iter().filter_map(Value::as_str) {
                    if let Some(v) = prev.data.get(col) {
                        data.insert(col.to_string(), v.clone());
                    }
                }
            }
            Row {
                position: pos,
                deleted: false,
                data,
            }
        };
        rows.insert(id, row.clone());
        writes.push(Write::Row {
            table: table.to_string(),
            id,
            row,
        });
        Ok(Outcome::Applied)
    }

    /// `GET /orders/<id>`: the order with its lines (by sequence, id) and its customer.
    pub fn order_view(&self, id: i64) -> Option<Value> {
        let order = self.get("sale_order", id)?;
        let mut lines: Vec<&Map<String, Value>> = self
            .rows("sale_order_line")
            .map(|t| {
                t.values()
                    .filter(|r| {
                        !r.deleted && r.data.get("order_id").and_then(Value::as_i64) == Some(id)
                    })
                    .map(|r| &r.data)
                    .collect()
            })
            .unwrap_or_default();
        lines.sort_by_key(|l| {
            (
                l.get("sequence").and_then(Value::as_i64).unwrap_or(0),
                l.get("id").and_then(Value::as_i64).unwrap_or(0),
            )
        });
        let partner = order
            .data
            .get("partner_id")
            .and_then(Value::as_i64)
            .and_then(|p| self.get("res_partner", p))
            .map(|p| Value::Object(p.data.clone()))
            .unwrap_or(Value::Null);
        Some(json!({
            "order": order.data,
            "lines": lines,
            "partner": partner,
            "message_id": order.position.message_id(),
        }))
    }

    /// `GET /orders`: a summary line per live order, by id.
    pub fn orders_summary(&self) -> Value {
        let orders: Vec<Value> = self
            .rows("sale_order")
            .map(|t| {
                t.iter()
                    .filter(|(_, r)| !r.deleted)
                    .map(|(id, r)| {
                        json!({
                            "id": id,
                            "name": r.data.get("name"),
                            "state": r.data.get("state"),
                            "amount_total": r.data.get("amount_total"),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Value::Array(orders)
    }

    pub fn stats(&self) -> Value {
        json!({
            "applied": self.counters.applied,
            "duplicates": self.counters.duplicates,
            "stale": self.counters.stale,
            "ignored": self.counters.ignored,
            "orders": self.count("sale_order"),
            "lines": self.count("sale_order_line"),
            "partners": self.count("res_partner"),
            "last_applied": self.last_applied.map(|p| p.message_id()),
        })
    }

    fn load_row(&mut self, table: String, id: i64, row: Row) {
        self.last_applied = Some(
            self.last_applied
                .map_or(row.position, |p| p.max(row.position)),
        );
        self.tables.entry(table).or_default().insert(id, row);
    }
}

fn row_id(key: Option<&Value>) -> Option<i64> {
    key?.get("id")?.as_i64()
}

// ---------------------------------------------------------------------------
// The SQLite file
// ---------------------------------------------------------------------------

/// The model on disk: rows as JSON with their position, and truncate positions.
pub struct Store {
    conn: rusqlite::Connection,
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Store> {
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("opening SQLite file {}", path.display()))?;
        // WAL + NORMAL: a commit is durable against a process crash, and fast.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS rows (
                 tbl TEXT NOT NULL, id INTEGER NOT NULL,
                 commit_lsn INTEGER NOT NULL, seq INTEGER NOT NULL,
                 deleted INTEGER NOT NULL, data TEXT NOT NULL,
                 PRIMARY KEY (tbl, id));
             CREATE TABLE IF NOT EXISTS truncates (
                 tbl TEXT PRIMARY KEY, commit_lsn INTEGER NOT NULL, seq INTEGER NOT NULL);",
        )
        .with_context(|| format!("preparing SQLite file {}", path.display()))?;
        Ok(Store { conn })
    }

    /// Reads the whole model back (start-up).
    pub fn load(&self, model: &mut Model) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare("SELECT tbl, id, commit_lsn, seq, deleted, data FROM rows")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        for r in rows {
            let (table, id, lsn, seq, deleted, data) = r?;
            let data: Map<String, Value> = serde_json::from_str(&data)
                .with_context(|| format!("row {table}/{id} in the SQLite file is not JSON"))?;
            let position = Position {
                commit_lsn: lsn as u64,
                seq,
            };
            model.load_row(
                table,
                id,
                Row {
                    position,
                    deleted,
                    data,
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare("SELECT tbl, commit_lsn, seq FROM truncates")?;
        let truncates = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
            ))
        })?;
        for t in truncates {
            let (table, lsn, seq) = t?;
            model.truncated.insert(
                table,
                Position {
                    commit_lsn: lsn as u64,
                    seq,
                },
            );
        }
        Ok(())
    }

    /// Persists a batch in one transaction.
    pub fn write(&mut self, writes: &[Write]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for w in writes {
            match w {
                // LSNs are below 2^63 in practice; the cast round-trips exactly either way.
                Write::Row { table, id, row } => {
                    tx.execute(
                        "INSERT INTO rows (tbl, id, commit_lsn, seq, deleted, data)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (tbl, id) DO UPDATE SET commit_lsn = excluded.commit_lsn,
                             seq = excluded.seq, deleted = excluded.deleted, data = excluded.data",
                        rusqlite::params![
                            table,
                            id,
                            row.position.commit_lsn as i64,
                            row.position.seq,
                            row.deleted,
                            serde_json::to_string(&row.data)?,
                        ],
                    )?;
                }
                Write::Truncate { table, position } => {
                    tx.execute(
                        "DELETE FROM rows WHERE tbl = ?1 AND (commit_lsn, seq) <= (?2, ?3)",
                        rusqlite::params![table, position.commit_lsn as i64, position.seq],
                    )?;
                    tx.execute(
                        "INSERT INTO truncates (tbl, commit_lsn, seq) VALUES (?1, ?2, ?3)
                         ON CONFLICT (tbl) DO UPDATE SET commit_lsn = excluded.commit_lsn, seq = excluded.seq",
                        rusqlite::params![table, position.commit_lsn as i64, position.seq],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Consuming
// ---------------------------------------------------------------------------

/// The running service: its read API address and its model.
pub struct Running {
    pub http_addr: SocketAddr,
    pub model: Arc<RwLock<Model>>,
    /// Whether a broker connection is consuming right now.
    pub connected: Arc<AtomicBool>,
    consumer: tokio::task::JoinHandle<Result<()>>,
    http: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits for the consumer to end (shutdown, or an event it cannot apply).
    pub async fn wait(self) -> Result<()> {
        let r = self
            .consumer
            .await
            .map_err(|e| anyhow!("consumer task: {e}"));
        self.http.abort();
        r?
    }
}

/// Loads the SQLite file, declares the queue and its bindings (so events are
/// kept for us from here on), starts the read API and the consumer. Returns once
/// the queue is bound; runs until `shutdown` turns true.
pub async fn start(args: Args, shutdown: watch::Receiver<bool>) -> Result<Running> {
    if !matches!(args.queue_type.as_str(), "quorum" | "classic") {
        bail!(
            "--queue-type must be quorum or classic, got {:?}",
            args.queue_type
        );
    }
    let mut model = Model::default();
    let store = match &args.sqlite {
        Some(path) => {
            let store = Store::open(path)?;
            store.load(&mut model)?;
            eprintln!(
                "order_consumer: loaded {} orders, {} lines, {} partners from {}",
                model.count("sale_order"),
                model.count("sale_order_line"),
                model.count("res_partner"),
                path.display()
            );
            Some(store)
        }
        None => None,
    };
    let model = Arc::new(RwLock::new(model));
    let connected = Arc::new(AtomicBool::new(false));

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the read API to {}", args.listen))?;
    let http_addr = listener.local_addr()?;
    let http = tokio::spawn(serve_http(listener, model.clone(), connected.clone()));

    // Declare the topology once before returning: from then on RabbitMQ keeps
    // our events even while we are disconnected.
    let session = Session::open(&args).await?;
    eprintln!(
        "order_consumer: queue {} bound to {} on exchange {}; read API on http://{http_addr}",
        args.queue,
        args.binding_keys().join(", "),
        args.exchange
    );
    let consumer = tokio::spawn(consume_forever(
        args,
        session,
        store,
        model.clone(),
        connected.clone(),
        shutdown,
    ));
    Ok(Running {
        http_addr,
        model,
        connected,
        consumer,
        http,
    })
}

/// One broker connection with the queue declared and a consumer on it.
struct Session {
    conn: Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(NET_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!("{what}: no answer within {NET_TIMEOUT:?}")),
    }
}

impl Session {
    async fn open(args: &Args) -> Result<Session> {
        let conn = timed(
            "connecting to RabbitMQ",
            Connection::connect(&args.amqp, ConnectionProperties::default()),
        )
        .await?;
        let channel = timed("opening a channel", conn.create_channel()).await?;
        // Same declaration as odoo-cdc's, so whichever starts first creates it.
        timed(
            "declaring the exchange",
            channel.exchange_declare(
                args.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        let mut arguments = FieldTable::default();
        if args.queue_type == "quorum" {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        timed(
            "declaring the queue",
            channel.queue_declare(
                args.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            ),
        )
        .await?;
        for key in args.binding_keys() {
            timed(
                "binding the queue",
                channel.queue_bind(
                    args.queue.as_str().into(),
                    args.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        timed(
            "setting the prefetch",
            channel.basic_qos(args.prefetch.max(1), BasicQosOptions::default()),
        )
        .await?;
        let consumer = timed(
            "starting the consumer",
            channel.basic_consume(
                args.queue.as_str().into(),
                "order_consumer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Session {
            conn,
            channel,
            consumer,
        })
    }
}

/// Consumes until shutdown; reconnects with backoff when the broker goes away.
/// Returns an error only for an event it cannot apply or a failed SQLite write.
async fn consume_forever(
    args: Args,
    first: Session,
    mut store: Option<Store>,
    model: Arc<RwLock<Model>>,
    connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut session = Some(first);
    let mut delay = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let s = match session.take() {
            Some(s) => s,
            None => match Session::open(&args).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("order_consumer: {e:#}; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        delay = Duration::from_millis(200);
        connected.store(true, Ordering::Relaxed);
        let r = consume_session(&args, s, &mut store, &model, &mut shutdown).await;
        connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => return Ok(()),
            Err(SessionEnd::Broker(e)) => {
                eprintln!("order_consumer: broker connection lost ({e}); reconnecting");
            }
            Err(SessionEnd::Fatal(e)) => return Err(e),
        }
    }
}

enum SessionEnd {
    /// Reconnect: nothing unacknowledged is lost, RabbitMQ redelivers it.
    Broker(String),
    /// Stop: retrying cannot help.
    Fatal(anyhow::Error),
}

async fn consume_session(
    args: &Args,
    mut s: Session,
    store: &mut Option<Store>,
    model: &RwLock<Model>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionEnd> {
    let max_batch = usize::from(args.prefetch.max(1));
    loop {
        let first = tokio::select! {
            d = s.consumer.next() => Some(d),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let mut batch = Vec::new();
        match first {
            None => {
                // Unacknowledged deliveries go back to the queue with the connection.
                let _ =
                    tokio::time::timeout(NET_TIMEOUT, s.conn.close(200, "shutdown".into())).await;
                return Ok(());
            }
            Some(Some(Ok(d))) => batch.push(d),
            Some(Some(Err(e))) => return Err(SessionEnd::Broker(e.to_string())),
            Some(None) => return Err(SessionEnd::Broker("the consumer was cancelled".into())),
        }
        // Take whatever else is already here, to apply and persist it together.
        while batch.len() < max_batch {
            match s.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => return Err(SessionEnd::Broker(e.to_string())),
                Some(None) | None => break,
            }
        }
        let mut writes = Vec::new();
        {
            let mut m = model.write().unwrap_or_else(|p| p.into_inner());
            for d in &batch {
                apply_delivery(&mut m, d, &mut writes).map_err(|e| SessionEnd::Fatal(e.into()))?;
            }
        }
        if let Some(store) = store.as_mut()
            && !writes.is_empty()
        {
            store
                .write(&writes)
                .map_err(|e| SessionEnd::Fatal(e.context("writing the SQLite file")))?;
        }
        // Only now is the batch ours for good: acknowledge it in one go.
        let last = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
        timed(
            "acknowledging",
            s.channel
                .basic_ack(last, BasicAckOptions { multiple: true }),
        )
        .await
        .map_err(|e| SessionEnd::Broker(e.to_string()))?;
    }
}

fn apply_delivery(
    model: &mut Model,
    d: &lapin::message::Delivery,
    writes: &mut Vec<Write>,
) -> Result<Outcome, ApplyError> {
    let routing_key = d.routing_key.to_string();
    let message_id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let fail = |reason: String| ApplyError {
        message_id: message_id.clone(),
        routing_key: routing_key.clone(),
        reason,
    };
    let content_type = d
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    if content_type != "application/json" {
        return Err(fail(format!(
            "content type {content_type:?}: this consumer reads odoo-cdc's JSON (--format json)"
        )));
    }
    let event: Value =
        serde_json::from_slice(&d.data).map_err(|e| fail(format!("body is not JSON: {e}")))?;
    if event.get("events").is_some() {
        return Err(fail(
            "a transaction-granularity message: run odoo-cdc with --granularity row".into(),
        ));
    }
    let pos = Position::from_message_id(&message_id)
        .or_else(|| event.get("source").and_then(Position::from_source))
        .ok_or_else(|| fail("no odoo-cdc message_id and no source position".into()))?;
    model.apply(pos, &event, writes).map_err(fail)
}

// ---------------------------------------------------------------------------
// The read API
// ---------------------------------------------------------------------------

async fn serve_http(listener: TcpListener, model: Arc<RwLock<Model>>, connected: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let model = model.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                handle_http(stream, &model, &connected),
            )
            .await;
        });
    }
}

async fn handle_http(
    mut stream: TcpStream,
    model: &RwLock<Model>,
    connected: &AtomicBool,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        (405, json!({"error": "only GET"}))
    } else {
        route(path, model, connected)
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

fn route(path: &str, model: &RwLock<Model>, connected: &AtomicBool) -> (u16, Value) {
    let m = model.read().unwrap_or_else(|p| p.into_inner());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = |what: String| (404, json!({ "error": what }));
    match segments.as_slice() {
        ["healthz"] => (200, json!({"ok": true})),
        ["stats"] => {
            let mut s = m.stats();
            s["broker_connected"] = json!(connected.load(Ordering::Relaxed));
            (200, s)
        }
        ["orders"] => (200, m.orders_summary()),
        ["orders", id] => match id.parse::<i64>().ok().and_then(|id| m.order_view(id)) {
            Some(v) => (200, v),
            None => not_found(format!("no order {id}")),
        },
        ["partners", id] => match id
            .parse::<i64>()
            .ok()
            .and_then(|id| m.get("res_partner", id))
        {
            Some(r) => (200, Value::Object(r.data.clone())),
            None => not_found(format!("no partner {id}")),
        },
        _ => not_found(format!("no route {path}")),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = start(args, stop_rx).await?;
    tokio::spawn(async move {
        // SIGINT or SIGTERM (what `docker stop` sends).
        odoo_cdc::app::shutdown_signal().await;
        eprintln!("order_consumer: stopping");
        let _ = stop_tx.send(true);
    });
    running.wait().await
}
