//! Offline checks of `docker/` (no container engine runs in CI): the compose
//! file parses and is the stack the README describes, every `ODOO_CDC_*`
//! variable it sets is a real option whose value the connector accepts, and the
//! Dockerfile builds the binary the tests build, the same way.

use std::collections::BTreeSet;
use std::path::Path;

use odoo_cdc::config::{OPTIONS, RawOptions, Settings};
use yaml_rust2::{Yaml, YamlLoader};

/// Environment variables the binary reads that are not options.
const NON_OPTION_VARS: &[&str] = &["ODOO_CDC_LOG"];

const SERVICES: &[&str] = &["db", "odoo", "rabbitmq", "odoo-cdc", "order-consumer"];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn compose() -> Yaml {
    let text = read("docker/docker-compose.yml");
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("docker/docker-compose.yml is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

fn services(doc: &Yaml) -> Vec<(String, &Yaml)> {
    doc["services"]
        .as_hash()
        .expect("a `services` mapping")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().expect("service names are strings").to_string(),
                v,
            )
        })
        .collect()
}

/// `environment:` as a mapping or as a list of `KEY=value`.
fn environment(service: &Yaml) -> Vec<(String, String)> {
    let scalar = |v: &Yaml| match v {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("environment value {other:?} is not a scalar"),
    };
    match &service["environment"] {
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| (k.as_str().expect("variable name").to_string(), scalar(v)))
            .collect(),
        Yaml::Array(a) => a
            .iter()
            .map(|e| {
                let s = e.as_str().expect("KEY=value");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Yaml::BadValue => Vec::new(),
        other => panic!("environment must be a mapping or a list, got {other:?}"),
    }
}

fn strings(v: &Yaml) -> Vec<String> {
    match v {
        Yaml::Array(a) => a
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_is_the_documented_stack() {
    let doc = compose();
    let names: BTreeSet<String> = services(&doc).into_iter().map(|(n, _)| n).collect();
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    assert_eq!(names, expected, "services of docker/docker-compose.yml");

    let db = &doc["services"]["db"];
    assert!(
        db["image"].as_str().unwrap().starts_with("postgres:16"),
        "PostgreSQL 16"
    );
    assert!(
        strings(&db["command"])
            .iter()
            .any(|a| a == "wal_level=logical"),
        "db must start with -c wal_level=logical"
    );
    assert!(
        strings(&db["volumes"])
            .iter()
            .any(|v| v.starts_with("./initdb:/docker-entrypoint-initdb.d")),
        "db runs docker/initdb on first start"
    );
    let initdb = read("docker/initdb/10-odoo-cdc.sql");
    assert!(initdb.contains("REPLICATION") && initdb.contains("CREATE PUBLICATION odoo_cdc"));

    assert!(
        doc["services"]["odoo"]["image"]
            .as_str()
            .unwrap()
            .starts_with("odoo:17")
    );
    assert!(
        doc["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management"),
        "RabbitMQ with the management plugin"
    );

    // Both built services come from docker/Dockerfile, from stages that exist.
    let dockerfile = read("docker/Dockerfile");
    for (service, stage) in [
        ("odoo-cdc", "connector"),
        ("order-consumer", "order-consumer"),
    ] {
        let build = &doc["services"][service]["build"];
        assert_eq!(build["dockerfile"].as_str(), Some("docker/Dockerfile"));
        assert_eq!(build["context"].as_str(), Some(".."));
        assert_eq!(build["target"].as_str(), Some(stage));
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {stage}"))),
            "docker/Dockerfile has no stage {stage}"
        );
    }
    // The consumer never talks to PostgreSQL.
    let consumer = strings(&doc["services"]["order-consumer"]["command"]).join(" ");
    assert!(!consumer.contains("postgres"), "{consumer}");
}

#[test]
fn compose_sets_only_real_options_with_valid_values() {
    let doc = compose();
    let known: BTreeSet<String> = OPTIONS
        .iter()
        .map(|(k, _, _)| format!("ODOO_CDC_{}", k.to_ascii_uppercase()))
        .collect();
    let mut connector_env = Vec::new();
    for (name, service) in services(&doc) {
        for (var, value) in environment(service) {
            if !var.starts_with("ODOO_CDC_") {
                continue;
            }
            assert!(
                known.contains(&var) || NON_OPTION_VARS.contains(&var.as_str()),
                "service {name} sets {var}, which is not an odoo-cdc option (src/config.rs OPTIONS)"
            );
            if name == "odoo-cdc" {
                connector_env.push((var, value));
            }
        }
    }
    let has = |v: &str| connector_env.iter().any(|(k, _)| k == v);
    assert!(has("ODOO_CDC_SOURCE") && has("ODOO_CDC_AMQP"));
    assert!(
        has("ODOO_CDC_METRICS_ADDR"),
        "the HEALTHCHECK needs the metrics server"
    );

    // The values go through the connector's own parser, as in the container.
    let raw = RawOptions::layered(Vec::new(), None, |k| {
        connector_env
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    })
    .expect("layering the compose environment");
    let settings = Settings::from_raw(&raw)
        .unwrap_or_else(|e| panic!("the odoo-cdc service's environment is rejected: {e}"));
    assert!(settings.amqp.is_some());
    assert!(settings.metrics_addr.is_some());
}

#[test]
fn readme_documents_the_compose_services_and_variables() {
    let readme = read("README.md");
    let doc = compose();
    for (name, service) in services(&doc) {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not name the compose service `{name}`"
        );
        for (var, _) in environment(service) {
            if var.starts_with("ODOO_CDC_") {
                assert!(
                    readme.contains(&var),
                    "README.md does not mention {var}, set by service {name}"
                );
            }
        }
    }
    assert!(readme.contains("docker/docker-compose.yml"));
}

/// RUN instructions with their continuation lines joined.
fn run_instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if let Some(cur) = current.as_mut() {
            cur.push(' ');
            cur.push_str(trimmed.trim_end_matches('\\'));
        } else if let Some(rest) = trimmed.strip_prefix("RUN ") {
            current = Some(rest.trim_end_matches('\\').to_string());
        }
        if !trimmed.ends_with('\\')
            && let Some(cur) = current.take()
        {
            out.push(cur.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    out
}

#[test]
fn dockerfile_builds_the_tested_binary() {
    let dockerfile = read("docker/Dockerfile");
    let runs = run_instructions(&dockerfile);
    let builds: Vec<&str> = runs
        .iter()
        .flat_map(|r| r.split("&&"))
        // A command may follow RUN options such as `--mount=...`.
        .filter_map(|c| c.find("cargo build").map(|i| c[i..].trim()))
        .collect();
    assert!(
        builds.contains(&"cargo build --release --locked --bin odoo-cdc"),
        "the connector must be built as `cargo build --release --locked --bin odoo-cdc` \
         (default features, the lock file the tests use); found {builds:?}"
    );
    for b in &builds {
        for flag in [
            "--features",
            "--all-features",
            "--no-default-features",
            "-F ",
        ] {
            assert!(
                !b.contains(flag),
                "`{b}`: the image must use the default features, like the tests"
            );
        }
    }

    // Everything the manifest needs is in the build context copy.
    let copied: BTreeSet<String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"] {
        assert!(
            copied.contains(needed),
            "the build stage does not copy {needed}"
        );
    }
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    if manifest.get("bench").is_some() {
        assert!(
            copied.contains("benches"),
            "Cargo.toml declares [[bench]] targets: copy benches/"
        );
    }
    // Cargo loads every workspace member's manifest, whatever is built.
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for member in &members {
        let member = member.as_str().expect("workspace member path");
        assert!(
            copied.contains(member),
            "Cargo.toml's workspace member {member}/ is not copied"
        );
    }
    let ignore = read("docker/Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "keep target/ out of the build context"
    );

    // The build image's Rust is at least the toolchain running these tests.
    let arg = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=<major.minor>");
    let image = parse_minor(arg).expect("RUST_VERSION like 1.95");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .expect("run rustc --version");
    let version = String::from_utf8_lossy(&out.stdout);
    let local = version
        .split_whitespace()
        .nth(1)
        .and_then(parse_minor)
        .unwrap_or_else(|| panic!("cannot read {version:?}"));
    assert!(
        image >= local,
        "docker/Dockerfile builds with Rust {arg}, older than the {version} the tests use: bump RUST_VERSION"
    );

    // The runtime: the connector is the default (last) stage, not root, `run` by default,
    // and its health check asks the metrics server whether it is ready.
    let last_stage = dockerfile[dockerfile.rfind("\nFROM ").expect("stages")..].to_string();
    assert!(
        last_stage.contains("AS connector"),
        "the connector is the last stage"
    );
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the connector stage");
    assert!(user.trim() != "root" && user.trim() != "0", "USER {user}");
    assert!(last_stage.contains(r#"ENTRYPOINT ["/usr/local/bin/odoo-cdc", "run"]"#));
    let healthcheck: String = last_stage
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect();
    assert!(
        healthcheck.contains("/readyz") && healthcheck.contains("ODOO_CDC_METRICS_ADDR"),
        "{healthcheck}"
    );
    assert!(last_stage.contains("ODOO_CDC_METRICS_ADDR="));
}

fn parse_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim().split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}
