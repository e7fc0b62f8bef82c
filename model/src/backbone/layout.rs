//! The HF layout of a LLaMA decoder, written once: each tensor's name and HF shape, and
//! where it sits in [`DecoderLayer`]. Loading, saving, random initialisation, the GGUF
//! import and the check of a checkpoint's tensor list all read it from here.
use super::attention::SelfAttention;
use super::block::DecoderLayer;
use super::layers::{Linear, RmsNorm};
use super::mlp::Mlp;
use crate::BackboneConfig;

pub(crate) const EMBED: &str = "model.embed_tokens.weight";
pub(crate) const FINAL_NORM: &str = "model.norm.weight";
pub(crate) const LM_HEAD: &str = "lm_head.weight";

/// The projections of a decoder layer, in checkpoint order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// The norms of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Norm {
    Input,
    PostAttention,
}

/// `model.layers.{i}.` + a part's suffix.
fn in_layer(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    pub fn suffix(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj.weight",
            Proj::K => "self_attn.k_proj.weight",
            Proj::V => "self_attn.v_proj.weight",
            Proj::O => "self_attn.o_proj.weight",
            Proj::Gate => "mlp.gate_proj.weight",
            Proj::Up => "mlp.up_proj.weight",
            Proj::Down => "mlp.down_proj.weight",
        }
    }

    pub fn name(self, layer: usize) -> String {
        in_layer(layer, self.suffix())
    }

    /// (in, out): ours is `[in, out]`, HF's `[out, in]`.
    pub fn dims(self, c: &BackboneConfig) -> (usize, usize) {
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            Proj::Q => (d, qd),
            Proj::K | Proj::V => (d, kvd),
            Proj::O => (qd, d),
            Proj::Gate | Proj::Up => (d, ff),
            Proj::Down => (ff, d),
        }
    }

    /// The projections that write into the residual stream.
    pub fn is_output(self) -> bool {
        matches!(self, Proj::O | Proj::Down)
    }
}

impl Norm {
    pub const ALL: [Norm; 2] = [Norm::Input, Norm::PostAttention];

    pub fn suffix(self) -> &'static str {
        match self {
            Norm::Input => "input_layernorm.weight",
            Norm::PostAttention => "post_attention_layernorm.weight",
        }
    }

    pub fn name(self, layer: usize) -> String {
        in_layer(layer, self.suffix())
    }
}

impl DecoderLayer {
    /// A layer from its projections (in [`Proj::ALL`] order) and norms ([`Norm::ALL`]).
    pub(crate) fn assemble(c: &BackboneConfig, [q, k, v, o, gate, up, down]: [Linear; 7], [input, post]: [RmsNorm; 2]) -> Self {
        DecoderLayer {
            self_attn: SelfAttention { q_proj: q, k_proj: k, v_proj: v, o_proj: o, num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim },
            mlp: Mlp { gate_proj: gate, up_proj: up, down_proj: down },
            input_layernorm: input,
            post_attention_layernorm: post,
        }
    }

    /// The projections in [`Proj::ALL`] order.
    pub(crate) fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// The norms in [`Norm::ALL`] order.
    pub(crate) fn norms(&self) -> [&RmsNorm; 2] {
        [&self.input_layernorm, &self.post_attention_layernorm]
    }
}
