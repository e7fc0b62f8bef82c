//! The state the round loop and the device-facing handlers share ([`Rounds`]), and how a
//! device's answer to a phase is checked and handed to the SecAgg+ server.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spa_proto::auth::now_ms;
use spa_proto::v1;
use spa_proto::v1::poll_response::Task;
use tokio::sync::Notify;

use super::RoundError;
use super::shards::ShardSet;
use crate::aggregator::{ShardCall, ShardHost};
use crate::config::RoundsSection;
use crate::lock;
use crate::store::records::{DeviceMetrics, DropReason, Dropout, Lease, RoundPlan, RoundState};
use crate::store::{Store, StoreError};

/// The round in progress. Seats are the cohort's positions (seat `i + 1` is `cohort[i]`);
/// inside its shard's SecAgg+ session a device is that shard's local client id.
pub(super) struct Active {
    pub round_id: u64,
    pub state: RoundState,
    pub agg: ShardSet,
    pub seats: HashMap<String, u32>,
    /// This phase's request per seat that has not answered yet.
    pub tasks: BTreeMap<u32, Task>,
    pub answered: BTreeSet<u32>,
    /// Seats that left this round, and why; moved into the record as each phase closes.
    pub dropped: Vec<(u32, Dropout)>,
    /// Time spent in handlers for this round so far.
    pub busy: Duration,
}

impl Active {
    /// Takes `seat` out of this phase with its reason; false if it had no request pending.
    fn leave(&mut self, seat: u32, why: Dropout) -> bool {
        let pending = self.tasks.remove(&seat).is_some();
        if pending {
            self.dropped.push((seat, why));
        }
        pending
    }
}

/// The leadership lease while this process holds it: since when (ms) it has held the term,
/// and when it last renewed it (round calls are served only while that renewal is recent).
struct Held {
    lease: Lease,
    since_ms: u64,
    renewed: Instant,
}

/// After a commit: devices of the cohort still to evaluate the new version.
pub(super) struct EvalNotice {
    pub round_id: u64,
    pub version: u64,
    pub pending: BTreeSet<String>,
}

/// Shared between the round loop and the Rounds/Admin services.
pub struct Rounds {
    pub store: Store,
    pub cfg: RoundsSection,
    pub(super) active: Mutex<Option<Active>>,
    online: Mutex<HashMap<String, Instant>>,
    pub(super) eval: Mutex<Option<EvalNotice>>,
    /// Devices of the last aborted round, told once to drop their session state.
    pub(super) aborted: Mutex<Option<(u64, String, BTreeSet<String>)>>,
    /// An operator's abort of this round id, seen by the loop at its next check.
    pub(super) abort_request: Mutex<Option<u64>>,
    /// Wakes the round loop (an answer arrived, a run was queued, an abort was asked).
    wake: Notify,
    /// Who this process is to the leadership lease, where devices reach it, and the lease
    /// while it holds it.
    pub(super) holder: String,
    pub(super) url: String,
    lease: Mutex<Option<Held>>,
    /// Where shards run: this process, or the configured aggregators.
    pub(super) hosts: Vec<ShardHost>,
}

impl Rounds {
    /// `hosts`: where shards run (none: this process).
    pub fn new(store: Store, cfg: RoundsSection, url: String, mut hosts: Vec<ShardHost>) -> Arc<Self> {
        if hosts.is_empty() {
            hosts.push(ShardHost::Local(Arc::new(crate::aggregator::ShardTable::new(0))));
        }
        Arc::new(Self {
            store,
            cfg,
            active: Mutex::new(None),
            online: Mutex::new(HashMap::new()),
            eval: Mutex::new(None),
            aborted: Mutex::new(None),
            abort_request: Mutex::new(None),
            wake: Notify::new(),
            holder: format!("{}-{}", std::process::id(), hex::encode(spa_proto::auth::random_bytes::<6>())),
            url,
            lease: Mutex::new(None),
            hosts,
        })
    }

    /// Queues a run; the loop starts its rounds in order after any earlier run.
    pub async fn start_run(&self, mut plan: RoundPlan) -> Result<u64, RoundError> {
        plan.validate()?;
        plan.prox_mu = plan.strategy.client_mu(plan.prox_mu);
        let run = self.store.create_run(&plan, now_ms()).await?;
        self.wake.notify_one();
        Ok(run.run_id)
    }

    /// Aborts the round in progress if it is `round_id`, and cancels the rest of its run.
    pub async fn abort(&self, round_id: u64) -> Result<bool, RoundError> {
        let rec = self.store.round(round_id).await?.ok_or(RoundError::NoSuchRound(round_id))?;
        if rec.state.is_final() {
            return Ok(false);
        }
        *lock(&self.abort_request) = Some(round_id);
        self.wake.notify_one();
        Ok(true)
    }

    /// A device polled: what should it do now? (Its next poll after an Idle: [`retry_after`].)
    pub fn poll(&self, device: &str) -> Task {
        lock(&self.online).insert(device.to_string(), Instant::now());
        if let Some(a) = lock(&self.active).as_ref()
            && let Some(seat) = a.seats.get(device)
        {
            if let Some(t) = a.tasks.get(seat) {
                return t.clone();
            }
            return Task::Idle(v1::Idle { retry_after_ms: retry_after(200, a.seats.len()) });
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
        let online = lock(&self.online).len();
        Task::Idle(v1::Idle { retry_after_ms: retry_after(1000, online) })
    }

    /// Forwards a device's answer to its shard's host, if it holds a seat in `round_id`
    /// whose request of `state` is pending and `client_id` is its id in its shard; the seat
    /// is answered once the host took it. A refusal takes the seat out of the phase; a host
    /// that is gone takes its whole shard out of the round.
    async fn answer(&self, device: &str, round_id: u64, client_id: u32, state: RoundState, call: ShardCall) -> Result<(), AnswerError> {
        let (host, shard, seat) = {
            let mut g = lock(&self.active);
            let a = g.as_mut().filter(|a| a.round_id == round_id).ok_or(AnswerError::NotActive(round_id))?;
            let seat = *a.seats.get(device).ok_or(AnswerError::NotInCohort)?;
            let (shard, local) = a.agg.seat(seat).ok_or(AnswerError::NotInCohort)?;
            if client_id != local {
                return Err(AnswerError::Invalid(format!("client id {client_id} is not this device's seat {local}")));
            }
            if a.state != state {
                return Err(AnswerError::WrongPhase { expected: state.name(), actual: a.state.name() });
            }
            // Reserved while the host takes it: a second copy meanwhile is refused.
            if a.answered.contains(&seat) {
                return Err(AnswerError::Invalid("already answered this phase".into()));
            }
            if !a.tasks.contains_key(&seat) {
                return Err(AnswerError::Invalid("no request of this phase is pending for this device (it dropped out earlier)".into()));
            }
            if let Some(why) = &a.agg.slots[shard].failed {
                return Err(AnswerError::Invalid(format!("this device's shard left the round: {why}")));
            }
            a.answered.insert(seat);
            (a.agg.slots[shard].host.clone(), shard, seat)
        };
        let started = Instant::now();
        let r = host.send((round_id, shard as u32), call).await;
        let mut g = lock(&self.active);
        // The phase may have closed meanwhile: what the shard took before its close counts
        // there, and this seat's request of the next phase must stay.
        let Some(a) = g.as_mut().filter(|a| a.round_id == round_id && a.state == state) else {
            return r.map_err(|e| AnswerError::Refused(e.message().to_string()));
        };
        // A remote host's time is its own, not this process's.
        if matches!(host, ShardHost::Local(_)) {
            a.busy += started.elapsed();
        }
        let out = match r {
            Ok(()) => {
                a.tasks.remove(&seat);
                Ok(())
            }
            Err(e) if host_lost(e.code()) => {
                // The shard is out of the round: none of its devices is asked anything more.
                a.answered.remove(&seat);
                let why = format!("its aggregator ({}) is gone: {}", host.name(), e.message());
                tracing::warn!(shard, "{why}");
                a.agg.fail(shard, why.clone());
                for m in a.agg.slots[shard].members.clone() {
                    a.leave(m, Dropout { phase: state, reason: DropReason::ShardFailed(why.clone()) });
                }
                Err(AnswerError::Unavailable(why))
            }
            Err(e) => {
                a.answered.remove(&seat);
                a.leave(seat, Dropout { phase: state, reason: DropReason::Refused(e.message().to_string()) });
                Err(AnswerError::Refused(e.message().to_string()))
            }
        };
        drop(g);
        self.wake.notify_one();
        out
    }

    pub async fn advertise(&self, device: &str, identity_pk: [u8; 32], m: v1::AdvertiseKeysMsg) -> Result<(), AnswerError> {
        let (round, id) = (m.round_id, m.client_id);
        self.answer(device, round, id, RoundState::Training, ShardCall::Advertise { identity_pk: identity_pk.to_vec(), msg: m }).await
    }

    pub async fn share_keys(&self, device: &str, m: v1::ShareKeysMsg) -> Result<(), AnswerError> {
        let (round, id) = (m.round_id, m.client_id);
        self.answer(device, round, id, RoundState::ShareKeys, ShardCall::ShareKeys(m)).await
    }

    /// A complete, verified masked vector (u32 little-endian bytes).
    pub async fn masked_input(&self, device: &str, round_id: u64, client_id: u32, bytes: Vec<u8>) -> Result<(), AnswerError> {
        self.answer(device, round_id, client_id, RoundState::MaskedInput, ShardCall::Masked { client_id, bytes }).await
    }

    /// A device's masked upload broke (cut off, truncated, not matching its hash): its seat
    /// leaves the phase now rather than at the deadline.
    pub fn broken_upload(&self, device: &str, round_id: u64, why: &str) {
        let mut g = lock(&self.active);
        let Some(a) = g.as_mut().filter(|a| a.round_id == round_id && a.state == RoundState::MaskedInput) else {
            return;
        };
        let Some(&seat) = a.seats.get(device) else {
            return;
        };
        if a.leave(seat, Dropout { phase: RoundState::MaskedInput, reason: DropReason::BrokenUpload(why.chars().take(200).collect()) }) {
            drop(g);
            self.wake.notify_one();
        }
    }

    /// Whether `device` holds a seat in the active round `round_id`.
    pub fn holds_seat(&self, device: &str, round_id: u64) -> bool {
        lock(&self.active).as_ref().is_some_and(|a| a.round_id == round_id && a.seats.contains_key(device))
    }

    /// The number of lanes the active round expects from a seat (to bound an upload).
    pub fn expected_lanes(&self, round_id: u64) -> Option<u64> {
        lock(&self.active).as_ref().filter(|a| a.round_id == round_id).map(|a| a.agg.m)
    }

    pub async fn unmask(&self, device: &str, m: v1::UnmaskMsg) -> Result<(), AnswerError> {
        let (round, id) = (m.round_id, m.client_id);
        self.answer(device, round, id, RoundState::Unmask, ShardCall::Unmask(m)).await
    }

    /// A device's held-out metrics on a committed version.
    pub async fn report_metrics(&self, device: &str, r: &v1::MetricsReport) -> Result<(), AnswerError> {
        let vals = [r.backbone_loss, r.personalized_loss, r.backbone_acc, r.personalized_acc];
        if vals.iter().any(|v| !v.is_finite() || *v < 0.0) || r.tokens == 0 {
            return Err(AnswerError::Invalid("metrics must be finite, >= 0, with tokens > 0".into()));
        }
        let expected = |e: &EvalNotice| e.round_id == r.round_id && e.version == r.global_version;
        match lock(&self.eval).as_ref().filter(|e| expected(e)) {
            None => return Err(AnswerError::NotActive(r.round_id)),
            Some(e) if !e.pending.contains(device) => return Err(AnswerError::NotInCohort),
            Some(_) => {}
        }
        // The store changes the record atomically; no lock is held across its write.
        let m = DeviceMetrics {
            tokens: r.tokens,
            backbone_loss: r.backbone_loss,
            personalized_loss: r.personalized_loss,
            backbone_acc: r.backbone_acc,
            personalized_acc: r.personalized_acc,
        };
        if !self.store.add_round_metrics(r.round_id, device, m).await? {
            return Err(AnswerError::NotActive(r.round_id));
        }
        // A device leaves `pending` only once its metrics are stored (the next round waits on
        // `pending`), and only from the evaluation it reported to.
        if let Some(e) = lock(&self.eval).as_mut().filter(|e| expected(e)) {
            e.pending.remove(device);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Devices that polled within `online_secs`.
    fn polled_recently(&self) -> Vec<String> {
        let horizon = Duration::from_secs(self.cfg.online_secs);
        lock(&self.online).iter().filter(|(_, t)| t.elapsed() <= horizon).map(|(d, _)| d.clone()).collect()
    }

    /// Devices that polled recently and are not revoked, sorted: who may be selected.
    pub(super) async fn online_devices(&self) -> Result<Vec<String>, RoundError> {
        let mut out = Vec::new();
        for d in self.polled_recently() {
            if self.store.device(&d).await?.is_some_and(|r| !r.revoked) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// How many devices polled within `online_secs` (a metric).
    pub fn online_count(&self) -> usize {
        self.polled_recently().len()
    }

    /// The leadership lease, while this process holds it.
    pub fn lease(&self) -> Option<Lease> {
        lock(&self.lease).as_ref().map(|h| h.lease.clone())
    }

    /// Where devices reach this process.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Since when (ms) this process has led without a break, while its last renewal is under
    /// 3/4 of the lease's lifetime old (a paused leader stops serving round calls before its
    /// successor can take the lease); None when it does not lead.
    pub fn leading_since(&self) -> Option<u64> {
        let ttl = std::time::Duration::from_secs(self.cfg.leader_lease_secs);
        lock(&self.lease).as_ref().and_then(|h| (h.renewed.elapsed() < ttl * 3 / 4).then_some(h.since_ms))
    }

    /// Records the lease as last taken or renewed by a call that began at `asked` (None: lost
    /// or not held); a change is logged and wakes the loop.
    pub(super) fn set_lease(&self, lease: Option<Lease>, asked: std::time::Instant) {
        let mut g = lock(&self.lease);
        let was = g.as_ref().map(|h| (h.lease.term, h.since_ms));
        if was.map(|(term, _)| term) != lease.as_ref().map(|l| l.term) {
            match &lease {
                Some(l) => tracing::info!(term = l.term, holder = %l.holder, "leading: this coordinator runs the rounds"),
                None => tracing::warn!("not leading: another coordinator runs the rounds"),
            }
            self.wake.notify_one();
        }
        *g = lease.map(|lease| {
            // A renewal of the same term keeps the date the term was taken.
            let since_ms = was.filter(|(term, _)| *term == lease.term).map_or_else(spa_proto::auth::now_ms, |(_, since)| since);
            Held { lease, since_ms, renewed: asked }
        });
    }

    /// Waits up to `timeout` for an answer or an abort.
    pub(super) async fn nap(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }

    pub(super) fn check_abort(&self, round_id: u64) -> Result<(), RoundError> {
        if *lock(&self.abort_request) == Some(round_id) {
            return Err(RoundError::AbortedByOperator);
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
    /// The shard's host refused the answer (its message says why, `secure aggregation: ...`
    /// for the SecAgg+ machine); the seat is out of the round.
    #[error("answer refused: {0}")]
    Refused(String),
    /// The aggregator running this device's shard is gone; the shard is out of the round.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether a host's error means the host (and the shard it held) is gone rather than that
/// it refused this message: unreachable, timed out, or restarted without the shard.
fn host_lost(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unavailable | Cancelled | DeadlineExceeded | Unknown | NotFound | Internal)
}

/// How long a device waits before its next poll: `base_ms`, longer with many `devices`, so
/// that polls stay near a thousand a second in all (each is a signed call, and its nonce sits
/// in the replay cache for the clock window: at 5 polls a second, 1000 devices would fill a
/// million-entry cache in under four minutes).
fn retry_after(base_ms: u32, devices: usize) -> u32 {
    base_ms.max(devices.min(60_000) as u32)
}
