//! Layered configuration: command-line flags, then `ODOO_CDC_*` environment
//! variables, then a TOML file (`--config`), then defaults — flags win.
//!
//! Two phases, nothing opened before the second ends: every source is first
//! collected as raw text per option key ([`RawOptions`]), then parsed and
//! validated into [`Settings`]. Any error names the option key and where the
//! bad value came from (`--window`, `window` in the file, `ODOO_CDC_WINDOW`).
//! Secrets (URLs with passwords) are held in types whose Debug output hides them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::event::Format;
use crate::replication::PgConfig;
use crate::routing::Routing;
use crate::secret::{Secret, redact_url};
pub use crate::session::config::{Granularity, OnDecodeError, OnOversized};

mod options;
pub use options::{ConfigError, Kind, OPTIONS, Origin, RawOptions, RawValue};

/// The AMQP URL, whose Debug output hides the password.
#[derive(Clone)]
pub struct AmqpUrl(Secret);

impl AmqpUrl {
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    Fail,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
    Stream,
}

/// Validated settings shared by `tail` and `run`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: PgConfig,
    pub slot: String,
    pub publication: String,
    pub create_slot: bool,
    pub temporary: bool,
    pub create_publication: bool,
    pub granularity: Granularity,
    pub format: Format,
    pub routing: Routing,
    pub window: usize,
    pub max_events_per_message: usize,
    pub max_message_bytes: usize,
    pub on_oversized: OnOversized,
    pub max_buffered: usize,
    pub stream_memory: usize,
    pub spill_dir: Option<PathBuf>,
    pub status_interval: Duration,
    pub confirm_timeout: Duration,
    pub streaming: bool,
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub amqp: Option<AmqpUrl>,
    pub exchange: String,
    /// `--stream-url`: the stream sink instead of the AMQP one.
    pub stream_url: Option<AmqpUrl>,
    pub stream: String,
    pub stream_producer: String,
    /// `--stream-partitions`: 0 for one plain stream.
    pub stream_partitions: u16,
    pub declare_exchange: bool,
    pub queue: Option<String>,
    pub queue_type: QueueType,
    pub queue_bindings: Vec<String>,
    pub unroutable: Unroutable,
    pub shutdown_grace: Duration,
    pub replication_timeout: Duration,
    /// `None`: no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// `None`: no retention checks.
    pub slot_check_interval: Option<Duration>,
    pub max_retained_wal: u64,
    pub on_decode_error: OnDecodeError,
    /// How often a standby retries a slot another instance holds.
    pub standby_retry: Duration,
    pub selection: crate::filter::SelectionConfig,
    pub snapshot: crate::snapshot::SnapshotMode,
    pub snapshot_workers: usize,
    pub snapshot_chunk_rows: usize,
}

impl Settings {
    pub fn from_raw(raw: &RawOptions) -> Result<Self, ConfigError> {
        let source_text = raw.required("source")?;
        let source: PgConfig =
            source_text
                .parse()
                .map_err(|e: crate::replication::config::ConfigError| {
                    raw.invalid("source", e.to_string())
                })?;
        let slot = raw.string("slot").unwrap_or_else(|| "odoo_cdc".into());
        crate::replication::validate_slot_name(&slot)
            .map_err(|e| raw.invalid("slot", e.to_string()))?;
        let publication = raw
            .string("publication")
            .unwrap_or_else(|| "odoo_cdc".into());
        if publication.split(',').any(|p| p.trim().is_empty()) {
            return Err(raw.invalid("publication", "empty publication name"));
        }
        let prefix = raw
            .string("routing_prefix")
            .unwrap_or_else(|| source.dbname.clone());
        if prefix.is_empty() {
            return Err(raw.invalid("routing_prefix", "must not be empty"));
        }
        let template = raw.string("routing_template");
        if let Some(t) = &template {
            Routing::validate_template(t).map_err(|e| raw.invalid("routing_template", e))?;
        }
        let amqp = match raw.string("amqp") {
            None => None,
            Some(u) => {
                if !(u.starts_with("amqp://") || u.starts_with("amqps://")) {
                    return Err(raw.invalid(
                        "amqp",
                        format!(
                            "expected an amqp:// or amqps:// URL, got {}",
                            redact_url(&u)
                        ),
                    ));
                }
                crate::sink::rabbitmq::RabbitConfig::new(u.clone())
                    .map_err(|e| raw.invalid("amqp", e.to_string()))?;
                Some(AmqpUrl(Secret::from(u)))
            }
        };
        let stream_partitions: u16 = raw.number("stream_partitions", 0u16, 0)?;
        if stream_partitions > crate::sink::stream::partition::MAX_PARTITIONS {
            return Err(raw.invalid(
                "stream_partitions",
                format!(
                    "at most {} partitions",
                    crate::sink::stream::partition::MAX_PARTITIONS
                ),
            ));
        }
        let stream_url = match raw.string("stream_url") {
            None => None,
            // With partitions, --amqp only says where to declare the super
            // stream's exchange.
            Some(_) if amqp.is_some() && stream_partitions == 0 => {
                return Err(raw.invalid(
                    "stream_url",
                    "give either --amqp or --stream-url, not both (both only with --stream-partitions, where --amqp is used to declare the super stream's exchange)",
                ));
            }
            Some(u) => {
                crate::sink::stream::wire::Endpoint::parse(&u)
                    .map_err(|e| raw.invalid("stream_url", e))?;
                Some(AmqpUrl(Secret::from(u)))
            }
        };
        if stream_partitions > 0 && stream_url.is_none() {
            return Err(raw.invalid(
                "stream_partitions",
                "partitions are streams: give --stream-url too",
            ));
        }
        let stream_producer = raw
            .string("stream_producer")
            .unwrap_or_else(|| crate::sink::stream::default_producer(&slot));
        let stream = raw.string("stream").unwrap_or_else(|| "odoo.cdc".into());
        // Partition names add `-<i>`.
        let max_len = if stream_partitions > 0 { 251 } else { 255 };
        for (key, name) in [("stream", &stream), ("stream_producer", &stream_producer)] {
            if name.is_empty() || name.len() > max_len {
                return Err(raw.invalid(key, format!("must have 1 to {max_len} bytes")));
            }
        }
        let metrics_addr = match raw.string("metrics_addr") {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                raw.invalid(
                    "metrics_addr",
                    format!("expected HOST:PORT like 127.0.0.1:9187, got {a:?}"),
                )
            })?),
        };
        let queue_bindings = raw.list("queue_binding");
        let selection = selection_from_raw(raw, &publication)?;
        let secs_or_off = |key: &'static str, default: u64| -> Result<_, ConfigError> {
            let n = raw.number(key, default, 0u64)?;
            Ok((n > 0).then(|| Duration::from_secs(n)))
        };
        let format = raw.choice(
            "format",
            Format::Json,
            &[("json", Format::Json), ("protobuf", Format::Protobuf)],
        )?;
        let on_decode_error = raw.choice(
            "on_decode_error",
            OnDecodeError::Fail,
            &[
                ("fail", OnDecodeError::Fail),
                ("raw", OnDecodeError::Raw),
                ("dead-letter", OnDecodeError::DeadLetter),
                ("dead_letter", OnDecodeError::DeadLetter),
            ],
        )?;
        if on_decode_error == OnDecodeError::Raw && format != Format::Json {
            return Err(raw.invalid(
                "on_decode_error",
                "raw needs --format json (Protobuf fields are typed); use dead-letter",
            ));
        }
        let granularity = raw.choice(
            "granularity",
            Granularity::Row,
            &[
                ("row", Granularity::Row),
                ("transaction", Granularity::Transaction),
            ],
        )?;
        if stream_partitions > 0 && granularity == Granularity::Transaction {
            return Err(raw.invalid(
                "stream_partitions",
                "--stream-partitions needs --granularity row: a transaction message holds the changes of many rows, and partitions are chosen per row (see docs/streams.md, Partitions)",
            ));
        }
        let mut routing = Routing::new(prefix.clone(), template);
        routing.partition_keys = stream_partitions > 0;
        Ok(Settings {
            selection,
            shutdown_grace: Duration::from_secs(raw.number("shutdown_grace_secs", 30u64, 0)?),
            replication_timeout: Duration::from_secs(raw.number(
                "replication_timeout_secs",
                60u64,
                2,
            )?),
            heartbeat_interval: secs_or_off("heartbeat_interval_secs", 60)?,
            slot_check_interval: secs_or_off("slot_check_interval_secs", 60)?,
            max_retained_wal: raw.number("max_retained_wal_mb", 1024u64, 1)? * 1024 * 1024,
            on_decode_error,
            slot,
            publication,
            create_slot: raw.flag("create_slot")?,
            temporary: raw.flag("temporary")?,
            create_publication: raw.flag("create_publication")?,
            granularity,
            format,
            queue_bindings: if queue_bindings.is_empty() {
                vec![format!("{prefix}.#")]
            } else {
                queue_bindings
            },
            routing,
            window: raw.number("window", 2048usize, 1)?,
            max_events_per_message: raw.number("max_events_per_message", 1000usize, 1)?,
            max_message_bytes: raw.number("max_message_bytes", 16usize * 1024 * 1024, 4096)?,
            on_oversized: raw.choice(
                "on_oversized",
                OnOversized::Fail,
                &[
                    ("fail", OnOversized::Fail),
                    ("dead-letter", OnOversized::DeadLetter),
                    ("dead_letter", OnOversized::DeadLetter),
                ],
            )?,
            max_buffered: raw.number("max_buffered_mb", 64usize, 1)? * 1024 * 1024,
            stream_memory: raw.number("stream_memory_mb", 64usize, 1)? * 1024 * 1024,
            spill_dir: raw.string("spill_dir").map(PathBuf::from),
            status_interval: Duration::from_secs(raw.number("status_interval_secs", 10u64, 1)?),
            confirm_timeout: Duration::from_secs(raw.number("confirm_timeout_secs", 30u64, 1)?),
            streaming: !raw.flag("no_streaming")?,
            metrics_addr,
            log_format: raw.choice(
                "log_format",
                LogFormat::Text,
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            amqp,
            exchange: raw.string("exchange").unwrap_or_else(|| "odoo.cdc".into()),
            stream_url,
            stream,
            stream_producer,
            stream_partitions,
            declare_exchange: !raw.flag("no_declare")?,
            queue: raw.string("queue"),
            queue_type: raw.choice(
                "queue_type",
                QueueType::Quorum,
                &[
                    ("classic", QueueType::Classic),
                    ("quorum", QueueType::Quorum),
                    ("stream", QueueType::Stream),
                ],
            )?,
            unroutable: raw.choice(
                "unroutable",
                Unroutable::Fail,
                &[("fail", Unroutable::Fail), ("drop", Unroutable::Drop)],
            )?,
            standby_retry: Duration::from_secs(raw.number("standby_retry_secs", 5u64, 1)?),
            snapshot: raw.choice(
                "snapshot",
                crate::snapshot::SnapshotMode::Initial,
                crate::snapshot::SnapshotMode::CHOICES,
            )?,
            snapshot_workers: raw.number("snapshot_workers", 2usize, 1)?,
            snapshot_chunk_rows: raw.number("snapshot_chunk_rows", 4096usize, 1)?,
            source,
        })
    }

    /// The replication session's settings.
    pub fn session(&self) -> crate::session::config::SessionConfig {
        let mut s = crate::session::config::SessionConfig::new(
            self.source.clone(),
            self.slot.clone(),
            self.publication.clone(),
        );
        s.create_slot = self.create_slot;
        s.temporary_slot = self.temporary;
        // Create mode may create a missing publication (in the first session only:
        // the supervisor clears this once one streamed).
        s.create_publication = self.create_publication
            || self.selection.publication_mode == crate::filter::PublicationMode::Create;
        s.streaming = self.streaming;
        s.granularity = self.granularity;
        s.format = self.format;
        s.routing = self.routing.clone();
        s.window = self.window;
        s.stream_mem_budget = self.stream_memory;
        s.spill_dir = self.spill_dir.clone();
        s.status_interval = self.status_interval;
        s.max_events_per_message = self.max_events_per_message;
        s.max_message_bytes = self.max_message_bytes;
        s.on_oversized = self.on_oversized;
        s.channel_bytes = self.max_buffered;
        s.shutdown_grace = self.shutdown_grace;
        s.replication_timeout = self.replication_timeout;
        s.on_decode_error = self.on_decode_error;
        s.selection = self.selection.clone();
        if let Some(io) = &self.selection.insert_only_publication {
            // The slot streams both: pgoutput takes a list of publications.
            s.publication = format!("{},{io}", self.publication);
        }
        s.snapshot = self.snapshot;
        s.snapshot_workers = self.snapshot_workers;
        s.snapshot_chunk_rows = self.snapshot_chunk_rows;
        s
    }
}

/// The table/column selection options, validated.
fn selection_from_raw(
    raw: &RawOptions,
    publication: &str,
) -> Result<crate::filter::SelectionConfig, ConfigError> {
    use crate::filter::{ColumnGlob, Profile, PublicationMode, SelectionConfig, TableGlob};
    let tables = |key: &'static str| -> Result<Vec<TableGlob>, ConfigError> {
        raw.list(key)
            .iter()
            .map(|g| TableGlob::parse(g).map_err(|e| raw.invalid(key, e)))
            .collect()
    };
    let exclude_columns = raw
        .list("exclude_column")
        .iter()
        .map(|g| ColumnGlob::parse(g).map_err(|e| raw.invalid("exclude_column", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let publication_mode = raw.choice(
        "publication_mode",
        PublicationMode::Existing,
        &[
            ("create", PublicationMode::Create),
            ("existing", PublicationMode::Existing),
        ],
    )?;
    let names: Vec<&str> = publication.split(',').map(str::trim).collect();
    if publication_mode == PublicationMode::Create && names.len() > 1 {
        return Err(raw.invalid(
            "publication_mode",
            format!(
                "create manages exactly one publication, but --publication names {}",
                names.len()
            ),
        ));
    }
    let translation_lang = raw.string("translation_lang");
    if let Some(l) = &translation_lang
        && (l.is_empty()
            || l.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\''))
    {
        return Err(raw.invalid(
            "translation_lang",
            format!("expected a language code such as fr_FR, got {l:?}"),
        ));
    }
    Ok(SelectionConfig {
        include: tables("include")?,
        exclude: tables("exclude")?,
        exclude_columns,
        publication_mode,
        profile: raw.choice(
            "profile",
            Profile::Auto,
            &[
                ("odoo", Profile::Odoo),
                ("none", Profile::None),
                ("auto", Profile::Auto),
            ],
        )?,
        translation_lang,
        insert_only_publication: if raw.flag("insert_only_tables_without_key")? {
            Some(format!("{}_insert_only", names[0]))
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn raw(
        flags: Vec<(&'static str, &str)>,
        file: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<RawOptions, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        if let Some(f) = file {
            std::fs::write(&path, f).unwrap();
        }
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RawOptions::layered(
            flags
                .into_iter()
                .map(|(k, v)| (k, vec![v.to_string()]))
                .collect(),
            file.map(|_| path.as_path()),
            |k| env.get(k).cloned(),
        )
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let r = raw(
            vec![("slot", "from_flag")],
            Some("slot = \"from_file\"\nwindow = 10\nqueue = \"q_file\"\nsource = \"postgres://u@h/db\"\n"),
            &[
                ("ODOO_CDC_SLOT", "from_env"),
                ("ODOO_CDC_WINDOW", "20"),
                ("ODOO_CDC_EXCHANGE", "ex_env"),
            ],
        )
        .unwrap();
        let s = Settings::from_raw(&r).unwrap();
        assert_eq!(s.slot, "from_flag");
        assert_eq!(s.window, 20);
        assert_eq!(s.exchange, "ex_env");
        assert_eq!(s.queue.as_deref(), Some("q_file"));
        assert_eq!(s.confirm_timeout, Duration::from_secs(30));
        assert_eq!(s.routing.prefix, "db");
    }

    #[test]
    fn errors_name_the_key_and_origin() {
        let r = raw(
            vec![],
            None,
            &[
                ("ODOO_CDC_SOURCE", "postgres://u@h/db"),
                ("ODOO_CDC_WINDOW", "lots"),
            ],
        )
        .unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(
            e.contains("`window`") && e.contains("ODOO_CDC_WINDOW"),
            "{e}"
        );

        let r = raw(
            vec![("source", "postgres://u@h/db"), ("granularity", "txn")],
            None,
            &[],
        )
        .unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(
            e.contains("`granularity`")
                && e.contains("--granularity")
                && e.contains("row|transaction"),
            "{e}"
        );

        let e = raw(vec![], Some("windw = 3\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `windw`"), "{e}");

        let r = raw(vec![], None, &[]).unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(
            e.contains("`source`") && e.contains("ODOO_CDC_SOURCE"),
            "{e}"
        );

        let r = raw(
            vec![("source", "postgres://u@h/db"), ("slot", "Bad-Name")],
            None,
            &[],
        )
        .unwrap();
        assert!(
            Settings::from_raw(&r)
                .unwrap_err()
                .to_string()
                .contains("`slot`")
        );
    }

    #[test]
    fn selection_options() {
        use crate::filter::{Profile, PublicationMode};
        let r = raw(
            vec![
                ("source", "postgres://u@h/db"),
                ("create_publication", "true"),
                ("insert_only_tables_without_key", "true"),
                ("profile", "none"),
            ],
            Some("include = [\"public.sale_*\", \"res_partner\"]\nexclude_column = [\"res_partner.comment\"]\n"),
            &[("ODOO_CDC_EXCLUDE", "public.sale_order_line, *.mail_*")],
        )
        .unwrap();
        let s = Settings::from_raw(&r).unwrap();
        let sel = &s.selection;
        assert_eq!(sel.include.len(), 2);
        assert_eq!(sel.exclude.len(), 2);
        assert!(sel.column_excluded("public", "res_partner", "comment"));
        assert_eq!(sel.publication_mode, PublicationMode::Existing);
        assert_eq!(sel.profile, Profile::None);
        assert_eq!(
            sel.insert_only_publication.as_deref(),
            Some("odoo_cdc_insert_only")
        );
        assert_eq!(s.session().publication, "odoo_cdc,odoo_cdc_insert_only");

        let r = raw(vec![("source", "postgres://u@h/db")], None, &[]).unwrap();
        let s = Settings::from_raw(&r).unwrap();
        assert_eq!(s.selection.publication_mode, PublicationMode::Existing);
        assert_eq!(s.selection.profile, Profile::Auto);

        let r = raw(
            vec![
                ("source", "postgres://u@h/db"),
                ("publication", "a,b"),
                ("publication_mode", "create"),
            ],
            None,
            &[],
        )
        .unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(
            e.contains("`publication_mode`") && e.contains("exactly one"),
            "{e}"
        );
        let r = raw(
            vec![
                ("source", "postgres://u@h/db"),
                ("exclude_column", "nocolumn"),
            ],
            None,
            &[],
        )
        .unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(e.contains("`exclude_column`"), "{e}");
    }

    #[test]
    fn stream_options_select_the_stream_sink() {
        let url = "rabbitmq-stream://u:hunter2@h:5552/%2f";
        let r = raw(
            vec![("source", "postgres://u@h/db"), ("slot", "s1")],
            None,
            &[("ODOO_CDC_STREAM_URL", url)],
        )
        .unwrap();
        let s = Settings::from_raw(&r).unwrap();
        assert_eq!(s.stream_url.as_ref().map(AmqpUrl::expose), Some(url));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(
            (s.stream.as_str(), s.stream_producer.as_str()),
            ("odoo.cdc", "odoo-cdc-s1")
        );

        let both = raw(
            vec![("source", "postgres://u@h/db"), ("amqp", "amqp://h")],
            None,
            &[("ODOO_CDC_STREAM_URL", url)],
        )
        .unwrap();
        let e = Settings::from_raw(&both).unwrap_err().to_string();
        assert!(e.contains("either --amqp or --stream-url"), "{e}");

        let bad = raw(
            vec![("source", "postgres://u@h/db"), ("stream_url", "amqp://h")],
            None,
            &[],
        )
        .unwrap();
        let e = Settings::from_raw(&bad).unwrap_err().to_string();
        assert!(
            e.contains("`stream_url`") && e.contains("rabbitmq-stream://"),
            "{e}"
        );
    }

    #[test]
    fn stream_partitions_are_checked() {
        let url = "rabbitmq-stream://u:p@h:5552/%2f";
        let settings = |flags: Vec<(&'static str, &str)>| {
            let mut all = vec![("source", "postgres://u@h/db"), ("stream_url", url)];
            all.extend(flags);
            Settings::from_raw(&raw(all, None, &[]).unwrap())
        };
        let s = settings(vec![("stream_partitions", "4")]).unwrap();
        assert_eq!(s.stream_partitions, 4);
        assert!(s.routing.partition_keys);
        assert!(!settings(vec![]).unwrap().routing.partition_keys);

        let e = settings(vec![
            ("stream_partitions", "4"),
            ("granularity", "transaction"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`stream_partitions`") && e.contains("--granularity row"),
            "{e}"
        );
        let e = settings(vec![("stream_partitions", "129")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 128"), "{e}");
        // --amqp with --stream-url: only to declare a super stream's exchange.
        assert!(settings(vec![("stream_partitions", "2"), ("amqp", "amqp://h")]).is_ok());
        let e = settings(vec![("amqp", "amqp://h")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("either --amqp or --stream-url"), "{e}");
        let r = raw(
            vec![("source", "postgres://u@h/db"), ("stream_partitions", "2")],
            None,
            &[],
        )
        .unwrap();
        let e = Settings::from_raw(&r).unwrap_err().to_string();
        assert!(e.contains("--stream-url"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let u = AmqpUrl(Secret::from(
            "amqp://guest:hunter2@host:5672/%2f".to_string(),
        ));
        let shown = format!("{u:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("guest:***@host"));
    }
}
