//! The running proxy: shared state, the listener, signals (reload, shutdown)
//! and housekeeping. Control plane code reaches the data plane only through
//! [`crate::switch::Switch`] and the pools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::auth::query::AuthQuery;
use crate::auth::{ScramKeys, UserSecrets};
use crate::cancel::CancelRegistry;
use crate::config::{Config, ConfigError, Side};
use crate::metrics::{Metrics, Snapshot};
use crate::pool::{Pool, PoolKey, PoolSettings};
use crate::server::{BackendAddr, Credentials, Login};
use crate::statements::StatementRegistry;
use crate::switch::{Backend, Holder, Switch};
use crate::tls::{ClientTls, ServerTls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Admin(crate::admin::AdminError),
    #[error(transparent)]
    State(crate::cutover::state::StateError),
    #[error("{key}: {source}")]
    Tls { key: String, source: TlsError },
}

/// The TLS settings built from a configuration: the client leg's acceptor and
/// each backend's connector. Reading the files is what can fail.
pub struct TlsSetup {
    pub client: ClientTls,
    pub blue: ServerTls,
    pub green: Option<ServerTls>,
}

impl TlsSetup {
    pub fn load(config: &Config) -> Result<TlsSetup, AppError> {
        let client = ClientTls::load(&config.proxy).map_err(|source| AppError::Tls {
            key: "proxy.tls_cert".into(),
            source,
        })?;
        let server = |side: Side| {
            config
                .backends
                .get(side)
                .map(|b| {
                    ServerTls::load(b).map_err(|source| AppError::Tls {
                        key: format!("backends.{side}.server_tls"),
                        source,
                    })
                })
                .transpose()
        };
        let blue = server(Side::Blue)?
            .unwrap_or_else(|| unreachable!("[backends.blue] is required by the config schema"));
        Ok(TlsSetup {
            client,
            blue,
            green: server(Side::Green)?,
        })
    }
}

pub struct App {
    config: ArcSwap<Config>,
    config_path: PathBuf,
    secrets: ArcSwap<UserSecrets>,
    /// Looks up users missing from `[[users]]` (when auth_query is enabled).
    pub auth_query: AuthQuery,
    /// Per user, the ClientKey of its last successful SCRAM login, for SCRAM
    /// pass-through to the servers. Only for users whose backend logins need
    /// it; memory only, never logged (its Debug is redacted).
    client_keys: std::sync::Mutex<std::collections::HashMap<String, ScramKeys>>,
    client_tls: ArcSwap<ClientTls>,
    pub switch: Arc<Switch>,
    blue: Arc<Backend>,
    green: Option<Arc<Backend>>,
    pub statements: StatementRegistry,
    pub cancels: Arc<CancelRegistry>,
    clients: AtomicUsize,
    next_client_id: AtomicU32,
    shutdown: watch::Sender<bool>,
    pub metrics: Metrics,
    /// Runs cutovers and fallbacks; keeps their history and the state file.
    pub cutover: crate::cutover::Controller,
    /// Replication lag toward the other side, refreshed by housekeeping.
    lag: std::sync::Mutex<Option<crate::replication::Lag>>,
}

/// Counts a client for max_client_conn while alive.
pub struct ClientCount(Arc<App>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl App {
    /// Builds the proxy's state; fails only when a TLS certificate, key or CA
    /// can't be loaded.
    pub fn new(config: Config, config_path: PathBuf) -> Result<Arc<App>, AppError> {
        let TlsSetup {
            client: client_tls,
            blue: blue_tls,
            green: green_tls,
        } = TlsSetup::load(&config)?;
        let backend = |side: Side, tls: Option<ServerTls>| {
            config.backends.get(side).map(|b| {
                Backend::new(
                    side,
                    BackendAddr {
                        host: b.host.clone(),
                        port: b.port,
                        tls: tls.unwrap_or_else(ServerTls::disabled),
                    },
                )
            })
        };
        let blue = backend(Side::Blue, Some(blue_tls))
            .unwrap_or_else(|| unreachable!("[backends.blue] is required by the config schema"));
        let green = backend(Side::Green, green_tls);
        // The state file, when present, says which side a cutover left active;
        // it wins over proxy.toml so a restart never silently goes back.
        let state_file = config.cutover.state_file.clone();
        let persisted = match &state_file {
            Some(path) => crate::cutover::state::load(path).map_err(AppError::State)?,
            None => None,
        }
        .unwrap_or_else(|| crate::cutover::state::PersistedState::new(config.cutover.active));
        let active = match (persisted.active, &green) {
            (Side::Green, Some(green)) => green.clone(),
            (Side::Green, None) => return Err(AppError::State(
                crate::cutover::state::StateError::Inconsistent(
                    "the state file says green is active, but [backends.green] is not configured"
                        .into(),
                ),
            )),
            _ => blue.clone(),
        };
        let cutover = crate::cutover::Controller::new(persisted, state_file);
        let secrets = UserSecrets::derive(&config);
        Ok(Arc::new(App {
            config: ArcSwap::from_pointee(config),
            config_path,
            secrets: ArcSwap::from_pointee(secrets),
            auth_query: AuthQuery::default(),
            client_keys: Default::default(),
            client_tls: ArcSwap::from_pointee(client_tls),
            switch: Arc::new(Switch::new(active)),
            blue,
            green,
            statements: StatementRegistry::default(),
            cancels: Arc::new(CancelRegistry::default()),
            clients: AtomicUsize::new(0),
            next_client_id: AtomicU32::new(1),
            shutdown: watch::Sender::new(false),
            metrics: Metrics::new(),
            cutover,
            lag: std::sync::Mutex::new(None),
        }))
    }

    /// Holds new transactions at the gate (admin /pause) until /resume, also
    /// across a cutover that runs meanwhile.
    pub fn pause(&self) {
        if self.switch.gate.hold(Holder::Operator) {
            tracing::info!("paused: new transactions wait at the gate");
        }
    }

    /// Ends the operator's pause (admin /resume); the gate opens unless a
    /// cutover holds it too.
    pub fn resume(&self) {
        if let Some(held) = self.switch.gate.release(Holder::Operator) {
            self.metrics.pause_seconds.observe(held.as_secs_f64());
            tracing::info!(pause_ms = held.as_millis() as u64, "resumed");
        }
    }

    pub fn admin_token(&self) -> Option<String> {
        self.config().admin.resolved_token()
    }

    fn all_pools(&self) -> impl Iterator<Item = (Side, Arc<Pool>)> + '_ {
        self.backends()
            .flat_map(|b| b.pools().into_iter().map(move |p| (b.side, p)))
    }

    pub fn metrics_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot {
            clients_total: self.client_count(),
            ..Snapshot::default()
        };
        for backend in self.backends() {
            let (mut active, mut idle) = (0, 0);
            for pool in backend.pools() {
                let stats = pool.stats();
                active += stats.active;
                idle += stats.idle;
                snapshot.clients_waiting += stats.waiting;
            }
            snapshot.clients_active += active;
            snapshot.servers.push((backend.side.as_str(), active, idle));
        }
        snapshot
    }

    /// GET /status.
    pub fn status_json(&self) -> serde_json::Value {
        let pools: Vec<serde_json::Value> = self
            .all_pools()
            .map(|(side, pool)| {
                serde_json::json!({
                    "backend": side.as_str(),
                    "database": pool.key.database,
                    "user": pool.key.user,
                    "stats": pool.stats(),
                })
            })
            .collect();
        serde_json::json!({
            "active": self.switch.active().side.as_str(),
            "paused": self.switch.gate.is_closed(),
            "paused_by": self.switch.gate.holders().iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "phase": self.cutover.phase(),
            "replication_lag": *self.lag.lock().unwrap_or_else(|e| e.into_inner()),
            "clients": self.client_count(),
            "pools": pools,
        })
    }

    /// The client leg's TLS settings in force now (reloaded on SIGHUP).
    pub fn client_tls(&self) -> Arc<ClientTls> {
        self.client_tls.load_full()
    }

    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    pub fn secrets(&self) -> Arc<UserSecrets> {
        self.secrets.load_full()
    }

    pub fn next_client_id(&self) -> u32 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn count_client(self: &Arc<Self>) -> ClientCount {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientCount(self.clone())
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub fn backend(&self, side: Side) -> Option<Arc<Backend>> {
        match side {
            Side::Blue => Some(self.blue.clone()),
            Side::Green => self.green.clone(),
        }
    }

    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        std::iter::once(&self.blue).chain(self.green.iter())
    }

    /// The pool for `key` on `backend`, created on first use.
    pub fn pool_for(&self, backend: &Backend, key: &PoolKey) -> Arc<Pool> {
        let config = self.config();
        let keys = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
        let pool = backend.pool(key, || pool_settings(&config, key, &keys));
        // A client's new keys (its password changed) reach an existing pool here;
        // the next server connection it opens logs in with them.
        let login = backend_login(&config, key, &keys);
        if pool.settings().login != login {
            pool.set_login(login);
        }
        pool
    }

    /// Keeps a client's SCRAM keys if its user's backend logins need them
    /// (SCRAM pass-through): users with only a `scram_secret` and no
    /// `server_password`, and users found by auth_query.
    pub fn remember_client_keys(&self, user: &str, keys: ScramKeys) {
        let config = self.config();
        let needed = match config.user(user) {
            Some(u) => u.password.is_none() && u.server_password.is_none(),
            None => true,
        };
        if needed {
            let mut map = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded like the auth_query cache: only authenticated users get
            // here, so this holds at most the users that logged in.
            if map.len() >= 10_000 && !map.contains_key(user) {
                map.clear();
            }
            map.insert(user.to_owned(), keys);
        }
    }

    /// Re-reads proxy.toml: users, pool sizes, timeouts and the client TLS
    /// certificate change in place; connections stay up (new TLS handshakes use
    /// the new certificate). A bad file, certificate or key changes nothing.
    pub async fn reload(&self) -> Result<(), AppError> {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let client_tls = ClientTls::load(&config.proxy).map_err(|source| AppError::Tls {
                key: "proxy.tls_cert".into(),
                source,
            })?;
            let secrets = UserSecrets::derive(&config);
            Ok::<_, AppError>((config, secrets, client_tls))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let (config, secrets, client_tls) = loaded;
        let old = self.config.load_full();
        if config.proxy.listen != old.proxy.listen
            || config.backends.blue != old.backends.blue
            || config.backends.green != old.backends.green
        {
            tracing::warn!(
                "listen address and backends change only on restart; other settings reloaded"
            );
        }
        for backend in self.backends() {
            for pool in backend.pools() {
                let keys = self.client_keys.lock().unwrap_or_else(|e| e.into_inner());
                pool.reconfigure(pool_settings(&config, &pool.key, &keys));
            }
        }
        self.secrets.store(Arc::new(secrets));
        // The auth settings may have changed: look users up afresh.
        self.auth_query.clear_cache();
        self.client_tls.store(Arc::new(client_tls));
        self.config.store(Arc::new(config));
        Ok(())
    }
}

/// Who pgswitch logs in to the servers as for a client user, and how:
/// `server_user` (default: the client's user) with `server_password`, else the
/// user's password, else the client's SCRAM keys (pass-through).
fn backend_login(
    config: &Config,
    key: &PoolKey,
    client_keys: &std::collections::HashMap<String, ScramKeys>,
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
    client_keys: &std::collections::HashMap<String, ScramKeys>,
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

fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    let listen_err = |source| AppError::Listen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(listen_err)?;
    socket.set_reuseaddr(true).map_err(listen_err)?;
    socket.bind(addr).map_err(listen_err)?;
    // A deep backlog: a reconnect storm after a restart must not see refusals.
    socket.listen(4096).map_err(listen_err)
}

/// Runs the proxy until SIGTERM/SIGINT and a graceful drain.
pub async fn run(app: Arc<App>) -> Result<(), AppError> {
    let config = app.config();
    // The admin API listens first: once clients can connect, so can operators.
    let admin_addr = config.admin.listen;
    let admin = crate::admin::bind(admin_addr)
        .await
        .map_err(AppError::Admin)?;
    let listener = bind(config.proxy.listen)?;
    tracing::info!(listen = %config.proxy.listen, active = %app.switch.active().side, mode = ?config.proxy.pool_mode, client_tls = app.client_tls().describe(), "pgswitch listening");
    if config.proxy.auth_method == crate::config::AuthMethod::Trust {
        tracing::warn!("auth_method = \"trust\": clients log in without a password");
    }
    drop(config);
    let mut hangup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
    if app.admin_token().is_none() {
        tracing::warn!(listen = %admin_addr, "admin API without a token (loopback only)");
    }
    tokio::spawn(crate::admin::serve(app.clone(), admin));
    tokio::spawn(housekeeping(app.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(crate::client::serve(app.clone(), stream, peer));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = hangup.recv() => match app.reload().await {
                Ok(()) => tracing::info!(path = %app.config_path.display(), "configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    drop(listener);
    shutdown(&app).await;
    Ok(())
}

/// Stops taking clients, lets transactions finish for up to shutdown_timeout,
/// then returns (the process exit closes the rest).
async fn shutdown(app: &App) {
    let timeout = app.config().proxy.shutdown_timeout;
    tracing::info!(
        clients = app.client_count(),
        ?timeout,
        "shutting down: waiting for transactions to finish"
    );
    app.shutdown.send_replace(true);
    let deadline = tokio::time::Instant::now() + timeout;
    while app.client_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for backend in app.backends() {
        for pool in backend.pools() {
            pool.close_idle();
        }
    }
    tracing::info!(remaining_clients = app.client_count(), "pgswitch stopped");
}

/// Once a second, when the active side has admin credentials: the lag of the
/// replication a cutover (or fallback) would wait for, for /status and the
/// `pgswitch_replication_lag_bytes` gauge.
async fn watch_lag(app: Arc<App>) {
    let mut conn: Option<(Side, tokio_postgres::Client)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = app.config().clone();
        let side = app.switch.active().side;
        let Some((user, password)) = config
            .backends
            .get(side)
            .and_then(|b| b.admin_credentials())
        else {
            continue;
        };
        if conn
            .as_ref()
            .is_none_or(|(s, c)| *s != side || c.is_closed())
        {
            let Some(backend) = config.backends.get(side) else {
                continue;
            };
            let opened = crate::replication::connect(
                &backend.host,
                backend.port,
                &user,
                &password,
                &config.replication.database,
                Duration::from_secs(5),
            )
            .await;
            conn = opened.ok().map(|c| (side, c));
        }
        let Some((_, client)) = &conn else { continue };
        // Blue publishes through the forward slot, green through the reverse one.
        let slot = match side {
            Side::Blue => config.replication.slot().to_owned(),
            Side::Green => crate::replication::ReverseNames::new("").slot,
        };
        let lag = crate::replication::replication_lag(client, &slot)
            .await
            .ok();
        if let Some(lag) = &lag {
            app.metrics.replication_lag_bytes.set(lag.bytes as i64);
        }
        *app.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }
}

/// Once a second: retire idle and old server connections, keep min_pool_size.
async fn housekeeping(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::spawn(watch_lag(app.clone()));
    loop {
        tick.tick().await;
        for backend in app.backends() {
            for pool in backend.pools() {
                let missing = pool.reap();
                for _ in 0..missing {
                    if let Err(e) = pool.add_idle().await {
                        tracing::warn!(pool = %pool.key, error = %e, "could not open a connection for min_pool_size");
                        break;
                    }
                }
            }
        }
    }
}
