//! `odoo-cdc run`: keeps a replication session to RabbitMQ alive.
//!
//! Every retryable failure (Postgres or broker connection lost, confirm timeout,
//! nack, returned message, slot held by another instance) ends the session; the
//! supervisor then waits with exponential backoff and jitter and starts a new
//! one, which resumes from the slot's `confirmed_flush_lsn`. Nothing is carried
//! over between sessions, so nothing unconfirmed can be skipped. Fatal
//! conditions (bad credentials, missing or invalidated slot, a value that cannot
//! be encoded) stop the process with exit code 1 and a message saying what to do.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::config::{QueueType as CfgQueueType, Settings, Unroutable};
use crate::metrics::Metrics;
use crate::pipeline::{PipelineError, Stopped, run_session};
use crate::sink::rabbitmq::{QueueSpec, QueueType, RabbitConfig, RabbitSink, UnroutablePolicy};

/// Exponential backoff with full jitter, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: random in [ceiling/2, ceiling], ceiling = base·2^attempt capped.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter = rand::random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The broker settings of a run; `None` without `--amqp`.
pub fn rabbit_config(settings: &Settings) -> Option<Result<RabbitConfig, String>> {
    let amqp = settings.amqp.as_ref()?;
    let mut cfg = match RabbitConfig::new(amqp.expose()) {
        Ok(c) => c,
        Err(e) => return Some(Err(e.to_string())),
    };
    cfg.exchange = settings.exchange.clone();
    cfg.declare_exchange = settings.declare_exchange;
    cfg.queue = settings.queue.as_ref().map(|name| QueueSpec {
        name: name.clone(),
        queue_type: match settings.queue_type {
            CfgQueueType::Classic => QueueType::Classic,
            CfgQueueType::Quorum => QueueType::Quorum,
            CfgQueueType::Stream => QueueType::Stream,
        },
        binding_keys: settings.queue_bindings.clone(),
    });
    cfg.confirm_timeout = settings.confirm_timeout;
    cfg.unroutable = match settings.unroutable {
        Unroutable::Fail => UnroutablePolicy::Fail,
        Unroutable::Drop => UnroutablePolicy::Drop,
    };
    Some(Ok(cfg))
}

/// Runs sessions until shutdown (exit 0) or a fatal error (exit 1).
pub async fn run<F>(settings: Settings, shutdown: F) -> ExitCode
where
    F: std::future::Future<Output = ()>,
{
    let metrics = Arc::new(Metrics::new());
    match supervise(&settings, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopping: not retryable");
            ExitCode::from(1)
        }
    }
}

/// The supervision loop, usable in-process by tests.
pub async fn supervise<F>(
    settings: &Settings,
    metrics: Arc<Metrics>,
    shutdown: F,
) -> Result<(), PipelineError>
where
    F: std::future::Future<Output = ()>,
{
    let rabbit = match rabbit_config(settings) {
        None => return Err(PipelineError::Internal("run needs --amqp".into())),
        Some(Err(e)) => return Err(PipelineError::Internal(format!("invalid --amqp: {e}"))),
        Some(Ok(r)) => r,
    };
    let session = settings.session();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx_outer = stop_rx.clone();
    tokio::pin!(shutdown);
    let sessions = async {
        loop {
            let mut stop = stop_rx.clone();
            let result = async {
                let sink = RabbitSink::connect(rabbit.clone()).await?;
                metrics.sink_up.store(1, Ordering::Relaxed);
                metrics.streaming.store(1, Ordering::Relaxed);
                metrics.circuit_open.store(0, Ordering::Relaxed);
                let r = run_session(
                    &session,
                    sink,
                    crate::describer::for_session(&session).await?,
                    metrics.clone(),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
                metrics.streaming.store(0, Ordering::Relaxed);
                metrics.sink_up.store(0, Ordering::Relaxed);
                r
            }
            .await;
            match result {
                Ok(Stopped::Shutdown { confirmed }) => {
                    tracing::info!(confirmed = %confirmed, "stopped cleanly");
                    return Ok(());
                }
                Err(e) if e.is_retryable() && !*stop_rx.borrow() => {
                    let delay = backoff.next_delay();
                    metrics.reconnect(cause_of(&e));
                    metrics.circuit_open.store(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "session failed; resuming from the slot's confirmed LSN");
                    let mut stop = stop_rx.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                }
                Err(e) if *stop_rx.borrow() => {
                    tracing::warn!(error = %e, "session ended with an error during shutdown");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    };
    tokio::pin!(sessions);
    tokio::select! {
        r = &mut sessions => r,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            drop(stop_rx_outer);
            sessions.await
        }
    }
}

fn cause_of(e: &PipelineError) -> &'static str {
    match e {
        PipelineError::Replication(_) => "postgres",
        PipelineError::Slot(_) => "slot",
        PipelineError::Sink(_) => "broker",
        PipelineError::StreamEnded => "stream_ended",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut prev_ceiling = Duration::ZERO;
        for attempt in 0..10u32 {
            let d = b.next_delay();
            let ceiling =
                (Duration::from_millis(100) * 2u32.pow(attempt)).min(Duration::from_secs(2));
            assert!(
                d >= ceiling / 2 && d <= ceiling + Duration::from_millis(1),
                "{d:?} vs {ceiling:?}"
            );
            assert!(ceiling >= prev_ceiling);
            prev_ceiling = ceiling;
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(101));
    }
}
