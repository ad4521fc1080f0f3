//! A small stream reader: subscribes from an offset and decodes what the
//! broker delivers, either until the stream has been quiet for a while
//! ([`read_stream`], for tests and for checking a stream by hand) or for as
//! long as the caller wants, following new messages as they are stored
//! ([`Subscription`], for services that replay a stream and then stay live,
//! like `examples/stream_replay.rs`). A production consumer with needs
//! beyond that (single active consumer, server-side offsets, TLS) would use a
//! full client library.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::StreamConfig;
use super::amqp::{self, StreamMessage};
use super::wire::{self, Conn, Frame, Reader};

/// Chunks the broker may send ahead of what we have read.
const CREDIT: u16 = 16;

/// A subscription to one stream, from an offset on: the stream's history
/// first, then each message as the broker stores it.
pub struct Subscription {
    write: wire::WriteHalf,
    frames: mpsc::Receiver<Result<Vec<u8>, String>>,
    reader: JoinHandle<()>,
    /// The next offset wanted: anything below it is skipped.
    next: u64,
    /// Send a heartbeat when we wrote nothing for this long (`None`: the
    /// broker wants none).
    heartbeat: Option<Duration>,
    last_write: Instant,
    timeout: Duration,
}

impl Subscription {
    /// Connects and subscribes to `cfg.stream` from `offset` (0: the first
    /// message the stream still holds).
    pub async fn open(cfg: &StreamConfig, offset: u64) -> Result<Subscription, String> {
        let t = cfg.connect_timeout;
        let mut conn = Conn::open(cfg.endpoint(), &cfg.connection_name, t).await?;
        let r = conn
            .call(t, "subscribing", |c| {
                Frame::new(wire::SUBSCRIBE)
                    .u32(c)
                    .u8(0)
                    .str(&cfg.stream)
                    .u16(4) // offset
                    .u64(offset)
                    .u16(CREDIT)
                    .u32(0) // no properties
            })
            .await?;
        wire::expect_ok(&format!("subscribing to {:?}", cfg.stream), r.code)?;
        let heartbeat =
            (conn.heartbeat > 0).then(|| Duration::from_secs(u64::from(conn.heartbeat)) / 2);
        let Conn {
            mut read, write, ..
        } = conn;
        // Reading a frame is not cancel-safe: one task reads them whole.
        let (tx, frames) = mpsc::channel(CREDIT as usize + 8);
        let reader = tokio::spawn(async move {
            loop {
                let frame = wire::read_frame(&mut read)
                    .await
                    .map_err(|e| format!("reading the stream: {e}"));
                let end = frame.is_err();
                if tx.send(frame).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Subscription {
            write,
            frames,
            reader,
            next: offset,
            heartbeat,
            last_write: Instant::now(),
            timeout: t,
        })
    }

    /// The offset after the last message delivered (where a restart resumes).
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    async fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        tokio::time::timeout(self.timeout, self.write.write_all(frame))
            .await
            .map_err(|_| format!("write: no progress within {:?}", self.timeout))?
            .map_err(|e| format!("write: {e}"))?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// The messages of the next chunk the broker delivers, waiting at most
    /// `wait`: empty when nothing came. Keeps the connection alive (credit,
    /// heartbeats) meanwhile. A deleted stream or a closed connection is an
    /// error.
    pub async fn next_batch(&mut self, wait: Duration) -> Result<Vec<StreamMessage>, String> {
        let deadline = Instant::now() + wait;
        loop {
            let beat_at = self.heartbeat.map(|h| self.last_write + h);
            let until = beat_at.map_or(deadline, |b| b.min(deadline));
            let frame = match tokio::time::timeout_at(until, self.frames.recv()).await {
                Err(_) if Instant::now() >= deadline => return Ok(Vec::new()),
                Err(_) => {
                    self.send(&Frame::new(wire::HEARTBEAT).finish()).await?;
                    continue;
                }
                Ok(None) => return Err("the stream connection is gone".into()),
                Ok(Some(frame)) => frame?,
            };
            let mut r = Reader::new(&frame);
            let key = r.u16()?;
            r.u16()?;
            match key {
                wire::DELIVER => {
                    r.u8()?; // subscription id
                    let mut out = Vec::new();
                    read_chunk(&mut r, self.next, &mut out)?;
                    self.send(&Frame::new(wire::CREDIT).u8(0).u16(1).finish())
                        .await?;
                    if let Some(last) = out.last() {
                        self.next = last.offset + 1;
                        return Ok(out);
                    }
                }
                wire::CLOSE => {
                    r.u32()?;
                    let code = r.u16()?;
                    return Err(format!(
                        "the broker closed the connection ({}: {})",
                        wire::code_text(code),
                        r.str()?
                    ));
                }
                wire::METADATA_UPDATE => {
                    let code = r.u16()?;
                    return Err(format!(
                        "stream {:?} is no longer available ({})",
                        r.str()?,
                        wire::code_text(code)
                    ));
                }
                k if k == wire::CREDIT | wire::RESPONSE => {
                    return Err(format!(
                        "the broker refused credit: {}",
                        wire::code_text(r.u16()?)
                    ));
                }
                _ => {} // heartbeats
            }
        }
    }

    /// Says goodbye (the socket closes on drop).
    pub async fn close(mut self) {
        let _ = self.send(&wire::close_frame("done")).await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads every message from `from_offset` on until the broker has sent
/// nothing for `idle`, or `limit` messages came.
pub async fn read_stream(
    cfg: &StreamConfig,
    from_offset: u64,
    idle: Duration,
    limit: usize,
) -> Result<Vec<StreamMessage>, String> {
    let mut cfg = cfg.clone();
    cfg.connection_name = "odoo-cdc reader".into();
    let mut sub = Subscription::open(&cfg, from_offset).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let batch = sub.next_batch(idle).await?;
        if batch.is_empty() {
            break;
        }
        out.extend(batch);
    }
    sub.close().await;
    out.truncate(limit);
    Ok(out)
}

/// One osiris chunk: a header, then entries, each a simple entry (`u32` size
/// with the top bit clear, then the message) or a sub-batch (top bit set).
fn read_chunk(r: &mut Reader<'_>, from: u64, out: &mut Vec<StreamMessage>) -> Result<(), String> {
    let _magic_version = r.u8()?;
    let chunk_type = r.u8()?;
    let entries = r.u16()?;
    let _records = r.u32()?;
    let _timestamp = r.u64()?;
    let _epoch = r.u64()?;
    let first_offset = r.u64()?;
    let _crc = r.u32()?;
    let _data_length = r.u32()?;
    let _trailer_length = r.u32()?;
    let _reserved = r.u32()?;
    if chunk_type != 0 {
        return Ok(()); // tracking chunks carry no messages
    }
    let mut offset = first_offset;
    let mut push = |bytes: &[u8], offset: u64| -> Result<(), String> {
        if offset >= from {
            let mut m = amqp::decode(bytes)?;
            m.offset = offset;
            out.push(m);
        }
        Ok(())
    };
    for _ in 0..entries {
        let head = r.u32()?;
        if head & 0x8000_0000 == 0 {
            push(r.take(head as usize)?, offset)?;
            offset += 1;
            continue;
        }
        // sub-batch: compression in bits 28..30 of the first word's top byte
        let compression = (head >> 28) & 0x7;
        let records = (head >> 8) & 0xffff;
        let _uncompressed =
            ((head & 0xff) << 24) | (r.take(3)?.iter().fold(0, |a, &b| (a << 8) | u32::from(b)));
        let length = r.u32()?;
        let data = r.take(length as usize)?;
        if compression != 0 {
            return Err("compressed sub-batches are not supported".into());
        }
        let mut sub = Reader::new(data);
        for _ in 0..records {
            let n = sub.u32()?;
            push(sub.take(n as usize)?, offset)?;
            offset += 1;
        }
    }
    Ok(())
}

/// Deletes a stream (tests and tooling); a missing stream is not an error.
pub async fn delete_stream(cfg: &StreamConfig) -> Result<(), String> {
    let t = cfg.connect_timeout;
    let mut conn = Conn::open(cfg.endpoint(), "odoo-cdc admin", t).await?;
    let r = conn
        .call(t, "deleting the stream", |c| {
            Frame::new(wire::DELETE).u32(c).str(&cfg.stream)
        })
        .await?;
    if r.code != wire::OK && r.code != wire::STREAM_DOES_NOT_EXIST {
        return Err(format!("deleting the stream: {}", wire::code_text(r.code)));
    }
    Ok(())
}
