//! Filters and the Odoo profile end to end, against the real PostgreSQL and
//! RabbitMQ from `scripts/services.sh` and the Odoo-like fixture
//! (`tests/fixtures/odoo_schema.sql`) driven by the ORM-style workload.

mod common;

#[path = "../examples/odoo_workload.rs"]
#[allow(dead_code)]
mod odoo_workload;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::amqp::consume;
use common::{Proc, TestDb, run_args, unique_name, wait_for_slot};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// An Odoo ≤ 12 many2many table as upgraded databases still have it: a UNIQUE
/// constraint, no primary key, so REPLICA IDENTITY DEFAULT identifies nothing.
const LEGACY_REL: &str = "CREATE TABLE res_partner_res_partner_category_rel (
        category_id integer NOT NULL, partner_id integer NOT NULL REFERENCES res_partner (id),
        UNIQUE (category_id, partner_id));
     INSERT INTO res_partner_res_partner_category_rel VALUES (1, 1);";

/// `odoo-cdc` with stderr in a file (the warnings are part of what is tested).
struct Logged {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    fn spawn(args: &[&str]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("ODOO_CDC_LOG", "info,lapin=error")
            .spawn()
            .expect("spawn odoo-cdc");
        Logged {
            child,
            log,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn published_tables(db: &TestDb, publication: &str) -> BTreeSet<String> {
    db.client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Every key of an event's `key`, `before` and `after`.
fn columns_of(e: &Value) -> BTreeSet<String> {
    ["key", "before", "after"]
        .iter()
        .filter_map(|k| e[*k].as_object())
        .flat_map(|o| o.keys().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_defaults_model_names_and_excluded_columns_over_rabbitmq() {
    let db = TestDb::create("odoo_profile_run").await;
    odoo_workload::load_schema(&db.client)
        .await
        .expect("load the Odoo schema");
    db.exec(LEGACY_REL).await;
    let exchange = unique_name("ex");
    let consumer = consume(&exchange, &unique_name("q"), "#").await;
    let amqp = common::amqp_url();
    let mut args = run_args(&db, &exchange, &amqp);
    args.extend_from_slice(&[
        // Counts the workload's changes: the schema's seed rows would also
        // arrive as snapshot reads.
        "--snapshot",
        "never",
        "--routing-template",
        "{prefix}.{model}.{op}",
        "--exclude-column",
        "res_partner.comment",
        "--exclude-column",
        "public.res_partner.email*",
    ]);
    let run = Logged::spawn(&args);
    wait_for_slot(&db).await;

    // Odoo's own writes through the ORM-style workload ...
    let mut client = odoo_workload::connect(&db.url).await.expect("connect");
    let report = odoo_workload::run(
        &mut client,
        &odoo_workload::Options {
            orders: 40,
            rate: 0.0,
            seed: 7,
            import_every: 50,
            progress: false,
        },
    )
    .await
    .expect("workload");
    // ... and a few more: Odoo keeps updating the table without a primary key
    // (it is not in the publication, so PostgreSQL accepts it).
    db.exec(
        "UPDATE res_partner_res_partner_category_rel SET category_id = 2 WHERE partner_id = 1;
         DELETE FROM res_partner_res_partner_category_rel;
         INSERT INTO mail_message (model, res_id, body, message_type) VALUES ('sale.order', 1, '<p>hi</p>', 'comment');
         INSERT INTO sale_advance_payment_inv (advance_payment_method) VALUES ('delivered');
         UPDATE product_template SET list_price = list_price + 1 WHERE id = 1;
         UPDATE res_partner SET comment = 'private note', email = 'new@example.com' WHERE id = 1;
         INSERT INTO res_partner (name, comment, email, active) VALUES ('END', 'x', 'end@example.com', true);",
    )
    .await;
    let done = consumer
        .wait_until(WAIT, |m| {
            m.iter().any(|g| {
                g.json()["after"]["name"] == "END" && g.json()["source"]["table"] == "res_partner"
            })
        })
        .await;
    assert!(
        done,
        "the END marker did not arrive; stderr:\n{}",
        run.stderr()
    );
    let got = consumer.snapshot();

    let mut per_table: BTreeMap<String, u64> = BTreeMap::new();
    for g in &got {
        let e = g.json();
        let table = e["source"]["table"].as_str().unwrap().to_string();
        *per_table.entry(table).or_default() += 1;
    }
    // Profile defaults: the bus, the scheduler, chatter, wizards are not published.
    for t in [
        "bus_bus",
        "ir_cron",
        "mail_message",
        "sale_advance_payment_inv",
        "res_partner_res_partner_category_rel",
    ] {
        assert!(
            !per_table.contains_key(t),
            "{t} was published: {per_table:?}"
        );
    }
    for t in ["bus_bus", "ir_cron", "mail_message"] {
        assert!(
            report
                .tables
                .get(t)
                .is_some_and(|c| c.insert + c.update > 0),
            "the workload did not write {t}: {}",
            report.to_json()
        );
    }
    // Everything else the workload wrote arrives, row for row.
    for (table, c) in &report.tables {
        if table == "bus_bus" || table.starts_with("ir_cron") || table.starts_with("mail_") {
            continue;
        }
        let mut want = c.insert + c.update + c.delete;
        if table == "res_partner" {
            want += 2;
        }
        assert_eq!(
            per_table.get(table).copied().unwrap_or(0),
            want,
            "events of {table}"
        );
    }

    let so = got
        .iter()
        .find(|g| g.json()["source"]["table"] == "sale_order")
        .expect("a sale_order event");
    let e = so.json();
    assert_eq!(e["source"]["model"], "sale.order", "{e}");
    assert_eq!(
        so.kind,
        format!("sale.order.{}", so.routing_key.rsplit('.').next().unwrap())
    );
    assert!(
        so.routing_key
            .starts_with(&format!("{}.sale.order.", db.name)),
        "{}",
        so.routing_key
    );
    // many2many tables are marked with the models they link.
    let rel = got
        .iter()
        .map(|g| g.json())
        .find(|e| e["source"]["table"] == "account_tax_sale_order_line_rel")
        .expect("a many2many event");
    assert_eq!(
        rel["source"]["many2many"],
        json!({"model": "sale.order.line", "field": "tax_id", "comodel": "account.tax"})
    );
    assert!(rel["source"].get("model").is_none(), "{rel}");
    // Translated fields stay objects by default.
    let tmpl = got
        .iter()
        .map(|g| g.json())
        .find(|e| e["source"]["table"] == "product_template")
        .expect("the product_template update");
    assert!(tmpl["after"]["name"]["en_US"].is_string(), "{tmpl}");
    assert_eq!(tmpl["source"]["model"], "product.template");
    // Excluded columns never appear, in any image.
    let partners: Vec<Value> = got
        .iter()
        .map(|g| g.json())
        .filter(|e| e["source"]["table"] == "res_partner")
        .collect();
    assert!(partners.len() >= 2);
    for e in &partners {
        let cols = columns_of(e);
        assert!(
            !cols.contains("comment")
                && !cols.contains("email")
                && !cols.contains("email_normalized"),
            "{e}"
        );
        assert!(cols.contains("id"), "{e}");
    }

    // The publication holds the selection, never the table without a key ...
    let published = published_tables(&db, &db.name).await;
    assert!(published.contains("public.sale_order"), "{published:?}");
    for t in [
        "public.bus_bus",
        "public.res_partner_res_partner_category_rel",
        "public.mail_message",
    ] {
        assert!(!published.contains(t), "{t} in {published:?}");
    }
    // ... and the operator is told why, with the fix.
    let log = run.stderr();
    assert!(
        log.contains("public.res_partner_res_partner_category_rel")
            && log.contains(
                "ALTER TABLE public.res_partner_res_partner_category_rel REPLICA IDENTITY FULL"
            ),
        "no warning about the table without primary key:\n{log}"
    );
    drop(run);
    consumer.delete().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn globs_translations_full_identity_key_and_insert_only_tables() {
    let db = TestDb::create("odoo_profile_tail").await;
    odoo_workload::load_schema(&db.client)
        .await
        .expect("load the Odoo schema");
    db.exec(LEGACY_REL).await;
    db.exec(
        "CREATE SCHEMA archive;
         CREATE TABLE archive.sale_order (id int PRIMARY KEY, name text);
         ALTER TABLE sale_order REPLICA IDENTITY FULL;",
    )
    .await;
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
            "--snapshot",
            "never",
            "--publication-mode",
            "create",
            "--include",
            "public.sale_*",
            "--include",
            "public.product_template",
            "--include",
            "public.mail_*",
            "--include",
            "public.res_partner_res_partner_category_rel",
            "--exclude",
            "public.sale_order_line*",
            "--translation-lang",
            "fr_FR",
            "--insert-only-tables-without-key",
        ],
        &[],
    );
    wait_for_slot(&db).await;
    let main = published_tables(&db, &db.name).await;
    let expected: BTreeSet<String> = [
        "public.sale_order",
        "public.product_template",
        "public.mail_message",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(main, expected, "the include/exclude globs and the profile");
    let insert_only = published_tables(&db, &format!("{}_insert_only", db.name)).await;
    assert_eq!(
        insert_only,
        ["public.res_partner_res_partner_category_rel".to_string()].into()
    );

    db.exec(
        "INSERT INTO archive.sale_order VALUES (1, 'not public');
         INSERT INTO bus_bus (channel, message) VALUES ('x', '{}');
         INSERT INTO sale_advance_payment_inv (advance_payment_method) VALUES ('delivered');
         UPDATE res_partner SET name = 'Changed' WHERE id = 1;
         INSERT INTO res_partner_res_partner_category_rel VALUES (5, 1);
         UPDATE res_partner_res_partner_category_rel SET category_id = 6 WHERE category_id = 5;
         DELETE FROM res_partner_res_partner_category_rel WHERE category_id = 6;
         UPDATE product_template SET list_price = 99 WHERE id = 1;
         INSERT INTO mail_message (model, res_id, body, message_type) VALUES ('sale.order', 1, '<p>hi</p>', 'comment');
         INSERT INTO sale_order (name, state, company_id, partner_id, partner_invoice_id, partner_shipping_id, picking_policy, date_order)
             VALUES ('S1', 'draft', 1, 1, 1, 1, 'direct', now());
         UPDATE sale_order SET state = 'sale' WHERE name = 'S1';
         INSERT INTO sale_order (name, state, company_id, partner_id, partner_invoice_id, partner_shipping_id, picking_policy, date_order)
             VALUES ('END', 'draft', 1, 1, 1, 1, 'direct', now());",
    )
    .await;
    assert!(
        tail.collect_until(WAIT, |l| l.iter().any(|l| l.contains("\"END\""))),
        "{:?}",
        tail.seen
    );
    let events = tail.events();
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["source"]["table"].as_str().unwrap().to_string(),
                e["op"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("res_partner_res_partner_category_rel", "c"),
            ("product_template", "u"),
            ("mail_message", "c"),
            ("sale_order", "c"),
            ("sale_order", "u"),
            ("sale_order", "c"),
        ]
        .map(|(t, o)| (t.to_string(), o.to_string())),
        "{events:#?}"
    );
    // --translation-lang flattens translated fields to that language.
    assert_eq!(
        events[1]["after"]["name"], "Chaise de bureau",
        "{}",
        events[1]
    );
    // REPLICA IDENTITY FULL: `before` is the whole row, `key` the primary key.
    let update = &events[4];
    assert_eq!(update["before"]["state"], "draft");
    let key = update["key"].as_object().unwrap();
    assert_eq!(key.keys().collect::<Vec<_>>(), ["id"], "{update}");
    assert_eq!(key["id"], update["after"]["id"]);
    assert_eq!(events[3]["source"]["model"], "sale.order");
    assert!(events[2]["source"]["model"] == "mail.message");
    assert_eq!(tail.terminate(), Some(0));
    db.cleanup().await;
}
