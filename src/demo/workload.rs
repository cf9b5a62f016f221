//! The demo's built-in workload: readers and writers through pgswitch, and
//! a live line of tps, p99 and errors. Every order a writer was told is
//! committed is remembered, to count the rows lost at the end.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the clients share: counters, this second's latencies, the ids
/// acknowledged.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    transactions: AtomicU64,
    errors: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    acked: Mutex<Vec<i64>>,
    last_error: Mutex<Option<String>>,
}

pub struct Workload {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the workload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Totals {
    pub transactions: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub acked: Vec<i64>,
}

impl Workload {
    /// `clients` sessions through pgswitch at `port`: each in turn reads a
    /// customer's total, or writes an order (one in four).
    pub fn start(port: u16, clients: usize) -> Workload {
        let shared = Arc::new(Shared::default());
        let mut tasks: Vec<_> = (0..clients)
            .map(|n| tokio::spawn(client(Arc::clone(&shared), port, n)))
            .collect();
        tasks.push(tokio::spawn(live_line(Arc::clone(&shared))));
        Workload { shared, tasks }
    }

    pub async fn stop(self) -> Totals {
        self.shared.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let acked = std::mem::take(&mut *lock(&self.shared.acked));
        Totals {
            transactions: self.shared.transactions.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            last_error: lock(&self.shared.last_error).clone(),
            acked,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn client(shared: Arc<Shared>, port: u16, n: usize) {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=shop \
         application_name=pgswitch-demo connect_timeout=10"
    );
    let mut session = None;
    let mut i: u64 = n as u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let client = match &session {
            Some(c) => c,
            None => match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    session.insert(c)
                }
                Err(e) => {
                    failed(&shared, e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        i += 1;
        let customer = (i % 1000 + 1) as i32;
        let started = Instant::now();
        let result = if i.is_multiple_of(4) {
            client
                .query_one(
                    "INSERT INTO orders (customer_id, amount) VALUES ($1, $2::int / 10.0) RETURNING id",
                    &[&customer, &((i % 100) as i32)],
                )
                .await
                .map(|row| row.try_get::<_, i64>(0).ok())
        } else {
            client
                .query_one(
                    "SELECT count(*) FROM orders WHERE customer_id = $1",
                    &[&customer],
                )
                .await
                .map(|_| None)
        };
        match result {
            Ok(id) => {
                if let Some(id) = id {
                    lock(&shared.acked).push(id);
                }
                shared.transactions.fetch_add(1, Ordering::Relaxed);
                lock(&shared.latencies_us).push(started.elapsed().as_micros() as u64);
            }
            Err(e) => {
                failed(&shared, e.to_string());
                if client.is_closed() {
                    session = None;
                }
            }
        }
        // A steady rate, not a flood: the demo shares the machine.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn failed(shared: &Shared, error: String) {
    shared.errors.fetch_add(1, Ordering::Relaxed);
    *lock(&shared.last_error) = Some(error);
}

/// Every second: tps, p99 and errors (one updated line on a terminal,
/// a line every 5 s otherwise).
async fn live_line(shared: Arc<Shared>) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    let mut seconds = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        seconds += 1;
        let total = shared.transactions.load(Ordering::Relaxed);
        let mut latencies = std::mem::take(&mut *lock(&shared.latencies_us));
        latencies.sort_unstable();
        let p99 = latencies
            .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        let line = format!(
            "  workload: {:>6} tps  p99 {:>6.1} ms  errors {}",
            total - last,
            p99 as f64 / 1000.0,
            shared.errors.load(Ordering::Relaxed)
        );
        last = total;
        let mut err = std::io::stderr();
        if tty {
            let _ = write!(err, "\r{line}   ");
        } else if seconds.is_multiple_of(5) {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
}
