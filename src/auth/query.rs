//! auth_query: secrets of users that `[[users]]` does not list, looked up on
//! the active backend.
//!
//! One dedicated connection (logged in as `auth_user`) is opened on demand,
//! reused, and guarded by a tokio mutex so lookups queue instead of opening a
//! connection each. The query runs in the extended protocol with the user name
//! as parameter `$1` (never spliced into SQL). Answers, found or not, are
//! cached for `auth_cache_ttl` in a bounded map; failures are not cached.
//!
//! Only SCRAM secrets are usable: a user whose stored password is md5 (or
//! NULL) is treated as unknown. Nothing here derives keys (no PBKDF2): parsing
//! a stored secret is cheap, so lookups are fine on the async executor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use crate::config::Config;
use crate::protocol::error::{sqlstate, ServerErrorFields, UserFacingError};
use crate::protocol::messages;
use crate::protocol::PgError;
use crate::scram::ScramSecret;
use crate::server::{BackendAddr, Credentials, HiddenQueryError, Login, ServerConn, ServerError};

/// Users cached at most; beyond it expired entries go first, then arbitrary ones.
const MAX_CACHED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_query connection: {0}")]
    Server(#[from] ServerError),
    #[error("auth_query failed on the server: {} {}", .0.code, .0.message)]
    Failed(ServerErrorFields),
    #[error("auth_query answered with a malformed row")]
    MalformedRow,
}

impl UserFacingError for AuthQueryError {
    /// What the client sees: not the details (they are logged), since they are
    /// about pgswitch's own login, not the client's.
    fn to_pg_error(&self) -> PgError {
        PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            "pgswitch: could not look up the user's credentials (auth_query failed; see the pgswitch log)",
        )
    }
}

struct CacheEntry {
    at: Instant,
    secret: Option<Arc<ScramSecret>>,
}

struct AuthConn {
    addr: Arc<BackendAddr>,
    login: Login,
    conn: ServerConn,
}

/// The auth_query connection and cache; one per process.
#[derive(Default)]
pub struct AuthQuery {
    conn: tokio::sync::Mutex<Option<AuthConn>>,
    cache: Mutex<HashMap<String, CacheEntry>>,
}

impl AuthQuery {
    /// The SCRAM secret of `user` on the backend at `addr`, or `None` if the
    /// user doesn't exist there or has no SCRAM secret.
    pub async fn lookup(
        &self,
        addr: &Arc<BackendAddr>,
        config: &Config,
        user: &str,
    ) -> Result<Option<Arc<ScramSecret>>, AuthQueryError> {
        let ttl = config.proxy.auth_cache_ttl;
        if let Some(hit) = self.cached(user, ttl) {
            return Ok(hit);
        }
        let mut slot = self.conn.lock().await;
        // Another client may have looked the same user up while we waited.
        if let Some(hit) = self.cached(user, ttl) {
            return Ok(hit);
        }
        let proxy = &config.proxy;
        let login = Login {
            user: proxy.auth_user.clone().unwrap_or_default(),
            database: proxy.auth_dbname.clone(),
            credentials: proxy
                .auth_password
                .as_ref()
                .map(|p| Credentials::Password(p.0.clone()))
                .unwrap_or_default(),
        };
        // Reuse only a live connection to the same backend with the same login
        // (a cutover or a reload may have changed either).
        let reusable = slot
            .as_mut()
            .is_some_and(|c| Arc::ptr_eq(&c.addr, addr) && c.login == login && c.conn.is_usable());
        let auth = match slot.take() {
            Some(auth) if reusable => auth,
            _ => AuthConn {
                conn: ServerConn::connect(addr.clone(), &login, proxy.server_connect_timeout, 1)
                    .await?,
                addr: addr.clone(),
                login,
            },
        };
        let mut auth = auth;
        let timeout = proxy.server_connect_timeout.max(Duration::from_secs(1));
        let result = match tokio::time::timeout(
            timeout,
            query_secret(&mut auth.conn, config.auth_query(), user),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(AuthQueryError::Server(ServerError::ConnectTimeout {
                addr: addr.to_string(),
            })),
        };
        match &result {
            // The server said no (bad query, permissions): the connection is fine.
            Ok(_) | Err(AuthQueryError::Failed(_)) => *slot = Some(auth),
            // Anything else leaves it in an unknown state: the next lookup reconnects.
            Err(_) => {}
        }
        let found = result?;
        self.remember(user, found.clone());
        Ok(found)
    }

    fn cached(&self, user: &str, ttl: Duration) -> Option<Option<Arc<ScramSecret>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(user)
            .filter(|e| e.at.elapsed() < ttl)
            .map(|e| e.secret.clone())
    }

    fn remember(&self, user: &str, secret: Option<Arc<ScramSecret>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED && !cache.contains_key(user) {
            // Cached entries older than this are expired under any sane TTL
            // change; drop the oldest half if that is not enough.
            let mut ages: Vec<Instant> = cache.values().map(|e| e.at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            cache.retain(|_, e| e.at > cutoff);
        }
        cache.insert(
            user.to_owned(),
            CacheEntry {
                at: Instant::now(),
                secret,
            },
        );
    }

    /// Drops every cached answer (e.g. after a reload changed auth settings).
    pub fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Runs the query for `user` (Parse/Bind/Execute/Sync, text results) and
/// returns the secret in the first row: the second column (`usename, passwd`),
/// or the only one.
async fn query_secret(
    conn: &mut ServerConn,
    sql: &str,
    user: &str,
) -> Result<Option<Arc<ScramSecret>>, AuthQueryError> {
    let mut out = BytesMut::new();
    messages::extended_query(&mut out, sql, &[user]);
    let mut first_row: Option<Vec<u8>> = None;
    let answered = conn
        .exchange(&out, |row| {
            first_row.get_or_insert_with(|| row.to_vec());
        })
        .await;
    match answered {
        Ok(_) => {}
        Err(HiddenQueryError::Failed(fields)) => return Err(AuthQueryError::Failed(fields)),
        Err(HiddenQueryError::Server(e)) => return Err(AuthQueryError::Server(e)),
    }
    let stored = first_row.map(|row| secret_column(&row)).transpose()?;
    Ok(stored
        .flatten()
        .and_then(|text| ScramSecret::parse(&text).ok())
        .map(Arc::new))
}

/// The secret column of a DataRow: `None` for SQL NULL.
fn secret_column(body: &[u8]) -> Result<Option<String>, AuthQueryError> {
    let mut b = body;
    if b.len() < 2 {
        return Err(AuthQueryError::MalformedRow);
    }
    let columns = b.get_i16();
    let wanted = if columns >= 2 { 1 } else { 0 };
    for i in 0..columns {
        if b.len() < 4 {
            return Err(AuthQueryError::MalformedRow);
        }
        let len = b.get_i32();
        let value = if len < 0 {
            None
        } else {
            let len = len as usize;
            if b.len() < len {
                return Err(AuthQueryError::MalformedRow);
            }
            let value = b[..len].to_vec();
            b.advance(len);
            Some(value)
        };
        if i == wanted {
            return value
                .map(|v| String::from_utf8(v).map_err(|_| AuthQueryError::MalformedRow))
                .transpose();
        }
    }
    Err(AuthQueryError::MalformedRow)
}

// Here rather than beside the other user-facing errors in `client_conn`,
// which `auth` depends on: no import cycle.
impl From<AuthQueryError> for crate::client_conn::ClientError {
    fn from(e: AuthQueryError) -> Self {
        crate::client_conn::ClientError::Pg(e.to_pg_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn row(columns: &[Option<&str>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(columns.len() as i16);
        for c in columns {
            match c {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
        b.to_vec()
    }

    #[test]
    fn picks_the_password_column() {
        assert_eq!(
            secret_column(&row(&[Some("app"), Some("SCRAM-x")])).unwrap(),
            Some("SCRAM-x".into())
        );
        assert_eq!(
            secret_column(&row(&[Some("SCRAM-y")])).unwrap(),
            Some("SCRAM-y".into())
        );
        assert_eq!(secret_column(&row(&[Some("app"), None])).unwrap(), None);
    }

    #[test]
    fn malformed_rows_are_errors() {
        for body in [vec![], vec![0, 2, 0, 0, 0, 9, b'a'], vec![0, 0], vec![0, 1]] {
            assert!(secret_column(&body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn cache_honours_ttl_and_bound() {
        let q = AuthQuery::default();
        q.remember("a", None);
        assert_eq!(q.cached("a", Duration::from_secs(60)), Some(None));
        assert_eq!(q.cached("a", Duration::ZERO), None);
        for i in 0..MAX_CACHED + 10 {
            q.remember(&format!("u{i}"), None);
        }
        assert!(q.cache.lock().unwrap().len() <= MAX_CACHED);
    }
}
