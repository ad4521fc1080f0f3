//! `odoo-cdc tail` end to end against the real PostgreSQL from services.sh: the
//! binary is run as a user would run it and its JSON lines are checked.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Proc, TestDb, count_ops};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Starts tail on a fresh slot (named after the db) and waits until it streams.
async fn start_tail(db: &TestDb, extra: &[&str]) -> Proc {
    start_tail_url(db, &db.url, extra).await
}

async fn start_tail_url(db: &TestDb, url: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "tail",
        "--source",
        url,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
        "--create-slot",
    ];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args, &[]);
    // The slot exists once tail is ready to stream.
    for _ in 0..200 {
        if db.confirmed_flush_lsn(&db.name).await.is_some() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tail did not create its slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_insert_update_delete_truncate() {
    let db = TestDb::create("tail_types").await;
    db.exec(&format!(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE t_all (
           id int PRIMARY KEY, c_int2 int2, c_int8 int8, c_num numeric(12,2), c_money money,
           c_f4 float4, c_f8 float8, c_bool bool, c_text text, c_vc varchar(20), c_bp char(5),
           c_json json, c_jsonb jsonb, c_date date, c_time time, c_timetz timetz, c_ts timestamp,
           c_tstz timestamptz, c_interval interval, c_uuid uuid, c_bytea bytea,
           c_ia int4[], c_ta text[], c_na numeric[], c_mood mood);
         CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    let mut tail = start_tail(&db, &[]).await;
    db.exec(
        r#"INSERT INTO t_all VALUES (1, -32768, 9223372036854775807, 1250.00, 12.5,
             1.5, 'NaN', true, E'line\nbreak "quoted" é', 'vc', 'ab', '{"a": [1, 2]}', '{"en_US": "Chair", "fr_FR": "Chaise"}',
             '2026-11-21', '23:40:01.5', '10:00:00+02', '2026-11-21 23:40:01.123456',
             '2026-11-21 23:40:01.123456+02', '1 year 2 mons 3 days 04:05:06', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
             '\xdeadbeef', '{1,NULL,3}', '{"a b","NULL",NULL,"q\"uote"}', '{1.10,2}', 'happy');
           INSERT INTO t_all (id) VALUES (2);
           UPDATE t_all SET c_text = 'changed', c_f8 = '-Infinity' WHERE id = 1;
           DELETE FROM t_all WHERE id = 2;
           TRUNCATE t_all;"#,
    )
    .await;
    assert!(
        tail.collect_until(WAIT, |l| l.len() >= 5),
        "got {:?}",
        tail.seen
    );
    let ev = tail.events();
    assert_eq!(
        ev.iter()
            .map(|e| e["op"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["c", "c", "u", "d", "t"]
    );
    let a = &ev[0]["after"];
    let expected = json!({
        "id": 1, "c_int2": -32768, "c_int8": 9223372036854775807i64, "c_num": "1250.00",
        "c_f4": 1.5, "c_f8": "NaN", "c_bool": true, "c_text": "line\nbreak \"quoted\" é",
        "c_vc": "vc", "c_bp": "ab   ", "c_json": {"a": [1, 2]},
        "c_jsonb": {"en_US": "Chair", "fr_FR": "Chaise"}, "c_date": "2026-11-21",
        "c_time": "23:40:01.5", "c_ts": "2026-11-21T23:40:01.123456",
        "c_tstz": "2026-11-21T21:40:01.123456Z", "c_interval": "P1Y2M3DT4H5M6S",
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "c_bytea": "3q2+7w==",
        "c_ia": [1, null, 3], "c_ta": ["a b", "NULL", null, "q\"uote"], "c_na": ["1.10", "2"],
        "c_mood": "happy"
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&a[k], v, "column {k} in {a}");
    }
    // money is printed in the server's lc_monetary; it stays a string, never a float.
    assert!(a["c_money"].is_string(), "{}", a["c_money"]);
    assert!(
        a["c_timetz"].as_str().unwrap().starts_with("10:00:00"),
        "{}",
        a["c_timetz"]
    );
    assert_eq!(ev[0]["key"], json!({"id": 1}));
    assert_eq!(ev[0]["source"]["table"], "t_all");
    assert_eq!(ev[0]["source"]["schema"], "public");
    assert_eq!(ev[0]["source"]["db"], db.name.as_str());
    assert_eq!(ev[0]["source"]["seq"], 0);
    assert_eq!(ev[0]["before"], Value::Null);

    // The all-NULL row: every column present and null (NULL is never dropped).
    let nulls = ev[1]["after"].as_object().unwrap();
    assert_eq!(nulls.len(), 25);
    assert!(
        nulls
            .iter()
            .filter(|(k, _)| *k != "id")
            .all(|(_, v)| v.is_null())
    );

    assert_eq!(ev[2]["after"]["c_text"], "changed");
    assert_eq!(ev[2]["after"]["c_f8"], "-Infinity");
    assert_eq!(
        ev[2]["before"],
        Value::Null,
        "DEFAULT identity: no old image when the key did not change"
    );
    assert_eq!(ev[3]["before"], json!({"id": 2}));
    assert_eq!(ev[3]["after"], Value::Null);
    assert_eq!(ev[4]["source"]["table"], "t_all");
    assert_eq!(
        ev[4]["truncate"],
        json!({"cascade": false, "restart_identity": false})
    );

    // Each event has a unique, well-formed id base: commit_lsn + seq.
    for e in &ev {
        assert!(e["source"]["commit_lsn"].as_str().unwrap().contains('/'));
        assert!(e["source"]["commit_ts"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(tail.terminate(), Some(0), "SIGTERM is a clean shutdown");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_default_vs_full_and_unchanged_toast() {
    let db = TestDb::create("tail_ident").await;
    db.exec(&format!(
        "CREATE TABLE rid_default (id int PRIMARY KEY, v text, big text);
         CREATE TABLE rid_full (id int PRIMARY KEY, v text, big text);
         ALTER TABLE rid_full REPLICA IDENTITY FULL;
         -- EXTERNAL: store out of line without compression, so a 3 kB value is TOASTed
         ALTER TABLE rid_default ALTER COLUMN big SET STORAGE EXTERNAL;
         ALTER TABLE rid_full ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    db.exec(
        "INSERT INTO rid_default VALUES (1, 'a', repeat('x', 3000));
         INSERT INTO rid_full VALUES (1, 'a', repeat('y', 3000));",
    )
    .await;
    // Only the stream: the rows above are the "before" state, not snapshot reads.
    let mut tail = start_tail(&db, &["--snapshot", "never"]).await;
    db.exec(
        "UPDATE rid_default SET v = 'b' WHERE id = 1;
         UPDATE rid_full SET v = 'b' WHERE id = 1;
         UPDATE rid_default SET id = 2 WHERE id = 1;
         DELETE FROM rid_default WHERE id = 2;
         DELETE FROM rid_full WHERE id = 1;",
    )
    .await;
    assert!(
        tail.collect_until(WAIT, |l| l.len() >= 5),
        "{:?}",
        tail.seen
    );
    let ev = tail.events();

    // DEFAULT: no old image, unchanged TOASTed column named, not null.
    assert_eq!(ev[0]["source"]["table"], "rid_default");
    assert_eq!(ev[0]["before"], Value::Null);
    assert_eq!(ev[0]["after"], json!({"id": 1, "v": "b"}));
    assert_eq!(ev[0]["unchanged_toast"], json!(["big"]));

    // FULL: whole old row; the unchanged TOASTed value is taken from it.
    assert_eq!(ev[1]["source"]["table"], "rid_full");
    let big = "y".repeat(3000);
    assert_eq!(ev[1]["before"], json!({"id": 1, "v": "a", "big": big}));
    assert_eq!(ev[1]["after"], json!({"id": 1, "v": "b", "big": big}));
    assert_eq!(ev[1]["unchanged_toast"], json!([]));

    // Key change under DEFAULT: old key in before, new key in key.
    assert_eq!(ev[2]["key"], json!({"id": 2}));
    assert_eq!(ev[2]["before"], json!({"id": 1}));

    // Deletes: key only vs full row.
    assert_eq!(ev[3]["before"], json!({"id": 2}));
    assert_eq!(ev[4]["before"]["v"], "b");
    assert_eq!(ev[4]["before"]["big"], json!(big));
    drop(tail);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollbacks_produce_nothing_and_alter_table_mid_stream_is_followed() {
    let db = TestDb::create("tail_rollback").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    let mut tail = start_tail(&db, &[]).await;
    db.exec(
        "BEGIN; INSERT INTO t VALUES (100, 'rolled back'); ROLLBACK;
         BEGIN; INSERT INTO t VALUES (1, 'kept');
                SAVEPOINT s; INSERT INTO t VALUES (101, 'sub rolled back'); ROLLBACK TO SAVEPOINT s;
                INSERT INTO t VALUES (2, 'kept too'); COMMIT;",
    )
    .await;
    // Each statement its own transaction (a multi-statement simple query is one).
    for sql in [
        "ALTER TABLE t ADD COLUMN extra numeric DEFAULT 7",
        "INSERT INTO t VALUES (3, 'with extra', 8.5)",
        "UPDATE t SET v = 'after alter' WHERE id = 1",
        "ALTER TABLE t DROP COLUMN extra",
        "INSERT INTO t VALUES (4, 'dropped again')",
        "SELECT pg_logical_emit_message(true, 'odoo.signal', '{\"hello\": 1}')",
        "SELECT pg_logical_emit_message(false, 'odoo.note', 'outside')",
    ] {
        db.exec(sql).await;
    }
    assert!(
        tail.collect_until(WAIT, |l| l.len() >= 7),
        "{:?}",
        tail.seen
    );
    let ev = tail.events();
    let ids: Vec<Value> = ev
        .iter()
        .filter(|e| e["op"] == "c")
        .map(|e| e["key"]["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![json!(1), json!(2), json!(3), json!(4)],
        "no rolled-back rows"
    );
    // Both inserts of the committed transaction are in one transaction, seq 0 and 1.
    assert_eq!(ev[0]["source"]["commit_lsn"], ev[1]["source"]["commit_lsn"]);
    assert_eq!(
        (
            ev[0]["source"]["seq"].clone(),
            ev[1]["source"]["seq"].clone()
        ),
        (json!(0), json!(1))
    );
    assert_eq!(
        ev[2]["after"],
        json!({"id": 3, "v": "with extra", "extra": "8.5"})
    );
    assert_eq!(
        ev[3]["after"],
        json!({"id": 1, "v": "after alter", "extra": "7"})
    );
    assert_eq!(ev[4]["after"], json!({"id": 4, "v": "dropped again"}));
    assert_eq!(ev[5]["op"], "m");
    assert_eq!(
        ev[5]["message"],
        json!({"transactional": true, "prefix": "odoo.signal", "content": "{\"hello\": 1}"})
    );
    assert_eq!(ev[6]["op"], "m");
    assert_eq!(ev[6]["message"]["transactional"], false);
    drop(tail);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_login_for_a_replication_role_that_is_not_superuser() {
    let db = TestDb::create("tail_scram").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION {} FOR ALL TABLES;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO odoo_cdc_scram;",
        db.name
    ))
    .await;
    let (_, host) = common::pg_base();
    let url = format!("postgres://odoo_cdc_scram:scram-secret@{host}/{}", db.name);
    let mut tail = start_tail_url(&db, &url, &[]).await;
    db.exec("INSERT INTO t VALUES (1), (2)").await;
    assert!(
        tail.collect_until(WAIT, |l| l.len() >= 2),
        "{:?}",
        tail.seen
    );
    assert_eq!(count_ops(&tail.events(), "c"), 2);
    drop(tail);

    // A wrong password needs an operator: exit 4 (authentication) with a message, no retry loop.
    let bad = format!("postgres://odoo_cdc_scram:wrong@{host}/{}", db.name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["tail", "--source", &bad, "--slot", "never_created"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("password") || err.contains("authentication"),
        "{err}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_200k_row_transaction_with_bounded_memory() {
    let db = TestDb::create("tail_big").await;
    db.exec(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, note text, marker text);
         CREATE PUBLICATION {0} FOR ALL TABLES;
         -- make the walsender stream the transaction in chunks instead of decoding it whole
         ALTER DATABASE {0} SET logical_decoding_work_mem = '64kB';",
        db.name
    ))
    .await;
    let mut tail = start_tail(&db, &["--stream-memory-mb", "4"]).await;
    // ~600 bytes a row: 200k rows are ~120 MB of change data, far above the 4 MiB budget.
    db.exec(
        "BEGIN;
         INSERT INTO big SELECT g, repeat(md5(g::text), 18), 'kept' FROM generate_series(1, 100000) g;
         SAVEPOINT s;
         INSERT INTO big SELECT g, 'x', 'aborted' FROM generate_series(200001, 201000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO big SELECT g, repeat(md5(g::text), 18), 'kept' FROM generate_series(100001, 200000) g;
         COMMIT;
         BEGIN; INSERT INTO big SELECT g, 'y', 'aborted whole' FROM generate_series(300001, 310000) g; ROLLBACK;
         INSERT INTO big VALUES (0, 'after', 'last');",
    )
    .await;
    assert!(
        tail.collect_until(Duration::from_secs(300), |l| l.len() >= 200_001),
        "got {} lines",
        tail.seen.len()
    );
    let peak_kib = tail.peak_rss_kib().expect("read VmHWM");
    let ev = tail.events();
    assert_eq!(ev.len(), 200_001);
    assert!(
        ev.iter()
            .all(|e| e["after"]["marker"] != "aborted" && e["after"]["marker"] != "aborted whole")
    );
    let commit = ev[0]["source"]["commit_lsn"].clone();
    for (i, e) in ev[..200_000].iter().enumerate() {
        assert_eq!(e["source"]["commit_lsn"], commit);
        assert_eq!(
            e["source"]["seq"],
            json!(i),
            "seq is the ordinal among committed changes"
        );
    }
    assert_eq!(ev[200_000]["after"]["marker"], "last");
    eprintln!(
        "peak RSS of tail for a 200k-row streamed transaction: {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < 100 * 1024,
        "peak RSS {peak_kib} KiB: memory grew with the transaction"
    );
    drop(tail);
    db.cleanup().await;
}

/// pgoutput labels a transactional logical message of a *streamed*
/// transaction with the top-level xid, not its savepoint: a message written in
/// a savepoint that is rolled back used to be delivered, and to shift the
/// `seq` of every later event. The connector now sees the ambiguity (a
/// savepoint rollback in a streamed transaction that carries messages), drops
/// what it buffered, and decodes again without streaming, where PostgreSQL
/// itself drops what the savepoint wrote. Oracle: what the transaction kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_a_rolled_back_savepoint_of_a_streamed_transaction_is_not_delivered() {
    let db = TestDb::create("tail_sp_msg").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         CREATE PUBLICATION {0} FOR ALL TABLES;
         ALTER DATABASE {0} SET logical_decoding_work_mem = '64kB';",
        db.name
    ))
    .await;
    let mut tail = start_tail(&db, &[]).await;
    // Each insert of 1,000 rows of ~200 bytes is over 64kB: the walsender
    // streams the transaction, the message of the savepoint included, before
    // the rollback.
    db.exec(
        "BEGIN;
         INSERT INTO t SELECT g, repeat('a', 200) FROM generate_series(1, 1000) g;
         SAVEPOINT s;
         SELECT pg_logical_emit_message(true, 'app.note', 'rolled back');
         INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(100001, 101000) g;
         ROLLBACK TO SAVEPOINT s;
         SELECT pg_logical_emit_message(true, 'app.note', 'kept');
         INSERT INTO t SELECT g, repeat('b', 200) FROM generate_series(1001, 2000) g;
         COMMIT;
         INSERT INTO t VALUES (0, 'last');",
    )
    .await;
    assert!(
        tail.collect_until(Duration::from_secs(120), |l| l
            .last()
            .is_some_and(|x| x.contains("\"note\":\"last\""))),
        "got {} lines, last {:?}",
        tail.seen.len(),
        tail.seen.last()
    );
    let ev = tail.events();
    let messages: Vec<&Value> = ev.iter().filter(|e| e["op"] == "m").collect();
    let contents: Vec<String> = messages
        .iter()
        .map(|m| m["message"]["content"].to_string())
        .collect();
    assert_eq!(messages.len(), 1, "only the kept message: {contents:?}");
    let rows: Vec<&Value> = ev
        .iter()
        .filter(|e| e["op"] == "c" && e["after"]["id"] != 0)
        .collect();
    assert_eq!(rows.len(), 2000, "every kept row once, no rolled-back row");
    assert!(
        rows.iter()
            .all(|e| e["after"]["id"].as_i64().unwrap() <= 2000)
    );
    // The seq of a non-streamed decode: rolled-back changes take none.
    assert_eq!(messages[0]["source"]["seq"], json!(1000));
    let last = rows.iter().find(|e| e["after"]["id"] == 2000).unwrap();
    assert_eq!(last["source"]["seq"], json!(2000));
    drop(tail);
    db.cleanup().await;
}

/// Kill -9 mid-stream, restart: every change arrives; duplicates carry the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_loses_nothing() {
    let db = TestDb::create("tail_kill").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    let mut first = start_tail(&db, &[]).await;
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            for batch in 0..200 {
                let start = batch * 50;
                c.batch_execute(&format!(
                    "INSERT INTO t SELECT g, 'v' || g FROM generate_series({}, {}) g",
                    start + 1,
                    start + 50
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    assert!(first.collect_until(WAIT, |l| l.len() >= 2000));
    first.kill9();
    let first_lines = first.seen.clone();
    writer.await.unwrap();

    let mut second = start_tail(&db, &[]).await;
    let mut all: Vec<Value> = first.events();
    // Only the newest line needs a look: the predicate runs once per line.
    let done = second.collect_until(WAIT, |l| {
        l.last()
            .is_some_and(|x| x.contains("\"key\":{\"id\":10000}"))
    });
    assert!(
        done,
        "second run did not reach the end: {} lines, last {:?}",
        second.seen.len(),
        second.seen.last()
    );
    all.extend(second.events());

    let mut by_id: HashMap<String, Value> = HashMap::new();
    let mut duplicates = 0;
    for e in &all {
        let id = format!(
            "{}-{}",
            e["source"]["commit_lsn"].as_str().unwrap(),
            e["source"]["seq"]
        );
        if let Some(prev) = by_id.insert(id.clone(), e.clone()) {
            duplicates += 1;
            assert_eq!(&prev, e, "a replayed event must be identical, id {id}");
        }
    }
    let rows: HashSet<i64> = all
        .iter()
        .map(|e| e["key"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows.len(), 10_000, "every committed row arrived");
    assert!((1..=10_000).all(|i| rows.contains(&i)));
    assert!(
        duplicates <= first_lines.len(),
        "only the unacknowledged tail repeats"
    );
    eprintln!(
        "kill -9 after {} lines: {duplicates} duplicates replayed",
        first_lines.len()
    );
    drop(second);
    db.cleanup().await;
}
