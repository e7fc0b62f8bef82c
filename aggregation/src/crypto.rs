//! Key material and derivations of §8.2: per-session X25519 secrets
//! (x25519-dalek, because ring's X25519 keys are single-use and cannot be
//! loaded from bytes, while SecAgg uses one secret with many peers and lets
//! the server rebuild it after a dropout), HKDF-SHA256, ChaCha20-Poly1305
//! share encryption and Ed25519 advertisement signatures (ring).
//!
//! Integers inside HKDF infos, AADs and signed messages are big-endian:
//! client ids u32, round_id u64, m u64, modulus_bits u8.

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Result, SecAggError};
use crate::prg::MaskKey;
use crate::shamir::{SHARE_BYTES, Share};
use crate::spec::labels;

/// Length of an encrypted share pair: u‖v‖share_b‖share_s plus the Poly1305 tag.
pub const SHARE_CT_BYTES: usize = 8 + 2 * SHARE_BYTES + 16;

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256(salt, ikm, info = concatenation of `info`) → 32 bytes.
pub fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    Salt::new(HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| SecAggError::Crypto("HKDF expand failed".into()))?;
    Ok(out)
}

/// A CSPRNG for local randomness (Shamir coefficients, b_u, key generation,
/// stochastic rounding), seeded with 32 bytes from the OS via ring.
pub fn system_rng() -> Result<ChaCha20Rng> {
    let mut seed = Zeroizing::new([0u8; 32]);
    SystemRandom::new().fill(&mut seed[..]).map_err(|_| SecAggError::Crypto("system RNG unavailable".into()))?;
    Ok(ChaCha20Rng::from_seed(*seed))
}

/// X25519 agreement that rejects low-order peer keys (an all-zero shared secret).
pub fn agree(sk: &StaticSecret, peer_pk: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>> {
    let shared = sk.diffie_hellman(&PublicKey::from(*peer_pk));
    if !shared.was_contributory() {
        return Err(SecAggError::Crypto("non-contributory X25519 public key".into()));
    }
    Ok(Zeroizing::new(*shared.as_bytes()))
}

/// X25519 public key of a secret's raw bytes.
pub fn public_of(sk: &StaticSecret) -> [u8; 32] {
    PublicKey::from(sk).to_bytes()
}

/// k_enc(from→to) = HKDF(salt = session_id, ikm = X25519(c_sk, c_pk'), info = "flsa/v1/enc"‖from‖to).
pub fn enc_key(session_id: &[u8; 32], dh: &[u8; 32], from: u32, to: u32) -> Result<Zeroizing<[u8; 32]>> {
    Ok(Zeroizing::new(hkdf32(session_id, dh, &[labels::ENC, &from.to_be_bytes(), &to.to_be_bytes()])?))
}

/// s_uv = HKDF(salt = session_id, ikm = X25519(s_sk_u, s_pk_v),
/// info = "flsa/v1/mask"‖min(u,v)‖max(u,v)‖m‖modulus_bits).
pub fn pairwise_mask_key(session_id: &[u8; 32], dh: &[u8; 32], u: u32, v: u32, m: u64, modulus_bits: u8) -> Result<MaskKey> {
    let (lo, hi) = (u.min(v), u.max(v));
    let key = hkdf32(session_id, dh, &[labels::MASK, &lo.to_be_bytes(), &hi.to_be_bytes(), &m.to_be_bytes(), &[modulus_bits]])?;
    Ok(MaskKey::from_bytes(key))
}

/// Self-mask key = HKDF(salt = session_id, ikm = b_u, info = "flsa/v1/self").
pub fn self_mask_key(session_id: &[u8; 32], b_u: &[u8; 32]) -> Result<MaskKey> {
    Ok(MaskKey::from_bytes(hkdf32(session_id, b_u, &[labels::SELF])?))
}

fn share_aad(session_id: &[u8; 32], from: u32, to: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(labels::SHARE_AAD.len() + 40);
    aad.extend_from_slice(labels::SHARE_AAD);
    aad.extend_from_slice(session_id);
    aad.extend_from_slice(&from.to_be_bytes());
    aad.extend_from_slice(&to.to_be_bytes());
    aad
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&CHACHA20_POLY1305, key).map(LessSafeKey::new).map_err(|_| SecAggError::Crypto("bad AEAD key".into()))
}

/// AEAD(k_enc(from→to), from‖to‖share_b‖share_s) with a zero nonce (the key
/// is directional and used once) and AAD "flsa/v1/share"‖session_id‖from‖to.
pub fn seal_shares(key: &[u8; 32], session_id: &[u8; 32], from: u32, to: u32, b_share: &Share, s_share: &Share) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(SHARE_CT_BYTES);
    buf.extend_from_slice(&from.to_be_bytes());
    buf.extend_from_slice(&to.to_be_bytes());
    buf.extend_from_slice(&b_share.to_bytes());
    buf.extend_from_slice(&s_share.to_bytes());
    aead_key(key)?
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(share_aad(session_id, from, to)), &mut buf)
        .map_err(|_| SecAggError::Crypto("AEAD seal failed".into()))?;
    Ok(buf)
}

/// Decrypts a share pair sent by `from` to `to` and checks the ids inside.
pub fn open_shares(key: &[u8; 32], session_id: &[u8; 32], from: u32, to: u32, ct: &[u8]) -> Result<(Share, Share)> {
    if ct.len() != SHARE_CT_BYTES {
        return Err(SecAggError::Malformed(format!("share ciphertext of {} bytes from {from}", ct.len())));
    }
    let mut buf = Zeroizing::new(ct.to_vec());
    let pt = aead_key(key)?
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(share_aad(session_id, from, to)), &mut buf)
        .map_err(|_| SecAggError::DecryptionFailed(from))?;
    if pt[0..4] != from.to_be_bytes() || pt[4..8] != to.to_be_bytes() {
        return Err(SecAggError::Malformed(format!("share ids inside the ciphertext from {from} do not match")));
    }
    let b = Share::from_bytes(&pt[8..8 + SHARE_BYTES])?;
    let s = Share::from_bytes(&pt[8 + SHARE_BYTES..8 + 2 * SHARE_BYTES])?;
    Ok((b, s))
}

/// The signed advertisement: "flsa/v1/adv"‖config_hash‖round_id‖c_pk‖s_pk.
pub fn advertisement_message(config_hash: &[u8; 32], round_id: u64, c_pk: &[u8; 32], s_pk: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(labels::ADV.len() + 32 + 8 + 64);
    msg.extend_from_slice(labels::ADV);
    msg.extend_from_slice(config_hash);
    msg.extend_from_slice(&round_id.to_be_bytes());
    msg.extend_from_slice(c_pk);
    msg.extend_from_slice(s_pk);
    msg
}

/// Verifies an Ed25519 signature by `signer_id`'s identity key.
pub fn verify_signature(signer_id: u32, identity_pk: &[u8; 32], msg: &[u8], sig: &[u8]) -> Result<()> {
    UnparsedPublicKey::new(&ED25519, identity_pk).verify(msg, sig).map_err(|_| SecAggError::BadSignature(signer_id))
}

/// The device's Ed25519 identity (enrollment key). Implemented for ring's key
/// pair; a client crate holding its key elsewhere implements it itself.
pub trait IdentitySigner {
    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> [u8; 32];
    /// An Ed25519 signature over `msg`.
    fn sign(&self, msg: &[u8]) -> [u8; 64];
}

impl IdentitySigner for Ed25519KeyPair {
    fn public_key(&self) -> [u8; 32] {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(KeyPair::public_key(self).as_ref());
        pk
    }

    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(Ed25519KeyPair::sign(self, msg).as_ref());
        sig
    }
}

/// A client's two per-session X25519 secrets; dalek erases them on drop.
pub struct SessionKeys {
    /// Channel secret (share encryption).
    pub c_sk: StaticSecret,
    /// Mask secret (pairwise seeds); Shamir-shared so the server can rebuild it if we drop.
    pub s_sk: StaticSecret,
}

impl SessionKeys {
    /// Fresh secrets from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut c = [0u8; 32];
        let mut s = [0u8; 32];
        rng.fill_bytes(&mut c);
        rng.fill_bytes(&mut s);
        let keys = SessionKeys { c_sk: StaticSecret::from(c), s_sk: StaticSecret::from(s) };
        c.zeroize();
        s.zeroize();
        keys
    }

    /// (c_pk, s_pk).
    pub fn public_keys(&self) -> ([u8; 32], [u8; 32]) {
        (public_of(&self.c_sk), public_of(&self.s_sk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let key = [3u8; 32];
        let sid = [5u8; 32];
        let b = Share([1, 2, 3, 4, 5]);
        let s = Share([6, 7, 8, 9, 10]);
        let ct = seal_shares(&key, &sid, 1, 2, &b, &s).unwrap();
        assert_eq!(ct.len(), SHARE_CT_BYTES);
        let (b2, s2) = open_shares(&key, &sid, 1, 2, &ct).unwrap();
        assert_eq!((b2, s2), (b, s));
        assert_eq!(open_shares(&key, &[6u8; 32], 1, 2, &ct), Err(SecAggError::DecryptionFailed(1)));
        assert_eq!(open_shares(&key, &sid, 1, 3, &ct), Err(SecAggError::DecryptionFailed(1)));
        let mut bad = ct.clone();
        bad[10] ^= 1;
        assert_eq!(open_shares(&key, &sid, 1, 2, &bad), Err(SecAggError::DecryptionFailed(1)));
    }

    #[test]
    fn low_order_points_are_rejected() {
        let sk = StaticSecret::from([7u8; 32]);
        assert!(matches!(agree(&sk, &[0u8; 32]), Err(SecAggError::Crypto(_))));
    }

    /// Pinned outputs for cross-language clients: HKDF with each label
    /// (session_id = 0x11×32, ikm = 0x22×32), checked against an independent
    /// HKDF (Python hmac) when pinned.
    #[test]
    fn known_answers_for_labels() {
        let sid = [0x11u8; 32];
        let ikm = [0x22u8; 32];
        let enc = enc_key(&sid, &ikm, 1, 2).unwrap();
        let mask = pairwise_mask_key(&sid, &ikm, 2, 1, 1000, 32).unwrap();
        let selfk = self_mask_key(&sid, &ikm).unwrap();
        let graph = hkdf32(&[], &sid, &[labels::GRAPH]).unwrap();
        assert_eq!(hex(&*enc), "d84dfaaed3fe9234a147943138d428ceba594369e80e66ee0c2edcac31dddf86");
        assert_eq!(hex(mask.as_bytes()), "4939e6bbc5c2a5c1b2d3e7f9a24d588708529f765ef66840b40aa5669c486cf1");
        assert_eq!(hex(selfk.as_bytes()), "f03fd619f8f76bbad2787cdfbe2b5ccd381d177650a28ebd8eac1eca4f64502b");
        assert_eq!(hex(&graph), "987e064d063b855ff3cce536ba66da20121a0b243b60d56dacf773b62ed66193");
        // Symmetry of the pairwise seed in (u, v).
        assert_eq!(pairwise_mask_key(&sid, &ikm, 1, 2, 1000, 32).unwrap(), mask);
    }
}
