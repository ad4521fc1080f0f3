//! Which tables and columns are captured: `--include` / `--exclude` table globs,
//! `--exclude-column`, the profile's default exclusions, and the rule that a
//! table without a usable replica identity never goes into a publication that
//! publishes updates and deletes.
//!
//! One decision function, [`Selection::decide`], is used by the publication sync
//! (what the server sends), the table describer (what is published) and
//! `odoo-cdc check` (what the operator is told), so the three cannot disagree.

pub use crate::glob::Glob;
use crate::odoo::OdooTable;

/// `schema.table` glob; a pattern without a dot matches the table in any schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableGlob {
    pub schema: Glob,
    pub table: Glob,
}

impl TableGlob {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty table pattern".into());
        }
        let (schema, table) = match text.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("*", text),
        };
        if schema.is_empty() || table.is_empty() || table.contains('.') {
            return Err(format!(
                "expected SCHEMA.TABLE or TABLE (globs with * and ?), got {text:?}"
            ));
        }
        Ok(TableGlob {
            schema: Glob::new(schema),
            table: Glob::new(table),
        })
    }

    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema.matches(schema) && self.table.matches(table)
    }
}

impl std::fmt::Display for TableGlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema.as_str(), self.table.as_str())
    }
}

/// `TABLE.COLUMN` or `SCHEMA.TABLE.COLUMN`, globs allowed in every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnGlob {
    pub table: TableGlob,
    pub column: Glob,
}

impl ColumnGlob {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (table, column) = text
            .rsplit_once('.')
            .ok_or_else(|| format!("expected TABLE.COLUMN or SCHEMA.TABLE.COLUMN, got {text:?}"))?;
        if column.is_empty() {
            return Err(format!("no column name in {text:?}"));
        }
        Ok(ColumnGlob {
            table: TableGlob::parse(table)?,
            column: Glob::new(column),
        })
    }
}

/// How the publication is managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationMode {
    /// Create the publication, or ALTER it to hold exactly the selected tables.
    Create,
    /// Use the publication as it is; warn where it differs from the selection.
    Existing,
}

/// Which profile interprets the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Odoo when the database has an `ir_model` table, else none.
    Auto,
    Odoo,
    None,
}

/// The selection options of a run (validated config).
#[derive(Debug, Clone)]
pub struct SelectionConfig {
    pub include: Vec<TableGlob>,
    pub exclude: Vec<TableGlob>,
    pub exclude_columns: Vec<ColumnGlob>,
    pub publication_mode: PublicationMode,
    pub profile: Profile,
    /// Flatten Odoo translated fields to this language.
    pub translation_lang: Option<String>,
    /// Tables without a usable replica identity go into this second publication
    /// (`publish = 'insert'`) instead of being skipped.
    pub insert_only_publication: Option<String>,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        SelectionConfig {
            include: Vec::new(),
            exclude: Vec::new(),
            exclude_columns: Vec::new(),
            publication_mode: PublicationMode::Existing,
            profile: Profile::None,
            translation_lang: None,
            insert_only_publication: None,
        }
    }
}

/// Whether PostgreSQL can identify a table's old rows (needed for UPDATE and
/// DELETE once the table is in a publication that publishes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Primary key (DEFAULT), a chosen unique index (USING INDEX) or FULL.
    Usable,
    /// DEFAULT on a table without primary key.
    NoPrimaryKey,
    /// REPLICA IDENTITY NOTHING (or USING INDEX on an index that is gone).
    Nothing,
}

/// What happens to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Captured through the main publication.
    Capture,
    /// No usable identity, captured for inserts only through the second publication.
    InsertOnly,
    /// Left out: filters or the profile (the reason says which).
    Excluded(String),
    /// Selected, but without a usable replica identity: kept out of the
    /// publication so Odoo's UPDATEs and DELETEs keep working.
    NoIdentity(Identity),
}

impl Decision {
    pub fn is_captured(&self) -> bool {
        matches!(self, Decision::Capture | Decision::InsertOnly)
    }
}

impl SelectionConfig {
    /// Whether the filters alone (no profile, no identity rule) select the table,
    /// and the reason when they do not.
    fn filters(&self, schema: &str, table: &str) -> Result<(), String> {
        if !self.include.is_empty() && !self.include.iter().any(|g| g.matches(schema, table)) {
            return Err("not matched by any --include".into());
        }
        if let Some(g) = self.exclude.iter().find(|g| g.matches(schema, table)) {
            return Err(format!("matched by --exclude {g}"));
        }
        Ok(())
    }

    /// The one decision about a table, shared by the publication sync, the
    /// describer and `check`. `odoo` is the Odoo profile's view of the table
    /// when the profile is active.
    pub fn decide(
        &self,
        schema: &str,
        table: &str,
        identity: Identity,
        odoo: Option<&OdooTable>,
    ) -> Decision {
        if let Err(reason) = self.filters(schema, table) {
            return Decision::Excluded(reason);
        }
        if let Some(ex) = odoo.and_then(OdooTable::default_exclusion)
            && !self
                .include
                .iter()
                .any(|g| g.matches(schema, table) && ex.opted_in_by(g.table.as_str()))
        {
            return Decision::Excluded(format!(
                "Odoo profile default ({}); opt in with --include {schema}.{table}",
                ex.reason
            ));
        }
        match identity {
            Identity::Usable => Decision::Capture,
            _ if self.insert_only_publication.is_some() => Decision::InsertOnly,
            other => Decision::NoIdentity(other),
        }
    }

    /// Whether `--exclude-column` drops this column.
    pub fn column_excluded(&self, schema: &str, table: &str, column: &str) -> bool {
        self.exclude_columns
            .iter()
            .any(|c| c.table.matches(schema, table) && c.column.matches(column))
    }
}

/// The warning for a selected table without a usable replica identity, with the fix.
pub fn no_identity_message(qualified: &str, identity: Identity) -> String {
    let why = match identity {
        Identity::Nothing => "has REPLICA IDENTITY NOTHING",
        _ => "has no primary key (REPLICA IDENTITY DEFAULT)",
    };
    format!(
        "table {qualified} {why}: it is not published, because PostgreSQL would then reject \
         every UPDATE and DELETE on it. Fix: ALTER TABLE {qualified} REPLICA IDENTITY FULL; \
         (or add a primary key, or ALTER TABLE {qualified} REPLICA IDENTITY USING INDEX <unique index>), \
         or capture its inserts only with --insert-only-tables-without-key, or exclude it with --exclude {qualified}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(include: &[&str], exclude: &[&str]) -> SelectionConfig {
        SelectionConfig {
            include: include
                .iter()
                .map(|g| TableGlob::parse(g).unwrap())
                .collect(),
            exclude: exclude
                .iter()
                .map(|g| TableGlob::parse(g).unwrap())
                .collect(),
            ..SelectionConfig::default()
        }
    }

    #[test]
    fn globs_match_like_a_shell() {
        let g = Glob::new("sale_*");
        assert!(g.matches("sale_order") && g.matches("sale_") && !g.matches("xsale_order"));
        assert!(Glob::new("ir_cron*").matches("ir_cron"));
        assert!(Glob::new("*_rel").matches("account_tax_sale_order_line_rel"));
        assert!(Glob::new("a?c").matches("abc") && !Glob::new("a?c").matches("ac"));
        assert!(Glob::new("*a*b*").matches("xxaxxbxx") && !Glob::new("*a*b*").matches("ba"));
        assert!(Glob::new("*").matches(""));
    }

    #[test]
    fn table_and_column_patterns_parse() {
        let t = TableGlob::parse("public.sale_*").unwrap();
        assert!(t.matches("public", "sale_order") && !t.matches("other", "sale_order"));
        let any = TableGlob::parse("res_partner").unwrap();
        assert!(any.matches("public", "res_partner") && any.matches("x", "res_partner"));
        assert!(TableGlob::parse("a.b.c").is_err() && TableGlob::parse(".x").is_err());
        let c = ColumnGlob::parse("res_partner.comment").unwrap();
        assert!(c.table.matches("public", "res_partner") && c.column.matches("comment"));
        let c = ColumnGlob::parse("public.product_template.description_*").unwrap();
        assert!(c.table.matches("public", "product_template"));
        assert!(c.column.matches("description_sale"));
        assert!(ColumnGlob::parse("nocolumn").is_err());
    }

    #[test]
    fn include_exclude_and_identity() {
        let c = cfg(
            &["public.sale_*", "public.res_partner"],
            &["*.sale_order_line"],
        );
        assert_eq!(
            c.decide("public", "sale_order", Identity::Usable, None),
            Decision::Capture
        );
        assert!(matches!(
            c.decide("public", "sale_order_line", Identity::Usable, None),
            Decision::Excluded(r) if r.contains("--exclude")
        ));
        assert!(matches!(
            c.decide("public", "stock_move", Identity::Usable, None),
            Decision::Excluded(r) if r.contains("--include")
        ));
        assert_eq!(
            c.decide("public", "res_partner", Identity::NoPrimaryKey, None),
            Decision::NoIdentity(Identity::NoPrimaryKey)
        );
        let mut c = cfg(&[], &[]);
        c.insert_only_publication = Some("p_insert_only".into());
        assert_eq!(
            c.decide("public", "legacy", Identity::Nothing, None),
            Decision::InsertOnly
        );
        let msg = no_identity_message("public.legacy", Identity::NoPrimaryKey);
        assert!(
            msg.contains("ALTER TABLE public.legacy REPLICA IDENTITY FULL"),
            "{msg}"
        );
    }

    #[test]
    fn excluded_columns() {
        let mut c = cfg(&[], &[]);
        c.exclude_columns = vec![ColumnGlob::parse("res_partner.comment").unwrap()];
        assert!(c.column_excluded("public", "res_partner", "comment"));
        assert!(!c.column_excluded("public", "res_partner", "name"));
        assert!(!c.column_excluded("public", "sale_order", "comment"));
    }
}
