//! Pretraining from scratch on a tiny config: the loss falls, the checkpoint is one the
//! loader reads, and training can continue from it.
use spa_model::backbone::load_backbone;
use spa_model::data::synthetic::synthetic_users;
use spa_model::pretrain::{PretrainConfig, pretrain};
use spa_model::tokenizer::{Tokenizer, char_level_json};
use spa_model::BackendKind;

fn corpus() -> String {
    synthetic_users(6, 80, 5).iter().flat_map(|u| u.train.iter().map(|e| format!("{}{}", e.prompt, e.reply))).collect()
}

fn tiny(steps: usize) -> PretrainConfig {
    PretrainConfig { hidden: 32, layers: 1, heads: 4, kv_heads: 2, intermediate: 64, context: 32, batch: 8, steps, lr: 1e-2, warmup: 5, eval_every: 20, eval_windows: 16, ..PretrainConfig::default() }
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
