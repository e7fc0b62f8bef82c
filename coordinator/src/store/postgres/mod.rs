//! The PostgreSQL backend, for coordinator replicas sharing one database: [`schema`] applies
//! the SQL migrations (`coordinator/migrations/`), [`devices`] and [`rounds`] hold the
//! operations, each one transaction where it changes more than one row; [`backend`] is the
//! [`Backend`](super::Backend) implementation; [`cache`] keeps device records in memory,
//! invalidated through LISTEN/NOTIFY. Records are the same JSON as sled's, in jsonb.
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, NoTls, Row};

use super::seen::Seen;
use super::{Event, Result, StoreError};

mod backend;
pub mod cache;
mod devices;
mod rounds;
pub mod schema;

/// How long a call waits for a connection, or for one to be made, before it fails (UNAVAILABLE).
const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The PostgreSQL store: a pool of connections to one database.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    seen: Arc<Seen>,
    devices: Arc<cache::DeviceCache>,
    _listener: Arc<crate::AbortOnDrop>,
}

impl PgStore {
    /// Connects to `conninfo` (a libpq connection string or URL) with at most `connections`
    /// connections, and brings the schema up to this binary's (refusing a newer one).
    pub async fn connect(conninfo: &str, connections: usize) -> Result<Self> {
        let mut cfg: tokio_postgres::Config = conninfo.parse().map_err(|e| StoreError::Backend(format!("PostgreSQL connection string: {e}")))?;
        // A database that hangs (a partition) fails calls after seconds, not TCP's minutes.
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(WAIT);
        }
        let mgr = Manager::from_config(cfg.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(mgr)
            .max_size(connections.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .build()
            .map_err(|e| StoreError::Backend(format!("PostgreSQL pool: {e}")))?;
        schema::migrate(&mut *pool.get().await.map_err(|e| StoreError::Io(format!("PostgreSQL: {e}")))?).await?;
        // After the migration: the trigger the listener relies on exists.
        let devices = Arc::new(cache::DeviceCache::default());
        let listener = cache::listen(cfg, devices.clone());
        Ok(Self { pool, seen: Default::default(), devices, _listener: Arc::new(listener) })
    }

    /// Whether device lookups are served from memory now (the listener is up).
    pub fn device_cache_live(&self) -> bool {
        self.devices.is_live()
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| StoreError::Io(format!("PostgreSQL: {e}")))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // No SQL state: the connection failed, not the statement.
        match e.code() {
            None => StoreError::Io(format!("PostgreSQL: {e}")),
            Some(code) => StoreError::Backend(format!("PostgreSQL ({}): {e}", code.code())),
        }
    }
}

/// Whether `e` is a unique-constraint violation (a concurrent insert of the same key won).
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Column `i` of `row` as a record of type `T`.
fn rec<T: for<'a> serde::Deserialize<'a>>(row: &Row, i: usize) -> Result<T> {
    row.try_get::<_, Json<T>>(i).map(|j| j.0).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn recs<T: for<'a> serde::Deserialize<'a>>(rows: &[Row]) -> Result<Vec<T>> {
    rows.iter().map(|r| rec(r, 0)).collect()
}

/// ids and times are u64 in the records, bigint in the database.
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Appends an event, inside the caller's transaction when it has one.
async fn log_in(c: &impl GenericClient, kind: &str, detail: &str) -> Result<()> {
    c.execute("INSERT INTO events (ts_ms, kind, detail) VALUES ($1, $2, $3)", &[&big(spa_proto::auth::now_ms()), &kind, &detail]).await?;
    Ok(())
}

impl PgStore {
    async fn log(&self, kind: &str, detail: &str) -> Result<()> {
        log_in(&**self.client().await?, kind, detail).await
    }

    async fn events(&self) -> Result<Vec<Event>> {
        let rows = self.client().await?.query("SELECT ts_ms, kind, detail FROM events ORDER BY id", &[]).await?;
        Ok(rows.iter().map(|r| Event { ts_ms: unbig(r.get(0)), kind: r.get(1), detail: r.get(2) }).collect())
    }

    async fn prune_history(&self, keep_rounds: u64, events_before_ms: u64) -> Result<(usize, usize)> {
        let c = self.client().await?;
        let rounds = match keep_rounds {
            0 => 0,
            keep => {
                let sql = "DELETE FROM rounds WHERE round_id <= (SELECT max(round_id) FROM rounds) - $1 \
                           AND rec->>'state' IN ('committed', 'aborted')";
                c.execute(sql, &[&big(keep)]).await?
            }
        };
        let events = c.execute("DELETE FROM events WHERE ts_ms < $1", &[&big(events_before_ms)]).await?;
        Ok((rounds as usize, events as usize))
    }

    /// Writes the pending last-call times (a commit is durable already).
    async fn flush(&self) -> Result<()> {
        let pending = self.seen.take();
        if pending.is_empty() {
            return Ok(());
        }
        let (ids, ms): (Vec<&str>, Vec<i64>) = pending.iter().map(|(id, ms)| (id.as_str(), big(*ms))).unzip();
        let sql = "INSERT INTO last_seen (device_id, ms) SELECT * FROM unnest($1::text[], $2::bigint[]) \
                   ON CONFLICT (device_id) DO UPDATE SET ms = GREATEST(last_seen.ms, EXCLUDED.ms)";
        let written = match self.client().await {
            Ok(c) => c.execute(sql, &[&ids, &ms]).await.map_err(StoreError::from),
            Err(e) => Err(e),
        };
        written.map(|_| ()).inspect_err(|_| self.seen.restore(pending))
    }

    /// Whether the database answers (the pool replaces broken connections itself).
    async fn heal(&self) -> bool {
        match self.client().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok() && self.flush().await.is_ok(),
            Err(_) => false,
        }
    }
}
