//! Step 2: blue's schema on green. The extensions are checked first (before
//! prepare writes anything anywhere), the database is created on green when
//! missing, then `pg_dump --schema-only --no-publications
//! --no-subscriptions` of blue is restored in two parts, each in one
//! transaction with the marker below: `--section=pre-data` (extensions,
//! types, tables, functions, sequences) before the data, `--section=post-data`
//! (indexes, constraints, triggers) after it, so that the copy writes into
//! tables without indexes to maintain, as pg_restore does.
//!
//! # How prepare tells its own schema from the operator's data
//!
//! Each transaction ends with `COMMENT ON DATABASE .. IS 'pgswitch prepare:
//! ...'` on green ([`MARKER`]; a schema-only dump without `--create` never
//! carries database comments, so it cannot come from blue). A database with
//! that comment holds a schema prepare restored; one without it and with
//! any relation, non-default schema or function that no extension owns
//! holds something else, and prepare refuses to touch it. The comment also
//! says how far prepare got ([`Marker`]): what green's tables hold then is
//! known without looking at them.

use serde::Serialize;
use tokio_postgres::Client;

use super::tools::{self, Target, Tools};
use super::PrepareError;
use crate::config::Side;
use crate::replication::{ident, literal, ReplicationError};

/// The start of green's database comment once prepare restored the schema.
pub const MARKER: &str = "pgswitch prepare: schema restored from blue";

/// How far prepare got, in the order it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The pre-data schema; the tables are empty.
    PreData,
    /// The data copy started (tables may hold part of it).
    Copying,
    /// Every table holds blue's rows as of the slot's consistent point.
    DataCopied,
    /// Post-data restored over the copied data.
    PostData,
    /// The subscription was created: replication (and, after a cutover,
    /// applications) wrote on green since; its rows are no longer only
    /// prepare's copy.
    Subscribed,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::PreData => "pre-data",
            Stage::Copying => "copying",
            Stage::DataCopied => "data copied",
            Stage::PostData => "post-data",
            Stage::Subscribed => "subscribed",
        }
    }

    fn parse(s: &str) -> Option<Stage> {
        [
            Stage::PreData,
            Stage::Copying,
            Stage::DataCopied,
            Stage::PostData,
            Stage::Subscribed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// What the marker records: `<MARKER>; stage=..; post_data=..;
/// slot_lsn=..; since_ms=..`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Marker {
    pub stage: Stage,
    /// Whether post-data (indexes, constraints, triggers) is on green.
    pub post_data: bool,
    /// The consistent point of the slot the data was copied for (the
    /// exported snapshot's); set from [`Stage::Copying`] on.
    pub slot_lsn: Option<String>,
    /// When the data copy started (unix ms), for the rate.
    pub since_ms: Option<u64>,
}

impl Marker {
    pub fn new(stage: Stage, post_data: bool) -> Marker {
        Marker {
            stage,
            post_data,
            slot_lsn: None,
            since_ms: None,
        }
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "{MARKER}; stage={}; post_data={}",
            self.stage.as_str(),
            self.post_data
        );
        if let Some(lsn) = &self.slot_lsn {
            s.push_str(&format!("; slot_lsn={lsn}"));
        }
        if let Some(ms) = self.since_ms {
            s.push_str(&format!("; since_ms={ms}"));
        }
        s
    }

    /// Reads a comment; `None` when it is not prepare's. A marker of an
    /// earlier pgswitch (one transaction, no stage) counts as
    /// [`Stage::Subscribed`]: its tables' rows may not be prepare's alone.
    pub fn parse(comment: &str) -> Option<Marker> {
        let rest = comment.strip_prefix(MARKER)?;
        let mut m = Marker::new(Stage::Subscribed, true);
        let mut stage = None;
        for part in rest.split(';').map(str::trim) {
            match part.split_once('=') {
                Some(("stage", v)) => stage = Stage::parse(v),
                Some(("post_data", v)) => m.post_data = v == "true",
                Some(("slot_lsn", v)) => m.slot_lsn = Some(v.to_owned()),
                Some(("since_ms", v)) => m.since_ms = v.parse().ok(),
                _ => {}
            }
        }
        match stage {
            Some(stage) => m.stage = stage,
            None => m.post_data = true,
        }
        Some(m)
    }

    /// The statement writing it on `database`.
    pub fn statement(&self, database: &str) -> String {
        format!(
            "COMMENT ON DATABASE {} IS {};\n",
            ident(database),
            literal(&self.text())
        )
    }
}

/// Writes `marker` on green's database (connected to it).
pub async fn set_marker(
    green: &Client,
    database: &str,
    marker: &Marker,
) -> Result<(), PrepareError> {
    green
        .batch_execute(&marker.statement(database))
        .await
        .map_err(sql(Side::Green, "mark green's database"))
}

/// The marker on the database `green` is connected to, if prepare's.
pub async fn read_marker(green: &Client) -> Result<Option<Marker>, PrepareError> {
    let step = "green's marker";
    let row = green
        .query_one(
            "SELECT shobj_description(d.oid, 'pg_database') FROM pg_catalog.pg_database d \
              WHERE d.datname = current_database()",
            &[],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let comment: Option<String> = row.try_get(0).map_err(sql(Side::Green, step))?;
    Ok(comment.as_deref().and_then(Marker::parse))
}

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
    /// What it says.
    pub marker: Option<Marker>,
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
            marker: None,
            subscription: false,
            user_objects: Vec::new(),
        });
    };
    let step = "green's database";
    let row = green
        .query_one(
            "SELECT shobj_description(d.oid, 'pg_database'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_subscription s \
                             WHERE s.subname = $1 AND s.subdbid = d.oid) \
               FROM pg_catalog.pg_database d WHERE d.datname = current_database()",
            &[&subscription],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let comment: Option<String> = row.try_get(0).map_err(sql(Side::Green, step))?;
    let marker = comment.as_deref().and_then(Marker::parse);
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
        restored_by_prepare: marker.is_some(),
        marker,
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

/// The part of the schema a restore carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    PreData,
    PostData,
}

/// Dumps one section of blue's schema and restores it on green in one
/// transaction ending with `marker`. Returns the size of the dump.
pub async fn restore(
    tools: &Tools,
    blue_target: &Target,
    green_target: &Target,
    database: &str,
    section: Section,
    marker: &Marker,
) -> Result<usize, PrepareError> {
    let mut dump = tools::run(
        &tools.pg_dump,
        &[
            "--schema-only",
            match section {
                Section::PreData => "--section=pre-data",
                Section::PostData => "--section=post-data",
            },
            "--no-publications",
            "--no-subscriptions",
            "--quote-all-identifiers",
        ],
        blue_target,
        None,
    )
    .await?;
    let size = dump.len();
    dump.push(b'\n');
    dump.extend_from_slice(marker.statement(database).as_bytes());
    tools::psql_script(tools, green_target, &dump).await?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::{Marker, Stage, MARKER};

    #[test]
    fn the_marker_reads_back() {
        let mut m = Marker::new(Stage::Copying, false);
        m.slot_lsn = Some("0/1A2B3C4".into());
        m.since_ms = Some(1234);
        assert_eq!(Marker::parse(&m.text()), Some(m.clone()));
        m.stage = Stage::PostData;
        m.post_data = true;
        assert_eq!(Marker::parse(&m.text()), Some(m));
        let old = Marker::parse(&format!("{MARKER} at unix time 5")).unwrap();
        assert_eq!((old.stage, old.post_data), (Stage::Subscribed, true));
        assert_eq!(Marker::parse("someone's comment"), None);
    }
}
