//! Replication control (src/replication) against real servers: blue
//! PostgreSQL 15 publishing, green PostgreSQL 17 (15 when 17 is missing)
//! subscribing. Both run with `synchronous_commit = off` (harness default),
//! where a catch-up target taken without a flush loses rows.
//!
//! Timings are printed (`cargo nextest run --no-capture` or
//! `cargo test -- --nocapture` to see them).
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgswitch::replication::{self as repl, Lsn, ReplicationError, ReverseNames};
use support::*;
use tokio_postgres::Client;

const SUB: &str = "pgswitch";
const WAIT: Duration = Duration::from_secs(15);

struct Pair {
    blue: PgServer,
    green: PgServer,
    /// Admin connections to database `app` (as the cutover would open them).
    b: Client,
    g: Client,
}

fn conninfo(pg: &PgServer) -> String {
    format!(
        "host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=app",
        pg.port
    )
}

async fn admin(pg: &PgServer, db: &str) -> Client {
    repl::connect(
        "127.0.0.1",
        pg.port,
        SUPERUSER,
        SUPERUSER_PASSWORD,
        db,
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Blue (15) publishes every table of database `app`; green (17, else 15)
/// subscribes with subscription/slot `pgswitch`; returns once the initial
/// sync is done and the apply worker streams.
async fn pair() -> Pair {
    let hb = std::thread::spawn(|| PgServer::start(PgOptions::default()));
    let hg = std::thread::spawn(|| {
        PgServer::start(PgOptions {
            version: PgVersion::V17,
            ..Default::default()
        })
    });
    let blue = hb.join().unwrap();
    let green = hg.join().unwrap();
    if green.version != PgVersion::V17 {
        eprintln!("NOTE: green runs PostgreSQL 15 (17 not installed)");
    }
    for pg in [&blue, &green] {
        pg.create_user("app", "app");
        pg.create_db("app", Some("app"));
        pg.psql_db(
            "app",
            "CREATE TABLE items (id serial PRIMARY KEY, writer int NOT NULL, n int NOT NULL, note text);
             CREATE TABLE events (note text NOT NULL);
             ALTER TABLE events REPLICA IDENTITY FULL;
             ALTER TABLE items OWNER TO app;
             ALTER TABLE events OWNER TO app;",
        );
    }
    blue.psql_db("app", "CREATE PUBLICATION pgswitch FOR ALL TABLES");
    green.psql_db(
        "app",
        &format!(
            "CREATE SUBSCRIPTION pgswitch CONNECTION '{}' PUBLICATION pgswitch",
            conninfo(&blue)
        ),
    );
    let b = admin(&blue, "app").await;
    let g = admin(&green, "app").await;
    let t = Instant::now();
    loop {
        let st = repl::subscription_status(&g, SUB).await.unwrap();
        if st.streaming && st.tables_not_ready == 0 {
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "subscription never became ready: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Pair { blue, green, b, g }
}

/// The catch-up as the cutover does it: flush and mark blue, wait for green.
async fn catch_up(
    publisher: &Client,
    slot: &str,
    subscriber: &Client,
    subscription: &str,
) -> (Lsn, Duration) {
    let target = repl::flush_and_mark(publisher).await.unwrap();
    let waited = repl::wait_applied(publisher, slot, subscriber, subscription, target, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (target, waited)
}

fn summary(name: &str, v: &mut [Duration]) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "TIMING {name}: n={} min={:.2}ms median={:.2}ms p90={:.2}ms max={:.2}ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10]),
        ms(v[v.len() - 1])
    );
}

/// Inserts rows as `app` until `stop`; returns each acknowledged id with
/// when its commit was acknowledged.
async fn writer(c: Arc<Client>, w: i32, stop: Arc<AtomicBool>) -> Vec<(i32, Instant)> {
    let stmt = c
        .prepare("INSERT INTO items (writer, n) VALUES ($1, $2) RETURNING id")
        .await
        .unwrap();
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let row = c.query_one(&stmt, &[&w, &n]).await.unwrap();
        acked.push((row.get(0), Instant::now()));
    }
    acked
}

async fn missing_on(c: &Client, ids: &[i32]) -> i64 {
    let row = c
        .query_one(
            "SELECT count(*) FROM unnest($1::int4[]) i WHERE NOT EXISTS \
             (SELECT 1 FROM items WHERE id = i)",
            &[&ids],
        )
        .await
        .unwrap();
    row.get(0)
}

/// 20 rounds with 4 concurrent writers (synchronous_commit = off): even
/// rounds stop the writers first (the gate), odd rounds mark while they keep
/// writing (busy publisher). Every row acknowledged before flush_and_mark
/// was called is on green after wait_applied: zero lost rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_is_exact_under_concurrent_writes() {
    let p = pair().await;
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(Arc::new(p.blue.connect("app", "app", "app").await));
    }
    // The servers run with synchronous_commit = off, as many production
    // servers do; pgswitch's own control connections commit durably.
    let row = writers[0]
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "off");
    let row = p.b.query_one("SHOW synchronous_commit", &[]).await.unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "on",
        "control connections commit durably"
    );

    let (mut idle_after_gate, mut busy) = (Vec::new(), Vec::new());
    let mut total = 0usize;
    for round in 0..20u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, c)| tokio::spawn(writer(c.clone(), i as i32, stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(20 + (random_u64() % 60))).await;
        let (acked_before, waited) = if round % 2 == 0 {
            stop.store(true, Ordering::Relaxed);
            let mut acked = Vec::new();
            for t in tasks {
                acked.extend(t.await.unwrap().into_iter().map(|(id, _)| id));
            }
            let (_, waited) = catch_up(&p.b, SUB, &p.g, SUB).await;
            idle_after_gate.push(waited);
            (acked, waited)
        } else {
            let called = Instant::now();
            let (_, waited) = catch_up(&p.b, SUB, &p.g, SUB).await;
            busy.push(waited);
            stop.store(true, Ordering::Relaxed);
            let mut acked = Vec::new();
            for t in tasks {
                acked.extend(
                    t.await
                        .unwrap()
                        .into_iter()
                        .filter(|(_, at)| *at < called)
                        .map(|(id, _)| id),
                );
            }
            (acked, waited)
        };
        let lost = missing_on(&p.g, &acked_before).await;
        assert_eq!(
            lost,
            0,
            "round {round}: {lost} of {} acknowledged rows missing on green after \
             wait_applied ({waited:?})",
            acked_before.len()
        );
        total += acked_before.len();
    }
    eprintln!("catch-up: {total} acknowledged rows checked over 20 rounds, 0 lost");
    summary(
        "wait_applied after gate+flush_and_mark",
        &mut idle_after_gate,
    );
    summary("wait_applied while 4 writers keep writing", &mut busy);

    // Each part of the catch-up on its own, for the report.
    let mut marks = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        repl::flush_and_mark(&p.b).await.unwrap();
        marks.push(t.elapsed());
    }
    summary("flush_and_mark (idle)", &mut marks);
}

/// Idle publisher, WAL only in another database, vacuum: the applied
/// position still passes the target promptly. Also status and lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_applied_with_nothing_to_replicate() {
    let p = pair().await;
    let st = repl::subscription_status(&p.g, SUB).await.unwrap();
    assert!(st.exists && st.enabled && st.streaming, "{st:?}");
    assert_eq!(st.slot_name.as_deref(), Some(SUB));
    let none = repl::subscription_status(&p.g, "nope").await.unwrap();
    assert!(!none.exists && !none.streaming);

    // Idle: nothing written for a while.
    let mut idle = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, waited) = catch_up(&p.b, SUB, &p.g, SUB).await;
        idle.push(waited);
    }
    summary("wait_applied on an idle publisher", &mut idle);
    assert!(idle.iter().all(|d| *d < Duration::from_secs(1)), "{idle:?}");

    // Only another database writes (its WAL is skipped by the decoder), the
    // marker itself written from that database.
    p.blue.create_db("other", None);
    let other = admin(&p.blue, "other").await;
    let mut other_db = Vec::new();
    for i in 0..5 {
        other
            .batch_execute(&format!(
                "CREATE TABLE t{i} AS SELECT g FROM generate_series(1, 20000) g"
            ))
            .await
            .unwrap();
        other.batch_execute(&format!("VACUUM t{i}")).await.unwrap();
        let target = repl::flush_and_mark(&other).await.unwrap();
        let waited = repl::wait_applied(&p.b, SUB, &p.g, SUB, target, WAIT)
            .await
            .unwrap();
        other_db.push(waited);
    }
    summary("wait_applied, WAL only in another database", &mut other_db);
    assert!(other_db.iter().all(|d| *d < Duration::from_secs(1)));

    // Vacuum in the replicated database, then a plain flushed position.
    p.b.batch_execute("VACUUM ANALYZE").await.unwrap();
    let flushed: Lsn =
        p.b.query_one("SELECT pg_current_wal_flush_lsn()", &[])
            .await
            .unwrap()
            .get(0);
    let waited = repl::wait_applied(&p.b, SUB, &p.g, SUB, flushed, WAIT)
        .await
        .unwrap();
    eprintln!("TIMING wait_applied after VACUUM: {waited:?}");

    // A target that is never reached times out with the position reached.
    let far = flushed + (1 << 40);
    let err = repl::wait_applied(&p.b, SUB, &p.g, SUB, far, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplicationError::Timeout { reached: Some(r), .. } if r >= flushed),
        "{err}"
    );

    // Lag returns to 0 bytes when idle.
    let t = Instant::now();
    let lag = loop {
        let lag = repl::replication_lag(&p.b, SUB).await.unwrap();
        if lag.bytes == 0 || t.elapsed() > WAIT {
            break lag;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(lag.bytes, 0, "{lag:?}");
    assert_eq!(lag.seconds, Some(0.0));
    assert!(lag.streaming);
    assert!(matches!(
        repl::replication_lag(&p.b, "nope").await,
        Err(ReplicationError::NotFound { .. })
    ));
}

/// sync_sequences copies last_value and is_called of every user sequence,
/// so nextval on green continues where blue stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sequences_prevents_collisions() {
    let p = pair().await;
    for pg in [&p.blue, &p.green] {
        pg.psql_db(
            "app",
            "CREATE SEQUENCE plain; CREATE SCHEMA \"Odd schema\"; \
             CREATE SEQUENCE \"Odd schema\".\"Seq\" INCREMENT 5;",
        );
    }
    let app = p.blue.connect("app", "app", "app").await;
    for n in 0..50 {
        app.execute("INSERT INTO items (writer, n) VALUES (0, $1)", &[&n])
            .await
            .unwrap();
    }
    p.b.batch_execute(
        "SELECT setval('plain', 500, false); SELECT nextval('\"Odd schema\".\"Seq\"') FROM generate_series(1, 3)",
    )
    .await
    .unwrap();
    catch_up(&p.b, SUB, &p.g, SUB).await;
    assert_eq!(count(&p.g, "SELECT count(*) FROM items").await, 50);
    // Without the sync the next id on green would be 1: a collision.
    assert_eq!(count(&p.g, "SELECT last_value FROM items_id_seq").await, 1);

    let t = Instant::now();
    let n = repl::sync_sequences(&p.b, &p.g).await.unwrap();
    eprintln!("TIMING sync_sequences (3 sequences): {:?}", t.elapsed());
    assert_eq!(n, 3);
    let green_app = p.green.connect("app", "app", "app").await;
    let id: i32 = green_app
        .query_one(
            "INSERT INTO items (writer, n) VALUES (9, 9) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 51);
    assert_eq!(count(&p.g, "SELECT nextval('plain')").await, 500);
    assert_eq!(
        count(&p.g, "SELECT nextval('\"Odd schema\".\"Seq\"')").await,
        16
    );
    // A sequence missing on the target names itself in the error.
    p.blue.psql_db("app", "CREATE SEQUENCE only_on_blue");
    let err = repl::sync_sequences(&p.b, &p.g).await.unwrap_err();
    assert!(err.to_string().contains("only_on_blue"), "{err}");
}

/// fence: a direct write as the application role fails (25006), reads work,
/// existing sessions are ended, replication still applies; unfence restores
/// each role's previous setting exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_blocks_app_writes_but_not_replication() {
    let p = pair().await;
    p.green.create_user("app2", "app2");
    p.green.psql(
        "ALTER ROLE app2 SET default_transaction_read_only = off; \
         ALTER ROLE app2 SET work_mem = '8MB'",
    );
    p.green.psql_db(
        "app",
        "GRANT INSERT, SELECT ON ALL TABLES IN SCHEMA public TO app2; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app2",
    );
    let before = p.green.connect("app", "app", "app").await;
    let settings = |g: &PgServer| {
        g.psql(
            "SELECT r.rolname, array_to_string(d.setconfig, ',') FROM pg_db_role_setting d \
             JOIN pg_roles r ON r.oid = d.setrole WHERE r.rolname IN ('app', 'app2') ORDER BY 1",
        )
    };
    let original = settings(&p.green);

    let roles = vec!["app".to_string(), "app2".to_string()];
    let t = Instant::now();
    let f = repl::fence(&p.g, &roles).await.unwrap();
    eprintln!("TIMING fence (2 roles, 1 session): {:?}", t.elapsed());
    assert_eq!(f.terminated, 1, "{f:?}");
    assert!(before.simple_query("SELECT 1").await.is_err());

    for (user, pass) in [("app", "app"), ("app2", "app2")] {
        let c = p.green.connect(user, pass, "app").await;
        let err = c
            .execute("INSERT INTO events (note) VALUES ('direct')", &[])
            .await
            .unwrap_err();
        let code = err.code().map(|c| c.code().to_string());
        assert!(
            matches!(code.as_deref(), Some("25006") | Some("42501")),
            "{user}: {err}"
        );
        assert!(c.query_one("SELECT count(*) FROM items", &[]).await.is_ok());
        assert!(c
            .query_one("SELECT nextval('items_id_seq')", &[])
            .await
            .is_err());
    }
    // Replication still applies into the fenced side.
    p.b.batch_execute("INSERT INTO events (note) SELECT 'replicated' FROM generate_series(1, 10)")
        .await
        .unwrap();
    catch_up(&p.b, SUB, &p.g, SUB).await;
    assert_eq!(count(&p.g, "SELECT count(*) FROM events").await, 10);
    assert!(
        repl::subscription_status(&p.g, SUB)
            .await
            .unwrap()
            .streaming
    );

    // The admin role itself is never fenced.
    let err = repl::fence(&p.g, &[SUPERUSER.to_string()])
        .await
        .unwrap_err();
    assert!(matches!(err, ReplicationError::InvalidState(_)), "{err}");

    // A fence over a fence (one a crash left): the plan keeps what the
    // roles had before the first, recorded in pgswitch's markers, instead
    // of taking the fence for the operator's setting.
    let again = repl::fence(&p.g, &roles).await.unwrap();
    assert_eq!(
        again.roles, f.roles,
        "previous settings survive a second fence"
    );
    let marked = repl::pgswitch_fence(&p.g).await.unwrap().expect("markers");
    assert_eq!(marked.roles, f.roles);

    let fenced_session = p.green.connect("app", "app", "app").await;
    let ended = repl::unfence(&p.g, &again).await.unwrap();
    assert!(ended >= 1, "sessions started while fenced are ended");
    assert!(fenced_session.simple_query("SELECT 1").await.is_err());
    assert_eq!(settings(&p.green), original);
    assert!(repl::pgswitch_fence(&p.g).await.unwrap().is_none());
    let c = p.green.connect("app", "app", "app").await;
    c.execute("INSERT INTO events (note) VALUES ('after unfence')", &[])
        .await
        .unwrap();
}

/// Reverse replication and back, with an aborted activation first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_replication_and_restore_forward() {
    let p = pair().await;
    let blue_app = p.blue.connect("app", "app", "app").await;
    let insert = |c: &'static str, from: &'static str, n: i32| {
        format!(
            "INSERT INTO items (writer, n, note) SELECT 0, g, '{from}' FROM generate_series(1, {n}) g; \
             INSERT INTO events (note) SELECT '{from}' FROM generate_series(1, {c})"
        )
    };
    blue_app
        .batch_execute(&insert("10", "blue-1", 100))
        .await
        .unwrap();
    catch_up(&p.b, SUB, &p.g, SUB).await;

    let names = ReverseNames::new(conninfo(&p.green));
    let prep = repl::prepare_reverse(&p.g, &p.b, &names).await.unwrap();
    assert!(prep.created_publication && prep.created_slot && prep.created_subscription);
    eprintln!("TIMING reverse slot creation: {:?}", prep.slot_creation);
    let again = repl::prepare_reverse(&p.g, &p.b, &names).await.unwrap();
    assert!(!again.created_publication && !again.created_slot && !again.created_subscription);
    assert!(again.slot_advanced_to.is_some());
    let mut slot_costs = vec![prep.slot_creation];
    for i in 0..5 {
        let t = Instant::now();
        p.g.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("probe_{i}")],
        )
        .await
        .unwrap();
        slot_costs.push(t.elapsed());
        p.g.execute(
            "SELECT pg_drop_replication_slot($1)",
            &[&format!("probe_{i}")],
        )
        .await
        .unwrap();
    }
    summary("logical slot creation on green", &mut slot_costs);

    // Rows replicated to green after the slot exists: the ones a naive
    // reverse direction would send back.
    blue_app
        .batch_execute(&insert("10", "blue-2", 50))
        .await
        .unwrap();

    // An activation that is aborted: forward comes back and carries on.
    catch_up(&p.b, SUB, &p.g, SUB).await;
    // Cutover step 6: forward off on green, reverse on on blue.
    let sp = repl::switch_direction(&p.g, SUB, &p.b, &names.subscription, WAIT)
        .await
        .unwrap();
    eprintln!("TIMING activate_reverse (aborted run): {sp:?}");
    // The abort's undo (cutover::recover): reverse off, forward back on.
    assert!(repl::stop_subscription(&p.b, &names.subscription, WAIT)
        .await
        .unwrap());
    assert!(repl::start_subscription(&p.g, SUB).await.unwrap());
    assert!(
        !repl::subscription_status(&p.b, &names.subscription)
            .await
            .unwrap()
            .enabled
    );
    blue_app
        .batch_execute(&insert("0", "blue-3", 5))
        .await
        .unwrap();
    catch_up(&p.b, SUB, &p.g, SUB).await;
    assert_eq!(count(&p.g, "SELECT count(*) FROM items").await, 155);

    // The cutover's steps 4-7 as it runs them inside the pause.
    let pause = Instant::now();
    let (_, waited) = catch_up(&p.b, SUB, &p.g, SUB).await;
    let seqs = repl::sync_sequences(&p.b, &p.g).await.unwrap();
    let sp = repl::switch_direction(&p.g, SUB, &p.b, &names.subscription, WAIT)
        .await
        .unwrap();
    let fence = repl::fence(&p.b, &["app".to_string()]).await.unwrap();
    eprintln!(
        "TIMING cutover steps 4-7: {:?} (wait_applied {waited:?}, activate_reverse {:?} \
         = stop {:?} + start {:?}), {seqs} sequence(s)",
        pause.elapsed(),
        sp.total,
        sp.stop,
        sp.start
    );
    assert!(!repl::subscription_status(&p.g, SUB).await.unwrap().enabled);

    // Application writes now go to green; they reach blue, once.
    let green_app = p.green.connect("app", "app", "app").await;
    green_app
        .batch_execute(&insert("5", "green", 30))
        .await
        .unwrap();
    let (_, waited) = catch_up(&p.g, &names.slot, &p.b, &names.subscription).await;
    eprintln!("TIMING first reverse catch-up (includes the worker's start): {waited:?}");
    assert_eq!(count(&p.b, "SELECT count(*) FROM items").await, 185);
    assert_eq!(count(&p.b, "SELECT count(*) FROM events").await, 25);
    assert_eq!(
        count(&p.b, "SELECT count(*) FROM items WHERE note = 'green'").await,
        30
    );
    assert_eq!(
        count(&p.b, "SELECT count(DISTINCT id) FROM items WHERE id > 155").await,
        30,
        "green's ids continue blue's sequence"
    );
    let st = repl::subscription_status(&p.b, &names.subscription)
        .await
        .unwrap();
    assert!(st.enabled && st.streaming, "{st:?}");
    assert!(!p.blue.log().contains("duplicate key"), "{}", p.blue.log());
    let mut reverse = Vec::new();
    for _ in 0..10 {
        green_app
            .batch_execute(&insert("1", "green-2", 1))
            .await
            .unwrap();
        reverse.push(
            catch_up(&p.g, &names.slot, &p.b, &names.subscription)
                .await
                .1,
        );
    }
    summary(
        "wait_applied, reverse direction (PG17 -> PG15)",
        &mut reverse,
    );
    // Fenced: the application can't write on blue directly.
    let direct = p.blue.connect("app", "app", "app").await;
    let err = direct
        .execute("INSERT INTO events (note) VALUES ('x')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25006"));

    // Fallback: catch up over the reverse direction, then restore forward.
    let (_, _) = catch_up(&p.g, &names.slot, &p.b, &names.subscription).await;
    repl::sync_sequences(&p.g, &p.b).await.unwrap();
    repl::unfence(&p.b, &fence).await.unwrap();
    // After a fallback: reverse off on blue, forward back on on green.
    let sp = repl::switch_direction(&p.b, &names.subscription, &p.g, SUB, WAIT)
        .await
        .unwrap();
    eprintln!("TIMING restore_forward: {sp:?}");
    let blue_app = p.blue.connect("app", "app", "app").await;
    blue_app
        .batch_execute(&insert("3", "blue-4", 20))
        .await
        .unwrap();
    catch_up(&p.b, SUB, &p.g, SUB).await;
    // 155 + 30 + 10 from green, 20 new from blue; nothing from blue twice.
    assert_eq!(count(&p.g, "SELECT count(*) FROM items").await, 215);
    assert_eq!(
        count(&p.g, "SELECT count(*) FROM events").await,
        20 + 5 + 10 + 3
    );
    let st = repl::subscription_status(&p.g, SUB).await.unwrap();
    assert!(st.enabled && st.streaming, "{st:?}");
    assert!(
        !p.green.log().contains("duplicate key"),
        "{}",
        p.green.log()
    );
    assert!(
        !repl::subscription_status(&p.b, &names.subscription)
            .await
            .unwrap()
            .enabled
    );

    // Drop the idle reverse direction: everything prepare created is gone.
    let dropped = repl::drop_direction(&p.g, &p.b, &names).await.unwrap();
    assert_eq!(dropped.len(), 3, "{dropped:?}");
    assert!(repl::drop_direction(&p.g, &p.b, &names)
        .await
        .unwrap()
        .is_empty());
    assert!(
        !repl::subscription_status(&p.b, &names.subscription)
            .await
            .unwrap()
            .exists
    );
    assert_eq!(
        count(
            &p.g,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgswitch_reverse'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &p.g,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'pgswitch_reverse'"
        )
        .await,
        0
    );
}
