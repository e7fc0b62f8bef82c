//! What the round loop keeps: global checkpoints by version, runs, rounds, and the server
//! optimizer's state; a commit writes checkpoint, round and optimizer in one transaction.
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use spa_aggregation::strategy::ServerOptimizer;

use super::{Result, Sled, dec, enc, key_id, tx_err};
use crate::store::StoreError;
use crate::store::records::{DeviceMetrics, RoundPlan, RoundRecord, RunRecord, mean_metrics};

impl Sled {
    /// Commits a global checkpoint (safetensors bytes of the shared parameters); durable on
    /// return. Versions are never overwritten.
    pub(super) fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool> {
        let t = self.t()?;
        let fresh = t.checkpoints.compare_and_swap(version.to_be_bytes(), None as Option<&[u8]>, Some(bytes))?.is_ok();
        if fresh {
            self.log("checkpoint.commit", &format!("version {version}, {} bytes", bytes.len()))?;
            self.flush()?;
        }
        Ok(fresh)
    }

    pub(super) fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let t = self.t()?;
        Ok(t.checkpoints.get(version.to_be_bytes())?.map(|v| v.to_vec()))
    }

    /// Deletes every version but the newest `keep` (0 keeps all); returns how many went.
    pub(super) fn prune_checkpoints(&self, keep: u64) -> Result<usize> {
        let Some(latest) = self.latest_checkpoint_version()? else { return Ok(0) };
        if keep == 0 || latest < keep {
            return Ok(0);
        }
        let t = self.t()?;
        let mut n = 0;
        for kv in t.checkpoints.range(..(latest + 1 - keep).to_be_bytes()) {
            t.checkpoints.remove(kv?.0)?;
            n += 1;
        }
        if n > 0 {
            self.log("checkpoint.prune", &format!("{n} versions before {}", latest + 1 - keep))?;
        }
        Ok(n)
    }

    pub(super) fn latest_checkpoint_version(&self) -> Result<Option<u64>> {
        let t = self.t()?;
        Ok(t.checkpoints.last()?.map(|(k, _)| key_id(&k)))
    }
}

const OPTIMIZER_KEY: &[u8] = b"optimizer";

fn last_id(tree: &sled::Tree) -> Result<u64> {
    Ok(tree.last()?.map_or(0, |(k, _)| key_id(&k)))
}

impl Sled {
    /// Stores a new run of `plan` under the next free id; durable on return. The insert is a
    /// compare-and-swap on an empty key, so two concurrent calls never share an id (the second
    /// takes the next one).
    pub(super) fn create_run(&self, plan: &RoundPlan, now_ms: u64) -> Result<RunRecord> {
        let t = self.t()?;
        loop {
            let run = RunRecord::new(last_id(&t.runs)? + 1, plan, now_ms);
            if t.runs.compare_and_swap(run.run_id.to_be_bytes(), None as Option<&[u8]>, Some(enc(&run)))?.is_ok() {
                self.log("run.start", &format!("run {} ({} rounds)", run.run_id, run.plan.rounds))?;
                self.flush()?;
                return Ok(run);
            }
        }
    }

    pub(super) fn put_run(&self, run: &RunRecord) -> Result<()> {
        let t = self.t()?;
        t.runs.insert(run.run_id.to_be_bytes(), enc(run))?;
        self.flush()
    }

    pub(super) fn runs(&self) -> Result<Vec<RunRecord>> {
        let t = self.t()?;
        t.runs.iter().values().map(|v| dec(&v?)).collect()
    }

    pub(super) fn put_round(&self, round: &RoundRecord) -> Result<()> {
        let t = self.t()?;
        t.rounds.insert(round.round_id.to_be_bytes(), enc(round))?;
        self.flush()
    }

    /// Adds (or replaces) one device's evaluation to round `round_id`'s record and its mean, as
    /// one atomic change of the record (concurrent reports never overwrite each other); durable
    /// on return. False if there is no such round.
    pub(super) fn add_round_metrics(&self, round_id: u64, device: &str, m: DeviceMetrics) -> Result<bool> {
        let t = self.t()?;
        let mut bad = None;
        let updated = t.rounds.update_and_fetch(round_id.to_be_bytes(), |old| {
            let old = old?;
            match dec::<RoundRecord>(old) {
                Ok(mut rec) => {
                    rec.metrics.insert(device.to_string(), m.clone());
                    rec.mean_metrics = Some(mean_metrics(rec.metrics.values()));
                    Some(enc(&rec))
                }
                // Left as it is; the error is reported below.
                Err(e) => {
                    bad = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        self.flush()?;
        Ok(updated.is_some())
    }

    /// A run's progress and its next round, together (a crash never leaves one without the
    /// other). Only the round loop starts rounds, so the next id is not contended.
    pub(super) fn start_round(&self, run: &RunRecord) -> Result<RoundRecord> {
        let t = self.t()?;
        let round = RoundRecord::new(last_id(&t.rounds)? + 1, run);
        (&t.runs, &t.rounds)
            .transaction(|(runs, rounds)| {
                runs.insert(&run.run_id.to_be_bytes(), enc(run))?;
                rounds.insert(&round.round_id.to_be_bytes(), enc(&round))?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.log("round.start", &format!("round {} ({} of run {})", round.round_id, round.index, run.run_id))?;
        self.flush()?;
        Ok(round)
    }

    pub(super) fn abort_round(&self, round: &RoundRecord) -> Result<()> {
        let t = self.t()?;
        t.rounds.insert(round.round_id.to_be_bytes(), enc(round))?;
        self.log("round.abort", &format!("round {}: {}", round.round_id, round.reason.as_deref().unwrap_or("")))?;
        self.flush()
    }

    /// Finished rounds older than the newest `keep` round ids (0 keeps all).
    pub(super) fn prune_rounds(&self, keep: u64) -> Result<usize> {
        let t = self.t()?;
        let last = last_id(&t.rounds)?;
        if keep == 0 || last <= keep {
            return Ok(0);
        }
        let mut n = 0;
        for kv in t.rounds.range(..(last + 1 - keep).to_be_bytes()) {
            let (k, v) = kv?;
            if dec::<RoundRecord>(&v)?.state.is_final() {
                t.rounds.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub(super) fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        let t = self.t()?;
        t.rounds.get(id.to_be_bytes())?.map(|v| dec(&v)).transpose()
    }

    /// The newest `limit` rounds with ids below `before` (None: any), oldest first.
    pub(super) fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>> {
        let t = self.t()?;
        let it = match before {
            Some(b) => t.rounds.range(..b.to_be_bytes()),
            None => t.rounds.range::<&[u8], _>(..),
        };
        let mut out = it.rev().take(limit).map(|kv| dec(&kv?.1)).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    pub(super) fn latest_round(&self) -> Result<Option<RoundRecord>> {
        let t = self.t()?;
        t.rounds.last()?.map(|(_, v)| dec(&v)).transpose()
    }

    pub(super) fn rounds(&self) -> Result<Vec<RoundRecord>> {
        let t = self.t()?;
        t.rounds.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Commits a round: the new global checkpoint, the round's record and the server
    /// optimizer's state in one transaction, durable on return. A version is never overwritten.
    pub(super) fn commit_round(&self, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()> {
        let t = self.t()?;
        (&t.checkpoints, &t.rounds, &t.meta)
            .transaction(|(ck, rounds, meta)| {
                if ck.get(version.to_be_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::VersionExists(version)));
                }
                ck.insert(&version.to_be_bytes(), checkpoint)?;
                rounds.insert(&round.round_id.to_be_bytes(), enc(round))?;
                meta.insert(OPTIMIZER_KEY, enc(optimizer))?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.log("checkpoint.commit", &format!("version {version} by round {}, {} bytes", round.round_id, checkpoint.len()))?;
        self.flush()
    }

    pub(super) fn optimizer(&self) -> Result<Option<ServerOptimizer>> {
        let t = self.t()?;
        t.meta.get(OPTIMIZER_KEY)?.map(|v| dec(&v)).transpose()
    }
}
