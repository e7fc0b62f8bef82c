//! [`SledStore`] as a [`Backend`]: each operation of [`Sled`] on the blocking pool, with
//! owned copies of its arguments. One process at a time opens a sled store (sled locks its
//! files), so that process always leads and the lease on round writes has nothing to fence.
use async_trait::async_trait;
use spa_aggregation::strategy::ServerOptimizer;

use super::SledStore;
use crate::store::records::{DeviceMetrics, DeviceRecord, Lease, Roster, RoundPlan, RoundRecord, RunRecord, TokenRecord};
use crate::store::{Backend, Event, Result, StoreError};

#[async_trait]
impl Backend for SledStore {
    async fn add_token(&self, hash: &[u8; 32], rec: &TokenRecord) -> Result<()> {
        let (hash, rec) = (*hash, rec.clone());
        self.run(move |s| s.add_token(&hash, &rec)).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.run(|s| s.tokens()).await
    }

    async fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool> {
        let token_id = token_id.to_owned();
        self.run(move |s| s.revoke_token(&token_id, now_ms)).await
    }

    async fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord> {
        let (hash, key, name) = (*hash, public_key.to_vec(), name.to_owned());
        self.run(move |s| s.enroll(&hash, &key, &name, now_ms)).await
    }

    async fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord> {
        let (id, signed_with, new_key) = (id.to_owned(), signed_with.to_owned(), new_key.to_vec());
        self.run(move |s| s.rotate_key(&id, &signed_with, &new_key, now_ms)).await
    }

    async fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let id = id.to_owned();
        self.run(move |s| s.device(&id)).await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.run(|s| s.devices()).await
    }

    async fn revoke(&self, id: &str, now_ms: u64) -> Result<bool> {
        let id = id.to_owned();
        self.run(move |s| s.revoke(&id, now_ms)).await
    }

    fn touch(&self, id: &str, now_ms: u64) {
        self.0.touch(id, now_ms)
    }

    async fn last_seen(&self, id: &str) -> Result<u64> {
        let id = id.to_owned();
        self.run(move |s| s.last_seen(&id)).await
    }

    fn shared(&self) -> bool {
        false
    }

    async fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<bool> {
        let (device, nonce) = (device.to_owned(), nonce.to_owned());
        self.run(move |s| s.record_nonce(&device, &nonce, ts_ms)).await
    }

    async fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>> {
        self.run(move |s| s.nonces_since(since_ms)).await
    }

    async fn device_nonces(&self, device: &str, since_ms: u64) -> Result<Vec<(String, u64)>> {
        let all = self.nonces_since(since_ms).await?;
        Ok(all.into_iter().filter(|(d, _, _)| d == device).map(|(_, n, ts)| (n, ts)).collect())
    }

    async fn prune_nonces(&self, before_ms: u64) -> Result<usize> {
        self.run(move |s| s.prune_nonces(before_ms)).await
    }

    async fn set_clock_mark(&self, now_ms: u64) -> Result<()> {
        self.run(move |s| s.set_clock_mark(now_ms)).await
    }

    async fn clock_mark(&self) -> Result<u64> {
        self.run(|s| s.clock_mark()).await
    }

    async fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool> {
        let bytes = bytes.to_vec();
        self.run(move |s| s.put_checkpoint(version, &bytes)).await
    }

    async fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>> {
        self.run(move |s| s.checkpoint(version)).await
    }

    async fn latest_checkpoint_version(&self) -> Result<Option<u64>> {
        self.run(|s| s.latest_checkpoint_version()).await
    }

    async fn prune_checkpoints(&self, keep: u64) -> Result<usize> {
        self.run(move |s| s.prune_checkpoints(keep)).await
    }

    async fn create_run(&self, plan: &RoundPlan, now_ms: u64) -> Result<RunRecord> {
        let plan = plan.clone();
        self.run(move |s| s.create_run(&plan, now_ms)).await
    }

    async fn lead(&self, holder: &str, _url: &str, ttl_ms: u64) -> Result<Option<Lease>> {
        Ok(Some(Lease { holder: holder.to_owned(), term: 1, ttl_ms }))
    }

    async fn leader_url(&self) -> Result<Option<String>> {
        Ok(None)
    }

    async fn members(&self, _mine: Option<u64>, _url: &str, _ttl_ms: u64, _margin_ms: u64, _grace_ms: u64, _keep_ms: u64) -> Result<Roster> {
        Err(StoreError::Backend("an embedded store serves one coordinator: it has no members".into()))
    }

    async fn leave_members(&self, _mine: u64) -> Result<()> {
        Ok(())
    }

    async fn put_run(&self, _lease: &Lease, run: &RunRecord) -> Result<()> {
        let run = run.clone();
        self.run(move |s| s.put_run(&run)).await
    }

    async fn runs(&self) -> Result<Vec<RunRecord>> {
        self.run(|s| s.runs()).await
    }

    async fn start_round(&self, _lease: &Lease, run: &RunRecord) -> Result<RoundRecord> {
        let run = run.clone();
        self.run(move |s| s.start_round(&run)).await
    }

    async fn put_round(&self, _lease: &Lease, round: &RoundRecord) -> Result<()> {
        let round = round.clone();
        self.run(move |s| s.put_round(&round)).await
    }

    async fn abort_round(&self, _lease: &Lease, round: &RoundRecord) -> Result<()> {
        let round = round.clone();
        self.run(move |s| s.abort_round(&round)).await
    }

    async fn add_round_metrics(&self, round_id: u64, device: &str, m: DeviceMetrics) -> Result<bool> {
        let device = device.to_owned();
        self.run(move |s| s.add_round_metrics(round_id, &device, m)).await
    }

    async fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        self.run(move |s| s.round(id)).await
    }

    async fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>> {
        self.run(move |s| s.rounds_before(before, limit)).await
    }

    async fn latest_round(&self) -> Result<Option<RoundRecord>> {
        self.run(|s| s.latest_round()).await
    }

    async fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.run(|s| s.rounds()).await
    }

    async fn commit_round(&self, _lease: &Lease, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()> {
        let (checkpoint, round, optimizer) = (checkpoint.to_vec(), round.clone(), optimizer.clone());
        self.run(move |s| s.commit_round(version, &checkpoint, &round, &optimizer)).await
    }

    async fn optimizer(&self) -> Result<Option<ServerOptimizer>> {
        self.run(|s| s.optimizer()).await
    }

    async fn log(&self, kind: &str, detail: &str) -> Result<()> {
        let (kind, detail) = (kind.to_owned(), detail.to_owned());
        self.run(move |s| s.log(&kind, &detail)).await
    }

    async fn events(&self) -> Result<Vec<Event>> {
        self.run(|s| s.events()).await
    }

    async fn prune_history(&self, keep_rounds: u64, events_before_ms: u64) -> Result<(usize, usize)> {
        self.run(move |s| Ok((s.prune_rounds(keep_rounds)?, s.prune_events(events_before_ms)?))).await
    }

    async fn flush(&self) -> Result<()> {
        self.run(|s| s.flush()).await
    }

    async fn heal(&self) -> bool {
        self.run(|s| Ok(s.heal())).await.unwrap_or(false)
    }
}
