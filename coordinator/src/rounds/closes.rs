//! Closing a phase on every shard of the round at once (where each runs: `crate::aggregator`),
//! turning what each answered into the next phase's requests or the released sums, and taking
//! the shards that failed, with their devices, out of the round.
use std::collections::BTreeMap;
use std::time::Instant;

use spa_proto::secagg;
use spa_proto::v1::ShardPhase;
use spa_proto::v1::close_shard_response::Result as Closed;
use spa_proto::v1::poll_response::Task;

use super::RoundError;
use super::state::{Active, Rounds};
use crate::aggregator::ShardHost;
use crate::lock;
use crate::metrics::{METRICS, Reason};
use crate::store::records::{DropReason, Dropout, RoundRecord};

/// Closes `phase` in every running shard at once; the shards that failed at it (or since
/// the last close) leave the round with their devices ([`shards_failed`]). Returns what each
/// shard that closed answered; an error (the round aborts) when no shard is left.
pub(super) async fn close_each(rounds: &Rounds, rec: &mut RoundRecord, phase: ShardPhase) -> Result<Vec<(usize, Closed)>, RoundError> {
    let (agg_round, term, running) = {
        let g = lock(&rounds.active);
        let a = g.as_ref().ok_or_else(|| RoundError::Internal("no active round".into()))?;
        (a.agg.round_id, a.agg.term, a.agg.running())
    };
    let started = Instant::now();
    let answers = futures_util::future::join_all(running.iter().map(|(s, host)| host.close((agg_round, *s as u32), phase, term))).await;
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Internal("no active round".into()))?;
    // The closes ran at once; what counts is this process's share (a remote host's is its own).
    if running.iter().any(|(_, h)| matches!(h, ShardHost::Local(_))) {
        a.busy += started.elapsed();
    }
    let mut closed = Vec::new();
    for ((s, host), answer) in running.into_iter().zip(answers) {
        match answer.map(|r| r.result) {
            Ok(Some(Closed::Failed(why))) => a.agg.fail(s, why),
            Ok(Some(r)) => closed.push((s, r)),
            Ok(None) => a.agg.fail(s, format!("its aggregator ({}) answered nothing", host.name())),
            Err(e) => a.agg.fail(s, format!("its aggregator ({}) is gone: {}", host.name(), e.message())),
        }
    }
    closed.retain(|(s, _)| a.agg.slots[*s].failed.is_none());
    shards_failed(a, rec);
    match a.agg.all_failed() {
        Some(why) => Err(RoundError::Shards(why)),
        None => Ok(closed),
    }
}

/// Closes a phase that hands out requests: each running shard's requests, as the tasks of
/// the next phase by global seat. A shard answering with another phase's result, or a
/// client it does not have, fails.
pub(super) async fn close_shards(rounds: &Rounds, rec: &mut RoundRecord, phase: ShardPhase) -> Result<BTreeMap<u32, Task>, RoundError> {
    let closed = close_each(rounds, rec, phase).await?;
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Internal("no active round".into()))?;
    let mut tasks = BTreeMap::new();
    for (s, r) in closed {
        let reqs: Vec<(u32, Task)> = match (phase, r) {
            (ShardPhase::Advertise, Closed::ShareKeys(r)) => r.clients.into_iter().zip(r.tasks.into_iter().map(Task::ShareKeys)).collect(),
            (ShardPhase::ShareKeys, Closed::MaskedInput(r)) => r.clients.into_iter().zip(r.tasks.into_iter().map(Task::MaskedInput)).collect(),
            (ShardPhase::MaskedInput, Closed::Unmask(r)) => r.clients.into_iter().zip(r.tasks.into_iter().map(Task::Unmask)).collect(),
            _ => {
                a.agg.fail(s, format!("its aggregator answered the close of {phase:?} with another phase's result"));
                continue;
            }
        };
        let slot = &a.agg.slots[s];
        match reqs.into_iter().map(|(local, t)| slot.global(local).map(|g| (g, t))).collect::<Option<Vec<_>>>() {
            Some(seated) => tasks.extend(seated),
            None => a.agg.fail(s, "its aggregator named a client the shard does not have".into()),
        }
    }
    shards_failed(a, rec);
    tasks.retain(|seat, _| a.agg.seat(*seat).is_some_and(|(s, _)| a.agg.slots[s].failed.is_none()));
    match a.agg.all_failed() {
        Some(why) => Err(RoundError::Shards(why)),
        None => Ok(tasks),
    }
}

/// Shards whose failure is not in the record yet: each of their devices still in the round
/// leaves it with the shard's reason, and the record says why.
fn shards_failed(a: &mut Active, rec: &mut RoundRecord) {
    for (s, why) in a.agg.take_unreported() {
        tracing::warn!(shard = s, "shard released nothing: {why}");
        for &seat in &a.agg.slots[s].members {
            if let Some(device) = rec.cohort.get(seat as usize - 1)
                && !rec.dropouts.contains_key(device)
            {
                METRICS.dropouts.get_or_create(&Reason { reason: "shard_failed".into() }).inc();
                rec.dropouts.insert(device.clone(), Dropout { phase: rec.state, reason: DropReason::ShardFailed(why.clone()) });
            }
        }
        if let Some(summary) = rec.shards.get_mut(s) {
            summary.failed = Some(why);
        }
    }
}

/// The released sums: each shard's sum (mask removal, the heavy step, runs where the shard
/// does) and its contributors as global seats.
pub(super) async fn remove_masks(rounds: &Rounds, rec: &mut RoundRecord) -> Result<Vec<(Vec<u32>, Vec<u32>)>, RoundError> {
    let closed = close_each(rounds, rec, ShardPhase::Unmask).await?;
    let mut g = lock(&rounds.active);
    let a = g.as_mut().ok_or_else(|| RoundError::Internal("no active round".into()))?;
    let mut out = Vec::new();
    for (s, r) in closed {
        let slot = &a.agg.slots[s];
        let sum = match r {
            Closed::Sum(sum) => sum,
            _ => {
                a.agg.fail(s, "its aggregator answered the unmask close with requests".into());
                continue;
            }
        };
        let lanes = secagg::lanes_from_bytes(&sum.lanes).ok().filter(|l| l.len() as u64 == a.agg.m);
        let seats: Option<Vec<u32>> = sum.contributors.iter().map(|&c| slot.global(c)).collect();
        match (lanes, seats) {
            (Some(lanes), Some(seats)) if seats.len() >= slot.min_clients => {
                rec.shards[s].contributors = seats.len();
                out.push((lanes, seats));
            }
            _ => a.agg.fail(s, "its aggregator released a sum of the wrong length, of clients it does not have, or below its floor".into()),
        }
    }
    shards_failed(a, rec);
    match a.agg.all_failed() {
        Some(why) => Err(RoundError::Shards(why)),
        None => Ok(out),
    }
}
