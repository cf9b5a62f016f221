//! The pgswitch command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgswitch::config::Config;
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
    /// Hold new transactions at the gate.
    Pause(AdminArgs),
    /// Release held transactions.
    Resume(AdminArgs),
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
}

/// Runs an admin API call and prints the answer; exit 0 only on HTTP 200.
fn admin_call(
    args: &AdminArgs,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgswitch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
    serde_json::json!({"dry_run": args.dry_run, "timeout_ms": args.timeout_ms}).to_string()
}

/// The proxy's runtime: `worker_threads` threads, or one per core.
fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status(args) => admin_call(&args, hyper::Method::GET, "/status", None),
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
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(LoadError::from)
            .and_then(|c| TlsSetup::load(&c))
        {
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
