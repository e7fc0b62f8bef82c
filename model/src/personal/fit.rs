//! Fitting a device's personal model against the final federated body, in stages, each
//! chosen on the device's validation split by the loss of the distribution it will be
//! scored with (so a stage can only be kept when validation says it helps):
//!
//! 1. candidates for the personal side network, each trained from the body on the train
//!    split with its epoch and learning rate chosen on validation: the body itself (the
//!    global adapter), FedAvg+FT (all of the side network fine-tuned), Ditto (the same with a
//!    proximal pull towards the body, lambda from a grid), FedRep (only `up` re-fit);
//! 2. the mixture `alpha * p_personal + (1 - alpha) * p_global` and the private memory (kNN
//!    over the train split's final hidden states), chosen together: every candidate with
//!    every alpha (0: the body, 1: the candidate alone) and every k, temperature and weight
//!    (0: no memory). So each arm a device could have picked alone (the global adapter,
//!    FedAvg+FT, Ditto, FedRep, kNN-Per over the global adapter, a mixture) is in the grid,
//!    and the one kept has the lowest validation loss of them all;
//! 3. the gate, trained on the train split last, its threshold calibrated on validation.
//!
//! The stages' validation losses are recorded (`select`: the best candidate alone; `mix`:
//! the best mixture without memory; `knn`: the joint choice) for the ablations.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::PersonalModel;
use super::config::{KnnGrid, PersonalConfig, Route};
use super::gate::{self, Calibration, GateData};
use super::knn::{Datastore, KnnParams, Neighbours, normalize_rows};
use crate::error::{ModelError, Result};
use crate::features::FeatureSet;
use crate::side::plugin::GateNet;
use crate::side::{FrozenHead, Plugin};
use crate::tensor_util::to_vec;
use crate::train::{Objective, TrainConfig, for_each_rows, train_with_validation};

/// A candidate for the personal side network, with what chose it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Candidate {
    /// The body itself.
    Global,
    FineTune {
        lr: f64,
        epochs: usize,
    },
    Ditto {
        lambda: f64,
        lr: f64,
        epochs: usize,
    },
    FedRep {
        lr: f64,
        epochs: usize,
    },
}

impl Candidate {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::FineTune { .. } => "finetune",
            Self::Ditto { .. } => "ditto",
            Self::FedRep { .. } => "fedrep",
        }
    }
}

/// One trained candidate and its validation loss.
#[derive(Clone, Debug)]
pub struct Fitted {
    pub candidate: Candidate,
    pub plugin: Plugin,
    pub val_loss: f64,
}

/// A model the fit can hand out: one of its stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The body alone.
    Global,
    /// A candidate kind alone ("finetune", "ditto", "fedrep"), the body if it was not tried.
    Candidate(&'static str),
    /// The body with the memory tuned for it (kNN-Per over the global adapter).
    KnnGlobal,
    /// The best candidate alone.
    Select,
    /// The best candidate mixed with the body.
    Mix,
    /// The mixture with the memory.
    Knn,
    /// Everything, routed by the gate at its `best` or `frugal` threshold.
    Gated(Route),
}

/// Everything the fit chose; [`Fit::model`] assembles any stage.
#[derive(Clone, Debug)]
pub struct Fit {
    pub candidates: Vec<Fitted>,
    /// Index of the best candidate alone; of the best mixture without memory (with its
    /// alpha); of the candidate kept with the memory (the joint choice, with its alpha).
    pub best_alone: usize,
    pub mix_only: (usize, f64),
    pub mixed: usize,
    pub alpha: f64,
    pub datastore: Option<Arc<Datastore>>,
    pub knn: Option<KnnParams>,
    pub knn_global: Option<KnnParams>,
    pub gate: Option<GateNet>,
    pub calibration: Option<Calibration>,
    /// Validation loss after each stage.
    pub stages: Vec<(String, f64)>,
}

/// Target log-probabilities of a few side networks on every loss position of a set, with
/// the backbone's, the normalised final states (kNN keys) and the raw ones (gate inputs).
struct Table {
    lp: Vec<Vec<f32>>,
    targets: Vec<u32>,
    bb_lp: Vec<f32>,
    bb_right: Vec<bool>,
    examples: Vec<u32>,
    h: Vec<f32>,
    d: usize,
}

impl Table {
    fn read(plugins: &[&Plugin], head: &FrozenHead, data: &FeatureSet) -> Result<Self> {
        let mut t = Table { lp: vec![vec![]; plugins.len()], targets: vec![], bb_lp: vec![], bb_right: vec![], examples: vec![], h: vec![], d: data.d };
        for_each_rows(plugins, head, data, &mut |rows| {
            let v = rows.side.first().map_or(0, |s| s.len() / rows.len().max(1));
            for (k, side) in rows.side.iter().enumerate() {
                t.lp[k].extend(rows.targets.iter().enumerate().map(|(r, &y)| side[r * v + y as usize]));
            }
            t.targets.extend(&rows.targets);
            t.bb_lp.extend(&rows.bb_logp);
            t.bb_right.extend(&rows.bb_right);
            t.examples.extend(&rows.examples);
            t.h.extend(&rows.h_last);
            Ok(())
        })?;
        Ok(t)
    }

    fn keys(&self) -> Vec<f32> {
        normalize_rows(&self.h, self.d)
    }
}

/// Mean negative log of per-token probabilities.
fn nll(p: impl Iterator<Item = f32>) -> f64 {
    let (mut s, mut n) = (0.0f64, 0usize);
    for x in p {
        s -= (x.max(1e-30) as f64).ln();
        n += 1;
    }
    s / n.max(1) as f64
}

fn mix(lp_p: &[f32], lp_g: &[f32], alpha: f64) -> Vec<f32> {
    let a = alpha as f32;
    lp_p.iter().zip(lp_g).map(|(p, g)| a * p.exp() + (1.0 - a) * g.exp()).collect()
}

/// Each validation token's kNN probability of its target under every (k, temperature) of
/// the grid.
struct KnnTable {
    params: Vec<(usize, f32)>,
    p: Vec<Vec<f32>>,
}

impl KnnTable {
    fn new(nb: &Neighbours, targets: &[u32], grid: &KnnGrid) -> Self {
        let params: Vec<(usize, f32)> = grid.ks.iter().flat_map(|&k| grid.temperatures.iter().map(move |&t| (k, t))).collect();
        let p = params
            .iter()
            .map(|&(k, temperature)| (0..targets.len()).map(|r| nb.prob(r, targets[r], &KnnParams { k, temperature, weight: 0.0 })).collect())
            .collect();
        Self { params, p }
    }

    /// The best memory on top of per-token probabilities `base` (None: no weight above 0
    /// helps) and its loss.
    fn best(&self, base: &[f32], weights: &[f32]) -> (Option<KnnParams>, f64) {
        let mut best = (None, nll(base.iter().copied()));
        for (&(k, temperature), pk) in self.params.iter().zip(&self.p) {
            for &weight in weights {
                let loss = nll(base.iter().zip(pk).map(|(b, q)| (1.0 - weight) * b + weight * q));
                if loss < best.1 {
                    best = (Some(KnnParams { k, temperature, weight }), loss);
                }
            }
        }
        best
    }
}

fn with_knn(base: &[f32], targets: &[u32], nb: &Neighbours, p: Option<&KnnParams>) -> Vec<f32> {
    match p {
        None => base.to_vec(),
        Some(p) => base.iter().enumerate().map(|(r, b)| (1.0 - p.weight) * b + p.weight * nb.prob(r, targets[r], p)).collect(),
    }
}

/// Trains each candidate kind from `body`, its learning rate (and lambda) chosen on `val`;
/// the body itself comes first (its validation loss is filled in by the caller).
fn candidates(body: &Plugin, head: &FrozenHead, train: &FeatureSet, val: &FeatureSet, cfg: &PersonalConfig, seed: u64) -> Result<Vec<Fitted>> {
    let shared = body.shared()?;
    let base = TrainConfig { epochs: cfg.epochs, batch_tokens: cfg.batch_tokens, seed, ..TrainConfig::default() };
    let whole = if cfg.shared_down { Objective::AboveDown } else { Objective::Side };
    let mut kinds: Vec<(Objective, Option<f64>)> = Vec::new();
    if cfg.finetune {
        kinds.push((whole, None));
    }
    kinds.extend(cfg.ditto_lambdas.iter().map(|&l| (whole, Some(l))));
    if cfg.fedrep {
        kinds.push((Objective::Up, None));
    }
    let mut out = vec![Fitted { candidate: Candidate::Global, plugin: body.clone(), val_loss: f64::NAN }];
    for (objective, lambda) in kinds {
        let mut best: Option<Fitted> = None;
        for &lr in &cfg.lrs {
            let tc = TrainConfig { objective, lr, prox_mu: lambda.unwrap_or(0.0), ..base.clone() };
            let (plugin, report) = train_with_validation(body.clone(), head, train, val, &tc, Some(&shared), &mut |_| {})?;
            let epochs = report.best_epoch;
            let val_loss = report.val_losses.get(epochs).copied().unwrap_or(f64::INFINITY);
            let candidate = match (objective, lambda) {
                (Objective::Up, _) => Candidate::FedRep { lr, epochs },
                (_, Some(lambda)) => Candidate::Ditto { lambda, lr, epochs },
                _ => Candidate::FineTune { lr, epochs },
            };
            if best.as_ref().is_none_or(|b| val_loss < b.val_loss) {
                best = Some(Fitted { candidate, plugin, val_loss });
            }
        }
        let best = best.expect("at least one learning rate");
        // Ditto keeps its best lambda only: one candidate per kind.
        match out.iter_mut().find(|f| f.candidate.name() == best.candidate.name()) {
            Some(f) if best.val_loss < f.val_loss => *f = best,
            Some(_) => {}
            None => out.push(best),
        }
    }
    Ok(out)
}

/// Fits every stage for one device (see the module doc).
pub fn fit(body: &Plugin, head: &FrozenHead, train: &FeatureSet, val: &FeatureSet, cfg: &PersonalConfig, seed: u64) -> Result<Fit> {
    cfg.validate()?;
    if val.num_loss_tokens() == 0 || train.num_loss_tokens() == 0 {
        return Err(ModelError::Data("the personal model needs train and validation tokens".into()));
    }
    let device = head.device();
    let mut cands = candidates(body, head, train, val, cfg, seed)?;
    let plugins: Vec<&Plugin> = cands.iter().map(|c| &c.plugin).collect();
    let vt = Table::read(&plugins, head, val)?;
    let global_p: Vec<f32> = vt.lp[0].iter().map(|l| l.exp()).collect();
    cands[0].val_loss = nll(global_p.iter().copied());
    let mut stages = vec![("global".to_string(), cands[0].val_loss)];
    let alone: Vec<f64> = vt.lp.iter().map(|lp| nll(lp.iter().map(|l| l.exp()))).collect();
    let best_alone = (0..alone.len()).min_by(|&a, &b| alone[a].total_cmp(&alone[b])).unwrap_or(0);
    stages.push(("select".into(), alone[best_alone]));
    // Every (candidate, alpha): alpha 1 is the candidate alone, the body is candidate 0.
    let mixes: Vec<(usize, f64, Vec<f32>)> = std::iter::once((0, 0.0, global_p.clone()))
        .chain(
            (1..cands.len())
                .flat_map(|i| std::iter::once(1.0).chain(cfg.alphas.iter().copied()).map(move |a| (i, a)))
                .map(|(i, a)| (i, a, mix(&vt.lp[i], &vt.lp[0], a))),
        )
        .collect();
    let mix_losses: Vec<f64> = mixes.iter().map(|m| nll(m.2.iter().copied())).collect();
    let best_mix = (0..mixes.len()).min_by(|&a, &b| mix_losses[a].total_cmp(&mix_losses[b])).expect("the body at least");
    stages.push(("mix".into(), mix_losses[best_mix]));
    let (mixed, alpha) = (mixes[best_mix].0, mixes[best_mix].1);
    let mut fit = Fit {
        candidates: cands,
        best_alone,
        mix_only: (mixed, alpha),
        mixed,
        alpha,
        datastore: None,
        knn: None,
        knn_global: None,
        gate: None,
        calibration: None,
        stages,
    };
    let mut val_model = mixes[best_mix].2.clone();
    let mut memory: Option<(Datastore, Neighbours)> = None;
    if cfg.knn.enabled {
        // The memory, over the train split's states (the keys need no side network).
        let tt = Table::read(&[], head, train)?;
        let store = Datastore::new(tt.d, tt.keys(), tt.targets.clone(), tt.examples.clone())?.keep_last(cfg.knn.max_entries);
        let kmax = cfg.knn.ks.iter().copied().max().unwrap_or(1);
        let nb = store.search(&vt.keys(), kmax, None, &device);
        let table = KnnTable::new(&nb, &vt.targets, &cfg.knn);
        fit.knn_global = table.best(&global_p, &cfg.knn.weights).0;
        let joint: Vec<(Option<KnnParams>, f64)> = mixes.iter().map(|m| table.best(&m.2, &cfg.knn.weights)).collect();
        let j = (0..joint.len()).min_by(|&a, &b| joint[a].1.total_cmp(&joint[b].1)).expect("the body at least");
        (fit.mixed, fit.alpha, fit.knn) = (mixes[j].0, mixes[j].1, joint[j].0);
        fit.stages.push(("knn".into(), joint[j].1));
        val_model = with_knn(&mixes[j].2, &vt.targets, &nb, fit.knn.as_ref());
        memory = Some((store, nb));
    }
    if fit.mixed == 0 {
        fit.alpha = 0.0;
    }
    if cfg.gate.enabled {
        train_and_calibrate(&mut fit, body, head, train, &vt, &val_model, memory.as_ref().map(|m| &m.0), cfg, seed)?;
    }
    fit.datastore = memory.map(|(s, _)| Arc::new(s));
    Ok(fit)
}

/// The gate (see gate.rs): trained on the train split, where the model's probabilities of
/// the targets use the memory without each token's own example; calibrated on validation.
#[allow(clippy::too_many_arguments)]
fn train_and_calibrate(
    fit: &mut Fit,
    body: &Plugin,
    head: &FrozenHead,
    train: &FeatureSet,
    vt: &Table,
    val_model: &[f32],
    store: Option<&Datastore>,
    cfg: &PersonalConfig,
    seed: u64,
) -> Result<()> {
    let device = head.device();
    let model_plugins: Vec<&Plugin> = if fit.mixed == 0 { vec![body] } else { vec![body, &fit.candidates[fit.mixed].plugin] };
    let tt = Table::read(&model_plugins, head, train)?;
    let mut train_model = match tt.lp.as_slice() {
        [g] => g.iter().map(|l| l.exp()).collect(),
        [g, p] => mix(p, g, fit.alpha),
        _ => unreachable!("one or two plugins"),
    };
    if let (Some(store), Some(p)) = (store, &fit.knn) {
        let nb = store.search(&tt.keys(), p.k, Some(&tt.examples), &device);
        train_model = with_knn(&train_model, &tt.targets, &nb, Some(p));
    }
    let bb_p: Vec<f32> = tt.bb_lp.iter().map(|l| l.exp()).collect();
    let normed = |t: &Table| to_vec(head.norm(crate::tensor_util::from_vec(t.h.clone(), [1, t.targets.len(), t.d], &device)));
    let x = normed(&tt);
    let data = GateData { x: &x, d: tt.d, p_model: &train_model, p_backbone: &bb_p, backbone_right: &tt.bb_right };
    let g_net = gate::train_gate(&data, &cfg.gate, seed, &device)?;
    let g = gate::gate_values(&g_net, &normed(vt), vt.d, &device);
    let lp_model: Vec<f32> = val_model.iter().map(|p| p.max(1e-30).ln()).collect();
    let cal = gate::calibrate(&g, &lp_model, &vt.bb_lp, cfg.frugal_within);
    for (name, t) in [("gated_best", cal.best), ("gated_frugal", cal.frugal)] {
        fit.stages.push((name.into(), cal.at(t).map_or(f64::NAN, |p| p.loss)));
    }
    fit.gate = Some(g_net);
    fit.calibration = Some(cal);
    Ok(())
}

impl Fit {
    /// The model of `stage` over `body` (the body the fit ran against).
    pub fn model(&self, body: &Plugin, stage: Stage) -> PersonalModel {
        let mut m = PersonalModel::of_body(body.clone());
        let cand = |i: usize| (i > 0).then(|| self.candidates[i].clone());
        let set_personal = |m: &mut PersonalModel, f: Option<Fitted>, alpha: f64| {
            if let Some(f) = f {
                m.personal = Some(f.plugin);
                m.alpha = alpha;
                m.meta.candidate = Some(f.candidate);
                m.meta.alpha = alpha;
            }
        };
        let memory = |m: &mut PersonalModel, p: Option<KnnParams>| {
            if let (Some(s), Some(p)) = (&self.datastore, p) {
                m.knn = Some((s.clone(), p));
                m.meta.knn = Some(p);
            }
        };
        match stage {
            Stage::Global => {}
            Stage::Candidate(kind) => set_personal(&mut m, self.candidates.iter().position(|c| c.candidate.name() == kind).and_then(cand), 1.0),
            Stage::KnnGlobal => memory(&mut m, self.knn_global),
            Stage::Select => set_personal(&mut m, cand(self.best_alone), 1.0),
            Stage::Mix => set_personal(&mut m, cand(self.mix_only.0), self.mix_only.1),
            Stage::Knn | Stage::Gated(_) => {
                set_personal(&mut m, cand(self.mixed), self.alpha);
                memory(&mut m, self.knn);
                if let (Stage::Gated(route), Some(g), Some(c)) = (stage, &self.gate, &self.calibration) {
                    m.gate = Some(g.clone());
                    m.threshold = if route == Route::Best { c.best } else { c.frugal };
                    m.meta.threshold = m.threshold;
                    m.meta.calibration = Some(c.clone());
                }
            }
        }
        m.meta.stages = self.stages.clone();
        m
    }

    /// The model a device keeps: every stage, routed as `cfg.route` says.
    pub fn device_model(&self, body: &Plugin, cfg: &PersonalConfig) -> PersonalModel {
        if self.gate.is_some() { self.model(body, Stage::Gated(cfg.route)) } else { self.model(body, Stage::Knn) }
    }
}
