//! The `mlp` side's training loss with hand-derived gradients.
//!
//! Under burn's autodiff the mlp side's step is ~60 small ops, each a full pass over its
//! operands and most of them single-threaded: at the side's widths about a third of the step
//! went outside the gemms (docs/BENCHMARKS.md). Here the forward keeps what the backward needs,
//! the per-position work (log-softmax, mixture, gate cost and their gradients) is one loop over
//! rows, and the gradients go to burn's AdamW exactly as autodiff's would. The loss is the one
//! documented in `train.rs`; its tests check these gradients against autodiff's.
use burn::module::ParamId;
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, sigmoid};

use super::head::FrozenHead;
use super::plugin::PluginNet;
use crate::tensor_util::{from_vec, to_vec};

/// One per-token batch on a device without autodiff: `N` positions.
pub(crate) struct MlpBatch<'a> {
    /// Backbone hidden states at the plugin's taps, each `[N, d]`.
    pub taps: Vec<Tensor<2>>,
    /// Final hidden state `[N, d]`.
    pub h_last: Tensor<2>,
    pub targets: &'a [i64],
    pub mask: &'a [f32],
    /// The frozen backbone's log-probability of each target, and whether its argmax is right.
    pub bb_logp: &'a [f32],
    pub bb_right: &'a [f32],
    /// Loss tokens the sums are divided by.
    pub n: f64,
}

/// `x @ W + b` with the weights taken off the autodiff graph.
fn lin(l: &Linear, x: Tensor<2>) -> Tensor<2> {
    let y = x.matmul(l.weight.val().inner());
    match &l.bias {
        Some(b) => y + b.val().inner().unsqueeze::<2>(),
        None => y,
    }
}

fn col_sum(t: Tensor<2>) -> Tensor<1> {
    let d = t.dims()[1];
    t.sum_dim(0).reshape([d])
}

/// Gradients by parameter, each added to what `extra` (e.g. FedProx's term) holds for it.
struct Grads {
    out: GradientsParams,
    extra: GradientsParams,
}

impl Grads {
    fn put<const D: usize>(&mut self, id: ParamId, g: Tensor<D>) {
        let g = match self.extra.remove::<D>(id) {
            Some(e) => g + e,
            None => g,
        };
        self.out.register(id, g);
    }

    fn linear(&mut self, l: &Linear, dw: Tensor<2>, db: Tensor<1>) {
        self.put(l.weight.id, dw);
        if let Some(b) = &l.bias {
            self.put(b.id, db);
        }
    }
}

/// Loss value and gradients of every parameter of an `mlp` plugin on `batch`. `extra` holds
/// gradients of further loss terms, added in. `head` is on the batch's device.
pub(crate) fn loss_and_grads(
    net: &PluginNet,
    head: &FrozenHead,
    batch: &MlpBatch<'_>,
    gate_uses_side: bool,
    gate_cost: f64,
    extra: GradientsParams,
) -> (f64, GradientsParams) {
    let side = &net.side;
    let taps = &batch.taps;
    let h = batch.h_last.clone();
    let [n_rows, d] = h.dims();
    // Forward: side states s_k and their ReLUs r_k, kept for the backward.
    let mut s = vec![lin(&side.down[0], taps[0].clone())];
    let mut r = Vec::with_capacity(taps.len());
    for k in 1..taps.len() {
        let rk = relu(s[k - 1].clone());
        s.push(lin(&side.down[k], taps[k].clone()) + lin(&side.adapters[k - 1], rk.clone()));
        r.push(rk);
    }
    let s_last = s[taps.len() - 1].clone();
    // up(s) + personal(s) as one gemm with the summed weights and biases, as in the plugin.
    let w_out = side.up.weight.val().inner() + net.personal.weight.val().inner();
    let mut b_out = Tensor::<1>::zeros([d], &h.device());
    for b in [&side.up.bias, &net.personal.bias].into_iter().flatten() {
        b_out = b_out + b.val().inner();
    }
    let y = h.clone() + s_last.clone().matmul(w_out.clone()) + b_out.unsqueeze::<2>();
    let z = y.clone().matmul(head.scaled());
    let inv_y = head.inv_rms(y.clone());
    // Gate on norm(h) = h * inv_rms(h) * norm_weight without materialising it: the per-row
    // scale moves after the gemm and the norm weight into the first layer's weight.
    let inv_h = head.inv_rms(h.clone());
    let nw = head.norm_weight().unsqueeze_dim::<2>(1);
    let w1 = net.gate.w1.weight.val().inner();
    let mut a1 = h.clone().matmul(w1.clone().narrow(0, 0, d) * nw.clone()) * inv_h.clone();
    if gate_uses_side {
        let side_width = w1.dims()[0] - d;
        a1 = a1 + s_last.clone().matmul(w1.clone().narrow(0, d, side_width));
    }
    if let Some(b) = &net.gate.w1.bias {
        a1 = a1 + b.val().inner().unsqueeze::<2>();
    }
    let q = relu(a1.clone());
    let g = sigmoid(lin(&net.gate.w2, q.clone()));

    // Per row: logits = z * inv_y; the side's CE, the mixture's CE (side detached) and the
    // gate cost, with their gradients wrt z, inv_y and the gate's pre-activation.
    let (zv, invv, gv) = (to_vec(z), to_vec(inv_y), to_vec(g));
    let v = zv.len() / n_rows;
    let (mut dz, mut coef, mut da2) = (vec![0.0f32; n_rows * v], vec![0.0f32; n_rows], vec![0.0f32; n_rows]);
    let mut loss = 0.0f64;
    let mut e = vec![0.0f32; v];
    for i in 0..n_rows {
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
        let (scale, out) = (w / sum, &mut dz[i * v..(i + 1) * v]);
        let mut dinv = 0.0f32;
        for j in 0..v {
            let dl = scale * e[j] - if j == t { w } else { 0.0 };
            out[j] = dl * inv;
            dinv += dl * row[j];
        }
        // inv = (|y|^2 / d + eps)^-1/2: d inv / dy = -inv^3 y / d.
        coef[i] = -dinv * inv * inv * inv / d as f32;
        let (gi, e_ls, e_lb) = (gv[i], lp_t.exp(), batch.bb_logp[i].exp());
        let mix = gi * e_ls + (1.0 - gi) * e_lb;
        let right = batch.bb_right[i];
        let mut dg = gate_cost as f32 * w * right;
        if mix > 1e-9 {
            loss -= (w * mix.ln()) as f64;
            dg -= w * (e_ls - e_lb) / mix;
        } else {
            loss -= (w * 1e-9f32.ln()) as f64;
        }
        loss += gate_cost * (w * gi * right) as f64;
        da2[i] = dg * gi * (1.0 - gi);
    }
    let device = y.device();
    let dz = from_vec(dz, [n_rows, v], &device);
    let coef = from_vec(coef, [n_rows, 1], &device);
    let da2 = from_vec(da2, [n_rows, 1], &device);

    // Backward through the head, the output adapters and the side chain.
    let mut grads = Grads { out: GradientsParams::new(), extra };
    let dy = dz.matmul(head.scaled().transpose()) + y * coef;
    let (d_wout, d_bout) = (s_last.clone().transpose().matmul(dy.clone()), col_sum(dy.clone()));
    grads.linear(&side.up, d_wout.clone(), d_bout.clone());
    grads.linear(&net.personal, d_wout, d_bout);
    let mut ds = dy.matmul(w_out.transpose());
    for k in (0..taps.len()).rev() {
        grads.linear(&side.down[k], taps[k].clone().transpose().matmul(ds.clone()), col_sum(ds.clone()));
        if k > 0 {
            let a = &side.adapters[k - 1];
            grads.linear(a, r[k - 1].clone().transpose().matmul(ds.clone()), col_sum(ds.clone()));
            ds = ds.matmul(a.weight.val().inner().transpose()) * s[k - 1].clone().greater_elem(0.0).float();
        }
    }
    // The gate (its input is constant: the side state enters it detached).
    let w2 = &net.gate.w2;
    grads.linear(w2, q.transpose().matmul(da2.clone()), col_sum(da2.clone()));
    let da1 = da2.matmul(w2.weight.val().inner().transpose()) * a1.greater_elem(0.0).float();
    let mut dw1 = h.transpose().matmul(da1.clone() * inv_h) * nw;
    if gate_uses_side {
        dw1 = Tensor::cat(vec![dw1, s_last.transpose().matmul(da1.clone())], 0);
    }
    grads.linear(&net.gate.w1, dw1, col_sum(da1));
    (loss, grads.out)
}
