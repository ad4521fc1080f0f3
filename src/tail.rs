//! `odoo-cdc tail`: committed changes as JSON lines on stdout, no broker.
//!
//! The same pipeline as `run` with the stdout sink: a line is written and
//! flushed before the slot is told it may move past it, so killing `tail` at any
//! point loses nothing (the unacknowledged tail is printed again on restart,
//! with the same `message_id`s).

use std::sync::Arc;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::{PipelineError, Stopped, run_session};
use crate::sink::stdout::StdoutSink;
use crate::transaction::PlainTables;

/// Runs until `shutdown` resolves or the session fails.
pub async fn tail<F>(settings: &Settings, shutdown: F) -> Result<Stopped, PipelineError>
where
    F: std::future::Future<Output = ()>,
{
    let session = settings.session();
    let metrics = Arc::new(Metrics::new());
    run_session(
        &session,
        StdoutSink::stdout(),
        Box::new(PlainTables),
        metrics,
        shutdown,
    )
    .await
}
