//! The RabbitMQ mapping: routing keys, message properties and headers for
//! events (docs/events.md, "RabbitMQ mapping").
//!
//! Routing key default: `<prefix>.<schema>.<table>.<op-word>`, so consumers bind
//! `odoo.public.sale_order.*` or `odoo.public.#`. A template can reshape it with
//! the placeholders `{prefix}`, `{schema}`, `{table}`, `{op}` and `{model}`
//! (`{model}` falls back to `<schema>.<table>` for tables without a model).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::event::{ChangeEvent, Op, pg_timestamp_unix_secs};
use crate::pgoutput::{ColumnValue, OldTuple};
use crate::sink::{HeaderValue, OutgoingMessage, PARTITION_KEY};

pub const DEFAULT_TEMPLATE: &str = "{prefix}.{schema}.{table}.{op}";

#[derive(Debug, Clone)]
pub struct Routing {
    pub prefix: String,
    pub template: String,
    /// Add the `x-partition-key` header to row changes (a partitioned stream
    /// sink needs it; nothing else pays for building it).
    pub partition_keys: bool,
}

impl Routing {
    pub fn new(prefix: impl Into<String>, template: Option<String>) -> Self {
        Routing {
            prefix: prefix.into(),
            template: template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
            partition_keys: false,
        }
    }

    /// Checks a template names only known placeholders (config validation).
    pub fn validate_template(template: &str) -> Result<(), String> {
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in routing key template {template:?}"))?;
            let name = &rest[start + 1..start + end];
            if !matches!(name, "prefix" | "schema" | "table" | "op" | "model") {
                return Err(format!(
                    "unknown placeholder {{{name}}} in routing key template {template:?} (known: prefix, schema, table, op, model)"
                ));
            }
            rest = &rest[start + end + 1..];
        }
        Ok(())
    }

    pub fn routing_key(&self, ev: &ChangeEvent) -> String {
        match (&ev.table, ev.op) {
            (None, Op::Message) => {
                // Logical messages are not tied to a table: `<prefix>.message.<message prefix>`.
                let p = ev.message.as_ref().map(|m| m.prefix.as_str()).unwrap_or("");
                format!("{}.message.{}", self.prefix, p)
            }
            _ => {
                // One pass over the template (this runs for every event): each
                // placeholder is replaced once, never inside a substituted value.
                let schema = ev.schema().unwrap_or("");
                let table = ev.table_name().unwrap_or("");
                let mut key = String::with_capacity(self.template.len() + 48);
                let mut rest = self.template.as_str();
                while let Some(start) = rest.find('{') {
                    key.push_str(&rest[..start]);
                    let tail = &rest[start..];
                    let Some(end) = tail.find('}') else {
                        rest = tail;
                        break;
                    };
                    match &tail[1..end] {
                        "prefix" => key.push_str(&self.prefix),
                        "schema" => key.push_str(schema),
                        "table" => key.push_str(table),
                        "op" => key.push_str(ev.op.word()),
                        "model" => match ev.model() {
                            Some(model) => key.push_str(model),
                            None => {
                                key.push_str(schema);
                                key.push('.');
                                key.push_str(table);
                            }
                        },
                        _ => key.push_str(&tail[..=end]),
                    }
                    rest = &tail[end + 1..];
                }
                key.push_str(rest);
                key
            }
        }
    }

    /// AMQP `type`: `<model>.<op-word>` when the model is known, else `<schema>.<table>.<op-word>`.
    pub fn kind(ev: &ChangeEvent) -> String {
        match (ev.model(), ev.schema(), ev.table_name()) {
            (Some(m), _, _) => format!("{m}.{}", ev.op.word()),
            (None, Some(s), Some(t)) => format!("{s}.{t}.{}", ev.op.word()),
            _ => format!("message.{}", ev.op.word()),
        }
    }

    /// The message for one event at row granularity.
    pub fn row_message(
        &self,
        ev: &ChangeEvent,
        body: Bytes,
        content_type: &'static str,
    ) -> OutgoingMessage {
        let mut headers = BTreeMap::new();
        headers.insert("x-lsn".into(), HeaderValue::Str(ev.lsn.to_string()));
        headers.insert(
            "x-commit-lsn".into(),
            HeaderValue::Str(ev.commit_lsn.to_string()),
        );
        headers.insert("x-xid".into(), HeaderValue::Int(i64::from(ev.xid)));
        if let (Some(s), Some(t)) = (ev.schema(), ev.table_name()) {
            headers.insert("x-table".into(), HeaderValue::Str(format!("{s}.{t}")));
        }
        headers.insert("x-op".into(), HeaderValue::Str(ev.op.code().into()));
        if content_type == crate::event::Format::Protobuf.content_type() {
            headers.insert(
                "x-protobuf-type".into(),
                HeaderValue::Str(crate::protobuf::EVENT_TYPE_NAME.into()),
            );
        }
        if ev.snapshot {
            headers.insert("x-snapshot".into(), HeaderValue::Bool(true));
        }
        if self.partition_keys
            && let Some(key) = partition_key(ev)
        {
            headers.insert(PARTITION_KEY.into(), HeaderValue::Str(key));
        }
        OutgoingMessage {
            routing_key: self.routing_key(ev),
            body,
            message_id: ev.message_id(),
            content_type,
            timestamp: pg_timestamp_unix_secs(ev.commit_ts),
            kind: Self::kind(ev),
            headers,
        }
    }

    /// Routing key of transaction-granularity messages.
    pub fn transaction_key(&self) -> String {
        format!("{}.transaction", self.prefix)
    }
}

/// The partition key of a row change or snapshot row: `<schema>.<table>`,
/// then `/` and the value of each key column (replica identity, or primary
/// key under `REPLICA IDENTITY FULL`; columns left out of events are left out
/// here too) in column order, as PostgreSQL's text output writes it
/// (`public.sale_order/42`, `public.sale_order_tag_rel/7/3`). The key is the
/// new row's (an update that changes the key is keyed by the new key), the
/// old row's for a delete. A table without key: `<schema>.<table>` alone.
/// `None` for truncates and logical messages, which name no row.
///
/// Partitioned streams hash it (`sink/stream/partition.rs`); it is in the
/// message so that consumers and tools need not rebuild it.
pub fn partition_key(ev: &ChangeEvent) -> Option<String> {
    let t = ev.table.as_deref()?;
    if matches!(ev.op, Op::Truncate | Op::Message) {
        return None;
    }
    let old = match &ev.old {
        Some(OldTuple::Key(o) | OldTuple::Full(o)) => Some(o),
        None => None,
    };
    let mut key = String::with_capacity(48);
    key.push_str(&t.relation.schema);
    key.push('.');
    key.push_str(&t.relation.table);
    let Some(row) = ev.new.as_ref().or(old) else {
        return Some(key);
    };
    for &i in &t.key_columns {
        if t.skip_column.get(i).copied().unwrap_or(false) {
            continue;
        }
        key.push('/');
        // An unchanged TOASTed key value is in the old image.
        let value = match row.columns.get(i) {
            Some(ColumnValue::UnchangedToast) | None => old.and_then(|o| o.columns.get(i)),
            v => v,
        };
        if let Some(ColumnValue::Text(b) | ColumnValue::Binary(b)) = value {
            key.push_str(&String::from_utf8_lossy(b));
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use crate::event::TableInfo;
    use crate::lsn::Lsn;
    use crate::pgoutput::TupleData;
    use crate::schema::{Column, Relation, ReplicaIdentity};

    fn tuple(values: &[Option<&str>]) -> TupleData {
        TupleData {
            columns: values
                .iter()
                .map(|v| match v {
                    Some(t) => ColumnValue::Text(Bytes::copy_from_slice(t.as_bytes())),
                    None => ColumnValue::Null,
                })
                .collect(),
        }
    }

    /// A `public.tag_rel (a int, b int, note text)` change keyed by (a, b).
    fn event(op: Op, new: Option<TupleData>, old: Option<OldTuple>) -> ChangeEvent {
        let rel = Arc::new(Relation::new(
            1,
            "public",
            "tag_rel",
            ReplicaIdentity::Default,
            vec![
                Column::new("a", 23, -1, true),
                Column::new("b", 23, -1, true),
                Column::new("note", 25, -1, false),
            ],
        ));
        ChangeEvent {
            op,
            table: Some(Arc::new(TableInfo::plain(rel))),
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            xid: 1,
            commit_ts: 0,
            seq: 0,
            snapshot: false,
            old,
            new,
            truncate_options: 0,
            message: None,
        }
    }

    #[test]
    fn partition_keys_name_table_and_key() {
        let ins = event(
            Op::Insert,
            Some(tuple(&[Some("7"), Some("3"), Some("x")])),
            None,
        );
        assert_eq!(partition_key(&ins).as_deref(), Some("public.tag_rel/7/3"));
        let del = event(
            Op::Delete,
            None,
            Some(OldTuple::Key(tuple(&[Some("7"), Some("3"), None]))),
        );
        assert_eq!(partition_key(&del).as_deref(), Some("public.tag_rel/7/3"));
        let mut upd = event(
            Op::Update,
            Some(tuple(&[Some("7"), Some("3"), Some("y")])),
            None,
        );
        if let Some(new) = upd.new.as_mut() {
            new.columns[1] = ColumnValue::UnchangedToast;
        }
        upd.old = Some(OldTuple::Key(tuple(&[Some("7"), Some("3"), None])));
        assert_eq!(partition_key(&upd).as_deref(), Some("public.tag_rel/7/3"));
        assert_eq!(partition_key(&event(Op::Truncate, None, None)), None);

        let mut routing = Routing::new("odoo", None);
        let plain = routing.row_message(&ins, Bytes::new(), "application/json");
        assert!(!plain.headers.contains_key(PARTITION_KEY));
        routing.partition_keys = true;
        let keyed = routing.row_message(&ins, Bytes::new(), "application/json");
        assert_eq!(
            keyed.headers.get(PARTITION_KEY),
            Some(&HeaderValue::Str("public.tag_rel/7/3".into()))
        );
    }

    #[test]
    fn templates_are_validated() {
        assert!(Routing::validate_template(DEFAULT_TEMPLATE).is_ok());
        assert!(Routing::validate_template("odoo.{model}.{op}").is_ok());
        assert!(Routing::validate_template("{prefix}.{tabel}").is_err());
        assert!(Routing::validate_template("{prefix").is_err());
    }
}
