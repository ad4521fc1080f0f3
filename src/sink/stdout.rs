//! The broker-less sink behind `odoo-cdc tail`: one JSON event per line.
//!
//! Lines are buffered and made durable by [`Sink::flush`], which the publisher
//! calls at each transaction end before it lets the checkpoint advance, so the
//! slot never moves past a line that is still in a buffer.
//!
//! Writes go through tokio's asynchronous stdout, which performs the blocking
//! `write(2)` on the blocking thread pool: a pipe nobody reads (`tail | less`
//! left alone) holds this sink back, and through it the reader and the
//! walsender, but never the runtime thread, so standby status updates keep
//! going out within `wal_sender_timeout`.

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use super::{Confirm, OutgoingMessage, Sink, SinkError};

pub struct StdoutSink<W: AsyncWrite + Unpin + Send> {
    out: BufWriter<W>,
}

impl<W: AsyncWrite + Unpin + Send> StdoutSink<W> {
    pub fn new(out: W) -> Self {
        StdoutSink {
            out: BufWriter::with_capacity(256 * 1024, out),
        }
    }
}

impl StdoutSink<tokio::io::Stdout> {
    pub fn stdout() -> Self {
        Self::new(tokio::io::stdout())
    }
}

impl<W: AsyncWrite + Unpin + Send> Sink for StdoutSink<W> {
    async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
        self.out.write_all(&msg.body).await?;
        self.out.write_all(b"\n").await?;
        Ok(Confirm::OnFlush)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().await?;
        Ok(())
    }
}
