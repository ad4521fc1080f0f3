//! Where encoded events go: RabbitMQ ([`rabbitmq`]), a RabbitMQ stream
//! ([`stream`]) or standard output ([`stdout`]).
//!
//! A sink only *delivers*; it never decides what is safe to acknowledge to
//! Postgres. Each publish hands back a [`Confirm`], and the publisher feeds
//! positive outcomes to the checkpoint (`checkpoint.rs`). Anything else (a
//! nack, a returned message, a timeout, a closed channel) is an error that stops
//! the session before the slot can move past the event.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub mod rabbitmq;
pub mod stdout;
pub mod stream;

/// One message ready for the transport, already encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub routing_key: String,
    pub body: Bytes,
    /// Stable id derived from the WAL (`<commit_lsn hex16>-<seq 8 digits>`).
    pub message_id: String,
    /// `application/json` or `application/x-protobuf`.
    pub content_type: &'static str,
    /// Commit time, seconds since the Unix epoch (AMQP `timestamp` has second precision).
    pub timestamp: u64,
    /// AMQP `type`, e.g. `sale.order.update` or `public.sale_order.update`.
    pub kind: String,
    /// Application headers (`x-lsn`, `x-commit-lsn`, `x-xid`, `x-table`, `x-op`, ...).
    pub headers: BTreeMap<String, HeaderValue>,
}

/// Header naming the row a message is about, for partitioned streams:
/// `<schema>.<table>` then `/<value>` per key column (see `routing.rs`). Set
/// only when a sink partitions (`--stream-partitions`).
pub const PARTITION_KEY: &str = "x-partition-key";

#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// The outcome of a publish as the broker reports it, resolved later.
pub type ConfirmFuture = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'static>>;

/// What a sink returns for one message.
pub enum Confirm {
    /// The broker will confirm (or reject) asynchronously.
    Pending(ConfirmFuture),
    /// Durable once the sink's next [`Sink::flush`] returns Ok (stdout).
    OnFlush,
}

/// A transport for encoded events.
pub trait Sink: Send {
    /// Hands one message to the transport. Returns once the message is queued
    /// for sending (not when it is confirmed).
    fn publish(
        &mut self,
        msg: OutgoingMessage,
    ) -> impl Future<Output = Result<Confirm, SinkError>> + Send;

    /// Makes every [`Confirm::OnFlush`] message durable.
    fn flush(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Whether the transport is usable now, checked about once a second even
    /// when idle: `Err` once the connection is gone (the session ends and
    /// reconnects), `Ok(false)` while it is up but holds messages back (a
    /// broker resource alarm: not ready, but nothing to reconnect for).
    fn check(&self) -> Result<bool, SinkError> {
        Ok(true)
    }

    /// Closes the transport after a clean end (every confirm in). Bounded.
    fn close(self) -> impl Future<Output = Result<(), SinkError>> + Send
    where
        Self: Sized,
    {
        async { Ok(()) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("broker rejected (nack) message {message_id} with routing key {routing_key}")]
    Nack {
        message_id: String,
        routing_key: String,
    },
    #[error(
        "message {message_id} was returned as unroutable: no queue is bound to exchange {exchange:?} for routing key {routing_key:?} (bind a queue, or run with --unroutable=drop to drop such events on purpose)"
    )]
    Unroutable {
        message_id: String,
        exchange: String,
        routing_key: String,
    },
    #[error("no confirm for message {message_id} within {timeout_ms} ms")]
    ConfirmTimeout { message_id: String, timeout_ms: u64 },
    #[error("broker connection or channel closed: {0}")]
    Closed(String),
    /// The broker closed the channel because a message exceeded its
    /// `max_message_size`: replaying would be refused the same way.
    #[error(
        "the broker refused a message for its size ({reason}): set --max-message-bytes at or below the broker's max_message_size (oversized events then follow --on-oversized)"
    )]
    TooLarge { reason: String },
    #[error("broker error during {during}: {reason}")]
    Broker {
        during: &'static str,
        reason: String,
    },
    /// The message cannot be expressed in AMQP (e.g. a routing key over 255
    /// bytes); retrying would fail the same way.
    #[error("message {message_id} cannot be published: {reason}")]
    Invalid { message_id: String, reason: String },
    #[error("writing events failed: {0}")]
    Io(#[from] std::io::Error),
}

impl SinkError {
    /// A closed channel or connection, told apart from the broker refusing a
    /// message for its size (RabbitMQ closes the channel with
    /// `PRECONDITION_FAILED - message size N is larger than configured max size M`).
    pub fn closed(reason: String) -> SinkError {
        if reason.contains("larger than configured max size") {
            SinkError::TooLarge { reason }
        } else {
            SinkError::Closed(reason)
        }
    }

    /// Every sink failure is worth a reconnect, except a broker that refuses our
    /// topology or credentials, or a message AMQP cannot carry: that needs an
    /// operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Connect { reason, .. } => !reason.contains("ACCESS_REFUSED"),
            SinkError::Invalid { .. } | SinkError::TooLarge { .. } => false,
            _ => true,
        }
    }
}
