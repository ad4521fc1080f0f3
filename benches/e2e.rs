//! End-to-end benchmark harness: odoo-cdc against Postgres' walsender ceiling and
//! RabbitMQ's ceiling, measured in the same run on the same WAL.
//!
//! ```text
//! eval "$(scripts/services.sh env)"
//! cargo bench --bench e2e -- [--rows 200000] [--rss-rows 1000000] [--json report.json]
//! ```
//!
//! Phases (each can be skipped with `--skip`):
//! - **throughput**: loads an Odoo-like `sale_order_line` workload (many
//!   `--txn-rows`-row transactions, inserts and ORM-style updates, plus
//!   `--big-txns` huge ones) while an untouched "origin" slot holds its start.
//!   Every measurement then drains its own copy of that slot
//!   (`pg_copy_logical_replication_slot`), so all of them read the same WAL:
//!   `pg_recvlogical` (the walsender ceiling, same pgoutput options as the
//!   connector), `odoo-cdc tail`, and `odoo-cdc run` for each granularity and
//!   queue type, each followed by a plain lapin publisher with the same message
//!   count, size, confirm window and queue type (the broker ceiling). The
//!   queue type `stream-protocol` is the stream sink instead (`run
//!   --stream-url`, a fresh stream), followed by a plain stream-protocol
//!   producer (the stream ceiling, `e2e/stream.rs`).
//! - **latency**: `odoo-cdc run` streaming while transactions are committed at a
//!   fixed rate (`--latency-rate`, default 1,000/s); a consumer compares each
//!   message's `commit_ts` with its receive time.
//! - **rss**: peak RSS (VmHWM) of `odoo-cdc run` draining one `--rss-rows`-row
//!   transaction, and `--rss-rows` one-row transactions.
//!
//! CPU is the connector process' utime+stime from /proc; peak RSS is its VmHWM.
//! Prints tables on stdout and, with `--json FILE`, the same figures as JSON.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

#[path = "e2e/broker.rs"]
mod broker;
#[path = "e2e/stream.rs"]
mod stream;

/// The queue type that stands for the stream sink (`run --stream-url`) and
/// the stream ceiling, rather than a queue declared over AMQP.
const STREAM_PROTOCOL: &str = "stream-protocol";

#[derive(Parser, Debug, Clone)]
#[command(about = "odoo-cdc end-to-end benchmark against the walsender and broker ceilings")]
struct Args {
    /// Admin URL of the PostgreSQL cluster (a database per run is created there).
    #[arg(
        long,
        env = "ODOO_CDC_TEST_PG",
        default_value = "postgres://postgres@127.0.0.1:54329/postgres"
    )]
    pg: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "ODOO_CDC_TEST_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
    /// RabbitMQ stream-protocol URL (queue type `stream-protocol`).
    #[arg(
        long,
        env = "ODOO_CDC_TEST_STREAM",
        default_value = "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f"
    )]
    stream_url: String,
    /// Changes in the throughput workload.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Rows per small transaction.
    #[arg(long, default_value_t = 10)]
    txn_rows: u64,
    /// Huge transactions in the throughput workload; together they hold a
    /// quarter of `--rows`.
    #[arg(long, default_value_t = 2)]
    big_txns: u64,
    /// Queue types for `run` (comma separated: classic, quorum, stream over
    /// AMQP 0-9-1; stream-protocol: the stream sink, `run --stream-url`).
    #[arg(
        long,
        default_value = "classic,quorum,stream,stream-protocol",
        value_delimiter = ','
    )]
    queues: Vec<String>,
    /// Granularities for `run` (comma separated: row, transaction).
    #[arg(long, default_value = "row,transaction", value_delimiter = ',')]
    granularities: Vec<String>,
    /// Unconfirmed messages in flight, for odoo-cdc and the broker ceiling.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Transactions per second in the latency phase.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u64,
    /// Rows per transaction in the latency phase (one by default, so row
    /// granularity publishes 1,000 messages/s, well under the broker ceiling).
    #[arg(long, default_value_t = 1)]
    latency_txn_rows: u64,
    /// Seconds of load in the latency phase (the first second is warm-up).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Rows of the RSS scenarios (one transaction of N rows; N one-row transactions).
    #[arg(long, default_value_t = 1_000_000)]
    rss_rows: u64,
    /// Rows of the wide-row RSS scenario (one-row transactions of --wide-mb each).
    #[arg(long, default_value_t = 1_000)]
    wide_rows: u64,
    /// Size of each wide row's text value, MB (Odoo mail bodies, attachments in
    /// the database).
    #[arg(long, default_value_t = 5)]
    wide_mb: u64,
    /// Phases to skip (comma separated: throughput, latency, rss).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// pg_recvlogical binary.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical")]
    pg_recvlogical: String,
    /// odoo-cdc binary (default: the one cargo built for this bench).
    #[arg(long, default_value = env!("CARGO_BIN_EXE_odoo-cdc"))]
    connector: String,
    /// Repetitions of each throughput measurement (alternating order); the
    /// report gives their median and spread.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Keep the benchmark database afterwards.
    #[arg(long)]
    keep: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PUBLICATION: &str = "bench";
/// Events per transaction-granularity message (odoo-cdc's default).
const EVENTS_PER_PART: u64 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.bench {
        // `cargo test --all-targets` runs bench binaries without `--bench`:
        // then prove the harness works end to end on a workload small enough
        // for CI (a debug-built connector, seconds per phase); the figures of
        // such a run mean nothing and are not the benchmark.
        println!("e2e: smoke run (use `cargo bench --bench e2e` for the benchmark)");
        args.rows = args.rows.min(2_000);
        args.big_txns = args.big_txns.min(1);
        args.rss_rows = args.rss_rows.min(2_000);
        args.wide_rows = args.wide_rows.min(5);
        args.latency_seconds = args.latency_seconds.min(2);
        args.latency_rate = args.latency_rate.min(100);
        // The first queue type, and the stream sink if asked for (a few
        // seconds more: it has code paths of its own in the harness).
        let stream_sink = args.queues.iter().any(|q| q == STREAM_PROTOCOL);
        args.queues.truncate(1);
        if stream_sink && args.queues.iter().all(|q| q != STREAM_PROTOCOL) {
            args.queues.push(STREAM_PROTOCOL.to_owned());
        }
        args.reps = 1;
    }
    if let Some(q) = args
        .queues
        .iter()
        .find(|q| !["classic", "quorum", "stream", STREAM_PROTOCOL].contains(&q.as_str()))
    {
        bail!("unknown queue type {q:?} (classic, quorum, stream, {STREAM_PROTOCOL})");
    }
    if args.txn_rows == 0 || args.rows < args.txn_rows * 10 {
        bail!("--rows must be at least ten transactions of --txn-rows rows");
    }
    let bench = Bench::create(args.clone()).await?;
    let result = bench.run_all().await;
    if !args.keep {
        bench.cleanup().await;
    }
    let report = result?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON report written to {}", path.display());
    }
    Ok(())
}

struct Bench {
    args: Args,
    db: String,
    db_url: String,
    admin: Client,
    client: Client,
    amqp: Connection,
    tag: String,
}

/// The workload as loaded: how many changes and messages each granularity sees.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    changes: u64,
    /// Transaction-granularity messages.
    txn_messages: u64,
    /// The connector is done once its slot is confirmed at or past this LSN
    /// (taken before the final marker transaction, whose change is counted).
    end_lsn: u64,
    seconds: f64,
}

/// Resources and timing of one measured process.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
    /// Bytes the process wrote to stdout (pipes drained by the harness).
    out_bytes: u64,
}

impl Bench {
    async fn create(args: Args) -> anyhow::Result<Bench> {
        let admin = connect(&args.pg).await?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() % 100_000_000;
        let tag = format!("{}_{nanos}", std::process::id());
        let db = format!("odoo_cdc_bench_{tag}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .context("creating the benchmark database")?;
        let db_url = with_dbname(&args.pg, &db);
        let client = connect(&db_url).await?;
        client
            .batch_execute(&format!(
                "{SCHEMA}\nCREATE PUBLICATION {PUBLICATION} FOR TABLE sale_order_line, mail_blob;"
            ))
            .await
            .context("creating the schema")?;
        let amqp = Connection::connect(&args.amqp, ConnectionProperties::default());
        let amqp = tokio::time::timeout(broker::STEP, amqp)
            .await
            .context("connecting to RabbitMQ: timed out")?
            .context("connecting to RabbitMQ")?;
        Ok(Bench {
            args,
            db,
            db_url,
            admin,
            client,
            amqp,
            tag,
        })
    }

    async fn cleanup(&self) {
        // This session's temporary slots are active: DROP DATABASE would
        // refuse while they exist.
        let _ = self
            .client
            .batch_execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE temporary AND active_pid = pg_backend_pid()",
            )
            .await;
        let _ = self
            .admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = '{}' AND NOT active",
                self.db
            ))
            .await;
        let _ = self
            .admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
            .await;
    }

    async fn run_all(&self) -> anyhow::Result<Value> {
        let skip = |p: &str| self.args.skip.iter().any(|s| s == p);
        let mut report = json!({
            "machine": machine(),
            "config": {
                "rows": self.args.rows, "txn_rows": self.args.txn_rows, "big_txns": self.args.big_txns,
                "window": self.args.window, "latency_rate": self.args.latency_rate,
                "latency_txn_rows": self.args.latency_txn_rows, "rss_rows": self.args.rss_rows,
            },
        });
        if !skip("throughput") {
            report["throughput"] = self.throughput().await?;
        }
        if !skip("latency") {
            report["latency"] = self.latency().await?;
        }
        if !skip("rss") {
            report["rss"] = self.rss().await?;
        }
        Ok(report)
    }

    // ---------------------------------------------------------------- throughput

    async fn throughput(&self) -> anyhow::Result<Value> {
        let a = &self.args;
        self.create_held_slot(&self.slot("origin")).await?;
        let big_rows = (a.rows / 4).checked_div(a.big_txns).unwrap_or(0);
        let small_txns = (a.rows - big_rows * a.big_txns) / a.txn_rows;
        eprintln!(
            "loading {small_txns} transactions of {} rows and {} of {big_rows} rows...",
            a.txn_rows, a.big_txns
        );
        let loaded = self
            .load(small_txns, a.txn_rows, a.big_txns, big_rows)
            .await?;
        eprintln!(
            "loaded {} changes in {:.1} s",
            loaded.changes, loaded.seconds
        );
        // The event size (for the broker ceilings' message sizes) comes from
        // a first `tail`, which also warms the caches every later run reads.
        let warm = self.tail(&loaded).await?;
        let event_size = warm.out_bytes as f64 / loaded.changes as f64 - 1.0;
        let mut plan = vec![
            Measure::Walsender { proto: 2 },
            Measure::Walsender { proto: 1 },
            Measure::Tail,
        ];
        for gran in &a.granularities {
            let (messages, size) = match gran.as_str() {
                "row" => (loaded.changes, event_size),
                "transaction" => (
                    loaded.txn_messages,
                    // Events, commas and the envelope (~130 bytes).
                    (loaded.changes as f64 * (event_size + 1.0)
                        + loaded.txn_messages as f64 * 130.0)
                        / loaded.txn_messages as f64,
                ),
                other => bail!("unknown granularity {other:?} (row or transaction)"),
            };
            for qt in &a.queues {
                let (gran, qt) = (gran.clone(), qt.clone());
                plan.push(Measure::Run {
                    gran: gran.clone(),
                    qt: qt.clone(),
                    messages,
                });
                plan.push(Measure::Broker {
                    gran,
                    qt,
                    messages,
                    size,
                });
            }
        }
        // Repetitions alternate the order (forward, backward, ...), so that
        // no measurement always runs first or last on a machine whose load
        // drifts; each figure is the median of its repetitions.
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); plan.len()];
        for rep in 0..a.reps.max(1) {
            let order: Vec<usize> = if rep % 2 == 0 {
                (0..plan.len()).collect()
            } else {
                (0..plan.len()).rev().collect()
            };
            for i in order {
                eprintln!("repetition {} of {}: {}", rep + 1, a.reps, plan[i].name());
                let s = self.measure(&plan[i], &loaded).await?;
                samples[i].push(s);
            }
        }
        self.drop_held_slot(&self.slot("origin")).await?;
        Ok(json!({
            "workload": {
                "changes": loaded.changes, "small_txns": small_txns, "txn_rows": a.txn_rows,
                "big_txns": a.big_txns, "big_txn_rows": big_rows,
                "transaction_messages": loaded.txn_messages,
                "event_json_bytes": event_size.round(),
                "load_seconds": r3(loaded.seconds),
                "repetitions": a.reps,
            },
            "rows": throughput_rows(&plan, &samples, &loaded),
        }))
    }

    /// One measurement of `m`, with the machine's load around it.
    async fn measure(&self, m: &Measure, loaded: &Loaded) -> anyhow::Result<Sample> {
        let load_before = load1();
        let watch = CpuWatch::start();
        let (usage, changes, messages) = match m {
            Measure::Walsender { proto } => {
                let u = self.walsender_ceiling(loaded, *proto).await?;
                (u, loaded.changes as f64, loaded.changes)
            }
            Measure::Tail => (
                self.tail(loaded).await?,
                loaded.changes as f64,
                loaded.changes,
            ),
            Measure::Run { gran, qt, messages } if qt == STREAM_PROTOCOL => {
                let u = self.run_stream_sink(loaded, gran, *messages).await?;
                (u, loaded.changes as f64, *messages)
            }
            Measure::Run { gran, qt, messages } => {
                let u = self.run_connector(loaded, gran, qt, *messages).await?;
                (u, loaded.changes as f64, *messages)
            }
            Measure::Broker {
                qt, messages, size, ..
            } => {
                let (secs, sent) = if qt == STREAM_PROTOCOL {
                    self.stream_ceiling(*messages, size.round() as usize)
                        .await?
                } else {
                    self.broker_ceiling(qt, *messages, size.round() as usize)
                        .await?
                };
                let per_msg = loaded.changes as f64 / *messages as f64;
                let usage = Usage {
                    seconds: secs,
                    ..Usage::default()
                };
                (usage, sent as f64 * per_msg, sent)
            }
        };
        let spent = watch.finish();
        Ok(Sample {
            machine_busy: spent.machine_busy,
            postgres_cpu_s_per_million: spent.postgres_s / changes * 1e6,
            rabbitmq_cpu_s_per_million: spent.rabbitmq_s / changes * 1e6,
            changes_per_s: changes / usage.seconds,
            messages,
            usage,
            cpu_s_per_million: usage.cpu_seconds / changes * 1e6,
            load1: (load_before + load1()) / 2.0,
        })
    }

    /// Loads the workload: `small` transactions of `txn_rows` rows (four in
    /// five insert order lines, the fifth updates the previous one's lines,
    /// as confirming an order does), with `big` transactions of `big_rows`
    /// inserts half-way, then one marker transaction.
    async fn load(
        &self,
        small: u64,
        txn_rows: u64,
        big: u64,
        big_rows: u64,
    ) -> anyhow::Result<Loaded> {
        let start = Instant::now();
        self.client
            .batch_execute("SET synchronous_commit = off")
            .await?;
        let half = small / 2;
        self.client
            .batch_execute(&small_txns_sql(0, half, txn_rows, 0))
            .await
            .context("loading small transactions")?;
        for b in 0..big {
            self.client
                .batch_execute(&format!(
                    "SET synchronous_commit = off; {}",
                    insert_sql(&format!("{}", -(b as i64) - 1), big_rows)
                ))
                .await
                .context("loading a big transaction")?;
        }
        self.client
            .batch_execute(&small_txns_sql(half, small, txn_rows, 0))
            .await
            .context("loading small transactions")?;
        let end_lsn = self.mark_end().await?;
        let changes = small * txn_rows + big * big_rows + 1;
        let txn_messages = small + big * big_rows.div_ceil(EVENTS_PER_PART) + 1;
        Ok(Loaded {
            changes,
            txn_messages,
            end_lsn,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Takes the end LSN and commits one marker row after it: a connector has
    /// read everything before the marker once its slot passes that LSN.
    async fn mark_end(&self) -> anyhow::Result<u64> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?;
        let end = parse_lsn(row.get(0))?;
        self.client
            .batch_execute(&format!(
                "SET synchronous_commit = on; {}",
                insert_sql("0", 1)
            ))
            .await
            .context("committing the end marker")?;
        Ok(end)
    }

    /// A slot name of this run: slot names are global to the cluster, and
    /// other runs of the harness (other worktrees, the smoke test) drop
    /// theirs by name.
    fn slot(&self, what: &str) -> String {
        format!("bench_{what}_{}", self.tag)
    }

    async fn create_slot(&self, name: &str) -> anyhow::Result<()> {
        self.client
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
                &[&name],
            )
            .await
            .with_context(|| format!("creating slot {name}"))?;
        Ok(())
    }

    /// A temporary slot of the harness' own session. It shows as active
    /// for as long as the session lives, so nothing that drops inactive
    /// slots takes it away in the minutes it only holds WAL
    /// (`scripts/services.sh up`, run by anyone on a shared machine, drops
    /// every inactive slot of the cluster), and it goes if the harness dies.
    async fn create_held_slot(&self, name: &str) -> anyhow::Result<()> {
        self.client
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)::text",
                &[&name],
            )
            .await
            .with_context(|| format!("creating temporary slot {name}"))?;
        Ok(())
    }

    async fn drop_held_slot(&self, name: &str) -> anyhow::Result<()> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
            .with_context(|| format!("dropping temporary slot {name}"))?;
        Ok(())
    }

    /// A persistent copy `to` of slot `from` (which may be temporary).
    async fn copy_slot(&self, from: &str, to: &str) -> anyhow::Result<()> {
        self.client
            .query_one(
                "SELECT pg_copy_logical_replication_slot($1, $2, false)::text",
                &[&from, &to],
            )
            .await
            .with_context(|| format!("copying slot {from} to {to}"))?;
        Ok(())
    }

    async fn copy_origin(&self, name: &str) -> anyhow::Result<()> {
        self.copy_slot(&self.slot("origin"), name).await
    }

    /// Drops a slot once its walsender has gone (up to 30 s).
    async fn drop_slot(&self, name: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .client
                .query(
                    "SELECT pg_drop_replication_slot(slot_name)::text FROM pg_replication_slots \
                     WHERE slot_name = $1 AND NOT active",
                    &[&name],
                )
                .await;
            let gone = self
                .client
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await?
                .is_empty();
            if gone {
                return Ok(());
            }
            if Instant::now() > deadline {
                r.with_context(|| format!("dropping slot {name}"))?;
                bail!("slot {name} still active after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn confirmed_lsn(&self, slot: &str) -> anyhow::Result<u64> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .with_context(|| format!("reading slot {slot}"))?;
        parse_lsn(row.get(0))
    }

    /// `pg_recvlogical` draining a copy of the origin slot into a pipe the
    /// harness discards, up to the end LSN: with the connector's pgoutput
    /// options (`proto`=2: streaming, messages) or the plainest ones
    /// (`proto`=1: no streaming, no messages), to show what the options cost.
    async fn walsender_ceiling(&self, loaded: &Loaded, proto: u8) -> anyhow::Result<Usage> {
        let slot = self.slot(&format!("recvlogical_{proto}"));
        self.copy_origin(&slot).await?;
        let mut cmd = Command::new(&self.args.pg_recvlogical);
        cmd.args(["-d", &self.db_url, "--slot", &slot, "--start", "--no-loop"]);
        if proto == 2 {
            cmd.args([
                "-o",
                "proto_version=2",
                "-o",
                "streaming=on",
                "-o",
                "messages=true",
            ]);
        } else {
            cmd.args(["-o", "proto_version=1"]);
        }
        cmd.args(["-o", &format!("publication_names={PUBLICATION}")])
            .args(["--endpos", &format_lsn(loaded.end_lsn), "-f", "-"]);
        let mut p = Measured::spawn(cmd, true)?;
        let usage = loop {
            if let Some(status) = p.child.try_wait()? {
                if !status.success() {
                    bail!("pg_recvlogical failed: {status}");
                }
                break p.usage_at_exit();
            }
            p.sample();
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.drop_slot(&slot).await?;
        Ok(usage)
    }

    /// `odoo-cdc tail` into a pipe the harness discards; done when every
    /// change's line has arrived.
    async fn tail(&self, loaded: &Loaded) -> anyhow::Result<Usage> {
        let slot = &self.slot("tail");
        self.copy_origin(slot).await?;
        let mut cmd = Command::new(&self.args.connector);
        cmd.args(["tail", "--source", &self.db_url, "--slot", slot])
            .args(["--publication", PUBLICATION])
            .env("ODOO_CDC_LOG", "warn");
        let mut p = Measured::spawn(cmd, true)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let usage = loop {
            if p.lines.load(Ordering::Relaxed) >= loaded.changes {
                break p.usage_now();
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("odoo-cdc tail exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("odoo-cdc tail did not finish within an hour");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        p.stop();
        self.drop_slot(slot).await?;
        Ok(usage)
    }

    /// `odoo-cdc run` draining a copy of the origin slot into a queue the
    /// harness declared; done when the queue holds every message (classic,
    /// quorum) or the slot is confirmed past the end (streams).
    async fn run_connector(
        &self,
        loaded: &Loaded,
        gran: &str,
        qt: &str,
        messages: u64,
    ) -> anyhow::Result<Usage> {
        let slot = self.slot(&format!("run_{gran}_{qt}"));
        self.copy_origin(&slot).await?;
        let exchange = format!("odoo-cdc-bench-{}-{gran}-{qt}", self.tag);
        let queue = exchange.clone();
        let channel = self.channel().await?;
        broker::declare_exchange(&channel, &exchange).await?;
        broker::declare_queue(&channel, &exchange, &queue, qt, FieldTable::default()).await?;
        let mut cmd = self.run_command(&slot, &exchange, gran);
        cmd.args([
            "--queue",
            &queue,
            "--queue-type",
            qt,
            "--queue-binding",
            "#",
        ]);
        let mut p = Measured::spawn(cmd, false)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let usage = loop {
            let done = if qt == "stream" {
                self.confirmed_lsn(&slot).await? >= loaded.end_lsn
            } else {
                u64::from(broker::queue_len(&channel, &queue).await?) >= messages
            };
            if done {
                break p.usage_now();
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("odoo-cdc run exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("odoo-cdc run did not finish within an hour");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        p.stop();
        broker::delete(&channel, &exchange, &queue).await?;
        self.drop_slot(&slot).await?;
        Ok(usage)
    }

    /// `odoo-cdc run --stream-url` (the stream sink) draining a copy of the
    /// origin slot into a fresh stream. Timed to the broker's confirm of the
    /// last message (the connector's `/metrics` counts confirms), like the
    /// AMQP rows, which end when the queue holds every message: the slot's
    /// confirmed LSN lags by up to the status period (0.5 s, a tenth of a
    /// 400k-row run). Done, as a check, once the slot is confirmed past the
    /// end. The stream is deleted afterwards.
    async fn run_stream_sink(
        &self,
        loaded: &Loaded,
        gran: &str,
        messages: u64,
    ) -> anyhow::Result<Usage> {
        let slot = self.slot(&format!("run_{gran}_stream_protocol"));
        self.copy_origin(&slot).await?;
        let name = format!("odoo-cdc-bench-{}-{gran}-{STREAM_PROTOCOL}", self.tag);
        let mut cmd = Command::new(&self.args.connector);
        cmd.args(["run", "--source", &self.db_url])
            .args(["--stream-url", &self.args.stream_url, "--stream", &name])
            .args(["--slot", &slot, "--publication", PUBLICATION])
            .args(["--granularity", gran])
            .args(["--window", &self.args.window.to_string()])
            .env("ODOO_CDC_LOG", "warn");
        let metrics = free_port()?;
        cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
        let mut p = Measured::spawn(cmd, false)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut confirmed_all = None;
        let usage = loop {
            if confirmed_all.is_none() && confirms(metrics).await.is_some_and(|n| n >= messages) {
                confirmed_all = Some(p.usage_now());
            }
            if let Some(usage) = confirmed_all
                && self.confirmed_lsn(&slot).await? >= loaded.end_lsn
            {
                break Ok(usage);
            }
            if let Some(status) = p.child.try_wait()? {
                break Err(anyhow::anyhow!("odoo-cdc run exited early: {status}"));
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "odoo-cdc run did not finish within an hour"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        p.stop();
        let cfg = odoo_cdc::sink::stream::StreamConfig::new(&self.args.stream_url, &name, "bench")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        odoo_cdc::sink::stream::consumer::delete_stream(&cfg)
            .await
            .map_err(|e| anyhow::anyhow!("deleting stream {name:?}: {e}"))?;
        self.drop_slot(&slot).await?;
        usage
    }

    /// The stream ceiling: `messages` (at most 100,000) of `size` bytes to a
    /// fresh stream, same window. Returns (seconds, messages sent).
    async fn stream_ceiling(&self, messages: u64, size: usize) -> anyhow::Result<(f64, u64)> {
        let messages = messages.min(100_000);
        let name = format!("odoo-cdc-bench-{}-ceiling-{STREAM_PROTOCOL}", self.tag);
        let secs = stream::publish(
            &self.args.stream_url,
            &name,
            messages,
            size,
            self.args.window,
        )
        .await?;
        Ok((secs, messages))
    }

    fn run_command(&self, slot: &str, exchange: &str, gran: &str) -> Command {
        let mut cmd = Command::new(&self.args.connector);
        cmd.args(["run", "--source", &self.db_url, "--amqp", &self.args.amqp])
            .args(["--slot", slot, "--publication", PUBLICATION])
            .args(["--exchange", exchange, "--granularity", gran])
            .args(["--window", &self.args.window.to_string()])
            .env("ODOO_CDC_LOG", "warn,lapin=error");
        cmd
    }

    /// A plain lapin publisher: `messages` (at most 100,000) of `size` bytes,
    /// same window and queue type. Returns (seconds, messages sent).
    async fn broker_ceiling(
        &self,
        qt: &str,
        messages: u64,
        size: usize,
    ) -> anyhow::Result<(f64, u64)> {
        let messages = messages.min(100_000);
        let exchange = format!("odoo-cdc-bench-{}-ceiling-{qt}", self.tag);
        let channel = self.channel().await?;
        broker::declare_exchange(&channel, &exchange).await?;
        broker::declare_queue(&channel, &exchange, &exchange, qt, FieldTable::default()).await?;
        let secs = broker::publish(
            &channel,
            &exchange,
            messages,
            size,
            self.args.window,
            broker::event_properties,
        )
        .await;
        broker::delete(&channel, &exchange, &exchange).await?;
        Ok((secs?, messages))
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        tokio::time::timeout(broker::STEP, self.amqp.create_channel())
            .await
            .context("opening a channel: timed out")?
            .context("opening a channel")
    }

    // ------------------------------------------------------------------- latency

    async fn latency(&self) -> anyhow::Result<Value> {
        let mut out = Vec::new();
        for gran in &self.args.granularities {
            out.push(self.latency_one(gran, "classic").await?);
        }
        Ok(Value::Array(out))
    }

    async fn latency_one(&self, gran: &str, qt: &str) -> anyhow::Result<Value> {
        let a = &self.args;
        let slot = self.slot(&format!("latency_{gran}"));
        self.create_slot(&slot).await?;
        let exchange = format!("odoo-cdc-bench-{}-latency-{gran}", self.tag);
        let channel = self.channel().await?;
        broker::declare_exchange(&channel, &exchange).await?;
        broker::declare_queue(&channel, &exchange, &exchange, qt, FieldTable::default()).await?;
        let consumer = Consumer::start(&channel, &exchange).await?;

        let mut cmd = self.run_command(&slot, &exchange, gran);
        cmd.args([
            "--queue",
            &exchange,
            "--queue-type",
            qt,
            "--queue-binding",
            "#",
        ]);
        let mut p = Measured::spawn(cmd, false)?;
        self.wait_active(&slot).await?;
        eprintln!(
            "measuring latency: {gran} granularity, {} transactions/s of {} rows for {} s...",
            a.latency_rate, a.latency_txn_rows, a.latency_seconds
        );
        let warmup_until = unix_micros() + 1_000_000;
        let txns = a.latency_rate * a.latency_seconds;
        let gen_start = Instant::now();
        self.generate(txns, a.latency_rate, a.latency_txn_rows)
            .await?;
        let gen_secs = gen_start.elapsed().as_secs_f64();
        let expect = if gran == "row" {
            txns * a.latency_txn_rows
        } else {
            txns
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while consumer.count() < expect {
            if Instant::now() > deadline {
                bail!(
                    "latency: only {} of {expect} messages arrived within 120 s",
                    consumer.count()
                );
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("odoo-cdc run exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let usage = p.usage_now();
        p.stop();
        let mut lat = consumer.latencies_after(warmup_until);
        drop(consumer);
        broker::delete(&channel, &exchange, &exchange).await?;
        self.drop_slot(&slot).await?;
        if lat.is_empty() {
            bail!("latency: no message after the warm-up second");
        }
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        Ok(json!({
            "granularity": gran, "queue_type": qt,
            "target_tps": a.latency_rate,
            "achieved_tps": (txns as f64 / gen_secs).round(),
            "rows_per_txn": a.latency_txn_rows,
            "messages": expect, "samples": lat.len(),
            "p50_ms": r1(pct(0.5)), "p99_ms": r1(pct(0.99)), "max_ms": r1(pct(1.0)),
            "cpu_s_per_million": r3(usage.cpu_seconds / (txns * a.latency_txn_rows) as f64 * 1e6),
            "peak_rss_mib": r1(usage.peak_rss_kib as f64 / 1024.0),
        }))
    }

    async fn wait_active(&self, slot: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self
                .client
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await?;
            if !rows.is_empty() {
                // Let the session finish starting (publisher, sink).
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("slot {slot} not in use by the connector after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commits `txns` transactions at `rate` per second from four connections
    /// (a late transaction is sent at once: the schedule is not skipped).
    async fn generate(&self, txns: u64, rate: u64, rows: u64) -> anyhow::Result<()> {
        const CONNS: u64 = 4;
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for k in 0..CONNS {
            let client = connect(&self.db_url).await?;
            tasks.push(tokio::spawn(async move {
                let mut i = k;
                while i < txns {
                    let due = start + Duration::from_micros(i * 1_000_000 / rate);
                    tokio::time::sleep_until(due).await;
                    client
                        .batch_execute(&insert_sql(&format!("{}", 1_000_000 + i), rows))
                        .await?;
                    i += CONNS;
                }
                Ok::<(), tokio_postgres::Error>(())
            }));
        }
        for t in tasks {
            t.await?.context("latency load")?;
        }
        Ok(())
    }

    // ----------------------------------------------------------------------- rss

    async fn rss(&self) -> anyhow::Result<Value> {
        let n = self.args.rss_rows;
        let mut out = Vec::new();
        let wide = self.args.wide_rows;
        let mb = self.args.wide_mb;
        for (what, kind) in [
            (format!("one transaction of {n} rows"), "big"),
            (format!("{n} one-row transactions"), "small"),
            (format!("{wide} one-row transactions of {mb} MB"), "wide"),
        ] {
            let one_txn = kind == "big";
            let slot = self.slot(&format!("rss_{kind}"));
            // Held while loading (minutes at 1M rows), copied when the
            // connector starts.
            let held = self.slot(&format!("rss_{kind}_held"));
            self.create_held_slot(&held).await?;
            eprintln!("loading {what}...");
            let changes = if kind == "wide" { wide } else { n + 1 };
            if kind == "wide" {
                // Random-looking text that TOAST cannot compress away: the
                // walsender sends each value whole.
                self.client
                    .batch_execute("SET synchronous_commit = off")
                    .await?;
                // Alone in its query: COMMIT inside DO needs no outer block.
                self.client
                    .batch_execute(&format!(
                        "DO $$ BEGIN FOR i IN 1..{wide} LOOP
                           INSERT INTO mail_blob (body)
                           SELECT string_agg(md5(i::text || g::text), '')
                           FROM generate_series(1, {mb} * 1000000 / 32) g;
                           COMMIT;
                         END LOOP; END $$;"
                    ))
                    .await?;
            } else if one_txn {
                self.client
                    .batch_execute(&format!(
                        "SET synchronous_commit = off; {}",
                        insert_sql("-100", n)
                    ))
                    .await?;
            } else {
                self.client
                    .batch_execute("SET synchronous_commit = off")
                    .await?;
                self.client
                    .batch_execute(&small_txns_sql(0, n, 1, 10_000_000))
                    .await?;
            }
            let end_lsn = self.mark_end().await?;
            self.copy_slot(&held, &slot).await?;
            self.drop_held_slot(&held).await?;
            // A classic queue capped at 10,000 messages (oldest dropped, still
            // confirmed): the broker is not what is measured here, and a
            // million persistent messages would load it for everyone else.
            let exchange = format!("odoo-cdc-bench-{}-rss", self.tag);
            let channel = self.channel().await?;
            broker::declare_exchange(&channel, &exchange).await?;
            let mut cap = FieldTable::default();
            let keep = if kind == "wide" { 10 } else { 10_000 };
            cap.insert("x-max-length".into(), AMQPValue::LongLongInt(keep));
            broker::declare_queue(&channel, &exchange, &exchange, "classic", cap).await?;
            eprintln!("measuring odoo-cdc run (row granularity) on {what}...");
            let mut p = Measured::spawn(self.run_command(&slot, &exchange, "row"), false)?;
            let deadline = Instant::now() + Duration::from_secs(7200);
            let usage = loop {
                if self.confirmed_lsn(&slot).await? >= end_lsn {
                    break p.usage_now();
                }
                if let Some(status) = p.child.try_wait()? {
                    bail!("odoo-cdc run exited early: {status}");
                }
                if Instant::now() > deadline {
                    bail!("odoo-cdc run did not finish within two hours");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            p.stop();
            broker::delete(&channel, &exchange, &exchange).await?;
            self.drop_slot(&slot).await?;
            out.push(json!({
                "scenario": what, "changes": changes,
                "seconds": r3(usage.seconds),
                "changes_per_s": (changes as f64 / usage.seconds).round(),
                "cpu_s_per_million": r3(usage.cpu_seconds / changes as f64 * 1e6),
                "peak_rss_mib": r1(usage.peak_rss_kib as f64 / 1024.0),
            }));
        }
        Ok(Value::Array(out))
    }
}

const SCHEMA: &str = "
CREATE TABLE mail_blob (id serial PRIMARY KEY, body text NOT NULL);
CREATE TABLE sale_order_line (
    id               serial PRIMARY KEY,
    order_id         integer NOT NULL,
    sequence         integer DEFAULT 10,
    product_id       integer,
    name             jsonb NOT NULL,
    product_uom_qty  numeric NOT NULL,
    price_unit       numeric NOT NULL,
    price_subtotal   numeric,
    discount         double precision,
    state            varchar,
    display_type     varchar,
    is_downpayment   boolean,
    note             text,
    create_uid       integer,
    create_date      timestamp without time zone,
    write_uid        integer,
    write_date       timestamp without time zone
);
CREATE INDEX sale_order_line_order_id_index ON sale_order_line (order_id);
";

/// An INSERT of `rows` Odoo-like order lines for order `order` (an SQL expression).
fn insert_sql(order: &str, rows: u64) -> String {
    format!(
        "INSERT INTO sale_order_line (order_id, sequence, product_id, name, product_uom_qty, \
         price_unit, price_subtotal, discount, state, is_downpayment, note, create_uid, \
         create_date, write_uid, write_date) \
         SELECT {order}, 10 * g, 1000 + g % 97, \
         jsonb_build_object('en_US', '[FURN_' || (1000 + g % 97) || '] Office chair ' || g, \
                            'fr_FR', 'Chaise de bureau ' || g), \
         g % 5 + 1, round((g % 1000) * 1.37, 2), round((g % 5 + 1) * (g % 1000) * 1.37, 2), \
         CASE WHEN g % 4 = 0 THEN 5.0 ELSE 0 END, 'draft', false, \
         CASE WHEN g % 3 = 0 THEN 'Deliver before noon' END, 2, now(), 2, now() \
         FROM generate_series(1, {rows}) g"
    )
}

/// A DO block committing transactions `from..to`: each inserts `rows` lines,
/// except every fifth, which updates the previous transaction's lines.
fn small_txns_sql(from: u64, to: u64, rows: u64, base: u64) -> String {
    let insert = insert_sql(&format!("{base} + i"), rows);
    format!(
        "DO $$ BEGIN FOR i IN {from}..{} LOOP
  IF i % 5 = 4 AND i > {from} THEN
    UPDATE sale_order_line SET state = 'sale', write_date = now() WHERE order_id = {base} + i - 1;
  ELSE
    {insert};
  END IF;
  COMMIT;
END LOOP; END $$;",
        to as i64 - 1
    )
}

/// A spawned process whose stdout is counted and discarded, with its
/// /proc figures.
struct Measured {
    child: Child,
    start: Instant,
    lines: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    last: Usage,
}

impl Measured {
    /// Starts `cmd`; with `count_stdout`, its stdout is a pipe the harness
    /// drains, counting lines and bytes.
    fn spawn(mut cmd: Command, count_stdout: bool) -> anyhow::Result<Measured> {
        let lines = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        cmd.stdin(Stdio::null());
        cmd.stdout(if count_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        if let Some(mut out) = child.stdout.take() {
            let (lines, bytes) = (lines.clone(), bytes.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let nl = buf[..n].iter().filter(|&&b| b == b'\n').count();
                    lines.fetch_add(nl as u64, Ordering::Relaxed);
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
        Ok(Measured {
            child,
            start,
            lines,
            bytes,
            last: Usage::default(),
        })
    }

    /// Reads the process' CPU time and peak RSS now.
    fn sample(&mut self) {
        let pid = self.child.id();
        if let Some(cpu) = cpu_seconds(pid) {
            self.last.cpu_seconds = cpu;
        }
        if let Some(rss) = peak_rss_kib(pid) {
            self.last.peak_rss_kib = rss;
        }
    }

    fn usage_now(&mut self) -> Usage {
        let seconds = self.start.elapsed().as_secs_f64();
        self.sample();
        Usage {
            seconds,
            out_bytes: self.bytes.load(Ordering::Relaxed),
            ..self.last
        }
    }

    /// After the process exited: the last sampled /proc figures.
    fn usage_at_exit(&mut self) -> Usage {
        Usage {
            seconds: self.start.elapsed().as_secs_f64(),
            out_bytes: self.bytes.load(Ordering::Relaxed),
            ..self.last
        }
    }

    /// SIGTERM, then SIGKILL after 30 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One configuration of the throughput phase.
#[derive(Debug, Clone)]
enum Measure {
    /// pg_recvlogical: the walsender's ceiling with protocol `proto`'s options.
    Walsender {
        proto: u8,
    },
    Tail,
    Run {
        gran: String,
        qt: String,
        messages: u64,
    },
    /// A plain lapin publisher with `run`'s message count, size and window;
    /// for `stream-protocol`, a plain stream-protocol producer (`e2e/stream.rs`).
    Broker {
        gran: String,
        qt: String,
        messages: u64,
        size: f64,
    },
}

impl Measure {
    fn name(&self) -> String {
        match self {
            Measure::Walsender { proto: 2 } => {
                "walsender ceiling: pg_recvlogical proto 2, streaming, messages".into()
            }
            Measure::Walsender { proto } => {
                format!("walsender ceiling: pg_recvlogical proto {proto}, no streaming")
            }
            Measure::Tail => "odoo-cdc tail > pipe".into(),
            Measure::Run { gran, qt, .. } => format!("odoo-cdc run {gran} {qt}"),
            Measure::Broker { gran, qt, .. } if qt == STREAM_PROTOCOL => {
                format!("broker ceiling stream protocol ({gran} messages)")
            }
            Measure::Broker { gran, qt, .. } => format!("broker ceiling {qt} ({gran} messages)"),
        }
    }
}

/// One repetition of one measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    changes_per_s: f64,
    messages: u64,
    usage: Usage,
    cpu_s_per_million: f64,
    /// The 1-minute load average around the measurement (mean of before and after).
    load1: f64,
    /// Busy fraction of all CPUs during the measurement.
    machine_busy: f64,
    /// CPU of all PostgreSQL processes (the walsender, mostly) per million changes.
    postgres_cpu_s_per_million: f64,
    /// CPU of RabbitMQ (beam.smp) per million changes.
    rabbitmq_cpu_s_per_million: f64,
}

/// The machine's 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Median, min and max of the figures.
fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    (median, xs[0], xs[n - 1])
}

/// The report's rows: per measurement, the median of its repetitions, their
/// spread ((max - min) / median), the load around them, and for `run` the
/// ratio to its ceiling, min(tail, broker) measured in the same harness run.
fn throughput_rows(plan: &[Measure], samples: &[Vec<Sample>], loaded: &Loaded) -> Vec<Value> {
    let median_of = |i: usize, f: fn(&Sample) -> f64| stats(samples[i].iter().map(f).collect());
    let find = |want: &dyn Fn(&Measure) -> bool| plan.iter().position(want);
    let rate = |i: usize| median_of(i, |s| s.changes_per_s).0;
    let tail = find(&|m| matches!(m, Measure::Tail));
    let tail_rate = tail.map(rate).unwrap_or(0.0);
    let tail_cpu = tail.map(|i| median_of(i, |s| s.cpu_s_per_million).0);
    let walsender = find(&|m| matches!(m, Measure::Walsender { proto: 2 }))
        .map(rate)
        .unwrap_or(0.0);
    let mut rows = Vec::new();
    for (i, m) in plan.iter().enumerate() {
        let (median, min, max) = median_of(i, |s| s.changes_per_s);
        let (cpu, cpu_min, cpu_max) = median_of(i, |s| s.cpu_s_per_million);
        let (secs, _, _) = median_of(i, |s| s.usage.seconds);
        let (load, _, load_max) = median_of(i, |s| s.load1);
        let mut row = json!({
            "what": m.name(),
            "repetitions": samples[i].len(),
            "changes_per_s": median.round(),
            "changes_per_s_min": min.round(),
            "changes_per_s_max": max.round(),
            "spread_pct": r1(if median > 0.0 { (max - min) / median * 100.0 } else { 0.0 }),
            "seconds": r3(secs),
            "messages": samples[i].first().map_or(0, |s| s.messages),
            "load1": r1(load),
            "load1_max": r1(load_max),
            "all_changes_per_s": samples[i].iter().map(|s| s.changes_per_s.round()).collect::<Vec<_>>(),
            "machine_busy_pct": r1(median_of(i, |s| s.machine_busy).0 * 100.0),
            "postgres_cpu_s_per_million": r3(median_of(i, |s| s.postgres_cpu_s_per_million).0),
            "rabbitmq_cpu_s_per_million": r3(median_of(i, |s| s.rabbitmq_cpu_s_per_million).0),
        });
        if !matches!(m, Measure::Broker { .. }) {
            row["cpu_s_per_million"] = json!(r3(cpu));
            row["cpu_spread_pct"] = json!(r1(if cpu > 0.0 {
                (cpu_max - cpu_min) / cpu * 100.0
            } else {
                0.0
            }));
            let rss = samples[i]
                .iter()
                .map(|s| s.usage.peak_rss_kib)
                .max()
                .unwrap_or(0);
            row["peak_rss_mib"] = json!(r1(rss as f64 / 1024.0));
        }
        match m {
            Measure::Tail => {
                row["ceiling"] = json!("walsender (proto 2)");
                row["ceiling_changes_per_s"] = json!(walsender.round());
                row["ratio"] = json!(r3(median / walsender));
            }
            Measure::Run { gran, qt, .. } => {
                let broker = find(&|x| {
                    matches!(x, Measure::Broker { gran: g, qt: q, .. } if g == gran && q == qt)
                })
                .map(rate)
                .unwrap_or(f64::INFINITY);
                let (ceiling, bound) = if broker < tail_rate {
                    ("broker", broker)
                } else {
                    ("tail", tail_rate)
                };
                row["ceiling"] = json!(ceiling);
                row["ceiling_changes_per_s"] = json!(bound.round());
                row["ratio"] = json!(r3(median / bound));
                row["target_ratio"] = json!(0.9);
                if let Some(t) = tail_cpu {
                    row["cpu_vs_tail"] = json!(r3(cpu / t));
                    if gran == "row" {
                        row["cpu_vs_tail_target"] = json!(2.0);
                    }
                }
                let messages = samples[i].first().map_or(0, |s| s.messages) as f64;
                row["messages_per_s"] = json!((median / loaded.changes as f64 * messages).round());
            }
            _ => {}
        }
        rows.push(row);
    }
    rows
}

/// Where the machine's CPU went during a measurement: the whole machine
/// (/proc/stat) and the PostgreSQL and RabbitMQ processes (summed by command
/// name, sampled every 50 ms so that a walsender that exits at the end is
/// still counted). Tells a connector that waits from a machine that is full.
struct CpuWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<CpuSpent>>,
}

/// CPU seconds spent during a watch.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSpent {
    /// Busy fraction of all CPUs (0..1).
    machine_busy: f64,
    postgres_s: f64,
    rabbitmq_s: f64,
}

impl CpuWatch {
    fn start() -> CpuWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (busy0, total0) = machine_ticks();
                // pid -> (command, ticks when first seen, ticks last seen)
                let mut seen: std::collections::HashMap<u32, (String, f64, f64)> =
                    std::collections::HashMap::new();
                let mut first = true;
                loop {
                    for (pid, comm, ticks) in process_ticks() {
                        let e = seen.entry(pid).or_insert((
                            comm,
                            if first { ticks } else { 0.0 },
                            ticks,
                        ));
                        e.2 = ticks;
                    }
                    first = false;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let (busy1, total1) = machine_ticks();
                let hz = clock_ticks();
                let sum = |name: &str| {
                    seen.values()
                        .filter(|(c, _, _)| c == name)
                        .map(|(_, a, b)| (b - a).max(0.0))
                        .sum::<f64>()
                        / hz
                };
                CpuSpent {
                    machine_busy: (busy1 - busy0) / (total1 - total0).max(1.0),
                    postgres_s: sum("postgres"),
                    rabbitmq_s: sum("beam.smp"),
                }
            })
        };
        CpuWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> CpuSpent {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// (busy, total) ticks of all CPUs from /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = f.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// (pid, command, utime + stime ticks) of every process.
fn process_ticks() -> Vec<(u32, String, f64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((comm, ticks)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat))
        else {
            continue;
        };
        out.push((pid, comm, ticks));
    }
    out
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_ticks(&stat)?.1 / clock_ticks())
}

/// The command name and utime + stime (clock ticks) of a `/proc/<pid>/stat`
/// line. The name is between the first `(` and the last `)` (it may hold
/// spaces and parentheses); the fields after it start at field 3.
fn stat_ticks(stat: &str) -> Option<(String, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((stat[open + 1..close].to_string(), ticks))
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Consumes a queue (auto-ack) and records, per message, receive time minus
/// the `commit_ts` in its body.
struct Consumer {
    samples: Arc<std::sync::Mutex<Vec<(i64, f64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    async fn start(channel: &Channel, queue: &str) -> anyhow::Result<Consumer> {
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .context("basic.qos")?;
        let mut consumer = tokio::time::timeout(
            broker::STEP,
            channel.basic_consume(
                queue.into(),
                "odoo-cdc-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .context("basic.consume: timed out")??;
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let samples = samples.clone();
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let now = unix_micros();
                    if let Some(commit) = commit_ts_micros(&delivery.data)
                        && let Ok(mut s) = samples.lock()
                    {
                        s.push((commit, (now - commit) as f64 / 1000.0));
                    }
                }
            })
        };
        Ok(Consumer { samples, task })
    }

    fn count(&self) -> u64 {
        self.samples.lock().map(|s| s.len() as u64).unwrap_or(0)
    }

    /// Latencies (ms) of messages committed at or after `from` (Unix µs).
    fn latencies_after(&self, from: i64) -> Vec<f64> {
        self.samples
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(c, _)| *c >= from)
                    .map(|(_, l)| *l)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The first `"commit_ts":"YYYY-MM-DDTHH:MM:SS.ffffffZ"` in a body, as Unix µs.
fn commit_ts_micros(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"commit_ts\":\"";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let s = std::str::from_utf8(body.get(at..at + 27)?).ok()?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    // Days from the civil date (proleptic Gregorian).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) * 1_000_000) + us)
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A TCP port free on the loopback now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Positive confirms the connector counted (its `/metrics` on `port`);
/// `None` while the endpoint does not answer.
async fn confirms(port: u16) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(1), get)
        .await
        .ok()?
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("odoo_cdc_confirm_latency_seconds_count "))?
        .trim()
        .parse()
        .ok()
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(30), tokio_postgres::connect(url, NoTls))
            .await
            .with_context(|| format!("connecting to {url}: timed out"))?
            .with_context(|| format!("connecting to {url} (run scripts/services.sh up?)"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// The admin URL with another database name (query part kept).
fn with_dbname(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > base.find("//").map_or(0, |j| j + 1) => &base[..i],
        _ => base,
    };
    format!("{prefix}/{db}{query}")
}

fn parse_lsn(s: &str) -> anyhow::Result<u64> {
    let (hi, lo) = s.split_once('/').context("LSN without '/'")?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn machine() -> Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_report(report: &Value) {
    let num = |v: &Value, k: &str| match &v[k] {
        Value::Null => "-".to_owned(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() >= 1.0 {
                format!("{f:.0}")
            } else {
                format!("{f}")
            }
        }
        other => other
            .as_str()
            .map_or_else(|| other.to_string(), str::to_owned),
    };
    println!(
        "\nodoo-cdc end-to-end benchmark ({} CPUs, load average at start {})",
        report["machine"]["cpus"], report["machine"]["loadavg_at_start"]
    );
    if let Some(t) = report.get("throughput") {
        let w = &t["workload"];
        println!(
            "\nThroughput: {} changes ({} transactions of {} rows, {} of {} rows), {} transaction messages",
            w["changes"],
            w["small_txns"],
            w["txn_rows"],
            w["big_txns"],
            w["big_txn_rows"],
            w["transaction_messages"]
        );
        println!(
            "(medians of {} repetitions in alternating order; spread = (max - min) / median; \
             load = 1-minute load average around the measurement; busy = all CPUs; \
             PG, MQ = CPU of PostgreSQL and RabbitMQ per million changes)",
            w["repetitions"]
        );
        println!(
            "{:<58} {:>10} {:>7} {:>10} {:>6} {:>8} {:>6} {:>7} {:>5} {:>5} {:>6} {:>6}",
            "what",
            "changes/s",
            "spread",
            "ceiling/s",
            "ratio",
            "CPU s/M",
            "×tail",
            "RSS MiB",
            "load",
            "busy",
            "PG s/M",
            "MQ s/M"
        );
        for r in t["rows"].as_array().into_iter().flatten() {
            println!(
                "{:<58} {:>10} {:>6}% {:>10} {:>6} {:>8} {:>6} {:>7} {:>5} {:>4}% {:>6} {:>6}",
                num(r, "what"),
                num(r, "changes_per_s"),
                num(r, "spread_pct"),
                num(r, "ceiling_changes_per_s"),
                num(r, "ratio"),
                num(r, "cpu_s_per_million"),
                num(r, "cpu_vs_tail"),
                num(r, "peak_rss_mib"),
                num(r, "load1"),
                num(r, "machine_busy_pct"),
                num(r, "postgres_cpu_s_per_million"),
                num(r, "rabbitmq_cpu_s_per_million"),
            );
        }
    }
    if let Some(l) = report.get("latency") {
        println!("\nLatency, commit to consumer receipt (confirm is sent with delivery):");
        println!(
            "{:<12} {:>8} {:>10} {:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "granularity",
            "queue",
            "target tx/s",
            "achieved tx/s",
            "samples",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU s/M",
            "RSS MiB"
        );
        for r in l.as_array().into_iter().flatten() {
            println!(
                "{:<12} {:>8} {:>10} {:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
                num(r, "granularity"),
                num(r, "queue_type"),
                num(r, "target_tps"),
                num(r, "achieved_tps"),
                num(r, "samples"),
                num(r, "p50_ms"),
                num(r, "p99_ms"),
                num(r, "max_ms"),
                num(r, "cpu_s_per_million"),
                num(r, "peak_rss_mib"),
            );
        }
    }
    if let Some(r) = report.get("rss") {
        println!("\nPeak RSS of odoo-cdc run (row granularity):");
        println!(
            "{:<40} {:>9} {:>8} {:>10} {:>8} {:>8}",
            "scenario", "changes", "seconds", "changes/s", "CPU s/M", "RSS MiB"
        );
        for x in r.as_array().into_iter().flatten() {
            println!(
                "{:<40} {:>9} {:>8} {:>10} {:>8} {:>8}",
                num(x, "scenario"),
                num(x, "changes"),
                num(x, "seconds"),
                num(x, "changes_per_s"),
                num(x, "cpu_s_per_million"),
                num(x, "peak_rss_mib"),
            );
        }
    }
}
