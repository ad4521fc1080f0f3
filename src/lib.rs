//! odoo-cdc: log-based change data capture from an Odoo PostgreSQL database to RabbitMQ.
//!
//! Data flow (see DESIGN.md in the project's shared folder and the README):
//!
//! ```text
//! walsender ──CopyBoth──▶ replication ──▶ pgoutput ──▶ transaction (+ schema, value)
//!    ▲                                                        │
//!    │ standby status (flush LSN)                             ▼ event
//!    └──────── checkpoint (ordered, confirm-driven) ◀──── sink (RabbitMQ | stdout)
//! ```
//!
//! Each concept lives in the module named after it.

pub mod checkpoint;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod schema;
pub mod secret;
pub mod sink;
pub mod value;
