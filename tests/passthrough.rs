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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

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
    let pg = PgServer::start(PgOptions {
        auth,
        ..Default::default()
    });
    pg.create_user("app", "secret");
    pg.psql("ALTER ROLE app SUPERUSER");
    pg
}

/// Starts the proxy in front of `pg`. `extra` goes into `[proxy]`.
fn start_proxy(pg: &PgServer, pool_mode: &str, pool_size: usize, extra: &str) -> Proxy {
    let port = free_port();
    Proxy::start(&format!(
        r#"
[proxy]
listen = "127.0.0.1:{port}"
pool_mode = "{pool_mode}"
default_pool_size = {pool_size}
query_wait_timeout = "20s"
{extra}

[backends.blue]
host = "127.0.0.1"
port = {pg_port}

[[users]]
name = "app"
password = "secret"
"#,
        pg_port = pg.port
    ))
}

const TRUST: &str = r#"auth_method = "trust""#;

/// tokio-postgres config for user `app` through the proxy.
fn proxy_config(proxy: &Proxy) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.port)
        .user("app")
        .password("secret")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    c
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

#[derive(Debug, Clone)]
struct Msg {
    tag: u8,
    body: Bytes,
}

fn cstrs(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl Msg {
    /// An ErrorResponse/NoticeResponse field.
    fn field(&self, code: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&c, rest)) = b.split_first() {
            if c == 0 {
                break;
            }
            let end = rest.iter().position(|x| *x == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }

    fn data_row(&self) -> Vec<Option<String>> {
        let mut b = &self.body[..];
        let n = b.get_i16();
        (0..n)
            .map(|_| {
                let len = b.get_i32();
                if len < 0 {
                    None
                } else {
                    let v = String::from_utf8_lossy(&b[..len as usize]).into_owned();
                    b.advance(len as usize);
                    Some(v)
                }
            })
            .collect()
    }

    /// A comparable one-line description (equal lines = equal messages, as far
    /// as a client can tell; BackendKeyData and ParameterStatus are not shown).
    fn line(&self) -> String {
        let b = &self.body[..];
        match self.tag {
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'n' => "NoData".into(),
            b'I' => "EmptyQueryResponse".into(),
            b's' => "PortalSuspended".into(),
            b'c' => "CopyDone".into(),
            b'Z' => format!("ReadyForQuery {}", b[0] as char),
            b'C' => format!("CommandComplete {}", cstrs(b)[0]),
            b'E' | b'N' => format!(
                "{} {} {}",
                if self.tag == b'E' {
                    "ErrorResponse"
                } else {
                    "NoticeResponse"
                },
                self.field(b'C').unwrap_or_default(),
                self.field(b'M').unwrap_or_default()
            ),
            b'D' => format!("DataRow {:?}", self.data_row()),
            b'T' => {
                let mut b = b;
                let n = b.get_i16();
                let mut cols = Vec::new();
                for _ in 0..n {
                    let end = b.iter().position(|x| *x == 0).unwrap();
                    let name = String::from_utf8_lossy(&b[..end]).into_owned();
                    b.advance(end + 1);
                    let _table = b.get_u32();
                    let _attnum = b.get_i16();
                    let type_oid = b.get_u32();
                    b.advance(2 + 4 + 2);
                    cols.push(format!("{name}:{type_oid}"));
                }
                format!("RowDescription {cols:?}")
            }
            b't' => {
                let mut b = b;
                let n = b.get_i16();
                let types: Vec<u32> = (0..n).map(|_| b.get_u32()).collect();
                format!("ParameterDescription {types:?}")
            }
            b'd' => format!("CopyData {}", String::from_utf8_lossy(b)),
            b'G' | b'H' => format!(
                "Copy{}Response",
                if self.tag == b'G' { "In" } else { "Out" }
            ),
            b'A' => {
                let s = cstrs(&b[4..]);
                format!("Notification {} {}", s[0], s[1])
            }
            b'S' => {
                let s = cstrs(b);
                format!("ParameterStatus {}={}", s[0], s[1])
            }
            b'K' => "BackendKeyData".into(),
            other => format!("{} ({} bytes)", other as char, b.len()),
        }
    }
}

struct Raw {
    stream: TcpStream,
    rbuf: BytesMut,
    out: BytesMut,
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_msg(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

impl Raw {
    /// Connects as `app` to database `postgres` with trust authentication and
    /// returns the messages after the startup packet, up to ReadyForQuery.
    async fn connect(port: u16, params: &[(&str, &str)]) -> (Raw, Vec<Msg>) {
        let stream = t("raw connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap_or_else(|e| panic!("raw connect to {port}: {e}"));
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            rbuf: BytesMut::new(),
            out: BytesMut::new(),
        };
        let mut body = BytesMut::new();
        body.put_i32(196608);
        for (k, v) in [("user", "app"), ("database", "postgres")]
            .iter()
            .chain(params.iter())
        {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.put_u8(0);
        raw.out.put_i32(body.len() as i32 + 4);
        raw.out.put_slice(&body);
        let msgs = raw.until_ready().await;
        let first = &msgs[0];
        assert!(
            first.tag == b'R' && first.body[..4] == [0, 0, 0, 0],
            "expected AuthenticationOk (trust), got {:?}",
            msgs.iter().map(Msg::line).collect::<Vec<_>>()
        );
        (raw, msgs)
    }

    fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        put_msg(&mut self.out, b'P', |o| {
            put_cstr(o, name);
            put_cstr(o, sql);
            o.put_i16(0);
        });
        self
    }

    fn bind(&mut self, portal: &str, stmt: &str, params: &[&str]) -> &mut Self {
        put_msg(&mut self.out, b'B', |o| {
            put_cstr(o, portal);
            put_cstr(o, stmt);
            o.put_i16(0);
            o.put_i16(params.len() as i16);
            for p in params {
                o.put_i32(p.len() as i32);
                o.put_slice(p.as_bytes());
            }
            o.put_i16(0);
        });
        self
    }

    fn execute(&mut self, portal: &str) -> &mut Self {
        put_msg(&mut self.out, b'E', |o| {
            put_cstr(o, portal);
            o.put_i32(0);
        });
        self
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'D', |o| {
            o.put_u8(kind);
            put_cstr(o, name);
        });
        self
    }

    fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        put_msg(&mut self.out, b'C', |o| {
            o.put_u8(kind);
            put_cstr(o, name);
        });
        self
    }

    fn sync(&mut self) -> &mut Self {
        put_msg(&mut self.out, b'S', |_| {});
        self
    }

    fn query(&mut self, sql: &str) -> &mut Self {
        put_msg(&mut self.out, b'Q', |o| put_cstr(o, sql));
        self
    }

    fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        put_msg(&mut self.out, b'd', |o| o.put_slice(data));
        self
    }

    fn copy_done(&mut self) -> &mut Self {
        put_msg(&mut self.out, b'c', |_| {});
        self
    }

    async fn flush(&mut self) {
        let out = self.out.split();
        t("raw write", self.stream.write_all(&out))
            .await
            .expect("raw write");
    }

    async fn recv(&mut self) -> Msg {
        loop {
            if self.rbuf.len() >= 5 {
                let len = i32::from_be_bytes(self.rbuf[1..5].try_into().unwrap()) as usize;
                if self.rbuf.len() > len {
                    let mut frame = self.rbuf.split_to(len + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Msg {
                        tag,
                        body: frame.freeze(),
                    };
                }
            }
            let n = t("raw read", self.stream.read_buf(&mut self.rbuf))
                .await
                .expect("raw read");
            assert!(n > 0, "connection closed by the peer");
        }
    }

    /// Sends what is queued, then reads up to and including ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<Msg> {
        self.flush().await;
        let mut msgs = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag == b'Z';
            msgs.push(m);
            if done {
                return msgs;
            }
        }
    }

    /// [`until_ready`](Self::until_ready) as transcript lines, without
    /// ParameterStatus messages.
    async fn run(&mut self) -> Vec<String> {
        self.until_ready()
            .await
            .iter()
            .filter(|m| m.tag != b'S')
            .map(Msg::line)
            .collect()
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
        let mut report =
            String::from("transcripts differ (direct PostgreSQL | through pgswitch):\n");
        for i in 0..direct.len().max(proxied.len()) {
            let d = direct.get(i).map(String::as_str).unwrap_or("-");
            let p = proxied.get(i).map(String::as_str).unwrap_or("-");
            let mark = if d == p { "  " } else { "!!" };
            report.push_str(&format!("{mark} {d}  |  {p}\n"));
        }
        panic!("{report}");
    }
    proxied
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
    let clients = vec![
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
    let (mut raw, _) = Raw::connect(port, &[]).await;
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
    .unwrap();
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
    let (mut raw, _) = Raw::connect(proxy.port, &[]).await;
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
    let (mut a, _) = Raw::connect(port, &[]).await;
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
        let (mut b, _) = Raw::connect(port, &[]).await;
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
    let clients = vec![
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
