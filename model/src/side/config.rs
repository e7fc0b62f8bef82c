//! Side plugin configuration (the `[side]` table of client and experiment TOML files).
use serde::{Deserialize, Serialize};

use super::params::RoleRules;
use crate::config::BackboneConfig;
use crate::error::{ModelError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideVariant {
    /// SPA's released design: a chain of per-token MLPs, `s = down_i(h_i) + adapter_i(relu(s))`.
    #[default]
    Mlp,
    /// LST: small side transformer blocks fed through gated ladder connections.
    Ladder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LadderConfig {
    pub heads: usize,
    /// Ladder gate temperature `T` in `mu_i = sigmoid(alpha_i / T)`.
    pub temperature: f64,
    /// Side MLP width as a multiple of the side width.
    pub ffn_mult: usize,
}

impl Default for LadderConfig {
    fn default() -> Self {
        Self { heads: 2, temperature: 0.1, ffn_mult: 2 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    pub hidden: usize,
    /// Feed the side state to the gate too. Off by default: then the gate needs only the
    /// backbone's final hidden state, which is what speculative collaborative decoding sends.
    pub use_side_state: bool,
    /// `g > threshold` routes a token to the side plugin at inference.
    pub threshold: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { hidden: 32, use_side_state: false, threshold: 0.5 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SideConfig {
    pub variant: SideVariant,
    /// Reduction factor r: the side width is `hidden_size / r`.
    pub reduction: usize,
    /// Backbone layers the side network reads (0 = embeddings, i = output of block i).
    /// Empty means all of them.
    pub taps: Vec<usize>,
    pub ladder: LadderConfig,
    pub gate: GateConfig,
    pub roles: RoleRules,
    /// Seed of the parameter initialisation.
    pub seed: u64,
}

impl Default for SideConfig {
    fn default() -> Self {
        Self {
            variant: SideVariant::Mlp,
            reduction: 8,
            taps: vec![],
            ladder: LadderConfig::default(),
            gate: GateConfig::default(),
            roles: RoleRules::default(),
            seed: 0,
        }
    }
}

/// The config resolved against a backbone: concrete taps and widths.
#[derive(Clone, Debug, PartialEq)]
pub struct SideShape {
    pub d_model: usize,
    pub d_side: usize,
    pub vocab: usize,
    /// Sorted, deduplicated tap layers.
    pub taps: Vec<usize>,
    /// Layers whose features a device needs: the taps plus the last layer (gate input).
    pub feature_layers: Vec<usize>,
}

impl SideConfig {
    /// Multiply-accumulates per token of the side network, gate and personal head
    /// (`ctx` = context length, for the ladder's attention), not counting the vocabulary
    /// projection, which the plugin shares with the backbone's own output. Analytic, so it
    /// can be asked for backbones too large to instantiate here.
    pub fn macs_per_token(&self, shape: &SideShape, ctx: usize) -> f64 {
        let (d, ds, n) = (shape.d_model as f64, shape.d_side as f64, shape.taps.len() as f64);
        let mut macs = n * d * ds + 2.0 * ds * d; // down, up, personal
        match self.variant {
            SideVariant::Mlp => macs += (n - 1.0) * ds * ds,
            SideVariant::Ladder => {
                let f = self.ladder.ffn_mult as f64 * ds;
                macs += n * (4.0 * ds * ds + 2.0 * ds * ctx as f64 + 2.0 * ds * f);
            }
        }
        let gin = d + if self.gate.use_side_state { ds } else { 0.0 };
        macs + gin * self.gate.hidden as f64 + self.gate.hidden as f64
    }

    pub fn resolve(&self, bb: &BackboneConfig) -> Result<SideShape> {
        let l = bb.num_layers;
        if self.reduction == 0 || !bb.hidden_size.is_multiple_of(self.reduction) {
            return Err(ModelError::InvalidInput(format!(
                "reduction {} must divide hidden_size {}",
                self.reduction, bb.hidden_size
            )));
        }
        let d_side = bb.hidden_size / self.reduction;
        let mut taps = if self.taps.is_empty() { (0..=l).collect() } else { self.taps.clone() };
        taps.sort_unstable();
        taps.dedup();
        if let Some(bad) = taps.iter().find(|&&t| t > l) {
            return Err(ModelError::InvalidInput(format!("tap layer {bad} out of range 0..={l}")));
        }
        if self.variant == SideVariant::Ladder && (self.ladder.heads == 0 || !d_side.is_multiple_of(self.ladder.heads)) {
            return Err(ModelError::InvalidInput(format!("ladder heads {} must divide side width {d_side}", self.ladder.heads)));
        }
        if self.gate.hidden == 0 || !(0.0..=1.0).contains(&self.gate.threshold) {
            return Err(ModelError::InvalidInput("gate.hidden must be > 0 and gate.threshold in [0, 1]".into()));
        }
        let mut feature_layers = taps.clone();
        if !feature_layers.contains(&l) {
            feature_layers.push(l);
        }
        Ok(SideShape { d_model: bb.hidden_size, d_side, vocab: bb.vocab_size, taps, feature_layers })
    }
}
