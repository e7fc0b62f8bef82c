//! Schema migrations, applied in order on start inside one transaction that holds an
//! advisory lock, so coordinators starting together apply each once. A database whose
//! schema is newer than this binary's is refused: an older coordinator must not write rows
//! it does not understand.
use crate::store::{Result, StoreError};

/// (version, SQL), in order; a released migration is never edited, only followed.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../../migrations/0001_init.sql")),
    (2, include_str!("../../../migrations/0002_leader_lease.sql")),
    (3, include_str!("../../../migrations/0003_device_notify.sql")),
    (4, include_str!("../../../migrations/0004_members.sql")),
];

/// The advisory lock's key ("SPA-SCHM"), shared by every coordinator of a deployment.
const LOCK_KEY: i64 = 0x5350_412d_5343_484d;

/// The newest schema this binary knows.
pub fn newest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Brings the database to [`newest`]; returns the version it found.
pub async fn migrate(client: &mut deadpool_postgres::ClientWrapper) -> Result<i32> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS spa_schema (version integer NOT NULL)").await?;
    let found: i32 = tx.query_opt("SELECT version FROM spa_schema", &[]).await?.map_or(0, |r| r.get(0));
    if found > newest() {
        return Err(StoreError::Schema(format!(
            "the database's schema is version {found}, newer than this coordinator's ({}): run a coordinator at least as new as the one that wrote it",
            newest()
        )));
    }
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await.map_err(|e| StoreError::Schema(format!("migration {v}: {e}")))?;
    }
    if found == 0 {
        tx.execute("INSERT INTO spa_schema (version) VALUES ($1)", &[&newest()]).await?;
    } else if found < newest() {
        tx.execute("UPDATE spa_schema SET version = $1", &[&newest()]).await?;
    }
    tx.commit().await?;
    if found < newest() {
        tracing::info!(from = found, to = newest(), "PostgreSQL schema migrated");
    }
    Ok(found)
}
