//! Logits parity with HF transformers on a tiny random LLaMA (GQA, untied head, rope_theta
//! 50000). The fixture and the script that made it live in tests/fixtures/.
use std::path::PathBuf;

use spa_model::backbone::{TokenBatch, load_backbone};
use spa_model::tensor_util::to_vec;
use spa_model::{BackendKind, ModelError};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    hidden: Vec<Vec<Vec<f32>>>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f = |x: &serde_json::Value| x.as_f64().unwrap() as f32;
    Reference {
        ids: v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        logits: v["logits"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(f).collect()).collect(),
        hidden: v["hidden_states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(f).collect()).collect())
            .collect(),
    }
}

fn max_abs_diff(ours: &[f32], theirs: &[Vec<f32>]) -> f32 {
    let flat: Vec<f32> = theirs.iter().flatten().copied().collect();
    assert_eq!(ours.len(), flat.len());
    ours.iter().zip(&flat).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn check_backend(kind: BackendKind) {
    let device = kind.device().unwrap();
    let bb = load_backbone(&fixture(), &device).unwrap();
    let r = reference();
    let batch = TokenBatch::new(vec![r.ids.clone()], &bb.config, 0).unwrap();
    let taps: Vec<usize> = (0..=bb.num_layers()).collect();
    let out = bb.forward(&batch, &taps[..taps.len() - 1], true, None);
    let d = max_abs_diff(&to_vec(out.logits.unwrap()), &r.logits);
    assert!(d <= 1e-4, "{kind}: logits max abs diff {d}");
    for (i, (ours, theirs)) in out.taps.into_iter().zip(&r.hidden).enumerate() {
        let d = max_abs_diff(&to_vec(ours), theirs);
        assert!(d <= 1e-4, "{kind}: hidden state {i} max abs diff {d}");
    }
}

#[test]
fn logits_match_hf_transformers_flex() {
    check_backend(BackendKind::Flex);
}

#[test]
fn logits_match_hf_transformers_ndarray() {
    check_backend(BackendKind::Ndarray);
}

#[test]
fn incremental_decoding_with_kv_cache_matches_full_forward() {
    let device = BackendKind::Flex.device().unwrap();
    let bb = load_backbone(&fixture(), &device).unwrap();
    let r = reference();
    let mut cache = bb.new_cache();
    let mut logits = Vec::new();
    // Prefill 5 tokens, then 3, then one at a time.
    let mut pos = 0;
    for step in [5usize, 3, 1, 1, 1, 1, 1, 1, 1, 1] {
        let chunk = r.ids[pos..pos + step].to_vec();
        let batch = TokenBatch::new(vec![chunk], &bb.config, cache.len()).unwrap();
        let out = bb.forward(&batch, &[], true, Some(&mut cache));
        logits.extend(to_vec(out.logits.unwrap()));
        pos += step;
    }
    assert_eq!(pos, r.ids.len());
    let d = max_abs_diff(&logits, &r.logits);
    assert!(d <= 1e-4, "cached decoding max abs diff {d}");
}

#[test]
fn right_padded_batch_matches_single_sequences() {
    let device = BackendKind::Flex.device().unwrap();
    let bb = load_backbone(&fixture(), &device).unwrap();
    let r = reference();
    let short = r.ids[..7].to_vec();
    let batch = TokenBatch::new(vec![r.ids.clone(), short], &bb.config, 0).unwrap();
    let out = bb.forward(&batch, &[], true, None);
    let all = to_vec(out.logits.unwrap());
    let v = bb.config.vocab_size;
    let second = &all[r.ids.len() * v..r.ids.len() * v + 7 * v];
    let d = max_abs_diff(second, &r.logits[..7]);
    assert!(d <= 1e-4, "padded row diff {d}");
}

#[test]
fn bad_inputs_and_checkpoints_give_clear_errors() {
    let device = BackendKind::Flex.device().unwrap();
    let bb = load_backbone(&fixture(), &device).unwrap();
    let err = TokenBatch::new(vec![vec![1, 96]], &bb.config, 0).unwrap_err();
    assert!(err.to_string().contains("out of vocabulary"), "{err}");
    let err = TokenBatch::new(vec![vec![1; 65]], &bb.config, 0).unwrap_err();
    assert!(err.to_string().contains("exceeds the context"), "{err}");
    assert!(bb.check_taps(&[3]).is_err());

    let dir = tempfile::tempdir().unwrap();
    let missing = load_backbone(dir.path(), &device).unwrap_err();
    assert!(matches!(missing, ModelError::MissingFile { .. }), "{missing}");
    std::fs::copy(fixture().join("config.json"), dir.path().join("config.json")).unwrap();
    let err = load_backbone(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A config that disagrees with the weights: shape mismatch names the tensor.
    let cfg = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128")).unwrap();
    std::fs::copy(fixture().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let err = load_backbone(dir.path(), &device).unwrap_err();
    assert!(matches!(err, ModelError::ShapeMismatch { ref name, .. } if name.contains("mlp")), "{err}");
}
