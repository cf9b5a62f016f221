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
    let (status, after) = admin_http(proxy.admin_port, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    let delta = metric(&after, "pgswitch_transactions_total")
        - metric(&before, "pgswitch_transactions_total");
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
}
