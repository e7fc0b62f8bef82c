//! What every handler shares (the store, auth, the backbone worker, rounds, config) and the
//! per-device permits: the bottom floor of the service, so that handlers are siblings that
//! import it, never each other.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use spa_proto::auth::body_digest;
use spa_proto::methods;
use spa_proto::reason::{LEADER, OWNER, Reason, invalid};
use spa_proto::tensor::dtype_size;
use spa_proto::v1::DType;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status};

use crate::auth::{Auth, Hold};
use crate::config::CoordinatorConfig;
use crate::engine::Engine;
use crate::members::{Members, Route};
use crate::store::{DeviceRecord, Store};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// State shared by the services.
pub struct Shared {
    pub store: Store,
    pub auth: Auth,
    pub engine: Engine,
    pub rounds: Arc<crate::rounds::Rounds>,
    /// This process among those serving devices on a shared store (None: it serves every
    /// device, alone on its store).
    pub members: Option<Arc<Members>>,
    pub config: CoordinatorConfig,
    pub started: Instant,
    /// One permit per open Generate stream (`limits.max_sessions`), held by the stream's
    /// task: released however the task ends, a panic included. And the next session id.
    pub(crate) sessions: Arc<tokio::sync::Semaphore>,
    /// Failed enrollments per peer address (`limits.failed_enrollments_per_minute`).
    pub(crate) enroll_attempts: crate::auth::AttemptLimiter,
    /// Open Generate streams per device (`limits.max_sessions_per_device`).
    pub(crate) device_sessions: Arc<PerDevice>,
    /// Features requests per device, computing or not yet read (`limits.max_feature_requests_per_device`).
    pub(crate) device_features: Arc<PerDevice>,
    pub(crate) next_session: AtomicU64,
    /// TCP connections open now (`conn::capped` counts them; `limits.max_connections`).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shared {
    pub fn new(
        store: Store,
        auth: Auth,
        engine: Engine,
        rounds: Arc<crate::rounds::Rounds>,
        members: Option<Arc<Members>>,
        config: CoordinatorConfig,
    ) -> Arc<Self> {
        let max_sessions = config.limits.max_sessions;
        let failed_enrollments = config.limits.failed_enrollments_per_minute;
        Arc::new(Self {
            store,
            auth,
            engine,
            rounds,
            members,
            config,
            started: Instant::now(),
            sessions: Arc::new(tokio::sync::Semaphore::new(max_sessions)),
            device_sessions: Default::default(),
            device_features: Default::default(),
            enroll_attempts: crate::auth::AttemptLimiter::new(failed_enrollments),
            next_session: AtomicU64::new(1),
            connections: Default::default(),
        })
    }
}

impl Shared {
    /// A signed unary or server-streaming call served here ([`Self::hold`]); the signature
    /// covers its body.
    pub async fn signed<M: prost::Message>(&self, req: &Request<M>, method: &str) -> Result<DeviceRecord, Status> {
        let hold = self.hold(req.metadata(), method).await?;
        self.auth.check(hold, method, &body_digest(req.get_ref())).await
    }

    /// Whether this process serves the signed call `md` to `method`, and since when: round
    /// calls (the Rounds service but GetGlobal) are the leader's, every other call the
    /// device's member's. Checked before the signature (and before a client stream's first
    /// message is read): a call for another replica is turned away with no effect here.
    pub async fn hold(&self, md: &MetadataMap, method: &str) -> Result<Hold, Status> {
        let headers = self.auth.headers(md)?;
        let leaders = method.starts_with("/spa.v1.Rounds/") && method != methods::ROUNDS_GET_GLOBAL;
        let since_ms = if leaders { self.round_hold().await? } else { self.device_hold(&headers.device_id)? };
        Ok(Hold { headers, since_ms })
    }

    /// Whether this process serves `device` (Ok: since when), else NOT_OWNER naming the
    /// member that does, or UNAVAILABLE while no member is known to.
    fn device_hold(&self, device: &str) -> Result<u64, Status> {
        let Some(members) = &self.members else { return Ok(0) };
        match members.route(device) {
            Route::Here { since_ms } => Ok(since_ms),
            Route::Elsewhere(url) => {
                redirected("owner");
                let msg = format!("another coordinator serves device {device}: call {url}");
                Err(Reason::NotOwner.status_with(Code::FailedPrecondition, msg, [(OWNER.to_string(), url)].into()))
            }
            Route::Unknown => Err(Status::unavailable(
                "this coordinator does not know which coordinator serves this device now (its store is out of reach, or one just left); retry",
            )),
        }
    }

    /// Whether this process serves round calls: Ok(since: the earliest date of a call it
    /// accepts) while it leads (alone on its store, always), else NOT_LEADER naming the
    /// leader, or UNAVAILABLE while no one leads.
    async fn round_hold(&self) -> Result<u64, Status> {
        if !self.store.shared() {
            return Ok(0);
        }
        if let Some(since) = self.rounds.leading_since() {
            return Ok(since);
        }
        match self.store.leader_url().await? {
            Some(url) if url != self.rounds.url() => {
                redirected("leader");
                let msg = format!("this coordinator does not run the rounds: poll {url}");
                Err(Reason::NotLeader.status_with(Code::FailedPrecondition, msg, [(LEADER.to_string(), url)].into()))
            }
            _ => Err(Status::unavailable("no coordinator runs the rounds now (the leader is being replaced); retry")),
        }
    }
}

fn redirected(kind: &str) {
    crate::metrics::METRICS.redirected_calls.get_or_create(&crate::metrics::Kind { kind: kind.into() }).inc();
}

/// How many of something each device holds (open Generate streams, Features requests), so
/// that one device cannot take what all share.
#[derive(Default)]
pub(crate) struct PerDevice(std::sync::Mutex<std::collections::HashMap<String, usize>>);

/// One held by a device, given back on drop.
pub(crate) struct Held {
    of: Arc<PerDevice>,
    device: String,
}

impl PerDevice {
    /// One more for `device`, unless it holds `max` already.
    pub(crate) fn take(self: &Arc<Self>, device: &str, max: usize) -> Option<Held> {
        let mut held = crate::lock(&self.0);
        let n = held.entry(device.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held { of: self.clone(), device: device.to_string() })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = crate::lock(&self.of.0);
        if let Some(n) = held.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.device);
            }
        }
    }
}

impl Shared {
    pub fn check_version(&self, v: &str) -> Result<(), Status> {
        let served = &self.engine.meta.version;
        if !v.is_empty() && v != served {
            return Err(Status::failed_precondition(format!("backbone version {} is not served (serving '{served}')", crate::status::echo(v))));
        }
        Ok(())
    }

    pub fn check_layers(&self, layers: &[u32]) -> Result<Vec<usize>, Status> {
        let n = self.engine.meta.config.num_layers;
        if layers.is_empty() {
            return Err(invalid("layers", "layers must not be empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for &l in layers {
            if l as usize > n {
                return Err(invalid("layers", format!("layer {l} out of range 0..={n}")));
            }
            if !seen.insert(l) {
                return Err(invalid("layers", format!("layer {l} requested twice")));
            }
        }
        Ok(layers.iter().map(|&l| l as usize).collect())
    }

    pub fn check_dtype(dtype: i32) -> Result<usize, Status> {
        match DType::try_from(dtype) {
            Ok(DType::DtypeF32) | Ok(DType::DtypeF16) => Ok(dtype_size(dtype).expect("known dtype")),
            _ => Err(invalid("dtype", format!("dtype {dtype} unsupported for features (DTYPE_F32 or DTYPE_F16)"))),
        }
    }

    /// Token ids of request field `field`, `already` tokens in the session before them.
    pub fn check_ids(&self, field: &str, ids: &[u32], already: usize) -> Result<(), Status> {
        let cfg = &self.engine.meta.config;
        if ids.is_empty() {
            return Err(invalid(field, format!("{field}: empty token sequence")));
        }
        if already + ids.len() > cfg.max_position_embeddings {
            return Err(invalid(
                field,
                format!(
                    "{field}: a sequence of {} tokens (+{already} already in the session) exceeds the context of {}",
                    ids.len(),
                    cfg.max_position_embeddings
                ),
            ));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(invalid(field, format!("{field}: token id {bad} out of vocabulary (size {})", cfg.vocab_size)));
        }
        Ok(())
    }
}

impl Shared {
    /// The gauges of the metrics endpoint, read now.
    pub async fn gauges(&self) -> crate::metrics::Gauges {
        crate::metrics::Gauges {
            devices_enrolled: self.store.devices().await.map(|d| d.iter().filter(|d| !d.revoked).count()).unwrap_or(0),
            devices_online: self.rounds.online_count(),
            generation_sessions: self.config.limits.max_sessions.saturating_sub(self.sessions.available_permits()),
            open_connections: self.connections.load(std::sync::atomic::Ordering::SeqCst),
            leader: self.rounds.lease().is_some(),
            member: self.members.as_ref().is_some_and(|m| m.serving()),
            device_cache: self.store.device_cache_live(),
        }
    }
}
