//! What one round trip carries from the coordinator: the drafted tokens and, per position,
//! the backbone states in the form the device asked for (whole or down-projected).
use std::sync::Arc;

use crate::backbone::Backbone;
use crate::error::{ModelError, Result};
use crate::side::ParamSet;

/// The shared down-projections `down_k` of a plugin (`side.down.{k}`), applied where the
/// backbone runs so that a device receives `d / r` floats per tap instead of `d`.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudDown {
    pub(super) d: usize,
    d_side: usize,
    /// Per tap: weight `[d, d_side]` (burn's `[in, out]`), bias `[d_side]`.
    weights: Vec<(Vec<f32>, Vec<f32>)>,
}

impl CloudDown {
    /// The `side.down.*` tensors of a parameter set (a global checkpoint's shared part).
    pub fn from_params(p: &ParamSet) -> Result<Self> {
        let mut weights = Vec::new();
        while let Some(w) = p.tensors.get(&format!("side.down.{}.weight", weights.len())) {
            let k = weights.len();
            let missing = || ModelError::InvalidInput(format!("side.down.{k} has no bias"));
            let b = p.tensors.get(&format!("side.down.{k}.bias")).ok_or_else(missing)?;
            if w.shape.len() != 2 || b.shape != [w.shape[1]] {
                return Err(ModelError::InvalidInput(format!("side.down.{k}: weight {:?} and bias {:?} do not fit", w.shape, b.shape)));
            }
            weights.push((w.values.clone(), b.values.clone()));
        }
        let Some((w0, b0)) = weights.first() else {
            return Err(ModelError::InvalidInput("no side.down.* tensors: only the mlp and ladder sides project down".into()));
        };
        let (d_side, d) = (b0.len(), w0.len() / b0.len().max(1));
        if d_side == 0 || weights.iter().any(|(w, b)| b.len() != d_side || w.len() != d * d_side) {
            return Err(ModelError::InvalidInput("side.down.* tensors of different shapes".into()));
        }
        Ok(Self { d, d_side, weights })
    }

    pub fn taps(&self) -> usize {
        self.weights.len()
    }

    pub fn d_side(&self) -> usize {
        self.d_side
    }

    /// The weights as bytes in a fixed order (weight, bias per tap; f32 little-endian): two
    /// parties compare digests of this to know they project alike.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weights.len() * (self.d + 1) * self.d_side * 4);
        for (w, b) in &self.weights {
            out.extend(w.iter().chain(b).flat_map(|v| v.to_le_bytes()));
        }
        out
    }

    /// `down_k` of each row of `rows` (`[n, d]`), `[n, d_side]`; plain loops, so a row's
    /// result never depends on how many rows come with it.
    pub fn project(&self, k: usize, rows: &[f32]) -> Vec<f32> {
        let (w, b) = &self.weights[k];
        let mut out = Vec::with_capacity(rows.len() / self.d * self.d_side);
        for x in rows.chunks_exact(self.d) {
            let mut y = b.clone();
            for (xi, wi) in x.iter().zip(w.chunks_exact(self.d_side)) {
                for (yj, wij) in y.iter_mut().zip(wi) {
                    *yj += xi * wij;
                }
            }
            out.extend(y);
        }
        out
    }
}

/// What the device asked for per position.
#[derive(Clone, Debug)]
pub enum DraftForm {
    /// The hidden state of each of these layers (ascending, the last the final block).
    Taps(Vec<usize>),
    /// The final block's state, then `down_k` of each plugin tap `taps[k]`.
    Down { taps: Vec<usize>, down: Arc<CloudDown> },
}

impl DraftForm {
    /// The backbone layers to run for this form.
    pub(super) fn layers(&self, bb: &Backbone) -> Vec<usize> {
        match self {
            DraftForm::Taps(l) => l.clone(),
            DraftForm::Down { taps, .. } => {
                let mut l = taps.clone();
                l.push(bb.config.num_layers);
                l
            }
        }
    }

    /// Floats per position.
    pub fn width(&self, d: usize) -> usize {
        match self {
            DraftForm::Taps(l) => l.len() * d,
            DraftForm::Down { taps, down } => d + taps.len() * down.d_side(),
        }
    }

    /// Per-layer rows (in [`Self::layers`] order) into this form's slots.
    pub(super) fn slots(&self, mut rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        match self {
            DraftForm::Taps(_) => rows,
            DraftForm::Down { down, .. } => {
                let last = rows.pop().expect("the final layer is always run");
                std::iter::once(last).chain(rows.iter().enumerate().map(|(k, r)| down.project(k, r))).collect()
            }
        }
    }
}

/// One answer to the device: states per slot for positions `first..first + rows`, the last
/// `drafts.len()` of them being the drafted tokens' positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub first: usize,
    pub positions: usize,
    pub states: Vec<Vec<f32>>,
    pub drafts: Vec<u32>,
}
