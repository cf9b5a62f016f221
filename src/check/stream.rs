//! The live direction: its subscription enabled and streaming with every
//! table ready, its slot active, the lag under the limit, no apply errors.

use tokio_postgres::Client;

use super::{on, CheckError, Findings, Level, Target};
use crate::config::Config;
use crate::replication::{self, ReplicationError};

pub(super) async fn check(
    r: &mut Findings,
    config: &Config,
    t: &Target,
    from: &Client,
    to: &Client,
) -> Result<(), CheckError> {
    let name = &t.subscription;
    let st = replication::subscription_status(to, name)
        .await
        .map_err(on(t.to))?;
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
    r.add("subscription", Some(t.to), level, detail);
    if level == Level::Fail && !st.exists {
        r.fix("pgswitch prepare creates it");
    }
    if !st.exists {
        return Ok(());
    }
    slot_and_lag(r, config, t, from).await.map_err(on(t.from))?;
    apply_errors(r, t, to).await.map_err(on(t.to))
}

/// The subscription's slot exists and is read, and the lag is under
/// `max_lag_bytes_to_start`.
async fn slot_and_lag(
    r: &mut Findings,
    config: &Config,
    t: &Target,
    from: &Client,
) -> Result<(), ReplicationError> {
    let lag = match replication::replication_lag(from, &t.slot).await {
        Ok(lag) => lag,
        Err(ReplicationError::NotFound { .. }) => {
            r.add(
                "slot",
                Some(t.from),
                Level::Fail,
                format!("replication slot {:?} does not exist", t.slot),
            );
            r.fix("the subscription cannot stream without it: pgswitch prepare recreates it");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Not read for a moment is normal (the apply worker reconnects after a
    // server restart); the subscription's own state and the lag are what
    // fail a switch.
    let (level, detail) = if lag.streaming {
        (Level::Pass, format!("slot {:?} is read", t.slot))
    } else {
        (
            Level::Warn,
            format!("slot {:?} is not read by a walsender", t.slot),
        )
    };
    r.add("slot", Some(t.from), level, detail);
    if level == Level::Warn {
        r.fix("if it lasts, read the subscriber's log: its apply worker cannot connect");
    }
    let max = config.cutover.max_lag_bytes_to_start;
    let level = if lag.bytes > max {
        Level::Fail
    } else {
        Level::Pass
    };
    r.add(
        "lag",
        Some(t.to),
        level,
        format!(
            "{} bytes behind {} (max_lag_bytes_to_start {max})",
            lag.bytes, t.from
        ),
    );
    if level == Level::Fail {
        r.fix("wait for the apply to catch up; a lag that keeps growing means the apply is stuck");
    }
    Ok(())
}

/// Errors the apply or the table sync hit (`pg_stat_subscription_stats`,
/// PostgreSQL 15+): a stuck apply retries the same transaction for ever.
async fn apply_errors(r: &mut Findings, t: &Target, to: &Client) -> Result<(), ReplicationError> {
    let step = "subscription errors";
    let sql = |e| ReplicationError::sql(step, e);
    let version = super::one_i64(
        to,
        "SELECT current_setting('server_version_num')::int8",
        step,
    )
    .await?;
    if version < 150000 {
        r.add(
            "apply_errors",
            Some(t.to),
            Level::Pass,
            "not counted before PostgreSQL 15 (see the server log)".into(),
        );
        return Ok(());
    }
    let row = to
        .query_opt(
            "SELECT apply_error_count, sync_error_count \
               FROM pg_catalog.pg_stat_subscription_stats WHERE subname = $1",
            &[&t.subscription],
        )
        .await
        .map_err(sql)?;
    let (apply, sync): (i64, i64) = match row {
        Some(row) => (row.try_get(0).map_err(sql)?, row.try_get(1).map_err(sql)?),
        None => (0, 0),
    };
    if apply + sync == 0 {
        r.add(
            "apply_errors",
            Some(t.to),
            Level::Pass,
            format!("no apply or sync error on {:?}", t.subscription),
        );
    } else {
        r.add(
            "apply_errors",
            Some(t.to),
            Level::Warn,
            format!(
                "subscription {:?}: {apply} apply error(s), {sync} table sync error(s)",
                t.subscription
            ),
        );
        r.fix(
            "read the server log for the cause (a conflict, a missing column); once fixed, \
             SELECT pg_stat_reset_subscription_stats(oid) FROM pg_subscription",
        );
    }
    Ok(())
}
