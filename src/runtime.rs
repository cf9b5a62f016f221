//! The composition root: the only module that puts the data plane
//! ([`crate::client`] sessions over a [`DataPlane`]) and the control plane
//! ([`crate::admin`], [`crate::cutover`], the replication-lag watch) together.
//! It binds the listeners, handles signals (SIGHUP reload, SIGTERM/SIGINT
//! drain) and runs housekeeping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{AdminError, AdminState};
use crate::config::{Config, Side};
use crate::cutover::recover::RecoverError;
use crate::cutover::{Controller, Direction};
use crate::data_plane::{DataPlane, LoadError};
use crate::replication::LagWatch;
use crate::state::{self, StateError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Admin(AdminError),
    #[error(transparent)]
    State(StateError),
    #[error("{0}")]
    Recover(String),
}

/// A running pgswitch: the data plane and the control plane over it.
pub struct Runtime {
    pub data: Arc<DataPlane>,
    pub cutover: Arc<Controller>,
    pub lag: Arc<LagWatch>,
    config_path: PathBuf,
    /// Held for the process's life: one pgswitch per state file.
    _state_lock: Option<std::fs::File>,
}

impl Runtime {
    /// Builds both planes. The state file, when present, says which side a
    /// cutover left active; it wins over proxy.toml so a restart never
    /// silently goes back.
    pub fn new(config: Config, config_path: PathBuf) -> Result<Runtime, StartError> {
        let state_file = config.cutover.state_file.clone();
        let (persisted, state_lock) =
            state::open(state_file.as_deref(), config.cutover.active).map_err(StartError::State)?;
        if persisted.active == Side::Green && config.backends.green.is_none() {
            return Err(StartError::State(StateError::Inconsistent(
                "the state file says green is active, but [backends.green] is not configured"
                    .into(),
            )));
        }
        let data = DataPlane::new(config, persisted.active)?;
        // Every outcome's series exists from the start, at 0, so that an
        // alert on increase(pgswitch_cutovers_total{outcome="aborted"}[...])
        // fires on the first abort too.
        for outcome in crate::cutover::report::Outcome::ALL {
            for direction in [Direction::Cutover, Direction::Fallback] {
                let _ = data
                    .metrics
                    .cutovers
                    .get_or_create(&crate::metrics::OutcomeLabels {
                        kind: direction.name(),
                        from: direction.from().as_str(),
                        to: direction.to().as_str(),
                        outcome: outcome.as_str(),
                    });
            }
        }
        Ok(Runtime {
            data,
            cutover: Arc::new(Controller::new(persisted, state_file)),
            lag: Arc::new(LagWatch::default()),
            config_path,
            _state_lock: state_lock,
        })
    }

    /// Before taking clients: brings the servers to the state file's answer
    /// (undoing a switch that a crash interrupted). When a side does not
    /// answer, serves anyway and keeps retrying; when the servers contradict
    /// the state file, refuses to start.
    async fn reconcile_at_start(&self, config: &Config) -> Result<(), StartError> {
        if !crate::cutover::manages_replication(config) {
            return Ok(());
        }
        if let Some(intent) = self.cutover.persisted().intent {
            tracing::warn!(kind = intent.kind, from = %intent.from, to = %intent.to, started_at_ms = intent.started_at_ms,
                "found an unfinished switch in the state file: undoing it");
        }
        match self.cutover.recover(config, None).await {
            Ok(changes) if changes.is_empty() => {
                tracing::info!("the servers match the state file");
                Ok(())
            }
            Ok(changes) => {
                for change in &changes {
                    tracing::warn!(change, "reconciled");
                }
                Ok(())
            }
            Err(RecoverError::Undecidable(why)) => Err(StartError::Recover(why)),
            Err(e) => {
                tracing::error!(error = %e, active = %self.cutover.persisted().active,
                    "could not reconcile the servers with the state file; serving and retrying");
                Ok(())
            }
        }
    }

    /// Runs the proxy until SIGTERM/SIGINT and a graceful drain.
    pub async fn run(self) -> Result<(), StartError> {
        let data = &self.data;
        let config = data.config();
        // The admin API listens first: once clients can connect, so can operators.
        let admin_addr = config.admin.listen;
        let admin = crate::admin::bind(admin_addr)
            .await
            .map_err(StartError::Admin)?;
        self.reconcile_at_start(&config).await?;
        let listener = bind(config.proxy.listen)?;
        tracing::info!(listen = %config.proxy.listen, active = %data.switch.active().side, mode = ?config.proxy.pool_mode, client_tls = data.client_tls().describe(), "pgswitch listening");
        if config.proxy.auth_method == crate::config::AuthMethod::Trust {
            tracing::warn!("auth_method = \"trust\": clients log in without a password");
        }
        if config.admin.resolved_token().is_none() {
            tracing::warn!(listen = %admin_addr, "admin API without a token (loopback only)");
        }
        drop(config);
        let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let admin_state = Arc::new(AdminState {
            data: data.clone(),
            cutover: self.cutover.clone(),
            lag: self.lag.clone(),
            config_path: self.config_path.clone(),
        });
        tokio::spawn(crate::admin::serve(admin_state, admin));
        tokio::spawn(housekeeping(data.clone()));
        let (cutover, upkeep_data) = (self.cutover.clone(), data.clone());
        tokio::spawn(async move { cutover.keep_reconciled(&upkeep_data).await });
        tokio::spawn(crate::replication::watch_lag(
            data.clone(),
            self.lag.clone(),
        ));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(crate::client::serve(data.clone(), stream, peer));
                    }
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = hangup.recv() => match data.reload(&self.config_path).await {
                    Ok(()) => tracing::info!(path = %self.config_path.display(), "configuration reloaded"),
                    Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
                },
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        drop(listener);
        shutdown(data).await;
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen_err = |source| StartError::Listen { addr, source };
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

/// Stops taking clients, lets transactions finish for up to shutdown_timeout,
/// then returns (the process exit closes the rest).
async fn shutdown(data: &DataPlane) {
    let timeout = data.config().proxy.shutdown_timeout;
    tracing::info!(
        clients = data.client_count(),
        ?timeout,
        "shutting down: waiting for transactions to finish"
    );
    data.start_shutdown();
    let deadline = tokio::time::Instant::now() + timeout;
    while data.client_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for backend in data.backends.iter() {
        for pool in backend.pools() {
            pool.close_idle();
        }
    }
    tracing::info!(remaining_clients = data.client_count(), "pgswitch stopped");
}

/// Starts a probe of every backend that no connection (or probe) reported on
/// within `server_probe_interval`, each in a task of its own so that a server
/// that does not answer holds up nothing else; at most one probe per backend
/// runs at a time, and the probe never runs on the data path.
fn probe_backends(data: &Arc<DataPlane>) {
    let config = Arc::clone(&data.config());
    let interval = config.proxy.server_probe_interval;
    if interval.is_zero() {
        return;
    }
    for backend in data.backends.iter() {
        if backend
            .addr
            .reachability
            .age()
            .is_some_and(|age| age < interval)
        {
            continue;
        }
        let backend = backend.clone();
        let config = config.clone();
        tokio::spawn(async move { backend.probe(&config).await });
    }
}

/// Once a second: probe the backends nothing was learned about lately, retire
/// idle and old server connections, keep min_pool_size.
async fn housekeeping(data: Arc<DataPlane>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        probe_backends(&data);
        for backend in data.backends.iter() {
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
