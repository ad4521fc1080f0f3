//! Bounded buffering of streamed (in-progress) transactions.
//!
//! With `streaming 'on'` (protocol v2+) Postgres sends a large transaction in
//! chunks *before* it commits, and may later abort it or some of its
//! subtransactions. Nothing of it may be published before its Stream Commit, so
//! its changes are kept here: in memory up to a budget, then in an anonymous
//! temporary file (unlinked on creation, so a crash leaves nothing behind).
//!
//! Records are the raw pgoutput bodies plus the (sub)transaction id, LSN and the
//! table descriptions that were current when the change arrived. Keeping the
//! table description from arrival time matters: a Relation message later in the
//! stream (ALTER TABLE in another transaction) must not change how an earlier
//! change is decoded.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Cursor, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::TableInfo;
use crate::lsn::Lsn;

/// One buffered change.
#[derive(Debug)]
pub struct Record {
    /// The (sub)transaction that made the change; aborted ones are filtered.
    pub subxid: u32,
    pub lsn: Lsn,
    pub tables: Vec<Arc<TableInfo>>,
    /// The pgoutput message body, to be decoded again with `in_stream = true`.
    pub body: Bytes,
}

/// The changes of one streamed top-level transaction.
pub struct StreamBuffer {
    pub xid: u32,
    tables: Vec<Arc<TableInfo>>,
    table_index: HashMap<usize, u32>,
    mem: Vec<u8>,
    file: Option<BufWriter<File>>,
    spill_dir: Option<PathBuf>,
    records: u64,
    spilled_bytes: u64,
    aborted: HashSet<u32>,
}

impl StreamBuffer {
    pub fn new(xid: u32, spill_dir: Option<PathBuf>) -> Self {
        StreamBuffer {
            xid,
            tables: Vec::new(),
            table_index: HashMap::new(),
            mem: Vec::new(),
            file: None,
            spill_dir,
            records: 0,
            spilled_bytes: 0,
            aborted: HashSet::new(),
        }
    }

    /// Bytes this buffer holds in memory (what counts against the budget).
    pub fn mem_bytes(&self) -> usize {
        self.mem.capacity()
    }

    pub fn is_spilled(&self) -> bool {
        self.file.is_some()
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    pub fn push(
        &mut self,
        subxid: u32,
        lsn: Lsn,
        tables: &[Arc<TableInfo>],
        body: &[u8],
    ) -> Result<(), SpillError> {
        let body_len = u32::try_from(body.len()).map_err(|_| SpillError::TooLarge {
            xid: self.xid,
            len: body.len(),
        })?;
        let mut header = Vec::with_capacity(20 + 4 * tables.len());
        header.extend_from_slice(&subxid.to_le_bytes());
        header.extend_from_slice(&lsn.0.to_le_bytes());
        header.extend_from_slice(&(tables.len() as u32).to_le_bytes());
        for t in tables {
            let key = Arc::as_ptr(t) as usize;
            let idx = match self.table_index.get(&key) {
                Some(i) => *i,
                None => {
                    let i = self.tables.len() as u32;
                    self.tables.push(Arc::clone(t));
                    self.table_index.insert(key, i);
                    i
                }
            };
            header.extend_from_slice(&idx.to_le_bytes());
        }
        header.extend_from_slice(&body_len.to_le_bytes());
        let xid = self.xid;
        match &mut self.file {
            Some(f) => {
                f.write_all(&header)
                    .and_then(|_| f.write_all(body))
                    .map_err(|e| SpillError::Io { xid, source: e })?;
                self.spilled_bytes += (header.len() + body.len()) as u64;
            }
            None => {
                self.mem.extend_from_slice(&header);
                self.mem.extend_from_slice(body);
            }
        }
        self.records += 1;
        Ok(())
    }

    /// Moves what is in memory to a temporary file; later records go there too.
    pub fn spill(&mut self) -> Result<(), SpillError> {
        if self.file.is_some() {
            return Ok(());
        }
        let xid = self.xid;
        let io = |source| SpillError::Io { xid, source };
        let file = match &self.spill_dir {
            Some(dir) => tempfile::tempfile_in(dir),
            None => tempfile::tempfile(),
        }
        .map_err(io)?;
        let mut w = BufWriter::with_capacity(256 * 1024, file);
        w.write_all(&self.mem).map_err(io)?;
        self.spilled_bytes += self.mem.len() as u64;
        self.mem = Vec::new();
        self.file = Some(w);
        tracing::info!(
            xid,
            "streamed transaction exceeds the memory budget: spilling to a temporary file"
        );
        Ok(())
    }

    /// Postgres aborted subtransaction `subxid`: its changes are dropped at replay.
    pub fn abort_subxact(&mut self, subxid: u32) {
        self.aborted.insert(subxid);
    }

    /// The transaction committed: read its records back in order.
    pub fn into_replay(self) -> Result<Replay, SpillError> {
        let xid = self.xid;
        let reader: Box<dyn Read + Send> = match self.file {
            Some(w) => {
                let mut file = w.into_inner().map_err(|e| SpillError::Io {
                    xid,
                    source: e.into_error(),
                })?;
                use std::io::Seek;
                file.seek(io::SeekFrom::Start(0))
                    .map_err(|e| SpillError::Io { xid, source: e })?;
                Box::new(BufReader::with_capacity(256 * 1024, file))
            }
            None => Box::new(Cursor::new(self.mem)),
        };
        Ok(Replay {
            xid,
            reader,
            tables: self.tables,
            aborted: self.aborted,
            remaining: self.records,
        })
    }
}

/// Sequential reader over a committed stream buffer.
pub struct Replay {
    xid: u32,
    reader: Box<dyn Read + Send>,
    tables: Vec<Arc<TableInfo>>,
    aborted: HashSet<u32>,
    remaining: u64,
}

impl Replay {
    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// The next record of a subtransaction that was not aborted.
    pub fn next_record(&mut self) -> Result<Option<Record>, SpillError> {
        loop {
            if self.remaining == 0 {
                return Ok(None);
            }
            self.remaining -= 1;
            let xid = self.xid;
            let io = |source| SpillError::Io { xid, source };
            let subxid = read_u32(&mut self.reader).map_err(io)?;
            let mut lsn = [0u8; 8];
            self.reader.read_exact(&mut lsn).map_err(io)?;
            let ntables = read_u32(&mut self.reader).map_err(io)? as usize;
            let mut tables = Vec::with_capacity(ntables.min(self.tables.len()));
            for _ in 0..ntables {
                let idx = read_u32(&mut self.reader).map_err(io)? as usize;
                let t = self
                    .tables
                    .get(idx)
                    .ok_or(SpillError::Corrupt { xid: self.xid })?;
                tables.push(Arc::clone(t));
            }
            let len = read_u32(&mut self.reader).map_err(io)? as usize;
            let mut body = vec![0u8; len];
            self.reader.read_exact(&mut body).map_err(io)?;
            if self.aborted.contains(&subxid) {
                continue;
            }
            return Ok(Some(Record {
                subxid,
                lsn: Lsn(u64::from_le_bytes(lsn)),
                tables,
                body: Bytes::from(body),
            }));
        }
    }
}

fn read_u32(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error(
        "writing or reading the spill file of streamed transaction {xid} (under --spill-dir): {source}; the session restarts from the slot"
    )]
    Io {
        xid: u32,
        #[source]
        source: io::Error,
    },
    #[error("a change of {len} bytes in streamed transaction {xid} is too large to buffer")]
    TooLarge { xid: u32, len: usize },
    #[error("spill buffer of streamed transaction {xid} is corrupt")]
    Corrupt { xid: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, Relation, ReplicaIdentity};
    use crate::value::TypeKind;

    fn table(name: &str) -> Arc<TableInfo> {
        Arc::new(TableInfo::plain(Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            table: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                is_key: true,
                kind: TypeKind::Int,
            }],
        })))
    }

    fn roundtrip(spill: bool) {
        let a = table("a");
        let b = table("b");
        let mut buf = StreamBuffer::new(7, None);
        buf.push(7, Lsn(1), std::slice::from_ref(&a), b"one")
            .unwrap();
        buf.push(8, Lsn(2), std::slice::from_ref(&b), b"two")
            .unwrap();
        if spill {
            buf.spill().unwrap();
            assert_eq!(buf.mem_bytes(), 0);
        }
        buf.push(9, Lsn(3), &[a.clone(), b.clone()], b"three")
            .unwrap();
        buf.push(7, Lsn(4), &[], b"").unwrap();
        buf.abort_subxact(8);
        assert_eq!(buf.records(), 4);
        let mut r = buf.into_replay().unwrap();
        let mut got = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            got.push((
                rec.subxid,
                rec.lsn,
                rec.tables
                    .iter()
                    .map(|t| t.relation.table.clone())
                    .collect::<Vec<_>>(),
                rec.body,
            ));
        }
        assert_eq!(
            got,
            vec![
                (7, Lsn(1), vec!["a".to_string()], Bytes::from_static(b"one")),
                (
                    9,
                    Lsn(3),
                    vec!["a".to_string(), "b".to_string()],
                    Bytes::from_static(b"three")
                ),
                (7, Lsn(4), vec![], Bytes::new()),
            ]
        );
    }

    #[test]
    fn replays_in_order_without_aborted_subtransactions_in_memory() {
        roundtrip(false);
    }

    #[test]
    fn replays_in_order_without_aborted_subtransactions_from_a_spill_file() {
        roundtrip(true);
    }
}
