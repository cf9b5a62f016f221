//! `pgswitch prepare`: builds green from blue and sets up the forward
//! replication, against the same `[backends]` (each side's admin user) and
//! `[replication]` configuration the proxy uses.
//!
//! Control plane, upgrade lifecycle (issue 15, part 1). The steps, each
//! safe to re-run (it does only what is missing, and says so):
//!
//! 0. preflight, read-only: a `pg_dump` new enough for blue
//!    ([`tools`]), blue's extensions installable on green, blue's tables
//!    replicable (no UPDATE/DELETE failure once published); a failure here
//!    changes nothing anywhere;
//! 1. roles ([`roles`]: blue's, with their SCRAM secrets; roles green has
//!    are left alone);
//! 2. schema ([`schema`]: the database, then one transaction restoring
//!    `pg_dump --schema-only --section=pre-data` with a marker; refused
//!    over anything else);
//! 3. publication on blue;
//! 4. the initial copy ([`copy`], [`snapshot`]): a slot on blue with an
//!    exported snapshot, `pg_dump --data-only --snapshot | pg_restore` into
//!    green's index-less tables, post-data (indexes, constraints), then the
//!    subscription from the slot (`copy_data = false`; [`objects`]);
//! 5. the catch-up followed to its end ([`progress`], also served as
//!    `GET /prepare`), then the materialized views refreshed on green.
//!
//! # A SIGKILL at any point
//!
//! A re-run first ends the sessions a killed run's programs left on both
//! servers (by their `application_name`): an orphaned pg_restore would
//! otherwise go on writing, a psql finish its transaction behind the
//! re-run's back. Then:
//!
//! * before or during roles or a schema section: their transactions commit
//!   whole or not at all; a re-run finds the roles, or the marker, and goes
//!   on;
//! * before or during the copy: the marker says `copying` (or only
//!   pre-data, tables empty); green holds part of prepare's own copy and no
//!   subscription wrote anything: the re-run truncates it, drops the slot
//!   (unused) and copies again: one slot, every row once;
//! * after the copy, before or during post-data or `CREATE SUBSCRIPTION`
//!   (one transaction with the marker): the data matches the slot as long
//!   as nothing consumed it, so the re-run keeps it when the slot is still
//!   at the consistent point the marker recorded, and copies again if not
//!   ([`copy`]);
//! * after: the subscription exists; a re-run follows the catch-up.
//!
//! Rows on green without a subscription where the marker says one existed
//! (someone dropped it after replication wrote) are refused: a new copy
//! would duplicate them.

pub mod copy;
mod display;
pub mod objects;
pub mod progress;
mod report;
pub mod roles;
pub mod schema;
pub mod snapshot;
pub mod tools;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::{Config, Side};
use crate::replication::connect_side;
use crate::replication::{self, ReplicationError};

pub use display::Display;
pub use progress::{progress, Phase, Progress};
pub use report::{CopyFigures, Report, StepReport};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the copy's progress is read.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Connect(String),
    #[error("on {side}: {source}")]
    Query {
        side: Side,
        source: ReplicationError,
    },
    #[error(
        "no pg_dump of major version {server_major} or newer (blue's server) found in --pg-bin, \
         PATH or /usr/lib/postgresql/*/bin (found: {found}): install PostgreSQL {server_major}+'s \
         client programs or pass --pg-bin"
    )]
    NoPgDump { server_major: u32, found: String },
    #[error("no psql found in --pg-bin, PATH or /usr/lib/postgresql/*/bin")]
    NoPsql,
    #[error("{tool} against {side} failed: {message}")]
    Tool {
        tool: String,
        side: Side,
        message: String,
    },
    #[error(
        "blue has extensions that green cannot install: {}; install them on green's server (e.g. \
         its contrib package), or DROP EXTENSION on blue if unused",
        .0.join(", ")
    )]
    MissingExtensions(Vec<String>),
    #[error(
        "tables on blue without a primary key or replica identity: {}; once published, UPDATE \
         and DELETE on them fail on blue. Add a primary key (or ALTER TABLE .. REPLICA IDENTITY \
         USING INDEX ..), or re-run with --replica-identity-full to have prepare set REPLICA \
         IDENTITY FULL on them",
        .0.join(", ")
    )]
    NoReplicaIdentity(Vec<String>),
    #[error(
        "green's database {database:?} holds objects pgswitch prepare did not create ({}): \
         prepare does not restore over them. Point [backends.green] at an empty server, or drop \
         the database on green",
        objects.join(", ")
    )]
    GreenNotEmpty {
        database: String,
        objects: Vec<String>,
    },
    #[error(
        "tables on green hold rows and there is no subscription {subscription:?}: an initial copy \
         would duplicate them ({}). TRUNCATE them on green, or drop the database on green, and \
         re-run",
        tables.join(", ")
    )]
    GreenHasRows {
        subscription: String,
        tables: Vec<String>,
    },
    #[error(
        "slot {0:?} on blue is in use and green has no subscription reading it: prepare does \
         not drop it (see pg_stat_replication on blue for who reads it)"
    )]
    SlotInUse(String),
    #[error(
        "subscription {0:?} on green is disabled (a cutover disables it while green is active): \
         prepare does not enable it"
    )]
    SubscriptionDisabled(String),
    #[error(
        "green did not catch up within {timeout:?} ({progress}); it goes on in the servers: \
         re-run prepare to follow it"
    )]
    Timeout { timeout: Duration, progress: String },
}

impl PrepareError {
    pub(crate) fn query(side: Side, source: ReplicationError) -> PrepareError {
        PrepareError::Query { side, source }
    }
}

/// The command line's options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A folder searched first for pg_dump, pg_dumpall and psql.
    pub pg_bin: Option<PathBuf>,
    /// How long to follow the catch-up after the copy (the copy itself is
    /// prepare's pg_dump | pg_restore, not bounded); `None`: until it ends.
    pub timeout: Option<Duration>,
    /// Set REPLICA IDENTITY FULL on blue's tables that have none (instead
    /// of refusing).
    pub replica_identity_full: bool,
}

/// Runs prepare; the report says what was done, and the error if any.
pub async fn run(config: &Config, options: &Options, display: &mut Display) -> Report {
    let mut report = Report::default();
    if let Err(e) = steps(config, options, display, &mut report).await {
        report.error = Some(e.to_string());
    }
    display.finish();
    report.ok = report.error.is_none();
    report
}

async fn one_i32(c: &Client, side: Side, q: &str) -> Result<i32, PrepareError> {
    let row = c
        .query_one(q, &[])
        .await
        .map_err(|e| PrepareError::query(side, ReplicationError::sql(q.to_owned(), e)))?;
    row.try_get(0)
        .map_err(|e| PrepareError::query(side, ReplicationError::sql(q.to_owned(), e)))
}

async fn steps(
    config: &Config,
    options: &Options,
    display: &mut Display,
    report: &mut Report,
) -> Result<(), PrepareError> {
    let database = &config.replication.database;
    let subscription = &config.replication.subscription;
    let green_config = config
        .backends
        .green
        .as_ref()
        .ok_or_else(|| PrepareError::Config("[backends.green] is not configured".into()))?;
    let (green_user, green_password) = green_config.admin_credentials().ok_or_else(|| {
        PrepareError::Config("backends.green.admin_user is not configured".into())
    })?;
    let blue = connect_side(config, Side::Blue, CONNECT_TIMEOUT)
        .await
        .map_err(PrepareError::Connect)?;
    // The replicated database may not exist on green yet.
    let green_maintenance = replication::connect(
        &green_config.host,
        green_config.port,
        &green_user,
        &green_password,
        "postgres",
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| PrepareError::Connect(format!("green does not answer: {e}")))?;
    const VERSION: &str = "SELECT current_setting('server_version_num')::int4";
    let blue_version = one_i32(&blue, Side::Blue, VERSION).await?;
    let green_version = one_i32(&green_maintenance, Side::Green, VERSION).await?;

    // 0. Preflight: nothing changes anywhere if one of these fails.
    let tools = tools::find(options.pg_bin.as_deref(), (blue_version / 10000) as u32).await?;
    report.tools = Some(tools.clone());
    let extensions = schema::check_extensions(&blue, &green_maintenance).await?;
    let no_identity = objects::without_replica_identity(&blue).await?;
    if !no_identity.is_empty() && !options.replica_identity_full {
        return Err(PrepareError::NoReplicaIdentity(no_identity));
    }
    let blue_target = tools::Target::new(Side::Blue, &config.backends.blue, database);
    let green_target = tools::Target::new(Side::Green, green_config, database);

    // A killed run's programs may still be at work (an orphaned pg_restore
    // writes on): end them before writing anything.
    let ended = snapshot::end_leftovers(&blue, Side::Blue).await?
        + snapshot::end_leftovers(&green_maintenance, Side::Green).await?;
    if ended > 0 {
        report.step(
            display,
            "leftovers",
            true,
            format!("ended {ended} session(s) of a killed run's pg_dump, pg_restore or psql"),
        );
    }

    // 1. Roles.
    let roles = roles::copy(
        &tools,
        &blue_target,
        &tools::Target::new(Side::Green, green_config, "postgres"),
        &blue,
        &green_maintenance,
        database,
    )
    .await?;
    let detail = if roles.created.is_empty() {
        format!(
            "every role of blue exists on green ({} kept as they are)",
            roles.kept.len()
        )
    } else {
        format!("created {}", roles.created.join(", "))
    };
    report.step(display, "roles", !roles.created.is_empty(), detail);
    if !roles.password_differs.is_empty() {
        report.notes.push(format!(
            "roles on both sides with different passwords (green's kept; pass-through logins of \
             them fail on green): {}",
            roles.password_differs.join(", ")
        ));
    }
    report.roles = Some(roles);

    // 2. Database and schema.
    let created = schema::ensure_database(&blue, &green_maintenance, database).await?;
    if created {
        report.step(
            display,
            "database",
            true,
            format!("created {database:?} on green"),
        );
    }
    let green = connect_side(config, Side::Green, CONNECT_TIMEOUT)
        .await
        .map_err(PrepareError::Connect)?;
    let state = schema::green_state(Some(&green), subscription).await?;
    let marker = if state.subscription {
        report.step(
            display,
            "schema",
            false,
            format!("subscription {subscription:?} exists: the schema was restored before"),
        );
        None
    } else if let Some(marker) = state.marker {
        report.step(
            display,
            "schema",
            false,
            "restored by an earlier run".into(),
        );
        Some(marker)
    } else if !state.user_objects.is_empty() {
        return Err(PrepareError::GreenNotEmpty {
            database: database.clone(),
            objects: state.user_objects,
        });
    } else {
        let marker = schema::Marker::new(schema::Stage::PreData, false);
        let size = schema::restore(
            &tools,
            &blue_target,
            &green_target,
            database,
            schema::Section::PreData,
            &marker,
        )
        .await?;
        report.step(
            display,
            "schema",
            true,
            format!(
                "restored {} of pg_dump --schema-only --section=pre-data (extensions: {})",
                progress::human_bytes(size as f64),
                if extensions.is_empty() {
                    "none".to_owned()
                } else {
                    extensions.join(", ")
                }
            ),
        );
        Some(marker)
    };

    // 3. Replica identity, publication.
    if !no_identity.is_empty() {
        objects::set_replica_identity_full(&blue, &no_identity).await?;
        report.step(
            display,
            "identity",
            true,
            format!("REPLICA IDENTITY FULL on blue: {}", no_identity.join(", ")),
        );
    }
    let publication = &config.replication.publication;
    let created = objects::ensure_publication(&blue, publication).await?;
    report.step(
        display,
        "publication",
        created,
        format!(
            "{publication:?} on blue{}",
            if created {
                " created FOR ALL TABLES"
            } else {
                " exists"
            }
        ),
    );
    let settings = objects::copy_settings(&blue, blue_version, green_version, publication).await?;

    // 4. The copy and the subscription.
    let mut times = None;
    match (
        objects::subscription_enabled(&green, subscription).await?,
        marker,
    ) {
        (Some(true), _) => report.step(
            display,
            "subscription",
            false,
            format!("{subscription:?} on green exists"),
        ),
        (Some(false), _) => return Err(PrepareError::SubscriptionDisabled(subscription.clone())),
        (None, marker) => {
            // No subscription, no marker: a subscription was there when
            // green's state was read and is gone now.
            let marker = marker.unwrap_or(schema::Marker::new(schema::Stage::Subscribed, true));
            let cx = copy::Context {
                config,
                tools: &tools,
                blue: &blue,
                green: &green,
                blue_target: &blue_target,
                green_target: &green_target,
                binary: settings.binary,
            };
            times = copy::run(&cx, marker, report, display).await?;
        }
    }
    report.notes.push(format!(
        "binary = {}: {}",
        settings.binary, settings.binary_reason
    ));
    report.copy_settings = Some(settings);

    // 5. Follow the catch-up.
    let followed = Instant::now();
    let last = loop {
        let p = progress(config, &blue, &green).await?;
        display.progress(&p);
        match p.phase {
            Phase::Ready => break p,
            Phase::Disabled => {
                return Err(PrepareError::SubscriptionDisabled(subscription.clone()))
            }
            _ => {}
        }
        if let Some(timeout) = options.timeout.filter(|t| followed.elapsed() >= *t) {
            let line = p.line();
            report.progress = Some(p);
            return Err(PrepareError::Timeout {
                timeout,
                progress: line,
            });
        }
        tokio::time::sleep(POLL).await;
    };
    if let Some((started, copied)) = times {
        let seconds = copied.duration_since(started).as_secs_f64().max(1e-3);
        let (bytes, mut rows) = (last.bytes_total, last.rows_total);
        // Tables never analyzed on blue have no estimate: count them.
        for t in last.tables.iter().filter(|t| t.rows_total.is_none()) {
            let q = format!("SELECT count(*) FROM ONLY {}", t.table);
            let row = green.query_one(&q, &[]).await.map_err(|e| {
                PrepareError::query(Side::Green, ReplicationError::sql(q.clone(), e))
            })?;
            rows += row
                .try_get::<_, i64>(0)
                .map_err(|e| PrepareError::query(Side::Green, ReplicationError::sql(q, e)))?;
        }
        report.initial_copy = Some(CopyFigures {
            seconds,
            bytes,
            rows,
            bytes_per_second: bytes as f64 / seconds,
            rows_per_second: rows as f64 / seconds,
        });
    }
    report.step(
        display,
        "catch-up",
        times.is_some(),
        format!(
            "{} table(s) ready, lag {}",
            last.tables_total,
            progress::human_bytes(last.lag_bytes.unwrap_or(0) as f64)
        ),
    );
    report.progress = Some(last);
    let refreshed = objects::refresh_matviews(&green).await?;
    if !refreshed.is_empty() {
        report.step(
            display,
            "matviews",
            true,
            format!("refreshed on green: {}", refreshed.join(", ")),
        );
    }
    notes(&blue, report).await?;
    Ok(())
}

/// What logical replication does not carry, for the operator.
async fn notes(blue: &Client, report: &mut Report) -> Result<(), PrepareError> {
    let step = "notes";
    let row = blue
        .query_one(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_largeobject_metadata), \
                    (SELECT coalesce(string_agg(c.oid::regclass::text, ', ' ORDER BY 1), '') \
                       FROM pg_catalog.pg_class c WHERE c.relpersistence = 'u' AND c.relkind = 'r'), \
                    (SELECT count(*) FROM pg_catalog.pg_sequences \
                      WHERE schemaname NOT IN ('pg_catalog', 'information_schema'))",
            &[],
        )
        .await
        .map_err(|e| PrepareError::query(Side::Blue, ReplicationError::sql(step, e)))?;
    let get_err = |e| PrepareError::query(Side::Blue, ReplicationError::sql(step, e));
    let large_objects: i64 = row.try_get(0).map_err(get_err)?;
    let unlogged: String = row.try_get(1).map_err(get_err)?;
    let sequences: i64 = row.try_get(2).map_err(get_err)?;
    if large_objects > 0 {
        report.notes.push(format!(
            "{large_objects} large object(s) on blue are not replicated: copy them by hand"
        ));
    }
    if !unlogged.is_empty() {
        report.notes.push(format!(
            "unlogged tables are not replicated (empty on green): {unlogged}"
        ));
    }
    if sequences > 0 {
        report.notes.push(format!(
            "{sequences} sequence(s) are not replicated: a cutover copies their values"
        ));
    }
    Ok(())
}

/// The progress as `GET /prepare` serves it: both sides, fresh connections.
pub async fn current_progress(config: &Config) -> Result<Progress, PrepareError> {
    let (blue, green) = tokio::try_join!(
        connect_side(config, Side::Blue, CONNECT_TIMEOUT),
        connect_side(config, Side::Green, CONNECT_TIMEOUT)
    )
    .map_err(PrepareError::Connect)?;
    progress(config, &blue, &green).await
}
