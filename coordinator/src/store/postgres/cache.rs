//! Device records cached on each replica, kept true through LISTEN/NOTIFY: every commit that
//! changes a `devices` row notifies channel `spa_devices` with its id (a trigger, migration
//! 0003, so every writer notifies: any replica, any admin verb), and each replica's listener
//! connection drops that entry. Every signed call looks its device up; with the cache it reads
//! memory, not the database.
//!
//! The cache serves only while its listener is connected and listening: at start, and from the
//! moment the connection is lost (the database restarted, a partition caught by a probe every
//! second) until it is back, it is empty and off, so every lookup reads the database and no
//! change can be missed. A revocation on one replica is therefore honoured by every other one
//! as soon as its notification arrives (milliseconds), or, with the listener down, at once.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::store::records::DeviceRecord;
use crate::{AbortOnDrop, lock};

/// The notification channel (the trigger's, in migration 0003).
pub const CHANNEL: &str = "spa_devices";

/// The listener connection's `application_name`.
pub const APPLICATION_NAME: &str = "spa-device-listener";

/// How often the listener proves its connection alive, and how long the proof may take: a
/// partition that leaves the socket open is found within about their sum.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct DeviceCache {
    map: Mutex<HashMap<String, DeviceRecord>>,
    /// Grows at every invalidation: a lookup keeps what it read only if none happened since
    /// it began (a notification racing the read must win).
    generation: AtomicU64,
    /// Whether the listener is listening: the cache is used only then.
    live: AtomicBool,
}

impl DeviceCache {
    /// The cached record of `id`, while the cache is live.
    pub fn get(&self, id: &str) -> Option<DeviceRecord> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.map).get(id).cloned()
    }

    /// Call before reading a record from the database; hand the value to [`DeviceCache::put`].
    pub fn begin(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps `rec`, read after [`DeviceCache::begin`] returned `generation`, unless the cache
    /// is off or something was invalidated meanwhile.
    pub fn put(&self, rec: &DeviceRecord, generation: u64) {
        let mut map = lock(&self.map);
        if self.live.load(Ordering::Acquire) && self.generation.load(Ordering::Acquire) == generation {
            map.insert(rec.device_id.clone(), rec.clone());
        }
    }

    /// Drops `id`'s entry (a notification, or this replica's own write).
    pub fn invalidate(&self, id: &str) {
        let mut map = lock(&self.map);
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(id);
    }

    /// Whether lookups are served from memory now (a metric, the tests).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn set_live(&self, live: bool) {
        let mut map = lock(&self.map);
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
        self.live.store(live, Ordering::Release);
    }
}

/// Starts the listener of `cache` on its own connection (not the pool's: a LISTEN belongs to
/// one session); it reconnects every second while the database is away.
pub(crate) fn listen(mut cfg: tokio_postgres::Config, cache: Arc<DeviceCache>) -> AbortOnDrop {
    // Named, so an operator (or a test) finds it in pg_stat_activity.
    cfg.application_name(APPLICATION_NAME);
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let why = listen_once(&cfg, &cache).await;
            if cache.is_live() {
                tracing::warn!("device cache off ({why}); lookups read the database until the listener is back");
            }
            cache.set_live(false);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

/// One listening session: connects, LISTENs, turns the cache on, and returns why it ended
/// when the connection closes or stops answering.
async fn listen_once(cfg: &tokio_postgres::Config, cache: &Arc<DeviceCache>) -> String {
    let (client, mut conn) = match cfg.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let pump_cache = cache.clone();
    // The connection must be driven for any query to finish: it runs beside the probes.
    let mut pump = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => pump_cache.invalidate(n.payload()),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "the listener's connection closed".to_string()
    });
    let probe = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| e.to_string())?;
        cache.set_live(true);
        tracing::info!("device cache on (listening for device changes)");
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            match tokio::time::timeout(PROBE_TIMEOUT, client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err::<(), String>(e.to_string()),
                Err(_) => return Err("the database stopped answering".into()),
            }
        }
    };
    let why = tokio::select! {
        r = probe => r.err().unwrap_or_default(),
        r = &mut pump => r.unwrap_or_else(|e| e.to_string()),
    };
    pump.abort();
    why
}
