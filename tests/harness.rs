//! Self-test of the shared test harness (tests/support). Does not use the
//! proxy binary.
mod support;

use std::collections::HashSet;
use support::*;

async fn check_server(pg: &PgServer) {
    // Superuser over TCP with password auth.
    let su = pg.connect(SUPERUSER, SUPERUSER_PASSWORD, "postgres").await;
    let row = su.query_one("SELECT 1 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);

    // A normal user created with the server's password_encryption.
    pg.create_user("alice", "s3cr'et");
    let stored = pg.psql("SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'alice'");
    match pg.auth {
        HbaAuth::Md5 => assert!(stored.starts_with("md5"), "{stored}"),
        _ => assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}"),
    }
    let alice = pg.connect("alice", "s3cr'et", "postgres").await;
    let row = alice
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice");
    assert!(
        pg.try_connect("alice", "wrong", "postgres").await.is_err(),
        "wrong password accepted"
    );

    // Admin over the unix socket and the configured settings.
    let admin = pg.admin().await;
    for (name, want) in [
        ("wal_level", "logical"),
        ("max_connections", "300"),
        ("fsync", "off"),
    ] {
        let row = admin.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), want, "{name}");
    }
    assert_eq!(pg.psql("SHOW listen_addresses").trim(), "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_and_pg17_concurrently() {
    let h15 = std::thread::spawn(|| PgServer::start(PgOptions::default()));
    let h17 = std::thread::spawn(|| {
        PgServer::start(PgOptions {
            version: PgVersion::V17,
            ..Default::default()
        })
    });
    let pg15 = h15.join().unwrap();
    let pg17 = h17.join().unwrap();
    assert_ne!(pg15.port, pg17.port);

    assert!(
        (150000..160000).contains(&pg15.version_num),
        "{}",
        pg15.version_num
    );
    assert_eq!(pg15.version, PgVersion::V15);
    assert!(
        (170000..180000).contains(&pg17.version_num),
        "{}",
        pg17.version_num
    );
    assert_eq!(pg17.version, PgVersion::V17);

    check_server(&pg15).await;
    check_server(&pg17).await;

    let dirs = [pg15.dir.clone(), pg17.dir.clone(), pg15.data_dir.clone()];
    assert!(dirs.iter().all(|d| d.exists()));
    drop(pg15);
    drop(pg17);
    for d in &dirs {
        assert!(!d.exists(), "{} not removed by Drop", d.display());
    }
}

#[tokio::test]
async fn md5_auth_and_extra_conf() {
    let pg = PgServer::start(PgOptions {
        auth: HbaAuth::Md5,
        extra_conf: vec!["max_connections = 50".into()],
        ..Default::default()
    });
    assert_eq!(pg.psql("SHOW password_encryption").trim(), "md5");
    assert_eq!(pg.psql("SHOW max_connections").trim(), "50");
    pg.create_user("bob", "pw");
    let bob = pg.connect("bob", "pw", "postgres").await;
    bob.simple_query("SELECT 1").await.unwrap();
    assert!(pg
        .psql("SELECT rolpassword FROM pg_authid WHERE rolname='bob'")
        .starts_with("md5"));
}

#[tokio::test]
async fn trust_and_cleartext_auth() {
    let trust = PgServer::start(PgOptions {
        auth: HbaAuth::Trust,
        ..Default::default()
    });
    trust.connect(SUPERUSER, "whatever", "postgres").await;
    let clear = PgServer::start(PgOptions {
        auth: HbaAuth::Password,
        ..Default::default()
    });
    clear.create_user("carol", "pw");
    clear.connect("carol", "pw", "postgres").await;
    assert!(clear
        .try_connect("carol", "nope", "postgres")
        .await
        .is_err());
}

#[tokio::test]
async fn stop_restart_and_psql_output() {
    let mut pg = PgServer::start(PgOptions::default());
    pg.create_db("app", None);
    pg.psql_db(
        "app",
        "CREATE TABLE t (a int, b text); INSERT INTO t VALUES (1, 'x'), (2, 'y')",
    );
    assert_eq!(
        pg.psql_db("app", "SELECT a, b FROM t ORDER BY a"),
        "1|x\n2|y\n"
    );
    let port = pg.port;
    pg.stop();
    assert!(!pg.is_running());
    assert!(pg
        .try_connect(SUPERUSER, SUPERUSER_PASSWORD, "app")
        .await
        .is_err());
    pg.restart();
    assert_eq!(pg.port, port);
    let c = pg.connect(SUPERUSER, SUPERUSER_PASSWORD, "app").await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    pg.kill();
    pg.restart();
    pg.admin().await.simple_query("SELECT 1").await.unwrap();
}

#[test]
fn free_port_never_repeats_in_process() {
    let mut seen = HashSet::new();
    for _ in 0..200 {
        assert!(seen.insert(free_port()));
    }
    assert!(psql_bin().exists(), "{}", psql_bin().display());
    assert!(pgbench_bin().exists(), "{}", pgbench_bin().display());
}

#[test]
fn panicking_test_still_cleans_up() {
    let dir = std::sync::Arc::new(std::sync::Mutex::new(None));
    let d2 = dir.clone();
    let r = std::thread::spawn(move || {
        let pg = PgServer::start(PgOptions::default());
        *d2.lock().unwrap() = Some(pg.dir.clone());
        panic!("intentional panic (harness self-test)");
    })
    .join();
    assert!(r.is_err());
    let dir = dir.lock().unwrap().clone().unwrap();
    assert!(!dir.exists(), "{} left behind after panic", dir.display());
}
