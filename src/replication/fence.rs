//! Fencing the old side (cutover step 7).
//!
//! # Method
//!
//! `ALTER ROLE r SET default_transaction_read_only = on` for every
//! application role, then `pg_terminate_backend` on the roles' existing
//! sessions (settings of a role apply when a session starts).
//!
//! Why this and not the alternatives:
//! * It refuses writes only: every new session of the role starts read-only
//!   and a write fails with SQLSTATE 25006 (`cannot execute INSERT in a
//!   read-only transaction`), `nextval` included, while reads keep working.
//! * Replication still applies: the reverse subscription's apply worker runs
//!   as the subscription's owner (the admin role, never fenced), and it
//!   writes through the executor's replication path, not as the fenced role.
//! * It is undone exactly: the role-wide setting each role had before is
//!   recorded in the [`Fence`] (serialisable, for the state file) and put
//!   back by [`unfence`]. REVOKE would have to snapshot and restore every
//!   table's ACL and would not stop table owners; `NOLOGIN` also stops reads.
//!
//! Each fenced role also carries two markers, `pgswitch.fence_previous`
//! (the setting it had, or `default` for none) and `pgswitch.fenced_at`, in
//! the same transaction as the fence. The server itself then tells
//! pgswitch's fence from an operator's `default_transaction_read_only = on`:
//! a plan over a role that is still fenced (a crash between the fence and
//! the commit point) keeps the recorded previous value instead of taking
//! the fence for the operator's setting, and a restart lifts every fence of
//! pgswitch's on the side it makes active ([`pgswitch_fence`]) even when
//! its state file does not know of it.
//!
//! Limits (documented rather than hidden): a session can still opt out with
//! `SET default_transaction_read_only = off` or `BEGIN READ WRITE`: this is
//! a fence against applications that keep writing to the old side by
//! mistake (a stale connection string, a cron job), not against a hostile
//! client. The setting is role-wide, so it covers every database of the
//! server; a role with its own `ALTER ROLE .. IN DATABASE .. SET
//! default_transaction_read_only` would override it, so [`fence`] refuses
//! such roles instead of fencing them ineffectively. Terminating sessions
//! includes pgswitch's own idle pooled connections to the old side: they are
//! done with (the cutover fences after draining); on an abort the pools must
//! discard them.

use tokio_postgres::Client;

use super::{ident, literal, ReplicationError, Step};

/// A role's setting before the fence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleFence {
    pub role: String,
    /// The role-wide `default_transaction_read_only` value it had, if any.
    pub previous: Option<String>,
}

/// What [`fence`] changed, so that [`unfence`] can put it back exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fence {
    pub roles: Vec<RoleFence>,
    /// Server time when the fence was set (sessions started since are
    /// read-only too and are ended by [`unfence`]).
    pub fenced_at: String,
    /// Sessions of the roles that were terminated.
    pub terminated: i64,
}

const SETTING: &str = "default_transaction_read_only";
/// Role setting that marks pgswitch's fence: the previous value of [`SETTING`].
const MARK_PREVIOUS: &str = "pgswitch.fence_previous";
/// Role setting that marks pgswitch's fence: when it was set (server time).
const MARK_AT: &str = "pgswitch.fenced_at";
/// [`MARK_PREVIOUS`] for a role that had no setting of its own.
const NO_PREVIOUS: &str = "default";

/// Makes the server refuse writes from `roles` (see the module docs for the
/// method and its limits), ending their open sessions; returns what to undo.
pub async fn fence(conn: &Client, roles: &[String]) -> Result<Fence, ReplicationError> {
    let mut fence = plan_fence(conn, roles).await?;
    fence.terminated = apply_fence(conn, &fence, &[]).await?;
    Ok(fence)
}

/// The read-only half of [`fence`]: records the roles' current settings (what
/// [`unfence`] restores) and refuses roles the fence can't hold. A cutover
/// runs it before its pause, and only [`apply_fence`] inside.
pub async fn plan_fence(conn: &Client, roles: &[String]) -> Result<Fence, ReplicationError> {
    if roles.is_empty() {
        return Ok(Fence {
            roles: Vec::new(),
            fenced_at: "infinity".into(),
            terminated: 0,
        });
    }
    let step = "read the roles' settings before fencing";
    let rows = conn
        .query(
            "SELECT r.rolname::text, \
                    (SELECT substr(x, length($2) + 2) \
                       FROM pg_catalog.pg_db_role_setting d, unnest(d.setconfig) x \
                      WHERE d.setrole = r.oid AND d.setdatabase = 0 \
                        AND x LIKE $2 || '=%' LIMIT 1), \
                    (SELECT string_agg(db.datname::text, ', ') \
                       FROM pg_catalog.pg_db_role_setting d \
                       JOIN pg_catalog.pg_database db ON db.oid = d.setdatabase, \
                            unnest(d.setconfig) x \
                      WHERE d.setrole = r.oid AND x LIKE $2 || '=%'), \
                    r.rolname = session_user, now()::text, \
                    (SELECT substr(x, length($3) + 2) \
                       FROM pg_catalog.pg_db_role_setting d, unnest(d.setconfig) x \
                      WHERE d.setrole = r.oid AND d.setdatabase = 0 \
                        AND split_part(x, '=', 1) = $3 LIMIT 1) \
               FROM pg_catalog.pg_roles r WHERE r.rolname = ANY($1)",
            &[&roles, &SETTING, &MARK_PREVIOUS],
        )
        .await
        .step(step)?;
    let mut fenced = Vec::with_capacity(roles.len());
    // Taken before the ALTER ROLE commits: every session that starts
    // read-only starts after it (some just before are ended anyway below).
    let mut fenced_at = String::new();
    for role in roles {
        let row = rows
            .iter()
            .find(|r| r.try_get::<_, String>(0).ok().as_deref() == Some(role.as_str()))
            .ok_or_else(|| ReplicationError::NotFound {
                what: "role",
                name: role.clone(),
            })?;
        let current: Option<String> = row.try_get(1).step(step)?;
        let per_db: Option<String> = row.try_get(2).step(step)?;
        let is_admin: bool = row.try_get(3).step(step)?;
        fenced_at = row.try_get(4).step(step)?;
        let marked: Option<String> = row.try_get(5).step(step)?;
        // Still under a fence of pgswitch's: what it had before that fence.
        let previous = match marked {
            Some(mark) => decode_previous(mark),
            None => current,
        };
        if let Some(dbs) = per_db {
            return Err(ReplicationError::InvalidState(format!(
                "role {role:?} has its own {SETTING} in database(s) {dbs}, which would override \
                 the fence; remove it (ALTER ROLE .. IN DATABASE .. RESET {SETTING})"
            )));
        }
        if is_admin {
            return Err(ReplicationError::InvalidState(format!(
                "refusing to fence role {role:?}: it is the admin role of this connection"
            )));
        }
        fenced.push(RoleFence {
            role: role.clone(),
            previous,
        });
    }

    Ok(Fence {
        roles: fenced,
        fenced_at,
        terminated: 0,
    })
}

/// The writing half of [`fence`]: sets the roles read-only and ends their
/// sessions, except the server processes in `spare` (pgswitch's own idle pool
/// connections, which it closes itself once the pause is over, so that a
/// dozen processes don't exit inside it). Returns how many sessions were ended.
pub async fn apply_fence(
    conn: &Client,
    fence: &Fence,
    spare: &[i32],
) -> Result<i64, ReplicationError> {
    if fence.roles.is_empty() {
        return Ok(0);
    }
    let roles: Vec<&str> = fence.roles.iter().map(|r| r.role.as_str()).collect();
    let mut sql = String::from("BEGIN;");
    for r in &fence.roles {
        let role = ident(&r.role);
        let previous = r.previous.as_deref().unwrap_or(NO_PREVIOUS);
        sql.push_str(&format!(
            " ALTER ROLE {role} SET {SETTING} = on; \
              ALTER ROLE {role} SET {MARK_PREVIOUS} = {}; \
              ALTER ROLE {role} SET {MARK_AT} = {};",
            literal(previous),
            literal(&fence.fenced_at)
        ));
    }
    sql.push_str(" COMMIT;");
    conn.batch_execute(&sql)
        .await
        .step("fence: ALTER ROLE .. SET default_transaction_read_only = on")?;

    let step = "fence: terminate the roles' sessions";
    let row = conn
        .query_one(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) \
               FROM pg_catalog.pg_stat_activity \
              WHERE usename = ANY($1) AND pid <> pg_catalog.pg_backend_pid() \
                AND backend_type = 'client backend' AND pid <> ALL($2)",
            &[&roles, &spare],
        )
        .await
        .step(step)?;
    row.try_get(0).step(step)
}

fn decode_previous(mark: String) -> Option<String> {
    (mark != NO_PREVIOUS).then_some(mark)
}

/// The fence pgswitch left on this server, read from its markers: every
/// role that carries one, with the setting it had before; `None` when no
/// role is fenced by pgswitch. [`unfence`] of the answer lifts it exactly.
pub async fn pgswitch_fence(conn: &Client) -> Result<Option<Fence>, ReplicationError> {
    let step = "read pgswitch's fence markers";
    let rows = conn
        .query(
            "SELECT r.rolname::text, substr(p, length($1) + 2), \
                    (SELECT substr(a, length($2) + 2) FROM unnest(d.setconfig) a \
                      WHERE split_part(a, '=', 1) = $2 LIMIT 1) \
               FROM pg_catalog.pg_db_role_setting d \
               JOIN pg_catalog.pg_roles r ON r.oid = d.setrole, unnest(d.setconfig) p \
              WHERE d.setdatabase = 0 AND split_part(p, '=', 1) = $1 \
              ORDER BY 1",
            &[&MARK_PREVIOUS, &MARK_AT],
        )
        .await
        .step(step)?;
    let mut fence = Fence {
        roles: Vec::with_capacity(rows.len()),
        fenced_at: String::new(),
        terminated: 0,
    };
    for row in &rows {
        let at: Option<String> = row.try_get(2).step(step)?;
        // The earliest mark: sessions that started since then are read-only.
        let at = at.unwrap_or_else(|| "-infinity".into());
        if fence.fenced_at.is_empty() || at < fence.fenced_at {
            fence.fenced_at = at;
        }
        fence.roles.push(RoleFence {
            role: row.try_get(0).step(step)?,
            previous: decode_previous(row.try_get(1).step(step)?),
        });
    }
    Ok((!fence.roles.is_empty()).then_some(fence))
}

/// Undoes [`fence`] exactly: each role gets back the role-wide setting it
/// had (or none), and sessions of the roles that started while fenced (hence
/// read-only) are ended so that none stays read-only. Returns how many
/// sessions were ended.
pub async fn unfence(conn: &Client, fence: &Fence) -> Result<i64, ReplicationError> {
    let mut sql = String::from("BEGIN;");
    for r in &fence.roles {
        let role = ident(&r.role);
        match &r.previous {
            None => sql.push_str(&format!(" ALTER ROLE {role} RESET {SETTING};")),
            Some(v) => sql.push_str(&format!(
                " ALTER ROLE {role} SET {SETTING} = {};",
                literal(v)
            )),
        }
        sql.push_str(&format!(
            " ALTER ROLE {role} RESET {MARK_PREVIOUS}; ALTER ROLE {role} RESET {MARK_AT};"
        ));
    }
    sql.push_str(" COMMIT;");
    conn.batch_execute(&sql)
        .await
        .step("unfence: restore default_transaction_read_only")?;

    let roles: Vec<&str> = fence.roles.iter().map(|r| r.role.as_str()).collect();
    let step = "unfence: end sessions started while fenced";
    let row = conn
        .query_one(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
              WHERE usename = ANY($1) AND pid <> pg_catalog.pg_backend_pid() \
                AND backend_type = 'client backend' \
                AND backend_start >= $2::text::timestamptz",
            &[&roles, &fence.fenced_at],
        )
        .await
        .step(step)?;
    row.try_get(0).step(step)
}
