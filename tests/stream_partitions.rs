//! Partitioned streams (`--stream-partitions`) against the shared broker
//! (stream port `$ODOO_CDC_TEST_STREAM`, AMQP `$ODOO_CDC_TEST_AMQP`), and the
//! replaying consumer `examples/stream_replay.rs` (compiled in as a module,
//! so this is the code `cargo run --example stream_replay` runs).
//!
//! The kill -9 run with partitions is in `tests/stream_sink.rs`, next to the
//! single-stream one whose machinery it shares.

mod common;

#[path = "../examples/stream_replay.rs"]
#[allow(dead_code)]
mod stream_replay;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Proc, TestDb};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use odoo_cdc::sink::HeaderValue;
use odoo_cdc::sink::stream::consumer::{delete_stream, read_stream};
use odoo_cdc::sink::stream::partition::partition_of;
use odoo_cdc::sink::stream::{StreamConfig, StreamMessage};
use serde_json::Value;

fn stream_url() -> String {
    std::env::var("ODOO_CDC_TEST_STREAM")
        .unwrap_or_else(|_| "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f".to_string())
}

/// `odoo-cdc run` into a super stream of `partitions` on the shared broker.
fn spawn_connector(db: &TestDb, stream: &str, partitions: u16, extra: &[&str]) -> Proc {
    let (url, amqp, n) = (stream_url(), common::amqp_url(), partitions.to_string());
    let mut args = vec![
        "run",
        "--source",
        &db.url,
        "--stream-url",
        &url,
        "--stream",
        stream,
        "--stream-partitions",
        &n,
        "--amqp",
        &amqp,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
        "--create-slot",
        "--status-interval-secs",
        "1",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args, &[])
}

fn partitions_of(stream: &str, partitions: u16) -> StreamConfig {
    StreamConfig::new(&stream_url(), stream, "reader")
        .and_then(|c| c.with_partitions(partitions))
        .unwrap()
}

/// Every message of each partition.
async fn read_partitions(cfg: &StreamConfig) -> Vec<Vec<StreamMessage>> {
    let mut out = Vec::new();
    for i in 0..usize::from(cfg.partitions) {
        out.push(
            read_stream(&cfg.partition(i), 0, Duration::from_millis(700), usize::MAX)
                .await
                .unwrap_or_default(),
        );
    }
    out
}

/// Reads the partitions until `done` holds for them; panics after `limit`.
async fn wait_for(
    cfg: &StreamConfig,
    limit: Duration,
    what: &str,
    done: impl Fn(&[Vec<StreamMessage>]) -> bool,
) -> Vec<Vec<StreamMessage>> {
    let deadline = Instant::now() + limit;
    loop {
        let got = read_partitions(cfg).await;
        if done(&got) {
            return got;
        }
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        assert!(
            Instant::now() < deadline,
            "{what}: partitions hold {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn header<'a>(m: &'a StreamMessage, name: &str) -> Option<&'a str> {
    match m.application_properties.get(name) {
        Some(HeaderValue::Str(s)) => Some(s),
        _ => None,
    }
}

async fn delete_partitions(cfg: &StreamConfig) {
    for i in 0..usize::from(cfg.partitions) {
        delete_stream(&cfg.partition(i)).await.unwrap();
    }
    let (conn, channel) = amqp_channel().await;
    let _ = channel
        .exchange_delete(
            cfg.stream.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
}

async fn amqp_channel() -> (Connection, lapin::Channel) {
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(&common::amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("AMQP connect within 20 s")
    .expect("AMQP connect");
    let channel = conn.create_channel().await.expect("channel");
    (conn, channel)
}

/// The topology and where each kind of message goes: snapshot rows and
/// changes to their key's partition, a truncate to every partition, a
/// logical message to partition 0; the exchange routes key `i` to partition
/// `i`, as super stream clients expect; `check` reports it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_super_stream_is_declared_and_each_event_goes_to_its_partition() {
    let db = TestDb::create("stream_parts").await;
    db.exec(&format!(
        "CREATE TABLE item (id bigint PRIMARY KEY, v text);
         CREATE TABLE pair (a int, b int, v text, PRIMARY KEY (a, b));
         INSERT INTO item SELECT g, 'snap ' || g FROM generate_series(1, 40) g;
         CREATE PUBLICATION {0} FOR TABLE item, pair;",
        db.name
    ))
    .await;
    let stream = common::unique_name("odoo-cdc-test-parts");
    let cfg = partitions_of(&stream, 3);
    let mut connector = spawn_connector(&db, &stream, 3, &["--profile", "none"]);
    let limit = Duration::from_secs(120);
    wait_for(&cfg, limit, "the snapshot", |p| {
        p.iter().map(Vec::len).sum::<usize>() == 40
    })
    .await;
    db.exec(
        "UPDATE item SET v = 'changed' WHERE id <= 20;
         INSERT INTO pair VALUES (1, 2, 'x'), (2, 1, 'y');
         SELECT pg_logical_emit_message(true, 'odoo-cdc-test', 'hello');
         TRUNCATE pair;
         DELETE FROM item WHERE id > 30;",
    )
    .await;
    // 40 snapshot rows, 20 updates, 2 inserts, 1 message, 3 copies of the
    // truncate, 10 deletes.
    let got = wait_for(&cfg, limit, "the changes", |p| {
        p.iter().map(Vec::len).sum::<usize>() >= 76
    })
    .await;
    let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 76, "{sizes:?}");
    let mut truncates = Vec::new();
    for (p, messages) in got.iter().enumerate() {
        for m in messages {
            let op = header(m, "x-op").unwrap_or_default();
            match (op, header(m, "x-partition-key")) {
                ("t", key) => {
                    assert_eq!(key, None);
                    truncates.push((p, m.message_id.clone()));
                }
                ("m", key) => {
                    assert_eq!((p, key), (0, None), "a logical message goes to partition 0");
                }
                (_, Some(key)) => {
                    assert_eq!(partition_of(key, 3), p, "{key} in partition {p}");
                    let body: Value = serde_json::from_slice(&m.body).unwrap();
                    let want = match body["source"]["table"].as_str() {
                        Some("item") => format!("public.item/{}", body["key"]["id"]),
                        _ => format!("public.pair/{}/{}", body["key"]["a"], body["key"]["b"]),
                    };
                    assert_eq!(key, want);
                }
                (op, None) => panic!("a row event ({op}) without x-partition-key: {m:?}"),
            }
        }
    }
    let ids: Vec<&Option<String>> = truncates.iter().map(|(_, id)| id).collect();
    assert_eq!(
        truncates.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [0, 1, 2],
        "the truncate is in every partition"
    );
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one message id: {ids:?}"
    );

    // check: every partition exists, with its producer's id, and the exchange.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["check", "--source", &db.url, "--stream-url", &stream_url()])
        .args(["--stream", &stream, "--stream-partitions", "3"])
        .args(["--slot", &db.name, "--publication", &db.name])
        .args(["--amqp", &common::amqp_url()])
        .env("ODOO_CDC_LOG", "warn")
        .output()
        .expect("run odoo-cdc check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("every partition exists")
            && report.contains(&format!("{stream}-2 "))
            && report.contains(&format!("super stream exchange {stream:?} exists")),
        "{report}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["check", "--source", &db.url, "--stream-url", &stream_url()])
        .args([
            "--stream",
            &stream,
            "--stream-partitions",
            "4",
            "--no-declare",
        ])
        .env("ODOO_CDC_LOG", "warn")
        .output()
        .expect("run odoo-cdc check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("partitions {stream}-3 of super stream"))
            && report.contains("add_super_stream"),
        "{report}"
    );

    // The exchange routes routing key `i` to partition `i`.
    let (conn, channel) = amqp_channel().await;
    for i in 0..3 {
        channel
            .basic_publish(
                stream.as_str().into(),
                i.to_string().as_str().into(),
                BasicPublishOptions::default(),
                format!("routed {i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let _ = conn.close(200, "done".into()).await;
    let got = wait_for(&cfg, limit, "the routed messages", |p| {
        p.iter().enumerate().all(|(i, m)| {
            m.last()
                .is_some_and(|m| m.body == format!("routed {i}").as_bytes())
        })
    })
    .await;
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 79);

    connector.terminate();
    delete_partitions(&cfg).await;
    db.cleanup().await;
}

// ---- the replaying consumer ---------------------------------------------

/// (id, name, state, amount_total, partner_id) of every order, and (id,
/// order_id, name, quantity, price, sequence) of every line, as text.
type Orders = (Vec<Vec<Option<String>>>, Vec<Vec<Option<String>>>);

const ORDER_COLUMNS: [&str; 5] = ["id", "name", "state", "amount_total", "partner_id"];
const LINE_COLUMNS: [&str; 6] = [
    "id",
    "order_id",
    "name",
    "product_uom_qty",
    "price_unit",
    "sequence",
];

/// The oracle: the source tables, read with SQL.
async fn db_orders(db: &TestDb) -> Orders {
    let select = |table: &str, columns: &[&str]| {
        let list: Vec<String> = columns.iter().map(|c| format!("{c}::text")).collect();
        format!("SELECT {} FROM {table} t ORDER BY t.id", list.join(", "))
    };
    let rows = |sql: String| async move {
        db.client
            .query(&sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect::<Vec<Vec<Option<String>>>>()
    };
    (
        rows(select("sale_order", &ORDER_COLUMNS)).await,
        rows(select("sale_order_line", &LINE_COLUMNS)).await,
    )
}

/// The same columns from the consumer's model (JSON numbers and strings as
/// text, as PostgreSQL writes them).
fn model_orders(state: &stream_replay::State) -> Orders {
    let text = |v: Option<&Value>| match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let table = |name: &str, columns: &[&str]| {
        state
            .model
            .rows(name)
            .values()
            .map(|row| columns.iter().map(|c| text(row.get(*c))).collect())
            .collect()
    };
    (
        table("sale_order", &ORDER_COLUMNS),
        table("sale_order_line", &LINE_COLUMNS),
    )
}

/// Waits until the consumer's model equals the database; panics after `limit`
/// with what differs.
async fn await_model(db: &TestDb, running: &stream_replay::Running, limit: Duration, who: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let want = db_orders(db).await;
        let have = model_orders(&running.state.read().unwrap());
        if have == want {
            return;
        }
        assert!(!running.failed(), "{who} stopped on an error");
        if Instant::now() > deadline {
            let differ = |want: &[Vec<Option<String>>], have: &[Vec<Option<String>>]| {
                let missing: Vec<_> = want.iter().filter(|r| !have.contains(r)).take(2).collect();
                let extra: Vec<_> = have.iter().filter(|r| !want.contains(r)).take(2).collect();
                let first = want.iter().zip(have).find(|(w, h)| w != h);
                format!(
                    "database only {missing:?}, model only {extra:?}, first difference {first:?}"
                )
            };
            panic!(
                "{who}: the model ({} orders, {} lines) never equalled the database ({} orders, {} lines); orders: {}; lines: {}",
                have.0.len(),
                have.1.len(),
                want.0.len(),
                want.1.len(),
                differ(&want.0, &have.0),
                differ(&want.1, &have.1),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Orders written the way a sales app does: an order with its lines in one
/// transaction, then confirmations, quantity changes, cancelled orders
/// deleted with their lines (cascade), single lines deleted.
async fn order_workload(db: &TestDb, rounds: std::ops::Range<u32>) {
    for round in rounds {
        let partner = 10 + i64::from(round % 3);
        let lines = 1 + i64::from(round % 5);
        db.exec(&format!(
            "WITH o AS (
                 INSERT INTO sale_order (name, state, company_id, partner_id, partner_invoice_id,
                     partner_shipping_id, picking_policy, date_order, amount_total)
                 VALUES ('S{round:05}', 'draft', 1, {partner}, {partner}, {partner}, 'direct', now(), 0)
                 RETURNING id)
             INSERT INTO sale_order_line (order_id, sequence, name, product_id, product_uom_qty,
                 price_unit, customer_lead)
             SELECT o.id, g * 10, 'line ' || g, 1 + g % 10, g, 12.5 * g, 0
             FROM o, generate_series(1, {lines}) g;
             UPDATE sale_order o SET amount_total = s.total, state = 'sent'
             FROM (SELECT order_id, sum(product_uom_qty * price_unit) AS total
                   FROM sale_order_line GROUP BY order_id) s
             WHERE s.order_id = o.id AND o.name = 'S{round:05}';"
        ))
        .await;
        match round % 7 {
            2 => {
                db.exec(
                    "UPDATE sale_order SET state = 'sale' WHERE id IN
                     (SELECT id FROM sale_order WHERE state = 'sent' ORDER BY random() LIMIT 3)",
                )
                .await
            }
            3 => {
                db.exec(
                    "UPDATE sale_order_line SET product_uom_qty = product_uom_qty + 1 WHERE id IN
                     (SELECT id FROM sale_order_line ORDER BY random() LIMIT 5)",
                )
                .await
            }
            5 => {
                db.exec(
                    "DELETE FROM sale_order WHERE id IN
                     (SELECT id FROM sale_order WHERE state <> 'sale' ORDER BY random() LIMIT 1)",
                )
                .await
            }
            6 => {
                db.exec(
                    "DELETE FROM sale_order_line WHERE id IN
                     (SELECT id FROM sale_order_line ORDER BY random() LIMIT 2)",
                )
                .await
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replaying consumer follows a 3-partition stream while orders are
/// written, crashes (its task aborted) and resumes from its state file; a
/// second instance started afterwards builds the same model from the
/// stream's history alone. Both equal the database's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaying_consumer_rebuilds_the_orders_from_the_partitions() {
    let db = TestDb::create("stream_replay").await;
    db.exec(include_str!("fixtures/odoo_schema.sql")).await;
    db.exec(&format!(
        "CREATE PUBLICATION {} FOR TABLE sale_order, sale_order_line",
        db.name
    ))
    .await;
    // Orders before the slot exists arrive as snapshot rows.
    order_workload(&db, 0..10).await;
    let stream = common::unique_name("odoo-cdc-test-replay");
    let cfg = partitions_of(&stream, 3);
    let mut connector = spawn_connector(&db, &stream, 3, &[]);
    common::wait_for_slot(&db).await;

    let dir = tempfile::tempdir().unwrap();
    let args = |state: &str| stream_replay::Args {
        stream_url: stream_url(),
        stream: stream.clone(),
        partitions: 3,
        schema: "public".into(),
        state: dir.path().join(state),
        listen: Some("127.0.0.1:0".parse().unwrap()),
    };
    let first = stream_replay::start(args("a.json")).await.unwrap();
    order_workload(&db, 10..70).await;

    // A crash: no final save; it resumes from what the file says.
    let state_file = dir.path().join("a.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the consumer never saved its state"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.abort();
    let saved = stream_replay::State::load(&state_file, cfg.streams()).unwrap();
    assert!(saved.offsets.iter().sum::<u64>() > 0, "{:?}", saved.offsets);
    let first = stream_replay::start(args("a.json")).await.unwrap();
    order_workload(&db, 70..130).await;

    let limit = Duration::from_secs(
        std::env::var("ODOO_CDC_REPLAY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(240),
    );
    await_model(&db, &first, limit, "the first consumer").await;
    let (orders, lines) = db_orders(&db).await;
    assert!(orders.len() > 50 && lines.len() > 150, "a real workload");

    // The read API serves an order with its lines.
    let id: i64 = orders[orders.len() / 2][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    let addr = first.http_addr.unwrap();
    let body = http_get(addr, &format!("/orders/{id}")).await;
    let view: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let want_lines = lines
        .iter()
        .filter(|l| l[1].as_deref() == Some(&id.to_string()))
        .count();
    assert_eq!(view["lines"].as_array().map(Vec::len), Some(want_lines));

    // A second instance, later, from history alone.
    let second = stream_replay::start(args("b.json")).await.unwrap();
    await_model(&db, &second, limit, "the second consumer").await;
    let (a, b) = (
        first.state.read().unwrap().model.clone(),
        second.state.read().unwrap().model.clone(),
    );
    let all = |m: &stream_replay::Model| -> BTreeMap<String, usize> {
        stream_replay::TABLES
            .iter()
            .map(|t| (t.to_string(), m.rows(t).len()))
            .collect()
    };
    assert_eq!(all(&a), all(&b));
    assert_eq!(
        model_orders(&first.state.read().unwrap()),
        model_orders(&second.state.read().unwrap())
    );
    eprintln!(
        "{} orders, {} lines; first consumer applied {} (skipped {}), second applied {} (skipped {})",
        orders.len(),
        lines.len(),
        a.applied,
        a.skipped,
        b.applied,
        b.skipped
    );
    second.stop().await.unwrap();
    first.stop().await.unwrap();
    connector.terminate();
    delete_partitions(&cfg).await;
    db.cleanup().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(20), io)
        .await
        .expect("an answer within 20 s")
        .expect("GET")
}
