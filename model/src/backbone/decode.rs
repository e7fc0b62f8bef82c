//! The few-token forward (decoding a token, verifying a handful of drafts) on the flex
//! backend, in plain loops over host vectors and `crate::matmul`'s kernels. At one position
//! per call the tensor forward's per-op overhead (dispatch, allocation, the grouped-query
//! heads repeated, the cache concatenated) costs more than its matrix products; this path
//! has none of it. The math is the tensor forward's (`llama.rs`, `attention.rs`, ...), op for
//! op, and `tests/parity.rs` holds both to HF's logits.
use super::cache::LayerCache;
use super::llama::Backbone;
use crate::matmul::{Order, SMALL_M, WeightView, Weights, f32_values, matmul};

/// Most new positions per call; longer inputs (prompts) take the tensor forward.
pub const MAX_POSITIONS: usize = SMALL_M;

/// What [`forward_few`] returns: `[t, hidden]` per requested tap, the last block's output
/// (before the final norm) and, if asked, `[t, vocab]` logits.
pub struct HostOutput {
    pub taps: Vec<Vec<f32>>,
    pub last_hidden: Vec<f32>,
    pub logits: Option<Vec<f32>>,
}

/// `x * inv_rms(x) * w` per row of `x`, in place.
fn rms_norm(x: &mut [f32], w: &[f32], eps: f64) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps as f32).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// `cos` and `sin` of every rotary frequency at positions `first..first + t`, computed in
/// f64 as `rope.rs` builds its tables, once per call for every layer.
fn rotations(first: usize, t: usize, inv_freq: &[f64]) -> Vec<(Vec<f32>, Vec<f32>)> {
    (first..first + t)
        .map(|p| inv_freq.iter().map(|f| ((p as f64 * f).cos() as f32, (p as f64 * f).sin() as f32)).unzip())
        .collect()
}

/// HF's rotate-half RoPE on rows of `heads x dim`, row `r` rotated by `rot[r]`.
fn rope(x: &mut [f32], heads: usize, dim: usize, rot: &[(Vec<f32>, Vec<f32>)]) {
    let half = dim / 2;
    for (row, (cos, sin)) in x.chunks_exact_mut(heads * dim).zip(rot) {
        for head in row.chunks_exact_mut(dim) {
            for j in 0..half {
                let (a, b) = (head[j], head[j + half]);
                head[j] = a * cos[j] - b * sin[j];
                head[j + half] = b * cos[j] + a * sin[j];
            }
        }
    }
}

/// Causal attention of `t` new query rows over the whole cache (which already holds them).
/// The query heads sharing a kv head go together: their scores are one product with that
/// head's keys, their outputs one product with its values (no repeated heads, each key and
/// value read once).
fn attend(q: &[f32], cache: &LayerCache, heads: usize, kv_heads: usize, dim: usize) -> Vec<f32> {
    let total = cache.len();
    let t = q.len() / (heads * dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    for g in 0..kv_heads {
        // Rows (r, h) of this group's queries, `[t * group, dim]`.
        let mut qg = Vec::with_capacity(t * group * dim);
        for r in 0..t {
            let at = (r * heads + g * group) * dim;
            qg.extend_from_slice(&q[at..at + group * dim]);
        }
        let keys = Weights::F32(&cache.k[g]);
        let mut p = vec![0f32; t * group * total];
        matmul(&qg, t * group, dim, keys, Order::NK, total, &mut p);
        for (row, scores) in p.chunks_exact_mut(total).enumerate() {
            // Query row r sees the cached positions before it and itself.
            let visible = total - t + row / group + 1;
            let max = scores[..visible].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
            let mut sum = 0f32;
            for s in &mut scores[..visible] {
                *s = (*s * scale - max).exp();
                sum += *s;
            }
            scores[..visible].iter_mut().for_each(|s| *s /= sum);
            scores[visible..].iter_mut().for_each(|s| *s = 0.0);
        }
        let mut og = vec![0f32; t * group * dim];
        matmul(&p, t * group, total, Weights::F32(&cache.v[g]), Order::KN, dim, &mut og);
        for r in 0..t {
            let at = (r * heads + g * group) * dim;
            out[at..at + group * dim].copy_from_slice(&og[r * group * dim..(r + 1) * group * dim]);
        }
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Runs `ids` (at most [`MAX_POSITIONS`]) after the cached positions, appending to `cache`.
/// `None` when the weights are not flex tensors (another backend), with `cache` as it was:
/// the caller then takes the tensor forward. `taps` must be validated by the caller.
pub fn forward_few(bb: &Backbone, ids: &[u32], taps: &[usize], want_logits: bool, cache: &mut super::KvCache) -> Option<HostOutput> {
    let before = cache.len();
    // The whole step runs on a pool worker: each of its ~7 products per layer then splits
    // from inside the pool (the caller's share runs here, the other cores steal), instead of
    // being injected from outside with the caller asleep on a latch until it is done.
    let out = if rayon::current_thread_index().is_some() {
        run(bb, ids, taps, want_logits, cache)
    } else {
        rayon::scope(|_| run(bb, ids, taps, want_logits, cache))
    };
    if out.is_none() {
        cache.truncate(before);
    }
    out
}

fn run(bb: &Backbone, ids: &[u32], taps: &[usize], want_logits: bool, cache: &mut super::KvCache) -> Option<HostOutput> {
    let c = &bb.config;
    let (d, t) = (c.hidden_size, ids.len());
    let (heads, kv_heads, dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let first = cache.len();
    let rot = rotations(first, t, &super::rope::inverse_frequencies(c));
    let embed = WeightView::of(&bb.net.model.embed_tokens.weight.val())?;
    let mut x = vec![0f32; t * d];
    for (row, &id) in x.chunks_exact_mut(d).zip(ids) {
        embed.row(id as usize, row);
    }
    let mut kept: Vec<Option<Vec<f32>>> = vec![None; taps.len()];
    let mut keep = |layer: usize, x: &[f32]| {
        for (slot, _) in kept.iter_mut().zip(taps).filter(|(_, l)| **l == layer) {
            *slot = Some(x.to_vec());
        }
    };
    keep(0, &x);
    for (i, layer) in bb.net.model.layers.iter().enumerate() {
        let a = &layer.self_attn;
        let mut h = x.clone();
        rms_norm(&mut h, f32_values(&layer.input_layernorm.weight.val())?.as_slice()?, c.rms_norm_eps);
        let mut q = WeightView::of(&a.q_proj.weight.val())?.matmul(&h, t);
        let mut k = WeightView::of(&a.k_proj.weight.val())?.matmul(&h, t);
        let v = WeightView::of(&a.v_proj.weight.val())?.matmul(&h, t);
        rope(&mut q, heads, dim, &rot);
        rope(&mut k, kv_heads, dim, &rot);
        let lc = &mut cache.layers[i];
        lc.push(&k, &v, kv_heads, dim);
        let o = attend(&q, lc, heads, kv_heads, dim);
        add(&mut x, &WeightView::of(&a.o_proj.weight.val())?.matmul(&o, t));
        let mut h = x.clone();
        rms_norm(&mut h, f32_values(&layer.post_attention_layernorm.weight.val())?.as_slice()?, c.rms_norm_eps);
        let mlp = &layer.mlp;
        let g = WeightView::of(&mlp.gate_proj.weight.val())?.matmul(&h, t);
        let u = WeightView::of(&mlp.up_proj.weight.val())?.matmul(&h, t);
        let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        add(&mut x, &WeightView::of(&mlp.down_proj.weight.val())?.matmul(&act, t));
        keep(i + 1, &x);
    }
    let logits = if want_logits {
        let mut h = x.clone();
        rms_norm(&mut h, f32_values(&bb.net.model.norm.weight.val())?.as_slice()?, c.rms_norm_eps);
        let head = match &bb.net.lm_head {
            Some(l) => l.weight.val(),
            None => bb.net.model.embed_tokens.weight.val().transpose(),
        };
        Some(WeightView::of(&head)?.matmul(&h, t))
    } else {
        None
    };
    Some(HostOutput { taps: kept.into_iter().map(|s| s.expect("validated tap")).collect(), last_hidden: x, logits })
}
