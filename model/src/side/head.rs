//! The backbone's frozen final norm and LM head, copied to the device once per backbone
//! version so that side outputs never travel back to the cloud.
use burn::tensor::{DType, Device, Tensor};

use super::params::{NamedTensor, ParamSet};
use crate::backbone::Backbone;
use crate::error::{ModelError, Result};
use crate::tensor_util::{from_vec, to_vec};

#[derive(Debug, Clone)]
pub struct FrozenHead {
    // Private: `scaled` is derived from the other two and must not go stale.
    norm_weight: Tensor<1>,
    eps: f64,
    /// `[hidden, vocab]`.
    weight: Tensor<2>,
    /// `diag(norm_weight) * weight`: logits are `(h * inv_rms(h)) @ scaled` with the
    /// per-row `inv_rms` applied to the `[N, vocab]` result instead of the `[N, hidden]`
    /// input, two full-width multiplies fewer per call (the side's training step runs it).
    scaled: Tensor<2>,
}

pub const NORM: &str = "model.norm.weight";
pub const HEAD: &str = "lm_head.weight";

impl FrozenHead {
    /// The head a device holds (f32, as [`Self::params_of`] ships it), for training.
    pub fn device_copy(bb: &Backbone) -> Self {
        Self::from_backbone(bb).as_f32().into_owned()
    }

    /// The head in the backbone's own precision (serving: generation from a local backbone).
    pub fn from_backbone(bb: &Backbone) -> Self {
        let weight = match &bb.net.lm_head {
            Some(h) => h.weight.val(),
            None => bb.net.model.embed_tokens.weight.val().transpose(),
        };
        Self::new(bb.net.model.norm.weight.val(), bb.config.rms_norm_eps, weight)
    }

    /// `weight` may be half precision (a served backbone's); `scaled` is computed in f32 and
    /// held in the same precision.
    fn new(norm_weight: Tensor<1>, eps: f64, weight: Tensor<2>) -> Self {
        // f32 (training) as row-major [hidden, vocab], burn's fast matmul layout; half
        // precision (serving) as row-major [vocab, hidden] seen transposed, the layout the
        // decoding kernels read front to back (`crate::matmul`), built row by row.
        let scaled = match crate::matmul::scale_rows(&weight, &to_vec(norm_weight.clone())) {
            Some(s) => s,
            None => {
                let s = weight.clone().cast(DType::F32) * norm_weight.clone().unsqueeze_dim::<2>(1);
                let dtype = weight.dtype();
                Tensor::from_data(s.into_data().convert_dtype(dtype), (&weight.device(), dtype))
            }
        };
        Self { norm_weight, eps, weight, scaled }
    }

    /// This head in f32, for training (whose hand-derived backward multiplies by `scaled`
    /// with burn's own matmul); borrowed when it already is.
    pub fn as_f32(&self) -> std::borrow::Cow<'_, Self> {
        if self.weight.dtype() == DType::F32 {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(Self::new(self.norm_weight.clone(), self.eps, self.weight.clone().cast(DType::F32)))
        }
    }

    /// The head of `bb` as named tensors for shipping (HF names, `lm_head` as
    /// `[hidden, vocab]`, f32), without building the head: the coordinator only sends it.
    pub fn params_of(bb: &Backbone) -> ParamSet {
        let weight = match &bb.net.lm_head {
            Some(h) => h.weight.val(),
            None => bb.net.model.embed_tokens.weight.val().transpose(),
        };
        let norm = bb.net.model.norm.weight.val();
        let mut p = ParamSet::default();
        let n = norm.dims()[0];
        p.tensors.insert(NORM.into(), NamedTensor { shape: vec![n], values: to_vec(norm) });
        let [d, v] = weight.dims();
        p.tensors.insert(HEAD.into(), NamedTensor { shape: vec![d, v], values: to_vec(weight) });
        p
    }

    pub fn from_params(p: &ParamSet, eps: f64, device: &Device) -> Result<Self> {
        let get = |k: &str| p.tensors.get(k).ok_or_else(|| ModelError::Params(format!("head is missing '{k}'")));
        let (norm, head) = (get(NORM)?, get(HEAD)?);
        if norm.shape.len() != 1 || head.shape.len() != 2 || head.shape[0] != norm.shape[0] {
            return Err(ModelError::Params(format!("inconsistent head shapes {:?} / {:?}", norm.shape, head.shape)));
        }
        Ok(Self::new(
            from_vec(norm.values.clone(), [norm.shape[0]], device),
            eps,
            from_vec(head.values.clone(), [head.shape[0], head.shape[1]], device),
        ))
    }

    pub(crate) fn norm_weight(&self) -> Tensor<1> {
        self.norm_weight.clone()
    }

    /// `[hidden, vocab]`: the head with the norm weight folded in (see the field).
    pub(crate) fn scaled(&self) -> Tensor<2> {
        self.scaled.clone()
    }

    pub fn device(&self) -> Device {
        self.weight.device()
    }

    pub fn hidden_size(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `1 / sqrt(mean(x^2) + eps)` over the last dimension, kept as size 1.
    pub(crate) fn inv_rms<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        (x.square().mean_dim(D - 1) + self.eps).sqrt().recip()
    }

    pub fn norm<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.clone() * self.inv_rms(x) * self.norm_weight.clone().unsqueeze::<D>()
    }

    /// `norm(hidden) @ weight` as one 2-D product over all positions (a batched matmul would
    /// run one per batch row), the row scaling moved after it (see `scaled`).
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = hidden.dims();
        let v = self.vocab_size();
        let inv = self.inv_rms(hidden.clone());
        let h = hidden.reshape([b * t, d]);
        let z = match crate::matmul::cpu_matmul(&h, &self.scaled) {
            Some(z) => z,
            None => h.matmul(self.scaled.clone()),
        };
        z.reshape([b, t, v]) * inv
    }

    /// The same head on another device, in f32 (e.g. the autodiff device used for training).
    pub fn to_device(&self, device: &Device) -> Self {
        let w = self.weight.clone().cast(DType::F32).to_device(device);
        Self::new(self.norm_weight.clone().to_device(device), self.eps, w)
    }
}
