//! The Odoo profile: what an Odoo database means beyond its tables.
//!
//! Kept out of the generic code: the pipeline asks a [`crate::transaction::TableDescriber`]
//! how to capture each table, and this module provides the Odoo one.

use crate::value::{ValueError, write_json_str};

/// Writes an Odoo translated field (jsonb `{"en_US": "Chair", "fr_FR": "Chaise"}`)
/// as the plain string of one language: `lang`, else `en_US`, else null when the
/// object has neither. A value that is not such an object is an error, never a
/// silent null.
pub fn write_translation(text: &[u8], lang: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let err = |reason: String| ValueError {
        expected: "an Odoo translated field (a JSON object of language -> text)",
        excerpt: String::from_utf8_lossy(&text[..text.len().min(60)]).into_owned(),
        reason,
    };
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(text).map_err(|e| err(e.to_string()))?;
    let picked = map.get(lang).or_else(|| map.get("en_US"));
    match picked {
        None | Some(serde_json::Value::Null) => out.extend_from_slice(b"null"),
        Some(serde_json::Value::String(s)) => write_json_str(s.as_bytes(), out)?,
        Some(other) => return Err(err(format!("the {lang} entry is not a string: {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(text: &str, lang: &str) -> Result<String, ValueError> {
        let mut out = Vec::new();
        write_translation(text.as_bytes(), lang, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn picks_the_language_then_english() {
        let v = r#"{"en_US": "Chair", "fr_FR": "Chaise \"bois\""}"#;
        assert_eq!(flat(v, "fr_FR").unwrap(), r#""Chaise \"bois\"""#);
        assert_eq!(flat(v, "de_DE").unwrap(), r#""Chair""#);
        assert_eq!(flat(r#"{"fr_FR": "x"}"#, "de_DE").unwrap(), "null");
        assert!(flat("[1]", "en_US").is_err());
        assert!(flat(r#"{"en_US": 3}"#, "en_US").is_err());
    }
}
