//! [`PgStore`] as a [`Backend`]: each operation forwards to the inherent method of the same
//! name in [`super::devices`], [`super::rounds`] or [`super`] (`PgStore::name(self, ..)` names
//! the inherent one, which takes precedence over the trait's).
use async_trait::async_trait;
use spa_aggregation::strategy::ServerOptimizer;

use super::PgStore;
use crate::store::records::{DeviceMetrics, DeviceRecord, Lease, Roster, RoundPlan, RoundRecord, RunRecord, TokenRecord};
use crate::store::{Backend, Event, Result};

#[async_trait]
impl Backend for PgStore {
    async fn add_token(&self, hash: &[u8; 32], rec: &TokenRecord) -> Result<()> {
        PgStore::add_token(self, hash, rec).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        PgStore::tokens(self).await
    }

    async fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool> {
        PgStore::revoke_token(self, token_id, now_ms).await
    }

    async fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord> {
        PgStore::enroll(self, hash, public_key, name, now_ms).await
    }

    async fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord> {
        PgStore::rotate_key(self, id, signed_with, new_key, now_ms).await
    }

    async fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        PgStore::device(self, id).await
    }

    fn device_cache_live(&self) -> bool {
        PgStore::device_cache_live(self)
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        PgStore::devices(self).await
    }

    async fn revoke(&self, id: &str, now_ms: u64) -> Result<bool> {
        PgStore::revoke(self, id, now_ms).await
    }

    fn touch(&self, id: &str, now_ms: u64) {
        PgStore::touch(self, id, now_ms)
    }

    async fn last_seen(&self, id: &str) -> Result<u64> {
        PgStore::last_seen(self, id).await
    }

    fn shared(&self) -> bool {
        true
    }

    async fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<bool> {
        PgStore::record_nonce(self, device, nonce, ts_ms).await
    }

    async fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>> {
        PgStore::nonces_since(self, since_ms).await
    }

    async fn device_nonces(&self, device: &str, since_ms: u64) -> Result<Vec<(String, u64)>> {
        PgStore::device_nonces(self, device, since_ms).await
    }

    async fn prune_nonces(&self, before_ms: u64) -> Result<usize> {
        PgStore::prune_nonces(self, before_ms).await
    }

    async fn set_clock_mark(&self, now_ms: u64) -> Result<()> {
        PgStore::set_clock_mark(self, now_ms).await
    }

    async fn clock_mark(&self) -> Result<u64> {
        PgStore::clock_mark(self).await
    }

    async fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool> {
        PgStore::put_checkpoint(self, version, bytes).await
    }

    async fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>> {
        PgStore::checkpoint(self, version).await
    }

    async fn latest_checkpoint_version(&self) -> Result<Option<u64>> {
        PgStore::latest_checkpoint_version(self).await
    }

    async fn prune_checkpoints(&self, keep: u64) -> Result<usize> {
        PgStore::prune_checkpoints(self, keep).await
    }

    async fn create_run(&self, plan: &RoundPlan, now_ms: u64) -> Result<RunRecord> {
        PgStore::create_run(self, plan, now_ms).await
    }

    async fn lead(&self, holder: &str, url: &str, ttl_ms: u64) -> Result<Option<Lease>> {
        PgStore::lead(self, holder, url, ttl_ms).await
    }

    async fn leader_url(&self) -> Result<Option<String>> {
        PgStore::leader_url(self).await
    }

    async fn members(&self, mine: Option<u64>, url: &str, ttl_ms: u64, margin_ms: u64, grace_ms: u64, keep_ms: u64) -> Result<Roster> {
        PgStore::members(self, mine, url, ttl_ms, margin_ms, grace_ms, keep_ms).await
    }

    async fn leave_members(&self, mine: u64) -> Result<()> {
        PgStore::leave_members(self, mine).await
    }

    async fn put_run(&self, lease: &Lease, run: &RunRecord) -> Result<()> {
        PgStore::put_run(self, lease, run).await
    }

    async fn runs(&self) -> Result<Vec<RunRecord>> {
        PgStore::runs(self).await
    }

    async fn start_round(&self, lease: &Lease, run: &RunRecord) -> Result<RoundRecord> {
        PgStore::start_round(self, lease, run).await
    }

    async fn put_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()> {
        PgStore::put_round(self, lease, round).await
    }

    async fn abort_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()> {
        PgStore::abort_round(self, lease, round).await
    }

    async fn add_round_metrics(&self, round_id: u64, device: &str, m: DeviceMetrics) -> Result<bool> {
        PgStore::add_round_metrics(self, round_id, device, m).await
    }

    async fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        PgStore::round(self, id).await
    }

    async fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>> {
        PgStore::rounds_before(self, before, limit).await
    }

    async fn latest_round(&self) -> Result<Option<RoundRecord>> {
        PgStore::latest_round(self).await
    }

    async fn rounds(&self) -> Result<Vec<RoundRecord>> {
        PgStore::rounds(self).await
    }

    async fn commit_round(&self, lease: &Lease, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()> {
        PgStore::commit_round(self, lease, version, checkpoint, round, optimizer).await
    }

    async fn optimizer(&self) -> Result<Option<ServerOptimizer>> {
        PgStore::optimizer(self).await
    }

    async fn log(&self, kind: &str, detail: &str) -> Result<()> {
        PgStore::log(self, kind, detail).await
    }

    async fn events(&self) -> Result<Vec<Event>> {
        PgStore::events(self).await
    }

    async fn prune_history(&self, keep_rounds: u64, events_before_ms: u64) -> Result<(usize, usize)> {
        PgStore::prune_history(self, keep_rounds, events_before_ms).await
    }

    async fn flush(&self) -> Result<()> {
        PgStore::flush(self).await
    }

    async fn heal(&self) -> bool {
        PgStore::heal(self).await
    }
}
