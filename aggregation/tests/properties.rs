//! Property tests of the building blocks: Shamir thresholds, modular
//! wrap-around and the signed encoding's decode.

use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use spa_aggregation::SecAggError;
use spa_aggregation::quant::QuantParams;
use spa_aggregation::shamir::{Lagrange, LagrangeCache, Share, reconstruct, split};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Exactly t shares reconstruct, more than t too, t − 1 are refused and,
    /// interpolated anyway, do not give the secret.
    #[test]
    fn shamir_thresholds(secret in any::<[u8; 32]>(), n in 2usize..40, t_frac in 0.0f64..1.0, seed in any::<u64>()) {
        let t = 1 + ((n - 1) as f64 * t_frac) as usize;
        let holders: Vec<u32> = (0..n as u32).map(|i| i * 5 + 2).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let shares = split(&secret, t, &holders, &mut rng).unwrap();
        let pairs: Vec<(u32, &Share)> = holders.iter().copied().zip(shares.iter()).collect();
        // A subset of exactly t starting at a random point, and all n.
        let start = (seed as usize) % (n - t + 1);
        prop_assert_eq!(reconstruct(t, &pairs[start..start + t]).unwrap(), secret);
        prop_assert_eq!(reconstruct(t, &pairs).unwrap(), secret);
        let mut cache = LagrangeCache::default();
        prop_assert_eq!(cache.reconstruct(t, &pairs[..t]).unwrap(), secret);
        prop_assert_eq!(cache.reconstruct(t, &pairs[..t]).unwrap(), secret);
        prop_assert_eq!(cache.len(), 1);
        if t >= 2 {
            let few = &pairs[..t - 1];
            let is_below_threshold = matches!(reconstruct(t, few), Err(SecAggError::BelowThreshold { .. }));
            prop_assert!(is_below_threshold);
            let lag = Lagrange::new(&holders[..t - 1]).unwrap();
            let refs: Vec<&Share> = shares[..t - 1].iter().collect();
            prop_assert_ne!(lag.reconstruct(&refs).ok(), Some(secret));
        }
        // Duplicated holder indices are rejected.
        let mut dup = pairs[..t].to_vec();
        dup.push(pairs[0]);
        let is_reconstruction_error = matches!(reconstruct(t, &dup), Err(SecAggError::Reconstruction(_)));
        prop_assert!(is_reconstruction_error);
    }

    /// Summing encodings of n clients and decoding gives the weighted mean
    /// within n/(s·Σw), for any signs, at the widest b the headroom allows
    /// (so lane sums come within one client of ±2^31).
    #[test]
    fn quantized_sum_decodes_to_weighted_mean(
        n in 1u64..64,
        vals in proptest::collection::vec(-2.0f32..2.0, 64 * 8),
        weights in proptest::collection::vec(1u32..50, 64),
        seed in any::<u64>(),
    ) {
        let bits = (2..=31u8).rev().find(|&b| n * ((1u64 << (b - 1)) - 1) < 1 << 31).unwrap();
        let q = QuantParams { bits, clip: 1.5, w_max: 40 };
        q.validate(n).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut sum = vec![0u32; 9];
        let mut want = [0f64; 8];
        let mut wsum = 0f64;
        for c in 0..n as usize {
            let d = &vals[c * 8..c * 8 + 8];
            let w = weights[c];
            for (s, e) in sum.iter_mut().zip(q.encode(d, w, &mut rng).unwrap()) {
                *s = s.wrapping_add(e);
            }
            let w = w.min(40) as f64;
            for (a, v) in want.iter_mut().zip(d) {
                *a += w * v.clamp(-1.5, 1.5) as f64;
            }
            wsum += w;
        }
        let (mean, tw) = q.decode_mean(&sum).unwrap();
        prop_assert_eq!(tw as f64, wsum);
        let tol = n as f64 / (q.scale() * wsum) + 1e-6;
        for (g, w) in mean.iter().zip(want) {
            prop_assert!((*g as f64 - w / wsum).abs() <= tol, "{} vs {}", g, w / wsum);
        }
    }
}

/// Lanes at the extremes of the headroom: n clients at ±(2^{b−1}−1) sum to
/// within [−2^31+1, 2^31−1] and decode with the right sign.
#[test]
fn extreme_sums_do_not_wrap() {
    for (n, bits) in [(2u64, 31u8), (1000, 21), (4096, 20)] {
        let q = QuantParams { bits, clip: 1.0, w_max: 1 };
        q.validate(n).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(n);
        for sign in [1.0f32, -1.0] {
            let enc = q.encode(&[sign * 5.0], 1, &mut rng).unwrap();
            let mut sum = [0u32; 2];
            for _ in 0..n {
                sum[0] = sum[0].wrapping_add(enc[0]);
                sum[1] = sum[1].wrapping_add(enc[1]);
            }
            let expect = sign as i64 * n as i64 * ((1i64 << (bits - 1)) - 1);
            assert_eq!(sum[0] as i32 as i64, expect, "n {n} b {bits}");
            let (mean, _) = q.decode_mean(&sum).unwrap();
            assert!((mean[0] - sign).abs() < 1e-6, "{mean:?}");
        }
    }
}
