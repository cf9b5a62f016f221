//! The replication lag a cutover (or fallback) would wait for, read once a
//! second while the active side has admin credentials, for /status and the
//! `pgswitch_replication_lag_bytes` gauge, and the last minutes of readings
//! for the dashboard's chart (`GET /lag`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{connect, replication_lag, Lag, ReverseNames};
use crate::config::Side;
use crate::data_plane::DataPlane;

/// Readings kept for `GET /lag`: one a second, so the last 10 minutes.
pub const LAG_HISTORY: usize = 600;

/// One reading of the lag toward the other side, as the dashboard charts it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LagSample {
    pub at_unix_ms: u64,
    /// Which side published (the active one when read).
    pub from: Side,
    /// `None`: the reading failed (no slot, the server down).
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

/// The latest reading, if any, and the last [`LAG_HISTORY`] readings.
#[derive(Default)]
pub struct LagWatch {
    latest: Mutex<Option<Lag>>,
    history: Mutex<VecDeque<LagSample>>,
}

impl LagWatch {
    pub fn get(&self) -> Option<Lag> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The readings of the last minutes, oldest first.
    pub fn history(&self) -> Vec<LagSample> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().cloned().collect()
    }

    fn set(&self, from: Side, lag: Option<Lag>) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.record(LagSample {
            at_unix_ms,
            from,
            bytes: lag.as_ref().map(|l| l.bytes),
            seconds: lag.as_ref().and_then(|l| l.seconds),
        });
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }

    fn record(&self, sample: LagSample) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == LAG_HISTORY {
            history.pop_front();
        }
        history.push_back(sample);
    }
}

/// Reads the lag toward the other side once a second, for ever.
pub async fn watch_lag(data: Arc<DataPlane>, watch: Arc<LagWatch>) {
    let mut conn: Option<(Side, tokio_postgres::Client)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = data.config().clone();
        let side = data.switch.active().side;
        let Some(backend) = config.backends.get(side) else {
            continue;
        };
        let Some((user, password)) = backend.admin_credentials() else {
            continue;
        };
        if conn
            .as_ref()
            .is_none_or(|(s, c)| *s != side || c.is_closed())
        {
            let opened = connect(
                &backend.host,
                backend.port,
                &user,
                &password,
                &config.replication.database,
                Duration::from_secs(5),
            )
            .await;
            conn = opened.ok().map(|c| (side, c));
        }
        let Some((_, client)) = &conn else {
            data.metrics.set_replication_lag(side.as_str(), None);
            watch.set(side, None);
            continue;
        };
        // Blue publishes through the forward slot, green through the reverse one.
        let slot = match side {
            Side::Blue => config.replication.slot().to_owned(),
            Side::Green => ReverseNames::new("").slot,
        };
        let lag = replication_lag(client, &slot).await.ok();
        data.metrics
            .set_replication_lag(side.as_str(), lag.as_ref().map(|l| (l.bytes, l.seconds)));
        watch.set(side, lag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_readings_oldest_first() {
        let watch = LagWatch::default();
        for n in 0..(LAG_HISTORY as u64 + 5) {
            watch.record(LagSample {
                at_unix_ms: n,
                from: Side::Blue,
                bytes: Some(n),
                seconds: None,
            });
        }
        let history = watch.history();
        assert_eq!(history.len(), LAG_HISTORY);
        assert_eq!(history[0].at_unix_ms, 5);
        assert_eq!(history[LAG_HISTORY - 1].bytes, Some(LAG_HISTORY as u64 + 4));
    }
}
