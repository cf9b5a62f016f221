//! Soak (issue 14): many clients writing through pgswitch while a cutover
//! or fallback runs every so often; zero failed transactions, every
//! acknowledged write present on both sides, and pgswitch's RSS and open
//! file descriptors flat after warm-up.
//!
//! The suite runs a one-minute version. The long one is
//! `benches/soak.sh` (10 minutes, 1 000 clients, a switch every minute),
//! with these knobs: `SOAK_SECONDS`, `SOAK_CLIENTS`, `SOAK_SWITCH_EVERY`
//! (seconds) and `SOAK_TX_PER_CLIENT_PER_SECOND`. Every second it prints
//! `SOAK t=<s> rss_kib=<n> fds=<n> acked=<n>`, the curve RELIABILITY.md
//! records.
mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS (KiB) and the number of open file descriptors of a process.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kib(pid), fds)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_switches() {
    let seconds = knob("SOAK_SECONDS", 60);
    let clients = knob("SOAK_CLIENTS", 300);
    let switch_every = Duration::from_secs(knob("SOAK_SWITCH_EVERY", 15));
    let rate = knob("SOAK_TX_PER_CLIENT_PER_SECOND", 1).max(1);

    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let pid = proxy.pid().expect("pgswitch runs");

    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicI64::new(1));
    let mut tasks = Vec::new();
    for w in 0..clients {
        let (stop, next_id, port) = (stop.clone(), next_id.clone(), proxy.port);
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={port} user=app password=app dbname=app \
                     connect_timeout=30"
                ),
                tokio_postgres::NoTls,
            )
            .await
            .map_err(|e| format!("client {w} connects: {e}"))?;
            tokio::spawn(conn);
            let insert = client
                .prepare("INSERT INTO acked (id, writer) VALUES ($1, $2)")
                .await
                .map_err(|e| format!("client {w} prepares: {e}"))?;
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut acked, mut errors) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                match client.execute(&insert, &[&id, &(w as i32)]).await {
                    Ok(_) => acked.push(id),
                    Err(e) => errors.push(format!("client {w} insert {id}: {e:?}")),
                }
            }
            Ok::<_, String>((acked, errors))
        }));
    }

    let started = Instant::now();
    let mut last_switch = Instant::now();
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let mut switches = Vec::new();
    let mut active = "blue";
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, fds) = rss_and_fds(pid);
        let t = started.elapsed().as_secs();
        eprintln!(
            "SOAK t={t} rss_kib={rss} fds={fds} acked={}",
            next_id.load(Ordering::Relaxed) - 1
        );
        samples.push((t, rss, fds));
        if last_switch.elapsed() >= switch_every {
            let path = if active == "blue" {
                "/cutover"
            } else {
                "/fallback"
            };
            // A generous timeout: the suite runs beside other tests on 2 cores.
            let (code, report) = switch(&proxy, path, r#"{"timeout_ms": 30000}"#).await;
            assert_eq!(code, 200, "{path} at t={t}: {report}");
            switches.push(report["pause_ms"].as_f64().unwrap_or(f64::NAN));
            active = if active == "blue" { "green" } else { "blue" };
            last_switch = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        let (a, e) = task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        acked.extend(a);
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} failed transactions: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(switches.len() >= 2, "only {} switches", switches.len());

    // Every acknowledged write on both sides.
    let (a, o, slot) = if active == "blue" {
        (&p.b, &p.g, "pgswitch")
    } else {
        (&p.g, &p.b, "pgswitch_reverse")
    };
    catch_up(a, slot, o, slot).await;
    for (name, c) in [("blue", &p.b), ("green", &p.g)] {
        let gone = missing(c, &acked).await;
        assert!(
            gone.is_empty(),
            "{} acknowledged rows missing on {name}",
            gone.len()
        );
    }

    // Flat after warm-up: the last third against the second.
    let n = samples.len();
    let (mid, last) = (&samples[n / 3..2 * n / 3], &samples[2 * n / 3..]);
    let rss_mid = median(mid.iter().map(|s| s.1).collect());
    let rss_last = median(last.iter().map(|s| s.1).collect());
    let fds_mid = median(mid.iter().map(|s| s.2 as u64).collect());
    let fds_last = median(last.iter().map(|s| s.2 as u64).collect());
    eprintln!(
        "SOAK RESULT clients={clients} seconds={seconds} switches={} pause_ms={switches:?} \
         acked={} failed=0 rss_kib mid/last={rss_mid}/{rss_last} fds mid/last={fds_mid}/{fds_last}",
        switches.len(),
        acked.len()
    );
    assert!(
        rss_last <= rss_mid + 16 * 1024,
        "RSS grew from {rss_mid} to {rss_last} KiB"
    );
    assert!(
        fds_last <= fds_mid + 16,
        "open files grew from {fds_mid} to {fds_last}"
    );
}
