//! A small stream reader: subscribes from an offset and decodes what the
//! broker delivers. For tests and for checking a stream by hand; consumers in
//! production would use a full client library.

use std::time::Duration;

use super::StreamConfig;
use super::amqp::{self, StreamMessage};
use super::wire::{self, Conn, Frame, Reader};

/// Reads every message from `from_offset` on until the broker has sent
/// nothing for `idle`, or `limit` messages came.
pub async fn read_stream(
    cfg: &StreamConfig,
    from_offset: u64,
    idle: Duration,
    limit: usize,
) -> Result<Vec<StreamMessage>, String> {
    let t = cfg.connect_timeout;
    let mut conn = Conn::open(cfg.endpoint(), "odoo-cdc reader", t).await?;
    let r = conn
        .call(t, "subscribing", |c| {
            Frame::new(wire::SUBSCRIBE)
                .u32(c)
                .u8(0)
                .str(&cfg.stream)
                .u16(4) // offset
                .u64(from_offset)
                .u16(16) // credit, in chunks
                .u32(0) // no properties
        })
        .await?;
    wire::expect_ok("subscribing", r.code)?;
    let mut out = Vec::new();
    while out.len() < limit {
        let frame = match tokio::time::timeout(idle, wire::read_frame(&mut conn.read)).await {
            Err(_) => break,
            Ok(f) => f.map_err(|e| format!("reading the stream: {e}"))?,
        };
        let mut r = Reader::new(&frame);
        let key = r.u16()?;
        r.u16()?;
        if key != wire::DELIVER {
            continue;
        }
        r.u8()?; // subscription id
        read_chunk(&mut r, from_offset, &mut out)?;
        let credit = Frame::new(wire::CREDIT).u8(0).u16(1).finish();
        conn.send(&credit, t).await?;
    }
    conn.close(t, "done").await;
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
