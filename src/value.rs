//! Typed decoding of column values: Postgres text output form → JSON, written straight into
//! an output buffer.
//!
//! pgoutput sends each column in the type's *text output* form (we never request `binary`),
//! and our sessions pin the settings that shape those forms: `DateStyle=ISO`,
//! `IntervalStyle=iso_8601`, `TimeZone=UTC`, `extra_float_digits=3`, `bytea_output=hex`.
//! Every writer here validates that the text really is what Postgres prints for the type
//! under those settings and returns a [`ValueError`] otherwise: a value is never silently
//! turned into something else.
//!
//! Mapping (docs/events.md):
//!
//! | kind | JSON |
//! |---|---|
//! | `int2`, `int4`, `int8`, `oid` | number |
//! | `numeric` | string, exact; `NaN`, `Infinity`, `-Infinity` as those strings |
//! | `money` | string as Postgres prints it (depends on the server's `lc_monetary`) |
//! | `float4`, `float8` | number; `NaN`, `Infinity`, `-Infinity` as strings; `-0` stays `-0` |
//! | `bool` | `true` / `false` |
//! | `text`, `varchar`, `bpchar` (with its padding), `name`, `"char"`, `unknown` | string |
//! | `json`, `jsonb` | embedded JSON (raw tab/CR/LF whitespace of `json` becomes a space so one event stays one line) |
//! | `date` | `YYYY-MM-DD` |
//! | `time`, `timetz` | as printed (`HH:MM:SS[.ffffff]`, `timetz` with its offset) |
//! | `timestamp` | `YYYY-MM-DDTHH:MM:SS[.ffffff]` |
//! | `timestamptz` | normalised to UTC: `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` |
//! | `interval` | the ISO 8601 text as printed, e.g. `P1Y2M3DT4H5M6.7S` |
//! | `uuid` | string |
//! | `bytea` | base64 (standard alphabet, padded) |
//! | arrays of the above | JSON arrays (nested for multi-dimensional arrays) |
//! | anything else | the text form as a string |
//!
//! Conventions worth knowing downstream:
//! - Dates and timestamps before the common era (`... BC`) use ISO 8601 astronomical year
//!   numbering: 1 BC is year `0000`, 44 BC is `-0043`. Years after 9999 are printed with
//!   all their digits, as Postgres does (`12345-01-01`).
//! - `infinity` / `-infinity` dates and timestamps stay those strings.
//! - Fractional seconds keep the digits Postgres printed (it trims trailing zeros).
//! - Array lower bounds (`[0:1]={...}`) are not representable in JSON and are dropped;
//!   the elements keep their order.
//! - Types without a fixed OID (enums, domains, citext, PostGIS, ...) arrive with an OID that
//!   is not builtin and decode as [`TypeKind::Other`]: their text form as a string. That
//!   includes a domain over, say, `int4`: it becomes a string, not a number, because nothing
//!   in the protocol tells us the base type. Arrays of such types are strings too (the
//!   whole array literal), for the same reason. So is `box[]`, whose element delimiter is
//!   `;` rather than `,`.
//! - In a `json[]`/`jsonb[]`, a JSON `null` element and an SQL NULL element both become `null`.
//! - `json` is passed through as Postgres accepted it, so it may hold duplicate keys or lone
//!   `\uD800`-style escapes (both valid JSON syntax); `jsonb` never does.
//! - On error the output buffer is left exactly as it was, so the caller can report and
//!   stop (or skip) without cleaning up.

use std::fmt;

/// How a column's text form maps to JSON. Resolved once per column from its type OID.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeKind {
    /// `bool`.
    Bool,
    /// `int2`, `int4`, `int8`, `oid`.
    Int,
    /// `numeric` (exact, emitted as a string).
    Numeric,
    /// `money` (locale-formatted, emitted as a string).
    Money,
    /// `float4`, `float8`.
    Float,
    /// `text`, `varchar`, `bpchar`, `name`, `"char"`, `unknown`.
    Text,
    /// `json`, `jsonb`.
    Json,
    /// `date`.
    Date,
    /// `time` (without time zone).
    Time,
    /// `timetz`.
    TimeTz,
    /// `timestamp` (without time zone).
    Timestamp,
    /// `timestamptz`.
    TimestampTz,
    /// `interval`.
    Interval,
    /// `uuid`.
    Uuid,
    /// `bytea`.
    Bytea,
    /// An array whose elements have the given kind.
    Array(Box<TypeKind>),
    /// Any other type: its text form, as a JSON string.
    Other,
}

impl TypeKind {
    /// Kind for a type OID. Only builtin OIDs are fixed across databases; every other OID
    /// (enums, domains, extension types) is [`TypeKind::Other`].
    pub fn from_oid(oid: u32) -> TypeKind {
        use TypeKind::*;
        match oid {
            16 => Bool,
            20 | 21 | 23 | 26 => Int,
            1700 => Numeric,
            790 => Money,
            700 | 701 => Float,
            // text, varchar, bpchar, name, "char", unknown
            25 | 1043 | 1042 | 19 | 18 | 705 => Text,
            114 | 3802 => Json,
            1082 => Date,
            1083 => Time,
            1266 => TimeTz,
            1114 => Timestamp,
            1184 => TimestampTz,
            1186 => Interval,
            2950 => Uuid,
            17 => Bytea,
            _ => match array_element_oid(oid) {
                Some(elem) => Array(Box::new(TypeKind::from_oid(elem))),
                None => Other,
            },
        }
    }

    /// Short name of the kind, for error messages ("integer", "timestamptz", "text[]").
    pub fn name(&self) -> &'static str {
        use TypeKind::*;
        match self {
            Bool => "bool",
            Int => "integer",
            Numeric => "numeric",
            Money => "money",
            Float => "float",
            Text => "text",
            Json => "json",
            Date => "date",
            Time => "time",
            TimeTz => "timetz",
            Timestamp => "timestamp",
            TimestampTz => "timestamptz",
            Interval => "interval",
            Uuid => "uuid",
            Bytea => "bytea",
            Other => "text form",
            Array(inner) => match **inner {
                Bool => "bool[]",
                Int => "integer[]",
                Numeric => "numeric[]",
                Money => "money[]",
                Float => "float[]",
                Text => "text[]",
                Json => "json[]",
                Date => "date[]",
                Time => "time[]",
                TimeTz => "timetz[]",
                Timestamp => "timestamp[]",
                TimestampTz => "timestamptz[]",
                Interval => "interval[]",
                Uuid => "uuid[]",
                Bytea => "bytea[]",
                Other => "array",
                Array(_) => "nested array",
            },
        }
    }
}

/// Element type OID of a builtin array type whose elements are separated by `,`.
///
/// `box[]` (1020) is left out on purpose: its delimiter is `;`, so it decodes as
/// [`TypeKind::Other`] (its text form), which is faithful. Arrays of catalog row types are
/// left out too: nobody replicates them.
fn array_element_oid(oid: u32) -> Option<u32> {
    let elem = match oid {
        1000 => 16,   // bool
        1001 => 17,   // bytea
        1002 => 18,   // "char"
        1003 => 19,   // name
        1016 => 20,   // int8
        1005 => 21,   // int2
        1006 => 22,   // int2vector
        1007 => 23,   // int4
        1008 => 24,   // regproc
        1009 => 25,   // text
        1028 => 26,   // oid
        1010 => 27,   // tid
        1011 => 28,   // xid
        1012 => 29,   // cid
        1013 => 30,   // oidvector
        199 => 114,   // json
        143 => 142,   // xml
        1017 => 600,  // point
        1018 => 601,  // lseg
        1019 => 602,  // path
        1027 => 604,  // polygon
        629 => 628,   // line
        651 => 650,   // cidr
        1021 => 700,  // float4
        1022 => 701,  // float8
        719 => 718,   // circle
        775 => 774,   // macaddr8
        791 => 790,   // money
        1040 => 829,  // macaddr
        1041 => 869,  // inet
        1034 => 1033, // aclitem
        1014 => 1042, // bpchar
        1015 => 1043, // varchar
        1182 => 1082, // date
        1183 => 1083, // time
        1115 => 1114, // timestamp
        1185 => 1184, // timestamptz
        1187 => 1186, // interval
        1270 => 1266, // timetz
        1561 => 1560, // bit
        1563 => 1562, // varbit
        1231 => 1700, // numeric
        2201 => 1790, // refcursor
        2207 => 2202, // regprocedure
        2208 => 2203, // regoper
        2209 => 2204, // regoperator
        2210 => 2205, // regclass
        2211 => 2206, // regtype
        1263 => 2275, // cstring
        2951 => 2950, // uuid
        2949 => 2970, // txid_snapshot
        3221 => 3220, // pg_lsn
        3643 => 3614, // tsvector
        3645 => 3615, // tsquery
        3735 => 3734, // regconfig
        3770 => 3769, // regdictionary
        3807 => 3802, // jsonb
        3905 => 3904, // int4range
        3907 => 3906, // numrange
        3909 => 3908, // tsrange
        3911 => 3910, // tstzrange
        3913 => 3912, // daterange
        3927 => 3926, // int8range
        4073 => 4072, // jsonpath
        4090 => 4089, // regnamespace
        4097 => 4096, // regrole
        4192 => 4191, // regcollation
        6150 => 4451, // int4multirange
        6151 => 4532, // nummultirange
        6152 => 4533, // tsmultirange
        6153 => 4534, // tstzmultirange
        6155 => 4535, // datemultirange
        6157 => 4536, // int8multirange
        5039 => 5038, // pg_snapshot
        271 => 5069,  // xid8
        _ => return None,
    };
    Some(elem)
}

/// SQL name of a builtin type OID, for metadata and error messages. `None` for OIDs that are
/// not fixed builtins (learn those from pgoutput `Type` messages, see `schema::RelationCache`).
pub fn builtin_type_name(oid: u32) -> Option<&'static str> {
    let name = match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        600 => "point",
        650 => "cidr",
        700 => "float4",
        701 => "float8",
        705 => "unknown",
        774 => "macaddr8",
        790 => "money",
        829 => "macaddr",
        869 => "inet",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1560 => "bit",
        1562 => "varbit",
        1700 => "numeric",
        2950 => "uuid",
        3220 => "pg_lsn",
        3614 => "tsvector",
        3802 => "jsonb",
        3904 => "int4range",
        3906 => "numrange",
        3908 => "tsrange",
        3910 => "tstzrange",
        3912 => "daterange",
        3926 => "int8range",
        4072 => "jsonpath",
        5069 => "xid8",
        1000 => "_bool",
        1001 => "_bytea",
        1005 => "_int2",
        1007 => "_int4",
        1009 => "_text",
        1014 => "_bpchar",
        1015 => "_varchar",
        1016 => "_int8",
        1021 => "_float4",
        1022 => "_float8",
        1028 => "_oid",
        1115 => "_timestamp",
        1182 => "_date",
        1183 => "_time",
        1185 => "_timestamptz",
        1187 => "_interval",
        1231 => "_numeric",
        1270 => "_timetz",
        199 => "_json",
        2951 => "_uuid",
        3807 => "_jsonb",
        791 => "_money",
        _ => return None,
    };
    Some(name)
}

/// A column value whose text form is not what Postgres prints for its type.
///
/// Carries no table/column/LSN: the caller knows those and adds them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {expected} value {excerpt:?}: {reason}")]
pub struct ValueError {
    /// What the text should have been (a [`TypeKind::name`]).
    pub expected: &'static str,
    /// The start of the offending text (lossy UTF-8, truncated), for people to read.
    pub excerpt: String,
    /// What exactly is wrong.
    pub reason: String,
}

/// Longest excerpt kept in a [`ValueError`], in bytes of input.
const EXCERPT_MAX: usize = 48;

impl ValueError {
    fn new(expected: &'static str, text: &[u8], reason: impl Into<String>) -> ValueError {
        ValueError {
            expected,
            excerpt: excerpt(text),
            reason: reason.into(),
        }
    }
}

fn excerpt(text: &[u8]) -> String {
    if text.len() <= EXCERPT_MAX {
        return String::from_utf8_lossy(text).into_owned();
    }
    let mut s = String::from_utf8_lossy(&text[..EXCERPT_MAX]).into_owned();
    s.push('…');
    s
}

/// Internal error: a reason only; the public wrapper adds kind and excerpt. Keeps the happy
/// path free of allocation and the writers free of boilerplate.
type Res = Result<(), Reason>;

#[derive(Debug)]
enum Reason {
    Static(&'static str),
    /// An element of an array failed; already a complete error for the element.
    Element(usize, Box<ValueError>),
}

impl From<&'static str> for Reason {
    fn from(s: &'static str) -> Reason {
        Reason::Static(s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Static(s) => f.write_str(s),
            Reason::Element(i, e) => write!(f, "element {i}: {e}"),
        }
    }
}

/// Append the JSON form of one value, given its Postgres text form.
///
/// On error `out` is left exactly as it was. SQL NULL is not a text form: the caller writes
/// `null` itself.
#[inline]
pub fn write_json(kind: &TypeKind, text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let start = out.len();
    match write_kind(kind, text, out) {
        Ok(()) => Ok(()),
        Err(reason) => {
            out.truncate(start);
            Err(ValueError::new(kind.name(), text, reason.to_string()))
        }
    }
}

/// Append `s` as a JSON string literal (with quotes), escaping as JSON requires.
///
/// Errors on invalid UTF-8: text is never repaired lossily. On error `out` is unchanged.
#[inline]
pub fn write_json_str(s: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    match write_str(s, out) {
        Ok(()) => Ok(()),
        Err(reason) => Err(ValueError::new("text", s, reason.to_string())),
    }
}

fn write_kind(kind: &TypeKind, t: &[u8], out: &mut Vec<u8>) -> Res {
    match kind {
        TypeKind::Int => write_int(t, out),
        TypeKind::Text | TypeKind::Other => write_str(t, out),
        TypeKind::Numeric => write_numeric(t, out),
        TypeKind::TimestampTz => write_timestamp(t, true, out),
        TypeKind::Json => write_embedded_json(t, out),
        TypeKind::Bool => match t {
            b"t" => {
                out.extend_from_slice(b"true");
                Ok(())
            }
            b"f" => {
                out.extend_from_slice(b"false");
                Ok(())
            }
            _ => Err("expected t or f".into()),
        },
        TypeKind::Float => write_float(t, out),
        TypeKind::Money => {
            if t.is_empty() {
                return Err("empty".into());
            }
            write_str(t, out)
        }
        TypeKind::Date => write_date(t, out),
        TypeKind::Time => {
            let end = parse_time(t, 0)?;
            expect_end(t, end)?;
            quoted_ascii(t, out);
            Ok(())
        }
        TypeKind::TimeTz => {
            let end = parse_time(t, 0)?;
            let (end, _) = parse_offset(t, end)?;
            expect_end(t, end)?;
            quoted_ascii(t, out);
            Ok(())
        }
        TypeKind::Timestamp => write_timestamp(t, false, out),
        TypeKind::Interval => write_interval(t, out),
        TypeKind::Uuid => write_uuid(t, out),
        TypeKind::Bytea => write_bytea(t, out),
        TypeKind::Array(elem) => write_array(elem, t, out),
    }
}

fn expect_end(t: &[u8], at: usize) -> Res {
    if at == t.len() {
        Ok(())
    } else {
        Err("unexpected trailing characters".into())
    }
}

/// `"` + already-validated ASCII that needs no escaping + `"`.
#[inline]
fn quoted_ascii(t: &[u8], out: &mut Vec<u8>) {
    out.reserve(t.len() + 2);
    out.push(b'"');
    out.extend_from_slice(t);
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------
// numbers

/// Digits in the largest builtin integer (`int8` min has 19, `oid` max 10); a longer run is
/// not an integer column and a wrong type mapping must not pass as a huge number.
const INT_MAX_DIGITS: usize = 20;

fn write_int(t: &[u8], out: &mut Vec<u8>) -> Res {
    let digits = t.strip_prefix(b"-").unwrap_or(t);
    if digits.is_empty() {
        return Err("no digits".into());
    }
    if digits.len() > INT_MAX_DIGITS {
        return Err("too many digits for an integer".into());
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err("not an integer".into());
    }
    // JSON forbids leading zeros, and Postgres never prints them.
    if digits.len() > 1 && digits[0] == b'0' {
        return Err("leading zero".into());
    }
    out.extend_from_slice(t);
    Ok(())
}

fn write_numeric(t: &[u8], out: &mut Vec<u8>) -> Res {
    match t {
        b"NaN" | b"Infinity" | b"-Infinity" => {}
        _ => {
            // numeric_out prints `-?digits[.digits]`, never an exponent.
            let body = t.strip_prefix(b"-").unwrap_or(t);
            let (int, frac) = match body.iter().position(|&b| b == b'.') {
                Some(p) => (&body[..p], Some(&body[p + 1..])),
                None => (body, None),
            };
            if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
                return Err("expected digits before the decimal point".into());
            }
            if let Some(f) = frac
                && (f.is_empty() || !f.iter().all(u8::is_ascii_digit))
            {
                return Err("expected digits after the decimal point".into());
            }
        }
    }
    quoted_ascii(t, out);
    Ok(())
}

fn write_float(t: &[u8], out: &mut Vec<u8>) -> Res {
    match t {
        b"NaN" | b"Infinity" | b"-Infinity" => quoted_ascii(t, out),
        _ => {
            if scan_json_number(t, 0)? != t.len() {
                return Err("unexpected characters after the number".into());
            }
            out.extend_from_slice(t);
        }
    }
    Ok(())
}

/// What is wrong with a JSON text (or a float): one byte, so the scanners' results travel in
/// registers on the hot path; turned into a message only on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonErr {
    Digit,
    FractionDigit,
    ExponentDigit,
    End,
    NotAValue,
    Trailing,
    CommaOrClose,
    Key,
    Colon,
    Unterminated,
    UnicodeEscape,
    Escape,
    Control,
    Literal,
}

impl From<JsonErr> for Reason {
    fn from(e: JsonErr) -> Reason {
        Reason::Static(match e {
            JsonErr::Digit => "expected a digit",
            JsonErr::FractionDigit => "expected a digit after '.'",
            JsonErr::ExponentDigit => "expected a digit in the exponent",
            JsonErr::End => "unexpected end of JSON",
            JsonErr::NotAValue => "unexpected character where a JSON value should be",
            JsonErr::Trailing => "trailing characters after the JSON value",
            JsonErr::CommaOrClose => "expected ',' or a closing bracket",
            JsonErr::Key => "expected an object key",
            JsonErr::Colon => "expected ':'",
            JsonErr::Unterminated => "unterminated JSON string",
            JsonErr::UnicodeEscape => "invalid \\u escape",
            JsonErr::Escape => "invalid escape in JSON string",
            JsonErr::Control => "unescaped control character in JSON string",
            JsonErr::Literal => "invalid literal (expected true, false or null)",
        })
    }
}

/// Scan a JSON number (RFC 8259 grammar) starting at `i`; returns the index after it.
/// float8out with extra_float_digits>0 prints exactly this grammar (`1e+30`, `-0`, `5e-324`).
#[inline]
fn scan_json_number(s: &[u8], mut i: usize) -> Result<usize, JsonErr> {
    if s.get(i) == Some(&b'-') {
        i += 1;
    }
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            i += 1;
            while s.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return Err(JsonErr::Digit),
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        if !s.get(i).is_some_and(u8::is_ascii_digit) {
            return Err(JsonErr::FractionDigit);
        }
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !s.get(i).is_some_and(u8::is_ascii_digit) {
            return Err(JsonErr::ExponentDigit);
        }
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------
// strings

/// For each byte: 0 = copy as is, b'u' = `\u00XX`, else the character after the backslash.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Index of the first byte at or after `i` that a JSON string cannot hold as is (`"`, `\\`
/// or a control character), or `s.len()`. Tests eight bytes at a time first, because most
/// text has none: this is what makes text and jsonb cheap.
#[inline]
fn skip_plain(s: &[u8], mut i: usize) -> usize {
    const LO: u64 = u64::from_ne_bytes([0x01; 8]);
    const HI: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTE: u64 = LO * b'"' as u64;
    const BSLASH: u64 = LO * b'\\' as u64;
    const SPACE: u64 = LO * 0x20;
    while let Some(chunk) = s.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(bytes);
        let q = w ^ QUOTE;
        let b = w ^ BSLASH;
        // Classic "has a zero byte" / "has a byte below n" tests: no false negatives; a
        // false positive only sends this chunk to the byte loop below.
        let special =
            (q.wrapping_sub(LO) & !q) | (b.wrapping_sub(LO) & !b) | (w.wrapping_sub(SPACE) & !w);
        if special & HI != 0 {
            break;
        }
        i += 8;
    }
    while i < s.len() && ESCAPE[s[i] as usize] == 0 {
        i += 1;
    }
    i
}

fn write_str(s: &[u8], out: &mut Vec<u8>) -> Res {
    if std::str::from_utf8(s).is_err() {
        return Err("invalid UTF-8".into());
    }
    escape_str(s, out);
    Ok(())
}

/// Append a Rust string (valid UTF-8 by construction, so nothing to check) as a
/// JSON string literal: for names (columns, tables) written into every event.
#[inline]
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    escape_str(s.as_bytes(), out);
}

/// `"` + `s` escaped as JSON requires + `"`; `s` must be valid UTF-8.
fn escape_str(s: &[u8], out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut run = 0;
    let mut i = skip_plain(s, 0);
    while let Some(&b) = s.get(i) {
        out.extend_from_slice(&s[run..i]);
        let esc = ESCAPE[b as usize];
        if esc == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
        run = i + 1;
        i = skip_plain(s, run);
    }
    out.extend_from_slice(&s[run..]);
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------
// json / jsonb

fn write_embedded_json(t: &[u8], out: &mut Vec<u8>) -> Res {
    if std::str::from_utf8(t).is_err() {
        return Err("invalid UTF-8".into());
    }
    let raw_ws = check_json(t)?;
    if raw_ws {
        // A valid JSON text has raw TAB/LF/CR only as whitespace between tokens (inside
        // strings they must be escaped), so a space keeps the meaning and one event per line.
        out.extend(t.iter().map(|&b| match b {
            b'\t' | b'\n' | b'\r' => b' ',
            _ => b,
        }));
    } else {
        out.extend_from_slice(t);
    }
    Ok(())
}

/// Nesting stack for the JSON checker: a shift register of one bit per level (1 = object),
/// innermost level in bit 0, so typical documents never allocate; levels beyond 64 spill
/// into `deep` (Postgres accepts deep nesting and so must we).
struct NestStack {
    depth: usize,
    bits: u64,
    deep: Vec<bool>,
}

impl NestStack {
    #[inline]
    fn push(&mut self, is_object: bool) {
        if self.depth >= 64 {
            self.deep.push(self.bits >> 63 != 0);
        }
        self.bits = self.bits << 1 | u64::from(is_object);
        self.depth += 1;
    }

    #[inline]
    fn pop(&mut self) {
        self.bits >>= 1;
        self.depth -= 1;
        if self.depth >= 64
            && let Some(spilled) = self.deep.pop()
        {
            self.bits |= u64::from(spilled) << 63;
        }
    }

    /// Whether the innermost open container is an object; `None` at top level.
    #[inline]
    fn top(&self) -> Option<bool> {
        (self.depth > 0).then_some(self.bits & 1 != 0)
    }
}

/// Validate `s` (already known to be UTF-8) as one JSON text, the grammar Postgres' `json`
/// type accepts (RFC 8259; lone `\uD800` escapes pass, as they do in Postgres' `json`).
/// Returns whether it contains raw TAB/LF/CR whitespace.
fn check_json(s: &[u8]) -> Result<bool, JsonErr> {
    let mut raw_ws = false;
    let mut stack = NestStack {
        depth: 0,
        bits: 0,
        deep: Vec::new(),
    };
    // Written as "parse a value, then unwind closers" rather than a general state machine:
    // what may follow a value depends only on the innermost container.
    let mut i = skip_json_ws(s, 0, &mut raw_ws);
    'value: loop {
        let Some(&c) = s.get(i) else {
            return Err(JsonErr::End);
        };
        match c {
            b'{' => {
                i = skip_json_ws(s, i + 1, &mut raw_ws);
                if s.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    stack.push(true);
                    i = json_key(s, i, &mut raw_ws)?;
                    continue 'value;
                }
            }
            b'[' => {
                i = skip_json_ws(s, i + 1, &mut raw_ws);
                if s.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    stack.push(false);
                    continue 'value;
                }
            }
            b'"' => i = scan_json_string(s, i + 1)?,
            b'-' | b'0'..=b'9' => i = scan_json_number(s, i)?,
            b't' => i = expect_lit(s, i, b"true")?,
            b'f' => i = expect_lit(s, i, b"false")?,
            b'n' => i = expect_lit(s, i, b"null")?,
            _ => return Err(JsonErr::NotAValue),
        }
        // After a complete value: close containers until one wants another value.
        loop {
            i = skip_json_ws(s, i, &mut raw_ws);
            let Some(is_object) = stack.top() else {
                return if i == s.len() {
                    Ok(raw_ws)
                } else {
                    Err(JsonErr::Trailing)
                };
            };
            match (s.get(i), is_object) {
                (Some(b','), true) => {
                    i = json_key(s, i + 1, &mut raw_ws)?;
                    continue 'value;
                }
                (Some(b','), false) => {
                    i = skip_json_ws(s, i + 1, &mut raw_ws);
                    continue 'value;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    i += 1;
                    stack.pop();
                }
                (None, _) => return Err(JsonErr::End),
                _ => return Err(JsonErr::CommaOrClose),
            }
        }
    }
}

/// JSON whitespace from `i`; notes raw TAB/LF/CR in `raw_ws`.
#[inline]
fn skip_json_ws(s: &[u8], mut i: usize, raw_ws: &mut bool) -> usize {
    while let Some(&b) = s.get(i) {
        match b {
            b' ' => {}
            b'\t' | b'\n' | b'\r' => *raw_ws = true,
            _ => break,
        }
        i += 1;
    }
    i
}

/// `ws "key" ws : ws` from `i`; returns the index of the member's value.
#[inline]
fn json_key(s: &[u8], i: usize, raw_ws: &mut bool) -> Result<usize, JsonErr> {
    let i = skip_json_ws(s, i, raw_ws);
    if s.get(i) != Some(&b'"') {
        return Err(JsonErr::Key);
    }
    let i = skip_json_ws(s, scan_json_string(s, i + 1)?, raw_ws);
    if s.get(i) != Some(&b':') {
        return Err(JsonErr::Colon);
    }
    Ok(skip_json_ws(s, i + 1, raw_ws))
}

/// Scan the rest of a JSON string whose opening quote is just before `i`; returns the index
/// after the closing quote. The input is known to be UTF-8, so only ASCII needs checking.
#[inline]
fn scan_json_string(s: &[u8], mut i: usize) -> Result<usize, JsonErr> {
    loop {
        i = skip_plain(s, i);
        match s.get(i) {
            None => return Err(JsonErr::Unterminated),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match s.get(i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                Some(b'u') => {
                    let hex = s.get(i + 2..i + 6).ok_or(JsonErr::UnicodeEscape)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(JsonErr::UnicodeEscape);
                    }
                    i += 6;
                }
                _ => return Err(JsonErr::Escape),
            },
            Some(&b) if b < 0x20 => return Err(JsonErr::Control),
            Some(_) => i += 1,
        }
    }
}

#[inline]
fn expect_lit(s: &[u8], i: usize, lit: &'static [u8]) -> Result<usize, JsonErr> {
    if s[i..].starts_with(lit) {
        Ok(i + lit.len())
    } else {
        Err(JsonErr::Literal)
    }
}

// ---------------------------------------------------------------------------------------
// dates and times

/// `n` ASCII digits at `t[i..]` as a number.
fn digits(t: &[u8], i: usize, n: usize) -> Result<u32, Reason> {
    let d = t.get(i..i + n).ok_or("truncated")?;
    let mut v = 0u32;
    for &b in d {
        if !b.is_ascii_digit() {
            return Err("expected a digit".into());
        }
        v = v * 10 + u32::from(b - b'0');
    }
    Ok(v)
}

fn expect_byte(t: &[u8], i: usize, b: u8, what: &'static str) -> Result<usize, Reason> {
    if t.get(i) == Some(&b) {
        Ok(i + 1)
    } else {
        Err(what.into())
    }
}

fn is_leap(astro_year: i64) -> bool {
    astro_year.rem_euclid(4) == 0
        && (astro_year.rem_euclid(100) != 0 || astro_year.rem_euclid(400) == 0)
}

fn days_in_month(astro_year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(astro_year) => 29,
        _ => 28,
    }
}

/// A parsed `YYYY-MM-DD` as printed (the year without era).
struct DatePart {
    year: i64,
    month: u32,
    day: u32,
    /// Index of the first `-` after the year.
    year_end: usize,
    /// Index after the day.
    end: usize,
}

/// Postgres prints at least four year digits; its largest date year has seven.
fn parse_date(t: &[u8]) -> Result<DatePart, Reason> {
    let year_end = t
        .iter()
        .position(|&b| !b.is_ascii_digit())
        .ok_or("expected YYYY-MM-DD")?;
    if !(4..=7).contains(&year_end) {
        return Err("expected a year of 4 to 7 digits".into());
    }
    let year = i64::from(digits(t, 0, year_end)?);
    if year == 0 {
        return Err("year 0 does not exist".into());
    }
    let i = expect_byte(t, year_end, b'-', "expected '-' after the year")?;
    let month = digits(t, i, 2)?;
    let i = expect_byte(t, i + 2, b'-', "expected '-' after the month")?;
    let day = digits(t, i, 2)?;
    if !(1..=12).contains(&month) {
        return Err("month out of range".into());
    }
    Ok(DatePart {
        year,
        month,
        day,
        year_end,
        end: i + 2,
    })
}

/// Validate the day against the month, now that the era is known.
fn check_day(d: &DatePart, astro_year: i64) -> Res {
    if d.day == 0 || d.day > days_in_month(astro_year, d.month) {
        return Err("day out of range for the month".into());
    }
    Ok(())
}

/// Consume an optional ` BC` at `i`; returns (index after, is BC).
fn parse_era(t: &[u8], i: usize) -> (usize, bool) {
    if t.get(i..) == Some(b" BC".as_slice()) {
        (i + 3, true)
    } else {
        (i, false)
    }
}

/// ISO 8601 astronomical year: 1 BC is 0, 2 BC is -1.
fn astro_year(printed: i64, bc: bool) -> i64 {
    if bc { 1 - printed } else { printed }
}

fn write_iso_year(astro: i64, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = if astro < 0 {
        write!(out, "-{:04}", -astro)
    } else {
        write!(out, "{astro:04}")
    };
}

fn write_date(t: &[u8], out: &mut Vec<u8>) -> Res {
    if t == b"infinity" || t == b"-infinity" {
        quoted_ascii(t, out);
        return Ok(());
    }
    let d = parse_date(t)?;
    let (end, bc) = parse_era(t, d.end);
    expect_end(t, end)?;
    let astro = astro_year(d.year, bc);
    check_day(&d, astro)?;
    if bc {
        out.push(b'"');
        write_iso_year(astro, out);
        out.extend_from_slice(&t[d.year_end..d.end]);
        out.push(b'"');
    } else {
        quoted_ascii(t, out);
    }
    Ok(())
}

/// A parsed `HH:MM:SS[.ffffff]`.
struct TimePart {
    hour: u32,
    minute: u32,
    second: u32,
    /// Index of the `.` of the fraction, or `end` if none.
    frac_start: usize,
    end: usize,
}

fn parse_time_part(t: &[u8], i: usize) -> Result<TimePart, Reason> {
    let hour = digits(t, i, 2)?;
    let j = expect_byte(t, i + 2, b':', "expected ':' after the hour")?;
    let minute = digits(t, j, 2)?;
    let j = expect_byte(t, j + 2, b':', "expected ':' after the minutes")?;
    let second = digits(t, j, 2)?;
    let frac_start = j + 2;
    let mut end = frac_start;
    if t.get(end) == Some(&b'.') {
        end += 1;
        let n = t[end..].iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return Err("expected digits after '.'".into());
        }
        end += n;
    }
    if hour > 24 || minute > 59 || second > 59 {
        return Err("time field out of range".into());
    }
    // 24:00:00 is a valid `time`, but nothing past it.
    if hour == 24
        && (minute != 0
            || second != 0
            || t[frac_start..end]
                .iter()
                .any(|&b| b.is_ascii_digit() && b != b'0'))
    {
        return Err("time past 24:00:00".into());
    }
    Ok(TimePart {
        hour,
        minute,
        second,
        frac_start,
        end,
    })
}

/// Validate a time at `t[i..]`; returns the index after it.
fn parse_time(t: &[u8], i: usize) -> Result<usize, Reason> {
    Ok(parse_time_part(t, i)?.end)
}

/// Parse a UTC offset `±HH[:MM[:SS]]` at `i`; returns (index after, offset in seconds east).
fn parse_offset(t: &[u8], i: usize) -> Result<(usize, i64), Reason> {
    let sign = match t.get(i) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err("expected a UTC offset".into()),
    };
    let h = digits(t, i + 1, 2)?;
    let mut end = i + 3;
    let mut m = 0;
    let mut s = 0;
    if t.get(end) == Some(&b':') {
        m = digits(t, end + 1, 2)?;
        end += 3;
        if t.get(end) == Some(&b':') {
            s = digits(t, end + 1, 2)?;
            end += 3;
        }
    }
    if h > 23 || m > 59 || s > 59 {
        return Err("UTC offset out of range".into());
    }
    Ok((end, sign * i64::from(h * 3600 + m * 60 + s)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn write_timestamp(t: &[u8], with_tz: bool, out: &mut Vec<u8>) -> Res {
    if t == b"infinity" || t == b"-infinity" {
        quoted_ascii(t, out);
        return Ok(());
    }
    let d = parse_date(t)?;
    let i = expect_byte(t, d.end, b' ', "expected ' ' between date and time")?;
    let tp = parse_time_part(t, i)?;
    if tp.hour == 24 {
        return Err("hour 24 in a timestamp".into());
    }
    let (offset_end, offset) = if with_tz {
        parse_offset(t, tp.end)?
    } else {
        (tp.end, 0)
    };
    let (end, bc) = parse_era(t, offset_end);
    expect_end(t, end)?;
    let astro = astro_year(d.year, bc);
    check_day(&d, astro)?;

    out.reserve(t.len() + 4);
    out.push(b'"');
    if offset == 0 {
        if bc {
            write_iso_year(astro, out);
            out.extend_from_slice(&t[d.year_end..d.end]);
        } else {
            out.extend_from_slice(&t[..d.end]);
        }
        out.push(b'T');
        out.extend_from_slice(&t[i..tp.end]);
    } else {
        // Only reached if the session's TimeZone is not UTC; convert rather than mislabel.
        // Offsets are whole seconds, so the fraction is unaffected.
        let secs = days_from_civil(astro, d.month, d.day) * 86_400
            + i64::from(tp.hour * 3600 + tp.minute * 60 + tp.second)
            - offset;
        let (y, m, day) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        write_iso_year(y, out);
        use std::io::Write as _;
        let _ = write!(
            out,
            "-{m:02}-{day:02}T{:02}:{:02}:{:02}",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        );
        out.extend_from_slice(&t[tp.frac_start..tp.end]);
    }
    if with_tz {
        out.push(b'Z');
    }
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------------------
// interval, uuid, bytea

/// IntervalStyle=iso_8601 prints `P[nY][nM][nD][T[nH][nM][n[.f]S]]`, any number possibly
/// negative (`P-1DT-1S`), and `PT0S` for zero.
fn write_interval(t: &[u8], out: &mut Vec<u8>) -> Res {
    let mut i = expect_byte(
        t,
        0,
        b'P',
        "expected ISO 8601 'P' (is IntervalStyle iso_8601?)",
    )?;
    let mut in_time = false;
    let mut components = 0;
    while i < t.len() {
        if t[i] == b'T' {
            if in_time {
                return Err("second 'T'".into());
            }
            in_time = true;
            i += 1;
            if i == t.len() {
                return Err("'T' without time components".into());
            }
            continue;
        }
        if t[i] == b'-' {
            i += 1;
        }
        let n = t[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return Err("expected a number".into());
        }
        i += n;
        let mut fraction = false;
        if t.get(i) == Some(&b'.') {
            let f = t[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
            if f == 0 {
                return Err("expected digits after '.'".into());
            }
            i += 1 + f;
            fraction = true;
        }
        let unit = t.get(i).copied().ok_or("number without a unit")?;
        let ok = match (in_time, unit) {
            (false, b'Y' | b'M' | b'D') => !fraction,
            (true, b'H' | b'M') => !fraction,
            (true, b'S') => true,
            _ => return Err("unexpected interval unit".into()),
        };
        if !ok {
            return Err("fraction on a unit other than seconds".into());
        }
        i += 1;
        components += 1;
    }
    if components == 0 {
        return Err("interval without components".into());
    }
    quoted_ascii(t, out);
    Ok(())
}

fn write_uuid(t: &[u8], out: &mut Vec<u8>) -> Res {
    if t.len() != 36 {
        return Err("expected 36 characters".into());
    }
    for (i, &b) in t.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        };
        if !ok {
            return Err("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".into());
        }
    }
    quoted_ascii(t, out);
    Ok(())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `\x` + hex (bytea_output=hex) → standard padded base64, without an intermediate buffer.
fn write_bytea(t: &[u8], out: &mut Vec<u8>) -> Res {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let hex = t
        .strip_prefix(b"\\x")
        .ok_or("expected \\x followed by hex (is bytea_output hex?)")?;
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    let start = out.len();
    out.reserve(hex.len() / 6 * 4 + 6);
    out.push(b'"');
    let mut chunks = hex.chunks_exact(6);
    let byte = |pair: &[u8]| -> Result<u32, Reason> {
        match (hex_val(pair[0]), hex_val(pair[1])) {
            (Some(h), Some(l)) => Ok(u32::from(h << 4 | l)),
            _ => Err("invalid hex digit".into()),
        }
    };
    for c in &mut chunks {
        let n = byte(&c[0..2])? << 16 | byte(&c[2..4])? << 8 | byte(&c[4..6])?;
        out.extend_from_slice(&[
            B64[(n >> 18) as usize & 63],
            B64[(n >> 12) as usize & 63],
            B64[(n >> 6) as usize & 63],
            B64[n as usize & 63],
        ]);
    }
    let rest = chunks.remainder();
    match rest.len() {
        0 => {}
        2 => {
            let n = byte(&rest[0..2])? << 16;
            out.extend_from_slice(&[
                B64[(n >> 18) as usize & 63],
                B64[(n >> 12) as usize & 63],
                b'=',
                b'=',
            ]);
        }
        4 => {
            let n = byte(&rest[0..2])? << 16 | byte(&rest[2..4])? << 8;
            out.extend_from_slice(&[
                B64[(n >> 18) as usize & 63],
                B64[(n >> 12) as usize & 63],
                B64[(n >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {
            out.truncate(start);
            return Err("odd number of hex digits".into());
        }
    }
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------------------
// arrays

/// Postgres' limit on array dimensions (MAXDIM); also bounds our recursion.
const MAX_DIMS: usize = 6;

fn is_array_space(b: u8) -> bool {
    // array_in's notion of whitespace (scanner_isspace).
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Parser for an array literal as array_out prints it: `[lo:hi]...={...}` prefix only when
/// a lower bound is not 1, elements separated by `,`, quoted with `"` (backslash escapes
/// inside) when they are empty, contain special characters or spell `NULL`; an unquoted
/// `NULL` is SQL NULL.
struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    elem: &'a TypeKind,
    /// Elements seen so far, to say which one failed.
    count: usize,
    /// Unescaped copy of the current quoted element; reused across elements.
    scratch: Vec<u8>,
}

fn write_array(elem: &TypeKind, t: &[u8], out: &mut Vec<u8>) -> Res {
    let mut p = ArrayParser {
        s: t,
        i: 0,
        elem,
        count: 0,
        scratch: Vec::new(),
    };
    p.skip_ws();
    let declared_dims = if p.peek() == Some(b'[') {
        let n = p.dims()?;
        p.skip_ws();
        if p.peek() != Some(b'=') {
            return Err("expected '=' after the array dimensions".into());
        }
        p.i += 1;
        p.skip_ws();
        Some(n)
    } else {
        None
    };
    if p.peek() != Some(b'{') {
        return Err("expected '{'".into());
    }
    let depth = p.level(out, 1)?;
    p.skip_ws();
    if p.i != t.len() {
        return Err("unexpected characters after the array".into());
    }
    if declared_dims.is_some_and(|n| n != depth) {
        return Err("dimension decoration does not match the nesting".into());
    }
    Ok(())
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.i += 1;
        }
    }

    /// `[lo:hi]` repeated; returns how many.
    fn dims(&mut self) -> Result<usize, Reason> {
        let mut n = 0;
        while self.peek() == Some(b'[') {
            self.i += 1;
            self.bound()?;
            if self.peek() != Some(b':') {
                return Err("expected ':' in array dimensions".into());
            }
            self.i += 1;
            self.bound()?;
            if self.peek() != Some(b']') {
                return Err("expected ']' in array dimensions".into());
            }
            self.i += 1;
            n += 1;
            if n > MAX_DIMS {
                return Err("more than 6 array dimensions".into());
            }
        }
        Ok(n)
    }

    fn bound(&mut self) -> Res {
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.i += 1;
        }
        let n = self.s[self.i..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n == 0 {
            return Err("expected a number in array dimensions".into());
        }
        self.i += n;
        Ok(())
    }

    /// One `{...}` at `self.i`; returns the deepest nesting level found inside.
    fn level(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<usize, Reason> {
        if depth > MAX_DIMS {
            return Err("more than 6 array dimensions".into());
        }
        self.i += 1; // '{'
        out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(depth);
        }
        // Postgres arrays are rectangular: a level holds either sub-arrays or elements.
        let nested = self.peek() == Some(b'{');
        let mut inner = depth;
        loop {
            if nested {
                if self.peek() != Some(b'{') {
                    return Err("expected '{' (sub-arrays and elements mixed)".into());
                }
                let d = self.level(out, depth + 1)?;
                if inner != depth && d != inner {
                    return Err("sub-arrays of different depths".into());
                }
                inner = d;
            } else {
                self.element(out)?;
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                    out.push(b',');
                }
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return Ok(inner);
                }
                None => return Err("unterminated array".into()),
                Some(_) => return Err("expected ',' or '}' in array".into()),
            }
        }
    }

    fn element(&mut self, out: &mut Vec<u8>) -> Res {
        let index = self.count;
        self.count += 1;
        if self.peek() == Some(b'"') {
            self.i += 1;
            let start = self.i;
            let mut escaped = false;
            loop {
                match self.peek() {
                    None => return Err("unterminated quoted array element".into()),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        self.i += 2;
                    }
                    Some(_) => self.i += 1,
                }
            }
            let raw = &self.s[start..self.i];
            self.i += 1;
            if escaped {
                let mut buf = std::mem::take(&mut self.scratch);
                buf.clear();
                let mut it = raw.iter();
                while let Some(&b) = it.next() {
                    // The scan above guarantees a backslash is never last.
                    buf.push(if b == b'\\' {
                        it.next().copied().unwrap_or(b)
                    } else {
                        b
                    });
                }
                let r = self.value(index, &buf, out);
                self.scratch = buf;
                r
            } else {
                self.value(index, raw, out)
            }
        } else {
            let start = self.i;
            loop {
                match self.peek() {
                    None => return Err("unterminated array".into()),
                    Some(b',' | b'}') => break,
                    // array_out quotes any element containing these; seeing them bare means
                    // this is not array_out's output.
                    Some(b'{' | b'"' | b'\\') => {
                        return Err("unexpected character in unquoted array element".into());
                    }
                    Some(_) => self.i += 1,
                }
            }
            let mut raw = &self.s[start..self.i];
            while let Some((&last, rest)) = raw.split_last()
                && is_array_space(last)
            {
                raw = rest;
            }
            if raw.is_empty() {
                return Err("empty unquoted array element".into());
            }
            if raw.eq_ignore_ascii_case(b"NULL") {
                out.extend_from_slice(b"null");
                Ok(())
            } else {
                self.value(index, raw, out)
            }
        }
    }

    fn value(&self, index: usize, text: &[u8], out: &mut Vec<u8>) -> Res {
        write_kind(self.elem, text, out).map_err(|r| {
            Reason::Element(
                index,
                Box::new(ValueError::new(self.elem.name(), text, r.to_string())),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(kind: &TypeKind, text: &str) -> String {
        ok_bytes(kind, text.as_bytes())
    }

    fn ok_bytes(kind: &TypeKind, text: &[u8]) -> String {
        let mut out = b"prefix:".to_vec();
        write_json(kind, text, &mut out).unwrap_or_else(|e| panic!("{text:?} as {kind:?}: {e}"));
        let out = String::from_utf8(out).unwrap();
        let json = out.strip_prefix("prefix:").unwrap().to_owned();
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .unwrap_or_else(|e| panic!("{text:?} as {kind:?} gave invalid JSON {json}: {e}"));
        json
    }

    fn err(kind: &TypeKind, text: &str) -> ValueError {
        err_bytes(kind, text.as_bytes())
    }

    fn err_bytes(kind: &TypeKind, text: &[u8]) -> ValueError {
        let mut out = b"prefix:".to_vec();
        match write_json(kind, text, &mut out) {
            Ok(()) => panic!(
                "{text:?} as {kind:?} should fail, gave {}",
                String::from_utf8_lossy(&out)
            ),
            Err(e) => {
                assert_eq!(out, b"prefix:", "output must be left untouched on error");
                assert_eq!(e.expected, kind.name());
                e
            }
        }
    }

    fn arr(k: TypeKind) -> TypeKind {
        TypeKind::Array(Box::new(k))
    }

    #[test]
    fn kinds_from_oids() {
        use TypeKind::*;
        for (oid, kind) in [
            (16, Bool),
            (20, Int),
            (21, Int),
            (23, Int),
            (26, Int),
            (1700, Numeric),
            (790, Money),
            (700, Float),
            (701, Float),
            (25, Text),
            (1043, Text),
            (1042, Text),
            (19, Text),
            (18, Text),
            (114, Json),
            (3802, Json),
            (1082, Date),
            (1083, Time),
            (1266, TimeTz),
            (1114, Timestamp),
            (1184, TimestampTz),
            (1186, Interval),
            (2950, Uuid),
            (17, Bytea),
            (1007, arr(Int)),
            (1009, arr(Text)),
            (1231, arr(Numeric)),
            (3807, arr(Json)),
            (1000, arr(Bool)),
            (1022, arr(Float)),
            (2951, arr(Uuid)),
            (1182, arr(Date)),
            (1185, arr(TimestampTz)),
            (1015, arr(Text)),
            (1016, arr(Int)),
            (1041, arr(Other)),
            (1020, Other), // box[]: ';'-delimited, kept as text
            (869, Other),
            (16_385, Other),
        ] {
            assert_eq!(TypeKind::from_oid(oid), kind, "oid {oid}");
        }
        assert_eq!(TypeKind::from_oid(1007).name(), "integer[]");
        assert_eq!(TypeKind::from_oid(1184).name(), "timestamptz");
    }

    #[test]
    fn integers() {
        let k = TypeKind::Int;
        assert_eq!(ok(&k, "0"), "0");
        assert_eq!(ok(&k, "-32768"), "-32768");
        assert_eq!(ok(&k, "9223372036854775807"), "9223372036854775807");
        assert_eq!(ok(&k, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(ok(&k, "4294967295"), "4294967295");
        for bad in [
            "",
            "-",
            "1.0",
            "01",
            " 1",
            "1 ",
            "+1",
            "1e3",
            "NaN",
            "0x10",
            "123456789012345678901",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn numerics_are_exact_strings() {
        let k = TypeKind::Numeric;
        assert_eq!(ok(&k, "1250.00"), r#""1250.00""#);
        assert_eq!(ok(&k, "-0.000"), r#""-0.000""#);
        assert_eq!(
            ok(&k, "0.00000000000000000001"),
            r#""0.00000000000000000001""#
        );
        let huge = format!("1{}", "0".repeat(400));
        assert_eq!(ok(&k, &huge), format!("\"{huge}\""));
        assert_eq!(ok(&k, "NaN"), r#""NaN""#);
        assert_eq!(ok(&k, "Infinity"), r#""Infinity""#);
        assert_eq!(ok(&k, "-Infinity"), r#""-Infinity""#);
        for bad in [
            "", "-", ".5", "5.", "1e5", "1,5", "nan", "1.2.3", "--1", "\"1\"",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn money_is_the_printed_string() {
        assert_eq!(ok(&TypeKind::Money, "$1,250.00"), r#""$1,250.00""#);
        assert_eq!(ok(&TypeKind::Money, "-$3.50"), r#""-$3.50""#);
        assert_eq!(ok(&TypeKind::Money, "1 250,00 €"), r#""1 250,00 €""#);
        err(&TypeKind::Money, "");
    }

    #[test]
    fn floats() {
        let k = TypeKind::Float;
        for n in [
            "0",
            "-0",
            "0.1",
            "1e+30",
            "1e-300",
            "5e-324",
            "1.7976931348623157e+308",
            "3.4e+38",
            "-1.5",
            "1.2345678901234568e+17",
        ] {
            assert_eq!(ok(&k, n), n);
        }
        assert_eq!(ok(&k, "-0"), "-0", "negative zero keeps its sign");
        assert_eq!(ok(&k, "NaN"), r#""NaN""#);
        assert_eq!(ok(&k, "Infinity"), r#""Infinity""#);
        assert_eq!(ok(&k, "-Infinity"), r#""-Infinity""#);
        for bad in [
            "", "-", "1.", ".1", "1e", "1e+", "01", "inf", "nan", "+1", "1 ", "0x1",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn bools() {
        assert_eq!(ok(&TypeKind::Bool, "t"), "true");
        assert_eq!(ok(&TypeKind::Bool, "f"), "false");
        for bad in ["", "true", "T", "1", "tt"] {
            err(&TypeKind::Bool, bad);
        }
    }

    #[test]
    fn text_escaping() {
        let k = TypeKind::Text;
        assert_eq!(ok(&k, ""), r#""""#);
        assert_eq!(ok(&k, "plain"), r#""plain""#);
        assert_eq!(ok(&k, "x    "), r#""x    ""#, "bpchar padding is kept");
        assert_eq!(ok(&k, "é ü 日本 🦀"), "\"é ü 日本 🦀\"");
        assert_eq!(ok(&k, "q\"b\\s/"), r#""q\"b\\s/""#);
        assert_eq!(ok(&k, "a\nb\rc\td\u{8}e\u{c}f"), r#""a\nb\rc\td\be\ff""#);
        assert_eq!(ok(&k, "\u{1}\u{1f}\u{7f}"), "\"\\u0001\\u001f\u{7f}\"");
        assert_eq!(ok(&k, "\u{2028}"), "\"\u{2028}\"");
        // Round trip through a real JSON parser.
        let nasty = "a\"\\\u{0}\u{1b}[0m\n日本\u{2028}";
        let json = ok(&k, nasty);
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), nasty);
        // Other types are faithful strings too.
        assert_eq!(
            ok(&TypeKind::Other, "192.168.0.1/24"),
            r#""192.168.0.1/24""#
        );
    }

    #[test]
    fn invalid_utf8_is_an_error_not_lossy() {
        for bad in [&b"\xff"[..], b"abc\xc3", b"\xed\xa0\x80", b"\xc0\xaf"] {
            let e = err_bytes(&TypeKind::Text, bad);
            assert!(e.reason.contains("UTF-8"), "{e}");
            err_bytes(&TypeKind::Other, bad);
            err_bytes(&TypeKind::Json, bad);
            let mut out = Vec::new();
            assert!(write_json_str(bad, &mut out).is_err());
            assert!(out.is_empty());
        }
    }

    #[test]
    fn json_is_embedded() {
        let k = TypeKind::Json;
        let doc = r#"{"a": 1, "b": [1, 2, {"c": "é"}], "d": null, "e": true, "f": -1.5e-3}"#;
        assert_eq!(ok(&k, doc), doc);
        for scalar in [
            "1", "\"s\"", "null", "true", "false", "[]", "{}", "-0", "0.5E+10",
        ] {
            assert_eq!(ok(&k, scalar), scalar);
        }
        // jsonb prints huge numbers in full; they are still valid JSON.
        let huge = format!("1{}", "0".repeat(400));
        assert_eq!(ok(&k, &huge), huge);
        // json keeps the user's whitespace: raw newlines become spaces so a JSON line stays one line.
        assert_eq!(ok(&k, "{\n\t\"a\" :\r\n 1}"), "{  \"a\" :   1}");
        assert_eq!(ok(&k, "  [1] "), "  [1] ");
        // Postgres' json accepts duplicate keys and lone surrogate escapes; so do we.
        assert_eq!(ok(&k, r#"{"a":1,"a":2}"#), r#"{"a":1,"a":2}"#);
        assert_eq!(ok(&k, r#""\ud800\u0000""#), r#""\ud800\u0000""#);
        // Deep nesting is fine (no recursion).
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(ok(&k, &deep), deep);
        let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(300), "}".repeat(300));
        assert_eq!(ok(&k, &deep_obj), deep_obj);
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{\"a\":}",
            "{a:1}",
            "{\"a\":1,}",
            "01",
            "1.",
            "+1",
            "tru",
            "nul",
            "[1 2]",
            "{} {}",
            "\"unterminated",
            "\"tab\tinside\"",
            "\"\\x\"",
            "\"\\u12g4\"",
            "'single'",
            "NaN",
            "[1]]",
            "[[1]",
            "{\"a\":1]",
            "[1}",
        ] {
            err(&k, bad);
        }
        let deep_bad = format!("{}{}", "[".repeat(200), "]".repeat(199));
        err(&k, &deep_bad);
        // Mixed containers across the inline/spilled boundary of the nesting stack.
        let (mut open, mut close) = (String::new(), String::new());
        for level in 0..300 {
            if level % 3 == 0 {
                open.push_str(r#"{"k":"#);
                close.insert(0, '}');
            } else {
                open.push('[');
                close.insert_str(0, ",1]");
            }
        }
        let mixed = format!("{open}0{close}");
        assert_eq!(ok(&k, &mixed), mixed);
        for wrong_at in [5, 63, 64, 65, 130, 250] {
            // Swap one closer for the other kind: must be rejected at any depth.
            let mut bad = close.clone().into_bytes();
            let pos = bad
                .iter()
                .enumerate()
                .filter(|(_, b)| matches!(b, b'}' | b']'))
                .nth(wrong_at)
                .unwrap()
                .0;
            bad[pos] = if bad[pos] == b'}' { b']' } else { b'}' };
            err(&k, &format!("{open}0{}", String::from_utf8(bad).unwrap()));
        }
    }

    #[test]
    fn dates() {
        let k = TypeKind::Date;
        assert_eq!(ok(&k, "2026-11-21"), r#""2026-11-21""#);
        assert_eq!(ok(&k, "0001-01-01"), r#""0001-01-01""#);
        assert_eq!(ok(&k, "2024-02-29"), r#""2024-02-29""#);
        assert_eq!(ok(&k, "5874897-12-31"), r#""5874897-12-31""#);
        assert_eq!(ok(&k, "infinity"), r#""infinity""#);
        assert_eq!(ok(&k, "-infinity"), r#""-infinity""#);
        // BC: ISO 8601 astronomical years (1 BC = 0000, 44 BC = -0043).
        assert_eq!(ok(&k, "0001-12-31 BC"), r#""0000-12-31""#);
        assert_eq!(ok(&k, "0044-03-15 BC"), r#""-0043-03-15""#);
        assert_eq!(ok(&k, "4713-01-01 BC"), r#""-4712-01-01""#);
        // Leap years follow the astronomical year, as in Postgres: 1 BC and 5 BC are leap.
        assert_eq!(ok(&k, "0001-02-29 BC"), r#""0000-02-29""#);
        assert_eq!(ok(&k, "0005-02-29 BC"), r#""-0004-02-29""#);
        for bad in [
            "",
            "2026-1-01",
            "2026-13-01",
            "2026-00-10",
            "2026-02-30",
            "2023-02-29",
            "0004-02-29 BC",
            "0000-01-01",
            "26-01-01",
            "2026-01-01 ",
            "2026-01-01 AD",
            "2026/01/01",
            "Infinity",
            "01-21-2026",
            "2026-11-21 00:00:00",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn times() {
        let k = TypeKind::Time;
        assert_eq!(ok(&k, "04:05:06"), r#""04:05:06""#);
        assert_eq!(ok(&k, "23:59:59.999999"), r#""23:59:59.999999""#);
        assert_eq!(ok(&k, "24:00:00"), r#""24:00:00""#);
        for bad in [
            "",
            "4:05:06",
            "04:05",
            "25:00:00",
            "24:00:01",
            "24:00:00.1",
            "12:60:00",
            "12:00:60",
            "12:00:00.",
            "12:00:00+00",
        ] {
            err(&k, bad);
        }
        let tz = TypeKind::TimeTz;
        assert_eq!(ok(&tz, "04:05:06.789-08"), r#""04:05:06.789-08""#);
        assert_eq!(
            ok(&tz, "23:59:59.999999+14:59"),
            r#""23:59:59.999999+14:59""#
        );
        assert_eq!(ok(&tz, "12:00:00+05:30:15"), r#""12:00:00+05:30:15""#);
        for bad in [
            "04:05:06",
            "04:05:06+8",
            "04:05:06 +08",
            "04:05:06+08:",
            "04:05:06+24",
            "04:05:06Z",
        ] {
            err(&tz, bad);
        }
    }

    #[test]
    fn timestamps() {
        let k = TypeKind::Timestamp;
        assert_eq!(
            ok(&k, "2026-11-21 23:40:01.123456"),
            r#""2026-11-21T23:40:01.123456""#
        );
        assert_eq!(ok(&k, "2026-11-21 23:40:01"), r#""2026-11-21T23:40:01""#);
        assert_eq!(
            ok(&k, "294276-12-31 23:59:59.999999"),
            r#""294276-12-31T23:59:59.999999""#
        );
        assert_eq!(ok(&k, "0001-01-01 00:00:00 BC"), r#""0000-01-01T00:00:00""#);
        assert_eq!(ok(&k, "infinity"), r#""infinity""#);
        assert_eq!(ok(&k, "-infinity"), r#""-infinity""#);
        for bad in [
            "2026-11-21",
            "2026-11-21T23:40:01",
            "2026-11-21 23:40:01+00",
            "2026-11-21 24:00:00",
            "2026-11-21  23:40:01",
            "2026-02-30 00:00:00",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn timestamptz_is_normalised_to_utc() {
        let k = TypeKind::TimestampTz;
        assert_eq!(
            ok(&k, "2026-11-21 23:40:01.123456+00"),
            r#""2026-11-21T23:40:01.123456Z""#
        );
        assert_eq!(
            ok(&k, "1900-01-01 00:00:00+00"),
            r#""1900-01-01T00:00:00Z""#
        );
        assert_eq!(
            ok(&k, "0044-03-15 12:00:00.5+00 BC"),
            r#""-0043-03-15T12:00:00.5Z""#
        );
        assert_eq!(ok(&k, "infinity"), r#""infinity""#);
        assert_eq!(ok(&k, "-infinity"), r#""-infinity""#);
        // Other offsets (a session not in UTC) are converted, not mislabelled.
        assert_eq!(
            ok(&k, "2020-01-01 01:02:03.5+05:30"),
            r#""2019-12-31T19:32:03.5Z""#
        );
        assert_eq!(
            ok(&k, "1900-01-01 05:21:10+05:21:10"),
            r#""1900-01-01T00:00:00Z""#
        );
        assert_eq!(
            ok(&k, "2026-11-21 20:48:08-03:30"),
            r#""2026-11-22T00:18:08Z""#
        );
        assert_eq!(
            ok(&k, "2024-02-28 23:00:00-01"),
            r#""2024-02-29T00:00:00Z""#
        );
        assert_eq!(
            ok(&k, "2023-12-31 23:30:00-01"),
            r#""2024-01-01T00:30:00Z""#
        );
        assert_eq!(
            ok(&k, "0001-01-01 00:30:00+01"),
            r#""0000-12-31T23:30:00Z""#
        );
        assert_eq!(
            ok(&k, "0001-12-31 23:30:00-01 BC"),
            r#""0001-01-01T00:30:00Z""#
        );
        for bad in [
            "2026-11-21 23:40:01.123456",
            "2026-11-21 23:40:01Z",
            "2026-11-21T23:40:01+00",
            "2026-11-21 23:40:01+00 AD",
            "2026-11-21 23:40:01+0",
            "2026-11-21 23:40:01+00:60",
            "",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn civil_days_round_trip() {
        for days in (-2_500_000..2_500_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert!(d >= 1 && d <= days_in_month(y, m), "{days} -> {y}-{m}-{d}");
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn intervals() {
        let k = TypeKind::Interval;
        for i in [
            "P1Y2M3DT4H5M6.7S",
            "PT0S",
            "P-1DT-1S",
            "PT-1.5S",
            "P1M-1D",
            "P100Y",
            "PT1H2M3S",
            "P-1Y-2M3DT-4H-5M-6.7S",
        ] {
            assert_eq!(ok(&k, i), format!("\"{i}\""));
        }
        for bad in [
            "",
            "P",
            "PT",
            "1 day",
            "@ 1 day",
            "P1",
            "P1.5D",
            "P1H",
            "PT1D",
            "P1DT",
            "P1DT1HT1S",
            "P--1D",
            "P1.S",
            "p1d",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn uuids() {
        let k = TypeKind::Uuid;
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(ok(&k, u), format!("\"{u}\""));
        for bad in [
            "",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn bytea_is_base64() {
        let k = TypeKind::Bytea;
        assert_eq!(ok(&k, "\\x"), r#""""#);
        assert_eq!(ok(&k, "\\x66"), r#""Zg==""#);
        assert_eq!(ok(&k, "\\x666f"), r#""Zm8=""#);
        assert_eq!(ok(&k, "\\x666f6f"), r#""Zm9v""#);
        assert_eq!(ok(&k, "\\x666F6F62"), r#""Zm9vYg==""#);
        assert_eq!(ok(&k, "\\xdeadbeef00ff"), r#""3q2+7wD/""#);
        for bad in [
            "",
            "x00",
            "\\x0",
            "\\x000",
            "\\x0g",
            "\\x00 ",
            "\\000",
            "\\x66g6f6f",
        ] {
            err(&k, bad);
        }
    }

    #[test]
    fn arrays() {
        assert_eq!(ok(&arr(TypeKind::Int), "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(ok(&arr(TypeKind::Int), "{}"), "[]");
        assert_eq!(ok(&arr(TypeKind::Int), "[0:1]={1,2}"), "[1,2]");
        assert_eq!(ok(&arr(TypeKind::Int), "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(ok(&arr(TypeKind::Int), "[1:1][2:3]={{1,2}}"), "[[1,2]]");
        assert_eq!(
            ok(&arr(TypeKind::Int), "{{{1},{2}},{{3},{NULL}}}"),
            "[[[1],[2]],[[3],[null]]]"
        );
        assert_eq!(
            ok(
                &arr(TypeKind::Text),
                r#"{"a b","NULL",NULL,"q\"u","b\\s","",null,"{x}","a,b",é}"#
            ),
            r#"["a b","NULL",null,"q\"u","b\\s","",null,"{x}","a,b","é"]"#
        );
        assert_eq!(
            ok(&arr(TypeKind::Text), "{\" \",\"\t\",NULLx}"),
            r#"[" ","\t","NULLx"]"#
        );
        assert_eq!(
            ok(
                &arr(TypeKind::Json),
                r#"{"{\"a\": 1}",NULL,"[1, \"x\"]",2}"#
            ),
            r#"[{"a": 1},null,[1, "x"],2]"#
        );
        assert_eq!(ok(&arr(TypeKind::Bool), "{t,f}"), "[true,false]");
        assert_eq!(
            ok(&arr(TypeKind::Numeric), "{1.5,NaN,-Infinity}"),
            r#"["1.5","NaN","-Infinity"]"#
        );
        assert_eq!(
            ok(&arr(TypeKind::Float), "{1e+30,-0,NaN}"),
            r#"[1e+30,-0,"NaN"]"#
        );
        assert_eq!(
            ok(
                &arr(TypeKind::TimestampTz),
                r#"{"2020-01-01 00:00:00+00",infinity}"#
            ),
            r#"["2020-01-01T00:00:00Z","infinity"]"#
        );
        assert_eq!(
            ok(&arr(TypeKind::Date), "{2020-01-01,\"0044-03-15 BC\"}"),
            r#"["2020-01-01","-0043-03-15"]"#
        );
        assert_eq!(
            ok(&arr(TypeKind::Bytea), r#"{"\\x01",NULL,"\\x"}"#),
            r#"["AQ==",null,""]"#
        );
        assert_eq!(
            ok(&arr(TypeKind::Other), r#"{"(1,2)","(3,4)"}"#),
            r#"["(1,2)","(3,4)"]"#
        );
        // array_in tolerates whitespace around elements; so do we.
        assert_eq!(ok(&arr(TypeKind::Int), " { 1 , 2 } "), "[1,2]");
        assert_eq!(ok(&arr(TypeKind::Text), r#"{"ab ",x}"#), r#"["ab ","x"]"#);
        for bad in [
            "",
            "1,2",
            "{1,2",
            "{1,,2}",
            "{,1}",
            "{1,}",
            "{1}}",
            "{{1},2}",
            "{1,{2}}",
            "{{1},{{2}}}",
            "[0:1]{1,2}",
            "[1:1]={{1}}",
            "{1 2}",
            "{\"1}",
            "{a\\b}",
            "{{{{{{{1}}}}}}}",
            "{1.5}",
            "{\"\"}",
            "{x}",
        ] {
            err(&arr(TypeKind::Int), bad);
        }
        let e = err(&arr(TypeKind::Int), "{1,x,3}");
        assert!(e.reason.contains("element 1"), "{e}");
        assert!(e.to_string().contains("integer[]"), "{e}");
    }

    #[test]
    fn errors_say_what_and_where() {
        let long = "x".repeat(500);
        let e = err(&TypeKind::Int, &long);
        assert_eq!(e.expected, "integer");
        assert!(
            e.excerpt.chars().count() <= EXCERPT_MAX + 1,
            "{}",
            e.excerpt
        );
        let msg = e.to_string();
        assert!(
            msg.contains("integer") && msg.contains("xxxx") && msg.contains(&e.reason),
            "{msg}"
        );
        // Excerpts never split a character into garbage panics.
        let e = err(&TypeKind::Int, &"é".repeat(100));
        assert!(e.excerpt.ends_with('…'));
    }

    fn all_kinds() -> Vec<TypeKind> {
        use TypeKind::*;
        let scalars = vec![
            Bool,
            Int,
            Numeric,
            Money,
            Float,
            Text,
            Json,
            Date,
            Time,
            TimeTz,
            Timestamp,
            TimestampTz,
            Interval,
            Uuid,
            Bytea,
            Other,
        ];
        let mut all = scalars.clone();
        all.extend(scalars.into_iter().map(|k| Array(Box::new(k))));
        all
    }

    /// Bytes that make the parsers go deep: digits, separators, quotes, escapes, braces.
    fn plausible() -> impl Strategy<Value = Vec<u8>> {
        let atoms = prop::sample::select(vec![
            "0",
            "1",
            "9",
            "-",
            "+",
            ".",
            ":",
            " ",
            "e",
            "E",
            "T",
            "Z",
            "P",
            "Y",
            "M",
            "D",
            "H",
            "S",
            "BC",
            "x",
            "\\",
            "\"",
            "{",
            "}",
            "[",
            "]",
            ",",
            "=",
            "NULL",
            "t",
            "f",
            "true",
            "null",
            "NaN",
            "Infinity",
            "infinity",
            "2026-11-21",
            "23:40:01",
            ".5",
            "+00",
            "+05:30",
            "\\x",
            "ab",
            "é",
            "\n",
            "\t",
            "\u{1}",
            "\u{7f}",
        ]);
        prop::collection::vec(atoms, 0..24).prop_map(|v| v.concat().into_bytes())
    }

    /// Token soup that is often valid JSON, to compare our checker with serde_json's.
    fn json_tokens() -> impl Strategy<Value = Vec<u8>> {
        let atoms = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n",
            "\"k\"",
            "\"\\u00e9\\n\"",
            "\"\\ud800\"",
            "\"\\q\"",
            "1",
            "-0",
            "0.5",
            "1e+30",
            "01",
            "1.",
            "-",
            "true",
            "false",
            "null",
            "nul",
            "\"",
            "é",
            "\t",
        ]);
        prop::collection::vec(atoms, 0..20).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_and_ok_means_valid_json(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            plausible in plausible(),
        ) {
            for kind in all_kinds() {
                for input in [&bytes, &plausible] {
                    let mut out = b"[".to_vec();
                    match write_json(&kind, input, &mut out) {
                        Ok(()) => {
                            out.push(b']');
                            let text = std::str::from_utf8(&out);
                            prop_assert!(text.is_ok(), "non-UTF-8 output for {kind:?} {input:?}");
                            let parsed = serde_json::from_slice::<serde::de::IgnoredAny>(&out);
                            prop_assert!(parsed.is_ok(), "invalid JSON {:?} for {kind:?} {input:?}", String::from_utf8_lossy(&out));
                            prop_assert!(!out.contains(&b'\n'), "raw newline in output for {kind:?}");
                        }
                        Err(e) => prop_assert_eq!(out, b"[".to_vec(), "{}", e),
                    }
                }
            }
        }

        #[test]
        fn skip_plain_matches_the_byte_loop(s in prop::collection::vec(any::<u8>(), 0..40), start in 0usize..40) {
            let start = start.min(s.len());
            let naive = s[start..].iter().position(|&b| ESCAPE[b as usize] != 0).map_or(s.len(), |p| p + start);
            prop_assert_eq!(skip_plain(&s, start), naive);
        }

        #[test]
        fn text_round_trips(s in any::<String>()) {
            let mut out = Vec::new();
            write_json_str(s.as_bytes(), &mut out).unwrap();
            prop_assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s);
        }

        #[test]
        fn json_checker_agrees_with_serde(input in prop_oneof![plausible(), json_tokens()]) {
            let Ok(s) = std::str::from_utf8(&input) else { return Ok(()) };
            let ours = check_json(input.as_slice()).is_ok();
            let serde = serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok();
            prop_assert_eq!(ours, serde, "disagree on {:?}", s);
        }

        #[test]
        fn json_values_embed_unchanged(v in arb_json()) {
            let text = serde_json::to_string(&v).unwrap();
            let mut out = Vec::new();
            write_json(&TypeKind::Json, text.as_bytes(), &mut out).unwrap();
            // Byte-identical: the value is embedded, not re-serialised.
            prop_assert_eq!(String::from_utf8(out).unwrap(), text);
        }

        #[test]
        fn timestamptz_offsets_convert_like_epoch_arithmetic(
            days in -2_000_000i64..2_000_000, sod in 0i64..86_400, off in -15i64 * 3600..15 * 3600,
        ) {
            // Print local time for (days, sod) at offset `off`, as Postgres would, then check
            // that the UTC we output is the instant we started from.
            let local = days * 86_400 + sod + off;
            let (y, m, d) = civil_from_days(local.div_euclid(86_400));
            let l = local.rem_euclid(86_400);
            let (yp, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
            let a = off.abs();
            let text = format!(
                "{yp:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.25{}{:02}:{:02}:{:02}{bc}",
                l / 3600, l / 60 % 60, l % 60, if off < 0 { '-' } else { '+' }, a / 3600, a / 60 % 60, a % 60
            );
            let mut out = Vec::new();
            write_json(&TypeKind::TimestampTz, text.as_bytes(), &mut out).unwrap();
            let (uy, um, ud) = civil_from_days(days);
            let mut want = b"\"".to_vec();
            write_iso_year(uy, &mut want);
            want.extend_from_slice(format!("-{um:02}-{ud:02}T{:02}:{:02}:{:02}.25Z\"", sod / 3600, sod / 60 % 60, sod % 60).as_bytes());
            prop_assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(want).unwrap(), "{}", text);
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
