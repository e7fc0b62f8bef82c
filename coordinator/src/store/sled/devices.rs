//! Devices and their enrollment: one-time tokens (kept as hashes), device records, the keys
//! ever used (never accepted twice), last-call times, and the nonces of signed calls.
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::{Result, Sled, dec, enc, key_id, tx_err};
use crate::store::StoreError;
use crate::store::records::{DeviceRecord, TokenRecord, device_id_of};

const CLOCK_MARK_KEY: &[u8] = b"clock_mark";

impl Sled {
    /// Stores a new token's hash; durable on return.
    pub(super) fn add_token(&self, hash: &[u8; 32], rec: &TokenRecord) -> Result<()> {
        let t = self.t()?;
        t.tokens.insert(hash, enc(rec))?;
        self.log("token.create", &format!("{} expires {}", rec.token_id, rec.expires_at_ms))?;
        self.flush()
    }

    pub(super) fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let t = self.t()?;
        t.tokens.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Consumes a token and records the device, atomically; durable on return.
    pub(super) fn enroll(&self, hash: &[u8; 32], public_key: &[u8], name: &str, now_ms: u64) -> Result<DeviceRecord> {
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
            if let Err(e) = tok.check_usable(now_ms) {
                return abort(e);
            }
            if devices.get(device_id.as_bytes())?.is_some() {
                return abort(StoreError::KeyEnrolled(device_id.clone()));
            }
            if let Some(owner) = keys.get(key_hash)? {
                return abort(StoreError::KeyEnrolled(String::from_utf8_lossy(&owner).into_owned()));
            }
            tok.used_by = Some(device_id.clone());
            let rec = DeviceRecord::enrolled(public_key, name, &tok.token_id, now_ms);
            tokens.insert(&hash[..], enc(&tok))?;
            devices.insert(device_id.as_bytes(), enc(&rec))?;
            keys.insert(&key_hash[..], device_id.as_bytes())?;
            Ok(rec)
        });
        let rec = res.map_err(tx_err)?;
        self.log("device.enroll", &format!("{} ({}) with token {}", rec.device_id, rec.name, rec.token_id))?;
        self.flush()?;
        Ok(rec)
    }

    /// Replaces an active device's public key (the caller checked the old key's signature and
    /// the new key's proof) if it is still `signed_with`, the key that call was signed with: a
    /// compare-and-swap, so of two rotations signed by the same key one wins and the other is
    /// refused with its new key left unused. Refused if any device ever used the new key.
    /// Durable on return.
    pub(super) fn rotate_key(&self, id: &str, signed_with: &str, new_key: &[u8], now_ms: u64) -> Result<DeviceRecord> {
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
        let rec = res.map_err(tx_err)?;
        self.log("device.rotate_key", id)?;
        self.flush()?;
        Ok(rec)
    }

    /// Revokes an unused enrollment token by its id; returns whether it was still usable.
    /// Durable on return.
    pub(super) fn revoke_token(&self, token_id: &str, now_ms: u64) -> Result<bool> {
        let t = self.t()?;
        'retry: loop {
            for kv in t.tokens.iter() {
                let (k, v) = kv?;
                let mut rec: TokenRecord = dec(&v)?;
                if rec.token_id != token_id {
                    continue;
                }
                let was_usable = rec.check_usable(now_ms).is_ok();
                if rec.revoked_at_ms.is_none() {
                    rec.revoked_at_ms = Some(now_ms);
                    // Against the record as read: an enrollment that used the token meanwhile
                    // is kept (read again), not overwritten.
                    if t.tokens.compare_and_swap(&k, Some(&v), Some(enc(&rec)))?.is_err() {
                        continue 'retry;
                    }
                    self.log("token.revoke", token_id)?;
                    self.flush()?;
                }
                return Ok(was_usable);
            }
            return Err(StoreError::UnknownTokenId(token_id.into()));
        }
    }

    pub(super) fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let t = self.t()?;
        t.devices.get(id.as_bytes())?.map(|v| dec(&v)).transpose()
    }

    pub(super) fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let t = self.t()?;
        t.devices.iter().values().map(|v| dec(&v?)).collect()
    }

    /// Marks a device revoked; durable on return. Returns whether it was active.
    pub(super) fn revoke(&self, id: &str, now_ms: u64) -> Result<bool> {
        let t = self.t()?;
        loop {
            let Some(raw) = t.devices.get(id.as_bytes())? else {
                return Err(StoreError::UnknownDevice(id.into()));
            };
            let mut rec: DeviceRecord = dec(&raw)?;
            if rec.revoked {
                return Ok(false);
            }
            rec.revoked = true;
            rec.revoked_at_ms = Some(now_ms);
            // Against the record as read: a key rotated meanwhile is kept (read again).
            if t.devices.compare_and_swap(id.as_bytes(), Some(&raw), Some(enc(&rec)))?.is_ok() {
                self.log("device.revoke", id)?;
                self.flush()?;
                return Ok(true);
            }
        }
    }

    /// Last call time of a device: kept in memory and written at the next [`Sled::flush`]
    /// (the server's 2 s tick, or any acknowledged change); best effort, not acknowledged state.
    pub(super) fn touch(&self, id: &str, now_ms: u64) {
        self.seen.touch(id, now_ms);
    }

    pub(super) fn last_seen(&self, id: &str) -> Result<u64> {
        if let Some(ms) = self.seen.get(id) {
            return Ok(ms);
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
    pub(super) fn record_nonce(&self, device: &str, nonce: &str, ts_ms: u64) -> Result<bool> {
        let t = self.t()?;
        let mut k = ts_ms.to_be_bytes().to_vec();
        k.extend_from_slice(format!("{device}\0{nonce}").as_bytes());
        Ok(t.nonces.insert(k, Vec::<u8>::new())?.is_none())
    }

    /// The time of the server's last tick: after a restart, calls dated before it are refused
    /// even if the clock went back meanwhile.
    pub(super) fn set_clock_mark(&self, now_ms: u64) -> Result<()> {
        self.t()?.meta.insert(CLOCK_MARK_KEY, &now_ms.to_be_bytes()[..])?;
        Ok(())
    }

    pub(super) fn clock_mark(&self) -> Result<u64> {
        let v = self.t()?.meta.get(CLOCK_MARK_KEY)?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok()).map_or(0, u64::from_be_bytes))
    }

    /// Nonces with a timestamp at or after `since_ms`: (device, nonce, ts).
    pub(super) fn nonces_since(&self, since_ms: u64) -> Result<Vec<(String, String, u64)>> {
        let t = self.t()?;
        let mut out = Vec::new();
        for kv in t.nonces.range(since_ms.to_be_bytes()..) {
            let (k, _) = kv?;
            if k.len() < 8 {
                continue;
            }
            let rest = String::from_utf8_lossy(&k[8..]).into_owned();
            if let Some((d, n)) = rest.split_once('\0') {
                out.push((d.to_string(), n.to_string(), key_id(&k)));
            }
        }
        Ok(out)
    }

    /// Drops nonces older than `before_ms` (they fail the clock check anyway).
    pub(super) fn prune_nonces(&self, before_ms: u64) -> Result<usize> {
        let t = self.t()?;
        let mut n = 0;
        for kv in t.nonces.range(..before_ms.to_be_bytes()) {
            t.nonces.remove(kv?.0)?;
            n += 1;
        }
        Ok(n)
    }
}
