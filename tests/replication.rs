//! The walsender client and SQL connections against the real PostgreSQL from
//! `scripts/services.sh` (run `eval "$(scripts/services.sh env)"` first).
//!
//! Each test makes its own database and slots with unique names, and a guard
//! drops them (with psql, so it also works when the test panics).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use odoo_cdc::lsn::Lsn;
use odoo_cdc::replication::{
    PgConfig, ReplicationClient, ReplicationError, ReplicationMessage, ReplicationReader,
    ReplicationStream, SnapshotAction, SslMode, publication_names_value, sql,
};
use odoo_cdc::secret::Secret;

const WAIT: Duration = Duration::from_secs(30);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `scripts/services.sh up` and `eval \"$(scripts/services.sh env)\"` before the integration tests"
        )
    })
}

fn admin_cfg() -> PgConfig {
    env("ODOO_CDC_TEST_PG")
        .parse()
        .expect("ODOO_CDC_TEST_PG is not a valid postgres:// URL")
}

fn tls_ca() -> PathBuf {
    let p = PathBuf::from(env("ODOO_CDC_TEST_TLS_CA"));
    assert!(
        p.exists(),
        "ODOO_CDC_TEST_TLS_CA={} does not exist",
        p.display()
    );
    p
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}

/// A database of its own for one test; dropped (with its slots) on drop.
struct TestDb {
    name: String,
}

impl TestDb {
    async fn create(tag: &str) -> TestDb {
        let name = unique(&format!("cdc_repl_{tag}"));
        let admin = sql::connect(&admin_cfg())
            .await
            .expect("admin SQL connection");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        TestDb { name }
    }

    /// The admin (trust) config pointed at this database.
    fn cfg(&self) -> PgConfig {
        let mut c = admin_cfg();
        c.dbname = self.name.clone();
        c
    }

    fn cfg_as(&self, user: &str, password: Option<&str>) -> PgConfig {
        let mut c = self.cfg();
        c.user = user.to_string();
        c.password = password.map(Secret::from);
        c
    }

    async fn sql(&self) -> tokio_postgres::Client {
        sql::connect(&self.cfg())
            .await
            .expect("SQL connection to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let db = &self.name;
        let cleanup = format!(
            r#"DO $$
DECLARE s text;
BEGIN
  FOR i IN 1..100 LOOP
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE datname = '{db}' AND pid <> pg_backend_pid();
    FOR s IN SELECT slot_name FROM pg_replication_slots WHERE database = '{db}' AND NOT active LOOP
      BEGIN PERFORM pg_drop_replication_slot(s); EXCEPTION WHEN OTHERS THEN NULL; END;
    END LOOP;
    EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE database = '{db}');
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;"#
        );
        let url = env("ODOO_CDC_TEST_PG");
        for sql in [
            cleanup,
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ] {
            match Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &url, "-c", &sql])
                .output()
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "cleanup of {db} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("cleanup of {db}: cannot run psql: {e}"),
            }
        }
    }
}

async fn one_value(client: &mut ReplicationClient, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.expect(sql);
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0][0].clone()
}

async fn sql_value(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.expect(sql);
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn next_within(
    reader: &mut ReplicationReader,
    limit: Duration,
) -> Option<ReplicationMessage> {
    tokio::time::timeout(limit, reader.next())
        .await
        .expect("no replication message in time")
        .expect("replication stream error")
}

async fn stream_next(stream: &mut ReplicationStream) -> ReplicationMessage {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no replication message in time")
        .expect("replication stream error")
        .expect("stream ended early")
}

/// Listens on 127.0.0.2 (not in the server certificate) and forwards to the
/// test server, so a name mismatch can be tested against the real server.
async fn proxy_on_127_0_0_2(target_port: u16) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

const SHOWN_SETTINGS: [(&str, &str); 5] = [
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

const TEXT_FORMS: &str = "SELECT '2024-01-02 03:04:05.5+02'::timestamptz::text || ' ' || '1 day 2 hours'::interval::text || ' ' || 0.1::float8::text || ' ' || '\\x01ff'::bytea::text";

#[tokio::test]
async fn trust_connect_identify_system_and_session_settings() {
    let db = TestDb::create("trust").await;
    let mut client = ReplicationClient::connect(&db.cfg())
        .await
        .expect("connect");

    let version_num = one_value(&mut client, "SHOW server_version_num")
        .await
        .unwrap();
    assert_eq!(client.server_version_num().to_string(), version_num);

    // a real walsender, bound to our database
    assert_eq!(
        one_value(
            &mut client,
            "SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        .await
        .as_deref(),
        Some("walsender")
    );
    let info = client.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert_eq!(info.dbname.as_deref(), Some(db.name.as_str()));
    assert!(info.timeline >= 1);
    assert!(info.xlogpos.is_valid());
    let sql = db.sql().await;
    let systemid = sql_value(
        &sql,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await;
    assert_eq!(Some(info.systemid.clone()), systemid);
    let now: Lsn = sql_value(&sql, "SELECT pg_current_wal_flush_lsn()::text")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(info.xlogpos <= now, "{} > {now}", info.xlogpos);

    // The same session settings on both kinds of connection, so values render alike.
    for (name, want) in SHOWN_SETTINGS {
        let show = format!("SHOW {name}");
        assert_eq!(
            one_value(&mut client, &show).await.as_deref(),
            Some(want),
            "walsender {name}"
        );
        assert_eq!(
            sql_value(&sql, &show).await.as_deref(),
            Some(want),
            "SQL {name}"
        );
    }
    assert_eq!(
        one_value(&mut client, "SHOW application_name")
            .await
            .as_deref(),
        Some("odoo-cdc")
    );
    let repl_text = one_value(&mut client, TEXT_FORMS).await;
    assert_eq!(
        repl_text.as_deref(),
        Some("2024-01-02 01:04:05.5+00 P1DT2H 0.1 \\x01ff")
    );
    assert_eq!(repl_text, sql_value(&sql, TEXT_FORMS).await);

    // errors in plain SQL leave the client usable
    let err = client
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42P01"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(
        one_value(&mut client, "SELECT 1").await.as_deref(),
        Some("1")
    );
    client.close().await;
}

#[tokio::test]
async fn md5_and_scram_authentication() {
    let db = TestDb::create("auth").await;
    for (user, pw) in [
        ("odoo_cdc_md5", "md5-secret"),
        ("odoo_cdc_scram", "scram-secret"),
    ] {
        let cfg = db.cfg_as(user, Some(pw));
        let mut client = ReplicationClient::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(
            one_value(&mut client, "SELECT current_user")
                .await
                .as_deref(),
            Some(user)
        );
        let info = client.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert_eq!(info.dbname.as_deref(), Some(db.name.as_str()));
        let sql = sql::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("SQL {user}: {e}"));
        assert_eq!(
            sql_value(&sql, "SELECT current_user").await.as_deref(),
            Some(user)
        );
    }
    // the roles really are password-authenticated: pg_hba says md5 / scram-sha-256
    let admin = db.sql().await;
    let methods = sql_value(
        &admin,
        "SELECT string_agg(user_name[1] || '=' || auth_method, ',' ORDER BY line_number) FROM pg_hba_file_rules WHERE user_name[1] LIKE 'odoo_cdc_%'",
    )
    .await
    .unwrap();
    assert_eq!(methods, "odoo_cdc_scram=scram-sha-256,odoo_cdc_md5=md5");
}

#[tokio::test]
async fn wrong_or_missing_password_is_not_retryable() {
    let db = TestDb::create("badpw").await;
    for user in ["odoo_cdc_md5", "odoo_cdc_scram"] {
        let cfg = db.cfg_as(user, Some("wrong-password"));
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        assert!(!err.is_retryable(), "{user}: {err}");
        assert!(
            err.to_string().contains("password authentication failed"),
            "{user}: {err}"
        );
        assert!(!err.to_string().contains("wrong-password"));

        let err = sql::connect(&cfg).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("28P01"), "SQL {user}: {err}");
        assert!(!err.is_retryable(), "SQL {user}: {err}");
    }

    assert!(
        std::env::var_os("PGPASSWORD").is_none(),
        "unset PGPASSWORD to run this test: it checks the error for a missing password"
    );
    let err = ReplicationClient::connect(&db.cfg_as("odoo_cdc_scram", None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicationError::PasswordRequired { ref user } if user == "odoo_cdc_scram"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("PGPASSWORD"), "{err}");
}

async fn ssl_in_use(client: &mut ReplicationClient) -> String {
    one_value(
        client,
        "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn tls_modes_against_the_real_server() {
    let db = TestDb::create("tls").await;

    // require: any certificate, encrypted; SCRAM over TLS (server offers -PLUS,
    // we answer without channel binding)
    let mut cfg = db.cfg_as("odoo_cdc_scram", Some("scram-secret"));
    cfg.sslmode = SslMode::Require;
    let mut client = ReplicationClient::connect(&cfg)
        .await
        .expect("sslmode=require");
    assert_eq!(ssl_in_use(&mut client).await, "true");

    // prefer takes TLS when offered; disable does not
    for (mode, want) in [(SslMode::Prefer, "true"), (SslMode::Disable, "false")] {
        let mut cfg = db.cfg();
        cfg.sslmode = mode;
        let mut client = ReplicationClient::connect(&cfg).await.expect("connect");
        assert_eq!(ssl_in_use(&mut client).await, want, "{mode}");
    }

    // verify-full with the test CA and the certificate's host name
    let mut cfg = db.cfg();
    cfg.host = "localhost".into();
    cfg.sslmode = SslMode::VerifyFull;
    cfg.sslrootcert = Some(tls_ca());
    let mut client = ReplicationClient::connect(&cfg).await.expect("verify-full");
    assert_eq!(ssl_in_use(&mut client).await, "true");
    let sql = sql::connect(&cfg).await.expect("SQL verify-full");
    assert_eq!(
        sql_value(
            &sql,
            "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await
        .as_deref(),
        Some("true")
    );

    // verify-full without our CA: the public roots do not know it
    let mut no_ca = cfg.clone();
    no_ca.sslrootcert = None;
    let err = ReplicationClient::connect(&no_ca).await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::TlsHandshake { .. }),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");
    let err = sql::connect(&no_ca).await.unwrap_err();
    assert!(!err.is_retryable(), "SQL: {err}");

    // a host name the certificate does not carry (127.0.0.2 forwards to the server)
    let proxy = proxy_on_127_0_0_2(cfg.port).await;
    let mut wrong_name = cfg.clone();
    wrong_name.host = proxy.ip().to_string();
    wrong_name.port = proxy.port();
    let err = ReplicationClient::connect(&wrong_name).await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::TlsHandshake { .. }),
        "{err}"
    );
    assert!(
        err.to_string().to_lowercase().contains("not valid for"),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");
    let err = sql::connect(&wrong_name).await.unwrap_err();
    assert!(!err.is_retryable(), "SQL: {err}");

    // ... which verify-ca accepts: the chain is checked, the name is not
    let mut ca_only = wrong_name.clone();
    ca_only.sslmode = SslMode::VerifyCa;
    let mut client = ReplicationClient::connect(&ca_only)
        .await
        .expect("verify-ca");
    assert_eq!(ssl_in_use(&mut client).await, "true");
}

#[tokio::test]
async fn create_and_drop_slots_with_and_without_snapshots() {
    let db = TestDb::create("slots").await;
    let sql = db.sql().await;
    sql.batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mut client = ReplicationClient::connect(&db.cfg())
        .await
        .expect("connect");

    let temp = unique("tmp");
    let created = client
        .create_logical_slot(&temp, true, SnapshotAction::Export)
        .await
        .expect("temporary slot");
    assert_eq!(created.slot_name, temp);
    assert_eq!(created.output_plugin, "pgoutput");
    assert!(created.consistent_point.is_valid());
    let snapshot = created
        .snapshot_name
        .clone()
        .expect("exported snapshot name");

    // the exported snapshot can be imported while the client stays idle
    let reader = db.sql().await;
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .expect("import exported snapshot");
    sql.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    assert_eq!(
        sql_value(&reader, "SELECT count(*)::text FROM t")
            .await
            .as_deref(),
        Some("1"),
        "the snapshot must not see a row inserted after the slot's consistent point"
    );
    reader.batch_execute("COMMIT").await.unwrap();

    let slot_row = |name: String| {
        let sql = &sql;
        async move {
            let rows = sql
                .query(
                    "SELECT temporary, plugin, database FROM pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            rows.first().map(|r| {
                (
                    r.get::<_, bool>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                )
            })
        }
    };
    assert_eq!(
        slot_row(temp.clone()).await,
        Some((true, "pgoutput".to_string(), db.name.clone()))
    );

    let perm_export = unique("perm_exp");
    let created = client
        .create_logical_slot(&perm_export, false, SnapshotAction::Export)
        .await
        .expect("permanent slot with snapshot");
    assert!(created.snapshot_name.is_some());

    let perm = unique("perm");
    let created = client
        .create_logical_slot(&perm, false, SnapshotAction::NoExport)
        .await
        .expect("permanent slot without snapshot");
    assert_eq!(created.snapshot_name, None);
    assert_eq!(slot_row(perm.clone()).await.map(|r| r.0), Some(false));

    for name in [&perm_export, &perm] {
        client.drop_slot(name, false).await.expect("drop slot");
        assert_eq!(slot_row(name.clone()).await, None, "{name} still exists");
    }

    // the temporary slot goes away with its connection
    client.close().await;
    let deadline = Instant::now() + WAIT;
    while slot_row(temp.clone()).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "temporary slot {temp} outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn missing_slot_and_bad_names_are_clear_non_retryable_errors() {
    let db = TestDb::create("noslot").await;
    let mut client = ReplicationClient::connect(&db.cfg())
        .await
        .expect("connect");

    let err = client
        .drop_slot("no_such_slot_here", false)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("no_such_slot_here"), "{err}");

    for bad in ["Bad-Name", "", "x y"] {
        let err = client
            .create_logical_slot(bad, true, SnapshotAction::NoExport)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::InvalidSlotName { .. }),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
    // the client is still usable after those
    client.identify_system().await.expect("still usable");

    let err = client
        .start_logical_replication(
            "no_such_slot_here",
            Lsn(0),
            &[("proto_version", "1"), ("publication_names", "\"p\"")],
        )
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("replication slot \"no_such_slot_here\" does not exist"),
        "{err}"
    );
}

/// pgoutput Commit: 'C', flags u8, commit LSN u64, end LSN u64, timestamp i64.
fn commit_end_lsn(data: &[u8]) -> Lsn {
    assert_eq!(data[0], b'C');
    assert!(data.len() >= 26, "short Commit message");
    Lsn(u64::from_be_bytes(data[10..18].try_into().unwrap()))
}

async fn confirmed_flush(sql: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
}

/// While the walsender is busy the reader raises the socket's SO_RCVLOWAT and
/// lets the kernel queue bytes before waking it (src/replication/coalesce.rs).
/// What must never happen is a small trailing message stuck below that mark:
/// after a backlog of ~10 MB, one more one-row transaction still arrives (the
/// walsender's keepalives, 30 s apart and tiny, would never fill the mark).
#[tokio::test]
async fn a_small_transaction_after_a_busy_burst_is_not_held_back() {
    let db = TestDb::create("coalesce").await;
    let admin = db.sql().await;
    admin
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text);
             CREATE PUBLICATION cdc_pub FOR TABLE items;",
        )
        .await
        .unwrap();
    let mut client = ReplicationClient::connect(&db.cfg())
        .await
        .expect("connect");
    let slot = unique("coalesce");
    client
        .create_logical_slot(&slot, false, SnapshotAction::NoExport)
        .await
        .expect("create slot");
    admin
        .batch_execute(
            "INSERT INTO items SELECT g, repeat('x', 200) FROM generate_series(1, 40000) g",
        )
        .await
        .unwrap();
    let pubs = publication_names_value(&["cdc_pub"]);
    let mut stream = client
        .start_logical_replication(
            &slot,
            Lsn(0),
            &[("proto_version", "1"), ("publication_names", &pubs)],
        )
        .await
        .expect("START_REPLICATION");
    // Let the socket fill up, so the first reads are large and coalescing starts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut rows = 0;
    let mut commits = 0;
    let mut trailing_sent = false;
    while commits < 2 {
        if let ReplicationMessage::XLogData { data, .. } = stream_next(&mut stream).await {
            match data[0] {
                b'I' => rows += 1,
                b'C' => commits += 1,
                _ => {}
            }
            if commits == 1 && !trailing_sent {
                admin
                    .batch_execute("INSERT INTO items VALUES (0, 'last')")
                    .await
                    .unwrap();
                trailing_sent = true;
            }
        }
    }
    assert_eq!(rows, 40001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pgoutput_confirms_flush_and_answers_keepalives() {
    let db = TestDb::create("stream").await;
    let admin = db.sql().await;
    admin
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text);
             CREATE PUBLICATION cdc_pub FOR TABLE items;
             GRANT SELECT ON items TO odoo_cdc_scram;",
        )
        .await
        .unwrap();

    // as the non-superuser REPLICATION role, over SCRAM
    let cfg = db.cfg_as("odoo_cdc_scram", Some("scram-secret"));
    let mut client = ReplicationClient::connect(&cfg).await.expect("connect");
    let slot = unique("stream");
    let created = client
        .create_logical_slot(&slot, false, SnapshotAction::NoExport)
        .await
        .expect("create slot");
    let pubs = publication_names_value(&["cdc_pub"]);
    let mut stream = client
        .start_logical_replication(
            &slot,
            Lsn(0),
            &[("proto_version", "1"), ("publication_names", &pubs)],
        )
        .await
        .expect("START_REPLICATION");

    admin
        .batch_execute("BEGIN; INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c'); COMMIT;")
        .await
        .unwrap();

    let mut tags = Vec::new();
    let commit_end = loop {
        match stream_next(&mut stream).await {
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => {
                assert!(!data.is_empty());
                assert!(wal_start >= created.consistent_point || wal_start == Lsn(0));
                tags.push(data[0] as char);
                if data[0] == b'C' {
                    break commit_end_lsn(&data);
                }
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                if reply_requested {
                    stream
                        .send_status(wal_end, Lsn(0), Lsn(0), false)
                        .await
                        .unwrap();
                }
            }
        }
    };
    assert_eq!(tags, ['B', 'R', 'I', 'I', 'I', 'C']);
    assert!(commit_end > created.consistent_point);

    // confirming the commit's end moves the slot
    assert_ne!(confirmed_flush(&admin, &slot).await, Some(commit_end));
    stream
        .send_status(commit_end, commit_end, commit_end, false)
        .await
        .expect("status update");
    let deadline = Instant::now() + WAIT;
    loop {
        let flushed = confirmed_flush(&admin, &slot).await;
        if flushed == Some(commit_end) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stayed at {flushed:?}, want {commit_end}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // asking for a reply gets a keepalive back, which we answer
    stream
        .send_status(commit_end, commit_end, commit_end, true)
        .await
        .unwrap();
    let keepalive_end = loop {
        if let ReplicationMessage::Keepalive { wal_end, .. } = stream_next(&mut stream).await {
            break wal_end;
        }
    };
    assert!(
        keepalive_end >= commit_end,
        "{keepalive_end} < {commit_end}"
    );
    stream
        .send_status(commit_end, commit_end, commit_end, false)
        .await
        .unwrap();

    // split: a reader task and a status sender used from here at the same time
    let (mut reader, mut sender) = stream.split();
    let (saw_commit_tx, saw_commit_rx) = tokio::sync::oneshot::channel();
    let reader_task = tokio::spawn(async move {
        let mut tags = Vec::new();
        let mut saw_commit = Some(saw_commit_tx);
        let mut commit_end = Lsn(0);
        // None only comes after the server ends COPY in answer to finish()
        while let Some(msg) = next_within(&mut reader, WAIT).await {
            if let ReplicationMessage::XLogData { data, .. } = msg {
                tags.push(data[0] as char);
                if data[0] == b'C' {
                    commit_end = commit_end_lsn(&data);
                    if let Some(tx) = saw_commit.take() {
                        let _ = tx.send(commit_end);
                    }
                }
            }
        }
        (tags, commit_end)
    });
    // the sender works while the reader task is parked in next()
    sender
        .send_status(commit_end, commit_end, commit_end, false)
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO items VALUES (4, 'd')")
        .await
        .unwrap();
    let second_end = tokio::time::timeout(WAIT, saw_commit_rx)
        .await
        .unwrap()
        .unwrap();
    sender
        .send_status(second_end, second_end, second_end, false)
        .await
        .unwrap();
    sender.finish().await.expect("CopyDone");
    let (tags, _) = tokio::time::timeout(WAIT, reader_task)
        .await
        .unwrap()
        .unwrap();
    // the relation was already described in this session
    assert_eq!(tags, ['B', 'I', 'C']);
    assert!(
        sender
            .send_status(second_end, second_end, second_end, false)
            .await
            .is_err()
    );

    // the slot kept the confirmed position; drop it (waiting for release)
    let mut client = ReplicationClient::connect(&cfg).await.expect("reconnect");
    client.drop_slot(&slot, true).await.expect("drop slot");
    let gone = admin
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(gone.is_empty(), "slot {slot} still exists");
}
