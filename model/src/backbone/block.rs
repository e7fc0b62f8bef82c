//! One pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
use burn::module::Module;
use burn::tensor::Tensor;

use super::attention::SelfAttention;
use super::cache::LayerCache;
use super::layers::RmsNorm;
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
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), rope, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}
