//! Step 4: the initial copy and the subscription, from what green's
//! [`Marker`] says was done:
//!
//! | stage (no subscription)      | green's tables hold         | this run                      |
//! |------------------------------|-----------------------------|-------------------------------|
//! | pre-data                     | nothing (else: refused)     | copy                          |
//! | copying                      | part of a killed copy       | truncate, drop the slot, copy |
//! | data copied / post-data, slot still at the recorded consistent point | blue's rows at that point | keep them |
//! | data copied / post-data, slot gone or moved | rows the slot no longer matches | truncate, drop the slot, copy |
//! | subscribed (or an older pgswitch's marker) | what replication and applications wrote | refused if any row, else copy |
//!
//! Why keep a copy whose snapshot is gone: the snapshot only had to live
//! while pg_dump read it; what ties the data to the slot is the slot's
//! consistent point, and a slot no subscription reads stays there. So the
//! copy is reused when the slot's `confirmed_flush_lsn` is still the one
//! recorded with the copy, and redone otherwise.
//!
//! A copy: the slot (and its exported snapshot) on blue, the marker
//! `copying`, the data ([`snapshot::copy_data`], progress shown meanwhile),
//! `data copied`, the snapshot's session ended, post-data (`post-data`),
//! then `CREATE SUBSCRIPTION .. (copy_data = false, create_slot = false)`
//! and `subscribed` in one transaction.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::objects;
use super::progress::{self, human_bytes};
use super::schema::{self, Marker, Section, Stage};
use super::snapshot;
use super::tools::{Target, Tools};
use super::{Display, PrepareError, Report};
use crate::config::Config;
use crate::replication;

/// What [`run`] needs.
pub struct Context<'a> {
    pub config: &'a Config,
    pub tools: &'a Tools,
    pub blue: &'a Client,
    pub green: &'a Client,
    pub blue_target: &'a Target,
    pub green_target: &'a Target,
    pub binary: bool,
}

/// When this run's copy started and when green had every row indexed
/// (the subscription created), when it copied.
pub type CopyTimes = Option<(Instant, Instant)>;

const POLL: Duration = Duration::from_millis(250);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Copies what is missing and creates the subscription (green has none).
pub async fn run(
    cx: &Context<'_>,
    marker: Marker,
    report: &mut Report,
    display: &mut Display,
) -> Result<CopyTimes, PrepareError> {
    let database = &cx.config.replication.database;
    let subscription = &cx.config.replication.subscription;
    let slot = cx.config.replication.slot();
    let reusable = match (&marker.stage, &marker.slot_lsn) {
        (Stage::DataCopied | Stage::PostData, Some(lsn)) => {
            snapshot::slot_at(cx.blue, slot, lsn).await?
        }
        _ => false,
    };
    let mut times = None;
    let mut marker = marker;
    if reusable {
        report.step(
            display,
            "data",
            false,
            format!(
                "copied by an earlier run for slot {slot:?} at {} (still there)",
                marker.slot_lsn.as_deref().unwrap_or("?")
            ),
        );
    } else {
        match marker.stage {
            // Green had no rows when the pre-data was restored, nor when the
            // subscription was dropped: rows now are someone else's.
            Stage::PreData | Stage::Subscribed => {
                let with_rows = objects::green_tables_with_rows(cx.green).await?;
                if !with_rows.is_empty() {
                    return Err(PrepareError::GreenHasRows {
                        subscription: subscription.clone(),
                        tables: with_rows,
                    });
                }
            }
            Stage::Copying | Stage::DataCopied | Stage::PostData => {
                let emptied = snapshot::truncate_tables(cx.green).await?;
                report.step(
                    display,
                    "truncate",
                    emptied > 0,
                    format!(
                        "{emptied} table(s) held a copy no slot matches (a killed run's): emptied"
                    ),
                );
            }
        }
        let dropped = objects::drop_orphaned_slots(cx.blue, cx.green, slot).await?;
        if !dropped.is_empty() {
            report.step(
                display,
                "slots",
                true,
                format!(
                    "dropped slots on blue left by an earlier run: {}",
                    dropped.join(", ")
                ),
            );
        }
        let started = Instant::now();
        let session = snapshot::create_slot(cx.tools, cx.blue_target, database, slot).await?;
        marker = Marker {
            stage: Stage::Copying,
            post_data: marker.post_data,
            slot_lsn: Some(session.lsn.clone()),
            since_ms: Some(now_ms()),
        };
        schema::set_marker(cx.green, database, &marker).await?;
        let copied = follow(cx, &session.snapshot, marker.post_data, display).await;
        session.finish().await;
        copied?;
        marker.stage = Stage::DataCopied;
        schema::set_marker(cx.green, database, &marker).await?;
        report.step(
            display,
            "data",
            true,
            format!(
                "copied as of slot {slot:?}'s consistent point {} (pg_dump --data-only \
                 --snapshot | pg_restore, {:.1} s)",
                marker.slot_lsn.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64()
            ),
        );
        times = Some((started, started));
    }
    if !marker.post_data {
        marker.stage = Stage::PostData;
        marker.post_data = true;
        let t = Instant::now();
        let size = schema::restore(
            cx.tools,
            cx.blue_target,
            cx.green_target,
            database,
            Section::PostData,
            &marker,
        )
        .await?;
        report.step(
            display,
            "post-data",
            true,
            format!(
                "restored {} of indexes, constraints and triggers ({:.1} s)",
                human_bytes(size as f64),
                t.elapsed().as_secs_f64()
            ),
        );
    }
    let conninfo = replication::conninfo(
        &cx.config.backends.blue,
        database,
        cx.config.replication.password_in_catalog,
    );
    marker.stage = Stage::Subscribed;
    objects::create_subscription(
        cx.green,
        &objects::NewSubscription {
            name: subscription,
            conninfo: &conninfo,
            publication: &cx.config.replication.publication,
            slot,
            binary: cx.binary,
            started_ms: marker.since_ms.unwrap_or_else(now_ms),
            database,
            marker: &marker,
        },
    )
    .await?;
    report.step(
        display,
        "subscription",
        true,
        format!(
            "{subscription:?} on green created (slot {slot:?} on blue, copy_data = false, \
             binary = {}{})",
            cx.binary,
            if cx.config.replication.password_in_catalog {
                ""
            } else {
                ", no password in the catalog"
            }
        ),
    );
    Ok(times.map(|(started, _)| (started, Instant::now())))
}

/// Runs the data copy, showing its progress meanwhile.
async fn follow(
    cx: &Context<'_>,
    snapshot_name: &str,
    no_triggers: bool,
    display: &mut Display,
) -> Result<(), PrepareError> {
    let copy = snapshot::copy_data(
        cx.tools,
        cx.blue_target,
        cx.green_target,
        &cx.config.replication.database,
        snapshot_name,
        no_triggers,
    );
    tokio::pin!(copy);
    loop {
        tokio::select! {
            done = &mut copy => return done,
            _ = tokio::time::sleep(POLL) => {
                // A failed read of the figures does not stop the copy.
                if let Ok(p) = progress::progress(cx.config, cx.blue, cx.green).await {
                    display.progress(&p);
                }
            }
        }
    }
}
