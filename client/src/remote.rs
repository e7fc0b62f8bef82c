//! What a device fetches from the coordinator's backbone: the served model's files and
//! frozen head (cached by backbone version), and features of its examples (cached by
//! content), in requests planned within the coordinator's limits.
use std::collections::BTreeMap;
use std::ops::Range;

use spa_model::BackboneConfig;
use spa_model::burn::tensor::Device;
use spa_model::features::{FeatureSet, TokenizedExample};
use spa_model::side::{FrozenHead, NamedTensor, ParamSet, SideConfig};
use spa_model::tokenizer::{ModelTokens, Tokenizer};
use spa_proto::auth::sha256;
use spa_proto::limits::MAX_TENSOR_BYTES;
use spa_proto::methods;
use spa_proto::tensor::{ByteAssembler, TensorAssembler, decode_f32};
use spa_proto::v1::*;

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::net::Session;
use crate::store::ClientStore;

/// A stream of tensor chunks (frozen head, a global version) as a parameter set; sizes are
/// checked before buffering, NaN/Inf and ragged tensors are refused.
pub(crate) async fn receive_params(s: &Session, mut stream: tonic::Streaming<TensorChunk>) -> Result<ParamSet> {
    let mut asm = TensorAssembler::new(MAX_TENSOR_BYTES);
    while let Some(c) = s.next(&mut stream).await? {
        asm.push(c)?;
    }
    let mut p = ParamSet::default();
    for (name, t) in asm.finish()? {
        let values = t.to_f32(&name)?;
        p.tensors.insert(name, NamedTensor { shape: t.shape.iter().map(|&d| d as usize).collect(), values });
    }
    Ok(p)
}

/// The served backbone's files, cached in the store by version.
pub struct Model {
    pub info: ModelInfo,
    pub config: BackboneConfig,
    pub tokenizer: Tokenizer,
    /// BOS, EOS and chat template, from the checkpoint's own files.
    pub tokens: ModelTokens,
    pub head: FrozenHead,
}

impl Model {
    /// f16 features on the wire for large backbones (half the bytes of a round's features and
    /// of each generated token), f32 otherwise.
    pub fn wire_dtype(&self) -> DType {
        if spa_model::side::config::is_large(&self.config) { DType::DtypeF16 } else { DType::DtypeF32 }
    }
}

/// The cached head, by backbone version; `v2`: `lm_head.weight` as `[vocab, hidden]`.
const HEAD_FILE: &str = "head.v2.safetensors";

/// Bytes the device needs for `config`'s head and a plugin of `side`: the head's f32 values
/// received, assembled and on the device (3 copies); the plugin's parameters with gradients,
/// Adam's two moments, the body beside the personal model and its candidates (8 copies).
pub fn memory_needed(config: &BackboneConfig, side: &SideConfig) -> Result<u64> {
    let head = 3 * 4 * config.vocab_size as u64 * config.hidden_size as u64;
    let plugin = 8 * 4 * side.param_count(&side.resolve(config)?) as u64;
    Ok(head + plugin)
}

/// Whether this device can hold `config`'s head and its plugin within `cfg.limits.memory_mb`.
pub fn check_memory(config: &BackboneConfig, cfg: &ClientConfig) -> Result<()> {
    let (need, budget) = (memory_needed(config, &cfg.side)?, cfg.limits.memory_mb << 20);
    if need > budget {
        return Err(ClientError::Invalid(format!(
            "the served backbone (hidden {}, {} layers, vocabulary {}) needs ~{} MiB here for its head and this device's plugin, over [limits] memory_mb = {}: raise it if this device has the memory",
            config.hidden_size,
            config.num_layers,
            config.vocab_size,
            need >> 20,
            cfg.limits.memory_mb
        )));
    }
    Ok(())
}

/// The served model, if this device can hold it (`cfg.limits.memory_mb`, checked before the
/// head is fetched: a coordinator describing a model too large gets a refusal, not an abort).
pub(crate) async fn model(s: &Session, store: &ClientStore, device: &Device, cfg: &ClientConfig) -> Result<Model> {
    let info = s.backbone().get_model_info(s.request(methods::BACKBONE_GET_MODEL_INFO, GetModelInfoRequest {})).await?.into_inner();
    let config = BackboneConfig::from_json(&info.config_json)?;
    check_memory(&config, cfg)?;
    let tokenizer = Tokenizer::from_json(&info.tokenizer_json)?;
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let tokens =
        ModelTokens::from_json(&info.config_json, optional(&info.generation_config_json).as_deref(), optional(&info.tokenizer_config_json).as_deref())?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ClientError::Invalid("tokenizer vocabulary larger than the backbone's".into()));
    }
    let v = &info.backbone_version;
    let head_bytes = match store.backbone_file(v, HEAD_FILE)? {
        Some(b) => b,
        None => {
            let req = s.request(methods::BACKBONE_GET_HEAD, GetHeadRequest { backbone_version: v.clone() });
            let p = receive_params(s, s.backbone().get_head(req).await?.into_inner()).await?;
            let b = p.to_safetensors();
            store.put_backbone_file(v, HEAD_FILE, &b)?;
            store.flush()?;
            b
        }
    };
    let head = FrozenHead::from_params(&ParamSet::from_safetensors(&head_bytes)?, config.rms_norm_eps, device)?;
    if head.hidden_size() != config.hidden_size || head.vocab_size() != config.vocab_size {
        return Err(ClientError::Invalid("the coordinator's head does not match its config".into()));
    }
    Ok(Model { info, config, tokenizer, tokens, head })
}

fn feature_key(version: &str, layers: &[usize], positions: &str, ex: &TokenizedExample) -> String {
    let mut b = format!("{version}|{layers:?}|{positions}|{}|", ex.reply_start).into_bytes();
    for id in &ex.ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    hex::encode(sha256(&b))
}

/// Features of `examples` at the plugin's layers: from the local cache, or fetched from the
/// coordinator (batched within its limits) and cached.
pub async fn features(
    s: &Session,
    store: &ClientStore,
    m: &Model,
    examples: &[TokenizedExample],
    layers: &[usize],
    positions: spa_model::features::Positions,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<FeatureSet> {
    let d = m.config.hidden_size;
    let mut set = FeatureSet { layers: layers.to_vec(), d, positions, examples: vec![] };
    let pos_name = format!("{positions:?}");
    let keys: Vec<String> = examples.iter().map(|e| feature_key(&m.info.backbone_version, layers, &pos_name, e)).collect();
    let mut have: BTreeMap<usize, spa_model::features::ExampleFeatures> = BTreeMap::new();
    let mut missing = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match store.cached_features(k)? {
            Some(f) => {
                have.insert(i, f);
            }
            None => missing.push(i),
        }
    }
    on_progress(have.len(), examples.len());
    let wire = m.wire_dtype();
    let per_pos = (layers.len() * d * spa_proto::tensor::dtype_size(wire as i32)?) as u64;
    let max_bytes = m.info.max_feature_bytes_per_request.max(per_pos);
    let max_seqs = m.info.max_sequences_per_request.max(1) as usize;
    let sizes: Vec<u64> = missing.iter().map(|&i| positions.range(&examples[i]).len() as u64 * per_pos).collect();
    for run in plan_batches(&sizes, max_bytes, max_seqs) {
        let batch = &missing[run];
        let req = FeaturesRequest {
            backbone_version: m.info.backbone_version.clone(),
            sequences: batch
                .iter()
                .map(|&i| {
                    let r = positions.range(&examples[i]);
                    FeatureSequence { ids: examples[i].ids.clone(), from: r.start as u32, to: r.end as u32 }
                })
                .collect(),
            layers: layers.iter().map(|&l| l as u32).collect(),
            dtype: wire as i32,
        };
        let mut stream = s.backbone().features(s.request(methods::BACKBONE_FEATURES, req)).await?.into_inner();
        let mut asms: Vec<ByteAssembler> = batch
            .iter()
            .map(|&i| {
                let n = positions.range(&examples[i]).len() as u64;
                ByteAssembler::new(format!("features of example {i}"), n * per_pos, MAX_TENSOR_BYTES)
            })
            .collect::<std::result::Result<_, _>>()?;
        while let Some(c) = s.next(&mut stream).await? {
            let a = asms
                .get_mut(c.sequence as usize)
                .ok_or_else(|| ClientError::Invalid(format!("coordinator sent features of unknown sequence {}", c.sequence)))?;
            a.push(c.offset, c.total_bytes, &c.data)?;
        }
        for (&i, a) in batch.iter().zip(asms) {
            let vals = decode_f32(&a.finish()?, wire as i32, "features")?;
            // [positions, layers, d] -> per layer [positions * d].
            let l = layers.len();
            let n = vals.len() / (l * d);
            let states: Vec<Vec<f32>> = (0..l).map(|k| (0..n).flat_map(|p| vals[(p * l + k) * d..(p * l + k + 1) * d].iter().copied()).collect()).collect();
            let f = set.example_from_states(&examples[i], &states)?;
            store.cache_features(&keys[i], &f)?;
            have.insert(i, f);
        }
        on_progress(have.len(), examples.len());
    }
    store.flush()?;
    set.examples = have.into_values().collect();
    Ok(set)
}

/// Consecutive runs of requests, each within `max_seqs` sequences and `max_bytes` (a single
/// sequence larger than `max_bytes` goes alone: the coordinator's limit is at least one
/// sequence's worth, `features` makes sure).
pub fn plan_batches(sizes: &[u64], max_bytes: u64, max_seqs: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let (mut end, mut bytes) = (start, 0u64);
        while end < sizes.len() && end - start < max_seqs.max(1) && (end == start || bytes + sizes[end] <= max_bytes) {
            bytes += sizes[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(layers: usize, hidden: usize, vocab: usize, heads: usize) -> BackboneConfig {
        BackboneConfig::from_json(&format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":{vocab},"hidden_size":{hidden},
            "intermediate_size":{},"num_hidden_layers":{layers},"num_attention_heads":{heads},"num_key_value_heads":{heads}}}"#,
            hidden * 8 / 3
        ))
        .unwrap()
    }

    /// What a hostile coordinator described (every field within its own bound) is refused with
    /// the budget's name before anything is allocated; SmolLM2 and the default backbone fit.
    #[test]
    fn models_over_the_memory_budget_are_refused_before_allocation() {
        let cfg = ClientConfig::default();
        for bb in [llama(4, 65536, 32, 64), llama(126, 16384, 32, 64)] {
            let e = check_memory(&bb, &cfg).unwrap_err().to_string();
            assert!(e.contains("[limits] memory_mb = 1024"), "{e}");
        }
        check_memory(&llama(30, 576, 49152, 9), &cfg).unwrap();
        check_memory(&llama(4, 256, 68, 4), &cfg).unwrap();
        let tight = ClientConfig { limits: crate::config::LimitsConfig { memory_mb: 64 }, ..ClientConfig::default() };
        assert!(check_memory(&llama(30, 576, 49152, 9), &tight).is_err());
    }

    #[test]
    fn batches_respect_both_limits_and_keep_order() {
        assert!(plan_batches(&[], 10, 4).is_empty());
        assert_eq!(plan_batches(&[3, 3, 3, 3, 3], 10, 8), vec![0..3, 3..5]);
        assert_eq!(plan_batches(&[1, 1, 1, 1, 1], 100, 2), vec![0..2, 2..4, 4..5]);
        // A sequence above the byte limit goes alone rather than never.
        assert_eq!(plan_batches(&[2, 50, 2], 10, 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_batches(&[10, 10], 10, 8), vec![0..1, 1..2]);
    }
}
