//! Wire-protocol behaviour of pgswitch against real PostgreSQL servers:
//! startup negotiation (SSL/GSS refusal, protocol versions, malformed
//! packets), backend selection, client and server authentication, cancel
//! requests, connection logging and max_client_conn.
//!
//! Raw-protocol tests build the bytes by hand (tokio `TcpStream`); everything
//! else uses tokio-postgres or psql as the client.
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::message::frontend;
use support::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

const USER: &str = "app";
const PASSWORD: &str = "secret";

// ---------------------------------------------------------------------------
// configuration helpers
// ---------------------------------------------------------------------------

/// These tests' proxy settings in front of backend blue on port `blue`.
fn cfg(blue: u16) -> ProxyConfig {
    ProxyConfig::new(blue).set_all(&[
        ("pool_mode", "transaction"),
        ("auth_method", "scram-sha-256"),
        ("default_pool_size", "20"),
        ("max_client_conn", "5000"),
        ("query_wait_timeout", "5s"),
    ])
}

/// Starts `cfg` with blue active and the user app/secret.
fn start(cfg: ProxyConfig) -> Proxy {
    cfg.table("[cutover]\nactive = \"blue\"")
        .user(USER, PASSWORD)
        .start()
}

/// A PG 15 server with role app/secret and a proxy (scram to clients) in front.
fn pg_and_proxy(hba: HbaAuth) -> (PgServer, Proxy) {
    let pg = pg_with_app(
        PgOptions {
            auth: hba,
            ..Default::default()
        },
        None,
    );
    let proxy = start(cfg(pg.port));
    (pg, proxy)
}

/// tokio-postgres config for a TCP connection through the proxy.
fn proxy_config(proxy: &Proxy, user: &str, password: Option<&str>) -> tokio_postgres::Config {
    client_config(proxy.port, user, password, "postgres")
}

async fn try_connect(
    proxy: &Proxy,
    user: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_with(&proxy_config(proxy, user, password)).await
}

async fn connect(proxy: &Proxy) -> tokio_postgres::Client {
    try_connect(proxy, USER, Some(PASSWORD))
        .await
        .unwrap_or_else(|e| panic!("connect through proxy port {}: {e:?}", proxy.port))
}

/// SQLSTATE and message of a tokio-postgres error that must be a server error.
fn db_error(e: &tokio_postgres::Error) -> (String, String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got: {e:?}"));
    (
        db.code().code().to_owned(),
        db.severity().to_owned(),
        db.message().to_owned(),
    )
}

async fn select_int(client: &tokio_postgres::Client, sql: &str) -> i32 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

// ---------------------------------------------------------------------------
// raw protocol helpers
// ---------------------------------------------------------------------------

/// Sends a CancelRequest to `port` and waits until the proxy has handled it
/// (it closes the connection once the request is processed).
async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut raw = Raw::connect(port).await;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    raw.send(&out).await;
    raw.expect_eof().await;
}

/// Polls `pg` until a backend runs `query` (state active), up to 10 s.
async fn wait_until_running(admin: &tokio_postgres::Client, query: &str) {
    wait_until(
        Duration::from_secs(10),
        &format!("query {query:?} never showed up as active on the server"),
        || async {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                    &[&query],
                )
                .await
                .unwrap()
                .get(0);
            n > 0
        },
    )
    .await;
}

/// Proxy log with ANSI escape sequences (colours) removed.
fn plain_logs(proxy: &Proxy) -> String {
    let raw = proxy.logs();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Log lines of finished sessions ("client closed", not the login failures).
fn session_close_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("client closed") && !l.contains("client closed during login"))
        .collect()
}

fn count_lines(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

// ---------------------------------------------------------------------------
// 1. startup
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_is_refused_with_n_then_startup_succeeds() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&request_code(SSL_REQUEST)).await;
    assert_eq!(raw.read_byte().await, b'N', "SSLRequest answer");
    // Nothing else may follow the 'N' before the client speaks.
    assert!(raw.buf.is_empty(), "extra bytes after 'N': {:?}", raw.buf);
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    raw.login(PASSWORD).await;
    let rows = raw.simple_query("SELECT 40 + 2").await.unwrap();
    assert_eq!(rows, vec![vec![Some("42".to_owned())]]);
    raw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_refused_with_n_then_startup_succeeds() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&request_code(GSSENC_REQUEST)).await;
    assert_eq!(raw.read_byte().await, b'N', "GSSENCRequest answer");
    assert!(raw.buf.is_empty(), "extra bytes after 'N': {:?}", raw.buf);
    // A client may then try SSL too, and then go on in plaintext.
    raw.send(&request_code(SSL_REQUEST)).await;
    assert_eq!(
        raw.read_byte().await,
        b'N',
        "SSLRequest after GSSENC answer"
    );
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    raw.login(PASSWORD).await;
    let rows = raw.simple_query("SELECT 'ok'").await.unwrap();
    assert_eq!(rows, vec![vec![Some("ok".to_owned())]]);
    raw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_major_versions_get_fatal_0a000() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    for (version, label) in [(2 << 16, "2.0"), (4 << 16, "4.0")] {
        let mut raw = Raw::connect(proxy.port).await;
        raw.send(&startup_packet(
            version,
            &[("user", USER), ("database", "postgres")],
        ))
        .await;
        let e = raw.expect_error().await;
        assert_fatal(&e, "0A000", label);
        assert!(
            e.get(&'M').is_some_and(|m| m.contains(label)),
            "{label}: message should name the version: {e:?}"
        );
        raw.expect_eof().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_startup_lengths_get_08p01() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let cases: [(&str, Vec<u8>); 3] = [
        ("length 2", 2i32.to_be_bytes().to_vec()),
        ("length 9999999", {
            let mut v = 9_999_999i32.to_be_bytes().to_vec();
            v.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
            v
        }),
        ("negative length", (-1i32).to_be_bytes().to_vec()),
    ];
    for (label, bytes) in cases {
        let mut raw = Raw::connect(proxy.port).await;
        raw.send(&bytes).await;
        let e = raw.expect_error().await;
        assert_fatal(&e, "08P01", label);
        raw.expect_eof().await;
    }
    // The proxy is still fine afterwards.
    let client = connect(&proxy).await;
    assert_eq!(select_int(&client, "SELECT 1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_without_user_gets_fatal_28000() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    for params in [
        &[("database", "postgres")][..],
        &[][..],
        &[("user", ""), ("database", "postgres")][..],
    ] {
        let mut raw = Raw::connect(proxy.port).await;
        raw.send(&startup_packet(PROTOCOL_3_0, params)).await;
        let e = raw.expect_error().await;
        assert_eq!(
            e.get(&'S').map(String::as_str),
            Some("FATAL"),
            "{params:?}: {e:?}"
        );
        assert_eq!(
            e.get(&'C').map(String::as_str),
            Some("28000"),
            "{params:?}: {e:?}"
        );
        assert_eq!(
            e.get(&'M').map(String::as_str),
            Some("no PostgreSQL user name specified in startup packet"),
            "{params:?}"
        );
        raw.expect_eof().await;
    }
}

/// Writes all of `bytes` (a write error is returned, not raised: the peer
/// may close early), then reads until the peer closes. Returns the write's
/// outcome, everything read, and how the reading ended (None: an orderly
/// EOF; Some: the error, ECONNRESET for a reset).
async fn send_all_then_read(
    port: u16,
    bytes: &[u8],
) -> (std::io::Result<()>, Vec<u8>, Option<std::io::Error>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let written = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    let ended = loop {
        match tokio::time::timeout(RAW_IO_TIMEOUT, stream.read(&mut chunk)).await {
            Err(_) => panic!("no EOF within {RAW_IO_TIMEOUT:?}; read {got:?}"),
            Ok(Ok(0)) => break None,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break Some(e),
        }
    };
    (written, got, ended)
}

/// 4 KB of garbage (an HTTP request sent to the PostgreSQL port) or a
/// 100 kB startup packet: the proxy refuses after the first bytes, with the
/// client's other bytes still unread. The client must get the 08P01
/// ErrorResponse and an orderly close, not a connection reset (which on
/// the client's side can come before, and instead of, the error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_startup_with_unread_bytes_gets_its_error_not_a_reset() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let garbage: Vec<u8> = b"GET /status HTTP/1.1\r\nHost: db\r\nX-Filler: "
        .iter()
        .copied()
        .chain(std::iter::repeat(b'x'))
        .take(4096)
        .collect();
    let long_value = "v".repeat(100_000);
    let oversized = startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("application_name", &long_value)],
    );
    assert!(oversized.len() > 100_000);
    for (label, bytes) in [("4 KB of garbage", garbage), ("100 kB startup", oversized)] {
        for round in 0..5 {
            let (written, got, ended) = send_all_then_read(proxy.port, &bytes).await;
            let label = format!("{label} (round {round})");
            assert!(
                ended.is_none(),
                "{label}: the read ended with {ended:?} instead of EOF (write: {written:?}, read {} bytes: {:?})",
                got.len(),
                String::from_utf8_lossy(&got)
            );
            assert!(written.is_ok(), "{label}: write failed: {written:?}");
            assert_eq!(got.first(), Some(&b'E'), "{label}: {got:?}");
            let e = error_fields(&got[5..]);
            assert_fatal(&e, "08P01", &label);
        }
    }
    // The proxy is still fine afterwards.
    let client = connect(&proxy).await;
    assert_eq!(select_int(&client, "SELECT 1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_gets_negotiate_protocol_version_then_works() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_2,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    let Msg { tag, body } = raw.read_msg().await;
    assert_eq!(
        tag as char,
        'v',
        "expected NegotiateProtocolVersion first, got {:?}",
        String::from_utf8_lossy(&body)
    );
    let mut b = &body[..];
    let newest = b.get_i32();
    let unrecognized = b.get_i32();
    assert_eq!(newest, PROTOCOL_3_0, "newest minor version supported");
    assert_eq!(unrecognized, 0, "no _pq_ options were sent");
    assert!(b.is_empty(), "trailing bytes in NegotiateProtocolVersion");
    raw.login(PASSWORD).await;
    let rows = raw.simple_query("SELECT 7 * 6").await.unwrap();
    assert_eq!(rows, vec![vec![Some("42".to_owned())]]);
    raw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_options_get_negotiate_protocol_version_listing_them() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[
            ("user", USER),
            ("_pq_.made_up_option", "on"),
            ("database", "postgres"),
        ],
    ))
    .await;
    let Msg { tag, body } = raw.read_msg().await;
    assert_eq!(tag as char, 'v', "{:?}", String::from_utf8_lossy(&body));
    let mut b = &body[..];
    assert_eq!(b.get_i32(), PROTOCOL_3_0);
    assert_eq!(b.get_i32(), 1, "one unrecognized option");
    assert_eq!(b, b"_pq_.made_up_option\0");
    raw.login(PASSWORD).await;
    assert_eq!(
        raw.simple_query("SELECT 1").await.unwrap(),
        vec![vec![Some("1".to_owned())]]
    );
    raw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_prefer_falls_back_to_plaintext() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let port = proxy.port;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(psql_bin())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={port} user={USER} dbname=postgres sslmode=prefer connect_timeout=10"
            ))
            .args(["-c", "SELECT 'via-proxy', inet_server_port() IS NOT NULL"])
            .env("PGPASSWORD", PASSWORD)
            .env_remove("PGSSLMODE")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .expect("spawn psql")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-proxy|t");
}

// ---------------------------------------------------------------------------
// 2. backend selection
// ---------------------------------------------------------------------------

async fn check_active_backend(active: &str) {
    let (blue, green) = std::thread::scope(|s| {
        let b = s.spawn(|| PgServer::start(PgOptions::default()));
        let g = s.spawn(|| PgServer::start(PgOptions::default()));
        (b.join().unwrap(), g.join().unwrap())
    });
    for pg in [&blue, &green] {
        pg.create_user(USER, PASSWORD);
    }
    green.psql("CREATE TABLE only_on_green (x int); GRANT SELECT ON only_on_green TO app");
    blue.psql("CREATE TABLE only_on_blue (x int); GRANT SELECT ON only_on_blue TO app");
    let proxy = cfg(blue.port)
        .backend("green", green.port)
        .table(&format!("[cutover]\nactive = \"{active}\""))
        .user(USER, PASSWORD)
        .start();
    let (want, other, want_table, other_table) = if active == "green" {
        (green.port, blue.port, "only_on_green", "only_on_blue")
    } else {
        (blue.port, green.port, "only_on_blue", "only_on_green")
    };
    let client = connect(&proxy).await;
    for _ in 0..3 {
        let port = select_int(&client, "SELECT inet_server_port()").await;
        assert_eq!(
            port as u16, want,
            "queries must reach {active} (other: {other})"
        );
    }
    client
        .simple_query(&format!("SELECT * FROM {want_table}"))
        .await
        .unwrap_or_else(|e| panic!("{want_table} must exist on the active side: {e:?}"));
    let err = client
        .simple_query(&format!("SELECT * FROM {other_table}"))
        .await
        .expect_err("table of the inactive side must not be visible");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    // A second client lands on the same side.
    let client2 = connect(&proxy).await;
    assert_eq!(
        select_int(&client2, "SELECT inet_server_port()").await as u16,
        want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_green_routes_queries_to_green() {
    check_active_backend("green").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_blue_routes_queries_to_blue() {
    check_active_backend("blue").await;
}

// ---------------------------------------------------------------------------
// 3. login
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_login_right_password_works() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let client = connect(&proxy).await;
    let row = client
        .query_one("SELECT current_user::text, 1 + 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), USER);
    assert_eq!(row.get::<_, i32>(1), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_wrong_password_and_unknown_user_get_identical_28p01() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let e = try_connect(&proxy, USER, Some("wrong"))
        .await
        .expect_err("wrong password accepted");
    let (code, severity, message) = db_error(&e);
    assert_eq!(code, "28P01");
    assert_eq!(severity, "FATAL");
    assert_eq!(message, "password authentication failed for user \"app\"");

    let e = try_connect(&proxy, "nobody", Some(PASSWORD))
        .await
        .expect_err("unknown user accepted");
    let (code, severity, message) = db_error(&e);
    assert_eq!(
        code, "28P01",
        "unknown user must look like a wrong password"
    );
    assert_eq!(severity, "FATAL");
    assert_eq!(
        message,
        "password authentication failed for user \"nobody\""
    );

    // The right password still works after failures.
    let client = connect(&proxy).await;
    assert_eq!(select_int(&client, "SELECT 3").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_auth_logs_in_without_password_backend_still_uses_scram() {
    // The backend demands SCRAM; the client sends no password at all.
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(cfg(pg.port).auth_method("trust"));
    let client = try_connect(&proxy, USER, None)
        .await
        .unwrap_or_else(|e| panic!("trust login without a password failed: {e:?}"));
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), USER);
    // The server side really authenticated app over TCP with scram.
    let admin = pg.admin().await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND client_addr IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1, "no TCP backend connection of app on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_client_auth_right_and_wrong_password() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(cfg(pg.port).auth_method("md5"));

    // The proxy must really ask for md5 (tokio-postgres would follow any method).
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    let Msg { tag, body } = raw.read_msg().await;
    assert_eq!(tag, b'R');
    assert_eq!(
        &body[..4],
        &5i32.to_be_bytes(),
        "AuthenticationMD5Password expected"
    );
    let salt: [u8; 4] = body[4..8].try_into().unwrap();
    let hash =
        postgres_protocol::authentication::md5_hash(USER.as_bytes(), PASSWORD.as_bytes(), salt);
    let mut out = BytesMut::new();
    frontend::password_message(hash.as_bytes(), &mut out).unwrap();
    raw.send(&out).await;
    raw.login(PASSWORD).await;
    assert_eq!(
        raw.simple_query("SELECT 5").await.unwrap(),
        vec![vec![Some("5".to_owned())]]
    );
    raw.terminate().await;

    let client = connect(&proxy).await;
    assert_eq!(select_int(&client, "SELECT 4").await, 4);

    let e = try_connect(&proxy, USER, Some("wrong"))
        .await
        .expect_err("md5: wrong password accepted");
    let (code, severity, message) = db_error(&e);
    assert_eq!(code, "28P01");
    assert_eq!(severity, "FATAL");
    assert_eq!(message, "password authentication failed for user \"app\"");

    let e = try_connect(&proxy, "nobody", Some(PASSWORD))
        .await
        .expect_err("md5: unknown user accepted");
    let (code, _, message) = db_error(&e);
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "password authentication failed for user \"nobody\""
    );
}

async fn check_backend_hba(hba: HbaAuth) {
    let (pg, proxy) = pg_and_proxy(hba);
    // Sanity: the server really demands that method.
    let hba_file = std::fs::read_to_string(pg.data_dir.join("pg_hba.conf")).unwrap();
    assert!(
        hba_file.contains(&format!("127.0.0.1/32 {}", hba.hba_method())),
        "{hba_file}"
    );
    let client = connect(&proxy).await;
    let row = client
        .query_one("SELECT current_user::text, 10 + 1", &[])
        .await
        .unwrap_or_else(|e| panic!("query via a {hba:?} backend: {e:?}"));
    assert_eq!(row.get::<_, String>(0), USER);
    assert_eq!(row.get::<_, i32>(1), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_demanding_md5_works() {
    check_backend_hba(HbaAuth::Md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_demanding_cleartext_password_works() {
    check_backend_hba(HbaAuth::Password).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_login_failure_surfaces_server_28p01() {
    let pg = PgServer::start(PgOptions::default());
    // The proxy knows app/secret, the server has another password.
    pg.create_user(USER, "different-on-server");
    let proxy = start(cfg(pg.port));
    let started = Instant::now();
    let e = try_connect(&proxy, USER, Some(PASSWORD))
        .await
        .expect_err("login succeeded although the server refuses the password");
    let (code, severity, message) = db_error(&e);
    assert_eq!(
        code, "28P01",
        "server's SQLSTATE must reach the client: {message}"
    );
    assert_eq!(severity, "FATAL");
    assert_eq!(message, "password authentication failed for user \"app\"");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the failure took {:?}",
        started.elapsed()
    );
    // A second attempt gets the same (not a cached success, not a hang).
    let e = try_connect(&proxy, USER, Some(PASSWORD))
        .await
        .expect_err("second login succeeded although the server refuses the password");
    assert_eq!(db_error(&e).0, "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_surfaces_server_3d000() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let mut c = proxy_config(&proxy, USER, Some(PASSWORD));
    c.dbname("no_such_db");
    let e = c
        .connect(NoTls)
        .await
        .map(|_| ())
        .expect_err("login to a missing database succeeded");
    let (code, severity, message) = db_error(&e);
    assert_eq!(code, "3D000", "{message}");
    assert_eq!(severity, "FATAL");
    assert_eq!(message, "database \"no_such_db\" does not exist");
}

// ---------------------------------------------------------------------------
// 4. cancel
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_target_query() {
    let (pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    check_cancel_only_target(&pg, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_target_query_in_session_mode() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(cfg(pg.port).pool_mode("session"));
    check_cancel_only_target(&pg, &proxy).await;
}

async fn check_cancel_only_target(pg: &PgServer, proxy: &Proxy) {
    let admin = pg.admin().await;
    let victim = connect(proxy).await;
    let bystander = connect(proxy).await;
    let token = victim.cancel_token();

    let long = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = victim.simple_query("select pg_sleep(30)").await;
        (r, t0.elapsed())
    });
    wait_until_running(&admin, "select pg_sleep(30)").await;
    let short = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = bystander.simple_query("select pg_sleep(1.5)").await;
        (r, t0.elapsed())
    });
    wait_until_running(&admin, "select pg_sleep(1.5)").await;

    token.cancel_query(NoTls).await.expect("send cancel");

    let (r, took) = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("cancelled query did not end within 10s")
        .unwrap();
    let err = r.expect_err("pg_sleep(30) was not cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");

    let (r, took) = tokio::time::timeout(Duration::from_secs(10), short)
        .await
        .expect("bystander query did not end")
        .unwrap();
    r.unwrap_or_else(|e| panic!("the other client's query was hit by the cancel: {e:?}"));
    assert!(
        took >= Duration::from_millis(1400),
        "pg_sleep(1.5) ended after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_wrong_secret_does_nothing() {
    let (pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let admin = pg.admin().await;

    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    let (pid, secret) = raw.login(PASSWORD).await;

    let t0 = Instant::now();
    raw.send_query("select pg_sleep(1)").await;
    wait_until_running(&admin, "select pg_sleep(1)").await;
    // Wrong secret for the right key, and a key that doesn't exist.
    send_cancel(proxy.port, pid, secret.wrapping_add(1)).await;
    send_cancel(proxy.port, pid, !secret).await;
    send_cancel(proxy.port, pid.wrapping_add(1000), secret).await;
    let r = raw.read_query_result().await;
    assert!(
        r.is_ok(),
        "query was cancelled by a wrong-secret CancelRequest: {r:?}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(950));

    // Positive control: the right key cancels a running query.
    raw.send_query("select pg_sleep(20)").await;
    wait_until_running(&admin, "select pg_sleep(20)").await;
    send_cancel(proxy.port, pid, secret).await;
    let r = tokio::time::timeout(Duration::from_secs(10), raw.read_query_result())
        .await
        .expect("right-secret cancel did not end the query");
    let e = r.expect_err("right-secret cancel had no effect");
    assert_eq!(e.get(&'C').map(String::as_str), Some("57014"), "{e:?}");
    raw.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_after_ssl_request_is_honoured() {
    // libpq 17's cancel API negotiates SSL (gets 'N') before the CancelRequest.
    let (pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let admin = pg.admin().await;
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    let (pid, secret) = raw.login(PASSWORD).await;
    raw.send_query("select pg_sleep(25)").await;
    wait_until_running(&admin, "select pg_sleep(25)").await;

    let mut cancel = Raw::connect(proxy.port).await;
    cancel.send(&request_code(SSL_REQUEST)).await;
    assert_eq!(cancel.read_byte().await, b'N');
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    cancel.send(&out).await;
    cancel.expect_eof().await;

    let r = tokio::time::timeout(Duration::from_secs(10), raw.read_query_result())
        .await
        .expect("cancel after SSLRequest did not end the query");
    let e = r.expect_err("cancel after SSLRequest had no effect");
    assert_eq!(e.get(&'C').map(String::as_str), Some("57014"), "{e:?}");
    // The session survives a cancelled query.
    assert_eq!(
        raw.simple_query("SELECT 1").await.unwrap(),
        vec![vec![Some("1".to_owned())]]
    );
    raw.terminate().await;
}

// ---------------------------------------------------------------------------
// 5. logs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connect_and_one_close_line_and_no_per_query_lines() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let before = plain_logs(&proxy);
    let connected_before = count_lines(&before, "client connected");
    let closed_before = session_close_lines(&before).len();

    let client = connect(&proxy).await;
    assert_eq!(select_int(&client, "SELECT 0").await, 0);
    // Now connected: exactly one new "client connected".
    assert!(proxy.wait_for_log("client connected", Duration::from_secs(5)));
    let mid = plain_logs(&proxy);
    assert_eq!(
        count_lines(&mid, "client connected"),
        connected_before + 1,
        "{mid}"
    );
    let mid_lines = mid.lines().count();

    for i in 0..50 {
        assert_eq!(select_int(&client, &format!("SELECT {i}")).await, i);
    }
    client
        .simple_query("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    let after_queries = plain_logs(&proxy);
    assert_eq!(
        after_queries.lines().count(),
        mid_lines,
        "queries added log lines:\n{}",
        after_queries
            .lines()
            .skip(mid_lines)
            .collect::<Vec<_>>()
            .join("\n")
    );

    drop(client); // sends Terminate
    let logs = wait_for(Duration::from_secs(5), || async {
        let logs = plain_logs(&proxy);
        (session_close_lines(&logs).len() > closed_before).then_some(logs)
    })
    .await
    .unwrap_or_else(|| plain_logs(&proxy));
    let closes = session_close_lines(&logs);
    assert_eq!(closes.len(), closed_before + 1, "{logs}");
    let close = closes.last().unwrap();
    assert!(close.contains("duration_ms="), "no duration_ms: {close}");
    assert!(close.contains("reason="), "no reason: {close}");
    assert!(close.contains("user=app"), "no user: {close}");
    assert_eq!(
        count_lines(&logs, "client connected"),
        connected_before + 1,
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnect_logs_one_close_line() {
    let (_pg, proxy) = pg_and_proxy(HbaAuth::ScramSha256);
    let closed_before = session_close_lines(&plain_logs(&proxy)).len();
    let mut raw = Raw::connect(proxy.port).await;
    raw.send(&startup_packet(
        PROTOCOL_3_0,
        &[("user", USER), ("database", "postgres")],
    ))
    .await;
    raw.login(PASSWORD).await;
    assert!(raw.simple_query("SELECT 1").await.is_ok());
    drop(raw); // no Terminate: the socket just closes
    let logs = wait_for(Duration::from_secs(5), || async {
        let logs = plain_logs(&proxy);
        (session_close_lines(&logs).len() > closed_before).then_some(logs)
    })
    .await
    .unwrap_or_else(|| panic!("no close line:\n{}", plain_logs(&proxy)));
    let closes = session_close_lines(&logs);
    assert_eq!(closes.len(), closed_before + 1, "{logs}");
    let line = closes.last().unwrap();
    assert!(line.contains("duration_ms="), "{line}");
    assert!(line.contains("reason="), "{line}");
}

#[test]
fn no_password_in_logs_at_debug_level() {
    // nextest runs each test in its own process, so this only affects this
    // test's proxies; set before any thread exists.
    std::env::set_var("RUST_LOG", "debug");
    const SECRET: &str = "Zq9-unmistakable-pw-7Hx";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pg = PgServer::start(PgOptions::default());
        pg.create_user(USER, SECRET);
        pg.create_user("other", "server-side-differs");
        let proxy = cfg(pg.port)
            .table("[cutover]\nactive = \"blue\"")
            .user(USER, SECRET)
            .user("other", SECRET)
            .start();

        // Successful scram login + queries (the proxy logs in to the server with SECRET).
        let client = try_connect(&proxy, USER, Some(SECRET)).await.unwrap();
        for _ in 0..5 {
            client.simple_query("SELECT 1").await.unwrap();
        }
        // Failed client logins.
        assert!(try_connect(&proxy, USER, Some("wrong-Zq9")).await.is_err());
        assert!(try_connect(&proxy, "nobody", Some(SECRET)).await.is_err());
        // A backend login failure.
        assert!(try_connect(&proxy, "other", Some(SECRET)).await.is_err());
        drop(client);

        assert!(
            proxy.wait_for_log("client closed", Duration::from_secs(5)),
            "{}",
            proxy.logs()
        );
        let logs = proxy.logs();
        let plain = plain_logs(&proxy);
        assert!(
            plain.contains(" DEBUG "),
            "RUST_LOG=debug did not take effect:\n{logs}"
        );
        assert!(!logs.contains(SECRET), "password in the proxy log:\n{logs}");
        assert!(
            !logs.contains("wrong-Zq9"),
            "attempted password in the log:\n{logs}"
        );
    });
}

// ---------------------------------------------------------------------------
// 6. max_client_conn
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_third_client_with_53300() {
    let pg = pg_with_app(PgOptions::default(), None);
    let proxy = start(cfg(pg.port).set("max_client_conn", 2));
    // Proxy::start probes the port with a bare TCP connect; let that one end.
    assert!(proxy.wait_for_log("client closed during login", Duration::from_secs(5)));

    let a = connect(&proxy).await;
    let b = connect(&proxy).await;
    assert_eq!(select_int(&a, "SELECT 1").await, 1);
    assert_eq!(select_int(&b, "SELECT 2").await, 2);

    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        try_connect(&proxy, USER, Some(PASSWORD)),
    )
    .await
    .expect("third client neither admitted nor refused within 5s");
    let took = t0.elapsed();
    let e = r.expect_err("third client admitted past max_client_conn = 2");
    let (code, severity, _) = db_error(&e);
    assert_eq!(code, "53300");
    assert_eq!(severity, "FATAL");
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    // The first two keep working.
    assert_eq!(select_int(&a, "SELECT 10").await, 10);
    assert_eq!(select_int(&b, "SELECT 20").await, 20);

    // Once one leaves, a new client gets in.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        match try_connect(&proxy, USER, Some(PASSWORD)).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(db_error(&e).0, "53300");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("slot never freed: {e:?}"),
        }
    };
    assert_eq!(select_int(&c, "SELECT 30").await, 30);
    assert_eq!(select_int(&a, "SELECT 40").await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_still_works_when_max_client_conn_is_reached() {
    let pg = pg_with_app(PgOptions::default(), None);
    let admin = pg.admin().await;
    let proxy = start(cfg(pg.port).set("max_client_conn", 2));
    assert!(proxy.wait_for_log("client closed during login", Duration::from_secs(5)));

    let a = connect(&proxy).await;
    let _b = connect(&proxy).await;
    let token = a.cancel_token();
    let long = tokio::spawn(async move { a.simple_query("select pg_sleep(30)").await });
    wait_until_running(&admin, "select pg_sleep(30)").await;
    // The CancelRequest is a third connection, but it is not a client session.
    token.cancel_query(NoTls).await.expect("send cancel");
    let r = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("cancel at max_client_conn did not end the query")
        .unwrap();
    let err = r.expect_err("pg_sleep(30) was not cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
}

/// A FATAL error with SQLSTATE `code`, as the proxy answers bad startup input.
fn assert_fatal(e: &std::collections::HashMap<char, String>, code: &str, label: &str) {
    assert_eq!(
        e.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{label}: {e:?}"
    );
    assert_eq!(
        e.get(&'C').map(String::as_str),
        Some(code),
        "{label}: {e:?}"
    );
}
