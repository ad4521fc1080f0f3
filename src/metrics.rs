//! Counters and gauges of a running connector, rendered in the Prometheus text
//! format by the metrics endpoint.
//!
//! One event per occurrence: the pipeline calls a method here where something
//! happens, and the method both counts and (where useful) logs, so counting and
//! logging never drift apart. Atomics only: the hot path pays a few relaxed
//! increments per event.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::event::{ChangeEvent, Op};
use crate::lsn::Lsn;

const CONFIRM_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000];

#[derive(Default)]
pub struct Metrics {
    events_by_op: [AtomicU64; 6],
    /// events by "schema.table|op", for the per-table counter (bounded by the
    /// number of captured tables).
    events_by_table: Mutex<std::collections::BTreeMap<String, u64>>,
    published_messages: AtomicU64,
    published_bytes: AtomicU64,
    wal_bytes: AtomicU64,
    confirm_buckets: [AtomicU64; CONFIRM_BUCKETS_MS.len()],
    confirm_count: AtomicU64,
    confirm_sum_us: AtomicU64,
    confirmed_lsn: AtomicU64,
    server_wal_end: AtomicU64,
    reconnects: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Snapshot progress by table: (rows done, rows estimated).
    snapshot_tables: Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
    /// Gauges set by other parts (retention guard, supervisor, snapshot).
    pub slot_retained_wal_bytes: AtomicU64,
    pub streaming: AtomicU64,
    pub sink_up: AtomicU64,
    pub snapshot_rows: AtomicU64,
    pub circuit_open: AtomicU64,
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Read => 3,
        Op::Truncate => 4,
        Op::Message => 5,
    }
}

const OPS: [Op; 6] = [
    Op::Insert,
    Op::Update,
    Op::Delete,
    Op::Read,
    Op::Truncate,
    Op::Message,
];

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn event(&self, ev: &ChangeEvent) {
        self.events_by_op[op_index(ev.op)].fetch_add(1, Relaxed);
        if let (Some(s), Some(t)) = (ev.schema(), ev.table_name())
            && let Ok(mut m) = self.events_by_table.lock()
        {
            let key = format!("{s}.{t}|{}", ev.op.word());
            *m.entry(key).or_insert(0) += 1;
        }
    }

    pub fn events_total(&self) -> u64 {
        self.events_by_op.iter().map(|a| a.load(Relaxed)).sum()
    }

    pub fn published(&self, bytes: usize) {
        self.published_messages.fetch_add(1, Relaxed);
        self.published_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn published_messages(&self) -> u64 {
        self.published_messages.load(Relaxed)
    }

    pub fn add_wal_bytes(&self, n: usize) {
        self.wal_bytes.fetch_add(n as u64, Relaxed);
    }

    pub fn observe_confirm(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        for (i, b) in CONFIRM_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.confirm_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.confirm_count.fetch_add(1, Relaxed);
        self.confirm_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn set_confirmed_lsn(&self, lsn: Lsn) {
        self.confirmed_lsn.store(lsn.0, Relaxed);
    }

    pub fn confirmed_lsn(&self) -> Lsn {
        Lsn(self.confirmed_lsn.load(Relaxed))
    }

    pub fn set_server_wal_end(&self, lsn: Lsn) {
        self.server_wal_end.store(lsn.0, Relaxed);
    }

    pub fn reconnect(&self, cause: &str) {
        if let Ok(mut m) = self.reconnects.lock() {
            *m.entry(cause.to_string()).or_insert(0) += 1;
        }
    }

    /// Progress of a table's (initial or on-demand) snapshot.
    pub fn snapshot_progress(&self, table: &str, done: u64, estimated: u64) {
        if let Ok(mut m) = self.snapshot_tables.lock() {
            m.insert(table.to_string(), (done, estimated));
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP odoo_cdc_events_total Change events read from the WAL, by operation."
        );
        let _ = writeln!(s, "# TYPE odoo_cdc_events_total counter");
        for op in OPS {
            let _ = writeln!(
                s,
                "odoo_cdc_events_total{{op=\"{}\"}} {}",
                op.word(),
                self.events_by_op[op_index(op)].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP odoo_cdc_table_events_total Change events by table and operation."
        );
        let _ = writeln!(s, "# TYPE odoo_cdc_table_events_total counter");
        if let Ok(m) = self.events_by_table.lock() {
            for (k, v) in m.iter() {
                let (table, op) = k.split_once('|').unwrap_or((k, ""));
                let _ = writeln!(
                    s,
                    "odoo_cdc_table_events_total{{table=\"{}\",op=\"{}\"}} {}",
                    escape_label(table),
                    op,
                    v
                );
            }
        }
        counter(
            &mut s,
            "odoo_cdc_published_messages_total",
            "Messages handed to the sink.",
            self.published_messages.load(Relaxed),
        );
        counter(
            &mut s,
            "odoo_cdc_published_bytes_total",
            "Bytes of message bodies handed to the sink.",
            self.published_bytes.load(Relaxed),
        );
        counter(
            &mut s,
            "odoo_cdc_wal_bytes_total",
            "Bytes of pgoutput messages received.",
            self.wal_bytes.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP odoo_cdc_confirm_latency_seconds Time from publish to broker confirm."
        );
        let _ = writeln!(s, "# TYPE odoo_cdc_confirm_latency_seconds histogram");
        for (i, b) in CONFIRM_BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                s,
                "odoo_cdc_confirm_latency_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1000.0,
                self.confirm_buckets[i].load(Relaxed)
            );
        }
        let count = self.confirm_count.load(Relaxed);
        let _ = writeln!(
            s,
            "odoo_cdc_confirm_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "odoo_cdc_confirm_latency_seconds_sum {}",
            self.confirm_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "odoo_cdc_confirm_latency_seconds_count {count}");
        let confirmed = self.confirmed_lsn.load(Relaxed);
        let wal_end = self.server_wal_end.load(Relaxed);
        gauge(
            &mut s,
            "odoo_cdc_confirmed_lsn",
            "Flush LSN last reported to Postgres (as a number).",
            confirmed,
        );
        gauge(
            &mut s,
            "odoo_cdc_replication_lag_bytes",
            "Server WAL end minus the confirmed LSN.",
            wal_end.saturating_sub(confirmed),
        );
        gauge(
            &mut s,
            "odoo_cdc_slot_retained_wal_bytes",
            "WAL the slot keeps on the server (current LSN - restart_lsn).",
            self.slot_retained_wal_bytes.load(Relaxed),
        );
        gauge(
            &mut s,
            "odoo_cdc_streaming",
            "1 while a replication session is streaming.",
            self.streaming.load(Relaxed),
        );
        gauge(
            &mut s,
            "odoo_cdc_sink_up",
            "1 while the sink is connected.",
            self.sink_up.load(Relaxed),
        );
        gauge(
            &mut s,
            "odoo_cdc_circuit_open",
            "1 while the supervisor backs off after failures.",
            self.circuit_open.load(Relaxed),
        );
        gauge(
            &mut s,
            "odoo_cdc_snapshot_rows",
            "Rows read by snapshots so far.",
            self.snapshot_rows.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP odoo_cdc_snapshot_table_rows Rows of a table published by its latest snapshot, and the estimate (pg_class.reltuples).\n# TYPE odoo_cdc_snapshot_table_rows gauge"
        );
        if let Ok(m) = self.snapshot_tables.lock() {
            for (table, (done, estimated)) in m.iter() {
                let t = escape_label(table);
                let _ = writeln!(
                    s,
                    "odoo_cdc_snapshot_table_rows{{table=\"{t}\",kind=\"done\"}} {done}\nodoo_cdc_snapshot_table_rows{{table=\"{t}\",kind=\"estimated\"}} {estimated}"
                );
            }
        }
        let _ = writeln!(s, "# HELP odoo_cdc_reconnects_total Reconnects by cause.");
        let _ = writeln!(s, "# TYPE odoo_cdc_reconnects_total counter");
        if let Ok(m) = self.reconnects.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(
                    s,
                    "odoo_cdc_reconnects_total{{cause=\"{}\"}} {v}",
                    escape_label(k)
                );
            }
        }
        s
    }
}

fn counter(s: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn gauge(s: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
