//! Crash consistency of cutovers and fallbacks (issue 14): pgswitch killed
//! (SIGKILL) at every point of a switch, and the target server stopped
//! immediately (a crash) at every phase, each followed by a restart and a
//! check of the fences, the replication directions, the active side and
//! every acknowledged write. Also: nothing is left behind by aborts, a
//! fallback right after a cutover, and the idle direction's slot.
//!
//! The switch is held at a point with pgswitch's test hook
//! (`PGSWITCH_TEST_STALL_AT`, see `src/cutover/fault.rs`); the servers run
//! with `synchronous_commit = off`, fsync off (a process crash, not an OS
//! crash, loses only what was not written).
mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgswitch::replication as repl;
use support::*;
use tokio_postgres::Client;

const FORWARD: &str = "pgswitch";
const REVERSE: &str = "pgswitch_reverse";

/// Points of a cutover in order (`checks`, the preflight's, comes before the
/// intent); the commit point lies between `persist`
/// and `switched`. `unfence` is there because green carries the fence of
/// an earlier fallback.
const CUTOVER_POINTS: &[&str] = &[
    "checks",
    "intent",
    "prepare",
    "unfence",
    "warm",
    "plan_fence",
    "stage_state",
    "drain",
    "catch_up",
    "switch",
    "persist",
    "switched",
];

/// A fallback has the same points, and a cleanup after the gate opened.
fn fallback_points() -> Vec<&'static str> {
    let mut points = CUTOVER_POINTS.to_vec();
    points.push("cleanup");
    points
}

/// Points after the commit point: a restart comes back on the new side.
fn committed(point: &str) -> bool {
    matches!(point, "switched" | "cleanup")
}

// --------------------------------------------------------------------- load

/// One client writing through pgswitch, each insert committed durably
/// (`SET LOCAL synchronous_commit = on`: the application asks for it), and
/// reconnecting after errors; records every acknowledged id.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

impl Writer {
    fn start(port: u16) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = connect_port(port).await.ok();
                    if client.is_none() {
                        // The proxy is down (killed by the test): pace the retries.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                let Some(c) = &client else { continue };
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                let sql = format!(
                    "BEGIN; SET LOCAL synchronous_commit = on; \
                     INSERT INTO acked (id, writer) VALUES ({id}, 0); COMMIT"
                );
                match c.batch_execute(&sql).await {
                    Ok(()) => a.lock().unwrap().push(id),
                    Err(_) => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
        Writer { stop, acked, task }
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

async fn connect_port(port: u16) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

// ------------------------------------------------------------------- checks

fn conn<'p>(p: &'p Pair, side: &str) -> &'p Client {
    if side == "blue" {
        &p.b
    } else {
        &p.g
    }
}

fn other(side: &str) -> &'static str {
    if side == "blue" {
        "green"
    } else {
        "blue"
    }
}

/// The role-wide settings of role `app` on a server.
async fn app_settings(c: &Client) -> String {
    c.query_one(
        "SELECT coalesce((SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting d \
           JOIN pg_roles r ON r.oid = d.setrole WHERE r.rolname = 'app' AND d.setdatabase = 0), '')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// The subscription into `side`, on `side`.
fn into(side: &str) -> &'static str {
    if side == "green" {
        FORWARD
    } else {
        REVERSE
    }
}

/// What must hold whenever no switch runs, with `active` active: the
/// proxy says so and has nothing unfinished; the active side is writable
/// through pgswitch and not fenced; the other side is fenced; exactly one
/// direction is enabled, out of the active side, and streams; with blue
/// active no reverse object exists; every acknowledged write is on both
/// sides, and both sides hold the same rows.
async fn check_consistent(p: &Pair, proxy: &Proxy, active: &str, acked: &[i64], context: &str) {
    let st = wait_for(WAIT, || async {
        let st = status(proxy).await;
        st["unreconciled"].is_null().then_some(st)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{context}: the servers never reconciled: {}",
            status_text(proxy)
        )
    });
    assert_eq!(st["active"], active, "{context}: {st}");
    assert!(st["unfinished_switch"].is_null(), "{context}: {st}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.state_file()).unwrap()).unwrap();
    assert_eq!(saved["active"], active, "{context}: state file {saved}");
    assert!(
        saved.get("intent").is_none(),
        "{context}: state file {saved}"
    );

    let a = conn(p, active);
    let o = conn(p, other(active));
    let active_settings = app_settings(a).await;
    assert!(
        !active_settings.contains("default_transaction_read_only=on")
            && !active_settings.contains("pgswitch."),
        "{context}: {active} must be writable: {active_settings}"
    );
    let other_settings = app_settings(o).await;
    assert!(
        other_settings.contains("default_transaction_read_only=on")
            && other_settings.contains("pgswitch.fence_previous"),
        "{context}: {} must be fenced: {other_settings}",
        other(active)
    );
    let st_in = repl::subscription_status(a, into(active)).await.unwrap();
    assert!(
        !st_in.enabled,
        "{context}: {} on {active}: {st_in:?}",
        into(active)
    );
    wait_streaming(o, into(other(active))).await;
    if active == "blue" {
        assert_eq!(
            count(
                &p.g,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgswitch_reverse'"
            )
            .await
                + count(
                    &p.g,
                    "SELECT count(*) FROM pg_publication WHERE pubname = 'pgswitch_reverse'"
                )
                .await
                + count(
                    &p.b,
                    "SELECT count(*) FROM pg_subscription WHERE subname = 'pgswitch_reverse'"
                )
                .await,
            0,
            "{context}: the idle reverse direction is left behind"
        );
    }

    // Writable through pgswitch, on the active side.
    let c = connect_port(proxy.port).await.unwrap();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    c.execute("INSERT INTO acked (id, writer) VALUES ($1, 1)", &[&id])
        .await
        .unwrap_or_else(|e| panic!("{context}: write through pgswitch: {e:?}"));
    let port: i32 = c
        .query_one("SELECT port FROM acked WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    let active_port = if active == "blue" {
        p.blue.port
    } else {
        p.green.port
    };
    assert_eq!(port, active_port as i32, "{context}");

    // Every acknowledged write on both sides, once; the same rows on both.
    let (slot, sub) = if active == "blue" {
        (FORWARD, FORWARD)
    } else {
        (REVERSE, REVERSE)
    };
    catch_up(a, slot, o, sub).await;
    let mut wanted = acked.to_vec();
    wanted.push(id);
    for (name, c) in [("blue", &p.b), ("green", &p.g)] {
        let gone = missing(c, &wanted).await;
        assert!(
            gone.is_empty(),
            "{context}: acknowledged rows missing on {name}: {gone:?}"
        );
    }
    let (nb, ng) = (
        count(&p.b, "SELECT count(*) FROM acked").await,
        count(&p.g, "SELECT count(*) FROM acked").await,
    );
    assert_eq!(nb, ng, "{context}: blue has {nb} rows, green {ng}");
}

fn status_text(proxy: &Proxy) -> String {
    format!("(proxy log tail)\n{}", file_tail(&proxy.log_path(), 30))
}

/// A switch to `path` that must go through.
async fn must_switch(proxy: &Proxy, path: &str) {
    let (code, report) = switch(proxy, path, "").await;
    assert_eq!(code, 200, "{path}: {report}");
}

/// Runs `path` with the switch held at `point`, and returns once it is held.
async fn held_switch(
    proxy: &Proxy,
    path: &'static str,
    point: &str,
) -> tokio::task::JoinHandle<(u16, String)> {
    const STALLED: &str = "test hook: switch stalled";
    let before = proxy.logs().matches(STALLED).count();
    let admin_port = proxy.admin_port;
    let request =
        tokio::spawn(async move { admin_http(admin_port, "POST", path, Some(TOKEN), "").await });
    let stalled = wait_for(WAIT, || async {
        (proxy.logs().matches(STALLED).count() > before).then_some(())
    })
    .await;
    assert!(
        stalled.is_some(),
        "{path} never reached {point}: {}",
        file_tail(&proxy.log_path(), 40)
    );
    request
}

fn stall_env(point: &str) -> Vec<(String, String)> {
    vec![("PGSWITCH_TEST_STALL_AT".into(), point.into())]
}

/// Kills pgswitch at each point of `path`, restarts it and checks. Starts
/// and ends every case with `from` active.
async fn kill_at_every_point(
    p: &Pair,
    proxy: &mut Proxy,
    path: &'static str,
    back: &'static str,
    from: &str,
    points: &[&str],
) {
    for point in points {
        let context = format!("{path} killed at {point}");
        let t = Instant::now();
        proxy.env = stall_env(point);
        proxy.restart();
        let writer = Writer::start(proxy.port);
        let request = held_switch(proxy, path, point).await;
        proxy.kill();
        let _ = request.await;
        proxy.env.clear();
        proxy.restart();
        let acked = writer.finish().await;
        let active = if committed(point) { other(from) } else { from };
        check_consistent(p, proxy, active, &acked, &context).await;
        if active != from {
            must_switch(proxy, back).await;
            check_consistent(p, proxy, from, &[], &format!("{context}, then {back}")).await;
        }
        eprintln!(
            "CASE {context}: back on {active}, {} acknowledged writes checked ({:?})",
            acked.len(),
            t.elapsed()
        );
    }
}

/// Blue and green with the fence history every case needs (green fenced by
/// a fallback), and pgswitch in front.
async fn setup() -> (Pair, Proxy) {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    must_switch(&proxy, "/cutover").await;
    must_switch(&proxy, "/fallback").await;
    check_consistent(&p, &proxy, "blue", &[], "setup").await;
    (p, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_every_point_of_a_cutover() {
    let (p, mut proxy) = setup().await;
    kill_at_every_point(
        &p,
        &mut proxy,
        "/cutover",
        "/fallback",
        "blue",
        CUTOVER_POINTS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_every_point_of_a_fallback() {
    let (p, mut proxy) = setup().await;
    must_switch(&proxy, "/cutover").await;
    check_consistent(&p, &proxy, "green", &[], "setup").await;
    kill_at_every_point(
        &p,
        &mut proxy,
        "/fallback",
        "/cutover",
        "green",
        &fallback_points(),
    )
    .await;
}

/// Crashes the target (an immediate shutdown) while `path` is held at each
/// phase; the switch aborts (or, past its last server step, goes through);
/// the target comes back and pgswitch reconciles on its own. Starts and
/// ends every case with `from` active.
async fn crash_server_at_every_phase(
    p: &mut Pair,
    proxy: &mut Proxy,
    path: &'static str,
    back: &'static str,
    from: &'static str,
    crashed: &'static str,
    points: &[&str],
) {
    let to = other(from);
    let release = p.dir.path().join("release");
    for point in points {
        let context = format!("{path}: {crashed} crashed at {point}");
        let _ = std::fs::remove_file(&release);
        proxy.env = stall_env(point);
        proxy.env.push((
            "PGSWITCH_TEST_STALL_RELEASE".into(),
            release.display().to_string(),
        ));
        proxy.restart();
        let writer = Writer::start(proxy.port);
        let request = held_switch(proxy, path, point).await;
        target(p, crashed).kill();
        std::fs::write(&release, b"").unwrap();
        let (code, body) = request.await.unwrap();
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Held at `persist`, every server step is done (durably): the commit
        // point itself is the local state file, so the switch goes through
        // and the target takes the traffic once it is back.
        let switched = committed(point) || *point == "persist";
        // The preflight's checks come before the intent: nothing has
        // changed yet, so a server lost there refuses the switch.
        let expected = match (switched, *point) {
            (true, _) => "switched",
            (false, "checks") => "refused",
            (false, _) => "aborted",
        };
        assert_eq!(
            report["outcome"], expected,
            "{context}: HTTP {code} {report}"
        );
        restart(p, crashed).await;
        let acked = writer.finish().await;
        let active = if switched { to } else { from };
        check_consistent(p, proxy, active, &acked, &context).await;
        if switched {
            must_switch(proxy, back).await;
            check_consistent(p, proxy, from, &[], &format!("{context}, then {back}")).await;
        }
        eprintln!(
            "CASE {context}: {} acknowledged writes checked",
            acked.len()
        );
    }
    proxy.env.clear();
    proxy.restart();
}

fn target<'p>(p: &'p mut Pair, side: &str) -> &'p mut PgServer {
    if side == "blue" {
        &mut p.blue
    } else {
        &mut p.green
    }
}

/// Starts a crashed server again and reopens the test's admin connection.
async fn restart(p: &mut Pair, side: &str) {
    target(p, side).restart();
    if side == "blue" {
        p.b = admin(&p.blue).await;
    } else {
        p.g = admin(&p.green).await;
    }
}

const TARGET_CRASH_POINTS: &[&str] = &[
    "checks", "prepare", "warm", "drain", "catch_up", "switch", "persist", "switched",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_crash_at_every_phase_of_a_cutover() {
    let (mut p, mut proxy) = setup().await;
    crash_server_at_every_phase(
        &mut p,
        &mut proxy,
        "/cutover",
        "/fallback",
        "blue",
        "green",
        TARGET_CRASH_POINTS,
    )
    .await;

    // Green crashes the moment the cutover answered.
    let writer = Writer::start(proxy.port);
    must_switch(&proxy, "/cutover").await;
    p.green.kill();
    p.green.restart();
    p.g = admin(&p.green).await;
    let acked = writer.finish().await;
    check_consistent(
        &p,
        &proxy,
        "green",
        &acked,
        "green crashed right after the cutover",
    )
    .await;
}

/// A fallback asked for 100 ms after a cutover goes through: it waits for
/// the reverse direction's apply worker, which PostgreSQL may start seconds
/// after the subscription was enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_100ms_after_a_cutover() {
    let (p, proxy) = setup().await;
    for _ in 0..2 {
        let writer = Writer::start(proxy.port);
        must_switch(&proxy, "/cutover").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (code, report) = switch(&proxy, "/fallback", "").await;
        assert_eq!(code, 200, "{report}");
        // The cutover answered once the reverse direction streamed: the
        // fallback had no worker to wait for.
        let waited = report["phases"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "wait_worker"))
            .map(|p| p["ms"].as_f64().unwrap_or(0.0));
        assert!(waited.is_none(), "{report}");
        let acked = writer.finish().await;
        check_consistent(&p, &proxy, "blue", &acked, "fallback 100 ms after cutover").await;
    }
}

// ------------------------------------------------------ nothing left behind

/// A cutover that fails while preparing the reverse direction (green
/// without `wal_level = logical` cannot create its slot) drops the
/// publication it created; blue stays active and writable. (The preflight's
/// wal_level check would refuse it first: forced, to reach the prepare.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_preparing_leaves_nothing() {
    let p = pair_with(vec!["wal_level = replica".into()]).await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let (code, report) = switch(&proxy, "/cutover", r#"{"force": ["wal_level"]}"#).await;
    assert_eq!(code, 409, "{report}");
    assert_eq!(report["outcome"], "aborted", "{report}");
    assert!(
        report["reason"].as_str().unwrap_or("").contains("prepare"),
        "{report}"
    );
    assert_eq!(p.reverse_objects().await, 0, "{report}");
    let undone = report["undone"].to_string();
    assert!(undone.contains("publication"), "{report}");
    let st = status(&proxy).await;
    assert!(
        st["unfinished_switch"].is_null() && st["unreconciled"].is_null(),
        "{st}"
    );
    let c = connect_port(proxy.port).await.unwrap();
    c.execute("INSERT INTO acked (id, writer) VALUES (-1, -1)", &[])
        .await
        .unwrap();
}

/// While green is active the forward direction is idle: its slot on blue
/// is kept advanced, so it does not retain blue's WAL until a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_forward_slot_is_kept_advanced() {
    let p = pair().await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    must_switch(&proxy, "/cutover").await;
    let c = connect_port(proxy.port).await.unwrap();
    c.batch_execute("INSERT INTO acked (id, writer) SELECT g, 2 FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    // The rows reach blue through the reverse direction: blue's WAL grows.
    catch_up(&p.g, REVERSE, &p.b, REVERSE).await;
    let written: String =
        p.b.query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    let advanced = wait_for(Duration::from_secs(30), || async {
        let row =
            p.b.query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                  WHERE slot_name = 'pgswitch'",
                &[&written],
            )
            .await
            .unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    assert!(
        advanced.is_some(),
        "the forward slot still retains WAL from before {written}"
    );
    // The fallback still restarts the forward direction exactly.
    must_switch(&proxy, "/fallback").await;
    let c = connect_port(proxy.port).await.unwrap();
    c.execute("INSERT INTO acked (id, writer) VALUES (-5, -5)", &[])
        .await
        .unwrap();
    catch_up(&p.b, FORWARD, &p.g, FORWARD).await;
    assert_eq!(
        count(&p.b, "SELECT count(*) FROM acked").await,
        count(&p.g, "SELECT count(*) FROM acked").await
    );
}

/// `check-config` and the start find a state file whose folder does not
/// exist (before, only a cutover's commit did).
#[test]
fn state_file_in_a_missing_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[proxy]\n[backends.blue]\nhost = \"127.0.0.1\"\n\
         [cutover]\nstate_file = \"/nonexistent-pgswitch-dir/state.json\"\n",
    )
    .unwrap();
    for command in ["check-config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
            .args([command, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("/nonexistent-pgswitch-dir/state"),
            "{command}: {stderr}"
        );
    }
}

/// A state file lost after a cutover: blue carries pgswitch's fence and
/// green does not, so pgswitch refuses to serve blue and says what to run;
/// `pgswitch recover --active green` settles it, and pgswitch serves green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_state_file_is_refused_until_recover() {
    let p = pair().await;
    let mut proxy = Proxy::start(&proxy_config(&p, "", ""));
    must_switch(&proxy, "/cutover").await;
    proxy.kill();
    std::fs::remove_file(p.state_file()).unwrap();
    proxy.restart_unready();
    let exit = proxy.wait_exit(WAIT).expect("pgswitch refuses to start");
    assert!(!exit.success());
    let logs = proxy.logs();
    assert!(logs.contains("pgswitch recover --active"), "{logs}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["recover", "--active", "green", "--config"])
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("green is active"), "{text}");
    proxy.restart();
    check_consistent(&p, &proxy, "green", &[], "after pgswitch recover").await;
    // The fallback finds blue's fence on blue itself, though the state file
    // was rebuilt, and lifts it.
    must_switch(&proxy, "/fallback").await;
    check_consistent(&p, &proxy, "blue", &[], "fallback after pgswitch recover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_crash_at_every_phase_of_a_fallback() {
    let (mut p, mut proxy) = setup().await;
    must_switch(&proxy, "/cutover").await;
    let mut points = TARGET_CRASH_POINTS.to_vec();
    points.push("cleanup");
    crash_server_at_every_phase(
        &mut p,
        &mut proxy,
        "/fallback",
        "/cutover",
        "green",
        "blue",
        &points,
    )
    .await;
}

/// Without a state file a crash in a switch could not be undone: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_without_a_state_file_is_refused() {
    let p = pair().await;
    let line = format!("state_file = \"{}\"\n", p.state_file().display());
    let config = proxy_config(&p, "", "");
    assert!(config.contains(&line), "{config}");
    let proxy = Proxy::start(&config.replace(&line, ""));
    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 409, "{report}");
    assert_eq!(report["outcome"], "refused", "{report}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or("")
            .contains("state_file"),
        "{report}"
    );
    assert_eq!(status(&proxy).await["active"], "blue");
    // A dry run needs none: it changes nothing.
    let (code, report) = switch(&proxy, "/cutover", r#"{"dry_run": true}"#).await;
    assert_eq!(code, 200, "{report}");
}

/// Blue (the side a cutover leaves) crashes while the cutover is held: it
/// aborts before persist (blue takes the traffic again once it is back, and
/// pgswitch finishes the undo by itself), and goes through at persist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_side_crash_during_a_cutover() {
    let (mut p, mut proxy) = setup().await;
    crash_server_at_every_phase(
        &mut p,
        &mut proxy,
        "/cutover",
        "/fallback",
        "blue",
        "blue",
        &["checks", "warm", "drain", "catch_up", "switch", "persist"],
    )
    .await;
}

/// pgswitch killed in the middle of a decommission (after dropping the
/// replication, before lifting the fences; before writing the state file)
/// starts again on green (the reconcile tolerates the missing
/// subscriptions and puts back the fence the state file still lists), and
/// a re-run finishes: nothing left on either server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_decommission() {
    for point in ["decommission_dropped", "decommission_store"] {
        let p = pair().await;
        let mut proxy = Proxy::start(&proxy_config(&p, "fallback_window = \"0s\"", ""));
        must_switch(&proxy, "/cutover").await;
        proxy.env = stall_env(point);
        proxy.restart();
        let request = held_switch(&proxy, "/decommission", point).await;
        proxy.kill();
        let _ = request.await;
        proxy.env.clear();
        proxy.restart();
        let c = connect(&proxy, "app").await.unwrap();
        assert_eq!(server_port(&c).await, i32::from(p.green.port), "{point}");
        let (code, report) = switch(&proxy, "/decommission", "").await;
        assert_eq!(code, 200, "{point}: {report}");
        assert_eq!(
            p.replication_leftovers().await,
            Vec::<String>::new(),
            "{point}: {report}"
        );
        let st = status(&proxy).await;
        assert!(st["unreconciled"].is_null(), "{point}: {st}");
    }
}

/// Blue (the old side, still fenced) crashes in the middle of a
/// decommission, after the replication was dropped and before the fences
/// are lifted: the decommission fails, says why, and leaves the state file
/// as it was; once blue is back a re-run finishes, nothing left anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_side_crash_in_the_middle_of_a_decommission() {
    let mut p = pair().await;
    let mut proxy = Proxy::start(&proxy_config(&p, "fallback_window = \"0s\"", ""));
    must_switch(&proxy, "/cutover").await;
    let release = p.dir.path().join("release");
    proxy.env = stall_env("decommission_dropped");
    proxy.env.push((
        "PGSWITCH_TEST_STALL_RELEASE".into(),
        release.display().to_string(),
    ));
    proxy.restart();
    let request = held_switch(&proxy, "/decommission", "decommission_dropped").await;
    p.blue.kill();
    std::fs::write(&release, b"").unwrap();
    let (code, body) = request.await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, report["outcome"].as_str()),
        (409, Some("failed")),
        "{report}"
    );
    assert!(status(&proxy).await["decommissioned_at_ms"].is_null());
    restart(&mut p, "blue").await;
    let done = wait_for(WAIT, || async {
        let (code, report) = switch(&proxy, "/decommission", "").await;
        (code == 200).then_some(report)
    })
    .await;
    assert!(done.is_some(), "the re-run never finished");
    assert_eq!(p.replication_leftovers().await, Vec::<String>::new());
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, i32::from(p.green.port));
}
