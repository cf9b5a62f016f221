//! Throw-away PostgreSQL servers for integration tests.
use super::*;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Instant;

/// Superuser name of every [`PgServer`].
pub const SUPERUSER: &str = "postgres";
/// Superuser password of every [`PgServer`] (set after start).
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// Bump when the template layout / initdb flags change.
const TEMPLATE_REV: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PgVersion {
    #[default]
    V15,
    V17,
}

impl PgVersion {
    pub fn major(self) -> u32 {
        match self {
            PgVersion::V15 => 15,
            PgVersion::V17 => 17,
        }
    }
}

/// Auth method of the `host all all 127.0.0.1/32 <auth>` pg_hba line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HbaAuth {
    #[default]
    ScramSha256,
    Md5,
    Trust,
    /// Cleartext password.
    Password,
}

impl HbaAuth {
    pub fn hba_method(self) -> &'static str {
        match self {
            HbaAuth::ScramSha256 => "scram-sha-256",
            HbaAuth::Md5 => "md5",
            HbaAuth::Trust => "trust",
            HbaAuth::Password => "password",
        }
    }

    /// `password_encryption` used by the server (md5 only for `Md5`).
    pub fn password_encryption(self) -> &'static str {
        match self {
            HbaAuth::Md5 => "md5",
            _ => "scram-sha-256",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    pub version: PgVersion,
    pub auth: HbaAuth,
    /// Extra `postgresql.conf` lines, appended last (so they override).
    pub extra_conf: Vec<String>,
}

/// PostgreSQL 17 bin dir: `$PGSWITCH_PG17_BIN`, else
/// `$PGSWITCH_PG17_DIR/package/native/bin`, else
/// `/opt/pgswitch/pg17/package/native/bin` — if its `postgres --version`
/// reports 17. `None` otherwise.
pub fn pg17_bin_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = if let Some(b) = std::env::var_os("PGSWITCH_PG17_BIN").filter(|v| !v.is_empty()) {
            PathBuf::from(b)
        } else {
            let base = std::env::var_os("PGSWITCH_PG17_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/opt/pgswitch/pg17"));
            base.join("package/native/bin")
        };
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .ok()?;
        let v = String::from_utf8_lossy(&out.stdout);
        (out.status.success() && v.contains(" 17.")).then_some(dir)
    })
    .clone()
}

/// The bin dir of a version. A missing PostgreSQL 17 fails the test: a
/// cross-version test run on 15 alone would pass without testing what it says.
fn resolve_version(v: PgVersion) -> (PgVersion, PathBuf) {
    match v {
        PgVersion::V15 => (PgVersion::V15, pg15_bin_dir()),
        PgVersion::V17 => match pg17_bin_dir() {
            Some(d) => (PgVersion::V17, d),
            None => panic!("{}", missing_prerequisite("PostgreSQL 17")),
        },
    }
}

/// The message of a test that cannot run because `what` is not installed.
pub fn missing_prerequisite(what: &str) -> String {
    format!(
        "{what} is not installed: this test cannot run. Install the test \
         prerequisites with `bash scripts/test-deps.sh` (see README, Tests)."
    )
}

fn pg_command(program: PathBuf) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("PGDATA")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    if let Some((uid, gid)) = pg_os_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Returns the template data dir for `bin` (initdb'ing it on first use).
///
/// Concurrency (nextest runs tests as parallel processes): the template is
/// built in a private temp dir and atomically renamed into place; a loser of
/// the race just deletes its copy. No lock files, so nothing can go stale.
fn template_dir(version: PgVersion, bin: &Path) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bin.hash(&mut h);
    if let Ok(m) = fs::metadata(bin.join("postgres")).and_then(|m| m.modified()) {
        m.hash(&mut h);
    }
    pg_os_user().hash(&mut h);
    euid().hash(&mut h);
    TEMPLATE_REV.hash(&mut h);
    let name = format!("pgswitch-template-{}-{:016x}", version.major(), h.finish());
    let final_dir = test_tmp_base().join(&name);
    let data = final_dir.join("data");
    if final_dir.join("ready").exists() {
        return data;
    }
    let t0 = Instant::now();
    let tmp = test_tmp_base().join(format!(
        "{name}.tmp.{}.{:x}",
        std::process::id(),
        random_u64()
    ));
    fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    chown_for_pg(&tmp);
    let out = pg_command(bin.join("initdb"))
        .arg("-D")
        .arg(tmp.join("data"))
        .args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .expect("spawn initdb");
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        panic!(
            "initdb ({}) failed: {}\n{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(tmp.join("ready"), b"ok\n").unwrap();
    if fs::rename(&tmp, &final_dir).is_err() {
        // Someone else won the race (or a broken leftover is in the way).
        let _ = fs::remove_dir_all(&tmp);
        if !final_dir.join("ready").exists() {
            panic!(
                "template {} exists but is incomplete; delete it",
                final_dir.display()
            );
        }
    } else {
        eprintln!(
            "support: initdb template for PG{} built in {:?} at {}",
            version.major(),
            t0.elapsed(),
            final_dir.display()
        );
    }
    data
}

use std::hash::Hash;

/// A running (or stopped) throw-away PostgreSQL server.
///
/// Listens on `127.0.0.1:port` and on a unix socket in `dir`. Superuser
/// `postgres`/`postgres`. pg_hba: `local all all trust`,
/// `host all all 127.0.0.1/32 <auth>` (plus the same for `replication`).
/// Dropping it stops the server (immediate shutdown) and deletes `dir`.
pub struct PgServer {
    pub port: u16,
    /// `server_version_num`, e.g. 150013 or 170010.
    pub version_num: u32,
    /// Version actually running (V17 may have fallen back to V15).
    pub version: PgVersion,
    pub auth: HbaAuth,
    /// Per-server temp dir: `data/`, `postgres.log`, unix socket.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    child: Option<Child>,
    reaper: Option<Child>,
}

impl PgServer {
    /// Creates and starts a server (blocking). Typical time: ~0.3-0.6 s
    /// (copy of a cached initdb template + start); the first start per PG
    /// version on a machine also runs initdb (~0.7 s more).
    pub fn start(opts: PgOptions) -> PgServer {
        let t0 = Instant::now();
        let (version, bin_dir) = resolve_version(opts.version);
        let template = template_dir(version, &bin_dir);

        let dir = tempfile::Builder::new()
            .prefix(&format!("pgswitch-pg{}-", version.major()))
            .tempdir_in(test_tmp_base())
            .expect("create server temp dir")
            .keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        chown_for_pg(&dir);
        let data_dir = dir.join("data");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data_dir)
            .status()
            .expect("spawn cp");
        assert!(
            st.success(),
            "cp -a {} {} failed",
            template.display(),
            data_dir.display()
        );

        let hba = format!(
            "local all all trust\nlocal replication all trust\n\
             host all all 127.0.0.1/32 {m}\nhost replication all 127.0.0.1/32 {m}\n",
            m = opts.auth.hba_method()
        );
        fs::write(data_dir.join("pg_hba.conf"), hba).unwrap();

        let mut server = PgServer {
            port: 0,
            version_num: 0,
            version,
            auth: opts.auth,
            dir,
            data_dir,
            bin_dir,
            child: None,
            reaper: None,
        };
        // Retry with a new port if another process grabbed ours.
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_port();
            server.write_conf(&opts);
            match server.spawn_and_wait() {
                Ok(()) => break,
                Err(e) if attempt < 5 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        let out = server.psql(&format!(
            "ALTER ROLE {SUPERUSER} PASSWORD '{SUPERUSER_PASSWORD}';\nSHOW server_version_num;"
        ));
        server.version_num = out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad server_version_num {out:?}"));
        if std::env::var_os("PGSWITCH_TEST_VERBOSE").is_some() {
            eprintln!(
                "support: PG {} on port {} ready in {:?} ({})",
                server.version_num,
                server.port,
                t0.elapsed(),
                server.dir.display()
            );
        }
        server
    }

    fn write_conf(&self, opts: &PgOptions) {
        let mut conf = format!(
            "\n# --- pgswitch test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{dir}'\n\
             wal_level = logical\n\
             max_connections = 300\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             password_encryption = '{enc}'\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            port = self.port,
            dir = self.dir.display(),
            enc = opts.auth.password_encryption(),
        );
        for l in &opts.extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        // postgresql.auto.conf is read after postgresql.conf; we own it fully.
        fs::write(self.data_dir.join("postgresql.auto.conf"), conf).unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Full postgres server log.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Unix socket directory (host for libpq / psql).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Postmaster pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open postgres log");
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        let mut child = pg_command(self.bin_dir.join("postgres"))
            .arg("-D")
            .arg(&self.data_dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn postgres");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let pidfile = self.data_dir.join("postmaster.pid");
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                let log = fs::read(self.log_path()).unwrap_or_default();
                let log = String::from_utf8_lossy(&log[(log_offset as usize).min(log.len())..])
                    .into_owned();
                return Err(format!(
                    "postgres exited during startup ({st}) on port {}:\n{log}",
                    self.port
                ));
            }
            let ready = fs::read_to_string(&pidfile)
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready && wait_for_port(self.port, Duration::from_millis(0)) {
                break;
            }
            if Instant::now() > deadline {
                let _ = send_signal(pid, SIGQUIT);
                let _ = wait_child(&mut child, Duration::from_secs(5));
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "postgres did not become ready within 60s:\n{}",
                    file_tail(&self.log_path(), 50)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reaper = spawn_reaper(
            pid,
            SIGQUIT,
            if keep_dirs() { None } else { Some(&self.dir) },
        );
        self.child = Some(child);
        Ok(())
    }

    /// Sends `sig` to the postmaster and waits for it to exit.
    fn shutdown(&mut self, sig: i32, timeout: Duration) {
        stop_reaper(&mut self.reaper);
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id(), sig);
                if wait_child(&mut child, timeout).is_none() {
                    send_signal(child.id(), SIGQUIT);
                    if wait_child(&mut child, Duration::from_secs(5)).is_none() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
    }

    /// Fast shutdown (SIGINT: disconnects clients, clean checkpoint).
    /// Blocks until the server exited. No-op if not running.
    pub fn stop(&mut self) {
        self.shutdown(SIGINT, Duration::from_secs(30));
    }

    /// Immediate shutdown (SIGQUIT, like a crash). Blocks until exited.
    pub fn kill(&mut self) {
        self.shutdown(SIGQUIT, Duration::from_secs(10));
    }

    /// Starts a stopped server again on the same port and data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Reloads the configuration (SIGHUP); e.g. after editing
    /// `data_dir/pg_hba.conf` or via `ALTER SYSTEM` (note: `ALTER SYSTEM`
    /// rewrites postgresql.auto.conf, where the harness keeps its settings;
    /// it preserves them).
    pub fn reload(&self) {
        if let Some(pid) = self.pid() {
            send_signal(pid, SIGHUP);
        }
    }

    /// tokio-postgres config for a TCP connection to this server.
    pub fn config(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Config {
        client_config(self.port, user, Some(password), db)
    }

    /// Connects over TCP (127.0.0.1:port, so pg_hba's `<auth>` applies) and
    /// spawns the connection task. Panics on error. Needs a tokio runtime.
    pub async fn connect(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
        self.try_connect(user, password, db)
            .await
            .unwrap_or_else(|e| panic!("connect to PG port {} as {user}: {e}", self.port))
    }

    /// Like [`connect`](Self::connect) but returns the error.
    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        spawn_conn(
            self.config(user, password, db)
                .connect(tokio_postgres::NoTls)
                .await?,
        )
    }

    /// Superuser connection over the unix socket (trust; no password needed).
    pub async fn admin(&self) -> tokio_postgres::Client {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        let conn = c
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("admin connect to PG port {}: {e}", self.port));
        spawn_conn(conn).unwrap()
    }

    /// Runs `sql` with psql as superuser over the unix socket
    /// (`psql -X -q -A -t -v ON_ERROR_STOP=1`), i.e. stdout contains only
    /// unaligned tuples, fields separated by `|`, one row per line. Panics
    /// with stderr on failure. Multiple statements separated by `;` are ok.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// [`psql`](Self::psql) against database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let out = Command::new(psql_bin())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", db])
            .arg("-c")
            .arg(sql)
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("spawn psql");
        if !out.status.success() {
            panic!(
                "psql on port {} failed ({}): {}\nSQL: {sql}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `CREATE ROLE name LOGIN PASSWORD 'password'` (hashed with the server's
    /// `password_encryption`: md5 for `HbaAuth::Md5`, else scram-sha-256).
    pub fn create_user(&self, name: &str, password: &str) {
        self.psql(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    /// `CREATE DATABASE name [OWNER owner]`.
    pub fn create_db(&self, name: &str, owner: Option<&str>) {
        let owner = owner
            .map(|o| format!(" OWNER {}", quote_ident(o)))
            .unwrap_or_default();
        self.psql(&format!("CREATE DATABASE {}{owner}", quote_ident(name)));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.log_path().as_os_str().is_empty() {
            eprintln!(
                "---- postgres (port {}) log tail ----\n{}\n----",
                self.port,
                file_tail(&self.log_path(), 30)
            );
        }
        self.shutdown(SIGQUIT, Duration::from_secs(10));
        if keep_dirs() {
            eprintln!("support: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn_conn<S, T>(
    (client, conn): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// SQL identifier quoting.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings=on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
