//! Protocol pass-through through pgswitch against real PostgreSQL servers:
//! pipelining, COPY, notices and notifications, errors in transactions, large
//! rows, session parameters and prepared statements in transaction mode, and a
//! real driver (psycopg 3, when installed).
//!
//! Where exact wire behaviour matters, a raw-protocol client runs the same
//! script once directly against PostgreSQL and once through the proxy, and the
//! two transcripts must be equal: PostgreSQL itself is the oracle.
mod support;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::process::Stdio;
use std::task::Poll;
use std::time::Duration;

use support::*;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls};

// ---------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------

/// Upper bound for any single step; a hung proxy fails the test with a
/// message instead of running into nextest's kill timeout.
const STEP: Duration = Duration::from_secs(60);

async fn t<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// A PostgreSQL server with role `app` (superuser, password `secret`).
fn start_pg(auth: HbaAuth) -> PgServer {
    let pg = pg_with_app(
        PgOptions {
            auth,
            ..Default::default()
        },
        None,
    );
    pg.psql("ALTER ROLE app SUPERUSER");
    pg
}

/// Starts the proxy in front of `pg`. `extra` goes into `[proxy]`.
fn start_proxy(pg: &PgServer, pool_mode: &str, pool_size: usize, extra: &str) -> Proxy {
    ProxyConfig::new(pg.port)
        .pool_mode(pool_mode)
        .pool_size(pool_size)
        .set("query_wait_timeout", "20s")
        .extra_proxy(extra)
        .app_user()
        .start()
}

const TRUST: &str = r#"auth_method = "trust""#;

/// tokio-postgres config for user `app` through the proxy.
fn proxy_config(proxy: &Proxy) -> tokio_postgres::Config {
    config_for(proxy.port)
}

/// tokio-postgres config for user `app` on 127.0.0.1:`port`.
fn config_for(port: u16) -> tokio_postgres::Config {
    client_config(port, APP_USER, Some(APP_PASSWORD), "postgres")
}

async fn connect(cfg: &tokio_postgres::Config) -> Client {
    connect_full(cfg).await.client
}

/// A client whose connection task forwards notices and notifications.
struct Conn {
    client: Client,
    messages: mpsc::UnboundedReceiver<AsyncMessage>,
    /// ParameterStatus values reported at startup (a selection).
    params: HashMap<String, String>,
}

async fn connect_full(cfg: &tokio_postgres::Config) -> Conn {
    let (client, mut conn) = t("connect", cfg.connect(NoTls))
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {e}"));
    let mut params = HashMap::new();
    for name in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "application_name",
        "TimeZone",
        "DateStyle",
        "integer_datetimes",
        "standard_conforming_strings",
    ] {
        if let Some(v) = conn.parameter(name) {
            params.insert(name.to_owned(), v.to_owned());
        }
    }
    let (tx, messages) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = poll_fn(|cx| conn.poll_message(cx)).await {
            let _ = tx.send(m);
        }
    });
    Conn {
        client,
        messages,
        params,
    }
}

/// Polls all futures concurrently on this task (like futures' join_all).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("<no SQLSTATE: {e}>"))
}

async fn one_string(client: &Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

// ---------------------------------------------------------------------------
// Raw protocol client
// ---------------------------------------------------------------------------

/// A raw client ([`Raw`]) logged in as `app` to database `postgres` with
/// trust authentication; returns the messages after the startup packet, up
/// to ReadyForQuery.
async fn raw_connect(port: u16, params: &[(&str, &str)]) -> (Raw, Vec<Msg>) {
    let mut raw = Raw::connect_with_timeout(port, STEP).await;
    let mut startup = vec![("user", APP_USER), ("database", "postgres")];
    startup.extend_from_slice(params);
    let msgs = raw.startup(&startup).until_ready().await;
    let first = &msgs[0];
    assert!(
        first.tag == b'R' && first.body[..4] == [0, 0, 0, 0],
        "expected AuthenticationOk (trust), got {:?}",
        msgs.iter().map(Msg::line).collect::<Vec<_>>()
    );
    (raw, msgs)
}

/// Every one of `wanted` starts some line of the transcript.
#[track_caller]
fn assert_has_lines(lines: &[String], wanted: &[&str]) {
    for want in wanted {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "{want}\n{lines:#?}"
        );
    }
}

fn has_error(lines: &[String], code: &str) -> bool {
    lines
        .iter()
        .any(|l| l.starts_with(&format!("ErrorResponse {code} ")))
}

/// Runs a raw-protocol scenario directly against PostgreSQL and through the
/// proxy; the transcripts must be equal. Returns the transcript.
async fn differential<F, Fut>(pg: &PgServer, proxy: &Proxy, scenario: F) -> Vec<String>
where
    F: Fn(u16) -> Fut,
    Fut: Future<Output = Vec<String>>,
{
    let direct = scenario(pg.port).await;
    let proxied = scenario(proxy.port).await;
    if direct != proxied {
        panic!(
            "transcripts differ (- only direct PostgreSQL, + only through pgswitch):\n{}",
            diff(&direct, &proxied)
        );
    }
    proxied
}

/// A line diff (longest common subsequence).
fn diff(a: &[String], b: &[String]) -> String {
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!("    {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("  + {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("  - {}\n", a[i]));
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// 1. Pipelines
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_200_concurrent_queries_on_one_client() {
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "transaction", 2, "");
    let cfg = proxy_config(&proxy);
    let client = connect(&cfg).await;
    let futures: Vec<_> = (0..200i32)
        .map(|i| {
            let client = &client;
            async move {
                let rows = client.query("select $1::int", &[&i]).await?;
                Ok::<_, tokio_postgres::Error>(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
            }
        })
        .collect();
    let results = t("200 pipelined queries", join_all(futures)).await;
    for (i, r) in results.into_iter().enumerate() {
        let rows: Vec<i32> = r.unwrap_or_else(|e| panic!("query {i}: {e}"));
        assert_eq!(rows, vec![i as i32], "query {i}");
    }

    // Three clients pipelining at once through a pool of two.
    let clients = [
        connect(&cfg).await,
        connect(&cfg).await,
        connect(&cfg).await,
    ];
    let mut futures = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for i in 0..200i32 {
            futures.push(async move {
                let v = i * 10 + c as i32;
                let row = client.query_one("select $1::int + 0", &[&v]).await?;
                Ok::<_, tokio_postgres::Error>((v, row.get::<_, i32>(0)))
            });
        }
    }
    for r in t("3 x 200 pipelined queries", join_all(futures)).await {
        let (want, got) = r.unwrap_or_else(|e| panic!("pipelined query: {e}"));
        assert_eq!(got, want);
    }
}

async fn raw_pipeline_scenario(port: u16) -> Vec<String> {
    let (mut raw, _) = raw_connect(port, &[]).await;
    for i in 0..50 {
        raw.parse("", &format!("select {i} as n"))
            .bind("", "", &[])
            .execute("");
    }
    raw.sync();
    raw.run().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_pipeline_50_unnamed_parse_bind_execute_one_sync() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 2, TRUST);
    let lines = differential(&pg, &proxy, raw_pipeline_scenario).await;
    let completes = lines
        .iter()
        .filter(|l| l.starts_with("CommandComplete SELECT 1"))
        .count();
    assert_eq!(completes, 50, "{lines:#?}");
    let rows: Vec<&String> = lines.iter().filter(|l| l.starts_with("DataRow")).collect();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(**row, format!("DataRow [Some(\"{i}\")]"));
    }
    assert_eq!(rows.len(), 50);
    assert_eq!(lines.last().unwrap(), "ReadyForQuery I");
}

// ---------------------------------------------------------------------------
// 2. COPY
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_and_to_stdout_10000_rows() {
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let cfg = proxy_config(&proxy);
    let a = connect(&cfg).await;
    a.batch_execute(
        "create table copy_t (id int primary key, v text not null);
         create table copy_t2 (id int primary key, v text not null)",
    )
    .await
    .unwrap();

    // COPY FROM STDIN through tokio-postgres (extended protocol: Bind,
    // Execute, Sync, CopyData..., CopyDone, Sync; the server ignores the
    // first Sync while in copy-in mode and answers only the second).
    let sink = t(
        "copy_in",
        a.copy_in("COPY copy_t (id, v) FROM STDIN (FORMAT binary)"),
    )
    .await
    .expect("COPY FROM STDIN");
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
    let mut writer = std::pin::pin!(writer);
    for i in 0..10_000i32 {
        let v = format!("row {i}");
        writer.as_mut().write(&[&i, &v]).await.unwrap();
    }
    let n = t("copy_in finish", writer.finish()).await.unwrap();
    assert_eq!(n, 10_000);

    // Pool size 1: the server connection must have gone back to the pool.
    let b = connect(&cfg).await;
    let count: i64 = t(
        "another client after COPY FROM STDIN (pool size 1)",
        b.query_one("select count(*) from copy_t", &[]),
    )
    .await
    .expect("second client's query after COPY FROM STDIN (pool size 1)")
    .get(0);
    assert_eq!(count, 10_000);

    // The copying client goes on normally, prepared statements included.
    let st = t(
        "prepare after copy",
        a.prepare("select v from copy_t where id = $1"),
    )
    .await
    .expect(
        "client A after its COPY FROM STDIN (Closed = tokio-postgres got an out-of-order reply)",
    );
    for i in [0i32, 4321, 9999] {
        let row = t("query after copy", a.query_one(&st, &[&i]))
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), format!("row {i}"));
        let c: i64 = t(
            "other client",
            b.query_one("select count(*) from copy_t", &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(c, 10_000);
    }

    // COPY TO STDOUT, raw protocol (tokio-postgres' CopyOutStream needs the
    // futures Stream trait, which is not a dependency of this crate).
    let (mut raw, _) = raw_connect(proxy.port, &[]).await;
    let msgs = t(
        "COPY TO STDOUT",
        raw.query("COPY copy_t (id, v) TO STDOUT").until_ready(),
    )
    .await;
    let lines: Vec<String> = msgs.iter().map(Msg::line).collect();
    assert_eq!(lines[0], "CopyOutResponse", "{:?}", &lines[..3]);
    let data: Vec<&Msg> = msgs.iter().filter(|m| m.tag == b'd').collect();
    assert_eq!(data.len(), 10_000);
    let mut seen = vec![false; 10_000];
    for m in &data {
        let text = std::str::from_utf8(&m.body).unwrap();
        let (id, v) = text.trim_end().split_once('\t').unwrap();
        let id: usize = id.parse().unwrap();
        assert_eq!(v, format!("row {id}"));
        seen[id] = true;
    }
    assert!(seen.iter().all(|s| *s));
    assert_eq!(
        lines[lines.len() - 3..],
        ["CopyDone", "CommandComplete COPY 10000", "ReadyForQuery I"]
    );

    // COPY FROM STDIN, simple query protocol, data in chunks of 100 rows.
    raw.query("COPY copy_t2 (id, v) FROM STDIN");
    raw.flush().await;
    let m = raw.recv().await;
    assert_eq!(m.tag, b'G', "expected CopyInResponse, got {}", m.line());
    for chunk in 0..100 {
        let mut buf = String::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            buf.push_str(&format!("{i}\tcopied {i}\n"));
        }
        raw.copy_data(buf.as_bytes());
    }
    let lines = t("COPY FROM STDIN (simple)", raw.copy_done().run()).await;
    assert_eq!(lines, ["CommandComplete COPY 10000", "ReadyForQuery I"]);
    let n: i64 = b
        .query_one(
            "select count(*) from copy_t2 where v = 'copied ' || id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_000);
}

/// COPY FROM STDIN in the extended protocol, as tokio-postgres and the JDBC
/// driver send it: Bind, Execute, Sync, then CopyData..., CopyDone, Sync. The
/// server ignores a Sync received in copy-in mode, so the two Syncs get one
/// ReadyForQuery.
async fn extended_copy_in_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let (mut b, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    // (Not recorded: the notice about a missing table differs between runs.)
    a.query("drop table if exists cx; create table cx (n int)")
        .run()
        .await;
    a.parse("S_copy", "COPY cx FROM STDIN")
        .bind("", "S_copy", &[])
        .execute("")
        .sync();
    a.flush().await;
    let mut started = Vec::new();
    loop {
        let m = a.recv().await;
        started.push(m.line());
        if m.tag == b'G' || m.tag == b'Z' || m.tag == 0 {
            break;
        }
    }
    step("copy start", started);
    step(
        "copy data",
        a.copy_data(b"1\n2\n")
            .copy_data(b"3\n")
            .copy_done()
            .sync()
            .run()
            .await,
    );
    step("close", a.close(b'S', "S_copy").sync().run().await);
    step(
        "after copy",
        a.parse("S_count", "select count(*) from cx")
            .bind("", "S_count", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    // With a pool of one, B needs the server A used for the COPY.
    step("other client", b.query("select 'b'").run().await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_extended_protocol_matches_postgres() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, extended_copy_in_scenario).await;
    assert!(
        lines
            .iter()
            .any(|l| l == "other client: DataRow [Some(\"b\")]"),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_psql_backslash_copy_both_directions() {
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "transaction", 1, "");
    pg.psql(
        "create table src (id int primary key, v text);
         insert into src select g, 'value ' || g || E' tab\\there' from generate_series(1, 10000) g;
         create table dst (id int primary key, v text);",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.txt");
    let psql = |cmd: String| {
        let out = std::process::Command::new(psql_bin())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
            .arg(proxy.port.to_string())
            .args(["-U", "app", "-d", "postgres", "-c"])
            .arg(&cmd)
            .env("PGPASSWORD", "secret")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("spawn psql");
        assert!(
            out.status.success(),
            "psql {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    psql(format!("\\copy src to '{}'", file.display()));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 10_000);
    assert!(
        text.contains("42\tvalue 42 tab\\there\n"),
        "{}",
        &text[..200]
    );
    psql(format!("\\copy dst from '{}'", file.display()));
    let same = psql("select count(*) from dst join src using (id, v)".to_owned());
    assert!(same.contains("10000"), "{same}");
    // The pool's only connection is still usable.
    let c = connect(&proxy_config(&proxy)).await;
    assert_eq!(
        one_string(&c, "select count(*)::text from dst").await,
        "10000"
    );
}

// ---------------------------------------------------------------------------
// 3. Notices and notifications
// ---------------------------------------------------------------------------

async fn next_message(conn: &mut Conn, what: &str) -> AsyncMessage {
    t(what, conn.messages.recv())
        .await
        .unwrap_or_else(|| panic!("connection closed while waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_reaches_client() {
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "transaction", 2, "");
    let mut a = connect_full(&proxy_config(&proxy)).await;
    a.client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    match next_message(&mut a, "notice (simple query)").await {
        AsyncMessage::Notice(n) => assert_eq!(n.message(), "hello"),
        other => panic!("expected a notice, got {other:?}"),
    }
    // Extended protocol, inside a transaction, with a warning level too.
    a.client.batch_execute("BEGIN").await.unwrap();
    a.client
        .execute("DO $$ BEGIN RAISE WARNING 'careful %', 42; END $$", &[])
        .await
        .unwrap();
    a.client.batch_execute("COMMIT").await.unwrap();
    match next_message(&mut a, "warning (extended protocol)").await {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.message(), "careful 42");
            assert_eq!(n.severity(), "WARNING");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_session_mode() {
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "session", 2, "");
    let cfg = proxy_config(&proxy);
    let mut listener = connect_full(&cfg).await;
    let notifier = connect(&cfg).await;
    listener.client.batch_execute("LISTEN chan").await.unwrap();
    let listener_pid: i32 = listener
        .client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let notifier_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(listener_pid, notifier_pid);
    notifier
        .batch_execute("NOTIFY chan, 'payload 1'")
        .await
        .unwrap();
    notifier
        .execute("select pg_notify('chan', $1)", &[&"payload 2"])
        .await
        .unwrap();
    for want in ["payload 1", "payload 2"] {
        match next_message(&mut listener, "notification").await {
            AsyncMessage::Notification(n) => {
                assert_eq!(n.channel(), "chan");
                assert_eq!(n.payload(), want);
                assert_eq!(n.process_id(), notifier_pid);
            }
            other => panic!("expected a notification, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Errors in a transaction
// ---------------------------------------------------------------------------

async fn failed_transaction_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    out.extend(a.query("BEGIN").run().await);
    out.extend(
        a.parse("", "select 1/0")
            .bind("", "", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    out.extend(
        a.parse("", "select 1")
            .bind("", "", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    out.extend(a.query("select 1").run().await);
    out.extend(a.query("ROLLBACK").run().await);
    out.extend(a.query("select 2").run().await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_transaction_then_rollback() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let cfg = proxy_config(&proxy);
    let a = connect(&cfg).await;

    a.batch_execute("BEGIN").await.unwrap();
    let e = a.query("select 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012", "{e}");
    let e = a.query("select 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e}");
    let e = a.batch_execute("select 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e}");

    // Pool size 1: another client waits for the server while A's failed
    // transaction holds it, then gets a clean session.
    let port = proxy.port;
    let b = tokio::spawn(async move {
        let (mut b, _) = raw_connect(port, &[]).await;
        let lines = b.query("select 42").run().await;
        (b, lines)
    });
    a.batch_execute("ROLLBACK").await.unwrap();
    let (mut b, lines) = t("client B", b).await.unwrap();
    assert_eq!(
        lines[1..],
        [
            "DataRow [Some(\"42\")]",
            "CommandComplete SELECT 1",
            "ReadyForQuery I"
        ]
    );
    let row = a.query_one("select 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    // A client that disconnects inside a failed transaction leaves nothing
    // behind for the next one.
    {
        let c = connect(&cfg).await;
        c.batch_execute("BEGIN; create temp table leftover (x int)")
            .await
            .unwrap();
        let e = c.batch_execute("select 1/0").await.unwrap_err();
        assert_eq!(sqlstate(&e), "22012");
    }
    for _ in 0..3 {
        let lines = t("after disconnect", b.query("select 1").run()).await;
        assert_eq!(lines.last().unwrap(), "ReadyForQuery I", "{lines:?}");
        assert!(!has_error(&lines, "25P02"), "{lines:?}");
    }
    let lines = b
        .query("select count(*) from pg_class where relname = 'leftover'")
        .run()
        .await;
    assert_eq!(lines[1], "DataRow [Some(\"0\")]", "{lines:?}");

    // Wire-level comparison with PostgreSQL (extended and simple protocol).
    let lines = differential(&pg, &proxy, failed_transaction_scenario).await;
    assert!(has_error(&lines, "22012"), "{lines:#?}");
    assert!(has_error(&lines, "25P02"), "{lines:#?}");
    assert_eq!(lines.last().unwrap(), "ReadyForQuery I");
}

// ---------------------------------------------------------------------------
// 5. Large rows
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_3_mib_both_directions() {
    const SIZE: usize = 3 * 1024 * 1024;
    let pg = start_pg(HbaAuth::default());
    let proxy = start_proxy(&pg, "transaction", 2, "");
    let cfg = proxy_config(&proxy);
    let a = connect(&cfg).await;

    let s: String = t(
        "select 3 MiB",
        a.query_one("select repeat('x', 3*1024*1024)", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(s.len(), SIZE);
    assert!(s.bytes().all(|b| b == b'x'));

    let value: String = (0..SIZE)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    a.batch_execute("create table big (id int primary key, v text)")
        .await
        .unwrap();
    t(
        "insert 3 MiB",
        a.execute("insert into big values (1, $1)", &[&value]),
    )
    .await
    .unwrap();
    let row = a
        .query_one("select length(v), v from big where id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as usize, SIZE);
    assert!(
        row.get::<_, String>(1) == value,
        "3 MiB value came back different"
    );
    let echoed: String = a
        .query_one("select $1::text", &[&value])
        .await
        .unwrap()
        .get(0);
    assert!(echoed == value, "echoed 3 MiB value differs");

    // Several clients moving large rows at once through a pool of two.
    let clients = [
        connect(&cfg).await,
        connect(&cfg).await,
        connect(&cfg).await,
    ];
    let futures: Vec<_> = clients
        .iter()
        .map(|c| async {
            let v: String = c
                .query_one("select v from big where id = 1", &[])
                .await?
                .get(0);
            let n: i32 = c.query_one("select length($1::text)", &[&v]).await?.get(0);
            Ok::<_, tokio_postgres::Error>((v == value, n as usize))
        })
        .collect();
    for r in t("concurrent large rows", join_all(futures)).await {
        assert_eq!(r.unwrap(), (true, SIZE));
    }
}

// ---------------------------------------------------------------------------
// 6. Session parameters in transaction mode
// ---------------------------------------------------------------------------

const SETTINGS: &str = "select current_setting('application_name'), \
     current_setting('TimeZone'), current_setting('search_path')";

async fn settings(c: &Client) -> (String, String, String) {
    let row = t("settings", c.query_one(SETTINGS, &[]))
        .await
        .unwrap_or_else(|e| panic!("{SETTINGS}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}

/// The same settings in one explicit transaction of several statements.
async fn settings_in_transaction(c: &Client) -> (String, String, String) {
    c.simple_query("BEGIN").await.unwrap();
    let s = settings(c).await;
    let again = settings(c).await;
    assert_eq!(s, again, "settings changed inside a transaction");
    c.simple_query("COMMIT").await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_each_client_in_transaction_mode() {
    let pg = start_pg(HbaAuth::default());
    pg.psql(
        "create schema myschema; create table myschema.only_here (x int);
         insert into myschema.only_here values (7)",
    );
    let proxy = start_proxy(&pg, "transaction", 1, "");
    let mut cfg_a = proxy_config(&proxy);
    cfg_a
        .application_name("alpha")
        .options("-c TimeZone=Europe/Paris -c search_path=myschema,public");
    let mut cfg_b = proxy_config(&proxy);
    cfg_b.application_name("beta").options("-c TimeZone=UTC");

    // What PostgreSQL itself reports for the same startup parameters.
    let mut direct_a = config_for(pg.port);
    direct_a
        .application_name("alpha")
        .options("-c TimeZone=Europe/Paris -c search_path=myschema,public");
    let mut direct_b = config_for(pg.port);
    direct_b.application_name("beta").options("-c TimeZone=UTC");
    let want_a = settings(&connect(&direct_a).await).await;
    let want_b = settings(&connect(&direct_b).await).await;
    assert_eq!(want_a.0, "alpha");
    assert_eq!(want_a.1, "Europe/Paris");
    assert_eq!(want_b.0, "beta");
    assert_eq!(want_b.1, "UTC");

    let a = connect_full(&cfg_a).await;
    let b = connect_full(&cfg_b).await;
    for (conn, app, tz) in [(&a, "alpha", "Europe/Paris"), (&b, "beta", "UTC")] {
        let p = &conn.params;
        assert!(
            p.get("server_version").is_some_and(|v| !v.is_empty()),
            "server_version not reported at startup: {p:?}"
        );
        assert_eq!(
            p.get("client_encoding").map(String::as_str),
            Some("UTF8"),
            "{p:?}"
        );
        assert_eq!(
            p.get("server_encoding").map(String::as_str),
            Some("UTF8"),
            "{p:?}"
        );
        assert_eq!(
            p.get("integer_datetimes").map(String::as_str),
            Some("on"),
            "{p:?}"
        );
        assert_eq!(
            p.get("application_name").map(String::as_str),
            Some(app),
            "{p:?}"
        );
        assert_eq!(p.get("TimeZone").map(String::as_str), Some(tz), "{p:?}");
    }
    let (a, b) = (a.client, b.client);

    // Interleaved transactions on the pool's only server connection.
    for round in 0..5 {
        assert_eq!(settings(&a).await, want_a, "A, round {round}");
        let x: i32 = a
            .query_one("select x from only_here", &[])
            .await
            .expect("search_path from startup options")
            .get(0);
        assert_eq!(x, 7);
        assert_eq!(settings(&b).await, want_b, "B, round {round}");
        let e = b
            .query_one("select x from only_here", &[])
            .await
            .expect_err("B must not see A's search_path");
        assert_eq!(sqlstate(&e), "42P01", "{e}");
        assert_eq!(
            settings_in_transaction(&a).await,
            want_a,
            "A tx, round {round}"
        );
        assert_eq!(
            settings_in_transaction(&b).await,
            want_b,
            "B tx, round {round}"
        );
    }

    // Both at once.
    let run = |c: &'static str| {
        let (client, want) = if c == "a" {
            (&a, &want_a)
        } else {
            (&b, &want_b)
        };
        async move {
            for i in 0..30 {
                let got = settings(client).await;
                assert_eq!(&got, want, "client {c}, iteration {i}");
            }
        }
    };
    t("concurrent settings", join_all(vec![run("a"), run("b")])).await;

    // A session-level SET sticks to its client only.
    a.batch_execute("SET application_name = 'changed'")
        .await
        .unwrap();
    let changed_a = ("changed".to_owned(), want_a.1.clone(), want_a.2.clone());
    for _ in 0..3 {
        assert_eq!(settings(&b).await, want_b, "B after A's SET");
        assert_eq!(settings(&a).await, changed_a, "A after its SET");
    }
    // SET LOCAL and a rolled-back SET don't stick.
    a.batch_execute("BEGIN; SET LOCAL application_name = 'local'")
        .await
        .unwrap();
    assert_eq!(
        one_string(&a, "select current_setting('application_name')").await,
        "local"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(settings(&b).await, want_b);
    assert_eq!(settings(&a).await, changed_a, "A after SET LOCAL");
    a.batch_execute("BEGIN; SET application_name = 'rolled back'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(settings(&b).await, want_b);
    assert_eq!(settings(&a).await, changed_a, "A after a rolled-back SET");
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let tokyo_b = (want_b.0.clone(), "Asia/Tokyo".to_owned(), want_b.2.clone());
    for _ in 0..3 {
        assert_eq!(settings(&a).await, changed_a, "A after B's SET TimeZone");
        assert_eq!(settings(&b).await, tokyo_b, "B after its SET TimeZone");
    }
    // A new client with A's startup parameters starts from them, not from
    // what A changed.
    let a2 = connect(&cfg_a).await;
    assert_eq!(
        settings(&a2).await,
        want_a,
        "new client with A's startup parameters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_sequence_and_datestyle_raw() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let startup = [("application_name", "raw"), ("DateStyle", "SQL, DMY")];

    let (_, direct) = raw_connect(pg.port, &startup).await;
    let (mut raw, msgs) = raw_connect(proxy.port, &startup).await;
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    let n = tags.len();
    assert!(
        tags.starts_with('R') && tags.ends_with("KZ") && tags[1..n - 2].chars().all(|c| c == 'S'),
        "expected AuthenticationOk, ParameterStatus..., BackendKeyData, ReadyForQuery; got {tags}"
    );
    assert_eq!(msgs[n - 1].body[..], b"I"[..]);
    let statuses = |msgs: &[Msg]| {
        let mut v: Vec<String> = msgs
            .iter()
            .filter(|m| m.tag == b'S')
            .map(Msg::line)
            .collect();
        v.sort();
        v
    };
    let got = statuses(&msgs);
    for want in [
        "ParameterStatus application_name=raw",
        "ParameterStatus DateStyle=SQL, DMY",
    ] {
        assert!(
            got.iter().any(|l| l == want),
            "missing {want:?} in {got:#?}"
        );
    }
    assert!(
        got.iter()
            .any(|l| l.starts_with("ParameterStatus server_version=")),
        "{got:#?}"
    );
    assert_eq!(
        got,
        statuses(&direct),
        "ParameterStatus at startup: proxy vs PostgreSQL"
    );

    // The DateStyle holds while another client uses the same server.
    let other = connect(&proxy_config(&proxy)).await;
    for _ in 0..3 {
        let lines = raw
            .query("select '2024-03-01'::date::text, current_setting('DateStyle')")
            .run()
            .await;
        assert_eq!(
            lines[1], "DataRow [Some(\"01/03/2024\"), Some(\"SQL, DMY\")]",
            "{lines:?}"
        );
        let iso = one_string(&other, "select '2024-03-01'::date::text").await;
        assert_eq!(iso, "2024-03-01");
    }
}

// ---------------------------------------------------------------------------
// 7. Prepared statements in transaction mode
// ---------------------------------------------------------------------------

/// Each client prepares three statements (tokio-postgres names them s0, s1,
/// s2 on every connection, so the names collide across clients) and runs
/// them interleaved, sequentially and then concurrently.
async fn prepared_statement_workout(cfg: &tokio_postgres::Config, clients: usize, rounds: i32) {
    let mut conns = Vec::new();
    for c in 0..clients {
        let client = connect(cfg).await;
        let k = 1000 * (c as i32 + 1);
        let stmts = vec![
            client
                .prepare(&format!("select $1::int + {k}"))
                .await
                .unwrap(),
            client
                .prepare(&format!("select $1::int * 2 + {k}"))
                .await
                .unwrap(),
            client
                .prepare(&format!("select ($1::int - 3 + {k})::text"))
                .await
                .unwrap(),
        ];
        conns.push((client, stmts, k));
    }
    async fn exec(
        client: &Client,
        stmts: &[tokio_postgres::Statement],
        k: i32,
        i: i32,
    ) -> Result<(), String> {
        let which = i as usize % 3;
        let row = client
            .query_one(&stmts[which], &[&i])
            .await
            .map_err(|e| format!("statement {which}, i={i}: {e}"))?;
        let got = match which {
            0 => row.get::<_, i32>(0).to_string(),
            1 => row.get::<_, i32>(0).to_string(),
            _ => row.get::<_, String>(0),
        };
        let want = match which {
            0 => i + k,
            1 => i * 2 + k,
            _ => i - 3 + k,
        }
        .to_string();
        if got == want {
            Ok(())
        } else {
            Err(format!("statement {which}, i={i}: got {got}, want {want}"))
        }
    }
    // Sequential interleaving: every execution follows another client's.
    for i in 0..rounds {
        for (client, stmts, k) in &conns {
            t("prepared execute", exec(client, stmts, *k, i))
                .await
                .unwrap_or_else(|e| panic!("client k={k}: {e}"));
        }
    }
    // All clients at once.
    let futures: Vec<_> = conns
        .iter()
        .map(|(client, stmts, k)| async move {
            for i in 0..rounds {
                exec(client, stmts, *k, i).await?;
            }
            Ok::<_, String>(())
        })
        .collect();
    for r in t("concurrent prepared executes", join_all(futures)).await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_reprepared_on_every_server() {
    let pg = start_pg(HbaAuth::default());
    // One server connection that keeps only two statements: every execution
    // needs a statement the connection dropped for the other client's.
    let proxy = start_proxy(&pg, "transaction", 1, "prepared_statements_per_server = 2");
    prepared_statement_workout(&proxy_config(&proxy), 2, 60).await;
    drop(proxy);
    // Four clients on two server connections.
    let proxy = start_proxy(&pg, "transaction", 2, "");
    prepared_statement_workout(&proxy_config(&proxy), 4, 60).await;
}

async fn name_collision_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let (mut b, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let tag = |who: &str, lines: Vec<String>| -> Vec<String> {
        lines.into_iter().map(|l| format!("{who}: {l}")).collect()
    };
    out.extend(tag("a", a.parse("S_1", "select 1").sync().run().await));
    out.extend(tag("b", b.parse("S_1", "select 2").sync().run().await));
    for _ in 0..5 {
        out.extend(tag(
            "a",
            a.bind("", "S_1", &[]).execute("").sync().run().await,
        ));
        out.extend(tag(
            "b",
            b.bind("", "S_1", &[]).execute("").sync().run().await,
        ));
    }
    out.extend(tag(
        "b",
        b.describe(b'S', "S_1")
            .bind("", "S_1", &[])
            .execute("")
            .sync()
            .run()
            .await,
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_name_collision_between_clients() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, name_collision_scenario).await;
    let count = |l: &str| lines.iter().filter(|x| *x == l).count();
    assert_eq!(count("a: DataRow [Some(\"1\")]"), 5, "{lines:#?}");
    assert_eq!(count("b: DataRow [Some(\"2\")]"), 6, "{lines:#?}");
    assert!(
        !lines.iter().any(|l| l.contains("ErrorResponse")),
        "{lines:#?}"
    );
}

async fn close_and_deallocate_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    // Close, then Bind of the closed name.
    step("parse", a.parse("S_1", "select 1").sync().run().await);
    step("use", a.bind("", "S_1", &[]).execute("").sync().run().await);
    step("close", a.close(b'S', "S_1").sync().run().await);
    step(
        "closed",
        a.bind("", "S_1", &[]).execute("").sync().run().await,
    );
    step(
        "pipelined",
        a.parse("S_2", "select 2")
            .close(b'S', "S_2")
            .bind("", "S_2", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    step("close unknown", a.close(b'S', "never").sync().run().await);
    // DEALLOCATE of a protocol-level statement.
    step("parse S_3", a.parse("S_3", "select 3").sync().run().await);
    step("deallocate", a.query("DEALLOCATE \"S_3\"").run().await);
    step(
        "deallocated",
        a.bind("", "S_3", &[]).execute("").sync().run().await,
    );
    step(
        "reparse",
        a.parse("S_3", "select 33")
            .bind("", "S_3", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    // Unquoted names fold to lower case: S_3 is not s_3.
    step("deallocate folded", a.query("DEALLOCATE S_3").run().await);
    step(
        "still there",
        a.bind("", "S_3", &[]).execute("").sync().run().await,
    );
    step("parse s_4", a.parse("s_4", "select 4").sync().run().await);
    step(
        "deallocate prepare",
        a.query("deallocate prepare S_4;").run().await,
    );
    step(
        "gone",
        a.bind("", "s_4", &[]).execute("").sync().run().await,
    );
    // DEALLOCATE ALL.
    step(
        "parse two",
        a.parse("d1", "select 'd1'")
            .parse("d2", "select 'd2'")
            .sync()
            .run()
            .await,
    );
    step("deallocate all", a.query("DEALLOCATE ALL").run().await);
    step(
        "d1 gone",
        a.bind("", "d1", &[]).execute("").sync().run().await,
    );
    step(
        "d2 gone",
        a.bind("", "d2", &[]).execute("").sync().run().await,
    );
    step(
        "reparse d1",
        a.parse("d1", "select 'd1 again'")
            .bind("", "d1", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    // DISCARD ALL outside a transaction.
    step("discard all", a.query("DISCARD ALL").run().await);
    step(
        "d1 discarded",
        a.bind("", "d1", &[]).execute("").sync().run().await,
    );
    // DISCARD ALL inside a transaction is refused and forgets nothing.
    step("parse x", a.parse("x", "select 'x'").sync().run().await);
    step("begin", a.query("BEGIN").run().await);
    step("discard in tx", a.query("DISCARD ALL").run().await);
    step("rollback", a.query("ROLLBACK").run().await);
    step(
        "x kept",
        a.bind("", "x", &[]).execute("").sync().run().await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_close_deallocate_discard() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, close_and_deallocate_scenario).await;
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(has("close: CloseComplete"), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("closed: ErrorResponse 26000")),
        "{lines:#?}"
    );
    assert!(has("deallocate: CommandComplete DEALLOCATE"), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("deallocated: ErrorResponse 26000")),
        "{lines:#?}"
    );
    assert!(has("reparse: DataRow [Some(\"33\")]"), "{lines:#?}");
    assert!(
        has("deallocate all: CommandComplete DEALLOCATE ALL"),
        "{lines:#?}"
    );
    assert!(
        has("discard all: CommandComplete DISCARD ALL"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("d1 discarded: ErrorResponse 26000")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("discard in tx: ErrorResponse 25001")),
        "{lines:#?}"
    );
    assert!(has("x kept: DataRow [Some(\"x\")]"), "{lines:#?}");
}

async fn result_type_change_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let (mut ddl, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    ddl.query("drop table if exists rt; create table rt (a int); insert into rt values (1)")
        .run()
        .await;
    out.extend(
        a.parse("S_rt", "select * from rt")
            .describe(b'S', "S_rt")
            .sync()
            .run()
            .await,
    );
    out.extend(a.bind("", "S_rt", &[]).execute("").sync().run().await);
    ddl.query("alter table rt add column b int default 7")
        .run()
        .await;
    for _ in 0..2 {
        out.extend(a.bind("", "S_rt", &[]).execute("").sync().run().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_result_type_change_gives_server_error() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, result_type_change_scenario).await;
    assert!(
        lines
            .iter()
            .any(|l| l == "ErrorResponse 0A000 cached plan must not change result type"),
        "{lines:#?}"
    );
}

/// A result-type change seen from a server connection that never prepared
/// the statement: the proxy prepares it there afresh, and must still answer
/// 0A000 (and fail the transaction) as PostgreSQL does for a statement
/// prepared before the change, until the client prepares it again.
async fn result_type_change_on_another_server_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let (mut holder, _) = raw_connect(port, &[]).await;
    let (mut ddl, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    ddl.query("drop table if exists ro; create table ro (a int); insert into ro values (1)")
        .run()
        .await;
    step(
        "a prepares",
        a.parse("S_ro", "select * from ro")
            .bind("", "S_ro", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    // The holder takes the server that has the statement; the ALTER and
    // a's next transactions run on another one.
    step("holder", holder.query("BEGIN; SELECT 1").run().await);
    ddl.query("alter table ro add column b int default 7")
        .run()
        .await;
    step(
        "a stale",
        a.bind("", "S_ro", &[]).execute("").sync().run().await,
    );
    step(
        "a stale again",
        a.bind("", "S_ro", &[])
            .describe(b'P', "")
            .execute("")
            .sync()
            .run()
            .await,
    );
    step("a describes", a.describe(b'S', "S_ro").sync().run().await);
    step("a begins", a.query("BEGIN").run().await);
    step(
        "a stale in a transaction",
        a.bind("", "S_ro", &[]).execute("").sync().run().await,
    );
    step("a aborted", a.query("SELECT 1").run().await);
    step("a rolls back", a.query("ROLLBACK").run().await);
    step("holder ends", holder.query("COMMIT").run().await);
    step("a closes", a.close(b'S', "S_ro").sync().run().await);
    step(
        "a re-prepares",
        a.parse("S_ro", "select * from ro")
            .bind("", "S_ro", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_result_type_change_on_another_server() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 2, TRUST);
    let lines = differential(&pg, &proxy, result_type_change_on_another_server_scenario).await;
    assert_has_lines(
        &lines,
        &[
            "a stale: ErrorResponse 0A000 cached plan must not change result type",
            "a stale in a transaction: ErrorResponse 0A000 cached plan must not change result type",
            "a aborted: ErrorResponse 25P02",
            "a re-prepares: DataRow [Some(\"1\"), Some(\"7\")]",
        ],
    );
}

/// The same statement text means other tables to clients with another
/// `search_path`: they never share a preparation.
async fn same_text_other_search_path_scenario(port: u16) -> Vec<String> {
    let (mut ddl, _) = raw_connect(port, &[]).await;
    ddl.query(
        "drop schema if exists sp_a, sp_b cascade; create schema sp_a; create schema sp_b; \
         create table sp_a.t (v int); insert into sp_a.t values (1); \
         create table sp_b.t (v text, w text); insert into sp_b.t values ('b', 'w')",
    )
    .run()
    .await;
    let (mut a, _) = raw_connect(port, &[("search_path", "sp_a")]).await;
    let (mut b, _) = raw_connect(port, &[("search_path", "sp_b")]).await;
    let mut out = Vec::new();
    for round in 0..2 {
        for (who, c) in [("a", &mut a), ("b", &mut b)] {
            if round == 0 {
                c.parse("S_t", "select * from t").describe(b'S', "S_t");
            }
            let lines = c.bind("", "S_t", &[]).execute("").sync().run().await;
            out.extend(lines.into_iter().map(|l| format!("{who} {round}: {l}")));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_text_under_other_search_paths() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, same_text_other_search_path_scenario).await;
    for must in [
        "a 1: DataRow [Some(\"1\")]",
        "b 1: DataRow [Some(\"b\"), Some(\"w\")]",
    ] {
        assert!(lines.iter().any(|l| l == must), "{must}\n{lines:#?}");
    }
}

/// After a result-type change, closing and preparing the statement again is
/// how a client recovers (PostgreSQL plans the new Parse afresh), also while
/// another client still holds the same statement text.
async fn reprepare_after_alter_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let (mut other, _) = raw_connect(port, &[]).await;
    let (mut ddl, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    ddl.query("drop table if exists rr; create table rr (a int); insert into rr values (1)")
        .run()
        .await;
    step(
        "other prepares",
        other
            .parse("held", "select * from rr")
            .bind("", "held", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    step(
        "a prepares",
        a.parse("S_rr", "select * from rr")
            .bind("", "S_rr", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    ddl.query("alter table rr add column b int default 7")
        .run()
        .await;
    step(
        "a stale",
        a.bind("", "S_rr", &[]).execute("").sync().run().await,
    );
    step("a closes", a.close(b'S', "S_rr").sync().run().await);
    step(
        "a re-prepares",
        a.parse("S_rr", "select * from rr")
            .describe(b'S', "S_rr")
            .bind("", "S_rr", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    step(
        "new name",
        a.parse("S_rr2", "select * from rr")
            .bind("", "S_rr2", &[])
            .execute("")
            .sync()
            .run()
            .await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_reprepare_after_result_type_change() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, reprepare_after_alter_scenario).await;
    assert!(
        lines
            .iter()
            .any(|l| l == "a re-prepares: DataRow [Some(\"1\"), Some(\"7\")]"),
        "{lines:#?}"
    );
}

/// Statement management while the transaction has failed: PostgreSQL refuses
/// Parse and DEALLOCATE (25P02) and keeps its statements.
async fn statements_in_failed_transaction_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    step(
        "prepare",
        a.parse("keep", "select 'keep'")
            .parse("all", "select 'all'")
            .sync()
            .run()
            .await,
    );
    step("begin", a.query("BEGIN").run().await);
    step("fail", a.query("select 1/0").run().await);
    step(
        "parse same text",
        a.parse("again", "select 'keep'").sync().run().await,
    );
    step("deallocate", a.query("DEALLOCATE keep").run().await);
    step("deallocate all", a.query("DEALLOCATE ALL").run().await);
    step("rollback", a.query("ROLLBACK").run().await);
    step(
        "keep",
        a.bind("", "keep", &[]).execute("").sync().run().await,
    );
    step("all", a.bind("", "all", &[]).execute("").sync().run().await);
    step(
        "again",
        a.bind("", "again", &[]).execute("").sync().run().await,
    );
    step(
        "duplicate parse",
        a.parse("keep", "select 'other'").sync().run().await,
    );
    step(
        "keep",
        a.bind("", "keep", &[]).execute("").sync().run().await,
    );
    out
}

/// Named statements in and around a failed transaction, the way drivers send
/// them in one write: postgres.js (Parse + Describe, then Bind + Execute +
/// Sync) and pgjdbc (Parse + Bind + Describe portal + Execute + Sync).
async fn named_statements_in_failed_transaction_scenario(port: u16) -> Vec<String> {
    let (mut a, _) = raw_connect(port, &[]).await;
    let mut out = Vec::new();
    let mut step = |name: &str, lines: Vec<String>| {
        out.extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    };
    for round in 1..=2 {
        for style in ["js", "jdbc"] {
            for (label, sql) in [
                ("begin", "begin"),
                ("fail", "select 1/0"),
                ("aborted", "select 1"),
                ("rollback", "rollback"),
                ("after", "select 1 as x"),
            ] {
                let name = format!("{style}_{label}");
                let step_name = format!("round {round} {style} {label}");
                // The second round binds what the first one prepared; a name
                // the server refused (25P02) is re-parsed, as drivers do.
                let reparse = round == 1 || label == "aborted";
                if style == "js" {
                    if reparse {
                        a.parse(&name, sql).describe(b'S', &name);
                    }
                    a.bind("", &name, &[]).execute("").sync();
                } else {
                    if reparse {
                        a.parse(&name, sql);
                    }
                    a.bind("", &name, &[]).describe(b'P', "").execute("").sync();
                }
                step(&step_name, a.run().await);
            }
        }
    }
    // A refused Parse leaves no name behind: binding it is 26000, and the
    // name can be prepared again.
    step(
        "bind refused",
        a.bind("", "js_aborted", &[]).execute("").sync().run().await,
    );
    step("bad parse", a.parse("bad", "selec 1").sync().run().await);
    step(
        "parse again",
        a.parse("bad", "select 'fixed'").sync().run().await,
    );
    step(
        "bind again",
        a.bind("", "bad", &[]).execute("").sync().run().await,
    );
    // Pipelined past a Sync into a failed transaction.
    step("begin", a.query("BEGIN").run().await);
    a.parse("p_fail", "select 1/0")
        .bind("", "p_fail", &[])
        .execute("")
        .sync()
        .parse("p_two", "select 2")
        .bind("", "p_two", &[])
        .execute("")
        .sync()
        .parse("p_rollback", "rollback")
        .bind("", "p_rollback", &[])
        .execute("")
        .sync();
    let mut lines = a.run().await;
    lines.extend(a.until_ready().await.iter().map(Msg::line));
    lines.extend(a.until_ready().await.iter().map(Msg::line));
    step("pipelined", lines);
    step(
        "bind refused",
        a.bind("", "p_two", &[]).execute("").sync().run().await,
    );
    step(
        "still works",
        a.bind("", "js_after", &[]).execute("").sync().run().await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_recover_at_rollback_after_an_error() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, named_statements_in_failed_transaction_scenario).await;
    assert_has_lines(
        &lines,
        &[
            "round 1 js rollback: CommandComplete ROLLBACK",
            "round 2 jdbc rollback: CommandComplete ROLLBACK",
            "round 2 js after: DataRow",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_commands_in_failed_transaction() {
    let pg = start_pg(HbaAuth::Trust);
    let proxy = start_proxy(&pg, "transaction", 1, TRUST);
    let lines = differential(&pg, &proxy, statements_in_failed_transaction_scenario).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("deallocate: ErrorResponse 25P02")),
        "{lines:#?}"
    );
}

// ---------------------------------------------------------------------------
// 8. A real driver: psycopg 3
// ---------------------------------------------------------------------------

const PSYCOPG_SCRIPT: &str = r#"
import sys, threading
import psycopg

dsn = sys.argv[1]
errors = []
done = []
lock = threading.Lock()

def worker(tid):
    try:
        with psycopg.connect(dsn, prepare_threshold=0, autocommit=False) as conn:
            # Three statements, two cache slots: psycopg deallocates as it goes.
            conn.prepared_max = 2
            for i in range(50):
                with conn.transaction():
                    with conn.cursor() as cur:
                        cur.execute("select %s::int + %s::int", (i, tid))
                        assert cur.fetchone()[0] == i + tid
                        cur.execute("insert into py_log (tid, i) values (%s, %s)", (tid, i))
                        cur.execute("select count(*) from py_log where tid = %s", (tid,))
                        n = cur.fetchone()[0]
                        assert n == i + 1, f"count {n} != {i + 1}"
                with lock:
                    done.append((tid, i))
    except Exception as e:
        with lock:
            errors.append(f"worker {tid}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"transactions={len(done)}")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_transactions_through_small_pool() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "{}",
        missing_prerequisite("psycopg 3 for python3")
    );
    let pg = start_pg(HbaAuth::default());
    pg.psql("create table py_log (tid int, i int)");
    let proxy = start_proxy(&pg, "transaction", 2, "");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("psycopg_test.py");
    std::fs::write(&script, PSYCOPG_SCRIPT).unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=app password=secret dbname=postgres connect_timeout=10",
        proxy.port
    );
    let out = t(
        "psycopg script",
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(&dsn)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psycopg script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("transactions=200"), "{stdout}\n{stderr}");
    let n = pg.psql("select count(*) from py_log");
    assert_eq!(n.trim(), "200");
}
