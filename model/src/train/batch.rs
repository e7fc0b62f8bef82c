//! Batches of cached features for training and evaluation: work units (tokens or
//! sequences), the frozen backbone's own predictions computed once per call, and the
//! per-position heads every loss and metric is built from.

use std::sync::Arc;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::Result;
use crate::features::FeatureSet;
use crate::side::{FrozenHead, Plugin, PluginNet};

/// One batch: features `[layers, B, T, d]` as a tensor (layer-major, so each layer is a
/// contiguous slice and taking one copies nothing), and per position the target, the loss
/// mask and the frozen backbone's own prediction (see [`BackbonePreds`]) as host columns.
pub(super) struct Batch {
    pub(super) feats: Tensor<4>,
    pub(super) tokens: usize,
    /// `[B * T]` each (the mlp step reads them as they are).
    pub(super) host: Columns,
}

pub(super) struct Columns {
    pub(super) targets: Vec<i64>,
    pub(super) mask: Vec<f32>,
    pub(super) bb_logp: Vec<f32>,
    pub(super) bb_right: Vec<f32>,
    pub(super) inv_rms: Vec<f32>,
}

/// The columns the autodiff loss and the evaluation read, as `[B, T, 1]` tensors on the
/// batch's device.
pub(super) struct ColumnTensors {
    pub(super) targets: Tensor<3, Int>,
    pub(super) mask: Tensor<3>,
    pub(super) bb_logp: Tensor<3>,
    pub(super) bb_right: Tensor<3>,
}

impl Batch {
    pub(super) fn column_tensors(&self) -> ColumnTensors {
        let [_, b, t, _] = self.feats.dims();
        let device = self.feats.device();
        let col = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [b, t, 1]), &device);
        let cols = &self.host;
        ColumnTensors {
            targets: Tensor::from_data(TensorData::new(cols.targets.clone(), [b, t, 1]), &device),
            mask: col(&cols.mask),
            bb_logp: col(&cols.bb_logp),
            bb_right: col(&cols.bb_right),
        }
    }
}

/// Work units: single tokens (mlp) or whole sequences (ladder).
pub(super) enum Unit {
    Token { ex: usize, pos: usize },
    Sequence { ex: usize },
}

/// Units of the examples in `examples`.
pub(super) fn units(data: &FeatureSet, examples: std::ops::Range<usize>, per_token: bool) -> Vec<Unit> {
    let mut u = Vec::new();
    for (i, e) in data.examples.iter().enumerate().take(examples.end).skip(examples.start) {
        if per_token {
            u.extend(e.loss.iter().enumerate().filter(|(_, l)| **l).map(|(p, _)| Unit::Token { ex: i, pos: p }));
        } else if e.loss.iter().any(|&l| l) {
            u.push(Unit::Sequence { ex: i });
        }
    }
    u
}

/// The frozen backbone's log-probability of each target and whether its argmax is the
/// target, per example and position, and its final hidden state's `inv_rms` (the gate's
/// input norm). They depend on the features alone, so they are computed once per feature
/// set (see [`backbone_preds`]) instead of once per step, epoch and call.
pub(super) struct BackbonePreds {
    pub(super) logp: Vec<Vec<f32>>,
    pub(super) right: Vec<Vec<f32>>,
    pub(super) inv_rms: Vec<Vec<f32>>,
}

/// The head's predictions over `data`, computed once per feature set and head (see
/// [`FrozenHead::memoized`]): a device's sets are read by every epoch's selection, every
/// candidate of its personal fit and every score, and each reading is a full vocabulary
/// projection (49k-way on SmolLM2).
pub(super) fn backbone_preds(head: &FrozenHead, data: &FeatureSet, device: &Device) -> Result<Arc<BackbonePreds>> {
    let k = data.last_layer_index()?;
    let tokens = data.examples.iter().map(|e| e.len()).sum();
    head.memoized(preds_key(data, k), tokens, || compute_preds(head, data, device))
}

/// A hash of what the predictions read: every position's final hidden state and target.
fn preds_key(data: &FeatureSet, k: usize) -> u64 {
    let (row, d) = (data.layers.len() * data.d, data.d);
    let mut h = WordHash::new(data.examples.len() as u64);
    for e in &data.examples {
        h.add(e.len() as u64);
        for p in 0..e.len() {
            e.feats[p * row + k * d..p * row + (k + 1) * d].iter().for_each(|x| h.add(x.to_bits() as u64));
        }
        e.targets.iter().for_each(|&t| h.add(t as u64));
    }
    h.finish()
}

/// A fast 64-bit hash of words (a multiply-xorshift mix per word): a memo key, not a
/// defence against crafted collisions (nothing here is attacker-chosen).
struct WordHash(u64);

impl WordHash {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn add(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 ^= self.0 >> 31;
    }

    fn finish(&self) -> u64 {
        let x = (self.0 ^ (self.0 >> 33)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 29)
    }
}

pub(super) fn compute_preds(head: &FrozenHead, data: &FeatureSet, device: &Device) -> Result<BackbonePreds> {
    let k = data.last_layer_index()?;
    let (row, d) = (data.layers.len() * data.d, data.d);
    let mut preds = BackbonePreds { logp: Vec::new(), right: Vec::new(), inv_rms: Vec::new() };
    // Positions of many examples go through the head together, in chunks of a few thousand.
    let mut pending: Vec<usize> = Vec::new();
    let flush = |pending: &mut Vec<usize>, preds: &mut BackbonePreds| {
        let n: usize = pending.iter().map(|&i| data.examples[i].len()).sum();
        let mut h = Vec::with_capacity(n * d);
        let mut tgt = Vec::with_capacity(n);
        for &i in pending.iter() {
            let e = &data.examples[i];
            for p in 0..e.len() {
                h.extend_from_slice(&e.feats[p * row + k * d..p * row + (k + 1) * d]);
            }
            tgt.extend(e.targets.iter().map(|&t| t as i64));
        }
        let h = Tensor::<3>::from_data(TensorData::new(h, [1, n, d]), device);
        let tgt = Tensor::<3, Int>::from_data(TensorData::new(tgt, [1, n, 1]), device);
        let inv_rms = crate::tensor_util::to_vec(head.inv_rms(h.clone()));
        let lp = log_softmax(head.logits(h), 2);
        let logp = crate::tensor_util::to_vec(lp.clone().gather(2, tgt.clone()));
        let right = crate::tensor_util::to_vec(lp.argmax(2).equal(tgt).float());
        let mut at = 0;
        for &i in pending.iter() {
            let len = data.examples[i].len();
            preds.logp.push(logp[at..at + len].to_vec());
            preds.right.push(right[at..at + len].to_vec());
            preds.inv_rms.push(inv_rms[at..at + len].to_vec());
            at += len;
        }
        pending.clear();
    };
    let mut queued = 0;
    for (i, e) in data.examples.iter().enumerate() {
        pending.push(i);
        queued += e.len();
        if queued >= 4096 {
            flush(&mut pending, &mut preds);
            queued = 0;
        }
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut preds);
    }
    Ok(preds)
}

pub(super) fn make_batch(data: &FeatureSet, preds: &BackbonePreds, units: &[&Unit], device: &Device) -> Batch {
    let (l, d) = (data.layers.len(), data.d);
    let row = l * d;
    let t = units
        .iter()
        .map(|u| match u {
            Unit::Token { .. } => 1,
            Unit::Sequence { ex } => data.examples[*ex].len(),
        })
        .max()
        .unwrap_or(1);
    let b = units.len();
    let span = |u: &Unit| match u {
        Unit::Token { ex, pos } => (*ex, *pos..*pos + 1),
        Unit::Sequence { ex } => (*ex, 0..data.examples[*ex].len()),
    };
    // Written in order, layer by layer, with padding appended: no zero-fill pass over the
    // whole buffer first.
    let mut feats = Vec::with_capacity(l * b * t * d);
    for k in 0..l {
        for u in units {
            let (ex, positions) = span(u);
            let e = &data.examples[ex];
            let n = positions.len();
            for p in positions {
                feats.extend_from_slice(&e.feats[p * row + k * d..p * row + (k + 1) * d]);
            }
            feats.resize(feats.len() + (t - n) * d, 0.0);
        }
    }
    let mut targets = vec![0i64; b * t];
    let mut mask = vec![0.0f32; b * t];
    let mut bb_logp = vec![0.0f32; b * t];
    let mut bb_right = vec![0.0f32; b * t];
    let mut inv_rms = vec![0.0f32; b * t];
    for (i, u) in units.iter().enumerate() {
        let (ex, positions) = span(u);
        let e = &data.examples[ex];
        for (slot, p) in positions.enumerate() {
            let at = i * t + slot;
            targets[at] = e.targets[p] as i64;
            mask[at] = if e.loss[p] { 1.0 } else { 0.0 };
            bb_logp[at] = preds.logp[ex][p];
            bb_right[at] = preds.right[ex][p];
            inv_rms[at] = preds.inv_rms[ex][p];
        }
    }
    let tokens = mask.iter().filter(|&&m| m > 0.0).count();
    Batch { feats: Tensor::from_data(TensorData::new(feats, [l, b, t, d]), device), tokens, host: Columns { targets, mask, bb_logp, bb_right, inv_rms } }
}

/// Per-layer `[B, T, d]` views of a batch, in the plugin's tap order, plus the final layer.
pub(super) fn split_layers(data: &FeatureSet, plugin_taps: &[usize], feats: &Tensor<4>) -> Result<(Vec<Tensor<3>>, Tensor<3>)> {
    let [_, b, t, d] = feats.dims();
    let layer = |k: usize| feats.clone().narrow(0, k, 1).reshape([b, t, d]);
    let taps = plugin_taps.iter().map(|&tap| Ok(layer(data.layer_index(tap)?))).collect::<Result<Vec<_>>>()?;
    Ok((taps, layer(data.last_layer_index()?)))
}

/// Per-position quantities every loss and metric is built from.
pub(super) struct Heads {
    pub(super) lp_side: Tensor<3>,
    pub(super) gate: Tensor<3>,
}

pub(super) fn heads(net: &PluginNet, plugin: &Plugin, head: &FrozenHead, data: &FeatureSet, batch: &Batch) -> Result<Heads> {
    let (taps, h_last) = split_layers(data, &plugin.shape.taps, &batch.feats)?;
    let out = net.forward(&taps, h_last, head, plugin.config.gate.use_side_state);
    let lp_side = log_softmax(head.logits(out.side_hidden), 2);
    Ok(Heads { lp_side, gate: out.gate })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::tensor::Device;

    use super::*;
    use crate::backbone::load_backbone;
    use crate::features::{Positions, TokenizedExample, extract_features};

    #[test]
    fn predictions_are_memoized_per_feature_set_and_head() {
        let device = Device::flex();
        let bb = load_backbone(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama"), &device).unwrap();
        let examples: Vec<TokenizedExample> =
            (0..4u32).map(|i| TokenizedExample { ids: (0..10).map(|j| (i * 7 + j * 13) % 90 + 3).collect(), reply_start: 4 }).collect();
        let last = bb.config.num_layers;
        let data = extract_features(&bb, &examples, &[last], Positions::All, 4).unwrap();
        let head = FrozenHead::device_copy(&bb);
        let first = backbone_preds(&head, &data, &device).unwrap();
        let fresh = compute_preds(&head, &data, &device).unwrap();
        assert_eq!((&first.logp, &first.right, &first.inv_rms), (&fresh.logp, &fresh.right, &fresh.inv_rms));
        // The same values (a clone of the set, a clone of the head): the one computation.
        assert!(Arc::ptr_eq(&first, &backbone_preds(&head.clone(), &data.clone(), &device).unwrap()));
        // One changed state or target, or another head: computed again.
        let mut moved = data.clone();
        moved.examples[3].feats[0] += 1.0;
        let again = backbone_preds(&head, &moved, &device).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_ne!(again.inv_rms[3][0], first.inv_rms[3][0]);
        let mut retargeted = data.clone();
        retargeted.examples[0].targets[0] ^= 1;
        assert!(!Arc::ptr_eq(&first, &backbone_preds(&head, &retargeted, &device).unwrap()));
        assert!(!Arc::ptr_eq(&first, &backbone_preds(&FrozenHead::device_copy(&bb), &data, &device).unwrap()));
    }
}
