//! The embedded store, in sled: one tree per kind of record, JSON values, big-endian ids as
//! keys (so trees iterate in id order). [`devices`] and [`rounds`] hold the synchronous
//! operations on [`Sled`]; [`SledStore`] runs each on tokio's blocking pool (sled flushes to
//! disk before a change is acknowledged) and implements [`Backend`].
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;

use super::seen::Seen;
use super::{Event, Result, StoreError};

mod backend;
mod devices;
mod rounds;

/// sled's page cache when the config does not say (sled's own default is 1 GiB, which a
/// coordinator writing a nonce per signed call fills, and keeps).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// The sled store, as a [`Backend`](super::Backend).
#[derive(Clone)]
pub struct SledStore(Arc<Sled>);

impl SledStore {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self> {
        let trees = Trees::open(path, cache_bytes)?;
        let cur = RwLock::new(Some(Arc::new(trees)));
        Ok(Self(Arc::new(Sled { path: path.to_path_buf(), cache_bytes, cur, seen: Default::default() })))
    }

    /// Runs `f` on the blocking pool: sled's calls may wait on the disk.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&Sled) -> Result<T> + Send + 'static) -> Result<T> {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || f(&s)).await.map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

/// The synchronous store. After one failed write (a full disk, say) sled refuses every later
/// call until reopened: [`Sled::heal`] closes and reopens it, which succeeds once space
/// returns; meanwhile calls get [`StoreError::Unavailable`] or the I/O error, and nothing
/// acknowledged is lost (every acknowledged change was flushed before the answer).
pub(super) struct Sled {
    path: PathBuf,
    cache_bytes: u64,
    cur: RwLock<Option<Arc<Trees>>>,
    seen: Seen,
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

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(e) => StoreError::Io(e.to_string()),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

/// The id a big-endian key starts with.
fn key_id(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[..8]);
    u64::from_be_bytes(b)
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

impl Sled {
    /// The open store, or Unavailable while it is being reopened.
    fn t(&self) -> Result<Arc<Trees>> {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::Unavailable)
    }

    /// Checks the store (a flush) and, when it failed, closes and reopens it. Reopening runs
    /// sled's recovery from what is on disk, as a restart would; it fails (and is tried
    /// again) while the disk is still full or a call still holds the old handle.
    fn heal(&self) -> bool {
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
                *g = Some(Arc::new(t));
                true
            }
            Err(e) => {
                tracing::error!("the store cannot be reopened yet: {e}");
                false
            }
        }
    }

    /// Writes the pending last-call times and makes everything written so far durable.
    fn flush(&self) -> Result<()> {
        let t = self.t()?;
        self.write_seen(&t)?;
        t.db.flush()?;
        Ok(())
    }

    fn write_seen(&self, t: &Trees) -> Result<()> {
        let pending = self.seen.take();
        let mut batch = sled::Batch::default();
        for (id, ms) in &pending {
            batch.insert(id.as_bytes(), &ms.to_be_bytes()[..]);
        }
        t.last_seen.apply_batch(batch).inspect_err(|_| self.seen.restore(pending))?;
        Ok(())
    }

    fn log(&self, kind: &str, detail: &str) -> Result<()> {
        let t = self.t()?;
        let id = t.db.generate_id()?;
        let e = Event { ts_ms: spa_proto::auth::now_ms(), kind: kind.into(), detail: detail.into() };
        t.events.insert(id.to_be_bytes(), enc(&e))?;
        Ok(())
    }

    fn events(&self) -> Result<Vec<Event>> {
        let t = self.t()?;
        t.events.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Events dated before `before_ms` (ids grow with time, so the scan stops at the first
    /// newer one).
    fn prune_events(&self, before_ms: u64) -> Result<usize> {
        let t = self.t()?;
        let mut n = 0;
        for kv in t.events.iter() {
            let (k, v) = kv?;
            if dec::<Event>(&v)?.ts_ms >= before_ms {
                break;
            }
            t.events.remove(k)?;
            n += 1;
        }
        Ok(n)
    }
}
