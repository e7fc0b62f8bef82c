use anyhow::Result;

use clap::{Parser, Subcommand};
use spa_coordinator::admin_cli::{self, CheckpointCommand, DevicesCommand, RoundCommand, Target, TokenCommand};
use spa_coordinator::model_cli::{self, ModelCommand};
use spa_model::BackendKind;

/// SPA coordinator: serves the frozen backbone and runs federated personalization rounds.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Compute backend: flex (default), ndarray, cuda. Overrides BURN_DEVICE.
    #[arg(long, global = true)]
    device: Option<BackendKind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Backbone tools: logits, eval, roles, pretrain.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Create a coordinator home: config, self-signed CA and server certificate, admin credential.
    Init {
        #[arg(long)]
        home: std::path::PathBuf,
        /// Extra DNS names or IPs for the server certificate (besides localhost, 127.0.0.1).
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the backbone and the device/admin services over TLS until SIGTERM or ctrl-c.
    Serve {
        #[arg(long)]
        home: std::path::PathBuf,
    },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Federated rounds: start, status, list, abort.
    #[command(subcommand)]
    Round(RoundCommand),
    /// Committed global checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Status of the running coordinator.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    spa_model::alloc::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Model(cmd) => model_cli::run(cmd, cli.device),
        Command::Init { home, names, json } => admin_cli::run_init(&home, &names, json),
        Command::Serve { home } => {
            if let Some(d) = cli.device {
                // SAFETY: set before any thread is started.
                unsafe { std::env::set_var("BURN_DEVICE", d.to_string()) };
            }
            spa_coordinator::service_main::init_tracing();
            Ok(runtime()?.block_on(spa_coordinator::server::serve(&home))?)
        }
        Command::Token(cmd) => runtime()?.block_on(admin_cli::run_token(cmd)),
        Command::Devices(cmd) => runtime()?.block_on(admin_cli::run_devices(cmd)),
        Command::Round(cmd) => runtime()?.block_on(admin_cli::run_round(cmd)),
        Command::Checkpoint(cmd) => runtime()?.block_on(admin_cli::run_checkpoint(cmd)),
        Command::Status { target, json } => runtime()?.block_on(admin_cli::run_status(target, json)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
