//! The device's private memory (kNN-Per, Marfoq et al. 2022; kNN-LM, Khandelwal et al. 2020):
//! a datastore of (key, next token) pairs from the device's own training text, and the
//! distribution of the next token among a query's nearest keys. It needs no training and
//! never leaves the device.
//!
//! The key is the backbone's final hidden state, RMS-normalised (`h / rms(h)`, no norm
//! weight): the frozen backbone's, so a datastore stays valid across global versions (a key
//! from the side network would go stale with every round), and it is what the device
//! receives at every position, the gate's input included. Distances are squared Euclidean
//! divided by the width, so temperatures mean the same on every backbone.
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tensor_util::{from_vec, to_vec};

/// How the neighbours' tokens become a distribution, and its weight in the mixture.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnParams {
    /// Neighbours read.
    pub k: usize,
    /// `w_i = exp(-(dist_i - dist_0) / temperature)`.
    pub temperature: f32,
    /// `p = (1 - weight) * p_model + weight * p_knn`.
    pub weight: f32,
}

impl KnnParams {
    pub fn validate(&self) -> Result<()> {
        let ok = (1..=1024).contains(&self.k) && self.temperature.is_finite() && self.temperature > 0.0 && (0.0..=1.0).contains(&self.weight);
        if ok { Ok(()) } else { Err(ModelError::InvalidInput(format!("invalid kNN parameters {self:?}"))) }
    }
}

/// `h / rms(h)` for each row of width `d`.
pub fn normalize_rows(h: &[f32], d: usize) -> Vec<f32> {
    let mut out = h.to_vec();
    for row in out.chunks_mut(d) {
        let ms = row.iter().map(|x| x * x).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        row.iter_mut().for_each(|x| *x *= inv);
    }
    out
}

/// Keys (normalised final hidden states) and the token that followed each.
#[derive(Clone, Debug, PartialEq)]
pub struct Datastore {
    pub d: usize,
    /// `[n, d]`.
    pub keys: Vec<f32>,
    pub tokens: Vec<u32>,
    /// The example each entry came from (to leave an example's own entries out when it is
    /// the query, as when the gate trains on the training split).
    pub examples: Vec<u32>,
}

/// Each query's nearest entries, nearest first: `k` per row, `dist = f32::INFINITY` past
/// the datastore's size.
#[derive(Clone, Debug, Default)]
pub struct Neighbours {
    pub k: usize,
    pub dist: Vec<f32>,
    pub tokens: Vec<u32>,
}

impl Neighbours {
    pub fn rows(&self) -> usize {
        self.dist.len() / self.k.max(1)
    }

    fn row(&self, r: usize) -> (&[f32], &[u32]) {
        (&self.dist[r * self.k..(r + 1) * self.k], &self.tokens[r * self.k..(r + 1) * self.k])
    }

    /// Row `r`'s kNN probability of `token` under `p`.
    pub fn prob(&self, r: usize, token: u32, p: &KnnParams) -> f32 {
        let (dist, toks) = self.row(r);
        let mut hit = 0.0f32;
        let total = weights(dist, p, |i, w| {
            if toks[i] == token {
                hit += w;
            }
        });
        if total > 0.0 { hit / total } else { 0.0 }
    }

    /// Row `r`'s kNN distribution added into `out` (length: the vocabulary) with `scale`.
    pub fn add_distribution(&self, r: usize, p: &KnnParams, scale: f32, out: &mut [f32]) {
        let (dist, toks) = self.row(r);
        let mut acc: Vec<(u32, f32)> = Vec::with_capacity(p.k);
        let total = weights(dist, p, |i, w| acc.push((toks[i], w)));
        if total > 0.0 {
            for (t, w) in acc {
                if let Some(o) = out.get_mut(t as usize) {
                    *o += scale * w / total;
                }
            }
        }
    }
}

/// Calls `f(i, w_i)` for the first `p.k` finite neighbours; returns the sum of the weights.
fn weights(dist: &[f32], p: &KnnParams, mut f: impl FnMut(usize, f32)) -> f32 {
    let Some(&d0) = dist.first().filter(|d| d.is_finite()) else { return 0.0 };
    let mut total = 0.0;
    for (i, &di) in dist.iter().take(p.k).enumerate() {
        if !di.is_finite() {
            break;
        }
        let w = (-(di - d0) / p.temperature).exp();
        total += w;
        f(i, w);
    }
    total
}

impl Datastore {
    /// A datastore of `tokens.len()` entries with keys `[n, d]` already normalised.
    pub fn new(d: usize, keys: Vec<f32>, tokens: Vec<u32>, examples: Vec<u32>) -> Result<Self> {
        if d == 0 || keys.len() != tokens.len() * d || examples.len() != tokens.len() {
            return Err(ModelError::InvalidInput(format!(
                "datastore: {} key values, {} tokens, {} example ids for width {d}",
                keys.len(),
                tokens.len(),
                examples.len()
            )));
        }
        if keys.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::InvalidInput("datastore keys contain NaN or infinite values".into()));
        }
        Ok(Self { d, keys, tokens, examples })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the last `max` entries (the newest text, closest in time to what comes next).
    pub fn keep_last(mut self, max: usize) -> Self {
        let n = self.len();
        if n > max {
            let drop = n - max;
            self.keys.drain(..drop * self.d);
            self.tokens.drain(..drop);
            self.examples.drain(..drop);
        }
        self
    }

    /// Bytes the datastore holds (keys in f32, token and example ids).
    pub fn bytes(&self) -> usize {
        self.keys.len() * 4 + self.tokens.len() * 8
    }

    /// The `k` nearest entries of each query (`[m, d]`, normalised), by squared distance over
    /// `d`. With `exclude`, query `i` skips the entries of example `exclude[i]`.
    pub fn search(&self, queries: &[f32], k: usize, exclude: Option<&[u32]>, device: &Device) -> Neighbours {
        let (d, n) = (self.d, self.len());
        let m = queries.len() / d;
        let mut out = Neighbours { k, dist: vec![f32::INFINITY; m * k], tokens: vec![0; m * k] };
        if n == 0 || k == 0 {
            return out;
        }
        let key_sq: Vec<f32> = self.keys.chunks(d).map(|r| r.iter().map(|x| x * x).sum()).collect();
        let keys_t = from_vec(self.keys.clone(), [n, d], device).transpose();
        // Rows of queries at a time so the distance block stays a few MB.
        let rows = (1 << 21) / n.max(1);
        let rows = rows.clamp(1, 1024);
        for start in (0..m).step_by(rows) {
            let end = (start + rows).min(m);
            let q = &queries[start * d..end * d];
            let dots = to_vec(from_vec(q.to_vec(), [end - start, d], device).matmul(keys_t.clone()));
            for (r, i) in (start..end).enumerate() {
                let q_sq: f32 = q[r * d..(r + 1) * d].iter().map(|x| x * x).sum();
                let skip = exclude.map(|e| e[i]);
                let mut cand: Vec<(f32, u32)> = (0..n)
                    .filter(|&j| skip != Some(self.examples[j]))
                    .map(|j| (((q_sq + key_sq[j] - 2.0 * dots[r * n + j]) / d as f32).max(0.0), j as u32))
                    .collect();
                let take = k.min(cand.len());
                if take == 0 {
                    continue;
                }
                if take < cand.len() {
                    cand.select_nth_unstable_by(take - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    cand.truncate(take);
                }
                cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                for (slot, (dist, j)) in cand.into_iter().enumerate() {
                    out.dist[i * k + slot] = dist;
                    out.tokens[i * k + slot] = self.tokens[j as usize];
                }
            }
        }
        out
    }

    /// Little-endian bytes: `d`, `n`, keys (f32), tokens, examples (u32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.bytes());
        b.extend((self.d as u32).to_le_bytes());
        b.extend((self.len() as u32).to_le_bytes());
        b.extend(self.keys.iter().flat_map(|x| x.to_le_bytes()));
        b.extend(self.tokens.iter().flat_map(|x| x.to_le_bytes()));
        b.extend(self.examples.iter().flat_map(|x| x.to_le_bytes()));
        b
    }

    /// Reads [`Self::to_bytes`]'s layout, every size checked.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| ModelError::Params(format!("datastore record: {m}"));
        let word = |i: usize| b.get(i * 4..i * 4 + 4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        let (d, n) = (word(0).ok_or_else(|| bad("truncated"))? as usize, word(1).ok_or_else(|| bad("truncated"))? as usize);
        let want = n.checked_mul(d).and_then(|x| x.checked_add(2 * n)).and_then(|x| x.checked_add(2)).and_then(|x| x.checked_mul(4));
        if want != Some(b.len()) {
            return Err(bad(&format!("{} bytes for {n} entries of width {d}", b.len())));
        }
        let words: Vec<u32> = b[8..].chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        let keys = words[..n * d].iter().map(|&w| f32::from_bits(w)).collect();
        Self::new(d, keys, words[n * d..n * d + n].to_vec(), words[n * d + n..].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Datastore {
        // Four entries on a line in 2-D: 0, 1, 2, 10 along x.
        let keys = vec![0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 10.0, 0.0];
        Datastore::new(2, keys, vec![5, 6, 5, 7], vec![0, 0, 1, 2]).unwrap()
    }

    #[test]
    fn nearest_first_with_exclusion_and_padding() {
        let device = Device::flex();
        let s = store();
        let nb = s.search(&[0.9, 0.0], 3, None, &device);
        assert_eq!(nb.tokens, vec![6, 5, 5]);
        // Squared distance over d = 2: 0.01 / 2, 0.81 / 2, 1.21 / 2.
        assert!((nb.dist[0] - 0.005).abs() < 1e-5 && (nb.dist[1] - 0.405).abs() < 1e-5, "{:?}", nb.dist);
        let nb = s.search(&[0.9, 0.0], 5, Some(&[0]), &device);
        assert_eq!(&nb.tokens[..2], &[5, 7]);
        assert!(nb.dist[2..].iter().all(|d| d.is_infinite()));
    }

    #[test]
    fn probabilities_sum_to_one_and_sharpen_with_temperature() {
        let device = Device::flex();
        let nb = store().search(&[0.9, 0.0], 4, None, &device);
        let p = KnnParams { k: 3, temperature: 0.5, weight: 0.5 };
        let total: f32 = (0..10).map(|t| nb.prob(0, t, &p)).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let mut dense = vec![0.0; 10];
        nb.add_distribution(0, &p, 1.0, &mut dense);
        assert!((dense[6] - nb.prob(0, 6, &p)).abs() < 1e-6 && dense[7] == 0.0, "k = 3 leaves the far entry out");
        let cold = KnnParams { temperature: 0.01, ..p };
        assert!(nb.prob(0, 6, &cold) > 0.99 && nb.prob(0, 6, &p) < 0.9);
    }

    #[test]
    fn bytes_round_trip_and_bad_records_are_refused() {
        let s = store();
        assert_eq!(Datastore::from_bytes(&s.to_bytes()).unwrap(), s);
        let b = s.to_bytes();
        assert!(Datastore::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(Datastore::from_bytes(&[]).is_err());
        let mut huge = b.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Datastore::from_bytes(&huge).is_err());
        assert_eq!(s.clone().keep_last(2).tokens, vec![5, 7]);
    }
}
