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
//! With `--stream-partitions N` the sink writes `N` partition streams
//! instead of one (see [`partition`]): one named producer per partition
//! (`<producer>-<i>`), each with the same publishing ids, so deduplication
//! holds per partition; the checkpoint stays one over all of them.
//!
//! Our own protocol client (see [`wire`]): the `rabbitmq-stream-client` crate
//! (0.11) sends `ExchangeCommandVersions` when it connects, which RabbitMQ
//! before 3.11 does not know and answers by closing the connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::uri::AMQPUri;
use tokio::io::BufWriter;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Confirm, OutgoingMessage, Sink, SinkError};

pub mod amqp;
pub mod consumer;
mod io;
pub mod partition;
pub mod tls;
pub mod wire;

pub use amqp::StreamMessage;
use io::{Out, Shared, Waiting};
use partition::Target;
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
    /// The producer's last publishing id the broker reported at the last
    /// connect (with partitions: the highest over them).
    pub stored_publishing_id: AtomicU64,
    /// With partitions, by partition.
    partitions: Mutex<Vec<PartitionStats>>,
}

#[derive(Debug, Default)]
struct PartitionStats {
    stream: String,
    /// The producer's last stored id at the last connect.
    stored: u64,
    /// Messages sent since start.
    sent: u64,
}

impl StreamStats {
    fn connected(&self, streams: &[String], stored: &[u64]) {
        let max = stored.iter().copied().max().unwrap_or(0);
        self.stored_publishing_id.store(max, Ordering::Relaxed);
        if streams.len() < 2 && self.partitions.lock().is_ok_and(|p| p.is_empty()) {
            return; // one plain stream: the families above say it all
        }
        if let Ok(mut p) = self.partitions.lock() {
            p.resize_with(streams.len(), Default::default);
            for ((entry, stream), &id) in p.iter_mut().zip(streams).zip(stored) {
                entry.stream.clone_from(stream);
                entry.stored = id;
            }
        }
    }

    fn sent(&self, partition: usize) {
        if let Ok(mut p) = self.partitions.lock()
            && let Some(entry) = p.get_mut(partition)
        {
            entry.sent += 1;
        }
    }

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
        let Ok(partitions) = self.partitions.lock() else {
            return;
        };
        if partitions.is_empty() {
            return;
        }
        let families = [
            (
                "odoo_cdc_stream_partition_stored_publishing_id",
                "gauge",
                "Per partition stream: its producer's last stored publishing id at connect.",
                false,
            ),
            (
                "odoo_cdc_stream_partition_sent_total",
                "counter",
                "Per partition stream: messages sent to it (replayed ones it had are not sent).",
                true,
            ),
        ];
        for (name, kind, help, sent) in families {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for p in partitions.iter() {
                let value = if sent { p.sent } else { p.stored };
                let _ = writeln!(out, "{name}{{stream=\"{}\"}} {value}", p.stream);
            }
        }
    }
}

/// How to reach the stream and what to call the producer.
#[derive(Clone)]
pub struct StreamConfig {
    /// Private: holds the password.
    url: String,
    endpoint: Endpoint,
    /// The stream appended to; with partitions, the super stream's name.
    pub stream: String,
    /// The producer reference the broker deduplicates by (with partitions,
    /// `<producer>-<i>` for partition `i`).
    pub producer: String,
    /// 0: one plain stream; else the number of partitions (see [`partition`]).
    pub partitions: u16,
    /// Where to declare the super stream's exchange (AMQP 0-9-1); by default
    /// the stream URL's host, credentials and vhost on port 5672.
    amqp: Option<Box<AMQPUri>>,
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
            .field("partitions", &self.partitions)
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
            partitions: 0,
            amqp: None,
            declare: true,
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            connection_name: "odoo-cdc".to_owned(),
            stats: Arc::default(),
        })
    }

    /// Writes `n` partition streams (a super stream) instead of one plain
    /// stream; 0 goes back to one stream.
    pub fn with_partitions(mut self, n: u16) -> Result<Self, String> {
        if n > partition::MAX_PARTITIONS {
            return Err(format!("at most {} partitions", partition::MAX_PARTITIONS));
        }
        if n > 0 && self.stream.len().max(self.producer.len()) > 251 {
            return Err(
                "with partitions, stream and producer names must have at most 251 bytes".into(),
            );
        }
        self.partitions = n;
        Ok(self)
    }

    /// Where the super stream's exchange is declared, instead of the stream
    /// URL's host on port 5672 (an `amqp://` or `amqps://` URL).
    pub fn with_amqp_url(mut self, url: &str) -> Result<Self, String> {
        self.amqp = Some(Box::new(url.parse::<AMQPUri>()?));
        Ok(self)
    }

    /// The AMQP 0-9-1 endpoint for the super stream's exchange.
    pub fn amqp_uri(&self) -> AMQPUri {
        match &self.amqp {
            Some(uri) => (**uri).clone(),
            None => partition::amqp_uri_for(&self.endpoint),
        }
    }

    /// The streams written, in partition order: the stream itself, or its
    /// partitions `<stream>-0` ... `<stream>-<N-1>`.
    pub fn streams(&self) -> Vec<String> {
        self.names(&self.stream)
    }

    /// The named producers, aligned with [`StreamConfig::streams`].
    pub fn producers(&self) -> Vec<String> {
        self.names(&self.producer)
    }

    fn names(&self, base: &str) -> Vec<String> {
        match self.partitions {
            0 => vec![base.to_owned()],
            n => (0..usize::from(n))
                .map(|i| partition::partition_name(base, i))
                .collect(),
        }
    }

    /// The configuration of partition `i` alone, as a plain stream (for
    /// readers; a sink of it would not hash).
    pub fn partition(&self, i: usize) -> StreamConfig {
        let mut cfg = self.clone();
        cfg.stream = partition::partition_name(&self.stream, i);
        cfg.producer = partition::partition_name(&self.producer, i);
        cfg.partitions = 0;
        cfg.stats = Arc::default();
        cfg
    }

    pub fn redacted_url(&self) -> String {
        crate::secret::redact_url(&self.url)
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// What `odoo-cdc check` learns from the broker about one stream it would
/// write, without publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub stream: String,
    pub producer: String,
    pub stream_exists: bool,
    /// The producer's last stored publishing id (0: it never published).
    pub last_publishing_id: u64,
}

/// Connects to the stream port and asks for each producer's sequence, which
/// also tells whether its stream exists: one [`Probe`] per stream written
/// (the partitions, in order). Creates and sends nothing.
pub async fn probe(cfg: &StreamConfig) -> Result<Vec<Probe>, String> {
    let t = cfg.connect_timeout;
    let mut conn = Conn::open(&cfg.endpoint, "odoo-cdc check", t)
        .await
        .map_err(|e| e.replace(&cfg.endpoint.password, "***"))?;
    let mut probes = Vec::new();
    for (stream, producer) in cfg.streams().into_iter().zip(cfg.producers()) {
        let r = conn.query_publisher_sequence(t, &producer, &stream).await?;
        let (stream_exists, last_publishing_id) = match r.code {
            wire::OK => (true, Reader::new(&r.body).u64()?),
            wire::STREAM_DOES_NOT_EXIST => (false, 0),
            code => {
                return Err(format!(
                    "querying the producer's sequence on {stream:?}: {}",
                    wire::code_text(code)
                ));
            }
        };
        probes.push(Probe {
            stream,
            producer,
            stream_exists,
            last_publishing_id,
        });
    }
    conn.close(t, "check done").await;
    Ok(probes)
}

/// One stream written: its producers' ids on the connection (`2i` named,
/// exactly-once; `2i + 1` unnamed, at-least-once) and where they stand.
struct Producer {
    named: u8,
    /// The last id the broker had stored for the named producer when we connected.
    stored: u64,
    /// The last named id sent in this session, to catch a broken assumption.
    last_sent: u64,
    next_unnamed: u64,
}

/// A connection with the producers of every stream written declared.
pub struct StreamSink {
    out: mpsc::UnboundedSender<Out>,
    state: Shared,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
    /// By partition (one entry for a plain stream).
    producers: Vec<Producer>,
    /// Replayed changes confirmed without sending: the broker had them.
    skipped: u64,
    /// Whether this session sent a change yet (to log the skipped ones once).
    sent_any: bool,
    stats: Arc<StreamStats>,
    frame_max: usize,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    redacted_url: String,
}

impl StreamSink {
    /// Connects, creates the streams unless they exist (or checks they do,
    /// with declaring off) and, with partitions, the super stream's exchange;
    /// declares the producers and asks for each named one's last stored id.
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
        let streams = cfg.streams();
        if cfg.declare {
            for stream in &streams {
                let r = conn
                    .call(t, "creating the stream", |c| {
                        Frame::new(wire::CREATE).u32(c).str(stream).u32(0)
                    })
                    .await
                    .map_err(fail)?;
                if r.code != wire::OK && r.code != wire::STREAM_ALREADY_EXISTS {
                    return Err(fail(format!(
                        "creating stream {stream:?}: {}",
                        wire::code_text(r.code)
                    )));
                }
            }
            if cfg.partitions > 0 {
                let uri = cfg.amqp_uri();
                partition::declare_exchange(&uri, &cfg.stream, streams.len(), t)
                    .await
                    .map_err(|e| {
                        fail(format!(
                            "{e} (the super stream's exchange is declared over AMQP at {}; \
                             give --amqp, or --no-declare and create it yourself)",
                            partition::describe(&uri)
                        ))
                    })?;
            }
        }
        let mut producers = Vec::with_capacity(streams.len());
        let mut stored_ids = Vec::with_capacity(streams.len());
        for (i, (stream, producer)) in streams.iter().zip(cfg.producers()).enumerate() {
            let named = (2 * i) as u8;
            for (id, reference) in [(named, producer.as_str()), (named + 1, "")] {
                let r = conn
                    .call(t, "declaring the producer", |c| {
                        Frame::new(wire::DECLARE_PUBLISHER)
                            .u32(c)
                            .u8(id)
                            .str(reference)
                            .str(stream)
                    })
                    .await
                    .map_err(fail)?;
                if r.code != wire::OK {
                    return Err(fail(format!(
                        "declaring a producer on stream {stream:?}: {}{}",
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
                .query_publisher_sequence(t, &producer, stream)
                .await
                .map_err(fail)?;
            wire::expect_ok("querying the producer's sequence", r.code).map_err(fail)?;
            let stored = Reader::new(&r.body).u64().map_err(fail)?;
            info!(
                url = %url,
                stream = %stream,
                producer = %producer,
                last_publishing_id = stored,
                "connected to the RabbitMQ stream"
            );
            stored_ids.push(stored);
            producers.push(Producer {
                named,
                stored,
                last_sent: stored,
                next_unnamed: 0,
            });
        }
        cfg.stats.connected(&streams, &stored_ids);

        let state = Shared::default();
        let (out, rx) = mpsc::unbounded_channel();
        let heartbeat = Duration::from_secs(u64::from(conn.heartbeat.max(2)) / 2);
        let frame_max = conn.frame_max as usize;
        let silence =
            (conn.heartbeat > 0).then(|| Duration::from_secs(u64::from(conn.heartbeat) * 2 + 5));
        let Conn { read, write, .. } = conn;
        let writer = tokio::spawn(io::write_loop(
            rx,
            BufWriter::with_capacity(256 * 1024, write),
            Arc::clone(&state),
            heartbeat,
            frame_max,
        ));
        let reader = tokio::spawn(io::read_loop(read, Arc::clone(&state), silence));
        Ok(StreamSink {
            out,
            state,
            writer,
            reader,
            producers,
            skipped: 0,
            sent_any: false,
            stats: Arc::clone(&cfg.stats),
            frame_max,
            confirm_timeout: cfg.confirm_timeout,
            connect_timeout: t,
            redacted_url: url,
        })
    }

    /// The last publishing id the broker had stored for the producer when we
    /// connected (0: none yet); with partitions, the highest over them.
    pub fn stored_publishing_id(&self) -> u64 {
        self.producers.iter().map(|p| p.stored).max().unwrap_or(0)
    }

    /// By partition: the last publishing id its producer had stored when we
    /// connected.
    pub fn stored_publishing_ids(&self) -> Vec<u64> {
        self.producers.iter().map(|p| p.stored).collect()
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

    /// Which producer of partition `p` and which id a message goes out with;
    /// `None`: already stored. `standalone`: a non-transactional logical
    /// message, whose position (the last byte of its record) can be one byte
    /// before the next commit, closer than the id function's 32-byte
    /// resolution: it goes out at-least-once, like snapshot rows.
    fn route(
        &mut self,
        p: usize,
        message_id: &str,
        standalone: bool,
    ) -> Result<Option<(u8, u64)>, SinkError> {
        let named = wal_position(message_id)
            .filter(|_| !standalone)
            .and_then(|(lsn, seq)| publishing_id(lsn, seq));
        let producer = &mut self.producers[p];
        match named {
            Some(id) if id <= producer.stored => {
                self.skipped += 1;
                self.stats
                    .replayed_already_stored
                    .fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Some(id) if id <= producer.last_sent => Err(SinkError::Invalid {
                message_id: message_id.to_owned(),
                reason: format!(
                    "publishing id {id} is not above the previous one ({}); \
                     the stream's deduplication would drop it",
                    producer.last_sent
                ),
            }),
            Some(id) => {
                if !self.sent_any && self.skipped > 0 {
                    info!(
                        skipped = self.skipped,
                        "replayed changes already in the stream were confirmed without sending them"
                    );
                }
                self.sent_any = true;
                producer.last_sent = id;
                Ok(Some((producer.named, id)))
            }
            None => {
                if wal_position(message_id).is_some() {
                    warn!(
                        message_id,
                        "change beyond the publishing id's limits: sent at-least-once (see docs/streams.md)"
                    );
                }
                producer.next_unnamed += 1;
                Ok(Some((producer.named + 1, producer.next_unnamed)))
            }
        }
    }

    /// Queues one encoded message for producer `publisher`; the confirm
    /// resolves when the broker confirms it (or the connection dies).
    fn send(
        &mut self,
        publisher: u8,
        id: u64,
        message_id: &str,
        data: Vec<u8>,
    ) -> Result<oneshot::Receiver<io::Outcome>, SinkError> {
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
                    message_id: message_id.to_owned(),
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
        if self.producers.len() > 1 {
            self.stats.sent(io::stream_of(publisher));
        }
        Ok(rx)
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
        let partitions = match self.producers.len() {
            1 => 0..1,
            n => match partition::target(&msg, n) {
                Target::One(p) => p..p + 1,
                Target::All => 0..n,
            },
        };
        let standalone = standalone(&msg);
        let mut routes = Vec::with_capacity(partitions.len());
        for p in partitions {
            if let Some(route) = self.route(p, &msg.message_id, standalone)? {
                routes.push(route);
            }
        }
        if routes.is_empty() {
            return Ok(Confirm::Pending(Box::pin(std::future::ready(Ok(())))));
        }
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
        let last = routes.len() - 1;
        let mut data = Some(data);
        let mut waits = Vec::with_capacity(routes.len());
        for (n, (publisher, id)) in routes.into_iter().enumerate() {
            let bytes = if n == last {
                data.take().unwrap_or_default()
            } else {
                data.clone().unwrap_or_default()
            };
            waits.push(self.send(publisher, id, &msg.message_id, bytes)?);
        }
        let deadline = Instant::now() + self.confirm_timeout;
        let timeout_ms = self.confirm_timeout.as_millis() as u64;
        let message_id = msg.message_id;
        Ok(Confirm::Pending(Box::pin(async move {
            // A truncate goes to every partition: confirmed once all have it.
            for rx in waits {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(outcome)) => outcome?,
                    Ok(Err(_)) => return Err(SinkError::Closed("stream connection closed".into())),
                    Err(_) => {
                        return Err(SinkError::ConfirmTimeout {
                            message_id,
                            timeout_ms,
                        });
                    }
                }
            }
            Ok(())
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
        assert!(!out.contains("partition"), "{out}");

        let streams = ["s-0".to_owned(), "s-1".to_owned()];
        stats.connected(&streams, &[5, 7]);
        stats.sent(1);
        let mut out = String::new();
        stats.render(&mut out);
        assert!(
            out.contains("odoo_cdc_stream_stored_publishing_id 7\n"),
            "{out}"
        );
        assert!(out.contains("odoo_cdc_stream_partition_stored_publishing_id{stream=\"s-0\"} 5\n"));
        assert!(out.contains("odoo_cdc_stream_partition_sent_total{stream=\"s-1\"} 1\n"));
        assert!(out.contains("odoo_cdc_stream_partition_sent_total{stream=\"s-0\"} 0\n"));
    }

    #[test]
    fn partitions_have_their_own_streams_and_producers() {
        let cfg = StreamConfig::new("rabbitmq-stream://h", "odoo.cdc", "odoo-cdc-s")
            .unwrap()
            .with_partitions(3)
            .unwrap();
        assert_eq!(cfg.streams(), ["odoo.cdc-0", "odoo.cdc-1", "odoo.cdc-2"]);
        assert_eq!(cfg.producers()[2], "odoo-cdc-s-2");
        let one = cfg.partition(1);
        assert_eq!((one.stream.as_str(), one.partitions), ("odoo.cdc-1", 0));
        assert_eq!(one.streams(), ["odoo.cdc-1"]);
        let uri = cfg.amqp_uri();
        assert_eq!(
            (uri.authority.host.as_str(), uri.authority.port),
            ("h", 5672)
        );
        let uri = cfg
            .with_amqp_url("amqp://u:p@other:5673/v")
            .unwrap()
            .amqp_uri();
        assert_eq!(
            (uri.authority.host.as_str(), uri.vhost.as_str()),
            ("other", "v")
        );
        assert!(
            StreamConfig::new("rabbitmq-stream://h", "s", "p")
                .unwrap()
                .with_partitions(129)
                .is_err()
        );
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
