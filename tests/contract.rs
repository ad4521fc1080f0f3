//! A seeded checker that tries to break the delivery contract (docs/events.md,
//! "What exactly is promised"): several concurrent SQL sessions write random mixes
//! (multi-row inserts, primary-key updates, deletes, savepoints rolled back,
//! whole transactions rolled back, transactions big enough for pgoutput to
//! stream and spill, transactional and non-transactional logical messages,
//! TRUNCATE, ALTER TABLE ADD COLUMN, a REPLICA IDENTITY FULL table, TOASTed
//! values, and on purpose a commit landing right after another session's
//! non-transactional message) into a private PostgreSQL cluster, while
//! `odoo-cdc run` streams them to a private RabbitMQ node and faults hit at
//! random moments: kill -9 and SIGTERM of the connector, the broker closing
//! every connection or restarting its application, PostgreSQL restarted, the
//! walsender terminated, a stalled link (TCP proxy).
//!
//! The judge does not trust the connector's decoder: a `test_decoding` slot
//! created before the workload says what was committed. After de-duplicating
//! deliveries by `message_id`, every committed transaction must be delivered
//! exactly: change `i` of transaction `xid` is the event with `source.xid`
//! and `source.seq = i`, same table, operation, key and values, ids equal to
//! `<commit_lsn>-<seq>`, commit LSNs rising in commit order; nothing missing,
//! nothing extra, no id shared by two different events.
//!
//! Seeded: the seed is printed, `ODOO_CDC_SEED=<n>` replays the same choices
//! (SQL scripts per session, fault kinds and times; the interleaving of the
//! sessions is up to the machine). `ODOO_CDC_CONTRACT_SECS` sets how long the
//! workload and faults run (default 25 s, about a minute in all), e.g.
//! `ODOO_CDC_CONTRACT_SECS=1800 cargo test --test contract -- --nocapture`
//! (checked in rounds of two minutes: the workload pauses, the connector
//! catches up, and the round is judged, so memory stays bounded);
//! `ODOO_CDC_CONTRACT_FAULTS=Kill9,Sigterm` picks faults from those only;
//! `ODOO_CDC_CONTRACT_GRANULARITY=transaction` checks transaction messages;
//! Transactional messages are also written in savepoints that are rolled back,
//! in streamed transactions too (`ODOO_CDC_CONTRACT_SUBXACT_MESSAGES=0` leaves
//! them out): pgoutput does not tie such a message to its savepoint, and the
//! connector must notice and decode the transaction again without streaming.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Proc;
use common::broker::{Delivery, PrivateBroker, ResilientConsumer};
use common::cluster::PrivateCluster;
use common::proxy::TcpProxy;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::RwLock;
use tokio_postgres::Client;

const DB: &str = "contract";
const PUBLICATION: &str = "contract";
const SLOT: &str = "cdc";
const ORACLE_SLOT: &str = "oracle";
/// The consumer's durable queue on the private broker.
const QUEUE: &str = "contract";
/// The prefix of the connector's own heartbeats: never published.
const HEARTBEAT: &str = "odoo-cdc.heartbeat";
/// Logical messages the workload emits; these are published.
const NT_PREFIX: &str = "contract.nt";
const TX_PREFIX: &str = "contract.tx";
const SESSIONS: u32 = 3;
/// A long run is checked every this many seconds of workload.
const ROUND_SECS: u64 = 120;

// ---------------------------------------------------------------- workload

/// What the sessions share: the gate a scenario takes alone (write) while
/// every ordinary transaction holds it shared (read).
struct Shared {
    url: String,
    seed: u64,
    gate: RwLock<()>,
    stop: AtomicBool,
    messages: AtomicU64,
    columns_added: AtomicU64,
    stats: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

impl Shared {
    fn count(&self, kind: &'static str, ok: bool) {
        let mut s = self.stats.lock().unwrap();
        let e = s.entry(kind).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    fn next_message(&self) -> String {
        let n = self.messages.fetch_add(1, Ordering::Relaxed);
        format!("seed {} message {n}", self.seed)
    }
}

async fn session(url: &str) -> Option<Client> {
    let c = common::connect_retry(url, Duration::from_secs(2))
        .await
        .ok()?;
    // Bounded waits: a fault or a lock queue must not hang a session.
    c.batch_execute("SET lock_timeout = '2s'; SET statement_timeout = '20s'")
        .await
        .ok()?;
    Some(c)
}

/// A session's own key range and a cursor into it, so sessions rarely collide
/// (they may: a collision is an error and the transaction is not committed).
struct Keys {
    base: i64,
    next: i64,
}

impl Keys {
    fn fresh(&mut self) -> i64 {
        self.next += 1;
        self.base + self.next
    }
    fn some(&self, rng: &mut StdRng) -> i64 {
        self.base + rng.random_range(0..=self.next.max(1))
    }
}

fn text(rng: &mut StdRng) -> String {
    const WORDS: [&str; 6] = ["alpha", "it''s", "b\\c", "quote''d x", "é ü", "x y z"];
    let w = WORDS[rng.random_range(0..WORDS.len())];
    format!("'{w} {}'", rng.random_range(0..1000))
}

/// A few KiB of incompressible text: stored out of line (TOAST).
fn big_text(rng: &mut StdRng) -> String {
    let n = rng.random_range(2500..6000);
    let s: String = (0..n)
        .map(|_| char::from(b"0123456789abcdefghijklmnopqrstuv"[rng.random_range(0..32)]))
        .collect();
    format!("'{s}'")
}

fn insert_acct(rng: &mut StdRng, keys: &mut Keys) -> String {
    let rows: Vec<String> = (0..rng.random_range(1..=8))
        .map(|_| {
            let big = if rng.random_bool(0.2) {
                big_text(rng)
            } else {
                "NULL".into()
            };
            format!(
                "({}, {}, {}, {}, {big})",
                keys.fresh(),
                text(rng),
                rng.random_range(-5..100_000i64),
                if rng.random_bool(0.1) {
                    "NULL".into()
                } else {
                    text(rng)
                }
            )
        })
        .collect();
    format!(
        "INSERT INTO acct (id, owner, n, note, big) VALUES {}",
        rows.join(", ")
    )
}

/// One random statement of an ordinary transaction.
fn statement(rng: &mut StdRng, keys: &mut Keys) -> String {
    match rng.random_range(0..12) {
        0 | 1 => insert_acct(rng, keys),
        2 => format!(
            "UPDATE acct SET n = n + 1, note = {} WHERE id BETWEEN {} AND {}",
            text(rng),
            keys.some(rng),
            keys.some(rng) + 3
        ),
        // Leaves the TOASTed column alone: Postgres does not send it again.
        3 => format!("UPDATE acct SET n = n * 2 WHERE id = {}", keys.some(rng)),
        4 => format!(
            "UPDATE acct SET big = {} WHERE id = {}",
            big_text(rng),
            keys.some(rng)
        ),
        // A new primary key: the old one comes as `old-key`.
        5 => format!(
            "UPDATE acct SET id = {} WHERE id = {}",
            keys.fresh(),
            keys.some(rng)
        ),
        6 => format!(
            "DELETE FROM acct WHERE id BETWEEN {} AND {}",
            keys.some(rng),
            keys.some(rng) + 2
        ),
        7 => format!(
            "INSERT INTO full_t (id, v, n) VALUES ({}, {}, {})",
            keys.fresh(),
            text(rng),
            rng.random_range(0..50)
        ),
        8 => format!(
            "UPDATE full_t SET v = {}, n = n + 1 WHERE id BETWEEN {} AND {}",
            text(rng),
            keys.some(rng),
            keys.some(rng) + 5
        ),
        9 => format!(
            "DELETE FROM full_t WHERE id = {} OR id = {}",
            keys.some(rng),
            keys.some(rng)
        ),
        10 => {
            let first = keys.fresh();
            keys.next += 20;
            format!(
                "INSERT INTO item (id, acct, qty, payload) SELECT g, {}, g % 7, md5(g::text) \
                 FROM generate_series({first}, {}) g",
                keys.some(rng),
                first + rng.random_range(0..20)
            )
        }
        _ => format!(
            "SELECT pg_logical_emit_message(true, '{}', 'seed {} tx {}')",
            if rng.random_bool(0.3) {
                HEARTBEAT
            } else {
                TX_PREFIX
            },
            keys.base,
            rng.random_range(0..1_000_000)
        ),
    }
}

/// A big insert: far over logical_decoding_work_mem (64kB), so pgoutput
/// streams it and the connector (1 MiB budget) spills it.
fn big_insert(rng: &mut StdRng, keys: &mut Keys) -> String {
    let n = rng.random_range(300..900);
    let first = keys.fresh();
    keys.next += n;
    format!(
        "INSERT INTO item (id, acct, qty, payload) SELECT g, {}, g % 13, repeat(md5(g::text), 4) \
         FROM generate_series({first}, {}) g",
        keys.some(rng),
        first + n - 1
    )
}

/// The statements of one random transaction, and its kind for the stats.
fn script(rng: &mut StdRng, keys: &mut Keys, shared: &Shared) -> (&'static str, Vec<String>) {
    fn body(rng: &mut StdRng, keys: &mut Keys, lo: usize, hi: usize) -> Vec<String> {
        (0..rng.random_range(lo..=hi))
            .map(|_| statement(rng, keys))
            .collect()
    }
    let wrap = |mut v: Vec<String>, end: &str| {
        v.insert(0, "BEGIN".into());
        v.push(end.into());
        v
    };
    match rng.random_range(0..100) {
        0..=19 => ("multi-row insert", vec![insert_acct(rng, keys)]),
        20..=29 => ("single statement", body(rng, keys, 1, 1)),
        30..=54 => ("transaction", wrap(body(rng, keys, 2, 6), "COMMIT")),
        55..=64 => {
            let mut v = body(rng, keys, 1, 2);
            v.push("SAVEPOINT s1".into());
            let mut undone = body(rng, keys, 1, 3);
            if rng.random_bool(0.3) {
                undone.push("SAVEPOINT s2".into());
                undone.extend(body(rng, keys, 1, 2));
                undone.push("RELEASE SAVEPOINT s2".into());
            }
            if !subxact_messages() {
                undone.retain(|sql| !sql.contains("pg_logical_emit_message"));
            }
            v.extend(undone);
            v.push("ROLLBACK TO SAVEPOINT s1".into());
            v.extend(body(rng, keys, 0, 2));
            ("savepoint rolled back", wrap(v, "COMMIT"))
        }
        65..=71 => ("rolled back", wrap(body(rng, keys, 1, 4), "ROLLBACK")),
        72..=75 => {
            let mut v = vec![big_insert(rng, keys)];
            if rng.random_bool(0.4) {
                // A streamed subtransaction aborted (Stream Abort of a subxact).
                v.push("SAVEPOINT big".into());
                if subxact_messages() {
                    v.push(format!(
                        "SELECT pg_logical_emit_message(true, '{TX_PREFIX}', 'rolled back in {}')",
                        keys.next
                    ));
                }
                v.push(big_insert(rng, keys));
                v.push("ROLLBACK TO SAVEPOINT big".into());
            }
            v.extend(body(rng, keys, 0, 3));
            if rng.random_bool(0.2) {
                ("streamed, rolled back", wrap(v, "ROLLBACK"))
            } else {
                ("streamed", wrap(v, "COMMIT"))
            }
        }
        76..=83 => (
            "TOAST",
            wrap(
                vec![
                    insert_acct(rng, keys),
                    format!(
                        "UPDATE acct SET big = {} WHERE id = {}",
                        big_text(rng),
                        keys.some(rng)
                    ),
                    format!(
                        "UPDATE acct SET owner = {} WHERE id = {}",
                        text(rng),
                        keys.some(rng)
                    ),
                ],
                "COMMIT",
            ),
        ),
        84..=91 => (
            "non-transactional message",
            vec![format!(
                "SELECT pg_logical_emit_message(false, '{NT_PREFIX}', '{}')",
                shared.next_message()
            )],
        ),
        92..=93 => (
            "TRUNCATE",
            wrap(
                vec![
                    "TRUNCATE item".into(),
                    format!(
                        "INSERT INTO item (id, acct, qty, payload) VALUES ({}, 1, 1, 'after truncate')",
                        keys.fresh()
                    ),
                ],
                "COMMIT",
            ),
        ),
        94..=95 if shared.columns_added.load(Ordering::Relaxed) < 12 => {
            let n = shared.columns_added.fetch_add(1, Ordering::Relaxed);
            let default = if rng.random_bool(0.5) {
                " DEFAULT 7"
            } else {
                ""
            };
            let table = if rng.random_bool(0.7) {
                "acct"
            } else {
                "full_t"
            };
            let mut v = vec![format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS c{}_{n} int{default}",
                keys.base / 10_000_000
            )];
            v.extend(body(rng, keys, 1, 3));
            ("ALTER TABLE ADD COLUMN", wrap(v, "COMMIT"))
        }
        _ => ("transaction", wrap(body(rng, keys, 1, 4), "COMMIT")),
    }
}

async fn run_script(c: &Client, sqls: &[String]) -> Result<(), tokio_postgres::Error> {
    for sql in sqls {
        if let Err(e) = c.batch_execute(sql).await {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    Ok(())
}

/// Session A holds a transaction with a row, session B emits a
/// non-transactional message, then A commits: A's commit record comes right
/// after the message's (docs/events.md, "What exactly is promised").
async fn commit_after_message(
    a: &Client,
    b: &Client,
    id: i64,
    prefix: &str,
    content: &str,
) -> Result<String, tokio_postgres::Error> {
    a.batch_execute("BEGIN").await?;
    let r = async {
        a.batch_execute(&format!(
            "INSERT INTO acct (id, owner, n, note) VALUES ({id}, 'adjacent', 0, 'commits right after a message')"
        ))
        .await?;
        let lsn: String = b
            .query_one(
                "SELECT pg_logical_emit_message(false, $1, $2)::text",
                &[&prefix, &content],
            )
            .await?
            .get(0);
        a.batch_execute("COMMIT").await?;
        Ok(lsn)
    }
    .await;
    if r.is_err() {
        let _ = a.batch_execute("ROLLBACK").await;
    }
    r
}

async fn worker(shared: Arc<Shared>, n: u32) {
    let mut rng =
        StdRng::seed_from_u64(shared.seed ^ (u64::from(n) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut keys = Keys {
        base: i64::from(n + 1) * 10_000_000,
        next: 0,
    };
    let mut c: Option<Client> = None;
    let mut b: Option<Client> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if c.as_ref().is_none_or(|c| c.is_closed()) {
            c = session(&shared.url).await;
            if c.is_none() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        }
        let client = c.as_ref().unwrap();
        if rng.random_range(0..100) < 2 {
            // The adjacent commit, alone (nothing else may write in between).
            if b.as_ref().is_none_or(|b| b.is_closed()) {
                b = session(&shared.url).await;
            }
            let Some(other) = b.as_ref() else { continue };
            let prefix = if rng.random_bool(0.5) {
                HEARTBEAT
            } else {
                NT_PREFIX
            };
            let content = shared.next_message();
            let id = keys.fresh();
            let _alone = shared.gate.write().await;
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let ok = commit_after_message(client, other, id, prefix, &content)
                .await
                .is_ok();
            shared.count("commit after a message", ok);
        } else {
            let (kind, sqls) = script(&mut rng, &mut keys, &shared);
            let _shared = shared.gate.read().await;
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let ok = run_script(client, &sqls).await.is_ok();
            shared.count(kind, ok);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..60))).await;
    }
}

/// Non-transactional messages with the heartbeat prefix every 100 ms, as the
/// connector writes them (its own option counts whole seconds).
async fn heartbeats(shared: Arc<Shared>) {
    let mut c: Option<Client> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.as_ref().is_none_or(|c| c.is_closed()) {
            c = session(&shared.url).await;
        }
        let Some(client) = c.as_ref() else { continue };
        let _shared = shared.gate.read().await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let ok = client
            .batch_execute(&format!(
                "SELECT pg_logical_emit_message(false, '{HEARTBEAT}', now()::text)"
            ))
            .await
            .is_ok();
        shared.count("heartbeat (100 ms)", ok);
    }
}

// ---------------------------------------------------------------- faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    Sigterm,
    BrokerClosesConnections,
    BrokerRestartsApp,
    PostgresRestart,
    WalsenderTerminated,
    BrokerLinkStalled,
    PostgresLinkStalled,
    /// kill -9 while a commit that follows a heartbeat waits for its confirm
    /// (the broker link black-holed, then cut: those publishes never arrive).
    Kill9AfterCommitAfterMessage,
}

const FAULTS: [(Fault, u32); 9] = [
    (Fault::Kill9, 4),
    (Fault::Sigterm, 2),
    (Fault::BrokerClosesConnections, 2),
    (Fault::BrokerRestartsApp, 1),
    (Fault::PostgresRestart, 1),
    (Fault::WalsenderTerminated, 2),
    (Fault::BrokerLinkStalled, 2),
    (Fault::PostgresLinkStalled, 1),
    (Fault::Kill9AfterCommitAfterMessage, 3),
];

/// The faults to pick from: all, or those `ODOO_CDC_CONTRACT_FAULTS` names
/// (comma separated, e.g. `Kill9,PostgresRestart`), to focus a run.
fn fault_menu() -> Vec<(Fault, u32)> {
    let Ok(only) = std::env::var("ODOO_CDC_CONTRACT_FAULTS") else {
        return FAULTS.to_vec();
    };
    let names: Vec<&str> = only.split(',').map(str::trim).collect();
    let menu: Vec<(Fault, u32)> = FAULTS
        .iter()
        .filter(|(f, _)| names.contains(&format!("{f:?}").as_str()))
        .copied()
        .collect();
    assert!(
        !menu.is_empty(),
        "ODOO_CDC_CONTRACT_FAULTS={only:?} names none of {:?}",
        FAULTS.map(|f| f.0)
    );
    menu
}

fn pick_fault(rng: &mut StdRng, menu: &[(Fault, u32)]) -> Fault {
    let total: u32 = menu.iter().map(|f| f.1).sum();
    let mut x = rng.random_range(0..total);
    for &(f, w) in menu {
        if x < w {
            return f;
        }
        x -= w;
    }
    unreachable!()
}

struct Rig {
    cluster: Arc<PrivateCluster>,
    broker: Arc<PrivateBroker>,
    pg_proxy: TcpProxy,
    amqp_proxy: TcpProxy,
    exchange: String,
    connector: Option<Proc>,
    /// Exits the test did not ask for, with their codes.
    unexpected_exits: Vec<String>,
    started: Instant,
}

impl Rig {
    fn say(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn spawn_connector(&mut self) {
        let mut args = common::run_args_via(
            &self.pg_proxy,
            DB,
            &self.amqp_proxy,
            &self.exchange,
            SLOT,
            PUBLICATION,
        );
        args.extend(
            [
                "--granularity",
                &granularity(),
                "--heartbeat-interval-secs",
                "1",
                "--shutdown-grace-secs",
                "5",
                // Streamed transactions over 1 MiB spill to disk.
                "--stream-memory-mb",
                "1",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log =
            std::env::var("ODOO_CDC_CONTRACT_LOG").unwrap_or_else(|_| "error,lapin=off".into());
        self.connector = Some(Proc::spawn(&args, &[("ODOO_CDC_LOG", &log)]));
    }

    /// Notes (and restarts) a connector that exited on its own.
    fn check_alive(&mut self) {
        let exited = self
            .connector
            .as_mut()
            .and_then(|p| p.child.try_wait().ok().flatten());
        if let Some(status) = exited {
            let what = format!("the connector exited on its own ({status}); started again");
            self.say(&what);
            self.unexpected_exits.push(what);
            self.spawn_connector();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.connector.take() {
            p.kill9();
        }
    }

    async fn sigterm(&mut self) -> Option<i32> {
        let mut p = self.connector.take()?;
        tokio::task::spawn_blocking(move || p.terminate())
            .await
            .unwrap()
    }

    async fn admin(&self) -> Option<Client> {
        common::connect_retry(&self.cluster.url(DB), Duration::from_secs(30))
            .await
            .ok()
    }

    /// Waits (bounded) until the connector's slot is confirmed up to `lsn`.
    async fn slot_reaches(&self, lsn: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.admin().await
                && let Ok(row) = c
                    .query_one(
                        "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[&SLOT, &lsn],
                    )
                    .await
                && row.get::<_, bool>(0)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    async fn current_lsn(&self) -> Option<String> {
        let c = self.admin().await?;
        c.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ok()
            .map(|r| r.get(0))
    }

    /// Whether pgoutput really streamed and test_decoding really spilled.
    async fn slot_stats(&self) -> String {
        let Some(c) = self.admin().await else {
            return String::new();
        };
        c.query(
            "SELECT format('%s: %s streamed, %s spilled', slot_name, stream_txns, spill_txns) \
             FROM pg_stat_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
    }

    /// Prints what broke: the connector's own exits, the record before each
    /// lost transaction's commit (pg_waldump), and the first few findings.
    async fn diagnose(&self, v: &Verdict) {
        for e in self.unexpected_exits.iter().take(10) {
            eprintln!("note: {e}");
        }
        if !v.lost_txns.is_empty() {
            let cluster = self.cluster.clone();
            let dump = tokio::task::spawn_blocking(move || cluster.waldump())
                .await
                .unwrap_or_default();
            let xids: Vec<u64> = v.lost_txns.iter().map(|t| t.0).collect();
            let before = records_before_commits(&dump, &xids);
            let after_message = before
                .values()
                .filter(|(prev, _)| prev.contains("MESSAGE non-transactional"))
                .count();
            eprintln!(
                "transactions with lost changes: {} ({after_message} committed right after a \
                 non-transactional message)",
                v.lost_txns.len()
            );
            for (xid, lost, all) in v.lost_txns.iter().take(12) {
                let (prev, commit) = before.get(xid).cloned().unwrap_or_default();
                eprintln!("  xid {xid}: {lost} of {all} changes lost\n    {prev}\n    {commit}");
            }
        }
        for (what, list) in [
            ("lost", &v.lost),
            ("extra", &v.extra),
            ("mismatch", &v.mismatches),
            ("id collision", &v.collisions),
        ] {
            for x in list.iter().take(8) {
                let x: String = x.chars().take(600).collect();
                eprintln!("{what}: {x}");
            }
        }
    }

    async fn inject(&mut self, fault: Fault, rng: &mut StdRng, shared: &Shared) {
        match fault {
            Fault::Kill9 => {
                self.kill9();
                sleep_ms(rng.random_range(0..800)).await;
                self.spawn_connector();
            }
            Fault::Sigterm => {
                let code = self.sigterm().await;
                self.say(&format!("  SIGTERM: the connector exited with {code:?}"));
                self.spawn_connector();
            }
            Fault::BrokerClosesConnections => {
                let b = self.broker.clone();
                let out = tokio::task::spawn_blocking(move || {
                    b.ctl(&["close_all_connections", "contract checker fault"])
                })
                .await
                .unwrap();
                if !out.status.success() {
                    self.say(&format!(
                        "  close_all_connections failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Fault::BrokerRestartsApp => {
                let b = self.broker.clone();
                let down = rng.random_range(500..3000);
                tokio::task::spawn_blocking(move || {
                    b.stop_app();
                    std::thread::sleep(Duration::from_millis(down));
                    b.start_app();
                })
                .await
                .unwrap();
            }
            Fault::PostgresRestart => {
                let c = self.cluster.clone();
                tokio::task::spawn_blocking(move || c.restart())
                    .await
                    .unwrap();
            }
            Fault::WalsenderTerminated => {
                if let Some(c) = self.admin().await {
                    let n = c
                        .execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE slot_name = $1 AND active_pid IS NOT NULL",
                            &[&SLOT],
                        )
                        .await
                        .unwrap_or(0);
                    self.say(&format!("  walsenders terminated: {n}"));
                }
            }
            Fault::BrokerLinkStalled => {
                self.amqp_proxy.stall();
                sleep_ms(rng.random_range(500..7000)).await;
                self.amqp_proxy.restore();
            }
            Fault::PostgresLinkStalled => {
                self.pg_proxy.stall();
                sleep_ms(rng.random_range(500..12_000)).await;
                self.pg_proxy.restore();
            }
            Fault::Kill9AfterCommitAfterMessage => {
                let prefix = if rng.random_bool(0.85) {
                    HEARTBEAT
                } else {
                    NT_PREFIX
                };
                let wait = rng.random_range(1500..3500);
                let id = 9_000_000_000 + rng.random_range(0..1_000_000_000i64);
                // Nothing else writes meanwhile, so the records are adjacent.
                let _alone = shared.gate.write().await;
                let (Some(a), Some(b)) = (session(&shared.url).await, session(&shared.url).await)
                else {
                    self.say("  no SQL session for the scenario");
                    return;
                };
                // Everything before is confirmed, so the message's position
                // may become the flush position while the commit is unconfirmed.
                if let Some(lsn) = self.current_lsn().await {
                    self.slot_reaches(&lsn, Duration::from_secs(5)).await;
                }
                self.amqp_proxy.stall();
                let r = commit_after_message(&a, &b, id, prefix, &shared.next_message()).await;
                shared.count("commit after a message (fault)", r.is_ok());
                // Status updates every second report what is safe.
                sleep_ms(wait).await;
                let flushed = a
                    .query_one(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                        &[&SLOT],
                    )
                    .await
                    .map(|r| r.get::<_, String>(0));
                self.say(&format!(
                    "  {prefix} message ending at {:?}, row {id} committed after it; \
                     slot confirmed {:?} at the kill",
                    r.as_ref().ok(),
                    flushed.ok()
                ));
                self.kill9();
                // The publishes still buffered in the black hole never arrive.
                self.amqp_proxy.cut();
                self.amqp_proxy.restore();
                self.spawn_connector();
            }
        }
    }
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

// ---------------------------------------------------------------- oracle

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    UnchangedToast,
    /// A quoted literal (text types).
    Text(String),
    /// An unquoted literal (numbers, booleans).
    Bare(String),
}

type Tuple = Vec<(String, Val)>;

#[derive(Debug, Clone)]
enum Change {
    Row {
        table: String,
        op: &'static str,
        old: Option<Tuple>,
        new: Option<Tuple>,
    },
    Truncate {
        table: String,
    },
    Message {
        prefix: String,
        content: String,
    },
}

#[derive(Debug)]
struct Txn {
    xid: u64,
    changes: Vec<Change>,
}

#[derive(Debug, Default)]
struct Oracle {
    txns: Vec<Txn>,
    /// Non-transactional messages other than heartbeats: (prefix, content).
    messages: Vec<(String, String)>,
}

/// Parses `name[type]:value ...` with `old-key:` / `new-tuple:` markers.
fn parse_tuples(s: &str) -> Result<(Option<Tuple>, Tuple), String> {
    let (mut old, mut new) = (None::<Tuple>, Tuple::new());
    let mut in_old = false;
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("old-key:") {
            in_old = true;
            old = Some(Vec::new());
            rest = r.trim_start();
            continue;
        }
        if let Some(r) = rest.strip_prefix("new-tuple:") {
            in_old = false;
            rest = r.trim_start();
            continue;
        }
        if let Some(r) = rest.strip_prefix("(no-tuple-data)") {
            rest = r.trim_start();
            continue;
        }
        let open = rest
            .find('[')
            .ok_or_else(|| format!("no [type] in {rest:?}"))?;
        let name = rest[..open].trim_matches('"').to_string();
        let close = rest[open..]
            .find("]:")
            .ok_or_else(|| format!("no ]: in {rest:?}"))?
            + open;
        rest = &rest[close + 2..];
        let val = if let Some(r) = rest.strip_prefix('\'') {
            let mut out = String::new();
            let mut chars = r.char_indices().peekable();
            let mut end = None;
            while let Some((i, ch)) = chars.next() {
                if ch == '\'' {
                    if chars.peek().map(|p| p.1) == Some('\'') {
                        out.push('\'');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    out.push(ch);
                }
            }
            rest = &r[end.ok_or_else(|| format!("unterminated literal in {s:?}"))?..];
            Val::Text(out)
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            let v = &rest[..end];
            rest = &rest[end..];
            match v {
                "null" => Val::Null,
                "unchanged-toast-datum" => Val::UnchangedToast,
                v => Val::Bare(v.to_string()),
            }
        };
        rest = rest.trim_start();
        match (in_old, old.as_mut()) {
            (true, Some(o)) => o.push((name, val)),
            _ => new.push((name, val)),
        }
    }
    Ok((old, new))
}

fn parse_message(line: &str) -> Result<(bool, String, String), String> {
    // message: transactional: 1 prefix: p, sz: 3 content:abc
    let r = line
        .strip_prefix("message: transactional: ")
        .ok_or("not a message")?;
    let transactional = r.starts_with('1');
    let r = r[1..].strip_prefix(" prefix: ").ok_or("no prefix")?;
    let comma = r.find(", sz: ").ok_or("no size")?;
    let prefix = r[..comma].to_string();
    let r = &r[comma + 6..];
    let c = r.find(" content:").ok_or("no content")?;
    let size: usize = r[..c].parse().map_err(|_| "bad size")?;
    let content = r[c + 9..].to_string();
    if content.len() != size {
        return Err(format!("content of {} bytes, sz {size}", content.len()));
    }
    Ok((transactional, prefix, content))
}

fn parse_oracle(lines: &[String]) -> Result<Oracle, String> {
    let mut o = Oracle::default();
    let mut open: Option<Txn> = None;
    for line in lines {
        let err = |e: String| format!("{e}: {line:?}");
        if let Some(x) = line.strip_prefix("BEGIN ") {
            let xid = x.trim().parse().map_err(|_| err("bad xid".into()))?;
            open = Some(Txn {
                xid,
                changes: Vec::new(),
            });
        } else if line.starts_with("COMMIT") {
            o.txns
                .push(open.take().ok_or_else(|| err("COMMIT outside".into()))?);
        } else if line.starts_with("message: ") {
            let (transactional, prefix, content) = parse_message(line).map_err(err)?;
            if transactional {
                let t = open.as_mut().ok_or_else(|| err("message outside".into()))?;
                t.changes.push(Change::Message { prefix, content });
            } else if prefix != HEARTBEAT {
                o.messages.push((prefix, content));
            }
        } else if let Some(r) = line.strip_prefix("table ") {
            let t = open.as_mut().ok_or_else(|| err("change outside".into()))?;
            let colon = r.find(": ").ok_or_else(|| err("no table".into()))?;
            let names = &r[..colon];
            let table = names
                .rsplit('.')
                .next()
                .unwrap()
                .trim_matches('"')
                .to_string();
            let r = &r[colon + 2..];
            let (op, rest) = r.split_once(':').ok_or_else(|| err("no op".into()))?;
            if op == "TRUNCATE" {
                if names.contains(',') {
                    return Err(err("multi-table TRUNCATE".into()));
                }
                t.changes.push(Change::Truncate { table });
                continue;
            }
            let op = match op {
                "INSERT" => "c",
                "UPDATE" => "u",
                "DELETE" => "d",
                _ => return Err(err("unknown op".into())),
            };
            let (old, tuple) = parse_tuples(rest).map_err(err)?;
            let (old, new) = match op {
                "d" => (Some(tuple), None),
                _ => (old, Some(tuple)),
            };
            t.changes.push(Change::Row {
                table,
                op,
                old,
                new,
            });
        } else {
            return Err(err("unknown line".into()));
        }
    }
    Ok(o)
}

/// What the oracle decoded since the last call (consumed). Without `skip-empty-xacts`: with it, PostgreSQL
/// 15's test_decoding prints a transactional message that comes before the
/// transaction's first row change ahead of the (delayed) `BEGIN`, so it would
/// seem to belong to no transaction. Empty transactions are just not checked.
async fn read_oracle(c: &Client) -> Result<Oracle, String> {
    let rows = c
        .query(
            "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, \
             'include-xids', '1')",
            &[&ORACLE_SLOT],
        )
        .await
        .map_err(|e| e.to_string())?;
    let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    parse_oracle(&lines)
}

// ---------------------------------------------------------------- judge

fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn val_matches(v: &Val, j: Option<&Value>) -> bool {
    match (v, j) {
        (Val::Null, Some(Value::Null)) => true,
        (Val::Text(s), Some(Value::String(t))) => s == t,
        (Val::Bare(s), Some(Value::Number(n))) => n.to_string() == *s,
        (Val::Bare(s), Some(Value::Bool(b))) => b.to_string() == *s,
        (Val::Bare(s), Some(Value::String(t))) => s == t,
        _ => false,
    }
}

/// Why `ev` is not the change the oracle recorded, if it is not.
fn differs(change: &Change, ev: &Value) -> Option<String> {
    let table = ev["source"]["table"].as_str().unwrap_or("");
    let op = ev["op"].as_str().unwrap_or("");
    match change {
        Change::Truncate { table: t } => (op != "t" || table != t)
            .then(|| format!("expected TRUNCATE {t}, got {op} on {table:?}")),
        Change::Message { prefix, content } => {
            let m = &ev["message"];
            (op != "m"
                || m["transactional"] != Value::Bool(true)
                || m["prefix"] != prefix.as_str()
                || m["content"] != content.as_str())
            .then(|| format!("expected message {prefix}/{content}, got {op} {m}"))
        }
        Change::Row {
            table: t,
            op: o,
            old,
            new,
        } => {
            if op != *o || table != t {
                return Some(format!("expected {o} on {t}, got {op} on {table}"));
            }
            // The primary key (`id`) as the row's identity.
            let id_of = |tuple: &Tuple| tuple.iter().find(|(n, _)| n == "id").map(|c| c.1.clone());
            let id = new.as_ref().or(old.as_ref()).and_then(id_of)?;
            if !val_matches(&id, ev["key"].get("id")) {
                return Some(format!("key {} where the row's id is {id:?}", ev["key"]));
            }
            if let Some(old) = old {
                for (n, v) in old {
                    if *v != Val::UnchangedToast && !val_matches(v, ev["before"].get(n)) {
                        return Some(format!(
                            "before.{n} is {:?}, was {v:?}",
                            ev["before"].get(n)
                        ));
                    }
                }
            }
            if let Some(new) = new {
                let toast: Vec<&str> = ev["unchanged_toast"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let after = ev["after"].as_object();
                let width = after.map_or(0, |a| a.len()) + toast.len();
                if width != new.len() {
                    return Some(format!(
                        "{width} columns in after + unchanged_toast, the row has {}",
                        new.len()
                    ));
                }
                for (n, v) in new {
                    let ok = match v {
                        Val::UnchangedToast => {
                            toast.contains(&n.as_str())
                                || old.as_ref().is_some_and(|o| {
                                    o.iter().any(|(on, ov)| {
                                        on == n && val_matches(ov, ev["after"].get(n))
                                    })
                                })
                        }
                        v => val_matches(v, ev["after"].get(n)),
                    };
                    if !ok {
                        let got = ev["after"].get(n).map(|g| {
                            let s = g.to_string();
                            s.chars().take(60).collect::<String>()
                        });
                        return Some(format!("after.{n} is {got:?}, the row has {v:.60?}"));
                    }
                }
            }
            None
        }
    }
}

#[derive(Default)]
struct Verdict {
    deliveries: usize,
    unique: usize,
    duplicates: usize,
    txns: usize,
    changes: usize,
    messages: usize,
    lost: Vec<String>,
    /// Lost only to de-duplication: delivered under an id another event has.
    hidden: usize,
    /// Transactions with lost changes: xid, changes lost, changes in all.
    lost_txns: Vec<(u64, usize, usize)>,
    extra: Vec<String>,
    mismatches: Vec<String>,
    /// One id, two different events.
    collisions: Vec<String>,
}

impl Verdict {
    fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.extra.is_empty()
            && self.mismatches.is_empty()
            && self.collisions.is_empty()
    }
}

/// Where an event belongs: `t <xid> <seq>`, or `m <prefix> <content>` for a
/// non-transactional message.
fn position(ev: &Value) -> String {
    let m = &ev["message"];
    if ev["op"] == "m" && m["transactional"] == Value::Bool(false) {
        format!(
            "m {} {}",
            m["prefix"].as_str().unwrap_or(""),
            m["content"].as_str().unwrap_or("")
        )
    } else {
        format!("t {} {}", ev["source"]["xid"], ev["source"]["seq"])
    }
}

/// The events of a message body: one (row granularity), or those of a
/// transaction part (`{"xid", .., "events": [..]}`), then with `true`.
fn events_of(body: Value) -> (bool, Vec<Value>) {
    match body {
        Value::Object(mut o) if o.get("events").is_some_and(Value::is_array) => {
            let Some(Value::Array(events)) = o.remove("events") else {
                unreachable!()
            };
            (true, events)
        }
        other => (false, vec![other]),
    }
}

/// Compares the deliveries with the oracle: de-duplicated by `message_id`
/// (two different bodies under one id is a collision), every committed change
/// must be there once, in place, with its content, and nothing else.
///
/// `judged` holds (hashes of) the ids of earlier rounds: a late copy of one of
/// those is a duplicate; this round's ids are added to it.
fn judge(deliveries: &[Delivery], oracle: &Oracle, judged: &mut HashSet<u64>) -> Verdict {
    let mut v = Verdict {
        deliveries: deliveries.len(),
        ..Default::default()
    };
    let hash = |id: &str| {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        id.hash(&mut h);
        h.finish()
    };
    // De-duplicate by message_id: the first delivery is what a consumer keeps.
    let mut by_id: HashMap<&str, &Delivery> = HashMap::new();
    // Events a consumer drops as duplicates because another event has their id.
    let mut hidden: HashSet<String> = HashSet::new();
    for d in deliveries {
        if judged.contains(&hash(&d.message_id)) {
            v.duplicates += 1;
            continue;
        }
        match by_id.get(d.message_id.as_str()) {
            None => {
                by_id.insert(d.message_id.as_str(), d);
            }
            Some(first) if first.body == d.body => v.duplicates += 1,
            Some(first) => {
                v.collisions.push(format!(
                    "id {} names two events: {} and {}",
                    d.message_id,
                    String::from_utf8_lossy(&first.body),
                    String::from_utf8_lossy(&d.body)
                ));
                hidden.extend(events_of(d.json()).1.iter().map(position));
            }
        }
    }
    v.unique = by_id.len();
    judged.extend(by_id.keys().map(|id| hash(id)));
    let lost = |v: &mut Verdict, position: String, what: String| {
        if hidden.contains(&position) {
            v.hidden += 1;
            v.lost.push(format!(
                "{what} (delivered, but under the id of another event)"
            ));
        } else {
            v.lost.push(what);
        }
    };
    // Events of transactions by (xid, seq); non-transactional messages by content.
    let mut by_pos: HashMap<(u64, u64), (String, Value)> = HashMap::new();
    let mut nt: HashMap<(String, String), usize> = HashMap::new();
    for (id, d) in &by_id {
        let (part, events) = events_of(d.json());
        for (i, ev) in events.into_iter().enumerate() {
            let m = &ev["message"];
            if ev["op"] == "m" && m["transactional"] == Value::Bool(false) {
                let key = (
                    m["prefix"].as_str().unwrap_or("").to_string(),
                    m["content"].as_str().unwrap_or("").to_string(),
                );
                *nt.entry(key).or_default() += 1;
                continue;
            }
            let xid = ev["source"]["xid"].as_u64().unwrap_or(0);
            let seq = ev["source"]["seq"].as_u64().unwrap_or(u64::MAX);
            let lsn = ev["source"]["commit_lsn"]
                .as_str()
                .and_then(parse_lsn)
                .unwrap_or(0);
            // A row's id, or a part's: the id of its first event.
            let own = format!("{lsn:016X}-{seq:08}");
            if (!part || i == 0) && **id != own {
                v.mismatches.push(format!(
                    "id {id} is not <commit_lsn>-<seq> of its (first) event {ev}"
                ));
            }
            if let Some((other, _)) = by_pos.insert((xid, seq), (own.clone(), ev)) {
                v.mismatches.push(format!(
                    "xid {xid} seq {seq} delivered in two different messages ({other}, {id})"
                ));
            }
        }
    }
    let mut last_commit = 0u64;
    for t in &oracle.txns {
        v.txns += 1;
        let mut commit_lsn: Option<u64> = None;
        let (lost_before, changes_before) = (v.lost.len(), v.changes);
        for (seq, change) in t.changes.iter().enumerate() {
            let seq = seq as u64;
            if let Change::Message { prefix, .. } = change
                && prefix == HEARTBEAT
            {
                // Counted in seq, never published.
                if let Some((id, _)) = by_pos.remove(&(t.xid, seq)) {
                    v.extra.push(format!("{id}: a heartbeat was published"));
                }
                continue;
            }
            v.changes += 1;
            let Some((id, ev)) = by_pos.remove(&(t.xid, seq)) else {
                lost(
                    &mut v,
                    format!("t {} {seq}", t.xid),
                    format!("xid {} change {seq}: {change:.200?}", t.xid),
                );
                continue;
            };
            let lsn = ev["source"]["commit_lsn"]
                .as_str()
                .and_then(parse_lsn)
                .unwrap_or(0);
            if commit_lsn.is_some_and(|c| c != lsn) {
                v.mismatches
                    .push(format!("{id}: xid {} has two commit LSNs", t.xid));
            }
            commit_lsn = Some(lsn);
            if let Some(why) = differs(change, &ev) {
                v.mismatches
                    .push(format!("{id} (xid {} seq {seq}): {why}", t.xid));
            }
        }
        if v.lost.len() > lost_before {
            v.lost_txns.push((
                t.xid,
                v.lost.len() - lost_before,
                v.changes - changes_before,
            ));
        }
        if let Some(c) = commit_lsn {
            if c <= last_commit {
                v.mismatches.push(format!(
                    "xid {}: commit LSN {c:X} not after the previous commit's {last_commit:X}",
                    t.xid
                ));
            }
            last_commit = c;
        }
    }
    for ((xid, seq), (id, ev)) in by_pos {
        v.extra.push(format!(
            "{id} (xid {xid} seq {seq}) matches no committed change: {ev}"
        ));
    }
    for key in &oracle.messages {
        v.messages += 1;
        match nt.get_mut(key) {
            Some(n) if *n > 0 => *n -= 1,
            _ => lost(
                &mut v,
                format!("m {} {}", key.0, key.1),
                format!("non-transactional message {key:?}"),
            ),
        }
    }
    for (key, n) in nt {
        if n > 0 {
            v.extra.push(format!(
                "{n} non-transactional message(s) {key:?} never emitted"
            ));
        }
    }
    v
}

/// For each xid, its commit record in a `pg_waldump` listing and the record
/// just before it.
fn records_before_commits(dump: &str, xids: &[u64]) -> HashMap<u64, (String, String)> {
    let mut out = HashMap::new();
    let mut prev = "";
    for line in dump.lines() {
        if line.contains("desc: COMMIT")
            && let Some(tx) = line
                .split("tx:")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|x| x.trim().parse::<u64>().ok())
            && xids.contains(&tx)
        {
            let short = |l: &str| l.chars().take(220).collect::<String>();
            out.insert(tx, (short(prev), short(line)));
        }
        prev = line;
    }
    out
}

// ---------------------------------------------------------------- the test

fn seed() -> u64 {
    match std::env::var("ODOO_CDC_SEED") {
        Ok(s) if !s.trim().is_empty() => s.trim().parse().expect("ODOO_CDC_SEED is a u64"),
        _ => rand::random(),
    }
}

/// `ODOO_CDC_CONTRACT_GRANULARITY`: row (default) or transaction.
fn granularity() -> String {
    std::env::var("ODOO_CDC_CONTRACT_GRANULARITY").unwrap_or_else(|_| "row".into())
}

/// Transactional messages inside savepoints that are rolled back too, unless
/// `ODOO_CDC_CONTRACT_SUBXACT_MESSAGES=0`.
fn subxact_messages() -> bool {
    std::env::var("ODOO_CDC_CONTRACT_SUBXACT_MESSAGES").map_or(true, |v| v != "0")
}

fn secs() -> u64 {
    std::env::var("ODOO_CDC_CONTRACT_SECS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(25)
}

async fn setup_schema(db: &Client) {
    db.batch_execute(&format!(
        "CREATE TABLE acct (id bigint PRIMARY KEY, owner text, n bigint, note text, big text);
         ALTER TABLE acct ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE item (id bigint PRIMARY KEY, acct bigint, qty int, payload text);
         CREATE TABLE full_t (id bigint PRIMARY KEY, v text, n int);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES;"
    ))
    .await
    .expect("schema and publication");
    // A batch is one transaction, and a slot is not created in one that wrote.
    db.batch_execute(&format!(
        "SELECT pg_create_logical_replication_slot('{ORACLE_SLOT}', 'test_decoding')"
    ))
    .await
    .expect("the test_decoding oracle slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_equal_the_committed_changes_under_faults() {
    assert!(
        PrivateBroker::available(),
        "RabbitMQ is not installed (run scripts/services.sh up)"
    );
    let seed = seed();
    let secs = secs();
    eprintln!(
        "contract checker: seed {seed}, {secs}s of workload and faults, {} granularity \
         (replay: ODOO_CDC_SEED={seed} ODOO_CDC_CONTRACT_SECS={secs} cargo test --test contract -- --nocapture)",
        granularity()
    );
    let started = Instant::now();
    let broker = std::thread::spawn(PrivateBroker::start);
    let cluster = PrivateCluster::start(&[
        ("logical_decoding_work_mem", "'64kB'"),
        ("wal_sender_timeout", "'20s'"),
    ]);
    let broker = broker.join().expect("private RabbitMQ node");
    let admin = common::connect_retry(&cluster.admin_url(), Duration::from_secs(30))
        .await
        .expect("private cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .unwrap();
    drop(admin);
    let url = cluster.url(DB);
    setup_schema(
        &common::connect_retry(&url, Duration::from_secs(30))
            .await
            .unwrap(),
    )
    .await;

    let exchange = "contract.cdc".to_string();
    let consumer = ResilientConsumer::start(&broker.amqp_url(), &exchange, QUEUE, "#").await;
    let pg_proxy = TcpProxy::start(&format!("127.0.0.1:{}", cluster.port));
    let amqp_proxy = TcpProxy::start(&broker.host_port());
    let mut rig = Rig {
        cluster: Arc::new(cluster),
        broker: Arc::new(broker),
        pg_proxy,
        amqp_proxy,
        exchange,
        connector: None,
        unexpected_exits: Vec::new(),
        started,
    };
    rig.say("private PostgreSQL and RabbitMQ up");
    rig.spawn_connector();
    // The connector's slot exists before the workload writes.
    let admin = rig.admin().await.expect("private cluster");
    common::await_slot(&admin, SLOT, Duration::from_secs(60)).await;
    drop(admin);

    let shared = Arc::new(Shared {
        url: url.clone(),
        seed,
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        messages: AtomicU64::new(0),
        columns_added: AtomicU64::new(0),
        stats: Mutex::new(BTreeMap::new()),
    });
    let mut tasks: Vec<_> = (0..SESSIONS)
        .map(|n| tokio::spawn(worker(shared.clone(), n)))
        .collect();
    tasks.push(tokio::spawn(heartbeats(shared.clone())));
    rig.say("workload started");

    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let menu = fault_menu();
    let mut judged = HashSet::new();
    let mut total = Verdict::default();
    // Long runs check in rounds, so memory stays bounded: the workload pauses,
    // the connector catches up, the round's deliveries are judged and dropped.
    let rounds = secs.div_ceil(ROUND_SECS).max(1);
    for round in 1..=rounds {
        let this = secs
            .saturating_sub(ROUND_SECS * (round - 1))
            .min(ROUND_SECS);
        let end = Instant::now() + Duration::from_secs(this);
        loop {
            let pause = rng.random_range(500..2500);
            if Instant::now() + Duration::from_millis(pause) >= end {
                break;
            }
            sleep_ms(pause).await;
            rig.check_alive();
            let fault = pick_fault(&mut rng, &menu);
            rig.say(&format!("fault: {fault:?}"));
            rig.inject(fault, &mut rng, &shared).await;
            *faults.entry(fault).or_default() += 1;
        }
        let last = round == rounds;
        if last {
            shared.stop.store(true, Ordering::Relaxed);
        }
        // Nothing writes while the round is judged.
        let paused = shared.gate.write().await;
        rig.say(&format!(
            "round {round}/{rounds}: workload paused; waiting for the connector to catch up"
        ));
        let v = judge_round(&mut rig, &consumer, &mut judged).await;
        eprintln!(
            "\n=== delivery contract checker, seed {seed}, {} granularity, round {round}/{rounds} ===",
            granularity()
        );
        eprintln!(
            "duration: {:.1}s so far ({secs}s of workload and faults asked for)",
            started.elapsed().as_secs_f64()
        );
        let stats = shared.stats.lock().unwrap().clone();
        eprintln!(
            "workload (ok, failed): {}",
            stats
                .iter()
                .map(|(k, (ok, bad))| format!("{k} {ok}/{bad}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!(
            "faults: {} ({})",
            faults.values().sum::<u32>(),
            faults
                .iter()
                .map(|(k, n)| format!("{k:?} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!("transactions decoded: {}", rig.slot_stats().await);
        total.txns += v.txns;
        total.changes += v.changes;
        total.messages += v.messages;
        total.deliveries += v.deliveries;
        total.unique += v.unique;
        total.duplicates += v.duplicates;
        eprintln!(
            "checked so far: {} transactions, {} changes, {} non-transactional messages; \
             {} deliveries, {} distinct ids, {} duplicates (allowed)",
            total.txns,
            total.changes,
            total.messages,
            total.deliveries,
            total.unique,
            total.duplicates
        );
        eprintln!(
            "this round: lost {} ({} of them delivered under an id another event has), \
             extra {}, mismatches {}, ids naming two events {}",
            v.lost.len(),
            v.hidden,
            v.extra.len(),
            v.mismatches.len(),
            v.collisions.len()
        );
        if !v.ok() {
            rig.diagnose(&v).await;
        }
        assert!(
            v.ok(),
            "seed {seed}: the delivery contract was broken in round {round} (see above; \
             replay with ODOO_CDC_SEED={seed} ODOO_CDC_CONTRACT_SECS={secs})"
        );
        drop(paused);
    }
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(45), t)
            .await
            .is_err()
        {
            rig.say("a workload session did not stop in 45s");
        }
    }
    rig.kill9();
    assert!(total.changes > 0, "the workload committed nothing");
    consumer.stop().await;
}

/// Waits until the connector confirmed everything written so far and the
/// queue is quiet, then judges what was delivered since the last round
/// against what the oracle decoded since then (both are consumed).
async fn judge_round(
    rig: &mut Rig,
    consumer: &ResilientConsumer,
    judged: &mut HashSet<u64>,
) -> Verdict {
    rig.check_alive();
    let end_lsn = rig.current_lsn().await.expect("current WAL position");
    let caught_up = rig.slot_reaches(&end_lsn, Duration::from_secs(120)).await;
    rig.say(&format!("slot confirmed past {end_lsn}: {caught_up}"));
    if !caught_up {
        eprintln!("the connector's slot never confirmed {end_lsn}");
    }
    // Everything confirmed is in the queue or with the consumer: wait until
    // the broker's queue is empty (a consumer that is reconnecting after a
    // broker restart would otherwise make queued events look lost), then
    // until the consumer is quiet.
    let drained = Instant::now() + Duration::from_secs(180);
    loop {
        match rig.broker.queue_depth(QUEUE) {
            Some(0) => break,
            depth if Instant::now() > drained => {
                rig.say(&format!("queue {QUEUE} still holds {depth:?} messages"));
                break;
            }
            _ => sleep_ms(1000).await,
        }
    }
    let mut last = consumer.len();
    let quiet = Instant::now() + Duration::from_secs(30);
    loop {
        sleep_ms(1500).await;
        let n = consumer.len();
        if n == last || Instant::now() > quiet {
            break;
        }
        last = n;
    }
    rig.check_alive();
    let deliveries = consumer.take();
    let oracle = read_oracle(&rig.admin().await.expect("private cluster"))
        .await
        .unwrap_or_else(|e| panic!("cannot read the test_decoding oracle: {e}"));
    judge(&deliveries, &oracle, judged)
}

#[test]
fn test_decoding_lines_parse() {
    let lines: Vec<String> = [
        "BEGIN 734",
        "table public.acct: INSERT: id[bigint]:1 owner[text]:'it''s a b' n[bigint]:null note[text]:'x: y' big[text]:null",
        "table public.acct: UPDATE: old-key: id[bigint]:1 new-tuple: id[bigint]:2 owner[text]:'new-tuple: q' big[text]:unchanged-toast-datum",
        "message: transactional: 1 prefix: contract.tx, sz: 5 content:a b c",
        "table public.item: TRUNCATE: (no-flags)",
        "table public.acct: DELETE: id[bigint]:2",
        "COMMIT 734",
        "message: transactional: 0 prefix: contract.nt, sz: 0 content:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = parse_oracle(&lines).unwrap();
    assert_eq!(o.txns.len(), 1);
    assert_eq!(o.txns[0].xid, 734);
    assert_eq!(o.txns[0].changes.len(), 5);
    assert_eq!(o.messages, vec![("contract.nt".into(), String::new())]);
    let Change::Row { new: Some(new), .. } = &o.txns[0].changes[0] else {
        panic!()
    };
    assert_eq!(new[1], ("owner".into(), Val::Text("it's a b".into())));
    assert_eq!(new[2], ("n".into(), Val::Null));
    assert_eq!(new[3], ("note".into(), Val::Text("x: y".into())));
    let Change::Row {
        old: Some(old),
        new: Some(new),
        ..
    } = &o.txns[0].changes[1]
    else {
        panic!()
    };
    assert_eq!(old, &vec![("id".to_string(), Val::Bare("1".into()))]);
    assert_eq!(new.len(), 3);
    assert_eq!(new[1].1, Val::Text("new-tuple: q".into()));
    assert_eq!(new[2].1, Val::UnchangedToast);
    let ev: Value = serde_json::from_str(
        r#"{"op":"u","source":{"table":"acct"},"key":{"id":2},"before":{"id":1},
            "after":{"id":2,"owner":"new-tuple: q"},"unchanged_toast":["big"]}"#,
    )
    .unwrap();
    assert_eq!(differs(&o.txns[0].changes[1], &ev), None);
    let wrong: Value = serde_json::from_str(
        r#"{"op":"u","source":{"table":"acct"},"key":{"id":2},"before":{"id":1},
            "after":{"id":2,"owner":"q","big":null},"unchanged_toast":[]}"#,
    )
    .unwrap();
    assert!(differs(&o.txns[0].changes[1], &wrong).is_some());
}
