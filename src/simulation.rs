//! In-process federated simulation: every device and the coordinator in one process, with
//! the network replaced by function calls, like Flower's simulation engine. A round is the
//! real thing otherwise: devices train shared + private parts on cached backbone features,
//! upload only `weight * (shared - global)` through SecAgg+ (the same state machines, crypto
//! and quantization as the networked service), some devices drop after masking, and the
//! coordinator decodes the sum and applies the server strategy. The networked round loop
//! runs over gRPC in `quickstart`; the experiments (`experiment`) run their federated arms here.
use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::Serialize;
use spa_aggregation::quant::QuantParams;
use spa_aggregation::sim::{Stage, default_chunk, run};
use spa_aggregation::strategy::{ServerOptimizer, StrategyConfig};
use spa_aggregation::{Encoding, SecAggError, SessionConfig};
use spa_model::data::UserData;
use spa_model::experiment::positions_for;
use spa_model::features::{FeatureSet, extract_features, tokenize_examples};
use spa_model::side::{FrozenHead, ParamSet, Plugin, SharedParams, SideConfig};
use spa_model::tokenizer::Tokenizer;
use spa_model::train::{EvalMetrics, TrainConfig, evaluate, train_plugin, train_with_validation};
use spa_model::{Backbone, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, SimError>;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub rounds: usize,
    pub side: SideConfig,
    pub local: TrainConfig,
    pub strategy: StrategyConfig,
    /// Fraction of each round's cohort that vanishes after the masking phase starts (their
    /// masks are removed through Shamir recovery; their updates are not in the sum).
    pub dropout: f64,
    /// Per-coordinate clip of updates before quantization.
    pub clip: f32,
    pub seed: u64,
}

/// One device: its private data (as cached backbone features) and private layers.
pub struct SimDevice {
    pub name: String,
    pub data: UserData,
    train: Arc<FeatureSet>,
    val: Option<Arc<FeatureSet>>,
    test: Arc<FeatureSet>,
    private: ParamSet,
}

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
    let template = Plugin::new(side, &backbone.config, &backbone.device)?;
    let layers = template.shape.feature_layers.clone();
    let pos = positions_for(side.variant);
    let max_len = backbone.config.max_position_embeddings;
    let feats = |ex: &[spa_model::data::Example]| -> Result<Arc<FeatureSet>> {
        Ok(Arc::new(extract_features(backbone, &tokenize_examples(tokenizer, ex, max_len)?, &layers, pos, 8)?))
    };
    users
        .into_iter()
        .map(|u| {
            let (train, test) = (feats(&u.train)?, feats(&u.test)?);
            let val = if u.val.is_empty() { None } else { Some(feats(&u.val)?) };
            if train.num_loss_tokens() == 0 || test.num_loss_tokens() == 0 || val.as_ref().is_some_and(|v| v.num_loss_tokens() == 0) {
                return Err(SimError::Invalid(format!("device {} has no train, validation or test tokens", u.user)));
            }
            Ok(DeviceFeatures { data: u, train, val, test })
        })
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    pub round: usize,
    /// Global version after the round.
    pub version: u64,
    pub cohort: usize,
    pub contributors: usize,
    pub shared_params: usize,
    /// Max |secure aggregate - plaintext weighted mean| over coordinates (quantization error).
    pub max_abs_error_vs_plaintext: f32,
    /// Test metrics averaged over all devices (global shared part + each device's private part).
    pub mean: EvalMetrics,
    /// Each device's test metrics, of which `mean` is the mean.
    #[serde(skip)]
    pub devices: Vec<EvalMetrics>,
    pub seconds: f64,
}

/// The state of a simulation between rounds.
pub struct Simulation<'a> {
    backbone: &'a Backbone,
    head: FrozenHead,
    pub config: SimConfig,
    pub devices: Vec<SimDevice>,
    pub global: SharedParams,
    pub version: u64,
    optimizer: ServerOptimizer,
}

impl<'a> Simulation<'a> {
    /// Prepares devices: tokenizes their data and caches backbone features once (the
    /// backbone is frozen, so every round reuses them).
    pub fn new(backbone: &'a Backbone, tokenizer: &Tokenizer, users: Vec<UserData>, config: SimConfig) -> Result<Self> {
        if users.len() < 2 {
            return Err(SimError::Invalid("a federation needs at least 2 devices".into()));
        }
        let devices = device_features(backbone, tokenizer, users, &config.side)?;
        Self::with_features(backbone, devices, config)
    }

    /// A simulation over devices whose features are already computed (for `config.side`'s
    /// layers).
    pub fn with_features(backbone: &'a Backbone, data: Vec<DeviceFeatures>, config: SimConfig) -> Result<Self> {
        if data.len() < 2 {
            return Err(SimError::Invalid("a federation needs at least 2 devices".into()));
        }
        if !(0.0..0.5).contains(&config.dropout) {
            return Err(SimError::Invalid(format!("dropout {} must be in [0, 0.5)", config.dropout)));
        }
        config.local.validate()?;
        // A SecAgg+ client's self-mask needs t shares from other survivors: |U3| >= t + 1.
        let t = SessionConfig::recommended(1, 0, data.len() as u32, 2)?.threshold as usize;
        let survivors = data.len() - dropped_count(config.dropout, data.len());
        if survivors < t + 1 {
            return Err(SimError::Invalid(format!(
                "dropout {} leaves {survivors} of {} devices; SecAgg+ needs at least {} survivors (threshold {t} + 1)",
                config.dropout,
                data.len(),
                t + 1
            )));
        }
        let template = Plugin::new(&config.side, &backbone.config, &backbone.device)?;
        let (global, _) = template.split()?;
        let layers = template.shape.feature_layers.clone();
        let mut devices = Vec::new();
        for (i, d) in data.into_iter().enumerate() {
            if d.train.layers != layers {
                return Err(SimError::Invalid(format!("device {}: features of layers {:?}, the plugin reads {layers:?}", d.data.user, d.train.layers)));
            }
            // Each device initialises its own private layers.
            let own = SideConfig { seed: config.seed.wrapping_add(1 + i as u64), ..config.side.clone() };
            let (_, private) = Plugin::new(&own, &backbone.config, &backbone.device)?.split()?;
            devices.push(SimDevice { name: d.data.user.clone(), data: d.data, train: d.train, val: d.val, test: d.test, private });
        }
        let optimizer = ServerOptimizer::new(config.strategy.clone())?;
        Ok(Self { backbone, head: FrozenHead::device_copy(backbone), config, devices, global, version: 0, optimizer })
    }

    /// A device's personalized plugin: the current global shared part + its private part.
    pub fn plugin(&self, device: usize) -> Result<Plugin> {
        let d = &self.devices[device];
        Ok(Plugin::new(&self.config.side, &self.backbone.config, &self.backbone.device)?.load(self.global.as_set())?.load(&d.private)?)
    }

    pub fn head(&self) -> &FrozenHead {
        &self.head
    }

    /// Each device's test metrics with the current global version.
    pub fn evaluate_each(&self) -> Result<Vec<EvalMetrics>> {
        (0..self.devices.len()).map(|i| Ok(evaluate(&self.plugin(i)?, &self.head, &self.devices[i].test, 2048)?)).collect()
    }

    /// Mean test metrics over all devices with the current global version.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        Ok(EvalMetrics::mean(&self.evaluate_each()?))
    }

    /// One federated round over every device.
    pub fn round(&mut self) -> Result<RoundReport> {
        let started = Instant::now();
        let round = self.version as usize + 1;
        let n = self.devices.len();
        let mut deltas = Vec::with_capacity(n);
        for i in 0..n {
            let plugin = self.plugin(i)?;
            let cfg = TrainConfig { seed: self.config.local.seed.wrapping_add(round as u64 * 1000 + i as u64), ..self.config.local.clone() };
            let d = &self.devices[i];
            let (trained, _) = match &d.val {
                Some(val) => train_with_validation(plugin, &self.head, &d.train, val, &cfg, Some(&self.global), &mut |_| {})?,
                None => train_plugin(plugin, &self.head, &d.train, &cfg, Some(&self.global), &mut |_| {})?,
            };
            let (shared, private) = trained.split()?;
            // Private layers stay on the device; only the shared delta goes to aggregation.
            self.devices[i].private = private;
            deltas.push(shared.delta_from(&self.global)?);
        }
        let m = deltas[0].len();
        let mut session = SessionConfig::recommended(round as u64, self.version, n as u32, m as u64 + 1)?;
        let w_max = self.devices.iter().map(|d| d.data.train.len() as u32).max().unwrap_or(1).max(1);
        let Encoding::SignedTwosComplement { quant_bits, .. } = session.encoding else {
            return Err(SimError::Invalid("unexpected default encoding".into()));
        };
        session.encoding = Encoding::SignedTwosComplement { quant_bits, clip: self.config.clip, w_max };
        session.validate()?;
        let quant = QuantParams { bits: quant_bits, clip: self.config.clip, w_max };
        let mut rng = ChaCha20Rng::seed_from_u64(self.config.seed ^ (round as u64).wrapping_mul(0x9E37_79B9));
        let weights: Vec<u32> = self.devices.iter().map(|d| (d.data.train.len() as u32).min(w_max)).collect();
        let inputs = deltas.iter().zip(&weights).map(|(d, &w)| quant.encode(d, w, &mut rng)).collect::<std::result::Result<Vec<_>, _>>()?;
        let ids: Vec<u32> = (1..=n as u32).collect();
        let n_drop = dropped_count(self.config.dropout, n);
        // Drop the last n_drop devices of a round-dependent rotation after masking starts.
        let dropped: Vec<u32> = (0..n_drop).map(|k| ids[(round * 7 + k) % n]).collect();
        let out = run(&session, &ids, &inputs, |id| dropped.contains(&id).then_some(Stage::MaskedInput), default_chunk(), rng_seed(&mut rng));
        let agg = out.result?;
        let (mean_delta, _total_w) = quant.decode_mean(&agg.sum)?;
        // The plaintext mean of the same contributors, to report the encoding error.
        let mut plain = vec![0.0f64; m];
        let mut wsum = 0.0f64;
        for &id in &agg.contributors {
            let k = id as usize - 1;
            let w = weights[k] as f64;
            wsum += w;
            for (p, d) in plain.iter_mut().zip(&deltas[k]) {
                *p += w * d.clamp(-self.config.clip, self.config.clip) as f64;
            }
        }
        let err = plain.iter().zip(&mean_delta).map(|(p, s)| ((p / wsum) as f32 - s).abs()).fold(0.0, f32::max);
        let mut flat = self.global.as_set().flatten();
        self.optimizer.apply(&mut flat, &mean_delta)?;
        self.global = self.global.apply_flat(&flat)?;
        self.version += 1;
        let devices = self.evaluate_each()?;
        Ok(RoundReport {
            round,
            version: self.version,
            cohort: n,
            contributors: agg.contributors.len(),
            shared_params: m,
            max_abs_error_vs_plaintext: err,
            mean: EvalMetrics::mean(&devices),
            devices,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn dropped_count(dropout: f64, n: usize) -> usize {
    (dropout * n as f64).floor() as usize
}

fn rng_seed(rng: &mut ChaCha20Rng) -> u64 {
    rand_core::RngCore::next_u64(rng)
}
