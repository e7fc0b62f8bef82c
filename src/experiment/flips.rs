//! Where an arm's gain over FedAvg+FT comes from, token by token: on how many test tokens its
//! argmax differs from FedAvg+FT's (only those can change accuracy), who is right there, and
//! how much of its loss gain falls on the tokens whose argmax it leaves alone. Measured on the
//! federated devices' test tokens on the first seed, for arms without a gate (a routed token's
//! argmax is the backbone's, which the scores do not keep).
use serde::{Deserialize, Serialize};
use spa_model::personal::TokenScores;

use super::config::Arm;

/// One arm against the reference arm, pooled over the federated devices' test tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlipRow {
    pub arm: Arm,
    pub tokens: usize,
    /// Fraction of tokens whose argmax differs from the reference's.
    pub changed: f64,
    /// Accuracy of the arm and of the reference on those tokens.
    pub arm_right_on_changed: f64,
    pub reference_right_on_changed: f64,
    /// Accuracy minus the reference's, over all tokens (= changed x the difference above).
    pub accuracy_gain: f64,
    /// Mean per-token loss minus the reference's, split by where it falls (the two sum to the
    /// token-weighted loss difference).
    pub loss_gain_unchanged: f64,
    pub loss_gain_changed: f64,
}

/// Per-token log-probability, argmax and correctness of one device's test tokens.
struct Kept {
    lp: Vec<f32>,
    top: Vec<u32>,
    right: Vec<bool>,
}

/// The first seed's per-token test scores of the arms it can compare.
#[derive(Default)]
pub struct Flips {
    arms: Vec<(Arm, Vec<Kept>)>,
}

impl Flips {
    /// Keeps `arm`'s scores on the federated devices, in device order.
    pub fn keep(&mut self, arm: Arm, devices: Vec<TokenScores>) {
        let kept = devices.into_iter().map(|s| Kept { lp: s.model_lp, top: s.model_top, right: s.model_right }).collect();
        self.arms.push((arm, kept));
    }

    /// Every kept arm against `reference` (none when it was not kept).
    pub fn rows(&self, reference: Arm) -> Vec<FlipRow> {
        let Some((_, base)) = self.arms.iter().find(|(a, _)| *a == reference) else { return vec![] };
        self.arms.iter().filter(|(a, _)| *a != reference).filter_map(|(arm, kept)| compare(*arm, kept, base)).collect()
    }
}

fn compare(arm: Arm, kept: &[Kept], base: &[Kept]) -> Option<FlipRow> {
    if kept.len() != base.len() {
        return None;
    }
    let (mut n, mut changed, mut arm_right, mut ref_right, mut right_gain) = (0usize, 0usize, 0usize, 0usize, 0i64);
    let (mut loss_unchanged, mut loss_changed) = (0.0f64, 0.0f64);
    for (a, b) in kept.iter().zip(base) {
        if a.top.len() != b.top.len() {
            return None;
        }
        for i in 0..a.top.len() {
            n += 1;
            right_gain += a.right[i] as i64 - b.right[i] as i64;
            let d = (b.lp[i] - a.lp[i]) as f64;
            if a.top[i] == b.top[i] {
                loss_unchanged += d;
            } else {
                changed += 1;
                arm_right += a.right[i] as usize;
                ref_right += b.right[i] as usize;
                loss_changed += d;
            }
        }
    }
    let (nf, cf) = (n.max(1) as f64, changed.max(1) as f64);
    Some(FlipRow {
        arm,
        tokens: n,
        changed: changed as f64 / nf,
        arm_right_on_changed: arm_right as f64 / cf,
        reference_right_on_changed: ref_right as f64 / cf,
        accuracy_gain: right_gain as f64 / nf,
        loss_gain_unchanged: loss_unchanged / nf,
        loss_gain_changed: loss_changed / nf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(lp: &[f32], top: &[u32], target: u32) -> TokenScores {
        TokenScores { model_lp: lp.to_vec(), model_top: top.to_vec(), model_right: top.iter().map(|&t| t == target).collect(), ..TokenScores::default() }
    }

    #[test]
    fn splits_the_gain_by_whether_the_argmax_moved() {
        let mut f = Flips::default();
        // Four tokens, target 7: the arm moves the argmax on two (one to right, one to wrong)
        // and lowers the loss of an unchanged one.
        f.keep(Arm::GlobalFt, vec![scores(&[-1.0, -2.0, -3.0, -1.0], &[7, 1, 7, 2], 7)]);
        f.keep(Arm::KnnPer, vec![scores(&[-0.5, -1.0, -3.5, -1.0], &[7, 7, 3, 2], 7)]);
        let rows = f.rows(Arm::GlobalFt);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.arm, r.tokens), (Arm::KnnPer, 4));
        assert_eq!(r.changed, 0.5);
        assert_eq!((r.arm_right_on_changed, r.reference_right_on_changed), (0.5, 0.5));
        assert_eq!(r.accuracy_gain, 0.0);
        assert!((r.loss_gain_unchanged - (-0.5 / 4.0)).abs() < 1e-9);
        assert!((r.loss_gain_changed - ((-1.0 + 0.5) / 4.0)).abs() < 1e-9);
        assert!(Flips::default().rows(Arm::GlobalFt).is_empty());
    }
}
