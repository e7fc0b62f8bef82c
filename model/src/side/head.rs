//! The backbone's frozen final norm and LM head, copied to the device once per backbone
//! version so that side outputs never travel back to the cloud.
use burn::tensor::{Device, Tensor};

use super::params::{NamedTensor, ParamSet};
use crate::backbone::Backbone;
use crate::error::{ModelError, Result};
use crate::tensor_util::{from_vec, to_vec};

#[derive(Debug, Clone)]
pub struct FrozenHead {
    pub norm_weight: Tensor<1>,
    pub eps: f64,
    /// `[hidden, vocab]`.
    pub weight: Tensor<2>,
}

pub const NORM: &str = "model.norm.weight";
pub const HEAD: &str = "lm_head.weight";

impl FrozenHead {
    pub fn from_backbone(bb: &Backbone) -> Self {
        let weight = match &bb.net.lm_head {
            Some(h) => h.weight.val(),
            None => bb.net.model.embed_tokens.weight.val().transpose(),
        };
        Self { norm_weight: bb.net.model.norm.weight.val(), eps: bb.config.rms_norm_eps, weight }
    }

    /// The head as named tensors (HF names, `lm_head` as `[hidden, vocab]`) for shipping.
    pub fn to_params(&self) -> ParamSet {
        let mut p = ParamSet::default();
        let n = self.norm_weight.dims()[0];
        p.tensors.insert(NORM.into(), NamedTensor { shape: vec![n], values: to_vec(self.norm_weight.clone()) });
        let [d, v] = self.weight.dims();
        p.tensors.insert(HEAD.into(), NamedTensor { shape: vec![d, v], values: to_vec(self.weight.clone()) });
        p
    }

    pub fn from_params(p: &ParamSet, eps: f64, device: &Device) -> Result<Self> {
        let get = |k: &str| p.tensors.get(k).ok_or_else(|| ModelError::Params(format!("head is missing '{k}'")));
        let (norm, head) = (get(NORM)?, get(HEAD)?);
        if norm.shape.len() != 1 || head.shape.len() != 2 || head.shape[0] != norm.shape[0] {
            return Err(ModelError::Params(format!("inconsistent head shapes {:?} / {:?}", norm.shape, head.shape)));
        }
        Ok(Self {
            norm_weight: from_vec(norm.values.clone(), [norm.shape[0]], device),
            eps,
            weight: from_vec(head.values.clone(), [head.shape[0], head.shape[1]], device),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn norm<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let ms = x.clone().square().mean_dim(D - 1);
        x * (ms + self.eps).sqrt().recip() * self.norm_weight.clone().unsqueeze::<D>()
    }

    /// One 2-D gemm over all positions (a batched matmul would run one per batch row).
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = hidden.dims();
        let v = self.vocab_size();
        self.norm(hidden).reshape([b * t, d]).matmul(self.weight.clone()).reshape([b, t, v])
    }

    /// The same head on another device (e.g. the autodiff device used for training).
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            norm_weight: self.norm_weight.clone().to_device(device),
            eps: self.eps,
            weight: self.weight.clone().to_device(device),
        }
    }
}
