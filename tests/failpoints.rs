//! Faults at exact code points, which random kills rarely hit. Compiled only
//! with `--features failpoints` (scripts/test.sh runs it so); each fault is
//! armed by an environment variable the connector reads in that build only.
#![cfg(feature = "failpoints")]

mod common;

use std::time::{Duration, Instant};

use common::{Proc, TestDb};

/// A database with `t (id int PRIMARY KEY)` in a publication named after it.
async fn table_t(prefix: &str) -> TestDb {
    let db = TestDb::create(prefix).await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    db
}

/// `odoo-cdc tail` on the database's slot and publication, `failpoint` armed.
fn tail_with_failpoint(db: &TestDb, failpoint: &str) -> Proc {
    Proc::spawn(
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
            "--replication-timeout-secs",
            "120",
        ],
        &[(failpoint, "1")],
    )
}

/// The standby status task dies (a bug, a failed write): without status
/// updates the slot stops advancing and the walsender only notices after
/// `wal_sender_timeout`. The session must end at once instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_status_task_ends_the_session_at_once() {
    let db = table_t("fp_status").await;
    let mut tail = tail_with_failpoint(&db, "ODOO_CDC_FAILPOINT_STATUS_TASK_DIES");
    let started = Instant::now();
    let code = loop {
        if let Ok(Some(status)) = tail.child.try_wait() {
            break status.code();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the session went on without its status task"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        code,
        Some(1),
        "an internal failure that retrying cannot fix"
    );
    drop(tail);
    db.cleanup().await;
}

/// A status write fails as on a cut connection (broken pipe) before the
/// reader notices anything: that is the replication connection failing, so
/// the session is retried from the slot like any network failure. (The
/// connector used to treat it as an internal error and exit 1: a network cut
/// to PostgreSQL stopped it whenever the status reporter wrote first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_status_write_is_retried_like_a_network_failure() {
    let db = table_t("fp_status_write").await;
    let mut tail = tail_with_failpoint(&db, "ODOO_CDC_FAILPOINT_STATUS_WRITE_FAILS_ONCE");
    common::wait_for_slot(&db).await;
    db.exec("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
        .await;
    let inserts = |lines: &[String]| lines.iter().filter(|l| l.contains(r#""op":"c""#)).count();
    let all = tail.collect_until(Duration::from_secs(60), |l| inserts(l) >= 100);
    assert_eq!(
        tail.child.try_wait().unwrap(),
        None,
        "the connector exited on a failed status write instead of retrying"
    );
    assert!(all, "only {} of 100 inserts arrived", inserts(&tail.seen));
    drop(tail);
    db.cleanup().await;
}
