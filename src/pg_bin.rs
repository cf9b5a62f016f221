//! Where PostgreSQL's programs are on this machine, and which major
//! version a program is: for `prepare` (pg_dump, psql) and `demo` (initdb,
//! pg_ctl, postgres).

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Where to look, in order: `first` (`--pg-bin`), every `PATH` entry, each
/// `/usr/lib/postgresql/<major>/bin`, and the PostgreSQL 17 package that
/// `scripts/install-pg17.sh` installs (`$PGSWITCH_PG17_DIR`, else
/// `/opt/pgswitch/pg17`). Each folder once.
pub fn candidate_dirs(first: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = first.map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .collect();
        found.sort();
        dirs.extend(found);
    }
    let pg17 = std::env::var_os("PGSWITCH_PG17_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pgswitch/pg17"));
    dirs.push(pg17.join("package/native/bin"));
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// The major version in a program's `--version` line (`pg_dump
/// (PostgreSQL) 15.18 (Debian ...)` → 15).
pub fn parse_major(version: &str) -> Option<u32> {
    let after = version.split(") ").nth(1)?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The major version `program` reports; `None` when it does not run.
pub fn major_version(program: &Path) -> Option<u32> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_major(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_major_version() {
        assert_eq!(
            super::parse_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)\n"),
            Some(15)
        );
        assert_eq!(super::parse_major("psql (PostgreSQL) 17.2\n"), Some(17));
        assert_eq!(super::parse_major("garbage"), None);
    }
}
