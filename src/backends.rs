//! The two database servers, their pools, and how pgswitch logs in to them:
//! the backend login policy (server_user, server_password, the user's own
//! password, or the client's SCRAM keys passed through) and the cache of
//! those client keys; and the probe that checks a backend can be reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use crate::config::{Config, Side};
use crate::pool::{Pool, PoolKey, PoolSettings};
use crate::reachability::CheckedBy;
use crate::scram::client::ScramKeys;
use crate::server::{BackendAddr, Credentials, Login, ServerConn};

/// One database server and the pools pgswitch keeps to it.
pub struct Backend {
    pub side: Side,
    pub addr: Arc<BackendAddr>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Backend {
    pub fn new(side: Side, addr: BackendAddr) -> Arc<Backend> {
        Arc::new(Backend {
            side,
            addr: Arc::new(addr),
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// The pool for `key`, created with `settings` on first use.
    pub fn pool(&self, key: &PoolKey, settings: impl FnOnce() -> PoolSettings) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(key) {
            return pool.clone();
        }
        let pool = Pool::new(key.clone(), self.addr.clone(), settings());
        pools.insert(key.clone(), pool.clone());
        pool
    }

    /// Checks that the server can be reached, unless a probe is already
    /// running: a login with the backend's admin credentials; without them,
    /// the start of a login as the user of one of its pools (up to the
    /// server's first answer: no session is started, so it never counts
    /// among a pool's connections on the server); with no pool either, a TCP
    /// connect. The outcome goes to the backend's reachability.
    pub async fn probe(&self, config: &Config) {
        let reachability = &self.addr.reachability;
        let Some(_probing) = reachability.start_probe() else {
            return;
        };
        let timeout = config.proxy.server_connect_timeout;
        let probed = if let Some(login) = self.admin_login(config) {
            ServerConn::probe(self.addr.clone(), &login, timeout).await
        } else if let Some(pool) = self.pools().first() {
            let login = &pool.settings().login;
            ServerConn::probe_startup(self.addr.clone(), &login.user, &login.database, timeout)
                .await
        } else {
            self.probe_tcp(timeout).await;
            return;
        };
        if let Err(e) = probed {
            tracing::debug!(backend = %self.side, error = %e, "backend probe failed");
        }
    }

    async fn probe_tcp(&self, timeout: std::time::Duration) {
        let reachability = &self.addr.reachability;
        let target = (self.addr.host.as_str(), self.addr.port);
        match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
            Ok(Ok(_)) => reachability.record_ok(CheckedBy::TcpProbe),
            Ok(Err(e)) => reachability.record_error(
                CheckedBy::TcpProbe,
                false,
                &format!("could not connect to {}: {e}", self.addr),
            ),
            Err(_) => reachability.record_error(
                CheckedBy::TcpProbe,
                false,
                &format!("timed out connecting to {}", self.addr),
            ),
        }
    }

    /// The admin user's login to the replicated database, if configured.
    fn admin_login(&self, config: &Config) -> Option<Login> {
        let (user, password) = config.backends.get(self.side)?.admin_credentials()?;
        Some(Login {
            user,
            database: config.replication.database.clone(),
            credentials: Credentials::Password(password),
        })
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Blue, green (when configured) and the client keys their logins may use.
pub struct Backends {
    blue: Arc<Backend>,
    green: Option<Arc<Backend>>,
    /// Per user, the ClientKey of its last successful SCRAM login, for SCRAM
    /// pass-through to the servers. Only for users whose backend logins need
    /// it; memory only, never logged (its Debug is redacted).
    client_keys: Mutex<HashMap<String, ScramKeys>>,
}

/// At most this many users' client keys are kept (only authenticated users
/// get here, so this bounds it to the users that logged in).
const MAX_CLIENT_KEYS: usize = 10_000;

impl Backends {
    pub fn new(blue: Arc<Backend>, green: Option<Arc<Backend>>) -> Backends {
        Backends {
            blue,
            green,
            client_keys: Mutex::default(),
        }
    }

    pub fn get(&self, side: Side) -> Option<Arc<Backend>> {
        match side {
            Side::Blue => Some(self.blue.clone()),
            Side::Green => self.green.clone(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        std::iter::once(&self.blue).chain(self.green.iter())
    }

    /// The pool for `key` on `backend`, created on first use.
    pub fn pool_for(&self, config: &Config, backend: &Backend, key: &PoolKey) -> Arc<Pool> {
        let keys = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
        let pool = backend.pool(key, || pool_settings(config, key, &keys));
        // A client's new keys (its password changed) reach an existing pool here;
        // the next server connection it opens logs in with them.
        let login = backend_login(config, key, &keys);
        if pool.settings().login != login {
            pool.set_login(login);
        }
        pool
    }

    /// Keeps a client's SCRAM keys if its user's backend logins need them
    /// (SCRAM pass-through): users with only a `scram_secret` and no
    /// `server_password`, and users found by auth_query.
    pub fn remember_client_keys(&self, config: &Config, user: &str, keys: ScramKeys) {
        let needed = match config.user(user) {
            Some(u) => u.password.is_none() && u.server_password.is_none(),
            None => true,
        };
        if needed {
            let mut map = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_CLIENT_KEYS && !map.contains_key(user) {
                map.clear();
            }
            map.insert(user.to_owned(), keys);
        }
    }

    /// Applies a reloaded configuration to every existing pool.
    pub fn reconfigure(&self, config: &Config) {
        for backend in self.iter() {
            for pool in backend.pools() {
                let keys = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
                pool.reconfigure(pool_settings(config, &pool.key, &keys));
            }
        }
    }
}

/// Who pgswitch logs in to the servers as for a client user, and how:
/// `server_user` (default: the client's user) with `server_password`, else the
/// user's password, else the client's SCRAM keys (pass-through).
fn backend_login(
    config: &Config,
    key: &PoolKey,
    client_keys: &HashMap<String, ScramKeys>,
) -> Login {
    let user = config.user(&key.user);
    let credentials = match user {
        Some(u) => match (&u.server_password, &u.password) {
            (Some(password), _) | (None, Some(password)) => Credentials::Password(password.clone()),
            (None, None) => client_keys
                .get(&key.user)
                .filter(|keys| u.scram.as_ref().is_some_and(|s| *s == keys.secret))
                .cloned()
                .map(Credentials::ScramKeys)
                .unwrap_or_default(),
        },
        None if config.auth_query_enabled() => client_keys
            .get(&key.user)
            .cloned()
            .map(Credentials::ScramKeys)
            .unwrap_or_default(),
        None => Credentials::None,
    };
    Login {
        user: user
            .and_then(|u| u.server_user.clone())
            .unwrap_or_else(|| key.user.clone()),
        database: key.database.clone(),
        credentials,
    }
}

/// Pool settings for one (database, user) from the configuration.
fn pool_settings(
    config: &Config,
    key: &PoolKey,
    client_keys: &HashMap<String, ScramKeys>,
) -> PoolSettings {
    let proxy = &config.proxy;
    let user = config.user(&key.user);
    PoolSettings {
        size: user
            .and_then(|u| u.pool_size)
            .unwrap_or(proxy.default_pool_size),
        min_size: proxy.min_pool_size,
        query_wait_timeout: proxy.query_wait_timeout,
        idle_timeout: proxy.server_idle_timeout,
        lifetime: proxy.server_lifetime,
        connect_timeout: proxy.server_connect_timeout,
        statements_per_server: proxy.prepared_statements_per_server,
        login: backend_login(config, key, client_keys),
    }
}
