//! One cutover or fallback in progress: its phases in order, the undo list
//! an abort walks back, and the admin connections it works over.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::recover::{self, Changes, Sides};
use super::report::Outcome;
use super::{fault, Controller, CutoverError, Direction, Report, OLD_SIDE_GRACE};
use crate::config::{Config, DrainAction, Side};
use crate::data_plane::DataPlane;
use crate::replication::{self, Lsn, ReverseNames};
use crate::state::{self, Intent, PersistedState};
use crate::switch::Holder;

/// How long a preflight waits for the apply worker of a subscription that
/// is enabled but not streaming yet. PostgreSQL starts the worker of a
/// just-enabled subscription only `wal_retrieve_retry_interval` (5 s by
/// default) after the last worker start, so a fallback asked for right
/// after a cutover finds the reverse direction enabled but idle.
const WORKER_START_WAIT: Duration = Duration::from_secs(10);

/// Admin connections to both sides, opened before the pause.
struct Conns {
    from: Client,
    to: Client,
    /// A second connection to the old side, so the fence runs beside the
    /// replication switch inside the pause instead of after it.
    fence: Client,
}

pub(super) struct Run<'a> {
    data: &'a DataPlane,
    controller: &'a Controller,
    config: &'a Config,
    direction: Direction,
    timeout: Duration,
    deadline: Instant,
    report: &'a mut Report,
    /// The intent is in the state file: the servers may have been changed.
    intent_written: bool,
    /// An abort brought the servers back to the old side (steps 1–4 of
    /// `recover`); its cleanup and the state without the intent follow.
    rolled_back: bool,
    paused_at: Option<Instant>,
    /// The gate's count of waiting passes when this switch closed it.
    waited_before_pause: u64,
    conns: Option<Conns>,
    /// Failed checks the operator allows (`--force`).
    pub(super) force: Vec<String>,
}

/// Runs one phase of a switch under the cutover's deadline, shows it as the
/// current phase in /status, and records its duration in the report.
async fn timed<T>(
    controller: &Controller,
    deadline: Instant,
    name: &'static str,
    work: impl std::future::Future<Output = Result<T, CutoverError>>,
) -> (Result<T, CutoverError>, Duration) {
    controller.set_phase(name);
    fault::point(name).await;
    let started = Instant::now();
    let result = match tokio::time::timeout(deadline.saturating_duration_since(started), work).await
    {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(CutoverError::Aborted(m))) => Err(CutoverError::Aborted(format!("{name}: {m}"))),
        Ok(Err(refused)) => Err(refused),
        Err(_) => Err(CutoverError::Aborted(format!(
            "{name}: the cutover timeout ran out"
        ))),
    };
    (result, started.elapsed())
}

/// `phase!(run, "name", future)`: [`timed`], then the duration into the report.
macro_rules! phase {
    ($run:expr, $name:literal, $work:expr) => {{
        let (result, took) = timed($run.controller, $run.deadline, $name, $work).await;
        $run.report.phase($name, took);
        result?
    }};
}

/// Names of the replication that carries writes toward `direction.to()`.
struct Stream<'c> {
    /// Slot on the side we leave (the publisher).
    slot: &'c str,
    /// Subscription on the side we go to.
    subscription: &'c str,
    /// Subscription on the side we leave, which carries writes back after the switch.
    opposite: &'c str,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        data: &'a DataPlane,
        controller: &'a Controller,
        config: &'a Config,
        direction: Direction,
        timeout: Duration,
        report: &'a mut Report,
    ) -> Run<'a> {
        Run {
            data,
            controller,
            config,
            direction,
            timeout,
            deadline: Instant::now() + timeout,
            report,
            intent_written: false,
            rolled_back: false,
            paused_at: None,
            waited_before_pause: 0,
            conns: None,
            force: Vec::new(),
        }
    }

    /// Both admin connections by side, for `recover`.
    fn sides(&self) -> Option<Sides<'_>> {
        let conns = self.conns.as_ref()?;
        let (from, to) = (&conns.from, &conns.to);
        Some(match self.direction.from() {
            Side::Blue => Sides {
                blue: from,
                green: to,
            },
            Side::Green => Sides {
                blue: to,
                green: from,
            },
        })
    }

    /// Writes `next` as the state file and in memory (a small write and
    /// two fsyncs, never inside the pause).
    fn store(&self, next: PersistedState) -> Result<(), CutoverError> {
        self.controller
            .store(next)
            .map_err(|e| CutoverError::Aborted(e.to_string()))
    }

    fn reverse_names(&self) -> ReverseNames {
        // The old side's apply worker reaches the new side (green) with
        // green's admin credentials.
        let conninfo = self
            .config
            .backends
            .green
            .as_ref()
            .map(|g| {
                replication::conninfo(
                    g,
                    &self.config.replication.database,
                    self.config.replication.password_in_catalog,
                )
            })
            .unwrap_or_default();
        ReverseNames::new(conninfo)
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn conns(&self) -> Result<&Conns, CutoverError> {
        self.conns
            .as_ref()
            .ok_or_else(|| CutoverError::Aborted("admin connections are not open".into()))
    }

    fn conn(&self, side: Side) -> Result<&Client, CutoverError> {
        let conns = self.conns()?;
        Ok(if side == self.direction.from() {
            &conns.from
        } else {
            &conns.to
        })
    }

    pub(super) async fn execute(&mut self, dry_run: bool) -> Result<Outcome, CutoverError> {
        let (from, to) = (self.direction.from(), self.direction.to());
        let active = self.data.switch.active().side;
        if active != from {
            return Err(CutoverError::Refused(format!("{active} is already active")));
        }
        if !dry_run && self.controller.state_file.is_none() {
            return Err(CutoverError::Refused(
                "[cutover] state_file is not set: without it a crash in the middle of a switch \
                 could not be undone, and a restart would not know which side is active"
                    .into(),
            ));
        }
        if let (Some(path), true) = (&self.controller.state_file, dry_run) {
            state::check_writable(path).map_err(|e| CutoverError::Refused(e.to_string()))?;
        }
        if let Some(why) = self.controller.unreconciled() {
            return Err(CutoverError::Refused(format!(
                "the servers may not match the state file yet ({why}); pgswitch retries by \
                 itself: see `pgswitch status`"
            )));
        }
        let Some(target) = self.data.backend(to) else {
            return Err(CutoverError::Refused(format!(
                "[backends.{to}] is not configured"
            )));
        };
        let replication = self.config.replication.clone();
        let names = self.reverse_names();
        let stream = match self.direction {
            Direction::Cutover => Stream {
                slot: replication.slot(),
                subscription: &replication.subscription,
                opposite: &names.subscription,
            },
            Direction::Fallback => Stream {
                slot: &names.slot,
                subscription: &names.subscription,
                opposite: &replication.subscription,
            },
        };

        // 1. Preflight: no effect on traffic. A just-enabled direction's
        // worker may still be starting: that wait is not counted against the
        // switch's timeout.
        let waited = match super::connect_side(self.config, to, self.remaining()).await {
            Ok(conn) => wait_for_worker(&conn, stream.subscription).await,
            Err(_) => Duration::ZERO,
        };
        if !waited.is_zero() {
            self.report.phase("wait_worker", waited);
            self.deadline = Instant::now() + self.timeout;
        }
        let conns = phase!(self, "preflight", self.preflight(&stream));
        self.conns = Some(conns);
        let (forced, warnings) = phase!(self, "checks", self.checks(&stream));
        self.report.forced = forced;
        self.report.warnings = warnings;
        self.report.lag_bytes = self.preflight_lag(&stream).await.ok();

        // The intent, durably, before anything changes on either server.
        if !dry_run {
            let mut with_intent = self.controller.persisted();
            with_intent.intent = Some(Intent {
                kind: self.direction.name().to_owned(),
                from,
                to,
                started_at_ms: self.report.started_at_unix_ms,
            });
            phase!(self, "intent", async { self.store(with_intent) });
            self.intent_written = true;
        }

        // Before the pause: the reverse direction's slot and subscription, and
        // warm server connections on the target.
        if self.direction == Direction::Cutover
            && self.config.cutover.reverse_replication
            && !dry_run
        {
            let conns = self.conns()?;
            let prepare = replication::prepare_reverse(&conns.to, &conns.from, &names);
            phase!(self, "prepare", async {
                prepare.await.map_err(CutoverError::from)
            });
        }
        // A fallback restarts the forward direction at the switch point: its
        // slot (on the side we go to) is moved there ahead of the pause, so
        // that the walsender doesn't decode everything written since the
        // cutover right after the swap, next to the resumed application.
        if self.direction == Direction::Fallback && !dry_run {
            let conn = self.conn(to)?;
            let slot = replication.slot();
            phase!(self, "prepare", async {
                Ok(replication::advance_unused_slot(conn, slot).await?)
            });
        }
        // Lift an earlier fence on the side we go to before warming server
        // connections there: a session that starts while its role is fenced
        // is read-only, and unfence ends such sessions, so connections warmed
        // first would be killed under the transactions held at the gate
        // (client errors right after the swap). A fence on the side that is
        // about to become active guards nothing worth the risk; an abort
        // puts it back. Idle pooled connections to the target may predate the
        // unfence (a dry run warms a fenced side): they are closed. The fence
        // is read from the target's markers, not from the state file, which
        // may not know it (a state file restored by `pgswitch recover`).
        if !dry_run {
            let conn = self.conn(to)?;
            let work = async {
                match replication::pgswitch_fence(conn).await? {
                    Some(fence) => Ok(replication::unfence(conn, &fence).await.map(|_| true)?),
                    None => Ok(false),
                }
            };
            if phase!(self, "unfence", work) {
                for pool in target.pools() {
                    pool.close_idle();
                }
            }
        }
        let warm = async {
            self.warm_target(&target).await;
            Ok(())
        };
        phase!(self, "warm", warm);

        // The next state, written durably before the pause (only its rename
        // happens inside): the old side fenced as planned here, the new side's
        // old fence gone.
        let mut next = self.controller.persisted();
        next.active = to;
        next.intent = None;
        next.switched_at_ms = Some(self.report.started_at_unix_ms);
        next.decommissioned_at_ms = None;
        next.fences.remove(to.as_str());
        let roles = self.config.application_roles();
        let fence_plan = if self.config.cutover.fence_old && !roles.is_empty() && !dry_run {
            let conn = &self.conns()?.fence;
            let plan = async { Ok(replication::plan_fence(conn, &roles).await?) };
            let plan = phase!(self, "plan_fence", plan);
            next.fences.insert(from.as_str().to_owned(), plan.clone());
            Some(plan)
        } else {
            None
        };
        let staged = match (&self.controller.state_file, dry_run) {
            (Some(path), false) => {
                let (path, state) = (path.clone(), next.clone());
                let stage = async {
                    tokio::task::spawn_blocking(move || state::stage(&path, &state))
                        .await
                        .map_err(|e| CutoverError::Aborted(e.to_string()))?
                        .map_err(|e| CutoverError::Aborted(e.to_string()))
                };
                Some(phase!(self, "stage_state", stage))
            }
            _ => None,
        };

        // 2. Pause.
        self.data.switch.set_draining(true);
        self.data.switch.gate.hold(Holder::Cutover);
        self.paused_at = Some(Instant::now());
        self.waited_before_pause = self.data.switch.gate.waited();
        self.report.pausing = true;

        // 3. Drain.
        let drain = self.drain();
        phase!(self, "drain", drain);
        // The old side's pooled connections (all idle now) are spared by the
        // fence and closed a moment after the pause: process exits cost CPU
        // the catch-up and the held transactions need more.
        let spare: Vec<i32> = self
            .data
            .switch
            .active()
            .pools()
            .iter()
            .flat_map(|p| p.idle_backend_pids())
            .collect();

        // 4. Catch up to an exact, flushed LSN.
        let conns = self.conns()?;
        let catch_up = async {
            let lsn = replication::flush_and_mark(&conns.from).await?;
            replication::wait_applied(
                &conns.from,
                stream.slot,
                &conns.to,
                stream.subscription,
                lsn,
                self.remaining(),
            )
            .await?;
            Ok::<Lsn, CutoverError>(lsn)
        };
        let target_lsn = phase!(self, "catch_up", catch_up);
        self.report.target_lsn = Some(target_lsn.to_string());
        if dry_run {
            return Ok(Outcome::DryRun);
        }

        // 5–7, side by side on their own connections: sequences, the
        // replication direction (the subscription that carried writes toward
        // the new side stops, the one carrying them back starts from exactly
        // this point; a fallback restarts the forward one), and the fence on
        // the old side. Their phases overlap in the report.
        fault::point("switch").await;
        let conns = self.conns()?;
        let remaining = self.remaining();
        let sequences = async {
            let started = Instant::now();
            let result = match self.config.cutover.sync_sequences {
                true => replication::sync_sequences(&conns.from, &conns.to)
                    .await
                    .map(Some),
                false => Ok(None),
            };
            (result, started.elapsed())
        };
        let reverse =
            self.direction == Direction::Fallback || self.config.cutover.reverse_replication;
        let direction = async {
            let started = Instant::now();
            let result = match reverse {
                true => replication::switch_direction(
                    &conns.to,
                    stream.subscription,
                    &conns.from,
                    stream.opposite,
                    remaining,
                )
                .await
                .map(Some),
                false => Ok(None),
            };
            (result, started.elapsed())
        };
        let fence = async {
            let started = Instant::now();
            let result = match &fence_plan {
                Some(plan) => replication::apply_fence(&conns.fence, plan, &spare)
                    .await
                    .map(Some),
                None => Ok(None),
            };
            (result, started.elapsed())
        };
        let ((synced, t_seq), (switched, t_dir), (fenced, t_fence)) =
            match tokio::time::timeout(remaining, async {
                tokio::join!(sequences, direction, fence)
            })
            .await
            {
                Ok(results) => results,
                Err(_) => {
                    return Err(CutoverError::Aborted(
                        "sequences/reverse/fence: the cutover timeout ran out".into(),
                    ))
                }
            };
        self.report.phase("sequences", t_seq);
        self.report.phase("reverse", t_dir);
        self.report.phase("fence", t_fence);
        if let Ok(Some(point)) = &switched {
            self.report.switch_lsn = Some(point.lsn.to_string());
        }
        self.report.sequences_synced = synced
            .map_err(|e| CutoverError::Aborted(format!("sequences: {e}")))?
            .unwrap_or(0);
        switched.map_err(|e| CutoverError::Aborted(format!("reverse: {e}")))?;
        fenced.map_err(|e| CutoverError::Aborted(format!("fence: {e}")))?;

        // 8. Persist, then swap: the commit point.
        if let (Some(staged), Some(path)) = (&staged, &self.controller.state_file) {
            let commit = async {
                state::commit(staged, path).map_err(|e| CutoverError::Aborted(e.to_string()))
            };
            phase!(self, "persist", commit);
        }
        *self
            .controller
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = next;
        self.data.switch.swap(target);
        fault::point("switched").await;
        Ok(Outcome::Switched)
    }

    async fn preflight(&self, stream: &Stream<'_>) -> Result<Conns, CutoverError> {
        let connect = |side: Side| async move {
            super::connect_side(self.config, side, self.remaining())
                .await
                .map_err(CutoverError::Refused)
        };
        let (from, to, fence) = tokio::try_join!(
            connect(self.direction.from()),
            connect(self.direction.to()),
            connect(self.direction.from())
        )?;
        let status = replication::subscription_status(&to, stream.subscription)
            .await
            .map_err(|e| CutoverError::Refused(e.to_string()))?;
        let to_side = self.direction.to();
        if !status.exists {
            return Err(CutoverError::Refused(format!(
                "subscription {:?} does not exist on {to_side}",
                stream.subscription
            )));
        }
        if !status.enabled || !status.streaming {
            return Err(CutoverError::Refused(format!(
                "subscription {:?} on {to_side} is not streaming (enabled: {}, worker running: {})",
                stream.subscription, status.enabled, status.streaming
            )));
        }
        if status.tables_not_ready > 0 {
            return Err(CutoverError::Refused(format!(
                "subscription {:?} on {to_side} still copies {} table(s)",
                stream.subscription, status.tables_not_ready
            )));
        }
        let lag = replication::replication_lag(&from, stream.slot)
            .await
            .map_err(|e| CutoverError::Refused(e.to_string()))?;
        let max = self.config.cutover.max_lag_bytes_to_start;
        if lag.bytes > max {
            return Err(CutoverError::Refused(format!(
                "{to_side} lags {} bytes behind, more than max_lag_bytes_to_start ({max})",
                lag.bytes
            )));
        }
        Ok(Conns { from, to, fence })
    }

    /// `pgswitch check` on the direction about to go live: a failed check
    /// refuses the switch unless it is forced; (forced, warnings).
    async fn checks(
        &self,
        stream: &Stream<'_>,
    ) -> Result<(Vec<String>, Vec<String>), CutoverError> {
        let conns = self.conns()?;
        let target = crate::check::Target {
            from: self.direction.from(),
            to: self.direction.to(),
            subscription: stream.subscription.to_owned(),
            slot: stream.slot.to_owned(),
        };
        let own = crate::check::OwnSessions {
            blue: self.data.own_connections(Side::Blue),
            green: self.data.own_connections(Side::Green),
        };
        let report = crate::check::run_on(self.config, &target, &conns.from, &conns.to, &own)
            .await
            .map_err(|e| CutoverError::Refused(format!("preflight checks: {e}")))?;
        let mut forced = Vec::new();
        for failed in report.failed() {
            if !self.force.iter().any(|f| f == failed.check) {
                let fix = failed
                    .fix
                    .as_deref()
                    .map(|fix| format!(" (fix: {fix})"))
                    .unwrap_or_default();
                return Err(CutoverError::Refused(format!(
                    "check {} failed: {}{fix}; `--force {}` goes ahead anyway",
                    failed.check, failed.detail, failed.check
                )));
            }
            forced.push(format!("{}: {}", failed.check, failed.detail));
        }
        let warnings = report
            .findings
            .iter()
            .filter(|f| f.level == crate::check::Level::Warn)
            .map(|f| format!("{}: {}", f.check, f.detail))
            .collect();
        Ok((forced, warnings))
    }

    async fn preflight_lag(&self, stream: &Stream<'_>) -> Result<u64, CutoverError> {
        let conns = self.conns()?;
        Ok(replication::replication_lag(&conns.from, stream.slot)
            .await?
            .bytes)
    }

    /// Opens server connections on the target ahead of the pause, as many as
    /// each pool has open on the old side, so held transactions don't wait
    /// for logins after the swap.
    ///
    /// Best effort, all logins at once (not one after the other: each costs
    /// its round trips and a SCRAM key derivation), within half of the time
    /// left: a connection not warmed is opened on demand after
    /// the swap, which is slower but no reason to abort the cutover, and
    /// the pause needs the rest of the time.
    async fn warm_target(&self, target: &crate::backends::Backend) {
        let mut opening = tokio::task::JoinSet::new();
        for pool in self.data.switch.active().pools() {
            let want = pool.stats().open;
            let new_pool = self.data.pool_for(target, &pool.key);
            let missing = want.saturating_sub(new_pool.stats().open);
            for _ in 0..missing {
                let new_pool = new_pool.clone();
                opening.spawn(async move {
                    new_pool
                        .add_idle()
                        .await
                        .map_err(|e| (new_pool.key.to_string(), e))
                });
            }
        }
        let total = opening.len();
        let budget = self.remaining() / 2;
        let mut opened = 0;
        let all = async {
            while let Some(done) = opening.join_next().await {
                match done {
                    Ok(Ok(())) => opened += 1,
                    Ok(Err((pool, e))) => {
                        tracing::warn!(%pool, error = %e, "could not warm a connection on the target")
                    }
                    Err(e) => tracing::warn!(error = %e, "warming task failed"),
                }
            }
        };
        if tokio::time::timeout(budget, all).await.is_err() {
            tracing::warn!(
                opened,
                total,
                ?budget,
                "warming the target took too long; the rest open on demand after the swap"
            );
        }
        // Dropping the set aborts logins still in progress.
    }

    /// Waits until no transaction is in flight on the old side.
    async fn drain(&self) -> Result<(), CutoverError> {
        let drain_timeout = self.config.cutover.drain_timeout;
        if self.wait_drained(drain_timeout).await {
            return Ok(());
        }
        match self.config.cutover.drain_action {
            DrainAction::Abort => Err(CutoverError::Aborted(format!(
                "{} transaction(s) still running after drain_timeout ({})",
                self.data.switch.in_flight(),
                drain_timeout.as_millis()
            ))),
            DrainAction::Cancel => {
                let old = self.data.switch.active();
                let cancelled = self.data.cancels.cancel_all_on(&old.addr).await;
                tracing::warn!(
                    cancelled,
                    "drain timeout: cancelled running queries on the old side"
                );
                if self.wait_drained(self.remaining()).await {
                    Ok(())
                } else {
                    Err(CutoverError::Aborted(
                        "transactions still running after cancel".into(),
                    ))
                }
            }
        }
    }

    async fn wait_drained(&self, within: Duration) -> bool {
        let within = within.min(self.remaining());
        self.data.switch.wait_drained(within).await
    }

    /// Brings the servers back to the old side after an abort, before the
    /// gate opens: steps 1–4 of `recover`, which find on the servers what
    /// the switch changed. A failure leaves the intent in the state file
    /// for the controller's retries.
    pub(super) async fn rollback(&mut self) {
        if let Some(path) = &self.controller.state_file {
            let _ = std::fs::remove_file(path.with_extension("next"));
        }
        if !self.intent_written {
            return;
        }
        let state = self.controller.persisted();
        let timeout = self.config.cutover.timeout.max(Duration::from_secs(5));
        let mut changes = Changes::new();
        let result = match self.sides() {
            Some(sides) => {
                recover::reconcile(
                    self.config,
                    &state,
                    self.direction.from(),
                    &sides,
                    timeout,
                    &mut changes,
                )
                .await
            }
            None => Err(recover::RecoverError::Undecidable(
                "no admin connections".into(),
            )),
        };
        self.report.undone = changes;
        match result {
            Ok(()) => self.rolled_back = true,
            Err(e) => {
                tracing::error!(error = %e, "undoing the switch failed; retrying in the background");
                self.report.undo_failures.push(e.to_string());
                self.controller.set_unreconciled(Some(e.to_string()));
            }
        }
    }

    /// After the gate opened: what no held transaction should wait for.
    /// An abort drops what it prepared and records the state without its
    /// intent; a fallback drops the reverse direction, now idle (its slot
    /// would retain green's WAL for ever).
    pub(super) async fn after_resume(&mut self, outcome: Outcome) {
        if outcome == Outcome::Switched {
            // The direction just started streams before the switch answers,
            // so that the way back is open at once: PostgreSQL may start its
            // worker seconds after the subscription was enabled.
            let started = recover::subscription_into(self.config, self.direction.from());
            if let Some(conns) = &self.conns {
                self.controller.set_phase("streaming");
                let waited = wait_for_worker(&conns.from, &started).await;
                if !waited.is_zero() {
                    self.report.phase("streaming", waited);
                }
            }
        }
        let finish_abort = outcome == Outcome::Aborted && self.rolled_back;
        let after_fallback = outcome == Outcome::Switched && self.direction == Direction::Fallback;
        if !finish_abort && !after_fallback {
            return;
        }
        fault::point("cleanup").await;
        let active = self.data.switch.active().side;
        let result = match self.sides() {
            Some(sides) => recover::clean_up(active, &sides).await,
            None => Ok(Changes::new()),
        };
        match result {
            Ok(dropped) => self.report.undone.extend(dropped),
            Err(e) => {
                tracing::warn!(error = %e, "dropping the idle direction failed; retrying in the background");
                self.report.undo_failures.push(e.to_string());
                self.controller.set_unreconciled(Some(e.to_string()));
                return;
            }
        }
        if finish_abort {
            let mut state = self.controller.persisted();
            state.intent = None;
            if let Err(e) = self.store(state) {
                self.report.undo_failures.push(e.to_string());
                self.controller.set_unreconciled(Some(e.to_string()));
            }
        }
    }

    /// Opens the gate: held transactions run (on the new side after a swap).
    pub(super) fn resume(&mut self) {
        if let Some(paused_at) = self.paused_at.take() {
            self.data.switch.set_draining(false);
            // An operator's pause, if any, still holds the gate.
            self.data.switch.gate.release(Holder::Cutover);
            self.report.pause_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
            self.report.pausing = false;
            self.report.held_transactions = Some(
                self.data
                    .switch
                    .gate
                    .waited()
                    .saturating_sub(self.waited_before_pause),
            );
            self.report.still_paused_by_operator =
                self.data.switch.gate.holders().contains(&Holder::Operator);
        }
        if self.report_switched() {
            // Old-side connections are closed once idle (busy ones end with
            // their sessions), after the held transactions had their turn.
            if let Some(old) = self.data.backend(self.direction.from()) {
                tokio::spawn(async move {
                    tokio::time::sleep(OLD_SIDE_GRACE).await;
                    for pool in old.pools() {
                        pool.close_idle();
                    }
                });
            }
        }
    }

    fn report_switched(&self) -> bool {
        self.data.switch.active().side == self.direction.to()
    }
}

/// Waits (up to [`WORKER_START_WAIT`]) while `subscription` is enabled but
/// its apply worker does not stream yet; returns how long it waited.
/// Anything else is left to the caller to judge.
async fn wait_for_worker(conn: &Client, subscription: &str) -> Duration {
    let started = Instant::now();
    let mut waited = false;
    while started.elapsed() < WORKER_START_WAIT {
        match replication::subscription_status(conn, subscription).await {
            Ok(st) if st.enabled && !st.streaming => {
                if !waited {
                    tracing::info!(
                        subscription,
                        "waiting for the subscription's apply worker to start"
                    );
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => break,
        }
    }
    if waited {
        started.elapsed()
    } else {
        Duration::ZERO
    }
}
