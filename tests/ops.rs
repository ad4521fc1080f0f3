//! Operations, against the real PostgreSQL and RabbitMQ: the metrics endpoint
//! and readiness through a broker outage (a TCP proxy cuts the connector off
//! the broker; the shared broker itself is never stopped), heartbeats moving an
//! idle slot, graceful shutdown, `--on-decode-error`, and fatal exit codes.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::amqp::{Got, consume};
use common::cluster::free_port;
use common::proxy::TcpProxy;
use common::{Proc, TestDb, amqp_url, connect, pg_admin_url, pg_base, unique_name, wait_for_slot};

/// GET over plain HTTP/1.1; `None` if nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The value of one sample (`name{labels}` exactly as rendered) in /metrics.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Polls until `f` holds (generous cap for a loaded machine).
async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn unique_ids(got: &[Got]) -> HashSet<String> {
    got.iter().map(|g| g.message_id.clone()).collect()
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("LSN hi/lo");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_readiness_follows_the_broker() {
    let db = TestDb::create("ops_metrics").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY, note text)")
        .await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let proxy = TcpProxy::start("127.0.0.1:5672");
    let amqp = amqp_url().replace("127.0.0.1:5672", &proxy.host_port());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = common::run_args(&db, &exchange, &amqp);
    args.extend(["--metrics-addr", &addr]);
    let _proc = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;

    eventually("/readyz 200", 60, || {
        http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 200)
    })
    .await;
    assert_eq!(http_get(&addr, "/healthz").map(|r| r.0), Some(200));

    db.exec("INSERT INTO item SELECT g, 'n' || g FROM generate_series(1, 50) g")
        .await;
    db.exec("UPDATE item SET note = 'u' WHERE id <= 10").await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| m.len() >= 60)
            .await
    );
    let m = scrape(&addr);
    assert!(
        sample(&m, "odoo_cdc_events_total{op=\"insert\"}").unwrap() >= 50.0,
        "{m}"
    );
    assert!(sample(&m, "odoo_cdc_events_total{op=\"update\"}").unwrap() >= 10.0);
    assert!(
        sample(
            &m,
            "odoo_cdc_table_events_total{table=\"public.item\",op=\"insert\"}"
        )
        .unwrap()
            >= 50.0
    );
    assert!(
        sample(
            &m,
            "odoo_cdc_table_event_bytes_total{table=\"public.item\",op=\"insert\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(sample(&m, "odoo_cdc_published_messages_total").unwrap() >= 60.0);
    assert!(sample(&m, "odoo_cdc_confirm_latency_seconds_count").unwrap() >= 60.0);
    assert_eq!(
        sample(&m, "odoo_cdc_circuit_state{state=\"streaming\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&m, "odoo_cdc_ready"), Some(1.0));
    for series in [
        "odoo_cdc_in_flight_messages",
        "odoo_cdc_replication_lag_bytes",
        "odoo_cdc_replication_lag_seconds",
        "odoo_cdc_published_bytes_total",
    ] {
        assert!(sample(&m, series).is_some(), "{series} missing:\n{m}");
    }
    // The slot's flush position is reported and becomes visible.
    eventually("confirmed LSN gauge", 60, || {
        sample(&scrape(&addr), "odoo_cdc_confirmed_lsn").unwrap_or(0.0) > 0.0
    })
    .await;

    // Broker unreachable: not ready, and the outage is counted.
    proxy.cut();
    eventually("/readyz 503 while the broker is cut off", 60, || {
        http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 503)
    })
    .await;
    assert_eq!(
        http_get(&addr, "/healthz").map(|r| r.0),
        Some(200),
        "alive even when not ready"
    );
    // Changes made meanwhile wait in the slot.
    db.exec("INSERT INTO item SELECT g, 'later' FROM generate_series(51, 80) g")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        http_get(&addr, "/readyz").map(|r| r.0),
        Some(503),
        "still unready while cut"
    );

    proxy.restore();
    eventually("/readyz 200 after restore", 90, || {
        http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 200)
    })
    .await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(90), |m| unique_ids(m).len() >= 90)
            .await,
        "every change arrives after the broker is back"
    );
    let got = consumer.snapshot();
    let inserted: HashSet<i64> = got
        .iter()
        .filter(|g| g.json()["op"] == "c")
        .map(|g| g.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        inserted,
        (1..=80).collect::<HashSet<i64>>(),
        "no insert lost"
    );
    let m = scrape(&addr);
    assert!(
        sample(&m, "odoo_cdc_reconnects_total{cause=\"rabbitmq\"}").unwrap() >= 1.0,
        "{m}"
    );
    consumer.delete().await;
    drop(_proc);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_an_idle_slot_while_other_tables_write() {
    let db = TestDb::create("ops_heartbeat").await;
    db.exec(&format!(
        "CREATE TABLE item (id int PRIMARY KEY, note text);
         CREATE TABLE noise (id serial PRIMARY KEY, payload text);
         CREATE PUBLICATION {} FOR TABLE item;",
        db.name
    ))
    .await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = amqp_url();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = common::run_args(&db, &exchange, &amqp);
    args.extend([
        "--metrics-addr",
        &addr,
        "--heartbeat-interval-secs",
        "1",
        "--slot-check-interval-secs",
        "1",
        "--max-retained-wal-mb",
        "1",
    ]);
    let _proc = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO item VALUES (1, 'one')").await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| !m.is_empty())
            .await
    );

    // Heavy writes elsewhere in the cluster (another database: another Odoo
    // tenant, any other application) and in a table of this database outside
    // the publication: several MB of WAL, none of it ours.
    let other = TestDb::create("ops_heartbeat_other").await;
    other
        .exec("CREATE TABLE noise (id serial PRIMARY KEY, payload text)")
        .await;
    for i in 0..8 {
        let target = if i % 2 == 0 { &other } else { &db };
        target
            .exec(
                "INSERT INTO noise (payload) SELECT repeat('x', 500) FROM generate_series(1, 2000)",
            )
            .await;
    }
    let after_noise = other
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let target = parse_lsn(&after_noise);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let flushed = db
            .confirmed_flush_lsn(&db.name)
            .await
            .map(|l| parse_lsn(&l))
            .unwrap_or(0);
        if flushed >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot did not advance past the unrelated writes: {flushed:X} < {target:X}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eventually("a heartbeat", 60, || {
        sample(&scrape(&addr), "odoo_cdc_heartbeats_total").unwrap_or(0.0) >= 1.0
    })
    .await;
    // The retention guard measured the slot.
    eventually("a slot measurement", 60, || {
        sample(
            &scrape(&addr),
            "odoo_cdc_slot_wal_status{status=\"reserved\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(scrape(&addr).contains("odoo_cdc_slot_retained_wal_bytes "));
    // Heartbeats are never published: only the one insert arrived.
    assert_eq!(unique_ids(&consumer.snapshot()).len(), 1);
    consumer.delete().await;
    drop(_proc);
    other.cleanup().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_flushes_what_was_confirmed_and_exits_0() {
    let db = TestDb::create("ops_shutdown").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY, batch int NOT NULL)")
        .await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = amqp_url();
    let args = common::run_args(&db, &exchange, &amqp);
    let mut proc = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;

    // A continuous workload of 5-row transactions.
    let url = db.url.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut batch = 0i32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.batch_execute(&format!(
                    "INSERT INTO item SELECT {batch} * 5 + g, {batch} FROM generate_series(1, 5) g"
                ))
                .await
                .unwrap();
                batch += 1;
            }
            batch
        })
    };
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| m.len() >= 500)
            .await
    );
    let code = proc.terminate();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.await.unwrap();
    assert_eq!(code, Some(0), "clean shutdown exits 0");
    let flushed = parse_lsn(&db.confirmed_flush_lsn(&db.name).await.unwrap());

    // What the broker confirmed before the exit has reached the queue; let the
    // consumer drain it.
    let mut before = consumer.len();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = consumer.len();
        if now == before {
            break;
        }
        before = now;
    }
    let first_run = consumer.snapshot();
    let commit_lsn = |g: &Got| parse_lsn(g.header("x-commit-lsn").unwrap());
    // Complete transactions delivered before the exit are behind the flush position.
    let mut per_txn: HashMap<u64, usize> = HashMap::new();
    for g in &first_run {
        *per_txn.entry(commit_lsn(g)).or_default() += 1;
    }
    for (lsn, n) in &per_txn {
        if *n >= 5 {
            assert!(
                *lsn < flushed,
                "confirmed transaction {lsn:X} is not behind the flush LSN {flushed:X}"
            );
        }
    }

    // Restart: everything arrives, and only what was not confirmed comes again.
    let first_ids = unique_ids(&first_run);
    let _proc2 = Proc::spawn(&args, &[]);
    let total = batches as usize * 5;
    assert!(
        consumer
            .wait_until(Duration::from_secs(90), |m| unique_ids(m).len() >= total)
            .await,
        "all {total} changes arrive after the restart"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = consumer.snapshot();
    let again: Vec<&Got> = all[first_run.len()..]
        .iter()
        .filter(|g| first_ids.contains(&g.message_id))
        .collect();
    let again_txns: HashSet<u64> = again.iter().map(|g| commit_lsn(g)).collect();
    for lsn in &again_txns {
        assert!(
            *lsn >= flushed,
            "transaction {lsn:X} was redelivered though the slot had confirmed {flushed:X}"
        );
    }
    assert!(
        again_txns.len() <= 1,
        "only the transaction cut at shutdown may come again, got {}",
        again_txns.len()
    );
    println!(
        "shutdown: {} messages before exit, {} redelivered after restart",
        first_run.len(),
        again.len()
    );
    consumer.delete().await;
    drop(_proc2);
    db.cleanup().await;
}

/// A database whose text may hold bytes that are not UTF-8 (SQL_ASCII). The
/// walsender itself cannot send such a value as UTF-8 and fails with SQLSTATE
/// 22021: the one undecodable value real PostgreSQL produces. (Values our own
/// decoder rejects, and unknown pgoutput messages, cannot be produced by a
/// real server; the raw and dead-letter policies are tested at the pipeline
/// level in `src/pipeline.rs`.)
async fn sql_ascii_db(prefix: &str) -> TestDb {
    let name = unique_name(prefix);
    let admin = connect(&pg_admin_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .await
        .unwrap();
    let (creds, host) = pg_base();
    let url = format!("postgres://{creds}@{host}/{name}");
    let client = connect(&url).await;
    let db = TestDb { name, url, client };
    db.exec("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await;
    db
}

async fn write_bad_rows(db: &TestDb) {
    db.exec("INSERT INTO t VALUES (1, 'fine')").await;
    db.exec("INSERT INTO t VALUES (2, E'caf\\xe9')").await;
    db.exec("INSERT INTO t VALUES (3, 'fine too')").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_data_stops_with_exit_5_and_json_logs() {
    let db = sql_ascii_db("ops_dec_fail").await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = amqp_url();
    let mut args = common::run_args(&db, &exchange, &amqp);
    args.extend(["--log-format", "json"]);
    let child = spawn_connector(&args);
    wait_for_slot(&db).await;
    write_bad_rows(&db).await;
    let (code, stderr) = exit_of(child, 90, "stop on an undecodable value").await;
    assert_eq!(code, Some(5), "{stderr}");
    // Structured logs: every line is a JSON object.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(
        stderr.contains("22021")
            && stderr.contains("invalid byte sequence")
            && stderr.contains("\"exit_code\":5")
            && stderr.contains("\"confirmed\":"),
        "{stderr}"
    );
    // Nothing after the bad row was published (the row before it may or may
    // not be: the session stops taking new work when the stream fails).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids: Vec<i64> = consumer
        .snapshot()
        .iter()
        .map(|g| g.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == 1), "{ids:?}");
    consumer.delete().await;
    db.cleanup().await;
}

/// `odoo-cdc` with stderr captured (warnings only), stdout discarded.
fn spawn_connector(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(args)
        .env("ODOO_CDC_LOG", "warn,lapin=error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (capped) for the connector to exit and returns its code and stderr;
/// `None` and no output if it was still running at the cap (then killed).
async fn try_exit_of(mut child: Child, secs: u64) -> (Option<i32>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (s.code(), Some(err));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Like [`try_exit_of`], failing the test with "the connector did not {what}".
async fn exit_of(child: Child, secs: u64, what: &str) -> (Option<i32>, String) {
    match try_exit_of(child, secs).await {
        (code, Some(err)) => (code, err),
        (_, None) => panic!("the connector did not {what} within {secs} s"),
    }
}

/// Runs the connector to its exit (capped) and returns code and stderr.
async fn run_to_exit(args: &[&str], secs: u64) -> (Option<i32>, String) {
    let (code, err) = try_exit_of(spawn_connector(args), secs).await;
    (code, err.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_conditions_exit_with_their_codes() {
    let db = TestDb::create("ops_fatal").await;
    let exchange = unique_name("ex");
    let amqp = amqp_url();
    let (_, host) = pg_base();

    // Wrong PostgreSQL password: 4.
    let bad_pg = format!("postgres://odoo_cdc_scram:wrong@{host}/{}", db.name);
    let mut args = common::run_args(&db, &exchange, &amqp);
    args[2] = &bad_pg;
    let (code, err) = run_to_exit(&args, 60).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(!err.contains("wrong"), "password in the logs: {err}");

    // Wrong RabbitMQ password: 4.
    let bad_amqp = amqp.replace("guest:guest", "guest:wrong");
    let args = common::run_args(&db, &exchange, &bad_amqp);
    let (code, err) = run_to_exit(&args, 60).await;
    assert_eq!(code, Some(4), "{err}");

    // Publication missing (and not to be created): 3.
    let args = vec![
        "run",
        "--source",
        &db.url,
        "--amqp",
        &amqp,
        "--exchange",
        &exchange,
        "--slot",
        &db.name,
        "--publication",
        "no_such_publication",
        "--create-slot",
    ];
    let (code, err) = run_to_exit(&args, 60).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("no_such_publication"), "{err}");

    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_while_running_exits_3_instead_of_recreating_it() {
    let db = TestDb::create("ops_slot_lost").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY)").await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = amqp_url();
    let args = common::run_args(&db, &exchange, &amqp);
    let child = spawn_connector(&args);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO item VALUES (1)").await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| !m.is_empty())
            .await
    );
    // An operator (or a failover without failover slots) removes the slot:
    // end its walsender and drop it before the connector reconnects.
    let admin = connect(&pg_admin_url()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&db.name],
            )
            .await;
        if admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, err) = exit_of(child, 60, "stop without its slot").await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        db.confirmed_flush_lsn(&db.name).await.is_none(),
        "the slot must not be re-created silently"
    );
    consumer.delete().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_walsender_is_detected_by_ping_and_the_session_resumes() {
    let db = TestDb::create("ops_stall").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY)").await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let (creds, host) = pg_base();
    let proxy = TcpProxy::start(&host);
    let source = format!("postgres://{creds}@{}/{}", proxy.host_port(), db.name);
    let amqp = amqp_url();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = common::run_args(&db, &exchange, &amqp);
    args[2] = &source;
    args.extend(["--metrics-addr", &addr, "--replication-timeout-secs", "4"]);
    let _proc = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO item VALUES (1)").await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| !m.is_empty())
            .await
    );

    // A black-holed route: the socket stays open, nothing moves. Only the
    // ping and its timeout can notice.
    proxy.stall();
    eventually("a reconnect for replication_timeout", 60, || {
        sample(
            &scrape(&addr),
            "odoo_cdc_reconnects_total{cause=\"replication_timeout\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert_eq!(http_get(&addr, "/readyz").map(|r| r.0), Some(503));
    db.exec("INSERT INTO item SELECT g FROM generate_series(2, 10) g")
        .await;
    // The route heals (the reset also ends the old walsender, which still
    // holds the slot on the server side).
    proxy.cut();
    proxy.restore();
    assert!(
        consumer
            .wait_until(Duration::from_secs(90), |m| unique_ids(m).len() >= 10)
            .await,
        "every change arrives after the route heals"
    );
    eventually("/readyz 200 again", 60, || {
        http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 200)
    })
    .await;
    consumer.delete().await;
    drop(_proc);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_exits_3() {
    // A cluster of our own: max_slot_wal_keep_size makes the server give up a
    // slot that falls too far behind (what protects Odoo's disk).
    let cluster = common::cluster::PrivateCluster::start(&[("max_slot_wal_keep_size", "1MB")]);
    let admin = connect(&cluster.admin_url()).await;
    admin.batch_execute("CREATE DATABASE inv").await.unwrap();
    let db = connect(&cluster.url("inv")).await;
    db.batch_execute("CREATE TABLE item (id int PRIMARY KEY); CREATE TABLE filler (x text)")
        .await
        .unwrap();
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let source = cluster.url("inv");
    let amqp = amqp_url();
    let args = [
        "run",
        "--source",
        &source,
        "--amqp",
        &amqp,
        "--exchange",
        &exchange,
        "--slot",
        "inv_slot",
        "--publication",
        "inv_pub",
        "--create-slot",
        "--create-publication",
    ];
    let mut proc = Proc::spawn(&args, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'inv_slot' AND active",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "the connector did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.batch_execute("INSERT INTO item VALUES (1)")
        .await
        .unwrap();
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| !m.is_empty())
            .await
    );
    // The connector dies; meanwhile the database writes well past the limit.
    proc.kill9();
    for _ in 0..4 {
        db.batch_execute(
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal();",
        )
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        admin.batch_execute("CHECKPOINT").await.unwrap();
        let status: Option<String> = admin
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'inv_slot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot was not invalidated: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, err) = run_to_exit(&args, 60).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("invalidated"), "{err}");
    consumer.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_stalled_exits_0_after_the_grace_period_without_acknowledging() {
    let db = TestDb::create("ops_grace").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY)").await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let proxy = TcpProxy::start("127.0.0.1:5672");
    let stalled_amqp = amqp_url().replace("127.0.0.1:5672", &proxy.host_port());
    let mut args = common::run_args(&db, &exchange, &stalled_amqp);
    args.extend([
        "--shutdown-grace-secs",
        "3",
        "--confirm-timeout-secs",
        "120",
    ]);
    let mut proc = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO item VALUES (1)").await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(60), |m| !m.is_empty())
            .await
    );
    // The broker stops answering: publishes go out, confirms never come.
    proxy.stall();
    db.exec("INSERT INTO item SELECT g FROM generate_series(2, 20) g")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    assert_eq!(
        proc.terminate(),
        Some(0),
        "clean exit after the grace period"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "shutdown is bounded by the grace period, not the confirm timeout"
    );
    let flushed = parse_lsn(&db.confirmed_flush_lsn(&db.name).await.unwrap());

    // Nothing unconfirmed was acknowledged: a restart delivers the rest.
    proxy.restore();
    let amqp = amqp_url();
    let args = common::run_args(&db, &exchange, &amqp);
    let _proc = Proc::spawn(&args, &[]);
    assert!(
        consumer
            .wait_until(Duration::from_secs(90), |m| unique_ids(m).len() >= 20)
            .await,
        "the rows written while the broker stalled arrive after the restart"
    );
    let stalled_commit = consumer
        .snapshot()
        .iter()
        .find(|g| g.json()["after"]["id"] == 2)
        .map(|g| parse_lsn(g.header("x-commit-lsn").unwrap()))
        .unwrap();
    assert!(
        flushed <= stalled_commit,
        "the slot was acknowledged past an unconfirmed transaction: {flushed:X} > {stalled_commit:X}"
    );
    consumer.delete().await;
    drop(_proc);
    db.cleanup().await;
}
