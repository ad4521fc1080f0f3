//! Shared helpers for integration tests against the real services from
//! `scripts/services.sh` (never mocks). Each test gets its own database and
//! slot, so tests run in parallel.
#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The admin URL of the test cluster (`ODOO_CDC_TEST_PG`, default as services.sh prints it).
pub fn pg_admin_url() -> String {
    std::env::var("ODOO_CDC_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54329/postgres".to_string())
}

pub fn amqp_url() -> String {
    std::env::var("ODOO_CDC_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// `postgres://user@host:port/` prefix of the admin URL, to build URLs for other dbs/users.
pub fn pg_base() -> (String, String) {
    let url = pg_admin_url();
    let rest = url
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let (creds, hostpart) = rest
        .split_once('@')
        .expect("ODOO_CDC_TEST_PG has user@host");
    let host = hostpart.split('/').next().unwrap().to_string();
    (creds.to_string(), host)
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to {url}: {e}. Run `scripts/services.sh up` first.")
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Connects, retrying for up to `limit` while the server is not there yet (a
/// cluster restarting, a proxy healing); the last error after that.
pub async fn connect_retry(url: &str, limit: Duration) -> Result<Client, tokio_postgres::Error> {
    let deadline = Instant::now() + limit;
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return Ok(client);
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
        % 1_000_000_000;
    format!("{prefix}_{}_{n}_{t}", std::process::id())
}

/// The slot's `confirmed_flush_lsn` as text (`None`: no such slot, or not set).
pub async fn confirmed_flush_lsn(client: &Client, slot: &str) -> Option<String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.and_then(|r| r.get::<_, Option<String>>(0))
}

/// A database of its own; its name doubles as the slot and publication name.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn create(prefix: &str) -> TestDb {
        let name = unique_name(prefix);
        let admin = connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let (creds, host) = pg_base();
        let url = format!("postgres://{creds}@{host}/{name}");
        let client = connect(&url).await;
        TestDb { name, url, client }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
        row.get::<_, i64>(0)
    }

    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Option<String> {
        confirmed_flush_lsn(&self.client, slot).await
    }

    /// Drops the slots of this database and the database itself.
    pub async fn cleanup(self) {
        let admin = connect(&pg_admin_url()).await;
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}' AND pid <> pg_backend_pid();
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}' AND NOT active;",
                self.name
            ))
            .await;
        drop(self.client);
        for _ in 0..20 {
            let _ = admin
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{}' AND NOT active",
                    self.name
                ))
                .await;
            if admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A running `odoo-cdc` process whose stdout lines are collected.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_odoo-cdc"));
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("ODOO_CDC_LOG", "warn,lapin=error");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn odoo-cdc");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Collects lines until `done(&all_lines)` or the deadline; returns whether `done` held.
    pub fn collect_until(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.seen) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return done(&self.seen),
            }
        }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.seen
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // drain what was printed before exit
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(l);
                }
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory of the process so far, in KiB (Linux VmHWM).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

pub fn count_ops(events: &[serde_json::Value], op: &str) -> usize {
    events.iter().filter(|e| e["op"] == op).count()
}

/// A consumer on a fresh queue bound to an exchange, collecting (routing key,
/// message id, headers, body) of every delivery, acknowledging as it goes.
pub mod amqp {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    use lapin::{Channel, Connection, ConnectionProperties};

    #[derive(Debug, Clone)]
    pub struct Got {
        pub routing_key: String,
        pub message_id: String,
        pub content_type: String,
        pub kind: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
        pub delivery_mode: Option<u8>,
    }

    impl Got {
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }
        pub fn header(&self, k: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        }
    }

    pub struct Consumer {
        pub conn: Connection,
        pub channel: Channel,
        pub got: Arc<Mutex<Vec<Got>>>,
        pub queue: String,
    }

    pub async fn channel() -> (Connection, Channel) {
        let conn = tokio::time::timeout(
            Duration::from_secs(20),
            Connection::connect(&super::amqp_url(), ConnectionProperties::default()),
        )
        .await
        .expect("amqp connect hung")
        .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        (conn, ch)
    }

    /// Declares `exchange` (topic, durable) and a queue bound with `binding`, and consumes it.
    pub async fn consume(exchange: &str, queue: &str, binding: &str) -> Consumer {
        let (conn, ch) = channel().await;
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange declare");
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue declare");
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            while let Some(d) = consumer.next().await {
                let Ok(d) = d else { break };
                let p = &d.properties;
                let headers = p
                    .headers()
                    .as_ref()
                    .map(|h| {
                        h.inner()
                            .iter()
                            .map(|(k, v)| (k.to_string(), field_text(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                sink.lock().unwrap().push(Got {
                    routing_key: d.routing_key.to_string(),
                    message_id: p
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    content_type: p
                        .content_type()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    kind: p.kind().as_ref().map(|s| s.to_string()).unwrap_or_default(),
                    headers,
                    body: d.data.to_vec(),
                    delivery_mode: *p.delivery_mode(),
                });
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        Consumer {
            conn,
            channel: ch,
            got,
            queue: queue.to_string(),
        }
    }

    fn field_text(v: &lapin::types::AMQPValue) -> String {
        use lapin::types::AMQPValue::*;
        match v {
            LongString(s) => s.to_string(),
            ShortString(s) => s.to_string(),
            LongLongInt(i) => i.to_string(),
            LongInt(i) => i.to_string(),
            ShortInt(i) => i.to_string(),
            Boolean(b) => b.to_string(),
            other => format!("{other:?}"),
        }
    }

    impl Consumer {
        pub fn snapshot(&self) -> Vec<Got> {
            self.got.lock().unwrap().clone()
        }
        pub fn len(&self) -> usize {
            self.got.lock().unwrap().len()
        }
        /// Waits until `done(&messages)` or the timeout; returns whether it held.
        pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Got]) -> bool) -> bool {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                if done(&self.got.lock().unwrap()) {
                    return true;
                }
                if tokio::time::Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        pub async fn delete(self) {
            let _ = self
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = self.conn.close(200, "done".into()).await;
        }
    }
}

/// `odoo-cdc run` arguments for a test database (slot and publication named after it).
pub fn run_args<'a>(db: &'a TestDb, exchange: &'a str, amqp: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--source",
        &db.url,
        "--amqp",
        amqp,
        "--exchange",
        exchange,
        "--slot",
        &db.name,
        "--publication",
        &db.name,
        "--create-slot",
        "--create-publication",
        "--status-interval-secs",
        "1",
    ]
}

/// The connector's `message_id` (`<commit LSN>-<seq>`) of every row change in
/// pgoutput (proto 1) messages as `pg_logical_slot_get_binary_changes` returns
/// them: a reference slot's view of what was committed, in commit order.
/// Panics on a truncate, which no caller's workload does.
pub fn change_ids<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<String> {
    let mut ids = Vec::new();
    let (mut commit_lsn, mut seq) = (0u64, 0u32);
    for data in messages {
        match data.first() {
            Some(b'B') => {
                commit_lsn = u64::from_be_bytes(data[1..9].try_into().unwrap());
                seq = 0;
            }
            Some(b'I' | b'U' | b'D') => {
                ids.push(format!("{commit_lsn:016X}-{seq:08}"));
                seq += 1;
            }
            Some(b'T') => panic!("the workload does not truncate"),
            _ => {}
        }
    }
    ids
}

/// Like [`change_ids`], with each change's row: the relation OID and the
/// text of the row's first column (the key of every table the callers use),
/// from the new tuple, or the old one for a delete.
pub fn change_rows<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<(String, u32, String)> {
    /// The first column's text of a tuple (`n`/`u` columns: empty).
    fn first_column(t: &[u8]) -> String {
        // ncols u16, then kind byte, and for 't' a u32 length and the bytes
        match t.get(2) {
            Some(b't') => {
                let len = u32::from_be_bytes(t[3..7].try_into().unwrap()) as usize;
                String::from_utf8_lossy(&t[7..7 + len]).into_owned()
            }
            _ => String::new(),
        }
    }
    let mut rows = Vec::new();
    let (mut commit_lsn, mut seq) = (0u64, 0u32);
    for data in messages {
        let id = || format!("{commit_lsn:016X}-{seq:08}");
        match data.first() {
            Some(b'B') => {
                commit_lsn = u64::from_be_bytes(data[1..9].try_into().unwrap());
                seq = 0;
            }
            Some(op @ (b'I' | b'U' | b'D')) => {
                let rel = u32::from_be_bytes(data[1..5].try_into().unwrap());
                let key = match (op, data[5]) {
                    // Insert: 'N' tuple. Delete: 'K' or 'O' tuple.
                    (b'I' | b'D', _) => first_column(&data[6..]),
                    // Update: the new tuple follows 'N' (after an old one, if any).
                    (_, b'N') => first_column(&data[6..]),
                    _ => panic!("updates of the key (an old tuple) are not in the workloads"),
                };
                rows.push((id(), rel, key));
                seq += 1;
            }
            Some(b'T') => panic!("the workload does not truncate"),
            _ => {}
        }
    }
    rows
}

/// `odoo-cdc run` arguments for the fault tests: database `db` of a private
/// cluster and the broker both reached through proxies, an existing
/// `publication`, `slot` created if missing, no snapshot and no Odoo profile
/// (exactly the committed changes of the publication are expected), status
/// every second, and short confirm and replication timeouts so that faults are
/// noticed quickly.
pub fn run_args_via(
    pg: &proxy::TcpProxy,
    db: &str,
    amqp: &proxy::TcpProxy,
    exchange: &str,
    slot: &str,
    publication: &str,
) -> Vec<String> {
    let source = format!(
        "postgres://postgres@{}/{db}?connect_timeout=5",
        pg.host_port()
    );
    let amqp = format!("amqp://guest:guest@{}/%2f", amqp.host_port());
    [
        "run",
        "--source",
        &source,
        "--amqp",
        &amqp,
        "--exchange",
        exchange,
        "--slot",
        slot,
        "--publication",
        publication,
        "--create-slot",
        "--snapshot",
        "never",
        "--profile",
        "none",
        "--status-interval-secs",
        "1",
        "--confirm-timeout-secs",
        "5",
        "--replication-timeout-secs",
        "10",
    ]
    .map(String::from)
    .to_vec()
}

/// Waits until the slot `slot` exists (a connector started with
/// `--create-slot` made it); panics after `limit`.
pub async fn await_slot(client: &Client, slot: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("count the replication slots")
            .get(0);
        if n == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the connector made no slot {slot}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the connector created the slot named after the database.
pub async fn wait_for_slot(db: &TestDb) {
    for _ in 0..400 {
        if db.confirmed_flush_lsn(&db.name).await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the connector did not create its slot");
}
