//! The device's model (SPA v2): its examples split in time order into train, validation and
//! held-out parts, the personal model fitted against the body on them
//! ([`spa_model::personal::fit`]), and the stored form every command loads. The body is the
//! side network's shared part (a committed global version, or a fresh one before any
//! round); everything fitted here is private and stays in the device's store.
use serde::{Deserialize, Serialize};
use spa_model::burn::tensor::Device;
use spa_model::data::Example;
use spa_model::features::{FeatureSet, tokenize_examples};
use spa_model::personal::knn::Datastore;
use spa_model::personal::{PersonalConfig, PersonalMeta, PersonalModel, Score, fit, gate};
use spa_model::side::{ParamSet, Plugin, SideConfig};
use spa_proto::auth::now_ms;

use crate::error::{ClientError, Result};
use crate::net::Session;
use crate::remote::{Model, features};
use crate::store::{ClientStore, StoredPersonal, TrainedMeta};

/// How many of `n` examples (in order) train, validate the fit's choices, and are held out
/// for the reports: the last tenth is held out from ten examples on; of the rest, the last
/// tenth, at least 8 (at most half), validates from 4 examples on.
pub fn split_counts(n: usize) -> (usize, usize, usize) {
    let held = if n >= 10 { n / 10 } else { 0 };
    let rest = n - held;
    let val = if rest >= 4 { rest.div_ceil(10).max(8).min(rest / 2) } else { 0 };
    (rest - val, val, held)
}

/// The device's examples as backbone features for `body`'s layers.
pub struct Splits {
    pub train: FeatureSet,
    pub val: FeatureSet,
    pub held: FeatureSet,
    pub examples: usize,
}

/// Progress of the feature fetch.
pub trait FeatureProgress {
    fn features(&mut self, _done: usize, _total: usize) {}
}

impl FeatureProgress for () {}

pub(crate) async fn local_splits(s: &Session, store: &ClientStore, m: &Model, body: &Plugin, progress: &mut dyn FeatureProgress) -> Result<Splits> {
    let examples: Vec<Example> = store.examples()?;
    if examples.is_empty() {
        return Err(ClientError::Invalid("no local data: run `spa-client data add FILE` first".into()));
    }
    let tok = tokenize_examples(&m.tokenizer, &examples, m.config.max_position_embeddings)?;
    let (n_train, n_val, _) = split_counts(tok.len());
    let layers = body.shape.feature_layers.clone();
    let pos = body.config.variant.positions();
    let mut train = features(s, store, m, &tok, &layers, pos, &mut |d, t| progress.features(d, t)).await?;
    let held = train.examples.split_off(n_train + n_val);
    let val = train.examples.split_off(n_train);
    let part = |examples| FeatureSet { examples, layers: train.layers.clone(), d: train.d, positions: train.positions };
    Ok(Splits { val: part(val), held: part(held), train, examples: tok.len() })
}

/// What a device records about its personal model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalRecord {
    pub backbone_version: String,
    /// The committed global version of the body it was fitted against (None: a fresh body).
    pub global_version: Option<u64>,
    pub side: SideConfig,
    pub meta: PersonalMeta,
    pub fitted_at_ms: u64,
    pub train_examples: usize,
    pub val_examples: usize,
    /// On the held-out examples: the model as it speaks, the body alone (the global
    /// adapter), and the backbone alone.
    pub heldout: Option<Score>,
    pub heldout_global: Option<Score>,
    pub heldout_backbone: Option<Score>,
}

/// A model's held-out scores: as it speaks, the body alone, the backbone alone.
#[derive(Clone, Copy, Debug)]
pub struct Heldout {
    pub model: Score,
    pub global: Score,
    pub backbone: Score,
}

/// Fits the personal model against `body` on `splits` (too few examples to validate: the
/// body alone), and scores it on the held-out part.
pub fn fit_model(
    body: &Plugin,
    head: &spa_model::side::FrozenHead,
    splits: &Splits,
    cfg: &PersonalConfig,
    seed: u64,
) -> Result<(PersonalModel, Option<Heldout>)> {
    let model = if splits.val.num_loss_tokens() == 0 || splits.train.num_loss_tokens() == 0 {
        PersonalModel::of_body(body.clone())
    } else {
        fit(body, head, &splits.train, &splits.val, cfg, seed)?.device_model(body, cfg)
    };
    let heldout = if splits.held.num_loss_tokens() == 0 { None } else { Some(heldout(&model, head, &splits.held)?) };
    Ok((model, heldout))
}

/// `model`'s scores on `set` (see [`Heldout`]).
pub fn heldout(model: &PersonalModel, head: &spa_model::side::FrozenHead, set: &FeatureSet) -> Result<Heldout> {
    let s = model.score(head, set)?;
    let global = PersonalModel::of_body(model.body.clone()).score(head, set)?.at(gate::ALWAYS);
    Ok(Heldout { model: s.at(model.threshold), global, backbone: s.at(gate::NEVER) })
}

/// Saves `body` (with `meta`) and the personal model fitted against it, atomically.
pub fn save(store: &ClientStore, meta: &TrainedMeta, model: &PersonalModel, record: &PersonalRecord) -> Result<()> {
    let (private, pmeta, datastore) = model.private_parts();
    let record = PersonalRecord { meta: pmeta, ..record.clone() };
    let stored = StoredPersonal {
        record: serde_json::to_vec(&record).expect("records serialize"),
        params: private.to_safetensors(),
        datastore: datastore.map(|d| d.to_bytes()),
    };
    let meta = TrainedMeta { private_tensors: private.tensors.len(), format: 2, ..meta.clone() };
    store.save_model(&model.body.shared()?.as_set().to_safetensors(), &meta, Some(&stored))
}

/// A record for `model` fitted now on `splits`.
pub fn record(m: &Model, side: &SideConfig, global_version: Option<u64>, splits: &Splits, heldout: Option<Heldout>) -> PersonalRecord {
    PersonalRecord {
        backbone_version: m.info.backbone_version.clone(),
        global_version,
        side: side.clone(),
        meta: PersonalMeta::default(),
        fitted_at_ms: now_ms(),
        train_examples: splits.train.examples.len(),
        val_examples: splits.val.examples.len(),
        heldout: heldout.map(|h| h.model),
        heldout_global: heldout.map(|h| h.global),
        heldout_backbone: heldout.map(|h| h.backbone),
    }
}

/// The stored body alone, when it was saved for this backbone and side layout.
pub fn load_body(store: &ClientStore, m: &Model, side: &SideConfig, device: &Device) -> Result<Option<(Plugin, TrainedMeta)>> {
    let Some((shared, meta)) = store.body()? else { return Ok(None) };
    if meta.backbone_version != m.info.backbone_version || &meta.side != side {
        return Ok(None);
    }
    Ok(Some((Plugin::new(side, &m.config, device)?.load(&ParamSet::from_safetensors(&shared)?)?, meta)))
}

/// The device's model as stored, checked against the served backbone; a store without one
/// (never fitted, or written by SPA v1) is refused with what to run.
pub fn load(store: &ClientStore, m: &Model, device: &Device) -> Result<(PersonalModel, PersonalRecord)> {
    let (Some((shared, meta)), Some(stored)) = (store.body()?, store.personal()?) else {
        let v1 = store.body()?.is_some_and(|(_, meta)| meta.format < 2);
        return Err(ClientError::NoPersonalModel(if v1 {
            "this device's store was written by SPA v1 (a co-trained gate and personal layer, no personal model): run `spa-client train` to fit one (its stored side network is kept)".into()
        } else {
            "no personal model on this device: run `spa-client train` (or take part in rounds with `spa-client run`) first".into()
        }));
    };
    let record: PersonalRecord = serde_json::from_slice(&stored.record).map_err(|e| ClientError::Invalid(format!("corrupt personal model record: {e}")))?;
    if record.backbone_version != m.info.backbone_version || meta.backbone_version != m.info.backbone_version {
        return Err(ClientError::NoPersonalModel(format!(
            "the personal model was fitted on backbone {} but the coordinator serves {}: run `spa-client train --fresh`",
            record.backbone_version, m.info.backbone_version
        )));
    }
    let body = Plugin::new(&record.side, &m.config, device)?.load(&ParamSet::from_safetensors(&shared)?)?;
    let datastore = stored.datastore.as_deref().map(Datastore::from_bytes).transpose()?;
    let model = PersonalModel::from_parts(body, &ParamSet::from_safetensors(&stored.params)?, record.meta.clone(), datastore)?;
    Ok((model, record))
}

#[cfg(test)]
mod tests {
    use super::split_counts;

    #[test]
    fn splits_keep_validation_and_held_out_parts_in_order() {
        assert_eq!(split_counts(3), (3, 0, 0));
        assert_eq!(split_counts(5), (3, 2, 0));
        assert_eq!(split_counts(30), (19, 8, 3));
        assert_eq!(split_counts(200), (162, 18, 20));
        for n in 0..300 {
            let (t, v, h) = split_counts(n);
            assert_eq!(t + v + h, n);
            assert!(v <= t, "{n}: {t} {v} {h}");
        }
    }
}
