//! `pgswitch decommission`: the end of an upgrade. After the fallback
//! window, drops the replication between the sides (subscriptions, their
//! slots and origins, publications: the forward direction `prepare` made
//! and the reverse one a cutover made) and lifts pgswitch's fences.
//!
//! It runs in the serving pgswitch (admin API), beside neither a switch nor
//! a round of the upkeep, because the controller's state changes with it.
//! Every step is idempotent and the state file is written last: a SIGKILL
//! or a server crash at any point leaves objects a re-run drops; a restart
//! in between re-applies the fences the state file still lists (the
//! reconcile tolerates the missing subscriptions) and the re-run lifts them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{connect_side, manages_replication, Controller};
use crate::config::{Config, Side};
use crate::data_plane::DataPlane;
use crate::replication::{self, ReplicationError, ReverseNames};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct DecommissionReport {
    pub kind: &'static str,
    /// `done`, `refused` or `failed`.
    pub outcome: &'static str,
    pub active: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Went ahead inside the fallback window (or before any cutover).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// What was dropped, as `side: object`.
    pub dropped: Vec<String>,
    /// Fences lifted, as `side: roles`.
    pub lifted: Vec<String>,
    /// Slots of pgswitch's replication still on a server afterwards (none,
    /// unless a step failed).
    pub remaining: Vec<String>,
}

impl DecommissionReport {
    pub fn http_status(&self) -> u16 {
        if self.outcome == "done" {
            200
        } else {
            409
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DecommissionError {
    #[error("{0}")]
    Refused(String),
    #[error("{side}: {source}")]
    Server {
        side: Side,
        source: ReplicationError,
    },
    #[error("{0}")]
    Failed(String),
}

fn on(side: Side) -> impl Fn(ReplicationError) -> DecommissionError {
    move |source| DecommissionError::Server { side, source }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Controller {
    /// Drops the replication between the sides and lifts the fences, unless
    /// the old side may still be needed for a fallback (`force` overrides).
    pub async fn decommission(&self, data: &DataPlane, force: bool) -> DecommissionReport {
        let mut report = DecommissionReport {
            kind: "decommission",
            outcome: "refused",
            active: self.persisted().active,
            reason: None,
            forced: false,
            dropped: Vec::new(),
            lifted: Vec::new(),
            remaining: Vec::new(),
        };
        let Some(_exclusive) = self.exclusive().await else {
            report.reason = Some("a cutover, fallback or decommission is running".into());
            return report;
        };
        let config = data.config().clone();
        match self.decommission_locked(&config, force, &mut report).await {
            Ok(()) => report.outcome = "done",
            Err(e) => {
                report.outcome = match e {
                    DecommissionError::Refused(_) => "refused",
                    _ => "failed",
                };
                report.reason = Some(e.to_string());
            }
        }
        tracing::info!(outcome = report.outcome, dropped = ?report.dropped, lifted = ?report.lifted,
            reason = report.reason.as_deref().unwrap_or(""), "decommission");
        report
    }

    async fn decommission_locked(
        &self,
        config: &Config,
        force: bool,
        report: &mut DecommissionReport,
    ) -> Result<(), DecommissionError> {
        let state = self.persisted();
        if !manages_replication(config) {
            return Err(DecommissionError::Refused(
                "admin_user is not configured for both sides".into(),
            ));
        }
        if let Some(why) = self.unreconciled() {
            return Err(DecommissionError::Refused(format!(
                "the servers may not match the state file yet ({why})"
            )));
        }
        if state.intent.is_some() {
            return Err(DecommissionError::Refused(
                "a switch is unfinished in the state file".into(),
            ));
        }
        if let Some(why) = still_fallback_target(config, &state, now_ms()) {
            if !force {
                return Err(DecommissionError::Refused(format!(
                    "{why}; `pgswitch decommission --force` drops it anyway"
                )));
            }
            report.forced = true;
        }
        let (blue, green) = tokio::try_join!(
            connect_side(config, Side::Blue, CONNECT_TIMEOUT),
            connect_side(config, Side::Green, CONNECT_TIMEOUT)
        )
        .map_err(DecommissionError::Failed)?;
        let forward = ReverseNames {
            publication: config.replication.publication.clone(),
            slot: config.replication.slot().to_owned(),
            subscription: config.replication.subscription.clone(),
            conninfo: String::new(),
        };
        let reverse = ReverseNames::new("");
        // Each direction: the subscription (detached from its slot, so the
        // drop needs no connection to the publisher), then the slot and the
        // publication on the publisher. The subscription's origin goes with it.
        for (publisher, subscriber, names, side) in [
            (&blue, &green, &forward, Side::Blue),
            (&green, &blue, &reverse, Side::Green),
        ] {
            let dropped = replication::drop_direction(publisher, subscriber, names)
                .await
                .map_err(on(side))?;
            // The subscription was on the subscriber, the rest on the publisher.
            report.dropped.extend(dropped.into_iter().map(|d| {
                let at = if d.starts_with("subscription") {
                    side.other()
                } else {
                    side
                };
                format!("{at}: {d}")
            }));
        }
        super::fault::point("decommission_dropped").await;
        for (side, c) in [(Side::Blue, &blue), (Side::Green, &green)] {
            for origin in replication::drop_orphaned_origins(c)
                .await
                .map_err(on(side))?
            {
                report.dropped.push(format!("{side}: origin {origin:?}"));
            }
            if let Some(fence) = replication::pgswitch_fence(c).await.map_err(on(side))? {
                replication::unfence(c, &fence).await.map_err(on(side))?;
                let roles: Vec<&str> = fence.roles.iter().map(|r| r.role.as_str()).collect();
                report.lifted.push(format!("{side}: {}", roles.join(", ")));
            }
        }
        for (side, c, slots) in [
            (Side::Blue, &blue, [forward.slot.as_str()]),
            (Side::Green, &green, [reverse.slot.as_str()]),
        ] {
            for slot in replication::slots_left(c, &slots).await.map_err(on(side))? {
                report.remaining.push(format!("{side}: slot {slot:?}"));
            }
        }
        if !report.remaining.is_empty() {
            return Err(DecommissionError::Failed(format!(
                "slots remain: {}",
                report.remaining.join(", ")
            )));
        }
        super::fault::point("decommission_store").await;
        let mut next = state;
        next.fences.clear();
        next.decommissioned_at_ms = Some(now_ms());
        self.store(next)
            .map_err(|e| DecommissionError::Failed(e.to_string()))
    }
}

/// Why the old side is still the fallback target, if it is: no cutover yet
/// (decommissioning abandons the upgrade), or the last switch is younger
/// than `[cutover] fallback_window`.
fn still_fallback_target(
    config: &Config,
    state: &crate::state::PersistedState,
    now_ms: u64,
) -> Option<String> {
    if state.decommissioned_at_ms.is_some() {
        return None;
    }
    let old = state.active.other();
    let Some(switched) = state.switched_at_ms else {
        return Some(format!(
            "no switch has happened: {old} is the upgrade's target, and decommissioning \
             abandons the upgrade"
        ));
    };
    let window = config.cutover.fallback_window.as_millis() as u64;
    let age = now_ms.saturating_sub(switched);
    (age < window).then(|| {
        format!(
            "{old} is the fallback target for {} more ([cutover] fallback_window = {})",
            humantime::format_duration(Duration::from_secs((window - age) / 1000)),
            humantime::format_duration(config.cutover.fallback_window)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PersistedState;

    #[test]
    fn the_old_side_is_the_fallback_target_inside_the_window() {
        let config = Config::parse(
            "[proxy]\nlisten = \"127.0.0.1:6432\"\n[backends.blue]\nhost = \"127.0.0.1\"\n",
            std::path::Path::new("proxy.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut state = PersistedState::new(Side::Green);
        let why = still_fallback_target(&config, &state, 1_000).unwrap_or_default();
        assert!(why.contains("no switch has happened"), "{why}");
        let hour = 3_600_000;
        state.switched_at_ms = Some(hour);
        let why = still_fallback_target(&config, &state, 2 * hour).unwrap_or_default();
        assert!(why.contains("blue is the fallback target for 23h"), "{why}");
        assert_eq!(still_fallback_target(&config, &state, 26 * hour), None);
        state.decommissioned_at_ms = Some(2 * hour);
        assert_eq!(still_fallback_target(&config, &state, 2 * hour), None);
    }
}
