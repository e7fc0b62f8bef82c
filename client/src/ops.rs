//! The device commands as library functions (the binary only parses flags and prints).
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use spa_model::burn::tensor::Device;
use spa_model::data::Example;
use spa_model::experiment::positions_for;
use spa_model::features::{FeatureSet, TokenizedExample, tokenize_examples};
use spa_model::side::{FrozenHead, NamedTensor, ParamSet, Plugin};
use spa_model::tokenizer::{ModelTokens, Tokenizer};
use spa_model::train::{TrainConfig, TrainEvent, evaluate, train_plugin};
use spa_model::{BackboneConfig, BackendKind};
use spa_proto::auth::{generate_pkcs8, now_ms, public_key_of, sha256};
use spa_proto::limits::MAX_TENSOR_BYTES;
use spa_proto::methods;
use spa_proto::tensor::{ByteAssembler, TensorAssembler, decode_f32};
use spa_proto::v1::*;

use crate::config::ClientConfig;
use crate::data::Format;
use crate::error::{ClientError, Result};
use crate::net::{Session, connect, device_client};
use crate::store::{ClientStore, Identity, Source, TrainedMeta};

#[derive(Debug, Serialize)]
pub struct EnrollReport {
    pub device_id: String,
    pub coordinator: String,
    pub backbone_version: String,
}

/// Generates the identity key, enrolls with a one-time token, stores identity and
/// coordinator info (durably) and writes a default client.toml.
pub async fn enroll(home: &Path, coordinator: &str, token: &str, ca_pem: &str, name: &str) -> Result<EnrollReport> {
    let store = ClientStore::open(home)?;
    if let Some((_, id)) = store.identity()? {
        return Err(ClientError::AlreadyEnrolled(id.device_id));
    }
    let pkcs8 = generate_pkcs8().map_err(|_| ClientError::Invalid("cannot generate a key".into()))?;
    let pk = public_key_of(&pkcs8).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let ch = connect(coordinator, ca_pem.as_bytes()).await?;
    let r = device_client(ch).enroll(EnrollRequest { token: token.trim().to_string(), public_key: pk.to_vec(), name: name.into() }).await?.into_inner();
    let id = Identity {
        device_id: r.device_id.clone(),
        name: name.into(),
        coordinator: coordinator.into(),
        ca_pem: ca_pem.into(),
        enrolled_at_ms: now_ms(),
        backbone_version: r.backbone_version.clone(),
    };
    store.set_identity(&pkcs8, &id)?;
    ClientConfig::write_default(home)?;
    Ok(EnrollReport { device_id: r.device_id, coordinator: coordinator.into(), backbone_version: r.backbone_version })
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub home: String,
    pub enrolled: bool,
    pub device_id: Option<String>,
    pub name: Option<String>,
    pub coordinator: Option<String>,
    pub examples: usize,
    pub sources: Vec<Source>,
    pub cached_features: usize,
    pub trained: Option<TrainedMeta>,
    /// The committed global version the stored shared part comes from (set by `run`).
    pub global_version: Option<u64>,
    /// Result of a signed Ping: the coordinator's view, or why it failed.
    pub coordinator_reachable: Option<bool>,
    pub coordinator_error: Option<String>,
    pub server_time_ms: Option<u64>,
    pub backbone_version: Option<String>,
}

pub async fn status(home: &Path, offline: bool) -> Result<StatusReport> {
    let store = ClientStore::open(home)?;
    let id = store.identity()?.map(|(_, i)| i);
    let mut rep = StatusReport {
        home: home.display().to_string(),
        enrolled: id.is_some(),
        device_id: id.as_ref().map(|i| i.device_id.clone()),
        name: id.as_ref().map(|i| i.name.clone()),
        coordinator: id.as_ref().map(|i| i.coordinator.clone()),
        examples: store.examples()?.len(),
        sources: store.sources()?,
        cached_features: store.feature_cache_len(),
        trained: store.plugin()?.map(|(_, _, m)| m),
        global_version: store.global_version()?,
        coordinator_reachable: None,
        coordinator_error: None,
        server_time_ms: None,
        backbone_version: id.as_ref().map(|i| i.backbone_version.clone()),
    };
    if id.is_some() && !offline {
        let ping = async {
            let s = Session::open(&store).await?;
            let r = s.device().ping(s.request(methods::DEVICE_PING, PingRequest {})).await?;
            Ok::<_, ClientError>(r.into_inner())
        };
        match ping.await {
            Ok(p) => {
                rep.coordinator_reachable = Some(true);
                rep.server_time_ms = Some(p.server_time_ms);
                rep.backbone_version = Some(p.backbone_version);
            }
            Err(e) => {
                rep.coordinator_reachable = Some(false);
                rep.coordinator_error = Some(e.to_string());
            }
        }
    }
    Ok(rep)
}

pub fn data_add(home: &Path, file: &Path, format: Format, speaker: Option<&str>) -> Result<Source> {
    let text = std::fs::read_to_string(file).map_err(crate::error::io(file))?;
    let name = file.display().to_string();
    let (format, examples) = crate::data::parse(&name, &text, format, speaker)?;
    let store = ClientStore::open(home)?;
    let src = Source { file: name, format: format.to_string(), examples: examples.len(), added_at_ms: now_ms() };
    store.add_examples(&src, &examples)?;
    Ok(src)
}

pub fn data_list(home: &Path) -> Result<(Vec<Source>, usize)> {
    let store = ClientStore::open(home)?;
    Ok((store.sources()?, store.examples()?.len()))
}

/// A stream of tensor chunks (frozen head, a global version) as a parameter set; sizes are
/// checked before buffering, NaN/Inf and ragged tensors are refused.
pub(crate) async fn receive_params(mut stream: tonic::Streaming<TensorChunk>) -> Result<ParamSet> {
    let mut asm = TensorAssembler::new(MAX_TENSOR_BYTES);
    while let Some(c) = stream.message().await? {
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

pub(crate) async fn model(s: &Session, store: &ClientStore, device: &Device) -> Result<Model> {
    let info = s.backbone().get_model_info(s.request(methods::BACKBONE_GET_MODEL_INFO, GetModelInfoRequest {})).await?.into_inner();
    let config = BackboneConfig::from_json(&info.config_json)?;
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
            let p = receive_params(s.backbone().get_head(req).await?.into_inner()).await?;
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
    let mut at = 0;
    while at < missing.len() {
        // A batch within the coordinator's limits.
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while at < missing.len() && batch.len() < max_seqs {
            let ex = &examples[missing[at]];
            let r = positions.range(ex);
            let b = r.len() as u64 * per_pos;
            if !batch.is_empty() && bytes + b > max_bytes {
                break;
            }
            bytes += b;
            batch.push(missing[at]);
            at += 1;
        }
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
        while let Some(c) = stream.message().await? {
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

#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub device_id: String,
    pub backbone_version: String,
    pub examples: usize,
    pub train_examples: usize,
    pub heldout_examples: usize,
    pub steps: usize,
    pub epoch_losses: Vec<f32>,
    /// With a validation split: its routed loss before training and after each epoch, and
    /// the epoch kept (0 = the untrained or resumed plugin).
    pub val_losses: Vec<f64>,
    pub epoch_kept: Option<usize>,
    pub seconds: f64,
    pub resumed: bool,
    pub heldout: Option<spa_model::train::EvalMetrics>,
}

/// The device's examples as backbone features for `plugin`'s layers, split in order into
/// training and held-out parts (the last tenth, when there are ten or more examples), and
/// the number of examples.
pub(crate) async fn local_sets(
    s: &Session,
    store: &ClientStore,
    m: &Model,
    plugin: &Plugin,
    progress: &mut dyn TrainProgress,
) -> Result<(FeatureSet, FeatureSet, usize)> {
    let examples: Vec<Example> = store.examples()?;
    if examples.is_empty() {
        return Err(ClientError::Invalid("no local data: run `spa-client data add FILE` first".into()));
    }
    let tok = tokenize_examples(&m.tokenizer, &examples, m.config.max_position_embeddings)?;
    let n_held = if tok.len() >= 10 { tok.len() / 10 } else { 0 };
    let n_train = tok.len() - n_held;
    let layers = plugin.shape.feature_layers.clone();
    let pos = positions_for(plugin.config.variant);
    let set = features(s, store, m, &tok, &layers, pos, &mut |d, t| progress.features(d, t)).await?;
    let mut train_set = set.clone();
    train_set.examples.truncate(n_train);
    let mut held_set = set;
    held_set.examples.drain(..n_train);
    Ok((train_set, held_set, tok.len()))
}

/// Progress callbacks of [`train`].
pub trait TrainProgress {
    fn features(&mut self, _done: usize, _total: usize) {}
    fn train(&mut self, _ev: &TrainEvent) {}
}

impl TrainProgress for () {}

/// Local personalization: features from the coordinator (cached), the side plugin and gate
/// trained on the device's data, shared and private parts saved in the store. Continues
/// from the stored plugin unless `fresh`. The last tenth of the data (in order, at least one
/// example when there are ten or more) is held out for evaluation.
pub async fn train(home: &Path, overrides: &TrainConfig, fresh: bool, progress: &mut dyn TrainProgress) -> Result<TrainSummary> {
    // Bad settings fail here, before the store, the network and feature extraction.
    overrides.validate()?;
    let store = ClientStore::open(home)?;
    let cfg = ClientConfig::load(home)?;
    let s = Session::open(&store).await?;
    let device = BackendKind::resolve(None)?.device()?;
    let m = model(&s, &store, &device).await?;
    let mut plugin = Plugin::new(&cfg.side, &m.config, &device)?;
    let mut resumed = false;
    if !fresh
        && let Some((shared, private, meta)) = store.plugin()?
        && meta.backbone_version == m.info.backbone_version
        && meta.side == cfg.side
    {
        plugin = plugin.load(&ParamSet::from_safetensors(&shared)?)?.load(&ParamSet::from_safetensors(&private)?)?;
        resumed = true;
    }
    let (train_set, held_set, total) = local_sets(&s, &store, &m, &plugin, progress).await?;
    let (n_train, n_held) = (train_set.examples.len(), held_set.examples.len());
    let (plugin, report) = train_plugin(plugin, &m.head, &train_set, overrides, None, &mut |ev| progress.train(&ev))?;
    let heldout = if held_set.examples.is_empty() || held_set.num_loss_tokens() == 0 { None } else { Some(evaluate(&plugin, &m.head, &held_set, 2048)?) };
    let (shared, private) = plugin.split()?;
    let meta = TrainedMeta {
        backbone_version: m.info.backbone_version.clone(),
        side: cfg.side.clone(),
        trained_at_ms: now_ms(),
        examples: n_train,
        steps: report.steps,
        final_loss: report.epoch_losses.last().copied().unwrap_or(f32::NAN),
        shared_tensors: shared.as_set().tensors.len(),
        private_tensors: private.tensors.len(),
    };
    store.save_plugin(&shared.as_set().to_safetensors(), &private.to_safetensors(), &meta)?;
    Ok(TrainSummary {
        device_id: s.identity.device_id.clone(),
        backbone_version: m.info.backbone_version.clone(),
        examples: total,
        train_examples: n_train,
        heldout_examples: n_held,
        steps: report.steps,
        epoch_losses: report.epoch_losses,
        epoch_kept: (!report.val_losses.is_empty()).then_some(report.best_epoch),
        val_losses: report.val_losses,
        seconds: report.seconds,
        resumed,
        heldout,
    })
}
