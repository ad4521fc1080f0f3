//! Rows of `COPY ... TO STDOUT` (text format) as the tuples pgoutput sends.
//!
//! COPY's text format carries each value in its type's output form, the same
//! text the WAL stream carries (the connection uses the same session settings),
//! with a thin layer of escaping: fields are separated by tabs, rows end with a
//! newline, `\N` is NULL, and backslash escapes stand for backslash, tab,
//! newline and other control characters. Fields without a backslash are sliced
//! out of the received buffer without copying.

use bytes::{Bytes, BytesMut};

use crate::pgoutput::{ColumnValue, TupleData};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    #[error("COPY row {row} has {got} fields, expected {expected}")]
    FieldCount {
        row: u64,
        got: usize,
        expected: usize,
    },
    #[error("COPY data ended in the middle of a row")]
    Truncated,
}

/// Splits COPY data (arbitrarily chunked) into rows of `columns` fields.
#[derive(Debug)]
pub struct CopyRows {
    columns: usize,
    partial: BytesMut,
    rows: u64,
}

impl CopyRows {
    pub fn new(columns: usize) -> Self {
        CopyRows {
            columns,
            partial: BytesMut::new(),
            rows: 0,
        }
    }

    /// Feeds one chunk and appends the complete rows it finishes to `out`.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<TupleData>) -> Result<(), CopyTextError> {
        let mut data = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        while let Some(nl) = memchr(b'\n', &data) {
            let line = data.split_to(nl + 1);
            out.push(self.row(line.slice(..nl))?);
        }
        if !data.is_empty() {
            self.partial.extend_from_slice(&data);
        }
        Ok(())
    }

    /// The data ended: anything left over is a truncated row.
    pub fn finish(&self) -> Result<(), CopyTextError> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(CopyTextError::Truncated)
        }
    }

    fn row(&mut self, line: Bytes) -> Result<TupleData, CopyTextError> {
        self.rows += 1;
        let mut columns = Vec::with_capacity(self.columns);
        let mut start = 0;
        loop {
            let end = memchr(b'\t', &line[start..]).map_or(line.len(), |i| start + i);
            columns.push(field(line.slice(start..end)));
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        // A table with no columns prints an empty line: one empty "field".
        if self.columns == 0 && columns.len() == 1 {
            columns.clear();
        }
        if columns.len() != self.columns {
            return Err(CopyTextError::FieldCount {
                row: self.rows,
                got: columns.len(),
                expected: self.columns,
            });
        }
        Ok(TupleData { columns })
    }
}

fn memchr(b: u8, s: &[u8]) -> Option<usize> {
    s.iter().position(|c| *c == b)
}

fn field(raw: Bytes) -> ColumnValue {
    if raw.as_ref() == b"\\N" {
        return ColumnValue::Null;
    }
    if memchr(b'\\', &raw).is_none() {
        return ColumnValue::Text(raw);
    }
    ColumnValue::Text(Bytes::from(unescape(&raw)))
}

/// Undoes COPY text escaping: `\b \f \n \r \t \v \\`, octal `\ooo`, hex `\xhh`,
/// and any other escaped character as itself.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c != b'\\' || i + 1 == s.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let e = s[i + 1];
        i += 2;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                let mut n = 1;
                while n < 3 && i < s.len() && (b'0'..=b'7').contains(&s[i]) {
                    v = v * 8 + u32::from(s[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < s.len() && s[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < s.len() && s[i].is_ascii_hexdigit() {
                    v = v * 16 + (s[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &ColumnValue) -> &[u8] {
        match v {
            ColumnValue::Text(b) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn splits_rows_across_chunks_and_unescapes() {
        let mut rows = CopyRows::new(3);
        let mut out = Vec::new();
        rows.push(Bytes::from_static(b"1\ta\\tb\\\\c\t\\N\n2\tx"), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        rows.push(Bytes::from_static(b"y\tline\\nbreak\n"), &mut out)
            .unwrap();
        rows.finish().unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(text(&out[0].columns[0]), b"1");
        assert_eq!(text(&out[0].columns[1]), b"a\tb\\c");
        assert_eq!(out[0].columns[2], ColumnValue::Null);
        assert_eq!(text(&out[1].columns[1]), b"xy");
        assert_eq!(text(&out[1].columns[2]), b"line\nbreak");
    }

    #[test]
    fn octal_hex_and_plain_escapes() {
        assert_eq!(unescape(b"\\101\\x42\\q\\r"), b"ABq\r".to_vec());
    }

    #[test]
    fn wrong_field_count_and_truncation_are_errors() {
        let mut rows = CopyRows::new(2);
        let mut out = Vec::new();
        assert!(matches!(
            rows.push(Bytes::from_static(b"1\n"), &mut out),
            Err(CopyTextError::FieldCount { got: 1, .. })
        ));
        let mut rows = CopyRows::new(2);
        rows.push(Bytes::from_static(b"1\t2"), &mut out).unwrap();
        assert_eq!(rows.finish(), Err(CopyTextError::Truncated));
    }

    #[test]
    fn empty_string_is_not_null() {
        let mut rows = CopyRows::new(2);
        let mut out = Vec::new();
        rows.push(Bytes::from_static(b"\t\\N\n"), &mut out).unwrap();
        assert_eq!(text(&out[0].columns[0]), b"");
        assert_eq!(out[0].columns[1], ColumnValue::Null);
    }
}
