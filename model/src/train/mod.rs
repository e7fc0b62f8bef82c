//! Local training of the side plugin (and, for SPA v1, its gate) on cached backbone features,
//! and their evaluation. The backbone never runs here: features come from a [`FeatureSet`].
//!
//! The [`Objective`] says what trains on which loss:
//! - `side` (the default; SPA v2's federated body, its personal candidates, the global
//!   adapter): the side network `side.*` on CE(side) + mu/2 * ||shared - global||^2 (FedProx,
//!   Ditto); the gate and v1's personal layer stay as they are;
//! - `above_down`: the same loss, the side network but its down-projections (they stay the
//!   body's, so the coordinator, which holds the body, can apply them for the device);
//! - `up`: the same loss, only `side.up.*` moves (FedRep's head on a frozen body);
//! - `gated` (SPA v1): everything on CE(side) + CE(mixture) + lambda * cost + the proximal
//!   term, where the mixture `g * p_side + (1 - g) * p_backbone` trains the gate (p_side
//!   detached, so the side learns only from its own CE), and the cost
//!   `g * [backbone already right]` pushes g to 0 where the backbone suffices.
//!
//! With a validation set, the epoch kept is the one with the lowest validation loss of the
//! distribution the objective is scored with (the side's for `side`/`up`, the routed one for
//! `gated`), the untrained start included.
use std::time::Instant;

use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::features::FeatureSet;
use crate::optim::FlatAdamW;
use crate::side::config::SideVariant;
use crate::side::{FrozenHead, Plugin, PluginNet, SharedParams};

mod batch;
mod eval;
mod step;

use batch::{BackbonePreds, Unit, backbone_preds, make_batch, units};
use eval::evaluate_units;
use step::{FlatProx, StepContext, Stepper, train_step, trainable_mask};

pub use eval::{EvalMetrics, Rows, evaluate, for_each_rows};

/// What a training call trains, and on which loss (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    #[default]
    Side,
    AboveDown,
    Up,
    Gated,
}

impl Objective {
    /// Whether the parameter at `path` moves under this objective.
    pub fn trains(self, path: &str) -> bool {
        match self {
            Self::Gated => true,
            Self::Side => path.starts_with("side."),
            Self::AboveDown => path.starts_with("side.") && !path.starts_with("side.down."),
            Self::Up => path.starts_with("side.up."),
        }
    }

    /// The validation loss an epoch is kept by: the distribution the objective is scored with.
    fn selection_loss(self, m: &EvalMetrics) -> f64 {
        match self {
            Self::Gated => m.routed_loss,
            Self::Side | Self::AboveDown | Self::Up => m.side_loss,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// What trains, on which loss.
    pub objective: Objective,
    pub epochs: usize,
    pub lr: f64,
    /// Tokens per step for the `mlp` side (per-token), sequences per step for `ladder`.
    pub batch_tokens: usize,
    pub batch_sequences: usize,
    pub weight_decay: f64,
    /// Weight of the gate's cost term (`gated` objective only).
    pub gate_cost: f64,
    /// FedProx proximal weight (0 = plain local training).
    pub prox_mu: f64,
    /// Fraction of the examples (the last ones, in order) held out to pick the best epoch
    /// (see the module doc) when the caller gives no validation set; 0 = train on all and
    /// keep the last epoch.
    pub val_fraction: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Side,
            epochs: 3,
            lr: 3e-3,
            batch_tokens: 1024,
            batch_sequences: 8,
            weight_decay: 0.0,
            gate_cost: 0.1,
            prox_mu: 0.0,
            val_fraction: 0.0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.epochs > 0
            && self.epochs <= 1000
            && self.lr.is_finite()
            && self.lr > 0.0
            && self.lr < 10.0
            && self.batch_tokens > 0
            && self.batch_sequences > 0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && self.gate_cost.is_finite()
            && self.gate_cost >= 0.0
            && self.prox_mu.is_finite()
            && self.prox_mu >= 0.0
            && (0.0..=0.5).contains(&self.val_fraction);
        if ok { Ok(()) } else { Err(ModelError::InvalidInput(format!("invalid training settings {self:?}"))) }
    }
}

/// Progress events for a caller-owned display (the binaries draw indicatif bars).
#[derive(Clone, Debug)]
pub enum TrainEvent {
    Start { total_steps: usize },
    Step { step: usize, loss: f32 },
    EpochEnd { epoch: usize, mean_loss: f32 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub epoch_losses: Vec<f32>,
    pub tokens: usize,
    /// Wall time of the whole call after the setup (steps and validation).
    pub seconds: f64,
    /// Time inside the training steps alone (batch, forward, backward, optimizer).
    #[serde(default)]
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    /// With a validation split: its loss (the objective's, see the module doc) before
    /// training (index 0) and after each epoch, and the epoch kept (0 = the untrained plugin).
    pub val_losses: Vec<f64>,
    pub best_epoch: usize,
}

/// Trains `plugin` on `data` (what trains is `cfg.objective`'s). With `global` and
/// `prox_mu > 0`, adds the proximal term towards the round's global shared parameters. The
/// last `cfg.val_fraction` of the examples, if any, pick the epoch kept.
pub fn train_plugin(
    plugin: Plugin,
    head: &FrozenHead,
    data: &FeatureSet,
    cfg: &TrainConfig,
    global: Option<&SharedParams>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<(Plugin, TrainReport)> {
    cfg.validate()?;
    let n_ex = data.examples.len();
    let n_val = if n_ex >= 2 { ((n_ex as f64 * cfg.val_fraction).ceil() as usize).min(n_ex - 1) } else { 0 };
    let val = (n_val > 0).then_some((data, n_ex - n_val..n_ex));
    train_units(plugin, head, (data, 0..n_ex - n_val), val, cfg, global, on_event)
}

/// [`train_plugin`] with a validation set of its own (`cfg.val_fraction` must be 0): the
/// epoch kept is the best on `val`, the untrained start included.
pub fn train_with_validation(
    plugin: Plugin,
    head: &FrozenHead,
    train: &FeatureSet,
    val: &FeatureSet,
    cfg: &TrainConfig,
    global: Option<&SharedParams>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<(Plugin, TrainReport)> {
    cfg.validate()?;
    if cfg.val_fraction != 0.0 {
        return Err(ModelError::InvalidInput("a validation set is given: val_fraction must be 0".into()));
    }
    train_units(plugin, head, (train, 0..train.examples.len()), Some((val, 0..val.examples.len())), cfg, global, on_event)
}

/// Examples `range` of a feature set.
type Slice<'a> = (&'a FeatureSet, std::ops::Range<usize>);

/// The best plugin on a validation slice so far.
struct Selection<'a> {
    data: &'a FeatureSet,
    preds: std::sync::Arc<BackbonePreds>,
    units: Vec<Unit>,
    objective: Objective,
    best: Option<(Plugin, f64)>,
}

impl<'a> Selection<'a> {
    fn new((data, range): Slice<'a>, per_token: bool, head: &FrozenHead, objective: Objective, device: &Device) -> Result<Self> {
        let preds = backbone_preds(head, data, device)?;
        Ok(Self { units: units(data, range, per_token), data, preds, objective, best: None })
    }

    /// Scores `net` after `epoch` epochs, keeping it if it is the best so far.
    fn offer(&mut self, plugin: &Plugin, net: &PluginNet, head: &FrozenHead, epoch: usize, report: &mut TrainReport) -> Result<()> {
        if self.units.is_empty() {
            return Ok(());
        }
        let candidate = Plugin { net: net.clone(), ..plugin.clone() };
        let loss = self.objective.selection_loss(&evaluate_units(&candidate, head, self.data, &self.preds, &self.units, 2048)?);
        report.val_losses.push(loss);
        if self.best.as_ref().is_none_or(|(_, l)| loss < *l) {
            self.best = Some((candidate, loss));
            report.best_epoch = epoch;
        }
        Ok(())
    }
}

fn train_units(
    plugin: Plugin,
    head: &FrozenHead,
    (data, range): Slice<'_>,
    val: Option<Slice<'_>>,
    cfg: &TrainConfig,
    global: Option<&SharedParams>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<(Plugin, TrainReport)> {
    for set in std::iter::once(data).chain(val.as_ref().map(|v| v.0)) {
        if set.d != plugin.shape.d_model {
            return Err(ModelError::InvalidInput(format!("features have d={}, plugin expects {}", set.d, plugin.shape.d_model)));
        }
    }
    // The hand-derived backward multiplies by the head with burn's own matmul: f32.
    let head = &*head.as_f32();
    let per_token = plugin.config.variant == SideVariant::Mlp;
    let all = units(data, range, per_token);
    if all.is_empty() {
        return Err(ModelError::Data("no training tokens".into()));
    }
    let device = plugin.net.side.up.weight.val().device();
    let ad = device.clone().autodiff();
    // Only the autodiff (ladder) step reads the head on the autodiff device.
    let head_ad = if per_token { head.clone() } else { head.to_device(&ad) };
    let (mut net, mut stepper) = if per_token {
        let optim = FlatAdamW::new(cfg.weight_decay as f32).with_trainable(trainable_mask(&plugin.net, cfg.objective, &device));
        (plugin.net.clone(), Stepper::Mlp(optim))
    } else {
        (plugin.net.clone().fork(&ad).train(), Stepper::Autodiff(AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32).init()))
    };
    let prox = match global {
        Some(g) if cfg.prox_mu > 0.0 => Some(FlatProx::new(&net, g, cfg.prox_mu, if per_token { &device } else { &ad })?),
        _ => None,
    };
    let per_step = if per_token { cfg.batch_tokens } else { cfg.batch_sequences };
    let steps_per_epoch = all.len().div_ceil(per_step);
    on_event(TrainEvent::Start { total_steps: steps_per_epoch * cfg.epochs });
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<&Unit> = all.iter().collect();
    let preds = backbone_preds(head, data, &device)?;
    let mut report = TrainReport::default();
    let ctx = StepContext { plugin: &plugin, head, head_ad: &head_ad, data, cfg, prox };
    let started = Instant::now();
    let mut selection = val.map(|v| Selection::new(v, per_token, head, cfg.objective, &device)).transpose()?;
    if let Some(sel) = &mut selection {
        sel.offer(&plugin, &plugin.net, head, 0, &mut report)?;
    }
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut sum = 0.0f32;
        for chunk in order.chunks(per_step) {
            let step_started = Instant::now();
            // The mlp step computes its own gradients: it stays off the autodiff device.
            let batch = make_batch(data, &preds, chunk, if per_token { &device } else { &ad });
            let value;
            (net, value) = train_step(net, &mut stepper, &ctx, &batch, epoch)?;
            report.step_seconds += step_started.elapsed().as_secs_f64();
            report.steps += 1;
            report.tokens += batch.tokens;
            sum += value;
            on_event(TrainEvent::Step { step: report.steps, loss: value });
        }
        let mean = sum / steps_per_epoch as f32;
        report.epoch_losses.push(mean);
        on_event(TrainEvent::EpochEnd { epoch, mean_loss: mean });
        if let Some(sel) = &mut selection {
            sel.offer(&plugin, &net.valid().fork(&device), head, epoch + 1, &mut report)?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.tokens_per_second = report.tokens as f64 / report.seconds.max(1e-9);
    let trained = match selection.and_then(|s| s.best) {
        Some((p, _)) => p,
        None => Plugin { net: net.valid().fork(&device), ..plugin },
    };
    Ok((trained, report))
}
