//! The initial copy, followed to its end. [`progress`] computes every
//! figure from the servers alone (no state in pgswitch), so that `pgswitch
//! prepare`, its `--json` and the admin API's `GET /prepare` show the same.
//!
//! While prepare copies the data (green's marker says `copying`, no
//! subscription yet), per table of blue's publication: `copying` while
//! pg_restore's COPY into it shows in `pg_stat_progress_copy` on green,
//! `copied` once its heap on green has rows and no COPY runs (every table
//! once the marker says `data copied`), `pending` before; bytes and rows as
//! below, the rate since the marker's start. The phase is `interrupted`
//! when no session of prepare's programs is on green (a killed run; a
//! re-run starts the copy over).
//!
//! Once the subscription exists:
//!
//! * per table, its state in `pg_subscription_rel` on green (`ready` from
//!   the start: prepare copied the data, `copy_data = false`);
//! * bytes: of the total, blue's heap size of each published table
//!   (`pg_relation_size`); copied, the full size of the tables past the
//!   copy, and for a table being copied the size its heap on green has
//!   reached (a COPY appends to it; capped at blue's size);
//! * rows: of the total, blue's `reltuples` (an estimate, exact after a
//!   VACUUM or ANALYZE; unknown for a table never analyzed); copied,
//!   `pg_stat_progress_copy.tuples_processed` of the tablesync worker's COPY
//!   on green, and the total of the tables past the copy;
//! * rate and time left: bytes copied over the time since prepare created
//!   the subscription (recorded in the subscription's comment, [`STARTED`]);
//! * lag: [`crate::replication::replication_lag`] of the slot on blue.
//!
//! The copy is over ("ready") when every table is `r` and the lag is under
//! `[cutover] max_lag_bytes_to_start`.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;

use super::schema::{read_marker, Stage};
use super::{PrepareError, Side};
use crate::config::Config;
use crate::replication::{self, ReplicationError};

/// Start of the subscription's comment, followed by unix milliseconds.
pub const STARTED: &str = "pgswitch prepare: initial copy started at unix ms";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No subscription on green.
    NotPrepared,
    /// The subscription exists but is disabled (a cutover disables it).
    Disabled,
    /// Some tables are not ready (prepare's data copy runs).
    Copying,
    /// The copy's marker is on green, no subscription, and no session of
    /// prepare's programs: a killed run (a re-run copies again).
    Interrupted,
    /// Every table is ready, the lag is over the limit.
    CatchingUp,
    Ready,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NotPrepared => "not_prepared",
            Phase::Disabled => "disabled",
            Phase::Copying => "copying",
            Phase::Interrupted => "interrupted",
            Phase::CatchingUp => "catching_up",
            Phase::Ready => "ready",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TableProgress {
    pub table: String,
    /// During prepare's copy: pending, copying, copied; then
    /// `pg_subscription_rel.srsubstate`, spelled out: init, data_copy,
    /// finished_copy, synced, ready.
    pub state: &'static str,
    pub bytes_copied: i64,
    pub bytes_total: i64,
    pub rows_copied: Option<i64>,
    pub rows_total: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub subscription: String,
    pub phase: Phase,
    pub done: bool,
    pub tables_total: usize,
    pub tables_ready: usize,
    pub tables_copying: usize,
    pub bytes_copied: i64,
    pub bytes_total: i64,
    pub percent: f64,
    /// Rows copied (tables past the copy count their estimate).
    pub rows_copied: i64,
    /// Sum of the known estimates.
    pub rows_total: i64,
    /// Since the subscription was created, when prepare created it.
    pub elapsed_seconds: Option<f64>,
    pub bytes_per_second: Option<f64>,
    pub rows_per_second: Option<f64>,
    /// While copying: bytes left over the rate.
    pub eta_seconds: Option<f64>,
    pub lag_bytes: Option<u64>,
    pub max_lag_bytes: u64,
    /// Tablesync workers running now (during prepare's copy: its COPYs).
    pub sync_workers: i64,
    pub tables: Vec<TableProgress>,
}

fn state_name(s: &str) -> &'static str {
    match s {
        "i" => "init",
        "d" => "data_copy",
        "f" => "finished_copy",
        "s" => "synced",
        "r" => "ready",
        _ => "unknown",
    }
}

fn sql(side: Side, step: &'static str) -> impl Fn(tokio_postgres::Error) -> PrepareError {
    move |e| PrepareError::query(side, ReplicationError::sql(step, e))
}

/// The progress of the initial copy, from both servers (admin connections
/// to the replicated database).
pub async fn progress(
    config: &Config,
    blue: &Client,
    green: &Client,
) -> Result<Progress, PrepareError> {
    let r = &config.replication;
    let step = "copy progress";
    let sub = green
        .query_opt(
            "SELECT s.subenabled, obj_description(s.oid, 'pg_subscription'), \
                    (SELECT count(*) FROM pg_catalog.pg_stat_subscription w \
                      WHERE w.subid = s.oid AND w.relid IS NOT NULL AND w.pid IS NOT NULL), \
                    extract(epoch FROM clock_timestamp())::float8 \
               FROM pg_catalog.pg_subscription s \
              WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database \
                                                     WHERE datname = current_database())",
            &[&r.subscription],
        )
        .await
        .map_err(sql(Side::Green, step))?;
    let mut p = Progress {
        subscription: r.subscription.clone(),
        phase: Phase::NotPrepared,
        done: false,
        tables_total: 0,
        tables_ready: 0,
        tables_copying: 0,
        bytes_copied: 0,
        bytes_total: 0,
        percent: 0.0,
        rows_copied: 0,
        rows_total: 0,
        elapsed_seconds: None,
        bytes_per_second: None,
        rows_per_second: None,
        eta_seconds: None,
        lag_bytes: None,
        max_lag_bytes: config.cutover.max_lag_bytes_to_start,
        sync_workers: 0,
        tables: Vec::new(),
    };
    let Some(sub) = sub else {
        return copy_progress(config, blue, green, p).await;
    };
    let enabled: bool = sub.try_get(0).map_err(sql(Side::Green, step))?;
    let comment: Option<String> = sub.try_get(1).map_err(sql(Side::Green, step))?;
    p.sync_workers = sub.try_get(2).map_err(sql(Side::Green, step))?;
    let now: f64 = sub.try_get(3).map_err(sql(Side::Green, step))?;
    let started_ms = comment
        .as_deref()
        .and_then(|c| c.strip_prefix(STARTED))
        .and_then(|t| t.trim().parse::<f64>().ok());
    p.elapsed_seconds = started_ms.map(|ms| (now - ms / 1000.0).max(0.0));

    let green_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&r.subscription];
    let (totals, green_rows) = tokio::join!(
        blue_totals(blue, &r.publication),
        green.query(
            "SELECT format('%I.%I', n.nspname, c.relname), rel.srsubstate::text, \
                    pg_catalog.pg_relation_size(c.oid), \
                    (SELECT max(pc.tuples_processed) FROM pg_catalog.pg_stat_progress_copy pc \
                      WHERE pc.relid = c.oid) \
               FROM pg_catalog.pg_subscription s \
               JOIN pg_catalog.pg_subscription_rel rel ON rel.srsubid = s.oid \
               JOIN pg_catalog.pg_class c ON c.oid = rel.srrelid \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database \
                                                     WHERE datname = current_database()) \
              ORDER BY 1",
            &green_params,
        )
    );
    let totals = totals?;
    for row in green_rows.map_err(sql(Side::Green, step))? {
        let table: String = row.try_get(0).map_err(sql(Side::Green, step))?;
        let state: String = row.try_get(1).map_err(sql(Side::Green, step))?;
        let green_bytes: i64 = row.try_get(2).map_err(sql(Side::Green, step))?;
        let copying_rows: Option<i64> = row.try_get(3).map_err(sql(Side::Green, step))?;
        let (bytes_total, rows_total) = totals.get(&table).copied().unwrap_or((0, -1));
        let rows_total = (rows_total >= 0).then_some(rows_total);
        let state = state_name(&state);
        let (bytes_copied, rows_copied) = match state {
            "init" => (0, Some(0)),
            "data_copy" => (green_bytes.min(bytes_total), copying_rows.or(Some(0))),
            _ => (bytes_total, rows_total),
        };
        if state == "ready" {
            p.tables_ready += 1;
        } else if state == "data_copy" {
            p.tables_copying += 1;
        }
        p.bytes_total += bytes_total;
        p.bytes_copied += bytes_copied;
        p.rows_total += rows_total.unwrap_or(0);
        p.rows_copied += rows_copied.unwrap_or(0);
        p.tables.push(TableProgress {
            table,
            state,
            bytes_copied,
            bytes_total,
            rows_copied,
            rows_total,
        });
    }
    finish(config, blue, p, enabled).await
}

/// Blue's published tables: heap bytes and `reltuples` by name.
async fn blue_totals(
    blue: &Client,
    publication: &str,
) -> Result<HashMap<String, (i64, i64)>, PrepareError> {
    let step = "copy progress";
    let rows = blue
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), pg_catalog.pg_relation_size(c.oid), \
                    c.reltuples::int8 \
               FROM pg_catalog.pg_publication_tables pt \
               JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
              WHERE pt.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql(Side::Blue, step))?;
    let mut totals = HashMap::new();
    for row in rows {
        let name: String = row.try_get(0).map_err(sql(Side::Blue, step))?;
        let bytes: i64 = row.try_get(1).map_err(sql(Side::Blue, step))?;
        let rows: i64 = row.try_get(2).map_err(sql(Side::Blue, step))?;
        totals.insert(name, (bytes, rows));
    }
    Ok(totals)
}

/// The progress of prepare's own data copy (no subscription yet).
async fn copy_progress(
    config: &Config,
    blue: &Client,
    green: &Client,
    mut p: Progress,
) -> Result<Progress, PrepareError> {
    let step = "copy progress";
    let Some(marker) = read_marker(green).await? else {
        return Ok(p);
    };
    if !matches!(
        marker.stage,
        Stage::Copying | Stage::DataCopied | Stage::PostData
    ) {
        return Ok(p);
    }
    let all_copied = marker.stage != Stage::Copying;
    let (totals, green_rows) = tokio::join!(
        blue_totals(blue, &config.replication.publication),
        green.query(
            "SELECT format('%I.%I', n.nspname, c.relname), pg_catalog.pg_relation_size(c.oid), \
                    (SELECT max(pc.tuples_processed) FROM pg_catalog.pg_stat_progress_copy pc \
                      WHERE pc.relid = c.oid), \
                    extract(epoch FROM clock_timestamp())::float8, \
                    (SELECT count(*) FROM pg_catalog.pg_stat_activity a \
                      WHERE a.application_name = $1 AND a.datname = current_database()) \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind = 'r'",
            &[&super::tools::APPLICATION_NAME],
        )
    );
    let totals = totals?;
    let mut on_green: HashMap<String, (i64, Option<i64>)> = HashMap::new();
    let (mut now, mut sessions) = (0.0, 0);
    for row in green_rows.map_err(sql(Side::Green, step))? {
        let table: String = row.try_get(0).map_err(sql(Side::Green, step))?;
        let bytes: i64 = row.try_get(1).map_err(sql(Side::Green, step))?;
        let copying: Option<i64> = row.try_get(2).map_err(sql(Side::Green, step))?;
        now = row.try_get(3).map_err(sql(Side::Green, step))?;
        sessions = row.try_get(4).map_err(sql(Side::Green, step))?;
        on_green.insert(table, (bytes, copying));
    }
    let mut names: Vec<&String> = totals.keys().collect();
    names.sort();
    for table in names {
        let (bytes_total, rows_total) = totals.get(table).copied().unwrap_or((0, -1));
        let rows_total = (rows_total >= 0).then_some(rows_total);
        let (green_bytes, copying) = on_green.get(table).copied().unwrap_or((0, None));
        let (state, bytes_copied, rows_copied) = match copying {
            Some(rows) if !all_copied => ("copying", green_bytes.min(bytes_total), Some(rows)),
            _ if all_copied || green_bytes > 0 => ("copied", bytes_total, rows_total),
            _ => ("pending", 0, Some(0)),
        };
        match state {
            "copied" => p.tables_ready += 1,
            "copying" => p.tables_copying += 1,
            _ => {}
        }
        p.bytes_total += bytes_total;
        p.bytes_copied += bytes_copied;
        p.rows_total += rows_total.unwrap_or(0);
        p.rows_copied += rows_copied.unwrap_or(0);
        p.tables.push(TableProgress {
            table: table.clone(),
            state,
            bytes_copied,
            bytes_total,
            rows_copied,
            rows_total,
        });
    }
    p.sync_workers = p.tables_copying as i64;
    p.elapsed_seconds = marker
        .since_ms
        .map(|ms| (now - ms as f64 / 1000.0).max(0.0));
    let mut p = finish(config, blue, p, true).await?;
    // Ten seconds of grace: pg_restore connects once pg_dump has read
    // blue's catalog.
    p.phase = if sessions == 0 && p.elapsed_seconds.is_some_and(|e| e > 10.0) {
        Phase::Interrupted
    } else {
        Phase::Copying
    };
    p.done = false;
    Ok(p)
}

/// Percent, rate, time left, lag and phase, from the tables' figures.
async fn finish(
    config: &Config,
    blue: &Client,
    mut p: Progress,
    enabled: bool,
) -> Result<Progress, PrepareError> {
    let r = &config.replication;
    p.tables_total = p.tables.len();
    p.percent = if p.bytes_total > 0 {
        (100.0 * p.bytes_copied as f64 / p.bytes_total as f64).min(100.0)
    } else if p.tables_ready == p.tables_total {
        100.0
    } else {
        0.0
    };
    let all_ready = p.tables_ready == p.tables_total;
    if let Some(elapsed) = p.elapsed_seconds.filter(|e| *e > 0.0 && !all_ready) {
        let rate = p.bytes_copied as f64 / elapsed;
        p.bytes_per_second = Some(rate);
        p.rows_per_second = Some(p.rows_copied as f64 / elapsed);
        p.eta_seconds = (rate > 0.0).then(|| (p.bytes_total - p.bytes_copied).max(0) as f64 / rate);
    }
    p.lag_bytes = match replication::replication_lag(blue, r.slot()).await {
        Ok(lag) => Some(lag.bytes),
        Err(ReplicationError::NotFound { .. }) => None,
        Err(e) => return Err(PrepareError::query(Side::Blue, e)),
    };
    p.phase = if !enabled {
        Phase::Disabled
    } else if !all_ready {
        Phase::Copying
    } else if p.lag_bytes.is_none_or(|l| l > p.max_lag_bytes) {
        Phase::CatchingUp
    } else {
        Phase::Ready
    };
    p.done = p.phase == Phase::Ready;
    Ok(p)
}

/// Bytes for people: `512 B`, `1.5 MB` (1 MB = 1024 × 1024 bytes).
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Progress {
    /// One line: tables, bytes and rows of the total, rate, time left, lag.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}: {}/{} tables ready, {} of {} ({:.0}%), {} of ~{} rows",
            self.phase.as_str(),
            self.tables_ready,
            self.tables_total,
            human_bytes(self.bytes_copied as f64),
            human_bytes(self.bytes_total as f64),
            self.percent,
            self.rows_copied,
            self.rows_total
        );
        if let Some(rate) = self.bytes_per_second {
            s.push_str(&format!(", {}/s", human_bytes(rate)));
        }
        if let Some(rows) = self.rows_per_second {
            s.push_str(&format!(", {rows:.0} rows/s"));
        }
        if let Some(eta) = self.eta_seconds {
            s.push_str(&format!(", about {eta:.0} s left"));
        }
        match self.lag_bytes {
            Some(lag) => s.push_str(&format!(", lag {}", human_bytes(lag as f64))),
            None => s.push_str(", no slot"),
        }
        s
    }
}
