//! Running the arms for one seed. Arms that share training share the run: `global` and
//! `global_ft` one federation, `spa`, `spa_gate_on` and `spa_gate_off` one federation
//! evaluated three ways. The backbone's greedy replies do not depend on the seed and are
//! scored once.
use std::cell::RefCell;
use std::time::Instant;

use spa_model::data::Example;
use spa_model::generate::{Decoding, LocalStates, Sampling, generate_text};
use spa_model::side::{FrozenHead, Plugin, RoleRules, SideConfig};
use spa_model::train::{EvalMetrics, TrainConfig, evaluate, train_plugin};

use super::config::{Arm, ExperimentConfig, GateMode};
use super::stats::rouge_l;
use super::{DeviceResult, Model, Result, RoundPoint, SeedRun, Summary};
use crate::simulation::{DeviceFeatures, SimConfig, Simulation};

pub struct Context<'a> {
    pub cfg: &'a ExperimentConfig,
    pub model: &'a Model<'a>,
    pub data: &'a [DeviceFeatures],
    /// Per device, the backbone's mean ROUGE-L (seed-independent).
    pub rouge_cache: RefCell<Option<Vec<f64>>>,
}

/// Every configured arm for `seed`, in the config's order.
pub fn run_seed(ctx: &Context, seed: u64, progress: &mut dyn FnMut(&str)) -> Result<Vec<(Arm, SeedRun)>> {
    let wants = |a: Arm| ctx.cfg.arms.contains(&a);
    let mut out = Vec::new();
    let mut done = |arm: Arm, run: SeedRun, progress: &mut dyn FnMut(&str)| {
        let m = &run.mean;
        progress(&format!(
            "seed {seed} {:<16} loss {:.4} acc {:.4} rouge-L {:.4} gate {:.2} ({:.1} s)",
            arm.name(),
            m.loss,
            m.accuracy,
            m.rouge_l,
            m.gate_on,
            run.seconds
        ));
        out.push((arm, run));
    };
    if wants(Arm::Backbone) {
        let t = Instant::now();
        let devices = backbone_results(ctx)?;
        done(Arm::Backbone, finish(seed, devices, vec![], t), progress);
    }
    if wants(Arm::Local) {
        done(Arm::Local, local(ctx, seed)?, progress);
    }
    if wants(Arm::Global) || wants(Arm::GlobalFt) {
        let t = Instant::now();
        let fed = federate(ctx, Arm::Global, seed)?;
        if wants(Arm::Global) {
            done(Arm::Global, finish(seed, sim_results(ctx, &fed, GateMode::On)?, fed.curve.clone(), t), progress);
        }
        if wants(Arm::GlobalFt) {
            // Its rounds are the global arm's; only the fine-tuned end point is its own.
            let ft = fine_tune(ctx, &fed.sim, seed)?;
            done(Arm::GlobalFt, finish(seed, ft, vec![], t), progress);
        }
    }
    if wants(Arm::Spa) {
        let t = Instant::now();
        let fed = federate(ctx, Arm::Spa, seed)?;
        done(Arm::Spa, finish(seed, sim_results(ctx, &fed, GateMode::Learned)?, fed.curve.clone(), t), progress);
        for arm in [Arm::SpaGateOn, Arm::SpaGateOff] {
            if wants(arm) {
                let t = Instant::now();
                done(arm, finish(seed, sim_results(ctx, &fed, arm.gate())?, vec![], t), progress);
            }
        }
    }
    for arm in [Arm::SpaPrivateHead, Arm::SpaPrivateGate, Arm::SpaPrivateUp] {
        if wants(arm) {
            let t = Instant::now();
            let fed = federate(ctx, arm, seed)?;
            done(arm, finish(seed, sim_results(ctx, &fed, arm.gate())?, fed.curve.clone(), t), progress);
        }
    }
    Ok(out)
}

fn finish(seed: u64, devices: Vec<DeviceResult>, curve: Vec<RoundPoint>, started: Instant) -> SeedRun {
    SeedRun { seed, mean: Summary::of(&devices), devices, curve, seconds: started.elapsed().as_secs_f64() }
}

/// `(loss, accuracy, gate on)` of the distribution the gate mode speaks with.
fn pick(m: &EvalMetrics, mode: GateMode) -> (f64, f64, f64) {
    match mode {
        GateMode::Learned => (m.routed_loss, m.routed_acc, m.side_fraction),
        GateMode::On => (m.side_loss, m.side_acc, 1.0),
        GateMode::Off => (m.backbone_loss, m.backbone_acc, 0.0),
    }
}

fn point(round: usize, all: &[EvalMetrics], mode: GateMode, started: Instant) -> RoundPoint {
    let m = EvalMetrics::mean(all);
    let (loss, accuracy, _) = pick(&m, mode);
    RoundPoint { round, loss, accuracy, seconds: started.elapsed().as_secs_f64() }
}

/// The arm's side config: everything but `arm.private()` federated.
fn side_for(cfg: &ExperimentConfig, arm: Arm, seed: u64) -> SideConfig {
    let private: Vec<String> = arm.private().iter().map(|p| p.to_string()).collect();
    let shared = ["side.", "gate.", "personal."].into_iter().filter(|p| !arm.private().contains(p)).map(str::to_owned).collect();
    SideConfig { seed, roles: RoleRules { shared, private }, ..cfg.side.clone() }
}

fn train_cfg(cfg: &ExperimentConfig, seed: u64) -> TrainConfig {
    TrainConfig { seed, ..cfg.local.clone() }
}

/// A finished federation: its per-round curve (in the arm's gate mode) and each device's test
/// metrics after the last round.
struct Federation<'a> {
    sim: Simulation<'a>,
    curve: Vec<RoundPoint>,
    last: Vec<EvalMetrics>,
}

/// A federation of every device for `cfg.rounds` rounds.
fn federate<'a>(ctx: &Context<'a>, arm: Arm, seed: u64) -> Result<Federation<'a>> {
    let cfg = ctx.cfg;
    let sim_cfg = SimConfig {
        rounds: cfg.rounds,
        side: side_for(cfg, arm, seed),
        local: train_cfg(cfg, seed),
        strategy: cfg.strategy.clone(),
        dropout: cfg.dropout,
        clip: cfg.clip,
        seed,
    };
    let started = Instant::now();
    let mut sim = Simulation::with_features(ctx.model.backbone, ctx.data.to_vec(), sim_cfg)?;
    let mut last = sim.evaluate_each()?;
    let mut curve = vec![point(0, &last, arm.gate(), started)];
    for r in 1..=cfg.rounds {
        last = sim.round()?.devices;
        curve.push(point(r, &last, arm.gate(), started));
    }
    Ok(Federation { sim, curve, last })
}

/// Each device alone: `rounds` times `local.epochs` epochs (an optimizer restart at each
/// round-equivalent, as a federated device gets), shared and private parts together.
fn local(ctx: &Context, seed: u64) -> Result<SeedRun> {
    let started = Instant::now();
    let (bb, head) = (ctx.model.backbone, FrozenHead::device_copy(ctx.model.backbone));
    let mut plugins = ctx
        .data
        .iter()
        .enumerate()
        .map(|(i, _)| Plugin::new(&side_for(ctx.cfg, Arm::Local, seed.wrapping_add(1 + i as u64)), &bb.config, &bb.device))
        .collect::<spa_model::Result<Vec<_>>>()?;
    let eval_all =
        |plugins: &[Plugin]| -> Result<Vec<EvalMetrics>> { plugins.iter().zip(ctx.data).map(|(p, d)| Ok(evaluate(p, &head, &d.test, 2048)?)).collect() };
    let mut metrics = eval_all(&plugins)?;
    let mut curve = vec![point(0, &metrics, GateMode::Learned, started)];
    for r in 1..=ctx.cfg.rounds {
        for (i, (p, d)) in plugins.iter_mut().zip(ctx.data).enumerate() {
            let tc = train_cfg(ctx.cfg, seed.wrapping_add(r as u64 * 1000 + i as u64));
            *p = train_plugin(p.clone(), &head, &d.train, &tc, None, &mut |_| {})?.0;
        }
        metrics = eval_all(&plugins)?;
        curve.push(point(r, &metrics, GateMode::Learned, started));
    }
    let devices = results(ctx, &head, &plugins, &metrics, GateMode::Learned)?;
    Ok(finish(seed, devices, curve, started))
}

/// FedAvg+FT: each device fine-tunes the final global plugin on its own data for one
/// round's local epochs.
fn fine_tune(ctx: &Context, sim: &Simulation, seed: u64) -> Result<Vec<DeviceResult>> {
    let head = sim.head();
    let mut plugins = Vec::new();
    let mut metrics = Vec::new();
    for (i, d) in ctx.data.iter().enumerate() {
        let tc = train_cfg(ctx.cfg, seed.wrapping_add(999_000 + i as u64));
        let p = train_plugin(sim.plugin(i)?, head, &d.train, &tc, None, &mut |_| {})?.0;
        metrics.push(evaluate(&p, head, &d.test, 2048)?);
        plugins.push(p);
    }
    results(ctx, head, &plugins, &metrics, GateMode::On)
}

fn sim_results(ctx: &Context, fed: &Federation, mode: GateMode) -> Result<Vec<DeviceResult>> {
    let sim = &fed.sim;
    let plugins = (0..sim.devices.len()).map(|i| sim.plugin(i)).collect::<crate::simulation::Result<Vec<_>>>()?;
    results(ctx, sim.head(), &plugins, &fed.last, mode)
}

fn backbone_results(ctx: &Context) -> Result<Vec<DeviceResult>> {
    let bb = ctx.model.backbone;
    let head = FrozenHead::device_copy(bb);
    let plugins = (0..ctx.data.len()).map(|_| Plugin::new(&ctx.cfg.side, &bb.config, &bb.device)).collect::<spa_model::Result<Vec<_>>>()?;
    let metrics = plugins.iter().zip(ctx.data).map(|(p, d)| Ok(evaluate(p, &head, &d.test, 2048)?)).collect::<Result<Vec<_>>>()?;
    results(ctx, &head, &plugins, &metrics, GateMode::Off)
}

/// Per-device results: the metrics in `mode`, and the ROUGE-L of greedy replies from the
/// plugin with its gate forced to `mode` (the backbone's replies scored once, as they do not
/// depend on a plugin).
fn results(ctx: &Context, head: &FrozenHead, plugins: &[Plugin], metrics: &[EvalMetrics], mode: GateMode) -> Result<Vec<DeviceResult>> {
    let rouge = if mode == GateMode::Off {
        let mut cache = ctx.rouge_cache.borrow_mut();
        if cache.is_none() {
            *cache = Some(ctx.data.iter().map(|d| device_rouge(ctx, head, None, &d.data.test)).collect::<Result<_>>()?);
        }
        cache.clone().expect("filled above")
    } else {
        plugins.iter().zip(ctx.data).map(|(p, d)| device_rouge(ctx, head, Some(&forced(p, mode)), &d.data.test)).collect::<Result<_>>()?
    };
    Ok(ctx
        .data
        .iter()
        .zip(metrics)
        .zip(rouge)
        .map(|((d, m), rouge_l)| {
            let (loss, accuracy, gate_on) = pick(m, mode);
            DeviceResult { device: d.data.user.clone(), loss, accuracy, rouge_l, gate_on }
        })
        .collect())
}

/// The plugin with its gate threshold set so that `mode` holds (`g > threshold` routes to
/// the side; g is a probability in [0, 1]).
fn forced(p: &Plugin, mode: GateMode) -> Plugin {
    let mut p = p.clone();
    match mode {
        GateMode::Learned => {}
        GateMode::On => p.config.gate.threshold = -1.0,
        GateMode::Off => p.config.gate.threshold = 2.0,
    }
    p
}

/// Mean ROUGE-L F1 over the device's first `rouge_examples` test examples of the greedy
/// reply (at most the reference's length in tokens + 20%, ending at EOS or a blank line).
fn device_rouge(ctx: &Context, head: &FrozenHead, plugin: Option<&Plugin>, test: &[Example]) -> Result<f64> {
    let (bb, tok, tokens) = (ctx.model.backbone, ctx.model.tokenizer, ctx.model.tokens);
    let take = if ctx.cfg.rouge_examples == 0 { test.len() } else { ctx.cfg.rouge_examples.min(test.len()) };
    let mut sum = 0.0;
    for ex in &test[..take] {
        let prompt = tokens.prompt_ids(tok, &ex.prompt, false)?;
        let ref_len = tok.encode(&ex.reply)?.len();
        let dec = Decoding { max_new: (ref_len * 6).div_ceil(5).max(1), sampling: Sampling { temperature: 0.0, top_k: 0, seed: 0 }, stop: tokens.eos.clone() };
        let layers = plugin.map_or_else(|| vec![bb.config.num_layers], |p| p.shape.feature_layers.clone());
        let mut src = LocalStates::new(bb, &layers)?;
        let (_, text) = generate_text(&mut src, head, plugin, tok, &prompt, &dec, Some("\n\n"), &mut |_| {})?;
        sum += rouge_l(&ex.reply, &text);
    }
    Ok(if take == 0 { 0.0 } else { sum / take as f64 })
}
