//! What a store backend implements: the coordinator's durable state as domain operations.
//! sled ([`super::sled`]) is the embedded default; a second backend (PostgreSQL, for
//! replicas) implements the same trait and runs the same conformance suite
//! (`store::conformance`).
//!
//! The contract every implementation keeps:
//! - a change is durable when its method returns `Ok` (the caller acknowledges it next);
//! - a method that changes several records changes all or none of them;
//! - refusals are the typed [`StoreError`] variants (a caller maps them to statuses), I/O
//!   failures are [`StoreError::Io`] or [`StoreError::Unavailable`] (retry later).
use async_trait::async_trait;
use spa_aggregation::strategy::ServerOptimizer;

use super::records::{DeviceMetrics, DeviceRecord, Lease, Roster, RoundPlan, RoundRecord, RunRecord, TokenRecord};
use super::{Event, Result};

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    // --- Enrollment tokens (kept as SHA-256 hashes, never the token) ---

    /// Stores a new token's hash (logs `token.create`).
    async fn add_token(&self, hash: &[u8; 32], rec: &TokenRecord) -> Result<()>;
    async fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token by id; whether it was still usable. An enrollment that used it
    /// concurrently is kept. `UnknownTokenId` if there is none.
    async fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool>;

    // --- Devices ---

    /// Consumes a token and records the device and its key, as one change. Refused with
    /// `UnknownToken`, `TokenUsed`, `TokenRevoked`, `TokenExpired` or, if any device ever
    /// used this key, `KeyEnrolled`.
    async fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord>;
    /// Replaces an active device's key if it is still `signed_with` (hex): of two rotations
    /// signed by the same key one wins, the other gets `KeyChanged` with its key left unused.
    /// A key any device ever used is refused (`KeyEnrolled`); old keys stay burnt.
    async fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord>;
    async fn device(&self, id: &str) -> Result<Option<DeviceRecord>>;
    async fn devices(&self) -> Result<Vec<DeviceRecord>>;
    /// Marks a device revoked; whether it was active. A key rotated concurrently is kept.
    async fn revoke(&self, id: &str, now_ms: u64) -> Result<bool>;
    /// A device's last call time, in memory until the next [`Backend::flush`]: best effort,
    /// not acknowledged state (a signed call is too frequent to cost a write).
    fn touch(&self, id: &str, now_ms: u64);
    async fn last_seen(&self, id: &str) -> Result<u64>;

    // --- Replay protection across restarts ---

    /// Whether other coordinator processes use this store: then every signed call's nonce is
    /// recorded here, so that a call replayed to another replica is refused there.
    fn shared(&self) -> bool;

    /// Whether [`Backend::device`] answers from memory now (PostgreSQL: while the listener
    /// for other replicas' changes is up; sled: never, it reads its own tree).
    fn device_cache_live(&self) -> bool {
        false
    }
    /// Records a signed call's nonce; false if it was recorded before (a replay). Called for
    /// a call dated after its acceptance (a device clock running fast), and for every call
    /// when the store is [`shared`](Backend::shared).
    async fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<bool>;
    /// Nonces dated at or after `since_ms`: (device, nonce, ts).
    async fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>>;
    /// `device`'s nonces dated at or after `since_ms`: (nonce, ts).
    async fn device_nonces(&self, device: &str, since_ms: u64) -> Result<Vec<(String, u64)>>;
    /// Drops nonces dated before `before_ms`; how many.
    async fn prune_nonces(&self, before_ms: u64) -> Result<usize>;
    /// The server's last tick: after a restart, calls dated before it are refused.
    async fn set_clock_mark(&self, now_ms: u64) -> Result<()>;
    async fn clock_mark(&self) -> Result<u64>;

    // --- Global checkpoints (safetensors of the shared parameters), by version ---

    /// Stores a version unless it exists (logs `checkpoint.commit`); whether it was new.
    async fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool>;
    async fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>>;
    async fn latest_checkpoint_version(&self) -> Result<Option<u64>>;
    /// Deletes every version but the newest `keep` (0 keeps all); how many went.
    async fn prune_checkpoints(&self, keep: u64) -> Result<usize>;

    // --- Runs and rounds; the writes of the round loop carry its lease ---

    /// Takes or renews the leadership lease for `holder`, which devices reach at `url`, for
    /// `ttl_ms` by the store's clock; `None` while another holder's lease runs. Only the
    /// holder runs the round loop.
    async fn lead(&self, holder: &str, url: &str, ttl_ms: u64) -> Result<Option<Lease>>;
    /// The URL of the lease's current holder, while its lease runs.
    async fn leader_url(&self) -> Result<Option<String>>;
    /// Renews incarnation `mine` of the coordinator at `url` among those serving devices for
    /// `ttl_ms`, or, when it is unknown or lapses within `margin_ms`, joins as a new incarnation
    /// serving from `grace_ms` on; forgets incarnations lapsed over `keep_ms` ago; returns the
    /// rest. Only a [`shared`](Backend::shared) store has members (sled: an error).
    async fn members(&self, mine: Option<u64>, url: &str, ttl_ms: u64, margin_ms: u64, grace_ms: u64, keep_ms: u64) -> Result<Roster>;
    /// Ends incarnation `mine` now (a member stopping): the others serve its devices from their
    /// next look at the members.
    async fn leave_members(&self, mine: u64) -> Result<()>;

    /// A new active run of `plan` under the next free id (never shared by two concurrent
    /// calls); logs `run.start`.
    async fn create_run(&self, plan: &RoundPlan, now_ms: u64) -> Result<RunRecord>;
    async fn put_run(&self, lease: &Lease, run: &RunRecord) -> Result<()>;
    async fn runs(&self) -> Result<Vec<RunRecord>>;
    /// The next round of `run` (whose `rounds_started` the caller advanced): the run and the
    /// new round under the next round id, as one change; logs `round.start`.
    async fn start_round(&self, lease: &Lease, run: &RunRecord) -> Result<RoundRecord>;
    async fn put_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()>;
    /// Writes a round that ended without a commit and logs `round.abort` with its reason.
    async fn abort_round(&self, lease: &Lease, round: &RoundRecord) -> Result<()>;
    /// Adds (or replaces) one device's evaluation and the mean, as one change of the record
    /// (concurrent reports never overwrite each other). False if there is no such round.
    async fn add_round_metrics(&self, round_id: u64, device: &str, m: DeviceMetrics) -> Result<bool>;
    async fn round(&self, id: u64) -> Result<Option<RoundRecord>>;
    /// The newest `limit` rounds with ids below `before` (None: any), oldest first.
    async fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>>;
    async fn latest_round(&self) -> Result<Option<RoundRecord>>;
    async fn rounds(&self) -> Result<Vec<RoundRecord>>;
    /// The new global checkpoint, the round's record and the server optimizer's state as one
    /// change (logs `checkpoint.commit`); `VersionExists` changes nothing.
    async fn commit_round(&self, lease: &Lease, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()>;
    async fn optimizer(&self) -> Result<Option<ServerOptimizer>>;

    // --- The event log and upkeep ---

    async fn log(&self, kind: &str, detail: &str) -> Result<()>;
    async fn events(&self) -> Result<Vec<Event>>;
    /// Retention: deletes finished (committed or aborted) rounds but the newest `keep_rounds`
    /// round ids (0 keeps all) and events dated before `events_before_ms`; how many of each.
    async fn prune_history(&self, keep_rounds: u64, events_before_ms: u64) -> Result<(usize, usize)>;
    /// Writes what is kept in memory (last-call times) and makes everything durable.
    async fn flush(&self) -> Result<()>;
    /// Checks the store and recovers it after a failed write (a full disk); whether it works
    /// now. Called every few seconds.
    async fn heal(&self) -> bool;
}
