//! The pgswitch command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgswitch::config::{Config, Side};
use pgswitch::data_plane::{LoadError, TlsSetup};
use pgswitch::runtime::Runtime;

#[derive(Parser)]
#[command(
    name = "pgswitch",
    version,
    about = "PostgreSQL proxy for zero-downtime blue/green cutovers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A blue/green upgrade on this machine, start to end: two throwaway
    /// servers, prepare, pgswitch with its dashboard, a workload, a cutover,
    /// verify, a fallback, verify; everything removed at the end.
    Demo {
        /// Leave everything running and print how to reach it.
        #[arg(long)]
        keep: bool,
        /// A folder searched first for initdb, pg_ctl and postgres.
        #[arg(long)]
        pg_bin: Option<PathBuf>,
        /// Client sessions of the workload.
        #[arg(long, default_value_t = 8)]
        clients: usize,
    },
    /// Run the proxy.
    Run {
        /// Path to proxy.toml.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Show the active side, the gate, replication lag and pools.
    Status(AdminArgs),
    /// Switch traffic from blue to green.
    Cutover(SwitchArgs),
    /// Switch traffic back from green to blue.
    Fallback(SwitchArgs),
    /// The cutovers and fallbacks since pgswitch started.
    History(AdminArgs),
    /// Read the configuration file again (as SIGHUP does).
    Reload(AdminArgs),
    /// Hold new transactions at the gate.
    Pause(AdminArgs),
    /// Release held transactions.
    Resume(AdminArgs),
    /// After the fallback window: drop the replication between blue and
    /// green (subscriptions, slots, publications, origins) and lift
    /// pgswitch's fences, through the running pgswitch.
    Decommission {
        #[command(flatten)]
        admin: AdminArgs,
        /// Go ahead while the old side is still the fallback target.
        #[arg(long)]
        force: bool,
    },
    /// Is the pair ready for a cutover? Checks both servers (read-only);
    /// exits non-zero when a check fails.
    Check {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build green from blue: roles, schema, publication and subscription,
    /// then follow the initial copy to its end. Safe to re-run; exits
    /// non-zero when something is wrong.
    Prepare {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the report as JSON (progress goes to stderr as JSON lines).
        #[arg(long)]
        json: bool,
        /// A folder searched first for pg_dump, pg_dumpall and psql.
        #[arg(long)]
        pg_bin: Option<PathBuf>,
        /// Stop following the initial copy after this long (e.g. "30m");
        /// the copy goes on in the servers, a re-run follows it.
        #[arg(long)]
        timeout: Option<humantime::Duration>,
        /// Set REPLICA IDENTITY FULL on blue's tables that have neither a
        /// primary key nor a replica identity, instead of refusing.
        #[arg(long)]
        replica_identity_full: bool,
    },
    /// Do blue and green hold the same data? Row counts and checksums per
    /// primary-key chunk, computed in both databases at once; exits 1 when a
    /// table differs (2 when the comparison could not run).
    Verify {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Only these tables (schema.table, comma-separated).
        #[arg(long, value_delimiter = ',')]
        tables: Option<Vec<String>>,
        /// About this many rows per chunk (one statement each).
        #[arg(long, default_value_t = 100_000)]
        chunk_rows: u64,
        /// Chunks compared at once, each on its own connection to each side.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// With pgswitch stopped: bring both servers to the state file's answer
    /// (undo a switch a crash interrupted), or make --active the active side.
    Recover {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Make this side active, whatever the state file says (when
        /// pgswitch refused to start because the servers contradict it).
        #[arg(long, value_parser = ["blue", "green"])]
        active: Option<String>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API.
    #[arg(long, default_value = "http://127.0.0.1:9930", env = "PGSWITCH_ADMIN")]
    admin: String,
    /// Bearer token ([admin] token).
    #[arg(long, env = "PGSWITCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SwitchArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Go through preflight, pause, drain and catch-up, then resume on the
    /// current side: how long would the pause be?
    #[arg(long)]
    dry_run: bool,
    /// Overrides [cutover] timeout, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Go ahead although this preflight check failed (the name `pgswitch
    /// check` shows, e.g. replica_identity); repeat for several.
    #[arg(long, value_name = "CHECK")]
    force: Vec<String>,
}

/// The single-threaded runtime a command (not `run`) works in; `None`
/// after saying why it could not start.
fn command_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("pgswitch: cannot start the runtime: {e}");
            None
        }
    }
}

/// Runs an admin API call and prints the answer; exit 0 only on HTTP 200.
fn admin_call(
    args: &AdminArgs,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> ExitCode {
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(pgswitch::admin::client::call(
        &args.admin,
        args.token.as_deref(),
        method,
        path,
        body,
    ));
    match result {
        Ok((status, body)) => {
            match (args.json, serde_json::from_str::<serde_json::Value>(&body)) {
                (false, Ok(value)) => print!("{}", pgswitch::admin::client::render(&value)),
                _ => println!("{body}"),
            }
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                if status == 401 {
                    eprintln!("pgswitch: unauthorized: pass --token or set PGSWITCH_TOKEN");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pgswitch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn switch_body(args: &SwitchArgs) -> String {
    serde_json::json!({"dry_run": args.dry_run, "timeout_ms": args.timeout_ms, "force": args.force})
        .to_string()
}

/// Makes memory freed after a long message go back to the system.
///
/// glibc's malloc serves allocations of 128 KiB and more with their own
/// mapping, returned at once when freed, but it raises that threshold to the
/// size of each such block freed (up to 32 MiB). After the first long message,
/// the buffers and statement texts of the next ones come from its heaps, where
/// freed memory mostly stays resident: an idle proxy would keep the memory of
/// its busiest moment. Setting the threshold (to its default) turns that off.
/// Nothing on the common path allocates that much at a time.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_freed_memory_to_the_system() {
    use std::ffi::c_int;
    const M_MMAP_THRESHOLD: c_int = -3;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is
    // called once, before any other thread exists.
    let done = unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
    if done != 1 {
        eprintln!("pgswitch: warning: could not set malloc's mmap threshold");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_memory_to_the_system() {}

/// The proxy's runtime: `worker_threads` threads, or one per core.
fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
}

/// `pgswitch check-config`: the file, its TLS files, and that the state
/// file can be written where it is configured.
fn check_config(path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path)
        .map_err(LoadError::from)
        .map_err(|e| e.to_string())?;
    TlsSetup::load(&config).map_err(|e| e.to_string())?;
    if let Some(state_file) = &config.cutover.state_file {
        pgswitch::state::check_writable(state_file).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The shape of `check`, `prepare` and `verify`: load the config, run on a
/// small runtime, print the report (JSON or text) and exit with what
/// `outcome` says of it; `cannot_run` when there is no report.
fn report_command<R: serde::Serialize>(
    path: &std::path::Path,
    json: bool,
    cannot_run: u8,
    run: impl AsyncFnOnce(&Config) -> Result<R, String>,
    render: impl Fn(&R) -> String,
    outcome: impl Fn(&R) -> ExitCode,
) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgswitch: {e}");
            return ExitCode::from(cannot_run);
        }
    };
    let Some(runtime) = command_runtime() else {
        return ExitCode::from(cannot_run);
    };
    match runtime.block_on(run(&config)) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", render(&report));
            }
            outcome(&report)
        }
        Err(e) => {
            eprintln!("pgswitch: {e}");
            ExitCode::from(cannot_run)
        }
    }
}

fn success_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `pgswitch check`: the report, and exit 1 when a check fails.
fn check(path: &std::path::Path, json: bool) -> ExitCode {
    report_command(
        path,
        json,
        1,
        async |config| {
            pgswitch::check::run(config, &pgswitch::check::OwnSessions::default())
                .await
                .map_err(|e| e.to_string())
        },
        pgswitch::check::Report::render,
        |report| success_if(report.level() != pgswitch::check::Level::Fail),
    )
}

/// `pgswitch prepare`: the report, and exit 1 when something failed.
fn prepare(path: &std::path::Path, json: bool, options: pgswitch::prepare::Options) -> ExitCode {
    report_command(
        path,
        json,
        1,
        async |config| {
            let mut display = pgswitch::prepare::Display::new(json);
            Ok(pgswitch::prepare::run(config, &options, &mut display).await)
        },
        pgswitch::prepare::Report::render,
        |report| {
            if let (true, Some(e)) = (json, &report.error) {
                eprintln!("pgswitch: {e}");
            }
            success_if(report.ok)
        },
    )
}

/// `pgswitch verify`: the report; exit 1 when a table differs, 2 when the
/// comparison could not run.
fn verify(path: &std::path::Path, json: bool, options: pgswitch::verify::Options) -> ExitCode {
    report_command(
        path,
        json,
        2,
        async |config| {
            pgswitch::verify::run(config, &options)
                .await
                .map_err(|e| format!("verify: {e}"))
        },
        pgswitch::verify::Report::render,
        |report| success_if(report.equal),
    )
}

/// `pgswitch demo`: exit 0 when both switches went through with no client
/// error and no row lost.
fn demo(options: pgswitch::demo::Options) -> ExitCode {
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(pgswitch::demo::run(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(pgswitch::demo::DemoError::Interrupted) => {
            eprintln!("pgswitch demo: interrupted; removed what it made");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("pgswitch demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pgswitch recover`: one reconcile against both servers, offline.
fn recover(path: &std::path::Path, active: Option<&str>) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("pgswitch: {e}");
        ExitCode::FAILURE
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let force = active.map(|a| {
        if a == "green" {
            Side::Green
        } else {
            Side::Blue
        }
    });
    let Some(runtime) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let recovery = match pgswitch::cutover::Recovery::open(&config) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let before = recovery.controller.persisted();
        if let Some(intent) = &before.intent {
            println!(
                "unfinished {} {} -> {} (started at unix ms {}): undoing it",
                intent.kind, intent.from, intent.to, intent.started_at_ms
            );
        }
        match recovery.controller.recover(&config, force).await {
            Ok(changes) => {
                for change in &changes {
                    println!("  {change}");
                }
                if changes.is_empty() {
                    println!("  nothing to change");
                }
                println!("{} is active", recovery.controller.persisted().active);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status(args) => admin_call(&args, hyper::Method::GET, "/status", None),
        Command::History(args) => admin_call(&args, hyper::Method::GET, "/cutovers", None),
        Command::Reload(args) => admin_call(&args, hyper::Method::POST, "/reload", None),
        Command::Pause(args) => admin_call(&args, hyper::Method::POST, "/pause", None),
        Command::Resume(args) => admin_call(&args, hyper::Method::POST, "/resume", None),
        Command::Cutover(args) => admin_call(
            &args.admin,
            hyper::Method::POST,
            "/cutover",
            Some(switch_body(&args)),
        ),
        Command::Fallback(args) => admin_call(
            &args.admin,
            hyper::Method::POST,
            "/fallback",
            Some(switch_body(&args)),
        ),
        Command::Decommission { admin, force } => admin_call(
            &admin,
            hyper::Method::POST,
            "/decommission",
            Some(serde_json::json!({ "force": force }).to_string()),
        ),
        Command::Demo {
            keep,
            pg_bin,
            clients,
        } => demo(pgswitch::demo::Options {
            keep,
            pg_bin,
            clients,
        }),
        Command::Recover { config, active } => recover(&config, active.as_deref()),
        Command::Check { config, json } => check(&config, json),
        Command::Prepare {
            config,
            json,
            pg_bin,
            timeout,
            replica_identity_full,
        } => prepare(
            &config,
            json,
            pgswitch::prepare::Options {
                pg_bin,
                timeout: timeout.map(Into::into),
                replica_identity_full,
            },
        ),
        Command::Verify {
            config,
            json,
            tables,
            chunk_rows,
            jobs,
        } => verify(
            &config,
            json,
            pgswitch::verify::Options {
                tables,
                chunk_rows,
                jobs,
            },
        ),
        Command::CheckConfig { config } => match check_config(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pgswitch: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            return_freed_memory_to_the_system();
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pgswitch: {e}");
                    return ExitCode::FAILURE;
                }
            };
            pgswitch::logging::init(&config);
            let runtime = match runtime_builder(config.proxy.worker_threads).build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pgswitch: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async move { Runtime::new(config, path)?.run().await });
            // Don't wait for sessions still draining past shutdown_timeout.
            runtime.shutdown_background();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "pgswitch failed");
                    eprintln!("pgswitch: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
