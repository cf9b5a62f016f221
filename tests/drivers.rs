//! The driver matrix: real drivers through a real pgswitch, in transaction
//! and session mode. One test per driver and mode; each runs the driver's own
//! program under `tests/drivers/` (its contract: `tests/drivers/README.md`)
//! and fails if any scenario fails or is missing.
//!
//! A libtest-mimic harness, so a missing prerequisite can be decided when the
//! tests are listed: outside CI such a test is ignored with the reason (it
//! shows in nextest's skipped count); under `CI=true` it runs and fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use support::*;

/// Every program runs these, in this order.
const SCENARIOS: &[&str] = &[
    "simple_query",
    "prepared_default",
    "prepared_forced",
    "same_name_different_text",
    "transactions",
    "error_then_rollback",
    "savepoints",
    "startup_params",
    "copy",
    "cancel",
    "server_error",
    "alter_table_reprepare",
];

const POOL_SIZE: usize = 2;
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(180);

/// One driver: how to run its program and what it needs.
struct Driver {
    name: &'static str,
    /// Directory under `tests/drivers/`.
    dir: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    /// What must be installed, checked before the test runs.
    prerequisite: fn() -> Result<(), String>,
}

const DRIVERS: &[Driver] = &[
    Driver {
        name: "pgjdbc",
        dir: "java",
        program: "java",
        args: &["-cp", PGJDBC_JAR, "DriverMatrix.java", "default"],
        prerequisite: pgjdbc_installed,
    },
    Driver {
        name: "pgjdbc_prepare_threshold_1",
        dir: "java",
        program: "java",
        args: &["-cp", PGJDBC_JAR, "DriverMatrix.java", "threshold1"],
        prerequisite: pgjdbc_installed,
    },
    Driver {
        name: "node_postgres",
        dir: "node",
        program: "node",
        args: &["pg.mjs"],
        prerequisite: || node_modules(&["pg", "pg-copy-streams"]),
    },
    Driver {
        name: "postgres_js",
        dir: "node",
        program: "node",
        args: &["postgresjs.mjs"],
        prerequisite: || node_modules(&["postgres"]),
    },
    Driver {
        name: "psycopg3",
        dir: "python",
        program: "python3",
        args: &["psycopg3.py"],
        prerequisite: || python_module("psycopg"),
    },
    Driver {
        name: "asyncpg",
        dir: "python",
        program: "python3",
        args: &["asyncpg_matrix.py"],
        prerequisite: || python_module("asyncpg"),
    },
    Driver {
        name: "psycopg2",
        dir: "python",
        program: "python3",
        args: &["psycopg2_matrix.py"],
        prerequisite: || python_module("psycopg2"),
    },
    Driver {
        name: "libpq",
        dir: "libpq",
        program: "python3",
        args: &["libpq.py"],
        prerequisite: libpq_tools,
    },
];

const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn main() {
    let args = Arguments::from_args();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let mut trials = Vec::new();
    for driver in DRIVERS {
        let missing = (driver.prerequisite)().err();
        for mode in ["transaction", "session"] {
            let name = format!("{}::{mode}", driver.name);
            let ignored = !in_ci && missing.is_some();
            let missing = missing.clone();
            let trial = Trial::test(name, move || run_driver(driver, mode, missing));
            // Decided at listing time, so nextest reports it as skipped.
            trials.push(trial.with_ignored_flag(ignored));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}

fn run_driver(driver: &Driver, mode: &str, missing: Option<String>) -> Result<(), Failed> {
    if let Some(why) = missing {
        return Err(format!(
            "{}: {why}; install the test prerequisites with `bash scripts/test-deps.sh`",
            driver.name
        )
        .into());
    }
    let pg = pg_with_app(PgOptions::default(), None);
    pg.psql("ALTER ROLE app SUPERUSER");
    let proxy = Proxy::start(&proxy_config(pg.port, mode));
    let dir = drivers_dir().join(driver.dir);
    let mut child = Command::new(driver.program)
        .args(driver.args)
        .current_dir(&dir)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.port.to_string())
        .env("PGUSER", "app")
        .env("PGPASSWORD", "secret")
        .env("PGDATABASE", "postgres")
        .env("DIRECT_PORT", pg.port.to_string())
        .env("POOL_MODE", mode)
        .env("POOL_SIZE", POOL_SIZE.to_string())
        .env("CLIENTS", (2 * POOL_SIZE).to_string())
        .env(
            "SCENARIOS",
            std::env::var("PGSWITCH_DRIVER_SCENARIOS").unwrap_or_default(),
        )
        .env_remove("PGSSLMODE")
        .env_remove("PGOPTIONS")
        .env_remove("PGAPPNAME")
        .env_remove("PGTZ")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {} in {}: {e}", driver.program, dir.display()))?;
    let started = Instant::now();
    let output = loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break child.wait_with_output().map_err(|e| e.to_string())?;
        }
        if started.elapsed() > PROGRAM_TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "{} did not finish in {PROGRAM_TIMEOUT:?}\n{}\n---- proxy log ----\n{}",
                driver.name,
                render(&out),
                proxy.logs()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let verdict = Verdict::read(&stdout, &selected_scenarios());
    println!(
        "matrix: {} {mode}: {} of {} scenarios passed in {:.1} s",
        driver.name,
        verdict.passed.len(),
        verdict.expected,
        started.elapsed().as_secs_f64()
    );
    if verdict.is_pass() && output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} in {mode} mode: failed {:?}, missing {:?}, exit {}\n{}\n---- proxy log (tail) ----\n{}",
        driver.name,
        verdict.failed,
        verdict.missing,
        output.status,
        render(&output),
        file_tail(&proxy.log_path(), 60)
    )
    .into())
}

/// What a program's `RESULT` lines say.
#[derive(Debug)]
struct Verdict {
    expected: usize,
    passed: Vec<String>,
    failed: Vec<String>,
    missing: Vec<String>,
}

impl Verdict {
    fn read(stdout: &str, expected: &[String]) -> Verdict {
        let mut passed = Vec::new();
        let mut failed = Vec::new();
        for line in stdout.lines() {
            let mut words = line.splitn(4, ' ');
            if words.next() != Some("RESULT") {
                continue;
            }
            let scenario = words.next().unwrap_or_default().to_owned();
            match words.next() {
                Some("PASS") => passed.push(scenario),
                _ => failed.push(format!("{scenario}: {}", words.next().unwrap_or(""))),
            }
        }
        let missing = expected
            .iter()
            .filter(|s| {
                !passed.contains(s) && !failed.iter().any(|f| f.starts_with(&format!("{s}:")))
            })
            .cloned()
            .collect();
        Verdict {
            expected: expected.len(),
            passed,
            failed,
            missing,
        }
    }

    fn is_pass(&self) -> bool {
        self.failed.is_empty() && self.missing.is_empty()
    }
}

fn selected_scenarios() -> Vec<String> {
    match std::env::var("PGSWITCH_DRIVER_SCENARIOS") {
        Ok(list) if !list.is_empty() => list.split(',').map(str::to_owned).collect(),
        _ => SCENARIOS.iter().map(|s| s.to_string()).collect(),
    }
}

fn proxy_config(pg_port: u16, mode: &str) -> String {
    ProxyConfig::new(pg_port)
        .pool_mode(mode)
        .pool_size(POOL_SIZE)
        .set("query_wait_timeout", "60s")
        .app_user()
        .toml()
}

fn render(out: &std::process::Output) -> String {
    format!(
        "---- stdout ----\n{}\n---- stderr ----\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

fn succeeds(program: &str, args: &[&str], dir: &Path) -> bool {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pgjdbc_installed() -> Result<(), String> {
    if !succeeds("java", &["-version"], Path::new("/")) {
        return Err("java is not installed".into());
    }
    if !Path::new(PGJDBC_JAR).exists() {
        return Err(format!(
            "{PGJDBC_JAR} is missing (Debian: libpostgresql-jdbc-java)"
        ));
    }
    Ok(())
}

fn node_modules(names: &[&str]) -> Result<(), String> {
    let dir = drivers_dir().join("node");
    for name in names {
        let script = format!("require.resolve('{name}')");
        if !succeeds("node", &["-e", &script], &dir) {
            return Err(format!(
                "the npm package {name} is not installed in tests/drivers/node (npm ci)"
            ));
        }
    }
    Ok(())
}

fn python_module(name: &str) -> Result<(), String> {
    if succeeds(
        "python3",
        &["-c", &format!("import {name}")],
        Path::new("/"),
    ) {
        Ok(())
    } else {
        Err(format!(
            "the Python module {name} is not installed (pip install -r tests/drivers/python/requirements.txt)"
        ))
    }
}

fn libpq_tools() -> Result<(), String> {
    for tool in [psql_bin(), pgbench_bin()] {
        if !tool.exists() {
            return Err(format!(
                "{} is missing (Debian: postgresql-client-15)",
                tool.display()
            ));
        }
    }
    Ok(())
}
