//! Message framing on the backend protocol: buffered frame reading, buffered
//! writing, and the few message bodies we decode ourselves (error fields, data
//! rows, SASL mechanism lists) with every length checked.
//!
//! Frames are `tag: u8, len: i32 (counts itself), body`. The reader keeps one
//! `BytesMut` and reads as much as the socket has into it, then splits complete
//! frames off without copying, so a burst of small WAL messages costs one syscall.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::coalesce::Coalescer;
use super::error::{ReplicationError, ServerError};

/// PostgreSQL never builds a message larger than 1 GiB (`MaxAllocSize`); anything
/// bigger is corruption, and must not size an allocation.
pub(crate) const MAX_FRAME_LEN: usize = 1 << 30;
/// How much free space to ask for before a read: large enough that a busy stream
/// needs few reads, small enough not to matter per connection.
const READ_CHUNK: usize = 128 * 1024;
/// A frame announced as large is read in steps of this size at most, so a bogus
/// length cannot make us allocate a gigabyte before any of it has arrived.
const MAX_RESERVE_STEP: usize = 8 * 1024 * 1024;

/// Header size: tag byte plus the length word.
pub(crate) const HEADER_LEN: usize = 5;

/// Reads whole backend frames from a byte stream.
pub(crate) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    /// Set once the WAL stream starts, on TCP sockets (see [`super::coalesce`]).
    coalesce: Option<Coalescer>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(READ_CHUNK),
            coalesce: None,
        }
    }

    /// From now on, read the socket in large batches while it is busy.
    pub(crate) fn coalesce(&mut self, coalescer: Option<Coalescer>) {
        self.coalesce = coalescer;
    }

    /// The next complete frame, header included (`frame[0]` is the tag).
    ///
    /// Cancel-safe: bytes already read stay in the buffer, and a frame is only
    /// split off once it is complete, so dropping this future loses nothing.
    pub(crate) async fn read_frame(
        &mut self,
        context: &'static str,
    ) -> Result<BytesMut, ReplicationError> {
        loop {
            if let Some(frame) = self.try_split()? {
                return Ok(frame);
            }
            let n = self
                .read_more()
                .await
                .map_err(|e| ReplicationError::io(context, e))?;
            if n == 0 {
                return Err(ReplicationError::Closed { context });
            }
        }
    }

    /// One read into the buffer. While coalescing, waits at most the
    /// coalescer's bound for the kernel to wake it, then takes what is there.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let Some(c) = self.coalesce.as_mut() else {
            return self.rd.read_buf(&mut self.buf).await;
        };
        let read = match c.max_wait() {
            None => self.rd.read_buf(&mut self.buf).await,
            Some(wait) => match tokio::time::timeout(wait, self.rd.read_buf(&mut self.buf)).await {
                Ok(read) => read,
                Err(_) => {
                    // Fewer than LOWAT bytes arrived in time: take them.
                    c.release();
                    self.rd.read_buf(&mut self.buf).await
                }
            },
        };
        if let Ok(n @ 1..) = read {
            c.observe(n);
        }
        read
    }

    fn try_split(&mut self) -> Result<Option<BytesMut>, ReplicationError> {
        if self.buf.len() < HEADER_LEN {
            self.buf.reserve(READ_CHUNK);
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_FRAME_LEN).contains(&len) {
            return Err(ReplicationError::Protocol(format!(
                "message {:?} announces an invalid length {len}",
                char::from(self.buf[0])
            )));
        }
        let total = len + 1;
        if self.buf.len() < total {
            let missing = total - self.buf.len();
            self.buf
                .reserve(missing.clamp(READ_CHUNK, MAX_RESERVE_STEP));
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(total)))
    }
}

/// Buffers outgoing messages and writes them out.
pub(crate) struct FrameWriter<W> {
    wr: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(wr: W) -> Self {
        FrameWriter {
            wr,
            buf: BytesMut::with_capacity(256),
        }
    }

    /// The buffer to encode the next message(s) into (postgres-protocol's
    /// `frontend` functions append to it).
    pub(crate) fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Writes everything buffered and flushes. If this future is dropped midway
    /// the unwritten rest stays buffered and goes out first on the next call, so
    /// a message is never torn.
    pub(crate) async fn flush(&mut self, context: &'static str) -> Result<(), ReplicationError> {
        self.wr
            .write_all_buf(&mut self.buf)
            .await
            .map_err(|e| ReplicationError::io(context, e))?;
        self.wr
            .flush()
            .await
            .map_err(|e| ReplicationError::io(context, e))
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

/// Splits a NUL-terminated string off the front of `body`.
fn take_cstr<'a>(body: &mut &'a [u8], what: &str) -> Result<&'a [u8], ReplicationError> {
    let end = body.iter().position(|&b| b == 0).ok_or_else(|| {
        ReplicationError::Protocol(format!("{what}: string is not NUL-terminated"))
    })?;
    let s = &body[..end];
    *body = &body[end + 1..];
    Ok(s)
}

/// Decodes the body of an `ErrorResponse` or `NoticeResponse`.
pub(crate) fn parse_error_fields(mut body: &[u8]) -> Result<ServerError, ReplicationError> {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut localized_severity = String::new();
    loop {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(ReplicationError::Protocol(
                "error response: missing terminator".into(),
            ));
        };
        body = rest;
        if kind == 0 {
            break;
        }
        let value = String::from_utf8_lossy(take_cstr(&mut body, "error response")?).into_owned();
        match kind {
            b'V' => e.severity = value,
            b'S' => localized_severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    if e.severity.is_empty() {
        e.severity = localized_severity;
    }
    Ok(e)
}

/// Decodes a `DataRow` body into text values (`None` for SQL NULL).
pub(crate) fn parse_data_row(mut body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let bad = |why: &str| ReplicationError::Protocol(format!("data row: {why}"));
    if body.len() < 2 {
        return Err(bad("too short for the column count"));
    }
    let count = usize::from(body.get_u16());
    // Each column needs at least its 4-byte length: bound the allocation by what
    // actually arrived.
    if count > body.len() / 4 {
        return Err(bad("column count exceeds the message"));
    }
    let mut row = Vec::with_capacity(count);
    for _ in 0..count {
        if body.len() < 4 {
            return Err(bad("truncated column length"));
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(bad("column value runs past the message"));
        }
        let text = std::str::from_utf8(&body[..len])
            .map_err(|_| bad("column value is not UTF-8"))?
            .to_string();
        body.advance(len);
        row.push(Some(text));
    }
    if !body.is_empty() {
        return Err(bad("trailing bytes after the last column"));
    }
    Ok(row)
}

/// Decodes the mechanism list of `AuthenticationSASL` (after the auth code).
pub(crate) fn parse_sasl_mechanisms(mut body: &[u8]) -> Result<Vec<String>, ReplicationError> {
    let mut out = Vec::new();
    loop {
        let m = take_cstr(&mut body, "SASL mechanism list")?;
        if m.is_empty() {
            return Ok(out);
        }
        out.push(String::from_utf8_lossy(m).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn splits_frames_across_and_within_reads() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx);
        let big = vec![7u8; 1000];
        let mut wire = frame(b'd', b"hello");
        wire.extend(frame(b'd', &big));
        wire.extend(frame(b'Z', b"I"));
        let writer = tokio::spawn(async move {
            // small writes: frames arrive in pieces and several per read
            for chunk in wire.chunks(7) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let f1 = reader.read_frame("test").await.unwrap();
        assert_eq!(&f1[..], &frame(b'd', b"hello")[..]);
        let f2 = reader.read_frame("test").await.unwrap();
        assert_eq!(f2.len(), 1005);
        let f3 = reader.read_frame("test").await.unwrap();
        assert_eq!(&f3[HEADER_LEN..], b"I");
        writer.await.unwrap();
        // writer dropped: clean EOF is reported as a closed connection
        assert!(matches!(
            reader.read_frame("test").await,
            Err(ReplicationError::Closed { .. })
        ));
    }

    #[tokio::test]
    async fn rejects_bad_lengths_without_allocating() {
        for len in [0u32, 3, (MAX_FRAME_LEN + 1) as u32, u32::MAX] {
            let (mut tx, rx) = tokio::io::duplex(64);
            let mut reader = FrameReader::new(rx);
            let mut wire = vec![b'd'];
            wire.extend_from_slice(&len.to_be_bytes());
            tx.write_all(&wire).await.unwrap();
            assert!(
                matches!(
                    reader.read_frame("test").await,
                    Err(ReplicationError::Protocol(_))
                ),
                "len {len}"
            );
        }
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx);
        tx.write_all(&frame(b'd', b"hello")[..6]).await.unwrap();
        drop(tx);
        assert!(matches!(
            reader.read_frame("test").await,
            Err(ReplicationError::Closed { .. })
        ));
    }

    #[test]
    fn parses_error_fields() {
        let body =
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Dd\0Hh\0Ffile.c\0\0";
        let e = parse_error_fields(body).unwrap();
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42704");
        assert_eq!(e.message, "replication slot \"x\" does not exist");
        assert_eq!(e.detail.as_deref(), Some("d"));
        assert_eq!(e.hint.as_deref(), Some("h"));
        assert!(parse_error_fields(b"SERROR\0C427").is_err());
        assert!(parse_error_fields(b"").is_err());
    }

    #[test]
    fn parses_data_rows_with_bounds_checks() {
        let mut body = vec![0, 3];
        body.extend(2i32.to_be_bytes());
        body.extend(b"ab");
        body.extend((-1i32).to_be_bytes());
        body.extend(0i32.to_be_bytes());
        assert_eq!(
            parse_data_row(&body).unwrap(),
            vec![Some("ab".to_string()), None, Some(String::new())]
        );
        // every truncation is an error, never a panic
        for cut in 0..body.len() {
            assert!(parse_data_row(&body[..cut]).is_err(), "cut {cut}");
        }
        // a huge column count is refused before allocating
        assert!(parse_data_row(&[0xff, 0xff, 0, 0, 0, 0]).is_err());
        // a length that runs past the end
        let mut bad = vec![0, 1];
        bad.extend(i32::MAX.to_be_bytes());
        assert!(parse_data_row(&bad).is_err());
    }

    #[test]
    fn parses_sasl_mechanisms() {
        assert_eq!(
            parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap(),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert!(parse_sasl_mechanisms(b"SCRAM").is_err());
    }
}
