//! Shared helpers for integration tests against the real services from
//! `scripts/services.sh` (never mocks). Each test gets its own database and
//! slot, so tests run in parallel.
#![allow(dead_code)]

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
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<String>>(0))
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
            .env("ODOO_CDC_LOG", "warn");
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
