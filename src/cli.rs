//! The command line: `tail`, `run`, `check`, `slot`.
//!
//! Flags are generated from [`crate::config::OPTIONS`], the one list of option
//! keys, so a flag, its file key and its environment variable can never drift
//! apart. `main` parses, builds validated [`Settings`], and only then starts the
//! runtime.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{ConfigError, Kind, OPTIONS, RawOptions, Settings};

/// What the user asked for, validated.
#[derive(Debug)]
pub enum Invocation {
    Tail(Settings),
    Run(Settings),
    Check(Settings),
    Slot(SlotAction, Settings),
    /// `odoo-cdc snapshot TABLE...`: ask the running connector to re-snapshot tables.
    Snapshot(Vec<String>, Settings),
}

pub use crate::slot::SlotAction;

/// Options that make no sense for a subcommand are not offered there.
fn options_for(cmd: &str) -> Vec<&'static (&'static str, Kind, &'static str)> {
    let broker_only = [
        "amqp",
        "exchange",
        "stream_url",
        "stream",
        "stream_producer",
        "stream_partitions",
        "no_declare",
        "queue",
        "queue_type",
        "queue_binding",
        "routing_prefix",
        "routing_template",
        "unroutable",
        "confirm_timeout_secs",
        "max_events_per_message",
        "max_message_bytes",
        "on_oversized",
        "granularity",
        "window",
        "standby_retry_secs",
    ];
    OPTIONS
        .iter()
        .filter(|(k, _, _)| match cmd {
            "run" => true,
            "tail" => !broker_only.contains(k) || *k == "window",
            "check" => matches!(
                *k,
                "source"
                    | "stream_url"
                    | "stream"
                    | "stream_producer"
                    | "stream_partitions"
                    | "amqp"
                    | "no_declare"
                    | "slot"
                    | "publication"
                    | "log_format"
                    | "create_publication"
                    | "include"
                    | "exclude"
                    | "exclude_column"
                    | "publication_mode"
                    | "insert_only_tables_without_key"
                    | "profile"
            ),
            "slot" => matches!(
                *k,
                "source" | "slot" | "publication" | "log_format" | "temporary"
            ),
            "snapshot" => matches!(*k, "source" | "log_format"),
            _ => false,
        })
        .collect()
}

/// `--help` headings, in the order they are shown.
pub const HEADINGS: &[&str] = &[
    "Source (PostgreSQL)",
    "Slot & publication",
    "Broker (RabbitMQ)",
    "Selection",
    "Snapshot",
    "Delivery",
    "Operations",
];

/// The `--help` heading an option is listed under (one of [`HEADINGS`]).
pub fn heading(key: &str) -> &'static str {
    match key {
        "source" | "no_streaming" | "status_interval_secs" | "replication_timeout_secs" => {
            "Source (PostgreSQL)"
        }
        "slot"
        | "publication"
        | "create_slot"
        | "temporary"
        | "create_publication"
        | "publication_mode"
        | "insert_only_tables_without_key" => "Slot & publication",
        "amqp" | "exchange" | "no_declare" | "queue" | "queue_type" | "queue_binding"
        | "routing_prefix" | "routing_template" | "unroutable" | "stream_url" | "stream"
        | "stream_producer" | "stream_partitions" => "Broker (RabbitMQ)",
        "include" | "exclude" | "exclude_column" | "profile" | "translation_lang" => "Selection",
        "snapshot" | "snapshot_workers" | "snapshot_chunk_rows" => "Snapshot",
        "granularity"
        | "format"
        | "window"
        | "max_events_per_message"
        | "max_message_bytes"
        | "on_oversized"
        | "max_buffered_mb"
        | "confirm_timeout_secs"
        | "on_decode_error"
        | "stream_memory_mb"
        | "spill_dir" => "Delivery",
        _ => "Operations",
    }
}

/// Options a command cannot start without (from a flag, the environment or the file).
fn required_for(cmd: &str, key: &str) -> Option<&'static str> {
    match (cmd, key) {
        (_, "source") => Some("(required) "),
        // `run` needs a broker: one of the two (checked after parsing).
        ("run", "amqp") => Some("(required, or --stream-url) "),
        _ => None,
    }
}

/// Accepted only to be refused with a reason (see [`refuse_temporary`]), so
/// not offered in `--help`.
fn hidden_for(cmd: &str, key: &str) -> bool {
    key == "temporary" && cmd != "tail"
}

fn with_options(mut cmd: Command, name: &str) -> Command {
    // clap shows headings in the order their first option was added.
    let mut options = options_for(name);
    options.sort_by_key(|(key, _, _)| HEADINGS.iter().position(|h| *h == heading(key)));
    for (key, kind, help) in options {
        let long: &'static str = Box::leak(key.replace('_', "-").into_boxed_str());
        let env = format!("ODOO_CDC_{}", key.to_ascii_uppercase());
        let mut marks = String::new();
        if let Some(mark) = required_for(name, key) {
            marks.push_str(mark);
        }
        if *kind == Kind::List {
            marks.push_str("(repeatable) ");
        }
        let help = format!("{marks}{help}  [env: {env}]");
        let arg = Arg::new(*key)
            .long(long)
            .help(help)
            .help_heading(heading(key))
            .hide(hidden_for(name, key));
        let arg = match kind {
            Kind::Flag => arg.action(ArgAction::SetTrue),
            Kind::Single => arg.action(ArgAction::Set).value_name("VALUE"),
            Kind::List => arg.action(ArgAction::Append).value_name("VALUE"),
        };
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new("config")
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help_heading("Operations")
            .help("TOML file with option keys (flags win over ODOO_CDC_* variables, the variables over the file)"),
    )
}

/// A temporary slot is dropped when its connection ends. `tail` may use one (a
/// throwaway look at the stream); `run` reconnects after every failure and
/// would silently restart from "now", losing what happened in between; `slot
/// create` would print "created" for a slot that is gone when it exits.
fn refuse_temporary(
    raw: &RawOptions,
    settings: &Settings,
    command: &'static str,
) -> Result<(), ConfigError> {
    if !settings.temporary {
        return Ok(());
    }
    let reason = match command {
        "run" => {
            "a temporary slot is dropped at every reconnect, losing the changes in between; \
             `run` needs a permanent slot (--create-slot creates one). --temporary is for `tail` only"
        }
        _ => {
            "`slot create` makes a permanent slot (a temporary one would be dropped as soon as \
             this command exits); for a throwaway slot use `odoo-cdc tail --temporary`"
        }
    };
    Err(raw.not_for("temporary", command, reason))
}

pub fn command() -> Command {
    Command::new("odoo-cdc")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Change data capture from Odoo's PostgreSQL (logical replication, pgoutput) to RabbitMQ")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(with_options(
            Command::new("tail").about("Print committed changes as JSON lines on stdout (no broker)"),
            "tail",
        ))
        .subcommand(with_options(
            Command::new("run").about("Stream committed changes to RabbitMQ with publisher confirms"),
            "run",
        ))
        .subcommand(with_options(
            Command::new("check").about("Preflight report of the source database; exit 1 if a problem blocks going live"),
            "check",
        ))
        .subcommand(with_options(
            Command::new("slot")
                .about("Manage the replication slot")
                .arg(
                    Arg::new("action")
                        .required(true)
                        .value_parser(["create", "drop", "status"]),
                ),
            "slot",
        ))
        .subcommand(with_options(
            Command::new("snapshot")
                .about("Ask the running connector to re-snapshot tables while it keeps streaming (writes an odoo-cdc.signal message into the WAL)")
                .arg(
                    Arg::new("table")
                        .required(true)
                        .num_args(1..)
                        .value_name("SCHEMA.TABLE"),
                ),
            "snapshot",
        ))
}

fn flags_of(m: &ArgMatches, cmd: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for (key, kind, _) in options_for(cmd) {
        match kind {
            Kind::Flag => {
                if m.get_flag(key) {
                    out.push((*key, vec!["true".to_string()]));
                }
            }
            _ => {
                if let Some(vals) = m.get_many::<String>(key) {
                    out.push((*key, vals.cloned().collect()));
                }
            }
        }
    }
    out
}

/// Parses arguments and the environment into a validated invocation.
/// Usage errors come back as clap errors (exit 2), config errors as [`ConfigError`].
pub fn parse<I, T>(args: I) -> Result<Result<Invocation, ConfigError>, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let (name, sub) = matches.subcommand().ok_or_else(|| {
        command().error(
            clap::error::ErrorKind::MissingSubcommand,
            "a subcommand is required",
        )
    })?;
    let file = sub.get_one::<PathBuf>("config").cloned();
    let raw = match RawOptions::layered(flags_of(sub, name), file.as_deref(), |k| {
        std::env::var(k).ok()
    }) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let settings = match Settings::from_raw(&raw) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(match name {
        "tail" => Invocation::Tail(settings),
        "run" => {
            if let Err(e) = refuse_temporary(&raw, &settings, "run") {
                return Ok(Err(e));
            }
            if settings.amqp.is_none() && settings.stream_url.is_none() {
                return Ok(Err(ConfigError::Missing {
                    key: "amqp",
                    flag: "amqp".into(),
                    env: "AMQP".into(),
                }));
            }
            Invocation::Run(settings)
        }
        "check" => Invocation::Check(settings),
        "slot" => {
            let action = match sub.get_one::<String>("action").map(String::as_str) {
                Some("create") => SlotAction::Create,
                Some("drop") => SlotAction::Drop,
                _ => SlotAction::Status,
            };
            if action == SlotAction::Create
                && let Err(e) = refuse_temporary(&raw, &settings, "slot create")
            {
                return Ok(Err(e));
            }
            Invocation::Slot(action, settings)
        }
        "snapshot" => {
            let tables: Vec<String> = sub
                .get_many::<String>("table")
                .map(|v| v.cloned().collect())
                .unwrap_or_default();
            if let Some(bad) = tables
                .iter()
                .find(|t| crate::snapshot::catalog::parse_table_name(t).is_none())
            {
                return Err(command().error(
                    clap::error::ErrorKind::InvalidValue,
                    format!("{bad:?} is not a table name (schema.table)"),
                ));
            }
            Invocation::Snapshot(tables, settings)
        }
        other => {
            return Err(command().error(
                clap::error::ErrorKind::InvalidSubcommand,
                format!("unknown subcommand {other}"),
            ));
        }
    }))
}
