//! The first hour of a new user and of an on-call operator (issue 16): the real
//! binary, and the real PostgreSQL and RabbitMQ where a condition needs them.
//! Usage mistakes must be refused before anything is created, a connector that
//! cannot reach its database must say where it looks and why it keeps trying,
//! logs must be plain text off a terminal, and a missing slot must give the
//! same message and exit code whichever command met it.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TestDb, amqp_url, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_odoo-cdc");

/// Runs the binary to its exit with `envs` (and no inherited ODOO_CDC_*).
fn odoo_cdc(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("ODOO_CDC_LOG", "warn,lapin=error");
    for (k, _) in std::env::vars() {
        if k.starts_with("ODOO_CDC_") && k != "ODOO_CDC_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // A regression that retries instead of exiting must fail, not hang.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run odoo-cdc");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "odoo-cdc {args:?} still running after 90 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A source nobody listens on.
fn unreachable_source(password: &str) -> (String, u16) {
    let port = common::cluster::free_port();
    (
        format!("postgres://odoo_cdc:{password}@127.0.0.1:{port}/odoo"),
        port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_create_temporary_is_refused_and_creates_nothing() {
    let db = TestDb::create("fh_slot_tmp").await;
    let out = odoo_cdc(
        &[
            "slot",
            "create",
            "--source",
            &db.url,
            "--slot",
            &db.name,
            "--temporary",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("created"));
    assert!(
        err.contains("--temporary") && err.contains("slot create") && err.contains("tail"),
        "{err}"
    );
    let slots = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            db.name
        ))
        .await;
    assert_eq!(slots, 0, "a slot was left behind");
    db.cleanup().await;
}

#[test]
fn run_temporary_is_refused_from_a_flag_and_from_the_environment() {
    let (source, _) = unreachable_source("pw");
    let amqp = amqp_url();
    let out = odoo_cdc(
        &["run", "--source", &source, "--amqp", &amqp, "--temporary"],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("from --temporary") && err.contains("odoo-cdc run"),
        "{err}"
    );

    let out = odoo_cdc(
        &["run", "--source", &source, "--amqp", &amqp],
        &[("ODOO_CDC_TEMPORARY", "true")],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("from ODOO_CDC_TEMPORARY"), "{err}");

    // `tail` keeps it, and offers it in its help; `run` no longer advertises it.
    let tail_help =
        String::from_utf8_lossy(&odoo_cdc(&["tail", "--help"], &[]).stdout).into_owned();
    assert!(tail_help.contains("--temporary"), "{tail_help}");
    let run_help = String::from_utf8_lossy(&odoo_cdc(&["run", "--help"], &[]).stdout).into_owned();
    assert!(!run_help.contains("--temporary"), "{run_help}");
}

/// Reads stderr lines of a running connector until `done` holds or `secs` pass,
/// then kills it. Returns everything read.
fn stderr_until(
    args: &[&str],
    envs: &[(&str, &str)],
    secs: u64,
    done: impl Fn(&str) -> bool,
) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("ODOO_CDC_LOG", "warn,lapin=error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn odoo-cdc");
    let (tx, rx) = std::sync::mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut all = String::new();
    while Instant::now() < deadline && !done(&all) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            all.push_str(&l);
            all.push('\n');
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    all
}

#[test]
fn an_unreachable_database_is_named_and_the_retry_explained_in_plain_text() {
    let (source, port) = unreachable_source("s3cret-pw");
    let amqp = amqp_url();
    let args = ["run", "--source", &source, "--amqp", &amqp, "--create-slot"];
    // stderr is a pipe here, as under systemd, docker or kubectl logs.
    let log = stderr_until(&args, &[], 30, |l| l.contains("sidecar"));
    let line = log
        .lines()
        .find(|l| l.contains("cannot reach PostgreSQL"))
        .unwrap_or_else(|| panic!("no 'cannot reach PostgreSQL' line in:\n{log}"));
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("sidecar"), "{line}");
    assert!(line.contains("slot_status"), "{line}");
    assert!(line.contains("created on the first connection"), "{line}");
    assert!(!log.contains("s3cret-pw"), "password in the logs:\n{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escapes written to a pipe:\n{log:?}"
    );
}

/// Runs the connector on a pseudo-terminal (util-linux `script`) for a few
/// seconds and returns what it wrote; `None` without `script`.
fn on_a_terminal(args: &[&str], no_color: Option<&str>) -> Option<String> {
    let mut line = String::from(BIN);
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &format!("timeout -s INT 4 {line}"), "/dev/null"])
        .env("ODOO_CDC_LOG", "warn,lapin=error")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let mut child = cmd.spawn().ok()?;
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    let _ = child.wait();
    Some(out)
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let (source, _) = unreachable_source("pw");
    let amqp = amqp_url();
    let args = ["run", "--source", &source, "--amqp", &amqp];
    let Some(coloured) = on_a_terminal(&args, None) else {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    };
    assert!(coloured.contains("cannot reach PostgreSQL"), "{coloured:?}");
    assert!(
        coloured.contains('\x1b'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(&args, Some("1")).unwrap();
    assert!(plain.contains("cannot reach PostgreSQL"), "{plain:?}");
    assert!(
        !plain.contains('\x1b'),
        "colour despite NO_COLOR: {plain:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_gets_the_same_message_and_exit_code_from_every_command() {
    let db = TestDb::create("fh_missing").await;
    db.exec("CREATE TABLE item (id int PRIMARY KEY)").await;
    db.exec(&format!("CREATE PUBLICATION {} FOR ALL TABLES", db.name))
        .await;
    let slot = unique_name("no_such_slot");
    let expected = format!(
        "replication slot \"{slot}\" does not exist in database \"{}\"",
        db.name
    );
    let common = ["--source", db.url.as_str(), "--slot", slot.as_str()];
    for action in ["drop", "status"] {
        let mut args = vec!["slot", action];
        args.extend(common);
        let out = odoo_cdc(&args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "slot {action}: {err}");
        assert!(err.contains(&expected), "slot {action}: {err}");
    }
    let amqp = amqp_url();
    let exchange = unique_name("ex");
    let mut args = vec![
        "run",
        "--amqp",
        &amqp,
        "--exchange",
        &exchange,
        "--publication",
        &db.name,
    ];
    args.extend(common);
    let out = odoo_cdc(&args, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "run: {err}");
    assert!(err.contains(&expected), "run: {err}");
    db.cleanup().await;
}

#[test]
fn flags_beat_the_environment_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("odoo-cdc.toml");
    std::fs::write(&file, "window = \"from-file\"\n").unwrap();
    let file = file.to_str().unwrap();
    let (source, _) = unreachable_source("pw");
    let amqp = amqp_url();
    let base = [
        "run", "--source", &source, "--amqp", &amqp, "--config", file,
    ];
    // Each layer holds an invalid window, so the error names the layer that won.
    let origin_of = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut args = base.to_vec();
        args.extend(extra);
        let out = odoo_cdc(&args, envs);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    };
    assert!(origin_of(&[], &[]).contains("from `window` in"));
    let env = [("ODOO_CDC_WINDOW", "from-env")];
    assert!(origin_of(&[], &env).contains("from ODOO_CDC_WINDOW"));
    assert!(origin_of(&["--window", "from-flag"], &env).contains("from --window"));
}

#[test]
fn run_help_groups_its_options_and_marks_required_and_repeatable_ones() {
    let out = odoo_cdc(&["run", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let headings = [
        "Source (PostgreSQL):",
        "Slot & publication:",
        "Broker (RabbitMQ):",
        "Selection:",
        "Snapshot:",
        "Delivery:",
        "Operations:",
    ];
    let mut at = 0;
    for h in headings {
        let i = help[at..]
            .find(h)
            .unwrap_or_else(|| panic!("no heading {h:?} (in this order) in:\n{help}"));
        at += i + h.len();
    }
    // An option's entry: its line and the next (clap moves a long help there).
    let lines: Vec<&str> = help.lines().collect();
    let line = |flag: &str| {
        let i = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{flag} ")))
            .unwrap_or_else(|| panic!("no {flag} in:\n{help}"));
        lines[i..(i + 2).min(lines.len())].join(" ")
    };
    assert!(line("--source").contains("(required)"), "{help}");
    assert!(line("--amqp").contains("(required"), "{help}");
    assert!(line("--include").contains("(repeatable)"), "{help}");
    assert!(!line("--slot").contains("(required)"), "{help}");
}

/// `scripts/test.sh` with a stand-in `cargo` on PATH: clippy fails, and of two
/// test binaries the first fails. Every step and binary must run
/// (`--no-fail-fast`), the summary line must be printed, and the script must
/// still fail.
#[test]
fn test_script_runs_every_binary_and_always_prints_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("cargo");
    std::fs::write(
        &fake,
        r#"#!/usr/bin/env bash
# clippy fails; `cargo test` with several targets reports one failing binary; the rest passes.
case "$*" in
  *--all-targets*--no-fail-fast*|*--no-fail-fast*--all-targets*)
    echo "test result: FAILED. 3 passed; 1 failed; 0 ignored"
    echo "error: test failed, to rerun pass \`--test a\`"
    echo "  process didn't exit successfully: target/debug/deps/a (exit status: 101)"
    echo "test result: ok. 5 passed; 0 failed; 0 ignored"
    exit 101 ;;
  test*--all-targets*)
    echo "test result: FAILED. 3 passed; 1 failed; 0 ignored"
    exit 101 ;;
  clippy*)
    echo "error: a lint"
    exit 101 ;;
  *) exit 0 ;;
esac
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    // A copy of the tree's scripts, so the run writes its logs elsewhere.
    let work = dir.path().join("tree");
    std::fs::create_dir_all(work.join("scripts")).unwrap();
    for f in ["test.sh", "services.sh"] {
        std::fs::copy(format!("{root}/scripts/{f}"), work.join("scripts").join(f)).unwrap();
    }
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(work.join("scripts/test.sh"))
        .env("PATH", path)
        .output()
        .expect("run scripts/test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a failing test must fail the script:\n{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert_eq!(last, "tests: 8 passed, 1 failed", "{stdout}");
    // A failed step that is not a test (a lint) is named, and stops nothing.
    assert!(
        stdout.contains("failed steps: cargo clippy cargo test"),
        "{stdout}"
    );
}

/// Whether `declare` (a passive declare) finds the object; a fresh channel
/// each time, since a failed passive declare closes the channel.
async fn broker_has(kind: &str, name: &str) -> bool {
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let (conn, ch) = common::amqp::channel().await;
    let found = if kind == "queue" {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.queue_declare(name.into(), opts, FieldTable::default())
            .await
            .is_ok()
    } else {
        let opts = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            opts,
            FieldTable::default(),
        )
        .await
        .is_ok()
    };
    let _ = conn.close(0, "done".into()).await;
    found
}

/// `scripts/demo.sh stop` removes what a demo leaves behind: its exchange and
/// queues, its slot, its database (with the publication) and its files. Under
/// a name of its own (DEMO_NAME), so a demo someone is running is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stop_removes_everything_the_demo_created() {
    let name = unique_name("fh_demo");
    let admin = common::connect(&common::pg_admin_url()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (creds, host) = common::pg_base();
    let db = common::connect(&format!("postgres://{creds}@{host}/{name}")).await;
    // Two statements: a slot cannot be created in a transaction that wrote.
    db.batch_execute(&format!("CREATE PUBLICATION {name} FOR ALL TABLES"))
        .await
        .unwrap();
    db.batch_execute(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
    ))
    .await
    .unwrap();
    drop(db);
    // The order service's queue and the connector's --queue, bound to the demo's exchange.
    for queue in [format!("{name}_orders"), format!("{name}_order_service")] {
        let c = common::amqp::consume(&name, &queue, "#").await;
        let _ = c.conn.close(0, "done".into()).await;
    }
    assert!(broker_has("queue", &format!("{name}_orders")).await);
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    std::fs::create_dir(&demo_dir).unwrap();
    for f in ["odoo-cdc.log", "orders.sqlite", "sample-events.jsonl"] {
        std::fs::write(demo_dir.join(f), "x").unwrap();
    }

    let out = Command::new("timeout")
        .args(["120", "bash"])
        .arg(format!("{}/scripts/demo.sh", env!("CARGO_MANIFEST_DIR")))
        .arg("stop")
        .env("DEMO_NAME", &name)
        .env("DEMO_DIR", &demo_dir)
        .output()
        .expect("run scripts/demo.sh stop");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");

    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1)
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "database or slot left: {log}");
    for queue in [format!("{name}_orders"), format!("{name}_order_service")] {
        assert!(
            !broker_has("queue", &queue).await,
            "queue {queue} left: {log}"
        );
    }
    assert!(!broker_has("exchange", &name).await, "exchange left: {log}");
    assert!(!demo_dir.exists(), "{} left: {log}", demo_dir.display());
}
