//! The broker ceiling: how fast RabbitMQ takes persistent, confirmed messages
//! on this machine with no CDC in front of it, for the benchmark harness to
//! compare the connector against.
//!
//! ```text
//! cargo run --release --example broker_ceiling -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --messages 20000 --size 400 --window 1000 --queue-type classic [--publisher lapin|sink]
//! ```
//!
//! Declares a fresh exchange and a fresh queue bound to it, publishes N
//! persistent (`delivery_mode=2`), mandatory messages keeping at most W
//! unconfirmed, checks every confirm is a clean ack, prints one JSON line and
//! deletes the queue and exchange. `--publisher lapin` (default) is a plain
//! lapin publisher; `--publisher sink` sends the same load through our
//! `RabbitSink` (with the headers and properties of real events), so the two
//! figures show what the sink costs on top of the broker.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use odoo_cdc::sink::rabbitmq::{QueueSpec, QueueType, RabbitConfig, RabbitSink};
use odoo_cdc::sink::{Confirm, HeaderValue, OutgoingMessage, Sink};
use tokio::time::timeout;

// The plain publisher is shared with the end-to-end harness.
#[allow(dead_code)]
#[path = "../benches/e2e/broker.rs"]
mod broker;

// Bound on each setup or cleanup call (shared with the harness), so a vanished broker fails the run.
use broker::STEP;

#[derive(Parser, Debug)]
#[command(about = "Measure RabbitMQ's own ceiling for persistent, confirmed publishes")]
struct Args {
    /// Broker URL.
    #[arg(long, env = "ODOO_CDC_TEST_AMQP")]
    amqp: String,
    /// Number of messages to publish.
    #[arg(long, default_value_t = 20_000)]
    messages: u32,
    /// Body size in bytes.
    #[arg(long, default_value_t = 400)]
    size: usize,
    /// Maximum number of unconfirmed messages in flight.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// classic, quorum or stream.
    #[arg(long, default_value = "classic")]
    queue_type: QueueType,
    /// lapin (plain publisher, the ceiling) or sink (our RabbitSink).
    #[arg(long, default_value = "lapin")]
    publisher: String,
    /// With the plain lapin publisher, send the properties and headers of
    /// real events (as the sink does) instead of only a message id, to tell
    /// the broker's cost of those bytes from the sink's own overhead.
    #[arg(long)]
    event_properties: bool,
    /// With the plain lapin publisher: publish over this many channels of one
    /// connection at once, each with its own confirms and a share of the
    /// messages and of the window (does a second channel raise the ceiling?).
    #[arg(long, default_value_t = 1)]
    channels: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.window == 0 || args.messages == 0 {
        bail!("--messages and --window must be at least 1");
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let exchange = format!("odoo-cdc-ceiling-{}-{nanos}", std::process::id());
    let queue = format!("{exchange}-{}", args.queue_type);

    let admin = Connection::connect(&args.amqp, ConnectionProperties::default());
    let admin = timeout(STEP, admin)
        .await
        .context("connecting: timed out")?
        .context("connecting")?;
    let channel = timeout(STEP, admin.create_channel())
        .await
        .context("opening a channel: timed out")??;

    let run = match args.publisher.as_str() {
        "lapin" => plain_lapin(&args, &admin, &channel, &exchange, &queue).await,
        "sink" => through_sink(&args, &exchange, &queue).await,
        other => bail!("unknown --publisher {other:?} (expected lapin or sink)"),
    };
    let held = match run {
        Ok(seconds) => queued(&channel, &queue, args.queue_type)
            .await
            .map(|held| (seconds, held)),
        Err(e) => Err(e),
    };
    let cleanup = broker::delete(&channel, &exchange, &queue).await;
    let (seconds, held) = held?;
    cleanup?;
    if let Some(held) = held
        && held != args.messages
    {
        bail!(
            "the queue holds {held} messages, expected {}",
            args.messages
        );
    }

    let msgs_per_sec = f64::from(args.messages) / seconds;
    let mb_per_sec = msgs_per_sec * args.size as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "messages": args.messages,
            "seconds": round3(seconds),
            "msgs_per_sec": msgs_per_sec.round(),
            "mb_per_sec": round3(mb_per_sec),
            "size": args.size,
            "window": args.window,
            "queue_type": args.queue_type.as_str(),
            "publisher": args.publisher,
            "event_properties": args.event_properties || args.publisher == "sink",
            "channels": args.channels,
        })
    );
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Publishes with lapin alone (the harness' publisher, `benches/e2e/broker.rs`)
/// and returns the seconds from the first publish to the last confirm; with
/// `--channels N`, N channels publish their shares at the same time.
async fn plain_lapin(
    args: &Args,
    connection: &Connection,
    channel: &Channel,
    exchange: &str,
    queue: &str,
) -> anyhow::Result<f64> {
    broker::declare_exchange(channel, exchange).await?;
    broker::declare_queue(
        channel,
        exchange,
        queue,
        args.queue_type.as_str(),
        FieldTable::default(),
    )
    .await?;
    let channels = args.channels.max(1);
    let mut publishers = Vec::new();
    for c in 0..channels {
        let ch = timeout(STEP, connection.create_channel())
            .await
            .context("opening a channel: timed out")??;
        let share = u64::from(args.messages / channels) + u64::from(c < args.messages % channels);
        let window = (args.window / channels as usize).max(1);
        let (exchange, size, event_properties) =
            (exchange.to_owned(), args.size, args.event_properties);
        publishers.push(async move {
            broker::publish(&ch, &exchange, share, size, window, move |i| {
                let i = i * u64::from(channels) + u64::from(c);
                if event_properties {
                    broker::event_properties(i)
                } else {
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(format!("{i:016X}-00000000").into())
                }
            })
            .await
        });
    }
    let start = Instant::now();
    for r in futures::future::join_all(publishers).await {
        r?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Publishes the same load through `RabbitSink`, events shaped like real
/// change events (headers, type, timestamp).
async fn through_sink(args: &Args, exchange: &str, queue: &str) -> anyhow::Result<f64> {
    let mut cfg = RabbitConfig::new(args.amqp.clone())?;
    cfg.exchange = exchange.to_owned();
    let mut spec = QueueSpec::new(queue);
    spec.queue_type = args.queue_type;
    cfg.queue = Some(spec);
    cfg.connection_name = "odoo-cdc-broker-ceiling".to_owned();
    let mut sink = RabbitSink::connect(cfg).await?;

    let body = Bytes::from(vec![b'x'; args.size]);
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..args.messages {
        while in_flight.len() >= args.window {
            if let Some(outcome) = in_flight.next().await {
                outcome?;
            }
        }
        match sink.publish(event(i, body.clone())).await? {
            Confirm::Pending(confirm) => in_flight.push(confirm),
            Confirm::OnFlush => bail!("RabbitSink must return a broker confirm"),
        }
    }
    while let Some(outcome) = in_flight.next().await {
        outcome?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = sink.stats();
    sink.close().await?;
    if stats.confirmed != u64::from(args.messages) {
        bail!("sink confirmed {} of {}", stats.confirmed, args.messages);
    }
    Ok(seconds)
}

fn event(i: u32, body: Bytes) -> OutgoingMessage {
    let lsn = 0x16B_3748 + u64::from(i) * 0x60;
    let mut headers = BTreeMap::new();
    headers.insert("x-lsn".to_owned(), HeaderValue::Str(format!("0/{lsn:X}")));
    headers.insert(
        "x-commit-lsn".to_owned(),
        HeaderValue::Str(format!("0/{:X}", lsn + 0x58)),
    );
    headers.insert("x-xid".to_owned(), HeaderValue::Int(745 + i64::from(i)));
    headers.insert(
        "x-table".to_owned(),
        HeaderValue::Str("public.sale_order".to_owned()),
    );
    headers.insert("x-op".to_owned(), HeaderValue::Str("c".to_owned()));
    OutgoingMessage {
        routing_key: "odoo.public.sale_order.insert".to_owned(),
        body,
        message_id: format!("{:016X}-{:08}", lsn + 0x58, 0),
        content_type: "application/json",
        timestamp: 1_790_000_000,
        kind: "sale.order.create".to_owned(),
        headers,
    }
}

/// How many messages the queue holds (not checked for streams, which count
/// offsets in a log rather than messages ready).
async fn queued(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> anyhow::Result<Option<u32>> {
    if queue_type == QueueType::Stream {
        return Ok(None);
    }
    broker::queue_len(channel, queue).await.map(Some)
}
