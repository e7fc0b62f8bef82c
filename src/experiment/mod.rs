//! The personalization experiments (`spa experiment --config FILE`): the backbone, local
//! training, the federated body (global adapter) and what a device can build on it (FedAvg+FT,
//! Ditto, FedRep, kNN-Per, SPA v2 and its stages), FedProx, and SPA v1, on the same devices,
//! seeds and local training code. Federations go through [`Simulation::round`] (the real
//! SecAgg+ machines and server strategies); the per-device arms are stages of one
//! [`spa_model::personal::fit`], each chosen on the device's validation split; every arm is
//! scored on test by [`PersonalModel::score`]. Config in [`config`], metrics and tests in
//! [`stats`], the runs in [`arms`], the first seed's extra measurements in [`extras`], tables
//! and plots in [`report`].
//!
//! [`Simulation::round`]: crate::simulation::Simulation::round
//! [`PersonalModel::score`]: spa_model::personal::PersonalModel::score
pub mod arms;
pub mod config;
pub mod extras;
pub mod flips;
pub mod report;
pub mod stats;

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use spa_model::ModelError;
use spa_model::backbone::Backbone;
use spa_model::personal::DeviceCost;
use spa_model::side::{Plugin, config::is_large};
use spa_model::tokenizer::{ModelTokens, Tokenizer};

pub use config::{Arm, ExperimentConfig};

use crate::simulation::{DiskBank, FeatureBank, MemoryBank, SimError, device_features};

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

/// ROUGE F1 of greedy replies, averaged over a device's scored test examples.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Rouge {
    pub replies: usize,
    pub rouge_1: f64,
    pub rouge_2: f64,
    pub rouge_l: f64,
}

/// One device's test metrics under one arm and seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceResult {
    pub device: String,
    /// A newcomer: held out of every federation.
    pub held_out: bool,
    pub tokens: usize,
    /// Nats per reply token of the distribution the arm speaks with.
    pub loss: f64,
    pub accuracy: f64,
    /// Fraction of test tokens the side (the arm's model) speaks.
    pub side_fraction: f64,
    /// The main arms, first seed.
    #[serde(default)]
    pub rouge: Option<Rouge>,
}

/// Mean test loss and accuracy over the federated devices after a round (0 = before training).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub seconds: f64,
}

/// Means over devices: `loss` per device, `token_loss` per token (devices weighted by their
/// test tokens); ROUGE over the devices that have it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub devices: usize,
    pub loss: f64,
    pub token_loss: f64,
    pub accuracy: f64,
    pub side_fraction: f64,
    pub rouge: Option<Rouge>,
}

impl Summary {
    pub fn of(devices: &[&DeviceResult]) -> Self {
        let n = devices.len().max(1) as f64;
        let avg = |f: fn(&DeviceResult) -> f64| devices.iter().map(|d| f(d)).sum::<f64>() / n;
        let tokens: usize = devices.iter().map(|d| d.tokens).sum();
        let rouged: Vec<Rouge> = devices.iter().filter_map(|d| d.rouge).collect();
        let rouge = (!rouged.is_empty()).then(|| {
            let m = rouged.len() as f64;
            Rouge {
                replies: rouged.iter().map(|r| r.replies).sum(),
                rouge_1: rouged.iter().map(|r| r.rouge_1).sum::<f64>() / m,
                rouge_2: rouged.iter().map(|r| r.rouge_2).sum::<f64>() / m,
                rouge_l: rouged.iter().map(|r| r.rouge_l).sum::<f64>() / m,
            }
        });
        Self {
            devices: devices.len(),
            loss: avg(|d| d.loss),
            token_loss: devices.iter().map(|d| d.loss * d.tokens as f64).sum::<f64>() / tokens.max(1) as f64,
            accuracy: avg(|d| d.accuracy),
            side_fraction: avg(|d| d.side_fraction),
            rouge,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedRun {
    pub seed: u64,
    pub devices: Vec<DeviceResult>,
    /// Over the federated devices, and over the newcomers.
    pub mean: Summary,
    pub newcomers: Summary,
    /// Per-round means (empty for arms that do not train in rounds).
    pub curve: Vec<RoundPoint>,
    pub seconds: f64,
}

impl SeedRun {
    pub fn new(seed: u64, devices: Vec<DeviceResult>, curve: Vec<RoundPoint>, seconds: f64) -> Self {
        let part = |held: bool| Summary::of(&devices.iter().filter(|d| d.held_out == held).collect::<Vec<_>>());
        Self { seed, mean: part(false), newcomers: part(true), devices, curve, seconds }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmResult {
    pub arm: Arm,
    /// Cloud -> device bytes per generated token in today's per-token protocol: the features
    /// the plugin reads (taps + the gate's input) at the wire precision, or the token id alone.
    pub bytes_per_token: usize,
    pub runs: Vec<SeedRun>,
    /// Mean and sample sd over seeds of the per-seed means (federated devices); the
    /// newcomers' mean over seeds.
    pub mean: Summary,
    pub sd: Summary,
    pub newcomers: Summary,
    /// What the device computes and holds for this arm (mean over devices, first seed).
    #[serde(default)]
    pub device_cost: Option<DeviceCost>,
}

/// SPA v2 against one baseline on one metric, per federated device (each device's value
/// averaged over seeds).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub baseline: Arm,
    pub metric: String,
    pub devices: usize,
    /// Devices where SPA v2 is better (lower loss, higher accuracy).
    pub v2_better: usize,
    /// Mean over devices of SPA v2 minus the baseline, and its 95% bootstrap interval.
    pub mean_diff: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub wilcoxon_p: f64,
    /// Holm-corrected across the baselines of this metric.
    pub holm_p: f64,
    pub sign_p: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExperimentResult {
    pub name: String,
    pub backbone: String,
    pub devices: Vec<String>,
    pub newcomers: Vec<String>,
    /// Roles of the corpus left out because the backbone was pretrained on their text.
    #[serde(default)]
    pub left_out: Vec<String>,
    pub seeds: Vec<u64>,
    pub rounds: usize,
    pub local_epochs: usize,
    /// Knobs tuned on the first seed (name, value).
    pub tuned: Vec<(String, f64)>,
    pub rouge_examples: usize,
    /// The backbone's multiply-accumulates per token at a context of 128 (what the device
    /// costs are set beside).
    #[serde(default)]
    pub backbone_macs: f64,
    pub arms: Vec<ArmResult>,
    pub comparisons: Vec<Comparison>,
    pub extras: extras::Extras,
    pub seconds: f64,
}

/// What the experiment needs from the backbone's directory.
pub struct Model<'a> {
    pub backbone: &'a Backbone,
    pub tokenizer: &'a Tokenizer,
    pub tokens: &'a ModelTokens,
    pub label: String,
}

/// What every arm of a seed reads: the config, the backbone, and the devices' features.
pub struct Context<'a> {
    pub cfg: &'a ExperimentConfig,
    pub model: &'a Model<'a>,
    /// Devices that take part in the federations, and newcomers held out of them.
    pub fed: Arc<dyn FeatureBank>,
    pub new: Arc<dyn FeatureBank>,
    /// The backbone's head as devices hold it, built once: its clones share the predictions
    /// it memoizes over each device's features.
    head: spa_model::side::FrozenHead,
}

impl Context<'_> {
    /// How many devices there are, newcomers included.
    pub fn devices(&self) -> usize {
        self.fed.len() + self.new.len()
    }

    /// Device `i` of [`Self::devices`] (newcomers after the federated ones): its features, and
    /// whether it is a newcomer. Loaded per use (a disk bank keeps memory to what is in use).
    pub fn device(&self, i: usize) -> Result<(crate::simulation::DeviceFeatures, bool)> {
        let nf = self.fed.len();
        Ok(if i < nf { (self.fed.get(i)?, false) } else { (self.new.get(i - nf)?, true) })
    }

    pub(crate) fn head(&self) -> spa_model::side::FrozenHead {
        self.head.clone()
    }

    /// The devices the per-round curves are measured on (the first federated ones).
    pub(crate) fn curve_devices(&self) -> usize {
        if self.cfg.eval_devices == 0 { self.fed.len() } else { self.cfg.eval_devices.min(self.fed.len()) }
    }
}

/// Runs every arm of `cfg` for every seed; `progress` sees a line per finished run.
pub fn run(cfg: &ExperimentConfig, model: &Model, users: Vec<spa_model::data::UserData>, progress: &mut dyn FnMut(&str)) -> Result<ExperimentResult> {
    let started = Instant::now();
    let users = users.into_iter().map(|u| u.with_validation(cfg.val_fraction, cfg.min_val)).collect::<spa_model::Result<Vec<_>>>()?;
    // Newcomers: every k-th device, so they spread over the ranking of roles.
    let n_new = (cfg.holdout * users.len() as f64).round() as usize;
    let every = users.len().checked_div(n_new);
    let (mut fed, mut new) = (Vec::new(), Vec::new());
    for (i, u) in users.into_iter().enumerate() {
        if every.is_some_and(|e| i % e == e - 1) && new.len() < n_new { new.push(u) } else { fed.push(u) }
    }
    if fed.len() < 2 {
        return Err(ExperimentError::Config(format!("{} devices left to federate after the holdout; at least 2", fed.len())));
    }
    let bank = |users: Vec<spa_model::data::UserData>| -> Result<Arc<dyn FeatureBank>> {
        Ok(if cfg.features_on_disk {
            Arc::new(DiskBank::build(model.backbone, model.tokenizer, users, &cfg.side)?)
        } else {
            Arc::new(MemoryBank(device_features(model.backbone, model.tokenizer, users, &cfg.side)?))
        })
    };
    let (fed, new) = (bank(fed)?, bank(new)?);
    progress(&format!("features of {} devices computed in {:.1} s", fed.len() + new.len(), started.elapsed().as_secs_f64()));
    let head = spa_model::side::FrozenHead::device_copy(model.backbone);
    let ctx = Context { cfg, model, fed: fed.clone(), new: new.clone(), head };
    let mut runs: Vec<(Arm, Vec<SeedRun>)> = cfg.arms.iter().map(|&a| (a, Vec::new())).collect();
    let mut tuned = arms::Tuned::default();
    let mut extras = extras::Extras::default();
    let mut costs = Vec::new();
    for (k, &seed) in cfg.seeds.iter().enumerate() {
        let out = arms::run_seed(&ctx, seed, &mut tuned, k == 0, progress)?;
        for (arm, run) in out.runs {
            if let Some((_, v)) = runs.iter_mut().find(|(a, _)| *a == arm) {
                v.push(run);
            }
        }
        if k == 0 {
            extras = out.extras;
            costs = out.costs;
        }
    }
    let bytes = bytes_per_token(cfg, model.backbone)?;
    let arms: Vec<ArmResult> = runs
        .into_iter()
        .map(|(arm, runs)| {
            let cost = costs.iter().find(|(a, _)| *a == arm).map(|(_, c)| c.clone());
            aggregate(arm, runs, bytes, cost)
        })
        .collect();
    let comparisons = report::comparisons(&arms);
    Ok(ExperimentResult {
        name: cfg.name.clone(),
        backbone: model.label.clone(),
        devices: (0..fed.len()).map(|i| fed.name(i).to_string()).collect(),
        newcomers: (0..new.len()).map(|i| new.name(i).to_string()).collect(),
        left_out: vec![],
        seeds: cfg.seeds.clone(),
        rounds: cfg.rounds,
        local_epochs: cfg.local.epochs,
        tuned: tuned.report(),
        rouge_examples: cfg.rouge_examples,
        backbone_macs: model.backbone.config.macs_per_token(128),
        arms,
        comparisons,
        extras,
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

fn aggregate(arm: Arm, runs: Vec<SeedRun>, plugin_bytes: usize, device_cost: Option<DeviceCost>) -> ArmResult {
    let col = |f: fn(&Summary) -> f64| stats::mean_sd(&runs.iter().map(|r| f(&r.mean)).collect::<Vec<_>>());
    let (l, t, a, s) = (col(|s| s.loss), col(|s| s.token_loss), col(|s| s.accuracy), col(|s| s.side_fraction));
    let nc = |f: fn(&Summary) -> f64| stats::mean_sd(&runs.iter().map(|r| f(&r.newcomers)).collect::<Vec<_>>()).0;
    let devices = runs.first().map_or(0, |r| r.mean.devices);
    let rouge = runs.first().and_then(|r| r.mean.rouge);
    ArmResult {
        arm,
        bytes_per_token: if arm == Arm::Backbone { 4 } else { plugin_bytes },
        mean: Summary { devices, loss: l.0, token_loss: t.0, accuracy: a.0, side_fraction: s.0, rouge },
        sd: Summary { devices, loss: l.1, token_loss: t.1, accuracy: a.1, side_fraction: s.1, rouge: None },
        newcomers: Summary {
            devices: runs.first().map_or(0, |r| r.newcomers.devices),
            loss: nc(|s| s.loss),
            token_loss: nc(|s| s.token_loss),
            accuracy: nc(|s| s.accuracy),
            side_fraction: nc(|s| s.side_fraction),
            rouge: runs.first().and_then(|r| r.newcomers.rouge),
        },
        device_cost,
        runs,
    }
}
