//! The Odoo fixture end to end: load `tests/fixtures/odoo_schema.sql`, run the
//! ORM-style workload of `examples/odoo_workload.rs` against the real
//! PostgreSQL while `odoo-cdc tail` streams, and check that tail printed exactly
//! one event per row the workload changed, per table and operation.
//!
//! The example file is compiled into this test as a module, so the test drives
//! the very code `scripts/demo.sh` runs, without depending on a built example.

mod common;

#[path = "../examples/odoo_workload.rs"]
#[allow(dead_code)]
mod odoo_workload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::{Proc, TestDb};
use odoo_workload::{Options, TableCounts};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_sees_every_row_the_odoo_workload_changes() {
    let db = TestDb::create("odoo_fixture").await;
    odoo_workload::load_schema(&db.client)
        .await
        .expect("load the Odoo schema");

    let mut tail = Proc::spawn(
        &[
            "tail",
            "--source",
            &db.url,
            "--slot",
            &db.name,
            "--publication",
            &db.name,
            "--create-slot",
            "--create-publication",
            // Every table, bus_bus included: this test counts the workload's rows.
            "--profile",
            "none",
            // Counts stream events only; the seed rows would come as snapshot reads.
            "--snapshot",
            "never",
        ],
        &[],
    );
    let mut ready = false;
    for _ in 0..400 {
        if db.confirmed_flush_lsn(&db.name).await.is_some() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "tail did not create its slot");

    let mut client = odoo_workload::connect(&db.url).await.expect("connect");
    let opts = Options {
        orders: 300,
        rate: 0.0,
        seed: 42,
        import_every: 50,
        progress: false,
    };
    let report = odoo_workload::run(&mut client, &opts)
        .await
        .expect("workload");
    let total = report.total();
    let expected_events = (total.insert + total.update + total.delete) as usize;
    assert!(
        expected_events > 10_000,
        "the workload is too small to mean much: {}",
        report.to_json()
    );

    let done = tail.collect_until(Duration::from_secs(180), |l| l.len() >= expected_events);
    assert!(
        done,
        "tail printed {} of {expected_events} events",
        tail.seen.len()
    );
    // Anything beyond the expected count would be a duplicate or a phantom: give it time to show.
    tail.collect_until(Duration::from_secs(2), |_| false);
    let events = tail.events();

    let mut seen: BTreeMap<String, TableCounts> = BTreeMap::new();
    for e in &events {
        let table = e["source"]["table"].as_str().expect("source.table");
        let c = seen.entry(table.to_string()).or_default();
        match e["op"].as_str() {
            Some("c") => c.insert += 1,
            Some("u") => c.update += 1,
            Some("d") => c.delete += 1,
            other => panic!("unexpected op {other:?} in {e}"),
        }
    }
    let expected: BTreeMap<String, TableCounts> = report
        .tables
        .iter()
        .filter(|(_, c)| c.insert + c.update + c.delete > 0)
        .map(|(t, c)| (t.clone(), *c))
        .collect();
    assert_eq!(
        seen, expected,
        "events per table (left) differ from the rows the workload changed (right)"
    );
    for t in [
        "sale_order",
        "sale_order_line",
        "stock_picking",
        "stock_move",
        "stock_quant",
        "account_move",
        "account_move_line",
        "account_move_line_account_tax_rel",
        "bus_bus",
    ] {
        assert!(seen.contains_key(t), "no events for {t}");
    }
    assert!(
        seen["sale_order_line"].delete > 0 && seen["account_tax_sale_order_line_rel"].delete > 0,
        "cascaded deletes of an unlinked order must be in the stream"
    );

    // Group by transaction: one commit_lsn per transaction.
    let mut by_tx: HashMap<&str, Vec<&Value>> = HashMap::new();
    for e in &events {
        by_tx
            .entry(e["source"]["commit_lsn"].as_str().expect("commit_lsn"))
            .or_default()
            .push(e);
    }
    assert_eq!(
        by_tx.len() as u64,
        report.transactions,
        "one commit per workload transaction (every one changes rows)"
    );
    // Order confirmation: sales, stock and accounting in one transaction.
    let confirm_tables: HashSet<&str> = [
        "sale_order",
        "sale_order_line",
        "stock_picking",
        "stock_move",
        "account_move",
        "account_move_line",
    ]
    .into();
    let confirmations = by_tx
        .values()
        .filter(|evs| {
            let tables: HashSet<&str> = evs
                .iter()
                .filter_map(|e| e["source"]["table"].as_str())
                .collect();
            confirm_tables.is_subset(&tables)
        })
        .count();
    assert!(
        confirmations > 0,
        "no transaction spanned {confirm_tables:?}"
    );
    // A bulk import: more lines than one INSERT statement carries, one transaction.
    assert!(
        by_tx.values().any(|evs| evs
            .iter()
            .filter(|e| e["source"]["table"] == "sale_order_line" && e["op"] == "c")
            .count()
            > 100),
        "no transaction inserted more than 100 order lines"
    );
    // Within a transaction, seq is 0..n in order.
    for evs in by_tx.values() {
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["source"]["seq"], i, "seq out of order in {e}");
        }
    }

    // Odoo values arrive typed: numeric as exact strings, jsonb as JSON.
    let line = events
        .iter()
        .find(|e| {
            e["source"]["table"] == "sale_order_line"
                && e["op"] == "c"
                && e["after"]["analytic_distribution"].is_object()
        })
        .expect("an order line with an analytic distribution");
    let price = line["after"]["price_unit"]
        .as_str()
        .unwrap_or_else(|| panic!("price_unit is not a string: {line}"));
    assert!(
        price.parse::<f64>().is_ok() && price.contains('.'),
        "{price}"
    );
    assert!(line["after"]["product_uom_qty"].is_string(), "{line}");
    let bus = events
        .iter()
        .find(|e| e["source"]["table"] == "bus_bus" && e["op"] == "c")
        .expect("a bus notification");
    assert!(
        bus["after"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"type\""))
    );

    assert_eq!(tail.terminate(), Some(0), "SIGTERM is a clean shutdown");
    db.cleanup().await;
}
