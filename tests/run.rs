//! `odoo-cdc run` end to end: real PostgreSQL, real RabbitMQ, the real binary.

mod common;

use std::time::Duration;

use common::amqp::{Got, consume};
use common::{Proc, TestDb, run_args, unique_name, wait_for_slot};
use prost::Message as _;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE sale_order (id serial PRIMARY KEY, name text NOT NULL, state text, amount_total numeric(12,2));
         CREATE TABLE res_partner (id serial PRIMARY KEY, name text, email text);",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_events_arrive_with_routing_keys_properties_and_headers() {
    let db = TestDb::create("run_rows").await;
    schema(&db).await;
    let exchange = unique_name("ex");
    let consumer = consume(
        &exchange,
        &unique_name("q"),
        &format!("{}.public.#", db.name),
    )
    .await;
    let amqp = common::amqp_url();
    let _p = Proc::spawn(&run_args(&db, &exchange, &amqp), &[]);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO res_partner (name, email) VALUES ('Azure', 'a@example.com')")
        .await;
    db.exec("INSERT INTO sale_order (name, state, amount_total) VALUES ('S00001', 'draft', 10), ('S00002', 'draft', 20)").await;
    db.exec("UPDATE sale_order SET state = 'sale', amount_total = 1250.00 WHERE name = 'S00001'")
        .await;
    db.exec("DELETE FROM res_partner WHERE name = 'Azure'")
        .await;
    assert!(
        consumer.wait_until(WAIT, |m| m.len() >= 5).await,
        "got {}",
        consumer.len()
    );
    let got = consumer.snapshot();
    let keys: Vec<&str> = got.iter().map(|g| g.routing_key.as_str()).collect();
    let p = &db.name;
    assert_eq!(
        keys,
        [
            format!("{p}.public.res_partner.insert"),
            format!("{p}.public.sale_order.insert"),
            format!("{p}.public.sale_order.insert"),
            format!("{p}.public.sale_order.update"),
            format!("{p}.public.res_partner.delete"),
        ]
    );
    let upd: &Got = &got[3];
    let body = upd.json();
    assert_eq!(body["op"], "u");
    assert_eq!(body["after"]["state"], "sale");
    assert_eq!(body["after"]["amount_total"], "1250.00");
    assert_eq!(body["key"], json!({"id": 1}));
    assert_eq!(upd.content_type, "application/json");
    assert_eq!(upd.kind, "public.sale_order.update");
    assert_eq!(upd.delivery_mode, Some(2), "persistent");
    let commit_lsn = body["source"]["commit_lsn"].as_str().unwrap();
    assert_eq!(upd.header("x-commit-lsn"), Some(commit_lsn));
    assert_eq!(upd.header("x-lsn"), body["source"]["lsn"].as_str());
    assert_eq!(upd.header("x-table"), Some("public.sale_order"));
    assert_eq!(upd.header("x-op"), Some("u"));
    assert_eq!(
        upd.header("x-xid"),
        Some(body["source"]["xid"].to_string().as_str())
    );
    // message_id = commit LSN as 16 hex digits - seq as 8 digits
    let lsn: odoo_cdc::lsn::Lsn = commit_lsn.parse().unwrap();
    assert_eq!(upd.message_id, format!("{:016X}-{:08}", lsn.0, 0));
    assert_eq!(
        got[2].message_id,
        format!("{}-00000001", got[1].message_id.split('-').next().unwrap())
    );
    consumer.delete().await;
    drop(_p);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_granularity_delivers_whole_transactions_in_parts() {
    let db = TestDb::create("run_txn").await;
    schema(&db).await;
    let exchange = unique_name("ex");
    let consumer = consume(
        &exchange,
        &unique_name("q"),
        &format!("{}.transaction", db.name),
    )
    .await;
    let amqp = common::amqp_url();
    let mut args = run_args(&db, &exchange, &amqp);
    args.extend([
        "--granularity",
        "transaction",
        "--max-events-per-message",
        "2",
    ]);
    let _p = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;
    db.exec(
        "BEGIN;
         INSERT INTO sale_order (name) SELECT 'S' || g FROM generate_series(1, 5) g;
         COMMIT;
         INSERT INTO res_partner (name) VALUES ('single');",
    )
    .await;
    assert!(
        consumer.wait_until(WAIT, |m| m.len() >= 4).await,
        "got {}",
        consumer.len()
    );
    let got = consumer.snapshot();
    let parts: Vec<serde_json::Value> = got.iter().map(Got::json).collect();
    // 5 events in parts of 2: 2 + 2 + 1, the last one final.
    assert_eq!(parts[0]["events"].as_array().unwrap().len(), 2);
    assert_eq!(parts[1]["events"].as_array().unwrap().len(), 2);
    assert_eq!(parts[2]["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        (parts[0]["final"].clone(), parts[2]["final"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(got[0].header("x-part"), Some("0"));
    assert_eq!(got[2].header("x-part"), Some("2"));
    assert_eq!(got[2].header("x-parts-final"), Some("true"));
    assert_eq!(parts[0]["xid"], parts[2]["xid"]);
    let seqs: Vec<i64> = parts[..3]
        .iter()
        .flat_map(|p| {
            p["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["source"]["seq"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    assert!(
        got.iter()
            .all(|g| g.routing_key == format!("{}.transaction", db.name))
    );
    // Distinct ids per part, stable: commit LSN + first seq of the part.
    assert_ne!(got[0].message_id, got[1].message_id);
    assert!(got[1].message_id.ends_with("-00000002"));
    // A single-change transaction is one final part.
    assert_eq!(parts[3]["events"][0]["after"]["name"], "single");
    assert_eq!(parts[3]["final"], true);
    consumer.delete().await;
    drop(_p);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_messages_decode_with_the_proto_schema() {
    let db = TestDb::create("run_proto").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, price numeric, qty float8, ok bool, data jsonb, blob bytea, tags text[], at timestamptz)").await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = common::amqp_url();
    let mut args = run_args(&db, &exchange, &amqp);
    args.extend(["--format", "protobuf"]);
    let _p = Proc::spawn(&args, &[]);
    wait_for_slot(&db).await;
    db.exec("INSERT INTO t VALUES (7, 12.50, 1.5, true, '{\"a\": 1}', '\\x0102', '{x,y}', '2026-11-21 23:40:01+00')").await;
    assert!(consumer.wait_until(WAIT, |m| !m.is_empty()).await);
    let got = consumer.snapshot();
    assert_eq!(got[0].content_type, "application/x-protobuf");
    let ev = odoo_cdc::protobuf::pb::ChangeEvent::decode(got[0].body.as_slice())
        .expect("decodes with proto/change_event.proto");
    assert_eq!(ev.op, "c");
    let src = ev.source.unwrap();
    assert_eq!(src.table, "t");
    use odoo_cdc::protobuf::pb::value::Kind;
    let after = ev.after.unwrap();
    let field = |n: &str| {
        after
            .fields
            .iter()
            .find(|f| f.name == n)
            .and_then(|f| f.value.clone())
            .and_then(|v| v.kind)
            .unwrap()
    };
    assert_eq!(field("id"), Kind::IntValue(7));
    assert_eq!(field("price"), Kind::StringValue("12.50".into()));
    assert_eq!(field("qty"), Kind::FloatValue(1.5));
    assert_eq!(field("ok"), Kind::BoolValue(true));
    assert_eq!(field("blob"), Kind::BytesValue(vec![1, 2]));
    assert_eq!(
        field("at"),
        Kind::StringValue("2026-11-21T23:40:01Z".into())
    );
    match field("data") {
        Kind::JsonValue(j) => assert_eq!(
            serde_json::from_str::<serde_json::Value>(&j).unwrap(),
            json!({"a": 1})
        ),
        other => panic!("{other:?}"),
    }
    match field("tags") {
        Kind::ListValue(l) => assert_eq!(l.values.len(), 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        got[0].header("x-protobuf-type"),
        Some(odoo_cdc::protobuf::EVENT_TYPE_NAME)
    );
    consumer.delete().await;
    drop(_p);
    db.cleanup().await;
}

/// With no queue bound, the slot must not move past the unroutable events; once a
/// queue is bound, the connector recovers by itself and delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_hold_the_slot_until_a_queue_is_bound() {
    let db = TestDb::create("run_unroutable").await;
    schema(&db).await;
    let exchange = unique_name("ex");
    let amqp = common::amqp_url();
    let _p = Proc::spawn(&run_args(&db, &exchange, &amqp), &[]);
    wait_for_slot(&db).await;
    let before: odoo_cdc::lsn::Lsn = db
        .confirmed_flush_lsn(&db.name)
        .await
        .unwrap()
        .parse()
        .unwrap();
    let insert_lsn: odoo_cdc::lsn::Lsn = {
        let row = db
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap();
        row.get::<_, String>(0).parse().unwrap()
    };
    db.exec("INSERT INTO sale_order (name) VALUES ('nobody listens')")
        .await;
    // Give the connector several status intervals (1 s) to (wrongly) advance.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held: odoo_cdc::lsn::Lsn = db
        .confirmed_flush_lsn(&db.name)
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(held >= before);
    assert!(
        held <= insert_lsn,
        "slot advanced past an unroutable event: {held} > {insert_lsn}"
    );

    // Bind a queue: the retry delivers the event and the slot moves on.
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    assert!(
        consumer.wait_until(WAIT, |m| !m.is_empty()).await,
        "not redelivered after binding"
    );
    assert_eq!(
        consumer.snapshot()[0].json()["after"]["name"],
        "nobody listens"
    );
    let mut advanced = false;
    for _ in 0..100 {
        let now: odoo_cdc::lsn::Lsn = db
            .confirmed_flush_lsn(&db.name)
            .await
            .unwrap()
            .parse()
            .unwrap();
        if now > insert_lsn {
            advanced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        advanced,
        "slot did not advance after the event was confirmed"
    );
    consumer.delete().await;
    drop(_p);
    db.cleanup().await;
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args([
            "run",
            "--source",
            "postgres://u@h/db",
            "--amqp",
            "amqp://g:g@h/%2f",
            "--window",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`window`") && err.contains("--window"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["run", "--source", "postgres://u@h/db"])
        .env("ODOO_CDC_AMQP", "http://not-amqp")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ODOO_CDC_AMQP"));
}
