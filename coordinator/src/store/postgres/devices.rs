//! Tokens, devices, keys, last-call times and nonces in PostgreSQL. A change of a token or
//! device record locks its row (`FOR UPDATE`) for the transaction, so concurrent changes of
//! one record are serialized and none is written back over.
use tokio_postgres::types::Json;

use super::{PgStore, big, is_unique_violation, log_in, rec, recs, unbig};
use crate::store::records::{DeviceRecord, TokenRecord, device_id_of};
use crate::store::{Result, StoreError};

const CLOCK_MARK_KEY: &str = "clock_mark";

/// Device `id`'s record, its row locked until the transaction ends.
async fn locked_device(tx: &tokio_postgres::Transaction<'_>, id: &str) -> Result<DeviceRecord> {
    match tx.query_opt("SELECT rec FROM devices WHERE device_id = $1 FOR UPDATE", &[&id]).await? {
        Some(row) => rec(&row, 0),
        None => Err(StoreError::UnknownDevice(id.into())),
    }
}

impl PgStore {
    pub(super) async fn add_token(&self, hash: &[u8; 32], t: &TokenRecord) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO tokens (hash, token_id, rec) VALUES ($1, $2, $3) ON CONFLICT (hash) DO UPDATE SET token_id = $2, rec = $3",
            &[&&hash[..], &t.token_id, &Json(t)],
        )
        .await?;
        log_in(&*tx, "token.create", &format!("{} expires {}", t.token_id, t.expires_at_ms)).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        recs(&self.client().await?.query("SELECT rec FROM tokens ORDER BY hash", &[]).await?)
    }

    pub(super) async fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let row = tx.query_opt("SELECT hash, rec FROM tokens WHERE token_id = $1 ORDER BY hash LIMIT 1 FOR UPDATE", &[&token_id]).await?;
        let Some(row) = row else { return Err(StoreError::UnknownTokenId(token_id.into())) };
        let hash: Vec<u8> = row.get(0);
        let mut t: TokenRecord = rec(&row, 1)?;
        let was_usable = t.check_usable(now_ms).is_ok();
        if t.revoked_at_ms.is_none() {
            t.revoked_at_ms = Some(now_ms);
            tx.execute("UPDATE tokens SET rec = $2 WHERE hash = $1", &[&hash, &Json(&t)]).await?;
            log_in(&*tx, "token.revoke", token_id).await?;
        }
        tx.commit().await?;
        Ok(was_usable)
    }

    pub(super) async fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord> {
        let device_id = device_id_of(public_key);
        let key_hash = spa_proto::auth::sha256(public_key);
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let Some(row) = tx.query_opt("SELECT rec FROM tokens WHERE hash = $1 FOR UPDATE", &[&&hash[..]]).await? else {
            return Err(StoreError::UnknownToken);
        };
        let mut tok: TokenRecord = rec(&row, 0)?;
        tok.check_usable(now_ms)?;
        if let Some(owner) = tx.query_opt("SELECT device_id FROM device_keys WHERE key_hash = $1", &[&&key_hash[..]]).await? {
            return Err(StoreError::KeyEnrolled(owner.get(0)));
        }
        tok.used_by = Some(device_id.clone());
        let d = DeviceRecord::enrolled(public_key, name, &tok.token_id, now_ms);
        tx.execute("UPDATE tokens SET rec = $2 WHERE hash = $1", &[&&hash[..], &Json(&tok)]).await?;
        // A concurrent enrollment of the same key (another token) loses on the primary keys.
        let inserted = async {
            tx.execute("INSERT INTO devices (device_id, rec) VALUES ($1, $2)", &[&device_id, &Json(&d)]).await?;
            tx.execute("INSERT INTO device_keys (key_hash, device_id) VALUES ($1, $2)", &[&&key_hash[..], &device_id]).await
        };
        match inserted.await {
            Err(e) if is_unique_violation(&e) => return Err(StoreError::KeyEnrolled(device_id)),
            r => r?,
        };
        log_in(&*tx, "device.enroll", &format!("{} ({}) with token {}", d.device_id, d.name, d.token_id)).await?;
        tx.commit().await?;
        Ok(d)
    }

    pub(super) async fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord> {
        let new_hash = spa_proto::auth::sha256(new_key);
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let mut d = locked_device(&tx, id).await?;
        if d.revoked {
            return Err(StoreError::DeviceRevoked(id.into()));
        }
        if d.public_key_hex != signed_with {
            return Err(StoreError::KeyChanged(id.into()));
        }
        if let Some(owner) = tx.query_opt("SELECT device_id FROM device_keys WHERE key_hash = $1", &[&&new_hash[..]]).await? {
            return Err(StoreError::KeyEnrolled(owner.get(0)));
        }
        let new_id = device_id_of(new_key);
        if tx.query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&new_id]).await?.is_some() {
            return Err(StoreError::KeyEnrolled(new_id));
        }
        match tx.execute("INSERT INTO device_keys (key_hash, device_id) VALUES ($1, $2)", &[&&new_hash[..], &id]).await {
            Err(e) if is_unique_violation(&e) => return Err(StoreError::KeyEnrolled(new_id)),
            r => r?,
        };
        d.public_key_hex = hex::encode(new_key);
        d.key_rotated_at_ms = Some(now_ms);
        tx.execute("UPDATE devices SET rec = $2 WHERE device_id = $1", &[&id, &Json(&d)]).await?;
        log_in(&*tx, "device.rotate_key", id).await?;
        tx.commit().await?;
        // This replica reads its own write at once, not when the notification comes back.
        self.devices.invalidate(id);
        Ok(d)
    }

    /// Every signed call's lookup: from the cache while its listener is up, else a statement
    /// prepared once per connection (one round trip), whose answer the cache then keeps.
    pub(super) async fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        if let Some(d) = self.devices.get(id) {
            return Ok(Some(d));
        }
        let generation = self.devices.begin();
        let c = self.client().await?;
        let stmt = c.prepare_cached("SELECT rec FROM devices WHERE device_id = $1").await?;
        let d: Option<DeviceRecord> = c.query_opt(&stmt, &[&id]).await?.map(|r| rec(&r, 0)).transpose()?;
        if let Some(d) = &d {
            self.devices.put(d, generation);
        }
        Ok(d)
    }

    pub(super) async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        recs(&self.client().await?.query("SELECT rec FROM devices ORDER BY device_id", &[]).await?)
    }

    pub(super) async fn revoke(&self, id: &str, now_ms: u64) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let mut d = locked_device(&tx, id).await?;
        if d.revoked {
            return Ok(false);
        }
        (d.revoked, d.revoked_at_ms) = (true, Some(now_ms));
        tx.execute("UPDATE devices SET rec = $2 WHERE device_id = $1", &[&id, &Json(&d)]).await?;
        log_in(&*tx, "device.revoke", id).await?;
        tx.commit().await?;
        self.devices.invalidate(id);
        Ok(true)
    }

    pub(super) fn touch(&self, id: &str, now_ms: u64) {
        self.seen.touch(id, now_ms);
    }

    pub(super) async fn last_seen(&self, id: &str) -> Result<u64> {
        if let Some(ms) = self.seen.get(id) {
            return Ok(ms);
        }
        let row = self.client().await?.query_opt("SELECT ms FROM last_seen WHERE device_id = $1", &[&id]).await?;
        Ok(row.map_or(0, |r| unbig(r.get(0))))
    }

    pub(super) async fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<bool> {
        let c = self.client().await?;
        let stmt = c.prepare_cached("INSERT INTO nonces (ts_ms, device_id, nonce) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING").await?;
        Ok(c.execute(&stmt, &[&big(ts_ms), &device, &nonce]).await? == 1)
    }

    pub(super) async fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>> {
        let sql = "SELECT device_id, nonce, ts_ms FROM nonces WHERE ts_ms >= $1 ORDER BY ts_ms, device_id, nonce";
        let rows = self.client().await?.query(sql, &[&big(since_ms)]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), unbig(r.get(2)))).collect())
    }

    pub(super) async fn device_nonces(&self, device: &str, since_ms: u64) -> Result<Vec<(String, u64)>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached("SELECT nonce, ts_ms FROM nonces WHERE device_id = $1 AND ts_ms >= $2").await?;
        let rows = c.query(&stmt, &[&device, &big(since_ms)]).await?;
        Ok(rows.iter().map(|r| (r.get(0), unbig(r.get(1)))).collect())
    }

    pub(super) async fn prune_nonces(&self, before_ms: u64) -> Result<usize> {
        Ok(self.client().await?.execute("DELETE FROM nonces WHERE ts_ms < $1", &[&big(before_ms)]).await? as usize)
    }

    pub(super) async fn set_clock_mark(&self, now_ms: u64) -> Result<()> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2";
        self.client().await?.execute(sql, &[&CLOCK_MARK_KEY, &Json(now_ms)]).await?;
        Ok(())
    }

    pub(super) async fn clock_mark(&self) -> Result<u64> {
        let row = self.client().await?.query_opt("SELECT value FROM meta WHERE key = $1", &[&CLOCK_MARK_KEY]).await?;
        Ok(row.map(|r| rec::<u64>(&r, 0)).transpose()?.unwrap_or(0))
    }
}
