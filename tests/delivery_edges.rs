//! The edges of the delivery contract, each as the smallest workload that
//! crossed it once: positions that do not come from a commit, messages the
//! broker returns or refuses, memory bounded in bytes, a runtime that must
//! never stop answering the walsender.
//!
//! Tests that depend on the exact WAL layout run on a private PostgreSQL
//! cluster, where no other test writes between two records.

mod common;

use std::time::Duration;

use common::Proc;
use common::cluster::PrivateCluster;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

async fn pg(url: &str) -> tokio_postgres::Client {
    common::connect(url).await
}

async fn confirmed_flush(c: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    common::confirmed_flush_lsn(c, slot)
        .await
        .map(|t| lsn_value(&t))
}

fn lsn_value(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("an LSN like 0/16B3748");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn tail(url: &str, slot: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "tail",
        "--source",
        url,
        "--slot",
        slot,
        "--publication",
        "p",
        "--snapshot",
        "never",
        "--status-interval-secs",
        "1",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args, &[])
}

/// Section 1 of the contract's edges: a non-transactional logical message (our
/// own heartbeat, or any application's) is decoded with the LSN of the *end*
/// of its record. A commit whose record starts exactly there must still be
/// delivered after a restart, and the message and that transaction's first
/// event must not share an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_right_after_a_non_transactional_message_survives_a_restart() {
    let cluster = PrivateCluster::start(&[]);
    let url = cluster.url("postgres");
    let admin = pg(&url).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE PUBLICATION p FOR ALL TABLES;",
        )
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await
        .unwrap();
    let mut first = tail(&url, "s", &[]);

    // Session A: a transaction with one row, left open.
    let a = pg(&url).await;
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    // Session B: a non-transactional message of someone else's (the same
    // happens with our heartbeat prefix).
    let b = pg(&url).await;
    let msg_end: String = b
        .query_one(
            "SELECT pg_logical_emit_message(false, 'app.note', 'x')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let msg_end = lsn_value(&msg_end);
    // The connector reports a flush position at (or, before the fix, past)
    // the message.
    let deadline = std::time::Instant::now() + WAIT;
    while confirmed_flush(&admin, "s").await.unwrap_or(0) < msg_end {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never reached the message's LSN {msg_end:#X}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flushed = confirmed_flush(&admin, "s").await.unwrap();
    assert!(
        first.collect_until(WAIT, |l| !l.is_empty()),
        "the message event"
    );
    first.kill9();

    // Its commit record starts where the message's record ended.
    a.batch_execute("COMMIT").await.unwrap();

    let mut second = tail(&url, "s", &[]);
    let got = second.collect_until(WAIT, |l| l.iter().any(|l| l.contains("\"op\":\"c\"")));
    let mut events: Vec<Value> = first.events();
    events.extend(second.events());
    assert!(
        got,
        "row 1 was committed after the message and never arrived: {events:?}"
    );
    let insert = events.iter().find(|e| e["op"] == "c").unwrap();
    let message = events.iter().find(|e| e["op"] == "m").unwrap();
    let commit_lsn = lsn_value(insert["source"]["commit_lsn"].as_str().unwrap());
    eprintln!(
        "message end {msg_end:#X}, commit record at {commit_lsn:#X} ({})",
        if commit_lsn == msg_end {
            "exactly at the edge"
        } else {
            "another record in between"
        }
    );
    let id = |e: &Value| {
        format!(
            "{}-{}",
            e["source"]["commit_lsn"].as_str().unwrap(),
            e["source"]["seq"]
        )
    };
    assert_ne!(id(insert), id(message), "ids must be unique across events");
    assert!(
        lsn_value(message["source"]["commit_lsn"].as_str().unwrap()) < commit_lsn,
        "the message orders before the commit that follows it"
    );
    assert_eq!(
        flushed, msg_end,
        "a non-transactional message's LSN is an exclusive end: never marked beyond"
    );
    second.kill9();
}

/// Routable and unroutable messages interleaved under load: lapin may hand
/// the return of an unroutable message to a neighbour's confirm, so the
/// returned message's own confirm looks like a plain ack. Across many
/// sessions (each fails on the return and replays), the slot must never move
/// past the first transaction holding an unroutable event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_messages_never_let_the_slot_pass_them() {
    let db = common::TestDb::create("edges_returns").await;
    db.exec(
        "CREATE TABLE ok_t (id int PRIMARY KEY, v text);
         CREATE TABLE bad_t (id int PRIMARY KEY, v text);",
    )
    .await;
    let exchange = common::unique_name("edges_returns");
    let amqp = common::amqp_url();
    // Only ok_t's events have a queue: bad_t's come back as unroutable.
    let consumer = common::amqp::consume(
        &exchange,
        &common::unique_name("edges_returns_q"),
        &format!("{}.public.ok_t.*", db.name),
    )
    .await;
    let mut args = common::run_args(&db, &exchange, &amqp);
    args.extend(["--snapshot", "never", "--window", "4096"]);
    let mut connector = Proc::spawn(&args, &[]);
    common::wait_for_slot(&db).await;
    let start = db.confirmed_flush_lsn(&db.name).await.unwrap();

    // One-row transactions, so a message's neighbours belong to other
    // transactions: 500 routable ones, then one unroutable, then 1,500 more
    // with every 10th unroutable.
    let txns = |range: std::ops::Range<i32>| {
        let mut sql = String::new();
        for i in range {
            let table = if i >= 500 && i % 10 == 0 {
                "bad_t"
            } else {
                "ok_t"
            };
            sql.push_str(&format!(
                "BEGIN; INSERT INTO {table} VALUES ({i}, 'v'); COMMIT;"
            ));
        }
        sql
    };
    db.exec(&txns(0..501)).await;
    let boundary: String = db
        .client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.exec(&txns(501..2000)).await;
    let boundary = lsn_value(&boundary);
    // Sessions fail on the return and replay from the slot, again and again
    // (backoff from 0.5 s): each one is a chance for the bug.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut max_seen = 0;
    while std::time::Instant::now() < deadline {
        let flushed = lsn_value(&db.confirmed_flush_lsn(&db.name).await.unwrap());
        max_seen = max_seen.max(flushed);
        assert!(
            flushed < boundary,
            "the slot moved to {flushed:#X}, past the first unroutable event (its transaction commits before {boundary:#X}; slot started at {start})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        max_seen > lsn_value(&start),
        "the routable transactions before the first unroutable one were confirmed"
    );
    connector.kill9();
    consumer.delete().await;
    db.cleanup().await;
}

/// A broker that refuses large messages (`max_message_size`) closes the
/// channel: before, that was a retryable error and the same message was
/// replayed forever while the slot pinned WAL. Now: transaction parts are cut
/// below `--max-message-bytes`; a single larger event stops the connector with
/// exit code 6 (`--on-oversized=fail`), or becomes a dead-letter envelope that
/// names its table, key and LSN while the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_too_large_for_the_broker_never_loop() {
    if !common::broker::PrivateBroker::available() {
        eprintln!("skipped: RabbitMQ is not installed (scripts/services.sh up installs it)");
        return;
    }
    let broker = std::thread::spawn(common::broker::PrivateBroker::start)
        .join()
        .unwrap();
    let limit = 65_536;
    let out = broker.ctl(&[
        "eval",
        &format!("application:set_env(rabbit, max_message_size, {limit})."),
    ]);
    assert!(out.status.success(), "set max_message_size: {out:?}");
    let amqp = broker.amqp_url();

    let db = common::TestDb::create("edges_size").await;
    db.exec("CREATE TABLE doc (id int PRIMARY KEY, body text)")
        .await;
    let exchange = "odoo.cdc";
    let consumer =
        common::broker::ResilientConsumer::start(&amqp, exchange, "edges_size", "#").await;

    // 1. A broker limit below ours (default 16 MiB): one 100 KB row. The
    //    session fails on the refusal and the process exits 6, instead of
    //    replaying it forever.
    let mut args = common::run_args(&db, exchange, &amqp);
    args.extend(["--snapshot", "never"]);
    let mut first = Proc::spawn(&args, &[]);
    common::wait_for_slot(&db).await;
    db.exec("INSERT INTO doc VALUES (1, repeat('x', 100000))")
        .await;
    let code = wait_exit(&mut first, WAIT);
    assert_eq!(code, Some(6), "a refused size is fatal with exit code 6");
    // Nothing moved past the refused transaction: the next two runs receive
    // row 1 again from the slot (exit 6 once more, then its envelope). The
    // slot's LSN itself may move past WAL other tests' databases write on the
    // shared cluster, which is safe, so it is not compared.

    // 2. Our limit under the broker's, transaction granularity: a transaction
    //    of 40 rows of 5 KB is cut into parts that each fit; the 100 KB row
    //    follows --on-oversized (here: fail, exit 6, nothing lost).
    let max = (limit - 1024).to_string();
    let mut txn_args = args.clone();
    txn_args.extend(["--granularity", "transaction", "--max-message-bytes", &max]);
    let mut second = Proc::spawn(&txn_args, &[]);
    assert_eq!(wait_exit(&mut second, WAIT), Some(6), "oversized: fail");

    // 3. Dead-letter: the envelope names table, key and LSN; the stream goes on.
    txn_args.extend(["--on-oversized", "dead-letter"]);
    let mut third = Proc::spawn(&txn_args, &[]);
    db.exec(
        "BEGIN; INSERT INTO doc SELECT g, repeat('y', 5000) FROM generate_series(2, 41) g; COMMIT;",
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    let (envelope, parts) = loop {
        let got = consumer.snapshot();
        let envelope = got.iter().find(|d| d.routing_key.ends_with(".dead_letter"));
        let parts: Vec<_> = got
            .iter()
            .filter(|d| d.routing_key.ends_with(".transaction"))
            .collect();
        let rows: usize = parts
            .iter()
            .map(|d| d.json()["events"].as_array().unwrap().len())
            .sum();
        if let Some(e) = envelope
            && rows >= 40
        {
            break (
                e.json(),
                parts.iter().map(|d| d.body.len()).collect::<Vec<_>>(),
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no envelope and 40 rows: {} deliveries",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(envelope["error"], "oversized");
    assert_eq!(envelope["table"], "public.doc");
    assert_eq!(envelope["key"], serde_json::json!({"id": 1}));
    assert!(envelope["lsn"].as_str().is_some() && envelope["size"].as_u64().unwrap() > 100_000);
    assert!(
        parts.len() >= 4,
        "40 rows of 5 KB need several parts: {parts:?}"
    );
    assert!(
        parts.iter().all(|&n| n <= limit - 1024),
        "every part fits under --max-message-bytes: {parts:?}"
    );
    third.terminate();
    drop(consumer);
    db.cleanup().await;
}

fn wait_exit(p: &mut Proc, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    p.kill9();
    None
}

/// `tail` with its stdout in a pipe, read by a thread that first sleeps
/// `pause` (a reader that went away for a while), then counts lines and
/// collects the ids of row events. stderr goes to a file.
struct PipedTail {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ids: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: std::path::PathBuf,
}

impl PipedTail {
    fn start(url: &str, extra: &[&str], pause: Duration) -> PipedTail {
        use std::io::BufRead;
        let stderr = std::env::temp_dir().join(common::unique_name("tail_stderr"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
            .args([
                "tail",
                "--source",
                url,
                "--slot",
                "s",
                "--publication",
                "p",
                "--create-slot",
                "--snapshot",
                "never",
            ])
            .args(extra)
            .env(
                "ODOO_CDC_LOG",
                std::env::var("ODOO_CDC_TEST_TAIL_LOG").unwrap_or("info,lapin=error".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn odoo-cdc tail");
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (l, i) = (lines.clone(), ids.clone());
        std::thread::spawn(move || {
            std::thread::sleep(pause);
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // Cheap id extraction: commit_lsn and seq are in "source".
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["op"] == "c"
                {
                    i.lock().unwrap().push(format!(
                        "{}-{}",
                        v["source"]["commit_lsn"].as_str().unwrap_or(""),
                        v["source"]["seq"]
                    ));
                }
                l.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        PipedTail {
            child,
            lines,
            ids,
            stderr,
        }
    }

    /// Waits for `n` lines; gives up only when no line arrived for `stall`
    /// (a loaded machine is slow, a broken pipeline is stuck).
    fn wait_lines(&self, n: u64, stall: Duration) -> bool {
        let mut seen = 0;
        let mut progress = std::time::Instant::now();
        loop {
            let now = self.lines.load(std::sync::atomic::Ordering::Relaxed);
            if now >= n {
                return true;
            }
            if now > seen {
                seen = now;
                progress = std::time::Instant::now();
            } else if progress.elapsed() > stall {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for PipedTail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// A private cluster with `t (id int PRIMARY KEY, v text)` in publication `p`.
async fn cluster_with_table(
    settings: &[(&str, &str)],
) -> (PrivateCluster, String, tokio_postgres::Client) {
    let cluster = PrivateCluster::start(settings);
    let url = cluster.url("postgres");
    let admin = pg(&url).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION p FOR ALL TABLES;",
        )
        .await
        .unwrap();
    (cluster, url, admin)
}

fn assert_no_replication_timeout(cluster: &PrivateCluster, tail: &PipedTail) {
    let pg_log = cluster.log();
    let log = tail.log();
    assert!(
        !pg_log.contains("replication timeout"),
        "the walsender timed the connector out:\n{pg_log}\nthe connector's log:\n{log}"
    );
    assert!(
        !log.contains("session failed"),
        "the session failed:\n{log}"
    );
}

/// `wal_sender_timeout = 5s` and a `tail` whose reader goes away for 30 s
/// with a backlog: the pipe fills, the connector is held back, yet it keeps
/// answering the walsender: no timeout, no session failure, no replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stdout_reader_never_times_the_walsender_out() {
    let (cluster, url, admin) = cluster_with_table(&[("wal_sender_timeout", "'5s'")]).await;
    let tail = PipedTail::start(&url, &[], Duration::from_secs(30));
    let deadline = std::time::Instant::now() + WAIT;
    while confirmed_flush(&admin, "s").await.is_none() {
        assert!(std::time::Instant::now() < deadline, "no slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 20,000 rows of ~300-byte lines: far more than the pipe and our buffers.
    for k in 0..20 {
        admin
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('v', 100) FROM generate_series({}, {}) g",
                k * 1000 + 1,
                k * 1000 + 1000
            ))
            .await
            .unwrap();
    }
    assert!(
        tail.wait_lines(20_000, Duration::from_secs(30) + WAIT),
        "only {} lines",
        tail.lines.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_no_replication_timeout(&cluster, &tail);
    let ids = tail.ids.lock().unwrap().clone();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 20_000);
    assert_eq!(ids.len(), 20_000, "no replay: the session never restarted");
}

/// `wal_sender_timeout = 5s` and a streamed transaction of a million rows
/// that spills to disk (64 kB of decoding memory on the server, 1 MiB of
/// buffer in the connector): the connector keeps answering while it spills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilling_a_huge_streamed_transaction_never_times_the_walsender_out() {
    let (cluster, url, admin) = cluster_with_table(&[
        ("wal_sender_timeout", "'5s'"),
        ("logical_decoding_work_mem", "'64kB'"),
    ])
    .await;
    let tail = PipedTail::start(&url, &["--stream-memory-mb", "1"], Duration::ZERO);
    let deadline = std::time::Instant::now() + WAIT;
    while confirmed_flush(&admin, "s").await.is_none() {
        assert!(std::time::Instant::now() < deadline, "no slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = 1_000_000u64;
    admin
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    assert!(
        tail.wait_lines(rows, Duration::from_secs(240)),
        "only {} of {rows} lines; the connector's log:\n{}\nthe server's log:\n{}",
        tail.lines.load(std::sync::atomic::Ordering::Relaxed),
        tail.log(),
        cluster.log()
    );
    assert_no_replication_timeout(&cluster, &tail);
    assert_eq!(tail.ids.lock().unwrap().len() as u64, rows, "no replay");
}
