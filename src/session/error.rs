//! How a session fails, and what each failure means: retryable or fatal, the
//! process exit code, and the reconnect cause it is counted under. The one
//! place of the error policy.

use std::time::Duration;

use crate::event::EncodeError;
use crate::lsn::Lsn;
use crate::metrics::ReconnectCause;
use crate::replication::ReplicationError;
use crate::sink::SinkError;
use crate::slot::SlotError;
use crate::transaction::AssembleError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the replication stream ended: the server closed it (shutdown or slot taken over?)")]
    StreamEnded,
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(
        "the walsender sent nothing for {0:?}, not even an answer to a ping: the connection is dead or stalled"
    )]
    WalsenderSilent(Duration),
    #[error(
        "event {message_id} ({table}, key {key}, LSN {lsn}) needs a message of {size} bytes, over --max-message-bytes={limit}: raise the limit (and the broker's max_message_size) or run with --on-oversized=dead-letter"
    )]
    Oversized {
        message_id: String,
        table: String,
        key: String,
        lsn: Lsn,
        size: usize,
        limit: usize,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl SessionError {
    /// Whether reconnecting and resuming can help (the error policy in one place).
    pub fn is_retryable(&self) -> bool {
        match self {
            SessionError::Replication(e) => e.is_retryable(),
            SessionError::Slot(e) => e.is_retryable(),
            SessionError::Sink(e) => e.is_retryable(),
            SessionError::Snapshot(e) => e.is_retryable(),
            SessionError::StreamEnded | SessionError::WalsenderSilent(_) => true,
            // A spill file that cannot be written (a full disk, ENOSPC) is the
            // machine's state, not the data's: the session starts over from
            // the slot once space is back, and the error names the spill.
            SessionError::Assemble(AssembleError::Spill(crate::spill::SpillError::Io {
                ..
            })) => true,
            // Decoded again, whole, by a session without streaming.
            SessionError::Assemble(AssembleError::StreamedMessageAmbiguous { .. }) => true,
            // A value that cannot be encoded will fail again on replay.
            SessionError::Encode(_) | SessionError::Assemble(_) => false,
            // The same event would be refused again.
            SessionError::Oversized { .. } => false,
            SessionError::Internal(_) | SessionError::Config(_) => false,
        }
    }
}

/// Process exit codes (also in docs/operations.md and `main.rs`).
pub mod exit_code {
    /// Runtime failure that retrying cannot fix, not covered below.
    pub const RUNTIME: u8 = 1;
    /// Bad configuration or usage.
    pub const CONFIG: u8 = 2;
    /// The slot or publication is missing, was dropped or invalidated (or the
    /// slot uses another plugin): changes may have been lost on the server side.
    pub const SLOT_LOST: u8 = 3;
    /// Authentication failed (PostgreSQL or RabbitMQ credentials, TLS trust).
    pub const AUTH: u8 = 4;
    /// A value or pgoutput message could not be decoded (`--on-decode-error=fail`).
    pub const BAD_DATA: u8 = 5;
    /// An event too large to publish (`--on-oversized=fail`), or a message the
    /// broker refused for its size.
    pub const OVERSIZED: u8 = 6;
}

impl SessionError {
    /// The exit code for this error when it stops the process (fatal errors).
    pub fn exit_code(&self) -> u8 {
        use exit_code::*;
        match self {
            SessionError::Replication(e) | SessionError::Slot(SlotError::Replication(e)) => {
                replication_exit_code(e)
            }
            // A publication that cannot be made to match the selection (rights,
            // FOR ALL TABLES in create mode, --profile odoo without ir_model).
            SessionError::Slot(
                SlotError::InUse { .. } | SlotError::Unexpected { .. } | SlotError::Publication(_),
            ) => RUNTIME,
            SessionError::Slot(_) => SLOT_LOST,
            SessionError::Sink(SinkError::Connect { reason, .. })
                if reason.contains("ACCESS_REFUSED") =>
            {
                AUTH
            }
            SessionError::Encode(_) | SessionError::Assemble(_) => BAD_DATA,
            SessionError::Oversized { .. } | SessionError::Sink(SinkError::TooLarge { .. }) => {
                OVERSIZED
            }
            SessionError::Config(_) => CONFIG,
            _ => RUNTIME,
        }
    }

    /// Whether the next sessions must decode without streaming (see
    /// [`AssembleError::StreamedMessageAmbiguous`]).
    pub fn needs_streaming_off(&self) -> bool {
        matches!(
            self,
            SessionError::Assemble(AssembleError::StreamedMessageAmbiguous { .. })
        )
    }

    /// The label under which a retried failure is counted.
    pub fn reconnect_cause(&self) -> ReconnectCause {
        match self {
            SessionError::Slot(SlotError::InUse { .. }) => ReconnectCause::SlotInUse,
            SessionError::Replication(e) | SessionError::Slot(SlotError::Replication(e)) => {
                if e.sqlstate() == Some("55006") {
                    ReconnectCause::SlotInUse
                } else {
                    ReconnectCause::Postgres
                }
            }
            SessionError::WalsenderSilent(_) => ReconnectCause::ReplicationTimeout,
            SessionError::StreamEnded => ReconnectCause::StreamEnded,
            SessionError::Sink(_) => ReconnectCause::Rabbitmq,
            _ => ReconnectCause::Other,
        }
    }
}

fn replication_exit_code(e: &ReplicationError) -> u8 {
    use exit_code::*;
    match e {
        ReplicationError::Config(_)
        | ReplicationError::InvalidSlotName { .. }
        | ReplicationError::InvalidOption { .. }
        | ReplicationError::TlsConfig(_)
        | ReplicationError::TlsNotOffered { .. } => CONFIG,
        ReplicationError::Auth { .. }
        | ReplicationError::PasswordRequired { .. }
        | ReplicationError::TlsHandshake { .. } => AUTH,
        _ => match e.sqlstate() {
            // invalid_authorization_specification, invalid_password
            Some(code) if code.starts_with("28") => AUTH,
            // The slot or publication vanished under a running session:
            // "replication slot ... does not exist", "publication ... does not
            // exist", "can no longer get changes from replication slot".
            Some("42704") | Some("55000") if mentions_slot_or_publication(e) => SLOT_LOST,
            // Data exception while the walsender prepared a value for us
            // (e.g. 22021: bytes that are not UTF-8 in a SQL_ASCII database).
            Some(code) if code.starts_with("22") => BAD_DATA,
            _ => RUNTIME,
        },
    }
}

fn mentions_slot_or_publication(e: &ReplicationError) -> bool {
    let text = e.to_string();
    text.contains("replication slot") || text.contains("publication")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ServerError;

    /// A full disk under the spill directory is retried (the slot holds the
    /// data), not reported as bad data.
    #[test]
    fn a_spill_write_failure_is_retryable_and_named() {
        let e = SessionError::Assemble(AssembleError::Spill(crate::spill::SpillError::Io {
            xid: 42,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }));
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(text.contains("spill") && text.contains("42"), "{text}");
        let corrupt =
            SessionError::Assemble(AssembleError::Spill(crate::spill::SpillError::Corrupt {
                xid: 42,
            }));
        assert!(!corrupt.is_retryable());
    }

    fn server(code: &str, message: &str) -> SessionError {
        SessionError::Replication(ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }))
    }

    #[test]
    fn fatal_errors_map_to_their_exit_codes() {
        use exit_code::*;
        let slot = |e: SlotError| SessionError::Slot(e);
        assert_eq!(
            slot(SlotError::Missing {
                slot: "s".into(),
                db: "d".into()
            })
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            slot(SlotError::PublicationMissing {
                publication: "p".into(),
                db: "d".into()
            })
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            slot(SlotError::Invalidated { slot: "s".into() }).exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server("42704", "replication slot \"s\" does not exist").exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server(
                "55000",
                "can no longer get changes from replication slot \"s\""
            )
            .exit_code(),
            SLOT_LOST
        );
        assert_eq!(
            server("28P01", "password authentication failed").exit_code(),
            AUTH
        );
        assert_eq!(
            SessionError::Replication(ReplicationError::Auth {
                user: "u".into(),
                reason: "bad".into()
            })
            .exit_code(),
            AUTH
        );
        assert_eq!(
            SessionError::Sink(SinkError::Connect {
                url: "amqp://u:***@h".into(),
                reason: "ACCESS_REFUSED - Login was refused".into()
            })
            .exit_code(),
            AUTH
        );
        assert_eq!(
            server("22021", "invalid byte sequence").exit_code(),
            BAD_DATA
        );
        assert_eq!(SessionError::Config("x".into()).exit_code(), CONFIG);
        assert_eq!(server("42501", "permission denied").exit_code(), RUNTIME);
        // Retryable ones are counted by cause.
        assert_eq!(
            slot(SlotError::InUse {
                slot: "s".into(),
                pid: "1".into()
            })
            .reconnect_cause(),
            ReconnectCause::SlotInUse
        );
        assert_eq!(
            SessionError::WalsenderSilent(Duration::from_secs(1)).reconnect_cause(),
            ReconnectCause::ReplicationTimeout
        );
        assert!(SessionError::WalsenderSilent(Duration::from_secs(1)).is_retryable());
    }
}
