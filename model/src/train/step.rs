//! One optimizer step: the loss of the objective, its gradients (by hand for the mlp side,
//! by autodiff for the ladder), the frozen parameters masked, FedProx's term, AdamW.

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::batch::{Batch, heads};
use super::{Objective, TrainConfig};
use crate::error::{ModelError, Result};
use crate::features::FeatureSet;
use crate::optim::{self, FlatAdamW};
use crate::side::mlp_grad::{self, GateTerms, MlpBatch};
use crate::side::params::for_each_param;
use crate::side::{FrozenHead, Plugin, PluginNet, SharedParams};
use crate::tensor_util::from_vec;

/// Every float parameter's name and size, in visit order (the layout of `optim::flat_params`).
pub(super) fn named_sizes(net: &PluginNet) -> Vec<(String, usize)> {
    let mut out = vec![];
    for_each_param(net, |name, dims, _| out.push((name, dims.iter().product())));
    out
}

/// FedProx's term in the flat layout of `optim::flat_params`: the global values of the
/// shared parameters, and a mask that is 1 on them and 0 on the private ones.
pub(super) struct FlatProx {
    pub(super) global: Tensor<1>,
    pub(super) mask: Tensor<1>,
    pub(super) mu: f64,
}

impl FlatProx {
    pub(super) fn new(net: &PluginNet, global: &SharedParams, mu: f64, device: &Device) -> Result<Self> {
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
    pub(super) fn loss(&self, w: Tensor<1>) -> Tensor<1> {
        ((w - self.global.clone()) * self.mask.clone()).square().sum().mul_scalar(self.mu / 2.0)
    }

    /// The same as a value, and its gradient `mu * (w - w_global)` on the shared parameters.
    pub(super) fn term(&self, w: Tensor<1>) -> (f64, Tensor<1>) {
        let diff = (w - self.global.clone()) * self.mask.clone();
        let value = diff.clone().square().sum().into_scalar::<f32>() as f64 * self.mu / 2.0;
        (value, diff.mul_scalar(self.mu))
    }
}

/// What every step of one training call shares.
pub(super) struct StepContext<'a> {
    pub(super) plugin: &'a Plugin,
    /// The frozen head on the plain device and on the autodiff device.
    pub(super) head: &'a FrozenHead,
    pub(super) head_ad: &'a FrozenHead,
    pub(super) data: &'a FeatureSet,
    pub(super) cfg: &'a TrainConfig,
    /// FedProx's term, on the trained net's device, when it applies.
    pub(super) prox: Option<FlatProx>,
}

/// Loss and gradients of one step on `batch` by burn's autodiff (any variant). The batch is
/// on the autodiff device.
pub(super) fn autodiff_grads(net: &PluginNet, ctx: &StepContext, batch: &Batch) -> Result<(f32, GradientsParams)> {
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
pub(super) fn trainable_grads(net: &PluginNet, mut grads: GradientsParams, objective: Objective) -> GradientsParams {
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
pub(super) fn trainable_mask(net: &PluginNet, objective: Objective, device: &Device) -> Tensor<1> {
    let mut mask = Vec::new();
    for (name, n) in named_sizes(net) {
        mask.resize(mask.len() + n, if objective.trains(&name) { 1.0f32 } else { 0.0 });
    }
    let n = mask.len();
    from_vec(mask, [n], device)
}

/// The same for the `mlp` side with hand-derived gradients (`side::mlp_grad`), laid out as
/// `optim::flat_params`, FedProx's term included. The net and the batch are on the plain device.
pub(super) fn mlp_flat_grads(net: &PluginNet, ctx: &StepContext, batch: &Batch) -> Result<(f32, Tensor<1>)> {
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
pub(super) enum Stepper {
    Mlp(FlatAdamW),
    Autodiff(ModuleOptimizer),
}

/// One optimizer step on `batch`: the loss of the module doc, its gradients, AdamW. Returns
/// the updated net and the loss value.
pub(super) fn train_step(net: PluginNet, stepper: &mut Stepper, ctx: &StepContext, batch: &Batch, epoch: usize) -> Result<(PluginNet, f32)> {
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

pub(super) fn check_finite(loss: f32, epoch: usize) -> Result<()> {
    if loss.is_finite() { Ok(()) } else { Err(ModelError::Data(format!("training diverged (loss {loss}) at epoch {epoch}"))) }
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
    use crate::train::batch::{Unit, compute_preds, make_batch, units};
    use crate::train::train_plugin;

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
        let mut preds = compute_preds(&head, &data, &device).unwrap();
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
