//! What goes to `<prefix>.dead_letter` instead of an event, and why: a
//! pgoutput message that cannot be decoded (`--on-decode-error=raw|dead-letter`),
//! an event with a value that cannot be encoded (`--on-decode-error=dead-letter`),
//! an event too large to publish (`--on-oversized=dead-letter`).
//!
//! Every envelope is JSON, names the error and where it happened (table, key,
//! LSN), and carries the `message_id` the event itself would have had, so a
//! consumer can tell what it is missing and deduplicate a replay. Building an
//! envelope does no I/O: the publisher sends it like any other message, and
//! the slot moves past it only once the broker confirmed it.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::error::SessionError;
use crate::event::{ChangeEvent, EncodeError, EncodeOptions, Format, pg_timestamp_unix_secs};
use crate::lsn::Lsn;
use crate::metrics::{DecodeOutcome, Metrics};
use crate::queue::Item;
use crate::routing::Routing;
use crate::session::config::OnDecodeError;
use crate::sink::{HeaderValue, OutgoingMessage};
use crate::transaction::AssembleError;

/// `<prefix>.dead_letter`.
pub(crate) fn routing_key(routing: &Routing) -> String {
    format!("{}.dead_letter", routing.prefix)
}

/// Applies `--on-decode-error` to a pgoutput message the assembler could not
/// take. `fail` (and every error that is not about decoding one message, such
/// as a protocol violation) stops the session; `raw` and `dead-letter` send the
/// message's bytes and the error to the dead-letter key (there is no column to
/// pass raw) and go on.
pub(crate) fn undecodable(
    e: AssembleError,
    policy: OnDecodeError,
    key: &str,
    payload: Option<&Bytes>,
    metrics: &Metrics,
) -> Result<Item, SessionError> {
    let lsn = match (&e, policy) {
        (AssembleError::Decode { lsn, .. }, OnDecodeError::Raw | OnDecodeError::DeadLetter) => *lsn,
        (AssembleError::Decode { .. }, OnDecodeError::Fail) => {
            metrics.decode_error(DecodeOutcome::Failed);
            return Err(e.into());
        }
        _ => return Err(e.into()),
    };
    metrics.decode_error(DecodeOutcome::DeadLetter);
    tracing::warn!(lsn = %lsn, error = %e, routing_key = key, "undecodable pgoutput message sent to the dead-letter key");
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"error\":");
    json_str(&mut body, &e.to_string());
    body.extend_from_slice(b",\"lsn\":\"");
    body.extend_from_slice(lsn.to_string().as_bytes());
    body.extend_from_slice(b"\",\"payload_base64\":");
    match payload {
        Some(p) => {
            use base64::Engine;
            body.push(b'"');
            body.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(p)
                    .as_bytes(),
            );
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    let mut headers = BTreeMap::new();
    headers.insert("x-lsn".into(), HeaderValue::Str(lsn.to_string()));
    headers.insert("x-error".into(), HeaderValue::Str(truncate(&e.to_string())));
    Ok(Item::DeadLetter(OutgoingMessage {
        routing_key: key.to_string(),
        body: Bytes::from(body),
        message_id: format!("{}-dead-letter", lsn.to_fixed_hex()),
        content_type: Format::Json.content_type(),
        timestamp: 0,
        kind: "dead_letter".into(),
        headers,
    }))
}

/// Builds the envelopes that stand for an event.
pub(crate) struct DeadLetters {
    key: String,
    encode: EncodeOptions,
    max_message_bytes: usize,
}

impl DeadLetters {
    pub(crate) fn new(routing: &Routing, encode: EncodeOptions, max_message_bytes: usize) -> Self {
        DeadLetters {
            key: routing_key(routing),
            encode,
            max_message_bytes,
        }
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// An event that cannot be encoded: the error, where it happened, and the
    /// event with the bad values passed raw (or `null` if even that fails).
    pub(crate) fn encode_error(&self, ev: &ChangeEvent, e: &EncodeError) -> OutgoingMessage {
        let d = &e.0;
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(b"{\"error\":");
        json_str(&mut body, &e.to_string());
        body.extend_from_slice(b",\"table\":");
        json_str(&mut body, &d.table);
        body.extend_from_slice(b",\"column\":");
        json_str(&mut body, &d.column);
        body.extend_from_slice(b",\"type\":");
        json_str(&mut body, &d.type_name);
        write_position(&mut body, d.lsn, ev);
        body.extend_from_slice(b",\"event\":");
        let mut raw = Vec::new();
        match crate::event::encode_json_raw(ev, &self.encode, &mut raw) {
            Ok(_) => body.extend_from_slice(&raw),
            Err(_) => body.extend_from_slice(b"null"),
        }
        body.push(b'}');
        let mut msg = self.envelope(ev, body, truncate(&e.to_string()), d.table.clone(), d.lsn);
        msg.headers
            .insert("x-column".into(), HeaderValue::Str(d.column.clone()));
        msg
    }

    /// An event whose message would need `size` bytes, over the limit: its
    /// table, key, position and size, without its values.
    pub(crate) fn oversized(&self, ev: &ChangeEvent, size: usize) -> OutgoingMessage {
        let table = table_name(ev);
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(b"{\"error\":\"oversized\",\"size\":");
        body.extend_from_slice(size.to_string().as_bytes());
        body.extend_from_slice(b",\"limit\":");
        body.extend_from_slice(self.max_message_bytes.to_string().as_bytes());
        body.extend_from_slice(b",\"table\":");
        json_str(&mut body, &table);
        body.extend_from_slice(b",\"op\":");
        json_str(&mut body, ev.op.code());
        body.extend_from_slice(b",\"key\":");
        body.extend_from_slice(self.key_json(ev).as_bytes());
        write_position(&mut body, ev.lsn, ev);
        body.extend_from_slice(b",\"xid\":");
        body.extend_from_slice(ev.xid.to_string().as_bytes());
        body.push(b'}');
        let mut msg = self.envelope(ev, body, "oversized".into(), table, ev.lsn);
        msg.headers
            .insert("x-size".into(), HeaderValue::Int(size as i64));
        msg
    }

    /// The error of an event too large to publish (`--on-oversized=fail`).
    pub(crate) fn oversized_error(&self, ev: &ChangeEvent, size: usize) -> SessionError {
        SessionError::Oversized {
            message_id: ev.message_id(),
            table: table_name(ev),
            key: self.key_json(ev),
            lsn: ev.lsn,
            size,
            limit: self.max_message_bytes,
        }
    }

    /// A JSON envelope standing for `ev` on the dead-letter key, with the id
    /// the event itself would have had and the headers every envelope
    /// carries (`x-error`, `x-table`, `x-lsn`, `x-commit-lsn`, `x-op`).
    fn envelope(
        &self,
        ev: &ChangeEvent,
        body: Vec<u8>,
        error: String,
        table: String,
        lsn: Lsn,
    ) -> OutgoingMessage {
        let mut headers = BTreeMap::new();
        headers.insert("x-error".into(), HeaderValue::Str(error));
        headers.insert("x-table".into(), HeaderValue::Str(table));
        headers.insert("x-lsn".into(), HeaderValue::Str(lsn.to_string()));
        headers.insert(
            "x-commit-lsn".into(),
            HeaderValue::Str(ev.commit_lsn.to_string()),
        );
        headers.insert("x-op".into(), HeaderValue::Str(ev.op.code().into()));
        OutgoingMessage {
            routing_key: self.key.clone(),
            body: Bytes::from(body),
            message_id: ev.message_id(),
            content_type: Format::Json.content_type(),
            timestamp: pg_timestamp_unix_secs(ev.commit_ts),
            kind: "dead_letter".into(),
            headers,
        }
    }

    /// The event's key as JSON (`null` without one), at most ~1 KB.
    fn key_json(&self, ev: &ChangeEvent) -> String {
        let mut full = Vec::new();
        let key = match crate::event::encode_json_raw(ev, &self.encode, &mut full) {
            Ok(_) => serde_json::from_slice::<serde_json::Value>(&full)
                .ok()
                .map(|v| v["key"].clone())
                .unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        };
        let text = key.to_string();
        if text.len() > 1024 {
            serde_json::Value::String(truncate(&text)).to_string()
        } else {
            text
        }
    }
}

/// `schema.table` of the event, empty for a logical message.
fn table_name(ev: &ChangeEvent) -> String {
    ev.table
        .as_ref()
        .map_or_else(String::new, |t| t.relation.qualified_name())
}

/// `,"lsn":"…","commit_lsn":"…","message_id":"…"` of an envelope that
/// stands for `ev`.
fn write_position(out: &mut Vec<u8>, lsn: Lsn, ev: &ChangeEvent) {
    out.extend_from_slice(b",\"lsn\":\"");
    out.extend_from_slice(lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"commit_lsn\":\"");
    out.extend_from_slice(ev.commit_lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"message_id\":");
    json_str(out, &ev.message_id());
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = crate::value::write_json_str(s.as_bytes(), out);
}

/// AMQP short strings in headers are fine long, but keep error headers readable.
fn truncate(s: &str) -> String {
    if s.len() <= 1000 {
        return s.to_string();
    }
    let mut end = 1000;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::exit_code;
    use crate::transaction::Assembler;

    #[test]
    fn an_unknown_pgoutput_message_fails_or_goes_to_the_dead_letter_key() {
        let metrics = Metrics::new();
        let data = Bytes::from_static(b"\x01future message");
        let mut a = Assembler::new(1 << 20, None);
        let e = a.push(Lsn(0x3000), &data).unwrap_err();
        let fail = undecodable(
            e,
            OnDecodeError::Fail,
            "odoo.dead_letter",
            Some(&data),
            &metrics,
        )
        .err()
        .unwrap();
        assert!(fail.to_string().contains("0/3000"), "{fail}");
        assert_eq!(fail.exit_code(), exit_code::BAD_DATA);

        for policy in [OnDecodeError::Raw, OnDecodeError::DeadLetter] {
            let e = a.push(Lsn(0x3000), &data).unwrap_err();
            let Ok(Item::DeadLetter(m)) =
                undecodable(e, policy, "odoo.dead_letter", Some(&data), &metrics)
            else {
                panic!("expected a dead letter");
            };
            assert_eq!(m.routing_key, "odoo.dead_letter");
            assert_eq!(m.message_id, "0000000000003000-dead-letter");
            let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(body["lsn"], "0/3000");
            assert_eq!(body["payload_base64"], "AWZ1dHVyZSBtZXNzYWdl");
            assert!(body["error"].as_str().unwrap().contains("0/3000"));
        }
        // A protocol violation is never dead-lettered: the stream is out of step.
        let commit = Bytes::from_static(&[
            b'C', 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        if let Err(e) = a.push(Lsn(0x4000), &commit) {
            assert!(undecodable(e, OnDecodeError::DeadLetter, "k", None, &metrics).is_err());
        }
    }
}
