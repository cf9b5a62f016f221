//! Sessions: who bypasses pgswitch on the side that takes the traffic, who
//! writes on the target outside replication, and whether the application
//! roles can log in on the target.

use tokio_postgres::Client;

use super::{texts_with, Findings, Level};
use crate::config::{Config, Side};
use crate::replication::{self, ReplicationError};

/// Client sessions other than this one, pgswitch's control connections
/// (`$1`, its application_name) and a serving pgswitch's server connections
/// (`$3`, `host:port` as the server sees them).
const OTHER_CLIENTS: &str = "FROM pg_catalog.pg_stat_activity \
    WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() \
      AND application_name <> $1 \
      AND NOT (coalesce(host(client_addr), '') || ':' || coalesce(client_port, 0)) = ANY($3)";

/// Sessions on the side that takes the traffic that do not come through
/// pgswitch (a cron job still pointed at blue writes to a fenced database
/// after the cutover), and transactions open longer than `drain_timeout`
/// (the drain would time out).
pub(super) async fn bypassing(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
    own: &[String],
) -> Result<(), ReplicationError> {
    let step = "sessions";
    let roles = config.application_roles();
    let rows = c
        .query(
            &format!(
                "SELECT usename::text || '@' || coalesce(host(client_addr), 'local') || \
                        CASE WHEN application_name <> '' THEN ' (' || application_name || ')' ELSE '' END, \
                        coalesce(extract(epoch FROM now() - xact_start), 0)::float8 \
                 {OTHER_CLIENTS} AND (usename = ANY($2) OR xact_start IS NOT NULL) ORDER BY 1"
            ),
            &[&replication::APPLICATION_NAME, &roles, &own],
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
        side,
        Level::Warn,
        "transactions open longer than drain_timeout",
        long,
        "end them before the cutover, or use drain_action = \"cancel\"",
    );
    // pgswitch's own server connections log in as the application roles
    // too: a serving pgswitch passes their addresses (`own`); offline
    // (`pgswitch check` with pgswitch stopped) there are none.
    others.sort();
    others.dedup();
    r.objects(
        "bypassing_sessions",
        side,
        Level::Warn,
        "sessions of the application roles or with an open transaction (not through \
         pgswitch, if pgswitch is stopped)",
        others,
        "point them at pgswitch: after the switch this side is fenced and their writes fail",
    );
    Ok(())
}

/// Every role pgswitch logs in as exists on the target and can log in.
pub(super) async fn roles(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
) -> Result<(), ReplicationError> {
    let wanted = config.application_roles();
    let step = "roles";
    let missing = texts_with(
        c,
        "SELECT r FROM unnest($1::text[]) r WHERE NOT EXISTS \
           (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r AND rolcanlogin \
               AND (rolvaliduntil IS NULL OR rolvaliduntil > now())) ORDER BY 1",
        &[&wanted],
        step,
    )
    .await?;
    r.objects(
        "roles",
        side,
        Level::Fail,
        "application roles missing, without LOGIN or expired",
        missing,
        "copy the roles: pg_dumpall --roles-only on blue, restored on the target (pgswitch prepare does it; SCRAM secrets carry over)",
    );
    Ok(())
}

/// Writes on the target that do not come from replication: sessions of the
/// application roles, or any session holding a transaction id, other than
/// pgswitch's own control connections (the apply workers are not client
/// backends). Their rows would clash with replicated ones, or be lost at
/// the switch; `pgswitch verify` finds what they already changed.
pub(super) async fn writes_on_target(
    r: &mut Findings,
    config: &Config,
    side: Side,
    c: &Client,
    own: &[String],
) -> Result<(), ReplicationError> {
    let step = "sessions on the target";
    let found = texts_with(
        c,
        &format!(
            "SELECT usename::text || '@' || coalesce(host(client_addr), 'local') || \
                    CASE WHEN backend_xid IS NOT NULL THEN ' (writing)' ELSE '' END \
             {OTHER_CLIENTS} AND (usename = ANY($2) OR backend_xid IS NOT NULL) ORDER BY 1"
        ),
        &[
            &replication::APPLICATION_NAME,
            &config.application_roles(),
            &own,
        ],
        step,
    )
    .await?;
    r.objects(
        "writes_on_target",
        side,
        Level::Warn,
        "sessions that may write outside replication",
        found,
        "stop them: until the switch only replication may write here \
         (pgswitch verify shows what they changed)",
    );
    Ok(())
}
