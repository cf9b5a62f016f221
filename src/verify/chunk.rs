//! Chunks: the key ranges a table is split into, and the comparison of one
//! chunk: checksums on both sides at once, the re-check while replication
//! is live, the bisection of a chunk that still differs, and the per-row
//! comparison (with confirmation) of its small ranges.
//!
//! # Re-check (while a subscription is live)
//!
//! A first pass reads both sides at the same moment; a chunk that differs
//! there may only be lagging. It is re-checked once after the subscriber
//! has applied the publisher's position marked before the first read, then
//! up to [`MAX_RECHECKS`] − 1 times more with a fresh mark each: read the
//! publisher, mark, wait until the subscriber applied the mark, read the
//! subscriber (the subscriber then holds at least what the publisher's read
//! saw). Bisection compares the same way. At the leaves, a key that differs
//! is reported only once a later read of the publisher finds its row
//! unchanged (same hash, or still absent): the row was then not written
//! between the publisher's read and the subscriber's, so the subscriber
//! should have held exactly it. A key whose row changes on the publisher
//! at every one of [`MAX_RECHECKS`] reads is reported as unsettled, not as
//! a difference: replication is still carrying it. A table without a key
//! is compared as a whole the same way: its difference is real once the
//! publisher's checksum stays the same across two re-checks, and the table
//! is reported as unsettled when it changed at every one.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Side;
use crate::replication::{self, Lsn};

use super::checksum::{get, query, Range, TableSql};
use super::VerifyError;

/// Re-checks of a differing chunk, and reads of a differing leaf.
pub const MAX_RECHECKS: u32 = 5;
/// A range with at most this many rows (on the larger side) is compared row
/// by row rather than split further.
pub const LEAF_ROWS: i64 = 2_000;
/// How long a re-check waits for the subscriber to apply a mark.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// The live replication a re-check waits for.
#[derive(Debug, Clone)]
pub struct Live {
    pub publisher: Side,
    pub subscription: String,
    pub slot: String,
    /// The publisher's position marked before the first read.
    pub mark: Lsn,
}

/// One job's connections.
pub struct Sides {
    pub blue: Client,
    pub green: Client,
}

/// count and checksum of a range on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sum {
    pub rows: i64,
    pub sum: String,
}

/// The keys that differ in one chunk, as blue sees them against green.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Differences {
    pub missing_on_green: Vec<Vec<String>>,
    pub extra_on_green: Vec<Vec<String>>,
    pub different: Vec<Vec<String>>,
    /// Keys whose row changed on the publisher at every read.
    pub unsettled: Vec<Vec<String>>,
    /// A table without a key whose checksum changed on the publisher at
    /// every re-check: still being written, not known to differ.
    #[serde(skip)]
    pub whole_table_unsettled: bool,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.missing_on_green.is_empty()
            && self.extra_on_green.is_empty()
            && self.different.is_empty()
    }
}

/// What comparing one chunk found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub blue: Sum,
    pub green: Sum,
    pub rechecks: u32,
    /// `None`: equal. `Some` with no keys: different, and the table has no
    /// key to narrow it down by.
    pub differences: Option<Differences>,
}

impl Sides {
    fn side(&self, side: Side) -> &Client {
        match side {
            Side::Blue => &self.blue,
            Side::Green => &self.green,
        }
    }

    async fn sum(&self, side: Side, t: &TableSql, r: &Range) -> Result<Sum, VerifyError> {
        let step = "checksum a chunk";
        let (sql, params) = t.checksum(r);
        let rows = query(self.side(side), side, step, &sql, &params).await?;
        let row = rows
            .first()
            .ok_or_else(|| VerifyError::Unexpected(format!("{side}: no checksum row")))?;
        Ok(Sum {
            rows: get(row, 0, side, step)?,
            sum: get(row, 1, side, step)?,
        })
    }

    /// Both sides at once: (blue, green).
    async fn sums(&self, t: &TableSql, r: &Range) -> Result<(Sum, Sum), VerifyError> {
        let (b, g) = tokio::join!(self.sum(Side::Blue, t, r), self.sum(Side::Green, t, r));
        Ok((b?, g?))
    }

    /// Waits until the subscriber has applied `target`.
    async fn wait(&self, live: &Live, target: Lsn) -> Result<(), VerifyError> {
        let p = live.publisher;
        replication::wait_applied(
            self.side(p),
            &live.slot,
            self.side(p.other()),
            &live.subscription,
            target,
            CATCH_UP_TIMEOUT,
        )
        .await
        .map_err(VerifyError::CatchUp)?;
        Ok(())
    }

    async fn mark(&self, live: &Live) -> Result<Lsn, VerifyError> {
        replication::flush_and_mark(self.side(live.publisher))
            .await
            .map_err(|source| VerifyError::Query {
                side: live.publisher,
                source,
            })
    }

    /// The publisher, then a mark, the subscriber's catch-up to it, and the
    /// subscriber: (blue, green).
    async fn sums_marked(
        &self,
        live: &Live,
        t: &TableSql,
        r: &Range,
    ) -> Result<(Sum, Sum), VerifyError> {
        let p = live.publisher;
        let on_pub = self.sum(p, t, r).await?;
        let target = self.mark(live).await?;
        self.wait(live, target).await?;
        let on_sub = self.sum(p.other(), t, r).await?;
        Ok(match p {
            Side::Blue => (on_pub, on_sub),
            Side::Green => (on_sub, on_pub),
        })
    }

    async fn compare(
        &self,
        live: Option<&Live>,
        t: &TableSql,
        r: &Range,
    ) -> Result<(Sum, Sum), VerifyError> {
        match live {
            Some(live) => self.sums_marked(live, t, r).await,
            None => self.sums(t, r).await,
        }
    }

    /// Each row's (key, hash) in `range` on one side, in key order.
    async fn rows(
        &self,
        side: Side,
        t: &TableSql,
        r: &Range,
    ) -> Result<Vec<(Vec<String>, i64)>, VerifyError> {
        let step = "list a range's rows";
        let Some((sql, params)) = t.rows(r) else {
            return Ok(Vec::new());
        };
        let width = t.key.as_ref().map_or(0, |k| k.columns.len());
        let rows = query(self.side(side), side, step, &sql, &params).await?;
        rows.iter()
            .map(|row| {
                let key = (0..width)
                    .map(|i| get::<String>(row, i, side, step))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((key, get(row, width, side, step)?))
            })
            .collect()
    }

    /// Keys that differ in `range`: key -> (blue hash, green hash).
    async fn diff_rows(
        &self,
        live: Option<&Live>,
        t: &TableSql,
        r: &Range,
    ) -> Result<RowDiff, VerifyError> {
        let (b, g) = match live {
            Some(live) => {
                let p = live.publisher;
                let on_pub = self.rows(p, t, r).await?;
                let target = self.mark(live).await?;
                self.wait(live, target).await?;
                let on_sub = self.rows(p.other(), t, r).await?;
                match p {
                    Side::Blue => (on_pub, on_sub),
                    Side::Green => (on_sub, on_pub),
                }
            }
            None => {
                let (b, g) =
                    tokio::join!(self.rows(Side::Blue, t, r), self.rows(Side::Green, t, r));
                (b?, g?)
            }
        };
        Ok(RowDiff::of(b, g))
    }

    /// The key at `offset` in `range` on `side`.
    async fn key_at(
        &self,
        side: Side,
        t: &TableSql,
        r: &Range,
        offset: i64,
    ) -> Result<Option<Vec<String>>, VerifyError> {
        let step = "split a range";
        let Some((sql, params)) = t.key_at(r, offset) else {
            return Ok(None);
        };
        let width = t.key.as_ref().map_or(0, |k| k.columns.len());
        let rows = query(self.side(side), side, step, &sql, &params).await?;
        match rows.first() {
            None => Ok(None),
            Some(row) => Ok(Some(
                (0..width)
                    .map(|i| get::<String>(row, i, side, step))
                    .collect::<Result<Vec<_>, _>>()?,
            )),
        }
    }

    /// Compares one chunk: see the module docs.
    pub async fn chunk(
        &self,
        live: Option<&Live>,
        t: &TableSql,
        r: &Range,
    ) -> Result<Outcome, VerifyError> {
        let (mut b, mut g) = self.sums(t, r).await?;
        let mut rechecks = 0;
        // Whether the difference is known to be real: not live (nothing to
        // wait for), or the publisher's checksum did not change between a
        // marked comparison and the next one.
        let mut confirmed = live.is_none();
        if let Some(live) = live {
            if b != g {
                self.wait(live, live.mark).await?;
                (b, g) = self.sums(t, r).await?;
                rechecks += 1;
            }
            let mut before: Option<Sum> = None;
            while b != g && rechecks < MAX_RECHECKS {
                (b, g) = self.sums_marked(live, t, r).await?;
                rechecks += 1;
                let now = match live.publisher {
                    Side::Blue => b.clone(),
                    Side::Green => g.clone(),
                };
                if b != g && before.as_ref() == Some(&now) {
                    confirmed = true;
                    break;
                }
                before = Some(now);
            }
        }
        let differences = if b == g {
            None
        } else if t.key.is_none() {
            Some(Differences {
                whole_table_unsettled: !confirmed,
                ..Differences::default()
            })
        } else {
            let d = self.narrow(live, t, r, &b, &g).await?;
            (!d.is_empty() || !d.unsettled.is_empty()).then_some(d)
        };
        Ok(Outcome {
            blue: b,
            green: g,
            rechecks,
            differences,
        })
    }

    /// Bisects a differing range down to ranges of at most [`LEAF_ROWS`]
    /// rows, then compares those row by row.
    async fn narrow(
        &self,
        live: Option<&Live>,
        t: &TableSql,
        r: &Range,
        b: &Sum,
        g: &Sum,
    ) -> Result<Differences, VerifyError> {
        let mut stack = vec![(r.clone(), b.rows, g.rows)];
        let mut out = Differences::default();
        while let Some((range, b_rows, g_rows)) = stack.pop() {
            let (side, rows) = if b_rows >= g_rows {
                (Side::Blue, b_rows)
            } else {
                (Side::Green, g_rows)
            };
            let mid = if rows > LEAF_ROWS {
                self.key_at(side, t, &range, rows / 2).await?
            } else {
                None
            };
            let Some(mid) = mid.filter(|m| range.from.as_ref() != Some(m)) else {
                self.leaf(live, t, &range, &mut out).await?;
                continue;
            };
            let halves = [
                Range {
                    from: range.from.clone(),
                    to: Some(mid.clone()),
                },
                Range {
                    from: Some(mid),
                    to: range.to.clone(),
                },
            ];
            // Pushed in reverse, so that keys come out in key order.
            for half in halves.into_iter().rev() {
                let (hb, hg) = self.compare(live, t, &half).await?;
                if hb != hg {
                    stack.push((half, hb.rows, hg.rows));
                }
            }
        }
        Ok(out)
    }

    /// Row-by-row comparison of a small range, confirmed while live.
    async fn leaf(
        &self,
        live: Option<&Live>,
        t: &TableSql,
        r: &Range,
        out: &mut Differences,
    ) -> Result<(), VerifyError> {
        let first = self.diff_rows(live, t, r).await?;
        let Some(live) = live else {
            first.classify(
                out,
                first.keys.iter().map(|k| k.0.clone()).collect(),
                Vec::new(),
            );
            return Ok(());
        };
        let mut pending = first;
        let mut confirmed = Vec::new();
        for _ in 1..MAX_RECHECKS {
            if pending.keys.is_empty() {
                break;
            }
            let next = self.diff_rows(Some(live), t, r).await?;
            let mut still = RowDiff::default();
            for (key, before) in &pending.keys {
                if let Some(now) = next.get(key) {
                    if now.on(live.publisher) == before.on(live.publisher) {
                        confirmed.push((key.clone(), now));
                    } else {
                        still.keys.push((key.clone(), now));
                    }
                }
            }
            pending = still;
        }
        let done = RowDiff { keys: confirmed };
        done.classify(
            out,
            done.keys.iter().map(|k| k.0.clone()).collect(),
            Vec::new(),
        );
        pending.classify(
            out,
            Vec::new(),
            pending.keys.iter().map(|k| k.0.clone()).collect(),
        );
        Ok(())
    }
}

/// A key's hash on each side (`None`: no such row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair {
    blue: Option<i64>,
    green: Option<i64>,
}

impl Pair {
    fn on(self, side: Side) -> Option<i64> {
        match side {
            Side::Blue => self.blue,
            Side::Green => self.green,
        }
    }
}

/// The keys that differ, in key order (blue's first, then green's extras).
#[derive(Debug, Default)]
struct RowDiff {
    keys: Vec<(Vec<String>, Pair)>,
}

impl RowDiff {
    fn of(blue: Vec<(Vec<String>, i64)>, green: Vec<(Vec<String>, i64)>) -> RowDiff {
        let on_green: HashMap<&Vec<String>, i64> = green.iter().map(|(k, h)| (k, *h)).collect();
        let on_blue: HashMap<&Vec<String>, i64> = blue.iter().map(|(k, h)| (k, *h)).collect();
        let mut keys = Vec::new();
        for (k, h) in &blue {
            let g = on_green.get(k).copied();
            if g != Some(*h) {
                keys.push((
                    k.clone(),
                    Pair {
                        blue: Some(*h),
                        green: g,
                    },
                ));
            }
        }
        for (k, h) in &green {
            if !on_blue.contains_key(k) {
                keys.push((
                    k.clone(),
                    Pair {
                        blue: None,
                        green: Some(*h),
                    },
                ));
            }
        }
        RowDiff { keys }
    }

    fn get(&self, key: &[String]) -> Option<Pair> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, p)| *p)
    }

    /// Adds `real` keys to their class and `unsettled` ones to the unsettled.
    fn classify(&self, out: &mut Differences, real: Vec<Vec<String>>, unsettled: Vec<Vec<String>>) {
        for key in real {
            match self.get(&key) {
                Some(Pair {
                    blue: Some(_),
                    green: None,
                }) => out.missing_on_green.push(key),
                Some(Pair {
                    blue: None,
                    green: Some(_),
                }) => out.extra_on_green.push(key),
                Some(_) => out.different.push(key),
                None => {}
            }
        }
        out.unsettled.extend(unsettled);
    }
}

/// Splits a table into ranges of about `chunk_rows` rows (by blue's
/// estimate): equal widths between blue's min and max for a single integer
/// key, quantiles of a `TABLESAMPLE SYSTEM` sample of keys otherwise. The
/// first and last ranges are unbounded, so keys only green holds are in one.
pub async fn plan(
    c: &Client,
    t: &TableSql,
    key_types: &[u32],
    estimate: f64,
    chunk_rows: u64,
) -> Result<Vec<Range>, VerifyError> {
    let Some(key) = &t.key else {
        return Ok(vec![Range::ALL]);
    };
    let side = Side::Blue;
    let step = "plan the chunks";
    let estimate = if estimate < 0.0 {
        let rows = query(
            c,
            side,
            step,
            &format!("SELECT count(*)::float8 FROM {} t", t.qualified),
            &[],
        )
        .await?;
        match rows.first() {
            Some(r) => get::<f64>(r, 0, side, step)?,
            None => 0.0,
        }
    } else {
        estimate
    };
    let chunks = (estimate / chunk_rows.max(1) as f64).ceil() as usize;
    if chunks <= 1 {
        return Ok(vec![Range::ALL]);
    }
    let integer = key_types.len() == 1 && matches!(key_types[0], 20 | 21 | 23);
    let bounds: Vec<Vec<String>> = if integer {
        let rows = query(
            c,
            side,
            step,
            &format!(
                "SELECT min({k})::text, max({k})::text FROM {} t",
                t.qualified,
                k = key.list()
            ),
            &[],
        )
        .await?;
        let (min, max) = match rows.first() {
            Some(r) => (
                get::<Option<String>>(r, 0, side, step)?,
                get::<Option<String>>(r, 1, side, step)?,
            ),
            None => (None, None),
        };
        let parse = |v: Option<String>| v.and_then(|v| v.parse::<i128>().ok());
        match (parse(min), parse(max)) {
            (Some(min), Some(max)) if max > min => {
                let width = ((max - min + 1) / chunks as i128).max(1);
                (1..chunks as i128)
                    .map(|i| min + i * width)
                    .filter(|b| *b <= max)
                    .map(|b| vec![b.to_string()])
                    .collect()
            }
            _ => Vec::new(),
        }
    } else {
        // About 20 sampled keys per chunk.
        let pct = (100.0 * (chunks as f64 * 20.0) / estimate.max(1.0)).min(100.0);
        let sql = format!(
            "SELECT {} FROM {} t TABLESAMPLE SYSTEM ({pct:.6}) ORDER BY {}",
            key.texts(),
            t.qualified,
            key.list()
        );
        let rows = query(c, side, step, &sql, &[]).await?;
        let width = key.columns.len();
        let sample = rows
            .iter()
            .map(|row| {
                (0..width)
                    .map(|i| get::<String>(row, i, side, step))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut bounds: Vec<Vec<String>> = Vec::new();
        if !sample.is_empty() {
            for i in 1..chunks {
                let b = &sample[i * sample.len() / chunks];
                if bounds.last() != Some(b) && Some(b) != sample.first() {
                    bounds.push(b.clone());
                }
            }
        }
        bounds
    };
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut from = None;
    for b in bounds {
        ranges.push(Range {
            from: from.take(),
            to: Some(b.clone()),
        });
        from = Some(b);
    }
    ranges.push(Range { from, to: None });
    Ok(ranges)
}
