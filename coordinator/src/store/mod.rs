//! The coordinator's durable state in sled, by domain: [`devices`] (enrollment tokens kept
//! as hashes, device records and keys, last-call times, nonces of signed calls), [`rounds`]
//! (global checkpoints by version, runs, rounds, the server optimizer), [`records`] (what a
//! run and a round record hold) and, here, the handle, its trees and the event log. Every
//! state change that a caller acknowledges is flushed to disk first; every change that spans
//! trees is one transaction.
use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;

mod devices;
pub mod records;
mod rounds;

pub use devices::{DeviceRecord, TokenRecord, device_id_of, token_hash};

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

    /// Opens a store this process just closed: sled's background writer may hold the file
    /// lock a moment after the handle is dropped (seen once in six runs under load).
    fn reopen(path: &Path) -> Store {
        let started = std::time::Instant::now();
        loop {
            match Store::open(path) {
                Ok(s) => return s,
                Err(_) if started.elapsed() < std::time::Duration::from_secs(5) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A new run of `rounds` rounds of `strategy` with run id `run_id` (as `create_run` asks).
    fn new_run(run_id: u64, rounds: u32, strategy: spa_aggregation::strategy::StrategyName) -> crate::store::records::RunRecord {
        use crate::store::records::{RoundPlan, RunRecord, RunState};
        let plan = RoundPlan {
            rounds,
            min_clients: 2,
            max_clients: 2,
            deadline_secs: 60,
            local_epochs: 1,
            lr: 0.01,
            strategy,
            prox_mu: 0.0,
            dp_l2_clip: 0.0,
            dp_noise_multiplier: 0.0,
        };
        RunRecord { run_id, plan, created_ms: 0, rounds_started: 0, state: RunState::Active }
    }

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
        let s = reopen(dir.path());
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

    /// The rounds domain: runs and rounds by id, a commit (checkpoint, round, optimizer) as
    /// one transaction that never overwrites a version, and all of it after a reopen.
    #[test]
    fn rounds_commit_as_one_and_read_back_in_order() {
        use crate::store::records::{RoundRecord, RoundState};
        use spa_aggregation::strategy::{ServerOptimizer, StrategyName};
        let dir = tempfile::tempdir().unwrap();
        let optimizer = ServerOptimizer::new(StrategyName::FedAdam.config(0.0).unwrap()).unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut run = s.create_run(|run_id| new_run(run_id, 3, StrategyName::FedAdam)).unwrap();
            for id in 1..=3 {
                run.rounds_started += 1;
                let rec = RoundRecord::new(s.next_round_id().unwrap(), &run);
                assert_eq!(rec.round_id, id);
                s.start_round(&run, &rec).unwrap();
            }
            let mut rec = s.round(2).unwrap().unwrap();
            (rec.state, rec.committed_version) = (RoundState::Committed, Some(1));
            s.commit_round(1, b"v1", &rec, &optimizer).unwrap();
            // A version is never overwritten, and a refused commit changes nothing.
            let mut other = s.round(3).unwrap().unwrap();
            other.state = RoundState::Committed;
            assert!(matches!(s.commit_round(1, b"other", &other, &optimizer), Err(StoreError::VersionExists(1))));
            assert_eq!(s.round(3).unwrap().unwrap().state, RoundState::Selecting);
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.runs().unwrap()[0].rounds_started, 3);
        assert_eq!(s.checkpoint(1).unwrap().unwrap(), b"v1");
        assert_eq!(s.round(2).unwrap().unwrap().committed_version, Some(1));
        let ids = |rs: Vec<RoundRecord>| rs.iter().map(|r| r.round_id).collect::<Vec<_>>();
        assert_eq!(ids(s.rounds_before(Some(3), 1).unwrap()), [2]);
        assert_eq!(ids(s.rounds_before(None, 2).unwrap()), [2, 3]);
        assert_eq!(s.latest_round().unwrap().unwrap().round_id, 3);
        let json = |o: &ServerOptimizer| serde_json::to_string(o).unwrap();
        assert_eq!(json(&s.optimizer().unwrap().unwrap()), json(&optimizer));
        assert!(s.events().unwrap().iter().any(|e| e.kind == "checkpoint.commit"));
    }

    /// Concurrent writers of one record: run ids are never shared, concurrent evaluations of a
    /// round are all kept, a token revocation keeps the enrollment that used it meanwhile, a
    /// device revocation keeps a key rotated meanwhile.
    #[test]
    fn concurrent_writers_lose_nothing() {
        use spa_aggregation::strategy::StrategyName;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let make = |run_id| new_run(run_id, 1, StrategyName::FedAvg);
        let mut ids: Vec<u64> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| (0..8).map(|_| s.create_run(make).unwrap().run_id).collect::<Vec<_>>())).collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        ids.sort();
        assert_eq!(ids, (1..=32).collect::<Vec<u64>>());
        assert_eq!(s.runs().unwrap().len(), 32);
        // Devices reporting their evaluations of one round at once: every report is kept.
        let run = s.runs().unwrap().remove(0);
        let rec = crate::store::records::RoundRecord::new(s.next_round_id().unwrap(), &run);
        s.start_round(&run, &rec).unwrap();
        let metrics = |k: u64| crate::store::records::DeviceMetrics { tokens: k + 1, ..Default::default() };
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let s = &s;
                sc.spawn(move || (0..8).for_each(|k| assert!(s.add_round_metrics(rec.round_id, &format!("dev-{t}-{k}"), metrics(k)).unwrap())));
            }
        });
        let back = s.round(rec.round_id).unwrap().unwrap();
        assert_eq!((back.metrics.len(), back.mean_metrics.map(|m| m.tokens)), (32, Some(4 * (1..=8).sum::<u64>())));
        assert!(!s.add_round_metrics(rec.round_id + 100, "dev", metrics(0)).unwrap(), "no such round");
        for i in 0..40u8 {
            let name = format!("tok-{i:03}-race");
            let rec =
                TokenRecord { token_id: name.clone(), created_at_ms: 0, expires_at_ms: u64::MAX, note: String::new(), used_by: None, revoked_at_ms: None };
            s.add_token(&token_hash(&name), &rec).unwrap();
            let (enrolled, _) = std::thread::scope(|sc| {
                let e = sc.spawn(|| s.enroll(&token_hash(&name), &[i + 1; 32], "d", 10));
                let r = sc.spawn(|| s.revoke_token(&name, 11));
                (e.join().unwrap(), r.join().unwrap())
            });
            if let Ok(d) = enrolled {
                let tok = s.tokens().unwrap().into_iter().find(|t| t.used_by.as_deref() == Some(d.device_id.as_str()));
                assert!(tok.is_some(), "round {i}: the enrollment's used_by was overwritten");
                let (rotated, _) = std::thread::scope(|sc| {
                    let k = sc.spawn(|| s.rotate_key(&d.device_id, &d.public_key_hex, &[i + 101; 32], 12));
                    let r = sc.spawn(|| s.revoke(&d.device_id, 13));
                    (k.join().unwrap(), r.join().unwrap())
                });
                let now = s.device(&d.device_id).unwrap().unwrap();
                assert!(now.revoked, "round {i}");
                if let Ok(r) = rotated {
                    assert_eq!(now.public_key_hex, r.public_key_hex, "round {i}: the rotated key was written back over");
                }
            }
        }
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
