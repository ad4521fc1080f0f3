//! Counters and gauges of a running connector, rendered in the Prometheus text
//! format by the metrics endpoint (`metrics_server.rs`).
//!
//! One event per occurrence: the session calls a method here where something
//! happens. Atomics only on the hot path: per event a few relaxed increments on
//! counters that belong to the event's table, found through a per-task cache
//! keyed by relation OID ([`TableCounterCache`]) — no lock, no allocation and no
//! string formatting per event. The shared registry of tables is locked once
//! per table per session, and by `render`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::{ChangeEvent, Op, TableInfo};
use crate::lsn::Lsn;

const CONFIRM_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

const OPS: [Op; 6] = [
    Op::Insert,
    Op::Update,
    Op::Delete,
    Op::Read,
    Op::Truncate,
    Op::Message,
];

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

/// Why a session ended and the supervisor reconnected (a fixed set, so the
/// counter is an array and the label set is bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectCause {
    /// The PostgreSQL connection failed (network, restart, server error).
    Postgres,
    /// The walsender went silent past `--replication-timeout-secs`.
    ReplicationTimeout,
    /// The slot is held by another process (a standby waiting, or a dying predecessor).
    SlotInUse,
    /// The server ended the replication stream.
    StreamEnded,
    /// The broker connection or channel failed, a nack, a return or a confirm timeout.
    Rabbitmq,
    /// Anything else classified retryable.
    Other,
}

impl ReconnectCause {
    pub const ALL: [ReconnectCause; 6] = [
        ReconnectCause::Postgres,
        ReconnectCause::ReplicationTimeout,
        ReconnectCause::SlotInUse,
        ReconnectCause::StreamEnded,
        ReconnectCause::Rabbitmq,
        ReconnectCause::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReconnectCause::Postgres => "postgres",
            ReconnectCause::ReplicationTimeout => "replication_timeout",
            ReconnectCause::SlotInUse => "slot_in_use",
            ReconnectCause::StreamEnded => "stream_ended",
            ReconnectCause::Rabbitmq => "rabbitmq",
            ReconnectCause::Other => "other",
        }
    }
}

/// The supervisor's circuit breaker, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CircuitState {
    /// Opening a session (first start, or a trial after backing off: half-open).
    Connecting = 0,
    /// A session is streaming (closed).
    Streaming = 1,
    /// The last session failed; waiting before the next attempt (open).
    BackingOff = 2,
    /// A fatal error: the process is stopping with a non-zero exit code.
    Failed = 3,
    /// Shut down on request.
    Stopped = 4,
}

impl CircuitState {
    pub const ALL: [CircuitState; 5] = [
        CircuitState::Connecting,
        CircuitState::Streaming,
        CircuitState::BackingOff,
        CircuitState::Failed,
        CircuitState::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Connecting => "connecting",
            CircuitState::Streaming => "streaming",
            CircuitState::BackingOff => "backing_off",
            CircuitState::Failed => "failed",
            CircuitState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> CircuitState {
        CircuitState::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(CircuitState::Connecting)
    }
}

/// `--on-decode-error` outcomes, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeOutcome {
    Failed = 0,
    Raw = 1,
    DeadLetter = 2,
}

/// `pg_replication_slots.wal_status` (PG13+).
pub const WAL_STATUSES: [&str; 5] = ["unknown", "reserved", "extended", "unreserved", "lost"];

/// Per-table counters; one per relation OID for the life of the process.
pub struct TableCounters {
    /// `schema.table`, escaped for a label once.
    label: String,
    events: [AtomicU64; 6],
    bytes: [AtomicU64; 6],
}

/// Something that appends its own metric families to the exposition (e.g.
/// snapshot progress, owned by the snapshot phase).
pub type RenderHook = Box<dyn Fn(&mut String) + Send + Sync>;

pub struct Metrics {
    events_by_op: [AtomicU64; 6],
    tables: Mutex<HashMap<u32, Arc<TableCounters>>>,
    published_messages: AtomicU64,
    published_bytes: AtomicU64,
    wal_bytes: AtomicU64,
    confirm_buckets: [AtomicU64; CONFIRM_BUCKETS_MS.len()],
    confirm_count: AtomicU64,
    confirm_sum_us: AtomicU64,
    confirmed_lsn: AtomicU64,
    server_wal_end: AtomicU64,
    in_flight: AtomicU64,
    /// Commit time (µs since the Unix epoch) of the last transaction read, and
    /// whether everything read is confirmed (then the lag is zero).
    last_commit_unix_us: AtomicU64,
    caught_up: AtomicU8,
    reconnects: [AtomicU64; ReconnectCause::ALL.len()],
    circuit: AtomicU8,
    decode_errors: [AtomicU64; 3],
    /// `--on-oversized` outcomes: failed, dead_letter.
    oversized: [AtomicU64; 2],
    heartbeats: AtomicU64,
    slot_retained_wal_bytes: AtomicU64,
    slot_safe_wal_bytes: AtomicI64,
    slot_has_safe_wal_size: AtomicU8,
    slot_wal_status: AtomicU8,
    slot_retention_warnings: AtomicU64,
    sessions: AtomicU64,
    /// 1 while a replication session is streaming.
    pub streaming: AtomicU64,
    /// 1 while the sink is connected (and not blocked by a broker alarm).
    pub sink_up: AtomicU64,
    /// Rows read by snapshots so far (set by the snapshot phase).
    pub snapshot_rows: AtomicU64,
    /// Snapshot progress by table: (rows done, rows estimated).
    snapshot_tables: Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
    hooks: Mutex<Vec<RenderHook>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            events_by_op: Default::default(),
            tables: Mutex::new(HashMap::new()),
            published_messages: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            wal_bytes: AtomicU64::new(0),
            confirm_buckets: Default::default(),
            confirm_count: AtomicU64::new(0),
            confirm_sum_us: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_commit_unix_us: AtomicU64::new(0),
            caught_up: AtomicU8::new(1),
            reconnects: Default::default(),
            circuit: AtomicU8::new(CircuitState::Connecting as u8),
            decode_errors: Default::default(),
            oversized: Default::default(),
            heartbeats: AtomicU64::new(0),
            slot_retained_wal_bytes: AtomicU64::new(0),
            slot_safe_wal_bytes: AtomicI64::new(0),
            slot_has_safe_wal_size: AtomicU8::new(0),
            slot_wal_status: AtomicU8::new(0),
            slot_retention_warnings: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            streaming: AtomicU64::new(0),
            sink_up: AtomicU64::new(0),
            snapshot_rows: AtomicU64::new(0),
            snapshot_tables: Mutex::new(Default::default()),
            hooks: Mutex::new(Vec::new()),
        }
    }
}

/// A task-local map from relation OID to its counters, so the hot path finds
/// them without locking the shared registry.
#[derive(Default)]
pub struct TableCounterCache {
    map: HashMap<u32, Arc<TableCounters>, std::hash::BuildHasherDefault<OidHasher>>,
}

/// OIDs are already well spread; hashing them again is wasted work.
#[derive(Default)]
pub struct OidHasher(u64);

impl std::hash::Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl TableCounterCache {
    /// Counts one event and the bytes of its encoded form.
    #[inline]
    pub fn record(&mut self, metrics: &Metrics, ev: &ChangeEvent, bytes: usize) {
        let op = op_index(ev.op);
        metrics.events_by_op[op].fetch_add(1, Relaxed);
        if let Some(t) = ev.table.as_deref() {
            let oid = t.relation.oid;
            let c = match self.map.get(&oid) {
                Some(c) => c,
                None => {
                    let c = metrics.table_counters(t);
                    self.map.entry(oid).or_insert(c)
                }
            };
            c.events[op].fetch_add(1, Relaxed);
            c.bytes[op].fetch_add(bytes as u64, Relaxed);
        }
    }
}

fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Microseconds between the Unix epoch and Postgres' (2000-01-01).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared counters of a table (created on first sight).
    fn table_counters(&self, t: &TableInfo) -> Arc<TableCounters> {
        let mut m = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(t.relation.oid)
            .or_insert_with(|| {
                Arc::new(TableCounters {
                    label: escape_label(&t.relation.qualified_name()),
                    events: Default::default(),
                    bytes: Default::default(),
                })
            })
            .clone()
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
        // Cumulative buckets are summed at render time: one increment here.
        if let Some(i) = CONFIRM_BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.confirm_buckets[i].fetch_add(1, Relaxed);
        }
        self.confirm_count.fetch_add(1, Relaxed);
        self.confirm_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Relaxed);
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

    /// A transaction committed at `commit_ts` (µs since 2000-01-01) was read.
    pub fn transaction_read(&self, commit_ts: i64) {
        let unix = commit_ts.saturating_add(PG_EPOCH_UNIX_US).max(0) as u64;
        self.last_commit_unix_us.store(unix, Relaxed);
        self.caught_up.store(0, Relaxed);
    }

    /// Everything read is confirmed and the server has nothing newer for us.
    pub fn caught_up(&self) {
        self.caught_up.store(1, Relaxed);
    }

    /// Seconds between the commit of the last transaction read and now, or 0
    /// once everything is confirmed.
    pub fn lag_seconds(&self) -> f64 {
        if self.caught_up.load(Relaxed) == 1 {
            return 0.0;
        }
        let at = self.last_commit_unix_us.load(Relaxed);
        now_unix_us().saturating_sub(at) as f64 / 1e6
    }

    pub fn reconnect(&self, cause: ReconnectCause) {
        let i = ReconnectCause::ALL
            .iter()
            .position(|c| *c == cause)
            .unwrap_or(ReconnectCause::ALL.len() - 1);
        self.reconnects[i].fetch_add(1, Relaxed);
    }

    pub fn reconnects(&self, cause: ReconnectCause) -> u64 {
        ReconnectCause::ALL
            .iter()
            .position(|c| *c == cause)
            .map(|i| self.reconnects[i].load(Relaxed))
            .unwrap_or(0)
    }

    /// Sets the supervisor's state; true if it changed.
    pub fn set_circuit(&self, state: CircuitState) -> bool {
        self.circuit.swap(state as u8, Relaxed) != state as u8
    }

    pub fn circuit(&self) -> CircuitState {
        CircuitState::from_u8(self.circuit.load(Relaxed))
    }

    /// A session reached `START_REPLICATION` and streams.
    pub fn session_started(&self) {
        self.sessions.fetch_add(1, Relaxed);
    }

    pub fn sessions(&self) -> u64 {
        self.sessions.load(Relaxed)
    }

    pub fn decode_error(&self, outcome: DecodeOutcome) {
        self.decode_errors[outcome as usize].fetch_add(1, Relaxed);
    }

    /// An event too large to publish (`dead_letter`: sent as an envelope).
    pub fn oversized(&self, dead_letter: bool) {
        self.oversized[usize::from(dead_letter)].fetch_add(1, Relaxed);
    }

    pub fn heartbeat_sent(&self) {
        self.heartbeats.fetch_add(1, Relaxed);
    }

    /// Latest retention figures of the slot. `safe_wal_size` is `None` when
    /// `max_slot_wal_keep_size` is unlimited (or before PG13).
    pub fn set_slot_retention(&self, retained: u64, safe_wal_size: Option<i64>, status: &str) {
        self.slot_retained_wal_bytes.store(retained, Relaxed);
        self.slot_has_safe_wal_size
            .store(u8::from(safe_wal_size.is_some()), Relaxed);
        self.slot_safe_wal_bytes
            .store(safe_wal_size.unwrap_or(0), Relaxed);
        let i = WAL_STATUSES.iter().position(|s| *s == status).unwrap_or(0);
        self.slot_wal_status.store(i as u8, Relaxed);
    }

    pub fn slot_retained_wal_bytes(&self) -> u64 {
        self.slot_retained_wal_bytes.load(Relaxed)
    }

    pub fn retention_warning(&self) {
        self.slot_retention_warnings.fetch_add(1, Relaxed);
    }

    /// Ready to serve: a session streams and the broker side is up.
    pub fn is_ready(&self) -> bool {
        self.circuit() == CircuitState::Streaming
            && self.streaming.load(Relaxed) == 1
            && self.sink_up.load(Relaxed) == 1
    }

    /// Progress of a table's (initial or on-demand) snapshot.
    pub fn snapshot_progress(&self, table: &str, done: u64, estimated: u64) {
        self.snapshot_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(table.to_string(), (done, estimated));
    }

    /// Adds metric families rendered by another part (snapshot progress).
    pub fn add_render_hook(&self, hook: RenderHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        family(
            &mut s,
            "odoo_cdc_events_total",
            "counter",
            "Change events encoded for publishing, by operation.",
        );
        for op in OPS {
            let _ = writeln!(
                s,
                "odoo_cdc_events_total{{op=\"{}\"}} {}",
                op.word(),
                self.events_by_op[op_index(op)].load(Relaxed)
            );
        }
        let tables: Vec<Arc<TableCounters>> = {
            let m = self.tables.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = m.values().cloned().collect();
            v.sort_by(|a, b| a.label.cmp(&b.label));
            v
        };
        type PerOp = fn(&TableCounters) -> &[AtomicU64; 6];
        let per_table: [(&str, &str, PerOp); 2] = [
            (
                "odoo_cdc_table_events_total",
                "Change events encoded for publishing, by table and operation.",
                |t| &t.events,
            ),
            (
                "odoo_cdc_table_event_bytes_total",
                "Bytes of encoded events, by table and operation.",
                |t| &t.bytes,
            ),
        ];
        for (name, help, counters) in per_table {
            family(&mut s, name, "counter", help);
            for t in &tables {
                for op in OPS {
                    let v = counters(t)[op_index(op)].load(Relaxed);
                    if v > 0 {
                        let _ = writeln!(
                            s,
                            "{name}{{table=\"{}\",op=\"{}\"}} {v}",
                            t.label,
                            op.word()
                        );
                    }
                }
            }
        }
        single(
            &mut s,
            "odoo_cdc_published_messages_total",
            "counter",
            "Messages handed to the sink.",
            self.published_messages.load(Relaxed),
        );
        single(
            &mut s,
            "odoo_cdc_published_bytes_total",
            "counter",
            "Bytes of message bodies handed to the sink.",
            self.published_bytes.load(Relaxed),
        );
        single(
            &mut s,
            "odoo_cdc_wal_bytes_total",
            "counter",
            "Bytes of pgoutput messages received.",
            self.wal_bytes.load(Relaxed),
        );
        family(
            &mut s,
            "odoo_cdc_confirm_latency_seconds",
            "histogram",
            "Time from handing a message to the broker to its positive confirm.",
        );
        let mut cumulative = 0;
        for (i, b) in CONFIRM_BUCKETS_MS.iter().enumerate() {
            cumulative += self.confirm_buckets[i].load(Relaxed);
            let _ = writeln!(
                s,
                "odoo_cdc_confirm_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1000.0,
            );
        }
        let count = self.confirm_count.load(Relaxed);
        let _ = writeln!(
            s,
            "odoo_cdc_confirm_latency_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             odoo_cdc_confirm_latency_seconds_sum {}\n\
             odoo_cdc_confirm_latency_seconds_count {count}",
            self.confirm_sum_us.load(Relaxed) as f64 / 1e6
        );
        single(
            &mut s,
            "odoo_cdc_in_flight_messages",
            "gauge",
            "Messages handed to the broker and not yet confirmed.",
            self.in_flight.load(Relaxed),
        );
        let confirmed = self.confirmed_lsn.load(Relaxed);
        let wal_end = self.server_wal_end.load(Relaxed);
        single(
            &mut s,
            "odoo_cdc_confirmed_lsn",
            "gauge",
            "Flush LSN last reported to Postgres, as a number.",
            confirmed,
        );
        single(
            &mut s,
            "odoo_cdc_server_wal_end_lsn",
            "gauge",
            "The server's WAL end last heard of, as a number.",
            wal_end,
        );
        single(
            &mut s,
            "odoo_cdc_replication_lag_bytes",
            "gauge",
            "Server WAL end minus the confirmed LSN.",
            wal_end.saturating_sub(confirmed),
        );
        family(
            &mut s,
            "odoo_cdc_replication_lag_seconds",
            "gauge",
            "Now minus the commit time of the last transaction read; 0 when everything is confirmed.",
        );
        let _ = writeln!(
            s,
            "odoo_cdc_replication_lag_seconds {:.3}",
            self.lag_seconds()
        );
        single(
            &mut s,
            "odoo_cdc_slot_retained_wal_bytes",
            "gauge",
            "WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn.",
            self.slot_retained_wal_bytes.load(Relaxed),
        );
        if self.slot_has_safe_wal_size.load(Relaxed) == 1 {
            family(
                &mut s,
                "odoo_cdc_slot_safe_wal_bytes",
                "gauge",
                "WAL that can still be written before the slot is invalidated (safe_wal_size).",
            );
            let _ = writeln!(
                s,
                "odoo_cdc_slot_safe_wal_bytes {}",
                self.slot_safe_wal_bytes.load(Relaxed)
            );
        }
        family(
            &mut s,
            "odoo_cdc_slot_wal_status",
            "gauge",
            "The slot's wal_status (1 for the current one).",
        );
        let status = self.slot_wal_status.load(Relaxed) as usize;
        for (i, name) in WAL_STATUSES.iter().enumerate() {
            let _ = writeln!(
                s,
                "odoo_cdc_slot_wal_status{{status=\"{name}\"}} {}",
                u8::from(i == status)
            );
        }
        single(
            &mut s,
            "odoo_cdc_slot_retention_warnings_total",
            "counter",
            "Checks that found the slot retaining more WAL than --max-retained-wal-mb.",
            self.slot_retention_warnings.load(Relaxed),
        );
        single(
            &mut s,
            "odoo_cdc_heartbeats_total",
            "counter",
            "Heartbeat messages written to the source database.",
            self.heartbeats.load(Relaxed),
        );
        family(
            &mut s,
            "odoo_cdc_decode_errors_total",
            "counter",
            "Values or messages that could not be decoded, by what was done (--on-decode-error).",
        );
        for (i, name) in ["fail", "raw", "dead_letter"].iter().enumerate() {
            let _ = writeln!(
                s,
                "odoo_cdc_decode_errors_total{{outcome=\"{name}\"}} {}",
                self.decode_errors[i].load(Relaxed)
            );
        }
        family(
            &mut s,
            "odoo_cdc_oversized_events_total",
            "counter",
            "Events whose message exceeds --max-message-bytes, by what was done (--on-oversized).",
        );
        for (i, name) in ["fail", "dead_letter"].iter().enumerate() {
            let _ = writeln!(
                s,
                "odoo_cdc_oversized_events_total{{outcome=\"{name}\"}} {}",
                self.oversized[i].load(Relaxed)
            );
        }
        single(
            &mut s,
            "odoo_cdc_sessions_total",
            "counter",
            "Replication sessions started.",
            self.sessions.load(Relaxed),
        );
        family(
            &mut s,
            "odoo_cdc_reconnects_total",
            "counter",
            "Sessions that failed and were retried, by cause.",
        );
        for (i, cause) in ReconnectCause::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "odoo_cdc_reconnects_total{{cause=\"{}\"}} {}",
                cause.label(),
                self.reconnects[i].load(Relaxed)
            );
        }
        family(
            &mut s,
            "odoo_cdc_circuit_state",
            "gauge",
            "The supervisor's state (1 for the current one): streaming = closed, backing_off = open, connecting = half-open.",
        );
        let current = self.circuit();
        for st in CircuitState::ALL {
            let _ = writeln!(
                s,
                "odoo_cdc_circuit_state{{state=\"{}\"}} {}",
                st.label(),
                u8::from(st == current)
            );
        }
        single(
            &mut s,
            "odoo_cdc_streaming",
            "gauge",
            "1 while a replication session is streaming.",
            self.streaming.load(Relaxed),
        );
        single(
            &mut s,
            "odoo_cdc_sink_up",
            "gauge",
            "1 while the broker connection is up and not blocked.",
            self.sink_up.load(Relaxed),
        );
        single(
            &mut s,
            "odoo_cdc_ready",
            "gauge",
            "1 while /readyz answers 200.",
            u64::from(self.is_ready()),
        );
        single(
            &mut s,
            "odoo_cdc_snapshot_rows",
            "gauge",
            "Rows read by snapshots so far.",
            self.snapshot_rows.load(Relaxed),
        );
        family(
            &mut s,
            "odoo_cdc_snapshot_table_rows",
            "gauge",
            "Rows of a table published by its latest snapshot (kind=done) and the estimate from pg_class.reltuples (kind=estimated).",
        );
        for (table, (done, estimated)) in self
            .snapshot_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let t = escape_label(table);
            let _ = writeln!(
                s,
                "odoo_cdc_snapshot_table_rows{{table=\"{t}\",kind=\"done\"}} {done}\nodoo_cdc_snapshot_table_rows{{table=\"{t}\",kind=\"estimated\"}} {estimated}"
            );
        }
        for hook in self.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(&mut s);
        }
        s
    }
}

fn family(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(s: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    family(s, name, kind, help);
    let _ = writeln!(s, "{name} {v}");
}

pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, Relation, ReplicaIdentity};

    fn event(op: Op, oid: u32, table: &str) -> ChangeEvent {
        let rel = Arc::new(Relation::new(
            oid,
            "public",
            table,
            ReplicaIdentity::Default,
            vec![Column::new("id", 23, -1, true)],
        ));
        ChangeEvent {
            op,
            table: Some(Arc::new(TableInfo::plain(rel))),
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            xid: 1,
            commit_ts: 0,
            seq: 0,
            snapshot: false,
            old: None,
            new: None,
            truncate_options: 0,
            message: None,
        }
    }

    #[test]
    fn counts_by_table_and_op_and_renders_prometheus_text() {
        let m = Metrics::new();
        let mut cache = TableCounterCache::default();
        cache.record(&m, &event(Op::Insert, 10, "sale_order"), 100);
        cache.record(&m, &event(Op::Insert, 10, "sale_order"), 50);
        cache.record(&m, &event(Op::Update, 11, "res\"partner"), 7);
        m.observe_confirm(Duration::from_millis(3));
        m.observe_confirm(Duration::from_secs(60));
        m.reconnect(ReconnectCause::SlotInUse);
        m.set_circuit(CircuitState::BackingOff);
        let text = m.render();
        assert!(
            text.contains("odoo_cdc_events_total{op=\"insert\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "odoo_cdc_table_events_total{table=\"public.sale_order\",op=\"insert\"} 2"
            )
        );
        assert!(text.contains(
            "odoo_cdc_table_event_bytes_total{table=\"public.sale_order\",op=\"insert\"} 150"
        ));
        assert!(text.contains("table=\"public.res\\\"partner\",op=\"update\"} 1"));
        assert!(text.contains("odoo_cdc_confirm_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("odoo_cdc_confirm_latency_seconds_bucket{le=\"30\"} 1"));
        assert!(text.contains("odoo_cdc_confirm_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("odoo_cdc_reconnects_total{cause=\"slot_in_use\"} 1"));
        assert!(text.contains("odoo_cdc_circuit_state{state=\"backing_off\"} 1"));
        assert!(text.contains("odoo_cdc_circuit_state{state=\"streaming\"} 0"));
        assert!(text.contains("odoo_cdc_ready 0"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} ")),
                "{line}"
            );
        }
    }

    #[test]
    fn lag_is_zero_when_caught_up() {
        let m = Metrics::new();
        assert_eq!(m.lag_seconds(), 0.0);
        // A commit ten seconds ago (Postgres epoch microseconds).
        let ts = (now_unix_us() as i64 - PG_EPOCH_UNIX_US) - 10_000_000;
        m.transaction_read(ts);
        assert!(m.lag_seconds() >= 9.0);
        m.caught_up();
        assert_eq!(m.lag_seconds(), 0.0);
    }
}
