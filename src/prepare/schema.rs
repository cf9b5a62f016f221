//! Step 2: blue's schema on green. The extensions are checked first (before
//! prepare writes anything anywhere), the database is created on green when
//! missing, then `pg_dump --schema-only --no-publications
//! --no-subscriptions` of blue is restored in one transaction, extensions
//! first (the dump's `CREATE EXTENSION` come before every object that needs
//! them), with the marker below in the same transaction.
//!
//! # How prepare tells its own schema from the operator's data
//!
//! The restore's transaction ends with `COMMENT ON DATABASE .. IS
//! 'pgswitch prepare: ...'` on green ([`MARKER`]; a schema-only dump without
//! `--create` never carries database comments, so it cannot come from
//! blue). A database with that comment holds a schema prepare restored; one
//! without it and with any relation, non-default schema or function that no
//! extension owns holds something else, and prepare refuses to touch it.

use serde::Serialize;
use tokio_postgres::Client;

use super::tools::{self, Target, Tools};
use super::PrepareError;
use crate::config::Side;
use crate::replication::{ident, literal, ReplicationError};

/// The start of green's database comment once prepare restored the schema.
pub const MARKER: &str = "pgswitch prepare: schema restored from blue";

fn sql(side: Side, step: &'static str) -> impl Fn(tokio_postgres::Error) -> PrepareError {
    move |e| PrepareError::query(side, ReplicationError::sql(step, e))
}

/// Blue's extensions that green cannot install (name and blue's version);
/// an error naming all of them, before anything is changed.
pub async fn check_extensions(blue: &Client, green: &Client) -> Result<Vec<String>, PrepareError> {
    let step = "extensions";
    let rows = blue
        .query(
            "SELECT extname::text, extversion FROM pg_catalog.pg_extension ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    let available: std::collections::HashSet<String> = green
        .query(
            "SELECT name::text FROM pg_catalog.pg_available_extensions",
            &[],
        )
        .await
        .map_err(sql(Side::Green, step))?
        .iter()
        .filter_map(|r| r.try_get(0).ok())
        .collect();
    let mut wanted = Vec::new();
    let mut missing = Vec::new();
    for row in &rows {
        let name: String = row.try_get(0).map_err(sql(Side::Blue, step))?;
        let version: String = row.try_get(1).map_err(sql(Side::Blue, step))?;
        if !available.contains(&name) {
            missing.push(format!("{name} {version}"));
        }
        wanted.push(name);
    }
    if missing.is_empty() {
        Ok(wanted)
    } else {
        Err(PrepareError::MissingExtensions(missing))
    }
}

/// What green's copy of the database holds.
#[derive(Debug, Clone, Serialize)]
pub struct GreenState {
    pub database_exists: bool,
    /// Prepare's [`MARKER`] is on the database.
    pub restored_by_prepare: bool,
    /// The forward subscription exists.
    pub subscription: bool,
    /// Up to 5 objects no extension owns (relations, schemas besides
    /// public, functions).
    pub user_objects: Vec<String>,
}

/// Reads [`GreenState`]; `green` is connected to the database when it
/// exists (`None` otherwise).
pub async fn green_state(
    green: Option<&Client>,
    subscription: &str,
) -> Result<GreenState, PrepareError> {
    let Some(green) = green else {
        return Ok(GreenState {
            database_exists: false,
            restored_by_prepare: false,
            subscription: false,
            user_objects: Vec::new(),
        });
    };
    let step = "green's database";
    let row = green
        .query_one(
            "SELECT coalesce(starts_with(shobj_description(d.oid, 'pg_database'), $1), false), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_subscription s \
                             WHERE s.subname = $2 AND s.subdbid = d.oid) \
               FROM pg_catalog.pg_database d WHERE d.datname = current_database()",
            &[&MARKER, &subscription],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let restored_by_prepare: bool = row.try_get(0).map_err(sql(Side::Green, step))?;
    let has_subscription: bool = row.try_get(1).map_err(sql(Side::Green, step))?;
    const NOT_EXTENSION: &str = "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
        WHERE d.classid = x.tableoid AND d.objid = x.oid AND d.deptype = 'e')";
    const SYSTEM: &str = "('pg_catalog', 'information_schema')";
    let objects = green
        .query(
            &format!(
                "SELECT * FROM ( \
                 SELECT 'relation ' || x.oid::regclass::text AS o FROM pg_catalog.pg_class x \
                   JOIN pg_catalog.pg_namespace n ON n.oid = x.relnamespace \
                  WHERE n.nspname NOT IN {SYSTEM} AND n.nspname !~ '^pg_(toast|temp)' \
                    AND x.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {NOT_EXTENSION} \
                 UNION ALL \
                 SELECT 'schema ' || quote_ident(x.nspname) FROM pg_catalog.pg_namespace x \
                  WHERE x.nspname NOT IN ('public', 'pg_catalog', 'information_schema') \
                    AND x.nspname !~ '^pg_' AND {NOT_EXTENSION} \
                 UNION ALL \
                 SELECT 'function ' || x.oid::regprocedure::text FROM pg_catalog.pg_proc x \
                   JOIN pg_catalog.pg_namespace n ON n.oid = x.pronamespace \
                  WHERE n.nspname NOT IN {SYSTEM} AND {NOT_EXTENSION}) o \
                 ORDER BY 1 LIMIT 5"
            ),
            &[],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let user_objects = objects
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql(Side::Green, step))?;
    Ok(GreenState {
        database_exists: true,
        restored_by_prepare,
        subscription: has_subscription,
        user_objects,
    })
}

/// Creates `database` on green (connected to its maintenance database)
/// with blue's owner and encoding; `false` when it exists.
pub async fn ensure_database(
    blue: &Client,
    green_maintenance: &Client,
    database: &str,
) -> Result<bool, PrepareError> {
    let step = "create the database on green";
    let exists = green_maintenance
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .map_err(sql(Side::Green, step))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let row = blue
        .query_one(
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text, \
                    pg_catalog.pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text \
               FROM pg_catalog.pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    let get = |i| row.try_get::<_, String>(i).map_err(sql(Side::Blue, step));
    let (owner, encoding, collate, ctype) = (get(0)?, get(1)?, get(2)?, get(3)?);
    let owner_on_green = green_maintenance
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&owner],
        )
        .await
        .map_err(sql(Side::Green, step))?
        .is_some();
    let owner = if owner_on_green {
        format!(" OWNER {}", ident(&owner))
    } else {
        String::new()
    };
    green_maintenance
        .batch_execute(&format!(
            "CREATE DATABASE {}{owner} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
            ident(database),
            literal(&encoding),
            literal(&collate),
            literal(&ctype)
        ))
        .await
        .map_err(sql(Side::Green, step))?;
    Ok(true)
}

/// Dumps blue's schema and restores it on green in one transaction, ending
/// with the [`MARKER`]. Returns the size of the dump.
pub async fn restore(
    tools: &Tools,
    blue_target: &Target,
    green_target: &Target,
    database: &str,
) -> Result<usize, PrepareError> {
    let mut dump = tools::run(
        &tools.pg_dump,
        &[
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "--quote-all-identifiers",
        ],
        blue_target,
        None,
    )
    .await?;
    let size = dump.len();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    dump.extend_from_slice(
        format!(
            "\nCOMMENT ON DATABASE {} IS {};\n",
            ident(database),
            literal(&format!("{MARKER} at unix time {now}"))
        )
        .as_bytes(),
    );
    tools::psql_script(tools, green_target, &dump).await?;
    Ok(size)
}
