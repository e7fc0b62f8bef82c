//! SecAgg+ neighbour graph: the (k, t) parameter finder (Appendix A, after
//! fcp's HararyGraphParameterFinder) and the shuffled Harary graph of §8.2.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::crypto::hkdf32;
use crate::error::{Result, SecAggError};
use crate::prg::{CipherSuite, MaskKey, MaskPrg, WordStream};
use crate::spec::{MAX_CLIENTS, labels};

/// Which server the parameters must defend against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdversaryClass {
    /// Honest-but-curious server (the default threat model).
    Curious,
    /// Semi-malicious server (active mode).
    SemiMalicious,
}

/// Degree and threshold found for n clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphParameters {
    /// Number of clients.
    pub n: u32,
    /// Even degree k.
    pub degree: u32,
    /// Shamir threshold t.
    pub threshold: u32,
}

const SECURITY_BITS: f64 = 40.0;
const CORRECTNESS_BITS: f64 = 20.0;
// Keeps float rounding from turning γ·n = 50.0 into 49.
const SMALL: f64 = 1e-14;

/// The smallest even k (and its t) for which, with n clients of which a
/// fraction `gamma` is adversarial and `delta` drops out: the honest survivors
/// stay connected except with probability 2^−41 (union bound over gap pairs),
/// no client has ≥ t adversarial neighbours except with probability 2^−41/n,
/// and every client keeps ≥ t surviving neighbours except with 2^−20/n.
pub fn find_parameters(n: u32, gamma: f64, delta: f64, class: AdversaryClass) -> Result<GraphParameters> {
    let bad = |s: String| Err(SecAggError::InvalidConfig(s));
    if n == 0 || n > MAX_CLIENTS {
        return bad(format!("number of clients {n} outside 1..=1000000"));
    }
    if !(0.0..1.0).contains(&gamma) || !(0.0..1.0).contains(&delta) {
        return bad(format!("rates must be in [0, 1): gamma {gamma}, delta {delta}"));
    }
    let infeasible = match class {
        AdversaryClass::Curious => gamma + delta > 0.9,
        AdversaryClass::SemiMalicious => gamma + 2.0 * delta > 0.9,
    };
    if infeasible {
        return bad(format!("infeasible threat model: gamma {gamma}, delta {delta}, {class:?}"));
    }
    let n_i = n as i64;
    let mut k = 2i64;
    while k < n_i - 1 {
        if let Some(t) = check_degree(n_i, k, gamma, delta, class) {
            return Ok(GraphParameters { n, degree: k as u32, threshold: t as u32 });
        }
        k += 2;
    }
    bad(format!("no (k, t) found for n = {n}, gamma {gamma}, delta {delta}"))
}

fn log_prob_disconnected(n: i64, k: i64, gamma: f64, delta: f64) -> f64 {
    // A cut of the Harary ring needs k/2 consecutive bad nodes in two places.
    let log_gap_pairs = (n as f64).ln() + ((n - k - 1) as f64).ln() - 2f64.ln();
    let max_adv = ((gamma + SMALL) * n as f64).floor() as i64;
    let max_drop = ((delta + SMALL) * n as f64).floor() as i64;
    let bad = max_adv + max_drop;
    if k > bad {
        return f64::NEG_INFINITY;
    }
    log_gap_pairs + ln_factorial(bad) + ln_factorial(n - k) - ln_factorial(n) - ln_factorial(bad - k)
}

fn check_degree(n: i64, k: i64, gamma: f64, delta: f64, class: AdversaryClass) -> Option<i64> {
    let per_event = SECURITY_BITS + 1.0;
    if log_prob_disconnected(n, k, gamma, delta) >= -per_event * 2f64.ln() {
        return None;
    }
    let max_adv = ((gamma + SMALL) * n as f64).floor() as i64;
    let min_surv = ((1.0 - delta - SMALL) * n as f64).ceil() as i64;
    let adv = Hypergeometric { total: n, marked: max_adv, sampled: k };
    let surv = Hypergeometric { total: n, marked: min_surv, sampled: k };
    let mut t1 = adv.quantile(2f64.powf(-per_event) / n as f64, true);
    let target = 2f64.powf(-CORRECTNESS_BITS) / n as f64;
    let mut t2 = surv.quantile(target, false);
    if surv.cdf(t2) < target {
        t2 += 1.0;
    }
    if class == AdversaryClass::SemiMalicious {
        t1 = ((t1 + k as f64 - 1.25) / 2.0).ceil();
    }
    if t2 <= t1 {
        return None;
    }
    Some((t1 + 1.0).max(2.0) as i64)
}

/// ln(x!) for x ≥ 0: exact sums below 256, Stirling's series above (error < 1e-15 relative).
fn ln_factorial(x: i64) -> f64 {
    debug_assert!(x >= 0);
    static SMALL_TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    if x < 256 {
        let table = SMALL_TABLE.get_or_init(|| {
            let mut t = vec![0.0f64; 256];
            for i in 2..256 {
                t[i] = t[i - 1] + (i as f64).ln();
            }
            t
        });
        return table[x as usize];
    }
    let x = x as f64;
    let x2 = x * x;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x) - 1.0 / (360.0 * x * x2) + 1.0 / (1260.0 * x2 * x2 * x)
}

/// Hypergeometric(total, marked, sampled): marked items among `sampled` draws without replacement.
struct Hypergeometric {
    total: i64,
    marked: i64,
    sampled: i64,
}

impl Hypergeometric {
    fn pmf_counted(&self, x: f64, counted: i64) -> f64 {
        let (n, s) = (self.total, self.sampled);
        if x < 0.0 || x > s as f64 || x > counted as f64 {
            return 0.0;
        }
        let xi = x as i64;
        if n + xi < counted + s {
            return 0.0;
        }
        (ln_factorial(s) + ln_factorial(counted) + ln_factorial(n - counted) + ln_factorial(n - s)
            - ln_factorial(xi)
            - ln_factorial(s - xi)
            - ln_factorial(counted - xi)
            - ln_factorial(n)
            - ln_factorial(n - s - counted + xi))
        .exp()
    }

    fn cdf(&self, x: f64) -> f64 {
        let x = x.floor();
        let mean = self.marked as f64 * self.sampled as f64 / self.total as f64;
        if x > mean { 1.0 - self.cdf_counted(self.sampled as f64 - x - 1.0, self.total - self.marked) } else { self.cdf_counted(x, self.marked) }
    }

    /// Sums the pmf downwards from x until terms stop mattering.
    fn cdf_counted(&self, mut x: f64, counted: i64) -> f64 {
        let (n, s, c) = (self.total as f64, self.sampled as f64, counted as f64);
        let mut pmf = self.pmf_counted(x, counted);
        let mut result = 0.0;
        while pmf > result * 1e-16 {
            result += pmf;
            pmf *= x;
            pmf *= n - c - s + x;
            pmf /= c - x + 1.0;
            pmf /= s - x + 1.0;
            x -= 1.0;
        }
        result
    }

    /// Integer quantile rounded away from the median; `complement` asks for the upper tail.
    fn quantile(&self, mut q: f64, mut complement: bool) -> f64 {
        if q > 0.5 {
            q = 1.0 - q;
            complement = !complement;
        }
        if complement { self.sampled as f64 - self.quantile_counted(q, self.total - self.marked) - 1.0 } else { self.quantile_counted(q, self.marked) }
    }

    fn quantile_counted(&self, q: f64, counted: i64) -> f64 {
        let (n, s, c) = (self.total as f64, self.sampled as f64, counted as f64);
        let basic = c + s - n - 1.0;
        // An inverted Hoeffding tail bound gives a starting point below the answer.
        let fancy = s * (c / n - (-q.ln() / (2.0 * s)).sqrt());
        let mut r = (-1.0f64).max(basic).max(fancy).floor();
        let mut cdf = self.cdf_counted(r, counted);
        let mut pmf = self.pmf_counted(r, counted);
        while cdf < q && r < s {
            if pmf > 0.0 {
                pmf /= r + 1.0;
                pmf /= n - c - s + r + 1.0;
                pmf *= c - r;
                pmf *= s - r;
            } else {
                pmf = self.pmf_counted(r + 1.0, counted);
            }
            cdf += pmf;
            r += 1.0;
        }
        r - 1.0
    }
}

/// The session's neighbour graph over U1: a Harary ring of degree k on a
/// pseudo-random permutation of the sorted U1 ids, or the complete graph when
/// k ≥ |U1| − 1.
#[derive(Clone, Debug)]
pub struct NeighbourGraph {
    ring: Vec<u32>,
    pos: HashMap<u32, usize>,
    half_degree: usize,
    complete: bool,
}

impl NeighbourGraph {
    /// π = Fisher–Yates shuffle of sorted `u1` with the keystream of the
    /// suite's PRG keyed by HKDF(salt = "", ikm = session_id, info = "flsa/v1/graph");
    /// for i = |U1|−1 down to 1, j = uniform(0..=i) by rejection on u32 words, swap π[i], π[j].
    pub fn build(session_id: &[u8; 32], u1: &[u32], degree: u32, suite: CipherSuite) -> Result<Self> {
        let mut ring: Vec<u32> = u1.to_vec();
        ring.sort_unstable();
        if ring.windows(2).any(|w| w[0] == w[1]) {
            return Err(SecAggError::Malformed("duplicate id in U1".into()));
        }
        let key = MaskKey::from_bytes(hkdf32(&[], session_id, &[labels::GRAPH])?);
        let mut words = WordStream::new(MaskPrg::new(suite, &key));
        for i in (1..ring.len()).rev() {
            let j = words.below(i as u32 + 1) as usize;
            ring.swap(i, j);
        }
        let pos = ring.iter().enumerate().map(|(p, &id)| (id, p)).collect();
        let complete = degree as usize >= ring.len().saturating_sub(1);
        Ok(NeighbourGraph { ring, pos, half_degree: degree as usize / 2, complete })
    }

    /// The permutation π.
    pub fn order(&self) -> &[u32] {
        &self.ring
    }

    /// Whether `id` is in U1.
    pub fn contains(&self, id: u32) -> bool {
        self.pos.contains_key(&id)
    }

    /// N(id), sorted by id; `None` if `id` is not in U1.
    pub fn neighbours(&self, id: u32) -> Option<Vec<u32>> {
        let &p = self.pos.get(&id)?;
        let n = self.ring.len();
        let mut out: Vec<u32> = if self.complete {
            self.ring.iter().copied().filter(|&v| v != id).collect()
        } else {
            (1..=self.half_degree).flat_map(|j| [self.ring[(p + j) % n], self.ring[(p + n - j) % n]]).collect()
        };
        out.sort_unstable();
        Some(out)
    }

    /// Whether `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: u32, b: u32) -> bool {
        match (self.pos.get(&a), self.pos.get(&b)) {
            (Some(&pa), Some(&pb)) if pa != pb => {
                if self.complete {
                    return true;
                }
                let n = self.ring.len();
                let d = (pa + n - pb) % n;
                d.min(n - d) <= self.half_degree
            }
            _ => false,
        }
    }

    /// Whether the subgraph induced by `alive` is connected (an assertion for
    /// tests and a pre-output sanity check; §8.5).
    pub fn is_connected(&self, alive: &BTreeSet<u32>) -> bool {
        let Some(&start) = alive.iter().next() else {
            return true;
        };
        let mut seen = BTreeSet::from([start]);
        let mut queue = VecDeque::from([start]);
        while let Some(u) = queue.pop_front() {
            for v in self.neighbours(u).unwrap_or_default() {
                if alive.contains(&v) && seen.insert(v) {
                    queue.push_back(v);
                }
            }
        }
        seen.len() == alive.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdversaryClass::*;

    fn kt(n: u32, g: f64, d: f64, c: AdversaryClass) -> (u32, u32) {
        let p = find_parameters(n, g, d, c).unwrap();
        (p.degree, p.threshold)
    }

    /// Appendix A's precomputed table (entries up to n = 10 000 keep the test fast;
    /// the 10^5 and 10^6 columns are checked in a sample below).
    #[test]
    fn matches_the_precomputed_table() {
        type Row = (f64, f64, AdversaryClass, [(u32, u32); 3]);
        let rows: &[Row] = &[
            (0.05, 0.33, Curious, [(28, 6), (72, 24), (86, 29)]),
            (0.05, 0.33, SemiMalicious, [(72, 39), (398, 223), (746, 420)]),
            (0.33, 0.05, Curious, [(34, 29), (78, 60), (92, 70)]),
            (0.33, 0.05, SemiMalicious, [(42, 37), (132, 109), (178, 146)]),
            (0.33, 0.33, Curious, [(68, 34), (286, 150), (422, 221)]),
            (0.30, 0.30, SemiMalicious, [(92, 62), (872, 584), (4822, 3230)]),
            (0.45, 0.45, Curious, [(92, 46), (822, 417), (3494, 1771)]),
        ];
        for (g, d, c, expect) in rows {
            for (n, want) in [100u32, 1000, 10_000].into_iter().zip(expect) {
                assert_eq!(kt(n, *g, *d, *c), *want, "n={n} gamma={g} delta={d} {c:?}");
            }
        }
        assert_eq!(kt(100_000, 0.05, 0.33, Curious), (96, 32));
        assert_eq!(kt(1_000_000, 0.05, 0.33, Curious), (102, 34));
        assert_eq!(kt(1_000_000, 0.33, 0.05, Curious), (110, 83));
    }

    #[test]
    fn infeasible_models_are_rejected() {
        assert!(find_parameters(1000, 0.5, 0.5, Curious).is_err());
        assert!(find_parameters(1000, 0.3, 0.31, SemiMalicious).is_err());
    }

    #[test]
    fn graph_is_regular_symmetric_and_deterministic() {
        let ids: Vec<u32> = (0..50).map(|i| i * 3 + 1).collect();
        let sid = [42u8; 32];
        let g = NeighbourGraph::build(&sid, &ids, 10, CipherSuite::Aes128Ctr).unwrap();
        let g2 = NeighbourGraph::build(&sid, &ids, 10, CipherSuite::Aes128Ctr).unwrap();
        assert_eq!(g.order(), g2.order());
        let sorted: Vec<u32> = ids.clone();
        assert_ne!(g.order(), &sorted[..], "the shuffle moved something");
        for &u in &ids {
            let nu = g.neighbours(u).unwrap();
            assert_eq!(nu.len(), 10);
            for &v in &nu {
                assert!(g.are_neighbours(u, v));
                assert!(g.neighbours(v).unwrap().contains(&u));
            }
        }
        assert!(g.is_connected(&ids.iter().copied().collect()));
        let other = NeighbourGraph::build(&[43u8; 32], &ids, 10, CipherSuite::Aes128Ctr).unwrap();
        assert_ne!(g.order(), other.order());
        let full = NeighbourGraph::build(&sid, &ids, 49, CipherSuite::Aes128Ctr).unwrap();
        assert_eq!(full.neighbours(1).unwrap().len(), 49);
    }

    #[test]
    fn a_cut_ring_is_disconnected() {
        let ids: Vec<u32> = (0..20).collect();
        let g = NeighbourGraph::build(&[1; 32], &ids, 2, CipherSuite::ChaCha20).unwrap();
        let ring = g.order().to_vec();
        // Removing two non-adjacent ring positions from a 2-regular ring cuts it.
        let alive: BTreeSet<u32> = ring.iter().enumerate().filter(|(p, _)| *p != 0 && *p != 10).map(|(_, &v)| v).collect();
        assert!(!g.is_connected(&alive));
    }
}
