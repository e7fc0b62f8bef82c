//! How long a draft to ask for, and from which source, learnt from the round trips so far.

/// How many tokens to ask the coordinator to draft. Each round trip costs a fixed time
/// `a` (network, call overheads) plus `b` per position (drafting on the coordinator, bytes,
/// verifying here), both fitted to the measured round trips; at per-draft acceptance rate
/// `p` a draft of `k` yields `E(k) = 1 + p + ... + p^k` tokens, so the draft that
/// maximises `E(k) / (a + b (k + 1))` is the fastest: long drafts on a slow network, short
/// ones (or none) where positions are dear or the device often disagrees with the drafts.
/// Every fourth round trip tries half the chosen length (at least 1), so that the fit sees
/// different lengths and acceptance keeps being measured.
#[derive(Clone, Debug)]
pub struct AdaptiveDraft {
    max: usize,
    p: f64,
    /// Exponentially weighted sums for the least-squares fit of time against positions:
    /// weight, x, y, xx, xy.
    fit: [f64; 5],
    steps: usize,
}

impl AdaptiveDraft {
    /// `max` 0: no drafts (per-token decoding over the same protocol).
    pub fn new(max: usize) -> Self {
        Self { max, p: 0.8, fit: [0.0; 5], steps: 0 }
    }

    pub fn next(&self) -> usize {
        if self.max == 0 {
            return 0;
        }
        let (a, b) = self.cost();
        let (mut best, mut best_rate, mut e, mut pk) = (0, 1.0 / (a + b), 1.0, 1.0);
        for k in 1..=self.max {
            pk *= self.p;
            e += pk;
            let rate = e / (a + b * (k + 1) as f64);
            if rate > best_rate {
                (best, best_rate) = (k, rate);
            }
        }
        if self.steps % 4 == 3 { (best / 2).max(1) } else { best }
    }

    /// `(a, b)`: fixed and per-position seconds of a round trip. Until two draft lengths
    /// were seen, a round trip counts as two positions.
    fn cost(&self) -> (f64, f64) {
        let [w, x, y, xx, xy] = self.fit;
        let var = xx * w - x * x;
        if w == 0.0 || var <= 1e-9 * w * w {
            return (1.0, 1.0);
        }
        let b = ((xy * w - x * y) / var).max(1e-6);
        let a = ((y - b * x) / w).max(b * 0.1);
        (a, b)
    }

    /// `accepted` drafts were accepted and, if `rejected`, one more was not; `timing`: the
    /// round trip's positions and seconds, verification included (None for the prompt's,
    /// which prefill dominates).
    pub fn observe(&mut self, accepted: usize, rejected: bool, timing: Option<(usize, f64)>) {
        let outcomes = std::iter::repeat_n(1.0, accepted).chain(rejected.then_some(0.0));
        for o in outcomes {
            // About the last 20 outcomes; kept off 0 and 1 so that k can move both ways.
            self.p = (self.p + 0.1 * (o - self.p)).clamp(0.05, 0.995);
        }
        self.steps += 1;
        let Some((positions, seconds)) = timing else { return };
        let x = positions as f64;
        // About the last 20 round trips.
        for (s, v) in self.fit.iter_mut().zip([1.0, x, seconds, x * x, x * seconds]) {
            *s = 0.95 * *s + v;
        }
    }
}

/// Which drafts to ask for after a side token: acceptance rates of side and backbone drafts
/// there (moving averages), the better one chosen, the other tried every eighth time.
#[derive(Clone, Debug)]
pub(super) struct SourceChoice {
    rate: [f64; 2],
    picks: usize,
}

impl Default for SourceChoice {
    fn default() -> Self {
        // Side drafts first: after a side token the side is the likelier next speaker.
        Self { rate: [0.5, 0.6], picks: 0 }
    }
}

impl SourceChoice {
    pub(super) fn pick(&mut self) -> bool {
        self.picks += 1;
        let side_better = self.rate[1] >= self.rate[0];
        if self.picks.is_multiple_of(8) { !side_better } else { side_better }
    }

    pub(super) fn observe(&mut self, side: bool, accepted: f64) {
        let r = &mut self.rate[usize::from(side)];
        *r += 0.2 * (accepted - *r);
    }
}

#[cfg(test)]
mod tests {
    use super::AdaptiveDraft;

    /// The draft length after 60 round trips costing `a + b * positions` seconds, drafts
    /// accepted at rate `p` (drawn from a fixed sequence).
    fn settled(max: usize, p: f64, a: f64, b: f64) -> usize {
        let mut d = AdaptiveDraft::new(max);
        let mut x = 1u64;
        for _ in 0..60 {
            let k = d.next();
            let mut accepted = 0;
            while accepted < k {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if ((x >> 11) as f64 / (1u64 << 53) as f64) >= p {
                    break;
                }
                accepted += 1;
            }
            d.observe(accepted, accepted < k, Some((k + 1, a + b * (k + 1) as f64)));
        }
        // The choice of a step that does not explore.
        if d.steps % 4 == 3 {
            d.steps += 1;
        }
        d.next()
    }

    #[test]
    fn draft_length_follows_costs_and_acceptance() {
        assert_eq!(AdaptiveDraft::new(0).next(), 0);
        // A slow network and drafts that are accepted: long drafts, up to the bound.
        let slow = settled(16, 0.95, 0.050, 0.001);
        assert!(slow >= 10, "{slow}");
        assert!(settled(4, 0.95, 0.050, 0.001) <= 4);
        // Positions dearer than the round trip, or drafts often refused: short drafts or
        // none (per-token decoding is then the fastest).
        let dear = settled(16, 0.95, 0.001, 0.050);
        let refused = settled(16, 0.3, 0.050, 0.001);
        assert!(dear <= 2 && refused < slow / 2, "{dear} {refused} {slow}");
        assert_eq!(settled(16, 0.1, 0.001, 0.050), 0);
    }
}
