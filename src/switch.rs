//! The active backend and the gate: the only control-plane state the data plane
//! reads on its hot path, and the only place it ever waits for the control plane.
//!
//! A client reads the active backend once per transaction (an `ArcSwap` load)
//! and passes the gate (an atomic load) before taking a server connection. A
//! cutover closes the gate, swaps the backend and opens the gate again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Side;
use crate::pool::{Pool, PoolKey, PoolSettings};
use crate::server::BackendAddr;

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

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Holds new transactions while the control plane works; never refuses them.
pub struct Gate {
    closed: AtomicBool,
    state: watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            closed: AtomicBool::new(false),
            state: watch::Sender::new(false),
        }
    }
}

impl Gate {
    /// Returns at once while the gate is open; otherwise waits until it opens.
    #[inline]
    pub async fn pass(&self) {
        if !self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut rx = self.state.subscribe();
        // The sender lives as long as the gate, so this only ends when the gate opens.
        let _ = rx.wait_for(|closed| !*closed).await;
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.state.send_replace(true);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::Release);
        self.state.send_replace(false);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Which backend clients reach, swappable atomically while they run.
pub struct Switch {
    active: ArcSwap<Backend>,
    pub gate: Gate,
    /// Transactions (and session-mode sessions) holding a server connection.
    in_flight: AtomicUsize,
    /// Raised by a cutover's drain: session-mode sessions end at their next
    /// transaction boundary so that none runs on the new side with its
    /// session state silently lost.
    draining: watch::Sender<bool>,
}

/// A transaction (or session) in flight; counted until dropped.
pub struct InFlight(Arc<Switch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Switch {
    pub fn new(active: Arc<Backend>) -> Switch {
        Switch {
            active: ArcSwap::new(active),
            gate: Gate::default(),
            in_flight: AtomicUsize::new(0),
            draining: watch::Sender::new(false),
        }
    }

    /// Passes the gate and counts the caller in flight. The count goes up
    /// before the gate is checked again, so a cutover that closes the gate
    /// and then sees zero in flight knows no transaction can still start on
    /// the old side.
    pub async fn enter(self: &Arc<Self>) -> InFlight {
        loop {
            self.gate.pass().await;
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.gate.closed.load(Ordering::SeqCst) {
                return InFlight(self.clone());
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.send_replace(draining);
    }

    pub fn draining_signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    #[inline]
    pub fn active(&self) -> Arc<Backend> {
        self.active.load_full()
    }

    /// Makes `backend` the active one; returns the previous.
    pub fn swap(&self, backend: Arc<Backend>) -> Arc<Backend> {
        self.active.swap(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn gate_holds_until_opened() {
        let gate = Arc::new(Gate::default());
        gate.pass().await;
        gate.close();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.pass().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        gate.open();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
