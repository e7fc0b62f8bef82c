//! Devices' data and backbone features: computed once per device, held in memory
//! ([`MemoryBank`]) or written to disk and loaded per use ([`DiskBank`]).
use std::sync::Arc;

use rayon::prelude::*;
use spa_model::Backbone;
use spa_model::data::UserData;
use spa_model::features::{ExampleFeatures, FeatureSet, extract_features, tokenize_examples};
use spa_model::side::{Plugin, SideConfig};
use spa_model::tokenizer::Tokenizer;

use super::error::{Result, SimError};

/// A device's data with its backbone features, computed once and shared by every run on it.
#[derive(Clone)]
pub struct DeviceFeatures {
    pub data: UserData,
    pub train: Arc<FeatureSet>,
    /// Present when the user's data has a validation split: each round's local training
    /// keeps its best epoch on it.
    pub val: Option<Arc<FeatureSet>>,
    pub test: Arc<FeatureSet>,
}

/// Tokenizes each user's data and computes the backbone features `side` reads.
pub fn device_features(backbone: &Backbone, tokenizer: &Tokenizer, users: Vec<UserData>, side: &SideConfig) -> Result<Vec<DeviceFeatures>> {
    // Devices side by side: a prefill's own kernels keep two cores about 70% busy.
    users.into_par_iter().map(|u| one_device(backbone, tokenizer, u, side)).collect()
}

fn one_device(backbone: &Backbone, tokenizer: &Tokenizer, u: UserData, side: &SideConfig) -> Result<DeviceFeatures> {
    let template = Plugin::new(side, &backbone.config, &backbone.device)?;
    let layers = template.shape.feature_layers.clone();
    let pos = side.variant.positions();
    let max_len = backbone.config.max_position_embeddings;
    let feats = |ex: &[spa_model::data::Example]| -> Result<Arc<FeatureSet>> {
        Ok(Arc::new(extract_features(backbone, &tokenize_examples(tokenizer, ex, max_len)?, &layers, pos, 8)?))
    };
    let (train, test) = (feats(&u.train)?, feats(&u.test)?);
    let val = if u.val.is_empty() { None } else { Some(feats(&u.val)?) };
    if train.num_loss_tokens() == 0 || test.num_loss_tokens() == 0 || val.as_ref().is_some_and(|v| v.num_loss_tokens() == 0) {
        return Err(SimError::Invalid(format!("device {} has no train, validation or test tokens", u.user)));
    }
    Ok(DeviceFeatures { data: u, train, val, test })
}

/// Devices' data and features, by index.
pub trait FeatureBank: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn name(&self, i: usize) -> &str;
    /// Train examples (the device's weight in an aggregate).
    fn weight(&self, i: usize) -> usize;
    fn get(&self, i: usize) -> Result<DeviceFeatures>;
}

/// Every device's features in memory.
pub struct MemoryBank(pub Vec<DeviceFeatures>);

impl FeatureBank for MemoryBank {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn name(&self, i: usize) -> &str {
        &self.0[i].data.user
    }
    fn weight(&self, i: usize) -> usize {
        self.0[i].data.train.len()
    }
    fn get(&self, i: usize) -> Result<DeviceFeatures> {
        Ok(self.0[i].clone())
    }
}

/// Every device's features computed once and written to a private temporary directory,
/// read back per use: memory holds only the devices in use.
pub struct DiskBank {
    dir: tempfile::TempDir,
    names: Vec<String>,
    weights: Vec<usize>,
}

impl DiskBank {
    /// Computes and writes each user's features, one user in memory at a time.
    pub fn build(backbone: &Backbone, tokenizer: &Tokenizer, users: Vec<UserData>, side: &SideConfig) -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| SimError::Invalid(format!("feature bank directory: {e}")))?;
        let (mut names, mut weights) = (Vec::new(), Vec::new());
        for (i, u) in users.into_iter().enumerate() {
            let d = one_device(backbone, tokenizer, u, side)?;
            names.push(d.data.user.clone());
            weights.push(d.data.train.len());
            let path = dir.path().join(format!("{i}.bin"));
            std::fs::write(&path, encode_device(&d)).map_err(|e| SimError::Invalid(format!("{}: {e}", path.display())))?;
        }
        Ok(Self { dir, names, weights })
    }
}

impl FeatureBank for DiskBank {
    fn len(&self) -> usize {
        self.names.len()
    }
    fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
    fn weight(&self, i: usize) -> usize {
        self.weights[i]
    }
    fn get(&self, i: usize) -> Result<DeviceFeatures> {
        let path = self.dir.path().join(format!("{i}.bin"));
        let bytes = std::fs::read(&path).map_err(|e| SimError::Invalid(format!("{}: {e}", path.display())))?;
        decode_device(&bytes)
    }
}

/// What a feature set is besides its examples.
#[derive(serde::Serialize, serde::Deserialize)]
struct SetHeader {
    layers: Vec<usize>,
    d: usize,
    positions: spa_model::features::Positions,
    examples: usize,
}

/// `u32 length | JSON user data`, then per set (train, val if any, test) `u32 length | JSON
/// header` and its examples, each `u32 length | client feature-cache record`.
fn encode_device(d: &DeviceFeatures) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, b: &[u8]) {
        out.extend((b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::new();
    chunk(&mut out, &serde_json::to_vec(&d.data).expect("serializes"));
    for set in [Some(&d.train), d.val.as_ref(), Some(&d.test)].into_iter().flatten() {
        let h = SetHeader { layers: set.layers.clone(), d: set.d, positions: set.positions, examples: set.examples.len() };
        chunk(&mut out, &serde_json::to_vec(&h).expect("serializes"));
        for e in &set.examples {
            chunk(&mut out, &e.to_bytes());
        }
    }
    out
}

fn decode_device(b: &[u8]) -> Result<DeviceFeatures> {
    let bad = || SimError::Invalid("corrupt feature bank record".into());
    let mut at = 0;
    let mut next = || -> Result<&[u8]> {
        let n = u32::from_le_bytes(b.get(at..at + 4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let s = b.get(at + 4..at + 4 + n).ok_or_else(bad)?;
        at += 4 + n;
        Ok(s)
    };
    let data: UserData = serde_json::from_slice(next()?).map_err(|_| bad())?;
    let mut sets = Vec::new();
    for _ in 0..if data.val.is_empty() { 2 } else { 3 } {
        let h: SetHeader = serde_json::from_slice(next()?).map_err(|_| bad())?;
        let examples = (0..h.examples).map(|_| ExampleFeatures::from_bytes(next()?).map_err(|_| bad())).collect::<Result<Vec<_>>>()?;
        sets.push(Arc::new(FeatureSet { layers: h.layers, d: h.d, positions: h.positions, examples }));
    }
    let test = sets.pop().ok_or_else(bad)?;
    let val = if sets.len() == 2 { sets.pop() } else { None };
    Ok(DeviceFeatures { data, train: sets.pop().ok_or_else(bad)?, val, test })
}
