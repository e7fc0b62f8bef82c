//! The experiment's metrics and tests: ROUGE-1/2 and ROUGE-L F1 (word n-gram overlap and
//! word-level LCS, as the `rouge-score` package's `rouge1`/`rouge2`/`rougeL` without
//! stemming), mean and sample standard deviation, the paired tests across devices (Wilcoxon
//! signed-rank and the sign test, two-sided, as scipy's `wilcoxon` and `binomtest` compute
//! them), Holm's step-down correction, and a percentile bootstrap interval of a mean. The
//! unit tests pin values those packages print.
use std::collections::HashMap;

/// rouge-score's tokenizer: lowercase, every run of characters other than `[a-z0-9]` is a
/// separator.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit())).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ROUGE-L F1 of `prediction` against `reference` (Lin 2004): `2PR / (P + R)` with
/// `P = lcs / |prediction|`, `R = lcs / |reference|` in words; 0 if either has no words.
pub fn rouge_l(reference: &str, prediction: &str) -> f64 {
    let (r, p) = (words(reference), words(prediction));
    if r.is_empty() || p.is_empty() {
        return 0.0;
    }
    let l = lcs_len(&r, &p) as f64;
    let (prec, rec) = (l / p.len() as f64, l / r.len() as f64);
    if prec + rec == 0.0 { 0.0 } else { 2.0 * prec * rec / (prec + rec) }
}

/// ROUGE-N F1: clipped n-gram overlap of `prediction` with `reference` in words; 0 if either
/// has no n-gram.
pub fn rouge_n(reference: &str, prediction: &str, n: usize) -> f64 {
    fn grams(w: &[String], n: usize) -> HashMap<&[String], usize> {
        let mut c: HashMap<&[String], usize> = HashMap::new();
        for g in w.windows(n) {
            *c.entry(g).or_default() += 1;
        }
        c
    }
    let (r, p) = (words(reference), words(prediction));
    let (rc, pc) = (grams(&r, n), grams(&p, n));
    let (rn, pn) = (rc.values().sum::<usize>(), pc.values().sum::<usize>());
    if rn == 0 || pn == 0 {
        return 0.0;
    }
    let overlap: usize = pc.iter().map(|(g, &k)| k.min(rc.get(g).copied().unwrap_or(0))).sum();
    let (prec, rec) = (overlap as f64 / pn as f64, overlap as f64 / rn as f64);
    if prec + rec == 0.0 { 0.0 } else { 2.0 * prec * rec / (prec + rec) }
}

/// Holm's step-down adjustment of a family of p-values (same order as given).
pub fn holm(ps: &[f64]) -> Vec<f64> {
    let m = ps.len();
    let mut idx: Vec<usize> = (0..m).collect();
    idx.sort_by(|&a, &b| ps[a].total_cmp(&ps[b]));
    let mut out = vec![0.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in idx.iter().enumerate() {
        running = running.max(((m - rank) as f64 * ps[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// The 95% percentile bootstrap interval of the mean of `xs` (`reps` resamples with
/// replacement, a fixed seed: the same data give the same interval).
pub fn bootstrap_ci(xs: &[f64], reps: usize, seed: u64) -> (f64, f64) {
    use rand_core::{RngCore, SeedableRng};
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = xs.len();
    let mut means: Vec<f64> = (0..reps.max(1)).map(|_| (0..n).map(|_| xs[(rng.next_u64() % n as u64) as usize]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

/// Mean and sample standard deviation (n - 1; 0 for fewer than two values).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Two-sided exact sign test of the nonzero differences (ties at zero dropped): the
/// binomial(n, 1/2) probability of a split at least as uneven as the one seen.
pub fn sign_test(diffs: &[f64]) -> f64 {
    let pos = diffs.iter().filter(|d| **d > 0.0).count();
    let n = pos + diffs.iter().filter(|d| **d < 0.0).count();
    if n == 0 {
        return 1.0;
    }
    let k = pos.min(n - pos);
    // log C(n, i) summed in f64 keeps n in the thousands exact enough.
    let mut log_c = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (log_c - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Average ranks (1-based) of `|d|`, ties sharing the mean of their positions; and the tie
/// correction term `sum(t^3 - t)` over groups of equal values.
fn abs_ranks(d: &[f64]) -> (Vec<f64>, f64) {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()));
    let mut ranks = vec![0.0; d.len()];
    let mut ties = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && d[idx[j + 1]].abs() == d[idx[i]].abs() {
            j += 1;
        }
        let r = (i + j + 2) as f64 / 2.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    (ranks, ties)
}

/// Two-sided Wilcoxon signed-rank test of paired differences, as scipy 1.17's defaults:
/// zeros dropped; up to 50 differences, the exact permutation distribution of the (tie-
/// averaged) ranks under random signs; beyond, the normal approximation with the tie
/// correction and no continuity correction. Returns `(min(W+, W-), p)`.
pub fn wilcoxon(diffs: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = diffs.iter().copied().filter(|x| *x != 0.0).collect();
    let n = d.len();
    if n == 0 {
        return (0.0, 1.0);
    }
    let (ranks, ties) = abs_ranks(&d);
    let w_plus: f64 = d.iter().zip(&ranks).filter(|(x, _)| **x > 0.0).map(|(_, r)| r).sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let stat = w_plus.min(total - w_plus);
    if n <= 50 {
        // Tie-averaged ranks are multiples of 1/2: count sign patterns by doubled rank sum.
        let twice: Vec<usize> = ranks.iter().map(|r| (2.0 * r) as usize).collect();
        let max: usize = twice.iter().sum();
        let mut counts = vec![0.0f64; max + 1];
        counts[0] = 1.0;
        for &r in &twice {
            for s in (r..=max).rev() {
                counts[s] += counts[s - r];
            }
        }
        let cdf: f64 = counts[..=(2.0 * stat) as usize].iter().sum::<f64>() / 2f64.powi(n as i32);
        return (stat, (2.0 * cdf).min(1.0));
    }
    let nf = n as f64;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - ties / 48.0;
    let z = (stat - total / 2.0) / var.sqrt();
    (stat, erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0))
}

/// The complementary error function: the Taylor series of erf below 1.5, the continued
/// fraction of erfc above (80 terms: within a few ulps of libm's from 1.5 up).
fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 1.5 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        return 1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum;
    }
    // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...))))).
    let mut f = x;
    for k in (1..80).rev() {
        f = x + (k as f64 / 2.0) / f;
    }
    (-x * x).exp() / std::f64::consts::PI.sqrt() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn rouge_l_matches_the_rouge_score_package() {
        // (reference, prediction, rouge_score's rougeL fmeasure)
        let cases = [
            ("the cat sat on the mat", "the cat was on the mat", 0.8333333333333334),
            ("My lord, I come!", "my good lord I come to thee", 0.7272727272727273),
            ("", "anything here", 0.0),
            ("O Romeo, Romeo! wherefore art thou Romeo?", "Romeo, wherefore art thou? O Romeo", 0.7692307692307692),
            ("abc", "xyz", 0.0),
            ("Hello, WORLD 42", "hello world 42", 1.0),
        ];
        for (r, p, want) in cases {
            assert!(close(rouge_l(r, p), want, 1e-12), "{r:?} / {p:?}: {} != {want}", rouge_l(r, p));
        }
    }

    #[test]
    fn rouge_n_matches_the_rouge_score_package() {
        // (reference, prediction, rouge_score's rouge1 and rouge2 fmeasure)
        let cases = [
            ("the cat sat on the mat", "the cat was on the mat", 0.8333333333333334, 0.6),
            ("My lord, I come!", "my good lord I come to thee", 0.7272727272727273, 0.4444444444444444),
            ("O Romeo, Romeo! wherefore art thou Romeo?", "Romeo, wherefore art thou? O Romeo", 0.923076923076923, 0.7272727272727272),
            ("the the the cat", "the cat the", 0.8571428571428571, 0.4),
            ("abc", "xyz", 0.0, 0.0),
            ("one", "one", 1.0, 0.0),
        ];
        for (r, p, r1, r2) in cases {
            assert!(close(rouge_n(r, p, 1), r1, 1e-12) || r1 == 0.0 && rouge_n(r, p, 1) == 0.0, "{r:?} / {p:?}: rouge1 {}", rouge_n(r, p, 1));
            assert!(close(rouge_n(r, p, 2), r2, 1e-12) || r2 == 0.0 && rouge_n(r, p, 2) == 0.0, "{r:?} / {p:?}: rouge2 {}", rouge_n(r, p, 2));
        }
    }

    #[test]
    fn holm_and_bootstrap() {
        // statsmodels.stats.multitest.multipletests(p, method="holm")[1]
        let adj = holm(&[0.01, 0.04, 0.03, 0.005]);
        let want = [0.03, 0.06, 0.06, 0.02];
        assert!(adj.iter().zip(want).all(|(a, w)| close(*a, w, 1e-12)), "{adj:?}");
        assert_eq!(holm(&[0.6, 0.9]), vec![1.0, 1.0]);
        let xs: Vec<f64> = (0..40).map(|i| i as f64 / 10.0).collect();
        let (lo, hi) = bootstrap_ci(&xs, 4000, 7);
        assert!(lo < 1.95 && hi > 1.95 && hi - lo > 0.4 && hi - lo < 1.0, "{lo} {hi}");
        assert_eq!(bootstrap_ci(&xs, 4000, 7), (lo, hi));
        assert_eq!(bootstrap_ci(&[2.0; 5], 100, 1), (2.0, 2.0));
    }

    #[test]
    fn paired_tests_match_scipy() {
        // scipy.stats.wilcoxon(x) -> (statistic, pvalue)
        let x = [0.12, -0.05, 0.30, 0.08, 0.22, -0.11, 0.15, 0.04];
        assert_eq!(wilcoxon(&x), (6.0, 0.109375));
        let y = [1.5, -0.2, 0.7, 0.9, 1.1, 0.3, -0.4, 0.8, 1.2, 0.6, 0.05, 0.95];
        assert_eq!(wilcoxon(&y), (6.0, 0.0068359375));
        let ties = [1.0, 1.0, -1.0, 2.0, 2.0, 3.0, -3.0, 4.0, 1.0];
        assert_eq!(wilcoxon(&ties), (10.0, 0.14453125));
        // A zero is dropped; still exact.
        assert_eq!(wilcoxon(&[0.0, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0]), (3.0, 0.078125));
        // More than 50 nonzero differences: the normal approximation.
        let big: Vec<f64> = (0..60).map(|i| ((i * 37 % 23) as f64 - 7.0) / 10.0).collect();
        let (s, p) = wilcoxon(&big);
        assert_eq!(s, 348.5);
        assert!(close(p, 0.0001444164201454818, 1e-7), "{p}");
        // scipy.stats.binomtest(k, n).pvalue
        let signs = |pos: usize, n: usize| (0..n).map(|i| if i < pos { 1.0 } else { -1.0 }).collect::<Vec<_>>();
        assert!(close(sign_test(&signs(7, 8)), 0.0703125, 1e-12));
        assert!(close(sign_test(&signs(9, 12)), 0.14599609375, 1e-12));
        assert!(close(sign_test(&signs(30, 40)), 0.0022214337732293643, 1e-9));
        assert_eq!(sign_test(&[0.0, 0.0]), 1.0);
    }

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(mean_sd(&[1.0, 2.0, 3.0]), (2.0, 1.0));
        assert_eq!(mean_sd(&[5.0]), (5.0, 0.0));
        assert!(mean_sd(&[]).0.is_nan());
    }
}
