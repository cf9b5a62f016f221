//! The report of `verify`: per table, and the same as JSON.

use serde::Serialize;

use super::checksum::Range;
use super::chunk::Differences;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Same rows on both sides.
    Ok,
    /// Rows differ (the chunks and keys are listed when the table has a key).
    Differs,
    /// The table exists on blue only.
    MissingOnGreen,
    /// The table exists on green only.
    MissingOnBlue,
    /// The sides' columns differ: the contents cannot be compared.
    ColumnsDiffer,
    /// A table without a key that changed on the publisher at every
    /// re-check: not known to differ (replication is carrying writes).
    Unsettled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Differs => "DIFFERS",
            Status::MissingOnGreen => "MISSING ON GREEN",
            Status::MissingOnBlue => "MISSING ON BLUE",
            Status::ColumnsDiffer => "COLUMNS DIFFER",
            Status::Unsettled => "unsettled (still being written)",
        }
    }
}

/// A chunk whose contents differ, and the keys that do.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkDifference {
    /// The chunk's key range, `[from, to)`; `null` is unbounded.
    pub range: Range,
    pub blue_rows: i64,
    pub green_rows: i64,
    #[serde(flatten)]
    pub keys: Differences,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    /// The key columns chunks are ranges of; `null`: no primary key or
    /// replica identity index, compared as a whole (count and checksum).
    pub key: Option<Vec<String>>,
    pub status: Status,
    pub blue_rows: i64,
    pub green_rows: i64,
    pub chunks: usize,
    /// Chunks that differed at first and were compared again.
    pub rechecked_chunks: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<ChunkDifference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Replication {
    /// `forward` (green subscribes to blue) or `reverse` (blue to green).
    pub direction: &'static str,
    pub publisher: crate::config::Side,
    pub subscription: String,
    /// A chunk that differs is re-checked after the subscriber caught up.
    pub live: bool,
    /// The publisher's position marked before the first read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark_lsn: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub replication: Replication,
    pub tables: Vec<TableReport>,
    /// Whether no table is known to differ (unsettled ones are not).
    pub equal: bool,
    pub jobs: usize,
    pub chunk_rows: u64,
    pub elapsed_ms: f64,
    /// Rows read per second on blue and on green (the larger count).
    pub rows_per_second: f64,
}

fn key_text(key: &[String]) -> String {
    if key.len() == 1 {
        key[0].clone()
    } else {
        format!("({})", key.join(", "))
    }
}

/// `[from .. to)` with `start` / `end` for unbounded ends.
pub fn range_text(r: &Range) -> String {
    let end = |b: &Option<Vec<String>>, none: &str| {
        b.as_deref().map(key_text).unwrap_or_else(|| none.into())
    };
    format!("[{} .. {})", end(&r.from, "start"), end(&r.to, "end"))
}

fn keys_text(keys: &[Vec<String>]) -> String {
    const SHOWN: usize = 20;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| key_text(k))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" … ({} in all)", keys.len()));
    }
    s
}

impl Report {
    /// A table for a terminal.
    pub fn render(&self) -> String {
        let r = &self.replication;
        let mut out = format!(
            "replication: {} (subscription {:?}, publisher {}): {}\n",
            r.direction,
            r.subscription,
            r.publisher,
            match (&r.live, &r.mark_lsn) {
                (true, Some(lsn)) => format!("live, marked {lsn} before the first read; differing chunks re-checked after catch-up"),
                _ => "not live: compared once, no re-check".into(),
            }
        );
        out.push_str(&format!(
            "{:<32} {:<16} {:>12} {:>12} {:>7}  STATUS\n",
            "TABLE", "KEY", "BLUE ROWS", "GREEN ROWS", "CHUNKS"
        ));
        for t in &self.tables {
            let key = t
                .key
                .as_ref()
                .map(|k| k.join(", "))
                .unwrap_or_else(|| "-".into());
            let mut status = t.status.as_str().to_string();
            if t.rechecked_chunks > 0 {
                status.push_str(&format!(" ({} chunk(s) re-checked)", t.rechecked_chunks));
            }
            out.push_str(&format!(
                "{:<32} {:<16} {:>12} {:>12} {:>7}  {status}\n",
                t.table, key, t.blue_rows, t.green_rows, t.chunks
            ));
            if let Some(note) = &t.note {
                out.push_str(&format!("    note: {note}\n"));
            }
            for d in &t.differences {
                out.push_str(&format!(
                    "    chunk {}: {} rows on blue, {} on green\n",
                    range_text(&d.range),
                    d.blue_rows,
                    d.green_rows
                ));
                for (what, keys) in [
                    ("missing on green", &d.keys.missing_on_green),
                    ("extra on green", &d.keys.extra_on_green),
                    ("different", &d.keys.different),
                    ("unsettled (still changing)", &d.keys.unsettled),
                ] {
                    if !keys.is_empty() {
                        out.push_str(&format!("      {what}: {}\n", keys_text(keys)));
                    }
                }
            }
        }
        let differing = self
            .tables
            .iter()
            .filter(|t| t.status != Status::Ok)
            .count();
        out.push_str(&format!(
            "{} table(s), {} differ; {:.0} ms, {:.0} rows/s per side\n",
            self.tables.len(),
            differing,
            self.elapsed_ms,
            self.rows_per_second
        ));
        out
    }
}
