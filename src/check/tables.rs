//! Tables logical replication cannot carry correctly: no replica identity
//! (UPDATE and DELETE fail on the publisher), REPLICA IDENTITY FULL on a
//! large table (slow apply), unlogged and temporary tables, materialized
//! views, large objects.

use tokio_postgres::Client;

use super::{one_i64, texts, Findings, Level};
use crate::config::Side;
use crate::replication::ReplicationError;

/// Tables logical replication cannot carry correctly (on the side that
/// takes the traffic).
pub(super) async fn check(
    r: &mut Findings,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    const USER_TABLES: &str = "FROM pg_catalog.pg_class c \
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg\\_%'";
    let no_key = texts(
        c,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' \
               AND (c.relreplident = 'n' \
                    OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                                             WHERE i.indrelid = c.oid AND i.indisprimary)) \
                    OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                                             WHERE i.indrelid = c.oid AND i.indisreplident))) \
             ORDER BY 1"
        ),
        "tables without a replica identity",
    )
    .await?;
    r.objects(
        "replica_identity",
        side,
        Level::Fail,
        "tables without a primary key or replica identity (UPDATE and DELETE on them fail once published)",
        no_key,
        "add a primary key, or ALTER TABLE .. REPLICA IDENTITY USING INDEX <unique index> (or FULL)",
    );
    let full = texts(
        c,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind IN ('r', 'p') AND c.relreplident = 'f' \
               AND pg_catalog.pg_total_relation_size(c.oid) > 100 * 1024 * 1024 ORDER BY 1"
        ),
        "large tables with REPLICA IDENTITY FULL",
    )
    .await?;
    r.objects(
        "replica_identity_full",
        side,
        Level::Warn,
        "large tables with REPLICA IDENTITY FULL (each UPDATE/DELETE scans the table on the subscriber)",
        full,
        "give them a primary key",
    );
    let unlogged = texts(
        c,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind IN ('r', 'p') AND c.relpersistence = 'u' \
             UNION ALL \
             SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) || ' (temporary)' \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 't' ORDER BY 1"
        ),
        "unlogged and temporary tables",
    )
    .await?;
    r.objects(
        "unlogged_tables",
        side,
        Level::Warn,
        "unlogged and temporary tables (not replicated: empty on the other side)",
        unlogged,
        "ALTER TABLE .. SET LOGGED, or copy them by hand before the switch (a temporary \
         table lives as long as its session: end the session or make it a table)",
    );
    let matviews = texts(
        c,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind = 'm' ORDER BY 1"
        ),
        "materialized views",
    )
    .await?;
    r.objects(
        "materialized_views",
        side,
        Level::Warn,
        "materialized views (not replicated)",
        matviews,
        "REFRESH MATERIALIZED VIEW on the other side before the switch",
    );
    let large_objects = one_i64(
        c,
        "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
        "large objects",
    )
    .await?;
    if large_objects == 0 {
        r.add(
            "large_objects",
            Some(side),
            Level::Pass,
            "no large objects".into(),
        );
    } else {
        r.add(
            "large_objects",
            Some(side),
            Level::Warn,
            format!("{large_objects} large object(s) (pg_largeobject is not replicated)"),
        );
        r.fix("copy them by hand (lo_export / lo_import), or move them into bytea columns");
    }
    Ok(())
}
