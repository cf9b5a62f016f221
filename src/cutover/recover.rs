//! Reconciling both servers with the state file's answer: one side active
//! and writable, exactly one replication direction enabled, out of it, the
//! other side fenced as recorded, and no idle object of pgswitch's that
//! retains WAL.
//!
//! One idempotent procedure serves every case where the servers may not
//! match the answer: an aborted switch (in process), a restart that finds a
//! switch's intent in the state file (the process stopped in the middle),
//! the background retry while a side was unreachable, and `pgswitch
//! recover`. It reads each object's state before changing it, so it undoes
//! exactly what a switch did, whatever moment the switch stopped at:
//!
//! 1. the subscription *into* the active side is disabled and its workers
//!    are gone (first: from here on nothing can bounce between the sides);
//! 2. the subscription *out of* the active side is enabled: it resumes from
//!    its own origin, where the switch stopped it, which is exact because
//!    the other side took no application write in between;
//! 3. every fence of pgswitch's on the active side is lifted (found by its
//!    markers, see `replication::fence`), so it is writable;
//! 4. the other side's recorded fence, if any, is in place;
//! 5. cleanup, outside any pause: with blue active, the reverse direction's
//!    subscription, slot and publication are dropped (a slot nobody reads
//!    retains WAL for ever; the next cutover prepares them again).
//!
//! With green active the idle direction is the operator's forward
//! subscription, which a fallback needs again: its slot on blue is kept
//! advanced instead ([`keep_idle_slot_advanced`]).

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, Side};
use crate::replication::{self, ReplicationError, ReverseNames};
use crate::state::PersistedState;

/// What a reconcile changed, in order, for logs and reports.
pub type Changes = Vec<String>;

/// Admin connections to both sides.
pub struct Sides<'c> {
    pub blue: &'c Client,
    pub green: &'c Client,
}

impl Sides<'_> {
    pub fn get(&self, side: Side) -> &Client {
        match side {
            Side::Blue => self.blue,
            Side::Green => self.green,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{side}: {source}")]
    Side {
        side: Side,
        source: ReplicationError,
    },
    /// The servers contradict the state file in a way only an operator can
    /// settle.
    #[error("{0}")]
    Undecidable(String),
}

fn on(side: Side) -> impl Fn(ReplicationError) -> RecoverError {
    move |source| RecoverError::Side { side, source }
}

/// The subscription that carries writes into `side`, on `side`.
pub fn subscription_into(config: &Config, side: Side) -> String {
    match side {
        Side::Green => config.replication.subscription.clone(),
        Side::Blue => ReverseNames::new("").subscription,
    }
}

/// Steps 1–4 of the module docs: what must hold before traffic runs on
/// `active`, appending what it changed to `changes`. Cheap when nothing
/// needs changing (a few catalog reads). The active side's steps come
/// first: once they are done (an error names the other side) traffic can
/// run on `active` safely, and the rest can be retried.
pub async fn reconcile(
    config: &Config,
    state: &PersistedState,
    active: Side,
    sides: &Sides<'_>,
    timeout: Duration,
    changes: &mut Changes,
) -> Result<(), RecoverError> {
    let other = active.other();
    let (a, o) = (sides.get(active), sides.get(other));

    let into = subscription_into(config, active);
    if replication::stop_subscription(a, &into, timeout)
        .await
        .map_err(on(active))?
    {
        changes.push(format!("{active}: disabled subscription {into:?}"));
    }
    if let Some(fence) = replication::pgswitch_fence(a).await.map_err(on(active))? {
        replication::unfence(a, &fence).await.map_err(on(active))?;
        let roles: Vec<&str> = fence.roles.iter().map(|r| r.role.as_str()).collect();
        changes.push(format!("{active}: lifted pgswitch's fence of {roles:?}"));
    }

    let out = subscription_into(config, other);
    if replication::start_subscription(o, &out)
        .await
        .map_err(on(other))?
    {
        changes.push(format!("{other}: enabled subscription {out:?}"));
    }
    let Some(fence) = state.fences.get(other.as_str()) else {
        return Ok(());
    };
    if !config.cutover.fence_old {
        return Ok(());
    }
    let present = replication::pgswitch_fence(o).await.map_err(on(other))?;
    let missing: Vec<_> = fence
        .roles
        .iter()
        .filter(|r| {
            !present
                .as_ref()
                .is_some_and(|p| p.roles.iter().any(|q| q.role == r.role))
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        let roles: Vec<String> = missing.iter().map(|r| r.role.clone()).collect();
        let refence = replication::Fence {
            roles: missing,
            ..fence.clone()
        };
        replication::apply_fence(o, &refence, &[])
            .await
            .map_err(on(other))?;
        changes.push(format!("{other}: fenced {roles:?} again"));
    }
    Ok(())
}

/// Step 5 of the module docs: with blue active, drops the reverse
/// direction's objects (only pgswitch's, by name).
pub async fn clean_up(active: Side, sides: &Sides<'_>) -> Result<Changes, RecoverError> {
    if active != Side::Blue {
        return Ok(Changes::new());
    }
    let names = ReverseNames::new("");
    replication::drop_direction(sides.green, sides.blue, &names)
        .await
        .map_err(|e| RecoverError::Side {
            side: Side::Green,
            source: e,
        })
}

/// Refuses to serve `active` when the servers say a switch away from it
/// committed although the state file does not know it (lost or replaced):
/// `active` carries pgswitch's fence and the other side does not. Only for
/// a state without an intent; a switch in progress explains a fence.
pub async fn check_evidence(
    state: &PersistedState,
    sides: &Sides<'_>,
    state_file: &str,
) -> Result<(), RecoverError> {
    if state.intent.is_some() {
        return Ok(());
    }
    let active = state.active;
    let other = active.other();
    let fenced_active = replication::pgswitch_fence(sides.get(active))
        .await
        .map_err(on(active))?;
    let fenced_other = replication::pgswitch_fence(sides.get(other))
        .await
        .map_err(on(other))?;
    if let (Some(fence), None) = (fenced_active, fenced_other) {
        return Err(RecoverError::Undecidable(format!(
            "the state file {state_file} says {active} is active, but {active} carries \
             pgswitch's fence (set at {}) and {other} does not: a switch to {other} may have \
             committed with a state file that is now lost or stale. Serving {active} could \
             split the writes. Find out which side took the latest writes, then run \
             `pgswitch recover --active <side>` with pgswitch stopped",
            fence.fenced_at
        )));
    }
    Ok(())
}

/// Moves the forward slot on blue to its current flush position while green
/// is active and the forward subscription is idle: a fallback restarts it
/// at its own switch point, so nothing before that point is needed, and a
/// slot left behind would retain blue's WAL until then.
pub async fn keep_idle_slot_advanced(
    config: &Config,
    blue: &Client,
) -> Result<Option<replication::Lsn>, ReplicationError> {
    replication::advance_unused_slot(blue, config.replication.slot()).await
}
