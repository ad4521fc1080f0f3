//! A private PostgreSQL cluster for one test: its own data directory and port,
//! so a test may restart, stop or misconfigure it (fault injection, `check`
//! against `wal_level=replica`, a source database going away) without touching
//! the shared cluster other tests use. Created with the same binaries
//! `scripts/services.sh` found (`ODOO_CDC_TEST_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin`), owned by the `postgres` OS user when run as root.
//! Dropping it stops the server immediately and deletes its directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    if let Ok(b) = std::env::var("ODOO_CDC_TEST_PG_BIN")
        && !b.is_empty()
    {
        return PathBuf::from(b);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries under /usr/lib/postgresql (run scripts/services.sh up)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("no initdb found under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary as the `postgres` OS user when we are root (initdb
/// and the server refuse to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

impl PrivateCluster {
    /// initdb + start with `wal_level=logical`; `extra` lines (`key = value`)
    /// are appended to postgresql.conf and override the defaults.
    pub fn start(extra: &[(&str, &str)]) -> PrivateCluster {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(super::unique_name("odoo_cdc_pg"));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown {} to postgres", dir.display());
        }
        let data = dir.join("data");
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut conf = format!(
            "\n# --- odoo-cdc private test cluster ---\n\
             listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 16\nmax_replication_slots = 16\n\
             max_connections = 100\nfsync = off\nfull_page_writes = off\n\
             synchronous_commit = on\nshared_buffers = 64MB\n",
            dir.display()
        );
        for (k, v) in extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        let cluster = PrivateCluster { dir, port, bin };
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = self.try_pg_ctl(args);
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn try_pg_ctl(&self, args: &[&str]) -> std::process::Output {
        as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// `pg_ctl restart -m fast`: every connection, walsenders included, is cut.
    /// A fast shutdown waits for logical walsenders to have their WAL
    /// confirmed; when the connector cannot confirm (its broker link stalled
    /// by another fault) that can outlast the wait: then stop immediately (a
    /// crash, which recovery replays) and start again.
    pub fn restart(&self) {
        let fast = self.try_pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
        if !fast.status.success() {
            self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"]);
            self.pg_ctl(&["start", "-w", "-t", "60"]);
        }
    }

    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// `pg_waldump` of every WAL segment still in `pg_wal` (for diagnosing
    /// which record came before which); empty if it cannot run.
    pub fn waldump(&self) -> String {
        let wal = self.dir.join("data").join("pg_wal");
        let mut segments: Vec<String> = std::fs::read_dir(&wal)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
                    .collect()
            })
            .unwrap_or_default();
        segments.sort();
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return String::new();
        };
        as_postgres(&self.bin.join("pg_waldump"))
            .arg("--path")
            .arg(&wal)
            .args([first, last])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate", "-w", "-t", "30"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
