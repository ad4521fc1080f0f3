//! Keeps replication sessions alive: the one place that decides, for `run` and
//! `tail` alike, whether a failure is retried or stops the process.
//!
//! Every retryable failure (Postgres or broker connection lost, walsender
//! silent, confirm timeout, nack, returned message, slot held by another
//! instance) ends the session; the supervisor waits with exponential backoff
//! and full jitter and starts a new one, which resumes from the slot's
//! `confirmed_flush_lsn`. Nothing is carried over between sessions, so nothing
//! unconfirmed can be skipped. A session that streamed for a while before
//! failing resets the backoff: a broker restart once a day should not wait as
//! long as the tenth failure in a row.
//!
//! The state is a circuit breaker visible in logs and in
//! `odoo_cdc_circuit_state`: `connecting` (half-open: trying a session),
//! `streaming` (closed), `backing_off` (open), `failed` (fatal, the process
//! exits with [`SessionError::exit_code`]), `stopped` (shutdown).
//!
//! Fatal conditions (bad credentials, missing/dropped/invalidated slot, missing
//! publication, configuration, a value that cannot be encoded under
//! `--on-decode-error=fail`) are decided by [`SessionError::is_retryable`].
//! After the first session, the slot and publication are never created again:
//! a slot that disappears while we run means changes were lost, and silently
//! re-creating it would hide that.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{QueueType as CfgQueueType, Settings, Unroutable};
use crate::metrics::{CircuitState, Metrics};
use crate::retention::RetentionConfig;
use crate::session::{SessionError, Stopped, run_session};
use crate::sink::rabbitmq::{QueueSpec, QueueType, RabbitConfig, RabbitSink, UnroutablePolicy};
use crate::sink::stdout::StdoutSink;
use crate::sink::stream::{StreamConfig, StreamSink};
use crate::sink::{Sink, SinkError};
use crate::slot::SlotError;

/// A session that streamed at least this long counts as healthy: its failure
/// starts the backoff from the beginning again.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(30);

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

/// The stream sink's settings; `None` without `--stream-url`.
pub fn stream_config(settings: &Settings) -> Option<Result<StreamConfig, String>> {
    let url = settings.stream_url.as_ref()?;
    let cfg = StreamConfig::new(url.expose(), &settings.stream, &settings.stream_producer)
        .and_then(|c| c.with_partitions(settings.stream_partitions))
        .and_then(|c| match (&settings.amqp, c.partitions) {
            (Some(amqp), 1..) => c.with_amqp_url(amqp.expose()),
            _ => Ok(c),
        })
        .map(|mut c| {
            c.declare = settings.declare_exchange;
            c.confirm_timeout = settings.confirm_timeout;
            c
        });
    Some(cfg)
}

/// The broker a run publishes to, chosen from the settings.
enum SinkChoice {
    Amqp(RabbitConfig),
    Stream(StreamConfig),
}

/// The one place a sink is chosen: `--stream-url` (stream protocol) or
/// `--amqp` (AMQP 0-9-1). A new sink is a file under `sink/` implementing
/// [`Sink`], its options, and one arm here and in [`run`]; the session and
/// the publisher do not change.
fn choose_sink(settings: &Settings) -> Result<SinkChoice, String> {
    if let Some(cfg) = stream_config(settings) {
        return cfg
            .map(SinkChoice::Stream)
            .map_err(|e| format!("invalid --stream-url: {e}"));
    }
    match rabbit_config(settings) {
        Some(cfg) => cfg
            .map(SinkChoice::Amqp)
            .map_err(|e| format!("invalid --amqp: {e}")),
        None => Err("run needs --amqp (or --stream-url)".into()),
    }
}

/// `odoo-cdc run`: sessions to RabbitMQ until shutdown (exit 0) or a fatal
/// error (its exit code).
pub async fn run<F>(settings: Settings, shutdown: F) -> ExitCode
where
    F: std::future::Future<Output = ()>,
{
    let metrics = Arc::new(Metrics::new());
    match choose_sink(&settings) {
        Err(e) => {
            tracing::error!(error = %e, "cannot choose a sink");
            ExitCode::from(2)
        }
        Ok(SinkChoice::Stream(cfg)) => {
            let stats = Arc::clone(&cfg.stats);
            metrics.add_render_hook(Box::new(move |out| stats.render(out)));
            let connect = move || StreamSink::connect(cfg.clone());
            let work = supervise(&settings, metrics.clone(), connect, shutdown);
            with_endpoint(&settings, metrics.clone(), work).await
        }
        Ok(SinkChoice::Amqp(cfg)) => {
            let connect = move || RabbitSink::connect(cfg.clone());
            let work = supervise(&settings, metrics.clone(), connect, shutdown);
            with_endpoint(&settings, metrics.clone(), work).await
        }
    }
}

/// `odoo-cdc tail`: the same supervision with the stdout sink.
pub async fn tail<F>(settings: Settings, shutdown: F) -> ExitCode
where
    F: std::future::Future<Output = ()>,
{
    let metrics = Arc::new(Metrics::new());
    let connect = || async { Ok::<_, SinkError>(StdoutSink::stdout()) };
    with_endpoint(&settings, metrics.clone(), async {
        supervise(&settings, metrics, connect, shutdown).await
    })
    .await
}

/// Serves `--metrics-addr` (if set) while `work` runs, and maps its outcome to
/// an exit code.
async fn with_endpoint(
    settings: &Settings,
    metrics: Arc<Metrics>,
    work: impl std::future::Future<Output = Result<Stopped, SessionError>>,
) -> ExitCode {
    let server = match settings.metrics_addr {
        None => None,
        Some(addr) => match crate::metrics_server::bind(addr, metrics.clone()).await {
            Ok((_, serve)) => Some(tokio::spawn(serve)),
            Err(e) => {
                tracing::error!(addr = %addr, error = %e, "cannot serve --metrics-addr");
                return ExitCode::from(2);
            }
        },
    };
    let result = work.await;
    if let Some(s) = server {
        s.abort();
    }
    match result {
        Ok(Stopped::Shutdown { confirmed }) => {
            tracing::info!(confirmed = %confirmed, "stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = e.exit_code();
            tracing::error!(
                error = %e,
                exit_code = code,
                confirmed = %metrics.confirmed_lsn(),
                "stopping: this needs an operator, retrying cannot fix it (the slot stays at the confirmed LSN)"
            );
            ExitCode::from(code)
        }
    }
}

/// The supervision loop, usable in-process by tests: sessions with sinks from
/// `connect_sink`, until `shutdown` resolves (Ok) or a fatal error (Err).
pub async fn supervise<S, C, CF, F>(
    settings: &Settings,
    metrics: Arc<Metrics>,
    mut connect_sink: C,
    shutdown: F,
) -> Result<Stopped, SessionError>
where
    S: Sink + 'static,
    C: FnMut() -> CF,
    CF: std::future::Future<Output = Result<S, SinkError>>,
    F: std::future::Future<Output = ()>,
{
    let mut session = settings.session();
    let standby_retry = settings.standby_retry;
    let mut waiting_as_standby = false;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let guard = tokio::spawn(crate::retention::run(
        RetentionConfig {
            source: settings.source.clone(),
            slot: settings.slot.clone(),
            check_interval: settings.slot_check_interval,
            heartbeat_interval: settings.heartbeat_interval,
            max_retained: settings.max_retained_wal,
        },
        metrics.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let sessions = async {
        loop {
            set_state(&metrics, CircuitState::Connecting, backoff.attempts());
            let started = Instant::now();
            let sessions_before = metrics.sessions();
            let mut stop = stop_rx.clone();
            let result = async {
                // The table describer (filters, profile) reads the catalog first.
                let describer = crate::describer::for_session(&session).await?;
                let sink = connect_sink().await?;
                metrics.sink_up.store(1, Ordering::Relaxed);
                let r = run_session(&session, sink, describer, metrics.clone(), async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
                metrics.sink_up.store(0, Ordering::Relaxed);
                r
            }
            .await;
            if metrics.sessions() > sessions_before && !session.temporary_slot {
                // The slot and publication exist now; if they vanish later,
                // that is a loss to report, not something to paper over.
                session.create_slot = false;
                session.create_publication = false;
            }
            let stopping = *stop_rx.borrow();
            match result {
                Ok(stopped) => return Ok(stopped),
                Err(e) if stopping => {
                    tracing::warn!(error = %e, "the session ended with an error during shutdown");
                    return Ok(Stopped::Shutdown {
                        confirmed: metrics.confirmed_lsn(),
                    });
                }
                Err(e) if e.is_retryable() => {
                    if e.needs_streaming_off() && session.streaming {
                        // Off for the rest of this process: PostgreSQL then
                        // decodes each transaction whole and drops what its
                        // rolled-back savepoints wrote, messages included.
                        session.streaming = false;
                        tracing::warn!(error = %e, "streaming of large transactions turned off until restart: an application writes transactional logical messages inside savepoints it rolls back");
                    }
                    if started.elapsed() >= HEALTHY_SESSION {
                        backoff.reset();
                    }
                    let delay = crate::standby::retry_delay(&e, &mut backoff, standby_retry);
                    let cause = e.reconnect_cause();
                    metrics.reconnect(cause);
                    set_state(&metrics, CircuitState::BackingOff, backoff.attempts());
                    if crate::standby::slot_in_use(&e) {
                        crate::standby::log_wait(&e, &mut waiting_as_standby, delay);
                    } else if postgres_unreachable(&e) {
                        waiting_as_standby = false;
                        let source = &session.source;
                        tracing::warn!(
                            error = %e,
                            postgres = %format!("{}:{}", source.host, source.port),
                            user = %source.user,
                            database = %source.dbname,
                            slot = %session.slot,
                            slot_status = slot_status(&session, metrics.sessions() > 0),
                            failures_in_a_row = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot reach PostgreSQL at {}:{}; retrying with backoff (a sidecar may start before its database): check the host and port in --source if this goes on",
                            source.host,
                            source.port
                        );
                    } else {
                        waiting_as_standby = false;
                        tracing::warn!(
                            error = %e,
                            cause = cause.label(),
                            failures_in_a_row = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64,
                            "session failed; resuming from the slot's confirmed LSN"
                        );
                    }
                    let mut stop = stop_rx.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => {
                            return Ok(Stopped::Shutdown { confirmed: metrics.confirmed_lsn() });
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    };
    tokio::pin!(sessions);
    let result = tokio::select! {
        r = &mut sessions => r,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            sessions.await
        }
    };
    guard.abort();
    set_state(
        &metrics,
        if result.is_ok() {
            CircuitState::Stopped
        } else {
            CircuitState::Failed
        },
        0,
    );
    result
}

/// The source could not be reached at all (refused, unresolvable, timed out).
fn postgres_unreachable(e: &SessionError) -> bool {
    match e {
        SessionError::Replication(r) | SessionError::Slot(SlotError::Replication(r)) => {
            r.is_unreachable()
        }
        _ => false,
    }
}

/// What is known about the slot while the source is unreachable.
fn slot_status(session: &crate::session::config::SessionConfig, streamed: bool) -> &'static str {
    match (streamed, session.create_slot) {
        (true, _) => "exists (this process streamed from it)",
        (false, true) => "not checked yet (created on the first connection if missing)",
        (false, false) => "not checked yet (it must exist: pass --create-slot to create it)",
    }
}

fn set_state(metrics: &Metrics, state: CircuitState, failures: u32) {
    if metrics.set_circuit(state) && state != CircuitState::Streaming {
        tracing::info!(
            circuit = state.label(),
            failures_in_a_row = failures,
            "supervisor state"
        );
    }
}
