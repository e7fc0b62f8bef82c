//! `round start | status | list | abort` and `checkpoint export`: the verbs of federated
//! rounds and their committed versions.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use spa_aggregation::strategy::StrategyName;
use spa_proto::v1::*;

use super::{Target, admin_client, emit, status_err, with_admin};
use crate::rounds::RoundRecord;

#[derive(Serialize)]
struct RunQueued {
    run_id: u64,
}

#[derive(Serialize)]
struct AbortOutcome {
    round_id: u64,
    was_running: bool,
}

#[derive(Serialize)]
struct Exported {
    version: u64,
    tensors: usize,
    parameters: usize,
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum RoundCommand {
    /// Queue a run of federated rounds over the enrolled, online devices.
    Start {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Fewest devices that must contribute (the round aborts below this).
        #[arg(long, default_value_t = 3)]
        min_clients: u32,
        /// Most devices selected per round.
        #[arg(long, default_value_t = 100)]
        max_clients: u32,
        /// Seconds for selection and for local training (each).
        #[arg(long, default_value_t = 300)]
        deadline: u32,
        #[arg(long, default_value_t = 1)]
        local_epochs: u32,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        /// fedavg | fedprox | fedadam | fedyogi | fedadagrad
        #[arg(long, default_value = "fedavg")]
        strategy: StrategyName,
        /// FedProx's proximal weight (with --strategy fedprox).
        #[arg(long, default_value_t = 0.01)]
        prox_mu: f64,
        #[command(flatten)]
        dp: DpArgs,
    },
    /// One round (default: the latest).
    Status {
        #[command(flatten)]
        target: Target,
        id: Option<u64>,
        /// Print again every second until the round commits or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// The newest rounds, oldest first.
    List {
        #[command(flatten)]
        target: Target,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only rounds with ids below this one (page back).
        #[arg(long)]
        before: Option<u64>,
    },
    /// Abort a round in progress (and the rest of its run).
    Abort {
        #[command(flatten)]
        target: Target,
        id: u64,
    },
}

/// The record a `RoundInfo` carries, read into its type.
fn round_record(r: &RoundInfo) -> Result<RoundRecord> {
    serde_json::from_str(&r.record_json).with_context(|| format!("round {}: the coordinator sent a record this CLI cannot read", r.round_id))
}

fn round_line(r: &RoundRecord) -> String {
    let metrics = match &r.mean_metrics {
        Some(m) => format!(
            "  held-out loss {:.3} -> {:.3}, acc {:.3} -> {:.3} ({} devices)",
            m.backbone_loss,
            m.personalized_loss,
            m.backbone_acc,
            m.personalized_acc,
            r.metrics.len()
        ),
        None => String::new(),
    };
    let mut line = format!(
        "round {:>4}  run {} #{}  {:<12} base v{} -> {}  cohort {}  contributors {}{}{}",
        r.round_id,
        r.run_id,
        r.index,
        r.state.name(),
        r.base_version,
        r.committed_version.map_or("-".into(), |c| format!("v{c}")),
        r.cohort.len(),
        r.contributors.len(),
        r.reason.as_ref().map_or(String::new(), |r| format!("  ({r})")),
        metrics,
    );
    for (device, d) in &r.dropouts {
        line.push_str(&format!("\n  dropped {device}: {d}"));
    }
    line
}

pub async fn run_round(cmd: RoundCommand, json: bool) -> Result<()> {
    match cmd {
        RoundCommand::Start { target, rounds, min_clients, max_clients, deadline, local_epochs, lr, strategy, prox_mu, dp } => {
            let (mut c, cred) = admin_client(&target).await?;
            let req = StartRoundsRequest {
                rounds,
                min_clients,
                max_clients,
                deadline_seconds: deadline,
                local_epochs,
                lr,
                strategy: strategy.to_string(),
                prox_mu,
                dp_l2_clip: dp.dp_clip,
                dp_noise_multiplier: dp.dp_noise,
            };
            let r = c.start_rounds(with_admin(&cred, req)?).await.map_err(status_err)?.into_inner();
            emit(json, &RunQueued { run_id: r.run_id }, |q| println!("run {} queued: {rounds} round(s); watch with `round status --watch`", q.run_id))?;
        }
        RoundCommand::Status { target, id, watch } => {
            let (mut c, cred) = admin_client(&target).await?;
            let mut id = id.unwrap_or(0);
            loop {
                let r = c.round_status(with_admin(&cred, RoundStatusRequest { round_id: id })?).await.map_err(status_err)?.into_inner();
                // Watching "the latest" follows the round it found first, not later ones.
                id = r.round_id;
                let rec = round_record(&r)?;
                emit(json, &rec, |rec| println!("{}", round_line(rec)))?;
                if !watch || rec.state.is_final() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        RoundCommand::List { target, limit, before } => {
            let (mut c, cred) = admin_client(&target).await?;
            let req = ListRoundsRequest { limit, before_round_id: before.unwrap_or(0) };
            let r = c.list_rounds(with_admin(&cred, req)?).await.map_err(status_err)?.into_inner();
            let recs = r.rounds.iter().map(round_record).collect::<Result<Vec<_>>>()?;
            emit(json, &recs, |recs| {
                if recs.is_empty() {
                    println!("no rounds yet");
                }
                recs.iter().for_each(|x| println!("{}", round_line(x)));
            })?;
        }
        RoundCommand::Abort { target, id } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.abort_round(with_admin(&cred, AbortRoundRequest { round_id: id })?).await.map_err(status_err)?.into_inner();
            emit(json, &AbortOutcome { round_id: id, was_running: r.was_running }, |a| {
                if a.was_running {
                    println!("round {id}: abort requested");
                } else {
                    println!("round {id} had already finished");
                }
            })?;
        }
    }
    Ok(())
}

/// Distributed DP's two knobs, as `round start` and `spa simulate` take them.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct DpArgs {
    /// Distributed DP: L2 clip of each device's update (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub dp_clip: f64,
    /// Distributed DP noise multiplier z (central sigma = z * clip).
    #[arg(long, default_value_t = 0.0)]
    pub dp_noise: f64,
}

impl DpArgs {
    /// (clip, noise multiplier) when DP is on, None when off; the values no round accepts
    /// are an error (the coordinator checks a round's plan again: it is the authority).
    pub fn params(&self) -> Result<Option<(f64, f64)>> {
        let (clip, noise) = (self.dp_clip, self.dp_noise);
        anyhow::ensure!(clip.is_finite() && clip >= 0.0, "--dp-clip {clip}: the dp clip must be a finite number >= 0");
        anyhow::ensure!(noise.is_finite() && noise >= 0.0, "--dp-noise {noise}: the noise multiplier must be a finite number >= 0");
        anyhow::ensure!(noise == 0.0 || clip > 0.0, "--dp-noise needs --dp-clip > 0");
        Ok((clip > 0.0).then_some((clip, noise)))
    }
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Write a committed global version (shared side-plugin parameters) as safetensors.
    Export {
        #[command(flatten)]
        target: Target,
        /// Global version (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run_checkpoint(cmd: CheckpointCommand, json: bool) -> Result<()> {
    let CheckpointCommand::Export { target, version, out } = cmd;
    let (mut c, cred) = admin_client(&target).await?;
    let version = match version {
        Some(v) => v,
        None => c.server_status(with_admin(&cred, ServerStatusRequest {})?).await.map_err(status_err)?.into_inner().global_version,
    };
    let mut stream = c.get_checkpoint(with_admin(&cred, GetCheckpointRequest { version })?).await.map_err(status_err)?.into_inner();
    let mut asm = spa_proto::tensor::TensorAssembler::new(spa_proto::limits::MAX_TENSOR_BYTES);
    while let Some(chunk) = stream.message().await.map_err(status_err)? {
        asm.push(chunk)?;
    }
    let mut set = spa_model::side::ParamSet::default();
    for (name, t) in asm.finish()? {
        let values = t.to_f32(&name)?;
        set.tensors.insert(name, spa_model::side::NamedTensor { shape: t.shape.iter().map(|&d| d as usize).collect(), values });
    }
    std::fs::write(&out, set.to_safetensors()).with_context(|| format!("writing {}", out.display()))?;
    emit(json, &Exported { version, tensors: set.tensors.len(), parameters: set.numel(), out }, |e| {
        println!("global version {version}: {} tensors, {} parameters -> {}", e.tensors, e.parameters, e.out.display())
    })
}
