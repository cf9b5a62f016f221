//! `pgswitch verify`: do blue and green hold the same data? Table by table,
//! row counts and a content checksum computed in each database over ranges
//! of the primary key (chunks: one short statement each, no long lock), a
//! differing chunk narrowed by bisection to the keys that differ.
//! Read-only, except the catch-up marks on the publisher while replication
//! is live (an empty logical message, as a cutover's catch-up writes).
//!
//! Control plane, upgrade lifecycle (issue 15, part 3). The pieces:
//! [`checksum`] (the SQL: pinned session settings, row hash, chunk
//! checksum), [`chunk`] (chunk planning, re-check, bisection, per-row
//! comparison), [`report`].
//!
//! The live direction follows the active side (the state file, else
//! `[cutover] active`): blue active, green's subscription
//! `[replication] subscription` from slot `[replication] slot` on blue;
//! green active, blue's `pgswitch_reverse`. When that subscription does not
//! stream, the comparison runs once with no re-check, and the report says so.

pub mod checksum;
pub mod chunk;
pub mod report;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::{Config, Side};
use crate::replication::connect_side;
use crate::replication::{self, ReplicationError, ReverseNames};
use crate::state;
use checksum::{Key, Range, TableSql};
use chunk::{Live, Outcome, Sides};
pub use report::{Report, Status, TableReport};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Connect(String),
    #[error("{side}: {source}")]
    Query {
        side: Side,
        source: ReplicationError,
    },
    #[error("waiting for the subscriber to catch up: {0}")]
    CatchUp(ReplicationError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("no table {0} on blue or green")]
    NoSuchTable(String),
    #[error("{0}")]
    Options(String),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    #[error("a verify job stopped: {0}")]
    Job(String),
}

/// The command line's choices.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these tables (`schema.table`, or `table` for `public.table`).
    pub tables: Option<Vec<String>>,
    /// About this many rows per chunk.
    pub chunk_rows: u64,
    /// Chunks compared at once (each with its own connection to each side).
    pub jobs: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tables: None,
            chunk_rows: 100_000,
            jobs: 2,
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An admin connection with the pinned session settings.
async fn connect(config: &Config, side: Side) -> Result<Client, VerifyError> {
    let c = connect_side(config, side, CONNECT_TIMEOUT)
        .await
        .map_err(VerifyError::Connect)?;
    c.batch_execute(checksum::SESSION)
        .await
        .map_err(checksum::sql_err(side, "pin the session settings"))?;
    Ok(c)
}

async fn connect_pair(config: &Config) -> Result<Sides, VerifyError> {
    let (blue, green) =
        tokio::try_join!(connect(config, Side::Blue), connect(config, Side::Green))?;
    Ok(Sides { blue, green })
}

/// The active side: the state file's, else `[cutover] active`.
fn active_side(config: &Config) -> Result<Side, VerifyError> {
    Ok(match &config.cutover.state_file {
        Some(path) => state::load(path)?.map_or(config.cutover.active, |s| s.active),
        None => config.cutover.active,
    })
}

/// One table to compare.
struct Table {
    name: String,
    sql: Option<TableSql>,
    key: Option<Vec<String>>,
    status: Status,
    note: Option<String>,
    chunks: Vec<Range>,
}

/// Compares every table (or those of `options.tables`) on both sides.
pub async fn run(config: &Config, options: &Options) -> Result<Report, VerifyError> {
    if options.jobs == 0 || options.chunk_rows == 0 {
        return Err(VerifyError::Options(
            "--jobs and --chunk-rows must be at least 1".into(),
        ));
    }
    let started = Instant::now();
    let publisher = active_side(config)?;
    let (subscription, slot) = match publisher {
        Side::Blue => (
            config.replication.subscription.clone(),
            config.replication.slot().to_string(),
        ),
        Side::Green => {
            let names = ReverseNames::new("");
            (names.subscription, names.slot)
        }
    };
    let control = connect_pair(config).await?;
    let (pub_client, sub_client) = match publisher {
        Side::Blue => (&control.blue, &control.green),
        Side::Green => (&control.green, &control.blue),
    };
    let status = replication::subscription_status(sub_client, &subscription)
        .await
        .map_err(|source| VerifyError::Query {
            side: publisher.other(),
            source,
        })?;
    let live = if status.exists && status.enabled && status.streaming {
        // Before the first read of any table.
        let mark = replication::flush_and_mark(pub_client)
            .await
            .map_err(|source| VerifyError::Query {
                side: publisher,
                source,
            })?;
        Some(Live {
            publisher,
            subscription: subscription.clone(),
            slot,
            mark,
        })
    } else {
        None
    };
    let tables = plan_tables(&control, options).await?;

    // The work: every chunk of every table, shared by the jobs.
    let mut queue = VecDeque::new();
    for (ti, t) in tables.iter().enumerate() {
        for (ci, r) in t.chunks.iter().enumerate() {
            queue.push_back((ti, ci, r.clone()));
        }
    }
    let jobs = options.jobs.min(queue.len()).max(1);
    let sqls: Arc<Vec<Option<TableSql>>> = Arc::new(tables.iter().map(|t| t.sql.clone()).collect());
    let queue = Arc::new(Mutex::new(queue));
    let live = Arc::new(live);
    let mut connections = Vec::new();
    for _ in 0..jobs {
        connections.push(connect_pair(config));
    }
    let mut set = tokio::task::JoinSet::new();
    for pending in connections {
        let sides = pending.await?;
        let (sqls, queue, live) = (sqls.clone(), queue.clone(), live.clone());
        set.spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((ti, ci, range)) = next else {
                    return Ok::<_, VerifyError>(done);
                };
                let Some(Some(sql)) = sqls.get(ti) else {
                    continue;
                };
                let outcome = sides.chunk(live.as_ref().as_ref(), sql, &range).await?;
                done.push((ti, ci, outcome));
            }
        });
    }
    let mut outcomes: BTreeMap<(usize, usize), Outcome> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let done = joined.map_err(|e| VerifyError::Job(e.to_string()))??;
        outcomes.extend(done.into_iter().map(|(ti, ci, o)| ((ti, ci), o)));
    }
    let elapsed = started.elapsed();
    let reports: Vec<TableReport> = tables
        .iter()
        .enumerate()
        .map(|(ti, t)| table_report(ti, t, &outcomes))
        .collect();
    let rows = reports
        .iter()
        .map(|t| t.blue_rows.max(t.green_rows))
        .sum::<i64>();
    Ok(Report {
        replication: report::Replication {
            direction: match publisher {
                Side::Blue => "forward",
                Side::Green => "reverse",
            },
            publisher,
            subscription,
            live: live.is_some(),
            mark_lsn: live.as_ref().as_ref().map(|l| l.mark.to_string()),
        },
        equal: reports
            .iter()
            .all(|t| matches!(t.status, Status::Ok | Status::Unsettled)),
        tables: reports,
        jobs,
        chunk_rows: options.chunk_rows,
        elapsed_ms: elapsed.as_secs_f64() * 1000.0,
        rows_per_second: rows as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// The tables to compare, their SQL and chunks.
async fn plan_tables(control: &Sides, options: &Options) -> Result<Vec<Table>, VerifyError> {
    let (on_blue, on_green) = tokio::try_join!(
        checksum::tables(&control.blue, Side::Blue),
        checksum::tables(&control.green, Side::Green)
    )?;
    let mut names: Vec<(String, String)> = on_blue.iter().chain(on_green.iter()).cloned().collect();
    names.sort();
    names.dedup();
    if let Some(wanted) = &options.tables {
        let full = |w: &str| match w.split_once('.') {
            Some((s, t)) => (s.to_string(), t.to_string()),
            None => ("public".to_string(), w.to_string()),
        };
        let wanted: Vec<(String, String)> = wanted.iter().map(|w| full(w.trim())).collect();
        if let Some((s, t)) = wanted.iter().find(|w| !names.contains(w)) {
            return Err(VerifyError::NoSuchTable(format!("{s}.{t}")));
        }
        names.retain(|n| wanted.contains(n));
    }
    let mut tables = Vec::new();
    for (schema, name) in names {
        let display = format!("{schema}.{name}");
        let missing = |status| Table {
            name: display.clone(),
            sql: None,
            key: None,
            status,
            note: None,
            chunks: Vec::new(),
        };
        if !on_green.contains(&(schema.clone(), name.clone())) {
            tables.push(missing(Status::MissingOnGreen));
            continue;
        }
        if !on_blue.contains(&(schema.clone(), name.clone())) {
            tables.push(missing(Status::MissingOnBlue));
            continue;
        }
        let (blue, green) = tokio::try_join!(
            checksum::shape(&control.blue, Side::Blue, &schema, &name),
            checksum::shape(&control.green, Side::Green, &schema, &name)
        )?;
        let row_hash = match checksum::row_hash(&blue.columns, &green.columns) {
            Ok(h) => h,
            Err(columns) => {
                let mut t = missing(Status::ColumnsDiffer);
                t.note = Some(if columns.is_empty() {
                    "the table has no columns".into()
                } else {
                    format!("columns: {}", columns.join(", "))
                });
                if columns.is_empty() {
                    t.status = Status::Ok;
                }
                tables.push(t);
                continue;
            }
        };
        let key = blue.key.as_ref().map(|k| Key::new(k, &blue.columns));
        let key_types: Vec<u32> = blue
            .key
            .iter()
            .flatten()
            .filter_map(|k| {
                blue.columns
                    .iter()
                    .find(|c| &c.name == k)
                    .map(|c| c.type_oid)
            })
            .collect();
        let sql = TableSql {
            qualified: checksum::qualified(&schema, &name),
            row_hash,
            key,
        };
        let chunks = chunk::plan(
            &control.blue,
            &sql,
            &key_types,
            blue.estimate,
            options.chunk_rows,
        )
        .await?;
        let note = blue.key.is_none().then(|| {
            "no primary key or replica identity index: whole-table count and checksum only"
                .to_string()
        });
        tables.push(Table {
            name: display,
            key: blue.key.clone(),
            sql: Some(sql),
            status: Status::Ok,
            note,
            chunks,
        });
    }
    Ok(tables)
}

fn table_report(ti: usize, t: &Table, outcomes: &BTreeMap<(usize, usize), Outcome>) -> TableReport {
    let mut r = TableReport {
        table: t.name.clone(),
        key: t.key.clone(),
        status: t.status,
        blue_rows: 0,
        green_rows: 0,
        chunks: t.chunks.len(),
        rechecked_chunks: 0,
        differences: Vec::new(),
        note: t.note.clone(),
    };
    let mut unsettled = 0;
    for (ci, range) in t.chunks.iter().enumerate() {
        let Some(o) = outcomes.get(&(ti, ci)) else {
            continue;
        };
        r.blue_rows += o.blue.rows;
        r.green_rows += o.green.rows;
        if o.rechecks > 0 {
            r.rechecked_chunks += 1;
        }
        if let Some(d) = &o.differences {
            if d.whole_table_unsettled {
                r.status = Status::Unsettled;
                continue;
            }
            if !d.is_empty() || t.key.is_none() {
                r.status = Status::Differs;
            }
            unsettled += d.unsettled.len();
            r.differences.push(report::ChunkDifference {
                range: range.clone(),
                blue_rows: o.blue.rows,
                green_rows: o.green.rows,
                keys: d.clone(),
            });
        }
    }
    if unsettled > 0 {
        let note = format!(
            "{unsettled} key(s) changed on the publisher at each of {} reads: still being replicated, not counted as differences",
            chunk::MAX_RECHECKS
        );
        r.note = Some(match r.note.take() {
            Some(n) => format!("{n}; {note}"),
            None => note,
        });
    }
    r
}
