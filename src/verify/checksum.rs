//! The SQL of `verify`: the session settings that pin text output, the
//! tables and their keys, and the row hash, chunk checksum and per-row
//! listings, computed in the database.
//!
//! # The row hash, and why it is the same on 15 and 17
//!
//! A row's hash is the XOR of one 64-bit hash per column, each seeded by the
//! column's position (so swapping two values between columns changes it); a
//! NULL contributes `-position`. A chunk's checksum is `count(*)` and the
//! `sum` of its row hashes (a numeric: no overflow, order-independent).
//!
//! Columns of the common, cheap types go through the type's own extended
//! hash function (`hashint4extended`, `hashtextextended`, ...): the
//! functions hash partitioning uses, which PostgreSQL keeps stable across
//! major versions because `pg_upgrade` carries hash-partitioned tables over.
//! Text is hashed under `COLLATE "C"` (the bytes, whatever the database's
//! collation). Every other type, and a column whose type differs between
//! the sides, is hashed as its text output (`hashtextextended(c::text)`):
//! exact (numeric's scale, float's -0, interval's units, a jsonb's text all
//! count) and version-independent once the settings that change text
//! output are pinned ([`SESSION`]). Types whose hash is not a function of
//! the value alone (enums hash their OID) take the text path too; so do
//! timestamptz and date, whose hash functions cannot be called from SQL on
//! them. Measured on pgbench_accounts: ~4.5 M rows/s per core, against
//! ~1.1 M for hashing the row's text (`record_out` dominates).
//!
//! Both sides' text must be in the same server encoding, and the hashes
//! assume the same byte order (same architecture).

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::config::Side;
use crate::replication::ReplicationError;

use super::VerifyError;

/// Settings that change text output or plans, pinned on every connection.
/// Parallel workers are off (verify runs its own jobs), JIT too (it costs
/// more than a chunk's aggregate), and a lock wait is bounded so that a
/// chunk never queues behind an ACCESS EXCLUSIVE lock (and others behind it).
pub const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
    SET TimeZone = 'UTC'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
    SET search_path = pg_catalog, pg_temp; SET lc_monetary = 'C'; SET xmloption = 'content'; \
    SET max_parallel_workers_per_gather = 0; SET jit = off; SET lock_timeout = '10s'; \
    SET statement_timeout = 0";

/// SQL identifier quoting.
pub fn quote_ident(s: &str) -> String {
    crate::replication::ident(s)
}

/// `"schema"."name"`
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A column: its name, type OID and type as `format_type` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_name: String,
}

/// A table as one side sees it.
#[derive(Debug, Clone)]
pub struct Shape {
    pub columns: Vec<Column>,
    /// The primary key's (or the replica identity index's) columns, in
    /// index order; `None` when the table has neither.
    pub key: Option<Vec<String>>,
    /// `pg_class.reltuples` (-1 when never vacuumed or analyzed).
    pub estimate: f64,
}

pub(super) fn sql_err(
    side: Side,
    step: &str,
) -> impl Fn(tokio_postgres::Error) -> VerifyError + '_ {
    move |e| VerifyError::Query {
        side,
        source: ReplicationError::sql(step, e),
    }
}

pub(super) async fn query(
    c: &Client,
    side: Side,
    step: &str,
    sql: &str,
    params: &[String],
) -> Result<Vec<Row>, VerifyError> {
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    c.query(sql, &params).await.map_err(sql_err(side, step))
}

pub(super) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
    side: Side,
    step: &str,
) -> Result<T, VerifyError> {
    row.try_get(i).map_err(sql_err(side, step))
}

/// The user tables (permanent, ordinary or partitions; not partitioned
/// parents, whose rows are their partitions'), as (schema, name).
pub async fn tables(c: &Client, side: Side) -> Result<Vec<(String, String)>, VerifyError> {
    let step = "list the tables";
    let rows = query(
        c,
        side,
        step,
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
            AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
            AND n.nspname NOT LIKE 'pg\\_%' \
          ORDER BY 1, 2",
        &[],
    )
    .await?;
    rows.iter()
        .map(|r| Ok((get(r, 0, side, step)?, get(r, 1, side, step)?)))
        .collect()
}

/// Columns, key and size estimate of `schema.name` on one side.
pub async fn shape(c: &Client, side: Side, schema: &str, name: &str) -> Result<Shape, VerifyError> {
    let table = qualified(schema, name);
    let step = "describe the table";
    let rows = query(
        c,
        side,
        step,
        "SELECT a.attname::text, a.atttypid::int8, \
                pg_catalog.format_type(a.atttypid, a.atttypmod) \
           FROM pg_catalog.pg_attribute a \
          WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
          ORDER BY a.attnum",
        std::slice::from_ref(&table),
    )
    .await?;
    let mut columns = Vec::new();
    for r in &rows {
        let oid: i64 = get(r, 1, side, step)?;
        columns.push(Column {
            name: get(r, 0, side, step)?,
            type_oid: u32::try_from(oid).unwrap_or(0),
            type_name: get(r, 2, side, step)?,
        });
    }
    // The primary key, else the index REPLICA IDENTITY USING INDEX names
    // (unique, not partial, NOT NULL columns: what logical replication keys on).
    let rows = query(
        c,
        side,
        step,
        "SELECT a.attname::text FROM pg_catalog.pg_index i \
           CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
          WHERE i.indrelid = $1::text::regclass \
            AND i.indexrelid = (SELECT j.indexrelid FROM pg_catalog.pg_index j \
                                 WHERE j.indrelid = i.indrelid AND (j.indisprimary OR j.indisreplident) \
                                 ORDER BY j.indisprimary DESC LIMIT 1) \
          ORDER BY k.ord",
        std::slice::from_ref(&table),
    )
    .await?;
    let key: Vec<String> = rows
        .iter()
        .map(|r| get(r, 0, side, step))
        .collect::<Result<_, _>>()?;
    let rows = query(
        c,
        side,
        step,
        "SELECT reltuples::float8 FROM pg_catalog.pg_class WHERE oid = $1::text::regclass",
        std::slice::from_ref(&table),
    )
    .await?;
    let estimate = match rows.first() {
        Some(r) => get(r, 0, side, step)?,
        None => -1.0,
    };
    Ok(Shape {
        columns,
        key: (!key.is_empty()).then_some(key),
        estimate,
    })
}

/// The SQL expression of one column's hash (`t` is the table's alias).
fn column_hash(column: &Column, same_type_on_both: bool, seed: usize) -> String {
    let c = format!("t.{}", quote_ident(&column.name));
    let native = |f: &str, arg: String| format!("pg_catalog.{f}({arg}, {seed})");
    let h = match (same_type_on_both, column.type_oid) {
        (true, 21) => native("hashint2extended", c),
        (true, 23) => native("hashint4extended", c),
        (true, 20) => native("hashint8extended", c),
        (true, 26) => native("hashoidextended", c),
        (true, 19) => native("hashnameextended", c),
        (true, 25) | (true, 1043) => {
            native("hashtextextended", format!("({c}::text COLLATE \"C\")"))
        }
        (true, 1042) => native("hashbpcharextended", format!("({c} COLLATE \"C\")")),
        (true, 2950) => native("uuid_hash_extended", c),
        (true, 1114) => native("timestamp_hash_extended", c),
        (true, 1083) => native("time_hash_extended", c),
        _ => native("hashtextextended", format!("({c}::text COLLATE \"C\")")),
    };
    format!("coalesce({h}, -{seed})")
}

/// The row hash over blue's columns in blue's order (a bigint expression).
/// Columns are matched by name on green; `None` names the columns green
/// lacks (or has in excess), which makes the contents incomparable.
pub fn row_hash(blue: &[Column], green: &[Column]) -> Result<String, Vec<String>> {
    let mut mismatched: Vec<String> = blue
        .iter()
        .filter(|b| !green.iter().any(|g| g.name == b.name))
        .map(|b| format!("{} (missing on green)", b.name))
        .collect();
    mismatched.extend(
        green
            .iter()
            .filter(|g| !blue.iter().any(|b| b.name == g.name))
            .map(|g| format!("{} (only on green)", g.name)),
    );
    if !mismatched.is_empty() || blue.is_empty() {
        return Err(mismatched);
    }
    let parts: Vec<String> = blue
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let same = green
                .iter()
                .any(|g| g.name == b.name && g.type_oid == b.type_oid);
            column_hash(b, same, i + 1)
        })
        .collect();
    Ok(format!("({})", parts.join(" # ")))
}

/// The key's columns and their types (blue's), for range predicates.
#[derive(Debug, Clone)]
pub struct Key {
    pub columns: Vec<(String, String)>,
}

impl Key {
    pub fn new(names: &[String], columns: &[Column]) -> Key {
        Key {
            columns: names
                .iter()
                .map(|n| {
                    let ty = columns
                        .iter()
                        .find(|c| &c.name == n)
                        .map(|c| c.type_name.clone())
                        .unwrap_or_else(|| "text".into());
                    (n.clone(), ty)
                })
                .collect(),
        }
    }

    /// `t.k1, t.k2`
    pub fn list(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| format!("t.{}", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `t.k1::text, t.k2::text`
    pub fn texts(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| format!("t.{}::text", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key column names, for reports.
    pub fn names(&self) -> Vec<String> {
        self.columns.iter().map(|(n, _)| n.clone()).collect()
    }

    /// `ROW(t.k1, t.k2) op ROW($i::text::type1, ...)`: a keyset bound, with
    /// the values as text parameters (text output round-trips through input
    /// for every key type under the pinned settings).
    fn bound(&self, op: &str, first_param: usize) -> String {
        let values: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::text::{ty}", first_param + i))
            .collect();
        if self.columns.len() == 1 {
            format!("{} {op} {}", self.list(), values.join(""))
        } else {
            format!("ROW({}) {op} ROW({})", self.list(), values.join(", "))
        }
    }
}

/// A range of keys, `[lo, hi)`; `None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Range {
    pub from: Option<Vec<String>>,
    pub to: Option<Vec<String>>,
}

impl Range {
    pub const ALL: Range = Range {
        from: None,
        to: None,
    };

    /// `WHERE ...` (or nothing) and its parameters.
    pub fn predicate(&self, key: Option<&Key>) -> (String, Vec<String>) {
        let Some(key) = key else {
            return (String::new(), Vec::new());
        };
        let mut conds = Vec::new();
        let mut params = Vec::new();
        if let Some(from) = &self.from {
            conds.push(key.bound(">=", params.len() + 1));
            params.extend(from.iter().cloned());
        }
        if let Some(to) = &self.to {
            conds.push(key.bound("<", params.len() + 1));
            params.extend(to.iter().cloned());
        }
        if conds.is_empty() {
            (String::new(), params)
        } else {
            (format!(" WHERE {}", conds.join(" AND ")), params)
        }
    }
}

/// Everything the per-chunk SQL needs about one table.
#[derive(Debug, Clone)]
pub struct TableSql {
    /// `"schema"."name"`
    pub qualified: String,
    pub row_hash: String,
    pub key: Option<Key>,
}

impl TableSql {
    /// count and checksum of the rows in `range`: (SQL, parameters).
    pub fn checksum(&self, range: &Range) -> (String, Vec<String>) {
        let (pred, params) = range.predicate(self.key.as_ref());
        (
            format!(
                "SELECT count(*)::int8, coalesce(sum({}), 0)::text FROM {} t{pred}",
                self.row_hash, self.qualified
            ),
            params,
        )
    }

    /// Each row's key (as text) and hash in `range`, in key order.
    pub fn rows(&self, range: &Range) -> Option<(String, Vec<String>)> {
        let key = self.key.as_ref()?;
        let (pred, params) = range.predicate(Some(key));
        Some((
            format!(
                "SELECT {}, {} FROM {} t{pred} ORDER BY {}",
                key.texts(),
                self.row_hash,
                self.qualified,
                key.list()
            ),
            params,
        ))
    }

    /// The key of the row at `offset` (0-based) in `range`, in key order.
    pub fn key_at(&self, range: &Range, offset: i64) -> Option<(String, Vec<String>)> {
        let key = self.key.as_ref()?;
        let (pred, params) = range.predicate(Some(key));
        Some((
            format!(
                "SELECT {} FROM {} t{pred} ORDER BY {} OFFSET {offset} LIMIT 1",
                key.texts(),
                self.qualified,
                key.list()
            ),
            params,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, oid: u32, ty: &str) -> Column {
        Column {
            name: name.into(),
            type_oid: oid,
            type_name: ty.into(),
        }
    }

    #[test]
    fn row_hash_uses_native_hashes_only_for_same_types() {
        let blue = [col("id", 23, "integer"), col("n", 1700, "numeric")];
        let green = [col("id", 20, "bigint"), col("n", 1700, "numeric")];
        let h = row_hash(&blue, &green).unwrap();
        assert!(h.contains("hashtextextended((t.\"id\"::text"), "{h}");
        assert!(h.contains("hashtextextended((t.\"n\"::text"), "{h}");
        let h = row_hash(&blue, &blue).unwrap();
        assert!(h.contains("hashint4extended(t.\"id\", 1)"), "{h}");
        let err = row_hash(&blue, &blue[..1]).unwrap_err();
        assert_eq!(err, vec!["n (missing on green)".to_string()]);
    }

    #[test]
    fn predicates_are_keyset_bounds() {
        let key = Key {
            columns: vec![("a".into(), "integer".into()), ("b".into(), "text".into())],
        };
        let r = Range {
            from: Some(vec!["1".into(), "x".into()]),
            to: None,
        };
        let (p, params) = r.predicate(Some(&key));
        assert_eq!(
            p,
            " WHERE ROW(t.\"a\", t.\"b\") >= ROW($1::text::integer, $2::text::text)"
        );
        assert_eq!(params, vec!["1", "x"]);
        assert_eq!(Range::ALL.predicate(Some(&key)).0, "");
    }
}
