//! The change-event model and its JSON encoding.
//!
//! An event keeps the column values as Postgres sent them (text form, as
//! zero-copy slices of the WAL message) and is encoded straight into an output
//! buffer: no intermediate `serde_json::Value` per row. Encoding is where values
//! are validated, so a malformed value surfaces as an [`EncodeError`] naming the
//! table, column and LSN instead of a silent null.
//!
//! Postgres semantics carried here:
//! - `before` is only as complete as the table's REPLICA IDENTITY: with DEFAULT
//!   (the primary key) an update whose key did not change has no old image at
//!   all, and a delete has only the key; with FULL it is the whole old row.
//! - A TOASTed value that an update did not touch is not in the WAL: pgoutput
//!   sends it as "unchanged". It is left out of `after` and named in
//!   `unchanged_toast` (never faked as null), unless the FULL old image carries
//!   it, in which case the old value is the current value and is used.

use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;
pub use crate::odoo::Many2Many;
use crate::pgoutput::{ColumnValue, OldTuple, TupleData};
use crate::schema::Relation;
use crate::value::{ValueError, write_json, write_json_str, write_json_string};

/// The kind of change, with its one-letter code in the event and its word in
/// routing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A row read by the initial (or on-demand) snapshot.
    Read,
    Truncate,
    /// A `pg_logical_emit_message` message.
    Message,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            Op::Message => "m",
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Read => "snapshot",
            Op::Truncate => "truncate",
            Op::Message => "message",
        }
    }
}

/// What the connector knows about a captured table, computed once per
/// `Relation` message (so per-event work stays a pointer copy).
#[derive(Debug)]
pub struct TableInfo {
    pub relation: Arc<Relation>,
    /// Odoo model name (`sale.order`) when the Odoo profile knows the table.
    pub model: Option<String>,
    /// Whether events of this table are published at all (filters, profile).
    pub included: bool,
    /// Column indexes that make up `key`: the replica-identity columns, or the
    /// primary key when the identity is FULL (where every column is flagged).
    pub key_columns: Vec<usize>,
    /// Per column: left out of every image (`--exclude-column`, profile).
    pub skip_column: Vec<bool>,
    /// Odoo translated fields (jsonb `{"en_US": ..}`) flattened to this language.
    pub flatten_translations: Option<String>,
    /// Per column: an Odoo translated field (only meaningful with `flatten_translations`).
    pub translated_column: Vec<bool>,
    /// An Odoo many2many relation table (`*_rel`): which models it links.
    pub many2many: Option<Many2Many>,
}

impl TableInfo {
    /// A table captured as-is: key from the relation's flags, nothing skipped.
    pub fn plain(relation: Arc<Relation>) -> Self {
        let n = relation.columns.len();
        let key_columns = relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        TableInfo {
            relation,
            model: None,
            included: true,
            key_columns,
            skip_column: vec![false; n],
            flatten_translations: None,
            translated_column: vec![false; n],
            many2many: None,
        }
    }
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub prefix: String,
    pub content: Bytes,
}

/// One change, positioned in the WAL.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub op: Op,
    /// The table; `None` for logical messages.
    pub table: Option<Arc<TableInfo>>,
    /// LSN of the change itself.
    pub lsn: Lsn,
    /// LSN of the commit record of its transaction (the snapshot's consistent
    /// point for snapshot reads).
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since 2000-01-01 00:00:00 UTC (Postgres epoch).
    pub commit_ts: i64,
    /// 0-based ordinal of the change within its transaction. It counts every
    /// change Postgres sent for the transaction, including those of tables a
    /// filter drops, so ids do not shift when filters change.
    pub seq: u64,
    pub snapshot: bool,
    pub old: Option<OldTuple>,
    pub new: Option<TupleData>,
    /// Truncate options bits: 1 = CASCADE, 2 = RESTART IDENTITY.
    pub truncate_options: u8,
    pub message: Option<LogicalMessage>,
}

impl ChangeEvent {
    /// `<commit_lsn as 16 hex digits>-<seq as 8 digits>`: the same on every
    /// replay of the same WAL, so consumers deduplicate on it.
    ///
    /// Snapshot reads use `<LSN>-r<table OID, 8 hex>-<row ordinal, 10 digits>`
    /// (see [`crate::snapshot`]): never equal to a stream id. Past
    /// 9,999,999,999 rows the ordinal is `9999999999+<20 digits>` (unique and
    /// sorted, like [`message_id`]).
    pub fn message_id(&self) -> String {
        if self.snapshot {
            let oid = self.table.as_ref().map_or(0, |t| t.relation.oid);
            let lsn = self.commit_lsn.to_fixed_hex();
            return if self.seq <= 9_999_999_999 {
                format!("{lsn}-r{oid:08X}-{:010}", self.seq)
            } else {
                format!("{lsn}-r{oid:08X}-9999999999+{:020}", self.seq)
            };
        }
        message_id(self.commit_lsn, self.seq)
    }

    pub fn schema(&self) -> Option<&str> {
        self.table.as_ref().map(|t| t.relation.schema.as_str())
    }

    pub fn table_name(&self) -> Option<&str> {
        self.table.as_ref().map(|t| t.relation.table.as_str())
    }

    pub fn model(&self) -> Option<&str> {
        self.table.as_ref().and_then(|t| t.model.as_deref())
    }
}

/// `<commit_lsn hex16>-<seq>`: `seq` with 8 digits, as it always was, up to
/// 99,999,999 changes in one transaction; past that `99999999+<seq, 20
/// digits>`, which sorts after every shorter id of the same transaction and in
/// order among themselves, so ids stay unique and sortable at any size.
pub fn message_id(commit_lsn: Lsn, seq: u64) -> String {
    if seq <= 99_999_999 {
        format!("{}-{:08}", commit_lsn.to_fixed_hex(), seq)
    } else {
        format!("{}-99999999+{:020}", commit_lsn.to_fixed_hex(), seq)
    }
}

/// A value could not be encoded: names where it came from. Boxed, so the
/// `Result`s of the hot encoding path stay one word wide.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub Box<EncodeErrorDetail>);

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "cannot encode column {column:?} of table {table} (type {type_name}) at LSN {lsn}: {source}"
)]
pub struct EncodeErrorDetail {
    pub table: String,
    pub column: String,
    pub type_name: String,
    pub lsn: Lsn,
    #[source]
    pub source: ValueError,
}

impl From<EncodeErrorDetail> for EncodeError {
    fn from(d: EncodeErrorDetail) -> Self {
        EncodeError(Box::new(d))
    }
}

/// How events are encoded: JSON (the default) or Protobuf (`proto/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Protobuf => "application/x-protobuf",
        }
    }
}

/// Settings that apply to every event of a run.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Database name, `source.db`.
    pub db: String,
}

/// Writes one event as a JSON object (no trailing newline) into `out`.
///
/// On error `out` may hold a partial object: callers encode into a buffer they
/// discard on failure.
pub fn encode_json(
    ev: &ChangeEvent,
    opts: &EncodeOptions,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(ev.op.code().as_bytes());
    out.extend_from_slice(b"\",\"source\":{\"db\":");
    push_str(out, &opts.db);
    if let Some(t) = &ev.table {
        out.extend_from_slice(b",\"schema\":");
        push_str(out, &t.relation.schema);
        out.extend_from_slice(b",\"table\":");
        push_str(out, &t.relation.table);
        if let Some(model) = &t.model {
            out.extend_from_slice(b",\"model\":");
            push_str(out, model);
        }
        if let Some(m2m) = &t.many2many {
            out.extend_from_slice(b",\"many2many\":{");
            for (i, (name, v)) in [
                ("model", &m2m.model),
                ("field", &m2m.field),
                ("comodel", &m2m.comodel),
            ]
            .into_iter()
            .enumerate()
            {
                if i > 0 {
                    out.push(b',');
                }
                push_str(out, name);
                out.push(b':');
                match v {
                    Some(v) => push_str(out, v),
                    None => out.extend_from_slice(b"null"),
                }
            }
            out.push(b'}');
        }
    }
    out.extend_from_slice(b",\"lsn\":\"");
    write_lsn(ev.lsn, out);
    out.extend_from_slice(b"\",\"commit_lsn\":\"");
    write_lsn(ev.commit_lsn, out);
    out.extend_from_slice(b"\",\"xid\":");
    write_u64(u64::from(ev.xid), out);
    out.extend_from_slice(b",\"commit_ts\":\"");
    write_pg_timestamp(ev.commit_ts, out);
    out.extend_from_slice(b"\",\"seq\":");
    write_u64(ev.seq, out);
    out.extend_from_slice(if ev.snapshot {
        b",\"snapshot\":true}"
    } else {
        b",\"snapshot\":false}"
    });

    match (&ev.table, ev.op) {
        (Some(t), Op::Insert | Op::Update | Op::Delete | Op::Read) => {
            write_images(ev, t, opts, out)?;
        }
        (Some(_), Op::Truncate) => {
            out.extend_from_slice(b",\"key\":null,\"before\":null,\"after\":null,\"unchanged_toast\":[],\"truncate\":{\"cascade\":");
            out.extend_from_slice(bool_str(ev.truncate_options & 1 != 0));
            out.extend_from_slice(b",\"restart_identity\":");
            out.extend_from_slice(bool_str(ev.truncate_options & 2 != 0));
            out.push(b'}');
        }
        _ => {
            out.extend_from_slice(
                b",\"key\":null,\"before\":null,\"after\":null,\"unchanged_toast\":[]",
            );
        }
    }
    if let Some(m) = &ev.message {
        out.extend_from_slice(b",\"message\":{\"transactional\":");
        out.extend_from_slice(bool_str(m.transactional));
        out.extend_from_slice(b",\"prefix\":");
        push_str(out, &m.prefix);
        // Text content is the common case (JSON payloads, signals); anything
        // else travels as base64 under a different key so it is never mangled.
        if std::str::from_utf8(&m.content).is_ok() {
            out.extend_from_slice(b",\"content\":");
            push_str_bytes(out, &m.content);
        } else {
            use base64::Engine;
            out.extend_from_slice(b",\"content_base64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&m.content)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        out.push(b'}');
    }
    out.push(b'}');
    Ok(())
}

fn bool_str(b: bool) -> &'static [u8] {
    if b { b"true" } else { b"false" }
}

/// Which column values make up `key`, `before` and `after` of a row change,
/// as (column index, value) pairs; `None` where the event has JSON `null`.
/// Shared by the JSON and Protobuf encoders so both apply the same rules.
#[derive(Debug, Default)]
pub struct Images<'a> {
    pub key: Option<Vec<(usize, &'a ColumnValue)>>,
    pub before: Option<Vec<(usize, &'a ColumnValue)>>,
    pub after: Option<Vec<(usize, &'a ColumnValue)>>,
    /// Columns whose TOASTed value Postgres did not send (not changed).
    pub unchanged_toast: Vec<usize>,
}

impl ChangeEvent {
    pub fn images(&self) -> Images<'_> {
        let Some(t) = self.table.as_deref() else {
            return Images::default();
        };
        if self.op == Op::Truncate || self.op == Op::Message {
            return Images::default();
        }
        let skip = |i: usize| t.skip_column.get(i).copied().unwrap_or(false);
        let (old_tuple, old_is_full) = match &self.old {
            Some(OldTuple::Key(t)) => (Some(t), false),
            Some(OldTuple::Full(t)) => (Some(t), true),
            None => (None, false),
        };
        // key: from the new row when there is one (it holds the current key),
        // else from the old image (deletes).
        let key = match self.new.as_ref().or(old_tuple) {
            Some(tuple) if !t.key_columns.is_empty() => Some(
                t.key_columns
                    .iter()
                    .filter(|i| !skip(**i))
                    .map(|&i| (i, key_value(tuple, old_tuple, i)))
                    .collect(),
            ),
            _ => None,
        };
        let before = old_tuple.map(|old| {
            old.columns
                .iter()
                .enumerate()
                // A key-only image carries nulls for non-key columns: they are
                // unknown, not null, so they are left out.
                .filter(|(i, _)| old_is_full || t.key_columns.contains(i))
                .filter(|(i, v)| !skip(*i) && !matches!(v, ColumnValue::UnchangedToast))
                .collect()
        });
        let mut unchanged_toast = Vec::new();
        let after = self.new.as_ref().map(|new| {
            let mut cols = Vec::with_capacity(new.columns.len());
            for (i, value) in new.columns.iter().enumerate() {
                if skip(i) {
                    continue;
                }
                if matches!(value, ColumnValue::UnchangedToast) {
                    // With REPLICA IDENTITY FULL the old image has the value,
                    // and unchanged means it is still the current one.
                    match old_tuple
                        .filter(|_| old_is_full)
                        .and_then(|o| o.columns.get(i))
                    {
                        Some(
                            v @ (ColumnValue::Text(_) | ColumnValue::Binary(_) | ColumnValue::Null),
                        ) => cols.push((i, v)),
                        _ => unchanged_toast.push(i),
                    }
                } else {
                    cols.push((i, value));
                }
            }
            cols
        });
        Images {
            key,
            before,
            after,
            unchanged_toast,
        }
    }
}

/// Writes `key`, `before`, `after` and `unchanged_toast` for a row change.
fn write_images(
    ev: &ChangeEvent,
    t: &TableInfo,
    _opts: &EncodeOptions,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let images = ev.images();
    let object = |name: &[u8],
                  cols: &Option<Vec<(usize, &ColumnValue)>>,
                  out: &mut Vec<u8>|
     -> Result<(), EncodeError> {
        out.extend_from_slice(name);
        match cols {
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
            Some(cols) => {
                out.push(b'{');
                for (n, (i, v)) in cols.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    write_field(t, ev.lsn, *i, v, out)?;
                }
                out.push(b'}');
                Ok(())
            }
        }
    };
    object(b",\"key\":", &images.key, out)?;
    object(b",\"before\":", &images.before, out)?;
    object(b",\"after\":", &images.after, out)?;
    out.extend_from_slice(b",\"unchanged_toast\":[");
    for (n, i) in images.unchanged_toast.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        push_str(out, &t.relation.columns[*i].name);
    }
    out.push(b']');
    Ok(())
}

/// The key value of column `i`: the new row's, unless the new row could not
/// carry it (an unchanged TOASTed key column), then the old image's.
fn key_value<'a>(tuple: &'a TupleData, old: Option<&'a TupleData>, i: usize) -> &'a ColumnValue {
    match tuple.columns.get(i) {
        Some(ColumnValue::UnchangedToast) | None => old
            .and_then(|o| o.columns.get(i))
            .unwrap_or(&ColumnValue::UnchangedToast),
        Some(v) => v,
    }
}

/// The error for column `i` of `t`, with its context.
pub fn column_error(t: &TableInfo, lsn: Lsn, i: usize, source: ValueError) -> EncodeError {
    let (column, type_name) = match t.relation.columns.get(i) {
        Some(c) => (c.name.clone(), c.kind.name().to_string()),
        None => (format!("#{i}"), "?".to_string()),
    };
    EncodeErrorDetail {
        table: t.relation.qualified_name(),
        column,
        type_name,
        lsn,
        source,
    }
    .into()
}

/// Appends the JSON form of column `i`'s value (no name) to `out`.
pub fn write_column_json(
    t: &TableInfo,
    lsn: Lsn,
    i: usize,
    value: &ColumnValue,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let err = |source: ValueError| column_error(t, lsn, i, source);
    let Some(col) = t.relation.columns.get(i) else {
        return Err(err(ValueError {
            expected: "a column described by the last Relation message",
            excerpt: String::new(),
            reason: format!(
                "the row has more columns than the relation's {}",
                t.relation.columns.len()
            ),
        }));
    };
    match value {
        ColumnValue::Null => out.extend_from_slice(b"null"),
        ColumnValue::Text(text) => {
            if let (Some(lang), true) = (
                t.flatten_translations.as_deref(),
                t.translated_column.get(i).copied().unwrap_or(false),
            ) {
                crate::odoo::write_translation(text, lang, out).map_err(err)?;
            } else {
                write_json(&col.kind, text, out).map_err(err)?;
            }
        }
        ColumnValue::Binary(_) => {
            return Err(err(ValueError {
                expected: "a text-format value",
                excerpt: String::new(),
                reason: "binary-format column values are not requested and cannot be decoded"
                    .into(),
            }));
        }
        ColumnValue::UnchangedToast => {
            return Err(err(ValueError {
                expected: "a key value",
                excerpt: String::new(),
                reason: "an unchanged TOASTed value where the replica identity needs the value"
                    .into(),
            }));
        }
    }
    Ok(())
}

fn write_field(
    t: &TableInfo,
    lsn: Lsn,
    i: usize,
    value: &ColumnValue,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let name = t
        .relation
        .columns
        .get(i)
        .map(|c| c.name.as_str())
        .unwrap_or("?");
    push_str(out, name);
    out.push(b':');
    write_column_json(t, lsn, i, value, out)
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    write_json_string(s, out);
}

fn push_str_bytes(out: &mut Vec<u8>, s: &[u8]) {
    let _ = write_json_str(s, out);
}

/// Decimal digits of `v`, without going through `fmt` (hot path).
pub fn write_u64(v: u64, out: &mut Vec<u8>) {
    write_padded(v, 0, out);
}

/// An LSN in Postgres' `X/X` upper-case hex form, without allocating.
pub fn write_lsn(lsn: Lsn, out: &mut Vec<u8>) {
    fn hex(mut v: u32, out: &mut Vec<u8>) {
        let mut buf = [0u8; 8];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b"0123456789ABCDEF"[(v & 0xF) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        out.extend_from_slice(&buf[i..]);
    }
    hex((lsn.0 >> 32) as u32, out);
    out.push(b'/');
    hex(lsn.0 as u32, out);
}

/// Decimal digits of `v`, left-padded with zeros to at least `width`.
fn write_padded(mut v: u64, width: usize, out: &mut Vec<u8>) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let start = buf.len().saturating_sub(width).min(i);
    out.extend_from_slice(&buf[start..]);
}

/// Microseconds between 1970-01-01 and 2000-01-01 (the Postgres epoch).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Writes a Postgres-epoch microsecond timestamp as ISO 8601 UTC with
/// microseconds: `2026-11-21T23:40:01.123456Z`.
pub fn write_pg_timestamp(micros_since_2000: i64, out: &mut Vec<u8>) {
    let unix_micros = micros_since_2000.saturating_add(PG_EPOCH_OFFSET_MICROS);
    let secs = unix_micros.div_euclid(1_000_000);
    let frac = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if y < 0 {
        out.push(b'-');
    }
    write_padded(y.unsigned_abs(), 4, out);
    out.push(b'-');
    write_padded(u64::from(m), 2, out);
    out.push(b'-');
    write_padded(u64::from(d), 2, out);
    out.push(b'T');
    write_padded((sod / 3600) as u64, 2, out);
    out.push(b':');
    write_padded(((sod % 3600) / 60) as u64, 2, out);
    out.push(b':');
    write_padded((sod % 60) as u64, 2, out);
    out.push(b'.');
    write_padded(frac as u64, 6, out);
    out.push(b'Z');
}

/// Unix seconds of a Postgres-epoch microsecond timestamp (for AMQP `timestamp`).
pub fn pg_timestamp_unix_secs(micros_since_2000: i64) -> u64 {
    let unix = micros_since_2000.saturating_add(PG_EPOCH_OFFSET_MICROS);
    u64::try_from(unix.div_euclid(1_000_000)).unwrap_or(0)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (the standard
/// era-based conversion: 400-year eras of 146097 days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `--on-decode-error=raw`: encodes `ev` like [`encode_json`], except that a
/// column value which cannot be decoded is passed as its raw text form — a
/// JSON string, or base64 of the bytes when they are not UTF-8 (or were sent
/// in binary) — and named in `source.raw_columns`. Returns those column names.
///
/// The cold path: called only after [`encode_json`] failed, so the hot path
/// pays nothing for it. Errors that raw text cannot fix (an unchanged TOASTed
/// key) are still errors.
pub fn encode_json_raw(
    ev: &ChangeEvent,
    opts: &EncodeOptions,
    out: &mut Vec<u8>,
) -> Result<Vec<String>, EncodeError> {
    let Some(t) = ev.table.as_deref() else {
        encode_json(ev, opts, out)?;
        return Ok(Vec::new());
    };
    let n = t.relation.columns.len();
    // Which columns fail, and whether all their text is UTF-8.
    let mut bad = vec![false; n];
    let mut as_base64 = vec![false; n];
    let mut scratch = Vec::new();
    let tuples = [
        ev.new.as_ref(),
        ev.old.as_ref().map(|o| match o {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }),
    ];
    for tuple in tuples.into_iter().flatten() {
        for (i, v) in tuple.columns.iter().enumerate().take(n) {
            match v {
                ColumnValue::Text(text) => {
                    scratch.clear();
                    if write_column_json(t, ev.lsn, i, v, &mut scratch).is_err() {
                        bad[i] = true;
                        if std::str::from_utf8(text).is_err() {
                            as_base64[i] = true;
                        }
                    }
                }
                ColumnValue::Binary(_) => {
                    bad[i] = true;
                    as_base64[i] = true;
                }
                ColumnValue::Null | ColumnValue::UnchangedToast => {}
            }
        }
    }
    if !bad.contains(&true) {
        encode_json(ev, opts, out)?;
        return Ok(Vec::new());
    }
    // The same table with the bad columns retyped: text (a JSON string) or
    // bytea (base64, fed as `\x` hex), and never flattened as translations.
    let mut relation = (*t.relation).clone();
    let mut translated_column = t.translated_column.clone();
    for i in 0..n {
        if bad[i] {
            relation.columns[i].kind = if as_base64[i] {
                crate::value::TypeKind::Bytea
            } else {
                crate::value::TypeKind::Text
            };
            if let Some(tc) = translated_column.get_mut(i) {
                *tc = false;
            }
        }
    }
    let table = Arc::new(TableInfo {
        relation: Arc::new(relation),
        model: t.model.clone(),
        included: t.included,
        key_columns: t.key_columns.clone(),
        skip_column: t.skip_column.clone(),
        flatten_translations: t.flatten_translations.clone(),
        translated_column,
        many2many: t.many2many.clone(),
    });
    let retype = |tuple: &TupleData| TupleData {
        columns: tuple
            .columns
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                ColumnValue::Text(b) | ColumnValue::Binary(b)
                    if i < n && bad[i] && as_base64[i] =>
                {
                    let mut hex = Vec::with_capacity(2 + 2 * b.len());
                    hex.extend_from_slice(b"\\x");
                    for byte in b.iter() {
                        hex.extend_from_slice(format!("{byte:02x}").as_bytes());
                    }
                    ColumnValue::Text(Bytes::from(hex))
                }
                other => other.clone(),
            })
            .collect(),
    };
    let mut raw_ev = ev.clone();
    raw_ev.table = Some(table);
    raw_ev.new = ev.new.as_ref().map(retype);
    raw_ev.old = ev.old.as_ref().map(|o| match o {
        OldTuple::Key(t) => OldTuple::Key(retype(t)),
        OldTuple::Full(t) => OldTuple::Full(retype(t)),
    });
    let mut body = Vec::new();
    encode_json(&raw_ev, opts, &mut body)?;
    let names: Vec<String> = (0..n)
        .filter(|i| bad[*i])
        .map(|i| t.relation.columns[i].name.clone())
        .collect();
    // `source` is always the object that follows `"op":"<code>"` at the start.
    let at = body
        .windows(10)
        .position(|w| w == b"\"source\":{")
        .map(|p| p + 10)
        .unwrap_or(body.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(b"\"raw_columns\":[");
    for (k, name) in names.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        push_str(out, name);
    }
    out.extend_from_slice(b"],");
    out.extend_from_slice(&body[at..]);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(micros: i64) -> String {
        let mut v = Vec::new();
        write_pg_timestamp(micros, &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn formats_postgres_epoch_timestamps_in_utc() {
        assert_eq!(ts(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(ts(-1), "1999-12-31T23:59:59.999999Z");
        // 2026-11-21 23:40:01.123456 UTC: 848 619 601.123456 s after 2000-01-01
        assert_eq!(ts(848_619_601_123_456), "2026-11-21T23:40:01.123456Z");
        // leap day
        assert_eq!(ts(68_256_000_000_000), "2002-03-01T00:00:00.000000Z");
        assert_eq!(ts(4_579_200_000_000), "2000-02-23T00:00:00.000000Z");
        assert_eq!(ts(5_097_600_000_000), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn fast_number_writers_match_fmt() {
        for v in [0u64, 7, 10, 99, 12345, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            write_u64(v, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
        for l in [0u64, 0x16B3748, (0x1A << 32) | 0xFF, u64::MAX] {
            let mut out = Vec::new();
            write_lsn(Lsn(l), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), Lsn(l).to_string());
        }
    }

    #[test]
    fn message_ids_are_fixed_width() {
        assert_eq!(message_id(Lsn(0x16B37A0), 3), "00000000016B37A0-00000003");
        // Past 8 digits: still unique and in order as plain strings.
        let ids: Vec<String> = [
            0,
            99_999_998,
            99_999_999,
            100_000_000,
            100_000_001,
            u64::MAX,
        ]
        .iter()
        .map(|&s| message_id(Lsn(0x16B37A0), s))
        .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert_eq!(ids[3], "00000000016B37A0-99999999+00000000000100000000");
    }
}
