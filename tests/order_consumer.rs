//! Decoupling, end to end: `examples/order_consumer.rs` (compiled in as a
//! module, so this is the code `cargo run --example order_consumer` runs) fed by
//! a real `odoo-cdc run` from a private PostgreSQL cluster under the ORM-style
//! workload of `examples/odoo_workload.rs`.
//!
//! 1. Orders flow in; the consumer's model equals the database.
//! 2. PostgreSQL stops: the consumer still answers for every order it has, with
//!    the same lines and customer as before.
//! 3. PostgreSQL returns, more orders are written: the consumer catches up and
//!    its model equals the database again (no duplicate rows).
//! 4. The whole history is published again with the same message ids (a second
//!    connector on a slot created before any write, like a connector replaying
//!    after a crash): every replayed event is skipped and counted, the model is
//!    unchanged.
//!
//! The cluster is private (`PrivateCluster`): stopping it touches nobody else.

mod common;

#[path = "../examples/order_consumer.rs"]
#[allow(dead_code)]
mod order_consumer;

#[path = "../examples/odoo_workload.rs"]
#[allow(dead_code)]
mod odoo_workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Proc;
use common::cluster::PrivateCluster;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

const DB: &str = "odoo_orders";
const PUBLICATION: &str = "odoo_orders";
const SLOT: &str = "odoo_orders";
/// A slot created before any write: replaying it republishes the whole history.
const REPLAY_SLOT: &str = "odoo_orders_replay";

/// `GET path` on the consumer's read API: (status, JSON body).
async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(20), io)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within 20 s"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}")),
    )
}

/// What the read model must equal: each order's (name, state, amount_total
/// as text), each order's line ids, and the number of partners.
#[derive(Debug, PartialEq)]
struct OrdersState {
    orders: BTreeMap<i64, (Value, Value, Value)>,
    lines: usize,
    partners: usize,
}

async fn db_state(client: &Client) -> OrdersState {
    let rows = client
        .query(
            "SELECT id::int8, name, state, amount_total::text FROM sale_order ORDER BY id",
            &[],
        )
        .await
        .expect("read orders");
    let text = |v: Option<String>| v.map(Value::String).unwrap_or(Value::Null);
    let orders = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (Value::String(r.get(1)), text(r.get(2)), text(r.get(3))),
            )
        })
        .collect();
    let count = |sql: &'static str| async move {
        client
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get::<_, i64>(0) as usize
    };
    OrdersState {
        orders,
        lines: count("SELECT count(*) FROM sale_order_line").await,
        partners: count("SELECT count(*) FROM res_partner").await,
    }
}

async fn consumer_state(addr: SocketAddr) -> OrdersState {
    let (_, list) = get(addr, "/orders").await;
    let orders = list
        .as_array()
        .expect("an array")
        .iter()
        .map(|o| {
            (
                o["id"].as_i64().expect("id"),
                (
                    o["name"].clone(),
                    o["state"].clone(),
                    o["amount_total"].clone(),
                ),
            )
        })
        .collect();
    let (_, stats) = get(addr, "/stats").await;
    OrdersState {
        orders,
        lines: stats["lines"].as_u64().unwrap() as usize,
        partners: stats["partners"].as_u64().unwrap() as usize,
    }
}

/// Polls until the consumer's model equals the database (120 s cap).
async fn wait_until_caught_up(client: &Client, addr: SocketAddr, what: &str) -> OrdersState {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let want = db_state(client).await;
        let got = consumer_state(addr).await;
        if got == want {
            return got;
        }
        if Instant::now() > deadline {
            let (_, stats) = get(addr, "/stats").await;
            panic!(
                "{what}: the consumer did not catch up within 120 s.\n database: {} orders, {} lines, {} partners\n consumer: {} orders, {} lines, {} partners\n stats: {stats}",
                want.orders.len(),
                want.lines,
                want.partners,
                got.orders.len(),
                got.lines,
                got.partners
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn wait_for_slot_active(client: &Client, slot: &str) {
    for _ in 0..600 {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read slots");
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slot {slot} did not become active within 60 s");
}

fn connector(url: &str, exchange: &str, slot: &str, create: bool) -> Proc {
    let amqp = common::amqp_url();
    let mut args = vec![
        "run",
        "--source",
        url,
        "--amqp",
        &amqp,
        "--exchange",
        exchange,
        "--slot",
        slot,
        "--publication",
        PUBLICATION,
        "--routing-prefix",
        "odoo",
        // The publication is FOR ALL TABLES; the consumer binds three of them.
        "--unroutable",
        "drop",
        "--status-interval-secs",
        "1",
    ];
    if create {
        args.push("--create-slot");
    }
    Proc::spawn(&args, &[])
}

async fn workload(url: &str, orders: u64, seed: u64) {
    let mut client = odoo_workload::connect(url).await.expect("connect");
    let opts = odoo_workload::Options {
        orders,
        rate: 0.0,
        seed,
        import_every: 20,
        progress: false,
    };
    odoo_workload::run(&mut client, &opts)
        .await
        .expect("workload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_keeps_serving_while_postgres_is_down_and_catches_up_without_duplicates() {
    let pg = PrivateCluster::start(&[]);
    let admin = common::connect(&pg.admin_url()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .expect("create database");
    let url = pg.url(DB);
    let client = common::connect(&url).await;
    client
        .batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"))
        .await
        .expect("create publication");

    // The consumer first: its queue must be bound before events are published.
    let exchange = common::unique_name("orders_x");
    let queue = common::unique_name("order_consumer");
    let dir = tempfile::tempdir().unwrap();
    let args = order_consumer::Args {
        amqp: common::amqp_url(),
        exchange: exchange.clone(),
        prefix: "odoo".into(),
        schema: "public".into(),
        queue: queue.clone(),
        queue_type: "quorum".into(),
        sqlite: Some(dir.path().join("orders.sqlite")),
        listen: "127.0.0.1:0".parse().unwrap(),
        prefetch: 500,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let consumer = order_consumer::start(args, stop_rx)
        .await
        .expect("start the order consumer");
    let api = consumer.http_addr;

    let mut cdc = connector(&url, &exchange, SLOT, true);
    wait_for_slot_active(&client, SLOT).await;
    client
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
            &[&REPLAY_SLOT],
        )
        .await
        .expect("create the replay slot");

    // 1. Orders flow in (the schema's seed partners and products too).
    odoo_workload::load_schema(&client)
        .await
        .expect("load the Odoo schema");
    workload(&url, 40, 7).await;
    let before = wait_until_caught_up(&client, api, "first batch").await;
    assert!(
        before.orders.len() >= 20 && before.lines > 0,
        "too few orders to mean much: {before:?}"
    );
    let mut views = BTreeMap::new();
    for id in before.orders.keys() {
        let (status, view) = get(api, &format!("/orders/{id}")).await;
        assert_eq!(status, 200, "order {id}: {view}");
        views.insert(*id, view);
    }
    // Lines and customer are joined in: check one order against the database.
    let (&some_id, some_view) = views
        .iter()
        .find(|(_, v)| !v["lines"].as_array().unwrap().is_empty())
        .expect("an order with lines");
    let line_ids: Vec<i64> = client
        .query(
            "SELECT id::int8 FROM sale_order_line WHERE order_id = $1 ORDER BY sequence, id",
            &[&(some_id as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let view_line_ids: Vec<i64> = some_view["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(view_line_ids, line_ids, "lines of order {some_id}");
    let partner: String = client
        .query_one(
            "SELECT p.name FROM sale_order o JOIN res_partner p ON p.id = o.partner_id WHERE o.id = $1",
            &[&(some_id as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(some_view["partner"]["name"], Value::String(partner));

    // 2. Odoo's database goes away; the consumer does not care.
    drop(client);
    drop(admin);
    pg.stop();
    assert!(
        cdc.child.try_wait().unwrap().is_none(),
        "the connector must keep retrying, not exit"
    );
    for (id, view) in &views {
        let (status, now) = get(api, &format!("/orders/{id}")).await;
        assert_eq!(status, 200, "order {id} while PostgreSQL is down: {now}");
        assert_eq!(&now, view, "order {id} changed while PostgreSQL is down");
    }
    let (status, stats) = get(api, "/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["orders"].as_u64(), Some(before.orders.len() as u64));

    // 3. It comes back; more orders; the consumer catches up, no duplicate rows.
    pg.start_again();
    let client = common::connect(&url).await;
    workload(&url, 30, 8).await;
    let after = wait_until_caught_up(&client, api, "after the restart").await;
    assert!(after.orders.len() > before.orders.len(), "{after:?}");
    for (id, _) in after.orders.iter().take(50) {
        let (_, view) = get(api, &format!("/orders/{id}")).await;
        let mut ids: Vec<i64> = view["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_i64().unwrap())
            .collect();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "order {id} lists a line twice");
        let db_lines: i64 = client
            .query_one(
                "SELECT count(*) FROM sale_order_line WHERE order_id = $1",
                &[&(*id as i32)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n as i64, db_lines, "lines of order {id}");
    }

    // 4. Replay the whole history with the same message ids.
    assert_eq!(cdc.terminate(), Some(0), "the connector stops cleanly");
    let (_, s) = get(api, "/stats").await;
    let applied = s["applied"].as_u64().unwrap();
    let skipped_before = s["duplicates"].as_u64().unwrap() + s["stale"].as_u64().unwrap();
    let mut replay = connector(&url, &exchange, REPLAY_SLOT, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    let stats = loop {
        let (_, s) = get(api, "/stats").await;
        let skipped = s["duplicates"].as_u64().unwrap() + s["stale"].as_u64().unwrap();
        if skipped - skipped_before >= applied {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the replay did not reach the consumer within 120 s: {s}, applied before {applied}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Every replayed event was one the model already had: skipped, none applied.
    assert_eq!(stats["applied"].as_u64(), Some(applied), "{stats}");
    let skipped = stats["duplicates"].as_u64().unwrap() + stats["stale"].as_u64().unwrap();
    assert_eq!(skipped - skipped_before, applied, "{stats}");
    assert!(stats["duplicates"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(
        consumer_state(api).await,
        after,
        "the replay changed the model"
    );
    assert_eq!(replay.terminate(), Some(0));
    eprintln!(
        "order_consumer: {} orders, {} lines, {} partners; {applied} events applied, {} skipped on replay",
        after.orders.len(),
        after.lines,
        after.partners,
        skipped - skipped_before
    );

    // The SQLite file holds the same model: a restarted consumer serves it at once.
    let _ = stop_tx.send(true);
    consumer.wait().await.expect("consumer stops cleanly");
    let mut reloaded = order_consumer::Model::default();
    order_consumer::Store::open(&dir.path().join("orders.sqlite"))
        .unwrap()
        .load(&mut reloaded)
        .unwrap();
    assert_eq!(reloaded.count("sale_order"), after.orders.len());
    assert_eq!(reloaded.count("sale_order_line"), after.lines);
    assert_eq!(reloaded.count("res_partner"), after.partners);

    let (conn, ch) = common::amqp::channel().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// The read model's rules on their own (no services): positions, duplicates,
/// stale events, tombstones, unchanged TOAST, truncate.
mod model_rules {
    use super::order_consumer::{Model, Outcome, Position};
    use serde_json::{Value, json};

    fn pos(lsn: u64, seq: u32) -> Position {
        Position {
            commit_lsn: lsn,
            seq,
        }
    }

    fn ev(op: &str, table: &str, id: i64, after: Value) -> Value {
        json!({"op": op, "source": {"schema": "public", "table": table}, "key": {"id": id},
               "before": null, "after": after, "unchanged_toast": []})
    }

    #[test]
    fn message_ids_parse_and_order_like_the_wal() {
        let a = Position::from_message_id("00000000016B37A0-00000003").unwrap();
        assert_eq!(a, pos(0x16B37A0, 3));
        assert_eq!(a.message_id(), "00000000016B37A0-00000003");
        assert!(pos(1, 9) < pos(2, 0) && pos(2, 0) < pos(2, 1));
        assert!(Position::from_message_id("16B37A0-3").is_none());
        assert!(Position::from_message_id("not-an-id").is_none());
    }

    #[test]
    fn duplicates_and_stale_events_are_skipped_and_counted() {
        let mut m = Model::default();
        let mut w = Vec::new();
        let v1 = ev("c", "sale_order", 1, json!({"id": 1, "state": "draft"}));
        let v2 = ev("u", "sale_order", 1, json!({"id": 1, "state": "sale"}));
        assert_eq!(m.apply(pos(10, 0), &v1, &mut w), Ok(Outcome::Applied));
        assert_eq!(m.apply(pos(20, 0), &v2, &mut w), Ok(Outcome::Applied));
        assert_eq!(m.apply(pos(20, 0), &v2, &mut w), Ok(Outcome::Duplicate));
        assert_eq!(m.apply(pos(10, 0), &v1, &mut w), Ok(Outcome::Stale));
        assert_eq!(m.get("sale_order", 1).unwrap().data["state"], "sale");
        assert_eq!(w.len(), 2, "only applied events are written");
        let c = m.counters;
        assert_eq!((c.applied, c.duplicates, c.stale), (2, 1, 1));

        // A delete leaves a tombstone: the replayed insert cannot resurrect the row.
        let d = json!({"op": "d", "source": {"table": "sale_order"}, "key": {"id": 1},
                       "before": {"id": 1}, "after": null});
        assert_eq!(m.apply(pos(30, 0), &d, &mut w), Ok(Outcome::Applied));
        assert_eq!(m.apply(pos(10, 0), &v1, &mut w), Ok(Outcome::Stale));
        assert!(m.get("sale_order", 1).is_none());
        assert_eq!(m.count("sale_order"), 0);

        // Other tables and logical messages are not this model's business.
        let other = ev("c", "stock_move", 5, json!({"id": 5}));
        assert_eq!(m.apply(pos(40, 0), &other, &mut w), Ok(Outcome::Ignored));
        let msg = json!({"op": "m", "source": {}, "message": {"prefix": "x"}});
        assert_eq!(m.apply(pos(41, 0), &msg, &mut w), Ok(Outcome::Ignored));
    }

    #[test]
    fn unchanged_toast_keeps_the_previous_value() {
        let mut m = Model::default();
        let mut w = Vec::new();
        let c = ev(
            "c",
            "res_partner",
            7,
            json!({"id": 7, "name": "A", "comment": "long"}),
        );
        m.apply(pos(1, 0), &c, &mut w).unwrap();
        let mut u = ev("u", "res_partner", 7, json!({"id": 7, "name": "B"}));
        u["unchanged_toast"] = json!(["comment"]);
        m.apply(pos(2, 0), &u, &mut w).unwrap();
        let row = &m.get("res_partner", 7).unwrap().data;
        assert_eq!(
            (row["name"].as_str(), row["comment"].as_str()),
            (Some("B"), Some("long"))
        );
    }

    #[test]
    fn truncate_clears_older_rows_and_blocks_their_replay() {
        let mut m = Model::default();
        let mut w = Vec::new();
        let line = ev("c", "sale_order_line", 3, json!({"id": 3, "order_id": 1}));
        m.apply(pos(5, 0), &line, &mut w).unwrap();
        let t = json!({"op": "t", "source": {"table": "sale_order_line"}, "key": null,
                       "before": null, "after": null});
        assert_eq!(m.apply(pos(6, 0), &t, &mut w), Ok(Outcome::Applied));
        assert_eq!(m.count("sale_order_line"), 0);
        assert_eq!(m.apply(pos(5, 0), &line, &mut w), Ok(Outcome::Stale));
        assert_eq!(m.apply(pos(6, 0), &t, &mut w), Ok(Outcome::Duplicate));
        assert_eq!(m.apply(pos(7, 0), &line, &mut w), Ok(Outcome::Applied));
        assert_eq!(m.count("sale_order_line"), 1);
    }

    #[test]
    fn an_event_without_a_key_is_an_error_naming_the_table() {
        let mut m = Model::default();
        let bad = json!({"op": "c", "source": {"table": "sale_order"}, "key": null, "after": {}});
        let e = m.apply(pos(1, 0), &bad, &mut Vec::new()).unwrap_err();
        assert!(e.contains("sale_order") && e.contains("key.id"), "{e}");
    }
}
