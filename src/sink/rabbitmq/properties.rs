//! [`OutgoingMessage`] fields to AMQP basic properties.
//!
//! The message is owned, so its strings move into the AMQP types instead of
//! being copied. AMQP "short strings" (routing key, property values, header
//! names) hold at most 255 bytes; lapin's `From` conversions panic beyond
//! that, so every one goes through [`short`].

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::sink::{HeaderValue, SinkError};

/// AMQP `delivery_mode` 2: the broker writes the message to disk before it
/// confirms it, so a confirm survives a broker restart.
const PERSISTENT: u8 = 2;

/// The properties of one event message.
pub(crate) fn properties(
    message_id: &str,
    content_type: &'static str,
    timestamp: u64,
    kind: String,
    headers: BTreeMap<String, HeaderValue>,
) -> Result<BasicProperties, SinkError> {
    Ok(BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short(message_id.to_owned(), "message_id", message_id)?)
        .with_content_type(short(content_type.to_owned(), "content_type", message_id)?)
        .with_timestamp(timestamp)
        .with_type(short(kind, "type", message_id)?)
        .with_headers(field_table(headers, message_id)?))
}

/// Application headers as an AMQP field table: strings as long strings
/// (no length limit), integers as signed 64-bit, booleans as booleans.
pub(crate) fn field_table(
    headers: BTreeMap<String, HeaderValue>,
    message_id: &str,
) -> Result<FieldTable, SinkError> {
    headers
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                HeaderValue::Str(s) => AMQPValue::LongString(s.into()),
                HeaderValue::Int(i) => AMQPValue::LongLongInt(i),
                HeaderValue::Bool(b) => AMQPValue::Boolean(b),
            };
            Ok((short(name, "header name", message_id)?, value))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map(FieldTable::from)
}

/// A short string, or an error naming the field and message instead of a panic.
pub(crate) fn short(
    value: String,
    field: &'static str,
    message_id: &str,
) -> Result<ShortString, SinkError> {
    let len = value.len();
    ShortString::try_new(value).map_err(|_| SinkError::Invalid {
        message_id: message_id.to_owned(),
        reason: format!("{field} is {len} bytes long; AMQP allows at most 255"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_their_types() {
        let mut headers = BTreeMap::new();
        headers.insert("x-lsn".to_owned(), HeaderValue::Str("0/16B3748".into()));
        headers.insert("x-xid".to_owned(), HeaderValue::Int(745));
        headers.insert("x-parts-final".to_owned(), HeaderValue::Bool(true));
        let table = field_table(headers, "m").unwrap();
        let inner = table.inner();
        assert_eq!(
            inner.get("x-lsn"),
            Some(&AMQPValue::LongString("0/16B3748".into()))
        );
        assert_eq!(inner.get("x-xid"), Some(&AMQPValue::LongLongInt(745)));
        assert_eq!(inner.get("x-parts-final"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(inner.len(), 3);
    }

    #[test]
    fn properties_are_persistent_and_complete() {
        let p = properties(
            "0000000016B37A0-00000003",
            "application/json",
            1_790_000_000,
            "sale.order.update".into(),
            BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some("0000000016B37A0-00000003")
        );
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.timestamp(), Some(1_790_000_000));
        assert_eq!(
            p.kind().as_ref().map(|s| s.as_str()),
            Some("sale.order.update")
        );
    }

    #[test]
    fn oversized_short_strings_are_errors_not_panics() {
        let long = "k".repeat(256);
        let err =
            properties("m-1", "application/json", 0, long.clone(), BTreeMap::new()).unwrap_err();
        assert!(
            matches!(&err, SinkError::Invalid { message_id, reason } if message_id == "m-1" && reason.contains("type") && reason.contains("256")),
            "{err}"
        );
        let mut headers = BTreeMap::new();
        headers.insert(long, HeaderValue::Bool(true));
        assert!(matches!(
            field_table(headers, "m-2"),
            Err(SinkError::Invalid { .. })
        ));
        assert!(short("k".repeat(255), "routing key", "m").is_ok());
    }
}
