//! Test helpers around the in-memory session driver (`spa_aggregation::sim`).

#![allow(dead_code)]

use ring::signature::Ed25519KeyPair;
use spa_aggregation::SessionConfig;

pub use spa_aggregation::sim::{Stage, run};

pub fn identity() -> Ed25519KeyPair {
    spa_aggregation::sim::identity().unwrap()
}

pub fn cfg(n: u32, degree: u32, threshold: u32, m: u64) -> SessionConfig {
    let mut c = SessionConfig::recommended(7, 3, n, m).unwrap();
    c.degree = degree;
    c.threshold = threshold;
    c.validate().unwrap();
    c
}

/// Σ inputs of `contributors` mod 2^32, computed in the clear.
pub fn plain_sum(ids: &[u32], inputs: &[Vec<u32>], contributors: &[u32]) -> Vec<u32> {
    let mut sum = vec![0u32; inputs[0].len()];
    for (id, x) in ids.iter().zip(inputs) {
        if contributors.contains(id) {
            for (s, v) in sum.iter_mut().zip(x) {
                *s = s.wrapping_add(*v);
            }
        }
    }
    sum
}
