//! What the store keeps: devices and enrollment tokens, runs and rounds (and what an operator
//! asks for). Serialized as JSON by the backends (fields added later carry `#[serde(default)]`
//! so old records still read); a round record is sent whole to `round status`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use spa_aggregation::strategy::{StrategyConfig, StrategyName};

/// Why a plan was refused (the field and its bounds).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPlan(pub String);

/// What an operator asked for (`round start`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub rounds: u32,
    pub min_clients: u32,
    pub max_clients: u32,
    /// Deadline of selection and of the training phase, seconds.
    pub deadline_secs: u32,
    pub local_epochs: u32,
    pub lr: f64,
    pub strategy: StrategyName,
    /// FedProx's μ (0 for the other strategies: what devices are sent).
    pub prox_mu: f64,
    /// Distributed discrete Gaussian DP: L2 clip of each update (0 = off) and the noise
    /// multiplier z (central sigma = z * clip, split over `min_clients` devices).
    #[serde(default)]
    pub dp_l2_clip: f64,
    #[serde(default)]
    pub dp_noise_multiplier: f64,
}

impl RoundPlan {
    /// Checks every field; the strategy's parameters must be valid.
    pub fn validate(&self) -> Result<StrategyConfig, InvalidPlan> {
        let bad = |m: &str| Err(InvalidPlan(m.into()));
        if self.rounds == 0 || self.rounds > 10_000 {
            return bad("rounds must be in 1..=10000");
        }
        if self.min_clients < 2 {
            return bad("min_clients must be at least 2 (secure aggregation needs peers)");
        }
        if self.max_clients < self.min_clients || self.max_clients > 10_000 {
            return bad("max_clients must be in min_clients..=10000");
        }
        if self.deadline_secs == 0 || self.deadline_secs > 86_400 {
            return bad("deadline must be in 1..=86400 seconds");
        }
        if self.local_epochs == 0 || self.local_epochs > 1000 {
            return bad("local_epochs must be in 1..=1000");
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 10.0) {
            return bad("lr must be in (0, 10)");
        }
        if !(self.prox_mu.is_finite() && (0.0..=1e6).contains(&self.prox_mu)) {
            return bad("prox_mu must be a number in 0..=1e6");
        }
        // Bounded well inside f32, which the encoding computes in (1e39 is finite as f64 only).
        let dp_ok = |v: f64| v.is_finite() && (0.0..=1e6).contains(&v);
        if !(dp_ok(self.dp_l2_clip) && dp_ok(self.dp_noise_multiplier)) {
            return bad("dp clip and noise multiplier must be numbers in 0..=1e6");
        }
        if self.dp_l2_clip == 0.0 && self.dp_noise_multiplier > 0.0 {
            return bad("dp noise needs a dp clip > 0");
        }
        self.strategy.config(self.prox_mu as f32).map_err(|e| InvalidPlan(e.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundState {
    Selecting,
    Training,
    ShareKeys,
    MaskedInput,
    Unmask,
    Committed,
    Aborted,
}

impl RoundState {
    pub fn name(self) -> &'static str {
        match self {
            RoundState::Selecting => "selecting",
            RoundState::Training => "training",
            RoundState::ShareKeys => "share_keys",
            RoundState::MaskedInput => "masked_input",
            RoundState::Unmask => "unmask",
            RoundState::Committed => "committed",
            RoundState::Aborted => "aborted",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, RoundState::Committed | RoundState::Aborted)
    }
}

/// Held-out metrics a device reported for a committed version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    pub tokens: u64,
    pub backbone_loss: f64,
    pub personalized_loss: f64,
    pub backbone_acc: f64,
    pub personalized_acc: f64,
}

/// A seat that left a round: the phase it was asked to answer, and why it did not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    pub phase: RoundState,
    pub reason: DropReason,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum DropReason {
    /// No answer by the phase's deadline (a device that crashed or went offline shows here:
    /// devices have no call to report their own failure).
    TimedOut,
    /// The SecAgg+ server refused the answer (malformed, inconsistent, forged).
    Refused(String),
    /// Its masked upload broke off, was truncated or did not match its hash.
    BrokenUpload(String),
    /// Its SecAgg+ shard released nothing (too few of its devices left, or its unmasking
    /// failed), so its update cannot be in the sum.
    ShardFailed(String),
}

impl DropReason {
    /// The reason without its detail (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            DropReason::TimedOut => "timed_out",
            DropReason::Refused(_) => "refused",
            DropReason::BrokenUpload(_) => "broken_upload",
            DropReason::ShardFailed(_) => "shard_failed",
        }
    }
}

impl std::fmt::Display for Dropout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = self.phase.name();
        match &self.reason {
            DropReason::TimedOut => write!(f, "timed out at {phase}"),
            DropReason::Refused(why) => write!(f, "refused at {phase}: {why}"),
            DropReason::BrokenUpload(why) => write!(f, "broken upload at {phase}: {why}"),
            DropReason::ShardFailed(why) => write!(f, "its shard released nothing at {phase}: {why}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round_id: u64,
    pub run_id: u64,
    /// 1-based position in its run.
    pub index: u32,
    pub state: RoundState,
    pub plan: RoundPlan,
    pub base_version: u64,
    pub committed_version: Option<u64>,
    /// Device ids; seat `i + 1` in the SecAgg+ session is `cohort[i]`.
    pub cohort: Vec<String>,
    /// How many seats answered each phase.
    pub answered: BTreeMap<String, usize>,
    /// Devices whose updates are in the committed sum.
    pub contributors: Vec<String>,
    pub shared_params: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    pub reason: Option<String>,
    /// Per device, on the committed version's held-out split.
    pub metrics: BTreeMap<String, DeviceMetrics>,
    /// Token-weighted mean of `metrics`.
    pub mean_metrics: Option<DeviceMetrics>,
    /// Why each seat that left the round left it, by device id.
    #[serde(default)]
    pub dropouts: BTreeMap<String, Dropout>,
    /// Wall time of each phase, milliseconds.
    #[serde(default)]
    pub phase_ms: BTreeMap<String, u64>,
    /// Time the coordinator spent computing for this round (handling answers, closing
    /// phases, unmasking, decoding, applying the strategy, committing), milliseconds.
    #[serde(default)]
    pub coordinator_busy_ms: f64,
    /// The round's SecAgg+ shards (one unless the cohort outgrew `rounds.shard_size`).
    #[serde(default)]
    pub shards: Vec<ShardSummary>,
}

/// One SecAgg+ shard of a round, as its record keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardSummary {
    /// Devices placed in it.
    pub devices: usize,
    /// The fewest contributors it releases a sum of.
    pub floor: usize,
    /// Devices whose updates are in its released sum (0 until it released).
    pub contributors: usize,
    /// Why it released nothing, if so.
    pub failed: Option<String>,
    /// Where it ran: "this process" (the leader) or an aggregator's URL.
    #[serde(default)]
    pub aggregator: String,
}

impl RoundRecord {
    /// Round `round_id`, the next of `run`, selecting.
    pub fn new(round_id: u64, run: &RunRecord) -> Self {
        let now = spa_proto::auth::now_ms();
        RoundRecord {
            round_id,
            run_id: run.run_id,
            index: run.rounds_started,
            state: RoundState::Selecting,
            plan: run.plan.clone(),
            base_version: 0,
            committed_version: None,
            cohort: vec![],
            answered: BTreeMap::new(),
            contributors: vec![],
            shared_params: 0,
            started_ms: now,
            updated_ms: now,
            finished_ms: None,
            reason: None,
            metrics: BTreeMap::new(),
            mean_metrics: None,
            dropouts: BTreeMap::new(),
            phase_ms: BTreeMap::new(),
            coordinator_busy_ms: 0.0,
            shards: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Active,
    Done,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: u64,
    pub plan: RoundPlan,
    pub created_ms: u64,
    pub rounds_started: u32,
    pub state: RunState,
}

impl RunRecord {
    /// A new active run of `plan`, no round started yet.
    pub fn new(run_id: u64, plan: &RoundPlan, created_ms: u64) -> Self {
        Self { run_id, plan: plan.clone(), created_ms, rounds_started: 0, state: RunState::Active }
    }
}

/// The right to run rounds: one holder at a time per store. `term` grows each time the lease
/// changes hands; every round write carries the lease, and a backend refuses it
/// ([`StoreError::Fenced`](super::StoreError::Fenced)) once the lease has moved on, so a paused
/// old leader cannot overwrite its successor's rounds. A write under a lease that lapsed but
/// that nobody took renews it for `ttl_ms` in the same transaction: a leader slowed past its
/// renewal (a saturated runtime) keeps its round, and a takeover still always wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub term: u64,
    pub ttl_ms: u64,
}

/// Token-weighted mean of devices' metrics.
pub(crate) fn mean_metrics<'a>(ms: impl Iterator<Item = &'a DeviceMetrics>) -> DeviceMetrics {
    let mut out = DeviceMetrics::default();
    for m in ms {
        let w = m.tokens as f64;
        out.tokens += m.tokens;
        out.backbone_loss += w * m.backbone_loss;
        out.personalized_loss += w * m.personalized_loss;
        out.backbone_acc += w * m.backbone_acc;
        out.personalized_acc += w * m.personalized_acc;
    }
    let t = (out.tokens as f64).max(1.0);
    out.backbone_loss /= t;
    out.personalized_loss /= t;
    out.backbone_acc /= t;
    out.personalized_acc /= t;
    out
}

/// An enrolled device. Its id is that of the key it enrolled with, for good.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub name: String,
    pub public_key_hex: String,
    pub enrolled_at_ms: u64,
    pub token_id: String,
    pub revoked: bool,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
    /// When its key was last replaced (`RotateKey`); the id stays that of the first key.
    #[serde(default)]
    pub key_rotated_at_ms: Option<u64>,
}

/// A one-time enrollment token (the store keys it by the token's hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub note: String,
    #[serde(default)]
    pub used_by: Option<String>,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether an enrollment may use the token at `now_ms`; the refusal otherwise.
    pub fn check_usable(&self, now_ms: u64) -> Result<(), super::StoreError> {
        use super::StoreError;
        if self.used_by.is_some() {
            Err(StoreError::TokenUsed)
        } else if self.revoked_at_ms.is_some() {
            Err(StoreError::TokenRevoked)
        } else if self.expires_at_ms <= now_ms {
            Err(StoreError::TokenExpired)
        } else {
            Ok(())
        }
    }
}

impl DeviceRecord {
    /// A device enrolling with `public_key` and token `token_id` at `now_ms`.
    pub fn enrolled(public_key: &[u8], name: &str, token_id: &str, now_ms: u64) -> Self {
        Self {
            device_id: device_id_of(public_key),
            name: name.into(),
            public_key_hex: hex::encode(public_key),
            enrolled_at_ms: now_ms,
            token_id: token_id.into(),
            revoked: false,
            revoked_at_ms: None,
            key_rotated_at_ms: None,
        }
    }
}

/// The device id of a public key: `dev-` and the first 16 hex digits of its SHA-256.
pub fn device_id_of(public_key: &[u8]) -> String {
    format!("dev-{}", &hex::encode(spa_proto::auth::sha256(public_key))[..16])
}

/// What the store keeps of a token: its SHA-256, never the token.
pub fn token_hash(token: &str) -> [u8; 32] {
    spa_proto::auth::sha256(token.as_bytes())
}

/// One incarnation of a coordinator serving devices on a shared store (times by the store's
/// clock, ms since the epoch): it serves in `[from_ms, until_ms)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub incarnation: u64,
    pub url: String,
    pub from_ms: u64,
    pub until_ms: u64,
}

/// The members a coordinator read as it renewed its own incarnation `mine`, and the store's
/// clock then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    pub now_ms: u64,
    pub mine: u64,
    pub members: Vec<Member>,
}
