//! The admin API: health, auth, status, metrics, pause/resume — against a real
//! PostgreSQL through a real pgswitch.

mod support;

use std::time::{Duration, Instant};

use support::*;

const TOKEN: &str = "s3cret-admin-token";

fn start(pg: &PgServer, admin_extra: &str) -> Proxy {
    ProxyConfig::new(pg.port)
        .pool_size(2)
        .app_user()
        .admin(free_port(), admin_extra)
        .start()
}

async fn client(proxy: &Proxy) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=secret dbname=postgres",
            proxy.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect through pgswitch");
    tokio::spawn(conn);
    client
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_everything_else_needs_the_token() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, &format!("token = \"{TOKEN}\""));
    assert_eq!(
        admin_http(proxy.admin_port, "GET", "/health", None, "")
            .await
            .0,
        200
    );
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("POST", "/pause"),
        ("POST", "/resume"),
    ] {
        assert_eq!(
            admin_http(proxy.admin_port, method, path, None, "").await.0,
            401,
            "{method} {path}"
        );
        assert_eq!(
            admin_http(proxy.admin_port, method, path, Some("wrong"), "")
                .await
                .0,
            401,
            "{method} {path}"
        );
    }
    let (status, body) = admin_http(proxy.admin_port, "GET", "/status", Some(TOKEN), "").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["active"], "blue");
    assert_eq!(json["paused"], false);
    assert!(
        !proxy.logs().contains(TOKEN),
        "the token must not be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_transactions_errors_and_connections() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, "");
    let before = admin_http(proxy.admin_port, "GET", "/metrics", None, "")
        .await
        .1;
    let c = client(&proxy).await;
    for _ in 0..10 {
        c.simple_query("select 1").await.unwrap();
    }
    let err = c.simple_query("select 1/0").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    // The client has its error at the ErrorResponse; the proxy counts the
    // transaction at the ReadyForQuery behind it, which may come a moment later.
    let counted_before = metric(&before, "pgswitch_transactions_total");
    let admin_port = proxy.admin_port;
    let after = wait_for(Duration::from_secs(5), || async move {
        let (status, after) = admin_http(admin_port, "GET", "/metrics", None, "").await;
        assert_eq!(status, 200);
        (metric(&after, "pgswitch_transactions_total") - counted_before >= 11.0).then_some(after)
    })
    .await;
    let after = match after {
        Some(after) => after,
        None => admin_http(admin_port, "GET", "/metrics", None, "").await.1,
    };
    let delta = metric(&after, "pgswitch_transactions_total") - counted_before;
    assert!(delta >= 11.0, "transactions grew by {delta}\n{after}");
    assert!(metric(&after, "pgswitch_queries_total") >= 11.0, "{after}");
    assert_eq!(
        metric(&after, "pgswitch_errors_total{class=\"22\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "pgswitch_clients{state=\"idle\"}"),
        1.0,
        "{after}"
    );
    assert!(
        metric(
            &after,
            "pgswitch_server_connections{backend=\"blue\",state=\"idle\"}"
        ) >= 1.0
    );
    assert!(
        metric(&after, "pgswitch_transaction_duration_seconds_count") >= 11.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "pgswitch_connections_total{outcome=\"accepted\",reason=\"\"}"
        ),
        1.0,
        "{after}"
    );

    // A wrong password is counted as refused for authentication; a
    // transaction that finds both server connections busy waits, and the
    // wait is observed.
    let wrong = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=wrong dbname=postgres",
            proxy.port
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(wrong.is_err());
    let (a, b, waiter) = (
        client(&proxy).await,
        client(&proxy).await,
        client(&proxy).await,
    );
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    b.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let queued = wait_for(Duration::from_secs(10), || async {
        let text = admin_http(proxy.admin_port, "GET", "/metrics", None, "")
            .await
            .1;
        (metric(&text, "pgswitch_clients{state=\"waiting\"}") >= 1.0).then_some(())
    })
    .await;
    assert!(queued.is_some(), "the third transaction never waited");
    a.batch_execute("COMMIT").await.unwrap();
    waiting.await.unwrap().unwrap();
    let text = admin_http(proxy.admin_port, "GET", "/metrics", None, "")
        .await
        .1;
    assert_eq!(
        metric(
            &text,
            "pgswitch_connections_total{outcome=\"refused\",reason=\"authentication\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "pgswitch_server_wait_duration_seconds_count"),
        1.0,
        "{text}"
    );
}

/// The totals the dashboard derives its rates from, in /status's JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_transactions_queries_and_errors() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, "");
    let counters = |body: &str| {
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        let c = &json["counters"];
        let get = |k: &str| {
            c[k].as_u64()
                .unwrap_or_else(|| panic!("no counters.{k} in {json}"))
        };
        (get("transactions"), get("queries"), get("errors"))
    };
    let (_, before) = admin_http(proxy.admin_port, "GET", "/status", None, "").await;
    let (t0, q0, e0) = counters(&before);
    let c = client(&proxy).await;
    for _ in 0..5 {
        c.simple_query("select 1").await.unwrap();
    }
    c.simple_query("select 1/0").await.unwrap_err();
    let (status, after) = admin_http(proxy.admin_port, "GET", "/status", None, "").await;
    assert_eq!(status, 200);
    let (t1, q1, e1) = counters(&after);
    assert!(t1 - t0 >= 6, "transactions {t0} -> {t1}");
    assert!(q1 - q0 >= 6, "queries {q0} -> {q1}");
    assert_eq!(e1 - e0, 1, "errors {e0} -> {e1}");
    // The same totals as /metrics.
    let (_, metrics) = admin_http(proxy.admin_port, "GET", "/metrics", None, "").await;
    assert_eq!(
        metric(&metrics, "pgswitch_errors_total{class=\"22\"}"),
        e1 as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, "");
    let c = client(&proxy).await;
    c.simple_query("select 1").await.unwrap();
    let (status, body) = admin_http(proxy.admin_port, "POST", "/pause", None, "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"paused\":true"), "{body}");
    let held = tokio::spawn(async move {
        let started = Instant::now();
        c.simple_query("select 42").await.map(|_| started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "a new transaction must wait at the gate while paused"
    );
    let (status, body) = admin_http(proxy.admin_port, "POST", "/resume", None, "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"paused\":false"), "{body}");
    let waited = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("resumed transaction finishes")
        .unwrap()
        .expect("no error for a held transaction");
    assert!(
        waited >= Duration::from_millis(300),
        "it was held: {waited:?}"
    );
    let metrics = admin_http(proxy.admin_port, "GET", "/metrics", None, "")
        .await
        .1;
    assert_eq!(
        metric(&metrics, "pgswitch_pause_duration_seconds_count"),
        1.0,
        "{metrics}"
    );
}

#[test]
fn non_loopback_admin_without_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[proxy]\n[backends.blue]\nhost = \"127.0.0.1\"\n[admin]\nlisten = \"0.0.0.0:9930\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin.token"), "{stderr}");
}

/// Runs the pgswitch CLI against a proxy's admin API.
fn cli(proxy: &Proxy, args: &[&str], token: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"));
    cmd.args(args)
        .arg("--admin")
        .arg(format!("http://127.0.0.1:{}", proxy.admin_port))
        .env_remove("PGSWITCH_TOKEN")
        .env_remove("PGSWITCH_ADMIN");
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    let out = cmd.output().expect("run the pgswitch CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_pause_resume_and_a_readable_report() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, &format!("token = \"{TOKEN}\""));

    let (ok, out) = cli(&proxy, &["status", "--json"], Some(TOKEN));
    assert!(ok, "{out}");
    let json: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["active"], "blue");

    let (ok, out) = cli(&proxy, &["status"], Some("wrong"));
    assert!(!ok, "a wrong token must fail: {out}");
    assert!(out.contains("unauthorized"), "{out}");

    let (ok, out) = cli(&proxy, &["pause", "--json"], Some(TOKEN));
    assert!(ok && out.contains("\"paused\":true"), "{out}");
    let (ok, out) = cli(&proxy, &["resume", "--json"], Some(TOKEN));
    assert!(ok && out.contains("\"paused\":false"), "{out}");

    // No green backend: the cutover is refused, and the CLI says so readably
    // and exits non-zero.
    let (ok, out) = cli(&proxy, &["cutover", "--dry-run"], Some(TOKEN));
    assert!(!ok, "{out}");
    assert!(out.contains("cutover blue -> green: REFUSED"), "{out}");
    assert!(out.contains("reason:"), "{out}");
    // A switch that did not happen is a warning in the log, on one line.
    let logs = proxy.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("switch did not happen")),
        "{logs}"
    );
    assert!(
        !logs.contains("\u{1b}["),
        "colour codes in a log file: {logs}"
    );

    // status as a table; --json ends with a newline.
    let (ok, out) = cli(&proxy, &["status"], Some(TOKEN));
    assert!(ok, "{out}");
    for line in ["active:       blue", "gate:         open", "pools:", "SIDE"] {
        assert!(out.contains(line), "{line:?} not in: {out}");
    }
    let (_, raw) = cli(&proxy, &["status", "--json"], Some(TOKEN));
    assert!(raw.ends_with("}\n"), "{raw:?}");
    // history lists the refused dry run.
    let (ok, out) = cli(&proxy, &["history"], Some(TOKEN));
    assert!(ok, "{out}");
    assert!(
        out.contains("STARTED (UTC)")
            && out.contains("cutover  blue -> green")
            && out.contains("refused"),
        "{out}"
    );
    // reload reads the file again; a broken file is refused, the running
    // configuration kept.
    let (ok, out) = cli(&proxy, &["reload"], Some(TOKEN));
    assert!(ok && out.contains("configuration reloaded"), "{out}");
    std::fs::write(&proxy.config_path, "[proxy\n").unwrap();
    let (ok, out) = cli(&proxy, &["reload"], Some(TOKEN));
    assert!(
        !ok && out.contains("reload refused, the running configuration kept"),
        "{out}"
    );
    let (ok, _) = cli(&proxy, &["status"], Some(TOKEN));
    assert!(ok);
}

/// Opens a connection to the admin API and sends a request's first lines,
/// never its end.
async fn half_sent_request(port: u16) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin API");
    s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .expect("send half a request");
    s
}

/// Reads until the peer closes (EOF or a reset); returns what was read.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// 500 requests whose headers never end (a slowloris) are closed after
/// `request_read_timeout`; meanwhile a complete request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_after_request_read_timeout() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, "request_read_timeout = \"1s\"\nmax_connections = 1000");
    let sent = Instant::now();
    let mut held = Vec::new();
    for _ in 0..500 {
        held.push(half_sent_request(proxy.admin_port).await);
    }
    let (code, _) = admin_http(proxy.admin_port, "GET", "/status", None, "").await;
    assert_eq!(code, 200, "a complete request is answered meanwhile");
    let closes: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s)).await;
                Instant::now()
            })
        })
        .collect();
    let mut last = sent;
    for close in closes {
        last = last.max(close.await.unwrap());
    }
    let took = last - sent;
    assert!(
        took < Duration::from_secs(5),
        "the half-sent requests were open for {took:?} (request_read_timeout = 1s)"
    );
    let (code, _) = admin_http(proxy.admin_port, "GET", "/health", None, "").await;
    assert_eq!(code, 200);
}

/// At most `max_connections` admin connections are served at once; one more
/// is answered 503 at once and closed, and once a connection ends the next
/// is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_over_max_connections_get_503() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(&pg, "request_read_timeout = \"30s\"\nmax_connections = 4");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_sent_request(proxy.admin_port).await);
    }
    let t = Instant::now();
    let (code, body) = admin_http(proxy.admin_port, "GET", "/health", None, "").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("max_connections"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(held);
    wait_until(Duration::from_secs(10), "a slot frees up", || async {
        admin_http(proxy.admin_port, "GET", "/health", None, "")
            .await
            .0
            == 200
    })
    .await;
}

async fn status_json(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = admin_http(proxy.admin_port, "GET", "/status", None, "").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Blue goes down: `/status` says so (reachable false, the error, when it
/// was checked), `/ready` answers 503 and `pgswitch_backend_up` drops to 0,
/// while `/health` (liveness) stays 200. Blue comes back: all recover. The
/// probe logs in with blue's admin credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_ready_report_an_unreachable_backend() {
    let mut pg = pg_with_app(PgOptions::default(), None);
    let proxy = ProxyConfig::new(pg.port)
        .set("server_probe_interval", "300ms")
        .set("server_connect_timeout", "2s")
        .backend_set("admin_user", SUPERUSER)
        .backend_set("admin_password", SUPERUSER_PASSWORD)
        .app_user()
        .admin(free_port(), "")
        .start();
    let blue = |s: &serde_json::Value| s["backends"]["blue"].clone();
    let up = wait_for(Duration::from_secs(10), || async {
        let s = status_json(&proxy).await;
        (blue(&s)["reachable"] == true).then_some(s)
    })
    .await
    .expect("blue reachable after the first probe");
    assert_eq!(blue(&up)["checked_by"], "probe", "{up}");
    assert_eq!(blue(&up)["addr"], format!("127.0.0.1:{}", pg.port), "{up}");
    assert!(blue(&up)["checked_at_unix_ms"].as_u64().is_some(), "{up}");
    let (code, body) = admin_http(proxy.admin_port, "GET", "/ready", None, "").await;
    assert_eq!(code, 200, "{body}");

    pg.stop();
    let down = wait_for(Duration::from_secs(10), || async {
        let s = status_json(&proxy).await;
        (blue(&s)["reachable"] == false).then_some(s)
    })
    .await
    .expect("blue unreachable once stopped");
    let error = blue(&down)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&format!("127.0.0.1:{}", pg.port)),
        "the error names blue: {down}"
    );
    assert!(
        blue(&down)["last_error_ms_ago"].as_u64().is_some(),
        "{down}"
    );
    let (code, body) = admin_http(proxy.admin_port, "GET", "/ready", None, "").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"active\":\"blue\""), "{body}");
    let (code, body) = admin_http(proxy.admin_port, "GET", "/health", None, "").await;
    assert_eq!(code, 200, "liveness is not readiness: {body}");
    let (_, metrics) = admin_http(proxy.admin_port, "GET", "/metrics", None, "").await;
    assert_eq!(
        metric(&metrics, "pgswitch_backend_up{backend=\"blue\"}"),
        0.0,
        "{metrics}"
    );

    pg.restart();
    wait_until(Duration::from_secs(10), "blue reachable again", || async {
        blue(&status_json(&proxy).await)["reachable"] == true
    })
    .await;
    let (code, body) = admin_http(proxy.admin_port, "GET", "/ready", None, "").await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = admin_http(proxy.admin_port, "GET", "/metrics", None, "").await;
    assert_eq!(
        metric(&metrics, "pgswitch_backend_up{backend=\"blue\"}"),
        1.0
    );
    // Clients get through again.
    let c = client(&proxy).await;
    c.simple_query("select 1").await.unwrap();
}

/// Without a probe (server_probe_interval = 0), the proxy's own connections
/// tell: a client's failed login to a stopped blue marks it unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_server_connection_marks_the_backend_unreachable() {
    let mut pg = pg_with_app(PgOptions::default(), None);
    let proxy = ProxyConfig::new(pg.port)
        .set("server_probe_interval", "0s")
        .app_user()
        .admin(free_port(), "")
        .start();
    let s = status_json(&proxy).await;
    assert_eq!(
        s["backends"]["blue"]["reachable"],
        serde_json::Value::Null,
        "{s}"
    );
    let c = client(&proxy).await;
    c.simple_query("select 1").await.unwrap();
    let s = status_json(&proxy).await;
    assert_eq!(s["backends"]["blue"]["reachable"], true, "{s}");
    assert_eq!(s["backends"]["blue"]["checked_by"], "connection", "{s}");
    drop(c);
    pg.stop();
    let err = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=secret dbname=postgres application_name=other",
            proxy.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("no server: the login fails");
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err}");
    let s = status_json(&proxy).await;
    assert_eq!(s["backends"]["blue"]["reachable"], false, "{s}");
    assert!(
        s["backends"]["blue"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("could not connect")),
        "{s}"
    );
}

/// Without admin credentials the probe goes as far as the server's first
/// answer to a pool user's startup packet, and no further: it leaves
/// nothing in the server's log and never shows among the pool's server
/// connections, yet tells a stopped server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_without_admin_credentials_stops_at_the_first_answer() {
    let mut pg = pg_with_app(PgOptions::default(), None);
    let proxy = ProxyConfig::new(pg.port)
        .set("server_probe_interval", "200ms")
        .pool_size(1)
        .app_user()
        .admin(free_port(), "")
        .start();
    let c = client(&proxy).await;
    c.simple_query("select 1").await.unwrap();
    let log_before = pg.log();
    let admin = pg.admin().await;
    // Several probes by the pool's user.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    wait_until(Duration::from_secs(10), "three probes", || async {
        let s = status_json(&proxy).await;
        let blue = &s["backends"]["blue"];
        let mut seen = seen.lock().unwrap();
        if blue["checked_by"] == "probe" && blue["reachable"] == true {
            seen.insert(blue["checked_at_unix_ms"].as_u64().unwrap_or(0));
        }
        seen.len() >= 3
    })
    .await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "only the pool's own connection");
    let log = pg.log();
    let new_lines = &log[log_before.len().min(log.len())..];
    assert!(
        !new_lines.contains("FATAL") && !new_lines.contains("could not receive"),
        "the probe left lines in the server log:\n{new_lines}"
    );
    drop(admin);
    drop(c);
    pg.stop();
    wait_until(Duration::from_secs(10), "blue unreachable", || async {
        status_json(&proxy).await["backends"]["blue"]["reachable"] == false
    })
    .await;
}

/// `/ready` also needs the state file readable (a start, and a switch's
/// commit, need it): a corrupt one makes it 503 while traffic still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_needs_a_readable_state_file() {
    let pg = pg_with_app(PgOptions::default(), None);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let proxy = ProxyConfig::new(pg.port)
        .app_user()
        .table(&format!("[cutover]\nstate_file = \"{}\"", state.display()))
        .admin(free_port(), "")
        .start();
    let c = client(&proxy).await;
    c.simple_query("SELECT 1").await.unwrap();
    let ready = || async { admin_http(proxy.admin_port, "GET", "/ready", None, "").await };
    let (code, body) = wait_for(Duration::from_secs(10), || async {
        let (code, body) = ready().await;
        (code == 200).then_some((code, body))
    })
    .await
    .unwrap_or_else(|| panic!("never ready"));
    assert_eq!(code, 200, "{body}");
    std::fs::write(&state, "not json").unwrap();
    let (code, body) = ready().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("is not valid"), "{body}");
    c.simple_query("SELECT 1").await.unwrap();
    std::fs::write(&state, r#"{"active":"blue"}"#).unwrap();
    let (code, body) = ready().await;
    assert_eq!(code, 200, "{body}");
}
