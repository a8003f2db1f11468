//! `nat-agent`: the XDP NAT appliance's daemon and CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use nat_agent::{daemon, load_config};

/// XDP-accelerated NAT appliance agent.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, attach the XDP program and run until SIGTERM/SIGINT.
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file without touching the kernel.
    Check {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
}

/// Exit code for a config that does not validate (nothing was changed).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_config(&config) {
            Ok((model, _)) => {
                println!(
                    "{}: OK ({} dnat rules, {} interfaces)",
                    config.display(),
                    model.dnat.len(),
                    model.interfaces.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e.0),
        },
        Command::Run { config } => {
            init_tracing();
            let (model, compiled) = match load_config(&config) {
                Ok(loaded) => loaded,
                Err(e) => return config_error(&e.0),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(&config, model, compiled)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(message: &str) -> ExitCode {
    for line in message.lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_CONFIG)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NAT_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // `init` also bridges the `log` crate (aya-log's output) into tracing.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
