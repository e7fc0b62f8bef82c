//! Running the arms for one seed. Arms that share training share the run: one federation
//! trains the body (`global`), and one fit per device ([`spa_model::personal::fit`]) gives
//! every arm built on it (`global_ft`, `ditto`, `fedrep`, `knn_per`, the `spa_v2` stages);
//! `fedprox` and `spa_v1` are federations of their own; `local` trains each device alone.
//! Every arm is scored the same way: its [`PersonalModel`] on the device's test split.
use std::time::Instant;

use rayon::prelude::*;

use spa_model::data::Example;
use spa_model::generate::{Decoding, LocalStates, Sampling, generate_text};
use spa_model::personal::{DeviceCost, Fit, PersonalModel, TokenScores, fit, gate, score_all};
use spa_model::side::{FrozenHead, Plugin, SideConfig};
use spa_model::train::{Objective, TrainConfig, train_with_validation};

use super::config::Arm;
use super::extras::{self, Extras};
use super::flips::Flips;
use super::stats::{rouge_l, rouge_n};
use super::{Context, DeviceResult, Result, Rouge, RoundPoint, SeedRun};
use crate::simulation::{DeviceFeatures, SimConfig, Simulation};

fn val_of(d: &DeviceFeatures) -> &spa_model::features::FeatureSet {
    d.val.as_ref().expect("experiment devices have a validation split")
}

/// Knobs chosen on the first seed, reused by the others.
#[derive(Clone, Debug, Default)]
pub struct Tuned {
    pub body_lr: Option<f64>,
    pub local_lr: Option<f64>,
    pub v1_lr: Option<f64>,
    pub fedprox_mu: Option<f64>,
}

impl Tuned {
    pub fn report(&self) -> Vec<(String, f64)> {
        [("federation lr", self.body_lr), ("local lr", self.local_lr), ("spa_v1 lr", self.v1_lr), ("fedprox mu", self.fedprox_mu)]
            .into_iter()
            .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
            .collect()
    }
}

/// One seed's runs; the extras and device costs are measured on the first seed only.
pub struct SeedOutput {
    pub runs: Vec<(Arm, SeedRun)>,
    pub extras: Extras,
    pub costs: Vec<(Arm, DeviceCost)>,
}

/// Every configured arm for `seed`, in the config's order.
pub fn run_seed(ctx: &Context, seed: u64, tuned: &mut Tuned, first: bool, progress: &mut dyn FnMut(&str)) -> Result<SeedOutput> {
    let wants = |a: Arm| ctx.cfg.arms.contains(&a);
    let head = ctx.head();
    let mut out = SeedOutput { runs: Vec::new(), extras: Extras::default(), costs: Vec::new() };
    let mut flips = Flips::default();
    let mut done = |arm: Arm, run: SeedRun, progress: &mut dyn FnMut(&str)| {
        let (m, n) = (&run.mean, &run.newcomers);
        progress(&format!(
            "seed {seed} {:<14} loss {:.4} acc {:.4} side {:.2} | newcomers loss {:.4} ({:.1} s)",
            arm.name(),
            m.loss,
            m.accuracy,
            m.side_fraction,
            n.loss,
            run.seconds
        ));
        out.runs.push((arm, run));
    };
    if wants(Arm::Backbone) {
        let t = Instant::now();
        let models = backbone_models(ctx, seed)?;
        let devices = scored(ctx, Arm::Backbone, &models, &mut alone(&head), first.then_some(&mut flips))?;
        done(Arm::Backbone, SeedRun::new(seed, devices, vec![], t.elapsed().as_secs_f64()), progress);
    }
    if wants(Arm::Local) {
        let t = Instant::now();
        let (models, curve) = local(ctx, seed, tuned, progress)?;
        let devices = scored(ctx, Arm::Local, &models, &mut alone(&head), first.then_some(&mut flips))?;
        done(Arm::Local, SeedRun::new(seed, devices, curve, t.elapsed().as_secs_f64()), progress);
    }
    let body_arms: Vec<Arm> = ctx.cfg.arms.iter().copied().filter(|a| a.stage().is_some()).collect();
    if !body_arms.is_empty() {
        let t = Instant::now();
        let (sim, curve) = tuned_federation(ctx, Arm::Global, seed, tuned, progress)?;
        let body = sim.plugin(0)?;
        let fed_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let fits = fit_all(ctx, &body, seed)?;
        progress(&format!("seed {seed} personal fits of {} devices in {:.1} s", fits.len(), t.elapsed().as_secs_f64()));
        let fit_secs = t.elapsed().as_secs_f64() / body_arms.len() as f64;
        let models: Vec<Vec<PersonalModel>> = body_arms.iter().map(|a| fits.iter().map(|f| f.model(&body, a.stage().expect("body arm"))).collect()).collect();
        let t = Instant::now();
        let mut scores = score_together(ctx, &models)?;
        let score_secs = t.elapsed().as_secs_f64() / body_arms.len() as f64;
        for ((arm, models), scores) in body_arms.into_iter().zip(&models).zip(&mut scores) {
            let t = Instant::now();
            if first {
                out.costs.push((arm, mean_cost(models, ctx.model.backbone.config.max_position_embeddings)));
            }
            let curve = if arm == Arm::Global { curve.clone() } else { vec![] };
            let devices = scored(ctx, arm, models, &mut |i, _, _| Ok(std::mem::take(&mut scores[i])), first.then_some(&mut flips))?;
            let shared = fit_secs + score_secs + if arm == Arm::Global { fed_secs } else { 0.0 };
            done(arm, SeedRun::new(seed, devices, curve, t.elapsed().as_secs_f64() + shared), progress);
        }
        if first {
            out.extras = extras::measure(ctx, &body, &fits, seed, progress)?;
        }
    }
    if wants(Arm::Fedprox) {
        let t = Instant::now();
        let (sim, curve) = tuned_federation(ctx, Arm::Fedprox, seed, tuned, progress)?;
        let models = vec![PersonalModel::of_body(sim.plugin(0)?); ctx.devices()];
        let devices = scored(ctx, Arm::Fedprox, &models, &mut alone(&head), first.then_some(&mut flips))?;
        done(Arm::Fedprox, SeedRun::new(seed, devices, curve, t.elapsed().as_secs_f64()), progress);
    }
    if wants(Arm::SpaV1) {
        let t = Instant::now();
        let (sim, curve) = tuned_federation(ctx, Arm::SpaV1, seed, tuned, progress)?;
        // Newcomers get the global side with fresh private layers (SPA v1 has no fit).
        let fresh = Plugin::new(&SideConfig { seed, ..ctx.cfg.side.clone() }, &ctx.model.backbone.config, &ctx.model.backbone.device)?;
        let newcomer = fresh.load(sim.global.as_set())?;
        let mut models = (0..ctx.fed.len()).map(|i| Ok(PersonalModel::v1(sim.plugin(i)?)?)).collect::<Result<Vec<_>>>()?;
        models.extend((0..ctx.new.len()).map(|_| PersonalModel::v1(newcomer.clone())).collect::<spa_model::Result<Vec<_>>>()?);
        let devices = scored(ctx, Arm::SpaV1, &models, &mut alone(&head), first.then_some(&mut flips))?;
        done(Arm::SpaV1, SeedRun::new(seed, devices, curve, t.elapsed().as_secs_f64()), progress);
    }
    out.extras.flips = flips.rows(Arm::GlobalFt);
    Ok(out)
}

/// Each device's result with its model (federated devices first, then newcomers, as
/// `ctx.device`) on its test split, scored by `score` (device index, features, model). On the
/// first seed (`flips` given): ROUGE of greedy replies for the main arms, and the federated
/// devices' per-token scores of an arm without a gate kept in `flips`.
fn scored(
    ctx: &Context,
    arm: Arm,
    models: &[PersonalModel],
    score: &mut dyn FnMut(usize, &DeviceFeatures, &PersonalModel) -> Result<TokenScores>,
    flips: Option<&mut Flips>,
) -> Result<Vec<DeviceResult>> {
    let head = ctx.head();
    let mut devices = Vec::new();
    let first = flips.is_some();
    let rouge_on = first && ctx.cfg.rouge_examples > 0 && ctx.cfg.rouge_arms.contains(&arm);
    let keep = first && arm != Arm::Backbone && models.iter().all(|m| m.gate.is_none());
    let mut kept = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let (d, held_out) = ctx.device(i)?;
        let threshold = if arm == Arm::Backbone { gate::NEVER } else { m.threshold };
        let scores = score(i, &d, m)?;
        let s = scores.at(threshold);
        if keep && !held_out {
            kept.push(scores);
        }
        let speaker = (arm != Arm::Backbone).then_some(m);
        let rouge_here = rouge_on && !held_out && (ctx.cfg.rouge_devices == 0 || i < ctx.cfg.rouge_devices);
        let rouge = if rouge_here { Some(device_rouge(ctx, &head, speaker, &d.data.test)?) } else { None };
        devices.push(DeviceResult {
            device: d.data.user.clone(),
            held_out,
            tokens: s.tokens,
            loss: s.loss,
            accuracy: s.accuracy,
            side_fraction: s.side_fraction,
            rouge,
        });
    }
    if let Some(flips) = flips.filter(|_| keep) {
        flips.keep(arm, kept);
    }
    Ok(devices)
}

/// Each device's model scored on its own test split.
fn alone(head: &FrozenHead) -> impl FnMut(usize, &DeviceFeatures, &PersonalModel) -> Result<TokenScores> + '_ {
    |_, d, m| Ok(m.score(head, &d.test)?)
}

/// Per arm, per device: the test scores of `models[arm][device]`, a device's arms scored
/// together (they share the body and the fit's candidates: each projected once).
fn score_together(ctx: &Context, models: &[Vec<PersonalModel>]) -> Result<Vec<Vec<TokenScores>>> {
    let head = ctx.head();
    let per_device = (0..ctx.devices())
        .into_par_iter()
        .map(|i| {
            let here: Vec<&PersonalModel> = models.iter().map(|m| &m[i]).collect();
            Ok(score_all(&here, &head, &ctx.device(i)?.0.test)?)
        })
        .collect::<Result<Vec<Vec<TokenScores>>>>()?;
    let mut out: Vec<Vec<TokenScores>> = vec![Vec::with_capacity(ctx.devices()); models.len()];
    for device in per_device {
        for (arm, s) in out.iter_mut().zip(device) {
            arm.push(s);
        }
    }
    Ok(out)
}

/// Untrained plugins (their scores at threshold "never" are the backbone's).
fn backbone_models(ctx: &Context, seed: u64) -> Result<Vec<PersonalModel>> {
    let bb = ctx.model.backbone;
    let p = Plugin::new(&SideConfig { seed, ..ctx.cfg.side.clone() }, &bb.config, &bb.device)?;
    Ok(vec![PersonalModel::of_body(p); ctx.devices()])
}

fn train_cfg(ctx: &Context, objective: Objective, lr: f64, seed: u64) -> TrainConfig {
    let gate_cost = if objective == Objective::Gated { ctx.cfg.local.gate_cost } else { 0.0 };
    TrainConfig { objective, lr, seed, gate_cost, val_fraction: 0.0, ..ctx.cfg.local.clone() }
}

/// Each device alone from a fresh side network: as many calls of `local.epochs` epochs as a
/// federated device trains in rounds (`rounds`, or its expected share of them with a sampled
/// cohort), each keeping its best epoch on validation; the learning rate tuned on the first
/// seed.
fn local(ctx: &Context, seed: u64, tuned: &mut Tuned, progress: &mut dyn FnMut(&str)) -> Result<(Vec<PersonalModel>, Vec<RoundPoint>)> {
    let lrs = if tuned.local_lr.is_some() || ctx.cfg.tune.lrs.is_empty() { vec![tuned.local_lr.unwrap_or(ctx.cfg.local.lr)] } else { ctx.cfg.tune.lrs.clone() };
    let mut best: Option<(f64, Vec<PersonalModel>, Vec<RoundPoint>, f64)> = None;
    for &lr in &lrs {
        let (models, curve) = local_at(ctx, seed, lr)?;
        let val = mean_val_loss(ctx, &models)?;
        if lrs.len() > 1 {
            progress(&format!("seed {seed} local lr {lr}: validation loss {val:.4}"));
        }
        if best.as_ref().is_none_or(|b| val < b.3) {
            best = Some((lr, models, curve, val));
        }
    }
    let (lr, models, curve, _) = best.expect("at least one lr");
    tuned.local_lr = Some(lr);
    Ok((models, curve))
}

fn local_at(ctx: &Context, seed: u64, lr: f64) -> Result<(Vec<PersonalModel>, Vec<RoundPoint>)> {
    let started = Instant::now();
    let (bb, head) = (ctx.model.backbone, ctx.head());
    let mut plugins = (0..ctx.devices())
        .map(|i| Plugin::new(&SideConfig { seed: seed.wrapping_add(1 + i as u64), ..ctx.cfg.side.clone() }, &bb.config, &bb.device))
        .collect::<spa_model::Result<Vec<_>>>()?;
    let mut curve = vec![point(ctx, 0, &plugins, &head, started)?];
    let calls = match ctx.cfg.cohort {
        Some(c) => (ctx.cfg.rounds * c).div_ceil(ctx.fed.len()).max(1),
        None => ctx.cfg.rounds,
    };
    for r in 1..=calls {
        plugins.par_iter_mut().enumerate().try_for_each(|(i, p)| -> Result<()> {
            let tc = train_cfg(ctx, Objective::Side, lr, seed.wrapping_add(r as u64 * 1000 + i as u64));
            let (d, _) = ctx.device(i)?;
            *p = train_with_validation(p.clone(), &head, &d.train, val_of(&d), &tc, None, &mut |_| {})?.0;
            Ok(())
        })?;
        curve.push(point(ctx, r, &plugins, &head, started)?);
    }
    Ok((plugins.into_iter().map(PersonalModel::of_body).collect(), curve))
}

/// Mean test loss and accuracy over the curve's devices of their plugins speaking always.
fn point(ctx: &Context, round: usize, plugins: &[Plugin], head: &FrozenHead, started: Instant) -> Result<RoundPoint> {
    let n = ctx.curve_devices();
    let scores = plugins[..n.min(plugins.len())]
        .par_iter()
        .enumerate()
        .map(|(i, p)| Ok(PersonalModel::of_body(p.clone()).score(head, &ctx.fed.get(i)?.test)?.at(gate::ALWAYS)))
        .collect::<Result<Vec<_>>>()?;
    let (loss, acc) = scores.iter().fold((0.0, 0.0), |(l, a), s| (l + s.loss, a + s.accuracy));
    let n = n.max(1) as f64;
    Ok(RoundPoint { round, loss: loss / n, accuracy: acc / n, seconds: started.elapsed().as_secs_f64() })
}

/// The mean validation loss of the federated devices' models (the first of `models`), as
/// they speak.
fn mean_val_loss(ctx: &Context, models: &[PersonalModel]) -> Result<f64> {
    let head = ctx.head();
    let n = ctx.fed.len().min(models.len());
    let losses =
        models[..n].par_iter().enumerate().map(|(i, m)| Ok(m.score(&head, val_of(&ctx.fed.get(i)?))?.at(m.threshold).loss)).collect::<Result<Vec<f64>>>()?;
    Ok(losses.iter().sum::<f64>() / n.max(1) as f64)
}

/// A federation for `arm` (`global`: the body; `fedprox`; `spa_v1`), its knobs tuned on the
/// first seed by the mean validation loss of the arm's models.
fn tuned_federation<'a>(
    ctx: &Context<'a>,
    arm: Arm,
    seed: u64,
    tuned: &mut Tuned,
    progress: &mut dyn FnMut(&str),
) -> Result<(Simulation<'a>, Vec<RoundPoint>)> {
    let tune = &ctx.cfg.tune;
    let given_lr = |t: Option<f64>| if t.is_some() || tune.lrs.is_empty() { vec![t.unwrap_or(ctx.cfg.local.lr)] } else { tune.lrs.clone() };
    let grid: Vec<(f64, f64)> = match arm {
        Arm::Global => given_lr(tuned.body_lr).into_iter().map(|lr| (lr, 0.0)).collect(),
        Arm::SpaV1 => given_lr(tuned.v1_lr).into_iter().map(|lr| (lr, 0.0)).collect(),
        _ => {
            let lr = tuned.body_lr.unwrap_or(ctx.cfg.local.lr);
            let mus = if tuned.fedprox_mu.is_some() || tune.fedprox_mus.is_empty() {
                vec![tuned.fedprox_mu.unwrap_or(ctx.cfg.fedprox_mu)]
            } else {
                tune.fedprox_mus.clone()
            };
            mus.into_iter().map(|mu| (lr, mu)).collect()
        }
    };
    let mut best: Option<(f64, f64, Simulation<'a>, Vec<RoundPoint>, f64)> = None;
    for (lr, mu) in grid.iter().copied() {
        let (sim, curve) = federate(ctx, arm, seed, lr, mu)?;
        let models = if arm == Arm::SpaV1 {
            (0..ctx.fed.len()).map(|i| Ok(PersonalModel::v1(sim.plugin(i)?)?)).collect::<Result<Vec<_>>>()?
        } else {
            vec![PersonalModel::of_body(sim.plugin(0)?); ctx.fed.len()]
        };
        let val = if grid.len() > 1 { mean_val_loss(ctx, &models)? } else { 0.0 };
        if grid.len() > 1 {
            progress(&format!("seed {seed} {} lr {lr} mu {mu}: validation loss {val:.4}", arm.name()));
        }
        if best.as_ref().is_none_or(|b| val < b.4) {
            best = Some((lr, mu, sim, curve, val));
        }
    }
    let (lr, mu, sim, curve, _) = best.expect("a grid point");
    match arm {
        Arm::Global => tuned.body_lr = Some(lr),
        Arm::SpaV1 => tuned.v1_lr = Some(lr),
        _ => tuned.fedprox_mu = Some(mu),
    }
    Ok((sim, curve))
}

/// A federation of the federated devices for `cfg.rounds` rounds.
fn federate<'a>(ctx: &Context<'a>, arm: Arm, seed: u64, lr: f64, mu: f64) -> Result<(Simulation<'a>, Vec<RoundPoint>)> {
    let cfg = ctx.cfg;
    let objective = if arm == Arm::SpaV1 { Objective::Gated } else { Objective::Side };
    let sim_cfg = SimConfig {
        dp: None,
        rounds: cfg.rounds,
        side: SideConfig { seed, ..cfg.side.clone() },
        local: TrainConfig { prox_mu: mu, ..train_cfg(ctx, objective, lr, seed) },
        strategy: cfg.strategy.clone(),
        dropout: cfg.dropout,
        clip: cfg.clip,
        seed,
        cohort: cfg.cohort,
        eval_devices: ctx.curve_devices(),
    };
    let started = Instant::now();
    let mut sim = Simulation::with_bank(ctx.model.backbone, ctx.head(), ctx.fed.clone(), sim_cfg)?;
    let pick = |m: &spa_model::train::EvalMetrics| if objective == Objective::Gated { (m.routed_loss, m.routed_acc) } else { (m.side_loss, m.side_acc) };
    let at = |round: usize, all: &[spa_model::train::EvalMetrics]| {
        let n = all.len().max(1) as f64;
        let (l, a) = all.iter().map(pick).fold((0.0, 0.0), |s, (l, a)| (s.0 + l, s.1 + a));
        RoundPoint { round, loss: l / n, accuracy: a / n, seconds: started.elapsed().as_secs_f64() }
    };
    let mut curve = vec![at(0, &sim.evaluate_each()?)];
    for r in 1..=cfg.rounds {
        let rep = sim.round()?;
        curve.push(at(r, &rep.devices));
    }
    Ok((sim, curve))
}

/// The personal fit of every device (federated, then newcomers) against `body`.
fn fit_all(ctx: &Context, body: &Plugin, seed: u64) -> Result<Vec<Fit>> {
    let head = ctx.head();
    (0..ctx.devices())
        .into_par_iter()
        .map(|i| {
            let (d, _) = ctx.device(i)?;
            Ok(fit(body, &head, &d.train, val_of(&d), &ctx.cfg.personal, seed.wrapping_add(7 * i as u64))?)
        })
        .collect()
}

/// The mean of the devices' costs.
fn mean_cost(models: &[PersonalModel], ctx_len: usize) -> DeviceCost {
    let costs: Vec<DeviceCost> = models.iter().map(|m| m.cost(ctx_len)).collect();
    let n = costs.len().max(1);
    DeviceCost {
        side_macs: costs.iter().map(|c| c.side_macs).sum::<f64>() / n as f64,
        head_macs: costs.iter().map(|c| c.head_macs).sum::<f64>() / n as f64,
        knn_macs: costs.iter().map(|c| c.knn_macs).sum::<f64>() / n as f64,
        datastore_bytes: costs.iter().map(|c| c.datastore_bytes).sum::<usize>() / n,
        private_bytes: costs.iter().map(|c| c.private_bytes).sum::<usize>() / n,
    }
}

/// Mean ROUGE-1/2/L F1 over the device's first `rouge_examples` test examples of the greedy
/// reply (at most the reference's length in tokens + 20%, ending at EOS or a blank line),
/// by `model` (None: the backbone alone).
fn device_rouge(ctx: &Context, head: &FrozenHead, model: Option<&PersonalModel>, test: &[Example]) -> Result<Rouge> {
    let (bb, tok, tokens) = (ctx.model.backbone, ctx.model.tokenizer, ctx.model.tokens);
    let take = ctx.cfg.rouge_examples.min(test.len());
    let mut r = Rouge { replies: take, ..Rouge::default() };
    for ex in &test[..take] {
        let prompt = tokens.prompt_ids(tok, &ex.prompt, false)?;
        let ref_len = tok.encode(&ex.reply)?.len();
        let dec = Decoding { max_new: (ref_len * 6).div_ceil(5).max(1), sampling: Sampling::greedy(), stop: tokens.eos.clone() };
        let layers = model.map_or_else(|| vec![bb.config.num_layers], |m| m.body.shape.feature_layers.clone());
        let mut src = LocalStates::new(bb, &layers)?;
        let (_, text) = generate_text(&mut src, head, model, tok, &prompt, &dec, Some("\n\n"), &mut |_| {})?;
        r.rouge_1 += rouge_n(&ex.reply, &text, 1);
        r.rouge_2 += rouge_n(&ex.reply, &text, 2);
        r.rouge_l += rouge_l(&ex.reply, &text);
    }
    let n = take.max(1) as f64;
    (r.rouge_1, r.rouge_2, r.rouge_l) = (r.rouge_1 / n, r.rouge_2 / n, r.rouge_l / n);
    Ok(r)
}
