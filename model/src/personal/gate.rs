//! SPA v2's gate, trained last, on the trained personal model: per token it decides whether
//! the device's model speaks (`g > threshold`) or the backbone does (then the device needs
//! no side inputs for that token). Its input is the backbone's normalised final hidden state
//! (`head.norm(h_L)`), as v1's gate.
//!
//! It is warm-started open (g near 0.9), trained on the mixture `g * p_model + (1 - g) *
//! p_backbone` of the two fixed distributions with a cost for calling the model where the
//! backbone is already right, the cost annealed from 0 so the gate first learns where the
//! model helps; then its threshold is calibrated on validation over a grid that contains
//! "always the model" and "always the backbone".
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::side::plugin::{GateNet, Init};
use crate::tensor_util::{from_vec, to_vec};

/// How the gate trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateTrain {
    /// Train a gate at all (without one the model speaks at every token).
    pub enabled: bool,
    pub hidden: usize,
    pub epochs: usize,
    pub lr: f64,
    pub batch_tokens: usize,
    /// Final weight of the cost `g * [backbone right]`, reached linearly from 0.
    pub cost: f64,
    /// Initial bias of the output unit: sigmoid(2.2) = 0.9, open.
    pub open_bias: f32,
}

impl Default for GateTrain {
    fn default() -> Self {
        Self { enabled: true, hidden: 32, epochs: 3, lr: 3e-3, batch_tokens: 512, cost: 0.1, open_bias: 2.2 }
    }
}

impl GateTrain {
    pub fn validate(&self) -> Result<()> {
        let ok = (1..=4096).contains(&self.hidden)
            && (1..=100).contains(&self.epochs)
            && self.lr.is_finite()
            && self.lr > 0.0
            && self.lr < 1.0
            && self.batch_tokens > 0
            && self.cost.is_finite()
            && self.cost >= 0.0
            && self.open_bias.is_finite();
        if ok { Ok(()) } else { Err(ModelError::InvalidInput(format!("invalid gate training settings {self:?}"))) }
    }
}

/// What the gate trains on, per training token: its input `[n, d]`, and the probability of
/// the target under the model and under the backbone, and whether the backbone's argmax is it.
pub struct GateData<'a> {
    pub x: &'a [f32],
    pub d: usize,
    pub p_model: &'a [f32],
    pub p_backbone: &'a [f32],
    pub backbone_right: &'a [bool],
}

/// Trains a gate (see the module doc) on `data`.
pub fn train_gate(data: &GateData, cfg: &GateTrain, seed: u64, device: &Device) -> Result<GateNet> {
    cfg.validate()?;
    let (n, d) = (data.p_model.len(), data.d);
    if n == 0 || data.x.len() != n * d || data.p_backbone.len() != n || data.backbone_right.len() != n {
        return Err(ModelError::InvalidInput(format!("gate data: {n} tokens, {} inputs of width {d}", data.x.len())));
    }
    let ad = device.clone().autodiff();
    let mut init = Init(StdRng::seed_from_u64(seed));
    let mut w2 = init.linear(cfg.hidden, 1, true, device);
    w2.bias = w2.bias.map(|b| b.map(|t| t.add_scalar(cfg.open_bias)));
    let mut net = GateNet { w1: init.linear(d, cfg.hidden, false, device), w2 }.fork(&ad).train();
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6a7e);
    let total = cfg.epochs * n.div_ceil(cfg.batch_tokens);
    let mut step = 0usize;
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_tokens) {
            let b = chunk.len();
            let x: Vec<f32> = chunk.iter().flat_map(|&i| data.x[i * d..(i + 1) * d].iter().copied()).collect();
            let col = |f: &dyn Fn(usize) -> f32| from_vec(chunk.iter().map(|&i| f(i)).collect::<Vec<f32>>(), [1, b, 1], &ad);
            let (ps, pb) = (col(&|i| data.p_model[i]), col(&|i| data.p_backbone[i]));
            let right = col(&|i| if data.backbone_right[i] { 1.0 } else { 0.0 });
            let g = net.forward(from_vec(x, [1, b, d], &ad));
            let mix = (g.clone() * ps + g.clone().neg().add_scalar(1.0) * pb).clamp_min(1e-9).log();
            let cost = cfg.cost * step as f64 / total.max(1) as f64;
            let loss = mix.mean().neg() + (g * right).mean().mul_scalar(cost);
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                return Err(ModelError::Data(format!("gate training diverged (loss {value})")));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(cfg.lr, net, grads);
            step += 1;
        }
    }
    Ok(net.valid().fork(device))
}

/// The gate's value at each row of `x` (`[n, d]`).
pub fn gate_values(gate: &GateNet, x: &[f32], d: usize, device: &Device) -> Vec<f32> {
    let n = x.len() / d;
    if n == 0 {
        return vec![];
    }
    to_vec(gate.forward(from_vec(x.to_vec(), [1, n, d], device)))
}

/// One threshold's validation loss and side fraction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub threshold: f64,
    pub loss: f64,
    pub side_fraction: f64,
}

/// The thresholds chosen on validation (`g > threshold` lets the model speak; -1 means
/// always, 2 never).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The threshold of the lowest validation loss, where its gain over "always the model"
    /// exceeds one standard error of the per-token difference; else "always" (the one-SE
    /// rule: with a few thousand validation tokens the bare minimum is mostly noise, and it
    /// cost test loss on every device it moved, docs/BENCHMARKS.md).
    pub best: f64,
    /// The threshold of the lowest validation loss, whatever its margin.
    pub argmin: f64,
    /// The fewest model tokens whose validation loss is within `within` (relative) of the
    /// lowest.
    pub frugal: f64,
    pub within: f64,
    pub curve: Vec<CurvePoint>,
}

pub const ALWAYS: f64 = -1.0;
pub const NEVER: f64 = 2.0;

impl Calibration {
    pub fn at(&self, threshold: f64) -> Option<&CurvePoint> {
        self.curve.iter().find(|p| p.threshold == threshold)
    }
}

/// The candidate thresholds: always, the gate's values at each twentieth quantile, never.
fn thresholds(g: &[f32]) -> Vec<f64> {
    let mut sorted: Vec<f32> = g.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let mut t = vec![ALWAYS];
    if !sorted.is_empty() {
        for q in 1..20 {
            t.push(sorted[(q * sorted.len() / 20).min(sorted.len() - 1)] as f64);
        }
    }
    t.push(NEVER);
    t.dedup();
    t
}

/// The loss and side fraction of routing by `g > threshold` between per-token
/// log-probabilities of the model and of the backbone.
pub fn routed(g: &[f32], lp_model: &[f32], lp_backbone: &[f32], threshold: f64) -> CurvePoint {
    let n = g.len().max(1) as f64;
    let (mut loss, mut side) = (0.0, 0usize);
    for ((&gi, &m), &b) in g.iter().zip(lp_model).zip(lp_backbone) {
        if gi as f64 > threshold {
            loss -= m as f64;
            side += 1;
        } else {
            loss -= b as f64;
        }
    }
    CurvePoint { threshold, loss: loss / n, side_fraction: side as f64 / n }
}

/// Whether routing at `threshold` beats "always the model" by more than one standard error
/// of the per-token loss difference.
fn clearly_better(g: &[f32], lp_model: &[f32], lp_backbone: &[f32], threshold: f64) -> bool {
    let d: Vec<f64> = g.iter().zip(lp_model).zip(lp_backbone).map(|((&gi, &m), &b)| if gi as f64 > threshold { 0.0 } else { (m - b) as f64 }).collect();
    let n = d.len().max(2) as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    mean + (var / n).sqrt() < 0.0
}

/// Picks the thresholds (see [`Calibration`]) from validation tokens.
pub fn calibrate(g: &[f32], lp_model: &[f32], lp_backbone: &[f32], within: f64) -> Calibration {
    let curve: Vec<CurvePoint> = thresholds(g).into_iter().map(|t| routed(g, lp_model, lp_backbone, t)).collect();
    let argmin = curve.iter().min_by(|a, b| a.loss.total_cmp(&b.loss).then(b.side_fraction.total_cmp(&a.side_fraction))).expect("at least two thresholds");
    let best = if clearly_better(g, lp_model, lp_backbone, argmin.threshold) { argmin.threshold } else { ALWAYS };
    let limit = argmin.loss + within * argmin.loss.abs();
    let frugal =
        curve.iter().filter(|p| p.loss <= limit).min_by(|a, b| a.side_fraction.total_cmp(&b.side_fraction).then(a.loss.total_cmp(&b.loss))).unwrap_or(argmin);
    Calibration { best, argmin: argmin.threshold, frugal: frugal.threshold, within, curve: curve.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_keeps_always_and_never_and_finds_the_frugal_point() {
        // Tokens 0..10: the model is much better on the first five, equal on the rest; the
        // gate is high exactly where the model helps.
        let g: Vec<f32> = (0..10).map(|i| if i < 5 { 0.9 } else { 0.1 }).collect();
        let lp_m: Vec<f32> = (0..10).map(|i| if i < 5 { -0.1 } else { -1.0 }).collect();
        let lp_b = vec![-1.0f32; 10];
        let c = calibrate(&g, &lp_m, &lp_b, 0.01);
        assert!(c.at(ALWAYS).is_some_and(|p| p.side_fraction == 1.0));
        assert!(c.at(NEVER).is_some_and(|p| p.side_fraction == 0.0 && (p.loss - 1.0).abs() < 1e-9));
        let frugal = c.at(c.frugal).unwrap();
        assert!((frugal.side_fraction - 0.5).abs() < 1e-9 && (frugal.loss - 0.55).abs() < 1e-6, "{c:?}");
        assert!(c.at(c.argmin).unwrap().loss <= frugal.loss);
        // Every threshold ties "always" here: the headline keeps the model speaking.
        assert_eq!(c.best, ALWAYS);
        // Where the backbone is clearly better on the tokens the gate closes, it routes.
        let lp_m: Vec<f32> = (0..10).map(|i| if i < 5 { -0.1 } else { -3.0 - 0.1 * i as f32 }).collect();
        let c = calibrate(&g, &lp_m, &lp_b, 0.01);
        assert!(c.best > ALWAYS && c.at(c.best).unwrap().side_fraction == 0.5, "{c:?}");
    }

    #[test]
    fn the_gate_learns_where_the_model_helps() {
        let device = Device::flex();
        // Inputs: +1 or -1 in every coordinate; the model is right where x > 0.
        let (n, d) = (400, 4);
        let x: Vec<f32> = (0..n).flat_map(|i| vec![if i % 2 == 0 { 1.0 } else { -1.0 }; d]).collect();
        let p_model: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 0.9 } else { 0.01 }).collect();
        let p_backbone = vec![0.3f32; n];
        let right = vec![false; n];
        let data = GateData { x: &x, d, p_model: &p_model, p_backbone: &p_backbone, backbone_right: &right };
        let cfg = GateTrain { epochs: 20, lr: 1e-2, batch_tokens: 64, ..GateTrain::default() };
        let gate = train_gate(&data, &cfg, 0, &device).unwrap();
        let g = gate_values(&gate, &x, d, &device);
        assert!(g[0] > 0.8 && g[1] < 0.2, "g = {} / {}", g[0], g[1]);
    }
}
