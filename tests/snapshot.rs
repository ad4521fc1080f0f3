//! Snapshots under concurrent writes, against the real PostgreSQL: a consumer
//! that applies the events in order (upsert on r/c/u by key, delete on d) must
//! end with exactly the table's final contents — no missing row, no stale value,
//! no resurrected deleted row.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Proc, TestDb};

const ROWS: i64 = 200_000;

/// The consumer's copy of table `item`: id → (val, n).
#[derive(Default)]
struct View {
    rows: HashMap<i64, (Option<String>, i64)>,
    applied: usize,
    reads: usize,
    stream: usize,
    /// A stream change of `item` arrived between two snapshot reads.
    interleaved: bool,
    sentinel: bool,
    /// Initial-snapshot consumers: a completed snapshot is the table's whole
    /// contents at its consistent point, so rows left from an interrupted earlier
    /// snapshot that it did not read are dropped when streaming begins.
    replace_on_snapshot: bool,
    snapshot_lsn: Option<String>,
    read_at: HashMap<i64, String>,
    compact_pending: bool,
}

impl View {
    fn apply_new(&mut self, lines: &[String]) {
        for line in &lines[self.applied..] {
            let ev: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            match ev["source"]["table"].as_str() {
                Some("item") => {}
                Some("sentinel") => {
                    self.sentinel = true;
                    continue;
                }
                _ => continue,
            }
            let op = ev["op"].as_str().unwrap();
            let key = ev["key"]["id"].as_i64().expect("key.id");
            match op {
                "r" | "c" | "u" => {
                    if op == "r" {
                        self.reads += 1;
                        assert_eq!(ev["source"]["snapshot"], true, "{line}");
                        if self.replace_on_snapshot {
                            let lsn = ev["source"]["commit_lsn"].as_str().unwrap().to_string();
                            if self.snapshot_lsn.as_ref() != Some(&lsn) {
                                self.snapshot_lsn = Some(lsn.clone());
                                self.compact_pending = true;
                            }
                            self.read_at.insert(key, lsn);
                        }
                    } else {
                        self.compact();
                        self.stream += 1;
                        if self.reads > 0 {
                            self.interleaved = true;
                        }
                    }
                    if let Some(old) = ev["before"]["id"].as_i64()
                        && old != key
                    {
                        self.rows.remove(&old);
                    }
                    let after = &ev["after"];
                    self.rows.insert(
                        key,
                        (
                            after["val"].as_str().map(str::to_string),
                            after["n"].as_i64().expect("after.n"),
                        ),
                    );
                }
                "d" => {
                    self.compact();
                    self.stream += 1;
                    self.rows.remove(&key);
                }
                other => panic!("unexpected op {other}: {line}"),
            }
        }
        self.applied = lines.len();
    }

    fn compact(&mut self) {
        if !self.compact_pending {
            return;
        }
        self.compact_pending = false;
        let current = self.snapshot_lsn.clone();
        let read_at = &self.read_at;
        self.rows
            .retain(|k, _| read_at.get(k).is_some_and(|l| Some(l) == current.as_ref()));
    }
}

async fn table_contents(db: &TestDb) -> HashMap<i64, (Option<String>, i64)> {
    db.client
        .query("SELECT id, val, n::bigint FROM item", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), (r.get(1), r.get::<_, i64>(2))))
        .collect()
}

/// Describes how the view differs from the table (empty when equal).
fn diff(
    view: &HashMap<i64, (Option<String>, i64)>,
    table: &HashMap<i64, (Option<String>, i64)>,
) -> String {
    let missing = table.keys().filter(|k| !view.contains_key(k)).count();
    let extra: Vec<_> = view
        .keys()
        .filter(|k| !table.contains_key(k))
        .take(5)
        .collect();
    let stale: Vec<_> = table
        .iter()
        .filter(|(k, v)| view.get(k).is_some_and(|w| w != *v))
        .take(5)
        .collect();
    if missing == 0 && extra.is_empty() && stale.is_empty() {
        return String::new();
    }
    format!(
        "{missing} rows missing; resurrected (first 5): {extra:?}; stale (first 5): {stale:?}; view {} rows, table {} rows",
        view.len(),
        table.len()
    )
}

async fn create_item_table(db: &TestDb) {
    db.exec(&format!(
        "CREATE TABLE item (id bigint PRIMARY KEY, val text, n int NOT NULL, note text);
         CREATE SEQUENCE item_new_ids START 10000001;
         INSERT INTO item SELECT g, md5(g::text), 0, 'tab\there' FROM generate_series(1, {ROWS}) g;
         CREATE TABLE sentinel (id int PRIMARY KEY);
         ANALYZE item;"
    ))
    .await;
}

/// Odoo-like write traffic on `item` until `stop`: multi-row inserts, updates of
/// old and new rows (the same row twice in one transaction), deletes, and key changes.
fn start_workload(
    url: String,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
    let txns = Arc::new(AtomicU64::new(0));
    let count = txns.clone();
    let handle = tokio::spawn(async move {
        let client = common::connect(&url).await;
        while !stop.load(Ordering::Relaxed) {
            client
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO item (id, val, n) SELECT nextval('item_new_ids'), md5(random()::text), 0 FROM generate_series(1, 5);
                     UPDATE item SET val = md5(random()::text), n = n + 1
                       WHERE id = ANY (ARRAY(SELECT 1 + (random() * {max})::bigint FROM generate_series(1, 20)));
                     UPDATE item SET val = 'again ' || n, n = n + 1
                       WHERE id = ANY (ARRAY(SELECT 1 + (random() * {max})::bigint FROM generate_series(1, 3)));
                     UPDATE item SET val = 'new ' || n, n = n + 1
                       WHERE id = ANY (ARRAY(SELECT id FROM item WHERE id > 10000000 ORDER BY random() LIMIT 3));
                     DELETE FROM item WHERE id = ANY (ARRAY(SELECT 1 + (random() * {max})::bigint FROM generate_series(1, 4)));
                     DELETE FROM item WHERE id = ANY (ARRAY(SELECT id FROM item WHERE id > 10000000 ORDER BY random() LIMIT 1));
                     UPDATE item SET id = id + 100000000, n = n + 1 WHERE id = (SELECT 1 + (random() * {max})::bigint);
                     COMMIT;",
                    max = ROWS - 1
                ))
                .await
                .expect("workload transaction");
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    (handle, txns)
}

fn tail_args<'a>(db: &'a TestDb, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "tail",
        "--source",
        &db.url,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
        "--create-slot",
        "--create-publication",
        "--status-interval-secs",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Stops the workload, writes the sentinel, and waits until the consumer view
/// equals the table (the table no longer changes).
async fn settle(
    db: &TestDb,
    proc: &mut Proc,
    view: &mut View,
    stop: &AtomicBool,
    workload: tokio::task::JoinHandle<()>,
) {
    stop.store(true, Ordering::Relaxed);
    workload.await.unwrap();
    db.exec("INSERT INTO sentinel VALUES (1)").await;
    let table = table_contents(db).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = String::new();
    while Instant::now() < deadline {
        proc.collect_until(Duration::from_millis(500), |_| false);
        view.apply_new(&proc.seen);
        if view.sentinel {
            last = diff(&view.rows, &table);
            if last.is_empty() {
                return;
            }
        }
    }
    panic!(
        "the consumer view never matched the table (sentinel seen: {}): {last}",
        view.sentinel
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_under_concurrent_writes_gives_the_exact_table() {
    let db = TestDb::create("snap_initial").await;
    create_item_table(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (workload, txns) = start_workload(db.url.clone(), stop.clone());
    while txns.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = txns.load(Ordering::Relaxed);

    let mut proc = Proc::spawn(&tail_args(&db, &[]), &[]);
    let mut view = View::default();
    // Keep writing through the snapshot and well into streaming.
    let deadline = Instant::now() + Duration::from_secs(180);
    while view.stream < 2_000 {
        assert!(
            Instant::now() < deadline,
            "no stream events after the snapshot ({} reads)",
            view.reads
        );
        proc.collect_until(Duration::from_millis(500), |_| false);
        view.apply_new(&proc.seen);
    }
    assert!(
        txns.load(Ordering::Relaxed) > before + 20,
        "the workload must keep writing during the snapshot"
    );
    settle(&db, &mut proc, &mut view, &stop, workload).await;
    assert!(
        view.reads as i64 >= ROWS * 9 / 10,
        "{} snapshot reads for {ROWS} rows",
        view.reads
    );
    // The snapshot came first, then only stream events.
    let first_stream = proc
        .seen
        .iter()
        .position(|l| !l.contains("\"op\":\"r\""))
        .unwrap();
    assert!(
        proc.seen[first_stream..]
            .iter()
            .all(|l| !l.contains("\"op\":\"r\""))
    );
    drop(proc);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_snapshot_during_writes_gives_the_exact_table() {
    let db = TestDb::create("snap_ondemand").await;
    create_item_table(&db).await;
    // Streaming only: the consumer starts without the table's existing rows.
    let mut proc = Proc::spawn(&tail_args(&db, &["--snapshot", "never"]), &[]);
    common::wait_for_slot(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (workload, txns) = start_workload(db.url.clone(), stop.clone());
    while txns.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["snapshot", "--source", &db.url, "public.item"])
        .output()
        .expect("run odoo-cdc snapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut view = View::default();
    let deadline = Instant::now() + Duration::from_secs(180);
    // Writes continue through most of the re-snapshot.
    while (view.reads as i64) < ROWS * 3 / 4 {
        assert!(
            Instant::now() < deadline,
            "re-snapshot too slow: {} reads",
            view.reads
        );
        proc.collect_until(Duration::from_millis(500), |_| false);
        view.apply_new(&proc.seen);
    }
    assert!(
        view.interleaved,
        "stream changes must arrive between snapshot chunks"
    );
    settle(&db, &mut proc, &mut view, &stop, workload).await;
    let ids: Vec<&str> = proc
        .seen
        .iter()
        .filter(|l| l.contains("\"op\":\"r\""))
        .take(1)
        .map(String::as_str)
        .collect();
    assert!(!ids.is_empty());
    drop(proc);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_initial_snapshot_then_restart_gives_the_exact_table() {
    let db = TestDb::create("snap_kill").await;
    create_item_table(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (workload, _txns) = start_workload(db.url.clone(), stop.clone());

    let mut view = View {
        replace_on_snapshot: true,
        ..View::default()
    };
    let mut proc = Proc::spawn(&tail_args(&db, &[]), &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while view.reads < 5_000 {
        assert!(Instant::now() < deadline, "snapshot did not start");
        proc.collect_until(Duration::from_millis(100), |_| false);
        view.apply_new(&proc.seen);
    }
    proc.kill9();
    // The snapshot was unfinished: the real slot does not exist yet.
    assert_eq!(db.confirmed_flush_lsn(&db.name).await, None);
    let first_reads = view.reads;

    // The consumer keeps its partial view; the restart snapshots again.
    let mut proc = Proc::spawn(&tail_args(&db, &[]), &[]);
    view.applied = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while view.stream < 1_000 {
        assert!(
            Instant::now() < deadline,
            "no stream events after the restarted snapshot"
        );
        proc.collect_until(Duration::from_millis(500), |_| false);
        view.apply_new(&proc.seen);
    }
    assert!(view.reads - first_reads >= (ROWS * 9 / 10) as usize);
    settle(&db, &mut proc, &mut view, &stop, workload).await;
    drop(proc);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_publishes_the_initial_snapshot_to_rabbitmq_before_the_stream() {
    let db = TestDb::create("snap_run").await;
    db.exec(
        "CREATE TABLE sale_order (id int PRIMARY KEY, name text, amount_total numeric(12,2), tags text[]);
         INSERT INTO sale_order SELECT g, 'S' || g, g * 1.5, ARRAY['a', 'b'] FROM generate_series(1, 3000) g;
         CREATE TABLE nokey (v int);
         INSERT INTO nokey VALUES (1), (2);",
    )
    .await;
    let exchange = common::unique_name("ex");
    let consumer = common::amqp::consume(
        &exchange,
        &common::unique_name("q"),
        &format!("{}.public.#", db.name),
    )
    .await;
    let amqp = common::amqp_url();
    let mut args = common::run_args(&db, &exchange, &amqp);
    // A table without a key is only captured (inserts, and its snapshot) through
    // the insert-only publication; without the flag it is skipped with a warning.
    args.extend([
        "--snapshot-workers",
        "3",
        "--insert-only-tables-without-key",
    ]);
    let _p = Proc::spawn(&args, &[]);
    common::wait_for_slot(&db).await;
    db.exec("INSERT INTO sale_order VALUES (3001, 'after', 1, NULL)")
        .await;
    assert!(
        consumer
            .wait_until(Duration::from_secs(90), |m| m.len() >= 3003)
            .await,
        "got {}",
        consumer.len()
    );
    let got = consumer.snapshot();
    let (reads, rest) = got.split_at(3002);
    let p = &db.name;
    let mut ids = std::collections::HashSet::new();
    for g in reads {
        let ev = g.json();
        assert_eq!(ev["op"], "r");
        assert_eq!(ev["source"]["snapshot"], true);
        assert_eq!(g.header("x-snapshot"), Some("true"));
        let table = ev["source"]["table"].as_str().unwrap();
        assert_eq!(g.routing_key, format!("{p}.public.{table}.snapshot"));
        // <consistent point>-r<table oid>-<ordinal>
        let parts: Vec<&str> = g.message_id.split('-').collect();
        assert_eq!(parts.len(), 3, "{}", g.message_id);
        assert_eq!(parts[0].len(), 16);
        let (hi, lo) = ev["source"]["commit_lsn"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap();
        let lsn =
            (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
        assert_eq!(parts[0], format!("{lsn:016X}"));
        assert!(parts[1].starts_with('r') && parts[1].len() == 9);
        assert_eq!(parts[2].len(), 10);
        assert!(
            ids.insert(g.message_id.clone()),
            "duplicate id {}",
            g.message_id
        );
        if table == "sale_order" {
            let id = ev["key"]["id"].as_i64().unwrap();
            assert_eq!(ev["after"]["name"], format!("S{id}"));
            assert_eq!(ev["after"]["tags"], serde_json::json!(["a", "b"]));
            assert!(ev["after"]["amount_total"].is_string());
        }
    }
    assert_eq!(
        reads
            .iter()
            .filter(|g| g.routing_key.ends_with(".nokey.snapshot"))
            .count(),
        2
    );
    let ev = rest[0].json();
    assert_eq!(ev["op"], "c");
    assert_eq!(ev["after"]["id"], 3001);
    consumer.delete().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_only_exits_after_the_snapshot_and_when_needed_creates_the_slot() {
    let db = TestDb::create("snap_modes").await;
    db.exec(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION {} FOR ALL TABLES;",
        db.name
    ))
    .await;
    let base = [
        "tail",
        "--source",
        &db.url,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
    ];

    // initial_only: the rows, exit 0, and no slot left behind.
    let mut args = base.to_vec();
    args.extend(["--snapshot", "initial_only"]);
    let mut p = Proc::spawn(&args, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "initial_only did not exit");
        p.collect_until(Duration::from_millis(200), |_| false);
    };
    p.collect_until(Duration::from_millis(500), |_| false);
    assert_eq!(status.code(), Some(0));
    assert_eq!(p.events().len(), 100);
    assert!(p.events().iter().all(|e| e["op"] == "r"));
    let slots = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE database = '{}'",
            db.name
        ))
        .await;
    assert_eq!(slots, 0, "initial_only must not leave a slot");

    // when_needed: creates the missing slot (no --create-slot) with a snapshot.
    let mut args = base.to_vec();
    args.extend(["--snapshot", "when_needed"]);
    let mut p = Proc::spawn(&args, &[]);
    common::wait_for_slot(&db).await;
    db.exec("INSERT INTO t VALUES (101, 'streamed')").await;
    assert!(p.collect_until(Duration::from_secs(60), |l| l.len() >= 101));
    let ev = p.events();
    assert_eq!(common::count_ops(&ev, "r"), 100);
    assert_eq!(ev[100]["op"], "c");
    assert_eq!(p.terminate(), Some(0));
    db.cleanup().await;
}
