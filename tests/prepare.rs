//! `pgswitch prepare` against real servers: blue PostgreSQL 15 with data,
//! green PostgreSQL 17 empty.
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const APP_ROLE: &str = "shop";
const APP_PASSWORD: &str = "shop-secret";

/// Blue and green (empty), and a config for both with admin credentials.
struct Servers {
    blue: PgServer,
    green: PgServer,
    dir: tempfile::TempDir,
    config: String,
}

fn servers() -> Servers {
    let hb = std::thread::spawn(|| PgServer::start(PgOptions::default()));
    let hg = std::thread::spawn(|| {
        PgServer::start(PgOptions {
            version: PgVersion::V17,
            ..Default::default()
        })
    });
    let blue = hb.join().unwrap();
    let green = hg.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with_admin = |cfg: ProxyConfig| {
        cfg.backend_set("server_tls", "disable")
            .backend_set("admin_user", SUPERUSER)
            .backend_set("admin_password", SUPERUSER_PASSWORD)
    };
    let config = with_admin(with_admin(ProxyConfig::new(blue.port)).backend("green", green.port))
        .table("[replication]\ndatabase = \"app\"\nsubscription = \"pgswitch\"")
        .table(&format!(
            "[cutover]\nstate_file = \"{}\"",
            dir.path().join("state.json").display()
        ))
        .admin(free_port(), &format!("token = \"{TOKEN}\""))
        .user(APP_ROLE, APP_PASSWORD)
        .toml();
    Servers {
        blue,
        green,
        dir,
        config,
    }
}

/// Several schemas, an identity and a serial column, a sequence, a table
/// without a primary key, an unlogged table, hstore, a large object, a
/// materialized view, and the application role with a SCRAM password.
fn blue_fixture(blue: &PgServer) {
    blue.create_user(APP_ROLE, APP_PASSWORD);
    blue.create_db("app", Some(APP_ROLE));
    blue.psql_db(
        "app",
        "CREATE EXTENSION hstore;
         CREATE SCHEMA sales AUTHORIZATION shop;
         CREATE TABLE public.items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                                    name text NOT NULL, attrs hstore);
         CREATE TABLE sales.orders (id serial PRIMARY KEY, \
                                    item_id bigint NOT NULL REFERENCES public.items (id), \
                                    qty int NOT NULL, at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE sales.audit (happened timestamptz DEFAULT now(), what text);
         CREATE UNLOGGED TABLE public.scratch (id int PRIMARY KEY);
         CREATE SEQUENCE sales.invoice_no START 1000;
         INSERT INTO public.items (name, attrs) \
              SELECT 'item ' || i, hstore('colour', CASE WHEN i % 2 = 0 THEN 'red' ELSE 'blue' END) \
                FROM generate_series(1, 2000) i;
         INSERT INTO sales.orders (item_id, qty) \
              SELECT 1 + i % 2000, i % 7 FROM generate_series(1, 20000) i;
         INSERT INTO sales.audit (what) SELECT 'event ' || i FROM generate_series(1, 500) i;
         INSERT INTO public.scratch SELECT generate_series(1, 10);
         SELECT nextval('sales.invoice_no') FROM generate_series(1, 5);
         CREATE MATERIALIZED VIEW sales.totals AS \
              SELECT item_id, sum(qty) AS qty FROM sales.orders GROUP BY item_id;
         SELECT lo_from_bytea(0, 'a large object');
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO shop;",
    );
}

/// `pgswitch prepare --json` with `config` and extra arguments: (exit ok,
/// report, stderr).
fn prepare(s: &Servers, args: &[&str]) -> (bool, serde_json::Value, String) {
    let path = s.dir.path().join("prepare.toml");
    std::fs::write(&path, &s.config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["prepare", "--json", "--timeout", "120s", "--config"])
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}"));
    eprintln!(
        "prepare {args:?}: ok={} changed={} error={} copy={}",
        out.status.success(),
        report["changed"],
        report["error"],
        report["initial_copy"]
    );
    (out.status.success(), report, stderr)
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

const SLOTS: &str = "SELECT count(*) FROM pg_replication_slots";

/// Every replicated table's row count and content hash.
async fn contents(c: &tokio_postgres::Client) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for t in ["public.items", "sales.orders", "sales.audit"] {
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') \
                       FROM {t} x"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((t.to_owned(), row.get(0), row.get(1)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_builds_green_and_a_rerun_changes_nothing() {
    let s = servers();
    blue_fixture(&s.blue);

    // A table without a replica identity: refused, nothing done on green.
    let (ok, report, _) = prepare(&s, &[]);
    assert!(!ok);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("sales.audit"), "{error}");
    let green_db = s
        .green
        .psql("SELECT count(*) FROM pg_database WHERE datname = 'app'");
    assert_eq!(green_db.trim(), "0");

    let (ok, report, stderr) = prepare(&s, &["--replica-identity-full"]);
    assert!(ok, "{report:#}\n{stderr}");
    assert_eq!(report["changed"], true);
    assert!(
        stderr.contains("\"progress\""),
        "no progress lines: {stderr}"
    );
    let progress = &report["progress"];
    assert_eq!(progress["phase"], "ready");
    assert_eq!(progress["tables_total"], progress["tables_ready"]);
    assert_eq!(progress["tables_total"], 3, "{progress:#}");
    assert!(report["initial_copy"]["rows_per_second"].as_f64().is_some());

    let b = s.blue.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let g = s.green.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    // Roles: the app role logs in to green with its password (its SCRAM
    // secret carried over); green's superuser kept its own.
    let app = s.green.try_connect(APP_ROLE, APP_PASSWORD, "app").await;
    let app = app.unwrap_or_else(|e| panic!("login to green as {APP_ROLE}: {e}"));
    assert_eq!(count(&app, "SELECT count(*) FROM public.items").await, 2000);
    let secrets = "SELECT rolpassword FROM pg_authid WHERE rolname = 'shop'";
    let (sb, sg): (String, String) = (
        b.query_one(secrets, &[]).await.unwrap().get(0),
        g.query_one(secrets, &[]).await.unwrap().get(0),
    );
    assert_eq!(sb, sg);

    // Schema and data.
    assert_eq!(contents(&b).await, contents(&g).await);
    assert_eq!(
        count(
            &g,
            "SELECT count(*) FROM pg_extension WHERE extname = 'hstore'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&g, "SELECT count(*) FROM sales.totals").await,
        count(&b, "SELECT count(*) FROM sales.totals").await,
        "the materialized view is refreshed on green"
    );
    assert_eq!(count(&g, "SELECT count(*) FROM public.scratch").await, 0);
    assert_eq!(
        count(
            &g,
            "SELECT count(*) FROM pg_sequences WHERE sequencename = 'invoice_no'"
        )
        .await,
        1
    );
    // blue's table without a key has REPLICA IDENTITY FULL: UPDATE works.
    b.batch_execute("UPDATE sales.audit SET what = what || '!' WHERE what = 'event 1'")
        .await
        .unwrap();
    let st = pgswitch::replication::subscription_status(&g, "pgswitch")
        .await
        .unwrap();
    assert!(
        st.enabled && st.streaming && st.tables_not_ready == 0,
        "{st:?}"
    );
    assert_eq!(count(&b, SLOTS).await, 1);
    // Streams: a row written on blue arrives on green.
    b.batch_execute("INSERT INTO public.items (name) VALUES ('after prepare')")
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the insert on green", || async {
        count(
            &g,
            "SELECT count(*) FROM public.items WHERE name = 'after prepare'",
        )
        .await
            == 1
    })
    .await;

    // A re-run changes nothing and says so.
    let (ok, report, stderr) = prepare(&s, &["--replica-identity-full"]);
    assert!(ok, "{report:#}\n{stderr}");
    assert_eq!(report["changed"], false, "{report:#}");
    assert!(report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["changed"] == false));
    assert_eq!(count(&b, SLOTS).await, 1);
    assert_eq!(count(&g, "SELECT count(*) FROM pg_subscription").await, 1);
    assert_eq!(contents(&b).await, contents(&g).await);

    // The plain output (not a terminal): the report, no JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["prepare", "--replica-identity-full", "--config"])
        .arg(s.dir.path().join("prepare.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("nothing changed"), "{text}");

    // GET /prepare through a running proxy: the same figures.
    let proxy = Proxy::start(&s.config);
    let (code, body) = admin_http(proxy.admin_port, "GET", "/prepare", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["phase"], "ready", "{served:#}");
    assert_eq!(served["done"], true);
    assert_eq!(served["tables_total"], 3);
    assert_eq!(served["bytes_total"], served["bytes_copied"]);
    let (code, _) = admin_http(proxy.admin_port, "GET", "/prepare", None, "").await;
    assert_eq!(code, 401);
}

/// SIGKILL during the data copy (pg_dump | pg_restore): the re-run ends
/// the orphaned pg_restore, empties the partial copy, drops the unused
/// slot and copies again; one slot, one subscription, every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_during_the_copy_is_completed_by_a_rerun() {
    let s = servers();
    s.blue.create_db("app", None);
    s.blue.psql_db(
        "app",
        "CREATE TABLE big (id int PRIMARY KEY, pad text NOT NULL);
         INSERT INTO big SELECT i, repeat(md5(i::text), 6) FROM generate_series(1, 600000) i;
         CREATE TABLE small (id int PRIMARY KEY);
         INSERT INTO small SELECT generate_series(1, 100);",
    );
    s.blue.psql_db("app", "VACUUM ANALYZE big");
    let path = s.dir.path().join("prepare.toml");
    std::fs::write(&path, &s.config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["prepare", "--json", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once green's COPY of `big` has rows.
    let copying = "SELECT count(*) FROM pg_stat_progress_copy WHERE tuples_processed > 0";
    wait_until_sync(Duration::from_secs(60), "the copy of big", || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "prepare ended before the copy"
        );
        let n = std::process::Command::new(psql_bin())
            .args(["-X", "-A", "-t", "-h"])
            .arg(&s.green.dir)
            .args([
                "-p",
                &s.green.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-c",
                copying,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        n == "1"
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let g = s.green.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let marker = "SELECT shobj_description(oid, 'pg_database') FROM pg_database \
                  WHERE datname = 'app'";
    let marker: String = g.query_one(marker, &[]).await.unwrap().get(0);
    assert!(marker.contains("stage=copying"), "{marker}");
    assert_eq!(count(&g, "SELECT count(*) FROM pg_subscription").await, 0);

    let (ok, report, stderr) = prepare(&s, &[]);
    assert!(ok, "{report:#}\n{stderr}");
    assert_eq!(report["progress"]["phase"], "ready");
    let steps = report["steps"].to_string();
    assert!(steps.contains("dropped slots on blue"), "{steps}");
    assert!(steps.contains("copied as of slot"), "{steps}");
    let b = s.blue.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    for t in ["big", "small"] {
        let q = format!("SELECT count(*) FROM {t}");
        assert_eq!(count(&b, &q).await, count(&g, &q).await, "{t}");
    }
    assert_eq!(count(&g, "SELECT count(*) FROM big").await, 600000);
    assert_eq!(count(&b, SLOTS).await, 1, "exactly one slot on blue");
    assert_eq!(count(&g, "SELECT count(*) FROM pg_subscription").await, 1);
}

/// An extension green cannot install is an error naming it, before
/// anything changes; green's database with objects of its own is refused;
/// a slot left on blue by a killed run is dropped and recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_leftovers() {
    let s = servers();
    s.blue.create_user(APP_ROLE, APP_PASSWORD);
    s.blue.create_db("app", None);
    s.blue.psql_db(
        "app",
        "CREATE EXTENSION adminpack; CREATE TABLE t (id int PRIMARY KEY); \
         INSERT INTO t SELECT generate_series(1, 10);",
    );
    let (ok, report, _) = prepare(&s, &[]);
    assert!(!ok);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("adminpack"), "{error}");
    let roles = s
        .green
        .psql("SELECT count(*) FROM pg_roles WHERE rolname = 'shop'");
    assert_eq!(roles.trim(), "0", "nothing created on green");

    // Green's database holds a table prepare did not make: refused.
    s.blue.psql_db("app", "DROP EXTENSION adminpack");
    s.green.create_db("app", None);
    s.green.psql_db("app", "CREATE TABLE mine (x int)");
    let (ok, report, _) = prepare(&s, &[]);
    assert!(!ok);
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("mine") && error.contains("did not create"),
        "{error}"
    );

    // A slot on blue left by a killed run, no subscription on green: dropped
    // and recreated (one slot).
    s.green.psql_db("app", "DROP TABLE mine");
    s.blue.psql_db(
        "app",
        "SELECT pg_create_logical_replication_slot('pgswitch', 'pgoutput')",
    );
    let (ok, report, stderr) = prepare(&s, &[]);
    assert!(ok, "{report:#}\n{stderr}");
    let steps = report["steps"].to_string();
    assert!(steps.contains("dropped slots on blue"), "{steps}");
    let b = s.blue.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let g = s.green.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    assert_eq!(count(&b, SLOTS).await, 1);
    assert_eq!(count(&g, "SELECT count(*) FROM t").await, 10);

    // Rows on green without a subscription: refused (a copy would duplicate).
    g.batch_execute("DROP SUBSCRIPTION pgswitch").await.unwrap();
    let (ok, report, _) = prepare(&s, &[]);
    assert!(!ok);
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("duplicate") && error.contains("t"),
        "{error}"
    );
    assert_eq!(count(&b, SLOTS).await, 0);
}

/// A writer inserts on blue during the whole prepare (before the slot,
/// during the copy, after it): once green caught up, every row blue has is
/// on green exactly once (the copy's snapshot and the slot's consistent
/// point are the same instant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_is_exact_across_the_snapshot() {
    let s = servers();
    s.blue.create_db("app", None);
    s.blue.psql_db(
        "app",
        "CREATE TABLE w (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE pad (id int PRIMARY KEY, pad text NOT NULL);
         INSERT INTO pad SELECT i, repeat(md5(i::text), 6) FROM generate_series(1, 200000) i;
         INSERT INTO w (id) SELECT generate_series(1, 1000);",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = s.blue.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut id: i64 = 1000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                // Single-row transactions, and a few in a longer one, so
                // that some are open when the slot is created.
                b.batch_execute(&format!(
                    "BEGIN; INSERT INTO w (id) VALUES ({id}); INSERT INTO w (id) VALUES ({}); \
                     COMMIT",
                    -id
                ))
                .await
                .unwrap();
            }
            id
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, report, stderr) = {
        let path = s.dir.path().join("prepare.toml");
        std::fs::write(&path, &s.config).unwrap();
        let s = &s;
        tokio::task::block_in_place(|| prepare(s, &[]))
    };
    assert!(ok, "{report:#}\n{stderr}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = writer.await.unwrap();
    assert!(last > 1100, "the writer wrote during prepare ({last})");
    let b = s.blue.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let g = s.green.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let sig = "SELECT count(*)::text || ' ' || count(DISTINCT id)::text || ' ' || \
               md5(string_agg(id::text, ',' ORDER BY id)) FROM w";
    let want: String = b.query_one(sig, &[]).await.unwrap().get(0);
    wait_until(Duration::from_secs(30), "green caught up", || async {
        let have: String = g.query_one(sig, &[]).await.unwrap().get(0);
        have == want
    })
    .await;
    assert_eq!(count(&b, SLOTS).await, 1);
}
