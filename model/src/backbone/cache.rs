//! Key/value cache for incremental decoding, one sequence per cache: per layer and kv head,
//! the rotated keys and the values of every position so far, on the host as
//! `[position][dim]`. Appending a position writes in place (no copy of the history, unlike
//! concatenating tensors), the few-token forward (`decode.rs`) multiplies by each head's keys
//! and values directly, and truncating to an accepted prefix (speculative decoding) is a
//! length change.
use burn::tensor::{Device, Tensor};

use crate::tensor_util::{from_vec, to_vec};

#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Per kv head, `[position][dim]`.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) dim: usize,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        match self.k.first() {
            Some(k) if self.dim > 0 => k.len() / self.dim,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends positions given as `[positions][kv heads][dim]` host rows.
    pub(crate) fn push(&mut self, k: &[f32], v: &[f32], kv_heads: usize, dim: usize) {
        self.reserve(k.len() / (kv_heads * dim), kv_heads, dim);
        for (kr, vr) in k.chunks_exact(kv_heads * dim).zip(v.chunks_exact(kv_heads * dim)) {
            for g in 0..kv_heads {
                self.k[g].extend_from_slice(&kr[g * dim..(g + 1) * dim]);
                self.v[g].extend_from_slice(&vr[g * dim..(g + 1) * dim]);
            }
        }
    }

    /// Room for `t` more positions, so that appending them does not move the history.
    pub(crate) fn reserve(&mut self, t: usize, kv_heads: usize, dim: usize) {
        if self.k.is_empty() {
            (self.k, self.v, self.dim) = (vec![Vec::new(); kv_heads], vec![Vec::new(); kv_heads], dim);
        }
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.reserve(t * dim);
        }
    }

    /// Appends `t` zeroed positions for the caller to fill (the few-token forward writes its
    /// keys and values there directly).
    pub(crate) fn grow(&mut self, t: usize, kv_heads: usize, dim: usize) {
        self.reserve(t, kv_heads, dim);
        let len = (self.len() + t) * dim;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.resize(len, 0.0);
        }
    }

    /// Appends this step's keys/values `[1, kv heads, t, dim]` and returns the whole history
    /// in the same layout (the tensor forward's attention reads it).
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, h, _, d] = k.dims();
        assert_eq!(b, 1, "a KV cache holds one sequence");
        let device: Device = k.device();
        self.push(&to_vec(k.swap_dims(1, 2)), &to_vec(v.swap_dims(1, 2)), h, d);
        let t = self.len();
        let all = |heads: &Vec<Vec<f32>>| from_vec::<4>(heads.concat(), [1, h, t, d], &device);
        (all(&self.k), all(&self.v))
    }

    /// Drops cached positions from `len` on (used when a drafted suffix is rejected).
    pub fn truncate(&mut self, len: usize) {
        let keep = len.min(self.len()) * self.dim;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.truncate(keep);
        }
    }
}

/// The cache of a whole decoder for one generation session.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerCache::default(); num_layers] }
    }

    /// A cache that holds `positions` without ever growing its buffers: its memory is
    /// reserved once ([`Self::bytes_per_position`] each).
    pub fn with_capacity(cfg: &crate::config::BackboneConfig, positions: usize) -> Self {
        let mut c = Self::new(cfg.num_layers);
        for l in &mut c.layers {
            l.reserve(positions, cfg.num_kv_heads, cfg.head_dim);
        }
        c
    }

    /// Host bytes a position takes: a key and a value per layer and kv head.
    pub fn bytes_per_position(cfg: &crate::config::BackboneConfig) -> usize {
        cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * std::mem::size_of::<f32>()
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.truncate(len);
        }
    }
}
