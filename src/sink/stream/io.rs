//! The two tasks of a stream sink's connection: the writer sends queued
//! messages as Publish frames (and heartbeats), the reader resolves each
//! message's confirm as the broker reports it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::super::SinkError;
use super::wire::{self, Frame, ReadHalf, Reader, WriteHalf};

pub(super) type Outcome = Result<(), SinkError>;

pub(super) struct Waiting {
    pub(super) message_id: String,
    pub(super) done: oneshot::Sender<Outcome>,
}

/// What the sink and the reader share: who waits for which confirm.
#[derive(Default)]
pub(super) struct State {
    /// By (producer id, publishing id).
    pub(super) waiting: HashMap<(u8, u64), Waiting>,
    /// Why the connection is gone, once it is.
    pub(super) closed: Option<String>,
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

pub(super) type Shared = Arc<Mutex<State>>;

pub(super) enum Out {
    Message {
        publisher: u8,
        id: u64,
        data: Vec<u8>,
    },
    Close,
}

/// The partition (stream) a producer id writes: producers `2i` (named) and
/// `2i + 1` (unnamed) both write partition `i`.
pub(super) fn stream_of(publisher: u8) -> usize {
    usize::from(publisher / 2)
}

/// Messages of one producer gathered into one Publish frame.
struct Batch {
    publisher: u8,
    /// The frame's size so far.
    size: usize,
    messages: Vec<(u64, Vec<u8>)>,
}

impl Batch {
    fn new(publisher: u8) -> Batch {
        // size, key, version, publisher id, count
        Batch {
            publisher,
            size: 4 + 4 + 1 + 4,
            messages: Vec::new(),
        }
    }

    fn frame(self) -> Vec<u8> {
        let mut frame = Frame::new(wire::PUBLISH)
            .u8(self.publisher)
            .u32(self.messages.len() as u32);
        for (id, data) in self.messages {
            frame = frame.u64(id).bytes(&data);
        }
        frame.finish()
    }
}

/// At most this many messages are gathered before writing.
const GATHER: usize = 4096;
/// A writer that found at least this many messages queued at once is busy:
/// more are on their way.
const BUSY: usize = 16;
/// How long a busy writer waits, once per write, for more messages before
/// writing what it gathered (tokio's timer rounds it up to its next 1 ms
/// tick).
const LINGER: Duration = Duration::from_micros(500);

/// Sends what `publish` queued: what is ready is gathered into one Publish
/// frame per producer (up to the broker's frame limit), and a heartbeat goes
/// out when idle. The two producers of a stream (changes and at-least-once
/// messages) keep their relative order: a message of one first writes what
/// was gathered for the other.
///
/// When the queue held [`BUSY`] messages or more and then ran dry, the writer
/// waits [`LINGER`] once for more before writing. The broker's cost is per
/// frame as much as per message (a chunk written, an index entry, a confirm
/// frame back): the connector's publisher hands messages over as the WAL
/// arrives, and without the wait a busy stream went out as frames of about 60
/// messages, for which RabbitMQ spent 8 CPU s per million changes against 4.5
/// with frames of the size the window allows, CPU that a 2-core machine then
/// took from the walsender (see docs/streams.md, Performance). A quiet stream
/// (fewer than [`BUSY`] messages at a time) is never delayed.
pub(super) async fn write_loop(
    mut rx: mpsc::UnboundedReceiver<Out>,
    mut w: BufWriter<WriteHalf>,
    state: Shared,
    heartbeat: Duration,
    frame_max: usize,
) {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // By stream: the batch being gathered.
    let mut open: Vec<Option<Batch>> = Vec::new();
    loop {
        let first = tokio::select! {
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
        };
        let mut next = Some(first);
        let mut gathered = 0;
        let mut closing = false;
        let mut lingered = false;
        while let Some(out) = next.take() {
            let (publisher, id, data) = match out {
                Out::Close => {
                    closing = true;
                    break;
                }
                Out::Message {
                    publisher,
                    id,
                    data,
                } => (publisher, id, data),
            };
            let stream = stream_of(publisher);
            if open.len() <= stream {
                open.resize_with(stream + 1, || None);
            }
            let full = open[stream].as_ref().is_some_and(|b| {
                b.publisher != publisher
                    || b.size + 12 + data.len() > frame_max
                    || b.messages.len() >= GATHER
            });
            if full
                && let Some(b) = open[stream].take()
                && let Err(e) = w.write_all(&b.frame()).await
            {
                fail(&state, format!("stream connection write failed: {e}"));
                return;
            }
            let b = open[stream].get_or_insert_with(|| Batch::new(publisher));
            b.size += 12 + data.len();
            b.messages.push((id, data));
            gathered += 1;
            if gathered < GATHER {
                next = rx.try_recv().ok();
                if next.is_none() && !lingered && gathered >= BUSY {
                    lingered = true;
                    tokio::time::sleep(LINGER).await;
                    next = rx.try_recv().ok();
                }
            }
        }
        for b in open.iter_mut().filter_map(Option::take) {
            if let Err(e) = w.write_all(&b.frame()).await {
                fail(&state, format!("stream connection write failed: {e}"));
                return;
            }
        }
        if closing {
            let close = wire::close_frame("odoo-cdc shutting down");
            let _ = write_flush(&mut w, &close).await;
            return;
        }
        if let Err(e) = w.flush().await {
            fail(&state, format!("stream connection write failed: {e}"));
            return;
        }
        tick.reset();
    }
}

async fn write_flush(w: &mut BufWriter<WriteHalf>, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame).await?;
    w.flush().await
}

pub(super) fn fail(state: &Shared, reason: String) {
    if let Ok(mut s) = state.lock() {
        s.fail(reason);
    }
}

/// Resolves confirms and errors as the broker reports them; ends (failing
/// whatever still waits) when the connection does.
///
/// The broker sends a heartbeat when it has nothing else to send, so `silence`
/// (two heartbeat periods) without a frame means the connection is dead.
pub(super) async fn read_loop(
    mut read: tokio::io::BufReader<ReadHalf>,
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
            // rustls reports a peer that closed without `close_notify` (what
            // the broker does when it drops a connection) with a long text.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "stream connection lost: closed by the broker".to_owned();
            }
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

pub(super) const CLOSED_BY_US: &str = "stream connection closed by us";

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
