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
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::features::FeatureSet;
use crate::optim::{self, FlatAdamW};
use crate::side::config::SideVariant;
use crate::side::mlp_grad::{self, GateTerms, MlpBatch};
use crate::side::params::for_each_param;
use crate::side::{FrozenHead, Plugin, PluginNet, SharedParams};
use crate::tensor_util::{from_vec, to_vec};

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

/// One batch: features `[layers, B, T, d]` as a tensor (layer-major, so each layer is a
/// contiguous slice and taking one copies nothing), and per position the target, the loss
/// mask and the frozen backbone's own prediction (see [`BackbonePreds`]) as host columns.
struct Batch {
    feats: Tensor<4>,
    tokens: usize,
    /// `[B * T]` each (the mlp step reads them as they are).
    host: Columns,
}

struct Columns {
    targets: Vec<i64>,
    mask: Vec<f32>,
    bb_logp: Vec<f32>,
    bb_right: Vec<f32>,
    inv_rms: Vec<f32>,
}

/// The columns the autodiff loss and the evaluation read, as `[B, T, 1]` tensors on the
/// batch's device.
struct ColumnTensors {
    targets: Tensor<3, Int>,
    mask: Tensor<3>,
    bb_logp: Tensor<3>,
    bb_right: Tensor<3>,
}

impl Batch {
    fn column_tensors(&self) -> ColumnTensors {
        let [_, b, t, _] = self.feats.dims();
        let device = self.feats.device();
        let col = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [b, t, 1]), &device);
        let cols = &self.host;
        ColumnTensors {
            targets: Tensor::from_data(TensorData::new(cols.targets.clone(), [b, t, 1]), &device),
            mask: col(&cols.mask),
            bb_logp: col(&cols.bb_logp),
            bb_right: col(&cols.bb_right),
        }
    }
}

/// Work units: single tokens (mlp) or whole sequences (ladder).
enum Unit {
    Token { ex: usize, pos: usize },
    Sequence { ex: usize },
}

/// Units of the examples in `examples`.
fn units(data: &FeatureSet, examples: std::ops::Range<usize>, per_token: bool) -> Vec<Unit> {
    let mut u = Vec::new();
    for (i, e) in data.examples.iter().enumerate().take(examples.end).skip(examples.start) {
        if per_token {
            u.extend(e.loss.iter().enumerate().filter(|(_, l)| **l).map(|(p, _)| Unit::Token { ex: i, pos: p }));
        } else if e.loss.iter().any(|&l| l) {
            u.push(Unit::Sequence { ex: i });
        }
    }
    u
}

/// The frozen backbone's log-probability of each target and whether its argmax is the
/// target, per example and position, and its final hidden state's `inv_rms` (the gate's
/// input norm). They depend on the features alone, so they are computed once per call
/// instead of once per step and epoch.
struct BackbonePreds {
    logp: Vec<Vec<f32>>,
    right: Vec<Vec<f32>>,
    inv_rms: Vec<Vec<f32>>,
}

fn backbone_preds(head: &FrozenHead, data: &FeatureSet, device: &Device) -> Result<BackbonePreds> {
    let k = data.last_layer_index()?;
    let (row, d) = (data.layers.len() * data.d, data.d);
    let mut preds = BackbonePreds { logp: Vec::new(), right: Vec::new(), inv_rms: Vec::new() };
    // Positions of many examples go through the head together, in chunks of a few thousand.
    let mut pending: Vec<usize> = Vec::new();
    let flush = |pending: &mut Vec<usize>, preds: &mut BackbonePreds| {
        let n: usize = pending.iter().map(|&i| data.examples[i].len()).sum();
        let mut h = Vec::with_capacity(n * d);
        let mut tgt = Vec::with_capacity(n);
        for &i in pending.iter() {
            let e = &data.examples[i];
            for p in 0..e.len() {
                h.extend_from_slice(&e.feats[p * row + k * d..p * row + (k + 1) * d]);
            }
            tgt.extend(e.targets.iter().map(|&t| t as i64));
        }
        let h = Tensor::<3>::from_data(TensorData::new(h, [1, n, d]), device);
        let tgt = Tensor::<3, Int>::from_data(TensorData::new(tgt, [1, n, 1]), device);
        let inv_rms = crate::tensor_util::to_vec(head.inv_rms(h.clone()));
        let lp = log_softmax(head.logits(h), 2);
        let logp = crate::tensor_util::to_vec(lp.clone().gather(2, tgt.clone()));
        let right = crate::tensor_util::to_vec(lp.argmax(2).equal(tgt).float());
        let mut at = 0;
        for &i in pending.iter() {
            let len = data.examples[i].len();
            preds.logp.push(logp[at..at + len].to_vec());
            preds.right.push(right[at..at + len].to_vec());
            preds.inv_rms.push(inv_rms[at..at + len].to_vec());
            at += len;
        }
        pending.clear();
    };
    let mut queued = 0;
    for (i, e) in data.examples.iter().enumerate() {
        pending.push(i);
        queued += e.len();
        if queued >= 4096 {
            flush(&mut pending, &mut preds);
            queued = 0;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut preds);
    }
    Ok(preds)
}

fn make_batch(data: &FeatureSet, preds: &BackbonePreds, units: &[&Unit], device: &Device) -> Batch {
    let (l, d) = (data.layers.len(), data.d);
    let row = l * d;
    let t = units
        .iter()
        .map(|u| match u {
            Unit::Token { .. } => 1,
            Unit::Sequence { ex } => data.examples[*ex].len(),
        })
        .max()
        .unwrap_or(1);
    let b = units.len();
    let span = |u: &Unit| match u {
        Unit::Token { ex, pos } => (*ex, *pos..*pos + 1),
        Unit::Sequence { ex } => (*ex, 0..data.examples[*ex].len()),
    };
    // Written in order, layer by layer, with padding appended: no zero-fill pass over the
    // whole buffer first.
    let mut feats = Vec::with_capacity(l * b * t * d);
    for k in 0..l {
        for u in units {
            let (ex, positions) = span(u);
            let e = &data.examples[ex];
            let n = positions.len();
            for p in positions {
                feats.extend_from_slice(&e.feats[p * row + k * d..p * row + (k + 1) * d]);
            }
            feats.resize(feats.len() + (t - n) * d, 0.0);
        }
    }
    let mut targets = vec![0i64; b * t];
    let mut mask = vec![0.0f32; b * t];
    let mut bb_logp = vec![0.0f32; b * t];
    let mut bb_right = vec![0.0f32; b * t];
    let mut inv_rms = vec![0.0f32; b * t];
    for (i, u) in units.iter().enumerate() {
        let (ex, positions) = span(u);
        let e = &data.examples[ex];
        for (slot, p) in positions.enumerate() {
            let at = i * t + slot;
            targets[at] = e.targets[p] as i64;
            mask[at] = if e.loss[p] { 1.0 } else { 0.0 };
            bb_logp[at] = preds.logp[ex][p];
            bb_right[at] = preds.right[ex][p];
            inv_rms[at] = preds.inv_rms[ex][p];
        }
    }
    let tokens = mask.iter().filter(|&&m| m > 0.0).count();
    Batch { feats: Tensor::from_data(TensorData::new(feats, [l, b, t, d]), device), tokens, host: Columns { targets, mask, bb_logp, bb_right, inv_rms } }
}

/// Per-layer `[B, T, d]` views of a batch, in the plugin's tap order, plus the final layer.
fn split_layers(data: &FeatureSet, plugin_taps: &[usize], feats: &Tensor<4>) -> Result<(Vec<Tensor<3>>, Tensor<3>)> {
    let [_, b, t, d] = feats.dims();
    let layer = |k: usize| feats.clone().narrow(0, k, 1).reshape([b, t, d]);
    let taps = plugin_taps.iter().map(|&tap| Ok(layer(data.layer_index(tap)?))).collect::<Result<Vec<_>>>()?;
    Ok((taps, layer(data.last_layer_index()?)))
}

/// Per-position quantities every loss and metric is built from.
struct Heads {
    lp_side: Tensor<3>,
    gate: Tensor<3>,
}

fn heads(net: &PluginNet, plugin: &Plugin, head: &FrozenHead, data: &FeatureSet, batch: &Batch) -> Result<Heads> {
    let (taps, h_last) = split_layers(data, &plugin.shape.taps, &batch.feats)?;
    let out = net.forward(&taps, h_last, head, plugin.config.gate.use_side_state);
    let lp_side = log_softmax(head.logits(out.side_hidden), 2);
    Ok(Heads { lp_side, gate: out.gate })
}

/// Every float parameter's name and size, in visit order (the layout of `optim::flat_params`).
fn named_sizes(net: &PluginNet) -> Vec<(String, usize)> {
    let mut out = vec![];
    for_each_param(net, |name, dims, _| out.push((name, dims.iter().product())));
    out
}

/// FedProx's term in the flat layout of `optim::flat_params`: the global values of the
/// shared parameters, and a mask that is 1 on them and 0 on the private ones.
struct FlatProx {
    global: Tensor<1>,
    mask: Tensor<1>,
    mu: f64,
}

impl FlatProx {
    fn new(net: &PluginNet, global: &SharedParams, mu: f64, device: &Device) -> Result<Self> {
        let (mut values, mut mask, mut missing) = (vec![], vec![], vec![]);
        for (name, n) in named_sizes(net) {
            match global.as_set().tensors.get(&name) {
                Some(g) if g.values.len() == n => {
                    values.extend_from_slice(&g.values);
                    mask.resize(mask.len() + n, 1.0f32);
                }
                Some(g) => return Err(ModelError::Params(format!("global {name} has {} values, the plugin {n}", g.values.len()))),
                None => {
                    if name.starts_with("side.") {
                        missing.push(name);
                    }
                    values.resize(values.len() + n, 0.0);
                    mask.resize(mask.len() + n, 0.0);
                }
            }
        }
        if !missing.is_empty() {
            return Err(ModelError::Params(format!("global parameters lack {missing:?}")));
        }
        let n = values.len();
        Ok(Self { global: from_vec(values, [n], device), mask: from_vec(mask, [n], device), mu })
    }

    /// `mu/2 * sum over shared (w - w_global)^2` at the flat parameters `w` (autodiff
    /// differentiates it).
    fn loss(&self, w: Tensor<1>) -> Tensor<1> {
        ((w - self.global.clone()) * self.mask.clone()).square().sum().mul_scalar(self.mu / 2.0)
    }

    /// The same as a value, and its gradient `mu * (w - w_global)` on the shared parameters.
    fn term(&self, w: Tensor<1>) -> (f64, Tensor<1>) {
        let diff = (w - self.global.clone()) * self.mask.clone();
        let value = diff.clone().square().sum().into_scalar::<f32>() as f64 * self.mu / 2.0;
        (value, diff.mul_scalar(self.mu))
    }
}

/// What every step of one training call shares.
struct StepContext<'a> {
    plugin: &'a Plugin,
    /// The frozen head on the plain device and on the autodiff device.
    head: &'a FrozenHead,
    head_ad: &'a FrozenHead,
    data: &'a FeatureSet,
    cfg: &'a TrainConfig,
    /// FedProx's term, on the trained net's device, when it applies.
    prox: Option<FlatProx>,
}

/// Loss and gradients of one step on `batch` by burn's autodiff (any variant). The batch is
/// on the autodiff device.
fn autodiff_grads(net: &PluginNet, ctx: &StepContext, batch: &Batch) -> Result<(f32, GradientsParams)> {
    let n = batch.tokens.max(1) as f64;
    let h = heads(net, ctx.plugin, ctx.head_ad, ctx.data, batch)?;
    let cols = batch.column_tensors();
    let mask = cols.mask.clone();
    let ls = h.lp_side.gather(2, cols.targets);
    let lb = cols.bb_logp;
    let mut loss = (ls.clone() * mask.clone()).sum().neg().div_scalar(n);
    if ctx.cfg.objective == Objective::Gated {
        let g = h.gate;
        let mix = (g.clone() * ls.detach().exp() + g.clone().neg().add_scalar(1.0) * lb.exp()).clamp_min(1e-9).log();
        let ce_mix = (mix * mask.clone()).sum().neg().div_scalar(n);
        let cost = (g * cols.bb_right * mask).sum().div_scalar(n).mul_scalar(ctx.cfg.gate_cost);
        loss = loss + ce_mix + cost;
    }
    if let Some(prox) = &ctx.prox {
        loss = loss + prox.loss(optim::flat_params(net));
    }
    let value = loss.clone().into_scalar::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), net);
    Ok((value, trainable_grads(net, grads, ctx.cfg.objective)))
}

/// `grads` without the parameters `objective` keeps frozen (the optimizer then leaves them).
fn trainable_grads(net: &PluginNet, mut grads: GradientsParams, objective: Objective) -> GradientsParams {
    struct Keep<'a> {
        path: Vec<String>,
        from: &'a mut GradientsParams,
        out: GradientsParams,
        objective: Objective,
    }
    impl burn::module::ModuleVisitor for Keep<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(g) = self.from.remove::<D>(param.id)
                && self.objective.trains(&self.path.join("."))
            {
                self.out.register(param.id, g);
            }
        }
    }
    let mut keep = Keep { path: vec![], from: &mut grads, out: GradientsParams::new(), objective };
    net.visit(&mut keep);
    keep.out
}

/// 1 for each parameter value `objective` trains, 0 elsewhere, laid out as `optim::flat_params`.
fn trainable_mask(net: &PluginNet, objective: Objective, device: &Device) -> Tensor<1> {
    let mut mask = Vec::new();
    for (name, n) in named_sizes(net) {
        mask.resize(mask.len() + n, if objective.trains(&name) { 1.0f32 } else { 0.0 });
    }
    let n = mask.len();
    from_vec(mask, [n], device)
}

/// The same for the `mlp` side with hand-derived gradients (`side::mlp_grad`), laid out as
/// `optim::flat_params`, FedProx's term included. The net and the batch are on the plain device.
fn mlp_flat_grads(net: &PluginNet, ctx: &StepContext, batch: &Batch) -> Result<(f32, Tensor<1>)> {
    let [l, b, t, d] = batch.feats.dims();
    let feats = batch.feats.clone().reshape([l, b * t, d]);
    let at = ctx.plugin.shape.taps.iter().map(|&tap| ctx.data.layer_index(tap)).collect::<Result<Vec<_>>>()?;
    // The features usually hold the taps first and in order: a view then, else a copy.
    let taps = if at.iter().enumerate().all(|(i, &k)| i == k) {
        feats.clone().narrow(0, 0, at.len())
    } else {
        let idx = Tensor::<1, Int>::from_data(TensorData::new(at.iter().map(|&k| k as i64).collect(), [at.len()]), &feats.device());
        feats.clone().select(0, idx)
    };
    let last = ctx.data.last_layer_index()?;
    let cols = &batch.host;
    let mlp = MlpBatch {
        taps,
        h_last: feats.narrow(0, last, 1).reshape([b * t, d]),
        targets: &cols.targets,
        mask: &cols.mask,
        bb_logp: &cols.bb_logp,
        bb_right: &cols.bb_right,
        inv_rms: &cols.inv_rms,
        n: batch.tokens.max(1) as f64,
    };
    let gate = (ctx.cfg.objective == Objective::Gated).then_some(GateTerms { uses_side: ctx.plugin.config.gate.use_side_state, cost: ctx.cfg.gate_cost });
    let (mut value, grads) = mlp_grad::loss_and_grads(net, ctx.head, &mlp, gate);
    // Frozen parameters may lack a gradient (the gate's without the gated objective); the
    // optimizer's mask keeps them still.
    let mut flat = optim::flat_grads_or_zero(net, &grads);
    if let Some(prox) = &ctx.prox {
        let (v, g) = prox.term(optim::flat_params(net));
        value += v;
        flat = flat + g;
    }
    Ok((value as f32, flat))
}

/// How the steps of one call compute gradients and update: the mlp side by hand on the
/// plain device with one flat AdamW, the ladder by autodiff with burn's AdamW. One per call:
/// its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Stepper {
    Mlp(FlatAdamW),
    Autodiff(ModuleOptimizer),
}

/// One optimizer step on `batch`: the loss of the module doc, its gradients, AdamW. Returns
/// the updated net and the loss value.
fn train_step(net: PluginNet, stepper: &mut Stepper, ctx: &StepContext, batch: &Batch, epoch: usize) -> Result<(PluginNet, f32)> {
    let lr = ctx.cfg.lr;
    let (net, value) = match stepper {
        Stepper::Mlp(optim) => {
            let (value, grads) = mlp_flat_grads(&net, ctx, batch)?;
            check_finite(value, epoch)?;
            (optim.step(lr, net, grads), value)
        }
        Stepper::Autodiff(optim) => {
            let (value, grads) = autodiff_grads(&net, ctx, batch)?;
            check_finite(value, epoch)?;
            (optim.step(lr, net, grads), value)
        }
    };
    Ok((net, value))
}

fn check_finite(loss: f32, epoch: usize) -> Result<()> {
    if loss.is_finite() { Ok(()) } else { Err(ModelError::Data(format!("training diverged (loss {loss}) at epoch {epoch}"))) }
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
    preds: BackbonePreds,
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
    let head_ad = head.to_device(&ad);
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

/// Per-token test metrics: backbone alone, side plugin alone, and the gated combination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub tokens: usize,
    pub backbone_loss: f64,
    pub backbone_acc: f64,
    pub side_loss: f64,
    pub side_acc: f64,
    /// Loss of the distribution actually used at inference (side where g > threshold).
    pub routed_loss: f64,
    pub routed_acc: f64,
    /// Fraction of tokens the gate sends to the side plugin (device calls).
    pub side_fraction: f64,
}

impl EvalMetrics {
    /// The unweighted mean over devices (each device counts once, whatever its token count);
    /// `tokens` is the total.
    pub fn mean(all: &[EvalMetrics]) -> EvalMetrics {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&EvalMetrics) -> f64| all.iter().map(f).sum::<f64>() / n;
        EvalMetrics {
            tokens: all.iter().map(|m| m.tokens).sum(),
            backbone_loss: avg(|m| m.backbone_loss),
            backbone_acc: avg(|m| m.backbone_acc),
            side_loss: avg(|m| m.side_loss),
            side_acc: avg(|m| m.side_acc),
            routed_loss: avg(|m| m.routed_loss),
            routed_acc: avg(|m| m.routed_acc),
            side_fraction: avg(|m| m.side_fraction),
        }
    }
}

/// Loss positions of a feature set, a chunk at a time, in order (example by example,
/// position by position): what the backbone predicts there, its final hidden state, and the
/// side distribution of each of a list of plugins.
pub struct Rows {
    pub targets: Vec<u32>,
    /// The frozen backbone's log-probability of each target, and whether its argmax is it.
    pub bb_logp: Vec<f32>,
    pub bb_right: Vec<bool>,
    /// The example each row belongs to (its index in the feature set).
    pub examples: Vec<u32>,
    /// Final hidden state, `[rows, d]`.
    pub h_last: Vec<f32>,
    /// Per plugin, the side's log-probabilities `[rows, vocab]`.
    pub side: Vec<Vec<f32>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Calls `f` on [`Rows`] of every loss position of `data`, a few thousand values of
/// vocabulary-wide rows at a time; `plugins` share one variant and shape.
pub fn for_each_rows(plugins: &[&Plugin], head: &FrozenHead, data: &FeatureSet, f: &mut dyn FnMut(Rows) -> Result<()>) -> Result<()> {
    let Some(first) = plugins.first() else { return Err(ModelError::InvalidInput("no plugin to read rows with".into())) };
    let head = &*head.as_f32();
    let per_token = first.config.variant == SideVariant::Mlp;
    let device = first.net.side.up.weight.val().device();
    let preds = backbone_preds(head, data, &device)?;
    let all = units(data, 0..data.examples.len(), per_token);
    let refs: Vec<&Unit> = all.iter().collect();
    // About 4 M log-probabilities per plugin per chunk.
    let tokens = ((1usize << 22) / head.vocab_size().max(1)).max(16);
    let per_chunk = if per_token { tokens } else { (tokens / 64).max(1) };
    let last = data.last_layer_index()?;
    for chunk in refs.chunks(per_chunk) {
        let batch = make_batch(data, &preds, chunk, &device);
        let [_, b, t, d] = batch.feats.dims();
        let keep: Vec<usize> = (0..b * t).filter(|&i| batch.host.mask[i] > 0.0).collect();
        let rows_of = |values: Vec<f32>, w: usize| keep.iter().flat_map(|&i| values[i * w..(i + 1) * w].to_vec()).collect::<Vec<f32>>();
        let h_all = to_vec(batch.feats.clone().narrow(0, last, 1).reshape([b * t, d]));
        let mut side = Vec::with_capacity(plugins.len());
        for p in plugins {
            let lp = heads(&p.net, p, head, data, &batch)?.lp_side;
            let v = lp.dims()[2];
            side.push(rows_of(to_vec(lp.reshape([b * t, v])), v));
        }
        let ex_of: Vec<u32> = chunk
            .iter()
            .flat_map(|u| match u {
                Unit::Token { ex, .. } => vec![*ex as u32],
                Unit::Sequence { ex } => vec![*ex as u32; t],
            })
            .collect();
        let cols = &batch.host;
        f(Rows {
            targets: keep.iter().map(|&i| cols.targets[i] as u32).collect(),
            bb_logp: keep.iter().map(|&i| cols.bb_logp[i]).collect(),
            bb_right: keep.iter().map(|&i| cols.bb_right[i] > 0.5).collect(),
            examples: keep.iter().map(|&i| ex_of[i]).collect(),
            h_last: rows_of(h_all, d),
            side,
        })?;
    }
    Ok(())
}

pub fn evaluate(plugin: &Plugin, head: &FrozenHead, data: &FeatureSet, batch_tokens: usize) -> Result<EvalMetrics> {
    let head = &*head.as_f32();
    let per_token = plugin.config.variant == SideVariant::Mlp;
    let all = units(data, 0..data.examples.len(), per_token);
    let device = plugin.net.side.up.weight.val().device();
    let preds = backbone_preds(head, data, &device)?;
    evaluate_units(plugin, head, data, &preds, &all, batch_tokens)
}

fn evaluate_units(plugin: &Plugin, head: &FrozenHead, data: &FeatureSet, preds: &BackbonePreds, all: &[Unit], batch_tokens: usize) -> Result<EvalMetrics> {
    let per_token = plugin.config.variant == SideVariant::Mlp;
    let device = plugin.net.side.up.weight.val().device();
    let per_step = if per_token { batch_tokens.max(1) } else { 8 };
    let thr = plugin.config.gate.threshold;
    let mut acc = [0.0f64; 7];
    let mut tokens = 0usize;
    let refs: Vec<&Unit> = all.iter().collect();
    for chunk in refs.chunks(per_step) {
        let batch = make_batch(data, preds, chunk, &device);
        let h = heads(&plugin.net, plugin, head, data, &batch)?;
        let cols = batch.column_tensors();
        let mask = cols.mask.clone();
        let ls = h.lp_side.clone().gather(2, cols.targets.clone());
        let lb = cols.bb_logp;
        let side_ok = h.lp_side.argmax(2).equal(cols.targets).float();
        let bb_ok = cols.bb_right;
        let routed = h.gate.greater_elem(thr).float();
        let not_routed = routed.clone().neg().add_scalar(1.0);
        let sum = |t: Tensor<3>| (t * mask.clone()).sum().into_scalar::<f32>() as f64;
        acc[0] += sum(lb.clone().neg());
        acc[1] += sum(bb_ok.clone());
        acc[2] += sum(ls.clone().neg());
        acc[3] += sum(side_ok.clone());
        acc[4] += sum((ls * routed.clone() + lb * not_routed.clone()).neg());
        acc[5] += sum(side_ok * routed.clone() + bb_ok * not_routed);
        acc[6] += sum(routed);
        tokens += batch.tokens;
    }
    let n = tokens.max(1) as f64;
    Ok(EvalMetrics {
        tokens,
        backbone_loss: acc[0] / n,
        backbone_acc: acc[1] / n,
        side_loss: acc[2] / n,
        side_acc: acc[3] / n,
        routed_loss: acc[4] / n,
        routed_acc: acc[5] / n,
        side_fraction: acc[6] / n,
    })
}

#[cfg(test)]
mod tests {
    //! The mlp side's hand-derived gradients against burn's autodiff on the same batch.
    use std::path::PathBuf;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::backbone::load_backbone;
    use crate::features::{Positions, TokenizedExample, extract_features};
    use crate::side::{ParamSet, SideConfig};
    use crate::tensor_util::to_vec;

    /// Per parameter `objective` trains (pieces of the flat vectors), |a - b| against the size
    /// of b's gradient; the worst ratio.
    fn worst_relative_diff(a: &[f32], b: &[f32], sizes: &[(String, usize)], objective: Objective) -> f32 {
        let mut at = 0;
        let mut worst = 0.0f32;
        for (name, n) in sizes {
            let (a, b) = (&a[at..at + n], &b[at..at + n]);
            at += n;
            if !objective.trains(name) {
                continue;
            }
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
            assert!(scale > 1e-6, "the gradient of {name} is zero: the check would not see it");
            worst = worst.max(diff / scale);
        }
        assert_eq!(at, a.len());
        worst
    }

    /// Every parameter random (the output adapters start at zero, which would hide the chain).
    fn randomized(plugin: Plugin, seed: u64) -> Plugin {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut set: ParamSet = plugin.params();
        for t in set.tensors.values_mut() {
            for v in t.values.iter_mut() {
                *v = rng.random_range(-0.2..0.2);
            }
        }
        plugin.load(&set).unwrap()
    }

    /// `taps` empty means every layer; the features always hold every layer, so other taps
    /// are not their first entries.
    fn check(objective: Objective, gate_uses_side: bool, prox: bool, taps: Vec<usize>) {
        let device = Device::flex();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let bb = load_backbone(&dir, &device).unwrap();
        // 40 examples: over 128 loss rows, so the per-row loop runs in several blocks.
        let examples: Vec<TokenizedExample> =
            (0..40u32).map(|i| TokenizedExample { ids: (0..14).map(|j| (i * 7 + j * 13) % 90 + 3).collect(), reply_start: 6 }).collect();
        let mut side = SideConfig { reduction: 4, taps, ..SideConfig::default() };
        side.gate.use_side_state = gate_uses_side;
        let plugin = randomized(Plugin::new(&side, &bb.config, &device).unwrap(), 1);
        let global = randomized(plugin.clone(), 2).shared().unwrap();
        let every: Vec<usize> = (0..=bb.config.num_layers).collect();
        let data = extract_features(&bb, &examples, &every, Positions::LossOnly, 4).unwrap();
        let head = FrozenHead::from_backbone(&bb);
        let ad = device.clone().autodiff();
        let head_ad = head.to_device(&ad);
        let cfg = TrainConfig { objective, prox_mu: if prox { 0.5 } else { 0.0 }, gate_cost: 0.3, ..TrainConfig::default() };
        let mut preds = backbone_preds(&head, &data, &device).unwrap();
        // The random backbone is rarely right: mark half the positions so the gate cost acts.
        for r in preds.right.iter_mut() {
            r.iter_mut().enumerate().for_each(|(p, v)| *v = (p % 2) as f32);
        }
        let all = units(&data, 0..data.examples.len(), true);
        let chunk: Vec<&Unit> = all.iter().collect();
        // Each path as training runs it: the mlp's by hand on the plain device, autodiff on
        // its own device, each with FedProx's term built there.
        let step = |net: &PluginNet, dev: &Device| {
            let prox = prox.then(|| FlatProx::new(net, &global, cfg.prox_mu, dev).unwrap());
            let ctx = StepContext { plugin: &plugin, head: &head, head_ad: &head_ad, data: &data, cfg: &cfg, prox };
            let batch = make_batch(&data, &preds, &chunk, dev);
            if dev.is_autodiff() {
                let (v, grads) = autodiff_grads(net, &ctx, &batch).unwrap();
                (v, optim::flat_grads_or_zero(net, &grads))
            } else {
                mlp_flat_grads(net, &ctx, &batch).unwrap()
            }
        };
        let (va, ga) = step(&plugin.net, &device);
        let (vb, gb) = step(&plugin.net.clone().fork(&ad).train(), &ad);
        assert!((va - vb).abs() < 1e-5 * vb.abs().max(1.0), "loss {va} vs {vb}");
        let sizes = named_sizes(&plugin.net);
        assert_eq!(sizes.len(), plugin.params().tensors.len());
        let worst = worst_relative_diff(&to_vec(ga), &to_vec(gb), &sizes, objective);
        assert!(worst <= 1e-4, "gradients differ by {worst} of their size");
    }

    #[test]
    fn mlp_gradients_match_autodiff() {
        check(Objective::Gated, false, false, vec![]);
        check(Objective::Side, false, false, vec![]);
    }

    #[test]
    fn mlp_gradients_match_autodiff_with_side_state_gate_prox_and_tap_subset() {
        check(Objective::Gated, true, true, vec![1, 2]);
        check(Objective::Side, false, true, vec![1, 2]);
    }

    /// Under `up` only `side.up` moves; under `side` the gate and v1's personal layer stay.
    #[test]
    fn objectives_freeze_what_they_do_not_train() {
        let device = Device::flex();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let bb = load_backbone(&dir, &device).unwrap();
        let examples: Vec<TokenizedExample> =
            (0..12u32).map(|i| TokenizedExample { ids: (0..14).map(|j| (i * 5 + j * 11) % 90 + 3).collect(), reply_start: 6 }).collect();
        let every: Vec<usize> = (0..=bb.config.num_layers).collect();
        let data = extract_features(&bb, &examples, &every, Positions::LossOnly, 4).unwrap();
        let head = FrozenHead::from_backbone(&bb);
        let plugin = randomized(Plugin::new(&SideConfig { reduction: 4, ..SideConfig::default() }, &bb.config, &device).unwrap(), 3);
        for objective in [Objective::Up, Objective::AboveDown, Objective::Side, Objective::Gated] {
            let cfg = TrainConfig { objective, epochs: 1, batch_tokens: 16, weight_decay: 0.1, ..TrainConfig::default() };
            let (trained, _) = train_plugin(plugin.clone(), &head, &data, &cfg, None, &mut |_| {}).unwrap();
            let (before, after) = (plugin.params(), trained.params());
            for (name, t) in &before.tensors {
                let moved = t.values != after.tensors[name].values;
                assert_eq!(moved, objective.trains(name), "{objective:?}: {name} moved = {moved}");
            }
        }
    }
}
