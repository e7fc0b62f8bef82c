//! Checks of every call: signed device calls (signature, clock window, nonce replay,
//! revocation) and admin calls (bearer credential). Failures are gRPC statuses.
use std::sync::Mutex;

use spa_proto::auth::{AuthError, HDR_AUTHORIZATION, SignedHeaders, check_clock, now_ms, sha256};
use spa_proto::replay::NonceWindow;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::status::internal;
use crate::store::{DeviceRecord, Store};

pub struct Auth {
    store: Store,
    nonces: Mutex<NonceWindow>,
    window_ms: u64,
    /// Calls dated before this are refused: their nonces were not kept across the restart.
    start_ms: u64,
    /// The admin credential's file, read on each admin call (rotation takes effect at once).
    admin_path: std::path::PathBuf,
    /// Wrong admin credentials per peer address (`limits.failed_admin_calls_per_minute`).
    admin_attempts: AttemptLimiter,
    /// Signed calls per device (`limits.signed_calls_per_device_per_minute`).
    device_calls: AttemptLimiter<String>,
    refused_log: RefusalLog,
    /// Shared store: (device, hold start) whose kept nonces were loaded (a device has one hold
    /// for its round calls, another for the rest).
    taken: Mutex<std::collections::HashSet<(String, u64)>>,
}

/// A token bucket per key (a peer address, a device): `per_minute` in all, refilled at that
/// rate. For failed attempts (a wrong enrollment token, a wrong admin credential), a key with
/// an empty bucket is refused before its attempt is even checked, so guessing runs at
/// `per_minute`; for signed calls, each call takes one.
pub struct AttemptLimiter<K = std::net::IpAddr> {
    per_minute: f64,
    buckets: Mutex<std::collections::HashMap<K, (f64, std::time::Instant)>>,
}

impl<K: std::hash::Hash + Eq> AttemptLimiter<K> {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute as f64, buckets: Mutex::new(Default::default()) }
    }

    /// Attempts left in a bucket (tokens, last update) now.
    fn level(&self, b: &(f64, std::time::Instant)) -> f64 {
        (b.0 + b.1.elapsed().as_secs_f64() * self.per_minute / 60.0).min(self.per_minute)
    }

    /// Whether `key` may try now (unknown peers always may: there is nothing to key on).
    pub fn allowed(&self, key: Option<K>) -> bool {
        let Some(key) = key else { return true };
        let g = crate::lock(&self.buckets);
        g.get(&key).is_none_or(|b| self.level(b) >= 1.0)
    }

    /// A failed attempt from `key` costs one.
    pub fn failed(&self, key: Option<K>) {
        if let Some(key) = key {
            self.take(key);
        }
    }

    /// Takes one from `key`'s bucket if it holds one; whether it did.
    pub fn take(&self, key: K) -> bool {
        let mut g = crate::lock(&self.buckets);
        if g.len() > 10_000 {
            // Forget the keys whose buckets refilled: the map stays bounded.
            g.retain(|_, b| self.level(b) < self.per_minute);
        }
        let level = g.get(&key).map_or(self.per_minute, |b| self.level(b));
        g.insert(key, ((level - 1.0).max(0.0), std::time::Instant::now()));
        level >= 1.0
    }
}

/// Refused calls are logged at most once a second, with how many were refused meanwhile: a
/// flood of bad signatures or credential guesses cannot fill a disk with log lines.
#[derive(Default)]
struct RefusalLog(Mutex<Option<(std::time::Instant, u64)>>);

impl RefusalLog {
    /// `kind`: "device" or "admin" (the metric's label).
    fn refused(&self, kind: &str, why: &dyn std::fmt::Display) {
        crate::metrics::METRICS.refused_calls.get_or_create(&crate::metrics::Kind { kind: kind.into() }).inc();
        let mut g = crate::lock(&self.0);
        let now = std::time::Instant::now();
        match g.as_mut() {
            Some((last, n)) if now.duration_since(*last) < std::time::Duration::from_secs(1) => *n += 1,
            _ => {
                let before = g.map_or(0, |(_, n)| n);
                tracing::warn!(suppressed = before, "refused a call ({kind}): {why}");
                *g = Some((now, 0));
            }
        }
    }
}

/// Why an open stream may no longer be served, checked between its messages or chunks.
pub enum Ended {
    /// Revoked: the stream and its session end.
    Revoked(Status),
    /// The key the stream was opened with was rotated: the stream ends, its session stays
    /// resumable by the same device under its new key.
    Rotated(Status),
}

/// Whether `device` may still be served on a stream opened with `key_hex`.
pub async fn still_allowed(store: &Store, device: &str, key_hex: &str) -> Result<(), Ended> {
    match store.device(device).await {
        Ok(Some(d)) if d.revoked => Err(Ended::Revoked(AuthError::Revoked(d.device_id).into())),
        Ok(Some(d)) if d.public_key_hex != key_hex => {
            Err(Ended::Rotated(Status::unauthenticated("this device's key was rotated after the stream opened: open it again with the new key")))
        }
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Ended::Revoked(AuthError::UnknownDevice(device.into()).into())),
        Err(e) => Err(Ended::Revoked(e.into())),
    }
}

/// `items` as a stream that ends with the status as soon as `rec`'s device is revoked or
/// its key rotated (checked before each item); `held` lives as long as the stream.
pub fn cut_on_revocation<T: Send + 'static>(
    store: Store,
    rec: DeviceRecord,
    items: Vec<T>,
    held: impl Send + 'static,
) -> impl futures_util::Stream<Item = Result<T, Status>> + Send {
    futures_util::stream::unfold((items.into_iter(), Some((store, rec, held))), |(mut items, live)| async move {
        let (store, rec, held) = live?;
        let item = items.next()?;
        match still_allowed(&store, &rec.device_id, &rec.public_key_hex).await {
            Ok(()) => Some((Ok(item), (items, Some((store, rec, held))))),
            Err(Ended::Revoked(e) | Ended::Rotated(e)) => Some((Err(e), (items, None))),
        }
    })
}

/// Who serves a signed call here, from its headers: calls dated at or after `since_ms`.
pub struct Hold {
    pub headers: SignedHeaders,
    pub since_ms: u64,
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Replays across a restart: calls dated before this start (or before the last tick of the
    /// previous run, if the clock went back) are refused whole; the nonces of calls dated
    /// after their acceptance (a device clock running fast) were persisted and are loaded.
    /// So an ordinary call costs no write. On a store that replicas share, one replica serves
    /// a device's calls at a time (its round calls: the leader; the others: their member,
    /// [`crate::members`]) and the caller says since when (`since_ms`): calls dated earlier are
    /// refused; for those dated within a clock window after it, the nonces the store keeps for
    /// the device (the future-dated calls another replica accepted) join the window first, once
    /// per device and hold.
    pub async fn new(store: Store, cfg: &crate::config::CoordinatorConfig, admin_path: &std::path::Path) -> crate::error::Result<Self> {
        let window_ms = cfg.auth.clock_window_secs * 1000;
        let (capacity, per_device) = (cfg.auth.max_nonces, cfg.auth.max_nonces_per_device);
        let now = now_ms();
        let mut w = NonceWindow::new(window_ms, capacity, per_device);
        // A shared store is the window itself (every call's nonce is there): nothing to load.
        if !store.shared() {
            for (d, n, ts) in store.nonces_since(now.saturating_sub(window_ms)).await? {
                let _ = w.check_and_insert(&d, &n, ts, now);
            }
        }
        store.prune_nonces(now.saturating_sub(window_ms)).await?;
        let start_ms = now.max(store.clock_mark().await?);
        Ok(Self {
            store,
            nonces: Mutex::new(w),
            window_ms,
            start_ms,
            admin_path: admin_path.to_path_buf(),
            admin_attempts: AttemptLimiter::new(cfg.limits.failed_admin_calls_per_minute),
            device_calls: AttemptLimiter::new(cfg.limits.signed_calls_per_device_per_minute),
            refused_log: RefusalLog::default(),
            taken: Mutex::default(),
        })
    }

    /// A signed call's headers; a malformed one is a refused call.
    pub fn headers(&self, md: &MetadataMap) -> Result<SignedHeaders, Status> {
        SignedHeaders::from_metadata(md).map_err(Status::from).inspect_err(|e| self.refused_log.refused("device", &e.message()))
    }

    /// A signed call under `hold` (whose replica serves it, since when:
    /// [`crate::state::Shared::hold`]); `digest` is the body's the signature covers (a
    /// client-streaming call's: its first message's).
    pub async fn check(&self, hold: Hold, method: &str, digest: &[u8; 32]) -> Result<DeviceRecord, Status> {
        self.check_signed(&hold.headers, method, digest, hold.since_ms).await.inspect_err(|e| self.refused_log.refused("device", &e.message()))
    }

    async fn check_signed(&self, h: &SignedHeaders, method: &str, digest: &[u8; 32], since_ms: u64) -> Result<DeviceRecord, Status> {
        let rec = self.store.device(&h.device_id).await.map_err(Status::from)?.ok_or(AuthError::UnknownDevice(h.device_id.clone()))?;
        let pk = hex::decode(&rec.public_key_hex).map_err(internal)?;
        // A weak key enrolled before keys were checked (listed at start) signs nothing.
        spa_proto::auth::check_public_key(&pk).map_err(|_| AuthError::BadSignature)?;
        // The signature first: only the device itself learns that it is revoked.
        h.verify(&pk, method, digest)?;
        if rec.revoked {
            return Err(AuthError::Revoked(rec.device_id).into());
        }
        if !self.device_calls.take(rec.device_id.clone()) {
            return Err(Status::resource_exhausted("this device makes signed calls faster than limits.signed_calls_per_device_per_minute; slow down"));
        }
        let now = now_ms();
        check_clock(h.ts_ms, now, self.window_ms)?;
        let start_ms = self.start_ms.max(since_ms);
        if h.ts_ms < start_ms {
            return Err(AuthError::SignedBeforeStart { ts_ms: h.ts_ms, start_ms }.into());
        }
        // A call accepted elsewhere before `start_ms` is dated at most a window past it.
        if self.store.shared() && h.ts_ms < start_ms + self.window_ms {
            self.take_over(&h.device_id, start_ms, now).await?;
        }
        self.nonces.lock().map_err(internal)?.check_and_insert(&h.device_id, &h.nonce_hex, h.ts_ms, now)?;
        if h.ts_ms > now && !self.store.record_nonce(&h.device_id, &h.nonce_hex, h.ts_ms).await.map_err(Status::from)? {
            return Err(AuthError::Replay.into());
        }
        self.store.touch(&h.device_id, now);
        Ok(rec)
    }

    /// Once per device and hold (`start_ms`: since when this process serves it), adds the
    /// nonces the store keeps for the device (the future-dated calls another replica, or this
    /// one before a restart, accepted) to the window.
    async fn take_over(&self, device: &str, start_ms: u64, now: u64) -> Result<(), Status> {
        let key = (device.to_owned(), start_ms);
        if crate::lock(&self.taken).contains(&key) {
            return Ok(());
        }
        let kept = self.store.device_nonces(device, now.saturating_sub(self.window_ms)).await.map_err(Status::from)?;
        let mut w = self.nonces.lock().map_err(internal)?;
        for (nonce, ts) in kept {
            let _ = w.check_and_insert(device, &nonce, ts, now);
        }
        let mut taken = crate::lock(&self.taken);
        if taken.len() > 100_000 {
            taken.retain(|(_, s)| *s + self.window_ms > now);
        }
        taken.insert(key);
        Ok(())
    }

    /// An admin call: the bearer credential, guessed at most `failed_admin_calls_per_minute`
    /// times a minute from one address (then refused before it is compared).
    pub fn admin<M>(&self, req: &Request<M>) -> Result<(), Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        if !self.admin_attempts.allowed(peer) {
            self.refused_log.refused("admin", &"throttled address");
            return Err(Status::resource_exhausted("too many wrong admin credentials from this address; wait a minute"));
        }
        let md = req.metadata();
        let v = md.get(HDR_AUTHORIZATION).ok_or(AuthError::Missing(HDR_AUTHORIZATION))?;
        let v = v.to_str().map_err(|_| AuthError::Malformed(HDR_AUTHORIZATION))?;
        let cred = v.strip_prefix("Bearer ").ok_or(AuthError::Malformed(HDR_AUTHORIZATION))?;
        let current = std::fs::read_to_string(&self.admin_path).map_err(|e| {
            tracing::error!("cannot read the admin credential {}: {e}", self.admin_path.display());
            Status::unavailable("the coordinator cannot read its admin credential file")
        })?;
        if !same(&sha256(cred.trim().as_bytes()), &sha256(current.trim().as_bytes())) {
            self.admin_attempts.failed(peer);
            self.refused_log.refused("admin", &"wrong credential");
            return Err(AuthError::BadAdmin.into());
        }
        Ok(())
    }

    /// The server's tick: records the clock mark; `prune` also forgets persisted nonces
    /// that can no longer pass the clock check.
    pub async fn tick(&self, prune: bool) {
        let now = now_ms();
        let _ = self.store.set_clock_mark(now).await;
        if prune {
            let _ = self.store.prune_nonces(now.saturating_sub(self.window_ms)).await;
        }
    }
}
