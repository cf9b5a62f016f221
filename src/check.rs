//! `pgswitch check`: is the pair ready for a cutover? A table of checks
//! against both servers, each pass, warn or fail with what an operator
//! needs to act (the object, the fix). Read-only: it changes nothing.
//!
//! Control plane, upgrade lifecycle (issue 15, part 2; this is its first
//! part: the server settings, the subscription, what logical replication
//! cannot carry, sessions that bypass pgswitch, roles, the state file).

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, Side};
use crate::cutover::connect_side;
use crate::replication::{self, ReplicationError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Pass => "pass",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst level found.
    pub fn level(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Pass)
    }

    /// A table for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let side = f.side.map(|s| s.as_str()).unwrap_or("-");
            out.push_str(&format!(
                "{:<5} {:<6} {:<22} {}\n",
                f.level.as_str().to_uppercase(),
                side,
                f.check,
                f.detail
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:<35}fix: {fix}\n", ""));
            }
        }
        let count = |l| self.findings.iter().filter(|f| f.level == l).count();
        out.push_str(&format!(
            "{} passed, {} warnings, {} failed\n",
            count(Level::Pass),
            count(Level::Warn),
            count(Level::Fail)
        ));
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Connect(String),
    #[error("{side}: {source}")]
    Query {
        side: Side,
        source: ReplicationError,
    },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Names the side a failed query ran on.
fn on(side: Side) -> impl Fn(ReplicationError) -> CheckError {
    move |source| CheckError::Query { side, source }
}

/// Runs every check against both sides.
pub async fn run(config: &Config) -> Result<Report, CheckError> {
    let (blue, green) = tokio::try_join!(
        connect_side(config, Side::Blue, CONNECT_TIMEOUT),
        connect_side(config, Side::Green, CONNECT_TIMEOUT)
    )
    .map_err(CheckError::Connect)?;
    let mut r = Findings(Vec::new());
    for (side, c) in [(Side::Blue, &blue), (Side::Green, &green)] {
        server_settings(&mut r, config, side, c)
            .await
            .map_err(on(side))?;
    }
    subscription(&mut r, config, &green)
        .await
        .map_err(on(Side::Green))?;
    replicable_tables(&mut r, &blue)
        .await
        .map_err(on(Side::Blue))?;
    sessions(&mut r, config, &blue)
        .await
        .map_err(on(Side::Blue))?;
    roles(&mut r, config, &green)
        .await
        .map_err(on(Side::Green))?;
    schema_drift(&mut r, &blue, &green).await?;
    sequences(&mut r, &blue, &green).await?;
    state_file(&mut r, config);
    Ok(Report { findings: r.0 })
}

struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, check: &'static str, side: Option<Side>, level: Level, detail: String) {
        self.0.push(Finding {
            check,
            side,
            level,
            detail,
            fix: None,
        });
    }

    fn fix(&mut self, fix: impl Into<String>) {
        if let Some(last) = self.0.last_mut() {
            last.fix = Some(fix.into());
        }
    }

    /// Pass, or one finding at `level` listing `objects`.
    fn objects(
        &mut self,
        check: &'static str,
        side: Side,
        level: Level,
        what: &str,
        objects: Vec<String>,
        fix: &str,
    ) {
        if objects.is_empty() {
            self.add(check, Some(side), Level::Pass, format!("no {what}"));
        } else {
            self.add(
                check,
                Some(side),
                level,
                format!("{what}: {}", objects.join(", ")),
            );
            self.fix(fix);
        }
    }
}

async fn texts(c: &Client, sql: &str, step: &str) -> Result<Vec<String>, ReplicationError> {
    let rows = c
        .query(sql, &[])
        .await
        .map_err(|e| ReplicationError::sql(step, e))?;
    rows.iter()
        .map(|r| r.try_get(0).map_err(|e| ReplicationError::sql(step, e)))
        .collect()
}

async fn one_i64(c: &Client, sql: &str, step: &str) -> Result<i64, ReplicationError> {
    let row = c
        .query_one(sql, &[])
        .await
        .map_err(|e| ReplicationError::sql(step, e))?;
    row.try_get(0).map_err(|e| ReplicationError::sql(step, e))
}

/// `wal_level`, free slots and WAL senders (green needs them for the
/// reverse direction), and slots nobody reads (they retain WAL for ever).
/// pgswitch's own slots are left out: the forward one is idle on purpose
/// while green is active (and kept advanced), the reverse one is dropped.
async fn server_settings(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    let wal_level = texts(c, "SELECT current_setting('wal_level')", "wal_level").await?;
    let wal_level = wal_level.first().cloned().unwrap_or_default();
    if wal_level == "logical" {
        r.add("wal_level", Some(side), Level::Pass, "logical".into());
    } else {
        r.add(
            "wal_level",
            Some(side),
            Level::Fail,
            format!("{wal_level}: logical replication needs logical"),
        );
        r.fix("ALTER SYSTEM SET wal_level = logical, then restart the server");
    }
    let free_slots = one_i64(
        c,
        "SELECT current_setting('max_replication_slots')::int8 \
                - (SELECT count(*) FROM pg_catalog.pg_replication_slots)",
        "free replication slots",
    )
    .await?;
    let free_senders = one_i64(
        c,
        "SELECT current_setting('max_wal_senders')::int8 \
                - (SELECT count(*) FROM pg_catalog.pg_stat_replication)",
        "free WAL senders",
    )
    .await?;
    let level = if free_slots >= 1 && free_senders >= 1 {
        Level::Pass
    } else {
        Level::Fail
    };
    r.add(
        "replication_capacity",
        Some(side),
        level,
        format!("{free_slots} free replication slot(s), {free_senders} free WAL sender(s)"),
    );
    if level == Level::Fail {
        r.fix("raise max_replication_slots / max_wal_senders (restart needed)");
    }
    let step = "inactive slots";
    let rows = c
        .query(
            "SELECT slot_name || ' (retains ' || \
                    pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff( \
                        pg_catalog.pg_current_wal_lsn(), restart_lsn)) || ')' \
               FROM pg_catalog.pg_replication_slots \
              WHERE NOT active AND restart_lsn IS NOT NULL AND slot_name <> ALL($1) \
              ORDER BY 1",
            &[&vec![config.replication.slot(), "pgswitch_reverse"]],
        )
        .await
        .map_err(|e| ReplicationError::sql(step, e))?;
    let inactive = rows
        .iter()
        .map(|row| row.try_get(0).map_err(|e| ReplicationError::sql(step, e)))
        .collect::<Result<Vec<String>, _>>()?;
    r.objects(
        "inactive_slots",
        side,
        Level::Warn,
        "inactive replication slots",
        inactive,
        "a slot nobody reads retains WAL until the disk fills: drop it \
         (SELECT pg_drop_replication_slot('<name>')) if it is orphaned",
    );
    Ok(())
}

/// The forward subscription: enabled, streaming, every table ready.
async fn subscription(
    r: &mut Findings,
    config: &Config,
    green: &Client,
) -> Result<(), ReplicationError> {
    let name = &config.replication.subscription;
    let st = replication::subscription_status(green, name).await?;
    let (level, detail) = if !st.exists {
        (Level::Fail, format!("subscription {name:?} does not exist"))
    } else if !st.enabled || !st.streaming {
        (
            Level::Fail,
            format!(
                "subscription {name:?}: enabled {}, streaming {}",
                st.enabled, st.streaming
            ),
        )
    } else if st.tables_not_ready > 0 {
        (
            Level::Fail,
            format!(
                "subscription {name:?} still copies {} table(s)",
                st.tables_not_ready
            ),
        )
    } else {
        (
            Level::Pass,
            format!("subscription {name:?} streams, every table ready"),
        )
    };
    r.add("subscription", Some(Side::Green), level, detail);
    Ok(())
}

/// Tables logical replication cannot carry correctly.
async fn replicable_tables(r: &mut Findings, blue: &Client) -> Result<(), ReplicationError> {
    const USER_TABLES: &str = "FROM pg_catalog.pg_class c \
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg\\_%'";
    let no_key = texts(
        blue,
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
        Side::Blue,
        Level::Fail,
        "tables without a primary key or replica identity (UPDATE and DELETE on them fail on blue once published)",
        no_key,
        "add a primary key, or ALTER TABLE .. REPLICA IDENTITY USING INDEX <unique index> (or FULL)",
    );
    let full = texts(
        blue,
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
        Side::Blue,
        Level::Warn,
        "large tables with REPLICA IDENTITY FULL (each UPDATE/DELETE scans the table on green)",
        full,
        "give them a primary key",
    );
    let unlogged = texts(
        blue,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind IN ('r', 'p') AND c.relpersistence = 'u' ORDER BY 1"
        ),
        "unlogged tables",
    )
    .await?;
    r.objects(
        "unlogged_tables",
        Side::Blue,
        Level::Warn,
        "unlogged tables (not replicated: empty on green)",
        unlogged,
        "ALTER TABLE .. SET LOGGED, or copy them by hand before the cutover",
    );
    let matviews = texts(
        blue,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) {USER_TABLES} \
               AND c.relkind = 'm' ORDER BY 1"
        ),
        "materialized views",
    )
    .await?;
    r.objects(
        "materialized_views",
        Side::Blue,
        Level::Warn,
        "materialized views (not replicated)",
        matviews,
        "REFRESH MATERIALIZED VIEW on green before the cutover",
    );
    let large_objects = one_i64(
        blue,
        "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
        "large objects",
    )
    .await?;
    if large_objects == 0 {
        r.add(
            "large_objects",
            Some(Side::Blue),
            Level::Pass,
            "no large objects".into(),
        );
    } else {
        r.add(
            "large_objects",
            Some(Side::Blue),
            Level::Warn,
            format!("{large_objects} large object(s) (pg_largeobject is not replicated)"),
        );
        r.fix("copy them by hand (lo_export / lo_import), or move them into bytea columns");
    }
    Ok(())
}

/// Sessions on blue that do not come through pgswitch (a cron job still
/// pointed at blue writes to a fenced database after the cutover), and
/// transactions open longer than `drain_timeout` (the drain would time out).
async fn sessions(
    r: &mut Findings,
    config: &Config,
    blue: &Client,
) -> Result<(), ReplicationError> {
    let step = "sessions on blue";
    let roles = config.application_roles();
    let rows = blue
        .query(
            "SELECT usename::text || '@' || coalesce(host(client_addr), 'local') || \
                    CASE WHEN application_name <> '' THEN ' (' || application_name || ')' ELSE '' END, \
                    coalesce(extract(epoch FROM now() - xact_start), 0)::float8 \
               FROM pg_catalog.pg_stat_activity \
              WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() \
                AND application_name <> $1 \
                AND (usename = ANY($2) OR xact_start IS NOT NULL) \
              ORDER BY 1",
            &[&replication::APPLICATION_NAME, &roles],
        )
        .await
        .map_err(|e| ReplicationError::sql(step, e))?;
    let drain = config.cutover.drain_timeout.as_secs_f64();
    let mut long = Vec::new();
    let mut others = Vec::new();
    for row in &rows {
        let who: String = row.try_get(0).map_err(|e| ReplicationError::sql(step, e))?;
        let age: f64 = row.try_get(1).map_err(|e| ReplicationError::sql(step, e))?;
        if age > drain {
            long.push(format!("{who}, open {age:.0} s"));
        }
        others.push(who);
    }
    r.objects(
        "long_transactions",
        Side::Blue,
        Level::Warn,
        "transactions open longer than drain_timeout",
        long,
        "end them before the cutover, or use drain_action = \"cancel\"",
    );
    // pgswitch's own server connections log in as the application roles
    // too; what tells them apart is unknown here, so every session of
    // those roles is listed when pgswitch is not serving (`check` offline).
    others.sort();
    others.dedup();
    r.objects(
        "sessions_on_blue",
        Side::Blue,
        Level::Warn,
        "sessions on blue of the application roles or with an open transaction (not through \
         pgswitch, if pgswitch is stopped)",
        others,
        "point them at pgswitch: after the cutover blue is fenced and their writes fail",
    );
    Ok(())
}

/// Every role pgswitch logs in as exists on green and can log in.
async fn roles(r: &mut Findings, config: &Config, green: &Client) -> Result<(), ReplicationError> {
    let wanted = config.application_roles();
    let step = "roles on green";
    let rows = green
        .query(
            "SELECT r FROM unnest($1::text[]) r WHERE NOT EXISTS \
               (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r AND rolcanlogin) ORDER BY 1",
            &[&wanted],
        )
        .await
        .map_err(|e| ReplicationError::sql(step, e))?;
    let missing = rows
        .iter()
        .map(|row| row.try_get(0).map_err(|e| ReplicationError::sql(step, e)))
        .collect::<Result<Vec<String>, _>>()?;
    r.objects(
        "roles",
        Side::Green,
        Level::Fail,
        "application roles missing on green or without LOGIN",
        missing,
        "copy the roles: pg_dumpall --roles-only on blue, restored on green (SCRAM secrets carry over)",
    );
    Ok(())
}

/// Every column of blue's tables exists on green with the same type (the
/// schema copy is not replicated: DDL on blue after it makes the apply on
/// green fail, or silently drops a column's values).
async fn schema_drift(r: &mut Findings, blue: &Client, green: &Client) -> Result<(), CheckError> {
    const COLUMNS: &str = "SELECT quote_ident(c.table_schema) || '.' || quote_ident(c.table_name) \
                                  || '.' || quote_ident(c.column_name) || ' ' || c.data_type \
                             FROM information_schema.columns c \
                             JOIN information_schema.tables t USING (table_schema, table_name) \
                            WHERE t.table_type = 'BASE TABLE' \
                              AND c.table_schema NOT IN ('pg_catalog', 'information_schema') \
                            ORDER BY 1";
    let (on_blue, on_green) = tokio::join!(
        texts(blue, COLUMNS, "columns on blue"),
        texts(green, COLUMNS, "columns on green")
    );
    let on_blue = on_blue.map_err(on(Side::Blue))?;
    let on_green: std::collections::BTreeSet<String> =
        on_green.map_err(on(Side::Green))?.into_iter().collect();
    let missing: Vec<String> = on_blue
        .into_iter()
        .filter(|c| !on_green.contains(c))
        .collect();
    r.objects(
        "schema",
        Side::Green,
        Level::Fail,
        "columns of blue missing on green or of another type",
        missing,
        "apply the same DDL on green (pg_dump --schema-only of the objects), then \
         ALTER SUBSCRIPTION .. REFRESH PUBLICATION for new tables",
    );
    Ok(())
}

/// Sequences on green behind blue's (a cutover copies them; shown so that
/// nothing is a surprise).
async fn sequences(r: &mut Findings, blue: &Client, green: &Client) -> Result<(), CheckError> {
    const VALUES: &str = "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) \
                                 || '=' || coalesce(last_value, 0) FROM pg_catalog.pg_sequences ORDER BY 1";
    let (b, g) = tokio::join!(
        texts(blue, VALUES, "sequences on blue"),
        texts(green, VALUES, "sequences on green")
    );
    let parse = |v: Vec<String>| -> std::collections::HashMap<String, i64> {
        v.into_iter()
            .filter_map(|s| {
                let (name, value) = s.rsplit_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    };
    let b = parse(b.map_err(on(Side::Blue))?);
    let g = parse(g.map_err(on(Side::Green))?);
    let mut behind: Vec<String> = b
        .iter()
        .filter(|(name, value)| g.get(*name).is_some_and(|v| v < value))
        .map(|(name, value)| format!("{name} ({} < {value})", g.get(name).copied().unwrap_or(0)))
        .collect();
    behind.sort();
    if behind.is_empty() {
        r.add(
            "sequences",
            Some(Side::Green),
            Level::Pass,
            "no sequence behind blue's".into(),
        );
    } else {
        r.add(
            "sequences",
            Some(Side::Green),
            Level::Warn,
            format!(
                "sequences behind blue's (the cutover copies them): {}",
                behind.join(", ")
            ),
        );
    }
    Ok(())
}

/// The state file's folder exists and takes a file.
fn state_file(r: &mut Findings, config: &Config) {
    match &config.cutover.state_file {
        None => {
            r.add(
                "state_file",
                None,
                Level::Fail,
                "[cutover] state_file is not set: a switch refuses to run without it".into(),
            );
            r.fix("set [cutover] state_file to a path on persistent disk");
        }
        Some(path) => match crate::cutover::state::check_writable(path) {
            Ok(()) => r.add(
                "state_file",
                None,
                Level::Pass,
                format!("{} is writable", path.display()),
            ),
            Err(e) => {
                r.add("state_file", None, Level::Fail, e.to_string());
                r.fix("create its folder, writable by pgswitch's user");
            }
        },
    }
}
