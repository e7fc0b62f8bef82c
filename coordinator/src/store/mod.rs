//! The coordinator's durable state. [`Backend`] is the interface, as domain operations
//! (devices and tokens, replay protection, checkpoints, runs and rounds, the event log);
//! [`records`] what it keeps; [`sled`] the embedded implementation, the default;
//! [`postgres`] the one coordinator replicas share. Every part of the coordinator holds a
//! [`Store`], a cheap handle on one backend.
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod backend;
#[cfg(feature = "testing")]
pub mod conformance;
pub mod postgres;
pub mod records;
mod seen;
pub mod sled;

pub use backend::Backend;
pub use records::{DeviceRecord, TokenRecord, device_id_of, token_hash};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's files or connection failed (a full disk, say): retry later.
    #[error("store I/O: {0}")]
    Io(String),
    /// Any other failure of the backend.
    #[error("store: {0}")]
    Backend(String),
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
    /// A round write by a coordinator whose leadership lease expired or moved on.
    #[error("this coordinator no longer holds the leadership lease (term {0}); another one runs the rounds")]
    Fenced(u64),
    /// The database's schema cannot be used by this binary (newer, or a migration failed).
    #[error("store schema: {0}")]
    Schema(String),
}

impl StoreError {
    /// Whether the store failed to read or write (rather than refusing a request).
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Io(_) | StoreError::Unavailable)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: String,
    pub detail: String,
}

/// A handle on the store, shared by every part of the coordinator: the backend's methods
/// through `Deref` (`store.device(id).await`).
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl Store {
    pub fn new(backend: impl Backend) -> Self {
        Self(Arc::new(backend))
    }

    /// The embedded sled store at `path`, with its default page cache.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_cache(path, sled::DEFAULT_CACHE_BYTES)
    }

    /// The embedded sled store at `path`, whose page cache holds at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self> {
        Ok(Self::new(sled::SledStore::open(path, cache_bytes)?))
    }

    /// The PostgreSQL store at `conninfo`, its schema brought up to this binary's.
    pub async fn connect_postgres(conninfo: &str, connections: usize) -> Result<Self> {
        Ok(Self::new(postgres::PgStore::connect(conninfo, connections).await?))
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
