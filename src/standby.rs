//! Active/standby: two instances pointed at one slot. PostgreSQL lets a single
//! walsender hold a replication slot, so the instance that gets it streams and
//! the other sees "slot in use" until the holder's connection ends. That is not
//! a failure to back off from: the standby polls at a fixed period
//! (`--standby-retry-secs`), so it takes over within that period once the
//! active instance is gone, and then resumes from the slot's confirmed LSN.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::metrics::ReconnectCause;
use crate::session::SessionError;

/// Whether `e` says another instance holds the slot: this instance is a standby.
/// The classification lives with the other reconnect causes in `session::error`.
pub fn slot_in_use(e: &SessionError) -> bool {
    e.reconnect_cause() == ReconnectCause::SlotInUse
}

/// How long to wait before the next session after the retryable failure `e`:
/// a standby polls the slot every `standby_retry` (and starts the backoff over,
/// since waiting for the slot is not a failure streak); anything else backs off.
pub fn retry_delay(e: &SessionError, backoff: &mut Backoff, standby_retry: Duration) -> Duration {
    if slot_in_use(e) {
        backoff.reset();
        return standby_retry;
    }
    backoff.next_delay()
}

/// Logs a standby's wait: once at info when it starts, then at debug on every
/// poll. Waiting for the slot is the standby working as intended, not a
/// failure to warn about every few seconds for as long as the active one runs.
pub fn log_wait(e: &SessionError, already_waiting: &mut bool, retry: Duration) {
    if *already_waiting {
        tracing::debug!(error = %e, "standby: the slot is still held");
    } else {
        tracing::info!(
            error = %e,
            retry_every_ms = retry.as_millis() as u64,
            "standby: another instance holds the slot; polling until it is released"
        );
        *already_waiting = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::SlotError;

    #[test]
    fn a_standby_polls_at_its_period_and_other_failures_back_off() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let in_use = SessionError::Slot(SlotError::InUse {
            slot: "s".into(),
            pid: "42".into(),
        });
        assert!(slot_in_use(&in_use));
        let other = SessionError::StreamEnded;
        assert!(!slot_in_use(&other));
        for _ in 0..8 {
            assert!(retry_delay(&other, &mut b, Duration::from_secs(2)) <= Duration::from_secs(30));
        }
        assert_eq!(
            retry_delay(&in_use, &mut b, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        // waiting for the slot started the backoff over
        assert!(retry_delay(&other, &mut b, Duration::from_secs(2)) <= Duration::from_secs(1));
    }
}
