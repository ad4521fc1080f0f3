//! The Odoo profile: what an Odoo database means beyond its tables.
//!
//! Kept out of the generic code: the table describer (`describer.rs`) and
//! the selection (`filter.rs`) ask this module, per table, for an
//! [`OdooTable`]: the model name (`sale_order` → `sale.order`, from `ir_model`),
//! whether it is a many2many relation table and which models it links, which
//! columns are translated fields, and whether the profile leaves the table out
//! by default (high-churn technical tables, transient wizard tables).
//!
//! Odoo derives a model's table from its name (`.` → `_`); `ir_model` has no
//! table column, so the mapping is inverted here. Rows are read through
//! `to_jsonb(row)` so that columns some Odoo versions lack (or type differently,
//! like `ir_model_fields.translate`) never make the query fail.

use std::collections::{HashMap, HashSet};

use crate::glob::Glob;
use crate::replication::quote_ident;
use crate::value::{ValueError, write_json_str};

/// The models a many2many relation table links, as far as the profile knows
/// them (`source.many2many` in events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Many2Many {
    /// The model owning the field (`sale.order.line`).
    pub model: Option<String>,
    /// The many2many field (`tax_id`), when `ir_model_fields` names it.
    pub field: Option<String>,
    /// The model linked to (`account.tax`).
    pub comodel: Option<String>,
}

/// High-churn technical tables the profile leaves out unless an `--include`
/// names them: they are Odoo's plumbing, not business data, and would dominate
/// the stream (the bus alone writes a row per notification).
pub const DEFAULT_EXCLUSIONS: &[(&str, &str)] = &[
    ("bus_bus", "longpolling notifications"),
    ("bus_presence", "user presence heartbeats"),
    ("ir_cron*", "scheduler bookkeeping"),
    ("res_users_log", "login log"),
    ("ir_attachment", "attachment metadata"),
    ("ir_ui_view", "view definitions"),
    ("ir_model_data", "XML ids"),
    ("mail_*", "chatter, followers and mail queue"),
];

/// What the Odoo profile knows about one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OdooTable {
    pub table: String,
    /// The model stored in this table (`sale.order`).
    pub model: Option<String>,
    /// A transient (wizard) model: rows live minutes, then a cron vacuums them.
    pub transient: bool,
    /// A many2many relation table.
    pub many2many: Option<Many2Many>,
    /// Columns of translated fields (jsonb `{"en_US": ..}`).
    pub translated: HashSet<String>,
}

impl OdooTable {
    /// Why the profile leaves this table out by default, if it does.
    pub fn default_exclusion(&self) -> Option<Exclusion> {
        if let Some((glob, why)) = DEFAULT_EXCLUSIONS
            .iter()
            .find(|(g, _)| Glob::new(*g).matches(&self.table))
        {
            return Some(Exclusion {
                family: Some(glob),
                reason: format!("{glob}: {why}"),
            });
        }
        if self.transient {
            return Some(Exclusion {
                family: None,
                reason: format!(
                    "transient wizard model {}",
                    self.model.as_deref().unwrap_or("?")
                ),
            });
        }
        None
    }
}

/// A default exclusion of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    /// The name glob it comes from (`mail_*`); `None` for transient models.
    pub family: Option<&'static str>,
    pub reason: String,
}

impl Exclusion {
    /// Whether an `--include` table pattern opts the table back in: it must name
    /// the table or its family (`mail_message`, `mail_*`), not merely match it
    /// (`*`, `m*`), so a broad include keeps the profile's defaults.
    pub fn opted_in_by(&self, include_table_pattern: &str) -> bool {
        match self.family {
            Some(family) => Glob::new(family).matches(include_table_pattern),
            None => !include_table_pattern.contains(['*', '?']),
        }
    }
}

/// The profile's view of a database, loaded from `ir_model` and `ir_model_fields`.
#[derive(Debug, Clone, Default)]
pub struct OdooCatalog {
    /// The schema holding `ir_model` (Odoo's tables live there).
    pub schema: String,
    /// Table name → (model, transient).
    models: HashMap<String, (String, bool)>,
    /// Relation table → what `ir_model_fields` says of its many2many field.
    many2many: HashMap<String, Many2Many>,
    /// Model → translated field names.
    translated: HashMap<String, HashSet<String>>,
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

impl OdooCatalog {
    /// The schema of `ir_model` when the database is an Odoo one.
    pub async fn detect(client: &tokio_postgres::Client) -> PgResult<Option<String>> {
        let row = client
            .query_opt(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass('ir_model')",
                &[],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Loads what the profile needs, for every table, or only for `only_table`
    /// (a refresh after a Relation message).
    pub async fn load(
        client: &tokio_postgres::Client,
        schema: &str,
        only_table: Option<&str>,
    ) -> PgResult<OdooCatalog> {
        let s = quote_ident(schema);
        let mut cat = OdooCatalog {
            schema: schema.to_string(),
            ..OdooCatalog::default()
        };
        let rows = client
            .query(
                &format!(
                    "SELECT j ->> 'model', coalesce(j ->> 'transient', 'false') = 'true' \
                     FROM (SELECT to_jsonb(m) AS j FROM {s}.ir_model m ORDER BY m.id) x \
                     WHERE j ->> 'model' IS NOT NULL AND ($1::text IS NULL OR replace(j ->> 'model', '.', '_') = $1 \
                        OR $1 LIKE '%\\_rel')"
                ),
                &[&only_table],
            )
            .await?;
        for r in rows {
            let model: String = r.get(0);
            let transient: bool = r.get(1);
            cat.models
                .entry(model.replace('.', "_"))
                .or_insert((model, transient));
        }
        let has_fields: bool = client
            .query_one(
                &format!(
                    "SELECT to_regclass({}) IS NOT NULL",
                    crate::replication::quote_literal(&format!("{s}.ir_model_fields"))
                ),
                &[],
            )
            .await?
            .get(0);
        if has_fields {
            let rows = client
                .query(
                    &format!(
                        "SELECT j ->> 'model', j ->> 'name', j ->> 'ttype', \
                                coalesce(j ->> 'translate', 'false') NOT IN ('false', ''), \
                                j ->> 'relation', j ->> 'relation_table' \
                         FROM (SELECT to_jsonb(f) AS j FROM {s}.ir_model_fields f ORDER BY f.id) x \
                         WHERE (j ->> 'ttype' = 'many2many' AND j ->> 'relation_table' IS NOT NULL \
                                OR coalesce(j ->> 'translate', 'false') NOT IN ('false', '')) \
                           AND ($1::text IS NULL OR j ->> 'relation_table' = $1 \
                                OR replace(j ->> 'model', '.', '_') = $1)"
                    ),
                    &[&only_table],
                )
                .await?;
            for r in rows {
                let (Some(model), Some(name)) =
                    (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1))
                else {
                    continue;
                };
                let ttype: Option<String> = r.get(2);
                let translate: bool = r.get(3);
                if ttype.as_deref() == Some("many2many") {
                    if let Some(rel) = r.get::<_, Option<String>>(5) {
                        cat.many2many.entry(rel).or_insert(Many2Many {
                            model: Some(model.clone()),
                            field: Some(name.clone()),
                            comodel: r.get(4),
                        });
                    }
                } else if translate {
                    cat.translated.entry(model).or_default().insert(name);
                }
            }
        }
        Ok(cat)
    }

    /// Merges a refresh for one table into the catalog.
    pub fn merge(&mut self, other: OdooCatalog) {
        self.models.extend(other.models);
        self.many2many.extend(other.many2many);
        self.translated.extend(other.translated);
    }

    /// The profile's view of `schema.table` with these columns; `None` for a
    /// table outside Odoo's schema.
    pub fn table(&self, schema: &str, table: &str, columns: &[&str]) -> Option<OdooTable> {
        if schema != self.schema {
            return None;
        }
        let (model, transient) = match self.models.get(table) {
            Some((m, t)) => (Some(m.clone()), *t),
            None => (None, false),
        };
        let translated = model
            .as_ref()
            .and_then(|m| self.translated.get(m))
            .map(|fields| {
                columns
                    .iter()
                    .filter(|c| fields.contains(**c))
                    .map(|c| c.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let many2many = self
            .many2many
            .get(table)
            .cloned()
            .or_else(|| self.many2many_by_convention(table, columns));
        Some(OdooTable {
            table: table.to_string(),
            model: if many2many.is_some() { None } else { model },
            transient,
            many2many,
            translated,
        })
    }

    /// Odoo's default many2many table is `<model1>_<model2>_rel` with columns
    /// `<model1 table>_id` and `<model2 table>_id`; without an `ir_model_fields`
    /// row saying so, a `*_rel` table of two columns is recognised by that shape.
    fn many2many_by_convention(&self, table: &str, columns: &[&str]) -> Option<Many2Many> {
        if !table.ends_with("_rel") || columns.len() != 2 {
            return None;
        }
        let model_of = |c: &str| {
            c.strip_suffix("_id")
                .and_then(|t| self.models.get(t))
                .map(|(m, _)| m.clone())
        };
        Some(Many2Many {
            model: model_of(columns[0]),
            field: None,
            comodel: model_of(columns[1]),
        })
    }
}

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
    fn default_exclusions_and_models() {
        let mut cat = OdooCatalog {
            schema: "public".into(),
            ..OdooCatalog::default()
        };
        cat.models
            .insert("sale_order".into(), ("sale.order".into(), false));
        cat.models
            .insert("account_tax".into(), ("account.tax".into(), false));
        cat.models
            .insert("sale_order_line".into(), ("sale.order.line".into(), false));
        cat.models.insert(
            "sale_advance_payment_inv".into(),
            ("sale.advance.payment.inv".into(), true),
        );
        let so = cat.table("public", "sale_order", &["id", "name"]).unwrap();
        assert_eq!(so.model.as_deref(), Some("sale.order"));
        assert_eq!(so.default_exclusion(), None);
        assert!(cat.table("other", "sale_order", &["id"]).is_none());
        for t in [
            "bus_bus",
            "ir_cron",
            "ir_cron_trigger",
            "mail_message",
            "ir_model_data",
        ] {
            let ot = cat.table("public", t, &["id"]).unwrap();
            assert!(ot.default_exclusion().is_some(), "{t}");
        }
        let wizard = cat
            .table("public", "sale_advance_payment_inv", &["id"])
            .unwrap();
        let ex = wizard.default_exclusion().unwrap();
        assert!(ex.reason.contains("transient"));
        assert!(ex.opted_in_by("sale_advance_payment_inv") && !ex.opted_in_by("sale_*"));
        let mail = cat.table("public", "mail_message", &["id"]).unwrap();
        let ex = mail.default_exclusion().unwrap();
        assert!(ex.opted_in_by("mail_*") && ex.opted_in_by("mail_message"));
        assert!(!ex.opted_in_by("*") && !ex.opted_in_by("m*"));
        let rel = cat
            .table(
                "public",
                "account_tax_sale_order_line_rel",
                &["sale_order_line_id", "account_tax_id"],
            )
            .unwrap();
        assert_eq!(
            rel.many2many,
            Some(Many2Many {
                model: Some("sale.order.line".into()),
                field: None,
                comodel: Some("account.tax".into()),
            })
        );
        assert!(rel.model.is_none());
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
