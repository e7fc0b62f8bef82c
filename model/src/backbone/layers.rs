//! The three leaf layers of a LLaMA decoder, named as in HF checkpoints.
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// A bias-free linear map. The weight is kept as `[in, out]` (burn's matmul layout, the fast
/// one here); checkpoints store HF's `[out, in]`, and `checkpoint.rs` transposes on the way in
/// and out, in one place. A served weight may be f16 or bf16 (see `WeightDtype`); products
/// then run through `crate::matmul`'s kernels, which also take few-row f32 products.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    pub fn from_data(d_in: usize, d_out: usize, values: Vec<f32>, device: &Device) -> Self {
        Self { weight: Param::from_data(TensorData::new(values, [d_in, d_out]), device) }
    }

    /// Leading dimensions are flattened first: one `[N, in] x [in, out]` gemm. A batched 3-D
    /// matmul runs one gemm per batch row, which is no slower for `[16, 256, d]` but ruinous
    /// for per-token batches `[N, 1, d]` (benches/model.rs, docs/bench-log/2026-11-25-model-hot-paths.md).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let din = dims[D - 1];
        let n: usize = dims[..D - 1].iter().product();
        let w = self.weight.val();
        let dout = w.dims()[1];
        let mut out_dims = dims;
        out_dims[D - 1] = dout;
        let x = x.reshape([n, din]);
        match crate::matmul::cpu_matmul(&x, &w) {
            Some(y) => y,
            None => x.matmul(w),
        }
        .reshape(out_dims)
    }
}

/// Root-mean-square norm (no mean subtraction, no bias), computed in f32 like HF.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        Self { weight: Param::from_data(TensorData::new(vec![1.0f32; dim], [dim]), device), eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let ms = x.clone().square().mean_dim(D - 1);
        let inv = (ms + self.eps).sqrt().recip();
        x * inv * self.weight.val().unsqueeze::<D>()
    }
}

/// Inverted dropout, for pretraining only: a no-op at `p == 0` or off an autodiff device, so
/// serving, parity and feature extraction never see it.
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
    if p <= 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let keep = 1.0 - p;
    let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
    x * mask * (1.0 / keep)
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// Always f32, whatever precision the table is held in.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = burn::tensor::module::embedding(self.weight.val(), ids);
        if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) }
    }
}
