//! The `pgswitch` binary under test.
use super::*;

use std::fs;
use std::process::ExitStatus;
use std::time::Instant;

/// A running `pgswitch run --config <file>` process.
///
/// stdout and stderr go to `dir/proxy.log`. `RUST_LOG` is passed through
/// from the test environment, defaulting to `info` (or set per proxy with
/// [`start_with_env`](Self::start_with_env)). Dropping it kills the
/// process (SIGKILL) and deletes `dir`; if the test is panicking the log tail
/// is printed to stderr first.
pub struct Proxy {
    /// Listen port (from `listen = "127.0.0.1:PORT"` in `[proxy]`).
    pub port: u16,
    /// Admin API port (from `[admin] listen`, or a free port the harness added).
    pub admin_port: u16,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Extra environment of the process, applied at every (re)start.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    reaper: Option<Child>,
}

impl Proxy {
    /// Writes `config_toml` to a temp file, starts the proxy and waits (≤10 s)
    /// until its listen port accepts TCP connections. The port is parsed
    /// from `listen = "127.0.0.1:PORT"` in the `[proxy]` table. Panics (with
    /// the proxy log) if it exits or doesn't listen in time.
    pub fn start(config_toml: &str) -> Proxy {
        let port = parse_listen_port(config_toml).unwrap_or_else(|| {
            panic!(
                "Proxy::start: no `listen = \"127.0.0.1:PORT\"` in the [proxy] table; \
                 use Proxy::start_with_port\n{config_toml}"
            )
        });
        Self::start_with_port(config_toml, port)
    }

    /// Like [`start`](Self::start), with extra environment variables for the
    /// process (e.g. `RUST_LOG`, which then wins over the test's own).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Proxy {
        let port = parse_listen_port(config_toml).expect("`listen` in [proxy]");
        let mut p = Self::unstarted(config_toml, port);
        p.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.spawn_process();
        if let Err(e) = p.wait_ready(Duration::from_secs(10)) {
            panic!("{e}\n---- proxy log ----\n{}\n----", p.logs());
        }
        p
    }

    /// Like [`start`](Self::start) but waits for the given port.
    pub fn start_with_port(config_toml: &str, port: u16) -> Proxy {
        let mut p = Self::spawn_with_port(config_toml, port);
        if let Err(e) = p.wait_ready(Duration::from_secs(10)) {
            panic!("{e}\n---- proxy log ----\n{}\n----", p.logs());
        }
        p
    }

    /// Starts the proxy without waiting for it to listen (for tests of
    /// startup failures: combine with [`wait_exit`](Self::wait_exit)).
    /// `port` is 0 if the config has no parsable `[proxy] listen`.
    pub fn spawn(config_toml: &str) -> Proxy {
        Self::spawn_with_port(config_toml, parse_listen_port(config_toml).unwrap_or(0))
    }

    pub fn spawn_with_port(config_toml: &str, port: u16) -> Proxy {
        let mut p = Self::unstarted(config_toml, port);
        p.spawn_process();
        p
    }

    /// The proxy's directory and config file, without a process yet.
    fn unstarted(config_toml: &str, port: u16) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("pgswitch-proxy-")
            .tempdir_in(test_tmp_base())
            .expect("create proxy temp dir")
            .keep();
        let config_path = dir.join("pgswitch.toml");
        let (config_toml, admin_port) = with_admin_listen(config_toml, None);
        fs::write(&config_path, config_toml).expect("write proxy config");
        Proxy {
            port,
            admin_port,
            dir,
            config_path,
            env: Vec::new(),
            child: None,
            exit: None,
            reaper: None,
        }
    }

    fn spawn_process(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open proxy log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgswitch"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().expect("spawn pgswitch");
        self.reaper = spawn_reaper(
            child.id(),
            SIGKILL,
            if keep_dirs() { None } else { Some(&self.dir) },
        );
        self.child = Some(child);
        self.exit = None;
    }

    /// Waits until the listen port accepts connections. Errors if the
    /// process exits or the timeout elapses.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Err(format!("pgswitch exited during startup: {st}"));
            }
            if self.port != 0 && wait_for_port(self.port, Duration::ZERO) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pgswitch did not listen on 127.0.0.1:{} within {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("proxy.log")
    }

    /// Everything the proxy wrote to stdout/stderr so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Polls `logs()` until it contains `needle` (true) or timeout (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends signal `sig` (e.g. [`SIGHUP`], [`SIGTERM`]) to the proxy.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            if self.exit.is_none() {
                send_signal(pid, sig);
            }
        }
    }

    /// Replaces the config file contents (then e.g. `signal(SIGHUP)`).
    pub fn rewrite_config(&self, config_toml: &str) {
        let tmp = self.dir.join("pgswitch.toml.new");
        let (config_toml, _) = with_admin_listen(config_toml, Some(self.admin_port));
        fs::write(&tmp, config_toml).expect("write proxy config");
        fs::rename(&tmp, &self.config_path).expect("rename proxy config");
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.exit = Some(st);
                    stop_reaper(&mut self.reaper);
                }
            }
        }
        self.exit
    }

    /// Exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.try_wait()
    }

    /// Waits up to `timeout` for the proxy to exit; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills (SIGKILL) and starts the proxy again with the current config
    /// file, waiting for it to listen.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_process();
        if let Err(e) = self.wait_ready(Duration::from_secs(10)) {
            panic!("{e}\n---- proxy log ----\n{}\n----", self.logs());
        }
    }

    /// Kills (SIGKILL) and starts the proxy again without waiting for it to
    /// listen (for a start that must fail: combine with `wait_exit`).
    pub fn restart_unready(&mut self) {
        self.kill();
        self.spawn_process();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        stop_reaper(&mut self.reaper);
        if let Some(c) = self.child.as_mut() {
            if self.exit.is_none() {
                let _ = c.kill();
                self.exit = c.wait().ok();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- pgswitch proxy (port {}) log tail ----\n{}\n----",
                self.port,
                file_tail(&self.log_path(), 80)
            );
        }
        if keep_dirs() {
            eprintln!("support: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Gives every proxy its own admin API port (the default, 9930, would clash
/// between tests running in parallel): a config without an `[admin]` table gets
/// one listening on `port` or a free port. Returns the config and the port.
pub fn with_admin_listen(toml: &str, port: Option<u16>) -> (String, u16) {
    if let Some(existing) = toml
        .find("[admin]")
        .and_then(|at| parse_listen_port(&toml[at..].replacen("[admin]", "[proxy]", 1)))
    {
        return (toml.to_owned(), existing);
    }
    if toml.contains("[admin]") {
        return (toml.to_owned(), 9930);
    }
    let port = port.unwrap_or_else(free_port);
    (
        format!("{toml}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
        port,
    )
}

/// Port of `listen = "HOST:PORT"` in the `[proxy]` table of a TOML string.
pub fn parse_listen_port(toml: &str) -> Option<u16> {
    let mut in_proxy = false;
    for line in toml.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_proxy = line.trim_start_matches('[').trim_end_matches(']').trim() == "proxy";
            continue;
        }
        if !in_proxy {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == "listen" {
                let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
                return v.rsplit(':').next()?.parse().ok();
            }
        }
    }
    None
}
