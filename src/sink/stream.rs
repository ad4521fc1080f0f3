//! RabbitMQ Streams sink: appends each event to a stream over the stream
//! protocol (port 5552), with broker-side deduplication so that every change
//! is stored exactly once, whatever crashes and replays happen on our side.
//!
//! How: one *named* producer per slot (`odoo-cdc-<slot>` by default). Every
//! change carries a publishing id that is a fixed function of its WAL
//! position ([`publishing_id`]), so a replay after a crash or reconnect sends
//! the same ids again. At connect the sink asks the broker for the last id it
//! stored for the producer (`QueryPublisherSequence`); messages at or below it
//! are already in the stream and are confirmed at once without being sent, and
//! the broker drops any duplicate that still reaches it. Confirms resolve the
//! same [`Confirm`] futures as the AMQP sink, so the ordered checkpoint is
//! unchanged: the slot only moves past what the broker confirmed.
//!
//! Messages without a WAL position of their own (snapshot rows, dead letters)
//! go through a second, unnamed producer on the same connection: in order,
//! confirmed, but at-least-once like the AMQP sink (consumers deduplicate them
//! on `message_id`). So does a change beyond the id's limits (see
//! `docs/streams.md`), with a warning.
//!
//! Our own protocol client (see [`wire`]): the `rabbitmq-stream-client` crate
//! (0.11) sends `ExchangeCommandVersions` when it connects, which RabbitMQ
//! before 3.11 does not know and answers by closing the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Confirm, OutgoingMessage, Sink, SinkError};

pub mod amqp;
pub mod consumer;
pub mod wire;

pub use amqp::StreamMessage;
use wire::{Conn, Endpoint, Frame, Reader};

/// Bits of the publishing id that hold the event's `seq` in its transaction.
pub const SEQ_BITS: u32 = 22;
/// Low bits of the commit LSN dropped: commit records are at least 40 bytes
/// long, so two commits are never within 32 bytes of each other.
pub const LSN_SHIFT: u32 = 5;
/// The largest commit LSN [`publishing_id`] maps (exclusive): 128 TiB of WAL.
pub const MAX_LSN: u64 = 1 << (64 - SEQ_BITS + LSN_SHIFT);

/// The publishing id of the change at (`commit_lsn`, `seq`):
/// `(commit_lsn >> 5) << 22 | seq`, or `None` beyond the limits (`seq` of
/// 2^22 = 4,194,304 or more in one transaction, or a commit LSN of 2^47 =
/// `8000/00000000` or more).
///
/// Strictly increasing in WAL order: transactions arrive in commit order with
/// distinct commit LSNs at least 40 bytes apart (the smallest commit record,
/// 8-byte aligned), so `commit_lsn >> 5` strictly increases from one to the
/// next, and `seq` counts up from 0 inside each.
pub fn publishing_id(commit_lsn: u64, seq: u64) -> Option<u64> {
    if seq >= 1 << SEQ_BITS || commit_lsn >= MAX_LSN {
        return None;
    }
    Some((commit_lsn >> LSN_SHIFT) << SEQ_BITS | seq)
}

/// `(commit_lsn, seq)` from a change's `message_id`
/// (`<commit LSN, 16 hex digits>-<seq, 8 digits>`); `None` for snapshot rows
/// and dead letters, whose ids have another shape.
pub fn wal_position(message_id: &str) -> Option<(u64, u64)> {
    let (lsn, seq) = message_id.split_once('-')?;
    if lsn.len() != 16 || seq.len() != 8 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((u64::from_str_radix(lsn, 16).ok()?, seq.parse().ok()?))
}

/// A non-transactional logical message: it belongs to no transaction (xid 0).
fn standalone(msg: &OutgoingMessage) -> bool {
    matches!(msg.headers.get("x-xid"), Some(super::HeaderValue::Int(0)))
        && matches!(msg.headers.get("x-op"), Some(super::HeaderValue::Str(op)) if op == "m")
}

/// Default producer name for a slot.
pub fn default_producer(slot: &str) -> String {
    format!("odoo-cdc-{slot}")
}

/// Counters shared by every session's sink, rendered into `/metrics`.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Replayed changes confirmed without sending: the broker had them.
    pub replayed_already_stored: AtomicU64,
    /// The producer's last publishing id the broker reported at the last connect.
    pub stored_publishing_id: AtomicU64,
}

impl StreamStats {
    /// Prometheus text lines, for [`crate::metrics::Metrics::add_render_hook`].
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let families = [
            (
                "odoo_cdc_stream_replayed_already_stored_total",
                "counter",
                "Replayed changes the stream already held, confirmed without sending them.",
                self.replayed_already_stored.load(Ordering::Relaxed),
            ),
            (
                "odoo_cdc_stream_stored_publishing_id",
                "gauge",
                "The producer's last stored publishing id, as the broker reported it at connect.",
                self.stored_publishing_id.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
    }
}

/// How to reach the stream and what to call the producer.
#[derive(Clone)]
pub struct StreamConfig {
    /// Private: holds the password.
    url: String,
    endpoint: Endpoint,
    /// The stream appended to.
    pub stream: String,
    /// The producer reference the broker deduplicates by.
    pub producer: String,
    /// Create the stream if missing (off with `--no-declare`: it must exist).
    pub declare: bool,
    pub confirm_timeout: Duration,
    pub connect_timeout: Duration,
    pub connection_name: String,
    /// Shared by the sinks of successive sessions.
    pub stats: Arc<StreamStats>,
}

impl std::fmt::Debug for StreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConfig")
            .field("url", &self.redacted_url())
            .field("stream", &self.stream)
            .field("producer", &self.producer)
            .field("declare", &self.declare)
            .finish()
    }
}

impl StreamConfig {
    /// Checks the URL (`rabbitmq-stream://user:pass@host:5552/vhost`) and the
    /// names (the protocol allows 255 bytes... we keep to that).
    pub fn new(url: &str, stream: &str, producer: &str) -> Result<Self, String> {
        let endpoint = Endpoint::parse(url)?;
        for (what, name) in [("stream name", stream), ("producer name", producer)] {
            if name.is_empty() || name.len() > 255 {
                return Err(format!("the {what} must have 1 to 255 bytes"));
            }
        }
        Ok(StreamConfig {
            url: url.to_owned(),
            endpoint,
            stream: stream.to_owned(),
            producer: producer.to_owned(),
            declare: true,
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            connection_name: "odoo-cdc".to_owned(),
            stats: Arc::default(),
        })
    }

    pub fn redacted_url(&self) -> String {
        crate::secret::redact_url(&self.url)
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// What `odoo-cdc check` learns from the broker without publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub stream_exists: bool,
    /// The producer's last stored publishing id (0: it never published).
    pub last_publishing_id: u64,
}

/// Connects to the stream port and asks for the producer's sequence, which
/// also tells whether the stream exists. Creates and sends nothing.
pub async fn probe(cfg: &StreamConfig) -> Result<Probe, String> {
    let t = cfg.connect_timeout;
    let mut conn = Conn::open(&cfg.endpoint, "odoo-cdc check", t)
        .await
        .map_err(|e| e.replace(&cfg.endpoint.password, "***"))?;
    let r = conn
        .query_publisher_sequence(t, &cfg.producer, &cfg.stream)
        .await?;
    let probe = match r.code {
        wire::OK => Probe {
            stream_exists: true,
            last_publishing_id: Reader::new(&r.body).u64()?,
        },
        wire::STREAM_DOES_NOT_EXIST => Probe {
            stream_exists: false,
            last_publishing_id: 0,
        },
        code => {
            return Err(format!(
                "querying the producer's sequence: {}",
                wire::code_text(code)
            ));
        }
    };
    conn.close(t, "check done").await;
    Ok(probe)
}

/// The named producer (exactly-once) and the unnamed one (at-least-once).
const NAMED: u8 = 0;
const UNNAMED: u8 = 1;

type Outcome = Result<(), SinkError>;

struct Waiting {
    message_id: String,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<(u8, u64), Waiting>,
    /// Why the connection is gone, once it is.
    closed: Option<String>,
}

impl State {
    /// Marks the connection dead and fails everything still waiting.
    fn fail(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(reason.clone());
        }
        for (_, w) in self.waiting.drain() {
            let _ = w.done.send(Err(SinkError::Closed(reason.clone())));
        }
    }
}

type Shared = Arc<Mutex<State>>;

enum Out {
    Message {
        publisher: u8,
        id: u64,
        data: Vec<u8>,
    },
    Close,
}

/// A connection with both producers declared.
pub struct StreamSink {
    out: mpsc::UnboundedSender<Out>,
    state: Shared,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
    /// The last id the broker had stored for our producer when we connected.
    stored: u64,
    /// The last named id sent in this session, to catch a broken assumption.
    last_sent: u64,
    /// Replayed changes confirmed without sending: the broker had them.
    skipped: u64,
    stats: Arc<StreamStats>,
    next_unnamed: u64,
    frame_max: usize,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    redacted_url: String,
}

impl StreamSink {
    /// Connects, creates the stream unless it exists (or checks it does, with
    /// declaring off), declares the producers and asks for the named one's
    /// last stored id.
    pub async fn connect(cfg: StreamConfig) -> Result<Self, SinkError> {
        let url = cfg.redacted_url();
        let t = cfg.connect_timeout;
        let fail = |reason: String| SinkError::Connect {
            url: url.clone(),
            reason: reason.replace(&cfg.endpoint.password, "***"),
        };
        let mut conn = Conn::open(&cfg.endpoint, &cfg.connection_name, t)
            .await
            .map_err(fail)?;
        if cfg.declare {
            let r = conn
                .call(t, "creating the stream", |c| {
                    Frame::new(wire::CREATE).u32(c).str(&cfg.stream).u32(0)
                })
                .await
                .map_err(fail)?;
            if r.code != wire::OK && r.code != wire::STREAM_ALREADY_EXISTS {
                return Err(fail(format!(
                    "creating stream {:?}: {}",
                    cfg.stream,
                    wire::code_text(r.code)
                )));
            }
        }
        for (id, reference) in [(NAMED, cfg.producer.as_str()), (UNNAMED, "")] {
            let r = conn
                .call(t, "declaring the producer", |c| {
                    Frame::new(wire::DECLARE_PUBLISHER)
                        .u32(c)
                        .u8(id)
                        .str(reference)
                        .str(&cfg.stream)
                })
                .await
                .map_err(fail)?;
            if r.code != wire::OK {
                return Err(fail(format!(
                    "declaring a producer on stream {:?}: {}{}",
                    cfg.stream,
                    wire::code_text(r.code),
                    if cfg.declare {
                        ""
                    } else {
                        " (with --no-declare the stream must exist)"
                    }
                )));
            }
        }
        let r = conn
            .query_publisher_sequence(t, &cfg.producer, &cfg.stream)
            .await
            .map_err(fail)?;
        wire::expect_ok("querying the producer's sequence", r.code).map_err(fail)?;
        let stored = Reader::new(&r.body).u64().map_err(fail)?;
        cfg.stats
            .stored_publishing_id
            .store(stored, Ordering::Relaxed);
        info!(
            url = %url,
            stream = %cfg.stream,
            producer = %cfg.producer,
            last_publishing_id = stored,
            "connected to the RabbitMQ stream"
        );

        let state = Shared::default();
        let (out, rx) = mpsc::unbounded_channel();
        let heartbeat = Duration::from_secs(u64::from(conn.heartbeat.max(2)) / 2);
        let frame_max = conn.frame_max as usize;
        let silence =
            (conn.heartbeat > 0).then(|| Duration::from_secs(u64::from(conn.heartbeat) * 2 + 5));
        let Conn { read, write, .. } = conn;
        let writer = tokio::spawn(write_loop(
            rx,
            BufWriter::with_capacity(256 * 1024, write),
            Arc::clone(&state),
            heartbeat,
            frame_max,
        ));
        let reader = tokio::spawn(read_loop(read, Arc::clone(&state), silence));
        Ok(StreamSink {
            out,
            state,
            writer,
            reader,
            stored,
            last_sent: stored,
            skipped: 0,
            stats: Arc::clone(&cfg.stats),
            next_unnamed: 0,
            frame_max,
            confirm_timeout: cfg.confirm_timeout,
            connect_timeout: t,
            redacted_url: url,
        })
    }

    /// The last publishing id the broker had stored for the producer when we
    /// connected (0: none yet).
    pub fn stored_publishing_id(&self) -> u64 {
        self.stored
    }

    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// Replayed changes this session confirmed without sending them, because
    /// the broker had already stored them.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn closed_reason(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.closed.clone())
    }

    /// Which producer and id a message goes out with; `None`: already stored.
    /// `standalone`: a non-transactional logical message, whose position
    /// (the last byte of its record) can be one byte before the next commit,
    /// closer than the id function's 32-byte resolution: it goes out
    /// at-least-once, like snapshot rows.
    fn route(
        &mut self,
        message_id: &str,
        standalone: bool,
    ) -> Result<Option<(u8, u64)>, SinkError> {
        let named = wal_position(message_id)
            .filter(|_| !standalone)
            .and_then(|(lsn, seq)| publishing_id(lsn, seq));
        match named {
            Some(id) if id <= self.stored => {
                self.skipped += 1;
                self.stats
                    .replayed_already_stored
                    .fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Some(id) if id <= self.last_sent => Err(SinkError::Invalid {
                message_id: message_id.to_owned(),
                reason: format!(
                    "publishing id {id} is not above the previous one ({}); \
                     the stream's deduplication would drop it",
                    self.last_sent
                ),
            }),
            Some(id) => {
                if self.last_sent == self.stored && self.skipped > 0 {
                    info!(
                        skipped = self.skipped,
                        "replayed changes already in the stream were confirmed without sending them"
                    );
                }
                self.last_sent = id;
                Ok(Some((NAMED, id)))
            }
            None => {
                if wal_position(message_id).is_some() {
                    warn!(
                        message_id,
                        "change beyond the publishing id's limits: sent at-least-once (see docs/streams.md)"
                    );
                }
                self.next_unnamed += 1;
                Ok(Some((UNNAMED, self.next_unnamed)))
            }
        }
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}

impl Sink for StreamSink {
    async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
        let Some((publisher, id)) = self.route(&msg.message_id, standalone(&msg))? else {
            return Ok(Confirm::Pending(Box::pin(std::future::ready(Ok(())))));
        };
        let data = amqp::encode(&amqp::Parts {
            message_id: &msg.message_id,
            subject: &msg.kind,
            content_type: msg.content_type,
            timestamp: msg.timestamp,
            routing_key: &msg.routing_key,
            headers: &msg.headers,
            body: &msg.body,
        });
        // key, version, publisher id, count, publishing id, length
        if data.len() + 4 + 4 + 1 + 4 + 8 + 4 > self.frame_max {
            return Err(SinkError::Invalid {
                message_id: msg.message_id,
                reason: format!(
                    "the encoded message has {} bytes; the broker's frame limit is {} \
                     (raise stream.frame_max in rabbitmq.conf, or use row granularity \
                     or a smaller --max-events-per-message)",
                    data.len(),
                    self.frame_max
                ),
            });
        }
        let (done, rx) = oneshot::channel();
        {
            let mut state = self
                .state
                .lock()
                .map_err(|_| SinkError::Closed("sink state poisoned".into()))?;
            if let Some(reason) = &state.closed {
                return Err(SinkError::Closed(reason.clone()));
            }
            state.waiting.insert(
                (publisher, id),
                Waiting {
                    message_id: msg.message_id.clone(),
                    done,
                },
            );
        }
        if self
            .out
            .send(Out::Message {
                publisher,
                id,
                data,
            })
            .is_err()
        {
            return Err(SinkError::Closed(
                self.closed_reason()
                    .unwrap_or_else(|| "stream connection writer stopped".into()),
            ));
        }
        let deadline = Instant::now() + self.confirm_timeout;
        let timeout_ms = self.confirm_timeout.as_millis() as u64;
        let message_id = msg.message_id;
        Ok(Confirm::Pending(Box::pin(async move {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Err(SinkError::Closed("stream connection closed".into())),
                Err(_) => Err(SinkError::ConfirmTimeout {
                    message_id,
                    timeout_ms,
                }),
            }
        })))
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn check(&self) -> Result<bool, SinkError> {
        match self.closed_reason() {
            Some(reason) => Err(SinkError::Closed(reason)),
            None => Ok(true),
        }
    }

    async fn close(mut self) -> Result<(), SinkError> {
        let _ = self.out.send(Out::Close);
        let reader = std::mem::replace(&mut self.reader, tokio::spawn(async {}));
        let _ = tokio::time::timeout(self.connect_timeout, reader).await;
        Ok(())
    }
}

/// Sends what `publish` queued, batching what is ready into one Publish frame
/// per producer, and a heartbeat when idle.
async fn write_loop(
    mut rx: mpsc::UnboundedReceiver<Out>,
    mut w: BufWriter<OwnedWriteHalf>,
    state: Shared,
    heartbeat: Duration,
    frame_max: usize,
) {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut pending: Option<Out> = None;
    loop {
        let first = match pending.take() {
            Some(o) => o,
            None => tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => o,
                    None => return,
                },
                _ = tick.tick() => {
                    let hb = Frame::new(wire::HEARTBEAT).finish();
                    if let Err(e) = write_flush(&mut w, &hb).await {
                        fail(&state, format!("stream connection write failed: {e}"));
                        return;
                    }
                    continue;
                }
            },
        };
        let publisher = match first {
            Out::Close => {
                let close = wire::close_frame("odoo-cdc shutting down");
                let _ = write_flush(&mut w, &close).await;
                return;
            }
            Out::Message {
                publisher,
                id,
                data,
            } => {
                batch.push((id, data));
                publisher
            }
        };
        // header: size, key, version, publisher id, count
        let mut size = 4 + 4 + 1 + 4 + 12 + batch[0].1.len();
        while size < frame_max && batch.len() < 4096 {
            match rx.try_recv() {
                Ok(Out::Message {
                    publisher: p,
                    id,
                    data,
                }) if p == publisher && size + 12 + data.len() <= frame_max => {
                    size += 12 + data.len();
                    batch.push((id, data));
                }
                Ok(other) => {
                    pending = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let mut frame = Frame::new(wire::PUBLISH)
            .u8(publisher)
            .u32(batch.len() as u32);
        for (id, data) in batch.drain(..) {
            frame = frame.u64(id).bytes(&data);
        }
        let frame = frame.finish();
        let more = pending.is_some() || !rx.is_empty();
        let r = if more {
            w.write_all(&frame).await
        } else {
            write_flush(&mut w, &frame).await
        };
        if let Err(e) = r {
            fail(&state, format!("stream connection write failed: {e}"));
            return;
        }
        tick.reset();
    }
}

async fn write_flush(w: &mut BufWriter<OwnedWriteHalf>, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame).await?;
    w.flush().await
}

fn fail(state: &Shared, reason: String) {
    if let Ok(mut s) = state.lock() {
        s.fail(reason);
    }
}

/// Resolves confirms and errors as the broker reports them; ends (failing
/// whatever still waits) when the connection does.
///
/// The broker sends a heartbeat when it has nothing else to send, so `silence`
/// (two heartbeat periods) without a frame means the connection is dead.
async fn read_loop(
    mut read: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    state: Shared,
    silence: Option<Duration>,
) {
    let reason = loop {
        let next = wire::read_frame(&mut read);
        let frame = match silence {
            Some(limit) => match tokio::time::timeout(limit, next).await {
                Ok(r) => r,
                Err(_) => break format!("no frame from the broker for {limit:?}"),
            },
            None => next.await,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => break format!("stream connection lost: {e}"),
        };
        match handle_frame(&frame, &state) {
            Ok(None) => {}
            Ok(Some(reason)) => break reason,
            Err(e) => break format!("stream protocol error: {e}"),
        }
    };
    if reason == CLOSED_BY_US {
        tracing::debug!(%reason, "stream connection ended");
    } else {
        warn!(%reason, "stream connection ended");
    }
    fail(&state, reason);
}

const CLOSED_BY_US: &str = "stream connection closed by us";

/// `Some(reason)` when the connection is over.
fn handle_frame(frame: &[u8], state: &Shared) -> Result<Option<String>, String> {
    let mut r = Reader::new(frame);
    let key = r.u16()?;
    r.u16()?;
    match key {
        wire::PUBLISH_CONFIRM | wire::PUBLISH_ERROR => {
            let publisher = r.u8()?;
            let n = r.u32()?;
            let mut s = state.lock().map_err(|_| "sink state poisoned")?;
            for _ in 0..n {
                let id = r.u64()?;
                let outcome = if key == wire::PUBLISH_CONFIRM {
                    Ok(())
                } else {
                    Err(r.u16()?)
                };
                if let Some(w) = s.waiting.remove(&(publisher, id)) {
                    let _ = w.done.send(outcome.map_err(|code| SinkError::Broker {
                        during: "publishing to the stream",
                        reason: format!(
                            "message {} refused: {}",
                            w.message_id,
                            wire::code_text(code)
                        ),
                    }));
                }
            }
            Ok(None)
        }
        wire::CLOSE => {
            r.u32()?;
            let code = r.u16()?;
            let reason = r.str()?;
            Ok(Some(format!(
                "the broker closed the stream connection ({}: {reason})",
                wire::code_text(code)
            )))
        }
        k if k == wire::CLOSE | wire::RESPONSE => Ok(Some("stream connection closed by us".into())),
        wire::METADATA_UPDATE => {
            let code = r.u16()?;
            let stream = r.str()?;
            Ok(Some(format!(
                "stream {stream:?} changed ({}): reconnecting",
                wire::code_text(code)
            )))
        }
        _ => Ok(None), // heartbeats and anything else
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_ids_follow_wal_order() {
        let a = publishing_id(0x16B_37A0, 0).unwrap();
        let b = publishing_id(0x16B_37A0, 1).unwrap();
        // the next commit record is at least 40 bytes further
        let c = publishing_id(0x16B_37A0 + 40, 0).unwrap();
        let last_of_big = publishing_id(0x16B_37A0, (1 << SEQ_BITS) - 1).unwrap();
        assert!(a < b && b < last_of_big && last_of_big < c);
        assert_eq!(publishing_id(0x20, 3), Some((1 << SEQ_BITS) | 3));
        assert_eq!(publishing_id(1, 1 << SEQ_BITS), None);
        assert_eq!(publishing_id(MAX_LSN, 0), None);
        assert_eq!(
            publishing_id(MAX_LSN - 8, (1 << SEQ_BITS) - 1),
            Some(u64::MAX)
        );
    }

    #[test]
    fn stats_render_as_prometheus_families() {
        let stats = StreamStats::default();
        stats.replayed_already_stored.store(3, Ordering::Relaxed);
        let mut out = String::new();
        stats.render(&mut out);
        assert!(out.contains(
            "# TYPE odoo_cdc_stream_replayed_already_stored_total counter\nodoo_cdc_stream_replayed_already_stored_total 3\n"
        ));
        assert!(out.contains("odoo_cdc_stream_stored_publishing_id 0\n"));
    }

    #[test]
    fn wal_positions_come_from_message_ids() {
        assert_eq!(
            wal_position("00000000016B37A0-00000003"),
            Some((0x16B_37A0, 3))
        );
        assert_eq!(wal_position("00000000016B37A0-r00004000-0000000001"), None);
        assert_eq!(wal_position("00000000016B37A0-dead-letter"), None);
        assert_eq!(
            wal_position(&crate::event::message_id(crate::lsn::Lsn(77), 9)),
            Some((77, 9))
        );
    }
}
