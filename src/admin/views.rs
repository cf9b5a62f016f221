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
pub fn metrics_snapshot(app: &AdminState) -> Snapshot {
    let data = &app.data;
    let state = app.cutover.persisted();
    let mut snapshot = Snapshot {
        clients_total: data.client_count(),
        statements: data.statements.stats(),
        last_switch: state.switched_at_ms.map(|ms| (state.active.as_str(), ms)),
        fallback_window: data.config().cutover.fallback_window,
        active: data.switch.active().side.as_str(),
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
        let side = backend.side.as_str();
        snapshot.backends.push(side);
        snapshot
            .fenced
            .push((side, state.fences.contains_key(side)));
        if let Some(up) = backend.addr.reachability.reachable() {
            snapshot.backends_up.push((backend.side.as_str(), up));
        }
    }
    snapshot
}

/// Each backend's reachability, for /status: whether the last connection
/// (or probe) reached it, when and how that was, and the last error.
pub fn backends(data: &DataPlane) -> serde_json::Value {
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_millis() as u64);
    let backends: serde_json::Map<String, serde_json::Value> = data
        .backends
        .iter()
        .map(|b| {
            let r = b.addr.reachability.report();
            let view = serde_json::json!({
                "addr": b.addr.to_string(),
                "reachable": r.reachable,
                "checked_by": r.checked_by,
                "checked_ms_ago": ms(r.checked_ago),
                "checked_at_unix_ms": r.checked_at_unix_ms,
                "last_error": r.last_error,
                "last_error_ms_ago": ms(r.last_error_ago),
            });
            (b.side.as_str().to_owned(), view)
        })
        .collect();
    serde_json::Value::Object(backends)
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
    let state = app.cutover.persisted();
    serde_json::json!({
        "active": data.switch.active().side.as_str(),
        "paused": gate.is_closed(),
        "paused_by": gate.holders().iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "phase": app.cutover.phase(),
        "unfinished_switch": state.intent,
        "last_switch_at_ms": state.switched_at_ms,
        "decommissioned_at_ms": state.decommissioned_at_ms,
        "unreconciled": app.cutover.unreconciled(),
        "replication_lag": app.lag.get(),
        "backends": backends(data),
        "clients": data.client_count(),
        "pools": pools,
        // Totals since start; the dashboard derives rates per second.
        "counters": {
            "transactions": data.metrics.transactions.get(),
            "queries": data.metrics.queries.get(),
            "errors": data.metrics.errors_total(),
        },
    })
}
