//! An experiment's TOML file (`configs/experiments/*.toml`): the backbone, the devices' data,
//! the federated schedule, the side plugin, seeds and arms. Unknown keys are errors.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use spa_aggregation::strategy::StrategyConfig;
use spa_model::data::shakespeare::{ExampleLimits, leaf_users, parse_play_script, rank_roles};
use spa_model::data::synthetic::synthetic_users;
use spa_model::data::{UserData, split_in_order};
use spa_model::side::SideConfig;
use spa_model::train::TrainConfig;

use super::ExperimentError;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// Backbone directory (HF layout); relative paths are taken from the config file's
    /// directory's project root (see [`ExperimentConfig::resolve`]). Absent: the shipped
    /// `models/shakespeare-char`.
    #[serde(default)]
    pub backbone: Option<PathBuf>,
    pub corpus: Corpus,
    /// Each device's first fraction of examples trains, the rest tests (in order, LEAF style).
    #[serde(default = "train_fraction")]
    pub train_fraction: f64,
    /// Model seeds (plugin initialisation, batch order, SecAgg+ randomness); the data are the
    /// same for every seed.
    pub seeds: Vec<u64>,
    pub rounds: usize,
    /// Local training per round (federated arms) and per round-equivalent (local arm).
    pub local: TrainConfig,
    #[serde(default)]
    pub side: SideConfig,
    #[serde(default = "fedavg")]
    pub strategy: StrategyConfig,
    /// Fraction of each cohort that drops after the masking phase (SecAgg+ recovers them).
    #[serde(default)]
    pub dropout: f64,
    /// Per-coordinate clip of updates before quantization.
    #[serde(default = "one")]
    pub clip: f32,
    /// Test examples per device whose greedy reply is scored with ROUGE-L (0 = all).
    #[serde(default)]
    pub rouge_examples: usize,
    pub arms: Vec<Arm>,
}

fn fedavg() -> StrategyConfig {
    StrategyConfig::FedAvg { server_lr: 1.0 }
}

fn one() -> f32 {
    1.0
}

fn train_fraction() -> f64 {
    0.8
}

/// Where the devices' data come from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Corpus {
    /// The quickstart's generator: users with distinct openers, closers and vocabularies.
    Synthetic { devices: usize, examples: usize, seed: u64 },
    /// A play script (`NAME:` line, speech, blank line): each role is a device (LEAF style,
    /// cue -> reply, split 80/20 in order). Roles from a file (one per line, `#` comments), or
    /// the `top` roles by speeches after skipping `skip`.
    Play {
        path: PathBuf,
        #[serde(default)]
        roles_file: Option<PathBuf>,
        #[serde(default)]
        top: Option<usize>,
        #[serde(default)]
        skip: usize,
        #[serde(default = "cue_chars")]
        max_cue_chars: usize,
        #[serde(default = "reply_chars")]
        max_reply_chars: usize,
        /// Keep each role's first this many train and test examples (after the in-order
        /// split), to bound the cost on a large backbone; absent = all.
        #[serde(default)]
        max_train: Option<usize>,
        #[serde(default)]
        max_test: Option<usize>,
    },
}

fn cue_chars() -> usize {
    ExampleLimits::default().max_cue_chars
}

fn reply_chars() -> usize {
    ExampleLimits::default().max_reply_chars
}

/// The arms (EXPERIMENTS.md): baselines, SPA, and SPA's ablations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The frozen backbone alone.
    Backbone,
    /// Each device trains shared + private parts alone, `rounds x local.epochs` epochs.
    Local,
    /// LST-style global adapter: every plugin tensor shared and federated, the side always speaks.
    Global,
    /// The global adapter, then `local.epochs` of fine-tuning on each device (FedAvg+FT).
    GlobalFt,
    /// SPA: the side network federated with SecAgg+, gate and personal head private.
    Spa,
    /// SPA's trained plugins with the gate forced on (the side always speaks).
    SpaGateOn,
    /// SPA's trained plugins with the gate forced off (= the backbone, by construction).
    SpaGateOff,
    /// SPA with only the personal head private (the gate federated too).
    SpaPrivateHead,
    /// SPA with only the gate private (the personal head federated too).
    SpaPrivateGate,
    /// SPA with the side network's last layer (`side.up`) private as well as head and gate.
    SpaPrivateUp,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Backbone => "backbone",
            Self::Local => "local",
            Self::Global => "global",
            Self::GlobalFt => "global_ft",
            Self::Spa => "spa",
            Self::SpaGateOn => "spa_gate_on",
            Self::SpaGateOff => "spa_gate_off",
            Self::SpaPrivateHead => "spa_private_head",
            Self::SpaPrivateGate => "spa_private_gate",
            Self::SpaPrivateUp => "spa_private_up",
        }
    }

    /// Tensor-path prefixes that stay on the device (the rest is federated).
    pub fn private(self) -> &'static [&'static str] {
        match self {
            Self::Global | Self::GlobalFt => &[],
            Self::SpaPrivateHead => &["personal."],
            Self::SpaPrivateGate => &["gate."],
            Self::SpaPrivateUp => &["gate.", "personal.", "side.up."],
            _ => &["gate.", "personal."],
        }
    }

    /// How the trained plugin picks between side and backbone at test time.
    pub fn gate(self) -> GateMode {
        match self {
            Self::Backbone | Self::SpaGateOff => GateMode::Off,
            Self::Global | Self::GlobalFt | Self::SpaGateOn => GateMode::On,
            _ => GateMode::Learned,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    Learned,
    /// The side plugin speaks at every token.
    On,
    /// The backbone speaks at every token.
    Off,
}

impl ExperimentConfig {
    pub fn from_file(path: &Path) -> Result<Self, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|e| ExperimentError::Config(format!("{}: {e}", path.display())))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ExperimentError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ExperimentError> {
        let bad = |m: String| Err(ExperimentError::Config(m));
        if self.seeds.is_empty() || self.seeds.len() > 100 {
            return bad(format!("seeds: 1 to 100 of them, not {}", self.seeds.len()));
        }
        if self.rounds == 0 || self.rounds > 1000 {
            return bad(format!("rounds {} must be in 1..=1000", self.rounds));
        }
        if !(0.0..0.5).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 0.5)", self.dropout));
        }
        if !(self.train_fraction > 0.0 && self.train_fraction < 1.0) {
            return bad(format!("train_fraction {} must be in (0, 1)", self.train_fraction));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip {} must be finite and positive", self.clip));
        }
        if self.arms.is_empty() {
            return bad("arms: name at least one".into());
        }
        for (i, a) in self.arms.iter().enumerate() {
            if self.arms[..i].contains(a) {
                return bad(format!("arm {} listed twice", a.name()));
            }
        }
        if !self.arms.contains(&Arm::Spa) && self.arms.iter().any(|a| matches!(a, Arm::SpaGateOn | Arm::SpaGateOff)) {
            return bad("spa_gate_on and spa_gate_off re-evaluate spa's plugins: list spa too".into());
        }
        self.local.validate().map_err(|e| ExperimentError::Config(format!("local: {e}")))?;
        if let Corpus::Synthetic { devices, examples, .. } = self.corpus
            && (!(2..=10_000).contains(&devices) || !(5..=100_000).contains(&examples))
        {
            return bad(format!("synthetic corpus: devices {devices} must be in 2..=10000 and examples {examples} in 5..=100000"));
        }
        Ok(())
    }

    /// The devices' data. Relative corpus paths are resolved against `root`.
    pub fn users(&self, root: &Path) -> Result<Vec<UserData>, ExperimentError> {
        match &self.corpus {
            Corpus::Synthetic { devices, examples, seed } => Ok(synthetic_users(*devices, *examples, *seed)
                .into_iter()
                .map(|u| split_in_order(u.user, u.train.into_iter().chain(u.test).collect(), self.train_fraction))
                .collect()),
            Corpus::Play { path, roles_file, top, skip, max_cue_chars, max_reply_chars, max_train, max_test } => {
                let read = |p: &Path| {
                    let p = root.join(p);
                    std::fs::read_to_string(&p).map_err(|e| ExperimentError::Config(format!("{}: {e}", p.display())))
                };
                let speeches = parse_play_script(&read(path)?);
                let names: Vec<String> = match (roles_file, top) {
                    (Some(f), None) => read(f)?.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect(),
                    (None, Some(n)) => rank_roles(&speeches).into_iter().skip(*skip).take(*n).map(|r| r.name).collect(),
                    _ => return Err(ExperimentError::Config("play corpus: give exactly one of roles_file and top".into())),
                };
                if names.len() < 2 {
                    return Err(ExperimentError::Config(format!("play corpus: {} roles; a federation needs at least 2", names.len())));
                }
                let limits = ExampleLimits { max_cue_chars: *max_cue_chars, max_reply_chars: *max_reply_chars };
                let mut users = leaf_users(&speeches, &names, limits, self.train_fraction);
                for u in &mut users {
                    u.train.truncate(max_train.unwrap_or(usize::MAX));
                    u.test.truncate(max_test.unwrap_or(usize::MAX));
                }
                if let Some(u) = users.iter().find(|u| u.train.is_empty() || u.test.is_empty()) {
                    return Err(ExperimentError::Config(format!("role {:?} has no speeches in {}", u.user, path.display())));
                }
                Ok(users)
            }
        }
    }
}
