//! The walsender connection, and SQL connections opened with the same settings.
//!
//! tokio-postgres cannot open a replication connection, so this is a small client
//! of its own over tokio, using `postgres-protocol` for message encoding and the
//! authentication math:
//!
//! - [`config`]: [`PgConfig`] from a `postgres://` URL; [`SslMode`].
//! - [`client`]: [`ReplicationClient`] — connect with `replication=database`,
//!   `IDENTIFY_SYSTEM`, slot commands, simple queries, `START_REPLICATION`.
//! - [`stream`]: [`ReplicationStream`] — XLogData and keepalives in, standby
//!   status updates out; splits into a reader and a [`StatusSender`].
//! - `coalesce`: fewer, larger socket reads while the walsender is busy
//!   (`SO_RCVLOWAT` with a 2 ms bound).
//! - [`sql`]: tokio-postgres connections with the same host, auth, TLS and
//!   session settings.
//! - [`error`]: [`ReplicationError`] and which errors are worth a retry.

mod auth;
pub mod client;
mod coalesce;
pub mod command;
pub mod config;
mod connection;
pub mod error;
pub mod sql;
pub mod stream;
mod tls;
mod wire;

pub use client::{CreatedSlot, ReplicationClient, SystemInfo};
pub use command::SnapshotAction;
pub use command::{publication_names_value, quote_ident, quote_literal, validate_slot_name};
pub use config::{ConfigError, PgConfig, SESSION_SETTINGS, SslMode, session_options};
pub use error::{ReplicationError, ServerError};
pub use stream::{
    ReplicationMessage, ReplicationReader, ReplicationStream, StatusSender, parse_copy_data,
    pg_micros_to_system_time, pg_now_micros,
};
pub(crate) use tls::pem_roots;
