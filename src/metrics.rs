//! Prometheus metrics. Counters the data plane bumps are atomics (one add per
//! transaction, not per message); gauges describing pools and clients are
//! read from the live state when scraped.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::statements::RegistryStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    /// "active" (holding a server connection), "waiting" (for one), "idle".
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub backend: &'static str,
    /// "active" (lent to a client) or "idle" (in the pool).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// SQLSTATE class: the first two characters ("08", "28", "53", ...).
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// "cutover" or "fallback".
    pub kind: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// The publisher of the live direction: "blue" (forward) or "green".
    pub from: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// "accepted" (logged in) or "refused".
    pub outcome: &'static str,
    /// Why a connection was refused ("" when accepted).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub transactions: Counter,
    pub queries: Counter,
    pub transaction_seconds: Histogram,
    pub pause_seconds: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    /// `errors` summed over the classes, for `/status` (not exported).
    errors_sum: Counter,
    pub cutovers: Family<OutcomeLabels, Counter>,
    pub cutover_phase_seconds: Family<PhaseLabels, Histogram>,
    /// Absent while no replication is measured.
    pub replication_lag_bytes: Family<DirectionLabels, Gauge>,
    pub replication_lag_seconds: Family<DirectionLabels, Gauge<f64, AtomicU64>>,
    pub connections: Family<ConnectionLabels, Counter>,
    /// Waits for a free server connection (pool slot), when there was one.
    pub server_wait_seconds: Histogram,
    active_backend: Family<BackendLabels, Gauge>,
    clients: Family<ClientLabels, Gauge>,
    server_connections: Family<ServerLabels, Gauge>,
    prepared_statements: Gauge,
    prepared_statement_bytes: Gauge,
    prepared_statements_evicted: Counter,
    prepared_statements_refused: Counter,
    backend_up: Family<BackendLabels, Gauge>,
    fenced: Family<BackendLabels, Gauge>,
    last_switch_timestamp: Family<BackendLabels, Gauge<f64, AtomicU64>>,
    fallback_window_seconds: Gauge<f64, AtomicU64>,
}

/// The live state a scrape reports as gauges.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub clients_total: usize,
    pub clients_active: usize,
    pub clients_waiting: usize,
    /// (backend, active, idle) server connections.
    pub servers: Vec<(&'static str, usize, usize)>,
    /// The prepared-statement registry.
    pub statements: RegistryStats,
    /// (backend, reachable) of the backends whose reachability is known.
    pub backends_up: Vec<(&'static str, bool)>,
    /// (backend, fenced) for each configured backend: whether the state
    /// file records pgswitch's fence on it.
    pub fenced: Vec<(&'static str, bool)>,
    /// The last committed switch, if any: the backend it made active and
    /// its Unix time in milliseconds.
    pub last_switch: Option<(&'static str, u64)>,
    /// `[cutover] fallback_window`.
    pub fallback_window: std::time::Duration,
    /// The active backend, and every configured one.
    pub active: &'static str,
    pub backends: Vec<&'static str>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 100 µs to ~52 s.
    exponential_buckets(0.0001, 2.0, 20)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgswitch");
        let transactions = Counter::default();
        let queries = Counter::default();
        let transaction_seconds = Histogram::new(latency_buckets());
        let pause_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let errors = Family::<ErrorLabels, Counter>::default();
        let cutovers = Family::<OutcomeLabels, Counter>::default();
        let cutover_phase_seconds = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let replication_lag_bytes = Family::<DirectionLabels, Gauge>::default();
        let replication_lag_seconds = Family::<DirectionLabels, Gauge<f64, AtomicU64>>::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        let server_wait_seconds = Histogram::new(latency_buckets());
        let active_backend = Family::<BackendLabels, Gauge>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let clients = Family::<ClientLabels, Gauge>::default();
        let server_connections = Family::<ServerLabels, Gauge>::default();
        let prepared_statements = Gauge::default();
        let prepared_statement_bytes = Gauge::default();
        let prepared_statements_evicted = Counter::default();
        let prepared_statements_refused = Counter::default();
        let backend_up = Family::<BackendLabels, Gauge>::default();
        let fenced = Family::<BackendLabels, Gauge>::default();
        let last_switch_timestamp = Family::<BackendLabels, Gauge<f64, AtomicU64>>::default();
        let fallback_window_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "transactions",
            "Transactions completed (ReadyForQuery idle)",
            transactions.clone(),
        );
        registry.register(
            "queries",
            "Queries sent by clients (Query and Execute messages)",
            queries.clone(),
        );
        registry.register(
            "transaction_duration_seconds",
            "From a transaction's first message to its ReadyForQuery idle",
            transaction_seconds.clone(),
        );
        registry.register(
            "pause_duration_seconds",
            "How long new transactions were held at the gate per pause",
            pause_seconds.clone(),
        );
        registry.register(
            "errors",
            "Errors sent to clients, by SQLSTATE class",
            errors.clone(),
        );
        registry.register(
            "cutovers",
            "Cutovers and fallbacks by kind, from, to and outcome",
            cutovers.clone(),
        );
        registry.register(
            "cutover_phase_duration_seconds",
            "Duration of each cutover phase",
            cutover_phase_seconds.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "WAL bytes of the live direction's publisher its subscriber has not applied yet",
            replication_lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "The live direction's apply lag (the walsender's write_lag estimate)",
            replication_lag_seconds.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted (logged in) and refused, by reason",
            connections.clone(),
        );
        registry.register(
            "server_wait_duration_seconds",
            "How long a transaction waited for a server connection when all were busy",
            server_wait_seconds.clone(),
        );
        registry.register(
            "active_backend",
            "1 for the backend clients are sent to, 0 for the other",
            active_backend.clone(),
        );
        registry.register(
            "build_info",
            "1, labelled with the version of this pgswitch",
            build_info,
        );
        registry.register("clients", "Client connections by state", clients.clone());
        registry.register(
            "server_connections",
            "Server connections by backend and state",
            server_connections.clone(),
        );
        registry.register(
            "prepared_statements",
            "Distinct named statements held for clients (transaction mode)",
            prepared_statements.clone(),
        );
        registry.register(
            "prepared_statement_bytes",
            "Memory the held named statements take: text and bookkeeping",
            prepared_statement_bytes.clone(),
        );
        registry.register(
            "prepared_statements_evicted",
            "Named statements forgotten once no client held them",
            prepared_statements_evicted.clone(),
        );
        registry.register(
            "prepared_statements_refused",
            "Parses refused because prepared_statements_max or _max_bytes was reached",
            prepared_statements_refused.clone(),
        );
        registry.register(
            "backend_up",
            "1 when the backend's last connection or probe reached it, else 0",
            backend_up.clone(),
        );
        registry.register(
            "fenced",
            "1 while the state file records pgswitch's fence on the backend (the old side after a \
             switch, until the next switch or decommission lifts it), else 0",
            fenced.clone(),
        );
        registry.register(
            "last_switch_timestamp_seconds",
            "Unix time of the last committed cutover or fallback, by the backend it made active \
             (absent before the first)",
            last_switch_timestamp.clone(),
        );
        registry.register(
            "fallback_window_seconds",
            "[cutover] fallback_window: how long after a switch decommission refuses",
            fallback_window_seconds.clone(),
        );
        Metrics {
            registry,
            transactions,
            queries,
            transaction_seconds,
            pause_seconds,
            errors,
            errors_sum: Counter::default(),
            cutovers,
            cutover_phase_seconds,
            replication_lag_bytes,
            replication_lag_seconds,
            connections,
            server_wait_seconds,
            active_backend,
            clients,
            server_connections,
            prepared_statements,
            prepared_statement_bytes,
            prepared_statements_evicted,
            prepared_statements_refused,
            backend_up,
            fenced,
            last_switch_timestamp,
            fallback_window_seconds,
        }
    }

    /// The live direction's lag, or none (the series disappear).
    pub fn set_replication_lag(&self, from: &'static str, lag: Option<(u64, Option<f64>)>) {
        self.replication_lag_bytes.clear();
        self.replication_lag_seconds.clear();
        let Some((bytes, seconds)) = lag else { return };
        let labels = DirectionLabels { from };
        self.replication_lag_bytes
            .get_or_create(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if let Some(seconds) = seconds {
            self.replication_lag_seconds
                .get_or_create(&labels)
                .set(seconds);
        }
    }

    pub fn count_connection(&self, outcome: &'static str, reason: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { outcome, reason })
            .inc();
    }

    pub fn count_error(&self, class: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                class: class.to_owned(),
            })
            .inc();
        self.errors_sum.inc();
    }

    /// Errors sent to clients, all classes together.
    pub fn errors_total(&self) -> u64 {
        self.errors_sum.get()
    }

    /// The text exposition, with gauges set from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let idle = snapshot
            .clients_total
            .saturating_sub(snapshot.clients_active + snapshot.clients_waiting);
        for (state, value) in [
            ("active", snapshot.clients_active),
            ("waiting", snapshot.clients_waiting),
            ("idle", idle),
        ] {
            self.clients
                .get_or_create(&ClientLabels { state })
                .set(value as i64);
        }
        for &(backend, active, idle) in &snapshot.servers {
            for (state, value) in [("active", active), ("idle", idle)] {
                self.server_connections
                    .get_or_create(&ServerLabels { backend, state })
                    .set(value as i64);
            }
        }
        let stats = &snapshot.statements;
        self.prepared_statements.set(stats.entries as i64);
        self.prepared_statement_bytes.set(stats.bytes as i64);
        // The registry counts; the counters catch up to it.
        for (counter, total) in [
            (&self.prepared_statements_evicted, stats.evicted),
            (&self.prepared_statements_refused, stats.refused),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        for &(backend, up) in &snapshot.backends_up {
            self.backend_up
                .get_or_create(&BackendLabels { backend })
                .set(i64::from(up));
        }
        for &(backend, fenced) in &snapshot.fenced {
            self.fenced
                .get_or_create(&BackendLabels { backend })
                .set(i64::from(fenced));
        }
        // One series at most: the switch that made the current side active.
        self.last_switch_timestamp.clear();
        if let Some((backend, ms)) = snapshot.last_switch {
            self.last_switch_timestamp
                .get_or_create(&BackendLabels { backend })
                .set(ms as f64 / 1000.0);
        }
        self.fallback_window_seconds
            .set(snapshot.fallback_window.as_secs_f64());
        for &backend in &snapshot.backends {
            self.active_backend
                .get_or_create(&BackendLabels { backend })
                .set(i64::from(backend == snapshot.active));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.transactions.inc();
        m.count_error("28");
        let text = m.render(&Snapshot {
            clients_total: 5,
            clients_active: 2,
            clients_waiting: 1,
            servers: vec![("blue", 2, 3)],
            statements: RegistryStats {
                entries: 4,
                bytes: 1000,
                evicted: 7,
                refused: 1,
            },
            backends_up: vec![("blue", true), ("green", false)],
            fenced: vec![("blue", true), ("green", false)],
            last_switch: Some(("green", 1_700_000_000_500)),
            fallback_window: std::time::Duration::from_secs(86400),
            active: "green",
            backends: vec!["blue", "green"],
        });
        assert!(text.contains("pgswitch_transactions_total 1"), "{text}");
        assert!(
            text.contains("pgswitch_errors_total{class=\"28\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pgswitch_clients{state=\"idle\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pgswitch_server_connections{backend=\"blue\",state=\"idle\"} 3"),
            "{text}"
        );
        for line in [
            "pgswitch_prepared_statements 4",
            "pgswitch_prepared_statement_bytes 1000",
            "pgswitch_prepared_statements_evicted_total 7",
            "pgswitch_prepared_statements_refused_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
        assert!(
            text.contains("pgswitch_backend_up{backend=\"green\"} 0"),
            "{text}"
        );
        for line in [
            "pgswitch_fenced{backend=\"blue\"} 1",
            "pgswitch_fenced{backend=\"green\"} 0",
            "pgswitch_last_switch_timestamp_seconds{backend=\"green\"} 1700000000.5",
            "pgswitch_fallback_window_seconds 86400.0",
            "pgswitch_active_backend{backend=\"green\"} 1",
            "pgswitch_active_backend{backend=\"blue\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
        assert!(
            text.contains(&format!(
                "pgswitch_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn replication_lag_is_absent_without_replication() {
        let m = Metrics::new();
        let render = |m: &Metrics| m.render(&Snapshot::default());
        let sample = |text: &str, name: &str| text.lines().any(|l| l.starts_with(name));
        let text = render(&m);
        assert!(!sample(&text, "pgswitch_replication_lag_bytes{"), "{text}");
        m.set_replication_lag("blue", Some((42, Some(0.5))));
        let text = render(&m);
        assert!(
            text.contains("pgswitch_replication_lag_bytes{from=\"blue\"} 42")
                && text.contains("pgswitch_replication_lag_seconds{from=\"blue\"} 0.5"),
            "{text}"
        );
        m.set_replication_lag("blue", None);
        let text = render(&m);
        assert!(!sample(&text, "pgswitch_replication_lag_bytes{"), "{text}");
        assert!(
            !sample(&text, "pgswitch_replication_lag_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn last_switch_is_absent_before_the_first_switch() {
        let m = Metrics::new();
        let text = m.render(&Snapshot::default());
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("pgswitch_last_switch_timestamp_seconds")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "pgswitch_fallback_window_seconds 0.0"),
            "{text}"
        );
    }
}
