//! Replication control: the SQL side of a cutover, over ordinary
//! admin connections (`tokio-postgres`; the data plane stays hand-written).
//!
//! What the cutover procedure calls, in its order:
//!
//! * preflight: [`subscription_status`], [`replication_lag`];
//! * before the pause: [`connect`] every admin connection, [`prepare_reverse`]
//!   (publication, slot and disabled subscription of the reverse direction:
//!   creating a slot costs tens of milliseconds, so never inside the pause);
//! * inside the pause: [`flush_and_mark`] on the old side, [`wait_applied`]
//!   until the new side has applied it, [`sync_sequences`],
//!   [`switch_direction`] (forward off, reverse on, from one switch point),
//!   [`fence`];
//! * aborts and restarts (`cutover::recover`): [`stop_subscription`],
//!   [`start_subscription`], [`pgswitch_fence`] and [`unfence`], [`drop_direction`];
//! * after a fallback: [`switch_direction`] back (reverse off, forward on),
//!   then [`drop_direction`]; while green is active, [`advance_unused_slot`];
//! * all the time: [`watch_lag`], the lag a cutover would wait for.
//!
//! Every function takes `&tokio_postgres::Client` connected as a superuser
//! (or a role allowed to manage subscriptions, slots, origins and roles) to
//! the database that is replicated. Errors are [`ReplicationError`]s naming
//! the step that failed and carrying the server's own message.

mod catchup;
mod conninfo;
mod direction;
mod fence;
mod lsn;
mod sequences;
mod watch;

pub use catchup::{
    flush_and_mark, replication_lag, subscription_status, wait_applied, Lag, SubscriptionStatus,
};
pub use conninfo::{conninfo, conninfo_value};
pub use direction::{
    advance_unused_slot, drop_direction, drop_orphaned_origins, prepare_reverse, slots_left,
    start_subscription, stop_subscription, switch_direction, Prepared, ReverseNames, SwitchPoint,
};
pub use fence::{apply_fence, fence, pgswitch_fence, plan_fence, unfence, Fence, RoleFence};
pub use lsn::Lsn;
pub use sequences::sync_sequences;
pub use watch::{watch_lag, LagWatch};

use std::time::Duration;

use tokio_postgres::Client;

/// Everything that can go wrong while driving replication. Each variant says
/// which step failed so that a cutover report can name it.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The admin connection could not be opened (refused, bad password, ...).
    #[error("connect to {target}: {message}")]
    Connect { target: String, message: String },
    /// The admin connection did not complete within the timeout.
    #[error("connect to {target}: no answer within {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    /// A statement failed; `step` says what it was for, `message` is the
    /// server's (or the client library's) message, `code` the SQLSTATE.
    #[error("{step}: {message}{}", code.as_deref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
    Sql {
        step: String,
        code: Option<String>,
        message: String,
    },
    /// The server answered with something this module cannot use.
    #[error("{step}: unexpected answer: {detail}")]
    Unexpected { step: String, detail: String },
    /// Text that is not an LSN (`X/Y`, hexadecimal).
    #[error("invalid LSN {0:?}")]
    InvalidLsn(String),
    /// A subscription, slot, ... that must exist does not.
    #[error("{what} {name:?} does not exist")]
    NotFound { what: &'static str, name: String },
    /// The objects exist but are not in a state the step can start from.
    #[error("{0}")]
    InvalidState(String),
    /// A wait did not finish in time.
    #[error("timed out after {waited:?} waiting for {what} to reach {target} (reached: {})", reached.map(|l| l.to_string()).unwrap_or_else(|| "nothing".into()))]
    Timeout {
        what: String,
        target: Lsn,
        reached: Option<Lsn>,
        waited: Duration,
    },
}

impl ReplicationError {
    /// Builds a [`ReplicationError::Sql`] from a client error, keeping the
    /// server's message and SQLSTATE when the server sent one (with any
    /// conninfo password in it redacted: the message reaches the log and the
    /// cutover report).
    pub(crate) fn sql(step: impl Into<String>, e: tokio_postgres::Error) -> Self {
        let (code, message) = match e.as_db_error() {
            Some(db) => {
                let mut m = db.message().to_string();
                if let Some(d) = db.detail() {
                    m.push_str(" — ");
                    m.push_str(d);
                }
                (Some(db.code().code().to_string()), m)
            }
            None => (None, e.to_string()),
        };
        ReplicationError::Sql {
            step: crate::logging::redact(&step.into()).into_owned(),
            code,
            message: crate::logging::redact(&message).into_owned(),
        }
    }

    /// The SQLSTATE, when the failure came from the server.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Sql { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// Attaches the step name to client errors, so every `?` says what failed.
pub(crate) trait Step<T> {
    fn step(self, step: &str) -> Result<T, ReplicationError>;
}

impl<T> Step<T> for Result<T, tokio_postgres::Error> {
    fn step(self, step: &str) -> Result<T, ReplicationError> {
        self.map_err(|e| ReplicationError::sql(step, e))
    }
}

/// `application_name` of every admin connection, so that [`fence`] never
/// terminates them and operators can tell them apart in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "pgswitch-control";

/// Opens an admin connection and spawns its connection task.
///
/// Why a whole-login timeout: `tokio-postgres`'s `connect_timeout` covers only
/// the TCP connect, and a server that accepts but never answers the startup
/// would otherwise hang a cutover's preflight. Connections are opened before
/// the pause and reused inside it (a login costs milliseconds).
pub async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    dbname: &str,
    timeout: Duration,
) -> Result<Client, ReplicationError> {
    let target = format!("{user}@{host}:{port}/{dbname}");
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname)
        .application_name(APPLICATION_NAME)
        // The control statements (subscription switches, fences, setval) must
        // survive a crash of their server once pgswitch counts them done: a
        // server running synchronous_commit = off could lose them after the
        // swap and leave both directions enabled.
        .options("-c synchronous_commit=on")
        .connect_timeout(timeout);
    let attempt = config.connect(tokio_postgres::NoTls);
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Err(ReplicationError::ConnectTimeout { target, timeout }),
        Ok(Err(e)) => Err(ReplicationError::Connect {
            target,
            message: crate::logging::redact(&match e.as_db_error() {
                Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                None => e.to_string(),
            })
            .into_owned(),
        }),
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "replication admin connection ended");
                }
            });
            Ok(client)
        }
    }
}

/// SQL identifier quoting, for names that come from the configuration.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings is on since 9.1).
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The LSN in the first column of the first row of a simple query's answer.
fn first_lsn(
    messages: &[tokio_postgres::SimpleQueryMessage],
    step: &str,
) -> Result<Lsn, ReplicationError> {
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .ok_or_else(|| ReplicationError::Unexpected {
            step: step.into(),
            detail: "no LSN returned".into(),
        })?
        .parse()
}

/// An admin connection to one side, as configured.
pub async fn connect_side(
    config: &crate::config::Config,
    side: crate::config::Side,
    timeout: Duration,
) -> Result<Client, String> {
    let backend = config
        .backends
        .get(side)
        .ok_or_else(|| format!("[backends.{side}] is not configured"))?;
    let (user, password) = backend
        .admin_credentials()
        .ok_or_else(|| format!("backends.{side}.admin_user is not configured"))?;
    connect(
        &backend.host,
        backend.port,
        &user,
        &password,
        &config.replication.database,
        timeout,
    )
    .await
    .map_err(|e| format!("{side} does not answer: {e}"))
}
