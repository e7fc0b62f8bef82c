//! The personalization experiments (`spa experiment --config FILE`): the backbone, local-only
//! training, a global adapter (and FedAvg+FT) and SPA with its ablations, on the same devices,
//! seeds and local training code; federated arms go through [`Simulation::round`] (the real
//! SecAgg+ machines and server strategies). Config in [`config`], metrics and paired tests in
//! [`stats`], the arms in [`arms`], tables and plots in [`report`].
pub mod arms;
pub mod config;
pub mod report;
pub mod stats;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use spa_model::ModelError;
use spa_model::backbone::Backbone;
use spa_model::side::{Plugin, config::is_large};
use spa_model::tokenizer::{ModelTokens, Tokenizer};

pub use config::{Arm, ExperimentConfig, GateMode};

use crate::simulation::{DeviceFeatures, SimError, device_features};

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("experiment config: {0}")]
    Config(String),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("report: {0}")]
    Report(String),
}

pub type Result<T> = std::result::Result<T, ExperimentError>;

/// One device's test metrics under one arm and seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceResult {
    pub device: String,
    /// Nats per reply token of the distribution the arm speaks with.
    pub loss: f64,
    pub accuracy: f64,
    /// Mean ROUGE-L F1 of greedy replies over the scored test examples.
    pub rouge_l: f64,
    /// Fraction of test tokens the side plugin speaks.
    pub gate_on: f64,
}

/// Mean test loss and accuracy over devices after a round (round 0 = before training).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub loss: f64,
    pub accuracy: f64,
    pub rouge_l: f64,
    pub gate_on: f64,
}

impl Summary {
    fn of(devices: &[DeviceResult]) -> Self {
        let n = devices.len().max(1) as f64;
        let avg = |f: fn(&DeviceResult) -> f64| devices.iter().map(f).sum::<f64>() / n;
        Self { loss: avg(|d| d.loss), accuracy: avg(|d| d.accuracy), rouge_l: avg(|d| d.rouge_l), gate_on: avg(|d| d.gate_on) }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedRun {
    pub seed: u64,
    pub devices: Vec<DeviceResult>,
    pub mean: Summary,
    /// Per-round means (empty for arms that do not train in rounds).
    pub curve: Vec<RoundPoint>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmResult {
    pub arm: Arm,
    /// Cloud -> device bytes per generated token in the per-token protocol: the features the
    /// plugin reads (taps + the gate's input) at the wire precision, or the token id alone.
    pub bytes_per_token: usize,
    pub runs: Vec<SeedRun>,
    /// Mean and sample sd over seeds of the per-seed device means.
    pub mean: Summary,
    pub sd: Summary,
}

/// SPA against one baseline on one metric, per device (each device's value averaged over
/// seeds), two-sided tests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub baseline: Arm,
    pub metric: String,
    pub devices: usize,
    /// Devices where SPA is better (lower loss, higher accuracy or ROUGE-L).
    pub spa_better: usize,
    /// Mean over devices of SPA minus the baseline.
    pub mean_diff: f64,
    pub wilcoxon_p: f64,
    pub sign_p: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExperimentResult {
    pub name: String,
    pub backbone: String,
    pub devices: Vec<String>,
    pub seeds: Vec<u64>,
    pub rounds: usize,
    pub local_epochs: usize,
    pub rouge_examples: usize,
    pub arms: Vec<ArmResult>,
    pub comparisons: Vec<Comparison>,
    pub seconds: f64,
}

/// What the experiment needs from the backbone's directory.
pub struct Model<'a> {
    pub backbone: &'a Backbone,
    pub tokenizer: &'a Tokenizer,
    pub tokens: &'a ModelTokens,
    pub label: String,
}

/// Runs every arm of `cfg` for every seed; `progress` sees a line per finished run.
pub fn run(cfg: &ExperimentConfig, model: &Model, users: Vec<spa_model::data::UserData>, progress: &mut dyn FnMut(&str)) -> Result<ExperimentResult> {
    let started = Instant::now();
    let data = device_features(model.backbone, model.tokenizer, users, &cfg.side)?;
    progress(&format!("features of {} devices computed in {:.1} s", data.len(), started.elapsed().as_secs_f64()));
    let mut runs: Vec<(Arm, Vec<SeedRun>)> = cfg.arms.iter().map(|&a| (a, Vec::new())).collect();
    let ctx = arms::Context { cfg, model, data: &data, rouge_cache: Default::default() };
    for &seed in &cfg.seeds {
        for (arm, run) in arms::run_seed(&ctx, seed, progress)? {
            if let Some((_, v)) = runs.iter_mut().find(|(a, _)| *a == arm) {
                v.push(run);
            }
        }
    }
    let bytes = bytes_per_token(cfg, model.backbone)?;
    let arms: Vec<ArmResult> = runs.into_iter().map(|(arm, runs)| aggregate(arm, runs, bytes)).collect();
    let comparisons = report::comparisons(&arms);
    Ok(ExperimentResult {
        name: cfg.name.clone(),
        backbone: model.label.clone(),
        devices: data.iter().map(|d: &DeviceFeatures| d.data.user.clone()).collect(),
        seeds: cfg.seeds.clone(),
        rounds: cfg.rounds,
        local_epochs: cfg.local.epochs,
        rouge_examples: cfg.rouge_examples,
        arms,
        comparisons,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Bytes per token of features for a plugin arm (the client's wire precision: f16 on large
/// backbones), and 4 (a token id) for the backbone alone.
fn bytes_per_token(cfg: &ExperimentConfig, bb: &Backbone) -> Result<usize> {
    let shape = Plugin::new(&cfg.side, &bb.config, &bb.device)?.shape;
    let wire = if is_large(&bb.config) { 2 } else { 4 };
    Ok(shape.feature_layers.len() * shape.d_model * wire)
}

fn aggregate(arm: Arm, runs: Vec<SeedRun>, plugin_bytes: usize) -> ArmResult {
    let col = |f: fn(&Summary) -> f64| stats::mean_sd(&runs.iter().map(|r| f(&r.mean)).collect::<Vec<_>>());
    let (l, a, r, g) = (col(|s| s.loss), col(|s| s.accuracy), col(|s| s.rouge_l), col(|s| s.gate_on));
    ArmResult {
        arm,
        bytes_per_token: if arm.gate() == GateMode::Off { 4 } else { plugin_bytes },
        mean: Summary { loss: l.0, accuracy: a.0, rouge_l: r.0, gate_on: g.0 },
        sd: Summary { loss: l.1, accuracy: a.1, rouge_l: r.1, gate_on: g.1 },
        runs,
    }
}
