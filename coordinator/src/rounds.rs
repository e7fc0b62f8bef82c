//! Federated rounds: the round loop and the state the device-facing Rounds service feeds.
//!
//! One round at a time, phase by phase ([`run_round`]):
//!
//! ```text
//! Selecting   wait for >= min_clients online devices (polled recently), pick <= max_clients
//! Training    devices fetch global version v, train locally, advertise SecAgg+ keys
//! ShareKeys   encrypted Shamir shares are routed between neighbours
//! MaskedInput devices upload masked, quantized updates (weight * (shared - global))
//! Unmask      survivors reveal shares; dropped devices' masks are removed
//! Committed   the decoded mean goes through the server strategy -> global version v+1
//! ```
//!
//! Every phase boundary is written to sled before the phase's requests go out, and a commit
//! writes checkpoint, round record and optimizer state in one transaction. The SecAgg+ server
//! state lives only in memory: a coordinator that restarts marks a round it finds mid-phase
//! as aborted ([`recover`]) and its run goes on with the next round from the last committed
//! version. The coordinator never holds an individual unmasked update: it sees masked lanes.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spa_aggregation::messages::{AdvertiseKeys, ShareKeysResponse, UnmaskResponse};
use spa_aggregation::strategy::{ServerOptimizer, StrategyConfig};
use spa_aggregation::{SecAggError, SecAggServer, SessionConfig};
use spa_model::side::ParamSet;
use spa_proto::auth::now_ms;
use spa_proto::secagg;
use spa_proto::v1;
// What a polling device is told to do: the wire type, kept per seat as it is sent.
use spa_proto::v1::poll_response::Task;
use tokio::sync::Notify;

use crate::config::RoundsSection;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    #[error("{0}")]
    Invalid(String),
    #[error("aborted: {0}")]
    Aborted(String),
}

const OPERATOR_ABORT: &str = "aborted by the operator";

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
    pub strategy: String,
    pub prox_mu: f64,
    /// Distributed discrete Gaussian DP: L2 clip of each update (0 = off) and the noise
    /// multiplier z (central sigma = z * clip, split over `min_clients` devices).
    #[serde(default)]
    pub dp_l2_clip: f64,
    #[serde(default)]
    pub dp_noise_multiplier: f64,
}

impl RoundPlan {
    /// Checks every field; the strategy must parse.
    pub fn validate(&self) -> Result<StrategyConfig, RoundError> {
        let bad = |m: &str| Err(RoundError::Invalid(m.into()));
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
        if !(self.prox_mu.is_finite() && self.prox_mu >= 0.0) {
            return bad("prox_mu must be a finite number >= 0");
        }
        if !(self.dp_l2_clip.is_finite() && self.dp_l2_clip >= 0.0 && self.dp_noise_multiplier.is_finite() && self.dp_noise_multiplier >= 0.0) {
            return bad("dp clip and noise multiplier must be finite numbers >= 0");
        }
        if self.dp_l2_clip == 0.0 && self.dp_noise_multiplier > 0.0 {
            return bad("dp noise needs a dp clip > 0");
        }
        Ok(StrategyConfig::from_name(&self.strategy, self.prox_mu as f32)?)
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
    /// Wall time of each phase, milliseconds.
    #[serde(default)]
    pub phase_ms: BTreeMap<String, u64>,
    /// Time the coordinator spent computing for this round (handling answers, closing
    /// phases, unmasking, decoding, applying the strategy, committing), milliseconds.
    #[serde(default)]
    pub coordinator_busy_ms: f64,
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

/// The round in progress.
struct Active {
    round_id: u64,
    state: RoundState,
    server: SecAggServer,
    seats: HashMap<String, u32>,
    /// This phase's request per seat that has not answered yet.
    tasks: BTreeMap<u32, Task>,
    answered: BTreeSet<u32>,
    /// Time spent in handlers for this round so far.
    busy: Duration,
}

/// After a commit: devices of the cohort still to evaluate the new version.
struct EvalNotice {
    round_id: u64,
    version: u64,
    pending: BTreeSet<String>,
}

/// Shared between the round loop and the Rounds/Admin services.
pub struct Rounds {
    pub store: Store,
    pub cfg: RoundsSection,
    active: Mutex<Option<Active>>,
    online: Mutex<HashMap<String, Instant>>,
    eval: Mutex<Option<EvalNotice>>,
    /// Devices of the last aborted round, told once to drop their session state.
    aborted: Mutex<Option<(u64, String, BTreeSet<String>)>>,
    /// An operator's abort of this round id, seen by the loop at its next check.
    abort_request: Mutex<Option<u64>>,
    /// Wakes the round loop (an answer arrived, a run was queued, an abort was asked).
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain inserts).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Test-only fault injection: `SPA_FAULT_CRASH_AT=<state>` kills the process (like SIGKILL,
/// no cleanup) right after that state was made durable.
fn fault_point(state: &str) {
    if std::env::var("SPA_FAULT_CRASH_AT").is_ok_and(|v| v == state) {
        eprintln!("fault injection: aborting at {state}");
        std::process::abort();
    }
}

impl Rounds {
    pub fn new(store: Store, cfg: RoundsSection) -> Arc<Self> {
        Arc::new(Self {
            store,
            cfg,
            active: Mutex::new(None),
            online: Mutex::new(HashMap::new()),
            eval: Mutex::new(None),
            aborted: Mutex::new(None),
            abort_request: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    /// Queues a run; the loop starts its rounds in order after any earlier run.
    pub fn start_run(&self, mut plan: RoundPlan) -> Result<u64, RoundError> {
        // μ is FedProx's: for any other strategy the run records 0, what devices are sent.
        if !matches!(plan.validate()?, StrategyConfig::FedProx { .. }) {
            plan.prox_mu = 0.0;
        }
        let run = RunRecord { run_id: self.store.next_run_id()?, plan, created_ms: now_ms(), rounds_started: 0, state: RunState::Active };
        self.store.put_run(&run)?;
        self.store.log("run.start", format!("run {} ({} rounds)", run.run_id, run.plan.rounds))?;
        self.wake.notify_one();
        Ok(run.run_id)
    }

    /// Aborts the round in progress if it is `round_id`, and cancels the rest of its run.
    pub fn abort(&self, round_id: u64) -> Result<bool, RoundError> {
        let rec = self.store.round(round_id)?.ok_or_else(|| RoundError::Invalid(format!("no round {round_id}")))?;
        if rec.state.is_final() {
            return Ok(false);
        }
        *lock(&self.abort_request) = Some(round_id);
        self.wake.notify_one();
        Ok(true)
    }

    /// A device polled: what should it do now?
    pub fn poll(&self, device: &str) -> Task {
        lock(&self.online).insert(device.to_string(), Instant::now());
        if let Some(a) = lock(&self.active).as_ref()
            && let Some(seat) = a.seats.get(device)
        {
            if let Some(t) = a.tasks.get(seat) {
                return t.clone();
            }
            return Task::Idle(v1::Idle { retry_after_ms: 200 });
        }
        if let Some((round_id, reason, devices)) = lock(&self.aborted).as_mut()
            && devices.remove(device)
        {
            return Task::Abort(v1::AbortTask { round_id: *round_id, reason: reason.clone() });
        }
        if let Some(e) = lock(&self.eval).as_ref()
            && e.pending.contains(device)
        {
            return Task::Evaluate(v1::EvaluateTask { round_id: e.round_id, global_version: e.version });
        }
        Task::Idle(v1::Idle { retry_after_ms: 1000 })
    }

    /// Runs `f` on the active round's SecAgg server if `device` holds a seat in `round_id`
    /// and the round is in `state`; marks the seat as answered.
    fn answer<R>(
        &self,
        device: &str,
        round_id: u64,
        client_id: u32,
        state: RoundState,
        f: impl FnOnce(&mut SecAggServer, u32) -> Result<R, SecAggError>,
    ) -> Result<R, AnswerError> {
        let mut g = lock(&self.active);
        let started = Instant::now();
        let a = g.as_mut().filter(|a| a.round_id == round_id).ok_or(AnswerError::NotActive(round_id))?;
        let seat = *a.seats.get(device).ok_or(AnswerError::NotInCohort)?;
        if client_id != seat {
            return Err(AnswerError::Invalid(format!("client id {client_id} is not this device's seat {seat}")));
        }
        if a.state != state {
            return Err(AnswerError::WrongPhase { expected: state.name(), actual: a.state.name() });
        }
        if a.answered.contains(&seat) {
            return Err(AnswerError::Invalid("already answered this phase".into()));
        }
        if !a.tasks.contains_key(&seat) {
            return Err(AnswerError::Invalid("no request of this phase is pending for this device (it dropped out earlier)".into()));
        }
        let r = match f(&mut a.server, seat) {
            Ok(r) => r,
            Err(e) => {
                // The SecAgg+ server refused it: this seat is out of the phase (like a dropout),
                // so the phase need not wait for its deadline.
                a.tasks.remove(&seat);
                drop(g);
                self.wake.notify_one();
                return Err(AnswerError::Invalid(e.to_string()));
            }
        };
        a.answered.insert(seat);
        a.tasks.remove(&seat);
        a.busy += started.elapsed();
        drop(g);
        self.wake.notify_one();
        Ok(r)
    }

    pub fn advertise(&self, device: &str, identity_pk: [u8; 32], m: AdvertiseKeys) -> Result<(), AnswerError> {
        let (round, id) = (m.round_id, m.client_id);
        self.answer(device, round, id, RoundState::Training, |s, _| s.handle_advertise(m, identity_pk))
    }

    pub fn share_keys(&self, device: &str, round_id: u64, m: ShareKeysResponse) -> Result<(), AnswerError> {
        let id = m.client_id;
        self.answer(device, round_id, id, RoundState::ShareKeys, |s, _| s.handle_share_keys(m))
    }

    /// A complete, verified masked vector.
    pub fn masked_input(&self, device: &str, round_id: u64, client_id: u32, lanes: &[u32]) -> Result<(), AnswerError> {
        self.answer(device, round_id, client_id, RoundState::MaskedInput, |s, seat| {
            for (k, c) in lanes.chunks(spa_aggregation::client::FRAME_LANES).enumerate() {
                s.handle_masked_chunk(seat, (k * spa_aggregation::client::FRAME_LANES) as u64, c)?;
            }
            Ok(())
        })
    }

    /// The number of lanes the active round expects from a seat (to bound an upload).
    pub fn expected_lanes(&self, round_id: u64) -> Option<u64> {
        lock(&self.active).as_ref().filter(|a| a.round_id == round_id).map(|a| a.server.config().m)
    }

    pub fn unmask(&self, device: &str, round_id: u64, m: UnmaskResponse) -> Result<(), AnswerError> {
        let id = m.client_id;
        self.answer(device, round_id, id, RoundState::Unmask, |s, _| s.handle_unmask(m))
    }

    /// A device's held-out metrics on a committed version.
    pub fn report_metrics(&self, device: &str, r: &v1::MetricsReport) -> Result<(), AnswerError> {
        let vals = [r.backbone_loss, r.personalized_loss, r.backbone_acc, r.personalized_acc];
        if vals.iter().any(|v| !v.is_finite() || *v < 0.0) || r.tokens == 0 {
            return Err(AnswerError::Invalid("metrics must be finite, >= 0, with tokens > 0".into()));
        }
        // The eval lock is held across the record's read-modify-write, so concurrent reports
        // do not overwrite each other, and a device leaves `pending` only once its metrics are
        // stored (the next round waits on `pending`).
        let mut g = lock(&self.eval);
        let e = g.as_mut().filter(|e| e.round_id == r.round_id && e.version == r.global_version).ok_or(AnswerError::NotActive(r.round_id))?;
        if !e.pending.contains(device) {
            return Err(AnswerError::NotInCohort);
        }
        let mut rec = self.store.round(r.round_id).map_err(|e| AnswerError::Invalid(e.to_string()))?.ok_or(AnswerError::NotActive(r.round_id))?;
        rec.metrics.insert(device.to_string(), DeviceMetrics {
            tokens: r.tokens,
            backbone_loss: r.backbone_loss,
            personalized_loss: r.personalized_loss,
            backbone_acc: r.backbone_acc,
            personalized_acc: r.personalized_acc,
        });
        rec.mean_metrics = Some(mean_metrics(rec.metrics.values()));
        self.store.put_round(&rec).map_err(|e| AnswerError::Invalid(e.to_string()))?;
        e.pending.remove(device);
        drop(g);
        self.wake.notify_one();
        Ok(())
    }

    fn online_devices(&self) -> Result<Vec<String>, RoundError> {
        let horizon = Duration::from_secs(self.cfg.online_secs);
        let online: Vec<String> = lock(&self.online).iter().filter(|(_, t)| t.elapsed() <= horizon).map(|(d, _)| d.clone()).collect();
        let mut out = Vec::new();
        for d in online {
            if self.store.device(&d)?.is_some_and(|r| !r.revoked) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Waits up to `timeout` for an answer or an abort; false when the timeout passed.
    async fn nap(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }

    fn check_abort(&self, round_id: u64) -> Result<(), RoundError> {
        if *lock(&self.abort_request) == Some(round_id) {
            return Err(RoundError::Aborted(OPERATOR_ABORT.into()));
        }
        Ok(())
    }
}

/// Why a device's answer was refused (mapped to gRPC statuses by the service).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("round {0} is not in progress")]
    NotActive(u64),
    #[error("this device is not in the round's cohort")]
    NotInCohort,
    #[error("round is in phase {actual}, not {expected}")]
    WrongPhase { expected: &'static str, actual: &'static str },
    #[error("{0}")]
    Invalid(String),
}

fn mean_metrics<'a>(ms: impl Iterator<Item = &'a DeviceMetrics>) -> DeviceMetrics {
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

/// DP encoding parameters for a round: granularity C / 2^14 and 24-bit lanes leave the summed
/// noise (z * 2^14 units per coordinate) hundreds of sigmas of headroom, and keep each device's
/// share of the noise within the exact sampler's range; the rotation seed is public, per round.
fn dp_params(plan: &RoundPlan, dim: usize, round_id: u64) -> Result<spa_aggregation::dp::DpParams, RoundError> {
    let clip = plan.dp_l2_clip as f32;
    let mut rotation_seed = [0u8; 32];
    rotation_seed[..8].copy_from_slice(&round_id.to_le_bytes());
    rotation_seed[8..16].copy_from_slice(&now_ms().to_le_bytes());
    Ok(spa_aggregation::dp::DpParams {
        dim: u32::try_from(dim).map_err(|_| RoundError::Invalid("too many parameters for DP".into()))?,
        l2_clip: clip,
        gamma: clip / 16384.0,
        noise_multiplier: plan.dp_noise_multiplier as f32,
        expected_clients: plan.min_clients,
        bits: 24,
        beta: (-0.5f32).exp(),
        rotation_seed,
    })
}

/// At start: a round found mid-phase cannot resume (its SecAgg+ secrets died with the
/// process), so it is marked aborted; its run continues with a fresh round.
pub fn recover(store: &Store) -> Result<usize, RoundError> {
    let mut n = 0;
    for mut r in store.rounds()? {
        if !r.state.is_final() {
            r.reason = Some(format!("coordinator restarted during {}", r.state.name()));
            r.state = RoundState::Aborted;
            r.finished_ms = Some(now_ms());
            store.put_round(&r)?;
            store.log("round.abort", format!("round {}: {}", r.round_id, r.reason.as_deref().unwrap_or("")))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The round loop: forever, the next round of the oldest active run.
pub async fn round_loop(rounds: Arc<Rounds>) {
    loop {
        match next_round(&rounds).await {
            Ok(true) => {}
            Ok(false) => rounds.nap(Duration::from_secs(1)).await,
            Err(e) => {
                tracing::error!("round loop: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Starts and runs one round if a run has rounds left; false if there was nothing to do.
async fn next_round(rounds: &Arc<Rounds>) -> Result<bool, RoundError> {
    let store = &rounds.store;
    let Some(mut run) = store.runs()?.into_iter().find(|r| r.state == RunState::Active) else {
        return Ok(false);
    };
    if run.rounds_started >= run.plan.rounds {
        run.state = RunState::Done;
        store.put_run(&run)?;
        return Ok(true);
    }
    run.rounds_started += 1;
    let now = now_ms();
    let mut rec = RoundRecord {
        round_id: store.next_round_id()?,
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
        phase_ms: BTreeMap::new(),
        coordinator_busy_ms: 0.0,
    };
    store.start_round(&run, &rec)?;
    store.log("round.start", format!("round {} ({} of run {})", rec.round_id, rec.index, run.run_id))?;
    let result = run_round(rounds, &mut rec).await;
    let cohort: BTreeSet<String> = rec.cohort.iter().cloned().collect();
    *lock(&rounds.active) = None;
    lock(&rounds.abort_request).take_if(|id| *id == rec.round_id);
    match result {
        Ok(()) => {
            tracing::info!(round = rec.round_id, version = ?rec.committed_version, "round committed");
            // Evaluation of the new version before the next round (devices poll idle meanwhile).
            let until = Instant::now() + Duration::from_secs(rounds.cfg.evaluate_secs);
            while Instant::now() < until && lock(&rounds.eval).as_ref().is_some_and(|e| !e.pending.is_empty()) {
                rounds.nap(Duration::from_millis(200)).await;
            }
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(round = rec.round_id, "round aborted: {reason}");
            rec.state = RoundState::Aborted;
            rec.reason = Some(reason.clone());
            rec.finished_ms = Some(now_ms());
            rec.updated_ms = now_ms();
            store.put_round(&rec)?;
            store.log("round.abort", format!("round {}: {reason}", rec.round_id))?;
            *lock(&rounds.aborted) = Some((rec.round_id, reason.clone(), cohort));
            if reason.contains(OPERATOR_ABORT)
                && let Some(mut run) = store.runs()?.into_iter().find(|r| r.run_id == rec.run_id) {
                    run.state = RunState::Cancelled;
                    store.put_run(&run)?;
                }
        }
    }
    Ok(true)
}

/// Moves the round to `state`, durably, before that phase's requests go out.
fn enter(rounds: &Rounds, rec: &mut RoundRecord, state: RoundState, tasks: BTreeMap<u32, Task>) -> Result<(), RoundError> {
    rec.state = state;
    rec.updated_ms = now_ms();
    rounds.store.put_round(rec)?;
    fault_point(state.name());
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Aborted("no active round".into()))?;
    a.state = state;
    a.answered.clear();
    a.tasks = tasks;
    Ok(())
}

/// Waits until every seat with a request answered, the deadline passed, or an abort.
async fn collect(rounds: &Rounds, rec: &mut RoundRecord, deadline: Instant) -> Result<(), RoundError> {
    let started = Instant::now();
    loop {
        rounds.check_abort(rec.round_id)?;
        let (waiting, answered) = {
            let g = lock(&rounds.active);
            let a = g.as_ref().ok_or_else(|| RoundError::Aborted("no active round".into()))?;
            (a.tasks.len(), a.answered.len())
        };
        if waiting == 0 || Instant::now() >= deadline {
            rec.answered.insert(rec.state.name().to_string(), answered);
            rec.phase_ms.insert(rec.state.name().to_string(), started.elapsed().as_millis() as u64);
            return Ok(());
        }
        rounds.nap(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

fn with_server<R>(rounds: &Rounds, f: impl FnOnce(&mut SecAggServer) -> Result<R, SecAggError>) -> Result<R, RoundError> {
    let mut g = lock(&rounds.active);
    let started = Instant::now();
    let a = g.as_mut().ok_or_else(|| RoundError::Aborted("no active round".into()))?;
    let r = f(&mut a.server);
    a.busy += started.elapsed();
    Ok(r?)
}

fn busy(rounds: &Rounds) -> Duration {
    lock(&rounds.active).as_ref().map_or(Duration::ZERO, |a| a.busy)
}

/// One round, phase by phase. On error the caller records the abort.
async fn run_round(rounds: &Arc<Rounds>, rec: &mut RoundRecord) -> Result<(), RoundError> {
    let store = &rounds.store;
    let plan = rec.plan.clone();
    let strategy = plan.validate()?;
    let round_id = rec.round_id;

    // ---- Selecting ------------------------------------------------------------------
    let selecting = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(plan.deadline_secs as u64);
    let mut enough_since: Option<Instant> = None;
    let mut cohort = loop {
        let online = rounds.online_devices()?;
        if online.len() >= plan.min_clients as usize {
            let since = *enough_since.get_or_insert_with(Instant::now);
            if online.len() >= plan.max_clients as usize || since.elapsed() >= Duration::from_secs(rounds.cfg.selection_grace_secs) {
                break online;
            }
        }
        rounds.check_abort(round_id)?;
        if Instant::now() >= deadline {
            return Err(RoundError::Aborted(format!("only {} of the {} devices needed are online", online.len(), plan.min_clients)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    rec.phase_ms.insert("selecting".into(), selecting.elapsed().as_millis() as u64);
    // Over-selection: any online device may be picked; a random subset when there are more.
    if cohort.len() > plan.max_clients as usize {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(round_id ^ now_ms());
        for i in (1..cohort.len()).rev() {
            cohort.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        cohort.truncate(plan.max_clients as usize);
        cohort.sort();
    }
    let base_version = store.latest_checkpoint_version()?.ok_or_else(|| RoundError::Invalid("no global checkpoint".into()))?;
    let global_bytes = store.checkpoint(base_version)?.ok_or_else(|| RoundError::Invalid(format!("checkpoint {base_version} missing")))?;
    let global = ParamSet::from_safetensors(&global_bytes).map_err(|e| RoundError::Invalid(format!("checkpoint {base_version}: {e}")))?;
    let mut flat = global.flatten();
    let n = cohort.len() as u32;
    let mut session = SessionConfig::recommended(round_id, base_version, n, flat.len() as u64 + 1)?;
    let quant_bits = session.quant_params().map(|q| q.bits).unwrap_or(16);
    session.encoding = spa_aggregation::Encoding::SignedTwosComplement { quant_bits, clip: rounds.cfg.clip, w_max: rounds.cfg.w_max };
    if plan.dp_l2_clip > 0.0 {
        let dp = dp_params(&plan, flat.len(), round_id)?;
        session.m = dp.lanes() as u64;
        session.encoding = spa_aggregation::Encoding::DistributedDiscreteGaussian(dp);
    }
    session.deadlines.advertise_ms = plan.deadline_secs as u64 * 1000;
    session.validate()?;
    rec.cohort = cohort.clone();
    rec.base_version = base_version;
    rec.shared_params = flat.len() as u64;
    let seats: HashMap<String, u32> = cohort.iter().enumerate().map(|(i, d)| (d.clone(), i as u32 + 1)).collect();
    *lock(&rounds.active) = Some(Active {
        round_id,
        state: RoundState::Selecting,
        server: SecAggServer::new(session.clone())?,
        seats: seats.clone(),
        tasks: BTreeMap::new(),
        answered: BTreeSet::new(),
        busy: Duration::ZERO,
    });

    // ---- Training + key advertisement ----------------------------------------------
    let config_json = secagg::config_to_json(&session);
    let train_deadline = Instant::now() + Duration::from_secs(plan.deadline_secs as u64);
    let tasks = seats
        .values()
        .map(|&seat| {
            (seat, Task::Train(v1::TrainTask {
                round_id,
                global_version: base_version,
                session_config_json: config_json.clone(),
                client_id: seat,
                local_epochs: plan.local_epochs,
                lr: plan.lr,
                prox_mu: strategy.client_proximal_mu() as f64,
                seed: round_id,
                deadline_ms: now_ms() + plan.deadline_secs as u64 * 1000,
            }))
        })
        .collect();
    enter(rounds, rec, RoundState::Training, tasks)?;
    collect(rounds, rec, train_deadline).await?;

    // ---- ShareKeys -------------------------------------------------------------------
    let reqs = with_server(rounds, |s| s.close_advertise())?;
    let tasks = reqs.iter().map(|(seat, r)| (*seat, Task::ShareKeys(secagg::share_keys_task(round_id, r)))).collect();
    let phase = Duration::from_secs(rounds.cfg.phase_timeout_secs);
    enter(rounds, rec, RoundState::ShareKeys, tasks)?;
    collect(rounds, rec, Instant::now() + phase).await?;

    // ---- MaskedInput -----------------------------------------------------------------
    let reqs = with_server(rounds, |s| s.close_share_keys())?;
    let tasks = reqs.iter().map(|(seat, r)| (*seat, Task::MaskedInput(secagg::masked_input_task(round_id, &r.shares)))).collect();
    enter(rounds, rec, RoundState::MaskedInput, tasks)?;
    collect(rounds, rec, Instant::now() + phase).await?;

    // ---- Unmask ----------------------------------------------------------------------
    let reqs = with_server(rounds, |s| s.close_masked_inputs())?;
    if reqs.len() < plan.min_clients as usize {
        return Err(RoundError::Aborted(format!("{} masked inputs arrived, the plan needs {}", reqs.len(), plan.min_clients)));
    }
    let tasks = reqs.iter().map(|(seat, r)| (*seat, Task::Unmask(secagg::unmask_task(round_id, r)))).collect();
    enter(rounds, rec, RoundState::Unmask, tasks)?;
    collect(rounds, rec, Instant::now() + phase).await?;
    // Mask removal is the heavy step: run it on a blocking thread (rayon inside) on a copy of
    // the server state, so the lock that device polls take is not held meanwhile.
    let mut server = lock(&rounds.active).as_ref().ok_or_else(|| RoundError::Aborted("no active round".into()))?.server.clone();
    let unmask_started = Instant::now();
    let out = tokio::task::spawn_blocking(move || server.close_unmask())
        .await
        .map_err(|e| RoundError::Invalid(format!("unmask task: {e}")))??;
    if let Some(a) = lock(&rounds.active).as_mut() {
        a.busy += unmask_started.elapsed();
    }

    // ---- Commit ----------------------------------------------------------------------
    let commit_started = Instant::now();
    let (mean_delta, total_w) = match &session.encoding {
        spa_aggregation::Encoding::SignedTwosComplement { .. } => {
            session.quant_params().ok_or_else(|| RoundError::Invalid("no quantization".into()))?.decode_mean(&out.sum)?
        }
        // DP updates are unweighted: the mean is the noisy sum over the contributors.
        spa_aggregation::Encoding::DistributedDiscreteGaussian(dp) => {
            let k = out.contributors.len() as f32;
            (dp.decode_sum(&out.sum)?.into_iter().map(|x| x / k).collect(), out.contributors.len() as u32)
        }
    };
    let mut optimizer = match store.optimizer()? {
        Some(o) if o.config == strategy => o,
        _ => ServerOptimizer::new(strategy)?,
    };
    optimizer.apply(&mut flat, &mean_delta)?;
    let new_global = global.with_flat(&flat).map_err(|e| RoundError::Invalid(e.to_string()))?;
    let version = base_version + 1;
    rec.contributors = out.contributors.iter().filter_map(|&s| cohort.get(s as usize - 1).cloned()).collect();
    rec.state = RoundState::Committed;
    rec.committed_version = Some(version);
    rec.finished_ms = Some(now_ms());
    rec.updated_ms = now_ms();
    let bytes = new_global.to_safetensors();
    // The commit's own write is measured up to here; the record cannot contain its own time.
    rec.coordinator_busy_ms = (busy(rounds) + commit_started.elapsed()).as_secs_f64() * 1000.0;
    store.commit_round(version, &bytes, rec, &optimizer)?;
    fault_point("committed");
    tracing::info!(round = round_id, version, contributors = out.contributors.len(), total_weight = total_w, "global version committed");
    *lock(&rounds.eval) = Some(EvalNotice { round_id, version, pending: cohort.iter().cloned().collect() });
    Ok(())
}
