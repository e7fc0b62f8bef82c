//! Side plugin, gate, roles and local training on the tiny fixture backbone.
use std::path::PathBuf;

use spa_model::backbone::{TokenBatch, load_backbone};
use spa_model::features::{Positions, TokenizedExample, extract_features};
use spa_model::generate::{Decoding, LocalStates, Sampling, generate};
use spa_model::personal::knn::{Datastore, KnnParams, normalize_rows};
use spa_model::personal::{PersonalConfig, PersonalModel, Route, Stage, fit, score_all};
use spa_model::side::{FrozenHead, Plugin, SideConfig, SideVariant};
use spa_model::tensor_util::{from_vec, to_vec};
use spa_model::train::{Objective, TrainConfig, evaluate, train_plugin};
use spa_model::{Backbone, BackendKind};

fn backbone() -> Backbone {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    load_backbone(&dir, &BackendKind::Flex.device().unwrap()).unwrap()
}

/// A learnable private habit the random backbone cannot know: after a random prompt the
/// reply is always 10 11 12 13 14 15 16 17.
fn examples(n: usize, seed: u64) -> Vec<TokenizedExample> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            let mut ids: Vec<u32> = (0..6)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 33) as u32 % 90 + 3
                })
                .collect();
            ids.extend(10..18);
            TokenizedExample { ids, reply_start: 6 }
        })
        .collect()
}

fn config(variant: SideVariant) -> SideConfig {
    SideConfig { variant, reduction: 4, ..SideConfig::default() }
}

fn positions(v: SideVariant) -> Positions {
    if v == SideVariant::Mlp { Positions::LossOnly } else { Positions::All }
}

#[test]
fn fresh_plugin_reproduces_the_backbone() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    for v in [SideVariant::Mlp, SideVariant::Ladder] {
        let plugin = Plugin::new(&config(v), &bb.config, &bb.device).unwrap();
        let data = extract_features(&bb, &examples(2, 1), &plugin.shape.feature_layers, Positions::All, 4).unwrap();
        let m = evaluate(&plugin, &head, &data, 256).unwrap();
        assert!((m.side_loss - m.backbone_loss).abs() < 1e-5, "{v:?}: {m:?}");
        assert_eq!(m.side_acc, m.backbone_acc);
    }
}

#[test]
fn roles_split_shared_from_private() {
    let bb = backbone();
    let plugin = Plugin::new(&config(SideVariant::Ladder), &bb.config, &bb.device).unwrap();
    let (shared, private) = plugin.split().unwrap();
    assert!(shared.as_set().tensors.keys().all(|k| k.starts_with("side.")));
    assert!(shared.as_set().tensors.keys().any(|k| k.starts_with("side.blocks.")));
    assert!(private.tensors.keys().all(|k| k.starts_with("gate.") || k.starts_with("personal.")));
    assert!(private.tensors.contains_key("personal.weight"));
    assert_eq!(shared.as_set().numel() + private.numel(), plugin.params().numel());
    // A rule set that forgets a path fails closed.
    let mut cfg = config(SideVariant::Mlp);
    cfg.roles.private = vec!["gate.".into()];
    assert!(Plugin::new(&cfg, &bb.config, &bb.device).unwrap_err().to_string().contains("personal"));
}

fn train_and_eval(v: SideVariant, seed: u64, cfg: &TrainConfig) -> (Plugin, spa_model::train::EvalMetrics, spa_model::train::EvalMetrics) {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let plugin = Plugin::new(&SideConfig { seed, ..config(v) }, &bb.config, &bb.device).unwrap();
    let layers = plugin.shape.feature_layers.clone();
    let train = extract_features(&bb, &examples(48, 7), &layers, positions(v), 16).unwrap();
    let test = extract_features(&bb, &examples(16, 99), &layers, positions(v), 16).unwrap();
    let before = evaluate(&plugin, &head, &test, 256).unwrap();
    let (plugin, report) = train_plugin(plugin, &head, &train, cfg, None, &mut |_| {}).unwrap();
    assert!(report.epoch_losses.last().unwrap() < report.epoch_losses.first().unwrap(), "{report:?}");
    let after = evaluate(&plugin, &head, &test, 256).unwrap();
    (plugin, before, after)
}

/// SPA v1's training (side, gate and personal layer together): what these tests exercise.
fn quick(epochs: usize) -> TrainConfig {
    TrainConfig { objective: Objective::Gated, epochs, lr: 1e-2, batch_tokens: 64, batch_sequences: 8, ..TrainConfig::default() }
}

/// Greedy personalized decoding after an unseen prompt reproduces the private habit, with
/// the gate handing those tokens to the side plugin; the backbone alone does not.
fn generates_the_habit(plugin: &Plugin) {
    let model = PersonalModel::v1(plugin.clone()).unwrap();
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let greedy = Sampling::greedy();
    let prompt = examples(1, 12345)[0].ids[..6].to_vec();
    let mut src = LocalStates::new(&bb, &model.body.shape.feature_layers).unwrap();
    let g = generate(&mut src, &head, Some(&model), &prompt, &dec(8, &greedy)).unwrap();
    let hits = g.ids.iter().zip(10..18).filter(|(a, b)| **a == *b).count();
    assert!(hits >= 7, "personalized: {:?}", g);
    assert!(g.side_fraction() >= 0.75, "{g:?}");
    let mut src = LocalStates::new(&bb, &[bb.config.num_layers]).unwrap();
    let base = generate(&mut src, &head, None, &prompt, &dec(8, &greedy)).unwrap();
    assert!(base.ids.iter().zip(10..18).filter(|(a, b)| **a == *b).count() <= 2, "backbone: {base:?}");
}

#[test]
fn greedy_generation_matches_a_full_forward_per_token() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let prompt = vec![5u32, 9, 42, 17];
    let mut src = LocalStates::new(&bb, &[bb.config.num_layers]).unwrap();
    let greedy = Sampling::greedy();
    let g = generate(&mut src, &head, None, &prompt, &dec(12, &greedy)).unwrap();
    let mut ids = prompt.clone();
    for _ in 0..12 {
        let tb = TokenBatch::new(vec![ids.clone()], &bb.config, 0).unwrap();
        let logits = to_vec(bb.forward(&tb, &[], true, None).logits.unwrap());
        let v = bb.config.vocab_size;
        let last = &logits[logits.len() - v..];
        ids.push(last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32);
    }
    assert_eq!(g.ids, ids[prompt.len()..]);
    assert!(g.from_side.iter().all(|s| !s));
    // A stop id (EOS) ends decoding right after its first occurrence.
    let end = g.ids[4];
    let first = g.ids.iter().position(|&i| i == end).unwrap();
    let stopped = Decoding { stop: vec![end], ..dec(12, &greedy) };
    let s = generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &prompt, &stopped).unwrap();
    assert_eq!(s.ids, g.ids[..=first]);
    // Sampling is reproducible with a seed, and the context limit is respected.
    let warm = Sampling { temperature: 1.0, top_k: 5, seed: 3, ..Sampling::default() };
    let a = generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &prompt, &dec(10, &warm)).unwrap();
    let b = generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &prompt, &dec(10, &warm)).unwrap();
    assert_eq!(a, b);
    let room = bb.config.max_position_embeddings - prompt.len();
    let long = generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &prompt, &dec(room + 50, &greedy)).unwrap();
    assert_eq!(long.ids.len(), room);
    let bad = Sampling { temperature: f64::NAN, ..Sampling::default() };
    assert!(generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &prompt, &dec(1, &bad)).is_err());
    assert!(generate(&mut LocalStates::new(&bb, &[bb.config.num_layers]).unwrap(), &head, None, &[], &dec(1, &greedy)).is_err());
}

#[test]
fn mlp_side_learns_what_the_backbone_cannot() {
    let (plugin, before, after) = train_and_eval(SideVariant::Mlp, 0, &quick(20));
    assert!(after.side_loss < 0.5 * before.side_loss, "before {before:?} after {after:?}");
    assert!(after.side_acc > 0.9 && after.side_acc > after.backbone_acc + 0.5, "{after:?}");
    // The gate learned to call the side plugin where it helps.
    assert!(after.routed_acc > after.backbone_acc + 0.5, "{after:?}");
    generates_the_habit(&plugin);
}

#[test]
fn ladder_side_learns_what_the_backbone_cannot() {
    let (plugin, before, after) = train_and_eval(SideVariant::Ladder, 0, &quick(20));
    assert!(after.side_loss < 0.5 * before.side_loss, "before {before:?} after {after:?}");
    assert!(after.side_acc > 0.9, "{after:?}");
    generates_the_habit(&plugin);
}

#[test]
fn training_is_deterministic_with_a_seed() {
    let (a, _, _) = train_and_eval(SideVariant::Mlp, 3, &quick(2));
    let (b, _, _) = train_and_eval(SideVariant::Mlp, 3, &quick(2));
    assert_eq!(a.params(), b.params());
    let (c, _, _) = train_and_eval(SideVariant::Mlp, 4, &quick(2));
    assert_ne!(a.params(), c.params());
}

#[test]
fn shared_and_private_parts_save_and_load_separately() {
    let (trained, _, after) = train_and_eval(SideVariant::Mlp, 0, &quick(3));
    let dir = tempfile::tempdir().unwrap();
    let (shared, private) = trained.split().unwrap();
    shared.as_set().save(&dir.path().join("shared.safetensors")).unwrap();
    private.save(&dir.path().join("private.safetensors")).unwrap();
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let fresh = Plugin::new(&config(SideVariant::Mlp), &bb.config, &bb.device).unwrap();
    let loaded = fresh
        .load(&spa_model::side::ParamSet::load(&dir.path().join("shared.safetensors")).unwrap())
        .unwrap()
        .load(&spa_model::side::ParamSet::load(&dir.path().join("private.safetensors")).unwrap())
        .unwrap();
    assert_eq!(loaded.params(), trained.params());
    let test = extract_features(&bb, &examples(16, 99), &loaded.shape.feature_layers, Positions::LossOnly, 16).unwrap();
    assert_eq!(evaluate(&loaded, &head, &test, 256).unwrap(), after);
}

#[test]
fn fedprox_keeps_shared_parameters_near_the_global_ones() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let plugin = Plugin::new(&config(SideVariant::Mlp), &bb.config, &bb.device).unwrap();
    let global = plugin.shared().unwrap();
    let train = extract_features(&bb, &examples(32, 7), &plugin.shape.feature_layers, Positions::LossOnly, 16).unwrap();
    let dist = |mu: f64| {
        let cfg = TrainConfig { prox_mu: mu, ..quick(5) };
        let (p, _) = train_plugin(plugin.clone(), &head, &train, &cfg, Some(&global), &mut |_| {}).unwrap();
        let d = p.shared().unwrap().delta_from(&global).unwrap();
        d.iter().map(|x| x * x).sum::<f32>().sqrt()
    };
    let (free, prox) = (dist(0.0), dist(10.0));
    assert!(prox < 0.5 * free, "||delta|| without prox {free}, with mu=10 {prox}");
}

#[test]
fn bad_training_input_is_rejected() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let plugin = Plugin::new(&config(SideVariant::Mlp), &bb.config, &bb.device).unwrap();
    let train = extract_features(&bb, &examples(4, 7), &plugin.shape.feature_layers, Positions::LossOnly, 4).unwrap();
    let bad = TrainConfig { lr: f64::NAN, ..quick(1) };
    assert!(train_plugin(plugin.clone(), &head, &train, &bad, None, &mut |_| {}).is_err());
    let mut empty = train.clone();
    empty.examples.clear();
    assert!(train_plugin(plugin.clone(), &head, &empty, &quick(1), None, &mut |_| {}).is_err());
    // Features with a NaN are refused at the door.
    let ex = &examples(1, 1)[0];
    let n = ex.loss_positions().len();
    let mut states = vec![vec![0.0f32; n * train.d]; train.layers.len()];
    states[0][0] = f32::NAN;
    assert!(train.example_from_states(ex, &states).is_err());
    // And the head maths agree with the backbone's own.
    let h = from_vec(vec![0.5f32; 64], [1, 1, 64], &bb.device);
    let a = to_vec(head.logits(h.clone()));
    let b = to_vec(bb.head(h));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
}

/// With a validation split the epoch with the lowest validation routed loss is kept, and
/// when every epoch makes the held-out examples worse the untrained plugin (= the backbone)
/// is what comes back.
#[test]
fn validation_split_keeps_the_best_epoch() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let plugin = Plugin::new(&config(SideVariant::Mlp), &bb.config, &bb.device).unwrap();
    let layers = plugin.shape.feature_layers.clone();
    let cfg = TrainConfig { val_fraction: 0.25, ..quick(4) };

    // Same habit in the held-out quarter: training helps, a later epoch wins.
    let data = extract_features(&bb, &examples(48, 7), &layers, Positions::LossOnly, 16).unwrap();
    let (trained, report) = train_plugin(plugin.clone(), &head, &data, &cfg, None, &mut |_| {}).unwrap();
    assert_eq!(report.val_losses.len(), 5, "{report:?}");
    let best = report.val_losses.iter().copied().enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(report.best_epoch, best.0);
    assert!(report.best_epoch > 0 && best.1 < 0.5 * report.val_losses[0], "{report:?}");
    let mut tail = data.clone();
    tail.examples.drain(..36);
    let m = evaluate(&trained, &head, &tail, 256).unwrap();
    assert!((m.routed_loss - best.1).abs() < 1e-4, "{m:?} vs {best:?}");

    // The held-out quarter follows another habit: training only hurts it, so the fresh
    // plugin is returned unchanged.
    let mut mixed = examples(36, 7);
    mixed.extend(examples(12, 8).into_iter().map(|mut e| {
        e.ids.truncate(6);
        e.ids.extend(20..28);
        e
    }));
    let data = extract_features(&bb, &mixed, &layers, Positions::LossOnly, 16).unwrap();
    let (kept, report) = train_plugin(plugin.clone(), &head, &data, &cfg, None, &mut |_| {}).unwrap();
    assert_eq!(report.best_epoch, 0, "{report:?}");
    assert_eq!(kept.params(), plugin.params());
    // Bad fractions are refused.
    let bad = TrainConfig { val_fraction: 0.9, ..quick(1) };
    assert!(train_plugin(plugin, &head, &data, &bad, None, &mut |_| {}).is_err());
}

fn dec(max_new: usize, sampling: &Sampling) -> Decoding {
    Decoding { max_new, sampling: sampling.clone(), stop: vec![] }
}

/// A plugin with random weights everywhere (up, personal and gate included): its gate
/// opens on some tokens, whose tokens then differ from the backbone's drafts.
fn scrambled(v: SideVariant, bb: &Backbone) -> Plugin {
    let plugin = Plugin::new(&config(v), &bb.config, &bb.device).unwrap();
    let mut params = plugin.params();
    let mut x = 7u64;
    for t in params.tensors.values_mut() {
        for p in &mut t.values {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *p = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6;
        }
    }
    plugin.load(&params).unwrap()
}

/// Greedy, seeded, and each of llama.cpp's filters and penalties.
fn samplers() -> Vec<Sampling> {
    vec![
        Sampling::greedy(),
        Sampling { temperature: 0.9, top_k: 0, seed: 11, ..Sampling::default() },
        Sampling { temperature: 0.8, top_k: 40, top_p: 0.9, min_p: 0.05, seed: 5, ..Sampling::default() },
        Sampling { repeat_penalty: 1.3, repeat_last_n: 16, presence_penalty: 0.4, frequency_penalty: 0.2, ..Sampling::greedy() },
        Sampling { temperature: 1.1, min_p: 0.1, repeat_penalty: 1.2, frequency_penalty: 0.3, seed: 2, ..Sampling::default() },
    ]
}

/// The coordinator's drafts are the tokens the device picks from the backbone alone, under
/// every sampler: with no personal model every draft is accepted.
#[test]
fn the_drafter_reproduces_every_sampler() {
    use spa_model::generate::SideInputs;
    use spa_model::speculative::{self, DraftForm, Drafter, LocalDrafts};
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let layers = [bb.config.num_layers];
    let prompt = vec![5u32, 9, 42, 17, 9, 9];
    for sampling in samplers() {
        let d = dec(30, &sampling);
        let drafter = Drafter::new(&bb, DraftForm::Taps(layers.to_vec()), sampling.clone(), vec![], true).unwrap();
        let mut src = LocalDrafts { backbone: &bb, drafter };
        let (g, st) = speculative::generate(&mut src, &head, None, &layers, SideInputs::Taps, &prompt, &d, 8, &mut |_, _| true).unwrap();
        let naive = generate(&mut LocalStates::new(&bb, &layers).unwrap(), &head, None, &prompt, &d).unwrap();
        assert_eq!(g, naive, "{sampling:?}");
        assert!(st.drafted >= 10 && st.accepted == st.drafted, "{sampling:?}: {st:?}");
    }
    // The penalties change what is chosen (the test would pass if they were ignored otherwise).
    let plain = generate(&mut LocalStates::new(&bb, &layers).unwrap(), &head, None, &prompt, &dec(30, &Sampling::greedy())).unwrap();
    let penalized = generate(&mut LocalStates::new(&bb, &layers).unwrap(), &head, None, &prompt, &dec(30, &samplers()[3])).unwrap();
    assert_ne!(plain.ids, penalized.ids);
}

/// Sessions stepped together get, step after step, the blocks each gets alone: different
/// taps, draft lengths, samplers, accepted drafts, and a prompt too long to batch.
#[test]
fn sessions_stepped_together_get_the_blocks_they_get_alone() {
    use spa_model::speculative::{Block, DraftForm, Drafter, StepArgs};
    let bb = backbone();
    let nl = bb.config.num_layers;
    let s = samplers();
    let make = || -> Vec<Drafter> {
        vec![
            Drafter::new(&bb, DraftForm::Taps(vec![nl]), s[0].clone(), vec![], true).unwrap(),
            Drafter::new(&bb, DraftForm::Taps(vec![1, nl]), s[2].clone(), vec![], false).unwrap(),
            Drafter::new(&bb, DraftForm::Taps(vec![0, nl]), s[3].clone(), vec![], true).unwrap(),
            Drafter::new(&bb, DraftForm::Taps(vec![nl]), s[4].clone(), vec![], true).unwrap(),
        ]
    };
    let ks = [4usize, 0, 2, 7];
    let (mut alone, mut together) = (make(), make());
    let mut next: Vec<(Vec<u32>, usize)> =
        vec![(vec![5, 9, 42], 0), ((0..12).map(|i| (i * 7 + 3) % 90).collect(), 0), (vec![8], 0), (vec![1, 2, 3, 4, 5, 6], 0)];
    for round in 0..4 {
        let want: Vec<Block> = alone.iter_mut().zip(&next).zip(ks).map(|((d, (ids, acc)), k)| d.step(&bb, *acc, ids, k, false).unwrap()).collect();
        let mut steps: Vec<(&mut Drafter, StepArgs)> =
            together.iter_mut().zip(&next).zip(ks).map(|((d, (ids, acc)), k)| (d, StepArgs { accepted: *acc, ids: ids.clone(), k, side: false })).collect();
        let got: Vec<Block> = Drafter::step_many(&bb, &mut steps).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, want, "round {round}");
        assert!(round > 0 || want[0].drafts.len() == 4, "{:?}", want[0]);
        // Half the drafts accepted, then a token of the device's own.
        next = want.iter().enumerate().map(|(i, b)| (vec![((round * 13 + i * 5 + 7) % 90) as u32], b.drafts.len() / 2)).collect();
    }
    // A refused step fails alone: the others of the batch are served.
    let mut steps: Vec<(&mut Drafter, StepArgs)> =
        together.iter_mut().enumerate().map(|(i, d)| (d, StepArgs { accepted: if i == 1 { 99 } else { 0 }, ids: vec![3], k: 2, side: false })).collect();
    let r = Drafter::step_many(&bb, &mut steps);
    assert!(r[1].is_err() && r.iter().enumerate().all(|(i, r)| i == 1 || r.is_ok()), "{r:?}");
}

/// Speculative decoding chooses the tokens per-token decoding chooses, greedy and seeded,
/// for every draft length, with the device's tap states or the coordinator's
/// down-projections, while drafts are rejected and the side plugin speaks.
#[test]
fn speculative_decoding_equals_per_token_decoding() {
    use spa_model::generate::SideInputs;
    use spa_model::speculative::{self, CloudDown, DraftForm, Drafter, LocalDrafts};
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let prompt = vec![5u32, 9, 42, 17];
    let n = 40;
    for (v, mixed) in [(SideVariant::Mlp, false), (SideVariant::Ladder, false), (SideVariant::Mlp, true), (SideVariant::Ladder, true)] {
        let plugin = scrambled(v, &bb);
        let model = if mixed { mixture_with_memory(&bb, &plugin) } else { PersonalModel::v1(plugin.clone()).unwrap() };
        let layers = plugin.shape.feature_layers.clone();
        let down = std::sync::Arc::new(CloudDown::from_params(plugin.shared().unwrap().as_set()).unwrap());
        let (mut rejected, mut side) = (0, 0);
        for sampling in samplers() {
            let d = dec(n, &sampling);
            // Side drafts (the plugin's own side, as a coordinator would hold it) for the mlp side.
            let run = |form: DraftForm, k: usize| {
                let inputs = if matches!(form, DraftForm::Taps(_)) { SideInputs::Taps } else { SideInputs::Down };
                let mut drafter = Drafter::new(&bb, form, sampling.clone(), vec![], v == SideVariant::Mlp).unwrap();
                if v == SideVariant::Mlp && k == 3 {
                    drafter = drafter.with_side(plugin.clone()).unwrap();
                }
                let mut src = LocalDrafts { backbone: &bb, drafter };
                speculative::generate(&mut src, &head, Some(&model), &layers, inputs, &prompt, &d, k, &mut |_, _| true).unwrap()
            };
            let naive = generate(&mut LocalStates::new(&bb, &layers).unwrap(), &head, Some(&model), &prompt, &d).unwrap();
            side += naive.from_side.iter().filter(|&&s| s).count();
            let by_down = run(DraftForm::Down { taps: plugin.shape.taps.clone(), down: down.clone() }, 0).0;
            for k in [0, 1, 3, 16] {
                let (g, st) = run(DraftForm::Taps(layers.clone()), k);
                assert_eq!(g, naive, "{v:?} {sampling:?} k {k}");
                assert_eq!(st.round_trips == n, k == 0, "{st:?}");
                rejected += st.drafted - st.accepted;
                let (g, _) = run(DraftForm::Down { taps: plugin.shape.taps.clone(), down: down.clone() }, k);
                assert_eq!(g, by_down, "down-projected {v:?} {sampling:?} k {k}");
            }
        }
        assert!(rejected > 0 && side > 0, "{v:?}: the test must see rejections ({rejected}) and side tokens ({side})");
    }
}

/// SPA v2's whole speaking path over `plugin` as the body: a personal side network (the
/// body's down-projections, its own adapters, ladder blocks and `up`), mixed with the body,
/// a private memory over the habit's examples, and a gate that opens on some tokens.
fn mixture_with_memory(bb: &Backbone, plugin: &Plugin) -> PersonalModel {
    let mut own = plugin.params();
    for (name, t) in own.tensors.iter_mut() {
        if !name.starts_with("side.down.") {
            t.values.iter_mut().enumerate().for_each(|(i, v)| *v = -*v + 0.01 * (i % 7) as f32);
        }
    }
    let personal = plugin.clone().load(&own).unwrap();
    let data = extract_features(bb, &examples(8, 3), &plugin.shape.feature_layers, Positions::LossOnly, 8).unwrap();
    let (last, d) = (data.layers.len() - 1, data.d);
    let row = data.layers.len() * d;
    let (mut keys, mut tokens, mut ex) = (vec![], vec![], vec![]);
    for (i, e) in data.examples.iter().enumerate() {
        for p in 0..e.len() {
            keys.extend_from_slice(&e.feats[p * row + last * d..p * row + (last + 1) * d]);
            tokens.push(e.targets[p]);
            ex.push(i as u32);
        }
    }
    let store = Datastore::new(d, normalize_rows(&keys, d), tokens, ex).unwrap();
    let mut m = PersonalModel::v1(plugin.clone()).unwrap();
    m.personal = Some(personal);
    m.alpha = 0.4;
    m.knn = Some((std::sync::Arc::new(store), KnnParams { k: 4, temperature: 0.1, weight: 0.3 }));
    assert!(m.reads_body_down());
    m
}

/// SPA v2 on the habit: the fit's candidates learn it, validation keeps them, and the model
/// the device keeps speaks it (and beats the body it was fitted against).
#[test]
fn the_personal_fit_learns_the_habit_and_keeps_what_validation_supports() {
    let bb = backbone();
    let head = FrozenHead::from_backbone(&bb);
    let body = Plugin::new(&config(SideVariant::Mlp), &bb.config, &bb.device).unwrap();
    let layers = body.shape.feature_layers.clone();
    let train = extract_features(&bb, &examples(40, 7), &layers, Positions::LossOnly, 16).unwrap();
    let val = extract_features(&bb, &examples(10, 8), &layers, Positions::LossOnly, 16).unwrap();
    let test = extract_features(&bb, &examples(16, 99), &layers, Positions::LossOnly, 16).unwrap();
    let cfg = PersonalConfig { epochs: 20, lrs: vec![1e-2], batch_tokens: 64, ..PersonalConfig::default() };
    let f = fit(&body, &head, &train, &val, &cfg, 0).unwrap();
    let names: Vec<&str> = f.candidates.iter().map(|c| c.candidate.name()).collect();
    assert_eq!(names, ["global", "finetune", "ditto", "fedrep"]);
    assert!(f.candidates[1].val_loss < 0.5 * f.candidates[0].val_loss, "fine-tuning learns the habit: {:?}", f.stages);
    // Each stage is kept only when it does not raise the validation loss.
    let loss = |name: &str| f.stages.iter().find(|s| s.0 == name).unwrap().1;
    assert!(
        loss("select") <= loss("global") && loss("mix") <= loss("select") && loss("knn") <= loss("mix") && loss("gated_best") <= loss("knn") + 1e-6,
        "{:?}",
        f.stages
    );
    let score = |stage: Stage| {
        let m = f.model(&body, stage);
        m.score(&head, &test).unwrap().at(m.threshold)
    };
    let (global, v2) = (score(Stage::Global), score(Stage::Gated(Route::Best)));
    assert!(v2.loss < 0.5 * global.loss && v2.accuracy > 0.9, "global {global:?} v2 {v2:?} stages {:?}", f.stages);
    // Scored together (each distinct side network projected once), every stage scores as it
    // does alone.
    let stages = [Stage::Global, Stage::Candidate("finetune"), Stage::KnnGlobal, Stage::Select, Stage::Mix, Stage::Knn, Stage::Gated(Route::Best)];
    let models: Vec<PersonalModel> = stages.iter().map(|&s| f.model(&body, s)).collect();
    let together = score_all(&models.iter().collect::<Vec<_>>(), &head, &test).unwrap();
    for (m, t) in models.iter().zip(&together) {
        let alone = m.score(&head, &test).unwrap();
        assert_eq!((&t.model_lp, &t.model_top, &t.gate, &t.backbone_lp), (&alone.model_lp, &alone.model_top, &alone.gate, &alone.backbone_lp));
    }
    let model = f.device_model(&body, &cfg);
    // Stored and read back, it is the same model.
    let (private, meta, store) = model.private_parts();
    let back = PersonalModel::from_parts(body.clone(), &private, meta, store.map(|s| (*s).clone())).unwrap();
    assert_eq!(back.score(&head, &test).unwrap().model_lp, model.score(&head, &test).unwrap().model_lp);
    // Decoding speaks what scoring measures: every greedy token is the argmax of the
    // distribution the model is scored with at its position (memory and gate included).
    let greedy = Sampling::greedy();
    let prompt = examples(1, 4242)[0].ids[..6].to_vec();
    let g = generate(&mut LocalStates::new(&bb, &layers).unwrap(), &head, Some(&back), &prompt, &dec(8, &greedy)).unwrap();
    let ids: Vec<u32> = prompt.iter().chain(&g.ids).copied().collect();
    let spoken = extract_features(&bb, &[TokenizedExample { ids, reply_start: prompt.len() }], &layers, Positions::LossOnly, 1).unwrap();
    let s = back.score(&head, &spoken).unwrap().at(back.threshold);
    assert_eq!((s.tokens, s.accuracy), (8, 1.0), "{g:?}");
}
