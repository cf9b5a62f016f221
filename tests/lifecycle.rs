//! The upgrade lifecycle commands (issue 15) against real servers: blue
//! PostgreSQL 15, green 17. So far: `pgswitch check`.
mod support;

use support::*;

/// Runs `pgswitch <command> --json --config <config>` (the config written
/// into the pair's folder); (exit code, the JSON it printed).
fn lifecycle_command(p: &Pair, command: &str, config: &str) -> (i32, serde_json::Value) {
    let path = p.dir.path().join(format!("{command}.toml"));
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args([command, "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{command}: not JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// Runs `pgswitch check --json` with `config`; (exit status ok, report).
fn check(p: &Pair, config: &str) -> (bool, serde_json::Value) {
    let (code, report) = lifecycle_command(p, "check", config);
    (code == 0, report)
}

/// The checks at `level`, as (check, side) pairs.
fn at(report: &serde_json::Value, level: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["level"] == level)
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_owned(),
                f["side"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    found.sort();
    found
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(c, s)| (c.to_string(), s.to_string()))
        .collect()
}

/// `check` flags exactly the planted problems, each naming its object, and
/// passes once they are fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flags_exactly_the_planted_problems() {
    let p = pair().await;
    p.blue.create_user("app2", "app2");
    p.blue.psql_db(
        "app",
        "CREATE TABLE no_key (a int); \
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY); \
         CREATE MATERIALIZED VIEW totals AS SELECT count(*) FROM acked; \
         SELECT lo_create(0); \
         SELECT setval('serial_items_id_seq', 100);",
    );
    // A slot nobody reads (its own statement: not in a transaction that wrote).
    p.blue.psql_db(
        "app",
        "SELECT pg_create_logical_replication_slot('orphan', 'pgoutput')",
    );
    // A transaction left open on blue, by a session that bypasses pgswitch.
    let open = p.blue.connect("app", "app", "app").await;
    open.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let config = proxy_config(
        &p,
        "drain_timeout = \"1ms\"",
        "\n[[users]]\nname = \"app2\"\npassword = \"app2\"\n",
    );

    let (ok, report) = check(&p, &config);
    assert!(!ok, "a failed check exits non-zero: {report:#}");
    assert_eq!(
        at(&report, "fail"),
        pairs(&[
            ("replica_identity", "blue"),
            ("roles", "green"),
            ("schema", "green")
        ]),
        "{report:#}"
    );
    assert_eq!(
        at(&report, "warn"),
        pairs(&[
            ("bypassing_sessions", "blue"),
            ("inactive_slots", "blue"),
            ("large_objects", "blue"),
            ("long_transactions", "blue"),
            ("materialized_views", "blue"),
            ("sequences", "green"),
            ("unlogged_tables", "blue"),
        ]),
        "{report:#}"
    );
    // The same for a terminal: one line per check, the fix under it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["check", "--config"])
        .arg(p.dir.path().join("check.toml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        table.contains("FAIL  blue   replica_identity") && table.contains("fix: add a primary key"),
        "{table}"
    );
    assert!(table.contains("3 failed"), "{table}");
    let text = report.to_string();
    for named in [
        "public.no_key",
        "public.scratch",
        "public.totals",
        "app2",
        "app@",
        "public.no_key.a integer",
        "public.serial_items_id_seq (0 < 100)",
        "orphan (retains",
    ] {
        assert!(text.contains(named), "{named} not named: {report:#}");
    }

    // Fixed: every check passes.
    drop(open);
    p.blue.psql_db(
        "app",
        "ALTER TABLE no_key ADD PRIMARY KEY (a); \
         ALTER TABLE scratch SET LOGGED; \
         DROP MATERIALIZED VIEW totals; \
         SELECT lo_unlink(oid) FROM pg_largeobject_metadata;",
    );
    p.blue
        .psql_db("app", "SELECT pg_drop_replication_slot('orphan')");
    p.green.create_user("app2", "app2");
    p.green.psql_db(
        "app",
        "CREATE TABLE no_key (a int PRIMARY KEY); CREATE TABLE scratch (id int PRIMARY KEY); \
         SELECT setval('serial_items_id_seq', 100);",
    );
    let passed = wait_for(WAIT, || async {
        let (ok, report) = check(&p, &config);
        (ok && at(&report, "warn").is_empty()).then_some(report)
    })
    .await;
    assert!(passed.is_some(), "{:#}", check(&p, &config).1);

    // The same report from a running pgswitch's admin API.
    let proxy = Proxy::start(&config);
    let (code, body) = admin_http(proxy.admin_port, "GET", "/check", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(at(&report, "fail").is_empty(), "{report:#}");
    assert!(at(&report, "pass").len() >= 15, "{report:#}");

    // A serving pgswitch leaves its own server connections out of the
    // session checks; a session straight to blue is still named.
    let through = connect(&proxy, "app").await.unwrap();
    through.simple_query("SELECT 1").await.unwrap();
    let get_check = || async {
        let (code, body) = admin_http(proxy.admin_port, "GET", "/check", Some(TOKEN), "").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let report = get_check().await;
    assert!(
        at(&report, "warn").is_empty(),
        "pgswitch's own session: {report:#}"
    );
    let _direct = p.blue.connect("app", "app", "app").await;
    let report = get_check().await;
    assert_eq!(
        at(&report, "warn"),
        pairs(&[("bypassing_sessions", "blue")]),
        "{report:#}"
    );
}

/// The live direction's health and the target's writes: a session writing on
/// green outside replication, an apply error (a row written on green first,
/// then the same key on blue) and a slot keeping more WAL than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_apply_errors_writes_on_green_and_retained_wal() {
    let p = pair().await;
    let config = proxy_config(&p, "", "").replace(
        "[replication]\n",
        "[replication]\nmax_slot_retained_bytes = 1\n",
    );
    // A write on green outside replication, still open.
    let writer = p.green.connect("app", "app", "app").await;
    writer
        .batch_execute("BEGIN; INSERT INTO acked (id, writer) VALUES (-1, 0)")
        .await
        .unwrap();
    // The same key committed on green, then on blue: the apply fails on it.
    p.g.batch_execute("INSERT INTO acked (id, writer) VALUES (7, 0)")
        .await
        .unwrap();
    p.b.batch_execute("INSERT INTO acked (id, writer) VALUES (7, 1)")
        .await
        .unwrap();
    let report = wait_for(WAIT, || async {
        let (_, report) = check(&p, &config);
        at(&report, "warn")
            .contains(&("apply_errors".into(), "green".into()))
            .then_some(report)
    })
    .await
    .unwrap_or_else(|| panic!("no apply error seen: {:#}", check(&p, &config).1));
    let warned = at(&report, "warn");
    for expected in [("writes_on_target", "green"), ("slot_retention", "blue")] {
        assert!(
            warned.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?}: {report:#}"
        );
    }
    let text = report.to_string();
    for named in [
        "app@127.0.0.1 (writing)",
        "pgswitch (retains",
        "1 apply error",
    ] {
        assert!(text.contains(named), "{named} not named: {report:#}");
    }

    // Fixed: the writer gone, the conflicting row removed (the apply goes
    // on), the error count reset, the limit back to its default.
    drop(writer);
    p.g.batch_execute("DELETE FROM acked WHERE id = 7")
        .await
        .unwrap();
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;
    p.g.batch_execute("SELECT pg_stat_reset_subscription_stats(oid) FROM pg_subscription")
        .await
        .unwrap();
    let config = proxy_config(&p, "", "");
    let fixed = wait_for(WAIT, || async {
        let (_, report) = check(&p, &config);
        let warned = at(&report, "warn");
        (!warned.iter().any(|(c, _)| {
            ["apply_errors", "writes_on_target", "slot_retention"].contains(&c.as_str())
        }))
        .then_some(())
    })
    .await;
    assert!(fixed.is_some(), "{:#}", check(&p, &config).1);
}

/// A cutover runs the checks in its preflight: a failed one refuses it,
/// naming the check and its object; `--force <check>` goes ahead and the
/// report says what was forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_refuses_on_a_failed_check_unless_forced() {
    let p = pair().await;
    for c in [&p.b, &p.g] {
        c.batch_execute("CREATE TABLE no_key (a int)")
            .await
            .unwrap();
    }
    p.g.batch_execute("ALTER SUBSCRIPTION pgswitch REFRESH PUBLICATION")
        .await
        .unwrap();
    wait_streaming(&p.g, "pgswitch").await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let (ok, report) = admin_command(&proxy, &["cutover"]);
    assert!(!ok, "{report:#}");
    assert_eq!(report["outcome"], "refused", "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("check replica_identity failed")
            && reason.contains("public.no_key")
            && reason.contains("--force replica_identity"),
        "{reason}"
    );
    assert_eq!(status(&proxy).await["active"], "blue");

    let (ok, report) = admin_command(&proxy, &["cutover", "--force", "replica_identity"]);
    assert!(ok, "{report:#}");
    assert_eq!(report["outcome"], "switched", "{report:#}");
    let forced = report["forced"].as_array().unwrap();
    assert!(
        forced.len() == 1
            && forced[0]
                .as_str()
                .unwrap()
                .starts_with("replica_identity: "),
        "{report:#}"
    );
    assert_eq!(status(&proxy).await["active"], "green");
}

/// Runs the admin command `args[0]` with `--json` and the rest of `args`
/// against `proxy`: (exit ok, report).
fn admin_command(proxy: &Proxy, args: &[&str]) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args([args[0], "--json", "--admin"])
        .arg(format!("http://127.0.0.1:{}", proxy.admin_port))
        .args(["--token", TOKEN])
        .args(&args[1..])
        .env_remove("PGSWITCH_ADMIN")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), report)
}

/// `decommission` refuses before any cutover and inside the fallback
/// window; forced, it leaves no slot, publication, subscription, origin or
/// fence on either server, pgswitch keeps serving on green (also after a
/// restart), and a re-run is harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_leaves_nothing_behind() {
    let p = pair().await;
    let mut proxy = Proxy::start(&proxy_config(&p, "", ""));
    let (ok, report) = admin_command(&proxy, &["decommission"]);
    assert!(!ok, "{report:#}");
    assert_eq!(report["outcome"], "refused", "{report:#}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("no switch has happened"),
        "{report:#}"
    );

    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert!(!p.replication_leftovers().await.is_empty());
    let (ok, report) = admin_command(&proxy, &["decommission"]);
    assert!(!ok, "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("blue is the fallback target for") && reason.contains("--force"),
        "{reason}"
    );

    let (ok, report) = admin_command(&proxy, &["decommission", "--force"]);
    assert!(ok, "{report:#}");
    assert_eq!(report["outcome"], "done", "{report:#}");
    assert_eq!(report["forced"], true, "{report:#}");
    let dropped = report["dropped"].to_string();
    for object in [
        "green: subscription \\\"pgswitch\\\"",
        "blue: slot \\\"pgswitch\\\"",
        "blue: publication \\\"pgswitch\\\"",
        "blue: subscription \\\"pgswitch_reverse\\\"",
        "green: slot \\\"pgswitch_reverse\\\"",
    ] {
        assert!(dropped.contains(object), "{object} not dropped: {report:#}");
    }
    assert!(
        report["lifted"].to_string().contains("blue: app"),
        "{report:#}"
    );
    assert_eq!(p.replication_leftovers().await, Vec::<String>::new());
    // The old side is writable again for its roles; traffic stays on green.
    let app = p.blue.connect("app", "app", "app").await;
    app.batch_execute("INSERT INTO acked (id, writer) VALUES (-5, 0)")
        .await
        .unwrap();
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, i32::from(p.green.port));
    assert!(status(&proxy).await["decommissioned_at_ms"].is_u64());

    // Harmless again, and after a restart.
    let (ok, report) = admin_command(&proxy, &["decommission"]);
    assert!(ok, "{report:#}");
    assert_eq!(report["dropped"], serde_json::json!([]), "{report:#}");
    proxy.restart();
    let c = connect(&proxy, "app").await.unwrap();
    assert_eq!(server_port(&c).await, i32::from(p.green.port));
    assert_eq!(p.replication_leftovers().await, Vec::<String>::new());
}

/// The README's upgrade playbook, command by command: an empty green 17
/// built from blue 15 by `prepare`, `check` and `verify` passing, a cutover
/// under a writer, `verify` in the reverse direction, a fallback and
/// `verify` again, a cutover back, and `decommission` leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_playbook_end_to_end() {
    let hb = std::thread::spawn(|| PgServer::start(PgOptions::default()));
    let hg = std::thread::spawn(|| {
        PgServer::start(PgOptions {
            version: PgVersion::V17,
            ..Default::default()
        })
    });
    let (blue, green) = (hb.join().unwrap(), hg.join().unwrap());
    blue.create_user("app", "app");
    blue.create_db("app", None);
    blue.psql_db(
        "app",
        "CREATE SCHEMA sales;
         CREATE TABLE acked (id bigint PRIMARY KEY, writer int NOT NULL,
                             port int NOT NULL DEFAULT inet_server_port());
         CREATE TABLE sales.orders (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                                    note text, at timestamptz DEFAULT now());
         INSERT INTO sales.orders (note) SELECT 'order ' || g FROM generate_series(1, 5000) g;
         INSERT INTO acked (id, writer, port) SELECT -g, 0, 0 FROM generate_series(1, 2000) g;
         GRANT USAGE ON SCHEMA sales TO app;
         GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public, sales TO app;",
    );
    // green holds nothing yet: prepare creates the role, the database's
    // contents and the replication (an empty database is accepted).
    green.create_db("app", None);
    let p = Pair {
        b: admin(&blue).await,
        g: admin(&green).await,
        blue,
        green,
        dir: tempfile::tempdir().unwrap(),
    };
    let config = proxy_config(&p, "", "");

    // 1. prepare → 2. check → 3. verify.
    let (code, report) = lifecycle_command(&p, "prepare", &config);
    assert_eq!(code, 0, "prepare: {report:#}");
    let (code, report) = lifecycle_command(&p, "prepare", &config);
    assert_eq!(code, 0, "prepare again: {report:#}");
    assert_eq!(
        report["changed"], false,
        "a re-run changes nothing: {report:#}"
    );
    let (ok, report) = check(&p, &config);
    assert!(ok, "check: {report:#}");
    let (code, report) = lifecycle_command(&p, "verify", &config);
    assert_eq!(code, 0, "verify: {report:#}");

    // 4. cutover, under a writer through pgswitch → 5. verify (reverse).
    let proxy = Proxy::start(&config);
    let writer = connect(&proxy, "app").await.unwrap();
    let mut next_id = 1i64;
    let mut write = |n: i64| {
        let ids: Vec<i64> = (next_id..next_id + n).collect();
        next_id += n;
        ids
    };
    for id in write(50) {
        writer
            .execute("INSERT INTO acked (id, writer) VALUES ($1, 1)", &[&id])
            .await
            .unwrap();
    }
    let (ok, report) = admin_command(&proxy, &["cutover"]);
    assert!(ok, "cutover: {report:#}");
    for id in write(50) {
        writer
            .execute("INSERT INTO acked (id, writer) VALUES ($1, 1)", &[&id])
            .await
            .unwrap();
    }
    assert_eq!(server_port(&writer).await, i32::from(p.green.port));
    let (code, report) = lifecycle_command(&p, "verify", &config);
    assert_eq!(code, 0, "verify after the cutover: {report:#}");

    // 6. fallback → verify, and back to green.
    let (ok, report) = admin_command(&proxy, &["fallback"]);
    assert!(ok, "fallback: {report:#}");
    let (code, report) = lifecycle_command(&p, "verify", &config);
    assert_eq!(code, 0, "verify after the fallback: {report:#}");
    let (ok, report) = admin_command(&proxy, &["cutover"]);
    assert!(ok, "cutover again: {report:#}");
    let (ok, report) = check(&p, &config);
    assert!(ok, "check on green: {report:#}");

    // 7. decommission (inside the default 24 h window: forced).
    let (ok, report) = admin_command(&proxy, &["decommission", "--force"]);
    assert!(ok, "decommission: {report:#}");
    assert_eq!(p.replication_leftovers().await, Vec::<String>::new());
    let rows: i64 =
        p.g.query_one("SELECT count(*) FROM acked WHERE id > 0", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(rows, 100, "every row written through pgswitch is on green");
}
