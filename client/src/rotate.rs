//! `spa-client rotate-key`: replaces the device's identity key in place (same device id).
//! The new key is stored first (slot `identity.next`), then the coordinator is asked
//! (`RotateKey`, signed by the current key, with the new key's proof of possession), then the
//! new key becomes the identity key. A crash or lost answer in between leaves the next key
//! stored; the next run finds out whether the coordinator took it (a ping signed by it) and
//! finishes or retries.
use std::path::Path;

use serde::Serialize;
use spa_proto::auth::{DeviceSigner, generate_pkcs8, rotation_message};
use spa_proto::methods;
use spa_proto::v1::{PingRequest, RotateKeyRequest};
use tonic::Code;

use crate::error::{ClientError, Result};
use crate::net::{Session, signing_time_ms};
use crate::store::ClientStore;

#[derive(Debug, Serialize)]
pub struct RotateReport {
    pub device_id: String,
    pub rotated_at_ms: u64,
    /// The new key is sealed with a passphrase.
    pub key_sealed: bool,
    /// This run finished a rotation that an earlier one left half done.
    pub finished_interrupted: bool,
}

/// Rotates the key. The current key opens with the usual passphrase (keyseal.rs); the new one
/// is sealed with `new_pass` if given, else with that passphrase, else kept in clear. So a
/// device enrolled without a passphrase gets a sealed key by rotating with one: the new key
/// never touches disk in clear, and the old one is refused from then on.
pub async fn rotate_key(home: &Path, new_pass: Option<Vec<u8>>) -> Result<RotateReport> {
    let store = ClientStore::open(home)?;
    let pass = crate::keyseal::passphrase()?;
    let new_pass = new_pass.or(pass);
    let s = Session::open(home, &store).await?;
    let id = s.identity.device_id.clone();
    let report = |finished_interrupted| RotateReport {
        device_id: id.clone(),
        rotated_at_ms: spa_proto::auth::now_ms(),
        key_sealed: new_pass.is_some(),
        finished_interrupted,
    };
    if let Some(next) = store.next_key(new_pass.as_deref())? {
        if accepts(&s, &signer(&next, &id)?).await? {
            store.promote_next_key()?;
            return Ok(report(true));
        }
    } else {
        let pkcs8 = generate_pkcs8().map_err(|_| ClientError::Invalid("cannot generate a key".into()))?;
        store.set_next_key(&pkcs8, new_pass.as_deref())?;
    }
    let next = signer(&store.next_key(new_pass.as_deref())?.expect("stored above"), &id)?;
    let pk = next.public_key();
    let body = RotateKeyRequest { new_public_key: pk.to_vec(), proof: next.sign_raw(&rotation_message(&id, &pk)).to_vec() };
    match s.device().rotate_key(s.request(methods::DEVICE_ROTATE_KEY, body)).await {
        Ok(r) => {
            store.promote_next_key()?;
            Ok(RotateReport { rotated_at_ms: r.into_inner().rotated_at_ms, ..report(false) })
        }
        // Refused for good: the next key is of no use.
        Err(st) if matches!(st.code(), Code::InvalidArgument | Code::AlreadyExists | Code::PermissionDenied) => {
            store.drop_next_key()?;
            Err(st.into())
        }
        // Unknown outcome: keep the next key for the next run to settle.
        Err(st) => Err(st.into()),
    }
}

fn signer(pkcs8: &[u8], id: &str) -> Result<DeviceSigner> {
    DeviceSigner::from_pkcs8(pkcs8, id).map_err(|e| ClientError::Invalid(format!("stored key rejected: {e}")))
}

/// Whether the coordinator accepts calls signed by `signer` (a ping).
async fn accepts(s: &Session, signer: &DeviceSigner) -> Result<bool> {
    let body = PingRequest {};
    s.record(methods::DEVICE_PING, &body);
    let h = signer.sign(methods::DEVICE_PING, &body, signing_time_ms());
    let mut req = tonic::Request::new(body);
    h.apply(req.metadata_mut());
    match s.device().ping(req).await {
        Ok(_) => Ok(true),
        Err(st) if st.code() == Code::Unauthenticated => Ok(false),
        Err(st) => Err(st.into()),
    }
}
