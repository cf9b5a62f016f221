//! The fuzz targets' seed corpus (`fuzz/seeds/<target>/`), replayed through
//! the same entry points (`pgswitch::fuzzing`) the fuzz targets call: no
//! input may panic, and the properties those functions check must hold.
//! Inputs the fuzzer found a defect with are kept there too.
//!
//! The seeds are real protocol bytes, recorded between clients (tokio-postgres,
//! psql, a raw client) and PostgreSQL, and between pgswitch and PostgreSQL:
//! `regenerate_seed_corpus` (ignored; run it with
//! `cargo nextest run --test fuzz_corpus --run-ignored only`) writes them.
mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("startup", pgswitch::fuzzing::startup),
    ("frames", pgswitch::fuzzing::frames),
    ("translate", pgswitch::fuzzing::translate),
    ("redact", pgswitch::fuzzing::redact),
];

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = seeds_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_replays_without_a_panic() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let seeds = seeds(target);
        assert!(
            seeds.len() >= 5,
            "{target}: only {} seeds in {}",
            seeds.len(),
            seeds_dir(target).display()
        );
        for (path, bytes) in seeds {
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                failures.push(format!("{target}: {}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "panicked on:\n{}", failures.join("\n"));
}

/// Every prefix of every seed, and every seed with one byte flipped at a
/// time (for the smaller ones): the cheap part of what the fuzzer does, on
/// every test run.
#[test]
fn truncated_and_flipped_seeds_replay_without_a_panic() {
    for (target, run) in TARGETS {
        for (path, bytes) in seeds(target) {
            for end in 0..bytes.len() {
                let input = &bytes[..end];
                if std::panic::catch_unwind(|| run(input)).is_err() {
                    panic!("{target}: {} cut at {end}: {input:?}", path.display());
                }
            }
            if bytes.len() > 512 {
                continue;
            }
            for at in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut input = bytes.clone();
                    input[at] ^= flip;
                    if std::panic::catch_unwind(|| run(&input)).is_err() {
                        panic!(
                            "{target}: {} with byte {at} ^ {flip:#x}: {input:?}",
                            path.display()
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------ regeneration

/// What went each way over one recorded connection.
#[derive(Default, Clone)]
struct Recorded {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// A TCP relay in front of a server that records every connection.
struct Recorder {
    port: u16,
    done: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    async fn start(upstream: u16) -> Recorder {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let done: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let finished = done.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let finished = finished.clone();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(copy_recording(cr, sw));
                    let down = tokio::spawn(copy_recording(sr, cw));
                    let (to_server, to_client) = (up.await.unwrap(), down.await.unwrap());
                    finished.lock().unwrap().push(Recorded {
                        to_server,
                        to_client,
                    });
                });
            }
        });
        Recorder { port, done }
    }

    /// Waits for `n` connections to have ended and takes them.
    async fn take(&self, n: usize) -> Vec<Recorded> {
        wait_until(
            Duration::from_secs(20),
            "recorded connections end",
            || async { self.done.lock().unwrap().len() >= n },
        )
        .await;
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
    seen
}

/// The length of the handshake packets at the front of a client's stream:
/// 8-byte encryption requests, then one startup (or cancel) packet.
fn handshake_len(stream: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = stream.get(at..at + 4) {
        let len = i32::from_be_bytes(len.try_into().unwrap()) as usize;
        let code = stream
            .get(at + 4..at + 8)
            .map(|c| i32::from_be_bytes(c.try_into().unwrap()));
        at += len;
        if len != 8 || !matches!(code, Some(SSL_REQUEST) | Some(GSSENC_REQUEST)) {
            break;
        }
    }
    at.min(stream.len())
}

/// The first whole frames of `stream`, up to about `max` bytes.
fn whole_frames(stream: &[u8], max: usize) -> &[u8] {
    let mut at = 0;
    while let Some(len) = stream.get(at + 1..at + 5) {
        let next = at + 1 + i32::from_be_bytes(len.try_into().unwrap()) as usize;
        if next > stream.len() || (next > max && at > 0) {
            break;
        }
        at = next;
    }
    &stream[..at]
}

struct SeedWriter {
    written: Vec<PathBuf>,
}

impl SeedWriter {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let dir = seeds_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        self.written.push(path);
    }

    /// The seeds of one recorded client connection: its handshake, its
    /// frames and the server's, and its frames for the translation.
    fn connection(&mut self, name: &str, conn: &Recorded) {
        let start = handshake_len(&conn.to_server);
        self.write("startup", name, &conn.to_server[..start]);
        let frontend = whole_frames(&conn.to_server[start..], 4096);
        self.write("frames", &format!("{name}-frontend"), frontend);
        // The server's answers to encryption requests are single bytes.
        let mut backend = &conn.to_client[..];
        while matches!(backend.first(), Some(b'N')) && backend.get(1) != Some(&0) {
            backend = &backend[1..];
        }
        self.write(
            "frames",
            &format!("{name}-backend"),
            whole_frames(backend, 4096),
        );
        if !frontend.is_empty() {
            let idle = [&[1u8][..], frontend].concat();
            self.write("translate", &format!("{name}-idle"), &idle);
            let in_tx = [&[0u8][..], frontend].concat();
            self.write("translate", &format!("{name}-in-tx"), &in_tx);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fuzz/seeds; run with --run-ignored only to regenerate them"]
async fn regenerate_seed_corpus() {
    let pg = pg_with_app(PgOptions::default(), None);
    let recorder = Recorder::start(pg.port).await;
    let mut out = SeedWriter {
        written: Vec::new(),
    };

    // tokio-postgres straight to the server: SCRAM, simple and extended
    // queries, prepared statements, an error, the statement commands.
    {
        let c = connect_with(&client_config(
            recorder.port,
            APP_USER,
            Some(APP_PASSWORD),
            "postgres",
        ))
        .await
        .unwrap();
        c.simple_query("SELECT 1; SELECT 'two'").await.unwrap();
        let stmt = c.prepare("SELECT $1::int + 1, $2::text").await.unwrap();
        c.query(&stmt, &[&41i32, &"x"]).await.unwrap();
        c.execute("CREATE TEMP TABLE t (id int, note text)", &[])
            .await
            .unwrap();
        c.execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"one"])
            .await
            .unwrap();
        let _ = c.simple_query("SELECT 1/0").await;
        for sql in [
            "PREPARE p AS SELECT 1",
            "DEALLOCATE p",
            "DEALLOCATE ALL",
            "DISCARD ALL",
        ] {
            c.simple_query(sql).await.unwrap();
        }
        c.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    }
    let conns = recorder.take(1).await;
    out.connection("tokio-postgres", &conns[0]);

    // psql: SSLRequest/GSSENCRequest first (answered 'N'), then a script.
    let psql = |commands: &[&str]| {
        let status = std::process::Command::new(psql_bin())
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &recorder.port.to_string(),
            ])
            .args(["-U", APP_USER, "-d", "postgres"])
            .args(commands.iter().flat_map(|c| ["-c", c]))
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGSSLMODE", "prefer")
            .env("PGGSSENCMODE", "prefer")
            .env("PGAPPNAME", "fuzz seeds")
            .env("PGOPTIONS", "-c search_path=public -c work_mem=64kB")
            .status()
            .unwrap();
        assert!(status.success());
    };
    psql(&[
        "SELECT now()",
        "\\copy (SELECT generate_series(1, 3)) TO STDOUT",
    ]);
    let conns = recorder.take(1).await;
    out.connection("psql", &conns[0]);

    // Raw packets: protocol 3.2 with a _pq_ option, a cancel request.
    {
        let mut raw = Raw::connect(recorder.port).await;
        raw.send(&startup_packet(
            PROTOCOL_3_2,
            &[
                ("user", APP_USER),
                ("database", "postgres"),
                ("_pq_.x", "1"),
            ],
        ))
        .await;
        let _ = raw.try_read_msg().await;
    }
    {
        let mut raw = Raw::connect(recorder.port).await;
        let mut cancel = 16i32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&80_877_102i32.to_be_bytes());
        cancel.extend_from_slice(&[0, 0, 0x30, 0x39, 0xde, 0xad, 0xbe, 0xef]);
        raw.send(&cancel).await;
        raw.expect_eof().await;
    }
    let conns = recorder.take(2).await;
    for (i, conn) in conns.iter().enumerate() {
        out.connection(&format!("raw-{i}"), conn);
    }

    // pgswitch in front, logging in to the server through the recorder:
    // its own logins, hidden queries and renamed statements (transaction
    // mode), for a client using prepared statements.
    let proxy = ProxyConfig::new(recorder.port)
        .pool_size(1)
        .set("server_probe_interval", "0s")
        .app_user()
        .start();
    {
        let c = connect_with(&client_config(
            proxy.port,
            APP_USER,
            Some(APP_PASSWORD),
            "postgres",
        ))
        .await
        .unwrap();
        let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
        for i in 0..3i32 {
            c.query(&stmt, &[&i]).await.unwrap();
        }
        c.simple_query("SET application_name = 'seeded'; SELECT 1")
            .await
            .unwrap();
    }
    drop(proxy);
    let conns = recorder.take(1).await;
    for (i, conn) in conns.iter().enumerate() {
        out.connection(&format!("pgswitch-{i}"), conn);
    }

    // What reaches the port by mistake: an HTTP request, a startup packet
    // header claiming 100 kB.
    out.write(
        "startup",
        "http-request",
        b"GET /status HTTP/1.1\r\nHost: db\r\n\r\n",
    );
    let mut oversized = 100_036i32.to_be_bytes().to_vec();
    oversized.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    oversized.extend_from_slice(b"user\0app\0application_name\0vvvvvvvv");
    out.write("startup", "oversized", &oversized);

    // Log lines with conninfo secrets, as the cutover's statements (and
    // tokio-postgres's logging of them) look.
    for (name, line) in [
        (
            "create-subscription",
            "DEBUG executing statement batch: CREATE SUBSCRIPTION \"pgswitch_reverse\" CONNECTION \
             'host=127.0.0.1 port=5433 user=switcher password=''Gr33n s3cret \\''q\\'''' dbname=app' \
             PUBLICATION \"pgswitch_reverse\" WITH (create_slot = false, enabled = false)",
        ),
        ("conninfo-plain", "host=db port=5432 user=app password=hunter22 dbname=app"),
        ("conninfo-quoted", "password = 'with spaces and \\'quotes\\'' sslmode=require"),
        (
            "json",
            "{\"level\":\"DEBUG\",\"message\":\"CONNECTION 'password=''a \\\\''b'' dbname=x'\"}",
        ),
        ("uri", "connect to postgres://app:s3cretpw@db:5432/app?sslmode=require failed"),
        ("ansi", "\x1b[3mpassword\x1b[0m\x1b[2m=\x1b[0mhunter22 next=1"),
        ("no-secret", "client closed client=2 peer=127.0.0.1:46416 reason=client terminated"),
    ] {
        out.write("redact", name, line.as_bytes());
    }
    for path in &out.written {
        eprintln!("wrote {}", path.display());
    }
}
