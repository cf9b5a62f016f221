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

pub mod report;
mod run;
pub mod state;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Side;
use crate::data_plane::DataPlane;
use crate::replication;
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

    fn name(self) -> &'static str {
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
    running: tokio::sync::Mutex<()>,
    phase: Mutex<&'static str>,
    history: Mutex<Vec<Report>>,
    state: Mutex<PersistedState>,
    state_file: Option<PathBuf>,
}

const HISTORY: usize = 100;

/// How long after a switch the old side's idle connections are closed.
const OLD_SIDE_GRACE: Duration = Duration::from_millis(500);

impl Controller {
    pub fn new(state: PersistedState, state_file: Option<PathBuf>) -> Controller {
        Controller {
            running: tokio::sync::Mutex::new(()),
            phase: Mutex::new("idle"),
            history: Mutex::new(Vec::new()),
            state: Mutex::new(state),
            state_file,
        }
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
        let Ok(_running) = self.running.try_lock() else {
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
        let mut run = Run::new(
            data,
            self,
            &config,
            direction,
            Instant::now() + timeout,
            &mut report,
        );
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
        self.set_phase("idle");
        report.finish(outcome.0, outcome.1);
        self.record(data, report)
    }

    fn record(&self, data: &DataPlane, report: Report) -> Report {
        data.metrics
            .cutovers
            .get_or_create(&crate::metrics::OutcomeLabels {
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
        tracing::info!(kind = report.kind, outcome = report.outcome.as_str(), from = %report.from, to = %report.to,
            pause_ms = report.pause_ms, reason = report.reason.as_deref(), "switch finished");
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
