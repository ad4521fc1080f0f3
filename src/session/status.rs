//! The standby-status reporter: tells the walsender how far the slot may move.
//!
//! It owns the write half of the replication connection and sends the
//! checkpoint's LSN (flush = write = apply) on a timer, promptly (at most twice
//! a second) after the publisher made it advance, and at once when the server
//! asks for a reply or the reader wants to ping a silent walsender. Running
//! apart from the reader, it keeps the walsender from timing the session out
//! while the reader is held back by a slow broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::replication::{ReplicationClient, ReplicationError, StatusSender};

/// Publisher → reporter: the LSN the checkpoint made safe, and a wake-up when
/// it moves.
pub(crate) struct Progress {
    confirmed: AtomicU64,
    advanced: Notify,
}

impl Progress {
    pub(crate) fn new(start: Lsn) -> Self {
        Progress {
            confirmed: AtomicU64::new(start.0),
            advanced: Notify::new(),
        }
    }

    /// Records a new safe LSN and wakes the reporter.
    pub(crate) fn advance(&self, lsn: Lsn) {
        self.confirmed.store(lsn.0, Ordering::Release);
        self.advanced.notify_one();
    }

    pub(crate) fn lsn(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Acquire))
    }
}

/// Reader (and session) → reporter: out-of-turn updates.
#[derive(Default)]
pub(crate) struct Requests {
    reply_now: Notify,
    ping: Notify,
    finish: Notify,
}

impl Requests {
    /// The server asked for a reply (a keepalive with `reply_requested`).
    pub(crate) fn reply_now(&self) {
        self.reply_now.notify_one();
    }

    /// The walsender has been silent: send a status that asks for a reply.
    pub(crate) fn ping(&self) {
        self.ping.notify_one();
    }

    /// The session ends: send the final status and close the stream.
    pub(crate) fn finish(&self) {
        self.finish.notify_one();
    }
}

/// Starts the reporter. It ends after [`Requests::finish`] with the last LSN
/// it reported, or with the error of a failed write.
pub(crate) fn spawn(
    mut status: StatusSender,
    progress: Arc<Progress>,
    requests: Arc<Requests>,
    period: Duration,
    metrics: Arc<Metrics>,
) -> JoinHandle<Result<Lsn, ReplicationError>> {
    tokio::spawn(async move {
        let mut last_sent = Lsn(0);
        let mut last_time = Instant::now();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut finishing = false;
            let mut ask_reply = false;
            tokio::select! {
                _ = ticker.tick() => {}
                _ = requests.reply_now.notified() => {}
                _ = requests.ping.notified() => { ask_reply = true; }
                _ = progress.advanced.notified() => {
                    // Report progress promptly, but at most twice a second.
                    let since = last_time.elapsed();
                    if since < Duration::from_millis(500) {
                        tokio::time::sleep(Duration::from_millis(500) - since).await;
                    }
                }
                _ = requests.finish.notified() => { finishing = true; }
            }
            // Test builds only (`--features failpoints`): the reporter dies at
            // once, as on a bug or a failed write (tests/failpoints.rs).
            #[cfg(feature = "failpoints")]
            if std::env::var_os("ODOO_CDC_FAILPOINT_STATUS_TASK_DIES").is_some() {
                panic!("failpoint: the standby status task dies");
            }
            // Test builds only: the first status write of the process fails
            // as on a cut connection (broken pipe).
            #[cfg(feature = "failpoints")]
            if std::env::var_os("ODOO_CDC_FAILPOINT_STATUS_WRITE_FAILS_ONCE").is_some() {
                static FIRED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !FIRED.swap(true, Ordering::Relaxed) {
                    return Err(ReplicationError::io(
                        "sending a standby status update",
                        std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                    ));
                }
            }
            let lsn = progress.lsn();
            status.send_status(lsn, lsn, lsn, ask_reply).await?;
            metrics.set_confirmed_lsn(lsn);
            if lsn != last_sent {
                tracing::debug!(flush = %lsn, "reported flush LSN");
            }
            last_sent = lsn;
            last_time = Instant::now();
            if finishing {
                tracing::info!(flush = %lsn, "final standby status sent");
                let _ = status.finish().await;
                return Ok(last_sent);
            }
        }
    })
}

/// How often the standby status goes out: the configured interval, but at
/// most a third of the server's `wal_sender_timeout`. While the reader is held
/// back (a slow broker, a `tail` pipe nobody reads) it does not read the
/// walsender's keepalive requests, so only these periodic updates keep the
/// walsender from closing the connection as timed out.
pub(crate) async fn period(client: &mut ReplicationClient, configured: Duration) -> Duration {
    let timeout_ms = match client
        .simple_query("SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'")
        .await
    {
        Ok(rows) => rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse::<u64>().ok()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read wal_sender_timeout; using --status-interval-secs");
            None
        }
    };
    period_for(configured, timeout_ms)
}

fn period_for(configured: Duration, wal_sender_timeout_ms: Option<u64>) -> Duration {
    match wal_sender_timeout_ms {
        Some(ms) if ms > 0 => configured
            .min(Duration::from_millis(ms / 3))
            .max(Duration::from_millis(100)),
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_updates_go_out_well_within_wal_sender_timeout() {
        let ten = Duration::from_secs(10);
        assert_eq!(period_for(ten, Some(60_000)), ten);
        assert_eq!(period_for(ten, Some(5_000)), Duration::from_millis(1666));
        assert_eq!(period_for(ten, Some(0)), ten, "0 = no timeout");
        assert_eq!(period_for(ten, None), ten);
        assert_eq!(period_for(ten, Some(1)), Duration::from_millis(100));
    }
}
