//! In-process federated simulation: every device and the coordinator in one process, with
//! the network replaced by function calls, like Flower's simulation engine. A round is the
//! real thing otherwise: devices train shared + private parts on cached backbone features,
//! upload only `weight * (shared - global)` through SecAgg+ (the same state machines, crypto
//! and quantization as the networked service), some devices drop after masking, and the
//! coordinator decodes the sum and applies the server strategy. The networked round loop
//! runs over gRPC in `quickstart`; the experiments (`experiment`) run their federated arms here.
//!
//! Devices' features come from a [`FeatureBank`]: all in memory ([`MemoryBank`]), or on disk
//! and loaded per use ([`DiskBank`]), so that a federation of hundreds of devices with a
//! cohort sampled per round holds only the cohort's features in memory (bank.rs).
mod bank;
mod error;

use std::sync::Arc;
use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use spa_aggregation::dp::DpParams;
use spa_aggregation::sim::{Stage, default_chunk, run};
use spa_aggregation::strategy::{ServerOptimizer, StrategyConfig};
use spa_aggregation::{Encoding, SessionConfig};
use spa_model::Backbone;
use spa_model::data::UserData;
use spa_model::side::{FrozenHead, ParamSet, Plugin, SharedParams, SideConfig};
use spa_model::tokenizer::Tokenizer;
use spa_model::train::{EvalMetrics, TrainConfig, evaluate, train_plugin, train_with_validation};

pub use bank::{DeviceFeatures, DiskBank, FeatureBank, MemoryBank, device_features};
pub use error::{Result, SimError};

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
    /// Devices per round, sampled uniformly without replacement (LEAF's and production FL's
    /// cohorts); None: every device every round.
    pub cohort: Option<usize>,
    /// Devices evaluated after each round (the first ones of the bank); 0: all.
    pub eval_devices: usize,
    /// Distributed DP as the coordinator runs it (`round start --dp-clip --dp-noise`): each
    /// update L2-clipped and noised on the device, unweighted; None: quantized, weighted.
    pub dp: Option<SimDp>,
}

/// Distributed discrete Gaussian DP of a simulated round.
#[derive(Clone, Copy, Debug)]
pub struct SimDp {
    pub l2_clip: f32,
    /// z: central sigma = z * l2_clip, split over the cohort.
    pub noise_multiplier: f32,
}

/// One device: its name, weight in the aggregate (train examples) and private layers; its
/// data and features are in the simulation's bank.
pub struct SimDevice {
    pub name: String,
    pub weight: usize,
    private: ParamSet,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    pub round: usize,
    /// Global version after the round.
    pub version: u64,
    pub cohort: usize,
    pub contributors: usize,
    pub shared_params: usize,
    /// Max |secure aggregate - plaintext mean| over coordinates: the quantization error, and
    /// with DP the noise too.
    pub max_abs_error_vs_plaintext: f32,
    /// Test metrics averaged over all devices (global shared part + each device's private part).
    pub mean: EvalMetrics,
    /// Each device's test metrics, of which `mean` is the mean.
    #[serde(skip)]
    pub devices: Vec<EvalMetrics>,
    pub seconds: f64,
}

impl RoundReport {
    /// The markdown table's header, and its row 0 (the fresh plugin's metrics, `before`).
    pub fn header(before: &EvalMetrics) -> String {
        format!(
            "| round | version | contributors/cohort | shared params | SecAgg vs plaintext max err | backbone loss | federated side loss | backbone acc | federated side acc | s |\n\
             |---|---|---|---|---|---|---|---|---|---|\n\
             | 0 | 0 | - | - | - | {:.3} | {:.3} | {:.3} | {:.3} | - |\n",
            before.backbone_loss, before.side_loss, before.backbone_acc, before.side_acc
        )
    }
}

impl std::fmt::Display for RoundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.mean;
        write!(
            f,
            "| {} | {} | {}/{} | {} | {:.1e} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} |",
            self.round,
            self.version,
            self.contributors,
            self.cohort,
            self.shared_params,
            self.max_abs_error_vs_plaintext,
            m.backbone_loss,
            m.side_loss,
            m.backbone_acc,
            m.side_acc,
            self.seconds
        )
    }
}

/// The state of a simulation between rounds.
pub struct Simulation<'a> {
    backbone: &'a Backbone,
    head: FrozenHead,
    pub config: SimConfig,
    bank: Arc<dyn FeatureBank>,
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
        Self::with_bank(backbone, FrozenHead::device_copy(backbone), Arc::new(MemoryBank(data)), config)
    }

    /// A simulation over the devices of `bank`, training and scoring with `head` (the
    /// backbone's, as [`FrozenHead::device_copy`] makes it; a caller that shares it shares the
    /// predictions it memoizes over each device's features).
    pub fn with_bank(backbone: &'a Backbone, head: FrozenHead, bank: Arc<dyn FeatureBank>, config: SimConfig) -> Result<Self> {
        let n = bank.len();
        if n < 2 {
            return Err(SimError::Invalid("a federation needs at least 2 devices".into()));
        }
        if let Some(dp) = config.dp
            && !(dp.l2_clip.is_finite() && dp.l2_clip > 0.0 && dp.noise_multiplier.is_finite() && (0.0..=1e6).contains(&dp.noise_multiplier))
        {
            return Err(SimError::Invalid(format!("dp clip {} must be > 0 and noise {} in 0..=1e6", dp.l2_clip, dp.noise_multiplier)));
        }
        if !(0.0..0.5).contains(&config.dropout) {
            return Err(SimError::Invalid(format!("dropout {} must be in [0, 0.5)", config.dropout)));
        }
        if config.cohort.is_some_and(|c| c < 2 || c > n) {
            return Err(SimError::Invalid(format!("a cohort of {:?} devices out of {n}: 2 to {n}", config.cohort)));
        }
        config.local.validate()?;
        // A SecAgg+ client's self-mask needs t shares from other survivors: |U3| >= t + 1.
        let c = config.cohort.unwrap_or(n);
        let t = SessionConfig::recommended(1, 0, c as u32, 2)?.threshold as usize;
        let survivors = c - dropped_count(config.dropout, c);
        if survivors < t + 1 {
            return Err(SimError::Invalid(format!(
                "dropout {} leaves {survivors} of {c} devices; SecAgg+ needs at least {} survivors (threshold {t} + 1)",
                config.dropout,
                t + 1
            )));
        }
        let template = Plugin::new(&config.side, &backbone.config, &backbone.device)?;
        let (global, _) = template.split()?;
        let layers = template.shape.feature_layers.clone();
        let first = bank.get(0)?;
        if first.train.layers != layers {
            return Err(SimError::Invalid(format!("device {}: features of layers {:?}, the plugin reads {layers:?}", first.data.user, first.train.layers)));
        }
        let mut devices = Vec::new();
        for i in 0..n {
            // Each device initialises its own private layers.
            let own = SideConfig { seed: config.seed.wrapping_add(1 + i as u64), ..config.side.clone() };
            let (_, private) = Plugin::new(&own, &backbone.config, &backbone.device)?.split()?;
            devices.push(SimDevice { name: bank.name(i).to_string(), weight: bank.weight(i), private });
        }
        let optimizer = ServerOptimizer::new(config.strategy.clone())?;
        Ok(Self { backbone, head, config, bank, devices, global, version: 0, optimizer })
    }

    /// Device `i`'s data and features.
    pub fn features(&self, i: usize) -> Result<DeviceFeatures> {
        self.bank.get(i)
    }

    /// The devices of round `round`: a seeded sample of `cohort` of them, in index order.
    fn cohort(&self, round: usize) -> Vec<usize> {
        let n = self.devices.len();
        let Some(c) = self.config.cohort.filter(|&c| c < n) else { return (0..n).collect() };
        let mut rng = ChaCha20Rng::seed_from_u64(self.config.seed ^ 0xc0407 ^ (round as u64).wrapping_mul(0x2545_F491));
        let mut idx: Vec<usize> = (0..n).collect();
        // A partial Fisher-Yates shuffle: the first c are a uniform sample.
        for k in 0..c {
            let j = k + (rand_core::RngCore::next_u64(&mut rng) % (n - k) as u64) as usize;
            idx.swap(k, j);
        }
        let mut chosen = idx[..c].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// A device's personalized plugin: the current global shared part + its private part.
    pub fn plugin(&self, device: usize) -> Result<Plugin> {
        let d = &self.devices[device];
        Ok(Plugin::new(&self.config.side, &self.backbone.config, &self.backbone.device)?.load(self.global.as_set())?.load(&d.private)?)
    }

    pub fn head(&self) -> &FrozenHead {
        &self.head
    }

    /// Test metrics with the current global version of each evaluated device (the first
    /// `config.eval_devices`, or all).
    pub fn evaluate_each(&self) -> Result<Vec<EvalMetrics>> {
        let n = if self.config.eval_devices == 0 { self.devices.len() } else { self.config.eval_devices.min(self.devices.len()) };
        (0..n).into_par_iter().map(|i| Ok(evaluate(&self.plugin(i)?, &self.head, &self.bank.get(i)?.test, 2048)?)).collect()
    }

    /// Mean test metrics over all devices with the current global version.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        Ok(EvalMetrics::mean(&self.evaluate_each()?))
    }

    /// Device `i`'s local training in `round` from the current global: its shared and
    /// private parts.
    fn train_device(&self, i: usize, round: usize) -> Result<(SharedParams, ParamSet)> {
        let plugin = self.plugin(i)?;
        let cfg = TrainConfig { seed: self.config.local.seed.wrapping_add(round as u64 * 1000 + i as u64), ..self.config.local.clone() };
        let d = self.bank.get(i)?;
        let (trained, _) = match &d.val {
            Some(val) => train_with_validation(plugin, &self.head, &d.train, val, &cfg, Some(&self.global), &mut |_| {})?,
            None => train_plugin(plugin, &self.head, &d.train, &cfg, Some(&self.global), &mut |_| {})?,
        };
        Ok(trained.split()?)
    }

    /// One federated round over the round's cohort.
    pub fn round(&mut self) -> Result<RoundReport> {
        let started = Instant::now();
        let round = self.version as usize + 1;
        let cohort = self.cohort(round);
        let n = cohort.len();
        // The cohort trains side by side (each device's result depends on its data alone).
        let trained = cohort.par_iter().map(|&i| self.train_device(i, round)).collect::<Vec<Result<_>>>();
        let mut deltas = Vec::with_capacity(n);
        for (&i, t) in cohort.iter().zip(trained) {
            let (shared, private) = t?;
            // Private layers stay on the device; only the shared delta goes to aggregation.
            self.devices[i].private = private;
            deltas.push(shared.delta_from(&self.global)?);
        }
        let m = deltas[0].len();
        let mut session = SessionConfig::recommended(round as u64, self.version, n as u32, m as u64 + 1)?;
        let w_max = cohort.iter().map(|&i| self.devices[i].weight as u32).max().unwrap_or(1).max(1);
        let Encoding::SignedTwosComplement { quant_bits, .. } = session.encoding else {
            return Err(SimError::Invalid("unexpected default encoding".into()));
        };
        session.encoding = Encoding::SignedTwosComplement { quant_bits, clip: self.config.clip, w_max };
        let mut rng = ChaCha20Rng::seed_from_u64(self.config.seed ^ (round as u64).wrapping_mul(0x9E37_79B9));
        if let Some(dp) = self.config.dp {
            let mut rotation_seed = [0u8; 32];
            rng.fill_bytes(&mut rotation_seed);
            session.use_dp(DpParams::for_round(m, dp.l2_clip, dp.noise_multiplier, n as u32, rotation_seed)?);
        }
        session.validate()?;
        let mut inputs = Vec::with_capacity(n);
        let mut weights = Vec::with_capacity(n);
        for (d, &i) in deltas.iter().zip(&cohort) {
            let (input, w) = session.encode_update(d, self.devices[i].weight as u32, &mut rng)?;
            inputs.push(input);
            weights.push(w);
        }
        let ids: Vec<u32> = (1..=n as u32).collect();
        let n_drop = dropped_count(self.config.dropout, n);
        // Drop the last n_drop devices of a round-dependent rotation after masking starts.
        let dropped: Vec<u32> = (0..n_drop).map(|k| ids[(round * 7 + k) % n]).collect();
        let out = run(&session, &ids, &inputs, |id| dropped.contains(&id).then_some(Stage::MaskedInput), default_chunk(), rng_seed(&mut rng));
        let agg = out.result?;
        let (mean_delta, _total_w) = session.decode_mean(&agg.sum, agg.contributors.len())?;
        // The plaintext mean of the same contributors, clipped as the encoding clips them
        // (per coordinate, or in L2 under DP), to report what the encoding (and DP) costs.
        let mut plain = vec![0.0f64; m];
        let mut wsum = 0.0f64;
        for &id in &agg.contributors {
            let k = id as usize - 1;
            let w = weights[k] as f64;
            wsum += w;
            let l2 = deltas[k].iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            for (p, d) in plain.iter_mut().zip(&deltas[k]) {
                *p += w * match self.config.dp {
                    Some(dp) => *d as f64 * (dp.l2_clip as f64 / l2).min(1.0),
                    None => d.clamp(-self.config.clip, self.config.clip) as f64,
                };
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
