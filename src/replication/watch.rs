//! The replication lag a cutover (or fallback) would wait for, read once a
//! second while the active side has admin credentials, for /status and the
//! `pgswitch_replication_lag_bytes` gauge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{connect, replication_lag, Lag, ReverseNames};
use crate::config::Side;
use crate::data_plane::DataPlane;

/// The latest reading, if any.
#[derive(Default)]
pub struct LagWatch(Mutex<Option<Lag>>);

impl LagWatch {
    pub fn get(&self) -> Option<Lag> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, lag: Option<Lag>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = lag;
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
            watch.set(None);
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
        watch.set(lag);
    }
}
