//! odoo-cdc: log-based change data capture from an Odoo PostgreSQL database to RabbitMQ.
//!
//! Data flow (see the README and docs/):
//!
//! ```text
//! walsender ──CopyBoth──▶ replication ──▶ pgoutput ──▶ transaction (+ schema, value, spill)
//!    ▲                                                        │
//!    │ standby status (flush LSN)                             ▼ event ─▶ routing
//!    └──────── checkpoint (ordered, confirm-driven) ◀──── sink (RabbitMQ | stdout)
//! ```
//!
//! [`session`] joins them for one replication session. Each concept lives in the
//! module named after it.

pub mod app;
pub mod backoff;
pub mod catalog;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod describer;
pub mod event;
pub mod filter;
pub mod glob;
pub mod lsn;
pub mod metrics;
pub mod metrics_server;
pub mod odoo;
pub mod pgoutput;
pub mod protobuf;
pub mod publication;
mod queue;
pub mod replication;
pub mod retention;
pub mod routing;
pub mod schema;
pub mod secret;
pub mod session;
pub mod sink;
pub mod slot;
pub mod snapshot;
pub mod spill;
pub mod standby;
pub mod supervisor;
pub mod tail;
pub mod transaction;
pub mod value;
