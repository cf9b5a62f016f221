//! Step 3: the publication on blue and the subscription on green, and what
//! a failed earlier run may have left on blue (its slots).
//!
//! # Options of the subscription
//!
//! * `binary = true` when both sides are 14+ and every column type of the
//!   published tables has binary send and receive functions: the apply
//!   stream then skips text conversions. The initial COPY is binary only
//!   when the publisher is 16+ too (a 16+ subscriber asks for `COPY ..
//!   (FORMAT binary)` only then): from blue 15 it stays text whatever
//!   `binary` says; the report says which.
//!   Since prepare copies the data itself ([`super::copy`]), `binary` is
//!   about the apply stream only.
//! * `copy_data = false`, `create_slot = false`: the slot is `[replication]
//!   slot` (default: the subscription's name), created by prepare with the
//!   snapshot the data was copied at ([`super::snapshot`]).

use serde::Serialize;
use tokio_postgres::Client;

use super::{PrepareError, Side};
use crate::replication::{ident, literal, ReplicationError};

fn sql(side: Side, step: &'static str) -> impl Fn(tokio_postgres::Error) -> PrepareError {
    move |e| PrepareError::query(side, ReplicationError::sql(step, e))
}

async fn texts(
    c: &Client,
    side: Side,
    step: &'static str,
    q: &str,
) -> Result<Vec<String>, PrepareError> {
    c.query(q, &[])
        .await
        .map_err(sql(side, step))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql(side, step))
}

/// Blue's permanent tables that UPDATE and DELETE would fail on once
/// published: no primary key and no other replica identity.
pub async fn without_replica_identity(blue: &Client) -> Result<Vec<String>, PrepareError> {
    texts(
        blue,
        Side::Blue,
        "tables without a replica identity",
        "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_' \
            AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition \
            AND (c.relreplident = 'n' \
                 OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                                          WHERE i.indrelid = c.oid AND i.indisprimary)) \
                 OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                                          WHERE i.indrelid = c.oid AND i.indisreplident))) \
          ORDER BY 1",
    )
    .await
}

/// `ALTER TABLE .. REPLICA IDENTITY FULL` on blue for `tables` (already
/// quoted, from `regclass`).
pub async fn set_replica_identity_full(
    blue: &Client,
    tables: &[String],
) -> Result<(), PrepareError> {
    for t in tables {
        blue.batch_execute(&format!("ALTER TABLE {t} REPLICA IDENTITY FULL"))
            .await
            .map_err(sql(Side::Blue, "set REPLICA IDENTITY FULL"))?;
    }
    Ok(())
}

/// Creates the publication `FOR ALL TABLES` on blue; `false` when it exists.
pub async fn ensure_publication(blue: &Client, name: &str) -> Result<bool, PrepareError> {
    let step = "create the publication on blue";
    let exists = blue
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(sql(Side::Blue, step))?
        .is_some();
    if !exists {
        blue.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR ALL TABLES",
            ident(name)
        ))
        .await
        .map_err(sql(Side::Blue, step))?;
    }
    Ok(!exists)
}

/// The forward subscription on green: enabled or not, `None` when missing.
pub async fn subscription_enabled(
    green: &Client,
    name: &str,
) -> Result<Option<bool>, PrepareError> {
    let row = green
        .query_opt(
            "SELECT subenabled FROM pg_catalog.pg_subscription \
              WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_catalog.pg_database \
                                                 WHERE datname = current_database())",
            &[&name],
        )
        .await
        .map_err(sql(Side::Green, "read the subscription"))?;
    row.map(|r| r.try_get(0))
        .transpose()
        .map_err(sql(Side::Green, "read the subscription"))
}

/// Green's permanent tables that hold rows (a copy into them would
/// duplicate those rows).
pub async fn green_tables_with_rows(green: &Client) -> Result<Vec<String>, PrepareError> {
    let step = "tables on green";
    let tables = texts(
        green,
        Side::Green,
        step,
        "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_' \
            AND c.relkind = 'r' AND c.relpersistence = 'p' ORDER BY 1",
    )
    .await?;
    let mut with_rows = Vec::new();
    for t in tables {
        let row = green
            .query_one(&format!("SELECT EXISTS (SELECT FROM ONLY {t})"), &[])
            .await
            .map_err(sql(Side::Green, step))?;
        if row.try_get::<_, bool>(0).map_err(sql(Side::Green, step))? {
            with_rows.push(t);
        }
    }
    Ok(with_rows)
}

/// Drops what a killed earlier run left on blue while green has no
/// subscription: the slot `slot` and tablesync slots of green's
/// subscriptions that no longer exist (`pg_<suboid>_sync_<relid>_<green's
/// system identifier>`). Refuses when one is in use. Returns the dropped.
pub async fn drop_orphaned_slots(
    blue: &Client,
    green: &Client,
    slot: &str,
) -> Result<Vec<String>, PrepareError> {
    let step = "orphaned slots";
    let row = green
        .query_one(
            "SELECT system_identifier::text, \
                    coalesce(array_agg(s.oid::int8) FILTER (WHERE s.oid IS NOT NULL), '{}') \
               FROM pg_catalog.pg_control_system() \
               LEFT JOIN pg_catalog.pg_subscription s ON true GROUP BY 1",
            &[],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let sysid: String = row.try_get(0).map_err(sql(Side::Green, step))?;
    let live: Vec<i64> = row.try_get(1).map_err(sql(Side::Green, step))?;
    let rows = blue
        .query(
            "SELECT slot_name::text, active FROM pg_catalog.pg_replication_slots \
              WHERE slot_name = $1 \
                 OR (slot_name ~ ('^pg_[0-9]+_sync_[0-9]+_' || $2 || '$') \
                     AND substring(slot_name from '^pg_([0-9]+)_')::int8 <> ALL($3))",
            &[&slot, &sysid, &live],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    let mut dropped = Vec::new();
    for r in &rows {
        let name: String = r.try_get(0).map_err(sql(Side::Blue, step))?;
        let active: bool = r.try_get(1).map_err(sql(Side::Blue, step))?;
        if active {
            return Err(PrepareError::SlotInUse(name));
        }
        blue.execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&name])
            .await
            .map_err(sql(Side::Blue, "drop an orphaned slot"))?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// How the subscription is set up, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct CopySettings {
    pub binary: bool,
    pub binary_reason: String,
    /// Tables the publication holds.
    pub tables: i64,
}

/// Decides `binary` (of the apply stream).
pub async fn copy_settings(
    blue: &Client,
    blue_version: i32,
    green_version: i32,
    publication: &str,
) -> Result<CopySettings, PrepareError> {
    let step = "copy settings";
    let row = blue
        .query_one(
            "SELECT count(DISTINCT (pt.schemaname, pt.tablename)), \
                    coalesce(string_agg(DISTINCT format_type(t.oid, NULL), ', ') \
                      FILTER (WHERE t.typsend = 0 OR t.typreceive = 0), '') \
               FROM pg_catalog.pg_publication_tables pt \
               LEFT JOIN pg_catalog.pg_attribute a \
                      ON a.attrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass \
                     AND a.attnum > 0 AND NOT a.attisdropped \
               LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
              WHERE pt.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    let tables: i64 = row.try_get(0).map_err(sql(Side::Blue, step))?;
    let text_only: String = row.try_get(1).map_err(sql(Side::Blue, step))?;
    let (binary, reason) = if blue_version < 140000 || green_version < 140000 {
        (
            false,
            "binary needs PostgreSQL 14+ on both sides".to_owned(),
        )
    } else if !text_only.is_empty() {
        (
            false,
            format!("column types without binary I/O: {text_only}"),
        )
    } else {
        (
            true,
            "binary apply stream (the initial copy is pg_dump's, not the subscription's)"
                .to_owned(),
        )
    };
    Ok(CopySettings {
        binary,
        binary_reason: reason,
        tables,
    })
}

/// What [`create_subscription`] creates.
pub struct NewSubscription<'a> {
    pub name: &'a str,
    pub conninfo: &'a str,
    pub publication: &'a str,
    /// The slot prepare created on blue for the copy.
    pub slot: &'a str,
    pub binary: bool,
    /// When the copy started (unix ms), kept in the subscription's comment
    /// for [`super::progress`]'s rate.
    pub started_ms: u64,
    /// Green's database and the marker written with the subscription.
    pub database: &'a str,
    pub marker: &'a super::schema::Marker,
}

/// `CREATE SUBSCRIPTION` on green over the slot prepare created, without a
/// copy of its own (prepare copied the data as of the slot's consistent
/// point, where the subscription starts), in one transaction with its
/// comment and the marker: a re-run never finds a subscription green's
/// marker does not know of. (Without `create_slot` the command may run in
/// a transaction block.)
pub async fn create_subscription(
    green: &Client,
    s: &NewSubscription<'_>,
) -> Result<(), PrepareError> {
    let step = "create the subscription on green";
    green
        .batch_execute(&format!(
            "BEGIN; \
             CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} \
             WITH (slot_name = {}, create_slot = false, copy_data = false, enabled = true, \
                   binary = {}); \
             COMMENT ON SUBSCRIPTION {} IS {}; {} COMMIT",
            ident(s.name),
            literal(s.conninfo),
            ident(s.publication),
            literal(s.slot),
            s.binary,
            ident(s.name),
            literal(&format!("{} {}", super::progress::STARTED, s.started_ms)),
            s.marker.statement(s.database)
        ))
        .await
        .map_err(sql(Side::Green, step))?;
    Ok(())
}

/// `REFRESH MATERIALIZED VIEW` on green for each one not populated (the
/// schema restore creates them `WITH NO DATA`; replication does not fill
/// them). Returns the refreshed.
pub async fn refresh_matviews(green: &Client) -> Result<Vec<String>, PrepareError> {
    let views = texts(
        green,
        Side::Green,
        "materialized views",
        "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c \
          WHERE c.relkind = 'm' AND NOT c.relispopulated ORDER BY 1",
    )
    .await?;
    for v in &views {
        green
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {v}"))
            .await
            .map_err(sql(Side::Green, "refresh a materialized view"))?;
    }
    Ok(views)
}
