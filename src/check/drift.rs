//! Schema drift between the two sides, and sequences behind.
//!
//! Logical replication carries rows, not DDL: a column added on the side
//! that takes the traffic and not on the target makes the apply fail (or
//! drops the column's values); a function, extension or sequence missing
//! on the target breaks the application after the switch. Each object is
//! compared by a canonical text (the catalog's own deparsers), so a
//! difference names the object.

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::Client;

use super::{on, texts, CheckError, Findings, Level, Target};

/// User schemas only (not the catalogs, not temporary or toast schemas).
const USER_SCHEMA: &str = "nspname NOT IN ('pg_catalog', 'information_schema') \
                           AND nspname NOT LIKE 'pg\\_%'";

/// One kind of object: its check name, the level of a difference, how the
/// report names it, the query (one text per object, `table|definition`
/// where the object belongs to a table) and the fix.
struct Kind {
    check: &'static str,
    level: Level,
    what: &'static str,
    sql: String,
    fix: &'static str,
}

fn kinds() -> Vec<Kind> {
    vec![
        Kind {
            check: "schema",
            level: Level::Fail,
            what: "columns missing or of another type",
            sql: "SELECT quote_ident(c.table_schema) || '.' || quote_ident(c.table_name) \
                         || '|' || quote_ident(c.column_name) || ' ' || c.data_type \
                    FROM information_schema.columns c \
                    JOIN information_schema.tables t USING (table_schema, table_name) \
                   WHERE t.table_type = 'BASE TABLE' \
                     AND c.table_schema NOT IN ('pg_catalog', 'information_schema')"
                .into(),
            fix: "apply the same DDL on the target (pg_dump --schema-only of the objects), \
                  then ALTER SUBSCRIPTION .. REFRESH PUBLICATION for new tables",
        },
        Kind {
            check: "schema_indexes",
            level: Level::Warn,
            what: "indexes missing or different (queries slower after the switch)",
            sql: "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) || '|' || indexdef \
                    FROM pg_catalog.pg_indexes \
                   WHERE schemaname NOT IN ('pg_catalog', 'information_schema') \
                     AND schemaname NOT LIKE 'pg\\_%'"
                .into(),
            fix: "create them on the target (the definition is in the detail)",
        },
        Kind {
            check: "schema_constraints",
            level: Level::Warn,
            what: "constraints missing or different",
            sql: format!(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(r.relname) || '|' \
                        || quote_ident(c.conname) || ' ' || pg_catalog.pg_get_constraintdef(c.oid) \
                   FROM pg_catalog.pg_constraint c \
                   JOIN pg_catalog.pg_class r ON r.oid = c.conrelid \
                   JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace \
                  WHERE c.contype IN ('p', 'u', 'f', 'c', 'x') AND {USER_SCHEMA}"
            ),
            fix: "add them on the target (ALTER TABLE .. ADD CONSTRAINT ..)",
        },
        Kind {
            check: "schema_sequences",
            level: Level::Fail,
            what: "sequences missing (the switch copies their values)",
            sql: "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) \
                    FROM pg_catalog.pg_sequences"
                .into(),
            fix: "create them on the target",
        },
        Kind {
            check: "schema_extensions",
            level: Level::Fail,
            what: "extensions missing",
            sql: "SELECT quote_ident(extname) FROM pg_catalog.pg_extension".into(),
            fix: "CREATE EXTENSION on the target (install its package first)",
        },
        Kind {
            check: "schema_functions",
            level: Level::Fail,
            what: "functions and procedures missing (calls fail after the switch)",
            sql: format!(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '(' \
                        || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')' \
                   FROM pg_catalog.pg_proc p \
                   JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                  WHERE {USER_SCHEMA} AND NOT EXISTS ( \
                        SELECT 1 FROM pg_catalog.pg_depend d \
                         WHERE d.classid = 'pg_catalog.pg_proc'::regclass \
                           AND d.objid = p.oid AND d.deptype = 'e')"
            ),
            fix: "create them on the target (pg_dump --schema-only has them)",
        },
    ]
}

/// Each object of the side taking the traffic exists on the target, the
/// same. Objects of a table the target lacks altogether are reported once,
/// by the columns check.
pub(super) async fn schema(
    r: &mut Findings,
    t: &Target,
    from: &Client,
    to: &Client,
) -> Result<(), CheckError> {
    // The first kind, columns, also tells which tables the target has.
    let mut tables_on_to: Option<BTreeSet<String>> = None;
    for kind in kinds() {
        let (on_from, on_to) = tokio::join!(
            texts(from, &kind.sql, kind.check),
            texts(to, &kind.sql, kind.check)
        );
        let on_from = on_from.map_err(on(t.from))?;
        let on_to: BTreeSet<String> = on_to.map_err(on(t.to))?.into_iter().collect();
        let tables = tables_on_to.get_or_insert_with(|| {
            on_to
                .iter()
                .filter_map(|o| table_of(o))
                .map(str::to_owned)
                .collect()
        });
        let separator = if kind.check == "schema" { "." } else { ": " };
        let mut missing: Vec<String> = on_from
            .iter()
            .filter(|o| !on_to.contains(*o))
            .filter(|o| kind.check == "schema" || table_of(o).is_none_or(|t| tables.contains(t)))
            .map(|o| o.replacen('|', separator, 1))
            .collect();
        missing.sort();
        r.objects(kind.check, t.to, kind.level, kind.what, missing, kind.fix);
    }
    Ok(())
}

/// The table an object text belongs to (`table|...`), if any.
fn table_of(object: &str) -> Option<&str> {
    object.split_once('|').map(|(table, _)| table)
}

/// Sequences on the target behind the other side's (a switch copies them;
/// shown so that nothing is a surprise).
pub(super) async fn sequences(
    r: &mut Findings,
    t: &Target,
    from: &Client,
    to: &Client,
) -> Result<(), CheckError> {
    const VALUES: &str = "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) \
                                 || '=' || coalesce(last_value, 0) FROM pg_catalog.pg_sequences ORDER BY 1";
    let (f, g) = tokio::join!(
        texts(from, VALUES, "sequences"),
        texts(to, VALUES, "sequences")
    );
    let parse = |v: Vec<String>| -> HashMap<String, i64> {
        v.into_iter()
            .filter_map(|s| {
                let (name, value) = s.rsplit_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    };
    let f = parse(f.map_err(on(t.from))?);
    let g = parse(g.map_err(on(t.to))?);
    let mut behind: Vec<String> = f
        .iter()
        .filter(|(name, value)| g.get(*name).is_some_and(|v| v < value))
        .map(|(name, value)| format!("{name} ({} < {value})", g.get(name).copied().unwrap_or(0)))
        .collect();
    behind.sort();
    if behind.is_empty() {
        r.add(
            "sequences",
            Some(t.to),
            Level::Pass,
            format!("no sequence behind {}'s", t.from),
        );
    } else {
        r.add(
            "sequences",
            Some(t.to),
            Level::Warn,
            format!(
                "sequences behind {}'s (the switch copies them): {}",
                t.from,
                behind.join(", ")
            ),
        );
    }
    Ok(())
}
