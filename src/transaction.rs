//! Turning the pgoutput message stream into committed transactions of events.
//!
//! Two shapes of transaction arrive:
//! - **Ordinary**: `Begin` .. changes .. `Commit`, sent only once the
//!   transaction committed. Events are emitted as they arrive (nothing is
//!   buffered), so memory does not grow with transaction size.
//! - **Streamed** (protocol v2+, `streaming 'on'`): chunks between `Stream Start`
//!   and `Stream Stop`, interleaved with other transactions, before the outcome
//!   is known. They are buffered per xid with a memory budget ([`crate::spill`])
//!   and emitted on `Stream Commit`, or dropped on `Stream Abort` (a whole
//!   transaction or one subtransaction).
//!
//! The assembler is a pull-style state machine with no I/O of its own (except
//! spill files): feed it one WAL message with [`Assembler::push`], then drain
//! [`Assembler::next`] until it returns `None`. Draining a streamed commit reads
//! its buffer record by record, so a million-row transaction is never
//! materialised.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::event::{ChangeEvent, LogicalMessage, Op, TableInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{self, DecodeContext, DecodeError, Message, RelationBody};
use crate::schema::{Column, Relation, RelationCache, ReplicaIdentity, SchemaError};
use crate::spill::{Replay, SpillError, StreamBuffer};
use crate::value::TypeKind;

/// Prefix of the `pg_logical_emit_message` heartbeats the connector writes so an
/// idle slot still advances. They are consumed here, never published.
pub const HEARTBEAT_PREFIX: &str = "odoo-cdc.heartbeat";

/// What the assembler hands to the sink stage, in order.
#[derive(Debug)]
pub enum Output {
    /// A transaction starts (useful to the transaction-granularity encoder).
    Begin {
        xid: u32,
        commit_lsn: Lsn,
        commit_ts: i64,
    },
    Event(ChangeEvent),
    /// A transaction ends; once everything before is confirmed, `end_lsn` is safe.
    Commit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    /// A position with no event that is safe once everything before is
    /// confirmed (a heartbeat or a message that is not published).
    Progress(Lsn),
}

/// Decides, once per Relation message, how a table is captured. Async: a
/// describer may ask the catalog (a table created or altered since the
/// session started), and whoever feeds the [`Assembler`] awaits it.
pub trait TableDescriber: Send {
    fn describe(&mut self, relation: Arc<Relation>) -> BoxFuture<'_, TableInfo>;
}

/// Captures every table the publication sends, as-is.
pub struct PlainTables;

impl TableDescriber for PlainTables {
    fn describe(&mut self, relation: Arc<Relation>) -> BoxFuture<'_, TableInfo> {
        Box::pin(std::future::ready(TableInfo::plain(relation)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("undecodable pgoutput message at LSN {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("at LSN {lsn}: {source}")]
    Schema {
        lsn: Lsn,
        #[source]
        source: SchemaError,
    },
    #[error("protocol violation at LSN {lsn}: {what}")]
    Protocol { lsn: Lsn, what: String },
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error(
        "at LSN {lsn}: savepoint {subxid} of streamed transaction {xid} was rolled back, and the transaction carries logical messages that pgoutput does not tie to their savepoint; decoding again without streaming"
    )]
    StreamedMessageAmbiguous { lsn: Lsn, xid: u32, subxid: u32 },
}

struct OpenTxn {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    next_seq: u64,
}

struct ActiveReplay {
    replay: Replay,
    xid: u32,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_ts: i64,
    next_seq: u64,
}

pub struct Assembler {
    cache: RelationCache,
    tables: HashMap<u32, Arc<TableInfo>>,
    /// A relation whose description is awaited (see [`Assembler::take_undescribed`]).
    undescribed: Option<Arc<Relation>>,
    /// Inside `Stream Start` .. `Stream Stop`: the streamed top-level xid.
    in_stream: Option<u32>,
    open: Option<OpenTxn>,
    streams: HashMap<u32, StreamBuffer>,
    /// Streamed transactions holding a transactional logical message.
    streams_with_messages: HashSet<u32>,
    replay: Option<ActiveReplay>,
    ready: VecDeque<Output>,
    mem_budget: usize,
    spill_dir: Option<PathBuf>,
}

impl Assembler {
    /// `mem_budget` bounds the bytes held in memory for all streamed
    /// transactions together; past it the buffer being appended to spills.
    pub fn new(mem_budget: usize, spill_dir: Option<PathBuf>) -> Self {
        Assembler {
            cache: RelationCache::default(),
            tables: HashMap::new(),
            undescribed: None,
            in_stream: None,
            open: None,
            streams: HashMap::new(),
            streams_with_messages: HashSet::new(),
            replay: None,
            ready: VecDeque::new(),
            mem_budget,
            spill_dir,
        }
    }

    /// Between `Begin` and `Commit` of an ordinary transaction. A keepalive's WAL
    /// end must not be reported as safe then: it can be past this transaction's
    /// commit record, which would skip the transaction on restart.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some() || self.replay.is_some() || !self.ready.is_empty()
    }

    /// Streamed transactions still waiting for their outcome, and how many bytes
    /// of them are in memory.
    pub fn buffered(&self) -> (usize, usize) {
        (
            self.streams.len(),
            self.streams.values().map(|s| s.mem_bytes()).sum(),
        )
    }

    /// The table description currently in force for a relation OID.
    pub fn table(&self, oid: u32) -> Option<&Arc<TableInfo>> {
        self.tables.get(&oid)
    }

    /// The relation of the Relation message just pushed, once: describe it
    /// (a [`TableDescriber`], which may query the catalog) and hand the
    /// description to [`Assembler::install`] before the next push. Until then
    /// a change of that table is an error, never a stale description.
    pub fn take_undescribed(&mut self) -> Option<Arc<Relation>> {
        self.undescribed.take()
    }

    /// Puts a table description in force for the changes that follow.
    pub fn install(&mut self, info: TableInfo) {
        self.tables.insert(info.relation.oid, Arc::new(info));
    }

    /// Pushes with every relation described as-is ([`PlainTables`]): for
    /// callers without a catalog (benchmarks, tools).
    pub fn push_plain(&mut self, lsn: Lsn, body: &Bytes) -> Result<(), AssembleError> {
        self.push(lsn, body)?;
        if let Some(relation) = self.take_undescribed() {
            self.install(TableInfo::plain(relation));
        }
        Ok(())
    }

    /// Feeds one XLogData payload. Drain [`Assembler::next`] before the next push.
    pub fn push(&mut self, lsn: Lsn, body: &Bytes) -> Result<(), AssembleError> {
        debug_assert!(self.ready.is_empty() && self.replay.is_none());
        debug_assert!(self.undescribed.is_none(), "a relation was not described");
        let ctx = DecodeContext {
            in_stream: self.in_stream.is_some(),
            parallel_stream_abort: false,
        };
        let msg =
            pgoutput::decode(body, ctx).map_err(|source| AssembleError::Decode { lsn, source })?;
        let proto = |what: String| AssembleError::Protocol { lsn, what };

        // Inside a stream block, changes are buffered, not emitted.
        if let Some(top_xid) = self.in_stream {
            return self.push_streamed(top_xid, lsn, body, msg);
        }

        match msg {
            Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                if self.open.is_some() {
                    return Err(proto(format!(
                        "Begin of xid {xid} inside an open transaction"
                    )));
                }
                self.open = Some(OpenTxn {
                    xid,
                    commit_lsn: final_lsn,
                    commit_ts,
                    next_seq: 0,
                });
                self.ready.push_back(Output::Begin {
                    xid,
                    commit_lsn: final_lsn,
                    commit_ts,
                });
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| proto("Commit without Begin".into()))?;
                if open.commit_lsn != commit_lsn {
                    return Err(proto(format!(
                        "Commit LSN {commit_lsn} differs from the Begin's final LSN {}",
                        open.commit_lsn
                    )));
                }
                self.ready.push_back(Output::Commit {
                    xid: open.xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                });
            }
            Message::Origin { .. } => {}
            Message::Relation(body) => self.apply_relation(body),
            Message::Type {
                oid,
                namespace,
                name,
                ..
            } => self.cache.upsert_type(oid, wire_namespace(namespace), name),
            Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. } => {
                let open = self
                    .open
                    .as_ref()
                    .ok_or_else(|| proto("a row change outside of a transaction".into()))?;
                let (xid, commit_lsn, commit_ts) = (open.xid, open.commit_lsn, open.commit_ts);
                let first_seq = open.next_seq;
                let tables = self.tables_of(&msg, lsn)?;
                let n = emit_changes(
                    msg,
                    tables,
                    lsn,
                    xid,
                    commit_lsn,
                    commit_ts,
                    first_seq,
                    &mut self.ready,
                );
                if let Some(open) = self.open.as_mut() {
                    open.next_seq += u64::from(n);
                }
            }
            Message::LogicalMessage {
                transactional,
                lsn: msg_lsn,
                prefix,
                content,
                ..
            } => {
                if transactional {
                    let open = self.open.as_mut().ok_or_else(|| {
                        proto("a transactional message outside of a transaction".into())
                    })?;
                    let seq = open.next_seq;
                    open.next_seq += 1;
                    if prefix != HEARTBEAT_PREFIX {
                        self.ready.push_back(Output::Event(message_event(
                            msg_lsn,
                            open.xid,
                            open.commit_lsn,
                            open.commit_ts,
                            seq,
                            true,
                            prefix,
                            content,
                        )));
                    }
                } else {
                    // A non-transactional message is decoded with the LSN of
                    // the *end* of its WAL record, which is where the next
                    // record may begin: another transaction's commit. On
                    // restart Postgres skips every commit whose record starts
                    // before the confirmed flush position, so the message's
                    // LSN itself is the furthest safe mark (exclusive end):
                    // the message (which starts before it) is not decoded
                    // again, a commit starting at it is.
                    if prefix != HEARTBEAT_PREFIX {
                        self.ready.push_back(Output::Event(message_event(
                            msg_lsn,
                            0,
                            standalone_message_position(msg_lsn),
                            0,
                            0,
                            false,
                            prefix,
                            content,
                        )));
                    }
                    self.ready.push_back(Output::Progress(msg_lsn));
                }
            }
            Message::StreamStart { xid, .. } => {
                if self.open.is_some() {
                    return Err(proto(format!(
                        "Stream Start of xid {xid} inside an open transaction"
                    )));
                }
                self.in_stream = Some(xid);
                let dir = self.spill_dir.clone();
                self.streams
                    .entry(xid)
                    .or_insert_with(|| StreamBuffer::new(xid, dir));
            }
            Message::StreamStop => {
                return Err(proto("Stream Stop outside of a stream block".into()));
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                // A transaction may be streamed with zero buffered changes (all of
                // them filtered by the publication): it still commits.
                self.streams_with_messages.remove(&xid);
                let buffer = self
                    .streams
                    .remove(&xid)
                    .unwrap_or_else(|| StreamBuffer::new(xid, None));
                self.ready.push_back(Output::Begin {
                    xid,
                    commit_lsn,
                    commit_ts,
                });
                self.replay = Some(ActiveReplay {
                    replay: buffer.into_replay()?,
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                    next_seq: 0,
                });
            }
            Message::StreamAbort { xid, subxid, .. } => {
                if xid == subxid {
                    self.streams.remove(&xid);
                    self.streams_with_messages.remove(&xid);
                } else if self.streams_with_messages.contains(&xid) {
                    // pgoutput labels a streamed transactional message with
                    // the top-level xid, not the savepoint it was written in:
                    // whether this rollback took one of them back cannot be
                    // told. Decoding the transaction whole (without streaming)
                    // can, and the slot still holds it.
                    self.streams_with_messages.remove(&xid);
                    self.streams.remove(&xid);
                    return Err(AssembleError::StreamedMessageAmbiguous { lsn, xid, subxid });
                } else if let Some(buf) = self.streams.get_mut(&xid) {
                    buf.abort_subxact(subxid);
                }
            }
            Message::BeginPrepare { xid, .. }
            | Message::Prepare { xid, .. }
            | Message::CommitPrepared { xid, .. }
            | Message::RollbackPrepared { xid, .. }
            | Message::StreamPrepare { xid, .. } => {
                return Err(proto(format!(
                    "two-phase message for xid {xid}, but two_phase was not requested"
                )));
            }
        }
        Ok(())
    }

    fn push_streamed(
        &mut self,
        top_xid: u32,
        lsn: Lsn,
        body: &Bytes,
        msg: Message,
    ) -> Result<(), AssembleError> {
        let proto = |what: String| AssembleError::Protocol { lsn, what };
        match msg {
            Message::StreamStop => {
                self.in_stream = None;
            }
            Message::Relation(body) => self.apply_relation(body),
            Message::Type {
                oid,
                namespace,
                name,
                ..
            } => self.cache.upsert_type(oid, wire_namespace(namespace), name),
            Message::Insert { xid, .. }
            | Message::Update { xid, .. }
            | Message::Delete { xid, .. }
            | Message::Truncate { xid, .. }
            | Message::LogicalMessage { xid, .. } => {
                if let Message::LogicalMessage {
                    transactional: false,
                    ..
                } = msg
                {
                    return Err(proto(
                        "a non-transactional message inside a stream block".into(),
                    ));
                }
                if let Message::LogicalMessage { .. } = msg {
                    self.streams_with_messages.insert(top_xid);
                }
                let tables = self.tables_of(&msg, lsn)?;
                let subxid = xid.unwrap_or(top_xid);
                let budget = self.mem_budget;
                let total_mem: usize = self.streams.values().map(|s| s.mem_bytes()).sum();
                let buf = self
                    .streams
                    .get_mut(&top_xid)
                    .ok_or_else(|| proto(format!("change for unknown stream {top_xid}")))?;
                buf.push(subxid, lsn, &tables, body)?;
                if total_mem + body.len() > budget && !buf.is_spilled() {
                    buf.spill()?;
                }
            }
            other => {
                return Err(proto(format!(
                    "unexpected message inside the stream block of xid {top_xid}: {}",
                    other.kind().name()
                )));
            }
        }
        Ok(())
    }

    /// The next output, or `None` when everything from the last push is out.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<Output>, AssembleError> {
        if let Some(out) = self.ready.pop_front() {
            return Ok(Some(out));
        }
        let Some(active) = self.replay.as_mut() else {
            return Ok(None);
        };
        loop {
            match active.replay.next_record()? {
                None => {
                    let done = self.replay.take().map(|a| Output::Commit {
                        xid: a.xid,
                        commit_lsn: a.commit_lsn,
                        end_lsn: a.end_lsn,
                        commit_ts: a.commit_ts,
                    });
                    return Ok(done);
                }
                Some(rec) => {
                    let ctx = DecodeContext {
                        in_stream: true,
                        parallel_stream_abort: false,
                    };
                    let msg = pgoutput::decode(&rec.body, ctx).map_err(|source| {
                        AssembleError::Decode {
                            lsn: rec.lsn,
                            source,
                        }
                    })?;
                    let seq = active.next_seq;
                    if let Message::LogicalMessage {
                        lsn: msg_lsn,
                        prefix,
                        content,
                        ..
                    } = msg
                    {
                        active.next_seq += 1;
                        if prefix == HEARTBEAT_PREFIX {
                            continue;
                        }
                        return Ok(Some(Output::Event(message_event(
                            msg_lsn,
                            active.xid,
                            active.commit_lsn,
                            active.commit_ts,
                            seq,
                            true,
                            prefix,
                            content,
                        ))));
                    }
                    let n = emit_changes(
                        msg,
                        rec.tables,
                        rec.lsn,
                        active.xid,
                        active.commit_lsn,
                        active.commit_ts,
                        seq,
                        &mut self.ready,
                    );
                    active.next_seq += u64::from(n);
                    if let Some(out) = self.ready.pop_front() {
                        return Ok(Some(out));
                    }
                }
            }
        }
    }

    /// Forgets everything tied to the current connection (reconnect): the server
    /// resends from the confirmed LSN, including Relation messages.
    pub fn reset(&mut self) {
        self.in_stream = None;
        self.open = None;
        self.streams.clear();
        self.replay = None;
        self.ready.clear();
    }

    fn apply_relation(&mut self, body: RelationBody) {
        let relation = relation_from_wire(body);
        let shared = self.cache.upsert(relation);
        self.tables.remove(&shared.oid);
        self.undescribed = Some(shared);
    }

    /// The table descriptions a change refers to.
    fn tables_of(&self, msg: &Message, lsn: Lsn) -> Result<Vec<Arc<TableInfo>>, AssembleError> {
        let lookup = |oid: u32| {
            self.tables.get(&oid).cloned().ok_or(AssembleError::Schema {
                lsn,
                source: SchemaError::UnknownRelation { oid },
            })
        };
        Ok(match msg {
            Message::Insert { relation_oid, .. }
            | Message::Update { relation_oid, .. }
            | Message::Delete { relation_oid, .. } => vec![lookup(*relation_oid)?],
            Message::Truncate { relation_oids, .. } => relation_oids
                .iter()
                .map(|oid| lookup(*oid))
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        })
    }
}

/// Turns one row-change message into events (one per truncated table for a
/// truncate). Returns how many sequence numbers it used: every change counts,
/// even those of excluded tables, so ids do not depend on filters.
#[allow(clippy::too_many_arguments)]
fn emit_changes(
    msg: Message,
    tables: Vec<Arc<TableInfo>>,
    lsn: Lsn,
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    first_seq: u64,
    out: &mut VecDeque<Output>,
) -> u32 {
    let base = |op: Op, table: Arc<TableInfo>, seq: u64| ChangeEvent {
        op,
        table: Some(table),
        lsn,
        commit_lsn,
        xid,
        commit_ts,
        seq,
        snapshot: false,
        old: None,
        new: None,
        truncate_options: 0,
        message: None,
    };
    let mut push = |ev: ChangeEvent| {
        if ev.table.as_ref().is_some_and(|t| t.included) {
            out.push_back(Output::Event(ev));
        }
    };
    match msg {
        Message::Insert { new, .. } => {
            let Some(t) = tables.into_iter().next() else {
                return 1;
            };
            let mut ev = base(Op::Insert, t, first_seq);
            ev.new = Some(new);
            push(ev);
            1
        }
        Message::Update { old, new, .. } => {
            let Some(t) = tables.into_iter().next() else {
                return 1;
            };
            let mut ev = base(Op::Update, t, first_seq);
            ev.old = old;
            ev.new = Some(new);
            push(ev);
            1
        }
        Message::Delete { old, .. } => {
            let Some(t) = tables.into_iter().next() else {
                return 1;
            };
            let mut ev = base(Op::Delete, t, first_seq);
            ev.old = Some(old);
            push(ev);
            1
        }
        Message::Truncate { options, .. } => {
            let n = tables.len() as u32;
            for (i, t) in tables.into_iter().enumerate() {
                let mut ev = base(Op::Truncate, t, first_seq + i as u64);
                ev.truncate_options = options;
                push(ev);
            }
            n.max(1)
        }
        _ => 0,
    }
}

/// The position a non-transactional logical message is ordered and
/// identified by: the last byte of its own WAL record (`end - 1`).
///
/// Its decoded LSN (the record's end) may be exactly where the next record, a
/// commit, starts, so `<end>-00000000` could also be the id of that
/// transaction's first event. No record can start on the last byte of another
/// record, so `end - 1` is unique to the message, and it still sorts after
/// every commit before the message and before every commit after it.
pub fn standalone_message_position(end: Lsn) -> Lsn {
    Lsn(end.0.saturating_sub(1))
}

#[allow(clippy::too_many_arguments)]
fn message_event(
    lsn: Lsn,
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    seq: u64,
    transactional: bool,
    prefix: String,
    content: Bytes,
) -> ChangeEvent {
    ChangeEvent {
        op: Op::Message,
        table: None,
        lsn,
        commit_lsn,
        xid,
        commit_ts,
        seq,
        snapshot: false,
        old: None,
        new: None,
        truncate_options: 0,
        message: Some(LogicalMessage {
            transactional,
            prefix,
            content,
        }),
    }
}

/// pgoutput sends the namespace of `pg_catalog` as an empty string
/// (`logicalrep_write_namespace`); events name it.
fn wire_namespace(namespace: String) -> String {
    if namespace.is_empty() {
        "pg_catalog".to_string()
    } else {
        namespace
    }
}

/// The relation cache's view of a Relation message.
pub fn relation_from_wire(body: RelationBody) -> Relation {
    Relation {
        oid: body.oid,
        schema: wire_namespace(body.namespace),
        table: body.name,
        replica_identity: match body.replica_identity {
            pgoutput::ReplicaIdentity::Default => ReplicaIdentity::Default,
            pgoutput::ReplicaIdentity::Nothing => ReplicaIdentity::Nothing,
            pgoutput::ReplicaIdentity::Full => ReplicaIdentity::Full,
            pgoutput::ReplicaIdentity::Index => ReplicaIdentity::Index,
        },
        columns: body
            .columns
            .into_iter()
            .map(|c| Column {
                is_key: c.is_key(),
                kind: TypeKind::from_oid(c.type_oid),
                name: c.name,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pgoutput writes `pg_catalog` as an empty namespace; events must name it.
    #[test]
    fn the_empty_wire_namespace_is_pg_catalog() {
        let body = |namespace: &str| RelationBody {
            xid: None,
            oid: 1259,
            namespace: namespace.into(),
            name: "pg_class".into(),
            replica_identity: pgoutput::ReplicaIdentity::Default,
            columns: Vec::new(),
        };
        assert_eq!(relation_from_wire(body("")).schema, "pg_catalog");
        assert_eq!(relation_from_wire(body("sales")).schema, "sales");
    }
}
