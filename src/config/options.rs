//! The one list of options, and the raw layer under [`Settings`](super::Settings):
//! every source (flags, `ODOO_CDC_*` environment variables, the TOML file) is
//! collected as text per option key, layered, and handed on with where each
//! value came from, so that an error can name it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every option key, its kind, and its help text. The file keys and the
/// environment names (`ODOO_CDC_<KEY>`) derive from this list.
pub const OPTIONS: &[(&str, Kind, &str)] = &[
    (
        "source",
        Kind::Single,
        "PostgreSQL URL of Odoo's database (postgres://user:pass@host:port/db?sslmode=...)",
    ),
    (
        "slot",
        Kind::Single,
        "replication slot name [default: odoo_cdc]",
    ),
    (
        "publication",
        Kind::Single,
        "publication name(s), comma separated [default: odoo_cdc]",
    ),
    (
        "create_slot",
        Kind::Flag,
        "create the slot if it does not exist",
    ),
    (
        "temporary",
        Kind::Flag,
        "use a temporary slot (dropped when the connection ends; tail only)",
    ),
    (
        "create_publication",
        Kind::Flag,
        "create the publication with the selected tables if it does not exist (never FOR ALL TABLES)",
    ),
    (
        "amqp",
        Kind::Single,
        "RabbitMQ URL (amqp:// or amqps://, vhost as path); with --stream-url and --stream-partitions, only where the super stream's exchange is declared",
    ),
    (
        "exchange",
        Kind::Single,
        "topic exchange to publish to [default: odoo.cdc]",
    ),
    (
        "stream_url",
        Kind::Single,
        "instead of --amqp: append to a RabbitMQ stream, exactly once (rabbitmq-stream://user:pass@host:5552/vhost, or rabbitmq-stream+tls://...:5551/vhost[?cacertfile=ca.pem]; see docs/streams.md)",
    ),
    (
        "stream",
        Kind::Single,
        "with --stream-url: the stream's name [default: odoo.cdc]",
    ),
    (
        "stream_producer",
        Kind::Single,
        "with --stream-url: producer name the broker deduplicates by; one per slot [default: odoo-cdc-<slot>]",
    ),
    (
        "stream_partitions",
        Kind::Single,
        "with --stream-url: spread row events over N partition streams STREAM-0 to STREAM-(N-1), a super stream, by a hash of table and key (1 to 128; see docs/streams.md); its exchange STREAM is declared over AMQP (--amqp, else the stream URL's host on port 5672); 0 = one plain stream [default: 0]",
    ),
    (
        "no_declare",
        Kind::Flag,
        "do not declare the exchange (locked-down brokers)",
    ),
    (
        "queue",
        Kind::Single,
        "declare this durable queue and bind it to the exchange (quick start)",
    ),
    (
        "queue_type",
        Kind::Single,
        "type of --queue: classic|quorum|stream [default: quorum]",
    ),
    (
        "queue_binding",
        Kind::List,
        "binding key(s) for --queue [default: <prefix>.#]",
    ),
    (
        "routing_prefix",
        Kind::Single,
        "first routing key segment [default: the database name]",
    ),
    (
        "routing_template",
        Kind::Single,
        "routing key template with {prefix} {schema} {table} {op} {model} [default: {prefix}.{schema}.{table}.{op}]",
    ),
    (
        "granularity",
        Kind::Single,
        "row|transaction [default: row]",
    ),
    ("format", Kind::Single, "json|protobuf [default: json]"),
    (
        "unroutable",
        Kind::Single,
        "fail|drop: what to do with a message no queue is bound for [default: fail]",
    ),
    (
        "window",
        Kind::Single,
        "unconfirmed messages in flight [default: 2048]",
    ),
    (
        "max_events_per_message",
        Kind::Single,
        "transaction granularity: events per message part [default: 1000]",
    ),
    (
        "max_message_bytes",
        Kind::Single,
        "largest message body to publish; transaction parts are split below it, a single larger event follows --on-oversized; keep it at or under the broker's max_message_size [default: 16777216]",
    ),
    (
        "on_oversized",
        Kind::Single,
        "fail|dead-letter: an event whose message exceeds --max-message-bytes stops the connector (exit 6) or goes to <prefix>.dead_letter as an envelope naming table, key and LSN [default: fail]",
    ),
    (
        "max_buffered_mb",
        Kind::Single,
        "memory for changes read from the WAL but not yet published, MiB; when full, reading pauses and the backlog stays in the WAL [default: 64]",
    ),
    (
        "stream_memory_mb",
        Kind::Single,
        "memory for buffered streamed transactions before spilling to disk, MiB [default: 64]",
    ),
    (
        "spill_dir",
        Kind::Single,
        "directory for spill files [default: the system temp dir]",
    ),
    (
        "status_interval_secs",
        Kind::Single,
        "seconds between standby status updates [default: 10]",
    ),
    (
        "confirm_timeout_secs",
        Kind::Single,
        "seconds to wait for a broker confirm [default: 30]",
    ),
    (
        "no_streaming",
        Kind::Flag,
        "do not ask Postgres to stream in-progress transactions",
    ),
    (
        "metrics_addr",
        Kind::Single,
        "HOST:PORT serving /metrics, /healthz and /readyz",
    ),
    ("log_format", Kind::Single, "text|json [default: text]"),
    (
        "shutdown_grace_secs",
        Kind::Single,
        "on SIGTERM/SIGINT, seconds to wait for in-flight confirms [default: 30]",
    ),
    (
        "standby_retry_secs",
        Kind::Single,
        "while another instance holds the slot, retry every this many seconds (active/standby) [default: 5]",
    ),
    (
        "replication_timeout_secs",
        Kind::Single,
        "seconds of silence from the walsender (after a ping) before reconnecting [default: 60]",
    ),
    (
        "heartbeat_interval_secs",
        Kind::Single,
        "seconds between heartbeat messages that let an idle slot advance; 0 = off [default: 60]",
    ),
    (
        "slot_check_interval_secs",
        Kind::Single,
        "seconds between checks of the WAL the slot retains; 0 = off [default: 60]",
    ),
    (
        "max_retained_wal_mb",
        Kind::Single,
        "warn when the slot retains more WAL than this, MiB [default: 1024]",
    ),
    (
        "on_decode_error",
        Kind::Single,
        "fail|raw|dead-letter: a value or message that cannot be decoded [default: fail]",
    ),
    (
        "include",
        Kind::List,
        "capture only tables matching this SCHEMA.TABLE glob, e.g. public.sale_* [default: all tables]",
    ),
    (
        "exclude",
        Kind::List,
        "leave out tables matching this SCHEMA.TABLE glob",
    ),
    (
        "exclude_column",
        Kind::List,
        "leave this column out of every event: TABLE.COLUMN or SCHEMA.TABLE.COLUMN, globs allowed",
    ),
    (
        "publication_mode",
        Kind::Single,
        "create|existing: create or ALTER the publication to exactly the selected tables at every start, or use it as it is [default: existing]",
    ),
    (
        "insert_only_tables_without_key",
        Kind::Flag,
        "capture the inserts of selected tables without a usable replica identity through a second publication <publication>_insert_only (publish = 'insert') instead of skipping them",
    ),
    (
        "profile",
        Kind::Single,
        "odoo|none: Odoo model names, many2many marks and default exclusions [default: odoo when the database has ir_model]",
    ),
    (
        "translation_lang",
        Kind::Single,
        "Odoo profile: flatten translated fields to this language (e.g. fr_FR, falling back to en_US) [default: keep the JSON object]",
    ),
    (
        "snapshot",
        Kind::Single,
        "initial|never|when_needed|initial_only: when to copy the tables' current rows as `r` events [default: initial, i.e. when the slot is created]",
    ),
    (
        "snapshot_workers",
        Kind::Single,
        "parallel connections reading tables in the initial snapshot [default: 2]",
    ),
    (
        "snapshot_chunk_rows",
        Kind::Single,
        "rows per chunk of an on-demand snapshot [default: 4096]",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Single,
    List,
    Flag,
}

/// Where a raw value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag,
    File(PathBuf),
    Env,
}

#[derive(Debug, Clone)]
pub struct RawValue {
    pub values: Vec<String>,
    pub origin: Origin,
}

/// Option key → raw text, after layering.
#[derive(Debug, Default, Clone)]
pub struct RawOptions {
    map: BTreeMap<&'static str, RawValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value for `{key}` ({origin}): {reason}")]
    Invalid {
        key: &'static str,
        origin: String,
        reason: String,
    },
    #[error(
        "missing required option `{key}` (flag --{flag}, env ODOO_CDC_{env}, or `{key}` in the config file)"
    )]
    Missing {
        key: &'static str,
        flag: String,
        env: String,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("`{key}` ({origin}) cannot be used with `odoo-cdc {command}`: {reason}")]
    NotFor {
        key: &'static str,
        origin: String,
        command: &'static str,
        reason: &'static str,
    },
}

pub(crate) fn origin_text(key: &str, o: &Origin) -> String {
    match o {
        Origin::Flag => format!("from --{}", key.replace('_', "-")),
        Origin::File(p) => format!("from `{key}` in {}", p.display()),
        Origin::Env => format!("from ODOO_CDC_{}", key.to_ascii_uppercase()),
    }
}

impl RawOptions {
    /// Layers the sources: flags over environment over file (over defaults).
    /// The environment beats the file so that a deployment (container,
    /// systemd unit) can override one key of a shared config file.
    pub fn layered(
        flags: Vec<(&'static str, Vec<String>)>,
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw = RawOptions::default();
        if let Some(path) = file {
            for (key, values) in read_file(path)? {
                raw.map.insert(
                    key,
                    RawValue {
                        values,
                        origin: Origin::File(path.to_path_buf()),
                    },
                );
            }
        }
        for (key, kind, _) in OPTIONS {
            let name = format!("ODOO_CDC_{}", key.to_ascii_uppercase());
            if let Some(v) = env(&name) {
                let values = match kind {
                    Kind::List => v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                    _ => vec![v],
                };
                raw.map.insert(
                    key,
                    RawValue {
                        values,
                        origin: Origin::Env,
                    },
                );
            }
        }
        for (key, values) in flags {
            raw.map.insert(
                key,
                RawValue {
                    values,
                    origin: Origin::Flag,
                },
            );
        }
        Ok(raw)
    }

    /// Refuses an option that was given (by any source) but makes no sense
    /// for `command`.
    pub fn not_for(
        &self,
        key: &'static str,
        command: &'static str,
        reason: &'static str,
    ) -> ConfigError {
        ConfigError::NotFor {
            key,
            origin: self.origin(key),
            command,
            reason,
        }
    }

    pub(crate) fn origin(&self, key: &'static str) -> String {
        self.map
            .get(key)
            .map(|r| origin_text(key, &r.origin))
            .unwrap_or_else(|| "default".into())
    }

    pub(crate) fn get(&self, key: &'static str) -> Option<(&str, &RawValue)> {
        self.map
            .get(key)
            .and_then(|r| r.values.first().map(|v| (v.as_str(), r)))
    }

    pub(crate) fn invalid(&self, key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key,
            origin: self.origin(key),
            reason: reason.into(),
        }
    }

    pub fn string(&self, key: &'static str) -> Option<String> {
        self.get(key).map(|(v, _)| v.to_string())
    }

    pub fn list(&self, key: &'static str) -> Vec<String> {
        self.map
            .get(key)
            .map(|r| r.values.clone())
            .unwrap_or_default()
    }

    pub fn required(&self, key: &'static str) -> Result<String, ConfigError> {
        self.string(key).ok_or_else(|| ConfigError::Missing {
            key,
            flag: key.replace('_', "-"),
            env: key.to_ascii_uppercase(),
        })
    }

    pub fn flag(&self, key: &'static str) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(false),
            Some((v, _)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                other => Err(self.invalid(key, format!("expected true or false, got {other:?}"))),
            },
        }
    }

    pub fn number<T>(&self, key: &'static str, default: T, min: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        match self.get(key) {
            None => Ok(default),
            Some((v, _)) => {
                let n: T = v
                    .trim()
                    .parse()
                    .map_err(|_| self.invalid(key, format!("expected a number, got {v:?}")))?;
                if n < min {
                    return Err(self.invalid(key, format!("must be at least {min}, got {n}")));
                }
                Ok(n)
            }
        }
    }

    pub fn choice<T: Copy>(
        &self,
        key: &'static str,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some((v, _)) => choices
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                    self.invalid(
                        key,
                        format!("expected one of {}, got {v:?}", names.join("|")),
                    )
                }),
        }
    }
}

/// Reads a TOML config file into raw option values; unknown keys are errors
/// (a typo must not silently fall back to a default).
fn read_file(path: &Path) -> Result<Vec<(&'static str, Vec<String>)>, ConfigError> {
    let err = |reason: String| ConfigError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    let mut out = Vec::new();
    for (k, v) in table {
        let Some((key, kind, _)) = OPTIONS
            .iter()
            .find(|(name, _, _)| *name == k.replace('-', "_"))
        else {
            return Err(err(format!("unknown key `{k}`")));
        };
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(err(format!(
                    "`{k}` must be a string, number or boolean, not {}",
                    other.type_str()
                ))),
            }
        };
        let values = match (kind, &v) {
            (Kind::List, toml::Value::Array(items)) => {
                items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
            }
            (_, v) => vec![scalar(v)?],
        };
        out.push((*key, values));
    }
    Ok(out)
}
