//! Key/value cache for incremental decoding: one entry per layer, keys already rotated.
use burn::tensor::Tensor;

#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys/values and returns the whole history.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Drops cached positions from `len` on (used when a drafted suffix is rejected).
    pub fn truncate(&mut self, len: usize) {
        if let Some((k, v)) = self.kv.take()
            && len > 0
        {
            let [b, h, _, d] = k.dims();
            let len = len.min(k.dims()[2]);
            self.kv = Some((k.slice([0..b, 0..h, 0..len, 0..d]), v.slice([0..b, 0..h, 0..len, 0..d])));
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
