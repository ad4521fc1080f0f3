//! `odoo-cdc tail`: committed changes as JSON lines on stdout, no broker.
//!
//! The same session and supervision as `run` ([`crate::supervisor`]) with the
//! stdout sink: a line is written and flushed before the slot is told it may
//! move past it, so killing `tail` at any point loses nothing (the
//! unacknowledged tail is printed again on restart, with the same
//! `message_id`s). Retryable failures (server restart, the slot still held by a
//! killed predecessor's walsender) are retried with backoff; fatal ones exit
//! with the same codes as `run`.

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::session::{SessionError, Stopped};
use crate::sink::SinkError;
use crate::sink::stdout::StdoutSink;

/// Runs until `shutdown` resolves (exit 0) or a fatal error (its exit code).
pub async fn run<F>(settings: Settings, shutdown: F) -> ExitCode
where
    F: std::future::Future<Output = ()>,
{
    crate::supervisor::tail(settings, shutdown).await
}

/// In-process form for tests: the supervision loop with the stdout sink.
pub async fn tail<F>(settings: &Settings, shutdown: F) -> Result<Stopped, SessionError>
where
    F: std::future::Future<Output = ()>,
{
    let metrics = Arc::new(Metrics::new());
    let connect = || async { Ok::<_, SinkError>(StdoutSink::stdout()) };
    crate::supervisor::supervise(settings, metrics, connect, shutdown).await
}
