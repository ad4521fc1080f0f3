//! Library use of the event stream: run an odoo-cdc replication session inside
//! your own Rust program, with your own [`Sink`].
//!
//! `odoo-cdc tail` and `odoo-cdc run` are thin wrappers around
//! [`session::run_session`]: it reads the slot, decodes pgoutput, builds change
//! events, encodes them, and hands each message to a sink. The sink decides
//! where events go; the session decides when the slot may move. Here the sink
//! prints one line per event (`<message_id> <routing key> <JSON body>`) and
//! answers [`Confirm::OnFlush`]: the slot only advances over events whose lines
//! [`Sink::flush`] wrote out, so stopping this program at any point loses
//! nothing on a persistent slot.
//!
//! ```text
//! cargo run --example tail_to_stdout -- \
//!     --source postgres://postgres@127.0.0.1:54329/odoo_demo --publication odoo_demo --limit 20
//! ```
//!
//! By default the slot is temporary (dropped when the program exits, so it pins
//! no WAL, but each run starts at the current end of the WAL); `--keep-slot`
//! creates a persistent one that a later run resumes from.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use odoo_cdc::metrics::Metrics;
use odoo_cdc::replication::PgConfig;
use odoo_cdc::session::config::SessionConfig;
use odoo_cdc::session::{Stopped, run_session};
use odoo_cdc::sink::{Confirm, OutgoingMessage, Sink, SinkError};
use odoo_cdc::transaction::PlainTables;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(about = "Print Odoo's committed changes from a program that embeds odoo-cdc")]
struct Args {
    /// PostgreSQL URL (a role with REPLICATION)
    #[arg(long)]
    source: String,
    /// Replication slot
    #[arg(long, default_value = "odoo_cdc_tail_example")]
    slot: String,
    /// Publication(s), comma separated (created if missing, with every table that has
    /// a usable replica identity)
    #[arg(long, default_value = "odoo_cdc")]
    publication: String,
    /// Create a persistent slot (resumed by the next run) instead of a temporary one
    #[arg(long)]
    keep_slot: bool,
    /// Stop after this many events (0: run until Ctrl-C)
    #[arg(long, default_value_t = 0)]
    limit: u64,
}

/// Prints each event as one line; durable once flushed.
struct LineSink {
    out: std::io::BufWriter<std::io::Stdout>,
    printed: u64,
    limit: u64,
    /// Set once `limit` events were printed.
    enough: watch::Sender<bool>,
}

impl Sink for LineSink {
    async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
        write!(self.out, "{} {} ", msg.message_id, msg.routing_key)?;
        self.out.write_all(&msg.body)?;
        self.out.write_all(b"\n")?;
        self.printed += 1;
        if self.limit > 0 && self.printed >= self.limit {
            let _ = self.enough.send(true);
        }
        Ok(Confirm::OnFlush)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush()?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let source: PgConfig = args
        .source
        .parse()
        .with_context(|| "--source is not a valid PostgreSQL URL")?;
    let mut cfg = SessionConfig::new(source, args.slot.clone(), args.publication.clone());
    cfg.create_slot = true;
    cfg.temporary_slot = !args.keep_slot;
    cfg.create_publication = true;

    let (enough_tx, mut enough_rx) = watch::channel(false);
    let sink = LineSink {
        out: std::io::BufWriter::new(std::io::stdout()),
        printed: 0,
        limit: args.limit,
        enough: enough_tx,
    };
    let metrics = Arc::new(Metrics::new());
    let shutdown = async move {
        tokio::select! {
            _ = odoo_cdc::app::shutdown_signal() => {}
            _ = enough_rx.wait_for(|e| *e) => {}
        }
    };
    eprintln!(
        "tail_to_stdout: streaming slot {} ({}); Ctrl-C to stop",
        args.slot,
        if args.keep_slot {
            "persistent"
        } else {
            "temporary"
        }
    );
    // PlainTables captures every table of the publication as-is; a program
    // with its own table/model mapping passes its own TableDescriber.
    let stopped = run_session(&cfg, sink, Box::new(PlainTables), metrics.clone(), shutdown)
        .await
        .context("replication session failed")?;
    let Stopped::Shutdown { confirmed } = stopped;
    eprintln!(
        "tail_to_stdout: {} events; slot confirmed up to {confirmed}",
        metrics.events_total()
    );
    Ok(())
}
