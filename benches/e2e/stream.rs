//! The stream ceiling: a plain stream-protocol producer (no CDC) appending
//! messages to a fresh stream as fast as the broker confirms them, built from
//! the crate's own protocol pieces (`odoo_cdc::sink::stream::wire`) and
//! message encoder (`sink::stream::amqp`), and sending what the stream sink
//! sends: AMQP 1.0 messages with the properties and application properties
//! of a row event, one named producer with increasing publishing ids (the
//! broker deduplicates on them, as for the sink), batched the way the sink's
//! writer batches (one Publish frame holds what the window lets out, up to
//! the broker's frame limit and 4,096 messages, see `src/sink/stream/io.rs`),
//! with at most `window` messages unconfirmed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use odoo_cdc::sink::HeaderValue;
use odoo_cdc::sink::stream::StreamConfig;
use odoo_cdc::sink::stream::amqp::{Parts, encode};
use odoo_cdc::sink::stream::consumer::delete_stream;
use odoo_cdc::sink::stream::wire::{self, Conn, Endpoint, Frame, Reader};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::Semaphore;
use tokio::time::timeout;

/// Bound on each setup call and on the wait for each confirm.
pub const STEP: Duration = Duration::from_secs(30);

/// Messages gathered into one Publish frame at most (as the sink's writer).
const GATHER: usize = 4096;

/// The named producer's id on the connection.
const PRODUCER: u8 = 0;

/// Message `i` with a body of `body`, encoded as the stream sink encodes a
/// row event (message id, subject, content type, creation time; the five
/// headers and the routing key as application properties).
pub fn event(i: u64, body: &[u8]) -> Vec<u8> {
    let lsn = 0x16B_3748 + i * 0x60;
    let commit = lsn + 0x58;
    let mut headers = BTreeMap::new();
    headers.insert(
        "x-commit-lsn".to_owned(),
        HeaderValue::Str(format!("0/{commit:X}")),
    );
    headers.insert("x-lsn".to_owned(), HeaderValue::Str(format!("0/{lsn:X}")));
    headers.insert("x-op".to_owned(), HeaderValue::Str("c".into()));
    headers.insert(
        "x-table".to_owned(),
        HeaderValue::Str("public.sale_order_line".into()),
    );
    headers.insert("x-xid".to_owned(), HeaderValue::Int(745 + i as i64));
    encode(&Parts {
        message_id: &format!("{commit:016X}-00000000"),
        subject: "sale.order.line.create",
        content_type: "application/json",
        timestamp: 1_790_000_000,
        routing_key: "odoo.public.sale_order_line.insert",
        headers: &headers,
        body,
    })
}

/// Creates `stream` (it must not exist), publishes `messages` bodies of
/// `size` bytes keeping at most `window` unconfirmed, and deletes the stream
/// again. Returns the seconds from the first publish to the last confirm.
pub async fn publish(
    url: &str,
    stream: &str,
    messages: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    if window == 0 {
        bail!("the confirm window must be at least 1");
    }
    let ep = Endpoint::parse(url).map_err(|e| anyhow!("{e}"))?;
    let mut conn = Conn::open(&ep, "odoo-cdc-bench stream ceiling", STEP)
        .await
        .map_err(|e| anyhow!("connecting to the stream port: {e}"))?;
    let r = conn
        .call(STEP, "creating the stream", |c| {
            Frame::new(wire::CREATE).u32(c).str(stream).u32(0)
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
    wire::expect_ok(&format!("creating stream {stream:?}"), r.code).map_err(|e| anyhow!("{e}"))?;
    let secs = publish_to(conn, stream, messages, size, window).await;
    let cfg = StreamConfig::new(url, stream, "odoo-cdc-bench").map_err(|e| anyhow!("{e}"))?;
    delete_stream(&cfg)
        .await
        .map_err(|e| anyhow!("deleting stream {stream:?}: {e}"))?;
    secs
}

async fn publish_to(
    mut conn: Conn,
    stream: &str,
    messages: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let r = conn
        .call(STEP, "declaring the producer", |c| {
            Frame::new(wire::DECLARE_PUBLISHER)
                .u32(c)
                .u8(PRODUCER)
                .str("odoo-cdc-bench-ceiling")
                .str(stream)
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
    wire::expect_ok("declaring the producer", r.code).map_err(|e| anyhow!("{e}"))?;
    let frame_max = conn.frame_max as usize;
    let body = vec![b'x'; size];
    // size, key, version, producer id, count; then per message id and length
    const FRAME_HEAD: usize = 4 + 4 + 1 + 4;
    // The largest message: ids and LSNs only grow.
    let per_message = 12 + event(messages, &body).len();
    if FRAME_HEAD + per_message > frame_max {
        bail!(
            "a message of {per_message} bytes does not fit the broker's frame limit ({frame_max})"
        );
    }

    let Conn {
        mut read, write, ..
    } = conn;
    let room = Arc::new(Semaphore::new(window));
    let confirms = {
        let room = room.clone();
        tokio::spawn(async move {
            let mut confirmed = 0u64;
            while confirmed < messages {
                let frame = timeout(STEP, wire::read_frame(&mut read))
                    .await
                    .map_err(|_| anyhow!("no confirm within {STEP:?}"))?
                    .context("reading confirms")?;
                let mut r = Reader::new(&frame);
                let key = r.u16().map_err(|e| anyhow!("{e}"))?;
                r.u16().map_err(|e| anyhow!("{e}"))?;
                match key {
                    wire::PUBLISH_CONFIRM => {
                        r.u8().map_err(|e| anyhow!("{e}"))?;
                        let n = r.u32().map_err(|e| anyhow!("{e}"))?;
                        confirmed += u64::from(n);
                        room.add_permits(n as usize);
                    }
                    wire::PUBLISH_ERROR => {
                        r.u8().map_err(|e| anyhow!("{e}"))?;
                        r.u32().map_err(|e| anyhow!("{e}"))?;
                        let id = r.u64().map_err(|e| anyhow!("{e}"))?;
                        let code = r.u16().map_err(|e| anyhow!("{e}"))?;
                        bail!("message {id} refused: {}", wire::code_text(code));
                    }
                    wire::CLOSE => bail!("the broker closed the stream connection"),
                    _ => {} // heartbeats
                }
            }
            Ok::<_, anyhow::Error>(read)
        })
    };

    let mut w = BufWriter::with_capacity(256 * 1024, write);
    let start = Instant::now();
    let mut next = 0u64;
    while next < messages {
        // Wait for room for one message, then take what else the window
        // lets out now: that is what the sink's writer finds queued.
        match timeout(STEP, room.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_)) => bail!("window closed"),
            Err(_) => {
                confirms.abort();
                bail!("no confirm within {STEP:?}");
            }
        }
        let mut count = 1;
        let mut bytes = FRAME_HEAD + per_message;
        while count < GATHER
            && next + (count as u64) < messages
            && bytes + per_message <= frame_max
            && let Ok(permit) = room.try_acquire()
        {
            permit.forget();
            count += 1;
            bytes += per_message;
        }
        let mut frame = Frame::new(wire::PUBLISH).u8(PRODUCER).u32(count as u32);
        for _ in 0..count {
            // Publishing ids start at 1 and increase, as deduplication wants.
            next += 1;
            frame = frame.u64(next).bytes(&event(next, &body));
        }
        if let Err(e) = async {
            w.write_all(&frame.finish()).await?;
            w.flush().await
        }
        .await
        {
            confirms.abort();
            bail!("writing to the stream connection: {e}");
        }
        if confirms.is_finished() {
            break; // an error: reported below
        }
    }
    let read = confirms.await.context("confirm reader")??;
    let secs = start.elapsed().as_secs_f64();
    let _ = w.write_all(&wire::close_frame("bench done")).await;
    let _ = w.flush().await;
    drop(read);
    Ok(secs)
}
