//! `pgswitch check`: is the pair ready for a switch? A table of checks
//! against both servers, each pass, warn or fail with what an operator
//! needs to act (the object, the fix). Read-only: it changes nothing.
//!
//! The checks look at a [`Target`]: traffic on one side, the other kept in
//! sync by a subscription. `pgswitch check` and `GET /check` look at the
//! direction that is live now; every cutover and fallback runs the same
//! checks in its preflight and refuses on a failed one (unless forced).
//!
//! Schema changes on the old side since `prepare` are found by comparing the
//! two catalogs (green's schema is prepare's copy, so it is the fingerprint),
//! not by an event trigger: a trigger would be one more pgswitch object on
//! the application's server, firing on every DDL, that pg_dump copies too.

mod drift;
mod servers;
mod sessions;
mod stream;
mod tables;

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, Side};
use crate::replication::{self, connect_side, ReplicationError};

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
    /// The failed checks.
    pub fn failed(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Fail)
    }

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

/// What the checks look at: traffic on `from`; `to` kept in sync by
/// `subscription` (on `to`), which reads `slot` (on `from`).
#[derive(Debug, Clone)]
pub struct Target {
    pub from: Side,
    pub to: Side,
    pub subscription: String,
    pub slot: String,
}

impl Target {
    /// The live direction when `active` serves the traffic: forward (the
    /// configured subscription) from blue, reverse from green.
    pub fn for_active(config: &Config, active: Side) -> Target {
        match active {
            Side::Blue => Target {
                from: Side::Blue,
                to: Side::Green,
                subscription: config.replication.subscription.clone(),
                slot: config.replication.slot().to_owned(),
            },
            Side::Green => {
                let reverse = replication::ReverseNames::new("");
                Target {
                    from: Side::Green,
                    to: Side::Blue,
                    subscription: reverse.subscription,
                    slot: reverse.slot,
                }
            }
        }
    }
}

/// The server connections of a serving pgswitch, by side, as
/// `pg_stat_activity` shows them (`host(client_addr):client_port`): its
/// own sessions, which the session checks leave out. Empty offline.
#[derive(Debug, Clone, Default)]
pub struct OwnSessions {
    pub blue: Vec<String>,
    pub green: Vec<String>,
}

impl OwnSessions {
    fn of(&self, side: Side) -> &[String] {
        match side {
            Side::Blue => &self.blue,
            Side::Green => &self.green,
        }
    }
}

/// The active side: the state file's, else `[cutover] active`.
pub fn active_side(config: &Config) -> Side {
    config
        .cutover
        .state_file
        .as_deref()
        .and_then(|path| crate::state::load(path).ok().flatten())
        .map(|state| state.active)
        .unwrap_or(config.cutover.active)
}

/// Runs every check against both sides, for the direction live now.
pub async fn run(config: &Config, own: &OwnSessions) -> Result<Report, CheckError> {
    let target = Target::for_active(config, active_side(config));
    let (from, to) = tokio::try_join!(
        connect_side(config, target.from, CONNECT_TIMEOUT),
        connect_side(config, target.to, CONNECT_TIMEOUT)
    )
    .map_err(CheckError::Connect)?;
    let mut r = Findings(run_on(config, &target, &from, &to, own).await?.findings);
    state_file(&mut r, config);
    Ok(Report { findings: r.0 })
}

/// Every check but the state file's, on connections already open (a
/// switch's preflight, which handles the state file itself).
pub async fn run_on(
    config: &Config,
    target: &Target,
    from: &Client,
    to: &Client,
    own: &OwnSessions,
) -> Result<Report, CheckError> {
    let mut r = Findings(Vec::new());
    for (side, c) in [(target.from, from), (target.to, to)] {
        servers::check(&mut r, config, side, c)
            .await
            .map_err(on(side))?;
    }
    stream::check(&mut r, config, target, from, to).await?;
    tables::check(&mut r, target.from, from)
        .await
        .map_err(on(target.from))?;
    sessions::bypassing(&mut r, config, target.from, from, own.of(target.from))
        .await
        .map_err(on(target.from))?;
    sessions::writes_on_target(&mut r, config, target.to, to, own.of(target.to))
        .await
        .map_err(on(target.to))?;
    sessions::roles(&mut r, config, target.to, to)
        .await
        .map_err(on(target.to))?;
    drift::schema(&mut r, target, from, to).await?;
    drift::sequences(&mut r, target, from, to).await?;
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
    texts_with(c, sql, &[], step).await
}

/// The first column of every row `sql` returns with `params`, as text.
async fn texts_with(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    step: &str,
) -> Result<Vec<String>, ReplicationError> {
    let rows = c
        .query(sql, params)
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
        Some(path) => match crate::state::check_writable(path) {
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
