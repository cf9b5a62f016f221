//! Finding and running the PostgreSQL client programs prepare needs:
//! `pg_dump` and `pg_dumpall` (the newest whose major version is at least
//! blue's server version: an older pg_dump refuses a newer server, a newer
//! one dumps what the restore on green understands), `pg_restore` beside
//! them for the data, and `psql` to restore the schema (the dumps hold psql
//! meta-commands, `\restrict` since 15.14/17.6) and to hold the slot's
//! exported snapshot ([`super::copy`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::PrepareError;
use crate::config::{BackendConfig, ServerTlsMode, Side};

/// The programs found, with their major versions.
#[derive(Debug, Clone, Serialize)]
pub struct Tools {
    pub pg_dump: PathBuf,
    pub pg_dumpall: PathBuf,
    pub pg_restore: PathBuf,
    pub psql: PathBuf,
    /// Major version of pg_dump and pg_dumpall (the same folder).
    pub dump_major: u32,
}

use crate::pg_bin::candidate_dirs;

/// The major version a PostgreSQL program reports (off the executor: it
/// runs the program); `None` when it does not run.
async fn major_version(program: &Path) -> Option<u32> {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || crate::pg_bin::major_version(&program))
        .await
        .ok()
        .flatten()
}

/// The newest pg_dump (with a pg_dumpall and a pg_restore beside it) of major version at
/// least `server_major`, and a psql (beside it when there is one).
pub async fn find(pg_bin: Option<&Path>, server_major: u32) -> Result<Tools, PrepareError> {
    let mut best: Option<(u32, PathBuf)> = None;
    let mut seen = Vec::new();
    let dirs = candidate_dirs(pg_bin);
    for dir in &dirs {
        let pg_dump = dir.join("pg_dump");
        if !pg_dump.is_file()
            || !dir.join("pg_dumpall").is_file()
            || !dir.join("pg_restore").is_file()
        {
            continue;
        }
        let Some(major) = major_version(&pg_dump).await else {
            continue;
        };
        seen.push(format!("{} ({major})", pg_dump.display()));
        if major >= server_major && best.as_ref().is_none_or(|(m, _)| major > *m) {
            best = Some((major, dir.clone()));
        }
    }
    let Some((dump_major, dir)) = best else {
        return Err(PrepareError::NoPgDump {
            server_major,
            found: if seen.is_empty() {
                "none".into()
            } else {
                seen.join(", ")
            },
        });
    };
    let psql = std::iter::once(dir.clone())
        .chain(dirs)
        .map(|d| d.join("psql"))
        .find(|p| p.is_file())
        .ok_or(PrepareError::NoPsql)?;
    Ok(Tools {
        pg_dump: dir.join("pg_dump"),
        pg_dumpall: dir.join("pg_dumpall"),
        pg_restore: dir.join("pg_restore"),
        psql,
        dump_major,
    })
}

/// The `application_name` of every session prepare's programs open: a
/// re-run ends those a killed run left behind ([`super::copy::end_leftovers`])
/// before it writes, so that an orphaned pg_restore cannot go on writing
/// into tables the re-run has truncated.
pub const APPLICATION_NAME: &str = "pgswitch prepare";

/// How a program reaches one side: libpq's environment variables, so that
/// no password appears in a command line (`ps` shows those to everyone).
#[derive(Debug, Clone)]
pub struct Target {
    pub side: Side,
    env: Vec<(&'static str, String)>,
}

impl Target {
    pub fn new(side: Side, backend: &BackendConfig, database: &str) -> Target {
        let (user, password) = backend.admin_credentials().unwrap_or_default();
        let mut env = vec![
            ("PGHOST", backend.host.clone()),
            ("PGPORT", backend.port.to_string()),
            ("PGUSER", user),
            ("PGDATABASE", database.to_owned()),
            ("PGSSLMODE", backend.server_tls.to_string()),
            ("PGAPPNAME", APPLICATION_NAME.to_owned()),
            ("PGCONNECT_TIMEOUT", "10".to_owned()),
            ("PGOPTIONS", "-c synchronous_commit=on".to_owned()),
        ];
        if !password.is_empty() {
            env.push(("PGPASSWORD", password));
        }
        if let (Some(ca), ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) =
            (&backend.server_tls_ca, backend.server_tls)
        {
            env.push(("PGSSLROOTCERT", ca.display().to_string()));
        }
        Target { side, env }
    }

    /// The same with `-c setting=value` added to the session's options.
    pub fn with_option(&self, setting: &str, value: &str) -> Target {
        let mut t = self.clone();
        for (k, v) in &mut t.env {
            if *k == "PGOPTIONS" {
                v.push_str(&format!(" -c {setting}={value}"));
            }
        }
        t
    }

    /// A `Command` for `program` reaching this side (environment only).
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_remove("PGSERVICE")
            .env_remove("PGPASSWORD")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        cmd
    }
}

/// A libpq connection string naming only the database (the rest comes from
/// the environment), so that a database name with `=` or spaces is not
/// taken for a connection string of its own.
pub fn dbname_conninfo(database: &str) -> String {
    format!(
        "dbname='{}'",
        database.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// The name of a program, for errors.
pub fn program_name(program: &Path) -> String {
    program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The last lines of a program's stderr, passwords redacted.
pub fn stderr_tail(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    crate::logging::redact(&tail.join("\n")).into_owned()
}

/// Runs `script` with psql on `target` in one transaction that stops at
/// the first error: all of it or nothing.
pub async fn psql_script(
    tools: &Tools,
    target: &Target,
    script: &[u8],
) -> Result<(), PrepareError> {
    let args = [
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "-f",
        "-",
    ];
    run(&tools.psql, &args, target, Some(script))
        .await
        .map(|_| ())
}

/// Runs `program args` against `target`, feeding `input` on stdin; its
/// stdout, or [`PrepareError::Tool`] with the end of its stderr.
pub async fn run(
    program: &Path,
    args: &[&str],
    target: &Target,
    input: Option<&[u8]>,
) -> Result<Vec<u8>, PrepareError> {
    let name = program_name(program);
    let mut cmd = target.command(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let failed = |message: String| PrepareError::Tool {
        tool: name.clone(),
        side: target.side,
        message,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot start {}: {e}", program.display())))?;
    let writer = child.stdin.take();
    let feed = async move {
        if let (Some(mut stdin), Some(input)) = (writer, input) {
            // A program that stops reading (it failed) closes the pipe: its
            // exit status and stderr say why, not this write.
            let _ = stdin.write_all(input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let (_, out) = tokio::join!(feed, child.wait_with_output());
    let out = out.map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(failed(format!(
        "{}: {}",
        out.status,
        stderr_tail(&out.stderr)
    )))
}

#[cfg(test)]
mod tests {

    #[test]
    fn quotes_the_database_name() {
        assert_eq!(super::dbname_conninfo("app"), "dbname='app'");
        assert_eq!(super::dbname_conninfo(r"a'b\c"), r"dbname='a\'b\\c'");
    }
}
