//! `SessionConfig` (§8.1): the parameters every party must agree on, bound
//! into `config_hash` = SHA-256 of a canonical byte encoding, and the
//! derivation of `session_id` (§8.2).
//!
//! Canonical encoding: the ASCII label "flsa/v1/config", then each field in
//! declaration order, integers big-endian at their declared width, f32 as its
//! IEEE-754 bits big-endian, booleans as one byte, enums as a one-byte tag
//! followed by their fields.

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::dp::DpParams;
use crate::error::{Result, SecAggError};
use crate::harary::{AdversaryClass, find_parameters};
use crate::prg::CipherSuite;
use crate::spec::{MAX_CLIENTS, labels};

/// The only modulus implemented: u32 lanes.
pub const MODULUS_BITS: u8 = 32;
/// Upper bound on `m` accepted from a config (guards allocations driven by peers).
pub const MAX_LANES: u64 = 1 << 30;

/// How client vectors are encoded into u32 lanes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "encoding")]
pub enum Encoding {
    /// §8.4: per-coordinate clip to [−clip, clip], scale, stochastic rounding,
    /// i32 bit-cast to u32, weight appended as the last lane.
    SignedTwosComplement {
        /// b: magnitude bits including sign.
        quant_bits: u8,
        /// c: per-coordinate clip.
        clip: f32,
        /// w_max: cap on a client's weight (number of examples).
        w_max: u32,
    },
    /// Appendix B: distributed discrete Gaussian (L2 clip, rotation, rounding, noise).
    DistributedDiscreteGaussian(DpParams),
}

/// Per-phase deadlines, enforced by the caller (the state machines do no timing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// R0: key advertisement.
    pub advertise_ms: u64,
    /// R1: share keys.
    pub share_keys_ms: u64,
    /// R2: masked input upload.
    pub masked_input_ms: u64,
    /// R4: unmasking.
    pub unmask_ms: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines { advertise_ms: 30_000, share_keys_ms: 30_000, masked_input_ms: 600_000, unmask_ms: 30_000 }
    }
}

/// The server's session configuration (§8.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionConfig {
    /// Round identifier (also signed into each key advertisement).
    pub round_id: u64,
    /// Global model version the update applies to.
    pub model_version: u64,
    /// Cipher suite (1 = AES-CTR PRG, 2 = ChaCha20 PRG).
    pub ciphersuite: CipherSuite,
    /// Number of clients selected for the round.
    pub n_selected: u32,
    /// Neighbour-graph degree k (even); `k ≥ n − 1` means the full graph (plain SecAgg).
    pub degree: u32,
    /// Shamir threshold t.
    pub threshold: u32,
    /// Number of u32 lanes per client vector, weight lane included.
    pub m: u64,
    /// Lane width: 32 (64 is reserved by the spec, not implemented).
    pub modulus_bits: u8,
    /// Vector encoding.
    pub encoding: Encoding,
    /// Per-phase deadlines.
    pub deadlines: Deadlines,
    /// Active mode (semi-malicious thresholds; R3 consistency round is not implemented).
    pub active_mode: bool,
}

impl SessionConfig {
    /// A config with graph parameters chosen per §8.1 (full graph for n ≤ 200,
    /// else the Harary finder with γ = 0.05, δ = 0.33) and the default
    /// quantization width for n (b = 20 for n ≤ 1024, 16 for n ≤ 16384, else the
    /// largest width the headroom allows).
    pub fn recommended(round_id: u64, model_version: u64, n_selected: u32, m: u64) -> Result<Self> {
        let (degree, threshold) = recommended_graph(n_selected, false)?;
        let quant_bits = default_quant_bits(n_selected)?;
        let cfg = SessionConfig {
            round_id,
            model_version,
            ciphersuite: CipherSuite::Aes128Ctr,
            n_selected,
            degree,
            threshold,
            m,
            modulus_bits: MODULUS_BITS,
            encoding: Encoding::SignedTwosComplement { quant_bits, clip: 1.0, w_max: 1024 },
            deadlines: Deadlines::default(),
            active_mode: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Switches the session to distributed DP: the DP encoding, and as many lanes as it pads
    /// the update to.
    pub fn use_dp(&mut self, dp: crate::dp::DpParams) {
        self.m = dp.lanes() as u64;
        self.encoding = Encoding::DistributedDiscreteGaussian(dp);
    }

    /// The quantization of the signed two's-complement encoding (None for the DP encoding,
    /// whose lanes are decoded by [`crate::dp`]).
    pub fn quant_params(&self) -> Option<crate::quant::QuantParams> {
        match &self.encoding {
            Encoding::SignedTwosComplement { quant_bits, clip, w_max } => Some(crate::quant::QuantParams { bits: *quant_bits, clip: *clip, w_max: *w_max }),
            Encoding::DistributedDiscreteGaussian(_) => None,
        }
    }

    /// A device's update as its SecAgg+ input under this session's encoding, with the weight
    /// it carries: quantized and weighted by its `examples` (capped at `w_max`), or under DP
    /// clipped, rotated and noised with this device's share, unweighted. One implementation
    /// for the device and the simulation.
    pub fn encode_update<R: rand_core::RngCore>(&self, delta: &[f32], examples: u32, rng: &mut R) -> Result<(Vec<u32>, u32)> {
        match &self.encoding {
            Encoding::SignedTwosComplement { .. } => {
                let quant = self.quant_params().expect("the quantized encoding");
                let weight = examples.min(quant.w_max).max(1);
                Ok((quant.encode(delta, weight, rng)?, weight))
            }
            Encoding::DistributedDiscreteGaussian(dp) => Ok((dp.encode(delta, rng)?, 1)),
        }
    }

    /// The round's mean update from the aggregated sum of `contributors` inputs, and its
    /// total weight: the weighted mean (quantized), or the noisy sum over the contributors
    /// (DP, unweighted). What the coordinator commits and the simulation applies.
    pub fn decode_mean(&self, sum: &[u32], contributors: usize) -> Result<(Vec<f32>, u32)> {
        let (mean, w) = self.decode_mean_of(&[(sum, contributors)])?;
        u32::try_from(w).map(|w| (mean, w)).map_err(|_| SecAggError::Malformed(format!("total weight {w}")))
    }

    /// [`SessionConfig::decode_mean`] over the released sums of several sessions that share
    /// this encoding (a round's shards), each with its number of contributors: quantized
    /// lanes added in i64, DP sums decoded one by one (each wraps in its own b bits) and added.
    pub fn decode_mean_of(&self, sums: &[(&[u32], usize)]) -> Result<(Vec<f32>, u64)> {
        match &self.encoding {
            Encoding::SignedTwosComplement { .. } => {
                let lanes: Vec<&[u32]> = sums.iter().map(|(s, _)| *s).collect();
                self.quant_params().expect("the quantized encoding").decode_mean_of(&lanes)
            }
            Encoding::DistributedDiscreteGaussian(dp) => {
                let contributors: usize = sums.iter().map(|(_, k)| k).sum();
                if contributors == 0 {
                    return Err(SecAggError::Malformed("a DP sum of no contributors".into()));
                }
                let mut total = vec![0f64; dp.dim as usize];
                for (s, _) in sums {
                    for (t, x) in total.iter_mut().zip(dp.decode_sum(s)?) {
                        *t += x as f64;
                    }
                }
                let k = contributors as f64;
                Ok((total.into_iter().map(|x| (x / k) as f32).collect(), contributors as u64))
            }
        }
    }

    /// Whether every client is every other client's neighbour.
    pub fn is_full_graph(&self) -> bool {
        self.degree >= self.n_selected.saturating_sub(1)
    }

    /// Checks consistency and the headroom constraint n·(2^{b−1}−1) < 2^31.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(SecAggError::InvalidConfig(s));
        let n = self.n_selected;
        if !(2..=MAX_CLIENTS).contains(&n) {
            return bad(format!("n_selected {n} outside 2..={MAX_CLIENTS}"));
        }
        if self.modulus_bits != MODULUS_BITS {
            return bad(format!("modulus_bits {} (only 32 is implemented)", self.modulus_bits));
        }
        if self.m < 2 || self.m > MAX_LANES {
            return bad(format!("m = {} outside 2..={MAX_LANES}", self.m));
        }
        if !self.is_full_graph() && (!self.degree.is_multiple_of(2) || self.degree < 2) {
            return bad(format!("degree {} must be even and ≥ 2 for a sparse graph", self.degree));
        }
        let max_neighbours = self.degree.min(n - 1);
        if self.threshold < 1 || self.threshold > max_neighbours {
            return bad(format!("threshold {} outside 1..={max_neighbours}", self.threshold));
        }
        match &self.encoding {
            Encoding::SignedTwosComplement { quant_bits, clip, w_max } => {
                crate::quant::QuantParams { bits: *quant_bits, clip: *clip, w_max: *w_max }.validate(n as u64)?;
            }
            Encoding::DistributedDiscreteGaussian(p) => {
                p.validate(n as u64)?;
                if self.m != p.lanes() as u64 {
                    return bad(format!("m = {} but the DP encoding produces {} lanes", self.m, p.lanes()));
                }
            }
        }
        Ok(())
    }

    /// Canonical byte encoding (see the module docs).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(labels::CONFIG);
        b.extend_from_slice(&self.round_id.to_be_bytes());
        b.extend_from_slice(&self.model_version.to_be_bytes());
        b.push(self.ciphersuite.code());
        b.extend_from_slice(&self.n_selected.to_be_bytes());
        b.extend_from_slice(&self.degree.to_be_bytes());
        b.extend_from_slice(&self.threshold.to_be_bytes());
        b.extend_from_slice(&self.m.to_be_bytes());
        b.push(self.modulus_bits);
        match &self.encoding {
            Encoding::SignedTwosComplement { quant_bits, clip, w_max } => {
                b.push(1);
                b.push(*quant_bits);
                b.extend_from_slice(&clip.to_bits().to_be_bytes());
                b.extend_from_slice(&w_max.to_be_bytes());
            }
            Encoding::DistributedDiscreteGaussian(p) => {
                b.push(2);
                p.encode_canonical(&mut b);
            }
        }
        let d = &self.deadlines;
        for ms in [d.advertise_ms, d.share_keys_ms, d.masked_input_ms, d.unmask_ms] {
            b.extend_from_slice(&ms.to_be_bytes());
        }
        b.push(self.active_mode as u8);
        b
    }

    /// config_hash = SHA-256(canonical encoding).
    pub fn config_hash(&self) -> [u8; 32] {
        sha256(&self.canonical_bytes())
    }
}

/// One U1 member's advertised keys, as bound into `session_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RosterEntry {
    /// Client id.
    pub id: u32,
    /// Channel public key.
    pub c_pk: [u8; 32],
    /// Mask public key.
    pub s_pk: [u8; 32],
}

/// session_id = SHA-256("flsa/v1/session" ‖ config_hash ‖ Σ_sorted_by_id (id_u32_be ‖ c_pk ‖ s_pk)).
/// Rejects duplicate ids.
pub fn session_id(config_hash: &[u8; 32], roster: &[RosterEntry]) -> Result<[u8; 32]> {
    let mut sorted: Vec<&RosterEntry> = roster.iter().collect();
    sorted.sort_by_key(|e| e.id);
    if sorted.windows(2).any(|w| w[0].id == w[1].id) {
        return Err(SecAggError::Malformed("duplicate id in roster".into()));
    }
    let mut b = Vec::with_capacity(labels::SESSION.len() + 32 + 68 * sorted.len());
    b.extend_from_slice(labels::SESSION);
    b.extend_from_slice(config_hash);
    for e in sorted {
        b.extend_from_slice(&e.id.to_be_bytes());
        b.extend_from_slice(&e.c_pk);
        b.extend_from_slice(&e.s_pk);
    }
    Ok(sha256(&b))
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

/// The (k, t) a session of `n` clients gets: [`graph_parameters`] with γ = 0.05, δ = 0.33.
/// One choice for a round's session and for each shard of a sharded round.
pub fn recommended_graph(n: u32, active: bool) -> Result<(u32, u32)> {
    graph_parameters(n, 0.05, 0.33, active)
}

/// (degree k, threshold t) per §8.1: the full graph for n ≤ 200 with
/// t = ⌊n/2⌋+1 (active: ⌊2n/3⌋+1); above, the Harary parameter finder
/// (curious server, or semi-malicious in active mode).
pub fn graph_parameters(n: u32, gamma: f64, delta: f64, active: bool) -> Result<(u32, u32)> {
    if n < 2 {
        return Err(SecAggError::InvalidConfig(format!("n = {n} < 2")));
    }
    if n <= 200 {
        let t = if active { 2 * n / 3 + 1 } else { n / 2 + 1 };
        return Ok((n - 1, t.min(n - 1)));
    }
    let class = if active { AdversaryClass::SemiMalicious } else { AdversaryClass::Curious };
    let p = find_parameters(n, gamma, delta, class)?;
    Ok((p.degree, p.threshold))
}

/// Default b for n (§8.1): 20 up to 1024 clients, 16 up to 16384, else the
/// largest b with n·(2^{b−1}−1) < 2^31.
pub fn default_quant_bits(n: u32) -> Result<u8> {
    let b = if n <= 1024 {
        20
    } else if n <= 16384 {
        16
    } else {
        (2..=31u8)
            .rev()
            .find(|&b| (n as u64) * ((1u64 << (b - 1)) - 1) < (1u64 << 31))
            .ok_or_else(|| SecAggError::InvalidConfig(format!("no quantization width fits n = {n}")))?
    };
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The round's arithmetic both ways, as the device encodes and the coordinator (and the
    /// simulation) decodes: a weighted mean when quantized, the plain mean of the clipped
    /// updates under noiseless DP.
    #[test]
    fn updates_encoded_by_devices_decode_to_the_round_mean() {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([5; 32]);
        let updates = [vec![0.1f32, -0.2, 0.3, 0.0], vec![-0.3f32, 0.1, 0.1, 0.2]];
        let sum = |inputs: &[Vec<u32>]| (0..inputs[0].len()).map(|j| inputs.iter().fold(0u32, |a, x| a.wrapping_add(x[j]))).collect::<Vec<u32>>();
        let mut cfg = SessionConfig::recommended(1, 0, 2, 5).unwrap();
        cfg.encoding = Encoding::SignedTwosComplement { quant_bits: 20, clip: 1.0, w_max: 10 };
        let (a, wa) = cfg.encode_update(&updates[0], 3, &mut rng).unwrap();
        let (b, wb) = cfg.encode_update(&updates[1], 50, &mut rng).unwrap();
        assert_eq!((wa, wb), (3, 10), "weights are the examples, capped at w_max");
        let (mean, total) = cfg.decode_mean(&sum(&[a, b]), 2).unwrap();
        assert_eq!(total, 13);
        for j in 0..4 {
            let want = (3.0 * updates[0][j] + 10.0 * updates[1][j]) / 13.0;
            assert!((mean[j] - want).abs() < 1e-3, "{j}: {} vs {want}", mean[j]);
        }
        let dp = crate::dp::DpParams {
            dim: 4,
            l2_clip: 1.0,
            gamma: 1e-3,
            noise_multiplier: 0.0,
            expected_clients: 2,
            bits: 24,
            beta: (-0.5f32).exp(),
            rotation_seed: [9; 32],
        };
        cfg.encoding = Encoding::DistributedDiscreteGaussian(dp);
        let (a, wa) = cfg.encode_update(&updates[0], 3, &mut rng).unwrap();
        let (b, _) = cfg.encode_update(&updates[1], 50, &mut rng).unwrap();
        assert_eq!(wa, 1, "DP updates are unweighted");
        let (mean, total) = cfg.decode_mean(&sum(&[a, b]), 2).unwrap();
        assert_eq!(total, 2);
        for j in 0..4 {
            let want = (updates[0][j] + updates[1][j]) / 2.0;
            assert!((mean[j] - want).abs() < 5e-3, "{j}: {} vs {want}", mean[j]);
        }
        assert!(cfg.decode_mean(&sum(&[vec![0; 4]]), 0).is_err());
    }

    #[test]
    fn small_cohorts_use_the_full_graph() {
        assert_eq!(graph_parameters(10, 0.05, 0.33, false).unwrap(), (9, 6));
        assert_eq!(graph_parameters(200, 0.05, 0.33, false).unwrap(), (199, 101));
        assert_eq!(graph_parameters(30, 0.05, 0.33, true).unwrap(), (29, 21));
        assert_eq!(graph_parameters(1000, 0.05, 0.33, false).unwrap(), (72, 24));
    }

    #[test]
    fn headroom_is_enforced() {
        let mut c = SessionConfig::recommended(1, 1, 1000, 11).unwrap();
        assert!(c.validate().is_ok());
        c.encoding = Encoding::SignedTwosComplement { quant_bits: 23, clip: 1.0, w_max: 1 };
        assert!(matches!(c.validate(), Err(SecAggError::InvalidConfig(_))));
    }

    #[test]
    fn config_hash_changes_with_every_field() {
        let base = SessionConfig::recommended(1, 1, 10, 11).unwrap();
        let h = base.config_hash();
        let mut c = base.clone();
        c.round_id = 2;
        assert_ne!(c.config_hash(), h);
        let mut c = base.clone();
        c.m = 12;
        assert_ne!(c.config_hash(), h);
        let mut c = base.clone();
        c.ciphersuite = CipherSuite::ChaCha20;
        assert_ne!(c.config_hash(), h);
        let mut c = base;
        c.active_mode = true;
        assert_ne!(c.config_hash(), h);
    }
}
