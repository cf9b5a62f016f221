//! `pgswitch verify` (issue 15, part 3) against real servers: blue
//! PostgreSQL 15, green 17, in logical replication (the harness's pair).
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use pgswitch::verify::checksum;
use support::*;
use tokio_postgres::Client;

/// Runs `pgswitch verify --json` with the pair's proxy config and `args`;
/// (exit code, report).
async fn verify(p: &Pair, args: &[&str]) -> (i32, serde_json::Value) {
    let path = p.dir.path().join("verify.toml");
    std::fs::write(&path, proxy_config(p, "", "")).unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgswitch"))
            .args(["verify", "--json", "--config"])
            .arg(&path)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}{stderr}"));
    eprintln!("verify {}: {stdout}", out.status);
    (out.status.code().unwrap_or(-1), report)
}

/// The same DDL on both sides, then green subscribes to the new tables.
async fn create_tables(p: &Pair, ddl: &str) {
    p.blue.psql_db("app", ddl);
    p.green.psql_db("app", ddl);
    p.green
        .psql_db("app", "ALTER SUBSCRIPTION pgswitch REFRESH PUBLICATION");
    wait_streaming(&p.g, "pgswitch").await;
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no table {name} in {report}"))
}

/// Every key of `class` (missing_on_green, ...) over a table's chunks,
/// with the chunk's range.
fn keys(t: &serde_json::Value, class: &str) -> Vec<(Vec<String>, serde_json::Value)> {
    let mut out = Vec::new();
    for d in t["differences"].as_array().into_iter().flatten() {
        for k in d[class].as_array().unwrap() {
            let key = k
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            out.push((key, d["range"].clone()));
        }
    }
    out
}

/// Whether the integer key `k` lies in a chunk's `[from, to)` range.
fn in_range(range: &serde_json::Value, k: i64) -> bool {
    let bound = |b: &serde_json::Value| {
        b.as_array()
            .map(|a| a[0].as_str().unwrap().parse::<i64>().unwrap())
    };
    bound(&range["from"]).is_none_or(|f| f <= k) && bound(&range["to"]).is_none_or(|t| k < t)
}

const BIG: &str = "CREATE TABLE big (id bigint PRIMARY KEY, n numeric, f float8, t text, \
                   ts timestamptz, j jsonb, b bytea, arr int[], u uuid);
                   CREATE TABLE comp (region text, id int, v text, PRIMARY KEY (region, id));
                   CREATE TABLE nokey (a int, b text);";

async fn fill_big(c: &Client) {
    c.batch_execute(
        "INSERT INTO big SELECT i, i / 7.0, i * 1.5, 'row ' || i || ' ✓ é', \
                timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute', \
                jsonb_build_object('i', i, 'even', i % 2 = 0), int8send(i), ARRAY[i, i + 1], \
                md5(i::text)::uuid \
           FROM generate_series(1, 200000) i;
         INSERT INTO comp SELECT r, i, 'v' || i FROM unnest(ARRAY['eu', 'us', 'ap', 'Zürich']) r, \
                generate_series(1, 2000) i;
         INSERT INTO nokey SELECT i, 'n' || i FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
}

/// (1) A synced pair, a 200k-row table of several types, a composite key
/// and a table without one, while a writer inserts and updates on blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_a_synced_pair_under_a_concurrent_writer() {
    let p = pair().await;
    create_tables(&p, BIG).await;
    fill_big(&p.b).await;
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let c = admin(&p.blue).await;
        let (stop, writes) = (stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                c.batch_execute(&format!(
                    "INSERT INTO big (id, t) VALUES ({}, 'new'); \
                     UPDATE big SET n = n + 1, j = j || '{{\"w\": {n}}}' WHERE id = {}; \
                     UPDATE comp SET v = 'w{n}' WHERE region = 'us' AND id = {}; \
                     INSERT INTO nokey VALUES ({n}, 'w');",
                    1_000_000 + n,
                    (n * 7919) % 200_000 + 1,
                    n % 2000 + 1
                ))
                .await
                .unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until(WAIT, "the writer writes", || async {
        writes.load(Ordering::Relaxed) > 20
    })
    .await;
    let (code, report) = verify(&p, &["--chunk-rows", "20000", "--jobs", "2"]).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(writes.load(Ordering::Relaxed) > 20);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["equal"], true);
    assert_eq!(report["replication"]["live"], true);
    assert_eq!(report["replication"]["direction"], "forward");
    let big = table(&report, "public.big");
    assert_eq!(big["status"], "ok");
    assert!(big["chunks"].as_u64().unwrap() >= 8, "{big}");
    assert!(big["blue_rows"].as_i64().unwrap() >= 200_000);
    let comp = table(&report, "public.comp");
    assert_eq!(comp["status"], "ok");
    assert_eq!(comp["key"], serde_json::json!(["region", "id"]));
    let nokey = table(&report, "public.nokey");
    assert!(
        nokey["status"] == "ok" || nokey["status"] == "unsettled",
        "{nokey}"
    );
    assert!(nokey["key"].is_null());
    assert!(nokey["note"].as_str().unwrap().contains("whole-table"));
}

/// (2) Rows changed, deleted and added on green behind replication's back:
/// exit 1, naming the table, the chunk and exactly those keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_chunk_and_keys_that_differ() {
    let p = pair().await;
    create_tables(
        &p,
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         CREATE TABLE comp (region text, id int, v text, PRIMARY KEY (region, id));",
    )
    .await;
    p.b.batch_execute(
        "INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 50000) i;
         INSERT INTO comp SELECT r, i, 'v' || i FROM unnest(ARRAY['eu', 'us']) r, \
                generate_series(1, 3000) i;",
    )
    .await
    .unwrap();
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;
    p.g.batch_execute(
        "UPDATE items SET v = 'changed' WHERE id = 1234;
         DELETE FROM items WHERE id = 43210;
         INSERT INTO items VALUES (60001, 'extra');
         UPDATE comp SET v = 'changed' WHERE region = 'us' AND id = 7;",
    )
    .await
    .unwrap();
    let (code, report) = verify(&p, &["--chunk-rows", "10000"]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["equal"], false);
    let items = table(&report, "public.items");
    assert_eq!(items["status"], "differs");
    let k = |v: &str| vec![v.to_string()];
    let different = keys(items, "different");
    let missing = keys(items, "missing_on_green");
    let extra = keys(items, "extra_on_green");
    assert_eq!(
        different.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        vec![k("1234")]
    );
    assert_eq!(
        missing.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        vec![k("43210")]
    );
    assert_eq!(
        extra.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        vec![k("60001")]
    );
    assert!(in_range(&different[0].1, 1234), "{:?}", different[0]);
    assert!(in_range(&missing[0].1, 43210), "{:?}", missing[0]);
    assert!(in_range(&extra[0].1, 60001), "{:?}", extra[0]);
    assert!(items["chunks"].as_u64().unwrap() >= 4);
    assert!(items["differences"].as_array().unwrap().len() <= 3);
    let comp = table(&report, "public.comp");
    assert_eq!(comp["status"], "differs");
    assert_eq!(
        keys(comp, "different")
            .into_iter()
            .map(|d| d.0)
            .collect::<Vec<_>>(),
        vec![vec!["us".to_string(), "7".to_string()]]
    );
    assert_eq!(table(&report, "public.acked")["status"], "ok");
    // --tables narrows it down.
    let (code, report) = verify(&p, &["--tables", "public.acked,serial_items"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["tables"].as_array().unwrap().len(), 2);
}

/// The checksum and row hashes of `table` on one side.
async fn checksums(
    c: &Client,
    side: pgswitch::config::Side,
    blue: &[checksum::Column],
    green: &[checksum::Column],
) -> (i64, String, Vec<(String, i64)>) {
    c.batch_execute(checksum::SESSION).await.unwrap();
    let sql = checksum::TableSql {
        qualified: "public.types".into(),
        row_hash: checksum::row_hash(blue, green).unwrap(),
        key: Some(checksum::Key::new(&["id".to_string()], blue)),
    };
    let (q, params) = sql.checksum(&checksum::Range::ALL);
    assert!(params.is_empty());
    let row = c
        .query_one(&q, &[])
        .await
        .unwrap_or_else(|e| panic!("{side}: {q}: {e}"));
    let (q, _) = sql.rows(&checksum::Range::ALL).unwrap();
    let rows = c
        .query(&q, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (row.get(0), row.get(1), rows)
}

/// (3) The same rows give the same checksum on PostgreSQL 15 and 17, over
/// many types, NULLs included; and one changed value changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_is_equal_on_15_and_17() {
    let p = pair().await;
    assert!(
        p.blue.version_num / 10000 == 15 && p.green.version_num / 10000 == 17,
        "{} {}",
        p.blue.version_num,
        p.green.version_num
    );
    // Green gets an extra enum first, so that the enums' OIDs differ.
    p.green.psql_db("app", "CREATE TYPE other AS ENUM ('x')");
    let ddl = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE types (id int PRIMARY KEY, i2 int2, i8 int8, n numeric, f4 float4, f8 float8,
            t text, vc varchar(20), ch char(5), nm name, bo bool, d date, tm time, ttz timetz,
            ts timestamp, tstz timestamptz, iv interval, jb jsonb, js json, by bytea,
            ai int[], at text[], u uuid, ip inet, m mood, o oid, r int4range, pt point);
        INSERT INTO types VALUES
          (1, 1, 9223372036854775807, 1.50, 0.1, 0.1, 'héllo ✓ 日本 🐘', 'varchar', 'ab', 'nm', true,
           '2024-02-29', '12:34:56.789', '12:00+05:30', '2024-01-01 12:00:00.123456',
           '2024-06-30 23:59:59.999999+02', '1 year 2 mons 3 days 04:05:06.7', '{\"b\": [1, 2.50, null], \"a\": \"x\"}',
           '{\"b\":1,  \"a\":2}', '\\x00ff10', '{1,2,NULL}', '{\"a b\",NULL,\"\"}',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.1.2.3/16', 'happy', 42, '[1,10)', '(1.5,2)'),
          (2, -32768, -1, 'NaN', 'Infinity', '-0', '', '', '', '', false,
           'infinity', '00:00', '00:00+00', '-infinity', 'infinity', '-1 days +00:00:01', '[]',
           'null', '\\x', '{}', '{}', '00000000-0000-0000-0000-000000000000', '::1', 'sad', 0,
           'empty', '(0,0)'),
          (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (4, 7, 1e15, 123456789012345678901234567890.000000000001, 1e-30, 1.7976931348623157e308,
           E'tab\\tnew\\nline \\\\ \"quote\"', 'x', 'abcde', 'ü', true, '0001-01-01 BC', '24:00', '23:59:59-12',
           '1999-12-31 23:59:59', '1970-01-01 00:00:00+00', '-178000000 years', '{\"nested\": {\"k\": [true, false]}}',
           '[1, \"two\"]', '\\xdeadbeef', '{{1,2},{3,4}}', '{\"ünï\",\"x\"}', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
           '2001:db8::1', 'ok', 4294967295, '(,5]', '(-1e10,3.25)');";
    p.blue.psql_db("app", ddl);
    p.green.psql_db("app", ddl);
    let blue = checksum::shape(&p.b, pgswitch::config::Side::Blue, "public", "types")
        .await
        .unwrap();
    let green = checksum::shape(&p.g, pgswitch::config::Side::Green, "public", "types")
        .await
        .unwrap();
    assert_eq!(blue.columns.len(), 28);
    let on_blue = checksums(
        &p.b,
        pgswitch::config::Side::Blue,
        &blue.columns,
        &green.columns,
    )
    .await;
    let on_green = checksums(
        &p.g,
        pgswitch::config::Side::Green,
        &blue.columns,
        &green.columns,
    )
    .await;
    eprintln!("blue: {on_blue:?}\ngreen: {on_green:?}");
    assert_eq!(on_blue.0, 4);
    assert_ne!(on_blue.1, "0");
    assert_eq!(on_blue.2, on_green.2, "per-row hashes");
    assert_eq!(on_blue, on_green);
    // The exact value counts: numeric's scale, float's sign of zero.
    for change in [
        "UPDATE public.types SET n = 1.5 WHERE id = 1",
        "UPDATE public.types SET f8 = 0 WHERE id = 2",
    ] {
        p.g.batch_execute(&format!("BEGIN; {change}"))
            .await
            .unwrap();
        let changed = checksums(
            &p.g,
            pgswitch::config::Side::Green,
            &blue.columns,
            &green.columns,
        )
        .await;
        p.g.batch_execute("ROLLBACK").await.unwrap();
        assert_ne!(changed.1, on_blue.1, "{change}");
    }
}

/// (4) After a cutover through pgswitch (green active, blue subscribed to
/// green as pgswitch_reverse), verify follows the reverse direction and
/// still passes; a row deleted on blue behind its back is extra on green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_after_a_cutover_in_the_reverse_direction() {
    let p = pair().await;
    create_tables(&p, "CREATE TABLE items (id int PRIMARY KEY, v text);").await;
    p.b.batch_execute("INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 20000) i")
        .await
        .unwrap();
    catch_up(&p.b, "pgswitch", &p.g, "pgswitch").await;
    let proxy = Proxy::start(&proxy_config(&p, "", ""));
    let (code, report) = switch(&proxy, "/cutover", "").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(status(&proxy).await["active"], "green");
    let c = connect(&proxy, "app").await.unwrap();
    for i in 0..50 {
        c.execute(
            "INSERT INTO acked (id, writer) VALUES ($1, 1)",
            &[&(i as i64)],
        )
        .await
        .unwrap();
    }
    p.g.batch_execute("UPDATE items SET v = 'after' WHERE id <= 100")
        .await
        .unwrap();
    let (code, report) = verify(&p, &["--chunk-rows", "5000"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["replication"]["direction"], "reverse");
    assert_eq!(report["replication"]["subscription"], "pgswitch_reverse");
    assert_eq!(report["replication"]["live"], true);
    assert!(
        table(&report, "public.acked")["blue_rows"]
            .as_i64()
            .unwrap()
            >= 50
    );

    p.b.batch_execute("DELETE FROM items WHERE id = 777")
        .await
        .unwrap();
    let (code, report) = verify(&p, &["--chunk-rows", "5000"]).await;
    assert_eq!(code, 1, "{report:#}");
    let items = table(&report, "public.items");
    assert_eq!(
        keys(items, "extra_on_green")
            .into_iter()
            .map(|d| d.0)
            .collect::<Vec<_>>(),
        vec![vec!["777".to_string()]]
    );
    assert!(keys(items, "missing_on_green").is_empty());
    drop(proxy);
}
