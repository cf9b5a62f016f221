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
    pub outcome: &'static str,
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
    pub replication_lag_bytes: Gauge,
    clients: Family<ClientLabels, Gauge>,
    server_connections: Family<ServerLabels, Gauge>,
    prepared_statements: Gauge,
    prepared_statement_bytes: Gauge,
    prepared_statements_evicted: Counter,
    prepared_statements_refused: Counter,
    backend_up: Family<BackendLabels, Gauge>,
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
        let replication_lag_bytes = Gauge::default();
        let clients = Family::<ClientLabels, Gauge>::default();
        let server_connections = Family::<ServerLabels, Gauge>::default();
        let prepared_statements = Gauge::default();
        let prepared_statement_bytes = Gauge::default();
        let prepared_statements_evicted = Counter::default();
        let prepared_statements_refused = Counter::default();
        let backend_up = Family::<BackendLabels, Gauge>::default();
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
            "Cutovers and fallbacks by outcome",
            cutovers.clone(),
        );
        registry.register(
            "cutover_phase_duration_seconds",
            "Duration of each cutover phase",
            cutover_phase_seconds.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "WAL bytes the target of a cutover has not yet applied",
            replication_lag_bytes.clone(),
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
            clients,
            server_connections,
            prepared_statements,
            prepared_statement_bytes,
            prepared_statements_evicted,
            prepared_statements_refused,
            backend_up,
        }
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
    }
}
