//! `odoo-cdc tail`: committed changes as JSON lines on stdout, no broker.
//!
//! The same pipeline as `run` with the stdout sink: a line is written and
//! flushed before the slot is told it may move past it, so killing `tail` at any
//! point loses nothing (the unacknowledged tail is printed again on restart,
//! with the same `message_id`s). Retryable failures (server restart, the slot
//! still held by a killed predecessor's walsender) are retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::{PipelineError, Stopped, run_session};
use crate::sink::stdout::StdoutSink;
use crate::supervisor::Backoff;

/// Runs until `shutdown` resolves or a fatal error.
pub async fn tail<F>(settings: &Settings, shutdown: F) -> Result<Stopped, PipelineError>
where
    F: std::future::Future<Output = ()>,
{
    let session = settings.session();
    let metrics = Arc::new(Metrics::new());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let sessions = async {
        loop {
            let mut stop = stop_rx.clone();
            let r = async {
                run_session(
                    &session,
                    StdoutSink::stdout(),
                    crate::describer::for_session(&session).await?,
                    metrics.clone(),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await
            }
            .await;
            match r {
                Err(e) if e.is_retryable() && !*stop_rx.borrow() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "tail session failed; resuming from the slot");
                    let mut stop = stop_rx.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => {
                            return Ok(Stopped::Shutdown { confirmed: metrics.confirmed_lsn() });
                        }
                    }
                }
                other => return other,
            }
        }
    };
    tokio::pin!(sessions);
    tokio::select! {
        r = &mut sessions => r,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            sessions.await
        }
    }
}
