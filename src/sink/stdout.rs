//! The broker-less sink behind `odoo-cdc tail`: one JSON event per line.
//!
//! Lines are buffered and made durable by [`Sink::flush`], which the pipeline
//! calls at each transaction end before it lets the checkpoint advance, so the
//! slot never moves past a line that is still in a buffer.

use std::io::Write;

use super::{Confirm, OutgoingMessage, Sink, SinkError};

pub struct StdoutSink<W: Write + Send> {
    out: std::io::BufWriter<W>,
}

impl<W: Write + Send> StdoutSink<W> {
    pub fn new(out: W) -> Self {
        StdoutSink {
            out: std::io::BufWriter::with_capacity(256 * 1024, out),
        }
    }
}

impl StdoutSink<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

impl<W: Write + Send> Sink for StdoutSink<W> {
    async fn publish(&mut self, msg: OutgoingMessage) -> Result<Confirm, SinkError> {
        self.out.write_all(&msg.body)?;
        self.out.write_all(b"\n")?;
        Ok(Confirm::OnFlush)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush()?;
        Ok(())
    }
}
