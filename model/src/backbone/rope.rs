//! Rotary position embeddings, HF "rotate_half" convention: the head dimension is split in
//! two halves (not interleaved pairs), and `cos`/`sin` repeat the frequencies twice.
use burn::tensor::{Device, Tensor, TensorData};

use crate::config::{BackboneConfig, RopeScaling};

/// Precomputed `cos`/`sin` tables `[max_positions, head_dim]`. Not a module: they are derived
/// from the config, never trained, and must not be written into checkpoints.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    pub max_positions: usize,
}

/// Inverse frequencies `1 / theta^(2i/d)`, with the configured scaling applied.
pub fn inverse_frequencies(cfg: &BackboneConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let old = original_max_position as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(cfg: &BackboneConfig, device: &Device) -> Self {
        let inv = inverse_frequencies(cfg);
        let (n, d) = (cfg.max_position_embeddings, cfg.head_dim);
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for p in 0..n {
            for _half in 0..2 {
                for f in &inv {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Self { cos: Tensor::from_data(TensorData::new(cos, [n, d]), device), sin: Tensor::from_data(TensorData::new(sin, [n, d]), device), max_positions: n }
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` whose first position is `offset`.
    pub fn apply(&self, x: Tensor<4>, offset: usize) -> Tensor<4> {
        let [_, _, t, d] = x.dims();
        let cos = self.cos.clone().slice([offset..offset + t, 0..d]).unsqueeze::<4>();
        let sin = self.sin.clone().slice([offset..offset + t, 0..d]).unsqueeze::<4>();
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}
