//! The pgswitch command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgswitch::app::{self, App};
use pgswitch::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

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
}

fn init_logging(config: &Config) {
    // RUST_LOG, when set, overrides the configured level.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.proxy.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match config.proxy.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(app::AppError::from)
            .and_then(|c| app::TlsSetup::load(&c))
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
            init_logging(&config);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pgswitch: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async move {
                let app = App::new(config, path)?;
                app::run(app).await
            });
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
