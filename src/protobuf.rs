//! Protobuf encoding of events (`--format protobuf`), schema in
//! `proto/change_event.proto`.
//!
//! The same images as the JSON form ([`ChangeEvent::images`]); values keep their
//! natural Protobuf types where one exists (bool, int64, double, bytes) and the
//! JSON form's normalised text otherwise (numeric, timestamps in UTC, ...).

use prost::Message as _;

use crate::event::{
    ChangeEvent, EncodeError, EncodeOptions, Op, TableInfo, column_error, write_column_json,
    write_pg_timestamp,
};
use crate::lsn::Lsn;
use crate::pgoutput::ColumnValue;
use crate::value::{TypeKind, ValueError};

/// Generated from `proto/change_event.proto`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/odoo_cdc.v1.rs"));
}

pub const EVENT_TYPE_NAME: &str = "odoo_cdc.v1.ChangeEvent";
pub const TRANSACTION_TYPE_NAME: &str = "odoo_cdc.v1.Transaction";

fn ts_string(micros: i64) -> String {
    let mut v = Vec::with_capacity(27);
    write_pg_timestamp(micros, &mut v);
    String::from_utf8(v).unwrap_or_default()
}

/// Builds the Protobuf message of one event.
pub fn to_message(ev: &ChangeEvent, opts: &EncodeOptions) -> Result<pb::ChangeEvent, EncodeError> {
    let source = pb::Source {
        db: opts.db.clone(),
        schema: ev.schema().unwrap_or_default().to_string(),
        table: ev.table_name().unwrap_or_default().to_string(),
        model: ev.model().map(str::to_string),
        lsn: ev.lsn.to_string(),
        commit_lsn: ev.commit_lsn.to_string(),
        xid: ev.xid,
        commit_ts: ts_string(ev.commit_ts),
        seq: ev.seq,
        snapshot: ev.snapshot,
        many2many: ev
            .table
            .as_ref()
            .and_then(|t| t.many2many.as_ref())
            .map(|m| pb::Many2Many {
                model: m.model.clone(),
                field: m.field.clone(),
                comodel: m.comodel.clone(),
            }),
    };
    let mut msg = pb::ChangeEvent {
        op: ev.op.code().to_string(),
        source: Some(source),
        ..Default::default()
    };
    if let Some(t) = ev.table.as_deref() {
        let images = ev.images();
        let row =
            |cols: &Option<Vec<(usize, &ColumnValue)>>| -> Result<Option<pb::Row>, EncodeError> {
                let Some(cols) = cols else { return Ok(None) };
                let mut fields = Vec::with_capacity(cols.len());
                for (i, v) in cols {
                    fields.push(pb::Field {
                        name: t
                            .relation
                            .columns
                            .get(*i)
                            .map(|c| c.name.clone())
                            .unwrap_or_default(),
                        value: Some(column_value(t, ev.lsn, *i, v)?),
                    });
                }
                Ok(Some(pb::Row { fields }))
            };
        msg.key = row(&images.key)?;
        msg.before = row(&images.before)?;
        msg.after = row(&images.after)?;
        msg.unchanged_toast = images
            .unchanged_toast
            .iter()
            .filter_map(|i| t.relation.columns.get(*i).map(|c| c.name.clone()))
            .collect();
        if ev.op == Op::Truncate {
            msg.truncate = Some(pb::Truncate {
                cascade: ev.truncate_options & 1 != 0,
                restart_identity: ev.truncate_options & 2 != 0,
            });
        }
    }
    if let Some(m) = &ev.message {
        msg.message = Some(pb::LogicalMessage {
            transactional: m.transactional,
            prefix: m.prefix.clone(),
            content: m.content.to_vec(),
        });
    }
    Ok(msg)
}

/// Appends the encoded event to `out`.
pub fn encode_event(
    ev: &ChangeEvent,
    opts: &EncodeOptions,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let msg = to_message(ev, opts)?;
    msg.encode(out)
        .map_err(|e| column_error_plain(ev, format!("protobuf encoding failed: {e}")))
}

fn column_error_plain(ev: &ChangeEvent, reason: String) -> EncodeError {
    crate::event::EncodeErrorDetail {
        table: ev
            .table
            .as_ref()
            .map(|t| t.relation.qualified_name())
            .unwrap_or_default(),
        column: String::new(),
        type_name: String::new(),
        lsn: ev.lsn,
        source: ValueError {
            expected: "an encodable event",
            excerpt: String::new(),
            reason,
        },
    }
    .into()
}

/// Appends an already-encoded `ChangeEvent` as element of `Transaction.events`
/// (field 6, length-delimited), so parts are built without re-encoding.
pub fn append_to_transaction(body: &mut Vec<u8>, encoded_event: &[u8]) {
    prost::encoding::encode_key(6, prost::encoding::WireType::LengthDelimited, body);
    prost::encoding::encode_varint(encoded_event.len() as u64, body);
    body.extend_from_slice(encoded_event);
}

/// Writes the `Transaction` header fields followed by the events appended with
/// [`append_to_transaction`] (Protobuf allows fields in any order).
#[allow(clippy::too_many_arguments)]
pub fn finish_transaction(
    out: &mut Vec<u8>,
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    part: u32,
    last: bool,
    events: &[u8],
) {
    let header = pb::Transaction {
        xid,
        commit_lsn: commit_lsn.to_string(),
        commit_ts: ts_string(commit_ts),
        part,
        r#final: last,
        events: Vec::new(),
    };
    // Encoding into a Vec cannot run out of space.
    let _ = header.encode(out);
    out.extend_from_slice(events);
}

fn column_value(
    t: &TableInfo,
    lsn: Lsn,
    i: usize,
    v: &ColumnValue,
) -> Result<pb::Value, EncodeError> {
    use pb::value::Kind;
    let err = |reason: String, expected: &'static str, text: &[u8]| {
        column_error(
            t,
            lsn,
            i,
            ValueError {
                expected,
                excerpt: String::from_utf8_lossy(&text[..text.len().min(40)]).into_owned(),
                reason,
            },
        )
    };
    let kind = t.relation.columns.get(i).map(|c| &c.kind);
    let translated =
        t.flatten_translations.is_some() && t.translated_column.get(i).copied().unwrap_or(false);
    let text = match v {
        ColumnValue::Null => {
            return Ok(pb::Value {
                kind: Some(Kind::Null(true)),
            });
        }
        ColumnValue::Text(text) => text,
        // Let the JSON path produce the precise error for the other cases.
        _ => {
            let mut scratch = Vec::new();
            write_column_json(t, lsn, i, v, &mut scratch)?;
            return Err(err("unsupported value".into(), "a text value", b""));
        }
    };
    let k = match (kind, translated) {
        (Some(TypeKind::Bool), false) => match text.as_ref() {
            b"t" => Kind::BoolValue(true),
            b"f" => Kind::BoolValue(false),
            _ => return Err(err("not t or f".into(), "bool", text)),
        },
        (Some(TypeKind::Int), false) => {
            let s = std::str::from_utf8(text).map_err(|e| err(e.to_string(), "integer", text))?;
            Kind::IntValue(
                s.parse()
                    .map_err(|e: std::num::ParseIntError| err(e.to_string(), "integer", text))?,
            )
        }
        (Some(TypeKind::Float), false) => {
            let s = std::str::from_utf8(text).map_err(|e| err(e.to_string(), "float", text))?;
            Kind::FloatValue(
                s.parse()
                    .map_err(|e: std::num::ParseFloatError| err(e.to_string(), "float", text))?,
            )
        }
        (Some(TypeKind::Bytea), false) => {
            let hex = text
                .strip_prefix(b"\\x")
                .ok_or_else(|| err("missing \\x prefix".into(), "bytea in hex form", text))?;
            Kind::BytesValue(
                decode_hex(hex)
                    .ok_or_else(|| err("invalid hex digits".into(), "bytea in hex form", text))?,
            )
        }
        (Some(TypeKind::Json), false) => {
            let mut scratch = Vec::with_capacity(text.len());
            write_column_json(t, lsn, i, v, &mut scratch)?;
            Kind::JsonValue(
                String::from_utf8(scratch).map_err(|e| err(e.to_string(), "json", text))?,
            )
        }
        _ => {
            // Everything else: the JSON form, converted.
            let mut scratch = Vec::with_capacity(text.len() + 2);
            write_column_json(t, lsn, i, v, &mut scratch)?;
            let json: serde_json::Value = serde_json::from_slice(&scratch)
                .map_err(|e| err(e.to_string(), "a JSON-convertible value", text))?;
            return Ok(from_json(json));
        }
    };
    Ok(pb::Value { kind: Some(k) })
}

fn from_json(v: serde_json::Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::Null(true),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Kind::IntValue(i),
            None => Kind::FloatValue(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(pb::ListValue {
            values: items.into_iter().map(from_json).collect(),
        }),
        obj @ serde_json::Value::Object(_) => Kind::JsonValue(obj.to_string()),
    };
    pb::Value { kind: Some(kind) }
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some((nib(p[0])? << 4) | nib(p[1])?))
        .collect()
}
