//! The active backend and the gate: the only control-plane state the data plane
//! reads on its hot path, and the only place it ever waits for the control plane.
//!
//! A client reads the active backend once per transaction (an `ArcSwap` load)
//! and passes the gate (an atomic load) before taking a server connection. A
//! cutover closes the gate, swaps the backend and opens the gate again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::backends::Backend;

/// Who holds the gate closed. It opens only when no one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// An operator's `POST /pause`, until `POST /resume`.
    Operator,
    /// A cutover or fallback, from its pause to its swap (or abort).
    Cutover,
}

impl Holder {
    pub fn as_str(self) -> &'static str {
        match self {
            Holder::Operator => "operator",
            Holder::Cutover => "cutover",
        }
    }
}

/// Holds new transactions while the control plane works; never refuses them.
///
/// Each holder closes and releases it for itself: a cutover during an
/// operator's pause leaves the gate closed when it is done, and the
/// operator's pause time runs from the operator's own `/pause`.
pub struct Gate {
    closed: AtomicBool,
    state: watch::Sender<bool>,
    /// Since when each holder holds it.
    holders: Mutex<Holders>,
    /// Passes that found the gate closed and waited (counted off the hot
    /// path: only when closed).
    waited: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Holders {
    operator: Option<Instant>,
    cutover: Option<Instant>,
}

impl Holders {
    fn slot(&mut self, holder: Holder) -> &mut Option<Instant> {
        match holder {
            Holder::Operator => &mut self.operator,
            Holder::Cutover => &mut self.cutover,
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            closed: AtomicBool::new(false),
            state: watch::Sender::new(false),
            holders: Mutex::new(Holders::default()),
            waited: std::sync::atomic::AtomicU64::new(0),
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
        self.waited.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.state.subscribe();
        // The sender lives as long as the gate, so this only ends when the gate opens.
        let _ = rx.wait_for(|closed| !*closed).await;
    }

    /// Closes the gate for `holder`. False if `holder` held it already.
    pub fn hold(&self, holder: Holder) -> bool {
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        let slot = holders.slot(holder);
        if slot.is_some() {
            return false;
        }
        *slot = Some(Instant::now());
        self.closed.store(true, Ordering::SeqCst);
        self.state.send_replace(true);
        true
    }

    /// Ends `holder`'s hold and returns how long it lasted (None if it held
    /// nothing). The gate opens if no one else holds it.
    pub fn release(&self, holder: Holder) -> Option<Duration> {
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        let since = holders.slot(holder).take()?;
        if holders.operator.is_none() && holders.cutover.is_none() {
            self.closed.store(false, Ordering::Release);
            self.state.send_replace(false);
        }
        Some(since.elapsed())
    }

    /// How many passes waited at the closed gate, ever (a transaction held
    /// across several closings counts once per closing it met).
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Who holds the gate now.
    pub fn holders(&self) -> Vec<Holder> {
        let holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        [
            (Holder::Operator, holders.operator),
            (Holder::Cutover, holders.cutover),
        ]
        .into_iter()
        .filter_map(|(h, since)| since.map(|_| h))
        .collect()
    }
}

/// Which backend clients reach, swappable atomically while they run.
pub struct Switch {
    active: ArcSwap<Backend>,
    pub gate: Gate,
    in_flight: InFlightCount,
    /// What idle sessions wait on besides their sockets (one channel, so
    /// that each session's future holds one wait, not two).
    signals: watch::Sender<SessionSignals>,
}

/// Signals to every session, taken at its next transaction boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionSignals {
    /// pgswitch is shutting down: sessions end.
    pub shutdown: bool,
    /// Raised by a cutover's drain: session-mode sessions end, so that none
    /// runs on the new side with its session state silently lost.
    pub draining: bool,
}

/// A transaction (or session) in flight; counted until dropped.
pub struct InFlight(Arc<Switch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.leave(&self.0.gate);
    }
}

/// Transactions (and session-mode sessions) holding a server connection,
/// and the wake-up of a drain waiting for them to end.
#[derive(Default)]
struct InFlightCount {
    count: AtomicUsize,
    /// Notified when the count falls to zero while the gate is closed: only
    /// a drain waits then, so the hot path notifies nobody otherwise.
    none_left: Notify,
}

impl InFlightCount {
    fn leave(&self, gate: &Gate) {
        // SeqCst with the gate's: a drain that closed the gate and then saw
        // this transaction still counted is sure to be notified.
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && gate.closed.load(Ordering::SeqCst) {
            self.none_left.notify_waiters();
        }
    }

    /// Waits, at most `within`, until nothing is in flight; true if nothing
    /// is. Only while the gate is closed (else no one notifies).
    async fn wait_none(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let none_left = self.none_left.notified();
            tokio::pin!(none_left);
            // Registered before the count is read: a leave in between wakes it.
            none_left.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, none_left).await.is_err() {
                return self.count.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Switch {
    pub fn new(active: Arc<Backend>) -> Switch {
        Switch {
            active: ArcSwap::new(active),
            gate: Gate::default(),
            in_flight: InFlightCount::default(),
            signals: watch::Sender::new(SessionSignals::default()),
        }
    }

    /// Passes the gate and counts the caller in flight. The count goes up
    /// before the gate is checked again, so a cutover that closes the gate
    /// and then sees zero in flight knows no transaction can still start on
    /// the old side.
    pub async fn enter(self: &Arc<Self>) -> InFlight {
        loop {
            self.gate.pass().await;
            if let Some(in_flight) = self.try_enter() {
                return in_flight;
            }
        }
    }

    /// [`Switch::enter`] without waiting: None while the gate is closed. The
    /// session's fast path, so that its future need not hold `enter`'s.
    #[inline]
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlight> {
        if self.gate.closed.load(Ordering::SeqCst) {
            return None;
        }
        self.in_flight.count.fetch_add(1, Ordering::SeqCst);
        if !self.gate.closed.load(Ordering::SeqCst) {
            return Some(InFlight(self.clone()));
        }
        // Counted for a moment: a drain may have seen it.
        self.in_flight.leave(&self.gate);
        None
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::SeqCst)
    }

    /// A drain: waits, at most `within`, until no transaction is in flight,
    /// woken by the last one's end (no polling); true if none is. Call it
    /// with the gate closed.
    pub async fn wait_drained(&self, within: Duration) -> bool {
        self.in_flight.wait_none(within).await
    }

    pub fn set_draining(&self, draining: bool) {
        self.signals.send_modify(|s| s.draining = draining);
    }

    /// Tells every session to end at its next transaction boundary.
    pub fn start_shutdown(&self) {
        self.signals.send_modify(|s| s.shutdown = true);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.signals.borrow().shutdown
    }

    pub fn signals(&self) -> watch::Receiver<SessionSignals> {
        self.signals.subscribe()
    }

    /// Whether `backend` is the active one (no reference count touched).
    #[inline]
    pub fn is_active(&self, backend: &Arc<Backend>) -> bool {
        Arc::ptr_eq(&self.active.load(), backend)
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

    /// With the clock paused, a drain that polled on a timer would move it.
    #[tokio::test(start_paused = true)]
    async fn a_drain_wakes_when_the_last_transaction_ends_not_on_a_timer() {
        let gate = Gate::default();
        let in_flight = Arc::new(InFlightCount::default());
        in_flight.count.fetch_add(2, Ordering::SeqCst);
        assert!(gate.hold(Holder::Cutover));
        let started = tokio::time::Instant::now();
        let drain = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.wait_none(Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        in_flight.leave(&gate);
        tokio::task::yield_now().await;
        assert!(!drain.is_finished(), "one transaction is still in flight");
        in_flight.leave(&gate);
        assert!(drain.await.expect("the drain task"));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_gives_up_at_its_deadline() {
        let in_flight = InFlightCount::default();
        in_flight.count.fetch_add(1, Ordering::SeqCst);
        assert!(!in_flight.wait_none(Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn gate_holds_until_opened() {
        let gate = Arc::new(Gate::default());
        gate.pass().await;
        assert!(gate.hold(Holder::Cutover));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.pass().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(gate.release(Holder::Cutover).is_some());
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn each_holder_releases_only_its_own_hold() {
        let gate = Gate::default();
        assert!(gate.hold(Holder::Operator));
        assert!(
            !gate.hold(Holder::Operator),
            "a second /pause changes nothing"
        );
        assert!(gate.hold(Holder::Cutover));
        std::thread::sleep(Duration::from_millis(5));
        let cutover = gate.release(Holder::Cutover).unwrap();
        assert!(gate.is_closed(), "the operator still holds it");
        assert_eq!(gate.holders(), [Holder::Operator]);
        let operator = gate.release(Holder::Operator).unwrap();
        assert!(operator >= cutover, "the operator's hold began first");
        assert!(!gate.is_closed());
        assert_eq!(gate.release(Holder::Operator), None);
    }
}
