//! The `mlp` side's training loss with hand-derived gradients.
//!
//! Under burn's autodiff the mlp side's step is ~60 small ops, each a full pass over its
//! operands and most of them single-threaded: at the side's widths about a third of the step
//! went outside the gemms (docs/bench-log/2026-11-26-allocator-side-step-flops.md). Here the forward keeps what the backward needs,
//! the per-position work (log-softmax, mixture, gate cost and their gradients) is one loop over
//! rows, and the gradients are those autodiff would give (they go to `crate::optim`'s flat
//! AdamW). The loss is the one documented in `train.rs`; its tests check these gradients
//! against autodiff's.
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, sigmoid};
use rayon::prelude::*;

use super::head::FrozenHead;
use super::plugin::PluginNet;
use crate::tensor_util::{from_vec, to_vec};

/// One per-token batch on a device without autodiff: `N` positions.
pub(crate) struct MlpBatch<'a> {
    /// Backbone hidden states at the plugin's taps, stacked `[taps, N, d]`.
    pub taps: Tensor<3>,
    /// Final hidden state `[N, d]`.
    pub h_last: Tensor<2>,
    pub targets: &'a [i64],
    pub mask: &'a [f32],
    /// The frozen backbone's log-probability of each target, and whether its argmax is right.
    pub bb_logp: &'a [f32],
    pub bb_right: &'a [f32],
    /// `inv_rms` of each row of `h_last` (with the head's eps).
    pub inv_rms: &'a [f32],
    /// Loss tokens the sums are divided by.
    pub n: f64,
}

/// `x @ W + b` with the weights taken off the autodiff graph.
fn lin(l: &Linear, x: Tensor<2>) -> Tensor<2> {
    add_bias(l, x.matmul(l.weight.val().inner()))
}

/// `y + b` (`y` is `x @ W` computed elsewhere).
fn add_bias(l: &Linear, y: Tensor<2>) -> Tensor<2> {
    match &l.bias {
        Some(b) => y + b.val().inner().unsqueeze::<2>(),
        None => y,
    }
}

fn col_sum(t: Tensor<2>) -> Tensor<1> {
    let d = t.dims()[1];
    t.sum_dim(0).reshape([d])
}

/// Item `k` of a stack `[K, rows, cols]`.
fn item(t: &Tensor<3>, k: usize) -> Tensor<2> {
    let [_, rows, cols] = t.dims();
    t.clone().narrow(0, k, 1).reshape([rows, cols])
}

/// Gradients by parameter.
struct Grads(GradientsParams);

impl Grads {
    fn linear(&mut self, l: &Linear, dw: Tensor<2>, db: Tensor<1>) {
        self.0.register(l.weight.id, dw);
        if let Some(b) = &l.bias {
            self.0.register(b.id, db);
        }
    }
}

/// The gate's part of the loss (SPA v1's objective): whether it reads the side state, and
/// the weight of its cost term.
#[derive(Clone, Copy)]
pub(crate) struct GateTerms {
    pub uses_side: bool,
    pub cost: f64,
}

/// Loss value and gradients of an `mlp` plugin on `batch`: the side's cross-entropy, plus
/// with `gate` the mixture's and the gate cost (then the gate's parameters get gradients
/// too; without, only the side network and the personal layer). `head` is on the batch's
/// device.
pub(crate) fn loss_and_grads(net: &PluginNet, head: &FrozenHead, batch: &MlpBatch<'_>, gate: Option<GateTerms>) -> (f64, GradientsParams) {
    let fwd = forward(net, head, batch, gate);
    let (loss, rows) = per_row(batch, &fwd, gate);
    let mut grads = Grads(GradientsParams::new());
    let side_out = match &fwd.gate {
        Some(g) => {
            let (side_out, (dw2, db2, dw1, db1)) = rayon::join(|| side_grads(net, head, batch, &fwd, &rows), || gate_grads(net, &fwd, g, &rows, gate));
            grads.linear(&net.gate.w2, dw2, db2);
            grads.linear(&net.gate.w1, dw1, db1);
            side_out
        }
        None => side_grads(net, head, batch, &fwd, &rows),
    };
    for (l, dw, db) in side_out {
        grads.linear(l, dw, db);
    }
    (loss, grads.0)
}

/// What the forward keeps for the backward.
struct Forward {
    h: Tensor<2>,
    /// `inv_rms(h)` as a column, and the final norm's weight as a column.
    inv_h: Tensor<2>,
    nw: Tensor<2>,
    /// Side states s_k and the ReLUs r_k of all but the last.
    s: Vec<Tensor<2>>,
    r: Vec<Tensor<2>>,
    /// `up + personal`'s summed weight, the corrected hidden state y and the logits before
    /// the final norm's per-row scale (z = y @ scaled head), and that scale.
    w_out: Tensor<2>,
    y: Tensor<2>,
    z: Tensor<2>,
    inv_y: Tensor<2>,
    /// The gate's first layer's pre-activation, its ReLU, and g.
    gate: Option<(Tensor<2>, Tensor<2>, Tensor<2>)>,
}

fn forward(net: &PluginNet, head: &FrozenHead, batch: &MlpBatch<'_>, gate: Option<GateTerms>) -> Forward {
    let side = &net.side;
    let h = batch.h_last.clone();
    let [n_rows, d] = h.dims();
    let n_taps = batch.taps.dims()[0];
    // The gate's first layer on norm(h) = h * inv_rms(h) * norm_weight, without materialising
    // it: the per-row scale moves after the gemm and the norm weight into the weight. It does
    // not depend on the side chain, so it runs beside it.
    let inv_h = from_vec(batch.inv_rms.to_vec(), [n_rows, 1], &h.device());
    let nw = head.norm_weight().unsqueeze_dim::<2>(1);
    let w1 = net.gate.w1.weight.val().inner();
    let gate_h = || h.clone().matmul(w1.clone().narrow(0, 0, d) * nw.clone()) * inv_h.clone();
    // Side states s_k and their ReLUs r_k, kept for the backward. The taps' down projections
    // are independent of each other: one batched gemm, which flex spreads over the cores by
    // item (each item a whole gemm) instead of splitting each skinny gemm.
    let side_chain = || {
        let w_down = Tensor::stack::<3>(side.down.iter().map(|l| l.weight.val().inner()).collect(), 0);
        let pre = batch.taps.clone().matmul(w_down);
        let mut s = vec![add_bias(&side.down[0], item(&pre, 0))];
        let mut r = Vec::with_capacity(n_taps);
        for k in 1..n_taps {
            let rk = relu(s[k - 1].clone());
            s.push(add_bias(&side.down[k], item(&pre, k)) + lin(&side.adapters[k - 1], rk.clone()));
            r.push(rk);
        }
        (s, r)
    };
    let ((s, r), a1) = match gate {
        Some(_) => {
            let (chain, a1) = rayon::join(side_chain, gate_h);
            (chain, Some(a1))
        }
        None => (side_chain(), None),
    };
    let s_last = s[n_taps - 1].clone();
    // up(s) + personal(s) as one gemm with the summed weights and biases, as in the plugin.
    let w_out = side.up.weight.val().inner() + net.personal.weight.val().inner();
    let mut b_out = Tensor::<1>::zeros([d], &h.device());
    for b in [&side.up.bias, &net.personal.bias].into_iter().flatten() {
        b_out = b_out + b.val().inner();
    }
    let y = h.clone() + s_last.clone().matmul(w_out.clone()) + b_out.unsqueeze::<2>();
    let z = y.clone().matmul(head.scaled());
    let inv_y = head.inv_rms(y.clone());
    let gate = a1.map(|mut a1| {
        if gate.is_some_and(|g| g.uses_side) {
            let side_width = w1.dims()[0] - d;
            a1 = a1 + s_last.clone().matmul(w1.clone().narrow(0, d, side_width));
        }
        if let Some(b) = &net.gate.w1.bias {
            a1 = a1 + b.val().inner().unsqueeze::<2>();
        }
        let q = relu(a1.clone());
        let g = sigmoid(lin(&net.gate.w2, q.clone()));
        (a1, q, g)
    });
    Forward { h, inv_h, nw, s, r, w_out, y, z, inv_y, gate }
}

/// The per-row gradients: wrt z, the coefficient of y in the gradient through inv_y, and
/// wrt the gate's pre-sigmoid output.
struct RowGrads {
    dz: Tensor<2>,
    coef: Tensor<2>,
    da2: Tensor<2>,
}

/// Per row: logits = z * inv_y; the side's CE, and with the gate the mixture's CE (side
/// detached) and the gate cost, with their gradients wrt z, inv_y and the gate's
/// pre-activation. Blocks of rows go to the cores; their losses are summed in block order
/// (deterministic).
fn per_row(batch: &MlpBatch<'_>, fwd: &Forward, gate: Option<GateTerms>) -> (f64, RowGrads) {
    let [n_rows, d] = fwd.h.dims();
    let (zv, invv) = (to_vec(fwd.z.clone()), to_vec(fwd.inv_y.clone()));
    let gv = fwd.gate.as_ref().map(|(_, _, g)| to_vec(g.clone()));
    let gate_cost = gate.map_or(0.0, |g| g.cost) as f32;
    let v = zv.len() / n_rows;
    let (mut dz, mut coef, mut da2) = (vec![0.0f32; n_rows * v], vec![0.0f32; n_rows], vec![0.0f32; n_rows]);
    const BLOCK: usize = 128;
    let partial: Vec<f64> = dz
        .par_chunks_mut(BLOCK * v)
        .zip(coef.par_chunks_mut(BLOCK))
        .zip(da2.par_chunks_mut(BLOCK))
        .enumerate()
        .map(|(blk, ((dz, coef), da2))| {
            let rows = blk * BLOCK..blk * BLOCK + coef.len();
            let out = RowOut { dz, coef, da2 };
            row_terms(batch, rows, &zv, &invv, gv.as_deref(), d, gate_cost, out)
        })
        .collect();
    let device = fwd.y.device();
    let grads = RowGrads { dz: from_vec(dz, [n_rows, v], &device), coef: from_vec(coef, [n_rows, 1], &device), da2: from_vec(da2, [n_rows, 1], &device) };
    (partial.iter().sum(), grads)
}

/// The gate's gradients (its input is constant: the side state enters it detached); they do
/// not depend on the side's, so they run beside them.
fn gate_grads(
    net: &PluginNet,
    fwd: &Forward,
    (a1, q, _): &(Tensor<2>, Tensor<2>, Tensor<2>),
    rows: &RowGrads,
    gate: Option<GateTerms>,
) -> (Tensor<2>, Tensor<1>, Tensor<2>, Tensor<1>) {
    let da2 = rows.da2.clone();
    let (dw2, db2) = (q.clone().transpose().matmul(da2.clone()), col_sum(da2.clone()));
    let da1 = da2.matmul(net.gate.w2.weight.val().inner().transpose()) * a1.clone().greater_elem(0.0).float();
    let mut dw1 = fwd.h.clone().transpose().matmul(da1.clone() * fwd.inv_h.clone()) * fwd.nw.clone();
    if gate.is_some_and(|g| g.uses_side) {
        let s_last = fwd.s.last().expect("at least one tap").clone();
        dw1 = Tensor::cat(vec![dw1, s_last.transpose().matmul(da1.clone())], 0);
    }
    (dw2, db2, dw1, col_sum(da1))
}

/// Backward through the head, the output adapters and the side chain: each linear layer's
/// weight and bias gradients.
fn side_grads<'n>(net: &'n PluginNet, head: &FrozenHead, batch: &MlpBatch<'_>, fwd: &Forward, rows: &RowGrads) -> Vec<(&'n Linear, Tensor<2>, Tensor<1>)> {
    let side = &net.side;
    let n_taps = fwd.s.len();
    let s_last = fwd.s[n_taps - 1].clone();
    let mut out = Vec::with_capacity(2 * n_taps + 1);
    let dy = rows.dz.clone().matmul(head.scaled().transpose()) + fwd.y.clone() * rows.coef.clone();
    let (d_wout, d_bout) = (s_last.transpose().matmul(dy.clone()), col_sum(dy.clone()));
    out.push((&side.up, d_wout.clone(), d_bout.clone()));
    out.push((&net.personal, d_wout, d_bout));
    // The chain's gradients ds_k, last to first. Then the weight gradients, which no longer
    // depend on each other: the taps' and the adapters' each as one batched gemm, as in the
    // forward; down_k and adapter_k (k >= 1) share ds_k and so their bias gradient.
    let mut ds = vec![dy.matmul(fwd.w_out.clone().transpose())];
    for k in (1..n_taps).rev() {
        let a = &side.adapters[k - 1];
        let dk = ds.last().expect("non-empty").clone();
        ds.push(dk.matmul(a.weight.val().inner().transpose()) * fwd.s[k - 1].clone().greater_elem(0.0).float());
    }
    ds.reverse();
    let ds = Tensor::stack::<3>(ds, 0);
    let db = ds.clone().sum_dim(1);
    let dw_down = batch.taps.clone().swap_dims(1, 2).matmul(ds.clone());
    for (k, l) in side.down.iter().enumerate() {
        out.push((l, item(&dw_down, k), item(&db, k).reshape([-1])));
    }
    if n_taps > 1 {
        let dw_adapt = Tensor::stack::<3>(fwd.r.clone(), 0).swap_dims(1, 2).matmul(ds.narrow(0, 1, n_taps - 1));
        for (k, a) in side.adapters.iter().enumerate() {
            out.push((a, item(&dw_adapt, k), item(&db, k + 1).reshape([-1])));
        }
    }
    out
}

/// Gradient outputs of a block of rows.
struct RowOut<'a> {
    dz: &'a mut [f32],
    coef: &'a mut [f32],
    da2: &'a mut [f32],
}

/// The per-row part of `loss_and_grads` for `rows` (`z` is `[N, v]`, `gv` the gate's values
/// when it trains); returns their loss.
#[allow(clippy::too_many_arguments)]
fn row_terms(
    batch: &MlpBatch<'_>,
    rows: std::ops::Range<usize>,
    zv: &[f32],
    invv: &[f32],
    gv: Option<&[f32]>,
    d: usize,
    gate_cost: f32,
    out: RowOut<'_>,
) -> f64 {
    let v = zv.len() / invv.len();
    let mut loss = 0.0f64;
    let mut e = vec![0.0f32; v];
    for (r, i) in rows.enumerate() {
        let w = (batch.mask[i] as f64 / batch.n) as f32;
        if w == 0.0 {
            continue;
        }
        let inv = invv[i];
        let row = &zv[i * v..(i + 1) * v];
        let t = batch.targets[i] as usize;
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv));
        let mut sum = 0.0f32;
        for (ej, &zj) in e.iter_mut().zip(row) {
            *ej = (zj * inv - max).exp();
            sum += *ej;
        }
        let lp_t = row[t] * inv - max - sum.ln();
        loss -= (w * lp_t) as f64;
        // d/dlogits of -w * lp_t is w * (softmax - onehot).
        let (scale, dz) = (w / sum, &mut out.dz[r * v..(r + 1) * v]);
        let mut dinv = 0.0f32;
        for j in 0..v {
            let dl = scale * e[j] - if j == t { w } else { 0.0 };
            dz[j] = dl * inv;
            dinv += dl * row[j];
        }
        // inv = (|y|^2 / d + eps)^-1/2: d inv / dy = -inv^3 y / d.
        out.coef[r] = -dinv * inv * inv * inv / d as f32;
        let Some(gv) = gv else { continue };
        let (gi, e_ls, e_lb) = (gv[i], lp_t.exp(), batch.bb_logp[i].exp());
        let mix = gi * e_ls + (1.0 - gi) * e_lb;
        let right = batch.bb_right[i];
        let mut dg = gate_cost * w * right;
        if mix > 1e-9 {
            loss -= (w * mix.ln()) as f64;
            dg -= w * (e_ls - e_lb) / mix;
        } else {
            loss -= (w * 1e-9f32.ln()) as f64;
        }
        loss += (gate_cost * w * gi * right) as f64;
        out.da2[r] = dg * gi * (1.0 - gi);
    }
    loss
}
