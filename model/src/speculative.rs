//! Speculative collaborative decoding (DESIGN.md section 4): the coordinator drafts k tokens
//! ahead with the backbone and sends, for each drafted position and one past it, what the
//! device needs to choose its own token there; the device decides position by position
//! (gate, side plugin or backbone head, sampler), accepts drafts while they equal its own
//! token and, at the first difference, keeps its token. The coordinator then truncates its
//! KV cache to the accepted prefix and goes on from the device's token.
//!
//! Each position's states are exact for the drafted prefix and the device decides each
//! token through the same [`Decider`] as per-token decoding, with a random draw that
//! depends only on seed and position ([`Sampling::pick`]), so the output is the per-token
//! output. [`Drafter`] is the coordinator's half (no I/O: the engine wraps it), [`generate`]
//! the device's, over any [`DraftSource`] (the coordinator's stream, or [`LocalDrafts`]).
use std::sync::Arc;

use serde::Serialize;

use crate::backbone::{Backbone, KvCache, TokenBatch};
use crate::error::{ModelError, Result};
use crate::generate::{Decider, Decoding, Generation, Sampling, SideInputs, check_prompt};
use crate::personal::PersonalModel;
use crate::side::{FrozenHead, ParamSet, Plugin};
use crate::tensor_util::to_vec;

/// The shared down-projections `down_k` of a plugin (`side.down.{k}`), applied where the
/// backbone runs so that a device receives `d / r` floats per tap instead of `d`.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudDown {
    d: usize,
    d_side: usize,
    /// Per tap: weight `[d, d_side]` (burn's `[in, out]`), bias `[d_side]`.
    weights: Vec<(Vec<f32>, Vec<f32>)>,
}

impl CloudDown {
    /// The `side.down.*` tensors of a parameter set (a global checkpoint's shared part).
    pub fn from_params(p: &ParamSet) -> Result<Self> {
        let mut weights = Vec::new();
        while let Some(w) = p.tensors.get(&format!("side.down.{}.weight", weights.len())) {
            let k = weights.len();
            let missing = || ModelError::InvalidInput(format!("side.down.{k} has no bias"));
            let b = p.tensors.get(&format!("side.down.{k}.bias")).ok_or_else(missing)?;
            if w.shape.len() != 2 || b.shape != [w.shape[1]] {
                return Err(ModelError::InvalidInput(format!("side.down.{k}: weight {:?} and bias {:?} do not fit", w.shape, b.shape)));
            }
            weights.push((w.values.clone(), b.values.clone()));
        }
        let Some((w0, b0)) = weights.first() else {
            return Err(ModelError::InvalidInput("no side.down.* tensors: only the mlp and ladder sides project down".into()));
        };
        let (d_side, d) = (b0.len(), w0.len() / b0.len().max(1));
        if d_side == 0 || weights.iter().any(|(w, b)| b.len() != d_side || w.len() != d * d_side) {
            return Err(ModelError::InvalidInput("side.down.* tensors of different shapes".into()));
        }
        Ok(Self { d, d_side, weights })
    }

    pub fn taps(&self) -> usize {
        self.weights.len()
    }

    pub fn d_side(&self) -> usize {
        self.d_side
    }

    /// The weights as bytes in a fixed order (weight, bias per tap; f32 little-endian): two
    /// parties compare digests of this to know they project alike.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weights.len() * (self.d + 1) * self.d_side * 4);
        for (w, b) in &self.weights {
            out.extend(w.iter().chain(b).flat_map(|v| v.to_le_bytes()));
        }
        out
    }

    /// `down_k` of each row of `rows` (`[n, d]`), `[n, d_side]`; plain loops, so a row's
    /// result never depends on how many rows come with it.
    pub fn project(&self, k: usize, rows: &[f32]) -> Vec<f32> {
        let (w, b) = &self.weights[k];
        let mut out = Vec::with_capacity(rows.len() / self.d * self.d_side);
        for x in rows.chunks_exact(self.d) {
            let mut y = b.clone();
            for (xi, wi) in x.iter().zip(w.chunks_exact(self.d_side)) {
                for (yj, wij) in y.iter_mut().zip(wi) {
                    *yj += xi * wij;
                }
            }
            out.extend(y);
        }
        out
    }
}

/// What the device asked for per position.
#[derive(Clone, Debug)]
pub enum DraftForm {
    /// The hidden state of each of these layers (ascending, the last the final block).
    Taps(Vec<usize>),
    /// The final block's state, then `down_k` of each plugin tap `taps[k]`.
    Down { taps: Vec<usize>, down: Arc<CloudDown> },
}

impl DraftForm {
    /// The backbone layers to run for this form.
    fn layers(&self, bb: &Backbone) -> Vec<usize> {
        match self {
            DraftForm::Taps(l) => l.clone(),
            DraftForm::Down { taps, .. } => {
                let mut l = taps.clone();
                l.push(bb.config.num_layers);
                l
            }
        }
    }

    /// Floats per position.
    pub fn width(&self, d: usize) -> usize {
        match self {
            DraftForm::Taps(l) => l.len() * d,
            DraftForm::Down { taps, down } => d + taps.len() * down.d_side(),
        }
    }

    /// Per-layer rows (in [`Self::layers`] order) into this form's slots.
    fn slots(&self, mut rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        match self {
            DraftForm::Taps(_) => rows,
            DraftForm::Down { down, .. } => {
                let last = rows.pop().expect("the final layer is always run");
                std::iter::once(last).chain(rows.iter().enumerate().map(|(k, r)| down.project(k, r))).collect()
            }
        }
    }
}

/// One answer to the device: states per slot for positions `first..first + rows`, the last
/// `drafts.len()` of them being the drafted tokens' positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub first: usize,
    pub positions: usize,
    pub states: Vec<Vec<f32>>,
    pub drafts: Vec<u32>,
}

/// The coordinator's half of one generation session: the KV cache and the drafting rules.
pub struct Drafter {
    cache: KvCache,
    /// Drafted tokens at the cache's tail that the device has not yet judged.
    pending: usize,
    form: DraftForm,
    layers: Vec<usize>,
    sampling: Sampling,
    stop: Vec<u32>,
    last_only: bool,
    /// A global shared part (its private parts zero) to draft from on request, with the
    /// index in `layers` of each of its taps.
    side: Option<(Plugin, Vec<usize>)>,
}

impl Drafter {
    /// `sampling`: the device's own sampler, so that drafts are the tokens the device would
    /// choose from the backbone's distribution. `stop`: ids after which drafting pauses.
    /// `last_only`: states only for the positions the device decides from (the mlp side);
    /// otherwise for every new position (the ladder side attends over all).
    pub fn new(bb: &Backbone, form: DraftForm, sampling: Sampling, stop: Vec<u32>, last_only: bool) -> Result<Self> {
        sampling.validate()?;
        let layers = form.layers(bb);
        bb.check_taps(&layers)?;
        if let DraftForm::Down { taps, down } = &form
            && (taps.len() != down.taps() || down.d != bb.config.hidden_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "{} taps of hidden size {} asked for, the down-projections have {} of {}",
                taps.len(),
                bb.config.hidden_size,
                down.taps(),
                down.d
            )));
        }
        Ok(Self { cache: bb.new_cache(), pending: 0, form, layers, sampling, stop, last_only, side: None })
    }

    /// Lets steps draft from `plugin`'s side distribution (`h + up(s) + personal(s)`; the
    /// coordinator's copy has the global shared part and a zero personal part). Its taps
    /// must be among the layers this drafter runs.
    pub fn with_side(mut self, plugin: Plugin) -> Result<Self> {
        let slots = plugin
            .shape
            .taps
            .iter()
            .map(|t| self.layers.iter().position(|l| l == t).ok_or_else(|| ModelError::InvalidInput(format!("side drafts need tap layer {t}"))))
            .collect::<Result<Vec<_>>>()?;
        self.side = Some((plugin, slots));
        Ok(self)
    }

    /// Tokens in the cache, the unjudged drafts included.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Tokens the device has confirmed (sent, or accepted drafts).
    pub fn confirmed(&self) -> usize {
        self.cache.len() - self.pending
    }

    /// Back to the first `length` tokens (a resume: the device's confirmed tokens, which may
    /// include drafts it accepted in a message that never arrived); the rest dropped.
    pub fn truncate(&mut self, length: usize) {
        self.cache.truncate(length);
        self.pending = 0;
    }

    /// Keeps the first `accepted` drafts of the last block, appends `ids` and drafts up to
    /// `k` tokens after them (fewer at a stop id or the context's end), from the backbone's
    /// distribution or, with `side` (and [`Self::with_side`]), the side plugin's.
    pub fn step(&mut self, bb: &Backbone, accepted: usize, ids: &[u32], k: usize, side: bool) -> Result<Block> {
        if accepted > self.pending {
            return Err(ModelError::InvalidInput(format!("{accepted} drafts accepted of {} sent", self.pending)));
        }
        let keep = self.confirmed() + accepted;
        let max = bb.config.max_position_embeddings;
        if ids.is_empty() || keep + ids.len() > max {
            return Err(ModelError::InvalidInput(format!("{} new tokens after {keep} do not fit the context of {max}", ids.len())));
        }
        self.cache.truncate(keep);
        self.pending = 0;
        let n = ids.len();
        let tb = TokenBatch::new(vec![ids.to_vec()], &bb.config, keep)?;
        let side = if side { self.side.as_ref() } else { None };
        let o = bb.forward(&tb, &self.layers, false, Some(&mut self.cache));
        let mut logits = (k > 0).then(|| draft_logits(bb, &o, side));
        let from = if self.last_only { n - 1 } else { 0 };
        let d = bb.config.hidden_size;
        let mut rows: Vec<Vec<f32>> = o.taps.into_iter().map(|t| to_vec(t)[from * d..].to_vec()).collect();
        let mut drafts = Vec::new();
        while let Some(lg) = logits.take()
            && drafts.len() < k
            && self.cache.len() < max
        {
            let position = self.cache.len();
            let t = self.sampling.pick(&lg, position);
            drafts.push(t);
            let more = drafts.len() < k && !self.stop.contains(&t);
            let tb = TokenBatch::new(vec![vec![t]], &bb.config, position)?;
            let o = bb.forward(&tb, &self.layers, false, Some(&mut self.cache));
            if more {
                logits = Some(draft_logits(bb, &o, side));
            }
            for (acc, tap) in rows.iter_mut().zip(o.taps) {
                acc.extend(to_vec(tap));
            }
        }
        self.pending = drafts.len();
        if rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(ModelError::InvalidInput("backbone produced non-finite states".into()));
        }
        let positions = n - from + drafts.len();
        Ok(Block { first: keep + from, positions, states: self.form.slots(rows), drafts })
    }
}

/// The distribution to draft the token after the output's last position from: the
/// backbone's, or the side plugin's (through the backbone's own final norm and head).
fn draft_logits(bb: &Backbone, o: &crate::backbone::BackboneOutput, side: Option<&(Plugin, Vec<usize>)>) -> Vec<f32> {
    let last = |x: &burn::tensor::Tensor<3>| {
        let t = x.dims()[1];
        x.clone().narrow(1, t - 1, 1)
    };
    let h = last(&o.last_hidden);
    let hidden = match side {
        Some((p, slots)) => {
            let taps: Vec<_> = slots.iter().map(|&k| last(&o.taps[k])).collect();
            p.net.side_hidden(&taps, h)
        }
        None => h,
    };
    to_vec(bb.head(hidden))
}

/// Where drafts come from: the coordinator's Generate stream on a device, or
/// [`LocalDrafts`].
pub trait DraftSource {
    fn max_positions(&self) -> usize;
    /// [`Drafter::step`]: one round trip.
    fn step(&mut self, accepted: usize, ids: &[u32], k: usize, side: bool) -> Result<Block>;
}

/// A local backbone as the drafting side (tests, and measuring without a network).
pub struct LocalDrafts<'a> {
    pub backbone: &'a Backbone,
    pub drafter: Drafter,
}

impl DraftSource for LocalDrafts<'_> {
    fn max_positions(&self) -> usize {
        self.backbone.config.max_position_embeddings
    }
    fn step(&mut self, accepted: usize, ids: &[u32], k: usize, side: bool) -> Result<Block> {
        self.drafter.step(self.backbone, accepted, ids, k, side)
    }
}

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
struct SourceChoice {
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
    fn pick(&mut self) -> bool {
        self.picks += 1;
        let side_better = self.rate[1] >= self.rate[0];
        if self.picks.is_multiple_of(8) { !side_better } else { side_better }
    }

    fn observe(&mut self, side: bool, accepted: f64) {
        let r = &mut self.rate[usize::from(side)];
        *r += 0.2 * (accepted - *r);
    }
}

/// What speculative decoding cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpecStats {
    pub round_trips: usize,
    /// Drafted tokens received, and how many the device accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Positions whose states were received.
    pub positions: usize,
}

/// Decodes up to `dec.max_new` tokens after `prompt` over drafts from `source`, drafting at
/// most `max_draft` tokens per round trip (0: per-token decoding over the same protocol).
/// `layers`/`inputs`: what the source's blocks hold (see [`Decider`]). The output equals
/// [`crate::generate::generate`]'s over the same backbone states.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    source: &mut dyn DraftSource,
    head: &FrozenHead,
    model: Option<&PersonalModel>,
    layers: &[usize],
    inputs: SideInputs,
    prompt: &[u32],
    dec: &Decoding,
    max_draft: usize,
    on_token: &mut dyn FnMut(u32, bool) -> bool,
) -> Result<(Generation, SpecStats)> {
    check_prompt(prompt, source.max_positions())?;
    let mut decider = Decider::new(head, model, &dec.sampling, layers, inputs, head.hidden_size())?;
    let limit = dec.max_new.min(source.max_positions() - prompt.len());
    let (mut out, mut stats) = (Generation::default(), SpecStats::default());
    let mut policy = AdaptiveDraft::new(max_draft);
    let (mut send, mut accepted, mut len) = (prompt.to_vec(), 0, 0);
    // After a token the gate gave to the side plugin, drafts from the side or the backbone,
    // whichever has been accepted more there.
    let (mut after_side, mut sources) = (false, SourceChoice::default());
    while out.ids.len() < limit {
        let started = std::time::Instant::now();
        let k = policy.next().min(limit - out.ids.len() - 1);
        let side = after_side && sources.pick();
        let block = source.step(accepted, &send, k, side)?;
        len += send.len();
        let rows = block.positions;
        if block.drafts.len() > k || block.first + rows != len + block.drafts.len() || rows < block.drafts.len() + 1 {
            return Err(ModelError::InvalidInput(format!(
                "block of {rows} positions from {} with {} drafts does not follow {len} tokens",
                block.first,
                block.drafts.len()
            )));
        }
        stats.round_trips += 1;
        stats.drafted += block.drafts.len();
        stats.positions += rows;
        decider.push(block.first, block.states)?;
        let mut acc = 0;
        let id = loop {
            let (id, from_side) = decider.decide(len - 1 + acc);
            out.ids.push(id);
            out.from_side.push(from_side);
            if !on_token(id, from_side) || dec.stop.contains(&id) || out.ids.len() >= limit {
                stats.accepted += acc + usize::from(block.drafts.get(acc) == Some(&id));
                return Ok((out, stats));
            }
            if block.drafts.get(acc) != Some(&id) {
                break id;
            }
            acc += 1;
        };
        let timing = (stats.round_trips > 1).then(|| (rows, started.elapsed().as_secs_f64()));
        policy.observe(acc, acc < block.drafts.len(), timing);
        if after_side && !block.drafts.is_empty() {
            sources.observe(side, acc as f64 / (acc + usize::from(acc < block.drafts.len())) as f64);
        }
        after_side = out.from_side.last() == Some(&true);
        stats.accepted += acc;
        decider.truncate(len + acc);
        len += acc;
        (send, accepted) = (vec![id], acc);
    }
    Ok((out, stats))
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
