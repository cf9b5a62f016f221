//! What the data plane needs, and nothing of the control plane: the
//! configuration and user secrets in force, the backends and their pools, the
//! switch (active backend, gate and the signals sessions watch: shutdown,
//! draining), the statement registry, cancel keys, client counters and
//! metrics. Client sessions hold an
//! `Arc<DataPlane>`; the control plane acts on it only through the switch,
//! the gate and the pools (and the cancel registry, when a cutover's drain
//! cancels stragglers).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::query::AuthQuery;
use crate::auth::{ScramKeys, UserSecrets};
use crate::backends::{Backend, Backends};
use crate::cancel::CancelRegistry;
use crate::config::{Config, ConfigError, Side};
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolKey};
use crate::server::BackendAddr;
use crate::statements::{self, StatementRegistry};
use crate::switch::Switch;
use crate::tls::{ClientTls, ServerTls, TlsError};

/// Why a configuration could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    pub fn load(config: &Config) -> Result<TlsSetup, LoadError> {
        let client = ClientTls::load(&config.proxy).map_err(|source| LoadError::Tls {
            key: "proxy.tls_cert".into(),
            source,
        })?;
        let server = |side: Side| {
            config
                .backends
                .get(side)
                .map(|b| {
                    ServerTls::load(b).map_err(|source| LoadError::Tls {
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

pub struct DataPlane {
    config: ArcSwap<Config>,
    secrets: ArcSwap<UserSecrets>,
    /// Looks up users missing from `[[users]]` (when auth_query is enabled).
    pub auth_query: AuthQuery,
    client_tls: ArcSwap<ClientTls>,
    pub backends: Backends,
    pub switch: Arc<Switch>,
    pub statements: StatementRegistry,
    pub cancels: Arc<CancelRegistry>,
    clients: AtomicUsize,
    next_client_id: AtomicU32,
    pub metrics: Metrics,
}

/// Counts a client for max_client_conn while alive.
pub struct ClientCount(Arc<DataPlane>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DataPlane {
    /// Builds the data plane with `active` receiving traffic; fails only when
    /// a TLS certificate, key or CA can't be loaded.
    pub fn new(config: Config, active: Side) -> Result<Arc<DataPlane>, LoadError> {
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
                        reachability: Default::default(),
                        own: Default::default(),
                    },
                )
            })
        };
        let blue = backend(Side::Blue, Some(blue_tls))
            .unwrap_or_else(|| unreachable!("[backends.blue] is required by the config schema"));
        let green = backend(Side::Green, green_tls);
        let backends = Backends::new(blue.clone(), green);
        let active = backends.get(active).unwrap_or(blue);
        let secrets = UserSecrets::derive(&config);
        let statements = StatementRegistry::new(statement_limits(&config));
        Ok(Arc::new(DataPlane {
            config: ArcSwap::from_pointee(config),
            secrets: ArcSwap::from_pointee(secrets),
            auth_query: AuthQuery::default(),
            client_tls: ArcSwap::from_pointee(client_tls),
            backends,
            switch: Arc::new(Switch::new(active)),
            statements,
            cancels: Arc::new(CancelRegistry::default()),
            clients: AtomicUsize::new(0),
            next_client_id: AtomicU32::new(1),
            metrics: Metrics::new(),
        }))
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

    pub fn is_shutting_down(&self) -> bool {
        self.switch.is_shutting_down()
    }

    /// Tells every session to end at its next transaction boundary.
    pub fn start_shutdown(&self) {
        self.switch.start_shutdown();
    }

    pub fn backend(&self, side: Side) -> Option<Arc<Backend>> {
        self.backends.get(side)
    }

    /// The local addresses of this process's connections to `side`.
    pub fn own_connections(&self, side: Side) -> Vec<String> {
        self.backend(side)
            .map(|b| b.addr.own.list())
            .unwrap_or_default()
    }

    /// The pool for `key` on `backend`, created on first use.
    pub fn pool_for(&self, backend: &Backend, key: &PoolKey) -> Arc<Pool> {
        self.backends.pool_for(&self.config(), backend, key)
    }

    /// Keeps a client's SCRAM keys if its user's backend logins need them.
    pub fn remember_client_keys(&self, user: &str, keys: ScramKeys) {
        self.backends
            .remember_client_keys(&self.config(), user, keys);
    }

    /// Puts a reloaded proxy.toml in force: users, pool sizes, timeouts and the
    /// client TLS certificate change in place; connections stay up (new TLS
    /// handshakes use the new certificate). A bad file, certificate or key
    /// changes nothing.
    pub async fn reload(&self, path: &std::path::Path) -> Result<(), LoadError> {
        let path = path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let client_tls = ClientTls::load(&config.proxy).map_err(|source| LoadError::Tls {
                key: "proxy.tls_cert".into(),
                source,
            })?;
            let secrets = UserSecrets::derive(&config);
            Ok::<_, LoadError>((config, secrets, client_tls))
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
        self.backends.reconfigure(&config);
        self.statements.set_limits(statement_limits(&config));
        self.secrets.store(Arc::new(secrets));
        // The auth settings may have changed: look users up afresh.
        self.auth_query.clear_cache();
        self.client_tls.store(Arc::new(client_tls));
        self.config.store(Arc::new(config));
        Ok(())
    }
}

/// The statement registry's bounds in `config`.
fn statement_limits(config: &Config) -> statements::Limits {
    statements::Limits {
        entries: config.proxy.prepared_statements_max,
        bytes: config.proxy.prepared_statements_max_bytes.bytes(),
    }
}
