//! Reverse replication (cutover step 6) and restoring the forward direction
//! after a fallback.
//!
//! # How a direction starts "exactly from the switch point"
//!
//! A subscriber asks its publisher's walsender to start at its replication
//! origin's position (`pg_<subscription oid>`), and logical decoding skips
//! every transaction whose commit record starts before that position
//! (`SnapBuildXactNeedsSkip`); the slot's `confirmed_flush_lsn` only matters
//! when it is further. So [`switch_direction`] stops the running direction,
//! reads the now-active side's WAL insert position `X` and advances the
//! starting subscription's origin to `X` before enabling it: the rows that
//! the stopped direction applied (all committed before `X`) are never sent
//! back, and every commit after the switch (starting at or after `X`) is.
//! The insert position, not `pg_current_wal_lsn()`: apply workers commit
//! with `synchronous_commit = off`, so their last commits can be inserted
//! but not yet written, and a write position before them would send them
//! back. `origin = none` would do the filtering on PostgreSQL 16+, but a
//! PostgreSQL 15 subscriber lacks it (and it also needs a 16+ publisher).
//!
//! The stopped direction's apply worker is terminated after its subscription
//! is disabled and the switch waits for it to be gone: a disabled
//! subscription's worker only notices at its next wake-up (up to a second
//! when idle), and an apply committing after `X` would be sent back.
//!
//! Everything costly is done before the pause by [`prepare_reverse`]:
//! creating a slot (tens of ms), and creating the subscription (it connects
//! to the new side to fetch its table list; with `connect = false` the table
//! list would stay empty and the apply worker would silently skip every
//! change until a `REFRESH PUBLICATION`, which is refused while disabled).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{ident, literal, Lsn, ReplicationError, Step};

/// Names of the reverse direction's objects, and how the old side reaches
/// the new side.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReverseNames {
    /// Publication on the new side (`FOR ALL TABLES`).
    pub publication: String,
    /// Logical slot on the new side (`pgoutput`).
    pub slot: String,
    /// Subscription on the old side.
    pub subscription: String,
    /// libpq connection string the old side's apply worker uses to reach
    /// the new side (a role with REPLICATION, or a superuser).
    pub conninfo: String,
}

impl ReverseNames {
    /// The default names, all `pgswitch_reverse`.
    pub fn new(conninfo: impl Into<String>) -> ReverseNames {
        ReverseNames {
            publication: "pgswitch_reverse".into(),
            slot: "pgswitch_reverse".into(),
            subscription: "pgswitch_reverse".into(),
            conninfo: conninfo.into(),
        }
    }
}

/// What [`prepare_reverse`] did (for the report; [`drop_direction`] undoes it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prepared {
    pub created_publication: bool,
    pub created_slot: bool,
    pub created_subscription: bool,
    /// Time spent creating the slot (zero when it existed).
    pub slot_creation: Duration,
    /// Where an existing, unused slot was advanced to (less WAL to decode and
    /// retain; everything before the coming switch point is skipped anyway).
    pub slot_advanced_to: Option<Lsn>,
}

/// The switch point of a direction change, and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwitchPoint {
    /// WAL insert position of the now-active side at the switch: the
    /// started direction replicates exactly the commits from here on.
    pub lsn: Lsn,
    /// Disabling the stopped subscription and waiting for its worker to exit.
    pub stop: Duration,
    /// Advancing the started subscription's origin and enabling it.
    pub start: Duration,
    pub total: Duration,
}

/// Reads oid, enabled flag, slot name and running worker pids of a
/// subscription in the connection's database.
async fn sub_info(
    c: &Client,
    subscription: &str,
    step: &str,
) -> Result<Option<(u32, bool, Option<String>, Vec<i32>)>, ReplicationError> {
    let row = c
        .query_opt(
            "SELECT s.oid, s.subenabled, s.subslotname::text, \
                    ARRAY(SELECT pid FROM pg_catalog.pg_stat_subscription st \
                           WHERE st.subid = s.oid AND st.pid IS NOT NULL) \
               FROM pg_catalog.pg_subscription s \
              WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database \
                                                     WHERE datname = current_database())",
            &[&subscription],
        )
        .await
        .step(step)?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some((
            r.try_get(0).step(step)?,
            r.try_get(1).step(step)?,
            r.try_get(2).step(step)?,
            r.try_get(3).step(step)?,
        ))),
    }
}

async fn publication_exists(
    c: &Client,
    publication: &str,
    step: &str,
) -> Result<bool, ReplicationError> {
    let row = c
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .step(step)?;
    Ok(row.try_get::<_, i64>(0).step(step)? > 0)
}

/// Terminates every worker of a (disabled) subscription and waits until
/// none runs, so that nothing applies through it any more.
async fn stop_workers(
    c: &Client,
    oid: u32,
    step: &str,
    deadline: Instant,
) -> Result<(), ReplicationError> {
    let stmt = c
        .prepare(
            "SELECT count(*), count(pg_catalog.pg_terminate_backend(pid)) \
               FROM pg_catalog.pg_stat_subscription WHERE subid = $1 AND pid IS NOT NULL",
        )
        .await
        .step(step)?;
    loop {
        let row = c.query_one(&stmt, &[&oid]).await.step(step)?;
        let running: i64 = row.try_get(0).step(step)?;
        if running == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ReplicationError::InvalidState(format!(
                "{step}: {running} worker(s) still running at the deadline"
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Disables `subscription` (when it exists) and waits until its workers are
/// gone. Returns whether it was enabled.
pub async fn stop_subscription(
    c: &Client,
    subscription: &str,
    timeout: Duration,
) -> Result<bool, ReplicationError> {
    let deadline = Instant::now() + timeout;
    let step = format!("disable subscription {subscription:?}");
    let Some((oid, enabled, _, workers)) = sub_info(c, subscription, &step).await? else {
        return Ok(false);
    };
    if enabled {
        c.batch_execute(&format!(
            "ALTER SUBSCRIPTION {} DISABLE",
            ident(subscription)
        ))
        .await
        .step(&step)?;
    }
    if enabled || !workers.is_empty() {
        let step = format!("stop the workers of {subscription:?}");
        stop_workers(c, oid, &step, deadline).await?;
    }
    Ok(enabled)
}

/// Enables `subscription` when it exists and is disabled; it resumes from
/// its own replication origin. Returns whether it was disabled.
pub async fn start_subscription(c: &Client, subscription: &str) -> Result<bool, ReplicationError> {
    let step = format!("enable subscription {subscription:?}");
    match sub_info(c, subscription, &step).await? {
        Some((_, false, _, _)) => {
            c.batch_execute(&format!(
                "ALTER SUBSCRIPTION {} ENABLE",
                ident(subscription)
            ))
            .await
            .step(&step)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Moves replication from one direction to the other at an exact point:
/// stops `stop_sub` on `stop_side` (the side that becomes the only writer),
/// takes `stop_side`'s WAL insert position as the switch point, advances the
/// origin of `start_sub` on `start_side` (which subscribes to `stop_side`)
/// to it and enables it. See the module docs for why this is exact.
///
/// `start_sub` must exist, disabled, with its slot on `stop_side`.
/// Enabling is asynchronous: the worker connects within tens of ms, after
/// the pause; commits made meanwhile are not missed (they start after `X`).
pub async fn switch_direction(
    stop_side: &Client,
    stop_sub: &str,
    start_side: &Client,
    start_sub: &str,
    timeout: Duration,
) -> Result<SwitchPoint, ReplicationError> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let step = format!("check subscription {start_sub:?}");
    let (start_oid, enabled, _, workers) = sub_info(start_side, start_sub, &step)
        .await?
        .ok_or_else(|| ReplicationError::NotFound {
            what: "subscription",
            name: start_sub.into(),
        })?;
    if enabled {
        return Err(ReplicationError::InvalidState(format!(
            "subscription {start_sub:?} is already enabled; the switch point must be set \
             while it is disabled"
        )));
    }
    if !workers.is_empty() {
        // Disabled moments ago; its worker must be gone before the origin
        // can be advanced (an origin in use can't be).
        stop_workers(start_side, start_oid, &step, deadline).await?;
    }

    let step = format!("disable subscription {stop_sub:?}");
    if sub_info(stop_side, stop_sub, &step).await?.is_none() {
        return Err(ReplicationError::NotFound {
            what: "subscription",
            name: stop_sub.into(),
        });
    }
    stop_subscription(
        stop_side,
        stop_sub,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await?;
    let stop = t0.elapsed();

    let t1 = Instant::now();
    let lsn = durable_insert_position(stop_side).await?;

    // One round trip: advance and enable in one transaction.
    start_side
        .batch_execute(&format!(
            "BEGIN; \
             SELECT pg_catalog.pg_replication_origin_advance('pg_{start_oid}', '{lsn}'); \
             ALTER SUBSCRIPTION {} ENABLE; \
             COMMIT",
            ident(start_sub)
        ))
        .await
        .step(&format!(
            "advance the origin of {start_sub:?} to {lsn} and enable it"
        ))?;
    Ok(SwitchPoint {
        lsn,
        stop,
        start: t1.elapsed(),
        total: t0.elapsed(),
    })
}

/// Reads the WAL insert position `X` and makes the server's WAL durable
/// past it before returning: a transactional logical message committed
/// under `synchronous_commit = on` (the control connections' setting) after
/// `X` is read flushes everything before it. Without the flush, a crash of
/// the server right after the switch can restart its WAL below `X` (apply
/// workers commit asynchronously), and the direction started at `X` would
/// skip the server's first commits after the restart.
async fn durable_insert_position(c: &Client) -> Result<Lsn, ReplicationError> {
    let step = "read the switch point and flush the WAL up to it";
    let messages = c
        .simple_query(
            "BEGIN; SELECT pg_catalog.pg_current_wal_insert_lsn()::text; \
             SELECT pg_catalog.pg_logical_emit_message(true, 'pgswitch', 'switch point'); \
             COMMIT",
        )
        .await
        .step(step)?;
    super::first_lsn(&messages, step)
}

/// Prepares the reverse direction ahead of the pause (idempotent): on the new
/// side a publication `FOR ALL TABLES` and a `pgoutput` slot, on the old side
/// a disabled subscription using that slot with no initial copy.
///
/// An existing unused slot is advanced to the current flush position (less
/// WAL to keep and to decode at activation; the origin advance skips that
/// part anyway). Refuses when the reverse subscription is already enabled.
pub async fn prepare_reverse(
    new_side: &Client,
    old_side: &Client,
    names: &ReverseNames,
) -> Result<Prepared, ReplicationError> {
    let mut done = Prepared::default();

    let step = format!("check reverse subscription {:?}", names.subscription);
    let existing = sub_info(old_side, &names.subscription, &step).await?;
    if let Some((_, enabled, slot, _)) = &existing {
        if *enabled {
            return Err(ReplicationError::InvalidState(format!(
                "reverse subscription {:?} is enabled: reverse replication is already active",
                names.subscription
            )));
        }
        if slot.as_deref() != Some(names.slot.as_str()) {
            return Err(ReplicationError::InvalidState(format!(
                "reverse subscription {:?} uses slot {slot:?}, not {:?}",
                names.subscription, names.slot
            )));
        }
    }

    let step = format!("create publication {:?}", names.publication);
    if !publication_exists(new_side, &names.publication, &step).await? {
        new_side
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                ident(&names.publication)
            ))
            .await
            .step(&step)?;
        done.created_publication = true;
    }

    let step = format!("create replication slot {:?}", names.slot);
    let row = new_side
        .query_opt(
            "SELECT plugin::text, database = current_database(), active_pid \
               FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&names.slot],
        )
        .await
        .step(&step)?;
    match row {
        None => {
            let t = Instant::now();
            new_side
                .query_one(
                    "SELECT lsn FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&names.slot],
                )
                .await
                .step(&step)?;
            done.slot_creation = t.elapsed();
            done.created_slot = true;
        }
        Some(row) => {
            let plugin: Option<String> = row.try_get(0).step(&step)?;
            let same_db: Option<bool> = row.try_get(1).step(&step)?;
            let active: Option<i32> = row.try_get(2).step(&step)?;
            if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
                return Err(ReplicationError::InvalidState(format!(
                    "slot {:?} exists but is not a pgoutput slot of this database",
                    names.slot
                )));
            }
            if active.is_none() {
                done.slot_advanced_to = advance_unused_slot(new_side, &names.slot).await?;
            }
        }
    }

    if existing.is_none() {
        let step = format!("create reverse subscription {:?}", names.subscription);
        old_side
            .batch_execute(&format!(
                "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (create_slot = false, \
                 slot_name = {}, copy_data = false, enabled = false)",
                ident(&names.subscription),
                literal(&names.conninfo),
                ident(&names.publication),
                literal(&names.slot),
            ))
            .await
            .step(&step)?;
        done.created_subscription = true;
    }
    Ok(done)
}

/// Moves an unused slot on `publisher` to the current flush position and
/// returns where it went (`None` when a walsender uses the slot or it does
/// not exist). For a direction about to be restarted by [`switch_direction`]:
/// everything before the switch point is skipped anyway, and a slot left
/// where its direction stopped makes the walsender decode (and skip) all
/// the WAL written since, when the direction starts again, right after
/// the switch, competing with the application on that server. Advancing
/// does the same decoding, but ahead of the pause.
pub async fn advance_unused_slot(
    publisher: &Client,
    slot: &str,
) -> Result<Option<Lsn>, ReplicationError> {
    let step = format!("advance unused slot {slot:?}");
    let row = publisher
        .query_opt(
            "SELECT end_lsn FROM pg_catalog.pg_replication_slots s, \
                    pg_catalog.pg_replication_slot_advance(s.slot_name, \
                        pg_catalog.pg_current_wal_flush_lsn()) \
              WHERE s.slot_name = $1 AND s.active_pid IS NULL",
            &[&slot],
        )
        .await
        .step(&step)?;
    match row {
        None => Ok(None),
        Some(row) => row.try_get(0).step(&step),
    }
}

/// Drops a direction's objects that exist (all pgswitch's, by name) and
/// returns what it dropped: the subscription on `old_side` (the
/// subscriber), detached from its slot first so that the drop doesn't need
/// the publisher, then the slot and the publication on `new_side` (the
/// publisher). For aborts (it undoes [`prepare_reverse`], also a partial
/// one), for the idle direction after a fallback, whose slot would
/// otherwise retain WAL, and for `pgswitch decommission` (both directions).
pub async fn drop_direction(
    new_side: &Client,
    old_side: &Client,
    names: &ReverseNames,
) -> Result<Vec<String>, ReplicationError> {
    let mut dropped = Vec::new();
    let step = format!("drop reverse subscription {:?}", names.subscription);
    if sub_info(old_side, &names.subscription, &step)
        .await?
        .is_some()
    {
        let sub = ident(&names.subscription);
        old_side
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {sub} DISABLE; \
                 ALTER SUBSCRIPTION {sub} SET (slot_name = NONE); \
                 DROP SUBSCRIPTION {sub}"
            ))
            .await
            .step(&step)?;
        dropped.push(format!("subscription {:?}", names.subscription));
    }
    let step = format!("drop replication slot {:?}", names.slot);
    // The reverse subscription's walsender may take a moment to exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match new_side
            .query(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
                   FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&names.slot],
            )
            .await
        {
            Ok(rows) => {
                if !rows.is_empty() {
                    dropped.push(format!("slot {:?}", names.slot));
                }
                break;
            }
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => return Err(ReplicationError::sql(step, e)),
        }
    }
    let step = format!("drop publication {:?}", names.publication);
    if publication_exists(new_side, &names.publication, &step).await? {
        new_side
            .batch_execute(&format!("DROP PUBLICATION {}", ident(&names.publication)))
            .await
            .step(&step)?;
        dropped.push(format!("publication {:?}", names.publication));
    }
    Ok(dropped)
}

/// Drops replication origins named like a subscription's (`pg_<oid>`) whose
/// subscription is gone (`pg_subscription` is shared by all databases), and
/// returns their names. A subscription's own drop removes its origin; this
/// catches one left by a drop that failed halfway.
pub async fn drop_orphaned_origins(c: &Client) -> Result<Vec<String>, ReplicationError> {
    let step = "drop orphaned replication origins";
    let rows = c
        .query(
            "SELECT roname, pg_catalog.pg_replication_origin_drop(roname)::text \
               FROM pg_catalog.pg_replication_origin \
              WHERE roname ~ '^pg_[0-9]+$' \
                AND substr(roname, 4)::oid NOT IN (SELECT oid FROM pg_catalog.pg_subscription)",
            &[],
        )
        .await
        .step(step)?;
    rows.iter().map(|r| r.try_get(0).step(step)).collect()
}

/// The replication slots among `names`, and the table sync slots of any
/// subscription (`pg_<oid>_sync_<relid>_<sysid>`) whose subscription is
/// gone, that exist on `c`.
pub async fn slots_left(c: &Client, names: &[&str]) -> Result<Vec<String>, ReplicationError> {
    let step = "list replication slots";
    let rows = c
        .query(
            "SELECT slot_name::text FROM pg_catalog.pg_replication_slots \
              WHERE slot_name = ANY($1) \
                 OR (slot_name ~ '^pg_[0-9]+_sync_' \
                     AND split_part(slot_name, '_', 2)::oid \
                         NOT IN (SELECT oid FROM pg_catalog.pg_subscription)) \
              ORDER BY 1",
            &[&names],
        )
        .await
        .step(step)?;
    rows.iter().map(|r| r.try_get(0).step(step)).collect()
}
