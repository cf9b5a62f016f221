//! One cutover or fallback in progress: its phases in order, the undo list
//! an abort walks back, and the admin connections it works over.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::report::Outcome;
use super::{state, Controller, CutoverError, Direction, Report, OLD_SIDE_GRACE};
use crate::config::{Config, DrainAction, Side};
use crate::data_plane::DataPlane;
use crate::replication::{self, Fence, Lsn, ReverseNames};
use crate::switch::Holder;

/// What to undo on abort, most recent last.
enum Undo {
    Fenced {
        side: Side,
        fence: Fence,
    },
    Unfenced {
        side: Side,
        roles: Vec<String>,
    },
    /// `stopped` (on the new side) was disabled and `started` (on the old side) enabled.
    DirectionSwitched {
        stopped: String,
        started: String,
    },
}

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
    deadline: Instant,
    report: &'a mut Report,
    undo: Vec<Undo>,
    paused_at: Option<Instant>,
    conns: Option<Conns>,
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
        deadline: Instant,
        report: &'a mut Report,
    ) -> Run<'a> {
        Run {
            data,
            controller,
            config,
            direction,
            deadline,
            report,
            undo: Vec::new(),
            paused_at: None,
            conns: None,
        }
    }

    fn reverse_names(&self) -> ReverseNames {
        // The old side's apply worker reaches the new side (green) with
        // green's admin credentials.
        let green = self.config.backends.green.as_ref();
        let conninfo = green
            .map(|g| {
                let (user, password) = g.admin_credentials().unwrap_or_default();
                format!(
                    "host={} port={} user={} password={} dbname={}",
                    g.host,
                    g.port,
                    conninfo_value(&user),
                    conninfo_value(&password),
                    conninfo_value(&self.config.replication.database)
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

        // 1. Preflight: no effect on traffic.
        let conns = phase!(self, "preflight", self.preflight(&stream));
        self.conns = Some(conns);
        self.report.lag_bytes = self.preflight_lag(&stream).await.ok();

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
        // unfence (a dry run warms a fenced side): they are closed.
        if !dry_run {
            if let Some(old_fence) = self.controller.persisted().fences.get(to.as_str()).cloned() {
                let conn = self.conn(to)?;
                let work = async { Ok(replication::unfence(conn, &old_fence).await?) };
                phase!(self, "unfence", work);
                self.undo.push(Undo::Unfenced {
                    side: to,
                    roles: old_fence.roles.iter().map(|r| r.role.clone()).collect(),
                });
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
        // Record what succeeded before reporting what failed, so an abort undoes it.
        if let Ok(Some(point)) = &switched {
            self.report.switch_lsn = Some(point.lsn.to_string());
            self.undo.push(Undo::DirectionSwitched {
                stopped: stream.subscription.to_owned(),
                started: stream.opposite.to_owned(),
            });
        }
        if let Some(plan) = &fence_plan {
            // Even a failed fence may have set some roles read-only: undo it.
            self.undo.push(Undo::Fenced {
                side: from,
                fence: plan.clone(),
            });
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
        self.undo.clear();
        Ok(Outcome::Switched)
    }

    async fn preflight(&self, stream: &Stream<'_>) -> Result<Conns, CutoverError> {
        let connect = |side: Side| async move {
            let backend = self.config.backends.get(side).ok_or_else(|| {
                CutoverError::Refused(format!("[backends.{side}] is not configured"))
            })?;
            let (user, password) = backend.admin_credentials().ok_or_else(|| {
                CutoverError::Refused(format!("backends.{side}.admin_user is not configured"))
            })?;
            replication::connect(
                &backend.host,
                backend.port,
                &user,
                &password,
                &self.config.replication.database,
                self.remaining(),
            )
            .await
            .map_err(|e| CutoverError::Refused(format!("{side} does not answer: {e}")))
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
        let until = Instant::now() + within.min(self.remaining());
        loop {
            if self.data.switch.in_flight() == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Undoes, newest first, what an aborted switch did.
    pub(super) async fn rollback(&mut self) {
        let timeout = self.config.cutover.timeout.max(Duration::from_secs(5));
        let mut failures = Vec::new();
        while let Some(step) = self.undo.pop() {
            let result = match (&step, self.conns.as_ref()) {
                (_, None) => Ok(()),
                (Undo::Fenced { side, fence }, Some(_)) => match self.conn(*side) {
                    Ok(conn) => replication::unfence(conn, fence).await.map(|_| ()),
                    Err(_) => Ok(()),
                },
                (Undo::Unfenced { side, roles }, Some(_)) => match self.conn(*side) {
                    Ok(conn) => replication::fence(conn, roles).await.map(|fence| {
                        let mut state = self
                            .controller
                            .state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        state.fences.insert(side.as_str().to_owned(), fence);
                    }),
                    Err(_) => Ok(()),
                },
                (Undo::DirectionSwitched { stopped, started }, Some(c)) => {
                    replication::revert_switch(&c.from, started, &c.to, stopped, timeout).await
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "undo step failed; check replication by hand");
                failures.push(e.to_string());
            }
        }
        if !failures.is_empty() {
            self.report.undo_failures = failures;
        }
        if let Some(path) = &self.controller.state_file {
            let _ = std::fs::remove_file(path.with_extension("next"));
        }
    }

    /// Opens the gate: held transactions run (on the new side after a swap).
    pub(super) fn resume(&mut self) {
        if let Some(paused_at) = self.paused_at.take() {
            self.data.switch.set_draining(false);
            // An operator's pause, if any, still holds the gate.
            self.data.switch.gate.release(Holder::Cutover);
            self.report.pause_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
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

/// A value for a libpq connection string, quoted when it needs to be.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}
