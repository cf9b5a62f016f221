//! The JSON report of a cutover or fallback, as `/cutover` and `/fallback`
//! return it and `/cutovers` lists it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::Side;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Switched,
    Aborted,
    Refused,
    /// A dry run went through preflight, pause, drain and catch-up.
    DryRun,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Switched,
        Outcome::Aborted,
        Outcome::Refused,
        Outcome::DryRun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Switched => "switched",
            Outcome::Aborted => "aborted",
            Outcome::Refused => "refused",
            Outcome::DryRun => "dry_run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub ms: f64,
    /// Ran while new transactions were held at the gate.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_pause: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kind: &'static str,
    pub outcome: Outcome,
    pub from: Side,
    pub to: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub dry_run: bool,
    pub started_at_unix_ms: u64,
    pub phases: Vec<Phase>,
    /// How long new transactions were held at the gate by this switch.
    pub pause_ms: Option<f64>,
    /// Transactions (and new sessions) that waited at the gate meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_transactions: Option<u64>,
    /// While the gate is closed (phases recorded meanwhile are `in_pause`).
    #[serde(skip)]
    pub pausing: bool,
    /// An operator's `/pause` was in force and still holds new transactions
    /// after the switch, until `/resume`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub still_paused_by_operator: bool,
    pub lag_bytes: Option<u64>,
    /// The flushed LSN on the old side that the new side had to apply.
    pub target_lsn: Option<String>,
    /// Where the other direction of replication starts.
    pub switch_lsn: Option<String>,
    pub sequences_synced: usize,
    /// Failed preflight checks the operator forced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
    /// Preflight checks that warned (name: detail).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What an abort undid on the servers, and the objects a switch dropped
    /// afterwards (the idle direction after a fallback).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undo_failures: Vec<String>,
}

impl Report {
    pub fn new(kind: &'static str, from: Side, to: Side, dry_run: bool) -> Report {
        let started_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Report {
            kind,
            outcome: Outcome::Refused,
            from,
            to,
            reason: None,
            dry_run,
            started_at_unix_ms,
            phases: Vec::new(),
            pause_ms: None,
            held_transactions: None,
            pausing: false,
            still_paused_by_operator: false,
            lag_bytes: None,
            target_lsn: None,
            switch_lsn: None,
            sequences_synced: 0,
            forced: Vec::new(),
            warnings: Vec::new(),
            undone: Vec::new(),
            undo_failures: Vec::new(),
        }
    }

    pub fn phase(&mut self, name: &'static str, took: Duration) {
        self.phases.push(Phase {
            name,
            ms: took.as_secs_f64() * 1000.0,
            in_pause: self.pausing,
        });
    }

    pub fn finish(&mut self, outcome: Outcome, reason: Option<String>) {
        self.outcome = outcome;
        self.reason = reason;
    }

    /// 200 when the switch (or dry run) went through, 409 otherwise.
    pub fn http_status(&self) -> u16 {
        match self.outcome {
            Outcome::Switched | Outcome::DryRun => 200,
            Outcome::Aborted | Outcome::Refused => 409,
        }
    }
}
