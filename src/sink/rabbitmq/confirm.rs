//! Turning the broker's answer to one publish into the sink's verdict.
//!
//! Only a positive ack without a returned message is a delivery. lapin reports
//! a mandatory message that no queue took as `Confirmation::Ack(Some(returned))`
//! (RabbitMQ sends `basic.return` before the `basic.ack` for it); counting that
//! as success would lose the event silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::{Confirmation, ConnectionStatus, ErrorKind};
use tracing::warn;

use super::config::UnroutablePolicy;
use crate::sink::SinkError;

/// Counters shared by the sink and every confirm future in flight.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) confirmed: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) returned: AtomicU64,
    pub(crate) dropped_unroutable: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) failed: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkStats {
            published: get(&self.published),
            confirmed: get(&self.confirmed),
            nacked: get(&self.nacked),
            returned: get(&self.returned),
            dropped_unroutable: get(&self.dropped_unroutable),
            timed_out: get(&self.timed_out),
            failed: get(&self.failed),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of what the sink has done since it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinkStats {
    /// Messages handed to lapin (frames queued for the socket).
    pub published: u64,
    /// Positive confirms without a returned message: delivered.
    pub confirmed: u64,
    /// `basic.nack` from the broker.
    pub nacked: u64,
    /// Messages the broker returned as unroutable, whatever the policy.
    pub returned: u64,
    /// Returned messages treated as delivered under [`UnroutablePolicy::Drop`].
    pub dropped_unroutable: u64,
    /// Confirms that did not arrive within the confirm timeout.
    pub timed_out: u64,
    /// Confirms lost to a closed channel or connection.
    pub failed: u64,
}

/// What a confirm future needs to judge its outcome and name the message.
pub(crate) struct ConfirmCtx {
    pub(crate) message_id: String,
    pub(crate) routing_key: String,
    pub(crate) exchange: Arc<str>,
    pub(crate) policy: UnroutablePolicy,
    pub(crate) timeout: Duration,
    pub(crate) counters: Arc<Counters>,
    pub(crate) connection: ConnectionStatus,
}

impl ConfirmCtx {
    /// The verdict for one publish: `outcome` is `None` when the deadline
    /// passed first.
    pub(crate) fn settle(
        self,
        outcome: Option<lapin::Result<Confirmation>>,
    ) -> Result<(), SinkError> {
        let confirmation = match outcome {
            None => {
                Counters::bump(&self.counters.timed_out);
                let blocked = self.connection.blocked();
                warn!(
                    message_id = %self.message_id,
                    routing_key = %self.routing_key,
                    timeout_ms = self.timeout.as_millis() as u64,
                    connection_blocked = blocked,
                    "no publisher confirm within the timeout"
                );
                return Err(SinkError::ConfirmTimeout {
                    message_id: self.message_id,
                    timeout_ms: self.timeout.as_millis() as u64,
                });
            }
            Some(Err(error)) => {
                Counters::bump(&self.counters.failed);
                return Err(from_lapin("publish", &error));
            }
            Some(Ok(confirmation)) => confirmation,
        };
        match confirmation {
            Confirmation::Ack(None) => {
                Counters::bump(&self.counters.confirmed);
                Ok(())
            }
            Confirmation::Ack(Some(returned)) => self.unroutable(returned),
            Confirmation::Nack(returned) => {
                Counters::bump(&self.counters.nacked);
                if returned.is_some() {
                    Counters::bump(&self.counters.returned);
                }
                Err(SinkError::Nack {
                    message_id: self.message_id,
                    routing_key: self.routing_key,
                })
            }
            // Only possible if confirm mode were off, which connect() never allows;
            // without a confirm there is no proof of delivery.
            Confirmation::NotRequested => {
                Counters::bump(&self.counters.failed);
                Err(SinkError::Broker {
                    during: "basic.publish",
                    reason: "channel is not in confirm mode, so delivery cannot be proven".into(),
                })
            }
        }
    }

    fn unroutable(self, returned: BasicReturnMessage) -> Result<(), SinkError> {
        Counters::bump(&self.counters.returned);
        // lapin pairs a return with whichever pending confirm an ack completes
        // first, which within one `multiple` ack may be a neighbour of the
        // returned message. Naming the message from the return itself keeps the
        // report about the right event.
        let routing_key = returned.delivery.routing_key.as_str().to_owned();
        let message_id = returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map_or(self.message_id, |id| id.as_str().to_owned());
        let exchange = if returned.delivery.exchange.as_str().is_empty() {
            self.exchange.to_string()
        } else {
            returned.delivery.exchange.as_str().to_owned()
        };
        match self.policy {
            UnroutablePolicy::Fail => Err(SinkError::Unroutable {
                message_id,
                exchange,
                routing_key,
            }),
            UnroutablePolicy::Drop => {
                Counters::bump(&self.counters.dropped_unroutable);
                // Dropping is the operator's explicit choice and is counted in
                // the sink's stats; one log line per event would flood the log.
                tracing::debug!(
                    %message_id,
                    %exchange,
                    %routing_key,
                    reply_code = returned.reply_code,
                    reply_text = %returned.reply_text,
                    "dropping event: no queue is bound for its routing key (unroutable policy: drop)"
                );
                Ok(())
            }
        }
    }
}

/// Maps a lapin error on the publish path. Any AMQP error closes the channel or
/// the connection it happened on, so all of them mean "closed" for the caller.
pub(crate) fn from_lapin(during: &'static str, error: &lapin::Error) -> SinkError {
    match error.kind() {
        ErrorKind::SerialisationError(_) | ErrorKind::NoDefaultRuntime => SinkError::Broker {
            during,
            reason: error.to_string(),
        },
        _ => SinkError::closed(format!("{during}: {error}")),
    }
}
