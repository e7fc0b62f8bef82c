//! The experiment's metrics and tests: ROUGE-L F1 (word-level LCS, as the `rouge-score`
//! package's `rougeL` without stemming), mean and sample standard deviation, and the paired
//! tests across devices (Wilcoxon signed-rank and the sign test, two-sided, as scipy's
//! `wilcoxon` and `binomtest` compute them). The unit tests pin values those packages print.

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
