//! The device commands as library functions (the binary only parses flags and prints).
use std::path::Path;

use serde::Serialize;
use spa_model::BackendKind;
use spa_model::data::Example;
use spa_model::experiment::positions_for;
use spa_model::features::{FeatureSet, tokenize_examples};
use spa_model::side::{ParamSet, Plugin};
use spa_model::train::{TrainConfig, TrainEvent, evaluate, train_plugin};
use spa_proto::auth::{generate_pkcs8, now_ms, public_key_of};
use spa_proto::methods;
use spa_proto::v1::*;

use crate::config::ClientConfig;
use crate::data::Format;
use crate::error::{ClientError, Result};
use crate::net::{Session, connect, device_client};
use crate::remote::{Model, features, model};
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
    if let Some(id) = store.identity()? {
        return Err(ClientError::AlreadyEnrolled(id.device_id));
    }
    let pkcs8 = generate_pkcs8().map_err(|_| ClientError::Invalid("cannot generate a key".into()))?;
    let pk = public_key_of(&pkcs8).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let ch = connect(coordinator, ca_pem.as_bytes(), &ClientConfig::load(home)?.net).await?;
    let r = device_client(ch).enroll(EnrollRequest { token: token.trim().to_string(), public_key: pk.to_vec(), name: name.into() }).await?.into_inner();
    let id = Identity {
        device_id: r.device_id.clone(),
        name: name.into(),
        coordinator: coordinator.into(),
        ca_pem: ca_pem.into(),
        enrolled_at_ms: now_ms(),
        backbone_version: r.backbone_version.clone(),
    };
    store.set_identity(&pkcs8, &id, crate::keyseal::passphrase()?.as_deref())?;
    ClientConfig::write_default(home)?;
    Ok(EnrollReport { device_id: r.device_id, coordinator: coordinator.into(), backbone_version: r.backbone_version })
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub home: String,
    pub enrolled: bool,
    /// The identity key is sealed with a passphrase at rest (keyseal.rs).
    pub key_sealed: bool,
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
    let id = store.identity()?;
    let mut rep = StatusReport {
        home: home.display().to_string(),
        enrolled: id.is_some(),
        key_sealed: store.key_sealed()?,
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
            let s = Session::open(home, &store).await?;
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
    let s = Session::open(home, &store).await?;
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
        final_loss: report.epoch_losses.last().copied(),
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
