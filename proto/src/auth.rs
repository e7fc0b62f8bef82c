//! Request signing. Every device call after enrollment carries four metadata entries:
//! `x-spa-device` (device id), `x-spa-ts` (Unix milliseconds), `x-spa-nonce` (16 random bytes,
//! hex) and `x-spa-sig` (hex Ed25519 signature over [`signing_payload`]): the method path, the
//! timestamp, the nonce and the SHA-256 digest of the request body's prost encoding. The
//! receiver re-encodes the body it decoded, so the digest covers exactly what it acts on.
//!
//! The receiver checks, in this order: headers well formed, device known, not revoked,
//! signature valid, timestamp within the clock window, nonce never seen inside the window.
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use tonic::metadata::MetadataMap;

pub const HDR_DEVICE: &str = "x-spa-device";
pub const HDR_TS: &str = "x-spa-ts";
pub const HDR_NONCE: &str = "x-spa-nonce";
pub const HDR_SIG: &str = "x-spa-sig";
/// Admin calls carry `authorization: Bearer <credential>`.
pub const HDR_AUTHORIZATION: &str = "authorization";

/// Domain separation: a signature over SPA v1 requests is useless for anything else.
const CONTEXT: &[u8] = b"spa.v1 request signature\0";

/// Why a signed call was refused. Each maps to one gRPC status code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing metadata '{0}' (device calls must be signed)")]
    Missing(&'static str),
    #[error("malformed metadata '{0}'")]
    Malformed(&'static str),
    /// Worded as a bad signature is: the reply does not tell which device ids exist.
    #[error("unknown device or bad request signature")]
    UnknownDevice(String),
    #[error("device '{0}' is revoked")]
    Revoked(String),
    #[error("unknown device or bad request signature")]
    BadSignature,
    #[error("request timestamp {ts_ms} is {skew_ms} ms away from the coordinator's clock (window {window_ms} ms)")]
    ClockSkew { ts_ms: u64, skew_ms: u64, window_ms: u64 },
    /// Nonces of calls dated before the coordinator started are not kept across restarts.
    #[error("request signed at {ts_ms} ms, before this coordinator started serving the device at {start_ms} ms: refused as a possible replay; sign it again")]
    SignedBeforeStart { ts_ms: u64, start_ms: u64 },
    #[error("nonce already used (replayed request)")]
    Replay,
    #[error("too many requests in the replay window; retry later")]
    Busy,
    /// One device's share of the replay cache is full: only it is slowed down.
    #[error("this device sent more than {0} signed calls within the replay window; slow down")]
    DeviceBusy(usize),
    #[error("invalid admin credential")]
    BadAdmin,
    #[error("public key refused: {0}")]
    WeakKey(&'static str),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::Revoked(_) => crate::reason::Reason::DeviceRevoked.status(tonic::Code::PermissionDenied, msg),
            AuthError::Malformed(_) | AuthError::WeakKey(_) => tonic::Status::invalid_argument(msg),
            AuthError::Busy => tonic::Status::unavailable(msg),
            AuthError::DeviceBusy(_) => tonic::Status::resource_exhausted(msg),
            // Not the device's identity but its clock: a retry succeeds once the clock is set.
            AuthError::ClockSkew { .. } | AuthError::SignedBeforeStart { .. } => tonic::Status::failed_precondition(msg),
            _ => tonic::Status::unauthenticated(msg),
        }
    }
}

/// SHA-256 of a message's prost encoding.
pub fn body_digest<M: prost::Message>(body: &M) -> [u8; 32] {
    sha256(&body.encode_to_vec())
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What is signed: context, method path, timestamp, nonce and body digest, NUL-separated.
pub fn signing_payload(method: &str, ts_ms: u64, nonce_hex: &str, digest: &[u8; 32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(CONTEXT.len() + method.len() + 64 + 32);
    p.extend_from_slice(CONTEXT);
    p.extend_from_slice(method.as_bytes());
    p.push(0);
    p.extend_from_slice(ts_ms.to_string().as_bytes());
    p.push(0);
    p.extend_from_slice(nonce_hex.as_bytes());
    p.push(0);
    p.extend_from_slice(digest);
    p
}

/// The signature metadata of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    pub device_id: String,
    pub ts_ms: u64,
    pub nonce_hex: String,
    pub sig_hex: String,
}

impl SignedHeaders {
    pub fn apply(&self, md: &mut MetadataMap) {
        // All four values are ASCII (an id we issued, digits, hex).
        let put = |md: &mut MetadataMap, k: &'static str, v: &str| {
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        };
        put(md, HDR_DEVICE, &self.device_id);
        put(md, HDR_TS, &self.ts_ms.to_string());
        put(md, HDR_NONCE, &self.nonce_hex);
        put(md, HDR_SIG, &self.sig_hex);
    }

    pub fn from_metadata(md: &MetadataMap) -> Result<Self, AuthError> {
        let get = |k: &'static str| -> Result<&str, AuthError> { md.get(k).ok_or(AuthError::Missing(k))?.to_str().map_err(|_| AuthError::Malformed(k)) };
        let device_id = get(HDR_DEVICE)?;
        if device_id.is_empty() || device_id.len() > 64 {
            return Err(AuthError::Malformed(HDR_DEVICE));
        }
        let ts_ms = get(HDR_TS)?.parse().map_err(|_| AuthError::Malformed(HDR_TS))?;
        let nonce_hex = get(HDR_NONCE)?;
        if nonce_hex.len() != 32 || hex::decode(nonce_hex).is_err() {
            return Err(AuthError::Malformed(HDR_NONCE));
        }
        let sig_hex = get(HDR_SIG)?;
        if sig_hex.len() != 128 || hex::decode(sig_hex).is_err() {
            return Err(AuthError::Malformed(HDR_SIG));
        }
        Ok(Self { device_id: device_id.into(), ts_ms, nonce_hex: nonce_hex.into(), sig_hex: sig_hex.into() })
    }

    /// Checks the signature against the device's raw 32-byte Ed25519 public key.
    pub fn verify(&self, public_key: &[u8], method: &str, digest: &[u8; 32]) -> Result<(), AuthError> {
        let sig = hex::decode(&self.sig_hex).map_err(|_| AuthError::Malformed(HDR_SIG))?;
        let payload = signing_payload(method, self.ts_ms, &self.nonce_hex, digest);
        UnparsedPublicKey::new(&ED25519, public_key).verify(&payload, &sig).map_err(|_| AuthError::BadSignature)
    }
}

/// Whether `pk` may be a device's identity key: 32 bytes, the canonical encoding of a curve
/// point, not of small order. A small-order key verifies signatures that no private key made
/// (R = identity, s = 0 passes for the identity key), and one point under two encodings would
/// be two "different" keys; so only canonical encodings are accepted and keys compare as bytes.
pub fn check_public_key(pk: &[u8]) -> Result<(), AuthError> {
    use curve25519_dalek::edwards::CompressedEdwardsY;
    let bytes: [u8; 32] = pk.try_into().map_err(|_| AuthError::WeakKey("not 32 bytes"))?;
    let point = CompressedEdwardsY(bytes).decompress().ok_or(AuthError::WeakKey("not a point of Ed25519"))?;
    if point.compress().to_bytes() != bytes {
        return Err(AuthError::WeakKey("not the canonical encoding of its point"));
    }
    if point.is_small_order() {
        return Err(AuthError::WeakKey("a point of small order (signatures with it can be forged)"));
    }
    Ok(())
}

/// `|ts - now| <= window`.
pub fn check_clock(ts_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), AuthError> {
    let skew_ms = ts_ms.abs_diff(now_ms);
    if skew_ms > window_ms {
        return Err(AuthError::ClockSkew { ts_ms, skew_ms, window_ms });
    }
    Ok(())
}

/// What a device's new identity key signs when it replaces the current one: domain-separated
/// from request signatures (which sign [`signing_payload`]) and bound to the device.
pub fn rotation_message(device_id: &str, new_public_key: &[u8]) -> Vec<u8> {
    [b"spa.v1.rotate-key\0".as_slice(), device_id.as_bytes(), b"\0", new_public_key].concat()
}

/// Checks a rotation proof: `proof` is the new key's signature over [`rotation_message`].
pub fn verify_rotation(device_id: &str, new_public_key: &[u8], proof: &[u8]) -> Result<(), AuthError> {
    UnparsedPublicKey::new(&ED25519, new_public_key).verify(&rotation_message(device_id, new_public_key), proof).map_err(|_| AuthError::BadSignature)
}

/// A device's identity key.
pub struct DeviceSigner {
    key: Ed25519KeyPair,
    device_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for DeviceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceSigner({})", self.device_id)
    }
}

/// A fresh Ed25519 key as PKCS#8 bytes (what a device stores).
pub fn generate_pkcs8() -> Result<Vec<u8>, ring::error::Unspecified> {
    Ok(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())?.as_ref().to_vec())
}

/// The raw public key of a PKCS#8 Ed25519 key.
pub fn public_key_of(pkcs8: &[u8]) -> Result<[u8; 32], ring::error::KeyRejected> {
    let k = Ed25519KeyPair::from_pkcs8(pkcs8)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(k.public_key().as_ref());
    Ok(out)
}

/// Random bytes from the system generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("system random generator");
    b
}

impl DeviceSigner {
    pub fn from_pkcs8(pkcs8: &[u8], device_id: impl Into<String>) -> Result<Self, ring::error::KeyRejected> {
        Ok(Self { key: Ed25519KeyPair::from_pkcs8(pkcs8)?, device_id: device_id.into(), rng: SystemRandom::new() })
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    /// Signs a call of `method` with this body digest at `ts_ms`, with a fresh nonce.
    pub fn sign_digest(&self, method: &str, digest: &[u8; 32], ts_ms: u64) -> SignedHeaders {
        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce).expect("system random generator");
        let nonce_hex = hex::encode(nonce);
        let sig = self.key.sign(&signing_payload(method, ts_ms, &nonce_hex, digest));
        SignedHeaders { device_id: self.device_id.clone(), ts_ms, nonce_hex, sig_hex: hex::encode(sig.as_ref()) }
    }

    /// A plain Ed25519 signature over `msg` (for protocols with their own domain separation,
    /// like SecAgg+'s key advertisements; never over a bare request payload).
    pub fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.key.sign(msg).as_ref());
        out
    }

    pub fn sign<M: prost::Message>(&self, method: &str, body: &M, ts_ms: u64) -> SignedHeaders {
        self.sign_digest(method, &body_digest(body), ts_ms)
    }

    /// A `tonic::Request` around `body`, signed now.
    pub fn request<M: prost::Message>(&self, method: &str, body: M) -> tonic::Request<M> {
        let h = self.sign(method, &body, now_ms());
        let mut req = tonic::Request::new(body);
        h.apply(req.metadata_mut());
        req
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::PingRequest;
    use crate::v1::{FeatureSequence, FeaturesRequest};

    fn signer() -> DeviceSigner {
        DeviceSigner::from_pkcs8(&generate_pkcs8().unwrap(), "dev-1").unwrap()
    }

    fn body() -> FeaturesRequest {
        FeaturesRequest { backbone_version: "v".into(), sequences: vec![FeatureSequence { ids: vec![1, 2, 3], from: 0, to: 3 }], layers: vec![0, 4], dtype: 1 }
    }

    #[test]
    fn signature_verifies_through_metadata() {
        let s = signer();
        let req = s.request(crate::methods::BACKBONE_FEATURES, body());
        let h = SignedHeaders::from_metadata(req.metadata()).unwrap();
        assert_eq!(h.device_id, "dev-1");
        h.verify(&s.public_key(), crate::methods::BACKBONE_FEATURES, &body_digest(req.get_ref())).unwrap();
        check_clock(h.ts_ms, now_ms(), 300_000).unwrap();
    }

    #[test]
    fn forged_or_altered_requests_fail() {
        let s = signer();
        let h = s.sign(crate::methods::BACKBONE_FEATURES, &body(), 1_000);
        let pk = s.public_key();
        let digest = body_digest(&body());
        // Another key.
        assert_eq!(h.verify(&signer().public_key(), crate::methods::BACKBONE_FEATURES, &digest), Err(AuthError::BadSignature));
        // Another method (a signature replayed on another endpoint).
        assert_eq!(h.verify(&pk, crate::methods::DEVICE_PING, &digest), Err(AuthError::BadSignature));
        // Another body.
        let mut b = body();
        b.sequences[0].ids[0] = 9;
        assert_eq!(h.verify(&pk, crate::methods::BACKBONE_FEATURES, &body_digest(&b)), Err(AuthError::BadSignature));
        // Another timestamp or nonce.
        let mut t = h.clone();
        t.ts_ms += 1;
        assert_eq!(t.verify(&pk, crate::methods::BACKBONE_FEATURES, &digest), Err(AuthError::BadSignature));
        let mut n = h.clone();
        n.nonce_hex = hex::encode([7u8; 16]);
        assert_eq!(n.verify(&pk, crate::methods::BACKBONE_FEATURES, &digest), Err(AuthError::BadSignature));
        // Garbage signature of the right length.
        let mut g = h.clone();
        g.sig_hex = "00".repeat(64);
        assert_eq!(g.verify(&pk, crate::methods::BACKBONE_FEATURES, &digest), Err(AuthError::BadSignature));
        // The right one passes.
        h.verify(&pk, crate::methods::BACKBONE_FEATURES, &digest).unwrap();
    }

    #[test]
    fn malformed_and_missing_metadata_are_rejected() {
        let s = signer();
        let mut req = s.request(crate::methods::DEVICE_PING, PingRequest {});
        req.metadata_mut().remove(HDR_SIG);
        assert_eq!(SignedHeaders::from_metadata(req.metadata()), Err(AuthError::Missing(HDR_SIG)));
        req.metadata_mut().insert(HDR_SIG, "zz".parse().unwrap());
        assert_eq!(SignedHeaders::from_metadata(req.metadata()), Err(AuthError::Malformed(HDR_SIG)));
        let mut req = s.request(crate::methods::DEVICE_PING, PingRequest {});
        req.metadata_mut().insert(HDR_TS, "soon".parse().unwrap());
        assert_eq!(SignedHeaders::from_metadata(req.metadata()), Err(AuthError::Malformed(HDR_TS)));
        let st: tonic::Status = AuthError::Missing(HDR_SIG).into();
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
        let st: tonic::Status = AuthError::Revoked("d".into()).into();
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn clock_window() {
        let now = 10_000_000;
        check_clock(now - 300_000, now, 300_000).unwrap();
        check_clock(now + 300_000, now, 300_000).unwrap();
        assert!(matches!(check_clock(now - 300_001, now, 300_000), Err(AuthError::ClockSkew { .. })));
        assert!(matches!(check_clock(now + 300_001, now, 300_000), Err(AuthError::ClockSkew { .. })));
    }

    /// The eight points of small order, canonically encoded (checked against a reference
    /// implementation of the curve: orders 1, 2, 4, 4, 8, 8, 8, 8).
    const SMALL_ORDER: [&str; 8] = [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    ];

    #[test]
    fn small_order_and_non_canonical_keys_are_refused_and_real_ones_pass() {
        for k in SMALL_ORDER {
            let e = check_public_key(&hex::decode(k).unwrap()).unwrap_err();
            assert!(e.to_string().contains("small order"), "{k}: {e}");
        }
        // The identity with the sign bit set, y = p + 1 (the identity again), y = p + 3 (a point
        // of large order, under its second encoding), y = p (order 4): each names a point under
        // a second encoding.
        for k in [
            "0100000000000000000000000000000000000000000000000000000000000080",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ] {
            let e = check_public_key(&hex::decode(k).unwrap()).unwrap_err();
            assert!(matches!(e, AuthError::WeakKey(_)) && !e.to_string().contains("small order"), "{k}: {e}");
        }
        // y = 2 is on no point of the curve; 31 bytes is no key.
        let mut y2 = [0u8; 32];
        y2[0] = 2;
        assert_eq!(check_public_key(&y2), Err(AuthError::WeakKey("not a point of Ed25519")));
        assert_eq!(check_public_key(&[7u8; 31]), Err(AuthError::WeakKey("not 32 bytes")));
        for _ in 0..32 {
            check_public_key(&signer().public_key()).unwrap();
        }
    }
}
