//! `deploy/`: the Prometheus alerting rules and the Grafana dashboard may only
//! use metric names (and label values) the connector really exports, as
//! `src/metrics.rs` renders them. A renamed metric fails here, not silently in
//! someone's monitoring. (`promtool check rules` checks the rules' syntax in
//! scripts/test.sh when promtool is installed.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use odoo_cdc::metrics::Metrics;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `/metrics` of a connector with every conditional family present, as
/// sample name -> the sample lines of that name.
fn exported() -> BTreeMap<String, Vec<String>> {
    let m = Metrics::new();
    m.set_slot_retention(1, Some(2), "reserved");
    m.snapshot_progress("public.sale_order", 1, 2);
    let text = m.render();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            out.entry(name.to_string()).or_default();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.entry(format!("{name}{suffix}")).or_default();
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            out.entry(name.to_string())
                .or_default()
                .push(line.to_string());
        }
    }
    out
}

/// The first `odoo_cdc_*` name in `text` and the text after it.
fn next_name(text: &str) -> Option<(&str, &str)> {
    let tail = &text[text.find("odoo_cdc_")?..];
    let end = tail
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(tail.len());
    Some(tail.split_at(end))
}

/// Every `odoo_cdc_*` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some((name, after)) = next_name(rest) {
        out.insert(name.to_string());
        rest = after;
    }
    out
}

/// `name{k="v", k=~"a|b"}` selectors in a PromQL expression: (name, label, values).
fn matchers(expr: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some((name, after)) = next_name(rest) {
        if let Some(body) = after.strip_prefix('{') {
            let close = body.find('}').expect("unclosed selector");
            for m in body[..close].split(',') {
                let m = m.trim();
                let (label, op_value) = match m.find(['=', '!']) {
                    Some(j) => (&m[..j], &m[j..]),
                    None => continue,
                };
                let (negated, value) = if let Some(v) = op_value.strip_prefix("=~") {
                    (false, v)
                } else if let Some(v) = op_value.strip_prefix('=') {
                    (false, v)
                } else {
                    (true, op_value)
                };
                let value = value.trim_matches('"');
                // Scrape labels and dashboard variables are not the connector's.
                if negated || matches!(label, "instance" | "job") || value.contains('$') {
                    continue;
                }
                let values = value.split('|').map(str::to_string).collect();
                out.push((name.to_string(), label.to_string(), values));
            }
        }
        rest = after;
    }
    out
}

/// The PromQL expressions of the rules file.
fn rule_exprs() -> Vec<String> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&read("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml is YAML");
    let mut out = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no expr"));
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name} has no summary"
            );
            out.push(expr.to_string());
        }
    }
    out
}

/// The PromQL expressions of the dashboard (panel targets and variables).
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/odoo-cdc.json")).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

fn check(file: &str, raw: &str, exprs: &[String]) {
    let exported = exported();
    let unknown: Vec<String> = names_in(raw)
        .into_iter()
        .filter(|n| !exported.contains_key(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metrics src/metrics.rs does not export: {unknown:?}"
    );
    for expr in exprs {
        for (name, label, values) in matchers(expr) {
            for v in values {
                let needle = format!("{label}=\"{v}\"");
                assert!(
                    exported[&name].iter().any(|l| l.contains(&needle)),
                    "{file}: {name} has no series with {needle} (in `{expr}`)"
                );
            }
        }
    }
}

#[test]
fn alert_rules_use_only_exported_metrics_and_label_values() {
    let exprs = rule_exprs();
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    // What issue 16 asked the rules to watch.
    for needed in [
        "odoo_cdc_slot_retained_wal_bytes",
        "odoo_cdc_ready",
        "odoo_cdc_circuit_state",
        "odoo_cdc_reconnects_total",
        "odoo_cdc_confirm_latency_seconds_bucket",
        "odoo_cdc_decode_errors_total",
        "odoo_cdc_snapshot_rows",
    ] {
        assert!(names.contains(needed), "no alert on {needed}");
    }
    check(
        "deploy/prometheus/alerts.yml",
        &read("deploy/prometheus/alerts.yml"),
        &exprs,
    );
}

#[test]
fn dashboard_uses_only_exported_metrics_and_label_values() {
    check(
        "deploy/grafana/odoo-cdc.json",
        &read("deploy/grafana/odoo-cdc.json"),
        &dashboard_exprs(),
    );
}

#[test]
fn the_checks_catch_a_wrong_name_and_a_wrong_label_value() {
    let exported = exported();
    assert!(!exported.contains_key("odoo_cdc_slot_retained_bytes"));
    assert_eq!(
        matchers(r#"odoo_cdc_circuit_state{instance=~"$instance", state="open"} == 1"#),
        [(
            "odoo_cdc_circuit_state".to_string(),
            "state".to_string(),
            vec!["open".to_string()]
        )]
    );
    assert!(
        !exported["odoo_cdc_circuit_state"]
            .iter()
            .any(|l| l.contains("state=\"open\""))
    );
}

/// The real Prometheus scrapes a running connector's `/metrics` and
/// evaluates the shipped rules: a connector whose broker is unreachable keeps
/// reconnecting, and `OdooCdcReconnectingRepeatedly` must fire.
#[test]
fn prometheus_fires_a_shipped_alert_against_a_running_connector() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: prometheus is not installed (scripts/services.sh up installs it)");
        return;
    }
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let pg = std::env::var("ODOO_CDC_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54329/postgres".into());
    let metrics_port = free_port();
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut connector = Command::new(env!("CARGO_BIN_EXE_odoo-cdc"))
        .args(["run", "--source", &pg, "--amqp", &dead_broker])
        .args([
            "--slot",
            "deploy_alert_never_created",
            "--snapshot",
            "never",
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .env("ODOO_CDC_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn odoo-cdc");

    let dir = std::env::temp_dir().join(format!("odoo_cdc_prometheus_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: odoo-cdc\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web_port = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn prometheus");

    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", web_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    };
    // Full-jitter backoff from 0.5 s: six reconnects take well under two
    // minutes; the deadline is generous for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last = String::new();
    let fired = loop {
        if let Some(body) = get("/api/v1/alerts") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let firing = v["data"]["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|a| {
                    a["labels"]["alertname"] == "OdooCdcReconnectingRepeatedly"
                        && a["state"] == "firing"
                })
            });
            if firing {
                break true;
            }
            last = body;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let _ = connector.kill();
    let _ = connector.wait();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        fired,
        "OdooCdcReconnectingRepeatedly never fired; last /api/v1/alerts: {last}"
    );
}
