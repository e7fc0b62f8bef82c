//! Sharded rounds: placement by hash, the release floor each shard enforces, and the mean
//! of the released shard sums against the plaintext mean of their contributors.
use std::collections::BTreeSet;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use spa_aggregation::dp::DpParams;
use spa_aggregation::shards::{assign, sessions, shard_count, shard_seed};
use spa_aggregation::sim::{Stage, run_sharded};
use spa_aggregation::{Encoding, ServerPhase, SessionConfig, ShardedServer};

fn cohort(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("device-{i:04}")).collect()
}

#[test]
fn placement_is_a_partition_fixed_by_the_seed() {
    let c = cohort(1000);
    let seed = shard_seed(7, 3, &c);
    let shards = assign(&seed, &c, 300, 100);
    assert_eq!(shards.len(), 4);
    let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![250; 4]);
    let all: BTreeSet<u32> = shards.iter().flatten().copied().collect();
    assert_eq!(all, (1..=1000).collect(), "every seat in exactly one shard");
    assert_eq!(assign(&seed, &c, 300, 100), shards, "the same seed places the same way");
    // Another round (or another cohort) places differently: nobody keeps their shard-mates.
    let other = assign(&shard_seed(8, 3, &c), &c, 300, 100);
    assert_ne!(other, shards);
    assert_ne!(shard_seed(7, 3, &c[1..]), seed);
    // Uneven counts differ by at most one; the floor caps the number of shards.
    let sizes: Vec<usize> = assign(&seed, &cohort(1001), 333, 100).iter().map(Vec::len).collect();
    assert_eq!(sizes.len(), 4);
    assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
    assert_eq!(shard_count(250, 100, 100), 2, "three shards of 83 would sit below the floor");
    assert_eq!(shard_count(50, 100, 100), 1);
    assert_eq!(shard_count(50, 10, 0), 5);
}

/// The round's base session with `bits`-bit lanes; shards of `shard_size`, floor `floor`.
fn sharded(n: usize, shard_size: usize, floor: usize, m: u64, bits: u8) -> (ShardedServer, SessionConfig) {
    let c = cohort(n);
    let placed = assign(&shard_seed(1, 0, &c), &c, shard_size, floor);
    let largest = placed.iter().map(Vec::len).max().unwrap() as u32;
    let mut base = SessionConfig::recommended(1, 0, largest, m).unwrap();
    base.encoding = Encoding::SignedTwosComplement { quant_bits: bits, clip: 1.0, w_max: 8 };
    let server = ShardedServer::new(sessions(&base, placed).unwrap(), floor).unwrap();
    (server, base)
}

#[test]
fn a_shard_below_its_floor_releases_nothing_and_the_others_commit_the_right_mean() {
    let (n, m) = (60usize, 33u64);
    let (mut server, base) = sharded(n, 20, 15, m, 20);
    assert_eq!(server.shards().len(), 3);
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let deltas: Vec<Vec<f32>> = (0..n).map(|_| (0..m - 1).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 1.6 - 0.8).collect()).collect();
    let examples: Vec<u32> = (0..n).map(|i| 1 + (i as u32 % 7)).collect();
    let inputs: Vec<Vec<u32>> = deltas.iter().zip(&examples).map(|(d, &w)| base.encode_update(d, w, &mut rng).unwrap().0).collect();
    let seats: Vec<u32> = (1..=n as u32).collect();
    // Six of shard 0's twenty vanish before uploading: fourteen left, below the floor of 15.
    let victims: BTreeSet<u32> = server.shards()[0].members.iter().take(6).copied().collect();
    let out = run_sharded(&mut server, &seats, &inputs, |s| victims.contains(&s).then_some(Stage::MaskedInput), 16, 9).result.unwrap();

    assert_eq!(out.released.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(server.shards()[0].server.phase(), ServerPhase::Aborted, "shard 0 never reached unmasking");
    assert!(server.shards()[0].failed.as_deref().unwrap().contains("below threshold: U3 has 14, needs 15"), "{:?}", server.shards()[0].failed);
    let contributors: BTreeSet<u32> = out.contributors().collect();
    let expected: BTreeSet<u32> = server.shards()[1..].iter().flat_map(|s| s.members.iter().copied()).collect();
    assert_eq!(contributors, expected);

    let (mean, total_w) = out.decode_mean(&base).unwrap();
    let mut plain = vec![0f64; m as usize - 1];
    let mut w_sum = 0u64;
    for &s in &contributors {
        let k = s as usize - 1;
        w_sum += examples[k] as u64;
        for (p, d) in plain.iter_mut().zip(&deltas[k]) {
            *p += *d as f64 * examples[k] as f64;
        }
    }
    assert_eq!(total_w, w_sum);
    let step = 1.0 / base.quant_params().unwrap().scale() / w_sum as f64;
    for (got, want) in mean.iter().zip(&plain) {
        // Stochastic rounding: at most one quantization step per contributor.
        assert!((*got as f64 - want / w_sum as f64).abs() <= step * 40.0, "{got} vs {}", want / w_sum as f64);
    }
}

#[test]
fn shard_sums_add_past_what_one_sessions_lanes_hold() {
    // 27-bit lanes: one shard of 20 at full scale sums to 20 * (2^26 - 1) < 2^31, three do not.
    let (n, m) = (60usize, 5u64);
    let (mut server, base) = sharded(n, 20, 15, m, 27);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let inputs: Vec<Vec<u32>> = (0..n).map(|_| base.encode_update(&[1.0, -1.0, 0.5, 1.0], 8, &mut rng).unwrap().0).collect();
    let seats: Vec<u32> = (1..=n as u32).collect();
    let out = run_sharded(&mut server, &seats, &inputs, |_| None, 64, 3).result.unwrap();
    assert_eq!(out.released.len(), 3);
    let (mean, w) = out.decode_mean(&base).unwrap();
    assert_eq!(w, 480);
    for (g, want) in mean.iter().zip([1.0, -1.0, 0.5, 1.0]) {
        assert!((g - want).abs() < 1e-6, "{mean:?}");
    }
    // The same lanes read as one 32-bit sum would have wrapped.
    let wrapped: u32 = out.released.iter().map(|(_, o)| o.sum[0]).fold(0, u32::wrapping_add);
    assert!((wrapped as i32) < 0, "three full shards overflow i32");
}

#[test]
fn dp_sums_decode_per_shard_and_add() {
    let (n, dim) = (40usize, 10usize);
    let c = cohort(n);
    let placed = assign(&shard_seed(2, 0, &c), &c, 20, 10);
    let mut base = SessionConfig::recommended(2, 0, 20, dim as u64 + 1).unwrap();
    // No noise, so the decoded mean is checkable: the path (rotation, wrap, per-shard decode) is the one DP runs.
    base.use_dp(DpParams::for_round(dim, 1.0, 0.0, 10, [4; 32]).unwrap());
    let mut server = ShardedServer::new(sessions(&base, placed).unwrap(), 10).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let delta: Vec<f32> = (0..dim).map(|i| (i as f32 - 4.5) / 40.0).collect();
    let inputs: Vec<Vec<u32>> = (0..n).map(|_| base.encode_update(&delta, 1, &mut rng).unwrap().0).collect();
    let seats: Vec<u32> = (1..=n as u32).collect();
    let out = run_sharded(&mut server, &seats, &inputs, |s| (s <= 3).then_some(Stage::Unmask), 64, 4).result.unwrap();
    assert_eq!(out.released.len(), 2);
    let (mean, k) = out.decode_mean(&base).unwrap();
    assert_eq!(k, 40, "devices that skip unmasking are still in the sum");
    for (g, want) in mean.iter().zip(&delta) {
        assert!((g - want).abs() < 1e-3, "{g} vs {want}");
    }
}

#[test]
fn every_shard_below_its_floor_aborts_the_round() {
    let (mut server, base) = sharded(40, 20, 18, 3, 20);
    let inputs: Vec<Vec<u32>> = (0..40).map(|_| base.encode_update(&[0.1, 0.2], 1, &mut ChaCha20Rng::seed_from_u64(1)).unwrap().0).collect();
    let seats: Vec<u32> = (1..=40).collect();
    // Three of each shard never advertise: both shards stop at the first close.
    let dropped: BTreeSet<u32> = server.shards().iter().flat_map(|s| s.members.iter().take(3).copied()).collect();
    let o = run_sharded(&mut server, &seats, &inputs, |s| dropped.contains(&s).then_some(Stage::Advertise), 64, 2);
    let e = o.result.err().expect("no shard may release");
    assert!(e.to_string().contains("every shard failed") && e.to_string().contains("U1 has 17, needs 18"), "{e}");
    assert!(server.shards().iter().all(|s| s.server.phase() == ServerPhase::Aborted));
}

#[test]
fn sessions_refuse_a_mismatched_shard() {
    let base = SessionConfig::recommended(1, 0, 10, 4).unwrap();
    let mut shards = sessions(&base, vec![(1..=10).collect(), (11..=20).collect()]).unwrap();
    shards[1].1.push(21);
    assert!(ShardedServer::new(shards.clone(), 5).is_err(), "members must match the session's n");
    shards[1].1.pop();
    shards[1].1[0] = 1;
    assert!(ShardedServer::new(shards.clone(), 5).is_err(), "a seat in two shards");
    shards[1].1[0] = 11;
    shards[1].0.m = 5;
    assert!(ShardedServer::new(shards, 5).is_err(), "the sums must add lane by lane");
}
