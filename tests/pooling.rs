//! Integration tests of pgswitch's connection pooling, against real
//! PostgreSQL servers started by the shared harness (tests/support):
//! transaction and session pooling, pgbench, query_wait_timeout, idle/lifetime
//! housekeeping, server connect timeouts, dirty client disconnects, lost
//! servers, SIGHUP reload and SIGTERM drain.
mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

const USER: &str = "app";
const PASSWORD: &str = "secret";
const DB: &str = "appdb";

type ConnTask = JoinHandle<Result<(), tokio_postgres::Error>>;

// ---------------------------------------------------------------- helpers

/// A PostgreSQL 15 server with role `app` (password `secret`) owning database
/// `appdb`, which has a table `items(client int, n int)`.
fn start_pg() -> PgServer {
    let pg = pg_with_app(PgOptions::default(), Some(DB));
    pg.psql_db(
        DB,
        "CREATE TABLE items(client int NOT NULL, n int NOT NULL); \
         ALTER TABLE items OWNER TO app;",
    );
    pg
}

/// A proxy config listening on `listen`, backend blue on `backend_port`, with
/// the brief's defaults (`set`/`set_all` replace them) and the user
/// `app`/`secret`.
fn pool_config(listen: u16, backend_port: u16) -> ProxyConfig {
    ProxyConfig::new(backend_port)
        .listen(listen)
        .set_all(&[
            ("pool_mode", "transaction"),
            ("auth_method", "scram-sha-256"),
            ("default_pool_size", "20"),
            ("min_pool_size", "0"),
            ("max_client_conn", "5000"),
            ("query_wait_timeout", "120s"),
            ("server_idle_timeout", "600s"),
            ("server_lifetime", "3600s"),
            ("server_connect_timeout", "5s"),
            ("shutdown_timeout", "30s"),
        ])
        .user(USER, PASSWORD)
}

fn user_config(port: u16, user: &str) -> tokio_postgres::Config {
    client_config(port, user, Some(PASSWORD), DB)
}

/// Connects to the proxy; returns the client and its connection task (whose
/// result carries errors the server sent outside any query, e.g. FATAL).
async fn try_connect_as(
    port: u16,
    user: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let (client, conn) = user_config(port, user).connect(NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

async fn connect_as(port: u16, user: &str) -> Client {
    match tokio::time::timeout(Duration::from_secs(20), try_connect_as(port, user)).await {
        Ok(Ok((c, _task))) => c,
        Ok(Err(e)) => panic!("connect to proxy port {port} as {user}: {}", describe(&e)),
        Err(_) => panic!("connect to proxy port {port} as {user}: hung for 20 s"),
    }
}

async fn connect(port: u16) -> Client {
    connect_as(port, USER).await
}

/// SQLSTATE of a tokio-postgres error, if the server (proxy) sent one.
fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}: {} (detail: {:?}, hint: {:?})",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail(),
            db.hint()
        ),
        None => format!("{e} ({e:?})"),
    }
}

/// Server-side connections of `user` (client backends only).
async fn server_conns(admin: &Client, user: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&user],
        )
        .await
        .expect("count pg_stat_activity")
        .get(0)
}

async fn server_conns_in_state(admin: &Client, user: &str, state_like: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE $2",
            &[&user, &state_like],
        )
        .await
        .expect("count pg_stat_activity")
        .get(0)
}

/// Waits until the server connection count of `user` satisfies `pred`;
/// panics with the last seen count otherwise.
async fn wait_conns(
    admin: &Client,
    user: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(i64) -> bool,
) {
    let last = AtomicI64::new(-1);
    let ok = wait_for(timeout, || async {
        let n = server_conns(admin, user).await;
        last.store(n, Ordering::Relaxed);
        pred(n).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "{what}: server connections of {user} never satisfied the condition within {timeout:?}; last count {}",
        last.load(Ordering::Relaxed)
    );
}

/// Polls the server connection count of `user` until stopped; returns the
/// maximum seen.
fn monitor_conns(admin: Arc<Client>, user: &'static str) -> (Arc<AtomicBool>, JoinHandle<i64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = tokio::spawn(async move {
        let mut max = 0;
        while !stop2.load(Ordering::Relaxed) {
            max = max.max(server_conns(&admin, user).await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        max
    });
    (stop, handle)
}

async fn backend_pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap_or_else(|e| panic!("select pg_backend_pid(): {}", describe(&e)))
        .get(0)
}

async fn count_items(c: &Client, client: i32) -> i64 {
    c.query_one("SELECT count(*) FROM items WHERE client = $1", &[&client])
        .await
        .unwrap_or_else(|e| panic!("count items: {}", describe(&e)))
        .get(0)
}

/// Rows of `items` for `client`, counted by the superuser directly.
fn committed_items(pg: &PgServer, client: i32) -> i64 {
    pg.psql_db(
        DB,
        &format!("SELECT count(*) FROM items WHERE client = {client}"),
    )
    .trim()
    .parse()
    .unwrap()
}

async fn simple_one(c: &Client, sql: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = c.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .flatten())
}

/// The error of a connection task that ended (or `None` if it ended cleanly or
/// did not end within `timeout`; the bool says whether it ended).
async fn conn_outcome(task: ConnTask, timeout: Duration) -> (bool, Option<tokio_postgres::Error>) {
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(()))) => (true, None),
        Ok(Ok(Err(e))) => (true, Some(e)),
        Ok(Err(join)) => panic!("connection task panicked: {join}"),
        Err(_) => (false, None),
    }
}

/// Waits until `needle` occurs at least `n` times in the proxy log.
trait LogCount {
    fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool;
}

impl LogCount for Proxy {
    fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        wait_for_sync(timeout, || {
            (self.logs().matches(needle).count() >= n).then_some(())
        })
        .is_some()
    }
}

// ---------------------------------------------------------------- 1. transaction pooling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_caps_server_connections_and_isolates_transactions() {
    let pg = start_pg();
    pg.create_user("solo", PASSWORD);
    pg.psql_db(DB, "GRANT ALL ON items TO solo");
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "3")])
        .user_keys("solo", &[("password", PASSWORD), ("pool_size", "1")])
        .start();
    let admin = Arc::new(pg.admin().await);

    // 40 clients x 20 transactions through 3 server connections.
    let (stop, monitor) = monitor_conns(admin.clone(), USER);
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..40i32 {
        workers.push(tokio::spawn(async move {
            let c = tokio::time::timeout(Duration::from_secs(60), try_connect_as(port, USER))
                .await
                .map_err(|_| format!("client {i}: connect hung"))?
                .map_err(|e| format!("client {i}: connect: {}", describe(&e)))?
                .0;
            for j in 0..20i32 {
                let step = async {
                    c.batch_execute("BEGIN").await?;
                    c.execute("INSERT INTO items VALUES ($1, $2)", &[&i, &j])
                        .await?;
                    let n: i64 = c
                        .query_one("SELECT count(*) FROM items WHERE client = $1", &[&i])
                        .await?
                        .get(0);
                    c.batch_execute("COMMIT").await?;
                    Ok::<i64, tokio_postgres::Error>(n)
                };
                let n = step
                    .await
                    .map_err(|e| format!("client {i} transaction {j}: {}", describe(&e)))?;
                if n != i64::from(j) + 1 {
                    return Err(format!(
                        "client {i} transaction {j}: saw {n} of its rows, expected {}",
                        j + 1
                    ));
                }
            }
            Ok::<(), String>(())
        }));
    }
    let mut failures = Vec::new();
    for w in workers {
        match tokio::time::timeout(Duration::from_secs(150), w).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("worker panicked: {e}")),
            Err(_) => failures.push("worker hung for 150 s".into()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let max_seen = monitor.await.unwrap();
    eprintln!(
        "800 transactions in {:?}; max server connections {max_seen}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} clients failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        pg.psql_db(DB, "SELECT count(*) FROM items WHERE client >= 0")
            .trim(),
        "800"
    );
    assert!(max_seen >= 1, "the monitor never saw a server connection");
    assert!(
        max_seen <= 3,
        "pool of 3, but the server saw {max_seen} connections from {USER}"
    );

    // Isolation: B never runs on A's server while A is in a transaction.
    let a = connect(port).await;
    let b = connect(port).await;
    a.batch_execute("BEGIN; INSERT INTO items VALUES (-1, 0)")
        .await
        .unwrap();
    let a_pid = backend_pid(&a).await;
    assert_eq!(count_items(&a, -1).await, 1, "A sees its own row");
    assert_eq!(count_items(&b, -1).await, 0, "B saw A's uncommitted row");
    let b_pid = backend_pid(&b).await;
    assert_ne!(
        a_pid, b_pid,
        "B's query ran on the server A's transaction holds"
    );
    assert_eq!(
        backend_pid(&a).await,
        a_pid,
        "A's transaction moved to another server"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count_items(&b, -1).await,
        1,
        "B does not see A's committed row"
    );

    // With a single server connection (per-user pool_size = 1), B must wait
    // for A's transaction to end instead of joining it.
    let s1 = connect_as(port, "solo").await;
    let s2 = Arc::new(connect_as(port, "solo").await);
    s1.batch_execute("BEGIN; INSERT INTO items VALUES (-2, 0)")
        .await
        .unwrap();
    let s2c = s2.clone();
    let waiting = tokio::spawn(async move { count_items(&s2c, -2).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "with pool_size 1, B's query ran while A's transaction held the only server (result {:?})",
        waiting.await
    );
    assert_eq!(server_conns(&admin, "solo").await, 1, "solo pool_size = 1");
    s1.batch_execute("COMMIT").await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("B still waiting after A committed")
        .unwrap();
    assert_eq!(seen, 1, "B should run after A's commit and see its row");

    // A failed transaction (status 'E') still holds its server until ROLLBACK.
    s1.batch_execute("BEGIN; INSERT INTO items VALUES (-3, 0)")
        .await
        .unwrap();
    let err = s1.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("22012"),
        "{}",
        describe(&err)
    );
    let s2c = s2.clone();
    let waiting = tokio::spawn(async move { count_items(&s2c, -3).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "B got the server of A's failed, still open transaction (result {:?})",
        waiting.await
    );
    let err = s1.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("25P02"),
        "A's transaction should still be aborted: {}",
        describe(&err)
    );
    s1.batch_execute("ROLLBACK").await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("B still waiting after A rolled back")
        .unwrap();
    assert_eq!(seen, 0, "A's rolled back row is visible");
    drop(proxy);
}

// ---------------------------------------------------------------- 2. session mode

async fn check_session_state_persists(c: &Client) {
    c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    c.batch_execute(
        "CREATE TEMP TABLE scratch(x int); INSERT INTO scratch VALUES (1), (2); \
         PREPARE leftover AS SELECT 42; LISTEN leftover_channel; \
         SELECT pg_advisory_lock(4242)",
    )
    .await
    .unwrap();
    let pid = backend_pid(c).await;
    for _ in 0..3 {
        assert_eq!(
            simple_one(c, "SHOW work_mem").await.unwrap().as_deref(),
            Some("7MB")
        );
        let wm: String = c
            .query_one("SELECT current_setting('work_mem')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(wm, "7MB");
        let n: i64 = c
            .query_one("SELECT count(*) FROM scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "temp table lost between statements");
        assert_eq!(backend_pid(c).await, pid, "session moved to another server");
        assert_eq!(
            simple_one(c, "EXECUTE leftover").await.unwrap().as_deref(),
            Some("42")
        );
    }
}

async fn check_fresh_session(c: &Client) {
    let wm = simple_one(c, "SHOW work_mem").await.unwrap();
    assert_ne!(
        wm.as_deref(),
        Some("7MB"),
        "a new client inherited SET work_mem"
    );
    let gone: bool = c
        .query_one("SELECT to_regclass('scratch') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone, "a new client sees the previous client's temp table");
    let err = c.simple_query("SELECT * FROM scratch").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("42P01"),
        "{}",
        describe(&err)
    );
    let err = c.simple_query("EXECUTE leftover").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("26000"),
        "prepared statement survived: {}",
        describe(&err)
    );
    let listening: i64 = c
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 0, "LISTEN survived into a new client's session");
    // The previous session's advisory lock is released (whether its server
    // was closed or reset); another session can take it.
    wait_until(
        Duration::from_secs(5),
        "session advisory lock of a disconnected client is still held",
        || async {
            let r: bool = c
                .query_one("SELECT pg_try_advisory_lock(4242)", &[])
                .await
                .unwrap()
                .get(0);
            r
        },
    )
    .await;
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        held, 0,
        "another server session still holds an advisory lock"
    );
    c.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_session_state_and_resets_it_for_the_next_client() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("pool_mode", "session"), ("default_pool_size", "5")])
        .start();
    let admin = pg.admin().await;

    let c1 = connect(port).await;
    check_session_state_persists(&c1).await;
    wait_conns(&admin, USER, Duration::from_secs(5), "one client", |n| {
        n == 1
    })
    .await;

    let c2 = connect(port).await;
    let c3 = connect(port).await;
    let pids = [
        backend_pid(&c1).await,
        backend_pid(&c2).await,
        backend_pid(&c3).await,
    ];
    // From its first query on, each session client holds its own server
    // connection, even when idle.
    wait_conns(&admin, USER, Duration::from_secs(5), "three clients", |n| {
        n == 3
    })
    .await;
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );
    drop(c2);
    drop(c3);
    assert!(
        proxy.wait_for_log_count("client terminated", 2, Duration::from_secs(5)),
        "proxy did not log the two disconnects"
    );
    // Their servers are closed or reset and pooled: never more than before,
    // and two new clients need no new ones.
    assert!(server_conns(&admin, USER).await <= 3);
    let c5 = connect(port).await;
    let c6 = connect(port).await;
    let (pid5, pid6) = (backend_pid(&c5).await, backend_pid(&c6).await);
    wait_conns(
        &admin,
        USER,
        Duration::from_secs(5),
        "three clients again",
        |n| n == 3,
    )
    .await;
    assert_ne!(pid5, pid6);
    drop(c5);
    drop(c6);

    // The next client may get c1's server (reset) or a new one: either way it
    // inherits nothing of c1's session.
    let c1_pid = backend_pid(&c1).await;
    drop(c1);
    assert!(
        proxy.wait_for_log_count("client terminated", 5, Duration::from_secs(5)),
        "proxy did not log c1's disconnect"
    );
    let c4 = connect(port).await;
    let c4_pid = backend_pid(&c4).await;
    eprintln!(
        "c1 server pid {c1_pid}, next client's {c4_pid} (reused: {})",
        c1_pid == c4_pid
    );
    check_fresh_session(&c4).await;
    wait_conns(
        &admin,
        USER,
        Duration::from_secs(5),
        "at most the 3 servers",
        |n| (1..=3).contains(&n),
    )
    .await;
    drop(c4);

    // Startup parameters belong to their session only.
    let closed_before = proxy.logs().matches("client terminated").count();
    let mut cfg = user_config(port, USER);
    cfg.application_name("first_session_app");
    let (named, _task) = cfg
        .connect(NoTls)
        .await
        .map(|(c, conn)| (c, tokio::spawn(conn)))
        .unwrap();
    assert_eq!(
        simple_one(&named, "SHOW application_name")
            .await
            .unwrap()
            .as_deref(),
        Some("first_session_app")
    );
    let named_pid = backend_pid(&named).await;
    drop(named);
    assert!(proxy.wait_for_log_count(
        "client terminated",
        closed_before + 1,
        Duration::from_secs(5)
    ));
    let plain = connect(port).await;
    let plain_pid = backend_pid(&plain).await;
    let app_name = simple_one(&plain, "SHOW application_name").await.unwrap();
    assert_ne!(
        app_name.as_deref(),
        Some("first_session_app"),
        "the next client (server pid {plain_pid}, previous {named_pid}) inherited the previous client's application_name"
    );
    drop(plain);
    assert!(proxy.wait_for_log_count(
        "client terminated",
        closed_before + 2,
        Duration::from_secs(5)
    ));
    let mut cfg = user_config(port, USER);
    cfg.application_name("second_session_app");
    let (named2, _task2) = cfg
        .connect(NoTls)
        .await
        .map(|(c, conn)| (c, tokio::spawn(conn)))
        .unwrap();
    assert_eq!(
        simple_one(&named2, "SHOW application_name")
            .await
            .unwrap()
            .as_deref(),
        Some("second_session_app")
    );
    drop(proxy);
}

/// Session mode with every server taken: a new client's login completes at
/// once (well inside a client-side connect timeout shorter than the wait), and
/// its first query waits for a server, as with PgBouncer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_logs_in_at_once_and_waits_at_the_first_query() {
    let pg = start_pg();
    let port = free_port();
    let _proxy = pool_config(port, pg.port)
        .set_all(&[("pool_mode", "session"), ("default_pool_size", "1")])
        .start();
    let mut holder = connect(port).await;
    backend_pid(&holder).await;
    // A second set of startup parameters is checked on a server of its own:
    // the only pooled one is taken.
    for app in [None, Some("late_client")] {
        let mut cfg = user_config(port, USER);
        cfg.connect_timeout(Duration::from_secs(1));
        if let Some(app) = app {
            cfg.application_name(app);
        }
        let started = Instant::now();
        let (late, conn) = cfg.connect(NoTls).await.unwrap_or_else(|e| {
            panic!(
                "login with {app:?} while the pool is taken: {}",
                describe(&e)
            )
        });
        let login = started.elapsed();
        tokio::spawn(conn);
        assert!(login < Duration::from_millis(500), "login took {login:?}");
        // The first query waits until the holder's session ends.
        let query = tokio::spawn(async move {
            let row = late
                .query_one("SELECT current_setting('application_name')", &[])
                .await;
            (row.map(|r| r.get::<_, String>(0)), late)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !query.is_finished(),
            "the first query did not wait for a server"
        );
        let holder_gone = Instant::now();
        drop(holder);
        let (row, late) = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the first query never got a server")
            .expect("query task");
        let app_name = row.unwrap_or_else(|e| panic!("first query: {}", describe(&e)));
        assert_eq!(app_name, app.unwrap_or(""), "startup parameter lost");
        eprintln!(
            "login {login:?}, first query {:?} after the server freed",
            holder_gone.elapsed()
        );
        // The late client holds the server now; the next round waits for it.
        holder = late;
    }
}

/// pgbench connects all its clients before any runs: over a session pool
/// a quarter of their number, with a connect timeout shorter than the run,
/// every client logs in at once and runs when a server frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_over_a_smaller_session_pool_never_times_out_at_login() {
    let pg = start_pg();
    let port = free_port();
    let _proxy = pool_config(port, pg.port)
        .set_all(&[("pool_mode", "session"), ("default_pool_size", "2")])
        .start();
    let init = run_pgbench(port, &["-i", "-s", "1"]).await;
    assert!(init.status.success(), "pgbench -i: {init:?}");
    // The first two clients hold the servers for the whole 3 s run: the
    // other six wait that long at their first query, three times their
    // connect timeout.
    let started = Instant::now();
    let out =
        run_pgbench_with_connect_timeout(port, &["-c", "8", "-j", "2", "-T", "3", "-S"], 1).await;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench failed\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("timeout expired"), "{stderr}");
    assert!(
        elapsed > Duration::from_secs(2),
        "the run took {elapsed:?}: no client waited"
    );
    eprintln!("8 pgbench clients over a session pool of 2: {elapsed:?}\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_pool_mode_session_overrides_transaction_mode() {
    let pg = start_pg();
    pg.create_user("sess", PASSWORD);
    pg.psql_db(DB, "GRANT CREATE, TEMP ON DATABASE appdb TO sess");
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("pool_mode", "transaction")])
        .user_keys("sess", &[("password", PASSWORD), ("pool_mode", "session")])
        .start();
    let admin = pg.admin().await;
    let c1 = connect_as(port, "sess").await;
    check_session_state_persists(&c1).await;
    let c2 = connect_as(port, "sess").await;
    backend_pid(&c2).await;
    wait_conns(
        &admin,
        "sess",
        Duration::from_secs(5),
        "two session clients",
        |n| n == 2,
    )
    .await;
    drop(c1);
    drop(c2);
    assert!(proxy.wait_for_log_count("client terminated", 2, Duration::from_secs(5)));
    let c3 = connect_as(port, "sess").await;
    check_fresh_session(&c3).await;
    drop(proxy);
}

// ---------------------------------------------------------------- 3. pgbench

async fn run_pgbench(port: u16, args: &[&str]) -> std::process::Output {
    run_pgbench_with_connect_timeout(port, args, 10).await
}

async fn run_pgbench_with_connect_timeout(
    port: u16,
    args: &[&str],
    connect_timeout_s: u32,
) -> std::process::Output {
    let mut cmd = std::process::Command::new(pgbench_bin());
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", connect_timeout_s.to_string())
        .env_remove("PGSERVICE")
        .stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("spawn pgbench"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_prepared_through_transaction_pool() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "4")])
        .start();
    let admin = Arc::new(pg.admin().await);

    let init = run_pgbench(port, &["-i", "-s", "1"]).await;
    let init_err = String::from_utf8_lossy(&init.stderr);
    assert!(
        init.status.success(),
        "pgbench -i failed ({}):\n{init_err}",
        init.status
    );
    assert!(
        !init_err.to_lowercase().contains("error"),
        "pgbench -i stderr:\n{init_err}"
    );
    assert_eq!(
        pg.psql_db(DB, "SELECT count(*) FROM pgbench_accounts")
            .trim(),
        "100000"
    );

    for mode in ["simple", "extended", "prepared"] {
        let (stop, monitor) = monitor_conns(admin.clone(), USER);
        let out = run_pgbench(port, &["-c", "16", "-j", "2", "-T", "5", "-M", mode]).await;
        stop.store(true, Ordering::Relaxed);
        let max_seen = monitor.await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ctx = format!(
            "-M {mode}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
        assert!(out.status.success(), "pgbench exited non-zero {ctx}");
        assert!(stdout.contains("number of failed transactions: 0"), "{ctx}");
        assert!(
            !stderr.to_lowercase().contains("error"),
            "errors on stderr {ctx}"
        );
        let processed: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count {ctx}"));
        assert!(processed > 0, "no transactions processed {ctx}");
        assert!(
            max_seen <= 4,
            "pool of 4, server saw {max_seen} connections {ctx}"
        );
        eprintln!("pgbench -M {mode}: {processed} transactions, max {max_seen} server connections");
    }
    drop(proxy);
}

// ---------------------------------------------------------------- 4. query_wait_timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_fails_waiting_client_with_53300() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "1"), ("query_wait_timeout", "1s")])
        .start();
    let a = connect(port).await;
    let (b, b_task) = try_connect_as(port, USER).await.expect("connect B");
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        simple_one(&a, "select 1").await.unwrap().as_deref(),
        Some("1")
    );

    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), b.simple_query("select 1")).await;
    let elapsed = t0.elapsed();
    let err = match res {
        Err(_) => panic!("B's query hung for 10 s despite query_wait_timeout = 1s"),
        Ok(Ok(_)) => panic!("B's query succeeded while the only server was in A's transaction"),
        Ok(Err(e)) => e,
    };
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("53300"),
        "{}",
        describe(&err)
    );
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("query_wait_timeout"),
        "message should name query_wait_timeout: {msg}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(3),
        "B failed after {elapsed:?}, expected about 1 s"
    );
    let _ = conn_outcome(b_task, Duration::from_secs(5)).await;

    // A is unaffected and, once it commits, new clients get the server.
    assert_eq!(
        simple_one(&a, "select 2").await.unwrap().as_deref(),
        Some("2")
    );
    a.batch_execute("COMMIT").await.unwrap();
    let c = connect(port).await;
    let v = tokio::time::timeout(Duration::from_secs(5), simple_one(&c, "select 3"))
        .await
        .expect("new client hung")
        .unwrap_or_else(|e| panic!("new client after A committed: {}", describe(&e)));
    assert_eq!(v.as_deref(), Some("3"));
    drop(proxy);
}

// ---------------------------------------------------------------- 5. housekeeping

/// `n` clients each run `select pg_sleep(0.3)` at the same time.
async fn burst(clients: &[Arc<Client>]) {
    let mut tasks = Vec::new();
    for c in clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.simple_query("select pg_sleep(0.3)").await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("burst query: {}", describe(&e)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_closes_idle_server_connections() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[
            ("default_pool_size", "5"),
            ("min_pool_size", "0"),
            ("server_idle_timeout", "1s"),
        ])
        .start();
    let admin = Arc::new(pg.admin().await);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(connect(port).await));
    }
    let (stop, monitor) = monitor_conns(admin.clone(), USER);
    burst(&clients).await;
    stop.store(true, Ordering::Relaxed);
    let max_seen = monitor.await.unwrap();
    assert!(
        max_seen >= 2,
        "the burst should open several server connections; saw {max_seen}"
    );
    let burst_end = Instant::now();
    // Clients stay connected but idle: the servers must still go.
    wait_conns(
        &admin,
        USER,
        Duration::from_millis(3500),
        "after idle timeout",
        |n| n == 0,
    )
    .await;
    eprintln!(
        "idle servers closed {:?} after the burst",
        burst_end.elapsed()
    );
    // The pool opens new connections on demand.
    assert_eq!(
        simple_one(&clients[0], "select 1")
            .await
            .unwrap()
            .as_deref(),
        Some("1")
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_connections_open() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[
            ("default_pool_size", "5"),
            ("min_pool_size", "2"),
            ("server_idle_timeout", "1s"),
        ])
        .start();
    let admin = Arc::new(pg.admin().await);
    let first = connect(port).await;
    assert_eq!(
        simple_one(&first, "select 1").await.unwrap().as_deref(),
        Some("1")
    );
    // The pool exists now: it is topped up to 2.
    wait_conns(
        &admin,
        USER,
        Duration::from_secs(4),
        "min_pool_size after first client",
        |n| n == 2,
    )
    .await;

    // A burst grows it; idle timeout shrinks it back to 2, never below.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(connect(port).await));
    }
    burst(&clients).await;
    assert!(
        server_conns(&admin, USER).await >= 3,
        "burst should open more than 2"
    );
    wait_conns(
        &admin,
        USER,
        Duration::from_secs(4),
        "shrink to min_pool_size",
        |n| n == 2,
    )
    .await;
    let hold_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < hold_until {
        let n = server_conns(&admin, USER).await;
        assert_eq!(
            n, 2,
            "min_pool_size = 2 but the server has {n} connections from {USER}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A lost idle connection is replaced.
    let victim: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 ORDER BY pid LIMIT 1",
            &[&USER],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&victim])
        .await
        .unwrap();
    let admin2 = admin.clone();
    wait_until(
        Duration::from_secs(5),
        "terminated idle connection was not replaced to keep min_pool_size = 2",
        || {
            let admin = admin2.clone();
            async move {
                let pids: Vec<i32> = admin
                    .query(
                        "SELECT pid FROM pg_stat_activity WHERE usename = $1",
                        &[&USER],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                pids.len() == 2 && !pids.contains(&victim)
            }
        },
    )
    .await;
    assert_eq!(
        simple_one(&first, "select 2").await.unwrap().as_deref(),
        Some("2")
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_old_connections_without_client_errors() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "1"), ("server_lifetime", "1s")])
        .start();
    let c = connect(port).await;
    let p1 = backend_pid(&c).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p2 = backend_pid(&c).await;
    assert_ne!(
        p1, p2,
        "server connection older than server_lifetime was reused"
    );

    // A transaction outliving server_lifetime is not cut short.
    c.batch_execute("BEGIN; INSERT INTO items VALUES (-5, 1)")
        .await
        .unwrap();
    let in_tx = backend_pid(&c).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        backend_pid(&c).await,
        in_tx,
        "transaction moved to another server"
    );
    c.batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("commit: {}", describe(&e)));
    assert_eq!(committed_items(&pg, -5), 1);
    let p3 = backend_pid(&c).await;
    assert_ne!(
        p3, in_tx,
        "connection older than server_lifetime reused after the transaction"
    );
    drop(c);

    // Under continuous load connections keep being retired: nobody sees an error.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..4i32 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let c = connect(port).await;
            let mut pids = std::collections::HashSet::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let step = async {
                    c.batch_execute("BEGIN").await?;
                    c.execute("INSERT INTO items VALUES ($1, $2)", &[&(100 + i), &n])
                        .await?;
                    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                    c.batch_execute("COMMIT").await?;
                    Ok::<i32, tokio_postgres::Error>(pid)
                };
                let pid = step
                    .await
                    .map_err(|e| format!("worker {i} transaction {n}: {}", describe(&e)))?;
                pids.insert(pid);
                n += 1;
            }
            Ok::<(usize, i32), String>((pids.len(), n))
        }));
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut distinct = 0;
    for (i, w) in workers.into_iter().enumerate() {
        let (pids, n) = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("worker hung")
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "worker {i} ran no transaction");
        assert_eq!(committed_items(&pg, 100 + i as i32), i64::from(n));
        distinct = distinct.max(pids);
    }
    assert!(
        distinct >= 2,
        "in 3.5 s with server_lifetime = 1s a client should meet several servers"
    );
    drop(proxy);
}

// ---------------------------------------------------------------- 6. connect timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connect_timeout_and_refused_backend_give_class_08_errors() {
    // A "server" that accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepted2 = accepted.clone();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            accepted2.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    let port = free_port();
    let proxy = pool_config(port, hole_port)
        .set_all(&[
            ("default_pool_size", "1"),
            ("server_connect_timeout", "500ms"),
            ("query_wait_timeout", "10s"),
        ])
        .start();
    // Repeated: a failed connect must not leak the pool's only slot.
    for attempt in 0..3 {
        let t0 = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(15), try_connect_as(port, USER)).await;
        let elapsed = t0.elapsed();
        let err = match res {
            Err(_) => panic!("attempt {attempt}: client hung 15 s on a silent backend"),
            Ok(Ok(_)) => panic!("attempt {attempt}: connected through a silent backend?"),
            Ok(Err(e)) => e,
        };
        let code = sqlstate(&err);
        assert!(
            code.as_deref().is_some_and(|c| c.starts_with("08")),
            "attempt {attempt}: expected SQLSTATE class 08, got {}",
            describe(&err)
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "attempt {attempt}: error took {elapsed:?}"
        );
    }
    assert!(
        accepted.load(Ordering::Relaxed) >= 1,
        "proxy never connected to the backend"
    );
    drop(proxy);
    hole.abort();

    // Nothing listening at all.
    let dead_port = free_port();
    let port2 = free_port();
    let proxy2 = pool_config(port2, dead_port)
        .set_all(&[("default_pool_size", "1")])
        .start();
    for attempt in 0..2 {
        let t0 = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(15), try_connect_as(port2, USER)).await;
        let err = match res {
            Err(_) => panic!("client hung on a backend port with nothing listening"),
            Ok(Ok(_)) => panic!("connected through a dead backend?"),
            Ok(Err(e)) => e,
        };
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "refused backend: error took {:?}",
            t0.elapsed()
        );
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("attempt {attempt}: no server error, just {err:?}"));
        assert!(
            db.code().code().starts_with("08"),
            "expected class 08: {}",
            describe(&err)
        );
        let msg = db.message().to_lowercase();
        assert!(
            msg.contains("connect") || msg.contains(&dead_port.to_string()),
            "unclear message: {}",
            db.message()
        );
    }
    drop(proxy2);
}

// ---------------------------------------------------------------- 7. dirty disconnect

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnecting_mid_transaction_rolls_back_and_frees_the_server() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "1"), ("query_wait_timeout", "5s")])
        .start();
    let admin = pg.admin().await;

    for (round, abrupt) in [(0, true), (1, false)] {
        let marker = -70 - round;
        let (a, a_task) = try_connect_as(port, USER).await.expect("connect A");
        a.batch_execute(&format!("BEGIN; INSERT INTO items VALUES ({marker}, 1)"))
            .await
            .unwrap();
        assert_eq!(
            server_conns_in_state(&admin, USER, "idle in transaction%").await,
            1
        );
        if abrupt {
            // Socket closed without a Terminate message.
            a_task.abort();
            let _ = a_task.await;
            drop(a);
        } else {
            // Terminate message sent mid-transaction.
            drop(a);
            let _ = conn_outcome(a_task, Duration::from_secs(5)).await;
        }
        let b = connect(port).await;
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            b.query_one("SELECT count(*) FROM items WHERE client = $1", &[&marker]),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: B hung after A vanished"))
        .unwrap_or_else(|e| panic!("round {round}: B failed after A vanished: {}", describe(&e)));
        assert_eq!(
            seen.get::<_, i64>(0),
            0,
            "round {round}: B saw A's uncommitted row"
        );
        wait_until(
            Duration::from_secs(5),
            &format!("round {round}: an 'idle in transaction' server session remained"),
            || async { server_conns_in_state(&admin, USER, "idle in transaction%").await == 0 },
        )
        .await;
        assert_eq!(
            committed_items(&pg, marker),
            0,
            "round {round}: A's row was committed"
        );
    }

    // A client that vanishes while its query runs: the pool's only slot is
    // free again for B (the busy server connection is not reused).
    let (a, a_task) = try_connect_as(port, USER).await.expect("connect A");
    let a = Arc::new(a);
    let a2 = a.clone();
    let running = tokio::spawn(async move { a2.simple_query("SELECT pg_sleep(1.5)").await });
    wait_until(Duration::from_secs(5), "A's query never started on the server", || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query LIKE '%pg_sleep(1.5)%' AND state = 'active'",
                &[&USER],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    a_task.abort();
    let _ = a_task.await;
    let _ = running.await;
    drop(a);
    let b = connect(port).await;
    let res = tokio::time::timeout(Duration::from_secs(10), simple_one(&b, "select 7"))
        .await
        .expect("B hung after A vanished mid-query");
    match res {
        Ok(v) => assert_eq!(v.as_deref(), Some("7")),
        Err(e) => panic!("B failed after A vanished mid-query: {}", describe(&e)),
    }
    drop(proxy);
}

// ---------------------------------------------------------------- 10b. SIGTERM with a stuck transaction

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_after_shutdown_timeout_even_with_an_open_transaction() {
    let pg = start_pg();
    let port = free_port();
    let mut proxy = pool_config(port, pg.port)
        .set_all(&[("shutdown_timeout", "2s")])
        .start();
    let admin = pg.admin().await;
    let stuck = connect(port).await;
    stuck
        .batch_execute("BEGIN; INSERT INTO items VALUES (-12, 1)")
        .await
        .unwrap();
    let t0 = Instant::now();
    proxy.signal(SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(4)).unwrap_or_else(|| {
        panic!(
            "proxy still running {:?} after SIGTERM with shutdown_timeout = 2s",
            t0.elapsed()
        )
    });
    let took = t0.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", proxy.logs());
    assert!(
        took >= Duration::from_millis(1500),
        "proxy exited after {took:?}, not waiting shutdown_timeout for the open transaction"
    );
    // Its server connections are gone, so the server rolled back.
    wait_conns(
        &admin,
        USER,
        Duration::from_secs(5),
        "after proxy exit",
        |n| n == 0,
    )
    .await;
    assert_eq!(committed_items(&pg, -12), 0);
    assert!(stuck.simple_query("select 1").await.is_err());
}

// ---------------------------------------------------------------- 8. server lost

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_server_fails_the_client_cleanly_and_pool_recovers() {
    let pg = start_pg();
    let port = free_port();
    let proxy = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "1"), ("query_wait_timeout", "5s")])
        .start();
    let admin = pg.admin().await;
    let (c, c_task) = try_connect_as(port, USER).await.expect("connect");
    c.batch_execute("BEGIN; INSERT INTO items VALUES (-8, 1)")
        .await
        .unwrap();
    let pids: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
            &[&USER],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed);

    let res = tokio::time::timeout(Duration::from_secs(10), c.simple_query("select 1")).await;
    let query_err = match res {
        Err(_) => panic!("client's next query hung after its server was terminated"),
        Ok(Ok(_)) => {
            panic!("client's query succeeded on a terminated server (transaction silently lost)")
        }
        Ok(Err(e)) => e,
    };
    let (ended, conn_err) = conn_outcome(c_task, Duration::from_secs(5)).await;
    assert!(
        ended,
        "client connection still open 5 s after its server was terminated"
    );
    let codes: Vec<String> = [Some(&query_err), conn_err.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(sqlstate)
        .collect();
    assert!(
        codes.iter().any(|c| c == "57P01" || c.starts_with("08")),
        "expected SQLSTATE 57P01 or class 08; query error: {}; connection error: {:?}",
        describe(&query_err),
        conn_err.as_ref().map(describe)
    );
    assert!(c.is_closed(), "client connection not closed");

    // The pool's only slot is free again and a new server connection works.
    let d = connect(port).await;
    let n = tokio::time::timeout(Duration::from_secs(10), count_items(&d, -8))
        .await
        .expect("new client hung after server loss");
    assert_eq!(n, 0, "terminated transaction's row is visible");
    let new_pid = backend_pid(&d).await;
    assert_ne!(new_pid, pids[0]);
    assert_eq!(
        server_conns_in_state(&admin, USER, "idle in transaction%").await,
        0
    );

    // A server connection that dies while idle in the pool is noticed and
    // replaced: the next transaction sees no error.
    for round in 0..3 {
        let idle_pid = backend_pid(&d).await;
        let killed: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[&idle_pid])
            .await
            .unwrap()
            .get(0);
        assert!(killed);
        wait_until(
            Duration::from_secs(5),
            &format!("terminated backend {idle_pid} did not exit"),
            || async {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                        &[&idle_pid],
                    )
                    .await
                    .unwrap()
                    .get(0);
                n == 0
            },
        )
        .await;
        let res = tokio::time::timeout(Duration::from_secs(10), d.simple_query("select 1"))
            .await
            .expect("query hung after the idle server was terminated");
        if let Err(e) = res {
            panic!(
                "round {round}: the pooled server died while idle and the client's next query failed: {}",
                describe(&e)
            );
        }
        assert_ne!(backend_pid(&d).await, idle_pid, "round {round}");
    }
    drop(proxy);
}

// ---------------------------------------------------------------- 9. SIGHUP reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_resizes_pool_and_rejects_bad_configs() {
    let pg = start_pg();
    let port = free_port();
    let cfg2 = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "2")])
        .toml();
    let mut proxy = Proxy::start(&cfg2);
    let admin = pg.admin().await;

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(connect(port).await));
    }
    for (i, c) in clients.iter().take(2).enumerate() {
        c.batch_execute(&format!("BEGIN; INSERT INTO items VALUES (-9, {i})"))
            .await
            .unwrap();
    }
    // The third and fourth wait for a server.
    let mut waiting = Vec::new();
    for (i, c) in clients.iter().enumerate().skip(2) {
        let c = c.clone();
        waiting.push(tokio::spawn(async move {
            c.batch_execute(&format!("BEGIN; INSERT INTO items VALUES (-9, {i})"))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "pool of 2 gave a third transaction a server"
    );
    assert_eq!(server_conns(&admin, USER).await, 2);

    let cfg4 = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "4")])
        .toml();
    proxy.rewrite_config(&cfg4);
    proxy.signal(SIGHUP);
    assert!(
        proxy.wait_for_log("configuration reloaded", Duration::from_secs(10)),
        "no reload log line:\n{}",
        proxy.logs()
    );
    for w in waiting {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("waiting transaction did not get a server after the pool grew to 4")
            .unwrap()
            .unwrap_or_else(|e| panic!("waiting transaction: {}", describe(&e)));
    }
    assert_eq!(
        server_conns_in_state(&admin, USER, "idle in transaction%").await,
        4
    );
    for c in &clients {
        c.batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("commit after reload: {}", describe(&e)));
    }
    assert_eq!(committed_items(&pg, -9), 4);

    // A config with an unknown key is rejected; the old one stays.
    let bad = pool_config(port, pg.port)
        .set_all(&[("default_pool_size", "1"), ("bogus_pool_knob", "3")])
        .toml();
    proxy.rewrite_config(&bad);
    proxy.signal(SIGHUP);
    assert!(
        proxy.wait_for_log("reload failed", Duration::from_secs(10)),
        "no reload failure logged:\n{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("bogus_pool_knob"),
        "reload error does not name the key:\n{logs}"
    );
    assert!(
        proxy.exited().is_none(),
        "proxy exited after a bad reload:\n{logs}"
    );
    // Still 4 servers (not 1): four concurrent transactions go through.
    let mut fresh = Vec::new();
    for _ in 0..4 {
        fresh.push(connect(port).await);
    }
    for (i, c) in fresh.iter().enumerate() {
        tokio::time::timeout(
            Duration::from_secs(5),
            c.batch_execute(&format!("BEGIN; INSERT INTO items VALUES (-10, {i})")),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("transaction {i} waited: the rejected config (pool size 1) was applied")
        })
        .unwrap();
    }
    for c in &fresh {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(committed_items(&pg, -10), 4);
    drop(proxy);

    // Bad config at startup: non-zero exit naming the key.
    let port3 = free_port();
    let bad_start = pool_config(port3, pg.port)
        .set_all(&[("bogus_pool_knob", "3")])
        .toml();
    let mut p3 = Proxy::spawn(&bad_start);
    let status = p3
        .wait_exit(Duration::from_secs(10))
        .expect("proxy with an unknown config key kept running");
    assert!(
        !status.success(),
        "bad config at startup exited with {status}"
    );
    assert!(
        p3.logs().contains("bogus_pool_knob"),
        "startup error does not name the key:\n{}",
        p3.logs()
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .arg("check-config")
        .arg("--config")
        .arg(&p3.config_path)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "check-config accepted an unknown key"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bogus_pool_knob"),
        "check-config output does not name the key: {stderr}"
    );
}

// ---------------------------------------------------------------- 10. SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_transactions_then_exits_zero() {
    let pg = start_pg();
    let port = free_port();
    let mut proxy = pool_config(port, pg.port)
        .set_all(&[("shutdown_timeout", "10s")])
        .start();

    let (busy, _busy_task) = try_connect_as(port, USER).await.expect("connect busy");
    let (idle, idle_task) = try_connect_as(port, USER).await.expect("connect idle");
    assert_eq!(
        simple_one(&idle, "select 1").await.unwrap().as_deref(),
        Some("1")
    );
    busy.batch_execute("BEGIN; INSERT INTO items VALUES (-11, 1)")
        .await
        .unwrap();

    let t0 = Instant::now();
    proxy.signal(SIGTERM);
    wait_until(
        Duration::from_secs(5),
        "proxy still accepts new clients after SIGTERM",
        || async {
            matches!(
                tokio::time::timeout(Duration::from_secs(3), try_connect_as(port, USER)).await,
                Ok(Err(_))
            )
        },
    )
    .await;
    assert!(
        proxy.exited().is_none(),
        "proxy exited while a transaction was open"
    );

    // The open transaction finishes.
    busy.batch_execute("INSERT INTO items VALUES (-11, 2)")
        .await
        .unwrap_or_else(|e| panic!("statement in draining transaction: {}", describe(&e)));
    busy.batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT during shutdown: {}", describe(&e)));
    assert_eq!(committed_items(&pg, -11), 2);

    let status = proxy
        .wait_exit(Duration::from_secs(12).saturating_sub(t0.elapsed()))
        .expect("proxy did not exit within shutdown_timeout + 2 s");
    assert!(
        status.success(),
        "proxy exited with {status}:\n{}",
        proxy.logs()
    );

    // The idle client was told (57P01) or disconnected.
    let res = tokio::time::timeout(Duration::from_secs(5), idle.simple_query("select 1")).await;
    match res {
        Err(_) => panic!("idle client's query hung after shutdown"),
        Ok(Ok(_)) => panic!("idle client's query succeeded after the proxy exited"),
        Ok(Err(e)) => {
            if let Some(code) = sqlstate(&e) {
                assert_eq!(code, "57P01", "{}", describe(&e));
            }
        }
    }
    let (ended, conn_err) = conn_outcome(idle_task, Duration::from_secs(5)).await;
    assert!(ended, "idle client's connection still open");
    if let Some(code) = conn_err.as_ref().and_then(sqlstate) {
        assert_eq!(code, "57P01", "{}", describe(conn_err.as_ref().unwrap()));
    }
}
