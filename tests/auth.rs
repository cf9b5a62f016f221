//! Authentication features against real PostgreSQL servers (pg_hba
//! scram-sha-256): password sources, scram_secret users with SCRAM
//! pass-through, auth_query (lookup, pass-through, cache TTL), server_user
//! mapping, config errors naming their keys, and no secret in the logs.
//!
//! Plain scram/md5 right/wrong password logins are in tests/protocol.rs.
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use pgswitch::scram::ScramSecret;
use support::*;

/// The proxy in front of blue on `blue`; `extra_proxy` goes into `[proxy]`.
fn proxy_cfg(blue: u16, extra_proxy: &str) -> ProxyConfig {
    ProxyConfig::new(blue)
        .set("query_wait_timeout", "5s")
        .extra_proxy(extra_proxy)
}

async fn try_connect(
    proxy: &Proxy,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_with(&client_config(proxy.port, user, Some(password), "postgres")).await
}

async fn current_user(proxy: &Proxy, user: &str, password: &str) -> String {
    let client = try_connect(proxy, user, password)
        .await
        .unwrap_or_else(|e| panic!("login of {user} failed: {e:?}\n{}", proxy.logs()));
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap_or_else(|e| panic!("query as {user}: {e:?}\n{}", proxy.logs()))
        .get(0)
}

/// Asserts the login fails like a wrong password: 28P01 with PostgreSQL's wording.
async fn assert_refused(proxy: &Proxy, user: &str, password: &str) {
    let e = try_connect(proxy, user, password)
        .await
        .map(|_| ())
        .expect_err("login accepted");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}"));
    assert_eq!(db.code().code(), "28P01", "{}", db.message());
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(
        db.message(),
        format!("password authentication failed for user \"{user}\"")
    );
}

/// psql through the proxy; returns trimmed stdout or panics with stderr.
fn psql_via(proxy: &Proxy, user: &str, password: &str, sql: &str) -> String {
    let out = Command::new(psql_bin())
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
        .arg(proxy.port.to_string())
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .output()
        .expect("spawn psql");
    assert!(
        out.status.success(),
        "psql as {user} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn rolpassword(pg: &PgServer, role: &str) -> String {
    pg.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
        quote_literal(role)
    ))
    .trim()
    .to_owned()
}

fn check_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("PGSWITCH_TEST_SURELY_UNSET")
        .stdin(Stdio::null())
        .output()
        .expect("spawn pgswitch check-config");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// ---------------------------------------------------------------------------

/// password_env and password_file: the proxy reads them at start; clients and
/// backend logins use the value. Env vars are set before any thread exists
/// (nextest runs each test in its own process; the proxy inherits them).
#[test]
fn password_env_and_password_file() {
    std::env::set_var("PGSWITCH_TEST_APP_PASSWORD", "env-Pw-41");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pg = PgServer::start(PgOptions::default());
        pg.create_user("app", "env-Pw-41");
        pg.create_user("filer", "file-Pw-42");
        let secrets_dir = tempfile::tempdir().unwrap();
        let file = secrets_dir.path().join("filer.pw");
        std::fs::write(&file, "file-Pw-42\n").unwrap();
        let toml = proxy_cfg(pg.port, "")
            .user_keys("app", &[("password_env", "PGSWITCH_TEST_APP_PASSWORD")])
            .user_keys("filer", &[("password_file", &file.display().to_string())])
            .toml();
        let proxy = Proxy::start(&toml);
        assert_eq!(current_user(&proxy, "app", "env-Pw-41").await, "app");
        assert_eq!(current_user(&proxy, "filer", "file-Pw-42").await, "filer");
        assert_refused(&proxy, "app", "PGSWITCH_TEST_APP_PASSWORD").await;
        assert_refused(&proxy, "filer", "file-Pw-42\n").await;
        assert_eq!(psql_via(&proxy, "filer", "file-Pw-42", "SELECT 7"), "7");
    });
}

/// A scram_secret copied from the server's pg_authid: the client logs in with
/// SCRAM against it, and pgswitch logs in to the server with the client's
/// ClientKey. No password is configured anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_secret_from_pg_authid_with_pass_through() {
    let pg = PgServer::start(PgOptions::default());
    pg.create_user("app", "pass-thru-Pw");
    let secret = rolpassword(&pg, "app");
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let toml = proxy_cfg(pg.port, "server_lifetime = \"1s\"")
        .user_keys("app", &[("scram_secret", &secret), ("pool_size", "2")])
        .toml();
    assert!(!toml.contains("pass-thru-Pw"));
    let proxy = Proxy::start(&toml);

    assert_refused(&proxy, "app", "wrong").await;
    assert_eq!(current_user(&proxy, "app", "pass-thru-Pw").await, "app");
    let client = try_connect(&proxy, "app", "pass-thru-Pw").await.unwrap();
    // Several transactions, and new server connections after server_lifetime:
    // the pool keeps logging in by pass-through.
    for i in 0..3 {
        let n: i32 = client
            .query_one("SELECT $1::int + 1", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i + 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert_eq!(
        psql_via(&proxy, "app", "pass-thru-Pw", "SELECT current_user"),
        "app"
    );
    // The server really authenticated app over TCP.
    let admin = pg.admin().await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND client_addr IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1);
}

/// A scram_secret that the server doesn't have (another salt): the client
/// logs in to pgswitch, but pass-through can't work; the client gets 28P01
/// saying why, and with server_password it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_secret_not_on_server_needs_server_password() {
    let pg = PgServer::start(PgOptions::default());
    pg.create_user("app", "server-side-pw");
    let ours = ScramSecret::from_password("client-side-pw").to_string();
    let toml = proxy_cfg(pg.port, "")
        .user_keys("app", &[("scram_secret", &ours)])
        .toml();
    let mut proxy = Proxy::start(&toml);
    let e = try_connect(&proxy, "app", "client-side-pw")
        .await
        .map(|_| ())
        .expect_err("pass-through against a different secret worked");
    let db = e.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code().code(), "28P01");
    assert!(db.message().contains("server_password"), "{}", db.message());

    proxy.rewrite_config(&format!("{toml}server_password = \"server-side-pw\"\n"));
    proxy.restart();
    assert_eq!(current_user(&proxy, "app", "client-side-pw").await, "app");
}

/// auth_query: a user not listed in proxy.toml logs in with its server
/// password; pgswitch logs in to the server by SCRAM pass-through. Wrong
/// passwords and unknown users get the same 28P01. After ALTER ROLE and the
/// cache TTL, the new password works and the old one doesn't.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_with_pass_through_and_cache_ttl() {
    let pg = PgServer::start(PgOptions::default());
    pg.psql("CREATE ROLE pgswitch_auth LOGIN SUPERUSER PASSWORD 'auth-Pw-9'");
    pg.create_user("dyn", "dyn-Pw-1");
    pg.create_user("md5user", "whatever");
    pg.psql("SET password_encryption = 'md5'; ALTER ROLE md5user PASSWORD 'md5-Pw'");
    let toml = proxy_cfg(
        pg.port,
        "auth_user = \"pgswitch_auth\"\nauth_password = \"auth-Pw-9\"\nauth_cache_ttl = \"2s\"\n",
    )
    .user("listed", "listed-Pw")
    .toml();
    let proxy = Proxy::start(&toml);

    assert_eq!(current_user(&proxy, "dyn", "dyn-Pw-1").await, "dyn");
    assert_eq!(
        psql_via(&proxy, "dyn", "dyn-Pw-1", "SELECT current_user"),
        "dyn"
    );
    assert_refused(&proxy, "dyn", "wrong").await;
    assert_refused(&proxy, "ghost", "dyn-Pw-1").await;
    // md5 secrets can't be used: like an unknown user.
    assert_refused(&proxy, "md5user", "md5-Pw").await;

    pg.psql("ALTER ROLE dyn PASSWORD 'dyn-Pw-2'");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_refused(&proxy, "dyn", "dyn-Pw-1").await;
    let client = try_connect(&proxy, "dyn", "dyn-Pw-2")
        .await
        .unwrap_or_else(|e| panic!("new password refused: {e:?}\n{}", proxy.logs()));
    // Force a fresh server connection: the pool must log in with the new keys.
    let admin = pg.admin().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'dyn'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap_or_else(|e| panic!("after reconnect: {e:?}\n{}", proxy.logs()));
    assert_eq!(row.get::<_, String>(0), "dyn");
    // Listed users don't go through auth_query.
    pg.create_user("listed", "listed-Pw");
    assert_eq!(current_user(&proxy, "listed", "listed-Pw").await, "listed");
}

/// server_user/server_password: client user "appclient" logs in to pgswitch
/// with its own password and reaches the server as "app".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_user_and_server_password_mapping() {
    let pg = PgServer::start(PgOptions::default());
    pg.create_user("app", "app-server-Pw");
    let toml = proxy_cfg(pg.port, "")
        .user_keys(
            "appclient",
            &[
                ("password", "client-Pw"),
                ("server_user", "app"),
                ("server_password", "app-server-Pw"),
            ],
        )
        .toml();
    let proxy = Proxy::start(&toml);
    assert_eq!(current_user(&proxy, "appclient", "client-Pw").await, "app");
    assert_eq!(
        psql_via(
            &proxy,
            "appclient",
            "client-Pw",
            "SELECT current_user || ',' || session_user"
        ),
        "app,app"
    );
    assert_refused(&proxy, "appclient", "app-server-Pw").await;
    // The server role's own name is not a proxy user.
    assert_refused(&proxy, "app", "app-server-Pw").await;
}

#[test]
fn config_errors_name_their_keys() {
    let head = "[proxy]\n[backends.blue]\nhost = \"127.0.0.1\"\n";
    let secret = ScramSecret::from_password("x").to_string();
    let cases = [
        (
            format!(
                "{head}[[users]]\nname = \"app\"\npassword_env = \"PGSWITCH_TEST_SURELY_UNSET\"\n"
            ),
            "users[0].password_env: environment variable PGSWITCH_TEST_SURELY_UNSET is not set",
        ),
        (
            format!(
                "{head}[[users]]\nname = \"app\"\npassword = \"p\"\nscram_secret = \"{secret}\"\n"
            ),
            "users[0].scram_secret: conflicts with users[0].password",
        ),
        (
            format!(
                "{}[[users]]\nname = \"app\"\nscram_secret = \"{secret}\"\n",
                head.replace("[proxy]\n", "[proxy]\nauth_method = \"md5\"\n")
            ),
            "users[0].scram_secret: user \"app\" has only a SCRAM secret",
        ),
        (
            format!("{head}[[users]]\nname = \"app\"\npassword_file = \"/nonexistent/pw\"\n"),
            "users[0].password_file: cannot read /nonexistent/pw",
        ),
        (
            format!("{head}[[users]]\nname = \"app\"\nscram_secret = \"SCRAM-SHA-256$4096:abc\"\n"),
            "users[0].scram_secret: invalid SCRAM secret",
        ),
        (
            head.replace("[proxy]\n", "[proxy]\nauth_query = \"SELECT 1, $1\"\n"),
            "proxy.auth_user: is required when auth_query is set",
        ),
    ];
    for (toml, expected) in cases {
        let (ok, output) = check_config(&toml);
        assert!(!ok, "accepted:\n{toml}");
        assert!(output.contains(expected), "{expected:?} not in {output:?}");
        assert!(!output.contains(&secret), "secret echoed: {output}");
    }
}

/// RUST_LOG=debug, every new credential path exercised (successes and
/// failures): no password, SCRAM secret or ClientKey shows up in the log.
#[test]
fn no_secrets_in_logs_at_debug_level() {
    std::env::set_var("RUST_LOG", "debug");
    std::env::set_var("PGSWITCH_TEST_SERVER_PW", "Srv-Zq9-unmistakable");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        const APP_PW: &str = "App-Zq9-unmistakable";
        const DYN_PW: &str = "Dyn-Zq9-unmistakable";
        const AUTH_PW: &str = "Auth-Zq9-unmistakable";
        const CLIENT_PW: &str = "Cli-Zq9-unmistakable";
        let pg = PgServer::start(PgOptions::default());
        pg.create_user("app", APP_PW);
        pg.create_user("dyn", DYN_PW);
        pg.create_user("mapped", "Srv-Zq9-unmistakable");
        pg.psql(&format!(
            "CREATE ROLE pgswitch_auth LOGIN SUPERUSER PASSWORD '{AUTH_PW}'"
        ));
        let app_secret = rolpassword(&pg, "app");
        let dyn_secret = rolpassword(&pg, "dyn");
        let toml = proxy_cfg(
            pg.port,
            &format!("auth_user = \"pgswitch_auth\"\nauth_password = \"{AUTH_PW}\"\n"),
        )
        .user_keys("app", &[("scram_secret", &app_secret)])
        .user_keys(
            "appclient",
            &[
                ("password", CLIENT_PW),
                ("server_user", "mapped"),
                ("server_password_env", "PGSWITCH_TEST_SERVER_PW"),
            ],
        )
        .toml();
        let proxy = Proxy::start(&toml);
        assert_eq!(current_user(&proxy, "app", APP_PW).await, "app");
        assert_eq!(current_user(&proxy, "dyn", DYN_PW).await, "dyn");
        assert_eq!(current_user(&proxy, "appclient", CLIENT_PW).await, "mapped");
        assert_refused(&proxy, "app", "Wrong-Zq9").await;
        assert_refused(&proxy, "dyn", "Wrong-Zq9").await;
        assert_refused(&proxy, "nobody", APP_PW).await;
        // A reload derives secrets again.
        proxy.signal(SIGHUP);
        assert!(proxy.wait_for_log("configuration reloaded", Duration::from_secs(10)));
        assert_eq!(current_user(&proxy, "dyn", DYN_PW).await, "dyn");

        let logs = proxy.logs();
        assert!(logs.contains("DEBUG"), "RUST_LOG=debug did not take effect");
        let mut needles = vec![
            APP_PW.to_owned(),
            DYN_PW.to_owned(),
            AUTH_PW.to_owned(),
            CLIENT_PW.to_owned(),
            "Srv-Zq9".to_owned(),
            "Wrong-Zq9".to_owned(),
        ];
        for (secret, password) in [(&app_secret, APP_PW), (&dyn_secret, DYN_PW)] {
            let parsed = ScramSecret::parse(secret).unwrap();
            needles.push(secret.clone());
            needles.push(BASE64.encode(parsed.stored_key));
            needles.push(BASE64.encode(parsed.server_key));
            let client_key = parsed.client_key_for_password(password);
            needles.push(BASE64.encode(client_key));
            needles.push(format!("{client_key:?}"));
        }
        for needle in needles {
            assert!(
                !logs.contains(&needle),
                "{needle:?} in the proxy log:\n{logs}"
            );
        }
    });
}
