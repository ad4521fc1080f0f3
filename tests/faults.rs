//! The fault-injection suite: an Odoo-like ORM workload (multi-row INSERTs,
//! `UPDATE ... FROM (VALUES ...)`, six-table order confirmations, cascading
//! deletes: `examples/odoo_workload.rs`) writes continuously into a private
//! PostgreSQL cluster while `odoo-cdc run` streams it to a private RabbitMQ
//! node, and faults are injected one after another: `kill -9` of the connector
//! at random points, a broker outage (stop_app/start_app), a PostgreSQL restart
//! (`pg_ctl restart -m fast`), a network cut and a stall between connector and
//! broker and between connector and PostgreSQL (a TCP proxy in between), and
//! broker memory and disk alarms (publishers blocked).
//!
//! After each fault the consumer's view is compared with the source: a second,
//! untouched slot on the same publication (read with
//! `pg_logical_slot_get_binary_changes`) says exactly which changes were
//! committed up to now, and every one of them must arrive, identified by its
//! `message_id` (`<commit LSN>-<seq>`). At the end the events, deduplicated and
//! applied by table and key, must give the source's final set of rows. The
//! number of duplicates is printed.
//!
//! Private cluster and broker only: the shared ones other tests use are never
//! restarted or alarmed.

mod common;

#[path = "../examples/odoo_workload.rs"]
#[allow(dead_code)]
mod odoo_workload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Proc;
use common::broker::{Delivery, PrivateBroker, ResilientConsumer};
use common::cluster::PrivateCluster;
use common::proxy::TcpProxy;
use serde_json::Value;

const PUBLICATION: &str = "faults";
const SLOT: &str = "cdc";
const REFERENCE_SLOT: &str = "reference";

async fn pg(url: &str) -> tokio_postgres::Client {
    common::connect_retry(url, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// The ids of the changes committed before `upto` that the reference slot has
/// not returned yet: `<commit LSN>-<seq>` exactly as the connector names them.
async fn committed_ids(db_url: &str, upto: &str) -> Vec<String> {
    let c = pg(db_url).await;
    let rows = c
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, $2::text::pg_lsn, NULL, \
             'proto_version', '1', 'publication_names', $3)",
            &[&REFERENCE_SLOT, &upto, &PUBLICATION],
        )
        .await
        .expect("read the reference slot");
    common::change_ids(rows.iter().map(|r| r.get::<_, &[u8]>(0)))
}

async fn current_lsn(url: &str) -> String {
    pg(url)
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The primary-key values of every row of every published table, as JSON
/// objects like the events' `key`.
async fn source_keys(db_url: &str) -> BTreeMap<String, HashSet<String>> {
    let c = pg(db_url).await;
    let tables = c
        .query(
            "SELECT t.tablename::text, array_agg(a.attname::text ORDER BY a.attnum)
               FROM pg_publication_tables t
               JOIN pg_index i ON i.indrelid = format('%I.%I', t.schemaname, t.tablename)::regclass AND i.indisprimary
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
              WHERE t.pubname = $1
              GROUP BY 1",
            &[&PUBLICATION],
        )
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let table: String = t.get(0);
        let cols: Vec<String> = t.get(1);
        let pairs: Vec<String> = cols.iter().map(|c| format!("'{c}', \"{c}\"")).collect();
        let rows = c
            .query(
                &format!(
                    "SELECT json_build_object({})::text FROM public.\"{table}\"",
                    pairs.join(", ")
                ),
                &[],
            )
            .await
            .unwrap();
        let keys = rows
            .iter()
            .map(|r| canonical(&serde_json::from_str(r.get::<_, &str>(0)).unwrap()))
            .collect();
        out.insert(table, keys);
    }
    out
}

fn canonical(v: &Value) -> String {
    // serde_json's map is ordered by key, so this is canonical.
    v.to_string()
}

/// What the test knows while faults happen.
struct Run {
    cluster: PrivateCluster,
    broker: PrivateBroker,
    pg_proxy: TcpProxy,
    amqp_proxy: TcpProxy,
    consumer: ResilientConsumer,
    db_url: String,
    exchange: String,
    connector: Option<Proc>,
    /// Every change committed so far (reference slot), in commit order.
    expected: Vec<String>,
    started: Instant,
}

impl Run {
    fn spawn_connector(&mut self) {
        // No snapshot: the check counts committed changes, not the seed rows.
        // No Odoo profile: every change of the FOR ALL TABLES publication is
        // expected (the reference slot counts bus_bus and ir_cron too).
        let args = common::run_args_via(
            &self.pg_proxy,
            "odoo",
            &self.amqp_proxy,
            &self.exchange,
            SLOT,
            PUBLICATION,
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.connector = Some(Proc::spawn(&args, &[]));
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.connector.take() {
            p.kill9();
        }
    }

    async fn slot_reached(&self, lsn: &str) -> bool {
        let Ok((c, conn)) =
            tokio_postgres::connect(&self.cluster.admin_url(), tokio_postgres::NoTls).await
        else {
            return false;
        };
        tokio::spawn(conn);
        c.query_one(
            "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT, &lsn],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
    }

    /// `kill -9` the connector after a random 0.3-2.5 s of streaming, start it again.
    async fn kill9_at_random_point(&mut self, n: u32) {
        sleep_ms(random_ms(300, 2500)).await;
        self.kill9();
        self.spawn_connector();
        self.settle(&format!("kill -9 #{n}")).await;
    }

    /// Waits until every change committed before now was delivered, and says
    /// how long recovery took.
    async fn settle(&mut self, fault: &str) {
        let fault_over = Instant::now();
        let upto = current_lsn(&self.cluster.admin_url()).await;
        let new = committed_ids(&self.db_url, &upto).await;
        self.expected.extend(new);
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let have: HashSet<String> = self
                .consumer
                .snapshot()
                .into_iter()
                .map(|d| d.message_id)
                .collect();
            let missing: Vec<&String> = self
                .expected
                .iter()
                .filter(|id| !have.contains(*id))
                .collect();
            // Delivered is not enough: the connector must also be streaming
            // again and have told PostgreSQL so (the slot moved past `upto`).
            if missing.is_empty() && self.slot_reached(&upto).await {
                eprintln!(
                    "[{:>5.1}s] {fault}: all {} committed changes delivered, {:.1}s after the fault ended",
                    self.started.elapsed().as_secs_f64(),
                    self.expected.len(),
                    fault_over.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {fault}: {} of {} committed changes never arrived (first: {:?}), or the slot never moved past {upto}",
                missing.len(),
                self.expected.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Runs `odoo_workload` rounds until `stop`, reconnecting after errors (a
/// restart aborts the transaction in flight; that one was never committed).
fn start_workload(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut rounds, mut errors, mut seed) = (0u64, 0u64, 100u64);
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut client) = odoo_workload::connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                seed += 1;
                let opts = odoo_workload::Options {
                    orders: 8,
                    rate: 12.0,
                    seed,
                    import_every: 6,
                    progress: false,
                };
                match odoo_workload::run(&mut client, &opts).await {
                    Ok(_) => rounds += 1,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        (rounds, errors)
    })
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn random_ms(lo: u64, hi: u64) -> u64 {
    rand::random_range(lo..=hi)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_workload_survives_every_fault_without_loss() {
    assert!(
        PrivateBroker::available(),
        "RabbitMQ is not installed (run scripts/services.sh up)"
    );
    let started = Instant::now();
    // Both take seconds (the broker up to tens on a loaded machine): in parallel.
    let broker = std::thread::spawn(PrivateBroker::start);
    let cluster = PrivateCluster::start(&[("wal_sender_timeout", "'20s'")]);
    let broker = broker.join().expect("private RabbitMQ node");
    eprintln!(
        "private PostgreSQL on {} and RabbitMQ node {} on {} up in {:.1}s",
        cluster.port,
        broker.node,
        broker.port,
        started.elapsed().as_secs_f64()
    );
    let admin = pg(&cluster.admin_url()).await;
    admin.batch_execute("CREATE DATABASE odoo").await.unwrap();
    let db_url = cluster.url("odoo");
    {
        let db = pg(&db_url).await;
        odoo_workload::load_schema(&db).await.expect("Odoo schema");
        db.batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"))
            .await
            .unwrap();
        db.batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{REFERENCE_SLOT}', 'pgoutput')"
        ))
        .await
        .unwrap();
    }
    let initial = source_keys(&db_url).await;

    let exchange = "odoo.cdc.faults".to_string();
    let consumer = ResilientConsumer::start(&broker.amqp_url(), &exchange, "faults", "#").await;
    let pg_proxy = TcpProxy::start(&format!("127.0.0.1:{}", cluster.port));
    let amqp_proxy = TcpProxy::start(&broker.host_port());
    let mut run = Run {
        cluster,
        broker,
        pg_proxy,
        amqp_proxy,
        consumer,
        db_url: db_url.clone(),
        exchange,
        connector: None,
        expected: Vec::new(),
        started,
    };
    run.spawn_connector();
    // The connector creates its slot; the workload starts after that.
    common::await_slot(&admin, SLOT, Duration::from_secs(60)).await;
    drop(admin);

    let stop = Arc::new(AtomicBool::new(false));
    let workload = start_workload(db_url.clone(), stop.clone());
    sleep_ms(2000).await;
    run.settle("warm-up").await;

    // kill -9 at random points, four times: first, and before each group of
    // network faults (a fresh process also starts its reconnect backoff over,
    // which keeps the suite's run time down).
    run.kill9_at_random_point(1).await;

    // Broker outage: the node stops accepting and closes every connection.
    run.broker.stop_app();
    sleep_ms(3000).await;
    run.broker.start_app();
    run.settle("RabbitMQ stop_app/start_app").await;

    // PostgreSQL restart (fast shutdown: walsenders and the workload cut).
    run.cluster.restart();
    run.settle("PostgreSQL restart -m fast").await;

    run.kill9_at_random_point(2).await;

    // Network cut, connector <-> broker.
    run.amqp_proxy.cut();
    sleep_ms(3000).await;
    run.amqp_proxy.restore();
    run.settle("network cut to RabbitMQ").await;

    // Network stall (black hole), connector <-> broker: only the confirm
    // timeout (5 s here) notices.
    run.amqp_proxy.stall();
    sleep_ms(7000).await;
    run.amqp_proxy.restore();
    run.settle("network stall to RabbitMQ (7s)").await;

    run.kill9_at_random_point(3).await;

    // Network cut, connector <-> PostgreSQL.
    run.pg_proxy.cut();
    sleep_ms(3000).await;
    run.pg_proxy.restore();
    run.settle("network cut to PostgreSQL").await;

    // Network stall, connector <-> PostgreSQL: the connector must notice the
    // silence itself (ping, then --replication-timeout-secs) and dial again,
    // while the link is still black-holed.
    let dialled = run.pg_proxy.accepted();
    run.pg_proxy.stall();
    let stalled = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    while run.pg_proxy.accepted() == dialled {
        assert!(
            Instant::now() < deadline,
            "the connector never gave up on a silent PostgreSQL connection"
        );
        sleep_ms(200).await;
    }
    eprintln!(
        "stalled PostgreSQL link detected; the connector dialled again after {:.1}s",
        stalled.elapsed().as_secs_f64()
    );
    run.pg_proxy.restore();
    run.settle("network stall to PostgreSQL").await;

    run.kill9_at_random_point(4).await;

    // Broker resource alarms: publishers are blocked until they clear.
    run.broker.memory_alarm(true);
    let alarms = run.broker.alarms();
    sleep_ms(6000).await;
    run.broker.memory_alarm(false);
    run.settle(&format!("memory alarm ({})", alarms.trim()))
        .await;
    run.broker.disk_alarm(true);
    sleep_ms(6000).await;
    run.broker.disk_alarm(false);
    run.settle("disk alarm").await;

    // Stop writing, let the connector catch up, compare everything.
    stop.store(true, Ordering::Relaxed);
    let (rounds, errors) = workload.await.unwrap();
    run.settle("final catch-up").await;
    run.kill9();
    let expected = std::mem::take(&mut run.expected);
    let all = run.consumer.stop().await;
    let final_keys = source_keys(&db_url).await;
    let report = verify(&all, &expected, initial, &final_keys);
    eprintln!(
        "fault suite: {rounds} workload rounds ({errors} cut by faults); {report}; {:.0}s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Checks the deliveries against the committed changes and the final tables;
/// returns a summary with the duplicate counts.
fn verify(
    all: &[Delivery],
    expected: &[String],
    initial: BTreeMap<String, HashSet<String>>,
    final_keys: &BTreeMap<String, HashSet<String>>,
) -> String {
    let mut by_id: HashMap<&str, &Delivery> = HashMap::new();
    let (mut dups, mut redelivered) = (0usize, 0usize);
    for d in all {
        if let Some(prev) = by_id.insert(d.message_id.as_str(), d) {
            if d.redelivered {
                redelivered += 1;
            } else {
                dups += 1;
            }
            assert_eq!(
                prev.body, d.body,
                "duplicate {} with a different body",
                d.message_id
            );
        }
    }
    let expected_set: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let missing: Vec<&&str> = expected_set
        .iter()
        .filter(|id| !by_id.contains_key(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} committed changes lost",
        missing.len()
    );
    let unexpected: Vec<&&str> = by_id
        .keys()
        .filter(|id| !expected_set.contains(**id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} events that no committed change explains, e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );

    // Apply in WAL order (ids sort that way) by table and key.
    let mut model = initial;
    let mut ids: Vec<&&Delivery> = by_id.values().collect();
    ids.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for d in ids {
        let ev = d.json();
        let table = ev["source"]["table"].as_str().unwrap().to_string();
        let op = ev["op"].as_str().unwrap();
        *ops.entry(op.to_string()).or_default() += 1;
        let Some(rows) = model.get_mut(&table) else {
            continue; // a table without a primary key
        };
        let key = canonical(&ev["key"]);
        match op {
            "c" => {
                rows.insert(key);
            }
            "u" => {
                // A key change comes with the old key in `before`.
                if ev["before"].is_object() {
                    let old: serde_json::Map<String, Value> = ev["key"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .map(|k| (k.clone(), ev["before"][k].clone()))
                        .collect();
                    rows.remove(&canonical(&Value::Object(old)));
                }
                rows.insert(key);
            }
            "d" => {
                rows.remove(&key);
            }
            other => panic!("unexpected op {other}"),
        }
    }
    for (table, rows) in final_keys {
        let got = model.get(table).cloned().unwrap_or_default();
        assert!(
            &got == rows,
            "table {table}: the consumer's rows differ from the source ({} vs {} rows; {} missing, {} extra)",
            got.len(),
            rows.len(),
            rows.difference(&got).count(),
            got.difference(rows).count()
        );
    }
    let rows: usize = final_keys.values().map(HashSet::len).sum();
    format!(
        "{} changes ({ops:?}) all delivered, {} tables / {rows} rows equal to the source; \
         duplicates: {dups} republished by the connector + {redelivered} redelivered by the broker",
        expected.len(),
        final_keys.len(),
    )
}

/// Backpressure: while the broker link is black-holed, the connector stops
/// reading from the walsender instead of buffering, so its memory stays bounded
/// while the backlog stays in PostgreSQL's WAL; after the link heals, every
/// change arrives. Uses the shared services through a proxy (the stall touches
/// only this test's connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_pushes_back_to_the_walsender_with_bounded_memory() {
    stalled_broker_backpressure("row").await;
}

/// The same with one message per transaction: 1,000-event parts must not pile
/// up by the window's count of messages (2,048 parts would be gigabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_pushes_back_in_transaction_granularity_too() {
    stalled_broker_backpressure("transaction").await;
}

async fn stalled_broker_backpressure(granularity: &str) {
    let db = common::TestDb::create("backpressure").await;
    db.exec("CREATE TABLE wide (id int PRIMARY KEY, payload text NOT NULL)")
        .await;
    let exchange = common::unique_name("ex");
    let queue = common::unique_name("q");
    // Resilient: the shared broker may close every connection under us.
    let consumer = ResilientConsumer::start(&common::amqp_url(), &exchange, &queue, "#").await;
    let amqp_target = common::amqp_url()
        .split('@')
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap()
        .to_string();
    let proxy = TcpProxy::start(&amqp_target);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.host_port());
    let mut args = common::run_args(&db, &exchange, &amqp);
    // Long enough that the stall is pure backpressure, not a reconnect.
    args.extend([
        "--confirm-timeout-secs",
        "300",
        "--granularity",
        granularity,
    ]);
    let connector = Proc::spawn(&args, &[]);
    common::wait_for_slot(&db).await;
    let slot = db.name.clone();

    proxy.stall();
    // 45 transactions of 1,000 rows of ~1.5 KB incompressible text: ~70 MB of
    // row data, more than the connector may hold.
    let (txns, rows) = (45, 45_000i64);
    // Row granularity: a message per row; transaction: one per transaction.
    let messages = if granularity == "row" {
        rows as usize
    } else {
        txns
    };
    for t in 0..txns as i64 {
        db.exec(&format!(
            "INSERT INTO wide SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 48) i)
               FROM generate_series({}, {}) g",
            t * 1000 + 1,
            t * 1000 + 1000
        ))
        .await;
    }
    // The walsender is stuck behind the connector: most of the backlog has not
    // even been decoded and sent.
    let lag_sql = format!(
        "SELECT (pg_current_wal_lsn() - r.sent_lsn)::int8 FROM pg_stat_replication r
           JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{slot}'"
    );
    sleep_ms(2000).await;
    let unsent = db.scalar_i64(&lag_sql).await;
    let rss_mib = connector.peak_rss_kib().expect("VmHWM") / 1024;
    let delivered_during_stall = consumer.len();
    eprintln!(
        "{granularity} granularity, broker stalled: {unsent} bytes of WAL not yet sent by the walsender, connector peak RSS {rss_mib} MiB, {delivered_during_stall} delivered"
    );
    assert!(
        unsent > 30 * 1024 * 1024,
        "the walsender sent the backlog away ({unsent} bytes left): the connector buffered instead of pushing back"
    );
    assert!(
        rss_mib < 100,
        "connector peak RSS {rss_mib} MiB while the broker was stalled"
    );
    assert!(delivered_during_stall < messages);

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(240);
    while consumer.unique() < messages && Instant::now() < deadline {
        sleep_ms(250).await;
    }
    let all_there = consumer.unique() >= messages;
    let rss_after = connector.peak_rss_kib().unwrap_or(0) / 1024;
    assert!(
        all_there,
        "only {} of {messages} messages arrived after the stall",
        consumer.len()
    );
    let got = consumer.stop().await;
    let mut ids: HashSet<i64> = HashSet::new();
    for d in &got {
        let body = d.json();
        match body["events"].as_array() {
            Some(events) => ids.extend(events.iter().map(|e| e["after"]["id"].as_i64().unwrap())),
            None => {
                ids.insert(body["after"]["id"].as_i64().unwrap());
            }
        }
    }
    assert_eq!(ids.len() as i64, rows, "every row arrived");
    eprintln!("after restore: all {rows} rows delivered; connector peak RSS {rss_after} MiB");
    drop(connector);
    drop(proxy);
    common::broker::delete_queue(&common::amqp_url(), &queue).await;
    db.cleanup().await;
}
