//! Text of the replication commands, with names validated and quoted. Pure
//! functions, so the exact strings are unit-tested without a server.

use super::error::ReplicationError;
use crate::lsn::Lsn;

/// What `CREATE_REPLICATION_SLOT` does with the snapshot at the slot's
/// consistent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it (`pg_export_snapshot` style) for other sessions to import with
    /// `SET TRANSACTION SNAPSHOT`. It stays valid only until this connection runs
    /// its next command, so keep the client idle until the snapshot is imported.
    Export,
    /// Do not keep a snapshot.
    NoExport,
    /// Use it for the current transaction of this connection, which must have
    /// been opened (`BEGIN ISOLATION LEVEL REPEATABLE READ`) just before.
    Use,
}

/// Longest slot name Postgres accepts (`NAMEDATALEN - 1`).
pub const MAX_SLOT_NAME_LEN: usize = 63;

/// Postgres' rule for slot names (`ReplicationSlotValidateName`): 1 to 63
/// characters, each a lower-case ASCII letter, digit or underscore.
pub fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let err = |reason| ReplicationError::InvalidSlotName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(err("it is empty"));
    }
    if name.len() > MAX_SLOT_NAME_LEN {
        return Err(err("it is longer than 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(err(
            "only lower-case letters, digits and underscores are allowed",
        ));
    }
    Ok(())
}

/// `"name"` with embedded double quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` with embedded single quotes doubled. The replication command scanner
/// knows no backslash escapes, so doubling quotes is the whole rule.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The value of pgoutput's `publication_names` option: a comma-separated list of
/// quoted identifiers (pass it as the option value; it gets quoted again as a
/// literal).
pub fn publication_names_value(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn create_logical_slot(
    name: &str,
    temporary: bool,
    snapshot: SnapshotAction,
    server_version_num: u32,
) -> Result<String, ReplicationError> {
    validate_slot_name(name)?;
    let temp = if temporary { " TEMPORARY" } else { "" };
    // The parenthesised option syntax exists from PostgreSQL 15; the keyword form
    // is what older servers understand (and 15+ still accepts).
    let snap = if server_version_num >= 150000 {
        match snapshot {
            SnapshotAction::Export => " (SNAPSHOT 'export')",
            SnapshotAction::NoExport => " (SNAPSHOT 'nothing')",
            SnapshotAction::Use => " (SNAPSHOT 'use')",
        }
    } else {
        match snapshot {
            SnapshotAction::Export => " EXPORT_SNAPSHOT",
            SnapshotAction::NoExport => " NOEXPORT_SNAPSHOT",
            SnapshotAction::Use => " USE_SNAPSHOT",
        }
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {}{temp} LOGICAL \"pgoutput\"{snap}",
        quote_ident(name)
    ))
}

pub(crate) fn drop_slot(name: &str, wait: bool) -> Result<String, ReplicationError> {
    validate_slot_name(name)?;
    let wait = if wait { " WAIT" } else { "" };
    Ok(format!("DROP_REPLICATION_SLOT {}{wait}", quote_ident(name)))
}

pub(crate) fn start_logical_replication(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, ReplicationError> {
    validate_slot_name(slot)?;
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        let mut parts = Vec::with_capacity(options.len());
        for (name, value) in options {
            if name.is_empty() {
                return Err(ReplicationError::InvalidOption {
                    name: name.to_string(),
                    reason: "it is empty",
                });
            }
            if name.contains('\0') || value.contains('\0') {
                return Err(ReplicationError::InvalidOption {
                    name: name.to_string(),
                    reason: "NUL bytes are not allowed in names or values",
                });
            }
            parts.push(format!("{} {}", quote_ident(name), quote_literal(value)));
        }
        cmd.push_str(" (");
        cmd.push_str(&parts.join(", "));
        cmd.push(')');
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_name_rule() {
        for ok in ["a", "odoo_cdc_1", &"x".repeat(63), "_", "9"] {
            assert!(validate_slot_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "with-dash",
            "sp ace",
            "quo\"te",
            "é",
            &"x".repeat(64),
        ] {
            let err = validate_slot_name(bad).unwrap_err();
            assert!(matches!(err, ReplicationError::InvalidSlotName { .. }));
            assert!(!err.is_retryable());
            assert!(err.to_string().contains("slot name"), "{err}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"back\slash"), r"'back\slash'");
        assert_eq!(
            publication_names_value(&["pub", "we\"ird"]),
            r#""pub","we""ird""#
        );
    }

    #[test]
    fn create_slot_text_by_server_version() {
        assert_eq!(
            create_logical_slot("s1", true, SnapshotAction::Export, 150019).unwrap(),
            "CREATE_REPLICATION_SLOT \"s1\" TEMPORARY LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_logical_slot("s1", false, SnapshotAction::NoExport, 140010).unwrap(),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_logical_slot("s1", false, SnapshotAction::Use, 160000).unwrap(),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'use')"
        );
        assert!(create_logical_slot("S1", false, SnapshotAction::Use, 160000).is_err());
    }

    #[test]
    fn start_replication_text() {
        let pubs = publication_names_value(&["odoo_pub"]);
        assert_eq!(
            start_logical_replication(
                "slot",
                Lsn(0x16B3748),
                &[("proto_version", "2"), ("publication_names", &pubs)]
            )
            .unwrap(),
            r#"START_REPLICATION SLOT "slot" LOGICAL 0/16B3748 ("proto_version" '2', "publication_names" '"odoo_pub"')"#
        );
        assert_eq!(
            start_logical_replication("slot", Lsn(0), &[]).unwrap(),
            r#"START_REPLICATION SLOT "slot" LOGICAL 0/0"#
        );
        assert!(start_logical_replication("slot", Lsn(0), &[("", "x")]).is_err());
        assert_eq!(
            drop_slot("s", true).unwrap(),
            r#"DROP_REPLICATION_SLOT "s" WAIT"#
        );
        assert_eq!(
            drop_slot("s", false).unwrap(),
            r#"DROP_REPLICATION_SLOT "s""#
        );
    }
}
