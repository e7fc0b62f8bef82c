//! Causal self-attention with grouped-query heads (`num_key_value_heads <= num_heads`).
use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::cache::LayerCache;
use super::layers::Linear;
use super::rope::Rope;

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl SelfAttention {
    /// `x: [batch, seq, hidden]`; with a cache, `x` holds the positions after the cached ones.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, hkv, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let q = self.q_proj.forward(x.clone()).reshape([b, t, h, dh]).swap_dims(1, 2);
        let k = self.k_proj.forward(x.clone()).reshape([b, t, hkv, dh]).swap_dims(1, 2);
        let v = self.v_proj.forward(x).reshape([b, t, hkv, dh]).swap_dims(1, 2);
        let q = rope.apply(q, offset);
        let k = rope.apply(k, offset);
        let (k, v) = match cache {
            Some(c) => c.append(k, v),
            None => (k, v),
        };
        let (k, v) = (repeat_kv(k, h / hkv), repeat_kv(v, h / hkv));
        // is_causal with seq_k > seq_q masks relative to the last query, which is what
        // incremental decoding with a cache needs.
        let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let o = attention(q, k, v, None, None, opts);
        self.o_proj.forward(o.swap_dims(1, 2).reshape([b, t, h * dh]))
    }
}

/// `[b, hkv, t, dh] -> [b, hkv * n_rep, t, dh]`, each kv head serving `n_rep` query heads.
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, hkv, t, dh] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, hkv, n_rep, t, dh]).reshape([b, hkv * n_rep, t, dh])
}
