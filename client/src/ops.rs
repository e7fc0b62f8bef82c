//! The device commands as library functions (the binary only parses flags and prints).
use std::path::Path;

use serde::Serialize;
use spa_model::BackendKind;
use spa_model::personal::{PersonalConfig, PersonalMeta, Score};
use spa_model::side::Plugin;
use spa_proto::auth::{generate_pkcs8, now_ms, public_key_of};
use spa_proto::methods;
use spa_proto::v1::*;

use crate::config::ClientConfig;
use crate::data::Format;
use crate::error::{ClientError, Result};
use crate::net::{Session, connect, device_client};
use crate::personal::{FeatureProgress, PersonalRecord, local_splits};
use crate::remote::{Model, model};
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
    /// The stored body, and the personal model fitted against it.
    pub trained: Option<TrainedMeta>,
    pub personal: Option<PersonalRecord>,
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
        trained: store.body()?.map(|(_, m)| m),
        personal: store.personal()?.and_then(|p| serde_json::from_slice(&p.record).ok()),
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
    /// The committed global version the body is (None: a fresh body, before any round).
    pub global_version: Option<u64>,
    pub examples: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub heldout_examples: usize,
    /// What the fit chose (candidate, alpha, memory, threshold, validation loss per stage).
    pub personal: PersonalMeta,
    pub datastore_entries: usize,
    /// On the held-out examples: the personal model as it speaks, the body alone (the global
    /// adapter), and the backbone alone.
    pub heldout: Option<Score>,
    pub heldout_global: Option<Score>,
    pub heldout_backbone: Option<Score>,
    pub seconds: f64,
}

/// Fits the device's personal model (SPA v2) against its body on its local data (features
/// from the coordinator, cached) and saves it. The body is the stored one (the last adopted
/// global version) unless `fresh` or there is none for the served backbone and layout.
pub async fn train(home: &Path, personal: &PersonalConfig, fresh: bool, backend: BackendKind, progress: &mut dyn FeatureProgress) -> Result<TrainSummary> {
    // Bad settings fail here, before the store, the network and feature extraction.
    personal.validate()?;
    let started = std::time::Instant::now();
    let store = ClientStore::open(home)?;
    let cfg = ClientConfig::load(home)?;
    let s = Session::open(home, &store).await?;
    let device = backend.device()?;
    let m = model(&s, &store, &device, &cfg).await?;
    let stored = if fresh { None } else { crate::personal::load_body(&store, &m, &cfg.side, &device)? };
    let global_version = if stored.is_some() { store.global_version()? } else { None };
    let (body, meta) = match stored {
        Some(b) => b,
        None => {
            let body = Plugin::new(&cfg.side, &m.config, &device)?;
            let meta = body_meta(&m, &cfg, &body)?;
            (body, meta)
        }
    };
    let splits = local_splits(&s, &store, &m, &body, progress).await?;
    let (model, heldout) = tokio::task::block_in_place(|| crate::personal::fit_model(&body, &m.head, &splits, personal, cfg.train.seed))?;
    let record = crate::personal::record(&m, &cfg.side, global_version, &splits, heldout);
    crate::personal::save(&store, &TrainedMeta { examples: splits.train.examples.len(), ..meta }, &model, &record)?;
    if fresh {
        store.clear_global_version()?;
    }
    Ok(TrainSummary {
        device_id: s.identity.device_id.clone(),
        backbone_version: m.info.backbone_version.clone(),
        global_version,
        examples: splits.examples,
        train_examples: splits.train.examples.len(),
        val_examples: splits.val.examples.len(),
        heldout_examples: splits.held.examples.len(),
        datastore_entries: model.knn.as_ref().map_or(0, |(d, _)| d.len()),
        personal: model.private_parts().1,
        heldout: heldout.map(|h| h.model),
        heldout_global: heldout.map(|h| h.global),
        heldout_backbone: heldout.map(|h| h.backbone),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The metadata of a body adopted or created now.
pub(crate) fn body_meta(m: &Model, cfg: &ClientConfig, body: &Plugin) -> Result<TrainedMeta> {
    Ok(TrainedMeta {
        format: 2,
        backbone_version: m.info.backbone_version.clone(),
        side: cfg.side.clone(),
        trained_at_ms: now_ms(),
        examples: 0,
        steps: 0,
        final_loss: None,
        shared_tensors: body.shared()?.as_set().tensors.len(),
        private_tensors: 0,
    })
}
