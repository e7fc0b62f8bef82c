//! Pretraining from scratch on a tiny config: the loss falls, the checkpoint is one the
//! loader reads, and training can continue from it.
use spa_model::BackendKind;
use spa_model::backbone::load_backbone;
use spa_model::data::synthetic::synthetic_users;
use spa_model::pretrain::{PretrainConfig, pretrain};
use spa_model::tokenizer::{Tokenizer, char_level_json};

fn corpus() -> String {
    synthetic_users(6, 80, 5).iter().flat_map(|u| u.train.iter().map(|e| format!("{}{}", e.prompt, e.reply))).collect()
}

fn tiny(steps: usize) -> PretrainConfig {
    PretrainConfig {
        hidden: 32,
        layers: 1,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        context: 32,
        batch: 8,
        steps,
        lr: 1e-2,
        warmup: 5,
        eval_every: 20,
        eval_windows: 16,
        ..PretrainConfig::default()
    }
}

#[test]
fn pretraining_learns_saves_and_resumes() {
    let device = BackendKind::Flex.device().unwrap();
    let text = corpus();
    let tok_json = char_level_json(text.chars());
    let tok = Tokenizer::from_json(&tok_json).unwrap();
    let (train, val) = text.split_at(text.len() * 9 / 10);
    let dir = tempfile::tempdir().unwrap();
    let r = pretrain(&tok, &tok_json, train, val, &tiny(60), None, &device, dir.path(), &mut |_| {}).unwrap();
    let uniform = (tok.vocab_size() as f32).ln();
    assert!(r.best_val_loss < 0.75 * uniform, "{r:?}");
    assert!(r.evals.last().unwrap().2 < r.evals[0].2, "{r:?}");
    assert_eq!(r.tokens_seen, 60 * 8 * 32);
    let bb = load_backbone(dir.path(), &device).unwrap();
    assert_eq!(bb.config.vocab_size, tok.vocab_size());
    assert!(dir.path().join("pretrain.json").exists());

    // Resuming from the checkpoint starts where it ended, not from scratch.
    let dir2 = tempfile::tempdir().unwrap();
    let r2 = pretrain(&tok, &tok_json, train, val, &tiny(20), Some(&bb), &device, dir2.path(), &mut |_| {}).unwrap();
    assert!(r2.evals[0].2 < r.evals[0].2, "resumed {r2:?} vs fresh {r:?}");

    // A tokenizer that does not match the initial backbone is refused.
    let other_json = char_level_json("abc".chars());
    let other = Tokenizer::from_json(&other_json).unwrap();
    let err = pretrain(&other, &other_json, "abcabc".repeat(40).as_str(), "abcabc".repeat(20).as_str(), &tiny(5), Some(&bb), &device, dir2.path(), &mut |_| {});
    assert!(err.unwrap_err().to_string().contains("tokens"));
}

/// Dropout acts only while training: on an autodiff device it perturbs the forward pass and
/// keeps its scale; on the serving device the same backbone is unchanged, so parity and
/// features never see it.
#[test]
fn dropout_only_in_training() {
    use spa_model::backbone::{Backbone, TokenBatch};
    use spa_model::burn::module::Module;
    let device = BackendKind::Flex.device().unwrap();
    let cfg = tiny(1);
    let tok_json = char_level_json(corpus().chars());
    let tok = Tokenizer::from_json(&tok_json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = corpus();
    let (train, val) = text.split_at(text.len() * 9 / 10);
    pretrain(&tok, &tok_json, train, val, &cfg, None, &device, dir.path(), &mut |_| {}).unwrap();
    let plain = load_backbone(dir.path(), &device).unwrap();
    let batch = TokenBatch::new(vec![(1..30).collect()], &plain.config, 0).unwrap();
    let hidden = |bb: &Backbone| -> Vec<f32> { spa_model::tensor_util::to_vec(bb.forward(&batch, &[], false, None).last_hidden) };
    let reference = hidden(&plain);

    let serving = Backbone { dropout: 0.5, ..plain.clone() };
    assert_eq!(hidden(&serving), reference, "dropout must not act off an autodiff device");

    let ad = device.clone().autodiff();
    let training = Backbone::from_parts(plain.config.clone(), plain.net.clone().fork(&ad), &ad);
    assert_eq!(hidden(&Backbone { dropout: 0.0, ..training.clone() }).len(), reference.len());
    let dropped = hidden(&Backbone { dropout: 0.5, ..training });
    let diff = dropped.iter().zip(&reference).filter(|(a, b)| (*a - *b).abs() > 1e-4).count();
    assert!(diff > reference.len() / 2, "dropout changed only {diff} of {} values", reference.len());
}
