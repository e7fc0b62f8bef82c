//! The round loop: forever, the next round of the oldest active run, one phase after the
//! other ([`run_round`] reads top to bottom). Each phase is made durable ([`enter`]) before
//! its requests go out, then waits for answers ([`collect`]).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spa_aggregation::shards;
use spa_aggregation::strategy::{ServerOptimizer, StrategyConfig};
use spa_aggregation::{Encoding, SessionConfig};
use spa_model::side::ParamSet;
use spa_proto::auth::now_ms;
use spa_proto::v1;
use spa_proto::v1::ShardPhase;
use spa_proto::v1::poll_response::Task;

use super::RoundError;
use super::closes::{close_shards, remove_masks};
use super::shards::ShardSet;
use super::state::{Active, EvalNotice, Rounds};
use crate::metrics::{METRICS, Outcome, Phase, Reason};
use crate::store::Store;
use crate::store::records::{DropReason, Dropout, Lease, RoundRecord, RoundState, RunState, ShardSummary};
use crate::{AbortOnDrop, lock};

/// Crash points for the restart tests: with the `fault-injection` feature,
/// `SPA_FAULT_CRASH_AT=<state>` kills the process (like SIGKILL, no cleanup) right after that
/// state was made durable. Without the feature this is nothing. (`SPA_FAULT_PAUSE_AT=commit`:
/// [`fault_pause`].)
fn fault_point(state: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("SPA_FAULT_CRASH_AT").is_ok_and(|v| v == state) {
        eprintln!("fault injection: aborting at {state}");
        std::process::abort();
    }
    let _ = state;
}

/// With the `fault-injection` feature and `SPA_FAULT_PAUSE_AT=<point>`: says so on stderr and
/// waits 3 s there, a window for a test to freeze the process (SIGSTOP) past its lease.
async fn fault_pause(point: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("SPA_FAULT_PAUSE_AT").is_ok_and(|v| v == point) {
        eprintln!("fault injection: pausing at {point}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let _ = point;
}

/// On taking the lease (at start, on one machine), and after the store failed under a round:
/// a round found mid-phase cannot resume (its SecAgg+ secrets died with the process that ran
/// it, or were dropped with the failed round), so it is marked aborted with `cause`; its run
/// continues with a fresh round.
async fn recover(store: &Store, lease: &Lease, cause: &str) -> Result<usize, RoundError> {
    let mut n = 0;
    for mut r in store.rounds().await? {
        if !r.state.is_final() {
            r.reason = Some(format!("{cause} during {}", r.state.name()));
            r.state = RoundState::Aborted;
            r.finished_ms = Some(now_ms());
            store.abort_round(lease, &r).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// The round loop: while this coordinator holds the leadership lease (on sled, always), the
/// next round of the oldest active run.
pub async fn round_loop(rounds: Arc<Rounds>) {
    let _keeper = AbortOnDrop(tokio::spawn(keep_lease(rounds.clone())));
    let mut recovered = None;
    // Why the last round failed, while its record may still be mid-phase.
    let mut failed: Option<String> = None;
    loop {
        let Some(lease) = rounds.lease() else {
            recovered = None;
            rounds.nap(Duration::from_secs(1)).await;
            continue;
        };
        if recovered != Some(lease.term) || failed.is_some() {
            let cause = match &failed {
                Some(e) => format!("the round failed ({e})"),
                None => "the coordinator restarted or leadership changed".to_string(),
            };
            match recover(&rounds.store, &lease, &cause).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!("{n} round(s) left mid-phase were marked aborted ({cause})"),
                Err(e) => {
                    tracing::error!("round loop: recovering interrupted rounds: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            recovered = Some(lease.term);
            failed = None;
        }
        match next_round(&rounds, &lease).await {
            Ok(true) => {}
            Ok(false) => rounds.nap(Duration::from_secs(1)).await,
            Err(e) => {
                // The store failed under a round (it may not even hold the round's abort): run
                // the recovery again before the next one, so no round is left mid-phase.
                tracing::error!("round loop: {e}");
                failed = Some(e.to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes or renews the leadership lease three times per lifetime, for as long as the loop runs.
async fn keep_lease(rounds: Arc<Rounds>) {
    let ttl_ms = rounds.cfg.leader_lease_secs * 1000;
    loop {
        let asked = std::time::Instant::now();
        let lease = rounds.store.lead(&rounds.holder, &rounds.url, ttl_ms).await.unwrap_or_else(|e| {
            tracing::warn!("leadership lease: {e}");
            None
        });
        rounds.set_lease(lease, asked);
        tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
    }
}

/// Starts and runs one round if a run has rounds left; false if there was nothing to do.
async fn next_round(rounds: &Arc<Rounds>, lease: &Lease) -> Result<bool, RoundError> {
    let store = &rounds.store;
    let Some(mut run) = store.runs().await?.into_iter().find(|r| r.state == RunState::Active) else {
        return Ok(false);
    };
    if run.rounds_started >= run.plan.rounds {
        run.state = RunState::Done;
        store.put_run(lease, &run).await?;
        return Ok(true);
    }
    run.rounds_started += 1;
    let mut rec = store.start_round(lease, &run).await?;
    // Every log line of the round carries its id (and, from `enter` on, its phase).
    let span = tracing::info_span!("round", round = rec.round_id, run = run.run_id);
    let result = tracing::Instrument::instrument(run_round(rounds, lease, &mut rec), span).await;
    if let Some(a) = lock(&rounds.active).take() {
        // Shards that did not release (an abort) are forgotten where they ran.
        tokio::spawn(async move {
            for (s, host) in a.agg.running() {
                host.drop_shard(a.agg.key(s)).await;
            }
        });
    }
    lock(&rounds.abort_request).take_if(|id| *id == rec.round_id);
    let outcome = if result.is_ok() { "committed" } else { "aborted" };
    METRICS.rounds.get_or_create(&Outcome { outcome: outcome.into() }).inc();
    match result {
        Ok(()) => {
            tracing::info!(round = rec.round_id, version = ?rec.committed_version, "round committed");
            wait_for_evaluations(rounds).await;
        }
        Err(e) => record_abort(rounds, lease, &mut rec, e).await?,
    }
    Ok(true)
}

/// Evaluation of the new version before the next round (devices poll idle meanwhile).
async fn wait_for_evaluations(rounds: &Rounds) {
    let until = Instant::now() + Duration::from_secs(rounds.cfg.evaluate_secs);
    while Instant::now() < until && lock(&rounds.eval).as_ref().is_some_and(|e| !e.pending.is_empty()) {
        rounds.nap(Duration::from_millis(200)).await;
    }
}

/// Writes down why `rec` ended without a commit, tells its cohort, and cancels the rest of
/// the run when an operator asked for it.
async fn record_abort(rounds: &Rounds, lease: &Lease, rec: &mut RoundRecord, e: RoundError) -> Result<(), RoundError> {
    let store = &rounds.store;
    let reason = e.to_string();
    tracing::warn!(round = rec.round_id, "round aborted: {reason}");
    rec.state = RoundState::Aborted;
    rec.reason = Some(reason.clone());
    rec.finished_ms = Some(now_ms());
    rec.updated_ms = now_ms();
    store.abort_round(lease, rec).await?;
    let cohort: BTreeSet<String> = rec.cohort.iter().cloned().collect();
    *lock(&rounds.aborted) = Some((rec.round_id, reason, cohort));
    if matches!(e, RoundError::AbortedByOperator)
        && let Some(mut run) = store.runs().await?.into_iter().find(|r| r.run_id == rec.run_id)
    {
        run.state = RunState::Cancelled;
        store.put_run(lease, &run).await?;
    }
    Ok(())
}

/// One round, phase by phase. On error the caller records the abort.
async fn run_round(rounds: &Rounds, lease: &Lease, rec: &mut RoundRecord) -> Result<(), RoundError> {
    let strategy = rec.plan.validate()?;
    let cohort = select(rounds, rec).await?;
    let (global, session, train) = open_session(rounds, lease, rec, cohort, &strategy).await?;
    let phase = Duration::from_secs(rounds.cfg.phase_timeout_secs);

    // Training + key advertisement: devices fetch the global version, train, advertise.
    let train_deadline = Instant::now() + Duration::from_secs(rec.plan.deadline_secs as u64);
    enter(rounds, lease, rec, RoundState::Training, train).await?;
    collect(rounds, rec, train_deadline).await?;

    // ShareKeys: encrypted Shamir shares routed between neighbours.
    let tasks = close_shards(rounds, rec, ShardPhase::Advertise).await?;
    enter(rounds, lease, rec, RoundState::ShareKeys, tasks).await?;
    collect(rounds, rec, Instant::now() + phase).await?;

    // MaskedInput: masked, quantized updates uploaded.
    let tasks = close_shards(rounds, rec, ShardPhase::ShareKeys).await?;
    enter(rounds, lease, rec, RoundState::MaskedInput, tasks).await?;
    collect(rounds, rec, Instant::now() + phase).await?;

    // Unmask: survivors reveal shares; dropped devices' masks are removed (a shard below its
    // floor fails at this close, before any of its shares are asked for).
    let tasks = close_shards(rounds, rec, ShardPhase::MaskedInput).await?;
    enough(rec, tasks.len(), "masked inputs arrived")?;
    enter(rounds, lease, rec, RoundState::Unmask, tasks).await?;
    collect(rounds, rec, Instant::now() + phase).await?;
    let out = remove_masks(rounds, rec).await?;
    enough(rec, out.iter().map(|(_, c)| c.len()).sum(), "updates are in the released sums")?;

    commit(rounds, lease, rec, global, &session, strategy, out).await
}

/// Selecting: waits for at least `min_clients` online devices (then up to the selection
/// grace for more), and picks at most `max_clients` of them at random.
async fn select(rounds: &Rounds, rec: &mut RoundRecord) -> Result<Vec<String>, RoundError> {
    let plan = &rec.plan;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(plan.deadline_secs as u64);
    let mut enough_since: Option<Instant> = None;
    let mut cohort = loop {
        let online = rounds.online_devices().await?;
        if online.len() >= plan.min_clients as usize {
            let since = *enough_since.get_or_insert_with(Instant::now);
            if online.len() >= plan.max_clients as usize || since.elapsed() >= Duration::from_secs(rounds.cfg.selection_grace_secs) {
                break online;
            }
        }
        rounds.check_abort(rec.round_id)?;
        if Instant::now() >= deadline {
            return Err(RoundError::Aborted(format!("only {} of the {} devices needed are online", online.len(), plan.min_clients)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    rec.phase_ms.insert("selecting".into(), started.elapsed().as_millis() as u64);
    METRICS.phase_seconds.get_or_create(&Phase { phase: "selecting".into() }).observe(started.elapsed().as_secs_f64());
    // Over-selection: any online device may be picked; a random subset when there are more.
    if cohort.len() > plan.max_clients as usize {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(rec.round_id ^ now_ms());
        for i in (1..cohort.len()).rev() {
            cohort.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        cohort.truncate(plan.max_clients as usize);
        cohort.sort();
    }
    Ok(cohort)
}

/// Loads the latest global version, splits `cohort` into SecAgg+ shards (one session each,
/// placed by a hash of the round and the cohort), installs the round's in-memory state
/// (seat `i + 1` is `cohort[i]`), and returns the base session (the encoding every shard
/// shares) and each seat's training request.
async fn open_session(
    rounds: &Rounds,
    lease: &Lease,
    rec: &mut RoundRecord,
    cohort: Vec<String>,
    strategy: &StrategyConfig,
) -> Result<(ParamSet, SessionConfig, BTreeMap<u32, Task>), RoundError> {
    let store = &rounds.store;
    let base_version = store.latest_checkpoint_version().await?.ok_or_else(|| RoundError::Internal("no global checkpoint".into()))?;
    let global_bytes = store.checkpoint(base_version).await?.ok_or_else(|| RoundError::Internal(format!("checkpoint {base_version} missing")))?;
    let global = ParamSet::from_safetensors(&global_bytes).map_err(|e| RoundError::Internal(format!("checkpoint {base_version}: {e}")))?;
    let dim = global.numel();
    let (shard_size, shard_floor) = (rounds.cfg.shard_size as usize, rounds.cfg.min_shard_contributors as usize);
    let placed = shards::assign(&shards::shard_seed(rec.round_id, base_version, &cohort), &cohort, shard_size, shard_floor);
    // A round of one shard releases what its plan allows; each of several holds the floor.
    let floor = if placed.len() == 1 { rec.plan.min_clients as usize } else { shard_floor };
    let largest = placed.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut session = SessionConfig::recommended(rec.round_id, base_version, largest, dim as u64 + 1)?;
    let quant_bits = session.quant_params().map(|q| q.bits).unwrap_or(16);
    session.encoding = Encoding::SignedTwosComplement { quant_bits, clip: rounds.cfg.clip, w_max: rounds.cfg.w_max };
    if rec.plan.dp_l2_clip > 0.0 {
        session.use_dp(dp_params(&rec.plan, dim, rec.round_id, floor as u32)?);
    }
    session.deadlines.advertise_ms = rec.plan.deadline_secs as u64 * 1000;
    session.validate()?;
    let agg = ShardSet::open(rec.round_id, lease.term, shards::sessions(&session, placed)?, floor, &rounds.hosts).await;
    rec.shards = (agg.slots.iter())
        .map(|s| ShardSummary { devices: s.members.len(), floor: s.min_clients, aggregator: s.host.name().to_string(), ..Default::default() })
        .collect();
    let seats: HashMap<String, u32> = cohort.iter().enumerate().map(|(i, d)| (d.clone(), i as u32 + 1)).collect();
    rec.cohort = cohort;
    rec.base_version = base_version;
    rec.shared_params = dim as u64;
    let tasks = train_tasks(rec, &agg, strategy);
    *lock(&rounds.active) = Some(Active {
        round_id: rec.round_id,
        state: RoundState::Selecting,
        agg,
        seats,
        tasks: BTreeMap::new(),
        answered: BTreeSet::new(),
        dropped: Vec::new(),
        busy: Duration::ZERO,
    });
    Ok((global, session, tasks))
}

/// Every seat's training request, with its shard's session and its client id there (none
/// for the seats of a shard no host took).
fn train_tasks(rec: &RoundRecord, agg: &ShardSet, strategy: &StrategyConfig) -> BTreeMap<u32, Task> {
    let plan = &rec.plan;
    (1..=rec.cohort.len() as u32)
        .filter_map(|seat| {
            let (shard, local) = agg.seat(seat)?;
            let slot = agg.slots.get(shard).filter(|s| s.failed.is_none())?;
            Some((
                seat,
                Task::Train(v1::TrainTask {
                    round_id: rec.round_id,
                    global_version: rec.base_version,
                    session_config_json: slot.config_json.clone(),
                    client_id: local,
                    local_epochs: plan.local_epochs,
                    lr: plan.lr,
                    prox_mu: strategy.client_proximal_mu() as f64,
                    seed: rec.round_id,
                    deadline_ms: now_ms() + plan.deadline_secs as u64 * 1000,
                }),
            ))
        })
        .collect()
}

/// DP encoding parameters for a round: granularity C / 2^14 and 24-bit lanes leave the summed
/// noise (z * 2^14 units per coordinate) hundreds of sigmas of headroom, and keep each device's
/// share of the noise within the exact sampler's range; the rotation seed is public, per round.
/// The noise is split over `floor` devices, the fewest a shard releases a sum of, so every
/// released sum carries at least the full noise on its own.
fn dp_params(plan: &super::RoundPlan, dim: usize, round_id: u64, floor: u32) -> Result<spa_aggregation::dp::DpParams, RoundError> {
    let mut rotation_seed = [0u8; 32];
    rotation_seed[..8].copy_from_slice(&round_id.to_le_bytes());
    rotation_seed[8..16].copy_from_slice(&now_ms().to_le_bytes());
    spa_aggregation::dp::DpParams::for_round(dim, plan.dp_l2_clip as f32, plan.dp_noise_multiplier as f32, floor, rotation_seed)
        .map_err(|e| RoundError::InvalidPlan(e.to_string()))
}

/// Moves the round to `state`, durably, before that phase's requests go out.
async fn enter(rounds: &Rounds, lease: &Lease, rec: &mut RoundRecord, state: RoundState, tasks: BTreeMap<u32, Task>) -> Result<(), RoundError> {
    rec.state = state;
    rec.updated_ms = now_ms();
    rounds.store.put_round(lease, rec).await?;
    tracing::info!(phase = state.name(), "phase entered");
    fault_point(state.name());
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Internal("no active round".into()))?;
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
        if close_phase(rounds, rec, deadline, started)? {
            return Ok(());
        }
        rounds.nap(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// If every seat answered or the deadline passed: seats still silent time out, every
/// dropout goes into the record, and true.
fn close_phase(rounds: &Rounds, rec: &mut RoundRecord, deadline: Instant, started: Instant) -> Result<bool, RoundError> {
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Internal("no active round".into()))?;
    if !a.tasks.is_empty() && Instant::now() < deadline {
        return Ok(false);
    }
    let silent: Vec<u32> = std::mem::take(&mut a.tasks).into_keys().collect();
    a.dropped.extend(silent.into_iter().map(|seat| (seat, Dropout { phase: a.state, reason: DropReason::TimedOut })));
    for (seat, d) in a.dropped.drain(..) {
        METRICS.dropouts.get_or_create(&Reason { reason: d.reason.kind().into() }).inc();
        if let Some(device) = rec.cohort.get(seat as usize - 1) {
            rec.dropouts.insert(device.clone(), d);
        }
    }
    rec.answered.insert(rec.state.name().to_string(), a.answered.len());
    rec.phase_ms.insert(rec.state.name().to_string(), started.elapsed().as_millis() as u64);
    METRICS.phase_seconds.get_or_create(&Phase { phase: rec.state.name().into() }).observe(started.elapsed().as_secs_f64());
    Ok(true)
}

/// Aborts the round when fewer than the plan's `min_clients` devices are left in it.
fn enough(rec: &RoundRecord, have: usize, what: &str) -> Result<(), RoundError> {
    if have < rec.plan.min_clients as usize {
        return Err(RoundError::Aborted(format!("{have} {what}, the plan needs {}", rec.plan.min_clients)));
    }
    Ok(())
}

/// Committed: the decoded mean goes through the server strategy; checkpoint, record and
/// optimizer state are written in one transaction as global version `base + 1`.
async fn commit(
    rounds: &Rounds,
    lease: &Lease,
    rec: &mut RoundRecord,
    global: ParamSet,
    session: &SessionConfig,
    strategy: StrategyConfig,
    out: Vec<(Vec<u32>, Vec<u32>)>,
) -> Result<(), RoundError> {
    let store = &rounds.store;
    let started = Instant::now();
    let sums: Vec<(&[u32], usize)> = out.iter().map(|(sum, seats)| (sum.as_slice(), seats.len())).collect();
    let (mean_delta, total_w) = session.decode_mean_of(&sums)?;
    let mut optimizer = match store.optimizer().await? {
        Some(o) if o.config == strategy => o,
        _ => ServerOptimizer::new(strategy)?,
    };
    let mut flat = global.flatten();
    optimizer.apply(&mut flat, &mean_delta)?;
    let new_global = global.with_flat(&flat).map_err(|e| RoundError::Internal(e.to_string()))?;
    let version = rec.base_version + 1;
    let mut seats: Vec<u32> = out.iter().flat_map(|(_, seats)| seats.iter().copied()).collect();
    seats.sort_unstable();
    rec.contributors = seats.iter().filter_map(|&s| rec.cohort.get(s as usize - 1).cloned()).collect();
    rec.state = RoundState::Committed;
    rec.committed_version = Some(version);
    rec.finished_ms = Some(now_ms());
    rec.updated_ms = now_ms();
    let bytes = new_global.to_safetensors();
    // The commit's own write is measured up to here; the record cannot contain its own time.
    let busy = lock(&rounds.active).as_ref().map_or(Duration::ZERO, |a| a.busy);
    rec.coordinator_busy_ms = (busy + started.elapsed()).as_secs_f64() * 1000.0;
    fault_pause("commit").await;
    store.commit_round(lease, version, &bytes, rec, &optimizer).await?;
    fault_point("committed");
    if let Err(e) = store.prune_checkpoints(rounds.cfg.keep_checkpoints).await {
        tracing::warn!("could not delete old global versions: {e}");
    }
    tracing::info!(
        round = rec.round_id,
        version,
        contributors = rec.contributors.len(),
        shards = out.len(),
        total_weight = total_w,
        "global version committed"
    );
    *lock(&rounds.eval) = Some(EvalNotice { round_id: rec.round_id, version, pending: rec.cohort.iter().cloned().collect() });
    Ok(())
}
