//! Side plugin configuration (the `[side]` table of client and experiment TOML files).
use serde::{Deserialize, Serialize};

use super::params::RoleRules;
use crate::config::BackboneConfig;
use crate::error::{ModelError, Result};
use crate::features::Positions;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideVariant {
    /// SPA's released design: a chain of per-token MLPs, `s = down_i(h_i) + adapter_i(relu(s))`.
    #[default]
    Mlp,
    /// LST: small side transformer blocks fed through gated ladder connections.
    Ladder,
}

impl SideVariant {
    /// The positions whose backbone states the variant reads: the MLP is per token, so only
    /// the positions that carry a loss; the ladder attends over every position.
    pub fn positions(self) -> Positions {
        match self {
            Self::Mlp => Positions::LossOnly,
            Self::Ladder => Positions::All,
        }
    }
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
    /// Empty means all of them, or [`LARGE_DEFAULT_TAPS`] evenly spaced ones on a
    /// [large](is_large) backbone.
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

/// Backbones of at least this many parameters are "large": by default their side plugin taps
/// [`LARGE_DEFAULT_TAPS`] layers and their features travel as f16. A device fetches
/// `taps x hidden` values per token; for SmolLM2-135M all 31 taps in f32 are 71 KB per token,
/// 8 taps in f16 9 KB (docs/BENCHMARKS.md has what the subset costs in quality).
pub const LARGE_BACKBONE_PARAMS: usize = 50_000_000;
pub const LARGE_DEFAULT_TAPS: usize = 8;

pub fn is_large(bb: &BackboneConfig) -> bool {
    bb.num_params() >= LARGE_BACKBONE_PARAMS
}

/// The taps an empty `taps` means: every layer, or on a large backbone
/// [`LARGE_DEFAULT_TAPS`] evenly spaced from the embeddings to the last block.
pub fn default_taps(bb: &BackboneConfig) -> Vec<usize> {
    let l = bb.num_layers;
    if !is_large(bb) || l < LARGE_DEFAULT_TAPS {
        return (0..=l).collect();
    }
    let n = LARGE_DEFAULT_TAPS - 1;
    (0..=n).map(|i| (i * l + n / 2) / n).collect()
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

    /// Parameters of the plugin this config builds on `shape` (side network, gate, personal
    /// layer). Analytic, so a device can check its memory before building one.
    pub fn param_count(&self, shape: &SideShape) -> usize {
        let (d, ds, n) = (shape.d_model, shape.d_side, shape.taps.len());
        let lin = |i: usize, o: usize| i * o + o;
        let mut p = n * lin(d, ds) + 2 * lin(ds, d); // down, up, personal
        match self.variant {
            SideVariant::Mlp => p += n.saturating_sub(1) * lin(ds, ds),
            SideVariant::Ladder => {
                let f = self.ladder.ffn_mult * ds;
                p += n * (2 * ds + lin(ds, 3 * ds) + lin(ds, ds) + lin(ds, f) + lin(f, ds)) + n.saturating_sub(1);
            }
        }
        let gin = d + if self.gate.use_side_state { ds } else { 0 };
        p + lin(gin, self.gate.hidden) + lin(self.gate.hidden, 1)
    }

    pub fn resolve(&self, bb: &BackboneConfig) -> Result<SideShape> {
        let l = bb.num_layers;
        if self.reduction == 0 || !bb.hidden_size.is_multiple_of(self.reduction) {
            return Err(ModelError::InvalidInput(format!("reduction {} must divide hidden_size {}", self.reduction, bb.hidden_size)));
        }
        let d_side = bb.hidden_size / self.reduction;
        let mut taps = if self.taps.is_empty() { default_taps(bb) } else { self.taps.clone() };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(layers: usize, hidden: usize, vocab: usize) -> BackboneConfig {
        BackboneConfig::from_json(&format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":{hidden},
            "intermediate_size":{},"num_hidden_layers":{layers},"num_attention_heads":9,"num_key_value_heads":3}}"#,
            hidden * 8 / 3
        ))
        .unwrap()
    }

    #[test]
    fn large_backbones_tap_a_spread_subset_by_default() {
        // SmolLM2-135M's shape: 8 taps from the embeddings to the last block.
        let smollm2 = llama(30, 576, 49152);
        assert!(is_large(&smollm2));
        assert_eq!(default_taps(&smollm2), vec![0, 4, 9, 13, 17, 21, 26, 30]);
        let shape = SideConfig::default().resolve(&smollm2).unwrap();
        assert_eq!(shape.feature_layers, vec![0, 4, 9, 13, 17, 21, 26, 30]);
        // A small backbone keeps every layer; explicit taps always win.
        let small = llama(4, 252, 68);
        assert!(!is_large(&small));
        assert_eq!(default_taps(&small), (0..=4).collect::<Vec<_>>());
        let explicit = SideConfig { taps: vec![30, 2], ..SideConfig::default() }.resolve(&smollm2).unwrap();
        assert_eq!((explicit.taps, explicit.feature_layers), (vec![2, 30], vec![2, 30]));
    }

    #[test]
    fn the_analytic_parameter_count_is_the_built_plugin_s() {
        let bb = llama(4, 288, 68);
        for variant in [SideVariant::Mlp, SideVariant::Ladder] {
            let mut cfg = SideConfig { variant, ..SideConfig::default() };
            cfg.ladder.heads = 4;
            let shape = cfg.resolve(&bb).unwrap();
            let built = crate::side::Plugin::new(&cfg, &bb, &crate::burn::tensor::Device::flex()).unwrap().params();
            let n: usize = built.tensors.values().map(|t| t.values.len()).sum();
            assert_eq!(cfg.param_count(&shape), n, "{variant:?}");
        }
    }
}
