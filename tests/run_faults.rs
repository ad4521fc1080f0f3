//! No loss under failure: the connector is killed (-9) mid-stream and the broker
//! drops every connection mid-stream, against real PostgreSQL and RabbitMQ. The
//! consumer's view is compared with the source table afterwards.
//!
//! These tests close broker connections, so they run one at a time (a lock),
//! and in their own test binary (cargo runs binaries one after another).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::amqp::{Consumer, Got, consume};
use common::{Proc, TestDb, run_args, unique_name, wait_for_slot};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A table whose final state tells exactly which changes happened: each update
/// bumps `version`, so inserts + sum(version) is the number of row changes.
async fn workload_table(db: &TestDb) {
    db.exec("CREATE TABLE item (id int PRIMARY KEY, version int NOT NULL DEFAULT 0, note text)")
        .await;
}

/// `txns` transactions of 5 inserts + 5 updates (of the previous batch) each.
fn workload_sql(txns: u32) -> String {
    format!(
        "DO $$
         BEGIN
           FOR i IN 0..{last} LOOP
             INSERT INTO item (id, note) SELECT i * 5 + g, 'n' || (i * 5 + g) FROM generate_series(1, 5) g;
             UPDATE item SET version = version + 1, note = 'u' || id WHERE id > (i - 1) * 5 AND id <= i * 5;
             COMMIT;
           END LOOP;
         END $$;",
        last = txns - 1
    )
}

struct Expect {
    changes: usize,
    rows: HashMap<i64, (i64, String)>,
}

async fn expected(db: &TestDb) -> Expect {
    let rows = db
        .client
        .query("SELECT id::int8, version::int8, note FROM item", &[])
        .await
        .unwrap();
    let mut map = HashMap::new();
    let mut changes = 0usize;
    for r in rows {
        let (id, version, note): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
        changes += 1 + version as usize;
        map.insert(id, (version, note));
    }
    Expect { changes, rows: map }
}

/// Dedups by message_id (identical bodies required), then checks every change
/// is there and the last image of each row matches the source.
fn verify(all: &[Got], exp: &Expect) -> (usize, usize) {
    let mut by_id: HashMap<&str, &Got> = HashMap::new();
    let mut dups = 0;
    for g in all {
        if let Some(prev) = by_id.insert(g.message_id.as_str(), g) {
            dups += 1;
            assert_eq!(
                prev.body, g.body,
                "duplicate {} with a different body",
                g.message_id
            );
        }
    }
    assert_eq!(
        by_id.len(),
        exp.changes,
        "every committed change exactly once after dedup"
    );
    // message ids sort in WAL order: apply in that order.
    let mut ids: Vec<&&Got> = by_id.values().collect();
    ids.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    let mut state: HashMap<i64, (i64, String)> = HashMap::new();
    for g in ids {
        let ev = g.json();
        let after = &ev["after"];
        state.insert(
            after["id"].as_i64().unwrap(),
            (
                after["version"].as_i64().unwrap(),
                after["note"].as_str().unwrap().to_string(),
            ),
        );
    }
    assert_eq!(
        state, exp.rows,
        "the consumer's view equals the source table"
    );
    (by_id.len(), dups)
}

async fn wait_unique(consumer: &Consumer, n: usize, timeout: Duration) -> bool {
    consumer
        .wait_until(timeout, |m| {
            let mut ids: Vec<&str> = m.iter().map(|g| g.message_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() >= n
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_several_points_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::create("faults_kill").await;
    workload_table(&db).await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = common::amqp_url();
    let mut proc = Proc::spawn(&run_args(&db, &exchange, &amqp), &[]);
    wait_for_slot(&db).await;
    // 5001 transactions, 50k changes, written while the connector runs and dies.
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            c.batch_execute(&workload_sql(5001)).await.unwrap();
        })
    };
    let mut kills = 0;
    for wait_ms in [1500u64, 2500, 2000, 3000] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        proc.kill9();
        kills += 1;
        eprintln!("kill -9 #{kills}: {} messages so far", consumer.len());
        proc = Proc::spawn(&run_args(&db, &exchange, &amqp), &[]);
    }
    writer.await.unwrap();
    let exp = expected(&db).await;
    assert_eq!(exp.changes, 5001 * 5 + 5000 * 5);
    assert!(
        wait_unique(&consumer, exp.changes, Duration::from_secs(240)).await,
        "only {} messages after restarts",
        consumer.len()
    );
    let (unique, dups) = verify(&consumer.snapshot(), &exp);
    eprintln!("{kills} kills: {unique} changes, all present; {dups} duplicates (same ids)");
    drop(proc);
    consumer.delete().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_all_connections_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::create("faults_broker").await;
    workload_table(&db).await;
    let exchange = unique_name("ex");
    let queue = unique_name("q");
    let mut consumer = consume(&exchange, &queue, "#").await;
    let amqp = common::amqp_url();
    let _proc = Proc::spawn(&run_args(&db, &exchange, &amqp), &[]);
    wait_for_slot(&db).await;
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            c.batch_execute(&workload_sql(2000)).await.unwrap();
        })
    };
    let mut collected: Vec<Got> = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let out = std::process::Command::new("rabbitmqctl")
            .args(["close_all_connections", "fault injection test"])
            .output()
            .expect("rabbitmqctl on PATH");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Our own consumer was closed too: keep what it got and consume again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        collected.extend(consumer.snapshot());
        consumer = consume(&exchange, &queue, "#").await;
    }
    writer.await.unwrap();
    let exp = expected(&db).await;
    let need = exp.changes;
    let before: Vec<String> = collected.iter().map(|g| g.message_id.clone()).collect();
    let ok = consumer
        .wait_until(Duration::from_secs(180), |m| {
            let mut ids: Vec<&str> = m
                .iter()
                .map(|g| g.message_id.as_str())
                .chain(before.iter().map(String::as_str))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() >= need
        })
        .await;
    collected.extend(consumer.snapshot());
    assert!(
        ok,
        "the connector did not recover by itself: {} of {need}",
        collected.len()
    );
    let (unique, dups) = verify(&collected, &exp);
    eprintln!("broker closed connections twice: {unique} changes, all present; {dups} duplicates");
    consumer.delete().await;
    db.cleanup().await;
}
