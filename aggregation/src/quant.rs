//! §8.4 encoding: signed two's-complement fixed point with stochastic rounding.
//!
//! Client: clip each coordinate to [−c, c], multiply by the weight
//! w = min(num_examples, w_max) and by s = (2^{b−1}−1)/(c·w_max), round
//! stochastically (unbiased) with a local ChaCha CSPRNG (never the mask PRG),
//! store as i32 bit-cast to u32, then append w. Every lane then has magnitude
//! ≤ 2^{b−1}−1, so the sum over n clients cannot wrap when n·(2^{b−1}−1) < 2^31.
//! Server: read each summed lane as i32; mean = Σq / (s·Σw).

use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::{Result, SecAggError};

/// Quantization parameters (b, c, w_max).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantParams {
    /// b: bits per lane including the sign.
    pub bits: u8,
    /// c: per-coordinate clip.
    pub clip: f32,
    /// w_max: weight cap.
    pub w_max: u32,
}

/// Random words drawn per refill: rounding randomness comes in bulk, not per element.
const RNG_BATCH: usize = 4096;
const OFFSET: f64 = 2_147_483_648.0;

impl QuantParams {
    /// s = (2^{b−1}−1)/(c·w_max).
    pub fn scale(&self) -> f64 {
        ((1u64 << (self.bits - 1)) - 1) as f64 / (self.clip as f64 * self.w_max as f64)
    }

    /// Rejects b outside 2..=31, non-positive or non-finite c, w_max = 0, and
    /// configurations whose sum over n clients could overflow i32:
    /// n·(2^{b−1}−1) ≥ 2^31 or n·w_max ≥ 2^31.
    pub fn validate(&self, n: u64) -> Result<()> {
        let bad = |s: String| Err(SecAggError::InvalidConfig(s));
        if !(2..=31).contains(&self.bits) {
            return bad(format!("quant_bits {} outside 2..=31", self.bits));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip {} must be finite and > 0", self.clip));
        }
        if self.w_max == 0 {
            return bad("w_max must be ≥ 1".into());
        }
        let qmax = (1u64 << (self.bits - 1)) - 1;
        if n.saturating_mul(qmax) >= 1 << 31 {
            return bad(format!("headroom: n·(2^(b−1)−1) = {n}·{qmax} ≥ 2^31; use b ≤ {}", 31 - (64 - (n.max(1) - 1).leading_zeros()).min(30)));
        }
        if n.saturating_mul(self.w_max as u64) >= 1 << 31 {
            return bad(format!("headroom: n·w_max = {n}·{} ≥ 2^31", self.w_max));
        }
        Ok(())
    }

    /// Encodes `delta` with weight `num_examples` (capped at w_max) into
    /// `delta.len() + 1` lanes. Non-finite coordinates are rejected.
    pub fn encode<R: RngCore>(&self, delta: &[f32], num_examples: u32, rng: &mut R) -> Result<Vec<u32>> {
        let mut out = vec![0u32; delta.len() + 1];
        self.encode_into(delta, num_examples, rng, &mut out)?;
        Ok(out)
    }

    /// Like [`QuantParams::encode`], into a caller-provided buffer of `delta.len() + 1` lanes.
    pub fn encode_into<R: RngCore>(&self, delta: &[f32], num_examples: u32, rng: &mut R, out: &mut [u32]) -> Result<()> {
        if out.len() != delta.len() + 1 {
            return Err(SecAggError::LengthMismatch { expected: delta.len() + 1, got: out.len() });
        }
        if !delta.iter().all(|d| d.is_finite()) {
            return Err(SecAggError::Malformed("non-finite value in the update".into()));
        }
        let w = num_examples.min(self.w_max);
        // f64 keeps the fraction exact enough for unbiased rounding at every b ≤ 31.
        let factor = w as f64 * self.scale();
        let c = self.clip;
        // ChaCha12 (rand's StdRng core) seeded from the caller's CSPRNG: rounding
        // noise needs unpredictability, not ChaCha20's margin, and it is ~1.6× faster.
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let mut local = ChaCha12Rng::from_seed(seed);
        seed.zeroize();
        let mut bytes = [0u8; RNG_BATCH * 4];
        for (dchunk, ochunk) in delta.chunks(RNG_BATCH).zip(out.chunks_mut(RNG_BATCH)) {
            local.fill_bytes(&mut bytes[..dchunk.len() * 4]);
            for ((o, &d), r) in ochunk.iter_mut().zip(dchunk).zip(bytes.chunks_exact(4)) {
                let r = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                // |v| < 2^30, so v + 2^31 is positive and truncation is floor
                // (f64::floor is a libm call on baseline x86-64).
                let shifted = d.clamp(-c, c) as f64 * factor + OFFSET;
                let fl = shifted as i64;
                let up = ((shifted - fl as f64) * 4_294_967_296.0) > r as f64;
                *o = (fl - OFFSET as i64 + up as i64) as i32 as u32;
            }
        }
        out[delta.len()] = w;
        Ok(())
    }

    /// Decodes the secure sum of `sum.len()` lanes (weight last) into the
    /// weighted mean Σ(w·Δ)/Σw and Σw. Fails when Σw = 0.
    pub fn decode_mean(&self, sum: &[u32]) -> Result<(Vec<f32>, u32)> {
        let (mean, w) = self.decode_mean_of(&[sum])?;
        Ok((mean, w as u32))
    }

    /// The weighted mean over several secure sums of the same encoding (the released sums of
    /// a round's shards): each lane read as i32 (no sum wraps within its own headroom) and
    /// added in i64, so the total may exceed what one session's lanes could hold.
    pub fn decode_mean_of(&self, sums: &[&[u32]]) -> Result<(Vec<f32>, u64)> {
        let lanes = sums.first().map_or(0, |s| s.len());
        if lanes == 0 || sums.iter().any(|s| s.len() != lanes) {
            return Err(SecAggError::LengthMismatch { expected: lanes.max(1), got: sums.iter().map(|s| s.len()).find(|&l| l != lanes).unwrap_or(0) });
        }
        let mut total = vec![0i64; lanes - 1];
        let mut total_w = 0u64;
        for s in sums {
            let (&w, lanes) = s.split_last().expect("checked non-empty");
            if w > i32::MAX as u32 {
                return Err(SecAggError::Malformed(format!("summed weight {w}")));
            }
            total_w += w as u64;
            for (t, &q) in total.iter_mut().zip(lanes) {
                *t += q as i32 as i64;
            }
        }
        if total_w == 0 {
            return Err(SecAggError::Malformed("summed weight 0".into()));
        }
        let inv = 1.0 / (self.scale() * total_w as f64);
        Ok((total.iter().map(|&q| (q as f64 * inv) as f32).collect(), total_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let q = QuantParams { bits: 8, clip: 1.0, w_max: 1 };
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        // 0.3 / (1/127) = 38.1 → 38 or 39, mean 38.1.
        let enc = q.encode(&vec![0.3f32; 100_000], 1, &mut rng).unwrap();
        let mean = enc[..100_000].iter().map(|&x| x as i32 as f64).sum::<f64>() / 1e5;
        assert!((mean - 38.1).abs() < 0.01, "{mean}");
        assert!(enc[..100_000].iter().all(|&x| x == 38 || x == 39));
    }

    #[test]
    fn negative_values_and_clipping() {
        let q = QuantParams { bits: 16, clip: 0.5, w_max: 4 };
        let mut rng = ChaCha20Rng::from_seed([2; 32]);
        let enc = q.encode(&[-3.0, 3.0, -0.25], 10, &mut rng).unwrap();
        assert_eq!(enc[0] as i32, -32767);
        assert_eq!(enc[1] as i32, 32767);
        assert_eq!(enc[3], 4, "weight capped at w_max");
        let (mean, w) = q.decode_mean(&enc).unwrap();
        assert_eq!(w, 4);
        assert!((mean[0] + 0.5).abs() < 1e-4 && (mean[2] + 0.25).abs() < 1e-4, "{mean:?}");
        assert!(q.encode(&[f32::NAN], 1, &mut rng).is_err());
    }

    #[test]
    fn headroom_limits() {
        assert!(QuantParams { bits: 20, clip: 1.0, w_max: 1 }.validate(4096).is_ok());
        assert!(QuantParams { bits: 21, clip: 1.0, w_max: 1 }.validate(4097).is_err());
        assert!(QuantParams { bits: 16, clip: 1.0, w_max: 1 << 20 }.validate(4096).is_err());
        assert!(QuantParams { bits: 32, clip: 1.0, w_max: 1 }.validate(1).is_err());
    }
}
