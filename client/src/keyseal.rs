//! The device identity key at rest, sealed with a passphrase when the device has one: PBKDF2-
//! HMAC-SHA256 (600 000 iterations, OWASP's 2023 figure) derives an AES-256-GCM key from the
//! passphrase and a random salt; the store keeps salt, nonce and ciphertext, never the key.
//! The passphrase comes from the file named by `SPA_KEY_PASSPHRASE_FILE` (a systemd credential,
//! say) or else from `SPA_KEY_PASSPHRASE`. Without one, the key is kept in clear in the store,
//! which only its owner may enter (store.rs).
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};

pub const PASSPHRASE_FILE_ENV: &str = "SPA_KEY_PASSPHRASE_FILE";
pub const PASSPHRASE_ENV: &str = "SPA_KEY_PASSPHRASE";
const ITERATIONS: u32 = 600_000;
/// Bound to the ciphertext: a sealed blob of another purpose does not open as a device key.
const AAD: &[u8] = b"spa device identity key v1";

/// A sealed key as the store keeps it (hex strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    pub iterations: u32,
    pub salt: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// The device's passphrase, if it has one (file first, then the variable; a trailing newline
/// of the file is not part of it).
pub fn passphrase() -> Result<Option<Vec<u8>>> {
    if let Some(p) = std::env::var_os(PASSPHRASE_FILE_ENV) {
        return passphrase_file(std::path::Path::new(&p)).map(Some);
    }
    Ok(std::env::var(PASSPHRASE_ENV).ok().map(String::into_bytes))
}

/// A passphrase kept in a file (without its trailing newline).
pub fn passphrase_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io(path))?;
    Ok(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
}

fn key(pass: &[u8], salt: &[u8], iterations: u32) -> Result<LessSafeKey> {
    let n = std::num::NonZeroU32::new(iterations).ok_or_else(|| ClientError::Invalid("sealed key: zero iterations".into()))?;
    let mut k = [0u8; 32];
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, n, salt, pass, &mut k);
    Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte key")))
}

pub fn seal(secret: &[u8], pass: &[u8]) -> Result<Sealed> {
    seal_with(secret, pass, ITERATIONS)
}

/// [`seal`] with another work factor (tests).
pub fn seal_with(secret: &[u8], pass: &[u8], iterations: u32) -> Result<Sealed> {
    if pass.is_empty() {
        return Err(ClientError::Invalid("the key passphrase is empty".into()));
    }
    let rng = SystemRandom::new();
    let (mut salt, mut nonce) = ([0u8; 16], [0u8; 12]);
    rng.fill(&mut salt).and_then(|_| rng.fill(&mut nonce)).map_err(|_| ClientError::Invalid("no system randomness".into()))?;
    let mut data = secret.to_vec();
    key(pass, &salt, iterations)?
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), &mut data)
        .map_err(|_| ClientError::Invalid("sealing the key failed".into()))?;
    Ok(Sealed { iterations, salt: hex::encode(salt), nonce: hex::encode(nonce), ciphertext: hex::encode(data) })
}

pub fn open(s: &Sealed, pass: &[u8]) -> Result<Vec<u8>> {
    let bad = || ClientError::Invalid("sealed device key: malformed record".into());
    let salt = hex::decode(&s.salt).map_err(|_| bad())?;
    let nonce: [u8; 12] = hex::decode(&s.nonce).ok().and_then(|n| n.try_into().ok()).ok_or_else(bad)?;
    let mut data = hex::decode(&s.ciphertext).map_err(|_| bad())?;
    let plain = key(pass, &salt, s.iterations)?
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), &mut data)
        .map_err(|_| ClientError::Key(format!("it does not open with this passphrase ({PASSPHRASE_FILE_ENV} / {PASSPHRASE_ENV})")))?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_with_its_passphrase_only() {
        let secret = b"the pkcs8 document of a device key".to_vec();
        let s = seal_with(&secret, b"correct horse", 1000).unwrap();
        assert_eq!(open(&s, b"correct horse").unwrap(), secret);
        assert!(open(&s, b"wrong horse").unwrap_err().to_string().contains("does not open"));
        // Nothing of the secret is in the record, and a changed byte is refused.
        let record = serde_json::to_string(&s).unwrap();
        assert!(!record.contains(&hex::encode(&secret[..8])));
        let mut bad = s.clone();
        bad.ciphertext.replace_range(0..2, if &bad.ciphertext[0..2] == "00" { "01" } else { "00" });
        assert!(open(&bad, b"correct horse").is_err());
        assert!(seal_with(&secret, b"", 1000).is_err());
    }
}
