//! Shared integration-test harness for pgswitch.
//!
//! Use from an integration test file in `tests/` with `mod support;` and then
//! `use support::*;`.
//!
//! * [`PgServer`] – a throw-away PostgreSQL 15 or 17 server on 127.0.0.1
//!   (template data dir initdb'd once per version and copied per server).
//! * [`Proxy`] – the `pgswitch` binary under test, started with a TOML config.
//! * [`ProxyConfig`] – a builder for the proxy's TOML config.
//! * [`pg_with_app`], [`client_config`], [`connect_with`] – a server with the
//!   `app`/`secret` role, and tokio-postgres clients.
//! * [`wait_until`], [`wait_for`] (and `_sync` variants) – polling helpers.
//! * [`Raw`] – a raw wire-protocol client.
//! * [`Pair`] – blue and green in logical replication, for cutover tests.
//! * [`rss_kib`], [`peak_rss_kib`], [`reset_peak_rss`] – a process's memory.
//! * [`free_port`], [`psql_bin`], [`pgbench_bin`], signal constants.
//!
//! Everything here is synchronous (blocking) except the client helpers
//! [`PgServer::connect`] / [`PgServer::admin`], which must run inside a tokio
//! runtime. Blocking calls from a `#[tokio::test]` are fine: they only block
//! the test's own runtime thread for the duration of the call.
//!
//! Environment knobs:
//! * `PGSWITCH_PG17_BIN` – bin dir of PostgreSQL 17 (default: the one
//!   installed by `scripts/install-pg17.sh`, `/opt/pgswitch/pg17/...`).
//! * `PGSWITCH_PG15_BIN` – bin dir of PostgreSQL 15
//!   (default `/usr/lib/postgresql/15/bin`).
//! * `PGSWITCH_TEST_TMP` – base dir for server dirs and templates (default
//!   `/tmp`; must be traversable by the `postgres` user when running as root).
//! * `PGSWITCH_KEEP_TEST_DIRS=1` – don't delete server/proxy dirs on drop.
#![allow(dead_code, unused_imports)]

mod client;
mod cluster;
mod config;
mod pg;
mod proxy;
mod rss;
mod wait;
mod wire;

pub use client::*;
pub use cluster::*;
pub use config::*;
pub use pg::*;
pub use proxy::*;
pub use rss::*;
pub use wait::*;
pub use wire::*;

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const SIGHUP: i32 = 1;
pub const SIGINT: i32 = 2;
pub const SIGQUIT: i32 = 3;
pub const SIGKILL: i32 = 9;
pub const SIGUSR1: i32 = 10;
pub const SIGUSR2: i32 = 12;
pub const SIGTERM: i32 = 15;

/// Default PostgreSQL 15 bin dir (Debian packages).
pub fn pg15_bin_dir() -> PathBuf {
    std::env::var_os("PGSWITCH_PG15_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// `psql` (PostgreSQL 15 client; works against 15 and 17 servers).
pub fn psql_bin() -> PathBuf {
    pg15_bin_dir().join("psql")
}

/// `pgbench` (PostgreSQL 15 client).
pub fn pgbench_bin() -> PathBuf {
    pg15_bin_dir().join("pgbench")
}

/// Base directory for per-test dirs and the initdb templates.
pub fn test_tmp_base() -> PathBuf {
    std::env::var_os("PGSWITCH_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

pub(crate) fn keep_dirs() -> bool {
    std::env::var_os("PGSWITCH_KEEP_TEST_DIRS").is_some_and(|v| v != "0" && !v.is_empty())
}

/// A cheap pseudo-random u64 (no `rand` dev-dependency needed).
pub fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Ports are picked at random from 15000..32000 (below Linux's ephemeral
/// range, so outgoing client connections of concurrently running tests can't
/// grab them) and checked by binding; falls back to binding port 0. A
/// process-wide set guarantees one process never hands out the same port
/// twice. Another *process* may still race for it; [`PgServer::start`]
/// retries with a new port if postgres can't bind.
pub fn free_port() -> u16 {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let used = USED.get_or_init(|| Mutex::new(HashSet::new()));
    let mut used = used.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port = 15000 + (random_u64() % 17000) as u16;
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if used.insert(port) {
            return port;
        }
    }
    panic!("free_port: could not find a free port");
}

/// Polls until a TCP connection to 127.0.0.1:`port` succeeds.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends signal `sig` to `pid` via the `kill` command. Returns success.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits up to `timeout` for `child` to exit.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Effective uid of this process (from /proc, no libc needed).
pub(crate) fn euid() -> u32 {
    static EUID: OnceLock<u32> = OnceLock::new();
    *EUID.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|rest| rest.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(u32::MAX)
    })
}

/// When the tests run as root, PostgreSQL must run as another OS user: the
/// `postgres` user's (uid, gid). `None` when not root.
pub(crate) fn pg_os_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if euid() != 0 {
            return None;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let line = passwd
            .lines()
            .find(|l| l.starts_with("postgres:"))
            .expect("running as root but there is no `postgres` OS user to run PostgreSQL as");
        let f: Vec<&str> = line.split(':').collect();
        Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

/// Makes `path` (a dir we created) owned by the PostgreSQL OS user.
pub(crate) fn chown_for_pg(path: &Path) {
    if let Some((uid, gid)) = pg_os_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// Last `n` lines of a (log) file, or a note why it can't be read.
pub fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Spawns a detached watchdog shell: when this test process dies without
/// cleaning up (killed by a timeout, aborted), it kills `pid` with `sig` and
/// removes `dir`. Drop impls kill the watchdog first, so it never acts on a
/// normal exit.
pub(crate) fn spawn_reaper(pid: u32, sig: i32, dir: Option<&Path>) -> Option<Child> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do
  kill -0 "$2" 2>/dev/null || exit 0
  sleep 1
done
kill "-$3" "$2" 2>/dev/null
sleep 3
kill -9 "$2" 2>/dev/null
if [ -n "$4" ]; then rm -rf "$4"; fi
"#;
    let dir = if keep_dirs() {
        String::new()
    } else {
        dir.map(|d| d.display().to_string()).unwrap_or_default()
    };
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("pgswitch-reaper")
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .arg(sig.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}

pub(crate) fn stop_reaper(reaper: &mut Option<Child>) {
    if let Some(mut r) = reaper.take() {
        let _ = r.kill();
        let _ = r.wait();
    }
}

/// One HTTP/1.1 request to a proxy's admin API over a fresh connection, with an
/// optional bearer token and a JSON body; returns the status code and body.
pub async fn admin_http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (status, _, body) = admin_http_with_headers(port, method, path, token, body).await;
    (status, body)
}

/// [`admin_http`], also with the response's headers (names in lower case).
pub async fn admin_http_with_headers(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin API");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}
