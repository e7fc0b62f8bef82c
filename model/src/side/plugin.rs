//! The device-side network: side plugin (`mlp` or `ladder`), gate and personal head.
//!
//! Parameter paths (and so roles): `side.*` (down/up projections, adapters, ladder blocks
//! and gates; shared by default), `gate.*` and `personal.*` (private by default).
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::config::{SideConfig, SideShape, SideVariant};
use super::head::FrozenHead;
use super::params::{ParamSet, SharedParams, export_params, import_params, split_by_role};
use crate::backbone::layers::RmsNorm;
use crate::config::BackboneConfig;
use crate::error::Result;

/// `[B, T, in] -> [B, T, out]` as one 2-D gemm. burn's `Linear` on a 3-D input runs a
/// batched matmul, one small gemm per batch row: for per-token batches `[N, 1, d]` that is
/// N gemms of one row each (`side_train` in benches/model.rs, docs/bench-log/2026-11-25-model-hot-paths.md).
fn lin(l: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let y = l.forward(x.reshape([b * t, d]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// `a(x) + b(x)` for two linears of the same shape as one gemm with the summed weights:
/// the same values, and the same gradient reaches each weight.
fn lin_sum(a: &Linear, b: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [bs, t, d] = x.dims();
    let w = a.weight.val() + b.weight.val();
    let mut y = x.reshape([bs * t, d]).matmul(w);
    // Summed first, so the full-width output gets one broadcast add.
    let bias = match (&a.bias, &b.bias) {
        (Some(p), Some(q)) => Some(p.val() + q.val()),
        (Some(p), None) | (None, Some(p)) => Some(p.val()),
        (None, None) => None,
    };
    if let Some(bias) = bias {
        y = y + bias.unsqueeze::<2>();
    }
    let out = y.dims()[1];
    y.reshape([bs, t, out])
}

/// One pre-norm causal transformer block at the side width (ladder variant).
#[derive(Module, Debug)]
pub struct SideBlock {
    pub norm1: RmsNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: RmsNorm,
    pub ff1: Linear,
    pub ff2: Linear,
    pub heads: usize,
}

impl SideBlock {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, ds] = x.dims();
        let (h, dh) = (self.heads, ds / self.heads);
        let qkv = lin(&self.qkv, self.norm1.forward(x.clone()));
        let split = |i: usize| qkv.clone().narrow(2, i * ds, ds).reshape([b, t, h, dh]).swap_dims(1, 2);
        let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let o = attention(split(0), split(1), split(2), None, None, opts);
        let x = x + lin(&self.proj, o.swap_dims(1, 2).reshape([b, t, ds]));
        x.clone() + lin(&self.ff2, relu(lin(&self.ff1, self.norm2.forward(x))))
    }
}

#[derive(Module, Debug)]
pub struct SideNet {
    /// One `d -> d_side` projection per tap.
    pub down: Vec<Linear>,
    /// `mlp` variant: `d_side -> d_side` adapters between taps.
    pub adapters: Vec<Linear>,
    /// `ladder` variant: one side block per tap.
    pub blocks: Vec<SideBlock>,
    /// `ladder` variant: ladder gate logits `alpha_i` (0 at init), one per tap after the first.
    pub alpha: Option<Param<Tensor<1>>>,
    /// `d_side -> d`, zero at init so the plugin starts as the backbone.
    pub up: Linear,
    pub temperature: f64,
}

#[derive(Module, Debug)]
pub struct GateNet {
    pub w1: Linear,
    pub w2: Linear,
}

impl GateNet {
    /// `g = sigmoid(w2(relu(w1(x))))`, `[B, T, in] -> [B, T, 1]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        sigmoid(lin(&self.w2, relu(lin(&self.w1, x))))
    }
}

#[derive(Module, Debug)]
pub struct PluginNet {
    pub side: SideNet,
    pub gate: GateNet,
    /// Private `d_side -> d` output adapter (FedPer-style personal head), zero at init.
    pub personal: Linear,
}

/// What the plugin computes for a batch of backbone features.
pub struct PluginOutput {
    /// Side state `s`, `[B, T, d_side]`.
    pub side_state: Tensor<3>,
    /// `h_L + up(s) + personal(s)`, `[B, T, d]`, to go through the frozen head.
    pub side_hidden: Tensor<3>,
    /// Gate probability `g`, `[B, T, 1]`.
    pub gate: Tensor<3>,
}

impl PluginNet {
    /// `taps[k]` is the backbone hidden state at `shape.taps[k]`, each `[B, T, d]`.
    pub fn side_state(&self, taps: &[Tensor<3>]) -> Tensor<3> {
        self.side_state_from(taps.len(), |k| lin(&self.side.down[k], taps[k].clone()))
    }

    /// The side state from the taps' down-projections `down_k(h_k)`, each `[B, T, d_side]`
    /// (computed by whoever holds the shared `down` weights: the coordinator can).
    pub fn side_state_projected(&self, projected: &[Tensor<3>]) -> Tensor<3> {
        self.side_state_from(projected.len(), |k| projected[k].clone())
    }

    fn side_state_from(&self, n: usize, down: impl Fn(usize) -> Tensor<3>) -> Tensor<3> {
        let side = &self.side;
        match &side.alpha {
            Some(alpha) => {
                let mut s = side.blocks[0].forward(down(0));
                for k in 1..n {
                    let mu = sigmoid(alpha.val().narrow(0, k - 1, 1).div_scalar(side.temperature)).reshape([1, 1, 1]);
                    s = s * mu.clone() + down(k) * mu.neg().add_scalar(1.0);
                    s = side.blocks[k].forward(s);
                }
                s
            }
            None => {
                let mut s = down(0);
                for k in 1..n {
                    s = down(k) + lin(&side.adapters[k - 1], relu(s));
                }
                s
            }
        }
    }

    /// Gate probability from the normalised final hidden state (and the side state if the
    /// config asks for it).
    pub fn gate(&self, h_last_normed: Tensor<3>, side_state: Option<Tensor<3>>) -> Tensor<3> {
        let x = match side_state {
            Some(s) => Tensor::cat(vec![h_last_normed, s], 2),
            None => h_last_normed,
        };
        self.gate.forward(x)
    }

    pub fn forward(&self, taps: &[Tensor<3>], h_last: Tensor<3>, head: &FrozenHead, gate_uses_side: bool) -> PluginOutput {
        self.output(self.side_state(taps), h_last, head, gate_uses_side)
    }

    /// `h_last + up(s) + personal(s)`: the side plugin's hidden state, without the gate.
    pub fn side_hidden(&self, taps: &[Tensor<3>], h_last: Tensor<3>) -> Tensor<3> {
        self.side_hidden_from_state(self.side_state(taps), h_last)
    }

    /// The same from the side state `s`.
    pub fn side_hidden_from_state(&self, s: Tensor<3>, h_last: Tensor<3>) -> Tensor<3> {
        h_last + lin_sum(&self.side.up, &self.personal, s)
    }

    fn output(&self, s: Tensor<3>, h_last: Tensor<3>, head: &FrozenHead, gate_uses_side: bool) -> PluginOutput {
        let side_hidden = h_last.clone() + lin_sum(&self.side.up, &self.personal, s.clone());
        let gate = self.gate(head.norm(h_last), gate_uses_side.then(|| s.clone().detach()));
        PluginOutput { side_state: s, side_hidden, gate }
    }
}

/// A plugin with its configuration: what the client trains, stores and runs.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub net: PluginNet,
    pub config: SideConfig,
    pub shape: SideShape,
}

pub(crate) struct Init(pub(crate) StdRng);

impl Init {
    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(-bound..bound)).collect()
    }

    pub(crate) fn linear(&mut self, din: usize, dout: usize, zero: bool, device: &Device) -> Linear {
        let bound = 1.0 / (din as f32).sqrt();
        let w = if zero { vec![0.0; din * dout] } else { self.uniform(din * dout, bound) };
        Linear {
            weight: Param::from_data(TensorData::new(w, [din, dout]), device),
            bias: Some(Param::from_data(TensorData::new(vec![0.0f32; dout], [dout]), device)),
        }
    }
}

impl Plugin {
    pub fn new(config: &SideConfig, backbone: &BackboneConfig, device: &Device) -> Result<Self> {
        let shape = config.resolve(backbone)?;
        let mut init = Init(StdRng::seed_from_u64(config.seed));
        let (d, ds, n) = (shape.d_model, shape.d_side, shape.taps.len());
        let down = (0..n).map(|_| init.linear(d, ds, false, device)).collect();
        let ladder = config.variant == SideVariant::Ladder;
        let adapters = if ladder { vec![] } else { (1..n).map(|_| init.linear(ds, ds, false, device)).collect() };
        let blocks = if !ladder {
            vec![]
        } else {
            let f = config.ladder.ffn_mult * ds;
            (0..n)
                .map(|_| SideBlock {
                    norm1: RmsNorm::new(ds, 1e-5, device),
                    qkv: init.linear(ds, 3 * ds, false, device),
                    proj: init.linear(ds, ds, true, device),
                    norm2: RmsNorm::new(ds, 1e-5, device),
                    ff1: init.linear(ds, f, false, device),
                    ff2: init.linear(f, ds, true, device),
                    heads: config.ladder.heads,
                })
                .collect()
        };
        let alpha = (ladder && n > 1).then(|| Param::from_data(TensorData::new(vec![0.0f32; n - 1], [n - 1]), device));
        let gate_in = d + if config.gate.use_side_state { ds } else { 0 };
        let net = PluginNet {
            side: SideNet { down, adapters, blocks, alpha, up: init.linear(ds, d, true, device), temperature: config.ladder.temperature },
            gate: GateNet { w1: init.linear(gate_in, config.gate.hidden, false, device), w2: init.linear(config.gate.hidden, 1, true, device) },
            personal: init.linear(ds, d, true, device),
        };
        let plugin = Self { net, config: config.clone(), shape };
        // Fail early if the role rules leave any parameter without a role.
        plugin.split()?;
        Ok(plugin)
    }

    pub fn forward(&self, taps: &[Tensor<3>], h_last: Tensor<3>, head: &FrozenHead) -> PluginOutput {
        self.net.forward(taps, h_last, head, self.config.gate.use_side_state)
    }

    /// [`Self::forward`] from the taps' down-projections (see [`PluginNet::side_state_projected`]).
    pub fn forward_projected(&self, projected: &[Tensor<3>], h_last: Tensor<3>, head: &FrozenHead) -> PluginOutput {
        let s = self.net.side_state_projected(projected);
        self.net.output(s, h_last, head, self.config.gate.use_side_state)
    }

    pub fn params(&self) -> ParamSet {
        export_params(&self.net)
    }

    /// Shared and private parts, by the configured roles.
    pub fn split(&self) -> Result<(SharedParams, ParamSet)> {
        split_by_role(self.params(), &self.config.roles)
    }

    pub fn shared(&self) -> Result<SharedParams> {
        Ok(self.split()?.0)
    }

    /// Loads parameters by path (any subset, e.g. the global shared part or the private part).
    pub fn load(mut self, params: &ParamSet) -> Result<Self> {
        self.net = import_params(self.net, params)?;
        Ok(self)
    }

    pub fn to_device(mut self, device: &Device) -> Self {
        self.net = self.net.to_device(device);
        self
    }

    /// Multiply-accumulates per token (see [`SideConfig::macs_per_token`]).
    pub fn macs_per_token(&self, ctx: usize) -> f64 {
        self.config.macs_per_token(&self.shape, ctx)
    }
}
