//! The replication stream (COPY BOTH): XLogData and keepalives in, standby status
//! updates out. The two directions are separate halves so a reader task can wait
//! on the socket while another task reports progress.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{ReadHalf, WriteHalf};

use super::connection::{BoxStream, log_notice};
use super::error::ReplicationError;
use super::wire::{FrameReader, FrameWriter, HEADER_LEN, parse_error_fields};
use crate::lsn::Lsn;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// Now, as microseconds since 2000-01-01 UTC (the replication protocol's clock).
pub fn pg_now_micros() -> i64 {
    system_time_to_pg_micros(SystemTime::now())
}

/// A wall-clock time as microseconds since 2000-01-01 UTC.
pub fn system_time_to_pg_micros(t: SystemTime) -> i64 {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    match t.duration_since(pg_epoch) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// Microseconds since 2000-01-01 UTC (a `send_time` or commit time) as a wall-clock time.
pub fn pg_micros_to_system_time(us: i64) -> SystemTime {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 { pg_epoch + d } else { pg_epoch - d }
}

/// One message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one pgoutput message in `data`.
    XLogData {
        /// Where this data starts in the WAL.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock at sending, µs since 2000-01-01 UTC.
        send_time: i64,
        data: Bytes,
    },
    /// Primary keepalive. When `reply_requested`, answer with a status update
    /// soon, or the server ends the connection after `wal_sender_timeout`.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes the payload of one CopyData message of the replication stream.
pub fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    match payload.first() {
        Some(b'w') => {
            if payload.len() < XLOG_DATA_HEADER {
                return Err(ReplicationError::Protocol(format!(
                    "XLogData of {} bytes is shorter than its {XLOG_DATA_HEADER}-byte header",
                    payload.len()
                )));
            }
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(be_u64(&payload[1..])),
                wal_end: Lsn(be_u64(&payload[9..])),
                send_time: be_u64(&payload[17..]) as i64,
                data: payload.slice(XLOG_DATA_HEADER..),
            })
        }
        Some(b'k') => {
            if payload.len() < KEEPALIVE_LEN {
                return Err(ReplicationError::Protocol(format!(
                    "keepalive of {} bytes, expected {KEEPALIVE_LEN}",
                    payload.len()
                )));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(be_u64(&payload[1..])),
                send_time: be_u64(&payload[9..]) as i64,
                reply_requested: payload[17] != 0,
            })
        }
        Some(&other) => Err(ReplicationError::Protocol(format!(
            "unknown replication message type {:?} (0x{other:02x})",
            char::from(other)
        ))),
        None => Err(ReplicationError::Protocol(
            "empty CopyData in the replication stream".into(),
        )),
    }
}

/// Encodes a standby status update (`r`) as a CopyData message into `out`.
pub(crate) fn encode_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) -> Result<(), ReplicationError> {
    let mut payload = [0u8; 34];
    let mut p = &mut payload[..];
    p.put_u8(b'r');
    p.put_u64(write.0);
    p.put_u64(flush.0);
    p.put_u64(apply.0);
    p.put_i64(client_time);
    p.put_u8(u8::from(reply_requested));
    frontend::CopyData::new(&payload[..])
        .map_err(|e| ReplicationError::Protocol(format!("encoding a status update: {e}")))?
        .write(out);
    Ok(())
}

/// The streaming walsender connection. Use it whole, or [`split`](Self::split) it
/// into a reader and a status sender for two tasks.
pub struct ReplicationStream {
    reader: ReplicationReader,
    sender: StatusSender,
}

impl ReplicationStream {
    pub(crate) fn new(
        reader: FrameReader<ReadHalf<BoxStream>>,
        writer: FrameWriter<WriteHalf<BoxStream>>,
        write_timeout: Duration,
    ) -> Self {
        ReplicationStream {
            reader: ReplicationReader {
                frames: reader,
                state: ReaderState::Streaming,
            },
            sender: StatusSender {
                writer,
                write_timeout,
                finished: false,
            },
        }
    }

    /// See [`ReplicationReader::next`].
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        self.reader.next().await
    }

    /// See [`StatusSender::send_status`].
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        self.sender
            .send_status(write, flush, apply, reply_requested)
            .await
    }

    /// See [`StatusSender::finish`].
    pub async fn finish(&mut self) -> Result<(), ReplicationError> {
        self.sender.finish().await
    }

    /// Separates the directions. Both halves share the socket but never wait on
    /// each other: a pending read does not delay a status update.
    pub fn split(self) -> (ReplicationReader, StatusSender) {
        (self.reader, self.sender)
    }
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("reader", &self.reader)
            .field("sender", &self.sender)
            .finish()
    }
}

impl std::fmt::Debug for ReplicationReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationReader")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StatusSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusSender")
            .field("write_timeout", &self.write_timeout)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// The receiving half of a replication stream.
pub struct ReplicationReader {
    frames: FrameReader<ReadHalf<BoxStream>>,
    state: ReaderState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    Streaming,
    /// The server sent CopyDone.
    Ended,
    /// An error was returned; the stream position is unknown from here on.
    Failed,
}

impl ReplicationReader {
    /// The next message; `None` once the server has ended COPY (after
    /// [`StatusSender::finish`], or at the end of a timeline), and on every call
    /// after that. After an error, every later call fails with
    /// [`ReplicationError::Broken`]: reconnect and restart from the slot.
    ///
    /// Waits as long as it takes: the server sends keepalives, and the caller
    /// bounds the wait if it wants to. Cancel-safe, so it can sit in a
    /// `tokio::select!` loop.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        match self.state {
            ReaderState::Streaming => {}
            ReaderState::Ended => return Ok(None),
            ReaderState::Failed => return Err(ReplicationError::Broken),
        }
        let result = self.read_message().await;
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = ReaderState::Ended,
            Err(_) => self.state = ReaderState::Failed,
        }
        result
    }

    async fn read_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        const CONTEXT: &str = "streaming WAL";
        loop {
            let mut frame = self.frames.read_frame(CONTEXT).await?;
            match frame[0] {
                b'd' => {
                    let _ = frame.split_to(HEADER_LEN);
                    return parse_copy_data(frame.freeze()).map(Some);
                }
                b'c' => return Ok(None),
                // A walsender that shuts down with the server (pg_ctl stop/restart)
                // once caught up ends with CommandComplete ("COPY 0") and no
                // CopyDone (WalSndDone in walsender.c): the stream ended, which is
                // retryable, not a protocol violation.
                b'C' => return Ok(None),
                b'E' => {
                    return Err(ReplicationError::Server(parse_error_fields(
                        &frame[HEADER_LEN..],
                    )?));
                }
                b'N' => log_notice(&parse_error_fields(&frame[HEADER_LEN..])?),
                // A configuration reload can report changed parameters at any time.
                b'S' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} during replication",
                        char::from(other)
                    )));
                }
            }
        }
    }
}

/// The sending half of a replication stream.
pub struct StatusSender {
    writer: FrameWriter<WriteHalf<BoxStream>>,
    write_timeout: Duration,
    finished: bool,
}

impl StatusSender {
    /// Sends a standby status update: WAL up to `write` is received, up to `flush`
    /// is durably handled (this moves the slot's `confirmed_flush_lsn` and lets
    /// the server recycle WAL), up to `apply` is applied. Never report a flush
    /// position whose changes are not safely delivered. With `reply_requested`,
    /// the server answers with a keepalive at once.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        if self.finished {
            return Err(ReplicationError::Protocol(
                "status update after the stream was finished".into(),
            ));
        }
        encode_status_update(
            write,
            flush,
            apply,
            pg_now_micros(),
            reply_requested,
            self.writer.buf(),
        )?;
        self.flush("sending a standby status update").await
    }

    /// Ends streaming (CopyDone). The server then ends its side, and the reader
    /// returns `None` after the messages already on their way.
    pub async fn finish(&mut self) -> Result<(), ReplicationError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        frontend::copy_done(self.writer.buf());
        self.flush("ending replication").await
    }

    async fn flush(&mut self, what: &'static str) -> Result<(), ReplicationError> {
        let after = self.write_timeout;
        tokio::time::timeout(after, self.writer.flush(what))
            .await
            .map_err(|_| ReplicationError::Timeout {
                what: what.to_string(),
                after,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlog(start: u64, end: u64, time: i64, data: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(start);
        b.put_u64(end);
        b.put_i64(time);
        b.put_slice(data);
        b.freeze()
    }

    #[test]
    fn parses_xlog_data() {
        let m = parse_copy_data(xlog(0x10, 0x20, 12345, b"Bxyz")).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                send_time: 12345,
                data: Bytes::from_static(b"Bxyz"),
            }
        );
        // empty data is fine
        assert!(parse_copy_data(xlog(1, 2, 3, b"")).is_ok());
    }

    #[test]
    fn parses_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x1_0000_0001);
        b.put_i64(-5);
        b.put_u8(1);
        assert_eq!(
            parse_copy_data(b.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x1_0000_0001),
                send_time: -5,
                reply_requested: true
            }
        );
    }

    #[test]
    fn short_or_unknown_frames_are_errors_not_panics() {
        let full = xlog(1, 2, 3, b"");
        for cut in 0..full.len() {
            assert!(parse_copy_data(full.slice(..cut)).is_err(), "cut {cut}");
        }
        for cut in 0..KEEPALIVE_LEN {
            let mut k = vec![b'k'];
            k.resize(cut.max(1), 0);
            assert!(parse_copy_data(Bytes::from(k)).is_err(), "cut {cut}");
        }
        assert!(parse_copy_data(Bytes::from_static(b"x123")).is_err());
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        encode_status_update(Lsn(1), Lsn(2), Lsn(3), 4, true, &mut out).unwrap();
        assert_eq!(out[0], b'd');
        assert_eq!(&out[1..5], &38u32.to_be_bytes());
        assert_eq!(out[5], b'r');
        assert_eq!(&out[6..14], &1u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
        assert_eq!(&out[22..30], &3u64.to_be_bytes());
        assert_eq!(&out[30..38], &4i64.to_be_bytes());
        assert_eq!(out[38], 1);
        assert_eq!(out.len(), 39);
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// The reader, and the server end (kept open: the reader must stop on
    /// CopyDone, not on EOF).
    async fn reader_over(wire: Vec<u8>) -> (ReplicationReader, tokio::io::DuplexStream) {
        use tokio::io::AsyncWriteExt;
        let (mut server, client) = tokio::io::duplex(1 << 16);
        server.write_all(&wire).await.unwrap();
        let stream: BoxStream = Box::new(client);
        let (rd, wr) = tokio::io::split(stream);
        let stream = ReplicationStream::new(
            FrameReader::new(rd),
            FrameWriter::new(wr),
            Duration::from_secs(1),
        );
        (stream.split().0, server)
    }

    #[tokio::test]
    async fn a_walsender_shutting_down_ends_the_stream_with_command_complete() {
        let mut wire = frame(b'd', &xlog(1, 2, 3, b"B"));
        wire.extend(frame(b'C', b"COPY 0\0"));
        let (mut reader, _server) = reader_over(wire).await;
        assert!(matches!(
            reader.next().await,
            Ok(Some(ReplicationMessage::XLogData { .. }))
        ));
        assert!(matches!(reader.next().await, Ok(None)));
    }

    #[tokio::test]
    async fn reader_skips_notices_and_ends_on_copy_done() {
        let mut wire = frame(b'N', b"SNOTICE\0C00000\0Mhello\0\0");
        wire.extend(frame(b'd', &xlog(1, 2, 3, b"B")));
        wire.extend(frame(b'S', b"TimeZone\0UTC\0"));
        wire.extend(frame(b'c', b""));
        let (mut reader, _server) = reader_over(wire).await;
        assert!(matches!(
            reader.next().await,
            Ok(Some(ReplicationMessage::XLogData { .. }))
        ));
        assert!(matches!(reader.next().await, Ok(None)));
        assert!(matches!(reader.next().await, Ok(None)));
    }

    #[tokio::test]
    async fn reader_is_broken_after_an_error() {
        let mut wire = frame(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
        );
        wire.extend(frame(b'd', &xlog(1, 2, 3, b"B")));
        let (mut reader, _server) = reader_over(wire).await;
        let err = reader.next().await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("57P01"));
        assert!(err.is_retryable());
        assert!(matches!(reader.next().await, Err(ReplicationError::Broken)));

        let (mut reader, _server) = reader_over(frame(b'Z', b"I")).await;
        assert!(matches!(
            reader.next().await,
            Err(ReplicationError::Protocol(_))
        ));
        assert!(matches!(reader.next().await, Err(ReplicationError::Broken)));
    }

    fn assert_send<T: Send>(_: &T) {}

    /// The integrator spawns these; keep them `Send`.
    #[allow(dead_code, unused_must_use)]
    fn futures_are_send(
        cfg: &super::super::PgConfig,
        client: &mut super::super::ReplicationClient,
        reader: &mut ReplicationReader,
        sender: &mut StatusSender,
        owned: super::super::ReplicationClient,
    ) {
        fn owned_send<T: Send + 'static>() {}
        owned_send::<ReplicationReader>();
        owned_send::<StatusSender>();
        owned_send::<ReplicationStream>();
        owned_send::<super::super::ReplicationClient>();
        assert_send(&super::super::ReplicationClient::connect(cfg));
        assert_send(&super::super::sql::connect(cfg));
        assert_send(&client.identify_system());
        assert_send(&client.simple_query("SELECT 1"));
        assert_send(&reader.next());
        assert_send(&sender.send_status(Lsn(0), Lsn(0), Lsn(0), false));
        assert_send(&owned.start_logical_replication("s", Lsn(0), &[]));
    }

    #[test]
    fn pg_clock() {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
        assert_eq!(system_time_to_pg_micros(epoch), 0);
        assert_eq!(
            system_time_to_pg_micros(epoch + Duration::from_micros(7)),
            7
        );
        assert_eq!(
            system_time_to_pg_micros(epoch - Duration::from_secs(1)),
            -1_000_000
        );
        assert_eq!(
            pg_micros_to_system_time(-1_000_000),
            epoch - Duration::from_secs(1)
        );
        // 2026 is about 26 years after 2000
        let now = pg_now_micros();
        assert!(now > 25 * 365 * 86_400 * 1_000_000, "{now}");
    }
}
