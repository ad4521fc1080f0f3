//! The stream sink (`--stream-url`) against real brokers: the shared one's
//! stream port (`$ODOO_CDC_TEST_STREAM`, from `scripts/services.sh env`) and,
//! for the tests that close every broker connection or restart the broker, a
//! private node.
//!
//! The exactly-once tests run `odoo-cdc run` while a workload of 100,000
//! changes commits, inject a fault four times, spread over the workload (`kill -9` of the connector,
//! `rabbitmqctl close_all_connections`, or a broker restart), then read the
//! whole stream back and compare it with a second, untouched slot on the same
//! publication: every
//! committed change must be in the stream exactly once (0 lost, 0 duplicates),
//! identified by its `message_id` (`<commit LSN>-<seq>`). The kill -9 run is
//! repeated with a super stream of 3 partitions (`--stream-partitions 3`):
//! exactly once over all partitions, each change in the partition its row's
//! key (read from the reference slot) hashes to, each partition in WAL order;
//! so is the closed-connections run, over TLS (`rabbitmq-stream+tls://`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::broker::PrivateBroker;
use common::{Proc, TestDb};
use odoo_cdc::event::message_id;
use odoo_cdc::lsn::Lsn;
use odoo_cdc::sink::stream::consumer::{delete_stream, read_stream};
use odoo_cdc::sink::stream::partition::partition_of;
use odoo_cdc::sink::stream::{StreamConfig, StreamMessage, StreamSink, publishing_id};
use odoo_cdc::sink::{Confirm, HeaderValue, OutgoingMessage, Sink};

fn stream_url() -> String {
    std::env::var("ODOO_CDC_TEST_STREAM")
        .unwrap_or_else(|_| "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2f".to_string())
}

fn config(url: &str, stream: &str) -> StreamConfig {
    let mut cfg = StreamConfig::new(url, stream, &format!("producer-{stream}")).unwrap();
    cfg.connection_name = stream.to_owned();
    cfg
}

fn message(commit_lsn: u64, seq: u32) -> OutgoingMessage {
    let mut headers = BTreeMap::new();
    headers.insert(
        "x-commit-lsn".to_owned(),
        HeaderValue::Str(Lsn(commit_lsn).to_string()),
    );
    headers.insert("x-xid".to_owned(), HeaderValue::Int(745));
    headers.insert("x-snapshot".to_owned(), HeaderValue::Bool(false));
    OutgoingMessage {
        routing_key: "odoo.public.sale_order.update".into(),
        body: Bytes::from(format!("{{\"seq\":{seq}}}")),
        message_id: message_id(Lsn(commit_lsn), u64::from(seq)),
        content_type: "application/json",
        timestamp: 1_700_000_000,
        kind: "sale.order.update".into(),
        headers,
    }
}

async fn confirm(c: Confirm) {
    match c {
        Confirm::Pending(f) => tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("confirm within 20 s")
            .expect("positive confirm"),
        Confirm::OnFlush => panic!("the stream sink confirms through the broker"),
    }
}

#[tokio::test]
async fn messages_carry_the_amqp_sinks_properties_and_replays_are_not_stored_twice() {
    let stream = common::unique_name("odoo-cdc-test-stream");
    let cfg = config(&stream_url(), &stream);
    let mut sink = StreamSink::connect(cfg.clone())
        .await
        .expect("connect to the stream port (scripts/services.sh up enables it)");
    assert_eq!(sink.stored_publishing_id(), 0);
    let changes: Vec<OutgoingMessage> = (0..3).map(|i| message(0x0100_0000, i)).collect();
    let mut snapshot_row = message(0x0100_0000, 0);
    snapshot_row.message_id = "0000000001000000-r00004000-0000000001".into();
    for m in changes.iter().cloned().chain([snapshot_row.clone()]) {
        confirm(sink.publish(m).await.unwrap()).await;
    }
    sink.close().await.unwrap();

    // A replay of the same changes (a restart from the slot) and one new change.
    let mut sink = StreamSink::connect(cfg.clone()).await.unwrap();
    assert_eq!(
        sink.stored_publishing_id(),
        publishing_id(0x0100_0000, 2).unwrap()
    );
    for m in changes.iter().cloned().chain([message(0x0100_1000, 0)]) {
        confirm(sink.publish(m).await.unwrap()).await;
    }
    assert_eq!(sink.skipped(), 3);
    assert_eq!(
        cfg.stats
            .replayed_already_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    sink.close().await.unwrap();

    let got = read_stream(&cfg, 0, Duration::from_secs(2), 100)
        .await
        .unwrap();
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m.message_id.as_deref().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "0000000001000000-00000000",
            "0000000001000000-00000001",
            "0000000001000000-00000002",
            "0000000001000000-r00004000-0000000001",
            "0000000001001000-00000000",
        ]
    );
    let first = &got[0];
    assert_eq!(first.offset, 0);
    assert_eq!(first.subject.as_deref(), Some("sale.order.update"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.creation_time, Some(1_700_000_000_000));
    assert_eq!(first.body, b"{\"seq\":0}");
    let mut want = changes[0].headers.clone();
    want.insert(
        "x-routing-key".into(),
        HeaderValue::Str("odoo.public.sale_order.update".into()),
    );
    assert_eq!(first.application_properties, want);
    delete_stream(&cfg).await.unwrap();
}

#[tokio::test]
async fn a_missing_stream_is_an_error_with_no_declare() {
    let stream = common::unique_name("odoo-cdc-test-missing");
    let mut cfg = config(&stream_url(), &stream);
    cfg.declare = false;
    let err = StreamSink::connect(cfg)
        .await
        .err()
        .expect("no such stream");
    let text = err.to_string();
    assert!(text.contains("stream does not exist"), "{text}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_message_over_the_brokers_frame_limit_stops_with_a_clear_error() {
    let stream = common::unique_name("odoo-cdc-test-big");
    let cfg = config(&stream_url(), &stream);
    let mut sink = StreamSink::connect(cfg.clone()).await.unwrap();
    let mut big = message(0x0300_0000, 0);
    big.body = Bytes::from(vec![b'x'; 2 << 20]);
    let err = sink.publish(big).await.err().expect("over 1 MiB");
    assert!(err.to_string().contains("stream.frame_max"), "{err}");
    assert!(!err.is_retryable());
    // The connection is still usable for messages that fit.
    confirm(sink.publish(message(0x0300_0000, 1)).await.unwrap()).await;
    sink.close().await.unwrap();
    delete_stream(&cfg).await.unwrap();
}

#[tokio::test]
async fn bad_credentials_are_not_retried() {
    let url = stream_url().replacen("guest:guest@", "guest:wrong@", 1);
    let cfg = config(&url, &common::unique_name("odoo-cdc-test-auth"));
    let err = StreamSink::connect(cfg)
        .await
        .err()
        .expect("wrong password");
    let text = err.to_string();
    assert!(text.contains("authentication failure"), "{text}");
    assert!(!text.contains("wrong"), "the password leaked: {text}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn check_reports_the_stream_port() {
    let db = TestDb::create("stream_check").await;
    let stream = common::unique_name("odoo-cdc-test-check");
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
            .args(["check", "--source", &db.url, "--stream", &stream])
            .args(extra)
            .env("ODOO_CDC_LOG", "warn")
            .output()
            .expect("run odoo-cdc check");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = stream_url();
    let out = check(&["--stream-url", &url]);
    assert!(
        out.contains(&format!("ok       RabbitMQ stream port reachable; stream {stream:?} does not exist yet: run creates it")),
        "{out}"
    );
    let out = check(&["--stream-url", &url, "--no-declare"]);
    assert!(
        out.contains("BLOCKING stream ") && out.contains("--no-declare is set"),
        "{out}"
    );

    let cfg = config(&url, &stream);
    let mut sink = StreamSink::connect(cfg.clone()).await.unwrap();
    confirm(sink.publish(message(0x0200_0000, 0)).await.unwrap()).await;
    sink.close().await.unwrap();
    let out = check(&["--stream-url", &url, "--stream-producer", &cfg.producer]);
    let id = publishing_id(0x0200_0000, 0).unwrap();
    assert!(
        out.contains(&format!(
            "reachable; producer {:?} last stored publishing id {id}",
            cfg.producer
        )),
        "{out}"
    );
    let bad = url.replacen(":5552", ":1", 1);
    let out = check(&["--stream-url", &bad]);
    assert!(out.contains("BLOCKING RabbitMQ stream port at"), "{out}");
    assert!(
        out.contains("rabbitmq-plugins enable rabbitmq_stream"),
        "{out}"
    );
    delete_stream(&cfg).await.unwrap();
    db.cleanup().await;
}

/// Snapshot rows go through the unnamed producer, transaction-granularity
/// parts through the named one; a restart stores neither twice (the snapshot
/// is not repeated once the slot exists, the parts are deduplicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_and_transaction_messages_reach_the_stream() {
    let db = TestDb::create("stream_tx").await;
    db.exec(&format!(
        "CREATE TABLE item (id bigserial PRIMARY KEY, v bigint);
         INSERT INTO item (v) SELECT g FROM generate_series(1, 50) g;
         CREATE PUBLICATION {0} FOR TABLE item;",
        db.name
    ))
    .await;
    let url = stream_url();
    let stream = common::unique_name("odoo-cdc-test-tx");
    let cfg = config(&url, &stream);
    let spawn = || {
        spawn_connector(
            &db,
            &url,
            &stream,
            &[
                "--granularity",
                "transaction",
                "--max-events-per-message",
                "40",
            ],
        )
    };
    let mut connector = spawn();
    let read = || read_stream(&cfg, 0, Duration::from_millis(700), usize::MAX);
    let deadline = Instant::now() + Duration::from_secs(60);
    while read().await.unwrap_or_default().len() < 50 {
        assert!(Instant::now() < deadline, "the snapshot never arrived");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // 100 changes in one transaction: parts of 40, 40 and 20 events.
    db.exec(
        "UPDATE item SET v = v + 1; INSERT INTO item (v) SELECT g FROM generate_series(1, 50) g;",
    )
    .await;
    while read().await.unwrap_or_default().len() < 53 {
        assert!(Instant::now() < deadline, "the transaction never arrived");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    connector.kill9();
    let mut connector = spawn();
    db.exec("INSERT INTO item (v) VALUES (1)").await;
    while read().await.unwrap_or_default().len() < 54 {
        assert!(
            Instant::now() < deadline,
            "the last transaction never arrived"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = read().await.unwrap();
    connector.terminate();
    let ids: Vec<&str> = got.iter().filter_map(|m| m.message_id.as_deref()).collect();
    assert_eq!(ids.len(), 54, "{ids:?}");
    assert!(ids[..50].iter().all(|id| id.contains("-r")), "{ids:?}");
    let parts: Vec<(&str, Option<&HeaderValue>)> = got[50..53]
        .iter()
        .map(|m| {
            (
                m.subject.as_deref().unwrap_or_default(),
                m.application_properties.get("x-events"),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("transaction", Some(&HeaderValue::Int(40))),
            ("transaction", Some(&HeaderValue::Int(40))),
            ("transaction", Some(&HeaderValue::Int(20))),
        ]
    );
    assert!(ids[50].ends_with("-00000000") && ids[51].ends_with("-00000040"));
    delete_stream(&cfg).await.unwrap();
    db.cleanup().await;
}

// ---- exactly once under faults ------------------------------------------

const TARGET_CHANGES: u64 = 100_000;
/// Changes per second the workload commits: about 40 s in all.
const RATE: f64 = 2_500.0;

/// `<commit LSN>-<seq>` of every change the reference slot returns, in
/// commit order, with its row's key (`item.id`).
async fn committed_changes(db: &TestDb, slot: &str) -> Vec<(String, String)> {
    let rows = db
        .client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            &[&slot, &db.name],
        )
        .await
        .expect("read the reference slot");
    common::change_rows(rows.iter().map(|r| r.get::<_, &[u8]>(0)))
        .into_iter()
        .map(|(id, _, key)| (id, key))
        .collect()
}

/// Commits transactions of 1 to about 600 changes (inserts, updates, deletes)
/// until `TARGET_CHANGES` changes are committed, counting them in `changes`.
fn start_workload(url: String, changes: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = common::connect(&url).await;
        let started = Instant::now();
        let mut round = 0u64;
        while changes.load(Ordering::Relaxed) < TARGET_CHANGES {
            round += 1;
            let rows = rand::random_range(1..=300i64);
            let tx = client.transaction().await.unwrap();
            let mut n = tx
                .execute(
                    "INSERT INTO item (v, note) SELECT g, 'round ' || $1::bigint FROM generate_series(1, $2::bigint) g",
                    &[&(round as i64), &rows],
                )
                .await
                .unwrap();
            let extra = [
                (
                    3,
                    "UPDATE item SET v = v + 1 WHERE id IN (SELECT id FROM item ORDER BY random() LIMIT 200)",
                ),
                (
                    5,
                    "DELETE FROM item WHERE id IN (SELECT id FROM item ORDER BY random() LIMIT 100)",
                ),
            ];
            for (every, sql) in extra {
                if round.is_multiple_of(every) {
                    n += tx.execute(sql, &[]).await.unwrap();
                }
            }
            tx.commit().await.unwrap();
            changes.fetch_add(n, Ordering::Relaxed);
            // Paced, so the four faults (a broker restart takes seconds) all
            // land while changes are being committed.
            let due =
                started + Duration::from_secs_f64(changes.load(Ordering::Relaxed) as f64 / RATE);
            tokio::time::sleep_until(due.into()).await;
        }
    })
}

/// `odoo-cdc run` into the stream, on the database's own slot and publication.
fn spawn_connector(db: &TestDb, url: &str, stream: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "run",
        "--source",
        &db.url,
        "--stream-url",
        url,
        "--stream",
        stream,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
        "--create-slot",
        "--profile",
        "none",
        "--status-interval-secs",
        "1",
    ];
    args.extend_from_slice(extra);
    // The sink logs how many replayed changes it found already stored.
    Proc::spawn(
        &args,
        &[("ODOO_CDC_LOG", "warn,odoo_cdc::sink::stream=info")],
    )
}

/// The exactly-once runs: changes only (no snapshot), quick confirm timeouts.
const FAULT_RUN: &[&str] = &["--snapshot", "never", "--confirm-timeout-secs", "5"];

enum Fault<'a> {
    Kill9,
    CloseAllConnections(&'a PrivateBroker),
    /// `stop_app` then `start_app`: the producer's deduplication state must
    /// survive the broker's restart.
    BrokerRestart(&'a PrivateBroker),
}

/// Every message of every stream the connector writes (the partitions, in
/// order), `None` for a stream that could not be read.
async fn read_all(cfg: &StreamConfig, partitions: u16) -> Vec<Option<Vec<StreamMessage>>> {
    let mut all = Vec::new();
    for i in 0..usize::from(partitions.max(1)) {
        let stream = if partitions == 0 {
            cfg.clone()
        } else {
            cfg.partition(i)
        };
        all.push(
            read_stream(&stream, 0, Duration::from_millis(700), usize::MAX)
                .await
                .ok(),
        );
    }
    all
}

/// The exactly-once run: a workload, four faults, then every committed change
/// must be in the stream (or, with `partitions`, in its row's partition)
/// exactly once and in WAL order.
///
/// `amqp` is the same broker's AMQP URL, where the super stream's exchange is
/// declared when there are partitions.
async fn exactly_once_under(url: &str, amqp: &str, fault: Fault<'_>, partitions: u16) {
    let db = TestDb::create("stream_eo").await;
    let reference = format!("{}_ref", db.name);
    db.exec(&format!(
        "CREATE TABLE item (id bigserial PRIMARY KEY, v bigint, note text);
         CREATE PUBLICATION {0} FOR TABLE item;",
        db.name
    ))
    .await;
    // Its own statement: a slot cannot be created in a transaction that wrote.
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{reference}', 'pgoutput')"
    ))
    .await;
    let stream = common::unique_name("odoo-cdc-test-eo");
    let cfg = config(url, &stream);
    let n = partitions.to_string();
    let mut run_args = FAULT_RUN.to_vec();
    if partitions > 0 {
        run_args.extend(["--stream-partitions", &n, "--amqp", amqp]);
    }
    let run_args = &run_args[..];
    let mut connector = spawn_connector(&db, url, &stream, run_args);
    common::wait_for_slot(&db).await;

    let changes = Arc::new(AtomicU64::new(0));
    let workload = start_workload(db.url.clone(), Arc::clone(&changes));
    let started = Instant::now();
    for n in 1..=4 {
        // Spread over the workload: fault n once about n/5 of it committed,
        // at a random point within a tenth of it.
        let at = TARGET_CHANGES * n / 5 - rand::random_range(0..TARGET_CHANGES / 10);
        while changes.load(Ordering::Relaxed) < at && !workload.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "[{:>5.1}s] fault #{n} at {} committed changes",
            started.elapsed().as_secs_f64(),
            changes.load(Ordering::Relaxed)
        );
        match &fault {
            Fault::Kill9 => {
                connector.kill9();
                connector = spawn_connector(&db, url, &stream, run_args);
            }
            Fault::CloseAllConnections(broker) => {
                let out = broker.ctl(&["close_all_connections", "test: connection closed"]);
                assert!(out.status.success(), "{out:?}");
            }
            Fault::BrokerRestart(broker) => {
                broker.stop_app();
                tokio::time::sleep(Duration::from_millis(500)).await;
                broker.start_app();
            }
        }
        eprintln!(
            "[{:>5.1}s] fault #{n} done at {} committed changes",
            started.elapsed().as_secs_f64(),
            changes.load(Ordering::Relaxed)
        );
    }
    workload.await.unwrap();
    let committed = changes.load(Ordering::Relaxed);
    let changes_and_keys = committed_changes(&db, &reference).await;
    let expected: Vec<String> = changes_and_keys.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(expected.len() as u64, committed);

    // Wait until the stream holds them all and the slot moved past them.
    let upto: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut streams: Vec<Vec<StreamMessage>>;
    loop {
        streams = read_all(&cfg, partitions)
            .await
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let got: usize = streams.iter().map(Vec::len).sum();
        let caught_up = db
            .client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name, &upto],
            )
            .await
            .unwrap()
            .get::<_, bool>(0);
        if got >= expected.len() && caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {} changes reached the stream (slot caught up: {caught_up})",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Anything late (a duplicate still in flight) would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    streams = read_all(&cfg, partitions)
        .await
        .into_iter()
        .map(|s| s.expect("read every stream"))
        .collect();
    connector.terminate();

    let ids: Vec<String> = streams
        .iter()
        .flatten()
        .filter_map(|m| m.message_id.clone())
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *seen.entry(id).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let have: HashSet<&str> = seen.keys().copied().collect();
    let want: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let lost: Vec<&&str> = want.difference(&have).take(5).collect();
    let lost_n = want.difference(&have).count();
    let extra_n = have.difference(&want).count();
    let sizes: Vec<usize> = streams.iter().map(Vec::len).collect();
    eprintln!(
        "{} committed changes, {} messages in {} stream(s) {sizes:?}: {lost_n} lost, {duplicates} duplicates, {extra_n} unexpected",
        expected.len(),
        ids.len(),
        streams.len(),
    );
    assert_eq!(lost_n, 0, "lost, e.g. {lost:?}");
    assert_eq!(duplicates, 0, "duplicates in the stream");
    assert_eq!(extra_n, 0, "messages no committed change explains");
    if partitions == 0 {
        // Commit order is kept too.
        assert_eq!(ids, expected, "the stream is in commit order");
    } else {
        // Each change is in the partition its row's key hashes to (keys from
        // the reference slot), and each partition is in WAL order, so every
        // row's changes are in one partition in WAL order.
        let wal: HashMap<&str, (usize, &str)> = changes_and_keys
            .iter()
            .enumerate()
            .map(|(at, (id, key))| (id.as_str(), (at, key.as_str())))
            .collect();
        for (p, messages) in streams.iter().enumerate() {
            let mut previous = None;
            for m in messages {
                let id = m.message_id.as_deref().unwrap_or_default();
                let (at, key) = wal[id];
                let partition_key = format!("public.item/{key}");
                assert_eq!(
                    partition_of(&partition_key, usize::from(partitions)),
                    p,
                    "{id} (item {key}) is in partition {p}"
                );
                assert_eq!(
                    m.application_properties.get("x-partition-key"),
                    Some(&HeaderValue::Str(partition_key))
                );
                assert!(
                    previous < Some(at),
                    "partition {p} is not in WAL order at {id}"
                );
                previous = Some(at);
            }
        }
        assert!(
            sizes.iter().all(|&n| n > 0),
            "every partition got changes: {sizes:?}"
        );
    }

    for i in 0..usize::from(partitions) {
        delete_stream(&cfg.partition(i)).await.unwrap();
    }
    delete_stream(&cfg).await.unwrap();
    // cleanup() drops the reference slot with the database's others (it
    // retries while a slot is still active; a direct drop once failed here).
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_workload_leaves_every_change_in_the_stream_exactly_once() {
    exactly_once_under(&stream_url(), &common::amqp_url(), Fault::Kill9, 0).await;
}

/// The same with a super stream of 3 partitions: every change exactly once
/// over all partitions, in its row's partition, in WAL order there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_partitions_leaves_every_change_exactly_once_in_its_rows_partition() {
    exactly_once_under(&stream_url(), &common::amqp_url(), Fault::Kill9, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_broker_connections_leave_every_change_in_the_stream_exactly_once() {
    if !PrivateBroker::available() {
        eprintln!("RabbitMQ is not installed here: skipped");
        return;
    }
    let broker = PrivateBroker::start();
    let url = broker.stream_url();
    exactly_once_under(
        &url,
        &broker.amqp_url(),
        Fault::CloseAllConnections(&broker),
        0,
    )
    .await;
}

/// The same over TLS (`rabbitmq-stream+tls://`, the node's own CA) with a
/// super stream of 3 partitions: every partition's connection is cut four
/// times mid-workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_tls_connections_with_partitions_leave_every_change_exactly_once() {
    if !PrivateBroker::available() {
        eprintln!("RabbitMQ is not installed here: skipped");
        return;
    }
    let broker = PrivateBroker::start();
    let url = broker.stream_tls_url();
    exactly_once_under(
        &url,
        &broker.amqp_url(),
        Fault::CloseAllConnections(&broker),
        3,
    )
    .await;
}

/// Over TLS the messages arrive as over TCP; a broker whose certificate the
/// trust store does not vouch for is refused, naming the TLS handshake.
#[tokio::test]
async fn tls_connections_verify_the_brokers_certificate() {
    if !PrivateBroker::available() {
        eprintln!("RabbitMQ is not installed here: skipped");
        return;
    }
    let broker = PrivateBroker::start();
    let stream = common::unique_name("odoo-cdc-test-tls");
    let cfg = config(&broker.stream_tls_url(), &stream);
    let mut sink = StreamSink::connect(cfg.clone()).await.unwrap();
    for seq in 0..3 {
        confirm(sink.publish(message(0x0400_0000, seq)).await.unwrap()).await;
    }
    sink.close().await.unwrap();
    let got = read_stream(&cfg, 0, Duration::from_millis(700), usize::MAX)
        .await
        .unwrap();
    let ids: Vec<_> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    let want: Vec<_> = (0..3)
        .map(|seq| message_id(Lsn(0x0400_0000), seq))
        .collect();
    assert_eq!(ids, want);

    // The platform's trust store does not know the node's CA.
    let untrusted = broker.stream_tls_url();
    let untrusted = untrusted.split('?').next().unwrap();
    let err = StreamSink::connect(config(untrusted, &stream))
        .await
        .err()
        .expect("an unknown CA is refused");
    let text = err.to_string();
    assert!(text.contains("TLS handshake with localhost"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    // Plain TCP to the TLS port is not mistaken for a broker either.
    let plain = broker
        .stream_tls_url()
        .replacen("rabbitmq-stream+tls", "rabbitmq-stream", 1);
    let plain = plain.split('?').next().unwrap();
    let mut plain_cfg = config(plain, &stream);
    plain_cfg.connect_timeout = Duration::from_secs(3);
    assert!(StreamSink::connect(plain_cfg).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_leave_every_change_in_the_stream_exactly_once() {
    if !PrivateBroker::available() {
        eprintln!("RabbitMQ is not installed here: skipped");
        return;
    }
    let broker = PrivateBroker::start();
    let url = broker.stream_url();
    exactly_once_under(&url, &broker.amqp_url(), Fault::BrokerRestart(&broker), 0).await;
}
