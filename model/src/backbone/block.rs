//! One pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
use burn::module::Module;
use burn::tensor::Tensor;

use super::attention::SelfAttention;
use super::cache::LayerCache;
use super::layers::{RmsNorm, dropout};
use super::mlp::Mlp;
use super::rope::Rope;

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: SelfAttention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `drop`: residual-branch dropout probability (pretraining only; 0 when serving).
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>, drop: f64) -> Tensor<3> {
        let a = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rope, cache);
        let h = x + dropout(a, drop);
        h.clone() + dropout(self.mlp.forward(self.post_attention_layernorm.forward(h)), drop)
    }
}
