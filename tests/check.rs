//! `odoo-cdc check` against private PostgreSQL clusters (tests/common/cluster.rs),
//! so that the verdict depends only on what each test sets up, never on other
//! tests' slots and walsenders on the shared cluster.

mod common;

#[path = "../examples/odoo_workload.rs"]
#[allow(dead_code)]
mod odoo_workload;

use std::process::Command;

use common::cluster::PrivateCluster;

/// Runs `odoo-cdc check`; returns (exit code, stdout).
fn check(url: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["check", "--source", url])
        .args(extra)
        .env("ODOO_CDC_LOG", "warn")
        .output()
        .expect("run odoo-cdc check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

async fn odoo_db(cluster: &PrivateCluster, name: &str) -> tokio_postgres::Client {
    let admin = common::connect(&cluster.admin_url()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let client = common::connect(&cluster.url(name)).await;
    odoo_workload::load_schema(&client)
        .await
        .expect("load the Odoo schema");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_database_then_missing_key_then_role_without_replication() {
    let cluster = PrivateCluster::start(&[]);
    let db = odoo_db(&cluster, "odoo").await;
    let url = cluster.url("odoo");

    let (code, out) = check(&url, &["--publication-mode", "create"]);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "wal_level = logical",
        "has the REPLICATION attribute",
        "profile: odoo",
        "publication odoo_cdc does not exist yet: run creates it",
        "SELECT granted on every selected table",
        "max_slot_wal_keep_size = -1",
        "\nready",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }

    // A selected table without a primary key blocks, with the remedies ...
    db.batch_execute(
        "CREATE TABLE res_partner_res_partner_category_rel (category_id int NOT NULL, partner_id int NOT NULL,
             UNIQUE (category_id, partner_id));
         CREATE TABLE legacy_log (at timestamp, line text);
         ALTER TABLE legacy_log REPLICA IDENTITY NOTHING;",
    )
    .await
    .unwrap();
    let (code, out) = check(&url, &["--publication-mode", "create"]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "BLOCKING selected table public.res_partner_res_partner_category_rel has no primary key",
        "fix: ALTER TABLE public.res_partner_res_partner_category_rel REPLICA IDENTITY FULL;",
        "BLOCKING selected table public.legacy_log has REPLICA IDENTITY NOTHING",
        "--insert-only-tables-without-key",
        "not ready",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // ... and the same filters as `run` settle it: exclude one, insert-only the other.
    let (code, out) = check(
        &url,
        &[
            "--publication-mode",
            "create",
            "--exclude",
            "public.legacy_log",
            "--insert-only-tables-without-key",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("table public.res_partner_res_partner_category_rel has no usable replica identity: only its inserts are captured"),
        "{out}"
    );

    // An existing publication that lacks selected tables and holds a table without
    // a key: the missing ones are named, the broken one blocks.
    db.batch_execute("CREATE PUBLICATION ops FOR TABLE sale_order, legacy_log;")
        .await
        .unwrap();
    let (code, out) = check(
        &url,
        &[
            "--publication",
            "ops",
            "--include",
            "public.sale_*",
            "--include",
            "public.legacy_log",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ALTER PUBLICATION ops ADD TABLE public.sale_order_line")
            && out.contains("ALTER TABLE public.legacy_log REPLICA IDENTITY FULL;")
            && out.contains("rejects UPDATE and DELETE on it now"),
        "{out}"
    );

    // A role without REPLICATION (and without rights) is told what to grant.
    db.batch_execute(
        "CREATE ROLE cdc_plain LOGIN;
         DROP TABLE legacy_log, res_partner_res_partner_category_rel;",
    )
    .await
    .unwrap();
    let plain = format!("postgres://cdc_plain@127.0.0.1:{}/odoo", cluster.port);
    let (code, out) = check(&plain, &["--publication-mode", "create"]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "BLOCKING role cdc_plain lacks the REPLICATION attribute",
        "fix: ALTER ROLE cdc_plain WITH REPLICATION;",
        "TO cdc_plain;",
        "the role does not own",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_blocks_with_the_setting_to_change() {
    let cluster = PrivateCluster::start(&[("wal_level", "replica")]);
    let _db = odoo_db(&cluster, "odoo").await;
    let (code, out) = check(&cluster.url("odoo"), &["--publication-mode", "create"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BLOCKING wal_level = replica")
            && out.contains("fix: ALTER SYSTEM SET wal_level = logical;  then restart PostgreSQL"),
        "{out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, out) = check(
        "postgres://u@127.0.0.1:1/db",
        &["--publication-mode", "sometimes"],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("publication_mode") && out.contains("create|existing"),
        "{out}"
    );
    let (code, out) = check("postgres://u@127.0.0.1:1/db", &["--include", "a.b.c"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("`include`"), "{out}");
}
