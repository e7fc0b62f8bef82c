//! Shamir secret sharing over GF(p), p = 2^61 − 1 (a Mersenne prime, so
//! reduction is a shift and an add).
//!
//! A 32-byte secret is read as a little-endian 256-bit integer and cut into
//! five 52-bit chunks (the last holds 48 bits); each chunk is shared with its
//! own random polynomial of degree t−1. The x-coordinate of a share is the
//! holder's client id + 1, so it is non-zero and distinct per holder, and it
//! does not travel: a share on the wire is 5 field elements (40 bytes).

use std::collections::HashMap;

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::error::{Result, SecAggError};

/// The field modulus 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per 32-byte secret.
pub const CHUNKS: usize = 5;
/// Bytes of one share on the wire.
pub const SHARE_BYTES: usize = CHUNKS * 8;
const CHUNK_BITS: u32 = 52;

#[inline]
fn reduce128(x: u128) -> u64 {
    // x = hi·2^61 + lo ≡ hi + lo (mod 2^61 − 1)
    let lo = (x as u64) & P;
    let hi = (x >> 61) as u64;
    let mut r = lo + (hi & P) + (hi >> 61);
    if r >= P {
        r -= P;
    }
    if r >= P {
        r -= P;
    }
    r
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    reduce128(a as u128 * b as u128)
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    let r = a + b;
    if r >= P { r - P } else { r }
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut base: u64, mut e: u64) -> u64 {
    let mut acc = 1u64;
    while e > 0 {
        if e & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    acc
}

/// Multiplicative inverse (Fermat); `a` must be non-zero.
fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// Uniform field element, 0 included (rejection sampling on 61 bits).
fn random_element<R: RngCore + CryptoRng>(rng: &mut R) -> u64 {
    loop {
        let x = rng.next_u64() & P;
        if x < P {
            return x;
        }
    }
}

/// The x-coordinate of holder `id`.
#[inline]
pub fn x_of(id: u32) -> u64 {
    id as u64 + 1
}

/// One holder's share of a 32-byte secret (its x-coordinate is implied by the holder id).
#[derive(Clone, PartialEq, Eq)]
pub struct Share(pub [u64; CHUNKS]);

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Share(..)")
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Share {
    /// Little-endian wire form.
    pub fn to_bytes(&self) -> [u8; SHARE_BYTES] {
        let mut out = [0u8; SHARE_BYTES];
        for (i, v) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses the wire form, rejecting non-canonical field elements.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != SHARE_BYTES {
            return Err(SecAggError::Malformed(format!("share of {} bytes", b.len())));
        }
        let mut y = [0u64; CHUNKS];
        for (i, v) in y.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *v = u64::from_le_bytes(w);
            if *v >= P {
                return Err(SecAggError::Malformed("share element out of field".into()));
            }
        }
        Ok(Share(y))
    }
}

fn secret_to_chunks(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut limbs = [0u64; 4];
    for (i, l) in limbs.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&secret[i * 8..i * 8 + 8]);
        *l = u64::from_le_bytes(w);
    }
    let mut out = [0u64; CHUNKS];
    for (c, o) in out.iter_mut().enumerate() {
        let bit = c as u32 * CHUNK_BITS;
        let (limb, sh) = ((bit / 64) as usize, bit % 64);
        let mut v = limbs[limb] >> sh;
        if sh > 64 - CHUNK_BITS && limb + 1 < 4 {
            v |= limbs[limb + 1] << (64 - sh);
        }
        *o = v & ((1 << CHUNK_BITS) - 1);
    }
    limbs.zeroize();
    out
}

fn chunks_to_secret(chunks: &[u64; CHUNKS]) -> Result<[u8; 32]> {
    // 256 = 4·52 + 48: anything above those widths means inconsistent shares.
    for (i, &c) in chunks.iter().enumerate() {
        let width = if i == CHUNKS - 1 { 256 - 4 * CHUNK_BITS } else { CHUNK_BITS };
        if c >> width != 0 {
            return Err(SecAggError::Reconstruction("reconstructed value out of range".into()));
        }
    }
    let mut limbs = [0u64; 4];
    for (c, &v) in chunks.iter().enumerate() {
        let bit = c as u32 * CHUNK_BITS;
        let (limb, sh) = ((bit / 64) as usize, bit % 64);
        limbs[limb] |= v << sh;
        if sh > 64 - CHUNK_BITS && limb + 1 < 4 {
            limbs[limb + 1] |= v >> (64 - sh);
        }
    }
    let mut out = [0u8; 32];
    for (i, l) in limbs.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
    }
    limbs.zeroize();
    Ok(out)
}

/// Splits `secret` into shares for `holders` (client ids, distinct), any
/// `threshold` of which reconstruct it. Returns shares in `holders` order.
pub fn split<R: RngCore + CryptoRng>(secret: &[u8; 32], threshold: usize, holders: &[u32], rng: &mut R) -> Result<Vec<Share>> {
    if threshold < 1 || threshold > holders.len() {
        return Err(SecAggError::InvalidConfig(format!("threshold {threshold} with {} holders", holders.len())));
    }
    let mut seen = std::collections::HashSet::with_capacity(holders.len());
    if !holders.iter().all(|h| seen.insert(*h)) {
        return Err(SecAggError::Malformed("duplicate share holder".into()));
    }
    let mut chunks = secret_to_chunks(secret);
    // coeffs[c][0] is the chunk itself; the rest are uniform, 0 included.
    let mut coeffs = vec![[0u64; CHUNKS]; threshold];
    coeffs[0] = chunks;
    for row in coeffs.iter_mut().skip(1) {
        for v in row.iter_mut() {
            *v = random_element(rng);
        }
    }
    let shares = holders
        .iter()
        .map(|&h| {
            let x = x_of(h);
            let mut y = [0u64; CHUNKS];
            for (c, yc) in y.iter_mut().enumerate() {
                // Horner from the top coefficient.
                let mut acc = 0u64;
                for row in coeffs.iter().rev() {
                    acc = add(mul(acc, x), row[c]);
                }
                *yc = acc;
            }
            Share(y)
        })
        .collect();
    for row in coeffs.iter_mut() {
        row.zeroize();
    }
    chunks.zeroize();
    Ok(shares)
}

/// Lagrange coefficients at x = 0 for one set of holders: reconstructing
/// many secrets held by the same set costs one dot product per chunk.
#[derive(Clone, Debug)]
pub struct Lagrange {
    holders: Vec<u32>,
    coeffs: Vec<u64>,
}

impl Lagrange {
    /// Builds the coefficients for `holders` (distinct ids), O(t²) multiplications
    /// and a single field inversion.
    pub fn new(holders: &[u32]) -> Result<Self> {
        if holders.is_empty() {
            return Err(SecAggError::Reconstruction("no shares".into()));
        }
        let mut seen = std::collections::HashSet::with_capacity(holders.len());
        if !holders.iter().all(|h| seen.insert(*h)) {
            return Err(SecAggError::Reconstruction("duplicate share index".into()));
        }
        let xs: Vec<u64> = holders.iter().map(|&h| x_of(h)).collect();
        // λ_i = Π_{j≠i} x_j / Π_{j≠i} (x_j − x_i). Numerators share Π x_j.
        let prod_all = xs.iter().fold(1u64, |a, &x| mul(a, x));
        let mut nums = Vec::with_capacity(xs.len());
        let mut dens = Vec::with_capacity(xs.len());
        for (i, &xi) in xs.iter().enumerate() {
            let mut den = xi; // folds the division of prod_all by x_i into the denominator
            for (j, &xj) in xs.iter().enumerate() {
                if i != j {
                    den = mul(den, sub(xj, xi));
                }
            }
            nums.push(prod_all);
            dens.push(den);
        }
        // Batch inversion: one `inv` for all denominators.
        let mut prefix = Vec::with_capacity(dens.len());
        let mut acc = 1u64;
        for &d in &dens {
            prefix.push(acc);
            acc = mul(acc, d);
        }
        let mut inv_acc = inv(acc);
        let mut coeffs = vec![0u64; dens.len()];
        for i in (0..dens.len()).rev() {
            coeffs[i] = mul(nums[i], mul(inv_acc, prefix[i]));
            inv_acc = mul(inv_acc, dens[i]);
        }
        Ok(Lagrange { holders: holders.to_vec(), coeffs })
    }

    /// The holder ids, in the order shares must be given to [`Lagrange::reconstruct`].
    pub fn holders(&self) -> &[u32] {
        &self.holders
    }

    /// Reconstructs one secret from shares given in `holders()` order.
    pub fn reconstruct(&self, shares: &[&Share]) -> Result<[u8; 32]> {
        if shares.len() != self.coeffs.len() {
            return Err(SecAggError::Reconstruction(format!("{} shares for {} coefficients", shares.len(), self.coeffs.len())));
        }
        let mut chunks = [0u64; CHUNKS];
        for (share, &l) in shares.iter().zip(&self.coeffs) {
            for (c, acc) in chunks.iter_mut().enumerate() {
                *acc = add(*acc, mul(share.0[c], l));
            }
        }
        let out = chunks_to_secret(&chunks);
        chunks.zeroize();
        out
    }
}

/// Reconstructs a secret from `(holder id, share)` pairs: rejects duplicate
/// holders and fewer than `threshold` shares; uses the first `threshold`
/// shares after sorting by holder id.
pub fn reconstruct(threshold: usize, shares: &[(u32, &Share)]) -> Result<[u8; 32]> {
    let mut cache = LagrangeCache::default();
    cache.reconstruct(threshold, shares)
}

/// Memoizes [`Lagrange`] coefficients by holder set: in a full-graph session
/// most secrets are reconstructed from the same t smallest responder ids.
#[derive(Default, Debug)]
pub struct LagrangeCache {
    map: HashMap<Vec<u32>, Lagrange>,
}

impl LagrangeCache {
    /// Number of distinct holder sets seen.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no coefficients have been built yet.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Like [`reconstruct`], reusing coefficients for a holder set seen before.
    pub fn reconstruct(&mut self, threshold: usize, shares: &[(u32, &Share)]) -> Result<[u8; 32]> {
        if threshold == 0 {
            return Err(SecAggError::InvalidConfig("threshold 0".into()));
        }
        let mut sorted: Vec<(u32, &Share)> = shares.to_vec();
        sorted.sort_by_key(|(id, _)| *id);
        if sorted.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(SecAggError::Reconstruction("duplicate share index".into()));
        }
        if sorted.len() < threshold {
            return Err(SecAggError::BelowThreshold { what: "shares".into(), have: sorted.len(), need: threshold });
        }
        sorted.truncate(threshold);
        let holders: Vec<u32> = sorted.iter().map(|(id, _)| *id).collect();
        let lag = match self.map.get(&holders) {
            Some(l) => l,
            None => {
                let l = Lagrange::new(&holders)?;
                self.map.entry(holders).or_insert(l)
            }
        };
        let refs: Vec<&Share> = sorted.iter().map(|(_, s)| *s).collect();
        lag.reconstruct(&refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn field_ops() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(reduce128(P as u128), 0);
        assert_eq!(sub(0, 1), P - 1);
    }

    #[test]
    fn chunk_roundtrip() {
        let mut s = [0u8; 32];
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(200);
        }
        assert_eq!(chunks_to_secret(&secret_to_chunks(&s)).unwrap(), s);
        assert_eq!(chunks_to_secret(&secret_to_chunks(&[0xff; 32])).unwrap(), [0xff; 32]);
    }

    #[test]
    fn split_and_reconstruct_with_any_t() {
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        let secret = [0xa5u8; 32];
        let holders: Vec<u32> = (10..20).collect();
        let shares = split(&secret, 4, &holders, &mut rng).unwrap();
        let pairs: Vec<(u32, &Share)> = holders.iter().copied().zip(shares.iter()).collect();
        assert_eq!(reconstruct(4, &pairs[3..7]).unwrap(), secret);
        assert_eq!(reconstruct(4, &pairs).unwrap(), secret);
        assert!(matches!(reconstruct(4, &pairs[..3]), Err(SecAggError::BelowThreshold { have: 3, need: 4, .. })));
        let dup = vec![pairs[0], pairs[0], pairs[1], pairs[2]];
        assert!(matches!(reconstruct(4, &dup), Err(SecAggError::Reconstruction(_))));
    }
}
