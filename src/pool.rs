//! Server connection pools, one per (database, user) on a backend.
//!
//! A semaphore holds the pool's size: a client takes a permit, then an idle
//! connection or a fresh one. Waiting clients are served in arrival order, and a
//! resize on reload only changes the number of permits.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::protocol::error::{sqlstate, UserFacingError};
use crate::protocol::PgError;
use crate::protocol::TxStatus;
use crate::server::{BackendAddr, Login, ServerConn, ServerError};
use crate::session_params::{ParamSet, Reported};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.database)
    }
}

/// What a pool needs from the configuration; replaced whole on reload.
#[derive(Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub query_wait_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    pub connect_timeout: Duration,
    pub statements_per_server: usize,
    pub login: Login,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection for {key} became free within query_wait_timeout ({timeout:?}); all {size} are busy")]
    WaitTimeout {
        key: String,
        timeout: Duration,
        size: usize,
    },
    #[error("the pool for {0} is closed")]
    Closed(String),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl UserFacingError for PoolError {
    fn to_pg_error(&self) -> PgError {
        match self {
            PoolError::WaitTimeout { .. } => {
                PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, format!("pgswitch: {self}"))
                    .with_hint(
                        "Raise the pool size or query_wait_timeout, or look for long transactions.",
                    )
            }
            PoolError::Closed(_) => {
                PgError::fatal(sqlstate::CANNOT_CONNECT_NOW, format!("pgswitch: {self}"))
            }
            PoolError::Server(e) => e.to_pg_error(),
        }
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    pub size: usize,
    pub open: usize,
    pub idle: usize,
    pub active: usize,
    pub waiting: usize,
}

pub struct Pool {
    pub key: PoolKey,
    pub addr: Arc<BackendAddr>,
    settings: ArcSwap<PoolSettings>,
    slots: Arc<Semaphore>,
    /// Permits the semaphore was given in all; tracks resizes.
    slot_count: Mutex<usize>,
    /// Boxed, so that a checkout (inline in every session) stays small and
    /// lending one moves a pointer.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    open: AtomicUsize,
    active: AtomicUsize,
    waiting: AtomicUsize,
    params: Mutex<ParamCache>,
    /// Extra connections for checking startup parameters (see `param_checker`).
    checkers: Arc<Semaphore>,
}

/// Extra server connections a pool may open at once to check new startup
/// parameters while all of its own are busy.
const PARAM_CHECKERS: usize = 2;

/// Startup parameter sets already validated on this pool's servers, and what
/// the servers report by default, so a client whose startup parameters were seen
/// before logs in without taking a server connection.
#[derive(Default)]
struct ParamCache {
    interned: HashMap<Vec<(String, String)>, Arc<ParamSet>>,
    server_defaults: Option<Arc<Reported>>,
}

const MAX_INTERNED_PARAM_SETS: usize = 1024;

impl Pool {
    pub fn new(key: PoolKey, addr: Arc<BackendAddr>, settings: PoolSettings) -> Arc<Pool> {
        let size = settings.size;
        Arc::new(Pool {
            key,
            addr,
            settings: ArcSwap::from_pointee(settings),
            slots: Arc::new(Semaphore::new(size)),
            slot_count: Mutex::new(size),
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            params: Mutex::new(ParamCache::default()),
            checkers: Arc::new(Semaphore::new(PARAM_CHECKERS)),
        })
    }

    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.settings.load()
    }

    /// Takes a server connection, waiting up to `query_wait_timeout` for one;
    /// with how long it waited for a free slot, when it had to.
    pub async fn acquire(
        self: &Arc<Self>,
    ) -> Result<(Checkout, Option<std::time::Duration>), PoolError> {
        let settings = self.settings.load_full();
        let (permit, waited) = match self.slots.clone().try_acquire_owned() {
            Ok(p) => (p, None),
            Err(_) => {
                let since = std::time::Instant::now();
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let permit = self.wait_permit(&self.slots, &settings).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                (permit?, Some(since.elapsed()))
            }
        };
        Ok((self.checkout(permit).await?, waited))
    }

    /// An idle connection now, without waiting, if a slot and one are free:
    /// the common case, kept out of [`Pool::acquire`]'s future, which would
    /// otherwise be reserved in every session.
    pub fn acquire_idle(self: &Arc<Self>) -> Option<Checkout> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        let conn = self.take_idle(&self.settings.load())?;
        Some(self.lend(conn, permit))
    }

    /// A permit of `semaphore`, waiting up to `query_wait_timeout`.
    async fn wait_permit(
        &self,
        semaphore: &Arc<Semaphore>,
        settings: &PoolSettings,
    ) -> Result<OwnedSemaphorePermit, PoolError> {
        let waited = tokio::time::timeout(
            settings.query_wait_timeout,
            semaphore.clone().acquire_owned(),
        );
        match waited.await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(PoolError::Closed(self.key.to_string())),
            Err(_) => Err(PoolError::WaitTimeout {
                key: self.key.to_string(),
                timeout: settings.query_wait_timeout,
                size: settings.size,
            }),
        }
    }

    /// An idle connection, or a new one, for a caller holding a pool slot.
    async fn checkout(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout, PoolError> {
        let settings = self.settings.load_full();
        let conn = match self.take_idle(&settings) {
            Some(conn) => conn,
            // Boxed: connecting (TLS, SCRAM) is a large future that is rarely
            // live; every client's task would otherwise reserve room for it.
            None => Box::new(Box::pin(self.connect(&settings)).await?),
        };
        Ok(self.lend(conn, permit))
    }

    fn lend(self: &Arc<Self>, conn: Box<ServerConn>, permit: OwnedSemaphorePermit) -> Checkout {
        self.active.fetch_add(1, Ordering::Relaxed);
        Checkout {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        }
    }

    /// A server connection to check a client's new startup parameters on: a
    /// pooled one if one is free now, otherwise a short-lived connection of
    /// its own, so that a login never queues behind busy sessions (clients
    /// and drivers have connect timeouts; a queue belongs at the first query).
    /// At most `PARAM_CHECKERS` such extra connections per pool at a time.
    pub async fn param_checker(self: &Arc<Self>) -> Result<ParamChecker, PoolError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return self.checkout(permit).await.map(ParamChecker::Pooled);
        }
        let settings = self.settings.load_full();
        let permit = self.wait_permit(&self.checkers, &settings).await?;
        let conn = ServerConn::connect(
            self.addr.clone(),
            &settings.login,
            settings.connect_timeout,
            settings.statements_per_server,
        );
        Ok(ParamChecker::OneOff(
            Box::new(Box::pin(conn).await?),
            permit,
        ))
    }

    /// The most recently used idle connection that is still good: warm caches,
    /// and the others age out under server_idle_timeout.
    fn take_idle(&self, settings: &PoolSettings) -> Option<Box<ServerConn>> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.created.elapsed() < settings.lifetime && conn.is_usable() {
                return Some(conn);
            }
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn connect(&self, settings: &PoolSettings) -> Result<ServerConn, PoolError> {
        let conn = ServerConn::connect(
            self.addr.clone(),
            &settings.login,
            settings.connect_timeout,
            settings.statements_per_server,
        )
        .await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut params = self.params.lock().unwrap_or_else(|e| e.into_inner());
        if params.server_defaults.is_none() {
            params.server_defaults = Some(Arc::new(conn.reported.clone()));
        }
        Ok(conn)
    }

    fn give_back(&self, mut conn: Box<ServerConn>) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        let lifetime = self.settings.load().lifetime;
        if conn.tx_status == TxStatus::Idle
            && conn.rbuf.is_empty()
            && conn.created.elapsed() < lifetime
        {
            conn.idle_since = Instant::now();
            conn.shrink_buffer();
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        } else {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn discard(&self, conn: Box<ServerConn>) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.open.fetch_sub(1, Ordering::Relaxed);
        drop(conn);
    }

    /// A validated, interned parameter set for these startup parameters, if this
    /// pool has seen them before, with the parameters to report to the client.
    pub fn known_params(&self, raw: &ParamSet) -> Option<(Arc<ParamSet>, Reported)> {
        let cache = self.params.lock().unwrap_or_else(|e| e.into_inner());
        let key: Vec<(String, String)> = raw
            .iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        let set = cache.interned.get(&key)?.clone();
        let defaults = cache.server_defaults.clone()?;
        let reported = defaults
            .iter()
            .map(|(name, value)| match set.get(name) {
                Some(v) => (name.clone(), v.to_owned()),
                None => (name.clone(), value.clone()),
            })
            .collect();
        Some((set, reported))
    }

    /// Remembers that `raw` startup parameters normalize to `set` on this pool.
    pub fn remember_params(&self, raw: &ParamSet, set: &Arc<ParamSet>) {
        let mut cache = self.params.lock().unwrap_or_else(|e| e.into_inner());
        if cache.interned.len() < MAX_INTERNED_PARAM_SETS {
            let key = raw
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            cache.interned.insert(key, set.clone());
        }
    }

    /// Changes who new server connections log in as (e.g. a client's new
    /// SCRAM keys); open connections stay.
    pub fn set_login(&self, login: Login) {
        self.settings.rcu(|current| {
            let mut settings = PoolSettings::clone(current);
            settings.login = login.clone();
            settings
        });
    }

    /// Applies new settings from a reload; the pool's size changes by adding or
    /// retiring permits, never by closing a busy connection.
    pub fn reconfigure(self: &Arc<Self>, settings: PoolSettings) {
        let new_size = settings.size;
        self.settings.store(Arc::new(settings));
        let mut count = self.slot_count.lock().unwrap_or_else(|e| e.into_inner());
        if new_size > *count {
            self.slots.add_permits(new_size - *count);
        } else if new_size < *count {
            let surplus = (*count - new_size) as u32;
            let slots = self.slots.clone();
            // Retire permits as they come free.
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(surplus).await {
                    p.forget();
                }
            });
        }
        *count = new_size;
    }

    /// Closes idle connections past server_idle_timeout (above min_pool_size) or
    /// server_lifetime, and reports how many connections are missing to reach
    /// min_pool_size.
    pub fn reap(&self) -> usize {
        let settings = self.settings.load();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let open = self.open.load(Ordering::Relaxed);
        let mut removable = open.saturating_sub(settings.min_size);
        let before = idle.len();
        // Oldest-idle first: the vector is used as a stack, so index 0 idled longest.
        idle.retain_mut(|conn| {
            let expired = conn.created.elapsed() >= settings.lifetime;
            let stale = removable > 0 && conn.idle_since.elapsed() >= settings.idle_timeout;
            let keep = !(expired || stale) && conn.is_usable();
            if !keep {
                removable = removable.saturating_sub(1);
            }
            keep
        });
        let closed = before - idle.len();
        self.open.fetch_sub(closed, Ordering::Relaxed);
        settings.min_size.saturating_sub(open - closed)
    }

    /// Opens one connection toward min_pool_size.
    pub async fn add_idle(&self) -> Result<(), PoolError> {
        let settings = self.settings.load_full();
        let mut conn = self.connect(&settings).await?;
        conn.idle_since = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(conn));
        Ok(())
    }

    /// Server process ids of the idle connections.
    pub fn idle_backend_pids(&self) -> Vec<i32> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().map(|c| c.backend_pid as i32).collect()
    }

    /// Closes every idle connection (after a cutover, on shutdown).
    pub fn close_idle(&self) {
        let drained: Vec<Box<ServerConn>> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        self.open.fetch_sub(drained.len(), Ordering::Relaxed);
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            size: self.settings.load().size,
            open: self.open.load(Ordering::Relaxed),
            idle: self.idle.lock().map(|i| i.len()).unwrap_or(0),
            active: self.active.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// Where a login checks new startup parameters: a pooled connection, given
/// back afterwards, or an extra one, closed afterwards.
pub enum ParamChecker {
    Pooled(Checkout),
    OneOff(Box<ServerConn>, OwnedSemaphorePermit),
}

impl ParamChecker {
    pub fn conn(&mut self) -> &mut ServerConn {
        match self {
            ParamChecker::Pooled(checkout) => checkout,
            ParamChecker::OneOff(conn, _) => conn,
        }
    }

    pub fn finish(self) {
        if let ParamChecker::Pooled(checkout) = self {
            checkout.release();
        }
    }
}

/// A server connection on loan from a pool. Returned with [`Checkout::release`];
/// dropped without it, the connection is closed, since its state is unknown.
pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Checkout {
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(conn);
        }
    }
}

impl Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        // Only `release` and `drop` take the connection, and both consume the checkout.
        self.conn
            .as_ref()
            .expect("checkout holds a connection until released")
    }
}

impl DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("checkout holds a connection until released")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.discard(conn);
        }
    }
}
