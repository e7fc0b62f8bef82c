//! SPA v2: the device's personal model, fitted on the device against the final federated body.
//!
//! ```text
//! p_global   = softmax(head(h_L + up(s)))          the federated body (side network), shared
//! p_personal = the same from the device's own side  chosen on validation: the body itself,
//!              network                              FedAvg+FT, Ditto or FedRep (fit.rs)
//! p_mix      = alpha * p_personal + (1 - alpha) * p_global               (APFL's mixture)
//! p_model    = (1 - w) * p_mix + w * p_knn          private memory (knn.rs, kNN-Per)
//! speaks     = p_model where gate(norm(h_L)) > threshold, else the backbone (gate.rs)
//! ```
//!
//! Every piece but the body is private: the personal side network, alpha, the datastore,
//! the gate and its threshold stay on the device ([`PersonalModel::private_parts`]). All read
//! the features the device already receives for the body. [`fit::fit`] builds it in stages,
//! each chosen on the device's validation split, so the known-good models (the global
//! adapter, FedAvg+FT) are among its candidates by construction. [`PersonalModel::score`]
//! measures any such model on a feature set; generation decides tokens with
//! [`PersonalModel::decide_row`] (crate::generate's `Decider`), the same arithmetic.
pub mod config;
pub mod fit;
pub mod gate;
pub mod knn;

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

pub use config::{KnnGrid, PersonalConfig, Route};
pub use fit::{Candidate, Fit, Stage, fit};
pub use gate::{Calibration, GateTrain};
pub use knn::{Datastore, KnnParams, Neighbours};

use crate::error::{ModelError, Result};
use crate::features::FeatureSet;
use crate::side::params::{NamedTensor, ParamSet};
use crate::side::plugin::GateNet;
use crate::side::{FrozenHead, Plugin, SideVariant};
use crate::tensor_util::{from_vec, to_vec};
use crate::train::{Rows, for_each_rows};

/// The least probability a mixed distribution holds, and its log: a token no part of the
/// model can produce still costs a finite loss.
const FLOOR: f32 = 1e-30;
const LN_FLOOR: f32 = -69.077_55;

/// The device's model (see the module doc).
#[derive(Clone, Debug)]
pub struct PersonalModel {
    /// The committed global side network (SPA v1: the device's whole plugin).
    pub body: Plugin,
    /// The device's own side network; None: the body alone.
    pub personal: Option<Plugin>,
    /// Weight of `personal` in the mixture, in [0, 1].
    pub alpha: f64,
    pub knn: Option<(Arc<Datastore>, KnnParams)>,
    /// None: the model speaks at every token.
    pub gate: Option<GateNet>,
    /// The model speaks where `g > threshold` (-1: always).
    pub threshold: f64,
    /// What was chosen, for reports and the device's store.
    pub meta: PersonalMeta,
}

/// The small, serializable part of a personal model's choices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalMeta {
    /// The candidate the personal side network is (None: the body alone).
    pub candidate: Option<Candidate>,
    pub alpha: f64,
    pub knn: Option<KnnParams>,
    pub threshold: f64,
    pub calibration: Option<Calibration>,
    /// Validation loss after each stage, as `fit` measured it.
    pub stages: Vec<(String, f64)>,
}

/// Per scored token: the gate's value (1 without a gate), the model's and the backbone's
/// log-probability of the target and whether each one's argmax is it, and the model's argmax.
#[derive(Clone, Debug, Default)]
pub struct TokenScores {
    pub gate: Vec<f32>,
    pub model_lp: Vec<f32>,
    pub model_right: Vec<bool>,
    pub model_top: Vec<u32>,
    pub backbone_lp: Vec<f32>,
    pub backbone_right: Vec<bool>,
}

/// Mean test metrics of the tokens' routing at one threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub tokens: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub side_fraction: f64,
}

impl TokenScores {
    pub fn at(&self, threshold: f64) -> Score {
        let n = self.gate.len();
        let (mut loss, mut right, mut side) = (0.0f64, 0usize, 0usize);
        for i in 0..n {
            if self.gate[i] as f64 > threshold {
                loss -= self.model_lp[i] as f64;
                right += self.model_right[i] as usize;
                side += 1;
            } else {
                loss -= self.backbone_lp[i] as f64;
                right += self.backbone_right[i] as usize;
            }
        }
        let d = n.max(1) as f64;
        Score { tokens: n, loss: loss / d, accuracy: right as f64 / d, side_fraction: side as f64 / d }
    }
}

/// Device compute per token beside the backbone's (multiply-accumulates), and memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceCost {
    /// Side networks (body and personal), gate.
    pub side_macs: f64,
    /// Vocabulary projections beyond the one a backbone-only device does.
    pub head_macs: f64,
    /// Distances to every datastore key.
    pub knn_macs: f64,
    pub datastore_bytes: usize,
    /// Private parameters (personal side network, gate), f32.
    pub private_bytes: usize,
}

impl PersonalModel {
    /// The body alone, always speaking (the global adapter, or a locally trained plugin).
    pub fn of_body(body: Plugin) -> Self {
        Self {
            body,
            personal: None,
            alpha: 0.0,
            knn: None,
            gate: None,
            threshold: gate::ALWAYS,
            meta: PersonalMeta { threshold: gate::ALWAYS, ..PersonalMeta::default() },
        }
    }

    /// An SPA v1 plugin as it decodes: its side (with its personal layer) routed by its own
    /// gate at its configured threshold.
    pub fn v1(plugin: Plugin) -> Result<Self> {
        if plugin.config.gate.use_side_state {
            return Err(ModelError::InvalidInput("a gate that reads the side state is not supported by the personal model".into()));
        }
        let (gate, threshold) = (plugin.net.gate.clone(), plugin.config.gate.threshold);
        Ok(Self { gate: Some(gate), threshold, meta: PersonalMeta { threshold, ..PersonalMeta::default() }, ..Self::of_body(plugin) })
    }

    /// The plugins whose side distributions [`Self::mix_row`] reads, in its order.
    pub fn plugins(&self) -> Vec<&Plugin> {
        match &self.personal {
            Some(p) if self.alpha >= 1.0 => vec![p],
            Some(p) if self.alpha > 0.0 => vec![&self.body, p],
            _ => vec![&self.body],
        }
    }

    /// Whether every side network used shares the body's down-projections (so the
    /// coordinator, which holds the body, can apply them for the device).
    pub fn reads_body_down(&self) -> bool {
        let downs = |p: &Plugin| p.params().tensors.into_iter().filter(|(n, _)| n.starts_with("side.down.")).collect::<Vec<_>>();
        let body = downs(&self.body);
        self.plugins().iter().all(|p| downs(p) == body)
    }

    /// The model's log-probabilities at one position into `out`: `side` holds the side
    /// log-probabilities of [`Self::plugins`] there, `nb` the position's neighbours.
    pub fn mix_row(&self, side: &[&[f32]], nb: Option<(&Neighbours, usize)>, out: &mut [f32]) {
        let v = out.len();
        match side {
            [one] => out.iter_mut().zip(one.iter()).for_each(|(o, &l)| *o = l.exp()),
            [g, p] => {
                let a = self.alpha as f32;
                for j in 0..v {
                    out[j] = a * p[j].exp() + (1.0 - a) * g[j].exp();
                }
            }
            _ => unreachable!("one or two side distributions"),
        }
        if let (Some((_, params)), Some((nb, r))) = (&self.knn, nb) {
            let w = params.weight;
            out.iter_mut().for_each(|o| *o *= 1.0 - w);
            nb.add_distribution(r, params, w, out);
        }
        out.iter_mut().for_each(|o| *o = o.max(FLOOR).ln());
    }

    /// Neighbours of the rows of final hidden states `h` (`[n, d]`), when the model has a memory.
    pub fn neighbours(&self, h: &[f32], d: usize, device: &burn::tensor::Device) -> Option<Neighbours> {
        self.knn.as_ref().map(|(store, p)| store.search(&knn::normalize_rows(h, d), p.k, None, device))
    }

    /// The gate's values at rows of final hidden states `h` (`[n, d]`; 1 without a gate).
    pub fn gate_at(&self, head: &FrozenHead, h: &[f32], d: usize) -> Vec<f32> {
        let n = h.len() / d;
        match &self.gate {
            None => vec![1.0; n],
            Some(g) => {
                let x = to_vec(head.norm(from_vec(h.to_vec(), [1, n, d], &head.device())));
                gate::gate_values(g, &x, d, &head.device())
            }
        }
    }

    /// Per-token scores on every loss position of `data` (test metrics, calibration curves).
    pub fn score(&self, head: &FrozenHead, data: &FeatureSet) -> Result<TokenScores> {
        Ok(score_all(&[self], head, data)?.pop().expect("one model"))
    }

    /// Appends the scores of one chunk of rows; `side` holds the side log-probabilities of
    /// [`Self::plugins`] (`[rows, vocab]` each), `d` the width of the final states.
    fn score_rows(&self, head: &FrozenHead, rows: &Rows, d: usize, side: &[&[f32]], out: &mut TokenScores) {
        let n = rows.len();
        let v = side[0].len() / n.max(1);
        let nb = self.neighbours(&rows.h_last, d, &head.device());
        out.gate.extend(self.gate_at(head, &rows.h_last, d));
        let mut buf = vec![0.0f32; v];
        // One side distribution and no memory: the row is already the model's (the mix's
        // exp and ln of a 49k-way row per token would only round it).
        let alone = side.len() == 1 && nb.is_none();
        for r in 0..n {
            let at: Vec<&[f32]> = side.iter().map(|s| &s[r * v..(r + 1) * v]).collect();
            let row: &[f32] = if alone {
                at[0]
            } else {
                self.mix_row(&at, nb.as_ref().map(|nb| (nb, r)), &mut buf);
                &buf
            };
            let (t, top) = (rows.targets[r] as usize, argmax(row));
            out.model_lp.push(row[t].max(LN_FLOOR));
            out.model_right.push(top == t);
            out.model_top.push(top as u32);
        }
        out.backbone_lp.extend(&rows.bb_logp);
        out.backbone_right.extend(&rows.bb_right);
    }

    /// The logits the device speaks with at the last position of `h_all` (`[1, t, d]`) and
    /// `taps` (or their down-projections, with `projected`), and whether the model spoke
    /// (else the backbone did, through the frozen head). A single side network without a
    /// memory speaks its own logits; a mixture speaks its log-probabilities.
    pub fn decide_row(&self, head: &FrozenHead, taps: &[Tensor<3>], h_all: Tensor<3>, projected: bool) -> (Vec<f32>, bool) {
        let t = h_all.dims()[1];
        let h = h_all.clone().narrow(1, t - 1, 1);
        let d = h.dims()[2];
        let h_host = to_vec(h.clone());
        let g = self.gate_at(head, &h_host, d)[0];
        if g as f64 <= self.threshold {
            return (to_vec(head.logits(h)), false);
        }
        let logits: Vec<Tensor<3>> = self
            .plugins()
            .iter()
            .map(|p| {
                let s = if projected { p.net.side_state_projected(taps) } else { p.net.side_state(taps) };
                head.logits(p.net.side_hidden_from_state(s, h_all.clone()).narrow(1, t - 1, 1))
            })
            .collect();
        if logits.len() == 1 && self.knn.is_none() {
            return (to_vec(logits.into_iter().next().expect("one")), true);
        }
        let side: Vec<Vec<f32>> = logits.into_iter().map(|z| to_vec(log_softmax(z, 2))).collect();
        let refs: Vec<&[f32]> = side.iter().map(Vec::as_slice).collect();
        let nb = self.neighbours(&h_host, d, &head.device());
        let mut out = vec![0.0f32; refs[0].len()];
        self.mix_row(&refs, nb.as_ref().map(|nb| (nb, 0)), &mut out);
        (out, true)
    }

    /// Whether decoding needs every earlier position's inputs (the ladder side attends).
    pub fn keeps_history(&self) -> bool {
        self.body.config.variant == SideVariant::Ladder
    }

    /// What the device computes per token beside the backbone, and holds.
    pub fn cost(&self, ctx: usize) -> DeviceCost {
        let shape = &self.body.shape;
        let sides = self.plugins();
        let gate_macs = self.gate.as_ref().map_or(0.0, |g| {
            let [i, h] = g.w1.weight.dims();
            (i * h + h) as f64
        });
        let private_bytes = self.private_parts().0.numel() * 4;
        DeviceCost {
            side_macs: sides.iter().map(|p| p.macs_per_token(ctx)).sum::<f64>() + gate_macs,
            head_macs: (sides.len() - 1) as f64 * (shape.d_model * shape.vocab) as f64,
            knn_macs: self.knn.as_ref().map_or(0.0, |(s, _)| (s.len() * s.d) as f64),
            datastore_bytes: self.knn.as_ref().map_or(0, |(s, _)| s.bytes()),
            private_bytes,
        }
    }

    /// The private tensors (`candidate.side.*`, the personal side network; `gate.*`), the
    /// choices, and the datastore: everything a device keeps beside the global body.
    pub fn private_parts(&self) -> (ParamSet, PersonalMeta, Option<Arc<Datastore>>) {
        let mut set = ParamSet::default();
        if let Some(p) = &self.personal {
            for (name, t) in p.params().tensors.into_iter().filter(|(n, _)| n.starts_with("side.")) {
                set.tensors.insert(format!("candidate.{name}"), t);
            }
        }
        if let Some(g) = &self.gate {
            for (name, t) in crate::side::params::export_params(g).tensors {
                set.tensors.insert(format!("gate.{name}"), t);
            }
        }
        (set, self.meta.clone(), self.knn.as_ref().map(|(s, _)| s.clone()))
    }

    /// A personal model from [`Self::private_parts`] over `body`, every part checked.
    pub fn from_parts(body: Plugin, private: &ParamSet, meta: PersonalMeta, datastore: Option<Datastore>) -> Result<Self> {
        let pick = |prefix: &str| ParamSet {
            tensors: private.tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k.to_string(), t.clone()))).collect(),
        };
        if let Some(bad) = private.tensors.keys().find(|n| !n.starts_with("candidate.") && !n.starts_with("gate.")) {
            return Err(ModelError::Params(format!("unknown private tensor '{bad}'")));
        }
        let cand = pick("candidate.");
        let personal = match (meta.candidate, cand.tensors.is_empty()) {
            (Some(_), false) => Some(body.clone().load(&cand)?),
            (None, true) => None,
            _ => return Err(ModelError::Params("personal side network and its record disagree".into())),
        };
        let gate_set = pick("gate.");
        let gate = if gate_set.tensors.is_empty() {
            None
        } else {
            let shape = |n: &str| gate_set.tensors.get(n).map(|t: &NamedTensor| t.shape.clone()).unwrap_or_default();
            let (w1, w2) = (shape("w1.weight"), shape("w2.weight"));
            if w1.len() != 2 || w2 != [w1.get(1).copied().unwrap_or(0), 1] || w1[0] != body.shape.d_model {
                return Err(ModelError::Params(format!("gate shapes {w1:?} / {w2:?} do not fit width {}", body.shape.d_model)));
            }
            let device = body.net.side.up.weight.val().device();
            let mut init = crate::side::plugin::Init(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0));
            let net = GateNet { w1: init.linear(w1[0], w1[1], true, &device), w2: init.linear(w1[1], 1, true, &device) };
            Some(crate::side::params::import_params(net, &gate_set)?)
        };
        if !(0.0..=1.0).contains(&meta.alpha) || !(gate::ALWAYS..=gate::NEVER).contains(&meta.threshold) {
            return Err(ModelError::Params(format!("alpha {} or threshold {} out of range", meta.alpha, meta.threshold)));
        }
        let knn = match (meta.knn, datastore) {
            (Some(p), Some(s)) if s.d == body.shape.d_model && !s.is_empty() => {
                p.validate()?;
                Some((Arc::new(s), p))
            }
            (None, None) => None,
            _ => return Err(ModelError::Params("datastore and its parameters disagree".into())),
        };
        Ok(Self { body, personal, alpha: meta.alpha, knn, gate, threshold: meta.threshold, meta })
    }
}

/// Per-token scores of several models on `data`, each distinct side network's distribution
/// computed once: models fitted from one body share it (a seed's arms on a device, the
/// cross-user matrix's column), and the vocabulary projection is most of the cost. The
/// models' side networks must share one variant and feature layers.
pub fn score_all(models: &[&PersonalModel], head: &FrozenHead, data: &FeatureSet) -> Result<Vec<TokenScores>> {
    let mut distinct: Vec<(&Plugin, ParamSet)> = Vec::new();
    let mut index: Vec<Vec<usize>> = Vec::with_capacity(models.len());
    for m in models {
        let mut at = Vec::new();
        for p in m.plugins() {
            let params = p.params();
            let k = distinct.iter().position(|(_, q)| *q == params).unwrap_or_else(|| {
                distinct.push((p, params));
                distinct.len() - 1
            });
            at.push(k);
        }
        index.push(at);
    }
    let plugins: Vec<&Plugin> = distinct.iter().map(|(p, _)| *p).collect();
    if plugins.iter().any(|p| p.config.variant != plugins[0].config.variant || p.shape.feature_layers != plugins[0].shape.feature_layers) {
        return Err(ModelError::InvalidInput("models scored together must share the side variant and feature layers".into()));
    }
    let mut out = vec![TokenScores::default(); models.len()];
    for_each_rows(&plugins, head, data, &mut |rows| {
        for ((m, at), o) in models.iter().zip(&index).zip(out.iter_mut()) {
            let side: Vec<&[f32]> = at.iter().map(|&k| rows.side[k].as_slice()).collect();
            m.score_rows(head, &rows, data.d, &side, o);
        }
        Ok(())
    })?;
    Ok(out)
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}
