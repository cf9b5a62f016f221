//! What /status and /metrics show: read from the data plane, the cutover
//! controller and the lag watch, never changing them.

use std::sync::Arc;

use super::AdminState;
use crate::config::Side;
use crate::data_plane::DataPlane;
use crate::metrics::Snapshot;
use crate::pool::Pool;

fn all_pools(data: &DataPlane) -> impl Iterator<Item = (Side, Arc<Pool>)> + '_ {
    data.backends
        .iter()
        .flat_map(|b| b.pools().into_iter().map(move |p| (b.side, p)))
}

/// The gauges /metrics computes at scrape time.
pub fn metrics_snapshot(data: &DataPlane) -> Snapshot {
    let mut snapshot = Snapshot {
        clients_total: data.client_count(),
        statements: data.statements.stats(),
        ..Snapshot::default()
    };
    for backend in data.backends.iter() {
        let (mut active, mut idle) = (0, 0);
        for pool in backend.pools() {
            let stats = pool.stats();
            active += stats.active;
            idle += stats.idle;
            snapshot.clients_waiting += stats.waiting;
        }
        snapshot.clients_active += active;
        snapshot.servers.push((backend.side.as_str(), active, idle));
    }
    snapshot
}

/// GET /status.
pub fn status(app: &AdminState) -> serde_json::Value {
    let data = &app.data;
    let pools: Vec<serde_json::Value> = all_pools(data)
        .map(|(side, pool)| {
            serde_json::json!({
                "backend": side.as_str(),
                "database": pool.key.database,
                "user": pool.key.user,
                "stats": pool.stats(),
            })
        })
        .collect();
    let gate = &data.switch.gate;
    serde_json::json!({
        "active": data.switch.active().side.as_str(),
        "paused": gate.is_closed(),
        "paused_by": gate.holders().iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "phase": app.cutover.phase(),
        "unfinished_switch": app.cutover.persisted().intent,
        "unreconciled": app.cutover.unreconciled(),
        "replication_lag": app.lag.get(),
        "clients": data.client_count(),
        "pools": pools,
    })
}
