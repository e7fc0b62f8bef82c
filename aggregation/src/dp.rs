//! Distributed discrete Gaussian (Appendix B; Kairouz, Liu & Steinke 2021).
//! Off unless a session's encoding selects it.
//!
//! Client: L2-clip to C; zero-pad to d = next power of two; rotate with a
//! randomized Hadamard transform H·D/√d (D = ±1 signs from ChaCha20 seeded
//! with the config's public `rotation_seed`, bit i of the u32 stream,
//! LSB first, 1 = −1); divide by γ; conditional randomized rounding (retry
//! until the L2 norm is within the bound set by β); add discrete Gaussian
//! noise N_Z(0, σ²) with σ = z·C/(γ·√n_expected); reduce to b-bit signed
//! (modular clipping), stored as i32 bit-cast to u32 lanes.
//! Server: reduce each summed lane mod 2^b to signed, multiply by γ, undo
//! the rotation, drop the padding: the sum of clipped updates plus noise.
//!
//! Dropouts remove noise shares: set `expected_clients` to the fewest
//! survivors the privacy budget must hold for.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SecAggError};

/// Largest local σ (integer units) the exact sampler's 128-bit arithmetic supports.
pub const MAX_SIGMA: f64 = 16384.0;
/// σ² is represented as a rational with this denominator.
const SIGMA2_DEN: u128 = 1 << 16;

/// DP encoding parameters (part of the session config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpParams {
    /// Length of the update before padding.
    pub dim: u32,
    /// L2 clip C.
    pub l2_clip: f32,
    /// Granularity γ: one integer unit is γ in update space.
    pub gamma: f32,
    /// Noise multiplier z: central σ = z·C.
    pub noise_multiplier: f32,
    /// Clients the noise is split over (the expected survivors).
    pub expected_clients: u32,
    /// Modular clipping width b (2..=32).
    pub bits: u8,
    /// Conditional rounding β in [0, 1); 0 accepts the first rounding.
    pub beta: f32,
    /// Public seed of the rotation's signs.
    pub rotation_seed: [u8; 32],
}

impl DpParams {
    /// The parameters a round uses for an update of `dim` values, L2 clip `l2_clip` and noise
    /// multiplier `z`, the noise split over `expected_clients`: 24-bit modular clipping, a
    /// granularity of clip / 2^14 and conditional rounding at beta = e^-0.5. One definition
    /// for the coordinator's rounds and the simulation.
    pub fn for_round(dim: usize, l2_clip: f32, z: f32, expected_clients: u32, rotation_seed: [u8; 32]) -> Result<Self> {
        let dim = u32::try_from(dim).map_err(|_| SecAggError::InvalidConfig(format!("{dim} parameters are too many for DP")))?;
        Ok(Self { dim, l2_clip, gamma: l2_clip / 16384.0, noise_multiplier: z, expected_clients, bits: 24, beta: (-0.5f32).exp(), rotation_seed })
    }

    /// Lanes on the wire: d = next power of two ≥ dim.
    pub fn lanes(&self) -> usize {
        (self.dim.max(1) as usize).next_power_of_two()
    }

    /// Each client's noise σ in integer units.
    pub fn local_sigma(&self) -> f64 {
        self.noise_multiplier as f64 * self.l2_clip as f64 / (self.gamma as f64 * (self.expected_clients.max(1) as f64).sqrt())
    }

    /// Checks ranges; `n` is the cohort size.
    pub fn validate(&self, n: u64) -> Result<()> {
        let bad = |s: String| Err(SecAggError::InvalidConfig(s));
        if self.dim == 0 || self.dim > 1 << 28 {
            return bad(format!("dp dim {}", self.dim));
        }
        if !(self.l2_clip.is_finite() && self.l2_clip > 0.0 && self.gamma.is_finite() && self.gamma > 0.0) {
            return bad("dp l2_clip and gamma must be finite and > 0".into());
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return bad("dp noise_multiplier must be finite and ≥ 0".into());
        }
        if !(2..=32).contains(&self.bits) {
            return bad(format!("dp bits {} outside 2..=32", self.bits));
        }
        if !(0.0..1.0).contains(&self.beta) {
            return bad(format!("dp beta {} outside [0, 1)", self.beta));
        }
        if self.expected_clients == 0 || self.expected_clients as u64 > n {
            return bad(format!("dp expected_clients {} outside 1..={n}", self.expected_clients));
        }
        if self.local_sigma() > MAX_SIGMA {
            return bad(format!("dp local sigma {} > {MAX_SIGMA}", self.local_sigma()));
        }
        Ok(())
    }

    pub(crate) fn encode_canonical(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.dim.to_be_bytes());
        for f in [self.l2_clip, self.gamma, self.noise_multiplier] {
            b.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        b.extend_from_slice(&self.expected_clients.to_be_bytes());
        b.push(self.bits);
        b.extend_from_slice(&self.beta.to_bits().to_be_bytes());
        b.extend_from_slice(&self.rotation_seed);
    }

    fn signs(&self) -> Vec<f64> {
        let d = self.lanes();
        let mut rng = ChaCha20Rng::from_seed(self.rotation_seed);
        let mut out = Vec::with_capacity(d);
        while out.len() < d {
            let w = rng.next_u32();
            for i in 0..32.min(d - out.len()) {
                out.push(if (w >> i) & 1 == 1 { -1.0 } else { 1.0 });
            }
        }
        out
    }

    /// Client side: encodes `delta` (length `dim`) into `lanes()` u32 lanes.
    pub fn encode<R: RngCore>(&self, delta: &[f32], rng: &mut R) -> Result<Vec<u32>> {
        if delta.len() != self.dim as usize {
            return Err(SecAggError::LengthMismatch { expected: self.dim as usize, got: delta.len() });
        }
        if delta.iter().any(|x| !x.is_finite()) {
            return Err(SecAggError::Malformed("non-finite value in the update".into()));
        }
        let d = self.lanes();
        let mut x: Vec<f64> = delta.iter().map(|&v| v as f64).collect();
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let clip = self.l2_clip as f64;
        if norm > clip {
            x.iter_mut().for_each(|v| *v *= clip / norm);
        }
        x.resize(d, 0.0);
        for (v, s) in x.iter_mut().zip(self.signs()) {
            *v *= s;
        }
        fwht(&mut x);
        let scale = 1.0 / ((d as f64).sqrt() * self.gamma as f64);
        x.iter_mut().for_each(|v| *v *= scale);
        let rounded = self.conditional_round(&x, rng);
        let sigma = self.local_sigma();
        let (sn, sd) = ((sigma * sigma * SIGMA2_DEN as f64).round() as u128, SIGMA2_DEN);
        let mut out = Vec::with_capacity(d);
        for r in rounded {
            let noisy = if sn == 0 { r } else { r + discrete_gaussian(sn, sd, rng) };
            out.push(wrap_signed(noisy, self.bits) as u32);
        }
        Ok(out)
    }

    /// Randomized rounding, repeated until ‖r‖² is within
    /// min(c² + d/4 + √(2 ln 1/β)·(c + √d/2), (c + √d)²), c = C/γ.
    fn conditional_round<R: RngCore>(&self, x: &[f64], rng: &mut R) -> Vec<i64> {
        let d = x.len() as f64;
        let c = self.l2_clip as f64 / self.gamma as f64;
        let bound = if self.beta > 0.0 {
            let a = c * c + d / 4.0 + (2.0 * (1.0 / self.beta as f64).ln()).sqrt() * (c + d.sqrt() / 2.0);
            a.min((c + d.sqrt()).powi(2))
        } else {
            f64::INFINITY
        };
        loop {
            let r: Vec<i64> = x
                .iter()
                .map(|&v| {
                    let fl = v.floor();
                    let up = (v - fl) * 4_294_967_296.0 > rng.next_u32() as f64;
                    fl as i64 + up as i64
                })
                .collect();
            let n2: f64 = r.iter().map(|&v| (v as f64).powi(2)).sum();
            if n2 <= bound {
                return r;
            }
        }
    }

    /// Server side: decodes the summed lanes into Σ clipped updates (+ noise), length `dim`.
    pub fn decode_sum(&self, sum: &[u32]) -> Result<Vec<f32>> {
        let d = self.lanes();
        if sum.len() != d {
            return Err(SecAggError::LengthMismatch { expected: d, got: sum.len() });
        }
        let scale = self.gamma as f64 / (d as f64).sqrt();
        let mut y: Vec<f64> = sum.iter().map(|&v| wrap_signed(v as i64, self.bits) as f64 * scale).collect();
        fwht(&mut y);
        Ok(y.iter().zip(self.signs()).take(self.dim as usize).map(|(v, s)| (v * s) as f32).collect())
    }
}

/// Reduces x mod 2^bits into [−2^{bits−1}, 2^{bits−1}).
fn wrap_signed(x: i64, bits: u8) -> i64 {
    let m = 1i64 << bits;
    let r = x.rem_euclid(m);
    if r >= m / 2 { r - m } else { r }
}

/// In-place unnormalized fast Walsh–Hadamard transform (length a power of two); H·H = d·I.
fn fwht(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// Uniform integer in [0, n), n ≥ 1 (rejection sampling on 128 bits).
fn uniform_below<R: RngCore>(n: u128, rng: &mut R) -> u128 {
    let zone = u128::MAX - (u128::MAX - n + 1) % n;
    loop {
        let w = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
        if w <= zone {
            return w % n;
        }
    }
}

fn bernoulli<R: RngCore>(num: u128, den: u128, rng: &mut R) -> bool {
    uniform_below(den, rng) < num
}

/// Bernoulli(exp(−num/den)), exactly (CKS 2020, Algorithm 1).
fn bernoulli_exp_minus<R: RngCore>(num: u128, den: u128, rng: &mut R) -> bool {
    if num <= den {
        let mut k: u128 = 1;
        while bernoulli(num, den * k, rng) {
            k += 1;
        }
        k % 2 == 1
    } else {
        for _ in 0..num / den {
            if !bernoulli_exp_minus(1, 1, rng) {
                return false;
            }
        }
        bernoulli_exp_minus(num % den, den, rng)
    }
}

/// Discrete Laplace with scale t ≥ 1: P(x) ∝ exp(−|x|/t) (CKS 2020, Algorithm 2).
fn discrete_laplace<R: RngCore>(t: u128, rng: &mut R) -> i64 {
    loop {
        let u = uniform_below(t, rng);
        if !bernoulli_exp_minus(u, t, rng) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_minus(1, 1, rng) {
            v += 1;
        }
        let x = u + t * v;
        let neg = bernoulli(1, 2, rng);
        if neg && x == 0 {
            continue;
        }
        let x = x.min(i64::MAX as u128) as i64;
        return if neg { -x } else { x };
    }
}

/// Discrete Gaussian N_Z(0, σ²) with σ² = sn/sd > 0, exact (CKS 2020, Algorithm 3).
fn discrete_gaussian<R: RngCore>(sn: u128, sd: u128, rng: &mut R) -> i64 {
    let t = ((sn as f64 / sd as f64).sqrt().floor() as u128) + 1;
    loop {
        let y = discrete_laplace(t, rng);
        // γ = (|y| − σ²/t)² / (2σ²) = (|y|·t·sd − sn)² / (2·sn·sd·t²)
        let Some(a) = (y.unsigned_abs() as u128).checked_mul(t * sd) else {
            continue;
        };
        let diff = a.abs_diff(sn);
        // Overflow only for |y| so far in the tail that acceptance has probability < 2^-1000.
        let Some(num) = diff.checked_mul(diff) else {
            continue;
        };
        if bernoulli_exp_minus(num, 2 * sn * sd * t * t, rng) {
            return y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(noise: f32, dim: u32) -> DpParams {
        DpParams { dim, l2_clip: 1.0, gamma: 1e-3, noise_multiplier: noise, expected_clients: 4, bits: 24, beta: (-0.5f32).exp(), rotation_seed: [9; 32] }
    }

    #[test]
    fn fwht_is_self_inverse_up_to_d() {
        let mut x = vec![1.0, -2.0, 3.5, 0.25, 0.0, 7.0, -1.0, 2.0];
        let orig = x.clone();
        fwht(&mut x);
        fwht(&mut x);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a / 8.0 - b).abs() < 1e-12);
        }
    }

    #[test]
    fn wrap_is_modular() {
        assert_eq!(wrap_signed(5, 4), 5);
        assert_eq!(wrap_signed(8, 4), -8);
        assert_eq!(wrap_signed(-9, 4), 7);
        assert_eq!(wrap_signed(u32::MAX as i64, 32), -1);
    }

    /// Noiseless path: the decoded sum of several clients equals the sum of
    /// their clipped inputs up to the rounding granularity.
    #[test]
    fn noiseless_sum_decodes() {
        let p = params(0.0, 100);
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let mut sum = vec![0u32; p.lanes()];
        let mut plain = vec![0f64; 100];
        for c in 0..4 {
            let x: Vec<f32> = (0..100).map(|i| ((i * 7 + c * 13) % 17) as f32 / 170.0 - 0.05).collect();
            let norm = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let f = if norm > 1.0 { 1.0 / norm } else { 1.0 };
            for (pl, v) in plain.iter_mut().zip(&x) {
                *pl += *v as f64 * f;
            }
            for (s, e) in sum.iter_mut().zip(p.encode(&x, &mut rng).unwrap()) {
                *s = s.wrapping_add(e);
            }
        }
        let dec = p.decode_sum(&sum).unwrap();
        let err: f64 = dec.iter().zip(&plain).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
        // Rounding adds at most γ·√d/2 per client in L2.
        assert!(err < 4.0 * 1e-3 * (128f64).sqrt() / 2.0, "err {err}");
    }

    /// An input with norm above C decodes to its clipped version.
    #[test]
    fn clipping_applies() {
        let p = params(0.0, 4);
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let dec = p.decode_sum(&p.encode(&[3.0, 4.0, 0.0, 0.0], &mut rng).unwrap()).unwrap();
        assert!((dec[0] - 0.6).abs() < 2e-3 && (dec[1] - 0.8).abs() < 2e-3, "{dec:?}");
    }

    #[test]
    fn discrete_gaussian_has_the_configured_variance() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        for sigma in [0.8f64, 3.5, 40.0] {
            let sn = (sigma * sigma * SIGMA2_DEN as f64).round() as u128;
            let n = 20_000;
            let xs: Vec<f64> = (0..n).map(|_| discrete_gaussian(sn, SIGMA2_DEN, &mut rng) as f64).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            // Standard error of the variance is σ²·√(2/n) ≈ 1%; allow 6%.
            assert!((var / (sigma * sigma) - 1.0).abs() < 0.06, "sigma {sigma}: var {var}");
            assert!(mean.abs() < 4.0 * sigma / (n as f64).sqrt(), "sigma {sigma}: mean {mean}");
        }
    }

    /// The encoder adds noise of the configured σ per lane (zero input).
    #[test]
    fn encoder_noise_matches_config() {
        let p = params(0.5, 4096);
        let sigma = p.local_sigma(); // 0.5·1/(1e-3·2) = 250
        let mut rng = ChaCha20Rng::from_seed([6; 32]);
        let lanes = p.encode(&vec![0.0; 4096], &mut rng).unwrap();
        let var = lanes.iter().map(|&v| (v as i32 as f64).powi(2)).sum::<f64>() / lanes.len() as f64;
        assert!((var / (sigma * sigma) - 1.0).abs() < 0.1, "var {var} vs {}", sigma * sigma);
    }
}
