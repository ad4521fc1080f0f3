//! Active/standby: two `odoo-cdc run` instances on one slot. PostgreSQL lets
//! one walsender hold a slot, so one instance streams and the other polls the
//! slot every `--standby-retry-secs`; when the active one is killed (-9) the
//! standby takes over and resumes from the slot's confirmed LSN, with no loss.
//! Against the real shared PostgreSQL and RabbitMQ, with a database, slot,
//! exchange and queue of its own.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::broker::{ResilientConsumer, delete_queue};
use common::{Proc, TestDb, unique_name, wait_for_slot};

fn instance(db: &TestDb, name: &str, exchange: &str, amqp: &str) -> Proc {
    let source = format!("{}?application_name={name}", db.url);
    Proc::spawn(
        &[
            "run",
            "--source",
            &source,
            "--amqp",
            amqp,
            "--exchange",
            exchange,
            "--slot",
            &db.name,
            "--publication",
            &db.name,
            "--create-slot",
            "--create-publication",
            "--status-interval-secs",
            "1",
            "--standby-retry-secs",
            "1",
        ],
        &[],
    )
}

/// The application_name of the connection holding the slot, if any.
async fn holder(db: &TestDb) -> Option<String> {
    db.client
        .query_opt(
            "SELECT a.application_name::text FROM pg_replication_slots s
               JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Waits until `name` holds the slot; returns how long that took.
async fn wait_holder(db: &TestDb, name: &str) -> Duration {
    let t0 = Instant::now();
    while holder(db).await.as_deref() != Some(name) {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{name} did not take the slot (held by {:?})",
            holder(db).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

fn alive(p: &mut Proc) -> bool {
    matches!(p.child.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_the_slot_when_the_active_instance_dies() {
    let db = TestDb::create("ha").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY, note text)")
        .await;
    let exchange = unique_name("ex");
    let amqp = common::amqp_url();
    let queue = unique_name("q");
    // Resilient: the shared broker may close every connection under us.
    let consumer = ResilientConsumer::start(&amqp, &exchange, &queue, "#").await;

    let mut a = instance(&db, "cdc_a", &exchange, &amqp);
    wait_for_slot(&db).await;
    wait_holder(&db, "cdc_a").await;
    let mut b = instance(&db, "cdc_b", &exchange, &amqp);

    // A steady writer: 5-row transactions until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (db.url.clone(), stop.clone());
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!(
                    "INSERT INTO item SELECT g, 'n' || g FROM generate_series({}, {}) g",
                    k * 5 + 1,
                    k * 5 + 5
                ))
                .await
                .unwrap();
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            k * 5
        })
    };

    // B waits: it is running, but A keeps the slot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(alive(&mut b), "the standby must wait, not exit");
    assert_eq!(holder(&db).await.as_deref(), Some("cdc_a"));
    let before = consumer.len();
    assert!(before > 0, "A streams");

    // kill -9 A: B takes over.
    a.kill9();
    let takeover_b = wait_holder(&db, "cdc_b").await;
    let t0 = Instant::now();
    while consumer.len() <= before + 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "B publishes after taking over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A comes back as the standby; then B dies and A takes over again.
    let mut a = instance(&db, "cdc_a", &exchange, &amqp);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(alive(&mut a));
    assert_eq!(holder(&db).await.as_deref(), Some("cdc_b"));
    b.kill9();
    let takeover_a = wait_holder(&db, "cdc_a").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    let rows = writer.await.unwrap() as usize;
    let t0 = Instant::now();
    while consumer.unique() < rows && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ok = consumer.unique() >= rows;
    let got = consumer.stop().await;
    assert!(ok, "only {} messages for {rows} rows", got.len());
    let ids: HashSet<i64> = got
        .iter()
        .map(|g| g.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), rows, "every inserted row arrived");
    assert!((1..=rows as i64).all(|id| ids.contains(&id)));
    let unique: HashSet<&str> = got.iter().map(|g| g.message_id.as_str()).collect();
    eprintln!(
        "failover A→B in {:.2}s, B→A in {:.2}s (kill -9 to the standby holding the slot, standby retry 1s); \
         {rows} rows, none lost, {} duplicates",
        takeover_b.as_secs_f64(),
        takeover_a.as_secs_f64(),
        got.len() - unique.len()
    );
    drop(a);
    delete_queue(&amqp, &queue).await;
    db.cleanup().await;
}

/// A network partition instead of a crash: the active instance's packets to
/// PostgreSQL are black-holed, so nobody closes its connection and its
/// walsender keeps the slot until the server's `wal_sender_timeout` (5 s on
/// this private cluster). The standby takes over after that; the cut-off
/// instance gives up after `--replication-timeout-secs` and, once the network
/// heals, finds the slot taken and waits as the new standby. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_after_wal_sender_timeout_when_the_active_instance_is_cut_off() {
    let pg = common::cluster::PrivateCluster::start(&[("wal_sender_timeout", "'5s'")]);
    let admin = common::connect(&pg.admin_url()).await;
    admin.batch_execute("CREATE DATABASE ha").await.unwrap();
    let db = common::connect(&pg.url("ha")).await;
    db.batch_execute(
        "CREATE TABLE item (id int PRIMARY KEY, note text);
         CREATE PUBLICATION ha FOR ALL TABLES;",
    )
    .await
    .unwrap();
    let proxy = common::proxy::TcpProxy::start(&format!("127.0.0.1:{}", pg.port));
    let exchange = unique_name("ex");
    let amqp = common::amqp_url();
    let queue = unique_name("q");
    let consumer = ResilientConsumer::start(&amqp, &exchange, &queue, "#").await;
    let spawn = |name: &str, hostport: &str| {
        let source =
            format!("postgres://postgres@{hostport}/ha?application_name={name}&connect_timeout=3");
        Proc::spawn(
            &[
                "run",
                "--source",
                &source,
                "--amqp",
                &amqp,
                "--exchange",
                &exchange,
                "--slot",
                "ha",
                "--publication",
                "ha",
                "--create-slot",
                "--status-interval-secs",
                "1",
                "--standby-retry-secs",
                "1",
                "--replication-timeout-secs",
                "10",
            ],
            &[],
        )
    };
    let holder = || async {
        db.query_opt(
            "SELECT a.application_name::text FROM pg_replication_slots s
               JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = 'ha'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, String>(0))
    };
    let wait_for = |name: &'static str| {
        let holder = &holder;
        async move {
            let t0 = Instant::now();
            while holder().await.as_deref() != Some(name) {
                assert!(
                    t0.elapsed() < Duration::from_secs(90),
                    "{name} never held the slot"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            t0.elapsed()
        }
    };
    let _a = spawn("cdc_a", &proxy.host_port());
    wait_for("cdc_a").await;
    let _b = spawn("cdc_b", &format!("127.0.0.1:{}", pg.port));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (pg.url("ha"), stop.clone());
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!(
                    "INSERT INTO item SELECT g, 'n' || g FROM generate_series({}, {}) g",
                    k * 5 + 1,
                    k * 5 + 5
                ))
                .await
                .unwrap();
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            k * 5
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(holder().await.as_deref(), Some("cdc_a"));

    proxy.stall();
    let takeover = wait_for("cdc_b").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    // A is back on the network: it must not steal the slot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(holder().await.as_deref(), Some("cdc_b"));

    stop.store(true, Ordering::Relaxed);
    let rows = writer.await.unwrap() as usize;
    let t0 = Instant::now();
    while consumer.unique() < rows && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = consumer.stop().await;
    let ids: HashSet<i64> = got
        .iter()
        .map(|d| d.json()["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), rows, "every inserted row arrived");
    let unique: HashSet<&str> = got.iter().map(|d| d.message_id.as_str()).collect();
    eprintln!(
        "partition: the standby held the slot {:.1}s after the active instance was cut off (wal_sender_timeout 5s); \
         {rows} rows, none lost, {} duplicates",
        takeover.as_secs_f64(),
        got.len() - unique.len()
    );
    delete_queue(&amqp, &queue).await;
}
