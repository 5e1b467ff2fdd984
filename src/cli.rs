//! The command line: `serve`, `sim`, and the operator commands.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::driver::IdentityService;
use crate::server::{self, Endpoint};
use crate::telemetry::{self, LogFormat};

/// Kubernetes CSI driver for Luna Node block-storage volumes.
#[derive(Debug, Parser)]
#[command(name = "lunanode-csi", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LUNANODE_CSI_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (e.g. `info`, `lunanode_csi=debug`); RUST_LOG wins when set.
    #[arg(long, global = true, env = "LUNANODE_CSI_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI gRPC API on a unix socket.
    Serve(ServeArgs),
    /// Run the Luna Node API simulator.
    Sim(crate::sim::SimArgs),
}

/// Which CSI services this process offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity, Controller and Node.
    All,
    /// Identity and Controller (the Deployment).
    Controller,
    /// Identity and Node (the DaemonSet).
    Node,
}

/// `lunanode-csi serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC endpoint: unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Which services to serve.
    #[arg(long, env = "LUNANODE_CSI_MODE", value_enum, default_value = "all")]
    pub mode: Mode,
    /// How long in-flight calls may run after SIGTERM before the process exits.
    #[arg(long, env = "LUNANODE_CSI_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

/// Parse arguments, run the command, and map failures to exit codes: 2 for bad
/// configuration (nothing was started), 1 for a failure while running.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Config(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(CliError::Runtime(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A command's failure: configuration errors exit 2, runtime errors exit 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Sim(args) => crate::sim::run(args)
            .await
            .map_err(|e| CliError::Runtime(e.to_string())),
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let endpoint: Endpoint = args
        .endpoint
        .parse()
        .map_err(|e: server::ServeError| CliError::Config(e.to_string()))?;
    let ready = Arc::new(AtomicBool::new(false));
    let controller = matches!(args.mode, Mode::All | Mode::Controller);
    let identity = IdentityService::new(controller, ready.clone());
    let router = tonic::transport::Server::builder()
        .add_service(crate::csi::identity_server::IdentityServer::new(identity));
    let listener = endpoint
        .bind()
        .map_err(|e| CliError::Config(e.to_string()))?;
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(endpoint = %endpoint.path().display(), mode = ?args.mode, version = crate::VERSION, "serving CSI");
    server::serve(
        router,
        &endpoint,
        listener,
        server::termination_signal(),
        Duration::from_secs(args.shutdown_grace_secs),
    )
    .await
    .map_err(|e| CliError::Runtime(e.to_string()))?;
    tracing::info!("stopped");
    Ok(())
}
