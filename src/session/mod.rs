//! One replication session, end to end: slot → events → sink → checkpoint →
//! standby status.
//!
//! A session runs four phases, each a function below:
//! 1. [`prepare`]: connect for replication, make the publication and the slot
//!    ready, find the LSN to start from;
//! 2. [`initial_snapshot`], when the slot was just created with an exported
//!    snapshot: copy the tables through the publisher and wait for every
//!    confirm;
//! 3. [`stream`]: read the slot until shutdown or a failure;
//! 4. [`shut_down`]: stop reading, let the publisher finish what it handed to
//!    the broker, send the final standby status.
//!
//! Three tasks run while streaming, each in its own file, joined by one small
//! type per relationship:
//! - the WAL **reader** ([`reader`]) decodes the stream and sends items down
//!   a bounded queue ([`crate::queue`]) to the publisher;
//! - the **publisher** ([`publisher`]) encodes, hands messages to the sink,
//!   feeds confirms to the checkpoint, and tells the reporter through
//!   [`status::Progress`]; the reader stops its intake through
//!   [`publisher::Intake`];
//! - the standby **status** reporter ([`status`]) owns the connection's write
//!   half; the reader asks it for pings and replies through
//!   [`status::Requests`].
//!
//! A session ends with an error on any failure ([`error`] says which are
//! retried); the supervisor reconnects and resumes from the slot's
//! `confirmed_flush_lsn`.

pub mod config;
mod dead_letter;
pub mod error;
mod parts;
mod publisher;
mod reader;
mod status;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use self::config::SessionConfig;
pub use self::error::{SessionError, exit_code};
use self::publisher::{Intake, Publisher};
use self::reader::Reader;
use self::status::{Progress, Requests};
use crate::lsn::Lsn;
use crate::metrics::{CircuitState, Metrics};
use crate::queue::{Item, ItemReceiver, ItemSender};
use crate::replication::{ReplicationClient, ReplicationError};
use crate::sink::Sink;
use crate::slot::{self, Export, Prepared};
use crate::snapshot::SnapshotMode;
use crate::transaction::TableDescriber;

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; everything confirmed was reported.
    Shutdown { confirmed: Lsn },
}

/// Runs one replication session until `shutdown` resolves or a failure.
///
/// On shutdown: reading stops at once, the publisher stops taking new items
/// and waits (up to `shutdown_grace`) for the confirms of what it already
/// handed to the broker, the final standby status reports the LSN those
/// confirms made safe, and the sink and the replication connection are closed.
/// What was read but not published is simply not acknowledged: the next start
/// resumes from the slot's `confirmed_flush_lsn` and sends it again.
pub async fn run_session<S, F>(
    cfg: &SessionConfig,
    sink: S,
    mut describer: Box<dyn TableDescriber>,
    metrics: Arc<Metrics>,
    shutdown: F,
) -> Result<Stopped, SessionError>
where
    S: Sink + 'static,
    F: std::future::Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let (mut client, prepared) = prepare(cfg).await?;
    let start = prepared.start;
    // The publisher runs from the start: an initial snapshot goes through it too.
    let (tx, rx) = crate::queue::channel(cfg.channel_capacity, cfg.channel_bytes);
    let mut publisher = PublisherTask::spawn(cfg, sink, start, metrics.clone(), rx);
    if let Some(export) = &prepared.export {
        let snapshot = tokio::select! {
            biased;
            // Shutdown mid-snapshot: the temporary slot goes with the
            // connection, so the next start snapshots again.
            _ = &mut shutdown => Ok(false),
            r = initial_snapshot(cfg, &mut client, export, describer.as_mut(), &tx, &metrics) => r,
        };
        match snapshot {
            Ok(true) => {}
            Ok(false) => {
                drop(tx);
                let published = publisher.finish(cfg.shutdown_grace).await;
                client.close().await;
                published?;
                return Ok(Stopped::Shutdown { confirmed: start });
            }
            Err(e) => {
                drop(tx);
                let published = publisher.finish(cfg.shutdown_grace).await;
                return Err(match (e, published) {
                    // The publisher's failure is the cause.
                    (
                        SessionError::Snapshot(crate::snapshot::SnapshotError::PublisherGone),
                        Err(p),
                    ) => p,
                    (e, _) => e,
                });
            }
        }
    }
    stream(
        cfg, client, start, describer, tx, publisher, metrics, shutdown,
    )
    .await
}

/// Phase 1: the replication connection, the publication and the slot.
async fn prepare(cfg: &SessionConfig) -> Result<(ReplicationClient, Prepared), SessionError> {
    let mut client = ReplicationClient::connect(&cfg.source).await?;
    // Publications first: a slot created before its publication cannot decode
    // the WAL in between.
    crate::publication::prepare(cfg).await?;
    let prepared = slot::prepare(&mut client, cfg).await?;
    Ok((client, prepared))
}

/// Phase 2: reads the tables inside the exported snapshot and waits until the
/// broker confirmed every row. Returns whether streaming follows (not after
/// `--snapshot initial-only`).
async fn initial_snapshot(
    cfg: &SessionConfig,
    client: &mut ReplicationClient,
    export: &Export,
    describer: &mut dyn TableDescriber,
    tx: &ItemSender,
    metrics: &Arc<Metrics>,
) -> Result<bool, SessionError> {
    let plan = crate::snapshot::initial::Plan {
        source: cfg.source.clone(),
        publications: cfg.publications(),
        snapshot_name: export.snapshot_name.clone(),
        consistent_point: export.consistent_point,
        workers: cfg.snapshot_workers,
        server_version: client.server_version_num(),
    };
    crate::snapshot::initial::run(&plan, describer, tx, metrics).await?;
    let (done, confirmed) = tokio::sync::oneshot::channel();
    tx.send(Item::Barrier(done))
        .await
        .map_err(|_| crate::snapshot::SnapshotError::PublisherGone)?;
    confirmed
        .await
        .map_err(|_| crate::snapshot::SnapshotError::PublisherGone)?;
    tracing::info!(consistent_point = %export.consistent_point, "initial snapshot confirmed by the sink");
    if cfg.snapshot == SnapshotMode::InitialOnly {
        return Ok(false);
    }
    slot::finish_snapshot(client, cfg, export).await?;
    Ok(true)
}

/// Phase 3: streams from the slot until shutdown or a failure, then shuts
/// down (phase 4).
#[allow(clippy::too_many_arguments)]
async fn stream<F>(
    cfg: &SessionConfig,
    mut client: ReplicationClient,
    start: Lsn,
    describer: Box<dyn TableDescriber>,
    tx: ItemSender,
    publisher: PublisherTask,
    metrics: Arc<Metrics>,
    shutdown: std::pin::Pin<&mut F>,
) -> Result<Stopped, SessionError>
where
    F: std::future::Future<Output = ()>,
{
    let version = client.server_version_num();
    tracing::info!(
        slot = %cfg.slot,
        publication = %cfg.publication,
        start = %start,
        server_version = version,
        "starting replication"
    );
    let options = start_options(cfg, version);
    let opts: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let period = status::period(&mut client, cfg.status_interval).await;
    let (wal, status_half) = client
        .start_logical_replication(&cfg.slot, start, &opts)
        .await?
        .split();
    let _streaming = StreamingFlag::set(&metrics, &cfg.slot, start);

    let requests = Arc::new(Requests::default());
    let mut status_task = status::spawn(
        status_half,
        publisher.progress.clone(),
        requests.clone(),
        period,
        metrics.clone(),
    );
    let mut reader = Reader::new(
        cfg,
        version,
        wal,
        describer,
        tx,
        requests.clone(),
        metrics.clone(),
    );
    let mut status_done = false;
    let ended = tokio::select! {
        biased;
        _ = shutdown => Ended::Shutdown,
        // Without status updates the walsender times us out and the slot
        // stops advancing: end the session at once instead.
        r = &mut status_task => {
            status_done = true;
            Ended::Failed(match r {
                // A failed status write is the replication connection
                // failing (a network cut shows here first when the reporter
                // writes before the reader reads): retryable as the same
                // error from the reader would be, not an internal error
                // that stops the connector.
                Ok(Err(e)) => SessionError::Replication(e),
                Ok(Ok(_)) => SessionError::Internal("the standby status task ended early".into()),
                Err(join) => SessionError::Internal(format!("the standby status task failed: {join}")),
            })
        }
        r = reader.run() => match r {
            Ok(()) => Ended::PublisherStopped,
            Err(e) => Ended::Failed(e),
        },
    };
    let tasks = Tasks {
        reader,
        publisher,
        requests,
        status_task,
        status_done,
    };
    shut_down(cfg, ended, tasks).await
}

/// The `START_REPLICATION` options for this server.
fn start_options(cfg: &SessionConfig, version: u32) -> Vec<(&'static str, String)> {
    let streaming = cfg.streaming && version >= 140000;
    let mut options = vec![(
        "proto_version",
        if streaming { "2" } else { "1" }.to_string(),
    )];
    let publications = cfg.publications();
    let names: Vec<&str> = publications.iter().map(String::as_str).collect();
    options.push((
        "publication_names",
        crate::replication::publication_names_value(&names),
    ));
    if version >= 140000 {
        options.push(("messages", "true".to_string()));
    }
    if streaming {
        options.push(("streaming", "on".to_string()));
    }
    options
}

/// Why reading stopped.
enum Ended {
    Shutdown,
    /// The publisher stopped (its error, if any, is the one to report).
    PublisherStopped,
    Failed(SessionError),
}

/// What runs while streaming, handed to the shutdown.
struct Tasks {
    reader: Reader,
    publisher: PublisherTask,
    requests: Arc<Requests>,
    status_task: JoinHandle<Result<Lsn, ReplicationError>>,
    /// The status task ended before the session did (the session then
    /// failed with its outcome).
    status_done: bool,
}

/// Phase 4: stops reading, waits for the publisher to finish what it handed to
/// the broker, sends the final standby status, and reports how it ended.
async fn shut_down(
    cfg: &SessionConfig,
    ended: Ended,
    mut tasks: Tasks,
) -> Result<Stopped, SessionError> {
    let shutting_down = matches!(ended, Ended::Shutdown);
    if !matches!(ended, Ended::PublisherStopped) {
        // Stop publishing what was read but not yet handed to the broker;
        // only in-flight confirms are awaited. (After a failed read the rest
        // would only be published to be replayed.)
        tasks.publisher.intake.stop();
        if shutting_down {
            tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: waiting for in-flight confirms");
        }
    }
    // The queue closes: the publisher sees the end of its intake. The WAL
    // stream stays open until the final status is out.
    let wal = tasks.reader.into_stream();
    let grace = if shutting_down {
        cfg.shutdown_grace
    } else {
        // A failed read: the publisher ends as soon as it sees the queue
        // close and its confirms settle (each bounded by the confirm timeout).
        cfg.shutdown_grace.max(Duration::from_secs(60))
    };
    let published = tasks.publisher.finish(grace).await;
    tasks.requests.finish();
    let status = if tasks.status_done {
        None
    } else {
        let r = tokio::time::timeout(Duration::from_secs(10), &mut tasks.status_task).await;
        if r.is_err() {
            tasks.status_task.abort();
        }
        Some(r)
    };
    drop(wal);
    if let Ended::Failed(e) = ended {
        return Err(e);
    }
    published?;
    let confirmed = match status {
        Some(Ok(Ok(Ok(lsn)))) => lsn,
        Some(Ok(Ok(Err(e)))) => return Err(e.into()),
        _ => tasks.publisher.progress.lsn(),
    };
    if cfg.temporary_slot {
        tracing::info!(slot = %cfg.slot, "temporary slot is dropped with the connection");
    }
    Ok(Stopped::Shutdown { confirmed })
}

/// The publisher task and what the session shares with it.
struct PublisherTask {
    handle: JoinHandle<Result<(), SessionError>>,
    progress: Arc<Progress>,
    intake: Arc<Intake>,
}

impl PublisherTask {
    fn spawn<S: Sink + 'static>(
        cfg: &SessionConfig,
        sink: S,
        start: Lsn,
        metrics: Arc<Metrics>,
        rx: ItemReceiver,
    ) -> Self {
        let progress = Arc::new(Progress::new(start));
        let intake = Arc::new(Intake::default());
        let handle = {
            let (cfg, progress, intake) = (cfg.clone(), progress.clone(), intake.clone());
            tokio::spawn(async move {
                let mut p = Publisher::new(&cfg, sink, start, progress, metrics);
                let r = p.run(rx, &intake).await;
                // Close the broker connection cleanly (bounded inside) once
                // every confirm is in; after a failure it is dropped instead.
                if r.is_ok()
                    && let Err(e) = p.sink.close().await
                {
                    tracing::debug!(error = %e, "closing the sink");
                }
                r
            })
        };
        PublisherTask {
            handle,
            progress,
            intake,
        }
    }

    /// Waits (up to `grace`) for the publisher to finish: its queue closed,
    /// every confirm of what it handed to the broker in.
    async fn finish(&mut self, grace: Duration) -> Result<(), SessionError> {
        match tokio::time::timeout(grace, &mut self.handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(SessionError::Internal(format!(
                "publisher task failed: {join}"
            ))),
            Err(_) => {
                self.handle.abort();
                tracing::warn!(grace = ?grace, "in-flight confirms did not settle within the grace period: they will be sent again on the next start");
                Ok(())
            }
        }
    }
}

/// The streaming gauge and circuit state, set while the session streams and
/// cleared however it ends.
struct StreamingFlag<'a>(&'a Metrics);

impl<'a> StreamingFlag<'a> {
    fn set(metrics: &'a Metrics, slot: &str, start: Lsn) -> Self {
        metrics.session_started();
        metrics.streaming.store(1, Ordering::Relaxed);
        metrics.set_confirmed_lsn(start);
        if metrics.set_circuit(CircuitState::Streaming) {
            tracing::info!(circuit = CircuitState::Streaming.label(), slot = %slot, "supervisor state");
        }
        StreamingFlag(metrics)
    }
}

impl Drop for StreamingFlag<'_> {
    fn drop(&mut self) {
        self.0.streaming.store(0, Ordering::Relaxed);
    }
}
