//! Cutover and fallback (issue 9) end to end: blue PostgreSQL 15 and green
//! PostgreSQL 17 (15 when 17 is missing) kept in sync by logical
//! replication that the tests set up, a real pgswitch in front, concurrent
//! tokio-postgres clients writing through it while `/cutover` and
//! `/fallback` run. Both servers run with `synchronous_commit = off` (the
//! harness default), where a catch-up target taken without a flush loses
//! acknowledged rows.
//!
//! Each switch's report (pause_ms and phase timings) is printed: run with
//! `cargo test --test cutover -- --nocapture` to see them.
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgswitch::replication as repl;
use support::*;
use tokio_postgres::Client;

const WRITERS: usize = 8;

// -------------------------------------------------------------------- load

/// One acknowledged insert: id, when the commit was acknowledged, and the
/// port of the server that wrote it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    at: Instant,
    port: i32,
    /// How long the insert took.
    took: Duration,
}

#[derive(Default)]
struct Outcome {
    acked: Vec<Ack>,
    serial_acked: Vec<(i32, i32)>,
    errors: Vec<String>,
    /// The longest a writer waited for an acknowledgement.
    stall: Duration,
}

/// `WRITERS` clients through pgswitch, each inserting rows with ids it
/// chooses (`round * 10^12 + writer * 10^9 + n`) through statements it
/// prepared once, and now and then a row with an identity id.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

impl Load {
    async fn start(proxy: &Proxy, round: i64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS as i64 {
            let client = connect(proxy, "app").await.expect("writer connects");
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Outcome::default();
                let insert = client
                    .prepare("INSERT INTO acked (id, writer) VALUES ($1, $2) RETURNING port")
                    .await
                    .unwrap();
                let serial = client
                    .prepare("INSERT INTO serial_items (note) VALUES ($1) RETURNING id, port")
                    .await
                    .unwrap();
                let mut n = 0i64;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    out.stall = out.stall.max(last.elapsed());
                    last = Instant::now();
                    let id = round * 1_000_000_000_000 + w * 1_000_000_000 + n;
                    let started = Instant::now();
                    match client.query_one(&insert, &[&id, &(w as i32)]).await {
                        Ok(row) => out.acked.push(Ack {
                            id,
                            at: Instant::now(),
                            port: row.get(0),
                            took: started.elapsed(),
                        }),
                        Err(e) => {
                            out.errors.push(format!("writer {w} insert {id}: {e:?}"));
                            if client.is_closed() {
                                break;
                            }
                        }
                    }
                    if n % 10 == 0 {
                        match client.query_one(&serial, &[&format!("w{w}")]).await {
                            Ok(row) => out.serial_acked.push((row.get(0), row.get(1))),
                            Err(e) => {
                                out.errors.push(format!("writer {w} serial insert: {e:?}"));
                                if client.is_closed() {
                                    break;
                                }
                            }
                        }
                    }
                }
                out
            }));
        }
        Load { stop, tasks }
    }

    async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Outcome::default();
        for t in self.tasks {
            let o = t.await.unwrap();
            all.acked.extend(o.acked);
            all.serial_acked.extend(o.serial_acked);
            all.errors.extend(o.errors);
            all.stall = all.stall.max(o.stall);
        }
        all
    }
}

/// Runs one switch under load and checks what must hold right after it:
/// HTTP 200 "switched" with pause_ms; zero client errors; every
/// acknowledged row on the new side; writes before the request on the old
/// side and after the answer on the new one; no application row written
/// on the old side after the switch. Returns the acknowledged rows.
async fn switch_under_load(
    p: &Pair,
    proxy: &Proxy,
    path: &str,
    round: i64,
    from: (&PgServer, &Client),
    to: (&PgServer, &Client),
) -> Outcome {
    let load = Load::start(proxy, round).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sent = Instant::now();
    let (code, report) = switch(proxy, path, "").await;
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = load.finish().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["outcome"], "switched", "{report}");
    assert!(report["pause_ms"].as_f64().is_some(), "{report}");
    assert!(
        out.errors.is_empty(),
        "{} client errors, first: {:?}",
        out.errors.len(),
        &out.errors[..out.errors.len().min(5)]
    );
    // The client-visible stall: the largest latency among inserts that
    // overlapped the pause (which ended just before the answer).
    let pause = Duration::from_secs_f64(report["pause_ms"].as_f64().unwrap_or(0.0) / 1000.0);
    let paused_from = answered - pause - Duration::from_millis(1);
    let overlapping: Vec<&Ack> = out
        .acked
        .iter()
        .filter(|a| a.at > paused_from && a.at - a.took < answered)
        .collect();
    let stall = overlapping.iter().map(|a| a.took).max().unwrap_or_default();
    let over_100ms = out
        .acked
        .iter()
        .filter(|a| a.took > Duration::from_millis(100))
        .count();
    eprintln!(
        "{path}: pause_ms={:.1}; client-visible stall {stall:?} ({} inserts overlapped the \
         pause); slowest insert of the run {:?}; {over_100ms} inserts over 100 ms",
        pause.as_secs_f64() * 1000.0,
        overlapping.len(),
        out.stall
    );
    let before = out.acked.iter().filter(|a| a.at < sent).count();
    let after = out.acked.iter().filter(|a| a.at > answered).count();
    eprintln!(
        "{path}: {} rows acknowledged ({before} before the request, {after} after the answer), \
         {} identity rows",
        out.acked.len(),
        out.serial_acked.len()
    );
    assert!(before > 0 && after > 0, "the load ran on both sides");
    for a in &out.acked {
        if a.at < sent {
            assert_eq!(a.port, from.0.port as i32, "{a:?} before the switch");
        }
        if a.at > answered {
            assert_eq!(a.port, to.0.port as i32, "{a:?} after the switch");
        }
    }
    // Every acknowledged row is on the new side, at once.
    let all: Vec<i64> = out.acked.iter().map(|a| a.id).collect();
    let lost = missing(to.1, &all).await;
    assert!(
        lost.is_empty(),
        "{} acknowledged rows missing on the new side: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // No application row lands on the old side after the switch: the rows
    // written there (port = old) are exactly those acknowledged from there.
    let written_old: BTreeSet<i64> = out
        .acked
        .iter()
        .filter(|a| a.port == from.0.port as i32)
        .map(|a| a.id)
        .collect();
    let on_old = ids(
        from.1,
        &format!(
            "SELECT id FROM acked WHERE port = {} AND id / 1000000000000 = {round}",
            from.0.port
        ),
    )
    .await;
    assert_eq!(on_old, written_old, "rows written on the old side");
    // A write sent straight to the old side, bypassing pgswitch, fails.
    let direct = from.0.connect("app", "app", "app").await;
    let err = direct
        .execute("INSERT INTO acked (id, writer) VALUES (-1, -1)", &[])
        .await
        .expect_err("the old side is fenced");
    assert_eq!(err.code().map(|c| c.code()), Some("25006"), "{err}");
    // The next identity insert on the new side doesn't collide.
    let c = connect(proxy, "app").await.unwrap();
    let row = c
        .query_one(
            "INSERT INTO serial_items (note) VALUES ('after') RETURNING id, port",
            &[],
        )
        .await
        .expect("identity insert after the switch");
    let (id, port): (i32, i32) = (row.get(0), row.get(1));
    assert_eq!(port, to.0.port as i32);
    let max_before = out.serial_acked.iter().map(|s| s.0).max().unwrap_or(0);
    assert!(id > max_before, "id {id} after {max_before}");
    let _ = p;
    out
}

/// Waits until both sides hold the same rows (the other direction of
/// replication has caught up) and returns blue's contents.
async fn wait_same(p: &Pair) -> (Vec<(i64, i32)>, Vec<(i32, i32)>) {
    let t = Instant::now();
    loop {
        let (b, g) = tokio::join!(contents(&p.b), contents(&p.g));
        if b == g {
            return b;
        }
        assert!(
            t.elapsed() < WAIT,
            "blue and green differ: blue {} + {} rows, green {} + {} rows",
            b.0.len(),
            b.1.len(),
            g.0.len(),
            g.1.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------- tests

/// Cutover under load, then fallback under load: no client error, no lost
/// acknowledged row, writes follow the switch, the other direction carries
/// every later write back, identities don't collide, prepared statements
/// keep working (the writers prepared once, before the switch).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_and_fallback_under_load() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let c = connect(&proxy, "app").await.unwrap();
    for _ in 0..5 {
        c.execute("INSERT INTO serial_items (note) VALUES ('seed')", &[])
            .await
            .unwrap();
    }
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;

    let out1 =
        switch_under_load(&p, &proxy, "/cutover", 1, (&p.blue, &p.b), (&p.green, &p.g)).await;
    assert_eq!(status(&proxy).await["active"], "green");
    // Reverse replication brings every write on green to blue, once.
    let (rows, serial) = wait_same(&p).await;
    let acked1: BTreeSet<i64> = out1.acked.iter().map(|a| a.id).collect();
    let round1: BTreeSet<i64> = rows
        .iter()
        .map(|r| r.0)
        .filter(|id| id / 1_000_000_000_000 == 1)
        .collect();
    assert_eq!(
        round1, acked1,
        "exactly the acknowledged rows, on both sides"
    );
    assert!(serial.iter().any(|s| s.1 == p.green.port as i32));

    let out2 = switch_under_load(
        &p,
        &proxy,
        "/fallback",
        2,
        (&p.green, &p.g),
        (&p.blue, &p.b),
    )
    .await;
    assert_eq!(status(&proxy).await["active"], "blue");
    // The forward direction carries the writes after the fallback to green;
    // nothing green sent to blue comes back (no duplicate key on green).
    let (rows, _) = wait_same(&p).await;
    let acked: BTreeSet<i64> = out1
        .acked
        .iter()
        .chain(out2.acked.iter())
        .map(|a| a.id)
        .collect();
    let app_rows: BTreeSet<i64> = rows.iter().map(|r| r.0).filter(|id| *id > 0).collect();
    assert_eq!(app_rows, acked, "every acknowledged row, on both sides");
    for pg in [&p.blue, &p.green] {
        assert!(
            !pg.log().contains("duplicate key"),
            "port {}: {}",
            pg.port,
            pg.log()
        );
    }
    let (code, body) = admin_http(proxy.admin_port, "GET", "/cutovers", Some(TOKEN), "").await;
    assert_eq!(code, 200);
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history.as_array().map(|h| h.len()), Some(2), "{history}");
}

/// A disabled subscription: the cutover is refused (not streaming) or
/// aborts within its timeout; traffic continues on blue without an error.
/// A transaction held past drain_timeout: aborted with 409, and the held
/// transaction still commits on blue. With drain_action = "cancel" the
/// cutover completes and the held query gets 57014.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutover_abort_paths() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "drain_timeout = \"300ms\"", ""));

    // 1. Disabled subscription.
    p.g.batch_execute("ALTER SUBSCRIPTION pgswitch DISABLE")
        .await
        .unwrap();
    let load = Load::start(&proxy, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let (code, report) = switch(&proxy, "/cutover", r#"{"timeout_ms": 1500}"#).await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = load.finish().await;
    assert_eq!(code, 409, "{report}");
    assert!(
        report["outcome"] == "refused" || report["outcome"] == "aborted",
        "{report}"
    );
    // Within the timeout asked for, plus the rollback (debug builds on a
    // busy machine log in slowly).
    assert!(took < Duration::from_millis(1500 + 2500), "{took:?}");
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.acked.iter().all(|a| a.port == p.blue.port as i32));
    assert!(out.acked.iter().any(|a| a.at > answered));
    assert_eq!(status(&proxy).await["active"], "blue");
    p.g.batch_execute("ALTER SUBSCRIPTION pgswitch ENABLE")
        .await
        .unwrap();
    wait_streaming(&p.g, "pgswitch").await;
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;

    // 2. A transaction held open past drain_timeout: aborted.
    let load = Load::start(&proxy, 2).await;
    let mut held = connect(&proxy, "app").await.unwrap();
    let tx = held.transaction().await.unwrap();
    tx.execute("INSERT INTO acked (id, writer) VALUES (-2, -2)", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let (code, report) = switch(&proxy, "/cutover", "").await;
    let took = t.elapsed();
    assert_eq!(code, 409, "{report}");
    assert_eq!(report["outcome"], "aborted", "{report}");
    assert!(
        report["reason"].as_str().unwrap_or("").contains("drain"),
        "{report}"
    );
    assert!(report["pause_ms"].as_f64().is_some(), "{report}");
    let drain_ms = report["phases"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "drain"))
        .and_then(|p| p["ms"].as_f64())
        .unwrap_or_else(|| panic!("no drain phase: {report}"));
    assert!((300.0..1000.0).contains(&drain_ms), "{report}");
    // Within the cutover's timeout (5 s), plus the rollback.
    assert!(took < Duration::from_secs(7), "{took:?}");
    tx.commit().await.expect("the held transaction commits");
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = load.finish().await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.acked.iter().all(|a| a.port == p.blue.port as i32));
    assert!(out.acked.iter().any(|a| a.at > answered));
    let row =
        p.b.query_one("SELECT port FROM acked WHERE id = -2", &[])
            .await
            .unwrap();
    assert_eq!(row.get::<_, i32>(0), p.blue.port as i32);
    assert_eq!(status(&proxy).await["active"], "blue");
    // Nothing left behind: what prepare created is dropped again.
    assert_eq!(p.reverse_objects().await, 0, "{report}");
    // Nothing was left fenced: a direct write on blue works.
    let direct = p.blue.connect("app", "app", "app").await;
    direct
        .execute("INSERT INTO acked (id, writer) VALUES (-3, -3)", &[])
        .await
        .unwrap();
    drop(held);
    drop(proxy);

    // 3. drain_action = "cancel": the held query is cancelled (57014) and
    // the cutover completes.
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;
    let proxy = Proxy::start(&proxy_config(
        &p,
        "drain_timeout = \"300ms\"\ndrain_action = \"cancel\"",
        "",
    ));
    let load = Load::start(&proxy, 3).await;
    let mut held = connect(&proxy, "app").await.unwrap();
    let sleeper = tokio::spawn(async move {
        let tx = held.transaction().await.unwrap();
        let result = tx.batch_execute("SELECT pg_sleep(30)").await;
        // Dropping the transaction rolls it back, as a client does on error.
        drop(tx);
        (result, held)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, report) = switch(&proxy, "/cutover", "").await;
    let (result, held) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("the held query ended")
        .unwrap();
    let out = load.finish().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["outcome"], "switched", "{report}");
    let err = result.expect_err("the held query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(server_port(&held).await, p.green.port as i32);
    let all: Vec<i64> = out.acked.iter().map(|a| a.id).collect();
    assert!(missing(&p.g, &all).await.is_empty());
}

/// With state_file set, a restart after a cutover comes back on green
/// although proxy.toml says active = "blue".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_cutover_stays_on_green() {
    let p = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut proxy = Proxy::start(&proxy_config(
        &p,
        &format!("state_file = \"{}\"", state.display()),
        "",
    ));
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, p.blue.port as i32);
    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(server_port(&c).await, p.green.port as i32);
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["active"], "green", "{saved}");

    proxy.restart();
    assert_eq!(status(&proxy).await["active"], "green");
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, p.green.port as i32);
    c.execute("INSERT INTO acked (id, writer) VALUES (1, 0)", &[])
        .await
        .unwrap();
    // The fallback after the restart still knows blue's fence and lifts it.
    catch_up(&p.g, "pgswitch_reverse", &p.b, "pgswitch_reverse").await;
    let (code, report) = switch(&proxy, "/fallback", "").await;
    assert_eq!(code, 200, "{report}");
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, p.blue.port as i32);
    c.execute("INSERT INTO acked (id, writer) VALUES (2, 0)", &[])
        .await
        .unwrap();
}

/// Every admin endpoint but /health needs the token; /cutover and /fallback
/// without it do nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_without_the_token_get_401() {
    let pg = PgServer::start(PgOptions::default());
    pg.create_user("app", "app");
    pg.create_db("app", None);
    let proxy = ProxyConfig::new(pg.port)
        .backend_set("admin_user", "postgres")
        .backend_set("admin_password", "postgres")
        .backend("green", pg.port)
        .backend_set("admin_user", "postgres")
        .backend_set("admin_password", "postgres")
        .admin(free_port(), &format!("token = \"{TOKEN}\""))
        .user("app", "app")
        .start();
    assert_eq!(
        admin_http(proxy.admin_port, "GET", "/health", None, "")
            .await
            .0,
        200
    );
    for (method, path, body) in [
        ("POST", "/cutover", ""),
        ("POST", "/cutover", r#"{"dry_run": true}"#),
        ("POST", "/fallback", ""),
        ("GET", "/status", ""),
        ("GET", "/cutovers", ""),
        ("GET", "/metrics", ""),
        ("POST", "/pause", ""),
        ("POST", "/resume", ""),
    ] {
        for token in [None, Some("wrong"), Some("")] {
            let (code, text) = admin_http(proxy.admin_port, method, path, token, body).await;
            assert_eq!(code, 401, "{method} {path} with {token:?}: {text}");
        }
    }
    let (code, body) = admin_http(proxy.admin_port, "GET", "/cutovers", Some(TOKEN), "").await;
    assert_eq!(code, 200);
    assert_eq!(body.trim(), "[]", "no switch ran");
    let s = status(&proxy).await;
    assert_eq!(s["active"], "blue");
    assert_eq!(s["paused"], false);
}

/// dry_run: preflight, pause, drain and catch-up, then resume on blue:
/// HTTP 200 "dry_run" with the pause it would have taken; traffic stays on
/// blue without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_keeps_traffic_on_blue() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let load = Load::start(&proxy, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, report) = switch(&proxy, "/cutover", r#"{"dry_run": true}"#).await;
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = load.finish().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["outcome"], "dry_run", "{report}");
    assert!(report["pause_ms"].as_f64().is_some(), "{report}");
    assert!(report["target_lsn"].is_string(), "{report}");
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.acked.iter().all(|a| a.port == p.blue.port as i32));
    assert!(out.acked.iter().any(|a| a.at > answered));
    assert_eq!(status(&proxy).await["active"], "blue");
    // /status reports the lag of the replication a cutover would wait for
    // (refreshed once a second, so wait for the first reading).
    let lag = wait_for(Duration::from_secs(10), || async {
        let lag = status(&proxy).await["replication_lag"].clone();
        (!lag.is_null()).then_some(lag)
    })
    .await
    .unwrap_or(serde_json::Value::Null);
    assert!(lag["bytes"].as_u64().is_some(), "{lag}");
    assert_eq!(lag["streaming"], true, "{lag}");
    let metrics = admin_http(proxy.admin_port, "GET", "/metrics", Some(TOKEN), "")
        .await
        .1;
    for line in [
        "pgswitch_replication_lag_bytes{from=\"blue\"} ",
        "pgswitch_cutovers_total{kind=\"cutover\",from=\"blue\",to=\"green\",outcome=\"dry_run\"} 1",
        "pgswitch_active_backend{backend=\"blue\"} 1",
        "pgswitch_active_backend{backend=\"green\"} 0",
        "pgswitch_connections_total{outcome=\"accepted\",reason=\"\"} ",
        "pgswitch_build_info{version=",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    // Nothing changed: forward replication still runs, blue isn't fenced,
    // no reverse subscription was created.
    let st = repl::subscription_status(&p.g, "pgswitch").await.unwrap();
    assert!(st.enabled && st.streaming, "{st:?}");
    let direct = p.blue.connect("app", "app", "app").await;
    direct
        .execute("INSERT INTO acked (id, writer) VALUES (-1, -1)", &[])
        .await
        .unwrap();
    let rev = repl::subscription_status(&p.b, "pgswitch_reverse")
        .await
        .unwrap();
    assert!(!rev.enabled, "{rev:?}");
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;
    let all: Vec<i64> = out.acked.iter().map(|a| a.id).collect();
    assert!(missing(&p.g, &all).await.is_empty());
}

/// Session mode: an idle session during a cutover ends with FATAL 57P01 (its
/// session state can't follow it to green); a new session runs on green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_client_is_ended_and_reconnects_to_green() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", SESSION_USER));
    let (sess, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=sess password=sess dbname=app",
            proxy.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    sess.batch_execute("SET application_name = 'session-state'")
        .await
        .unwrap();
    assert_eq!(server_port(&sess).await, p.blue.port as i32);
    let tx = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&tx).await, p.blue.port as i32);

    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["outcome"], "switched", "{report}");

    match sess.query_one("SELECT inet_server_port()", &[]).await {
        Ok(row) => panic!(
            "the session went on silently (port {})",
            row.get::<_, i32>(0)
        ),
        Err(e) => {
            // Either the FATAL itself, or the closed connection after it.
            if let Some(code) = e.code() {
                assert_eq!(code.code(), "57P01", "{e}");
            } else {
                assert!(sess.is_closed(), "{e}");
            }
        }
    }
    // The connection ended with the FATAL (an unsolicited error ends
    // tokio-postgres' connection task with it).
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the session's connection ended")
        .unwrap();
    let err = ended.expect_err("the session ended with an error");
    eprintln!("session-mode client got: {err:?}");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err:?}");
    let sess = connect(&proxy, "sess").await.unwrap();
    assert_eq!(server_port(&sess).await, p.green.port as i32);
    sess.execute("INSERT INTO acked (id, writer) VALUES (7, 7)", &[])
        .await
        .unwrap();
    // The transaction-mode client just goes on, on green.
    assert_eq!(server_port(&tx).await, p.green.port as i32);
}

/// The gate has one owner per hold: a cutover during an operator's /pause
/// switches, and new transactions stay held until the operator's /resume,
/// whose pause time runs from the operator's own /pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_during_an_operator_pause_keeps_the_pause() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let client = connect(&proxy, "app").await.expect("connect");
    assert_eq!(server_port(&client).await, p.blue.port as i32);
    let (code, _) = switch(&proxy, "/pause", "").await;
    assert_eq!(code, 200);
    let paused = Instant::now();
    assert_eq!(
        status(&proxy).await["paused_by"],
        serde_json::json!(["operator"])
    );
    let held = tokio::spawn(async move {
        let port = server_port(&client).await;
        (port, Instant::now())
    });
    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["outcome"], "switched", "{report}");
    assert_eq!(report["still_paused_by_operator"], true, "{report}");
    let st = status(&proxy).await;
    assert_eq!(st["active"], "green", "{st}");
    assert_eq!(st["paused"], true, "{st}");
    assert_eq!(st["paused_by"], serde_json::json!(["operator"]), "{st}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "the cutover released the operator's pause"
    );
    let (code, _) = switch(&proxy, "/resume", "").await;
    assert_eq!(code, 200);
    let resumed = Instant::now();
    let (port, ran) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("held transaction never ran")
        .expect("held task");
    assert_eq!(
        port, p.green.port as i32,
        "held transaction ran on the old side"
    );
    assert!(ran >= resumed, "it ran before /resume");
    assert_eq!(status(&proxy).await["paused_by"], serde_json::json!([]));
    // The pause histogram holds the operator's whole pause (and the
    // cutover's own, shorter one).
    let metrics = admin_http(proxy.admin_port, "GET", "/metrics", Some(TOKEN), "")
        .await
        .1;
    let sum: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgswitch_pause_duration_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pause histogram\n{metrics}"));
    let operator_pause = (resumed - paused).as_secs_f64();
    assert!(
        sum >= operator_pause * 0.9,
        "pause sum {sum} < operator's pause {operator_pause}"
    );
}

/// At `RUST_LOG=trace` a cutover and a fallback log no password, though the
/// cutover creates the reverse subscription (on blue) with a conninfo that
/// holds green's admin password, and tokio-postgres logs every statement at
/// debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_in_the_log_at_trace_level() {
    // Quoted in the conninfo (a space and a quote), doubled in the SQL literal.
    const SECRET: &str = "Gr33n-S3cret";
    let password = format!("{SECRET} and 'quotes'");
    let p = pair().await;
    p.green.psql(&format!(
        "CREATE ROLE switcher SUPERUSER LOGIN PASSWORD {}",
        quote_literal(&password)
    ));
    let cfg = ProxyConfig::new(p.blue.port)
        .pool_mode("transaction")
        .backend_set("server_tls", "disable")
        .backend_set("admin_user", SUPERUSER)
        .backend_set("admin_password", SUPERUSER_PASSWORD)
        .backend("green", p.green.port)
        .backend_set("server_tls", "disable")
        .backend_set("admin_user", "switcher")
        .backend_set("admin_password", &password)
        .table("[replication]\ndatabase = \"app\"")
        .table(&format!(
            "[cutover]\nactive = \"blue\"\nstate_file = \"{}\"",
            p.state_file().display()
        ))
        .admin(free_port(), &format!("token = \"{TOKEN}\""))
        .user("app", "app");
    let proxy = Proxy::start_with_env(&cfg.toml(), &[("RUST_LOG", "trace")]);
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, p.blue.port as i32);
    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(server_port(&c).await, p.green.port as i32);
    catch_up(&p.g, "pgswitch_reverse", &p.b, "pgswitch_reverse").await;
    let (code, report) = switch(&proxy, "/fallback", "").await;
    assert_eq!(code, 200, "{report}");
    // A debug line, to show the level is in force: an admin connection
    // that ends in an error (here: not HTTP).
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.admin_port))
            .await
            .unwrap();
        s.write_all(b"not http\r\n\r\n").await.unwrap();
    }
    assert!(
        proxy.wait_for_log("admin connection ended", WAIT),
        "no debug line in the log"
    );
    let logs = proxy.logs();
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(SECRET)).collect();
    assert!(
        leaks.is_empty(),
        "green's admin password is in the log:\n{}",
        leaks.join("\n")
    );
}
