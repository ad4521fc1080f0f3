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
use crate::sink::{HeaderValue, OutgoingMessage};

pub const DEFAULT_TEMPLATE: &str = "{prefix}.{schema}.{table}.{op}";

#[derive(Debug, Clone)]
pub struct Routing {
    pub prefix: String,
    pub template: String,
}

impl Routing {
    pub fn new(prefix: impl Into<String>, template: Option<String>) -> Self {
        Routing {
            prefix: prefix.into(),
            template: template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_validated() {
        assert!(Routing::validate_template(DEFAULT_TEMPLATE).is_ok());
        assert!(Routing::validate_template("odoo.{model}.{op}").is_ok());
        assert!(Routing::validate_template("{prefix}.{tabel}").is_err());
        assert!(Routing::validate_template("{prefix").is_err());
    }
}
