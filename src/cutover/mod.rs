//! The cutover state machine (control plane): moves all traffic from the
//! active side to the other with a short pause, no client error and no lost
//! committed write, and back again (fallback) the same way.
//!
//! Order of work: everything that can happen before the pause does (admin
//! connections, the reverse direction's slot and subscription, warm server
//! connections to the target); inside the pause only what must: drain,
//! catch-up to an exact flushed LSN, sequences, the replication direction
//! switch, fencing, then the swap and the state file (the commit point).
//! Any failure before the commit point undoes what was done and resumes on
//! the old side.
//!
//! Crash safety: the switch's intent goes into the state file before it
//! touches either server, and every control statement commits durably on
//! its server (`synchronous_commit = on` on the control connections) before
//! the commit point. A restart that finds an intent brings both servers
//! back to the side the switch left ([`recover`]); one that finds none
//! checks that the servers match the state file, and refuses to serve when
//! they contradict it.

pub mod decommission;
pub mod fault;
pub mod recover;
pub mod report;
mod run;
use crate::state;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::config::{Config, Side};
use crate::data_plane::DataPlane;
use crate::replication;
use recover::{Changes, RecoverError, Sides};
pub use report::{Outcome, Report};
use run::Run;
use state::PersistedState;

/// Which way a switch goes: blue → green is a cutover, green → blue a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Cutover,
    Fallback,
}

impl Direction {
    pub fn from(self) -> Side {
        match self {
            Direction::Cutover => Side::Blue,
            Direction::Fallback => Side::Green,
        }
    }

    pub fn to(self) -> Side {
        self.from().other()
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Cutover => "cutover",
            Direction::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub dry_run: bool,
    /// Failed preflight checks (by name, as `pgswitch check` shows them)
    /// to go ahead despite.
    #[serde(default)]
    pub force: Vec<String>,
}

/// Why a switch stopped; the message goes into the report.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Aborted(String),
}

impl From<replication::ReplicationError> for CutoverError {
    fn from(e: replication::ReplicationError) -> Self {
        CutoverError::Aborted(e.to_string())
    }
}

/// Runs one switch at a time and keeps the history and the persisted state.
pub struct Controller {
    /// A switch asked for is running (a second one is refused).
    switching: std::sync::atomic::AtomicBool,
    /// Held by a switch and by each round of the upkeep: never both at once.
    running: tokio::sync::Mutex<()>,
    phase: Mutex<&'static str>,
    history: Mutex<Vec<Report>>,
    state: Mutex<PersistedState>,
    state_file: Option<PathBuf>,
    /// Set while the servers may not match the state (a restart or an abort
    /// could not finish reconciling them): the last error, retried by
    /// [`Controller::keep_reconciled`].
    unreconciled: Mutex<Option<String>>,
}

pub(crate) use crate::replication::connect_side;

/// Clears `switching` when dropped.
struct Switching<'c>(&'c std::sync::atomic::AtomicBool);

impl Drop for Switching<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Held while a switch or a decommission runs (see [`Controller::exclusive`]).
struct Exclusive<'c> {
    _running: tokio::sync::MutexGuard<'c, ()>,
    _switching: Switching<'c>,
}

/// Whether pgswitch can reach both sides as an admin: the precondition of
/// any switch, and of reconciling the servers at start.
pub fn manages_replication(config: &Config) -> bool {
    [Side::Blue, Side::Green].iter().all(|side| {
        config
            .backends
            .get(*side)
            .is_some_and(|b| b.admin_credentials().is_some())
    })
}

/// `pgswitch recover`'s controller: over the state file, holding its lock
/// so that no pgswitch starts meanwhile.
pub struct Recovery {
    pub controller: Controller,
    _lock: Option<std::fs::File>,
}

impl Recovery {
    pub fn open(config: &Config) -> Result<Recovery, state::StateError> {
        let path = config.cutover.state_file.clone();
        let (state, lock) = state::open(path.as_deref(), config.cutover.active)?;
        Ok(Recovery {
            controller: Controller::new(state, path),
            _lock: lock,
        })
    }
}

/// How long one reconcile's steps may wait (a subscription's workers to stop).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a reconcile waits for each side's admin connection. Short: at
/// start the proxy listens only after this, and a side that does not answer
/// is retried in the background anyway.
pub const RECONCILE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const HISTORY: usize = 100;

/// How often an unfinished reconcile is retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// How often the idle forward slot is advanced while green is active.
const ADVANCE_INTERVAL: Duration = Duration::from_secs(10);

/// How long after a switch the old side's idle connections are closed.
const OLD_SIDE_GRACE: Duration = Duration::from_millis(500);

impl Controller {
    pub fn new(state: PersistedState, state_file: Option<PathBuf>) -> Controller {
        Controller {
            switching: std::sync::atomic::AtomicBool::new(false),
            running: tokio::sync::Mutex::new(()),
            phase: Mutex::new("idle"),
            history: Mutex::new(Vec::new()),
            state: Mutex::new(state),
            state_file,
            unreconciled: Mutex::new(None),
        }
    }

    /// Why the servers may not match the state file, while that is so.
    pub fn unreconciled(&self) -> Option<String> {
        self.unreconciled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_unreconciled(&self, why: Option<String>) {
        *self.unreconciled.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Brings both servers to the state file's answer — the side an
    /// unfinished switch left, or the active side — or to `force`, and
    /// records the result (without an intent). Without `force` it first
    /// refuses a state the servers contradict ([`recover::check_evidence`]).
    /// Returns what it changed.
    pub async fn recover(
        &self,
        config: &Config,
        force: Option<Side>,
    ) -> Result<Changes, RecoverError> {
        let state = self.persisted();
        let target = force
            .or(state.intent.as_ref().map(|i| i.from))
            .unwrap_or(state.active);
        let connect = |side| async move {
            connect_side(config, side, RECONCILE_CONNECT_TIMEOUT)
                .await
                .map_err(|e| RecoverError::Side {
                    side,
                    source: replication::ReplicationError::InvalidState(e),
                })
        };
        let (blue, green) = tokio::try_join!(connect(Side::Blue), connect(Side::Green))?;
        let sides = Sides {
            blue: &blue,
            green: &green,
        };
        if force.is_none() {
            let path = self
                .state_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none: [cutover] active)".into());
            recover::check_evidence(&state, &sides, &path).await?;
        }
        let mut changes = Changes::new();
        let result = async {
            recover::reconcile(
                config,
                &state,
                target,
                &sides,
                RECONCILE_TIMEOUT,
                &mut changes,
            )
            .await?;
            changes.extend(recover::clean_up(target, &sides).await?);
            Ok::<(), RecoverError>(())
        }
        .await;
        if let Err(e) = result {
            self.set_unreconciled(Some(e.to_string()));
            return Err(e);
        }
        let mut next = state;
        next.active = target;
        next.intent = None;
        next.fences.remove(target.as_str());
        // The other side's fence as the server has it (a forced target may
        // differ from what the state file knew).
        let other = target.other();
        match replication::pgswitch_fence(sides.get(other)).await {
            Ok(Some(fence)) => {
                next.fences.insert(other.as_str().to_owned(), fence);
            }
            Ok(None) => {
                next.fences.remove(other.as_str());
            }
            Err(e) => {
                let e = RecoverError::Side {
                    side: other,
                    source: e,
                };
                self.set_unreconciled(Some(e.to_string()));
                return Err(e);
            }
        }
        self.store(next)
            .map_err(|e| RecoverError::Undecidable(e.to_string()))?;
        self.set_unreconciled(None);
        Ok(changes)
    }

    /// Writes the state file (when configured) and then the state in memory.
    fn store(&self, next: PersistedState) -> Result<(), state::StateError> {
        if let Some(path) = &self.state_file {
            state::store(path, &next)?;
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The control plane's upkeep, for ever: retries [`Controller::recover`]
    /// while the servers may not match the state, and keeps the idle
    /// direction's slot advanced while green is active. Never beside a switch.
    pub async fn keep_reconciled(&self, data: &DataPlane) {
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since_advance = Duration::MAX;
        // The last failure logged, and when: a side that stays down is
        // logged when the error changes and once a minute, not every round.
        let mut logged: Option<(String, std::time::Instant)> = None;
        loop {
            tick.tick().await;
            let Ok(_running) = self.running.try_lock() else {
                continue;
            };
            let config = data.config().clone();
            if !manages_replication(&config) {
                continue;
            }
            if self.unreconciled().is_some() || self.persisted().intent.is_some() {
                match self.recover(&config, None).await {
                    Ok(changes) => {
                        logged = None;
                        tracing::warn!(?changes, "the servers match the state file again")
                    }
                    Err(e) => {
                        let e = e.to_string();
                        let repeat = logged.as_ref().is_some_and(|(last, at)| {
                            *last == e && at.elapsed() < Duration::from_secs(60)
                        });
                        if !repeat {
                            tracing::error!(error = %e, "reconciling the servers failed; retrying every 2 s");
                            logged = Some((e, std::time::Instant::now()));
                        }
                    }
                }
                continue;
            }
            since_advance = since_advance.saturating_add(RETRY_INTERVAL);
            let state = self.persisted();
            if state.active == Side::Green
                && state.decommissioned_at_ms.is_none()
                && since_advance >= ADVANCE_INTERVAL
            {
                since_advance = Duration::ZERO;
                if let Ok(blue) = connect_side(&config, Side::Blue, RECONCILE_CONNECT_TIMEOUT).await
                {
                    if let Err(e) = recover::keep_idle_slot_advanced(&config, &blue).await {
                        tracing::warn!(error = %e, "could not advance the idle forward slot on blue");
                    }
                }
            }
        }
    }

    /// The control plane to oneself: no other switch or decommission (None
    /// if one runs), and no round of the upkeep (it is short: waited for).
    async fn exclusive(&self) -> Option<Exclusive<'_>> {
        use std::sync::atomic::Ordering;
        if self.switching.swap(true, Ordering::AcqRel) {
            return None;
        }
        let switching = Switching(&self.switching);
        let running = self.running.lock().await;
        Some(Exclusive {
            _running: running,
            _switching: switching,
        })
    }

    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    pub fn history(&self) -> Vec<Report> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs a cutover or fallback to its end and returns the report.
    pub async fn run(&self, data: &DataPlane, direction: Direction, options: Options) -> Report {
        let mut report = Report::new(
            direction.name(),
            direction.from(),
            direction.to(),
            options.dry_run,
        );
        let Some(_exclusive) = self.exclusive().await else {
            report.finish(
                Outcome::Refused,
                Some("another cutover or fallback is running".into()),
            );
            return self.record(data, report);
        };
        let config = data.config().clone();
        let timeout = options
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(config.cutover.timeout);
        let mut run = Run::new(data, self, &config, direction, timeout, &mut report);
        run.force = options.force;
        let result = run.execute(options.dry_run).await;
        let outcome = match result {
            Ok(outcome) => (outcome, None),
            Err(CutoverError::Refused(reason)) => (Outcome::Refused, Some(reason)),
            Err(CutoverError::Aborted(reason)) => {
                run.rollback().await;
                (Outcome::Aborted, Some(reason))
            }
        };
        run.resume();
        run.after_resume(outcome.0).await;
        self.set_phase("idle");
        report.finish(outcome.0, outcome.1);
        self.record(data, report)
    }

    fn record(&self, data: &DataPlane, report: Report) -> Report {
        data.metrics
            .cutovers
            .get_or_create(&crate::metrics::OutcomeLabels {
                kind: report.kind,
                from: report.from.as_str(),
                to: report.to.as_str(),
                outcome: report.outcome.as_str(),
            })
            .inc();
        for phase in &report.phases {
            data.metrics
                .cutover_phase_seconds
                .get_or_create(&crate::metrics::PhaseLabels { phase: phase.name })
                .observe(phase.ms / 1000.0);
        }
        if let Some(pause_ms) = report.pause_ms {
            data.metrics.pause_seconds.observe(pause_ms / 1000.0);
        }
        match report.outcome {
            Outcome::Switched | Outcome::DryRun => tracing::info!(kind = report.kind,
                outcome = report.outcome.as_str(), from = %report.from, to = %report.to,
                pause_ms = report.pause_ms, "switch finished"),
            _ => tracing::warn!(kind = report.kind, outcome = report.outcome.as_str(),
                from = %report.from, to = %report.to, pause_ms = report.pause_ms,
                reason = report.reason.as_deref(), "switch did not happen"),
        }
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == HISTORY {
            history.remove(0);
        }
        history.push(report.clone());
        report
    }

    pub fn persisted(&self) -> PersistedState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
