//! Each server on its own: `wal_level`, room for the replication slots and
//! WAL senders a switch needs, slots that retain WAL, and whether the admin
//! role can do what a switch does.

use tokio_postgres::Client;

use super::{one_i64, texts, Findings, Level};
use crate::config::{Config, Side};
use crate::replication::{ReplicationError, ReverseNames};

pub(super) async fn check(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    settings(r, side, c).await?;
    slots(r, config, side, c).await?;
    admin_privileges(r, side, c).await
}

/// `wal_level`, free slots and WAL senders (green needs them for the
/// reverse direction).
async fn settings(r: &mut Findings, side: Side, c: &Client) -> Result<(), ReplicationError> {
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
    Ok(())
}

/// Slots nobody reads (an orphaned slot retains WAL for ever), and any slot,
/// pgswitch's or not, that retains more WAL than
/// `[replication] max_slot_retained_bytes` or has lost its WAL. pgswitch's
/// own slots are not called orphaned: the forward one is idle on purpose
/// while green is active (and kept advanced), the reverse one is dropped.
async fn slots(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    let step = "replication slots";
    let sql = |e| ReplicationError::sql(step, e);
    let rows = c
        .query(
            "SELECT slot_name::text, active, \
                    coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), \
                                                        restart_lsn), 0)::int8, \
                    coalesce(wal_status, ''), current_setting('max_slot_wal_keep_size') \
               FROM pg_catalog.pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql)?;
    let reverse = ReverseNames::new("");
    let own = [config.replication.slot(), reverse.slot.as_str()];
    let limit = config.replication.max_slot_retained_bytes;
    let (mut inactive, mut retaining, mut lost) = (Vec::new(), Vec::new(), Vec::new());
    let mut keep_size = String::from("-1");
    for row in &rows {
        let name: String = row.try_get(0).map_err(sql)?;
        let active: bool = row.try_get(1).map_err(sql)?;
        let retained: i64 = row.try_get(2).map_err(sql)?;
        let wal_status: String = row.try_get(3).map_err(sql)?;
        keep_size = row.try_get(4).map_err(sql)?;
        let described = format!("{name} (retains {})", pretty_bytes(retained));
        if wal_status == "lost" {
            lost.push(name);
            continue;
        }
        if u64::try_from(retained).unwrap_or(0) > limit {
            retaining.push(described.clone());
        }
        if !active && !own.contains(&name.as_str()) {
            inactive.push(described);
        }
    }
    r.objects(
        "inactive_slots",
        side,
        Level::Warn,
        "inactive replication slots",
        inactive,
        "a slot nobody reads retains WAL until the disk fills: drop it \
         (SELECT pg_drop_replication_slot('<name>')) if it is orphaned",
    );
    let unlimited = keep_size == "-1";
    if !lost.is_empty() {
        r.add(
            "slot_retention",
            Some(side),
            Level::Fail,
            format!(
                "slots whose WAL was removed (max_slot_wal_keep_size): {}",
                lost.join(", ")
            ),
        );
        r.fix("their subscribers cannot continue: drop and recreate them (pgswitch prepare)");
    } else if !retaining.is_empty() {
        r.add(
            "slot_retention",
            Some(side),
            Level::Warn,
            format!(
                "slots retaining more than max_slot_retained_bytes ({}): {}",
                pretty_bytes(i64::try_from(limit).unwrap_or(i64::MAX)),
                retaining.join(", ")
            ),
        );
        r.fix(if unlimited {
            "find out why their readers lag; max_slot_wal_keep_size = -1 lets a slot \
             fill the disk: set it to what the WAL disk can hold"
        } else {
            "find out why their readers lag; past max_slot_wal_keep_size the slot is lost"
        });
    } else {
        r.add(
            "slot_retention",
            Some(side),
            Level::Pass,
            format!(
                "no slot retains more than {} (max_slot_wal_keep_size = {keep_size})",
                pretty_bytes(i64::try_from(limit).unwrap_or(i64::MAX))
            ),
        );
    }
    Ok(())
}

/// What the admin role needs for a switch: slots and subscriptions
/// (REPLICATION; CREATE SUBSCRIPTION takes a superuser on 15,
/// pg_create_subscription on 16+), the fence (CREATEROLE for ALTER ROLE ..
/// SET) and ending fenced sessions (pg_signal_backend). A superuser has all.
async fn admin_privileges(
    r: &mut Findings,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    let step = "admin role";
    let sql = |e| ReplicationError::sql(step, e);
    let row = c
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication, rolcreaterole, \
                    pg_catalog.pg_has_role(current_user, 'pg_signal_backend', 'USAGE'), \
                    current_setting('server_version_num')::int >= 160000 \
                    AND pg_catalog.pg_has_role(current_user, \
                        (SELECT oid FROM pg_catalog.pg_roles \
                          WHERE rolname = 'pg_create_subscription'), 'USAGE') \
               FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql)?;
    let user: String = row.try_get(0).map_err(sql)?;
    let superuser: bool = row.try_get(1).map_err(sql)?;
    let mut missing = Vec::new();
    for (column, what) in [
        (2, "REPLICATION"),
        (3, "CREATEROLE"),
        (4, "pg_signal_backend"),
        (5, "pg_create_subscription (or superuser)"),
    ] {
        if !superuser && !row.try_get::<_, bool>(column).map_err(sql)? {
            missing.push(what.to_owned());
        }
    }
    if missing.is_empty() {
        let how = if superuser {
            "is a superuser"
        } else {
            "has what a switch needs"
        };
        r.add(
            "admin_privileges",
            Some(side),
            Level::Pass,
            format!("admin role {user} {how}"),
        );
    } else {
        r.add(
            "admin_privileges",
            Some(side),
            Level::Fail,
            format!("admin role {user} lacks {}", missing.join(", ")),
        );
        r.fix("grant them to the admin role, or use a superuser as admin_user");
    }
    Ok(())
}

fn pretty_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} bytes"),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}
