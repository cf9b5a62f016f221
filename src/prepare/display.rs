//! How `pgswitch prepare` shows the copy while it runs, on stderr: a
//! progress bar on a terminal, a plain line every few seconds otherwise,
//! one JSON object per line with `--json` (the final report goes to stdout).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::progress::{human_bytes, Progress};

/// How often a plain line is written (and on every change of phase).
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub enum Display {
    Bar(Option<ProgressBar>),
    Plain {
        last: Option<(Instant, super::progress::Phase)>,
    },
    JsonLines,
}

impl Display {
    pub fn new(json: bool) -> Display {
        if json {
            Display::JsonLines
        } else if std::io::stderr().is_terminal() {
            Display::Bar(None)
        } else {
            Display::Plain { last: None }
        }
    }

    /// A step's outcome, as it happens.
    pub fn step(&mut self, line: &str) {
        match self {
            Display::Bar(Some(bar)) => bar.println(line),
            Display::JsonLines => {
                let _ = writeln!(std::io::stderr(), "{}", serde_json::json!({ "step": line }));
            }
            _ => eprintln!("{line}"),
        }
    }

    pub fn progress(&mut self, p: &Progress) {
        match self {
            Display::Bar(bar) => {
                let bar = bar.get_or_insert_with(|| {
                    let bar = ProgressBar::new(p.bytes_total.max(0) as u64);
                    if let Ok(style) = ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
                    ) {
                        bar.set_style(style);
                    }
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                });
                bar.set_length(p.bytes_total.max(0) as u64);
                bar.set_position(p.bytes_copied.max(0) as u64);
                let mut msg = format!(
                    "{}/{} tables, {} / {}",
                    p.tables_ready,
                    p.tables_total,
                    human_bytes(p.bytes_copied as f64),
                    human_bytes(p.bytes_total as f64)
                );
                if let Some(rate) = p.bytes_per_second {
                    msg.push_str(&format!(", {}/s", human_bytes(rate)));
                }
                if let Some(eta) = p.eta_seconds {
                    msg.push_str(&format!(", ~{eta:.0} s left"));
                }
                if let Some(lag) = p.lag_bytes {
                    msg.push_str(&format!(", lag {}", human_bytes(lag as f64)));
                }
                bar.set_message(msg);
            }
            Display::Plain { last } => {
                let due = match last {
                    None => true,
                    Some((at, phase)) => *phase != p.phase || at.elapsed() >= PLAIN_EVERY || p.done,
                };
                if due {
                    eprintln!("{}", p.line());
                    *last = Some((Instant::now(), p.phase));
                }
            }
            Display::JsonLines => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{}",
                    serde_json::json!({ "progress": p })
                );
            }
        }
    }

    /// Removes the bar (the report follows).
    pub fn finish(&mut self) {
        if let Display::Bar(Some(bar)) = self {
            bar.finish_and_clear();
        }
    }
}
