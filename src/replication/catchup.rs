//! Preflight (status, lag) and the catch-up step of a cutover: mark a target
//! on the old side and wait until the new side has applied it.
//!
//! # Which position means "applied"
//!
//! A logical subscriber's apply worker reports three positions to the
//! publisher's walsender (`send_feedback` in PostgreSQL's `worker.c`, the
//! same in 15, 16 and 17), shown in `pg_stat_replication`:
//!
//! * `write_lsn`: the worker's last *received* position, reported only
//!   after every message received up to it has been processed. The apply
//!   worker applies synchronously (a commit message is committed locally
//!   before the next message is read; a parallel apply worker's transaction
//!   is waited for at its commit), so every transaction whose commit ends at
//!   or before `write_lsn` is applied and visible on the subscriber;
//! * `replay_lsn`: the end LSN of the last transaction committed locally;
//!   but while that local commit is not yet flushed (apply workers commit
//!   with `synchronous_commit = off` by default) it is not moved on by later
//!   keepalives, so after a burst it stays below a target until the
//!   subscriber's WAL writer has flushed and the worker reports again:
//!   measured 400–650 ms here, versus ~1 ms for `write_lsn`;
//! * `flush_lsn`: the same once flushed on the subscriber; the slot's
//!   `confirmed_flush_lsn` is set from it (later still).
//!
//! `write_lsn` also moves with nothing to replicate: a logical walsender
//! that has decoded all flushed WAL (other databases, vacuum, empty
//! transactions such as the catch-up marker) sends a keepalive carrying its
//! position, and the worker answers it. Decoding is in WAL order, so a
//! reported position `>= target` means every commit record before `target`
//! was decoded, sent before it and applied: exact, no threshold. The
//! walsender is found through the slot's `active_pid`, which is exactly the
//! one serving the subscription, whatever its `application_name`.
//!
//! But the worker does not always answer: its reply is skipped when neither
//! of its applied positions changed, which is the case right after a burst,
//! while its last local commits wait for the subscriber's WAL writer (up to
//! 200 ms, measured: 200–400 ms catch-ups on an idle PG 15 subscriber). The
//! keepalive is processed all the same, and the subscriber's
//! `pg_stat_subscription.latest_end_lsn` is set to the worker's received
//! position at that moment, after every earlier message was applied: the
//! same exact position, on the subscriber, without the reply. So
//! [`wait_applied`] polls both (concurrently, on two connections) and stops
//! when either passes the target. (`received_lsn` in that view is not exact:
//! it is set before the message is applied.)
//!
//! One precondition, for the preflight: changes to tables still in initial
//! synchronisation are applied by their tablesync workers, not in this
//! stream; require [`SubscriptionStatus::tables_not_ready`] to be 0.

use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::{Lsn, ReplicationError, Step};

/// What a cutover's preflight needs to know about a subscription on the new
/// side.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SubscriptionStatus {
    pub exists: bool,
    pub enabled: bool,
    /// The apply worker runs (it has a pid in `pg_stat_subscription`).
    pub streaming: bool,
    pub worker_pid: Option<i32>,
    /// The subscription's oid; its replication origin is `pg_<oid>`.
    pub oid: Option<u32>,
    pub slot_name: Option<String>,
    /// Last WAL position received from the publisher (not necessarily applied).
    pub received_lsn: Option<Lsn>,
    /// Last position reported back to the publisher's walsender.
    pub latest_end_lsn: Option<Lsn>,
    /// Publisher LSN of the last transaction applied (the origin's progress;
    /// it only moves when a transaction is applied, not on keepalives).
    pub origin_lsn: Option<Lsn>,
    /// Tables still in initial synchronisation (state other than ready).
    pub tables_not_ready: i64,
}

/// Replication lag of one slot, as seen on the publisher.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lag {
    /// WAL bytes written on the publisher that the subscriber has not yet
    /// confirmed applying: exact as a WAL distance; it counts WAL the
    /// subscription doesn't need (other databases, vacuum) until the next
    /// keepalive, so it is an upper bound that returns to 0 when idle.
    pub bytes: u64,
    /// `write_lag` of the walsender (the lag of the position used for
    /// bytes): PostgreSQL's sampled estimate of how long it takes until the
    /// subscriber has applied WAL, 0 when caught up (it goes NULL a while
    /// after the last activity). `None` when no walsender serves the slot.
    pub seconds: Option<f64>,
    /// A walsender is connected to the slot (the subscription is streaming).
    pub streaming: bool,
    /// `pg_current_wal_lsn()` when measured.
    pub current: Lsn,
    /// The applied position used: the walsender's `write_lsn` (see the module
    /// docs), or the slot's
    /// `confirmed_flush_lsn` when no walsender is connected.
    pub applied: Option<Lsn>,
}

/// Reads a subscription's state on the subscriber, for the preflight ("the
/// subscription is enabled and streaming") and for operators' `/status`.
/// A missing subscription is not an error: `exists` is false.
pub async fn subscription_status(
    subscriber: &Client,
    subscription: &str,
) -> Result<SubscriptionStatus, ReplicationError> {
    // `leader_pid` (PG 16+) marks parallel apply workers, which also have no
    // relid; to_jsonb reads it without breaking on PG 15, which lacks it.
    const SQL: &str = "\
        SELECT s.oid, s.subenabled, s.subslotname::text, w.pid, w.received_lsn, \
               w.latest_end_lsn, o.remote_lsn, \
               (SELECT count(*) FROM pg_catalog.pg_subscription_rel r \
                 WHERE r.srsubid = s.oid AND r.srsubstate <> 'r') \
          FROM pg_catalog.pg_subscription s \
          LEFT JOIN LATERAL ( \
               SELECT st.pid, st.received_lsn, st.latest_end_lsn \
                 FROM pg_catalog.pg_stat_subscription st \
                WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL \
                  AND to_jsonb(st) ->> 'leader_pid' IS NULL \
                LIMIT 1) w ON true \
          LEFT JOIN pg_catalog.pg_replication_origin_status o \
                 ON o.external_id = 'pg_' || s.oid \
         WHERE s.subname = $1 \
           AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database \
                             WHERE datname = current_database())";
    let step = "read subscription status";
    let row = subscriber
        .query_opt(SQL, &[&subscription])
        .await
        .step(step)?;
    let Some(row) = row else {
        return Ok(SubscriptionStatus {
            exists: false,
            enabled: false,
            streaming: false,
            worker_pid: None,
            oid: None,
            slot_name: None,
            received_lsn: None,
            latest_end_lsn: None,
            origin_lsn: None,
            tables_not_ready: 0,
        });
    };
    let worker_pid: Option<i32> = row.try_get(3).step(step)?;
    Ok(SubscriptionStatus {
        exists: true,
        oid: Some(row.try_get(0).step(step)?),
        enabled: row.try_get(1).step(step)?,
        slot_name: row.try_get(2).step(step)?,
        streaming: worker_pid.is_some(),
        worker_pid,
        received_lsn: row.try_get(4).step(step)?,
        latest_end_lsn: row.try_get(5).step(step)?,
        origin_lsn: row.try_get(6).step(step)?,
        tables_not_ready: row.try_get(7).step(step)?,
    })
}

/// Measures how far the subscriber of `slot` is behind the publisher, for
/// the preflight (`max_lag_bytes_to_start`), `/status` and the lag gauge.
/// See [`Lag`] for what is exact: bytes are, seconds are an estimate.
pub async fn replication_lag(publisher: &Client, slot: &str) -> Result<Lag, ReplicationError> {
    const SQL: &str = "\
        SELECT pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn, r.pid, r.write_lsn, \
               extract(epoch FROM r.write_lag)::float8 \
          FROM pg_catalog.pg_replication_slots s \
          LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = $1";
    let step = "read replication lag";
    let row = publisher
        .query_opt(SQL, &[&slot])
        .await
        .step(step)?
        .ok_or_else(|| ReplicationError::NotFound {
            what: "replication slot",
            name: slot.to_string(),
        })?;
    let current: Lsn = row.try_get(0).step(step)?;
    let confirmed: Option<Lsn> = row.try_get(1).step(step)?;
    let walsender: Option<i32> = row.try_get(2).step(step)?;
    let received: Option<Lsn> = row.try_get(3).step(step)?;
    let lag_estimate: Option<f64> = row.try_get(4).step(step)?;
    let applied = match (received, confirmed) {
        (Some(r), Some(c)) => Some(r.max(c)),
        (r, c) => r.or(c),
    };
    let bytes = applied.map_or(current.0, |a| current - a);
    let streaming = walsender.is_some();
    let seconds = if !streaming {
        None
    } else if bytes == 0 {
        Some(0.0)
    } else {
        Some(lag_estimate.unwrap_or(0.0))
    };
    Ok(Lag {
        bytes,
        seconds,
        streaming,
        current,
        applied,
    })
}

/// Makes every commit the publisher has acknowledged durable and returns a
/// catch-up target that covers them all.
///
/// Why: with `synchronous_commit = off` a commit is acknowledged before its
/// WAL is flushed, and a logical walsender only decodes flushed WAL, so
/// `pg_current_wal_lsn()` can stand before acknowledged commits and a wait
/// for it loses rows. One tiny transaction committed with
/// `synchronous_commit = local` flushes all WAL before its commit record
/// (`local`, not `on`: the same local flush, without waiting for synchronous
/// physical standbys, which the catch-up doesn't need). The transactional
/// logical message gives it an xid, hence a commit record to flush;
/// `pgoutput` never sends it (no `messages` option, and PG 15+ skip empty
/// transactions), so it costs the subscriber nothing.
///
/// The target returned is the end of the message record: every commit
/// acknowledged before this call ends before it (it was inserted earlier),
/// and the marker's flush has made WAL past it decodable. A position read
/// after the commit (`pg_current_wal_lsn()`, the insert position) can
/// include other sessions' unflushed WAL and then waits for their flush, up
/// to a `wal_writer_delay`. One round trip.
pub async fn flush_and_mark(publisher: &Client) -> Result<Lsn, ReplicationError> {
    let step = "flush and mark the catch-up target (pg_logical_emit_message)";
    let messages = publisher
        .simple_query(
            "BEGIN; SET LOCAL synchronous_commit = local; \
             SELECT pg_catalog.pg_logical_emit_message(true, 'pgswitch', 'cutover')::text; \
             COMMIT",
        )
        .await
        .step(step)?;
    super::first_lsn(&messages, step)
}

/// How often [`wait_applied`] polls. The catch-up is inside the pause, so
/// every millisecond of polling granularity is a millisecond of client stall;
/// a poll is one indexed lookup over an open connection (~0.1–0.3 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Waits until `subscription` (on `subscriber`, streaming from `slot` on
/// `publisher`) has applied every transaction that committed on the
/// publisher at or before `target` (from [`flush_and_mark`]), and returns
/// how long it waited.
///
/// Exact, no threshold, and robust to WAL with nothing to replicate: it
/// watches the walsender's `write_lsn` and the subscriber's
/// `latest_end_lsn` (see the module docs for why those and not `replay_lsn`,
/// `flush_lsn`, `received_lsn` or the origin). Polls every
/// [`POLL_INTERVAL`] over the caller's connections, which should be opened
/// before the pause.
pub async fn wait_applied(
    publisher: &Client,
    slot: &str,
    subscriber: &Client,
    subscription: &str,
    target: Lsn,
    timeout: Duration,
) -> Result<Duration, ReplicationError> {
    let start = Instant::now();
    let pub_step = "read the applied position on the publisher (pg_stat_replication.write_lsn)";
    let sub_step = "read the applied position on the subscriber (pg_stat_subscription)";
    let sub_params: [&(dyn ToSql + Sync); 1] = [&subscription];
    let (pub_stmt, sub_stmt, sub) = tokio::join!(
        publisher.prepare(
            "SELECT r.write_lsn FROM pg_catalog.pg_stat_replication r \
              WHERE r.pid = (SELECT active_pid FROM pg_catalog.pg_replication_slots \
                              WHERE slot_name = $1)",
        ),
        subscriber.prepare(
            "SELECT st.latest_end_lsn FROM pg_catalog.pg_stat_subscription st \
              WHERE st.subid = $1 AND st.relid IS NULL AND st.pid IS NOT NULL \
                AND to_jsonb(st) ->> 'leader_pid' IS NULL",
        ),
        subscriber.query_opt(
            "SELECT oid, subslotname::text FROM pg_catalog.pg_subscription \
              WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_catalog.pg_database \
                                                 WHERE datname = current_database())",
            &sub_params,
        ),
    );
    let pub_stmt = pub_stmt.step(pub_step)?;
    let sub_stmt = sub_stmt.step(sub_step)?;
    let sub = sub
        .step(sub_step)?
        .ok_or_else(|| ReplicationError::NotFound {
            what: "subscription",
            name: subscription.into(),
        })?;
    let sub_oid: u32 = sub.try_get(0).step(sub_step)?;
    let sub_slot: Option<String> = sub.try_get(1).step(sub_step)?;
    if sub_slot.as_deref() != Some(slot) {
        return Err(ReplicationError::InvalidState(format!(
            "subscription {subscription:?} uses slot {sub_slot:?}, not {slot:?}"
        )));
    }
    let pub_params: [&(dyn ToSql + Sync); 1] = [&slot];
    let oid_params: [&(dyn ToSql + Sync); 1] = [&sub_oid];
    let mut reached: Option<Lsn> = None;
    loop {
        let (on_pub, on_sub) = tokio::join!(
            publisher.query_opt(&pub_stmt, &pub_params),
            subscriber.query_opt(&sub_stmt, &oid_params),
        );
        for (row, step) in [(on_pub, pub_step), (on_sub, sub_step)] {
            if let Some(row) = row.step(step)? {
                let applied: Option<Lsn> = row.try_get(0).step(step)?;
                if let Some(applied) = applied {
                    reached = Some(reached.map_or(applied, |r| r.max(applied)));
                }
            }
        }
        if reached.is_some_and(|r| r >= target) {
            return Ok(start.elapsed());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(ReplicationError::Timeout {
                what: format!("subscription {subscription:?} (slot {slot:?})"),
                target,
                reached,
                waited,
            });
        }
        tokio::time::sleep(POLL_INTERVAL.min(timeout - waited)).await;
    }
}
