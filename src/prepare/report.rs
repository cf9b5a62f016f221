//! What a run of `pgswitch prepare` did: its steps, figures and notes, as
//! `--json` prints it and as [`Report::render`] shows it on a terminal.

use serde::Serialize;

use super::progress::{self, Progress};
use super::{objects, roles, tools, Display};

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: &'static str,
    /// Whether this run changed something for it.
    pub changed: bool,
    pub detail: String,
}

/// The initial copy as this run measured it, when it copied: from creating
/// the slot to green holding every row with its indexes and constraints
/// (the subscription created), what `pg_dump | pg_restore` also does.
#[derive(Debug, Clone, Serialize)]
pub struct CopyFigures {
    pub seconds: f64,
    pub bytes: i64,
    pub rows: i64,
    pub bytes_per_second: f64,
    pub rows_per_second: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    /// Whether this run changed anything (false: the pair was prepared).
    pub changed: bool,
    pub steps: Vec<StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<tools::Tools>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<roles::RolesOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_settings: Option<objects::CopySettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_copy: Option<CopyFigures>,
    /// What prepare does not do and the operator should know.
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    pub(crate) fn step(
        &mut self,
        display: &mut Display,
        step: &'static str,
        changed: bool,
        detail: String,
    ) {
        display.step(&format!(
            "{:<9} {step:<12} {detail}",
            if changed { "changed" } else { "unchanged" }
        ));
        self.changed |= changed;
        self.steps.push(StepReport {
            step,
            changed,
            detail,
        });
    }

    /// The report for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            out.push_str(&format!(
                "{:<9} {:<12} {}\n",
                if s.changed { "changed" } else { "unchanged" },
                s.step,
                s.detail
            ));
        }
        if let Some(p) = &self.progress {
            out.push_str(&format!("copy      {}\n", p.line()));
        }
        if let Some(c) = &self.initial_copy {
            out.push_str(&format!(
                "initial copy: {:.1} s, {} rows, {} ({:.0} rows/s, {}/s)\n",
                c.seconds,
                c.rows,
                progress::human_bytes(c.bytes as f64),
                c.rows_per_second,
                progress::human_bytes(c.bytes_per_second)
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        match (&self.error, self.changed) {
            (Some(e), _) => out.push_str(&format!("FAILED: {e}\n")),
            (None, false) => out.push_str("nothing changed: green was already prepared\n"),
            (None, true) => out.push_str("prepared: green replicates blue, every table ready\n"),
        }
        out
    }
}
