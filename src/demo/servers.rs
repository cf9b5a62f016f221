//! The demo's two PostgreSQL servers: which binaries, initdb, start, stop.
//! When run as root, every server command runs as the `postgres` user
//! (initdb and postgres refuse root) and the folder is given to it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::DemoError;

/// One PostgreSQL installation: a folder with initdb, pg_ctl and postgres.
#[derive(Debug, Clone)]
pub struct Install {
    pub major: u32,
    pub bin: PathBuf,
}

/// Every installation found, one per major version, oldest first.
pub fn find(pg_bin: Option<&Path>) -> Vec<Install> {
    let mut found: Vec<Install> = Vec::new();
    for dir in crate::pg_bin::candidate_dirs(pg_bin) {
        if !["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| dir.join(p).is_file())
        {
            continue;
        }
        let Some(major) = crate::pg_bin::major_version(&dir.join("postgres")) else {
            continue;
        };
        if found.iter().all(|i| i.major != major) {
            found.push(Install { major, bin: dir });
        }
    }
    found.sort_by_key(|i| i.major);
    found
}

/// Whether this process is root (then servers run as `postgres`).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command for a server program, as `postgres` when we are root.
fn server_command(program: &Path) -> std::process::Command {
    if is_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

fn run(mut cmd: std::process::Command, what: &str) -> Result<(), DemoError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DemoError::Server(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DemoError::Server(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Gives the demo's folder to `postgres` when we are root.
pub fn prepare_folder(dir: &Path) -> Result<(), DemoError> {
    if is_root() {
        let mut chown = std::process::Command::new("chown");
        chown.arg("postgres:").arg(dir);
        run(chown, "chown the demo folder to postgres")?;
    }
    Ok(())
}

/// A server of the demo: its data folder, port and binaries.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: &'static str,
    pub install: Install,
    pub data: PathBuf,
    pub port: u16,
}

impl Server {
    /// initdb (superuser `postgres` with `password`, SCRAM over TCP) and a
    /// configuration for logical replication on 127.0.0.1:`port`.
    pub fn create(
        name: &'static str,
        install: &Install,
        dir: &Path,
        port: u16,
        password: &str,
    ) -> Result<Server, DemoError> {
        let data = dir.join(name);
        let pwfile = dir.join(format!("{name}.pw"));
        let io = |e: std::io::Error| DemoError::Server(format!("{name}: {e}"));
        std::fs::write(&pwfile, password).map_err(io)?;
        prepare_folder(&pwfile)?;
        let mut initdb = server_command(&install.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, &format!("initdb {name}"))?;
        let _ = std::fs::remove_file(&pwfile);
        let conf = format!(
            "\n# pgswitch demo\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nwal_level = logical\nmax_wal_senders = 10\n\
             max_replication_slots = 10\nwal_retrieve_retry_interval = '200ms'\n",
            dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io)?;
        Ok(Server {
            name,
            install: install.clone(),
            data,
            port,
        })
    }

    pub fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    pub fn start(&self) -> Result<(), DemoError> {
        let mut pg_ctl = server_command(&self.install.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t", "60", "start"]);
        run(pg_ctl, &format!("start {}", self.name))
    }

    /// Stops the server now (`immediate`: the demo's data is thrown away).
    pub fn stop(&self) {
        let mut pg_ctl = server_command(&self.install.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = pg_ctl.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// The command that stops it, for `--keep`.
    pub fn stop_command(&self) -> String {
        let runuser = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{runuser}{} -D {} stop",
            self.install.bin.join("pg_ctl").display(),
            self.data.display()
        )
    }
}
