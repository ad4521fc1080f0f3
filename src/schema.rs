//! The relation cache: what pgoutput told us about each table and non-builtin type.
//!
//! pgoutput describes a table with a `Relation` message before the first change to it in a
//! session, and again whenever its definition changed (ALTER TABLE mid-stream), and a
//! non-builtin type with a `Type` message. Row changes carry only the relation OID, so
//! decoding them needs this cache. It is deliberately independent of the wire decoder's
//! types: the decoder converts its messages into [`Relation`] and calls [`RelationCache::upsert`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::value::{TypeKind, builtin_type_name};

/// Errors of the relation cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A change referenced a relation no `Relation` message described: pgoutput always
    /// describes a relation first, so this is a protocol error (or a bug in our resume logic).
    #[error("change for relation OID {oid} that no Relation message described")]
    UnknownRelation {
        /// The relation OID the change carried.
        oid: u32,
    },
    /// The replica identity byte of a `Relation` message was not one Postgres sends.
    #[error("relation OID {oid}: unknown replica identity setting {byte:#04x}")]
    InvalidReplicaIdentity {
        /// The relation OID.
        oid: u32,
        /// The byte received.
        byte: u8,
    },
}

/// A table's `REPLICA IDENTITY`: which old-row columns Postgres logs for updates and deletes.
///
/// With `Default` (primary key) and `Index`, the old row of an update/delete carries only the
/// key columns (and only when the key changed, for updates); with `Full` it carries every
/// column; with `Nothing` it carries none, so deletes cannot be keyed at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// Primary key (`d`).
    Default,
    /// No old-row information (`n`).
    Nothing,
    /// All columns (`f`).
    Full,
    /// A chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    /// From the `relreplident` byte of a `Relation` message.
    pub fn from_byte(oid: u32, byte: u8) -> Result<ReplicaIdentity, SchemaError> {
        match byte {
            b'd' => Ok(ReplicaIdentity::Default),
            b'n' => Ok(ReplicaIdentity::Nothing),
            b'f' => Ok(ReplicaIdentity::Full),
            b'i' => Ok(ReplicaIdentity::Index),
            _ => Err(SchemaError::InvalidReplicaIdentity { oid, byte }),
        }
    }
}

/// One published column of a relation, in wire order.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID as sent (a domain's own OID, not its base type's).
    pub type_oid: u32,
    /// `atttypmod` (e.g. varchar length + 4, numeric precision/scale), -1 if none.
    pub type_modifier: i32,
    /// Part of the replica identity: flag bit 1 of the `Relation` message. With
    /// `REPLICA IDENTITY FULL` Postgres flags every column; with `NOTHING` (or a default
    /// identity on a table without primary key) none.
    pub is_key: bool,
    /// How values of this column decode, resolved from `type_oid`.
    pub kind: TypeKind,
}

impl Column {
    /// A column, its [`TypeKind`] resolved from the type OID.
    ///
    /// Non-builtin OIDs (enums, domains, extension types) resolve to [`TypeKind::Other`] and
    /// are emitted as their text form: a domain over `int4` becomes a JSON string, because
    /// pgoutput does not say what a domain's base type is.
    pub fn new(name: impl Into<String>, type_oid: u32, type_modifier: i32, is_key: bool) -> Column {
        Column {
            name: name.into(),
            type_oid,
            type_modifier,
            is_key,
            kind: TypeKind::from_oid(type_oid),
        }
    }
}

/// A table as last described by pgoutput.
#[derive(Debug, Clone)]
pub struct Relation {
    /// Relation OID (the key changes refer to).
    pub oid: u32,
    /// Schema (namespace) name; `pg_catalog` where pgoutput sends an empty string.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// The table's replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in wire order (a publication column list may leave some out).
    pub columns: Vec<Column>,
}

impl Relation {
    /// A relation; build its columns with [`Column::new`] so their kinds are resolved.
    pub fn new(
        oid: u32,
        schema: impl Into<String>,
        table: impl Into<String>,
        replica_identity: ReplicaIdentity,
        columns: Vec<Column>,
    ) -> Relation {
        Relation {
            oid,
            schema: schema.into(),
            table: table.into(),
            replica_identity,
            columns,
        }
    }

    /// The replica-identity columns with their wire positions.
    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key)
    }

    /// `schema.table`, as used in routing keys, filters and messages.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Relations and non-builtin types announced on this replication stream.
///
/// Entries are replaced, never merged: after an ALTER TABLE, Postgres sends a full new
/// description. Relations are shared as `Arc` so events in flight keep the shape they were
/// decoded with while the cache moves on.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
    /// Type OID → (namespace, name), from `Type` messages.
    types: HashMap<u32, (String, String)>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> RelationCache {
        RelationCache::default()
    }

    /// A Relation message arrived (also mid-stream after ALTER TABLE): replace the entry,
    /// return the shared version.
    pub fn upsert(&mut self, rel: Relation) -> Arc<Relation> {
        let rel = Arc::new(rel);
        self.relations.insert(rel.oid, Arc::clone(&rel));
        rel
    }

    /// The relation a change refers to.
    pub fn get(&self, oid: u32) -> Result<Arc<Relation>, SchemaError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(SchemaError::UnknownRelation { oid })
    }

    /// A Type message for a non-builtin type (e.g. an enum or domain): remember its name so
    /// `Other` kinds can be named in errors and metadata.
    pub fn upsert_type(&mut self, oid: u32, namespace: String, name: String) {
        self.types.insert(oid, (namespace, name));
    }

    /// Name of a type: `namespace.name` for types announced by a Type message, the SQL name
    /// (`int4`, `_text`, ...) for common builtins, `None` otherwise.
    pub fn type_name(&self, oid: u32) -> Option<String> {
        if let Some((ns, name)) = self.types.get(&oid) {
            return Some(if ns.is_empty() {
                name.clone()
            } else {
                format!("{ns}.{name}")
            });
        }
        builtin_type_name(oid).map(str::to_owned)
    }

    /// Number of relations known.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether no relation is known yet.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// Forget everything: a new replication session re-sends every description it needs.
    pub fn clear(&mut self) {
        self.relations.clear();
        self.types.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_v1() -> Relation {
        Relation::new(
            16_400,
            "public",
            "sale_order",
            ReplicaIdentity::Default,
            vec![
                Column::new("id", 23, -1, true),
                Column::new("name", 1043, 68, false),
                Column::new("amount_total", 1700, -1, false),
            ],
        )
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let cache = RelationCache::new();
        assert_eq!(
            cache.get(7).unwrap_err(),
            SchemaError::UnknownRelation { oid: 7 }
        );
        assert!(cache.get(7).unwrap_err().to_string().contains("OID 7"));
    }

    #[test]
    fn upsert_resolves_kinds_and_keys() {
        let mut cache = RelationCache::new();
        let rel = cache.upsert(order_v1());
        assert_eq!(rel.qualified_name(), "public.sale_order");
        let kinds: Vec<_> = rel.columns.iter().map(|c| c.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![TypeKind::Int, TypeKind::Text, TypeKind::Numeric]
        );
        let keys: Vec<_> = rel
            .key_columns()
            .map(|(i, c)| (i, c.name.as_str()))
            .collect();
        assert_eq!(keys, vec![(0, "id")]);
        assert!(Arc::ptr_eq(&rel, &cache.get(16_400).unwrap()));
        assert_eq!(rel.column_index("amount_total"), Some(2));
    }

    #[test]
    fn alter_table_replaces_but_keeps_old_arcs_intact() {
        let mut cache = RelationCache::new();
        let v1 = cache.upsert(order_v1());
        let mut v2 = order_v1();
        v2.columns.push(Column::new("note", 25, -1, false));
        v2.replica_identity = ReplicaIdentity::Full;
        cache.upsert(v2);
        let now = cache.get(16_400).unwrap();
        assert_eq!(now.columns.len(), 4);
        assert_eq!(now.replica_identity, ReplicaIdentity::Full);
        assert_eq!(v1.columns.len(), 3, "an in-flight event keeps its shape");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn types_are_named() {
        let mut cache = RelationCache::new();
        assert_eq!(cache.type_name(23).as_deref(), Some("int4"));
        assert_eq!(cache.type_name(99_999), None);
        cache.upsert_type(99_999, "public".into(), "mood".into());
        assert_eq!(cache.type_name(99_999).as_deref(), Some("public.mood"));
        // An enum column is Other: emitted as its text form.
        assert_eq!(Column::new("m", 99_999, -1, false).kind, TypeKind::Other);
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.type_name(99_999), None);
    }

    #[test]
    fn replica_identity_bytes() {
        assert_eq!(
            ReplicaIdentity::from_byte(1, b'd'),
            Ok(ReplicaIdentity::Default)
        );
        assert_eq!(
            ReplicaIdentity::from_byte(1, b'n'),
            Ok(ReplicaIdentity::Nothing)
        );
        assert_eq!(
            ReplicaIdentity::from_byte(1, b'f'),
            Ok(ReplicaIdentity::Full)
        );
        assert_eq!(
            ReplicaIdentity::from_byte(1, b'i'),
            Ok(ReplicaIdentity::Index)
        );
        assert_eq!(
            ReplicaIdentity::from_byte(5, b'x'),
            Err(SchemaError::InvalidReplicaIdentity { oid: 5, byte: b'x' })
        );
    }
}
