//! Transaction granularity: the events of one transaction gathered into
//! messages ("parts"), each cut by events (`--max-events-per-message`) and by
//! bytes (`--max-message-bytes`, the broker refuses bodies over its
//! `max_message_size`). The last part says `final: true`.
//!
//! A part's `message_id` is the id of its first event (`<commit_lsn>-<seq>`),
//! so parts are ordered and a replayed part has the same id; an empty final
//! part (every later event went elsewhere) takes the sequence number after the
//! last event seen, never one an event used. Building a part does no I/O.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::event::{Format, pg_timestamp_unix_secs, write_pg_timestamp};
use crate::lsn::Lsn;
use crate::routing::Routing;
use crate::sink::{HeaderValue, OutgoingMessage};

/// Room kept in a transaction message for its envelope (xid, LSN, time,
/// part number) around the events.
pub(crate) const ENVELOPE_BYTES: usize = 256;

/// The part of a transaction being filled.
pub(crate) struct TransactionParts {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
    part: u32,
    first_seq: Option<u64>,
    /// Sequence number after the last event seen, for an empty final part's id.
    next_seq: u64,
    events: u32,
    body: Vec<u8>,
}

impl TransactionParts {
    pub(crate) fn begin(xid: u32, commit_lsn: Lsn, commit_ts: i64) -> Self {
        TransactionParts {
            xid,
            commit_lsn,
            commit_ts,
            part: 0,
            first_seq: None,
            next_seq: 0,
            events: 0,
            body: Vec::new(),
        }
    }

    /// Notes an event of this transaction, whatever becomes of it (added,
    /// dead-lettered, refused): an empty final part must not take its id.
    pub(crate) fn saw(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Whether an event of `encoded_len` bytes must go into the next part.
    pub(crate) fn is_full(&self, encoded_len: usize, max_events: usize, max_bytes: usize) -> bool {
        self.events as usize >= max_events
            || (self.events > 0 && self.body.len() + encoded_len + 1 + ENVELOPE_BYTES > max_bytes)
    }

    /// Appends an encoded event to the current part.
    pub(crate) fn add(&mut self, seq: u64, encoded: &[u8], format: Format) {
        if self.first_seq.is_none() {
            self.first_seq = Some(seq);
        }
        match format {
            Format::Json => {
                if self.events > 0 {
                    self.body.push(b',');
                }
                self.body.extend_from_slice(encoded);
            }
            Format::Protobuf => crate::protobuf::append_to_transaction(&mut self.body, encoded),
        }
        self.events += 1;
    }

    /// The current part as a message (the last one with `last`), and a fresh
    /// part started; `None` when there is nothing to publish (an empty
    /// transaction, everything filtered, or an empty part that is not the last).
    pub(crate) fn take(
        &mut self,
        last: bool,
        format: Format,
        routing: &Routing,
    ) -> Option<OutgoingMessage> {
        if self.events == 0 && (self.part == 0 || !last) {
            return None;
        }
        let mut body = Vec::with_capacity(self.body.len() + 160);
        match format {
            Format::Json => self.write_json(last, &mut body),
            Format::Protobuf => crate::protobuf::finish_transaction(
                &mut body,
                self.xid,
                self.commit_lsn,
                self.commit_ts,
                self.part,
                last,
                &self.body,
            ),
        }
        let seq = self.first_seq.unwrap_or(self.next_seq);
        let mut headers = BTreeMap::new();
        headers.insert(
            "x-commit-lsn".into(),
            HeaderValue::Str(self.commit_lsn.to_string()),
        );
        headers.insert("x-xid".into(), HeaderValue::Int(i64::from(self.xid)));
        headers.insert("x-part".into(), HeaderValue::Int(i64::from(self.part)));
        headers.insert("x-parts-final".into(), HeaderValue::Bool(last));
        headers.insert("x-events".into(), HeaderValue::Int(i64::from(self.events)));
        if format == Format::Protobuf {
            headers.insert(
                "x-protobuf-type".into(),
                HeaderValue::Str(crate::protobuf::TRANSACTION_TYPE_NAME.into()),
            );
        }
        let msg = OutgoingMessage {
            routing_key: routing.transaction_key(),
            body: Bytes::from(body),
            message_id: crate::event::message_id(self.commit_lsn, seq),
            content_type: format.content_type(),
            timestamp: pg_timestamp_unix_secs(self.commit_ts),
            kind: "transaction".into(),
            headers,
        };
        self.part += 1;
        self.events = 0;
        self.first_seq = None;
        self.body.clear();
        Some(msg)
    }

    fn write_json(&self, last: bool, body: &mut Vec<u8>) {
        body.extend_from_slice(b"{\"xid\":");
        body.extend_from_slice(self.xid.to_string().as_bytes());
        body.extend_from_slice(b",\"commit_lsn\":\"");
        body.extend_from_slice(self.commit_lsn.to_string().as_bytes());
        body.extend_from_slice(b"\",\"commit_ts\":\"");
        write_pg_timestamp(self.commit_ts, body);
        body.extend_from_slice(b"\",\"part\":");
        body.extend_from_slice(self.part.to_string().as_bytes());
        body.extend_from_slice(if last {
            b",\"final\":true,\"events\":["
        } else {
            b",\"final\":false,\"events\":["
        });
        body.extend_from_slice(&self.body);
        body.extend_from_slice(b"]}");
    }
}
