//! Whether a backend can be reached, as far as pgswitch knows: every
//! connection it opens there (pools, login checks, auth_query) reports here,
//! and the housekeeping probe fills the gaps when no connection was opened
//! for a while. Read by `/status`, `/ready` and the `pgswitch_backend_up`
//! gauge; never consulted on the data path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Who made an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckedBy {
    /// A connection the proxy opened for its own use (a pool, a login check,
    /// auth_query).
    Connection,
    /// The housekeeping probe: connect and log in, then close.
    Probe,
    /// The housekeeping probe without credentials to log in with: TCP only.
    TcpProbe,
}

impl CheckedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckedBy::Connection => "connection",
            CheckedBy::Probe => "probe",
            CheckedBy::TcpProbe => "tcp_probe",
        }
    }
}

/// One observation: reachable or not, when, by whom, and what failed.
#[derive(Debug, Clone, Copy)]
struct Seen {
    reachable: bool,
    at: Instant,
    at_wall: SystemTime,
    by: CheckedBy,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Seen>,
    /// The latest failure (also one that left the server reachable, such as a
    /// refused login), and when it happened.
    last_error: Option<(String, Instant)>,
}

/// What `/status` shows of a backend's reachability.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// None until the first observation.
    pub reachable: Option<bool>,
    pub checked_by: Option<&'static str>,
    pub checked_ago: Option<Duration>,
    pub checked_at_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ago: Option<Duration>,
}

/// A backend's reachability; shared by everything that connects to it.
#[derive(Debug, Default)]
pub struct Reachability {
    state: Mutex<State>,
    /// A probe is under way (at most one per backend).
    probing: AtomicBool,
}

impl Reachability {
    /// Records a successful connection (or probe).
    pub fn record_ok(&self, by: CheckedBy) {
        self.record(true, by, None);
    }

    /// Records a failure; `reachable` says whether the server answered
    /// (a refused login still means it is there).
    pub fn record_error(&self, by: CheckedBy, reachable: bool, error: &dyn std::fmt::Display) {
        self.record(reachable, by, Some(error.to_string()));
    }

    fn record(&self, reachable: bool, by: CheckedBy, error: Option<String>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last = Some(Seen {
            reachable,
            at: now,
            at_wall: SystemTime::now(),
            by,
        });
        if let Some(error) = error {
            state.last_error = Some((error, now));
        }
    }

    /// Whether the backend was reachable at the last observation (None:
    /// nothing observed yet).
    pub fn reachable(&self) -> Option<bool> {
        self.lock().last.map(|s| s.reachable)
    }

    /// How long ago the last observation was (None: never).
    pub fn age(&self) -> Option<Duration> {
        self.lock().last.map(|s| s.at.elapsed())
    }

    pub fn report(&self) -> Report {
        let state = self.lock();
        Report {
            reachable: state.last.map(|s| s.reachable),
            checked_by: state.last.map(|s| s.by.as_str()),
            checked_ago: state.last.map(|s| s.at.elapsed()),
            checked_at_unix_ms: state.last.and_then(|s| {
                s.at_wall
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64)
            }),
            last_error: state.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_ago: state.last_error.as_ref().map(|(_, at)| at.elapsed()),
        }
    }

    /// Claims the right to probe (false: a probe is already running); the
    /// claim ends when the returned guard is dropped.
    pub fn start_probe(&self) -> Option<ProbeGuard<'_>> {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ProbeGuard(&self.probing))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running probe; ends the claim when dropped.
pub struct ProbeGuard<'a>(&'a AtomicBool);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_observation_and_the_last_error() {
        let r = Reachability::default();
        assert_eq!(r.reachable(), None);
        assert_eq!(r.report().last_error, None);
        r.record_error(CheckedBy::Connection, false, &"connection refused");
        assert_eq!(r.reachable(), Some(false));
        r.record_ok(CheckedBy::Probe);
        let report = r.report();
        assert_eq!(report.reachable, Some(true));
        assert_eq!(report.checked_by, Some("probe"));
        assert_eq!(report.last_error.as_deref(), Some("connection refused"));
        assert!(report.checked_at_unix_ms.is_some());
    }

    #[test]
    fn one_probe_at_a_time() {
        let r = Reachability::default();
        let first = r.start_probe();
        assert!(first.is_some());
        assert!(r.start_probe().is_none());
        drop(first);
        assert!(r.start_probe().is_some());
    }
}
