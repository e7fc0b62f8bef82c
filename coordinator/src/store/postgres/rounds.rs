//! Checkpoints, runs, rounds, the server optimizer and the leadership lease in PostgreSQL.
//! Ids come from sequences, so concurrent creations never share one; a commit is one
//! transaction; every write of the round loop first checks its lease in that transaction.
use spa_aggregation::strategy::ServerOptimizer;
use tokio_postgres::types::Json;

use super::{PgStore, big, log_in, rec, recs, unbig};
use crate::store::records::{DeviceMetrics, Lease, Member, Roster, RoundPlan, RoundRecord, RunRecord, mean_metrics};
use crate::store::{Result, StoreError};

const OPTIMIZER_KEY: &str = "optimizer";
const PUT_RUN: &str = "INSERT INTO runs (run_id, rec) VALUES ($1, $2) ON CONFLICT (run_id) DO UPDATE SET rec = $2";
const PUT_ROUND: &str = "INSERT INTO rounds (round_id, rec) VALUES ($1, $2) ON CONFLICT (round_id) DO UPDATE SET rec = $2";

/// Takes the lease if it is free or expired, renews it if `$1` holds it; the term grows when
/// the holder changes. Times are the database's, so replicas' clocks do not matter.
const LEAD: &str = "INSERT INTO leader_lease (id, holder, term, expires_at, url) VALUES (1, $1, 1, now() + $2 * interval '1 millisecond', $3) \
     ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, url = EXCLUDED.url, \
       term = leader_lease.term + (CASE WHEN leader_lease.holder = EXCLUDED.holder THEN 0 ELSE 1 END) \
     WHERE leader_lease.holder = EXCLUDED.holder OR leader_lease.expires_at < now() \
     RETURNING term";

/// Refuses the transaction's writes unless `lease` is still the lease (same holder, same term:
/// nobody took it since), and renews it: a lapsed lease nobody took is still this leader's, and
/// the write extends it. The row lock makes a takeover wait until this transaction ends, so a
/// write is never interleaved with one, and a takeover that came first wins.
async fn fence(tx: &tokio_postgres::Transaction<'_>, lease: &Lease) -> Result<()> {
    let sql = "UPDATE leader_lease SET expires_at = GREATEST(expires_at, now() + $3 * interval '1 millisecond') \
               WHERE id = 1 AND holder = $1 AND term = $2 RETURNING 1";
    match tx.query_opt(sql, &[&lease.holder, &big(lease.term), &(lease.ttl_ms as f64)]).await? {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced(lease.term)),
    }
}

impl PgStore {
    pub(super) async fn lead(&self, holder: &str, url: &str, ttl_ms: u64) -> Result<Option<Lease>> {
        let row = self.client().await?.query_opt(LEAD, &[&holder, &(ttl_ms as f64), &url]).await?;
        Ok(row.map(|r| Lease { holder: holder.to_owned(), term: unbig(r.get(0)), ttl_ms }))
    }

    pub(super) async fn leader_url(&self) -> Result<Option<String>> {
        let row = self.client().await?.query_opt("SELECT url FROM leader_lease WHERE id = 1 AND expires_at > now()", &[]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn members(&self, mine: Option<u64>, url: &str, ttl_ms: u64, margin_ms: u64, grace_ms: u64, keep_ms: u64) -> Result<Roster> {
        let (ttl, margin, grace, keep) = (ttl_ms as f64, margin_ms as f64, grace_ms as f64, keep_ms as f64);
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // A renewal only while the incarnation has over `margin` to run: one closer to lapsing
        // may have stopped serving (its own deadline), and its peers may be about to take over.
        let renew = "UPDATE members SET expires_at = GREATEST(expires_at, now() + $2 * interval '1 millisecond') \
                     WHERE incarnation = $1 AND expires_at > now() + $3 * interval '1 millisecond' RETURNING incarnation";
        let renewed = match mine {
            Some(m) => tx.query_opt(renew, &[&big(m), &ttl, &margin]).await?,
            None => None,
        };
        let mine = match renewed {
            Some(r) => r.get::<_, i64>(0),
            None => {
                let join = "INSERT INTO members (url, serves_from, expires_at) \
                            VALUES ($1, now() + $2 * interval '1 millisecond', now() + ($2 + $3) * interval '1 millisecond') RETURNING incarnation";
                tx.query_one(join, &[&url, &grace, &ttl]).await?.get(0)
            }
        };
        tx.execute("DELETE FROM members WHERE expires_at < now() - $1 * interval '1 millisecond'", &[&keep]).await?;
        let ms = |col: &str| format!("(extract(epoch from {col}) * 1000)::bigint");
        let sql = format!("SELECT incarnation, url, {}, {}, {} FROM members", ms("serves_from"), ms("expires_at"), ms("now()"));
        let rows = tx.query(&sql, &[]).await?;
        tx.commit().await?;
        let now_ms = rows.first().map_or(0, |r| unbig(r.get(4)));
        let members =
            rows.iter().map(|r| Member { incarnation: unbig(r.get(0)), url: r.get(1), from_ms: unbig(r.get(2)), until_ms: unbig(r.get(3)) }).collect();
        Ok(Roster { now_ms, mine: unbig(mine), members })
    }

    pub(super) async fn leave_members(&self, mine: u64) -> Result<()> {
        let sql = "UPDATE members SET expires_at = LEAST(expires_at, now()) WHERE incarnation = $1";
        self.client().await?.execute(sql, &[&big(mine)]).await?;
        Ok(())
    }

    pub(super) async fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let n = tx.execute("INSERT INTO checkpoints (version, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&big(version), &bytes]).await?;
        if n == 1 {
            log_in(&*tx, "checkpoint.commit", &format!("version {version}, {} bytes", bytes.len())).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    pub(super) async fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let row = self.client().await?.query_opt("SELECT bytes FROM checkpoints WHERE version = $1", &[&big(version)]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn latest_checkpoint_version(&self) -> Result<Option<u64>> {
        let row = self.client().await?.query_one("SELECT max(version) FROM checkpoints", &[]).await?;
        Ok(row.get::<_, Option<i64>>(0).map(unbig))
    }

    pub(super) async fn prune_checkpoints(&self, keep: u64) -> Result<usize> {
        let Some(latest) = self.latest_checkpoint_version().await? else { return Ok(0) };
        if keep == 0 || latest < keep {
            return Ok(0);
        }
        let before = latest + 1 - keep;
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let n = tx.execute("DELETE FROM checkpoints WHERE version < $1", &[&big(before)]).await? as usize;
        if n > 0 {
            log_in(&*tx, "checkpoint.prune", &format!("{n} versions before {before}")).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn create_run(&self, plan: &RoundPlan, now_ms: u64) -> Result<RunRecord> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let id: i64 = tx.query_one("SELECT nextval('run_ids')", &[]).await?.get(0);
        let run = RunRecord::new(unbig(id), plan, now_ms);
        tx.execute(PUT_RUN, &[&id, &Json(&run)]).await?;
        log_in(&*tx, "run.start", &format!("run {} ({} rounds)", run.run_id, run.plan.rounds)).await?;
        tx.commit().await?;
        Ok(run)
    }

    pub(super) async fn put_run(&self, lease: &Lease, run: &RunRecord) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        fence(&tx, lease).await?;
        tx.execute(PUT_RUN, &[&big(run.run_id), &Json(run)]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn runs(&self) -> Result<Vec<RunRecord>> {
        recs(&self.client().await?.query("SELECT rec FROM runs ORDER BY run_id", &[]).await?)
    }

    pub(super) async fn start_round(&self, lease: &Lease, run: &RunRecord) -> Result<RoundRecord> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        fence(&tx, lease).await?;
        let id: i64 = tx.query_one("SELECT nextval('round_ids')", &[]).await?.get(0);
        let round = RoundRecord::new(unbig(id), run);
        tx.execute(PUT_RUN, &[&big(run.run_id), &Json(run)]).await?;
        tx.execute(PUT_ROUND, &[&id, &Json(&round)]).await?;
        log_in(&*tx, "round.start", &format!("round {} ({} of run {})", round.round_id, round.index, run.run_id)).await?;
        tx.commit().await?;
        Ok(round)
    }

    pub(super) async fn put_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        fence(&tx, lease).await?;
        tx.execute(PUT_ROUND, &[&big(round.round_id), &Json(round)]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn abort_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        fence(&tx, lease).await?;
        tx.execute(PUT_ROUND, &[&big(round.round_id), &Json(round)]).await?;
        log_in(&*tx, "round.abort", &format!("round {}: {}", round.round_id, round.reason.as_deref().unwrap_or(""))).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn add_round_metrics(&self, round_id: u64, device: &str, m: DeviceMetrics) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let Some(row) = tx.query_opt("SELECT rec FROM rounds WHERE round_id = $1 FOR UPDATE", &[&big(round_id)]).await? else {
            return Ok(false);
        };
        let mut r: RoundRecord = rec(&row, 0)?;
        r.metrics.insert(device.to_string(), m);
        r.mean_metrics = Some(mean_metrics(r.metrics.values()));
        tx.execute("UPDATE rounds SET rec = $2 WHERE round_id = $1", &[&big(round_id), &Json(&r)]).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        self.client().await?.query_opt("SELECT rec FROM rounds WHERE round_id = $1", &[&big(id)]).await?.map(|r| rec(&r, 0)).transpose()
    }

    pub(super) async fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>> {
        let sql = "SELECT rec FROM rounds WHERE round_id < $1 ORDER BY round_id DESC LIMIT $2";
        let rows = self.client().await?.query(sql, &[&before.map_or(i64::MAX, big), &big(limit as u64)]).await?;
        let mut out: Vec<RoundRecord> = recs(&rows)?;
        out.reverse();
        Ok(out)
    }

    pub(super) async fn latest_round(&self) -> Result<Option<RoundRecord>> {
        let row = self.client().await?.query_opt("SELECT rec FROM rounds ORDER BY round_id DESC LIMIT 1", &[]).await?;
        row.map(|r| rec(&r, 0)).transpose()
    }

    pub(super) async fn rounds(&self) -> Result<Vec<RoundRecord>> {
        recs(&self.client().await?.query("SELECT rec FROM rounds ORDER BY round_id", &[]).await?)
    }

    pub(super) async fn commit_round(&self, lease: &Lease, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        fence(&tx, lease).await?;
        let n = tx.execute("INSERT INTO checkpoints (version, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&big(version), &checkpoint]).await?;
        if n == 0 {
            return Err(StoreError::VersionExists(version));
        }
        tx.execute(PUT_ROUND, &[&big(round.round_id), &Json(round)]).await?;
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2";
        tx.execute(sql, &[&OPTIMIZER_KEY, &Json(optimizer)]).await?;
        log_in(&*tx, "checkpoint.commit", &format!("version {version} by round {}, {} bytes", round.round_id, checkpoint.len())).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn optimizer(&self) -> Result<Option<ServerOptimizer>> {
        let row = self.client().await?.query_opt("SELECT value FROM meta WHERE key = $1", &[&OPTIMIZER_KEY]).await?;
        row.map(|r| rec(&r, 0)).transpose()
    }
}
