//! `pgswitch demo`: a blue/green upgrade on this machine, start to end.
//!
//! Two throwaway servers (blue on the oldest PostgreSQL found, green on the
//! newest), a sample database on blue, `prepare`, pgswitch (this binary,
//! `run`, as a child) with its dashboard, a workload through it, then a
//! cutover, `verify`, a fallback and `verify` again, each report printed.
//! Everything is removed at the end (also on Ctrl-C) unless `--keep`.
//!
//! Nothing here is special to the demo: it drives the same commands and
//! admin API an operator uses.

mod servers;
mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use servers::Server;
use workload::Workload;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    NoPostgres(String),
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Step(String),
    #[error("interrupted")]
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Leave everything running and print how to reach it.
    pub keep: bool,
    /// A folder searched first for initdb, pg_ctl and postgres.
    pub pg_bin: Option<PathBuf>,
    /// Client sessions of the workload.
    pub clients: usize,
}

/// The demo's folder, servers and pgswitch, torn down on drop unless kept.
struct Site {
    dir: PathBuf,
    servers: Vec<Server>,
    proxy: Option<std::process::Child>,
    keep: bool,
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Some(mut proxy) = self.proxy.take() {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
        for server in &self.servers {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ADMIN_PASSWORD: &str = "pgswitch-demo";

/// Runs the demo; `Ok(true)` when everything went as it should (both
/// switches, no client error, no row lost).
pub async fn run(options: Options) -> Result<bool, DemoError> {
    let mut site = None;
    let result = tokio::select! {
        r = demo(&options, &mut site) => r,
        _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
    };
    if let Some(site) = site.take() {
        let kept = site.keep && result.is_ok();
        if !kept {
            say(&format!("cleaning up {}", site.dir.display()));
        }
        let mut site = site;
        site.keep = kept;
        drop(site);
    }
    result
}

fn say(line: &str) {
    println!("pgswitch demo: {line}");
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Setup(format!("no free port: {e}")))
}

async fn demo(options: &Options, site_slot: &mut Option<Site>) -> Result<bool, DemoError> {
    let installs = servers::find(options.pg_bin.as_deref());
    let (Some(old), Some(new)) = (installs.first(), installs.last()) else {
        return Err(DemoError::NoPostgres(
            "no PostgreSQL found (initdb, pg_ctl and postgres in PATH, /usr/lib/postgresql/*/bin, \
             /opt/pgswitch/pg17/package/native/bin or --pg-bin)"
                .into(),
        ));
    };
    if old.major == new.major {
        say(&format!(
            "only PostgreSQL {} found: blue and green both run it (scripts/install-pg17.sh \
             adds 17 for a real major-version upgrade)",
            old.major
        ));
    } else {
        say(&format!(
            "blue: PostgreSQL {}, green: PostgreSQL {}",
            old.major, new.major
        ));
    }
    let dir = std::env::temp_dir().join(format!("pgswitch-demo-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&dir).map_err(|e| DemoError::Setup(format!("{}: {e}", dir.display())))?;
    let site = site_slot.insert(Site {
        dir: dir.clone(),
        servers: Vec::new(),
        proxy: None,
        keep: options.keep,
    });
    servers::prepare_folder(&dir)?;
    say(&format!("working in {}", dir.display()));

    let (blue_port, green_port) = (free_port()?, free_port()?);
    let blue = Server::create("blue", old, &dir, blue_port, ADMIN_PASSWORD)?;
    site.servers.push(blue.clone());
    let green = Server::create("green", new, &dir, green_port, ADMIN_PASSWORD)?;
    site.servers.push(green.clone());
    blue.start()?;
    green.start()?;
    say(&format!(
        "blue on 127.0.0.1:{blue_port}, green on 127.0.0.1:{green_port}"
    ));
    sample_database(&blue, &green).await?;
    say("sample database `shop` on blue: 1000 customers, 10000 orders");

    let (listen, admin) = (free_port()?, free_port()?);
    let token = format!("{:032x}", rand::random::<u128>());
    let config_path = dir.join("proxy.toml");
    let config_text = proxy_config(&dir, &blue, &green, listen, admin, &token);
    std::fs::write(&config_path, &config_text)
        .map_err(|e| DemoError::Setup(format!("{}: {e}", config_path.display())))?;
    let config = Config::parse(&config_text, &config_path)
        .map_err(|e| DemoError::Setup(format!("the demo's config: {e}")))?;

    say("pgswitch prepare: roles, schema, publication, subscription, initial copy");
    let prepare = crate::prepare::Options {
        pg_bin: Some(old.bin.clone()),
        timeout: Some(Duration::from_secs(300)),
        replica_identity_full: false,
    };
    let mut display = crate::prepare::Display::new(false);
    let report = crate::prepare::run(&config, &prepare, &mut display).await;
    print!("{}", report.render());
    if !report.ok {
        return Err(DemoError::Step("prepare failed".into()));
    }

    site.proxy = Some(start_proxy(&dir, &config_path)?);
    let admin_url = format!("http://127.0.0.1:{admin}");
    wait_ready(&admin_url).await?;
    say(&format!(
        "pgswitch on 127.0.0.1:{listen}; dashboard {admin_url}/ (token {token})"
    ));

    let load = Workload::start(listen, options.clients);
    let mut ok = true;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ok &= switch(&admin_url, &token, "/cutover").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ok &= verify(&config).await?;
    ok &= switch(&admin_url, &token, "/fallback").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ok &= verify(&config).await?;
    let totals = load.stop().await;
    let lost = lost_rows(&blue, &totals.acked).await?;
    println!();
    say(&format!(
        "workload: {} transactions, {} client errors{}, {} orders acknowledged, {lost} rows lost",
        totals.transactions,
        totals.errors,
        totals
            .last_error
            .as_deref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default(),
        totals.acked.len()
    ));
    ok &= totals.errors == 0 && lost == 0;
    if options.keep {
        let pid = site.proxy.as_ref().map(|c| c.id()).unwrap_or(0);
        print_keep(
            &dir,
            &blue,
            &green,
            listen,
            &admin_url,
            &token,
            &config_path,
            pid,
        );
    }
    say(if ok {
        "done: OK"
    } else {
        "done: something went wrong (see above)"
    });
    Ok(ok)
}

async fn connect(server: &Server, database: &str) -> Result<tokio_postgres::Client, DemoError> {
    crate::replication::connect(
        "127.0.0.1",
        server.port,
        "postgres",
        ADMIN_PASSWORD,
        database,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| DemoError::Server(format!("{}: {e}", server.name)))
}

/// The application's role and database on blue (green gets them from
/// prepare; it only needs the empty database to exist).
async fn sample_database(blue: &Server, green: &Server) -> Result<(), DemoError> {
    let sql = |what: &'static str| {
        move |e| DemoError::Setup(crate::replication::ReplicationError::sql(what, e).to_string())
    };
    let b = connect(blue, "postgres").await?;
    b.batch_execute("CREATE ROLE app LOGIN PASSWORD 'app'")
        .await
        .map_err(sql("create the role on blue"))?;
    b.batch_execute("CREATE DATABASE shop OWNER app")
        .await
        .map_err(sql("create the database on blue"))?;
    let g = connect(green, "postgres").await?;
    g.batch_execute("CREATE DATABASE shop")
        .await
        .map_err(sql("create the database on green"))?;
    let shop = connect(blue, "shop").await?;
    shop.batch_execute(
        "SET ROLE app;
         CREATE TABLE customers (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                                 name text NOT NULL);
         CREATE TABLE orders (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                              customer_id int NOT NULL REFERENCES customers,
                              amount numeric(10, 2) NOT NULL,
                              created_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON orders (customer_id);
         INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 1000) g;
         INSERT INTO orders (customer_id, amount)
              SELECT 1 + g % 1000, (g % 500) / 10.0 FROM generate_series(1, 10000) g;",
    )
    .await
    .map_err(sql("load the sample data"))
}

fn proxy_config(
    dir: &Path,
    blue: &Server,
    green: &Server,
    listen: u16,
    admin: u16,
    token: &str,
) -> String {
    let backend = |s: &Server| {
        format!(
            "[backends.{}]\nhost = \"127.0.0.1\"\nport = {}\nserver_tls = \"disable\"\n\
             admin_user = \"postgres\"\nadmin_password = \"{ADMIN_PASSWORD}\"\n",
            s.name, s.port
        )
    };
    format!(
        "# The pgswitch demo's configuration (pgswitch demo).\n\
         [proxy]\nlisten = \"127.0.0.1:{listen}\"\npool_mode = \"transaction\"\n\n{}\n{}\n\
         [replication]\ndatabase = \"shop\"\n\n\
         [cutover]\nactive = \"blue\"\nstate_file = \"{}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{token}\"\n\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\n",
        backend(blue),
        backend(green),
        dir.join("state.json").display()
    )
}

/// This very binary, `run`, its log in the demo's folder.
fn start_proxy(dir: &Path, config: &Path) -> Result<std::process::Child, DemoError> {
    let exe =
        std::env::current_exe().map_err(|e| DemoError::Setup(format!("this program: {e}")))?;
    let log = std::fs::File::create(dir.join("pgswitch.log"))
        .map_err(|e| DemoError::Setup(format!("pgswitch.log: {e}")))?;
    let err = log
        .try_clone()
        .map_err(|e| DemoError::Setup(format!("pgswitch.log: {e}")))?;
    std::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| DemoError::Setup(format!("start pgswitch: {e}")))
}

async fn wait_ready(admin_url: &str) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer =
            crate::admin::client::call(admin_url, None, hyper::Method::GET, "/ready", None).await;
        if matches!(answer, Ok((200, _))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Setup(
                "pgswitch did not become ready in 30 s (see pgswitch.log)".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn switch(admin_url: &str, token: &str, path: &str) -> Result<bool, DemoError> {
    println!();
    say(&format!("pgswitch {}", path.trim_start_matches('/')));
    let (status, body) =
        crate::admin::client::call(admin_url, Some(token), hyper::Method::POST, path, None)
            .await
            .map_err(|e| DemoError::Step(format!("{path}: {e}")))?;
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(report) => print!("{}", crate::admin::client::render(&report)),
        Err(_) => println!("{body}"),
    }
    Ok(status == 200)
}

async fn verify(config: &Config) -> Result<bool, DemoError> {
    println!();
    say("pgswitch verify");
    let report = crate::verify::run(config, &crate::verify::Options::default())
        .await
        .map_err(|e| DemoError::Step(format!("verify: {e}")))?;
    print!("{}", report.render());
    Ok(report.equal)
}

/// Acknowledged orders missing on blue, the side active at the end.
async fn lost_rows(blue: &Server, acked: &[i64]) -> Result<i64, DemoError> {
    let c = connect(blue, "shop").await?;
    let row = c
        .query_one(
            "SELECT count(*) FROM unnest($1::int8[]) i \
              WHERE NOT EXISTS (SELECT 1 FROM orders WHERE id = i)",
            &[&acked],
        )
        .await
        .map_err(|e| DemoError::Step(format!("count lost rows: {e}")))?;
    row.try_get(0)
        .map_err(|e| DemoError::Step(format!("count lost rows: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn print_keep(
    dir: &Path,
    blue: &Server,
    green: &Server,
    listen: u16,
    admin_url: &str,
    token: &str,
    config: &Path,
    pgswitch_pid: u32,
) {
    let psql = |s: &Server| {
        format!(
            "PGPASSWORD={ADMIN_PASSWORD} psql -h 127.0.0.1 -p {} -U postgres shop",
            s.port
        )
    };
    println!(
        "\nEverything is still running (--keep):\n\
         \x20 blue:       {}\n\
         \x20 green:      {}\n\
         \x20 pgswitch:   PGPASSWORD=app psql -h 127.0.0.1 -p {listen} -U app shop\n\
         \x20 status:     pgswitch status --admin {admin_url} --token {token}\n\
         \x20 dashboard:  {admin_url}/ (token {token})\n\
         \x20 config:     {}\n\
         To stop it:\n\
         \x20 kill {pgswitch_pid}\n\
         \x20 {}\n\
         \x20 {}\n\
         \x20 rm -rf {}",
        psql(blue),
        psql(green),
        config.display(),
        blue.stop_command(),
        green.stop_command(),
        dir.display()
    );
}
