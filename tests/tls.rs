//! TLS on both legs, against real PostgreSQL servers (tests/support): psql
//! with sslmode=require / verify-full through pgswitch, client_tls = "require",
//! backends that only accept TLS (server_tls = require / verify-ca /
//! verify-full), PostgreSQL 17's direct TLS with ALPN (a raw rustls client:
//! the harness's psql 15 can't do sslnegotiation=direct), and certificate
//! reload on SIGHUP under a live TLS session.
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USER: &str = "app";
const PASSWORD: &str = "secret";
const DB: &str = "appdb";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- certificates

/// A CA and a server certificate it signed, for "localhost" and 127.0.0.1,
/// written as PEM files into a directory PostgreSQL can read.
struct Certs {
    dir: PathBuf,
    ca_pem: String,
    cert_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl Certs {
    fn generate(dir: &Path, name: &str) -> Certs {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("pgswitch test CA {name}"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let certs = Certs {
            dir: dir.to_owned(),
            ca_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        certs.write(name);
        certs
    }

    fn path(&self, name: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{name}.{what}"))
    }

    /// `<name>.crt`, `<name>.key` (0600, owned by the PostgreSQL OS user, as
    /// PostgreSQL demands), `<name>-ca.pem`.
    fn write(&self, name: &str) {
        write_file(&self.path(name, "crt"), &self.cert_pem, 0o644);
        write_file(&self.path(name, "key"), &self.key_pem, 0o600);
        write_file(
            &self.dir.join(format!("{name}-ca.pem")),
            &self.ca_pem,
            0o644,
        );
    }
}

fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    chown_for_pg(path);
}

fn cert_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgswitch-tls-")
        .tempdir_in(test_tmp_base())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_for_pg(dir.path());
    dir
}

// ---------------------------------------------------------------- servers

/// A PostgreSQL 15 server with role `app` owning `appdb`. With `tls`, it
/// serves that certificate and accepts only TLS connections over TCP
/// (`hostssl` lines only).
fn start_pg(tls: Option<(&Certs, &str)>) -> PgServer {
    let mut opts = PgOptions::default();
    if let Some((certs, name)) = tls {
        opts.extra_conf = vec![
            "ssl = on".into(),
            format!("ssl_cert_file = '{}'", certs.path(name, "crt").display()),
            format!("ssl_key_file = '{}'", certs.path(name, "key").display()),
        ];
    }
    let pg = pg_with_app(opts, Some(DB));
    if tls.is_some() {
        std::fs::write(
            pg.data_dir.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        pg.psql("SELECT pg_reload_conf()");
        // The reload is asynchronous: wait until plaintext logins are refused.
        wait_until_sync(
            Duration::from_secs(10),
            "hostssl-only pg_hba.conf not in effect",
            || !psql(pg.port, "sslmode=disable", "SELECT 1", &[]).ok,
        );
    }
    pg
}

struct ProxyTls<'a> {
    proxy: &'a [(&'a str, String)],
    backend: &'a [(&'a str, String)],
    backend_host: &'a str,
}

fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// The proxy in front of `backend_port`, as app/secret; `tls` values are
/// plain strings (quoted by [`ProxyConfig`]).
fn start_proxy(backend_port: u16, tls: &ProxyTls) -> Proxy {
    let mut cfg = ProxyConfig::new(backend_port)
        .set("server_connect_timeout", "5s")
        .backend_host(tls.backend_host)
        .user(USER, PASSWORD);
    for (k, v) in tls.proxy {
        cfg = cfg.set(k, v);
    }
    for (k, v) in tls.backend {
        cfg = cfg.backend_set(k, v);
    }
    cfg.start()
}

// ---------------------------------------------------------------- psql

struct PsqlOut {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// psql to 127.0.0.1 (or `host=` in `extra`) on `port` as app/secret.
fn psql(port: u16, extra: &str, sql: &str, env: &[(&str, &str)]) -> PsqlOut {
    let has_host = extra.split_whitespace().any(|kv| kv.starts_with("host="));
    let host = if has_host { "" } else { "host=127.0.0.1" };
    let conninfo = format!("{host} port={port} user={USER} dbname={DB} {extra}");
    let out = Command::new(psql_bin())
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(&conninfo)
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("spawn psql");
    PsqlOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
fn psql_ok(port: u16, extra: &str, sql: &str) -> String {
    let out = psql(port, extra, sql, &[]);
    assert!(out.ok, "psql {extra:?} {sql:?} failed: {}", out.stderr);
    out.stdout
}

/// Whether the server's own connection for this session is TLS: proves the
/// server leg (the client leg is whatever psql asked for).
const SERVER_SIDE_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

// ---------------------------------------------------------------- raw client

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to pgswitch with TLS: `direct` (PostgreSQL 17 style: ClientHello
/// first) or after an SSLRequest.
async fn tls_connect(
    port: u16,
    ca_pem: &str,
    alpn: &[&[u8]],
    direct: bool,
) -> std::io::Result<TlsClient> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    if !direct {
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        assert_eq!(answer[0], b'S', "SSLRequest not accepted");
    }
    let connector = TlsConnector::from(client_config(ca_pem, alpn));
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
}

fn peer_cert(s: &TlsClient) -> Vec<u8> {
    let certs: &[CertificateDer] = s.get_ref().1.peer_certificates().unwrap();
    certs[0].to_vec()
}

async fn send_startup<S: AsyncWrite + Unpin>(s: &mut S) {
    let mut body = BytesMut::new();
    body.put_i32(196_608);
    for (k, v) in [("user", USER), ("database", DB)] {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut msg = BytesMut::new();
    msg.put_i32(body.len() as i32 + 4);
    msg.put_slice(&body);
    s.write_all(&msg).await.unwrap();
    s.flush().await.unwrap();
}

/// Reads one backend message: (tag, body).
async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut header))
        .await
        .expect("read timed out")?;
    let len = (&header[1..]).get_i32() as usize;
    let mut body = vec![0u8; len - 4];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut body))
        .await
        .expect("read timed out")?;
    Ok((header[0], body))
}

/// Logs in (trust auth on pgswitch) and waits for ReadyForQuery.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    send_startup(s).await;
    loop {
        let (tag, body) = read_message(s).await.unwrap();
        match tag {
            b'R' => assert_eq!(&body[..4], &[0, 0, 0, 0], "expected AuthenticationOk"),
            b'Z' => return,
            b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

/// Runs a simple query that returns one value.
async fn query_one<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, sql: &str) -> String {
    let mut msg = BytesMut::new();
    msg.put_u8(b'Q');
    msg.put_i32(sql.len() as i32 + 5);
    msg.put_slice(sql.as_bytes());
    msg.put_u8(0);
    s.write_all(&msg).await.unwrap();
    s.flush().await.unwrap();
    let mut value = None;
    loop {
        let (tag, body) = read_message(s).await.unwrap();
        match tag {
            b'D' => {
                let mut b = &body[2..];
                let len = b.get_i32() as usize;
                value = Some(String::from_utf8_lossy(&b[..len]).into_owned());
            }
            b'E' => panic!("query failed: {}", String::from_utf8_lossy(&body)),
            b'Z' => return value.expect("no row"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_with_psql_sslmode_require_and_verify_full() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "proxy");
    let pg = start_pg(None);
    let proxy = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[
                ("tls_cert", path_str(&certs.path("proxy", "crt"))),
                ("tls_key", path_str(&certs.path("proxy", "key"))),
            ],
            backend: &[],
            backend_host: "127.0.0.1",
        },
    );
    let ca = dir.path().join("proxy-ca.pem");

    // sslmode=require: encrypted, certificate not checked.
    assert_eq!(psql_ok(proxy.port, "sslmode=require", "SELECT 1"), "1");
    let info = psql_ok(proxy.port, "sslmode=require", "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");
    assert!(info.contains("TLSv1.3"), "{info}");

    // verify-full: chain and host name (DNS SAN "localhost", IP SAN 127.0.0.1).
    for host in ["localhost", "127.0.0.1"] {
        let extra = format!(
            "host={host} sslmode=verify-full sslrootcert={}",
            ca.display()
        );
        assert_eq!(psql_ok(proxy.port, &extra, "SELECT 2"), "2");
    }
    // The wrong CA is refused by the client.
    let other = Certs::generate(dir.path(), "other");
    let out = psql(
        proxy.port,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            dir.path().join("other-ca.pem").display()
        ),
        "SELECT 1",
        &[],
    );
    assert!(!out.ok, "verify-full accepted a certificate of another CA");
    assert!(
        out.stderr.contains("certificate verify failed"),
        "{}",
        out.stderr
    );
    drop(other);

    // TLS 1.2 works too.
    let out = psql(
        proxy.port,
        "sslmode=require ssl_max_protocol_version=TLSv1.2",
        "\\conninfo",
        &[],
    );
    assert!(
        out.ok && out.stdout.contains("TLSv1.2"),
        "{} {}",
        out.stdout,
        out.stderr
    );

    // client_tls defaults to "allow": plaintext still works.
    let info = psql_ok(proxy.port, "sslmode=disable", "\\conninfo");
    assert!(!info.contains("SSL connection"), "{info}");

    // The backend has no TLS: server_tls = "prefer" (default) fell back to plaintext.
    assert_eq!(psql_ok(proxy.port, "sslmode=require", SERVER_SIDE_SSL), "f");

    // A session over TLS carries big results both ways (buffered TLS writes).
    let big = psql_ok(
        proxy.port,
        "sslmode=require",
        "SELECT sum(length(repeat(md5(g::text), 100))) FROM generate_series(1, 20000) g",
    );
    assert_eq!(big, "64000000");
    let rows = psql_ok(
        proxy.port,
        "sslmode=require",
        "SELECT count(*) FROM (SELECT repeat('x', 1000) FROM generate_series(1, 5000)) s",
    );
    assert_eq!(rows, "5000");
    let out = psql(
        proxy.port,
        "sslmode=require",
        "SELECT repeat('y', 1000) FROM generate_series(1, 3000)",
        &[],
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_require_refuses_plaintext_with_fatal() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "proxy");
    let pg = start_pg(None);
    let proxy = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[
                ("tls_cert", path_str(&certs.path("proxy", "crt"))),
                ("tls_key", path_str(&certs.path("proxy", "key"))),
                ("client_tls", "require".into()),
            ],
            backend: &[],
            backend_host: "127.0.0.1",
        },
    );
    let out = psql(proxy.port, "sslmode=disable", "SELECT 1", &[]);
    assert!(
        !out.ok,
        "plaintext login accepted with client_tls = \"require\""
    );
    assert!(
        out.stderr.contains("connection without SSL refused")
            && out.stderr.contains("client_tls = \"require\"")
            && out.stderr.contains("SSL off"),
        "{}",
        out.stderr
    );
    // The SQLSTATE is 28000, as PostgreSQL's pg_hba refusal.
    let mut raw = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    send_startup(&mut raw).await;
    let (tag, body) = read_message(&mut raw).await.unwrap();
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("C28000"), "{text}");

    // sslmode=prefer (libpq's default) and require get in.
    assert_eq!(psql_ok(proxy.port, "sslmode=prefer", "SELECT 1"), "1");
    assert_eq!(psql_ok(proxy.port, "sslmode=require", "SELECT 1"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_modes_against_a_backend_that_requires_tls() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "pg");
    let pg = start_pg(Some((&certs, "pg")));
    let ca = path_str(&dir.path().join("pg-ca.pem"));
    // Sanity: the backend itself refuses plaintext, accepts TLS.
    assert_eq!(psql_ok(pg.port, "sslmode=require", SERVER_SIDE_SSL), "t");

    type Case<'a> = (&'a str, Vec<(&'a str, String)>, bool);
    let cases: Vec<Case> = vec![
        ("127.0.0.1", vec![("server_tls", "require".into())], true),
        ("127.0.0.1", vec![], true), // prefer: TLS when offered
        (
            "localhost",
            vec![
                ("server_tls", "verify-full".into()),
                ("server_tls_ca", ca.clone()),
            ],
            true,
        ),
        (
            "127.0.0.1",
            vec![
                ("server_tls", "verify-full".into()),
                ("server_tls_ca", ca.clone()),
            ],
            true,
        ),
        (
            "127.0.0.1",
            vec![
                ("server_tls", "verify-ca".into()),
                ("server_tls_ca", ca.clone()),
            ],
            true,
        ),
        ("127.0.0.1", vec![("server_tls", "disable".into())], false),
    ];
    for (host, backend, works) in cases {
        let proxy = start_proxy(
            pg.port,
            &ProxyTls {
                proxy: &[],
                backend: &backend,
                backend_host: host,
            },
        );
        let out = psql(proxy.port, "sslmode=disable", SERVER_SIDE_SSL, &[]);
        if works {
            assert!(out.ok, "{host} {backend:?}: {}", out.stderr);
            assert_eq!(out.stdout, "t", "{host} {backend:?}");
        } else {
            assert!(!out.ok, "{host} {backend:?} got in");
            assert!(
                out.stderr.contains("no pg_hba.conf entry"),
                "{}",
                out.stderr
            );
        }
    }

    // verify-full with a CA that didn't sign the server's certificate: 08006.
    let other = Certs::generate(dir.path(), "other");
    let wrong_ca = path_str(&dir.path().join("other-ca.pem"));
    for mode in ["verify-full", "verify-ca"] {
        let proxy = start_proxy(
            pg.port,
            &ProxyTls {
                proxy: &[],
                backend: &[
                    ("server_tls", mode.to_string()),
                    ("server_tls_ca", wrong_ca.clone()),
                ],
                backend_host: "localhost",
            },
        );
        let out = psql(proxy.port, "sslmode=disable", "SELECT 1", &[]);
        assert!(!out.ok, "{mode} with the wrong CA got in");
        assert!(
            out.stderr.contains("TLS handshake failed"),
            "{}",
            out.stderr
        );
    }
    drop(other);

    // require against a backend without TLS: refused, with the reason.
    let plain = start_pg(None);
    let proxy = start_proxy(
        plain.port,
        &ProxyTls {
            proxy: &[],
            backend: &[("server_tls", "require".into())],
            backend_host: "127.0.0.1",
        },
    );
    let out = psql(proxy.port, "sslmode=disable", "SELECT 1", &[]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("does not support TLS"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_legs_tls_with_pgbench() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "pg");
    let pg = start_pg(Some((&certs, "pg")));
    let proxy = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[
                ("tls_cert", path_str(&certs.path("pg", "crt"))),
                ("tls_key", path_str(&certs.path("pg", "key"))),
                ("default_pool_size", "4".into()),
            ],
            backend: &[
                ("server_tls", "verify-full".into()),
                ("server_tls_ca", path_str(&dir.path().join("pg-ca.pem"))),
            ],
            backend_host: "localhost",
        },
    );
    assert_eq!(psql_ok(proxy.port, "sslmode=require", SERVER_SIDE_SSL), "t");
    // pgbench over TLS on both legs.
    let run = |args: &[&str]| {
        let out = Command::new(pgbench_bin())
            .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string(), "-U", USER])
            .args(args)
            .arg(DB)
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "require")
            .stdin(Stdio::null())
            .output()
            .expect("spawn pgbench");
        assert!(
            out.status.success(),
            "pgbench {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["-i", "-q", "-s", "1"]);
    let out = run(&["-c", "8", "-j", "2", "-t", "100", "-M", "prepared"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    // A raw TLS client gets the SCRAM request through the encrypted leg.
    let ca = std::fs::read_to_string(dir.path().join("pg-ca.pem")).unwrap();
    let mut s = tls_connect(proxy.port, &ca, &[b"postgresql"], false)
        .await
        .unwrap();
    send_startup(&mut s).await;
    // SCRAM is needed here (auth_method default): just check we get the SASL request.
    let (tag, body) = read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &[0, 0, 0, 10], "expected AuthenticationSASL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "proxy");
    let pg = start_pg(None);
    let proxy = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[
                ("tls_cert", path_str(&certs.path("proxy", "crt"))),
                ("tls_key", path_str(&certs.path("proxy", "key"))),
                ("auth_method", "trust".into()),
            ],
            backend: &[],
            backend_host: "127.0.0.1",
        },
    );
    // PostgreSQL 17's sslnegotiation=direct: ClientHello first, ALPN "postgresql".
    let mut s = tls_connect(proxy.port, &certs.ca_pem, &[b"postgresql"], true)
        .await
        .expect("direct TLS handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    login(&mut s).await;
    assert_eq!(query_one(&mut s, "SELECT 40 + 2").await, "42");

    // Another protocol in ALPN: the handshake fails (no_application_protocol).
    let err = tls_connect(proxy.port, &certs.ca_pem, &[b"http/1.1"], true)
        .await
        .expect_err("ALPN http/1.1 accepted");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");

    // No ALPN at all on a direct handshake: a FATAL, then the connection closes.
    let mut s = tls_connect(proxy.port, &certs.ca_pem, &[], true)
        .await
        .expect("handshake without ALPN");
    let (tag, body) = read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("C08P01") && text.contains("ALPN"), "{text}");

    // After an SSLRequest, ALPN is optional (libpq before 17 sends none)...
    let mut s = tls_connect(proxy.port, &certs.ca_pem, &[], false)
        .await
        .unwrap();
    login(&mut s).await;
    assert_eq!(query_one(&mut s, "SELECT 7").await, "7");
    // ...but if offered it must be "postgresql".
    assert!(tls_connect(proxy.port, &certs.ca_pem, &[b"h2"], false)
        .await
        .is_err());

    // Without a certificate, SSLRequest is answered 'N'.
    let plain = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[("auth_method", "trust".into())],
            backend: &[],
            backend_host: "127.0.0.1",
        },
    );
    let mut tcp = TcpStream::connect(("127.0.0.1", plain.port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'N');
    login(&mut tcp).await;
    assert_eq!(query_one(&mut tcp, "SELECT 1").await, "1");
    let out = psql(plain.port, "sslmode=require", "SELECT 1", &[]);
    assert!(
        !out.ok && out.stderr.contains("does not support SSL"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_on_sighup_keeps_live_sessions() {
    let dir = cert_dir();
    let first = Certs::generate(dir.path(), "proxy");
    let pg = start_pg(None);
    let proxy = start_proxy(
        pg.port,
        &ProxyTls {
            proxy: &[
                ("tls_cert", path_str(&first.path("proxy", "crt"))),
                ("tls_key", path_str(&first.path("proxy", "key"))),
                ("auth_method", "trust".into()),
            ],
            backend: &[],
            backend_host: "127.0.0.1",
        },
    );
    let mut live = tls_connect(proxy.port, &first.ca_pem, &[b"postgresql"], false)
        .await
        .unwrap();
    assert_eq!(peer_cert(&live), first.cert_der);
    login(&mut live).await;
    assert_eq!(query_one(&mut live, "SELECT 1").await, "1");

    // New certificate, new CA, same paths; SIGHUP.
    let second = Certs::generate(dir.path(), "proxy");
    assert_ne!(first.cert_der, second.cert_der);
    proxy.signal(SIGHUP);
    assert!(
        proxy.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        proxy.logs()
    );
    let mut fresh = tls_connect(proxy.port, &second.ca_pem, &[b"postgresql"], false)
        .await
        .expect("new handshake with the new certificate");
    assert_eq!(peer_cert(&fresh), second.cert_der);
    login(&mut fresh).await;
    assert_eq!(query_one(&mut fresh, "SELECT 2").await, "2");
    // The live session still works, on the old certificate.
    assert_eq!(query_one(&mut live, "SELECT 3").await, "3");
    assert_eq!(peer_cert(&live), first.cert_der);
    // The old CA no longer verifies new handshakes.
    assert!(
        tls_connect(proxy.port, &first.ca_pem, &[b"postgresql"], false)
            .await
            .is_err()
    );
    let extra = format!(
        "host=localhost sslmode=verify-full sslrootcert={}",
        dir.path().join("proxy-ca.pem").display()
    );
    assert_eq!(psql_ok(proxy.port, &extra, "SELECT 4"), "4");

    // A broken key on reload is refused: the running certificate stays.
    write_file(&second.path("proxy", "key"), "not a key\n", 0o600);
    proxy.signal(SIGHUP);
    assert!(
        proxy.wait_for_log("configuration reload failed", Duration::from_secs(10)),
        "{}",
        proxy.logs()
    );
    assert!(proxy.logs().contains("proxy.tls_cert"), "{}", proxy.logs());
    let s = tls_connect(proxy.port, &second.ca_pem, &[b"postgresql"], false)
        .await
        .expect("the running certificate is kept");
    assert_eq!(peer_cert(&s), second.cert_der);
    assert_eq!(query_one(&mut live, "SELECT 5").await, "5");
    assert_eq!(query_one(&mut fresh, "SELECT 6").await, "6");
}

#[test]
fn config_errors_name_the_tls_key() {
    let dir = cert_dir();
    let certs = Certs::generate(dir.path(), "proxy");
    let check = |toml: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = |proxy: &str, backend: &str| {
        format!("[proxy]\n{proxy}\n[backends.blue]\nhost = \"127.0.0.1\"\n{backend}\n")
    };
    let (ok, err) = check(&base(
        &format!("tls_cert = {}", quoted(&certs.path("proxy", "crt"))),
        "",
    ));
    assert!(!ok && err.contains("proxy.tls_key"), "{err}");
    let (ok, err) = check(&base("client_tls = \"require\"", ""));
    assert!(!ok && err.contains("proxy.client_tls"), "{err}");
    let (ok, err) = check(&base("", "server_tls = \"verify-full\""));
    assert!(!ok && err.contains("backends.blue.server_tls_ca"), "{err}");
    let (ok, err) = check(&base("", "server_tls = \"sometimes\""));
    assert!(!ok && err.contains("server_tls"), "{err}");
    let (ok, err) = check(&base(
        &format!(
            "tls_cert = {}\ntls_key = {}",
            quoted(&certs.path("proxy", "key")),
            quoted(&certs.path("proxy", "key"))
        ),
        "",
    ));
    assert!(!ok && err.contains("no certificate found"), "{err}");
    let (ok, err) = check(&base(
        &format!(
            "tls_cert = {}\ntls_key = {}",
            quoted(&certs.path("proxy", "crt")),
            quoted(&certs.path("proxy", "key"))
        ),
        "server_tls = \"verify-ca\"\nserver_tls_ca = \"/nonexistent/ca.pem\"",
    ));
    assert!(!ok && err.contains("/nonexistent/ca.pem"), "{err}");
    let (ok, err) = check(&base(
        &format!(
            "tls_cert = {}\ntls_key = {}\nclient_tls = \"require\"",
            quoted(&certs.path("proxy", "crt")),
            quoted(&certs.path("proxy", "key"))
        ),
        "server_tls = \"require\"",
    ));
    assert!(ok, "{err}");
}
