//! Messages in a stream are AMQP 1.0 encoded. Ours have three sections:
//!
//! * `properties`: `message-id` (the event's stable id), `subject` (the AMQP
//!   0-9-1 `type`, e.g. `sale.order.update`), `content-type` and
//!   `creation-time` (commit time, milliseconds);
//! * `application-properties`: the same headers the AMQP sink sends
//!   (`x-lsn`, `x-commit-lsn`, `x-xid`, `x-table`, `x-op`, ...), plus
//!   `x-routing-key`, the routing key the AMQP sink would have used;
//! * `data`: the body, unchanged.
//!
//! [`decode`] reads such a message back (and the common AMQP 1.0 types other
//! producers use), for the test consumer and for operators' tooling.

use std::collections::BTreeMap;

use crate::sink::HeaderValue;

const DESCRIBED: u8 = 0x00;
const SMALLULONG: u8 = 0x53;
const PROPERTIES: u8 = 0x73;
const APPLICATION_PROPERTIES: u8 = 0x74;
const DATA: u8 = 0x75;

const NULL: u8 = 0x40;
const TRUE: u8 = 0x41;
const FALSE: u8 = 0x42;
const LONG: u8 = 0x81;
const TIMESTAMP: u8 = 0x83;
const STR32: u8 = 0xb1;
const SYM32: u8 = 0xb3;
const VBIN32: u8 = 0xb0;
const LIST32: u8 = 0xd0;
const MAP32: u8 = 0xd1;

/// What goes into one stream message.
pub struct Parts<'a> {
    pub message_id: &'a str,
    pub subject: &'a str,
    pub content_type: &'a str,
    /// Seconds since the Unix epoch.
    pub timestamp: u64,
    pub routing_key: &'a str,
    pub headers: &'a BTreeMap<String, HeaderValue>,
    pub body: &'a [u8],
}

/// The name under which the routing key travels as an application property.
pub const ROUTING_KEY: &str = "x-routing-key";

fn str32(out: &mut Vec<u8>, code: u8, s: &str) {
    out.push(code);
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a compound (list or map) whose elements `fill` appends.
fn compound(out: &mut Vec<u8>, code: u8, count: u32, fill: impl FnOnce(&mut Vec<u8>)) {
    out.push(code);
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    fill(out);
    // size counts the count field and the elements
    let size = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&size.to_be_bytes());
    out[at + 4..at + 8].copy_from_slice(&count.to_be_bytes());
}

pub fn encode(p: &Parts<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.body.len() + 256);
    out.extend_from_slice(&[DESCRIBED, SMALLULONG, PROPERTIES]);
    compound(&mut out, LIST32, 10, |out| {
        str32(out, STR32, p.message_id); // message-id
        out.push(NULL); // user-id
        out.push(NULL); // to
        str32(out, STR32, p.subject); // subject
        out.push(NULL); // reply-to
        out.push(NULL); // correlation-id
        str32(out, SYM32, p.content_type); // content-type
        out.push(NULL); // content-encoding
        out.push(NULL); // absolute-expiry-time
        out.push(TIMESTAMP); // creation-time
        let ms = i64::try_from(p.timestamp.saturating_mul(1000)).unwrap_or(i64::MAX);
        out.extend_from_slice(&ms.to_be_bytes());
    });

    out.extend_from_slice(&[DESCRIBED, SMALLULONG, APPLICATION_PROPERTIES]);
    let pairs = p.headers.len() as u32 + 1;
    compound(&mut out, MAP32, pairs * 2, |out| {
        str32(out, STR32, ROUTING_KEY);
        str32(out, STR32, p.routing_key);
        for (k, v) in p.headers {
            str32(out, STR32, k);
            match v {
                HeaderValue::Str(s) => str32(out, STR32, s),
                HeaderValue::Int(i) => {
                    out.push(LONG);
                    out.extend_from_slice(&i.to_be_bytes());
                }
                HeaderValue::Bool(b) => out.push(if *b { TRUE } else { FALSE }),
            }
        }
    });

    out.extend_from_slice(&[DESCRIBED, SMALLULONG, DATA, VBIN32]);
    out.extend_from_slice(&(p.body.len() as u32).to_be_bytes());
    out.extend_from_slice(p.body);
    out
}

/// A message read back from a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamMessage {
    /// Offset of the message in the stream.
    pub offset: u64,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub content_type: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub creation_time: Option<i64>,
    pub application_properties: BTreeMap<String, HeaderValue>,
    pub body: Vec<u8>,
}

/// A decoded AMQP 1.0 value, as far as we need to tell them apart.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Timestamp(i64),
    Str(String),
    Binary(Vec<u8>),
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Described(u64, Box<Value>),
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated AMQP 1.0 message")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }
    fn value(&mut self) -> Result<Value, String> {
        let code = self.take(1)?[0];
        Ok(match code {
            DESCRIBED => {
                let Value::Uint(d) = self.value()? else {
                    return Err("only numeric descriptors are supported".into());
                };
                Value::Described(d, Box::new(self.value()?))
            }
            NULL => Value::Null,
            TRUE => Value::Bool(true),
            FALSE => Value::Bool(false),
            0x56 => Value::Bool(self.be(1)? != 0),
            0x43 | 0x44 => Value::Uint(0),
            0x50 | 0x52 | 0x53 => Value::Uint(self.be(1)?),
            0x60 => Value::Uint(self.be(2)?),
            0x70 => Value::Uint(self.be(4)?),
            0x80 => Value::Uint(self.be(8)?),
            0x51 | 0x54 | 0x55 => Value::Int(i64::from(self.be(1)? as u8 as i8)),
            0x61 => Value::Int(i64::from(self.be(2)? as u16 as i16)),
            0x71 => Value::Int(i64::from(self.be(4)? as u32 as i32)),
            LONG => Value::Int(self.be(8)? as i64),
            TIMESTAMP => Value::Timestamp(self.be(8)? as i64),
            0x98 => Value::Binary(self.take(16)?.to_vec()), // uuid
            0xa0 | 0xa1 | 0xa3 | 0xb0 | 0xb1 | 0xb3 => {
                let n = self.be(if code & 0xf0 == 0xa0 { 1 } else { 4 })? as usize;
                let raw = self.take(n)?;
                if code & 0x0f == 0 {
                    Value::Binary(raw.to_vec())
                } else {
                    Value::Str(String::from_utf8_lossy(raw).into_owned())
                }
            }
            0x45 => Value::List(Vec::new()),
            0xc0 | 0xc1 | 0xd0 | 0xd1 => {
                let w = if code & 0xf0 == 0xc0 { 1 } else { 4 };
                let _size = self.be(w)?;
                let count = self.be(w)? as usize;
                let mut items = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    items.push(self.value()?);
                }
                if code & 0x0f == 0 {
                    Value::List(items)
                } else {
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                }
            }
            other => return Err(format!("unsupported AMQP 1.0 type code 0x{other:02x}")),
        })
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        _ => None,
    }
}

/// Decodes a message as stored in a stream.
pub fn decode(bytes: &[u8]) -> Result<StreamMessage, String> {
    let mut d = Dec { b: bytes, pos: 0 };
    let mut m = StreamMessage::default();
    while d.pos < bytes.len() {
        let Value::Described(code, value) = d.value()? else {
            return Err("expected a described section".into());
        };
        match (code, *value) {
            (0x73, Value::List(fields)) => {
                let field = |i: usize| fields.get(i).cloned().unwrap_or(Value::Null);
                m.message_id = text(&field(0));
                m.subject = text(&field(3));
                m.content_type = text(&field(6));
                if let Value::Timestamp(t) = field(9) {
                    m.creation_time = Some(t);
                }
            }
            (0x74, Value::Map(pairs)) => {
                for (k, v) in pairs {
                    let Some(k) = text(&k) else { continue };
                    let v = match v {
                        Value::Str(s) => HeaderValue::Str(s),
                        Value::Int(i) => HeaderValue::Int(i),
                        Value::Uint(u) => HeaderValue::Int(u as i64),
                        Value::Bool(b) => HeaderValue::Bool(b),
                        _ => continue,
                    };
                    m.application_properties.insert(k, v);
                }
            }
            (0x75, Value::Binary(b)) => m.body.extend_from_slice(&b),
            (0x77, Value::Str(s)) => m.body.extend_from_slice(s.as_bytes()),
            _ => {} // header, annotations, footer: not ours
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut headers = BTreeMap::new();
        headers.insert("x-lsn".to_owned(), HeaderValue::Str("0/16B3748".into()));
        headers.insert("x-xid".to_owned(), HeaderValue::Int(-745));
        headers.insert("x-snapshot".to_owned(), HeaderValue::Bool(true));
        let bytes = encode(&Parts {
            message_id: "00000000016B37A0-00000003",
            subject: "sale.order.update",
            content_type: "application/json",
            timestamp: 1_700_000_000,
            routing_key: "odoo.public.sale_order.update",
            headers: &headers,
            body: b"{\"a\":1}",
        });
        let m = decode(&bytes).unwrap();
        assert_eq!(m.message_id.as_deref(), Some("00000000016B37A0-00000003"));
        assert_eq!(m.subject.as_deref(), Some("sale.order.update"));
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.creation_time, Some(1_700_000_000_000));
        assert_eq!(m.body, b"{\"a\":1}");
        let mut want = headers.clone();
        want.insert(
            ROUTING_KEY.into(),
            HeaderValue::Str("odoo.public.sale_order.update".into()),
        );
        assert_eq!(m.application_properties, want);
    }

    #[test]
    fn short_forms_decode() {
        // properties list8 with a str8 message-id; data as vbin8
        let bytes = [
            0x00, 0x53, 0x73, 0xc0, 0x05, 0x01, 0xa1, 0x02, b'i', b'd', //
            0x00, 0x53, 0x75, 0xa0, 0x02, b'h', b'i',
        ];
        let m = decode(&bytes).unwrap();
        assert_eq!(m.message_id.as_deref(), Some("id"));
        assert_eq!(m.body, b"hi");
    }
}
