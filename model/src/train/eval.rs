//! Evaluation on cached features: the side's, the backbone's and the routed loss and
//! accuracy, and the per-position rows other scorers (SPA v2's mixture) read.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::batch::{BackbonePreds, Unit, backbone_preds, heads, make_batch, units};
use crate::error::Result;
use crate::features::FeatureSet;
use crate::side::config::SideVariant;
use crate::side::{FrozenHead, Plugin};
use crate::tensor_util::to_vec;

/// Per-token test metrics: backbone alone, side plugin alone, and the gated combination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub tokens: usize,
    pub backbone_loss: f64,
    pub backbone_acc: f64,
    pub side_loss: f64,
    pub side_acc: f64,
    /// Loss of the distribution actually used at inference (side where g > threshold).
    pub routed_loss: f64,
    pub routed_acc: f64,
    /// Fraction of tokens the gate sends to the side plugin (device calls).
    pub side_fraction: f64,
}

impl EvalMetrics {
    /// The unweighted mean over devices (each device counts once, whatever its token count);
    /// `tokens` is the total.
    pub fn mean(all: &[EvalMetrics]) -> EvalMetrics {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&EvalMetrics) -> f64| all.iter().map(f).sum::<f64>() / n;
        EvalMetrics {
            tokens: all.iter().map(|m| m.tokens).sum(),
            backbone_loss: avg(|m| m.backbone_loss),
            backbone_acc: avg(|m| m.backbone_acc),
            side_loss: avg(|m| m.side_loss),
            side_acc: avg(|m| m.side_acc),
            routed_loss: avg(|m| m.routed_loss),
            routed_acc: avg(|m| m.routed_acc),
            side_fraction: avg(|m| m.side_fraction),
        }
    }
}

/// Loss positions of a feature set, a chunk at a time, in order (example by example,
/// position by position): what the backbone predicts there, its final hidden state, and the
/// side distribution of each of a list of plugins.
pub struct Rows {
    pub targets: Vec<u32>,
    /// The frozen backbone's log-probability of each target, and whether its argmax is it.
    pub bb_logp: Vec<f32>,
    pub bb_right: Vec<bool>,
    /// The example each row belongs to (its index in the feature set).
    pub examples: Vec<u32>,
    /// Final hidden state, `[rows, d]`.
    pub h_last: Vec<f32>,
    /// Per plugin, the side's log-probabilities `[rows, vocab]`.
    pub side: Vec<Vec<f32>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Calls `f` on [`Rows`] of every loss position of `data`, a few thousand values of
/// vocabulary-wide rows at a time; `plugins` share one variant and shape (none: the rows'
/// states, targets and backbone predictions alone, no side projection).
pub fn for_each_rows(plugins: &[&Plugin], head: &FrozenHead, data: &FeatureSet, f: &mut dyn FnMut(Rows) -> Result<()>) -> Result<()> {
    let head = &*head.as_f32();
    // Without plugins (the rows' states and targets alone) token units read the same rows.
    let per_token = plugins.first().is_none_or(|p| p.config.variant == SideVariant::Mlp);
    let device = head.device();
    let preds = backbone_preds(head, data, &device)?;
    let all = units(data, 0..data.examples.len(), per_token);
    let refs: Vec<&Unit> = all.iter().collect();
    // About 4 M log-probabilities per plugin per chunk.
    let tokens = ((1usize << 22) / head.vocab_size().max(1)).max(16);
    let per_chunk = if per_token { tokens } else { (tokens / 64).max(1) };
    let last = data.last_layer_index()?;
    for chunk in refs.chunks(per_chunk) {
        let batch = make_batch(data, &preds, chunk, &device);
        let [_, b, t, d] = batch.feats.dims();
        let keep: Vec<usize> = (0..b * t).filter(|&i| batch.host.mask[i] > 0.0).collect();
        let rows_of = |values: Vec<f32>, w: usize| keep.iter().flat_map(|&i| values[i * w..(i + 1) * w].to_vec()).collect::<Vec<f32>>();
        let h_all = to_vec(batch.feats.clone().narrow(0, last, 1).reshape([b * t, d]));
        let mut side = Vec::with_capacity(plugins.len());
        for p in plugins {
            let lp = heads(&p.net, p, head, data, &batch)?.lp_side;
            let v = lp.dims()[2];
            side.push(rows_of(to_vec(lp.reshape([b * t, v])), v));
        }
        let ex_of: Vec<u32> = chunk
            .iter()
            .flat_map(|u| match u {
                Unit::Token { ex, .. } => vec![*ex as u32],
                Unit::Sequence { ex } => vec![*ex as u32; t],
            })
            .collect();
        let cols = &batch.host;
        f(Rows {
            targets: keep.iter().map(|&i| cols.targets[i] as u32).collect(),
            bb_logp: keep.iter().map(|&i| cols.bb_logp[i]).collect(),
            bb_right: keep.iter().map(|&i| cols.bb_right[i] > 0.5).collect(),
            examples: keep.iter().map(|&i| ex_of[i]).collect(),
            h_last: rows_of(h_all, d),
            side,
        })?;
    }
    Ok(())
}

pub fn evaluate(plugin: &Plugin, head: &FrozenHead, data: &FeatureSet, batch_tokens: usize) -> Result<EvalMetrics> {
    let head = &*head.as_f32();
    let per_token = plugin.config.variant == SideVariant::Mlp;
    let all = units(data, 0..data.examples.len(), per_token);
    let device = plugin.net.side.up.weight.val().device();
    let preds = backbone_preds(head, data, &device)?;
    evaluate_units(plugin, head, data, &preds, &all, batch_tokens)
}

pub(super) fn evaluate_units(
    plugin: &Plugin,
    head: &FrozenHead,
    data: &FeatureSet,
    preds: &BackbonePreds,
    all: &[Unit],
    batch_tokens: usize,
) -> Result<EvalMetrics> {
    let per_token = plugin.config.variant == SideVariant::Mlp;
    let device = plugin.net.side.up.weight.val().device();
    let per_step = if per_token { batch_tokens.max(1) } else { 8 };
    let thr = plugin.config.gate.threshold;
    let mut acc = [0.0f64; 7];
    let mut tokens = 0usize;
    let refs: Vec<&Unit> = all.iter().collect();
    for chunk in refs.chunks(per_step) {
        let batch = make_batch(data, preds, chunk, &device);
        let h = heads(&plugin.net, plugin, head, data, &batch)?;
        let cols = batch.column_tensors();
        let mask = cols.mask.clone();
        let ls = h.lp_side.clone().gather(2, cols.targets.clone());
        let lb = cols.bb_logp;
        let side_ok = h.lp_side.argmax(2).equal(cols.targets).float();
        let bb_ok = cols.bb_right;
        let routed = h.gate.greater_elem(thr).float();
        let not_routed = routed.clone().neg().add_scalar(1.0);
        let sum = |t: Tensor<3>| (t * mask.clone()).sum().into_scalar::<f32>() as f64;
        acc[0] += sum(lb.clone().neg());
        acc[1] += sum(bb_ok.clone());
        acc[2] += sum(ls.clone().neg());
        acc[3] += sum(side_ok.clone());
        acc[4] += sum((ls * routed.clone() + lb * not_routed.clone()).neg());
        acc[5] += sum(side_ok * routed.clone() + bb_ok * not_routed);
        acc[6] += sum(routed);
        tokens += batch.tokens;
    }
    let n = tokens.max(1) as f64;
    Ok(EvalMetrics {
        tokens,
        backbone_loss: acc[0] / n,
        backbone_acc: acc[1] / n,
        side_loss: acc[2] / n,
        side_acc: acc[3] / n,
        routed_loss: acc[4] / n,
        routed_acc: acc[5] / n,
        side_fraction: acc[6] / n,
    })
}
