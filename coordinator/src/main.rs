use anyhow::Result;

// glibc malloc hands large tensor buffers back to the kernel and page-faults them in again on
// every op; mimalloc keeps them (pretraining throughput, docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model(cmd) => model_cli::run(cmd, cli.device),
    }
}
