use anyhow::Result;

use clap::{Parser, Subcommand};
use spa_coordinator::admin_cli::{self, CheckpointCommand, DevicesCommand, RoundCommand, Target, TokenCommand};
use spa_model::BackendKind;

/// SPA coordinator: serves the frozen backbone and runs federated personalization rounds.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Compute backend of `serve`: flex, ndarray, cuda. Overrides coordinator.toml's
    /// `[backbone] device`, then BURN_DEVICE (default flex).
    #[arg(long, global = true)]
    device: Option<BackendKind>,
    /// Print each result as one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a coordinator home: config, self-signed CA and server certificate, admin credential.
    Init {
        #[arg(long)]
        home: std::path::PathBuf,
        /// Extra DNS names or IPs for the server certificate (besides localhost, 127.0.0.1).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Serve the backbone and the device/admin services over TLS until SIGTERM or ctrl-c.
    Serve {
        #[arg(long)]
        home: std::path::PathBuf,
        /// What this process does in a deployment (docs/SCALING.md).
        #[arg(long, value_enum, default_value_t)]
        role: spa_coordinator::server::Role,
    },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replace the admin credential with a fresh one (a running coordinator takes it at its
    /// next admin call; the old one stops working).
    RotateCredential {
        #[arg(long)]
        home: std::path::PathBuf,
    },
    /// Issue a new server TLS key and certificate, and a new role certificate, from the
    /// home's CA (devices need nothing new); `serve` uses them from its next start.
    RotateTls {
        #[arg(long)]
        home: std::path::PathBuf,
        /// DNS names or IPs besides localhost and 127.0.0.1 (default: those of the last issue).
        #[arg(long = "name")]
        names: Vec<String>,
    },
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
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `serve` runs for months and gives freed memory back (docs/BENCHMARKS.md, "1000 devices
    // over the service").
    spa_model::alloc::return_freed_memory();
    spa_proto::exit::finish(run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Init { home, names } => admin_cli::run_init(&home, &names, json),
        Command::Serve { home, role } => {
            spa_coordinator::service_main::init_tracing();
            Ok(runtime()?.block_on(spa_coordinator::server::serve(&home, cli.device, role))?)
        }
        Command::RotateCredential { home } => admin_cli::run_rotate_credential(&home, json),
        Command::RotateTls { home, names } => admin_cli::run_rotate_tls(&home, &names, json),
        Command::Token(cmd) => runtime()?.block_on(admin_cli::run_token(cmd, json)),
        Command::Devices(cmd) => runtime()?.block_on(admin_cli::run_devices(cmd, json)),
        Command::Round(cmd) => runtime()?.block_on(admin_cli::run_round(cmd, json)),
        Command::Checkpoint(cmd) => runtime()?.block_on(admin_cli::run_checkpoint(cmd, json)),
        Command::Status { target } => runtime()?.block_on(admin_cli::run_status(target, json)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
