//! The coordinator's durable state in sled: devices, enrollment tokens (hashed), nonces of
//! signed calls, global checkpoints by version, and an event log. Every state change that a
//! caller acknowledges is flushed to disk first.
use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use spa_aggregation::strategy::ServerOptimizer;

use crate::rounds::{RoundRecord, RunRecord};
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record: {0}")]
    Corrupt(String),
    #[error("unknown enrollment token")]
    UnknownToken,
    #[error("enrollment token already used")]
    TokenUsed,
    #[error("enrollment token expired")]
    TokenExpired,
    #[error("enrollment token revoked")]
    TokenRevoked,
    #[error("unknown enrollment token id '{0}'")]
    UnknownTokenId(String),
    #[error("this public key is already enrolled as {0}")]
    KeyEnrolled(String),
    #[error("unknown device '{0}'")]
    UnknownDevice(String),
    #[error("device '{0}' is revoked")]
    DeviceRevoked(String),
    #[error("device '{0}' changed its key after this call was signed (another rotation won); nothing was changed")]
    KeyChanged(String),
    #[error("global version {0} is already committed")]
    VersionExists(u64),
    #[error("the store is being reopened after a failed write (is its disk full?); retry later")]
    Unavailable,
}

impl StoreError {
    /// Whether the store failed to read or write its files (rather than refusing a request).
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(_)) | StoreError::Unavailable)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: String,
    pub detail: String,
}

/// A handle on the store, shared by every part of the coordinator. After one failed write
/// (a full disk, say) sled refuses every later call until reopened: [`Store::heal`] closes
/// and reopens it, which succeeds once space returns; meanwhile calls get
/// [`StoreError::Unavailable`] or the I/O error, and nothing acknowledged is lost (every
/// acknowledged change was flushed before the answer).
#[derive(Clone)]
pub struct Store {
    path: std::path::PathBuf,
    cache_bytes: u64,
    cur: std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<Trees>>>>,
    /// Last-call times not yet written: a signed call is too frequent to cost a write each.
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

struct Trees {
    db: sled::Db,
    devices: sled::Tree,
    tokens: sled::Tree,
    nonces: sled::Tree,
    checkpoints: sled::Tree,
    events: sled::Tree,
    last_seen: sled::Tree,
    /// SHA-256 of every public key a device used (enrolled or rotated to) -> its device id:
    /// a key is never accepted twice.
    keys: sled::Tree,
    rounds: sled::Tree,
    runs: sled::Tree,
    meta: sled::Tree,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The device id of a public key: `dev-` and the first 16 hex digits of its SHA-256.
pub fn device_id_of(public_key: &[u8]) -> String {
    format!("dev-{}", &hex::encode(spa_proto::auth::sha256(public_key))[..16])
}

/// What the store keeps of a token: its SHA-256, never the token.
pub fn token_hash(token: &str) -> [u8; 32] {
    spa_proto::auth::sha256(token.as_bytes())
}

impl Trees {
    fn open(path: &Path, cache_bytes: u64) -> Result<Self> {
        let db = sled::Config::new().path(path).cache_capacity(cache_bytes).open()?;
        Ok(Self {
            devices: db.open_tree("devices")?,
            tokens: db.open_tree("tokens")?,
            nonces: db.open_tree("nonces")?,
            checkpoints: db.open_tree("checkpoints")?,
            events: db.open_tree("events")?,
            last_seen: db.open_tree("last_seen")?,
            keys: db.open_tree("keys")?,
            rounds: db.open_tree("rounds")?,
            runs: db.open_tree("runs")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

/// sled's page cache when the config does not say (sled's own default is 1 GiB, which a
/// coordinator writing a nonce per signed call fills, and keeps).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// A store whose page cache holds at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self> {
        let trees = Trees::open(path, cache_bytes)?;
        let cur = std::sync::Arc::new(std::sync::RwLock::new(Some(std::sync::Arc::new(trees))));
        Ok(Self { path: path.to_path_buf(), cache_bytes, cur, seen: Default::default() })
    }

    /// The open store, or Unavailable while it is being reopened.
    fn t(&self) -> Result<std::sync::Arc<Trees>> {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::Unavailable)
    }

    /// Checks the store (a flush) and, when it failed, closes and reopens it. Called every
    /// few seconds; returns whether the store works now. Reopening runs sled's recovery from
    /// what is on disk, as a restart would; it fails (and is tried again) while the disk is
    /// still full or a call still holds the old handle.
    pub fn heal(&self) -> bool {
        if self.flush().is_ok() {
            return true;
        }
        let mut g = self.cur.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.take() {
            tracing::error!("the store failed a write: closing and reopening it");
            drop(old);
        }
        match Trees::open(&self.path, self.cache_bytes) {
            Ok(t) => {
                tracing::warn!("the store is open again");
                *g = Some(std::sync::Arc::new(t));
                true
            }
            Err(e) => {
                tracing::error!("the store cannot be reopened yet: {e}");
                false
            }
        }
    }

    /// Writes the pending last-call times and makes everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        let t = self.t()?;
        self.write_seen(&t)?;
        t.db.flush()?;
        Ok(())
    }

    fn write_seen(&self, t: &Trees) -> Result<()> {
        let pending = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        let mut batch = sled::Batch::default();
        for (id, ms) in &pending {
            batch.insert(id.as_bytes(), &ms.to_be_bytes()[..]);
        }
        t.last_seen.apply_batch(batch).inspect_err(|_| {
            // Kept for the next try (unless newer times arrived meanwhile).
            let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (id, ms) in pending {
                g.entry(id).or_insert(ms);
            }
        })?;
        Ok(())
    }

    pub fn log(&self, kind: &str, detail: impl Into<String>) -> Result<()> {
        let t = self.t()?;
        let id = t.db.generate_id()?;
        let e = Event { ts_ms: spa_proto::auth::now_ms(), kind: kind.into(), detail: detail.into() };
        t.events.insert(id.to_be_bytes(), enc(&e))?;
        Ok(())
    }

    pub fn events(&self) -> Result<Vec<Event>> {
        let t = self.t()?;
        t.events.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Stores a new token's hash; durable on return.
    pub fn add_token(&self, hash: &[u8; 32], rec: &TokenRecord) -> Result<()> {
        let t = self.t()?;
        t.tokens.insert(hash, enc(rec))?;
        self.log("token.create", format!("{} expires {}", rec.token_id, rec.expires_at_ms))?;
        self.flush()
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let t = self.t()?;
        t.tokens.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Consumes a token and records the device, atomically; durable on return.
    pub fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord> {
        let t = self.t()?;
        let device_id = device_id_of(public_key);
        let key_hash = spa_proto::auth::sha256(public_key);
        let res = (&t.tokens, &t.devices, &t.keys).transaction(|(tokens, devices, keys)| {
            let abort = |e| Err(ConflictableTransactionError::Abort(e));
            let Some(raw) = tokens.get(hash)? else {
                return abort(StoreError::UnknownToken);
            };
            let mut tok: TokenRecord = match dec(&raw) {
                Ok(t) => t,
                Err(e) => return abort(e),
            };
            if tok.used_by.is_some() {
                return abort(StoreError::TokenUsed);
            }
            if tok.revoked_at_ms.is_some() {
                return abort(StoreError::TokenRevoked);
            }
            if tok.expires_at_ms <= now_ms {
                return abort(StoreError::TokenExpired);
            }
            if devices.get(device_id.as_bytes())?.is_some() {
                return abort(StoreError::KeyEnrolled(device_id.clone()));
            }
            if let Some(owner) = keys.get(key_hash)? {
                return abort(StoreError::KeyEnrolled(String::from_utf8_lossy(&owner).into_owned()));
            }
            tok.used_by = Some(device_id.clone());
            let rec = DeviceRecord {
                device_id: device_id.clone(),
                name: name.into(),
                public_key_hex: hex::encode(public_key),
                enrolled_at_ms: now_ms,
                token_id: tok.token_id.clone(),
                revoked: false,
                revoked_at_ms: None,
                key_rotated_at_ms: None,
            };
            tokens.insert(&hash[..], enc(&tok))?;
            devices.insert(device_id.as_bytes(), enc(&rec))?;
            keys.insert(&key_hash[..], device_id.as_bytes())?;
            Ok(rec)
        });
        let rec = match res {
            Ok(r) => r,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.log("device.enroll", format!("{} ({}) with token {}", rec.device_id, rec.name, rec.token_id))?;
        self.flush()?;
        Ok(rec)
    }

    /// Replaces an active device's public key (the caller checked the old key's signature and
    /// the new key's proof) if it is still `signed_with`, the key that call was signed with: a
    /// compare-and-swap, so of two rotations signed by the same key one wins and the other is
    /// refused with its new key left unused. Refused if any device ever used the new key.
    /// Durable on return.
    pub fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord> {
        let t = self.t()?;
        let new_hash = spa_proto::auth::sha256(new_key);
        let res = (&t.devices, &t.keys).transaction(|(devices, keys)| {
            let abort = |e| Err(ConflictableTransactionError::Abort(e));
            let Some(raw) = devices.get(id.as_bytes())? else {
                return abort(StoreError::UnknownDevice(id.into()));
            };
            let mut rec: DeviceRecord = match dec(&raw) {
                Ok(r) => r,
                Err(e) => return abort(e),
            };
            if rec.revoked {
                return abort(StoreError::DeviceRevoked(id.into()));
            }
            if rec.public_key_hex != signed_with {
                return abort(StoreError::KeyChanged(id.into()));
            }
            let new_id = device_id_of(new_key);
            if let Some(owner) = keys.get(new_hash)? {
                return abort(StoreError::KeyEnrolled(String::from_utf8_lossy(&owner).into_owned()));
            }
            if devices.get(new_id.as_bytes())?.is_some() {
                return abort(StoreError::KeyEnrolled(new_id));
            }
            // Stores from before the keys tree: the old key is recorded as used here too.
            let old = hex::decode(&rec.public_key_hex).unwrap_or_default();
            keys.insert(&spa_proto::auth::sha256(&old)[..], id.as_bytes())?;
            keys.insert(&new_hash[..], id.as_bytes())?;
            rec.public_key_hex = hex::encode(new_key);
            rec.key_rotated_at_ms = Some(now_ms);
            devices.insert(id.as_bytes(), enc(&rec))?;
            Ok(rec)
        });
        let rec = match res {
            Ok(r) => r,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.log("device.rotate_key", id)?;
        self.flush()?;
        Ok(rec)
    }

    /// Revokes an unused enrollment token by its id; returns whether it was still usable.
    /// Durable on return.
    pub fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool> {
        let t = self.t()?;
        for kv in t.tokens.iter() {
            let (k, v) = kv?;
            let mut rec: TokenRecord = dec(&v)?;
            if rec.token_id != token_id {
                continue;
            }
            let was_usable = rec.used_by.is_none() && rec.revoked_at_ms.is_none() && rec.expires_at_ms > now_ms;
            if rec.revoked_at_ms.is_none() {
                rec.revoked_at_ms = Some(now_ms);
                t.tokens.insert(k, enc(&rec))?;
                self.log("token.revoke", token_id)?;
                self.flush()?;
            }
            return Ok(was_usable);
        }
        Err(StoreError::UnknownTokenId(token_id.into()))
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let t = self.t()?;
        t.devices.get(id.as_bytes())?.map(|v| dec(&v)).transpose()
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let t = self.t()?;
        t.devices.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Marks a device revoked; durable on return. Returns whether it was active.
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<bool> {
        let t = self.t()?;
        let Some(mut rec) = self.device(id)? else {
            return Err(StoreError::UnknownDevice(id.into()));
        };
        let was_active = !rec.revoked;
        if was_active {
            rec.revoked = true;
            rec.revoked_at_ms = Some(now_ms);
            t.devices.insert(id.as_bytes(), enc(&rec))?;
            self.log("device.revoke", id)?;
            self.flush()?;
        }
        Ok(was_active)
    }

    /// Last call time of a device: kept in memory and written at the next [`Store::flush`]
    /// (the server's 2 s tick, or any acknowledged change); best effort, not acknowledged state.
    pub fn touch(&self, id: &str, now_ms: u64) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), now_ms);
    }

    pub fn last_seen(&self, id: &str) -> Result<u64> {
        if let Some(ms) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(*ms);
        }
        let t = self.t()?;
        Ok(t.last_seen.get(id.as_bytes())?.map_or(0, |v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8.min(v.len())]);
            u64::from_be_bytes(b)
        }))
    }

    /// Persists the nonce of a call dated after its acceptance, so a restart does not reopen
    /// the replay window (calls dated before the restart are refused whole). Key: ts | device | nonce.
    pub fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<()> {
        let t = self.t()?;
        let mut k = ts_ms.to_be_bytes().to_vec();
        k.extend_from_slice(format!("{device}\0{nonce}").as_bytes());
        t.nonces.insert(k, Vec::<u8>::new())?;
        Ok(())
    }

    /// The time of the server's last tick: after a restart, calls dated before it are refused
    /// even if the clock went back meanwhile.
    pub fn set_clock_mark(&self, now_ms: u64) -> Result<()> {
        self.t()?.meta.insert(CLOCK_MARK_KEY, &now_ms.to_be_bytes()[..])?;
        Ok(())
    }

    pub fn clock_mark(&self) -> Result<u64> {
        let v = self.t()?.meta.get(CLOCK_MARK_KEY)?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok()).map_or(0, u64::from_be_bytes))
    }

    /// Nonces with a timestamp at or after `since_ms`: (device, nonce, ts).
    pub fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>> {
        let t = self.t()?;
        let mut out = Vec::new();
        for kv in t.nonces.range(since_ms.to_be_bytes()..) {
            let (k, _) = kv?;
            if k.len() < 8 {
                continue;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[..8]);
            let rest = String::from_utf8_lossy(&k[8..]).into_owned();
            if let Some((d, n)) = rest.split_once('\0') {
                out.push((d.to_string(), n.to_string(), u64::from_be_bytes(b)));
            }
        }
        Ok(out)
    }

    /// Drops nonces older than `before_ms` (they fail the clock check anyway).
    pub fn prune_nonces(&self, before_ms: u64) -> Result<usize> {
        let t = self.t()?;
        let mut n = 0;
        for kv in t.nonces.range(..before_ms.to_be_bytes()) {
            t.nonces.remove(kv?.0)?;
            n += 1;
        }
        Ok(n)
    }

    /// Commits a global checkpoint (safetensors bytes of the shared parameters); durable on
    /// return. Versions are never overwritten.
    pub fn put_checkpoint(&self, version: u64, bytes: &[u8]) -> Result<bool> {
        let t = self.t()?;
        let fresh = t.checkpoints.compare_and_swap(version.to_be_bytes(), None as Option<&[u8]>, Some(bytes))?.is_ok();
        if fresh {
            self.log("checkpoint.commit", format!("version {version}, {} bytes", bytes.len()))?;
            self.flush()?;
        }
        Ok(fresh)
    }

    pub fn checkpoint(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let t = self.t()?;
        Ok(t.checkpoints.get(version.to_be_bytes())?.map(|v| v.to_vec()))
    }

    /// Deletes every version but the newest `keep` (0 keeps all); returns how many went.
    pub fn prune_checkpoints(&self, keep: u64) -> Result<usize> {
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
            self.log("checkpoint.prune", format!("{n} versions before {}", latest + 1 - keep))?;
        }
        Ok(n)
    }

    pub fn latest_checkpoint_version(&self) -> Result<Option<u64>> {
        let t = self.t()?;
        Ok(t.checkpoints.last()?.map(|(k, _)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[..8]);
            u64::from_be_bytes(b)
        }))
    }
}

// ---- rounds -------------------------------------------------------------------------

const OPTIMIZER_KEY: &[u8] = b"optimizer";
const CLOCK_MARK_KEY: &[u8] = b"clock_mark";

fn last_id(tree: &sled::Tree) -> Result<u64> {
    Ok(tree
        .last()?
        .map(|(k, _)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[..8]);
            u64::from_be_bytes(b)
        })
        .unwrap_or(0))
}

impl Store {
    pub fn next_run_id(&self) -> Result<u64> {
        let t = self.t()?;
        Ok(last_id(&t.runs)? + 1)
    }

    pub fn next_round_id(&self) -> Result<u64> {
        let t = self.t()?;
        Ok(last_id(&t.rounds)? + 1)
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<()> {
        let t = self.t()?;
        t.runs.insert(run.run_id.to_be_bytes(), enc(run))?;
        self.flush()
    }

    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        let t = self.t()?;
        t.runs.iter().values().map(|v| dec(&v?)).collect()
    }

    pub fn put_round(&self, round: &RoundRecord) -> Result<()> {
        let t = self.t()?;
        t.rounds.insert(round.round_id.to_be_bytes(), enc(round))?;
        self.flush()
    }

    /// A run's progress and its new round, together (a crash never leaves one without the other).
    pub fn start_round(&self, run: &RunRecord, round: &RoundRecord) -> Result<()> {
        let t = self.t()?;
        (&t.runs, &t.rounds)
            .transaction(|(runs, rounds)| {
                runs.insert(&run.run_id.to_be_bytes(), enc(run))?;
                rounds.insert(&round.round_id.to_be_bytes(), enc(round))?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.flush()
    }

    pub fn round(&self, id: u64) -> Result<Option<RoundRecord>> {
        let t = self.t()?;
        t.rounds.get(id.to_be_bytes())?.map(|v| dec(&v)).transpose()
    }

    /// The newest `limit` rounds with ids below `before` (None: any), oldest first.
    pub fn rounds_before(&self, before: Option<u64>, limit: usize) -> Result<Vec<RoundRecord>> {
        let t = self.t()?;
        let it = match before {
            Some(b) => t.rounds.range(..b.to_be_bytes()),
            None => t.rounds.range::<&[u8], _>(..),
        };
        let mut out = it.rev().take(limit).map(|kv| dec(&kv?.1)).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    pub fn latest_round(&self) -> Result<Option<RoundRecord>> {
        let t = self.t()?;
        t.rounds.last()?.map(|(_, v)| dec(&v)).transpose()
    }

    pub fn rounds(&self) -> Result<Vec<RoundRecord>> {
        let t = self.t()?;
        t.rounds.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Commits a round: the new global checkpoint, the round's record and the server
    /// optimizer's state in one transaction, durable on return. A version is never overwritten.
    pub fn commit_round(&self, version: u64, checkpoint: &[u8], round: &RoundRecord, optimizer: &ServerOptimizer) -> Result<()> {
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
        self.log("checkpoint.commit", format!("version {version} by round {}, {} bytes", round.round_id, checkpoint.len()))?;
        self.flush()
    }

    pub fn optimizer(&self) -> Result<Option<ServerOptimizer>> {
        let t = self.t()?;
        t.meta.get(OPTIMIZER_KEY)?.map(|v| dec(&v)).transpose()
    }
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(store: &Store, t: &str, expires: u64) {
        let rec = TokenRecord { token_id: t[..4].into(), created_at_ms: 0, expires_at_ms: expires, note: String::new(), used_by: None, revoked_at_ms: None };
        store.add_token(&token_hash(t), &rec).unwrap();
    }

    #[test]
    fn tokens_are_one_time_and_expire_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            token(&s, "tok-one", 1000);
            token(&s, "tok-two", 1000);
            let d = s.enroll(&token_hash("tok-one"), &[1u8; 32], "a", 10).unwrap();
            assert!(matches!(s.enroll(&token_hash("tok-one"), &[2u8; 32], "b", 10), Err(StoreError::TokenUsed)));
            assert!(matches!(s.enroll(&token_hash("nope"), &[2u8; 32], "b", 10), Err(StoreError::UnknownToken)));
            assert!(matches!(s.enroll(&token_hash("tok-two"), &[2u8; 32], "b", 1000), Err(StoreError::TokenExpired)));
            assert!(matches!(s.enroll(&token_hash("tok-two"), &[1u8; 32], "b", 10), Err(StoreError::KeyEnrolled(_))));
            // A failed enrollment left the token usable.
            assert_eq!(s.tokens().unwrap().iter().filter(|t| t.used_by.is_none()).count(), 1);
            assert!(s.revoke(&d.device_id, 20).unwrap());
            assert!(!s.revoke(&d.device_id, 21).unwrap());
            assert!(s.put_checkpoint(0, b"v0").unwrap());
            assert!(!s.put_checkpoint(0, b"other").unwrap());
            s.record_nonce("dev", "n1", 500).unwrap();
            s.set_clock_mark(1234).unwrap();
            s.touch("dev", 77);
            assert_eq!(s.last_seen("dev").unwrap(), 77);
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let devs = s.devices().unwrap();
        assert_eq!(devs.len(), 1);
        assert!(devs[0].revoked);
        assert_eq!(s.checkpoint(0).unwrap().unwrap(), b"v0");
        assert_eq!(s.latest_checkpoint_version().unwrap(), Some(0));
        assert_eq!(s.nonces_since(400).unwrap(), vec![("dev".into(), "n1".into(), 500)]);
        assert_eq!(s.prune_nonces(600).unwrap(), 1);
        assert_eq!((s.last_seen("dev").unwrap(), s.clock_mark().unwrap()), (77, 1234));
        for v in 1..=5 {
            assert!(s.put_checkpoint(v, b"v").unwrap());
        }
        assert_eq!(s.prune_checkpoints(0).unwrap(), 0);
        assert_eq!(s.prune_checkpoints(2).unwrap(), 4);
        assert_eq!((s.checkpoint(3).unwrap(), s.checkpoint(4).unwrap().is_some(), s.latest_checkpoint_version().unwrap()), (None, true, Some(5)));
        assert!(s.events().unwrap().iter().any(|e| e.kind == "device.revoke"));
    }

    #[test]
    fn of_two_rotations_signed_by_the_same_key_one_wins_and_the_loser_s_key_stays_unused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        token(&s, "tok-one", 1000);
        let old = [1u8; 32];
        let d = s.enroll(&token_hash("tok-one"), &old, "a", 10).unwrap();
        // Both callers were authenticated with the old key; the first to reach the store wins.
        let won = s.rotate_key(&d.device_id, &hex::encode(old), &[2u8; 32], 20).unwrap();
        assert_eq!(won.public_key_hex, hex::encode([2u8; 32]));
        let lost = s.rotate_key(&d.device_id, &hex::encode(old), &[3u8; 32], 21).unwrap_err();
        assert!(matches!(lost, StoreError::KeyChanged(_)), "{lost}");
        assert_eq!(s.device(&d.device_id).unwrap().unwrap().public_key_hex, hex::encode([2u8; 32]));
        // The loser's key was not burnt: the owner of the current key may rotate to it.
        s.rotate_key(&d.device_id, &hex::encode([2u8; 32]), &[3u8; 32], 22).unwrap();
        // The old keys are burnt for good.
        let again = s.rotate_key(&d.device_id, &hex::encode([3u8; 32]), &old, 23).unwrap_err();
        assert!(matches!(again, StoreError::KeyEnrolled(_)), "{again}");
    }
}
