//! Text generation, by the backbone alone or personalized (the device's
//! [`PersonalModel`]: side networks, memory, gate), over any source of backbone hidden states: a local backbone with a KV cache here, the
//! coordinator's generation stream on a device. The frozen head turns hidden states into
//! logits on the caller's side, so the backbone's own logits never need to travel.
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, KvCache, TokenBatch};
use crate::error::{ModelError, Result};
use crate::personal::PersonalModel;
use crate::side::FrozenHead;
use crate::tensor_util::{from_vec, to_vec};

/// Hidden states of a growing sequence, position by position.
pub trait HiddenStates {
    /// Layers that [`HiddenStates::extend`] returns, ascending; the last is the final block.
    fn layers(&self) -> &[usize];
    fn hidden_size(&self) -> usize;
    /// Longest sequence the source accepts.
    fn max_positions(&self) -> usize;
    /// Appends `ids` and returns the new positions' states, `[layers][new * hidden]`.
    fn extend(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>>;
}

/// A local backbone with its KV cache: each call runs only the new positions.
pub struct LocalStates<'a> {
    backbone: &'a Backbone,
    cache: KvCache,
    layers: Vec<usize>,
}

impl<'a> LocalStates<'a> {
    pub fn new(backbone: &'a Backbone, layers: &[usize]) -> Result<Self> {
        backbone.check_taps(layers)?;
        Ok(Self { backbone, cache: backbone.new_cache(), layers: layers.to_vec() })
    }
}

impl HiddenStates for LocalStates<'_> {
    fn layers(&self) -> &[usize] {
        &self.layers
    }
    fn hidden_size(&self) -> usize {
        self.backbone.config.hidden_size
    }
    fn max_positions(&self) -> usize {
        self.backbone.config.max_position_embeddings
    }
    fn extend(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let batch = TokenBatch::new(vec![ids.to_vec()], &self.backbone.config, self.cache.len())?;
        let out = self.backbone.forward(&batch, &self.layers, false, Some(&mut self.cache));
        Ok(out.taps.into_iter().map(to_vec).collect())
    }
}

/// How a token is drawn from the logits, as llama.cpp's default sampler chain: the penalties
/// on the last `repeat_last_n` tokens of the sequence (the prompt's included), then top-k,
/// top-p and min-p on the probabilities at temperature 1, then the temperature and the draw.
/// Every filter is off at its neutral value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// 0 = greedy: the most likely token after the penalties.
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least p (1 = all).
    pub top_p: f64,
    /// Keep the tokens at least `min_p` times as likely as the most likely one (0 = all).
    pub min_p: f64,
    /// A token seen in the window has a positive logit divided by this, a negative one
    /// multiplied (1 = off).
    pub repeat_penalty: f64,
    /// The window of the penalties: the last n tokens.
    pub repeat_last_n: usize,
    /// Subtracted from the logit of a token seen in the window (0 = off).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit per time it was seen in the window (0 = off).
    pub frequency_penalty: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// The most likely token, no penalty.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn validate(&self) -> Result<()> {
        let within = |name: &str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok { Ok(()) } else { Err(ModelError::InvalidInput(format!("{name} {v} must be in {range}"))) }
        };
        within("temperature", self.temperature, (0.0..=10.0).contains(&self.temperature), "[0, 10]")?;
        within("top_p", self.top_p, self.top_p > 0.0 && self.top_p <= 1.0, "(0, 1]")?;
        within("min_p", self.min_p, (0.0..1.0).contains(&self.min_p), "[0, 1)")?;
        within("repeat_penalty", self.repeat_penalty, self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0, "(0, 10]")?;
        within("presence_penalty", self.presence_penalty, (-2.0..=2.0).contains(&self.presence_penalty), "[-2, 2]")?;
        within("frequency_penalty", self.frequency_penalty, (-2.0..=2.0).contains(&self.frequency_penalty), "[-2, 2]")?;
        if self.repeat_last_n > 1 << 20 {
            return Err(ModelError::InvalidInput(format!("repeat_last_n {} must be at most {}", self.repeat_last_n, 1 << 20)));
        }
        Ok(())
    }

    /// The token to follow `context` (the sequence so far, prompt included; the new token's
    /// index is `position`). The random draw depends only on the seed and that index, so
    /// whoever knows both and the sequence (the coordinator drafting for a device) can
    /// reproduce it, and a rejected draft costs no draw.
    pub fn pick(&self, logits: &[f32], position: usize, context: &[u32]) -> u32 {
        let penalized;
        let logits = if self.penalizes() {
            penalized = self.penalize(logits, context);
            &penalized[..]
        } else {
            logits
        };
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature == 0.0 {
            return argmax();
        }
        let idx = self.candidates(logits);
        let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) as f64) / self.temperature).exp()).collect();
        let mut r = uniform(self.seed, position) * w.iter().sum::<f64>();
        for (&i, wi) in idx.iter().zip(&w) {
            if r < *wi {
                return i as u32;
            }
            r -= wi;
        }
        argmax()
    }

    fn penalizes(&self) -> bool {
        self.repeat_last_n > 0 && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }

    /// The logits with the penalties of the tokens in the window applied.
    fn penalize(&self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        let mut seen = std::collections::HashMap::<u32, u32>::new();
        for &t in &context[context.len().saturating_sub(self.repeat_last_n)..] {
            *seen.entry(t).or_default() += 1;
        }
        let rp = self.repeat_penalty as f32;
        for (t, n) in seen {
            let Some(l) = out.get_mut(t as usize) else { continue };
            *l = if *l <= 0.0 { *l * rp } else { *l / rp };
            *l -= (n as f64 * self.frequency_penalty + self.presence_penalty) as f32;
        }
        out
    }

    /// The tokens left after top-k, top-p and min-p, the most likely first (every token in
    /// id order when no filter is on). Top-p and min-p read the probabilities at
    /// temperature 1 over the top-k tokens; each keeps a prefix of them, so the shorter wins.
    fn candidates(&self, logits: &[f32]) -> Vec<usize> {
        let n = logits.len();
        let top_k = self.top_k > 0 && self.top_k < n;
        let mut idx: Vec<usize> = (0..n).collect();
        if !top_k && self.top_p >= 1.0 && self.min_p <= 0.0 {
            return idx;
        }
        let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if top_k {
            idx.select_nth_unstable_by(self.top_k - 1, order);
            idx.truncate(self.top_k);
        }
        let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
        // Relative to the most likely token: min-p compares these directly.
        let rel = |i: usize| ((logits[i] - max) as f64).exp();
        let total: f64 = idx.iter().map(|&i| rel(i)).sum();
        if self.min_p > 0.0 {
            idx.retain(|&i| rel(i) >= self.min_p);
        }
        idx.sort_unstable_by(order);
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = idx.iter().position(|&i| {
                mass += rel(i) / total;
                mass >= self.top_p
            });
            idx.truncate(keep.map_or(idx.len(), |k| k + 1));
        }
        idx
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value per input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for `(seed, position)`.
fn uniform(seed: u64, position: usize) -> f64 {
    (mix(seed ^ mix(position as u64)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Generated ids (prompt excluded) and, per token, whether the side plugin produced it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub from_side: Vec<bool>,
}

impl Generation {
    pub fn side_fraction(&self) -> f64 {
        self.from_side.iter().filter(|&&s| s).count() as f64 / self.from_side.len().max(1) as f64
    }
}

/// What a device receives per position for its side plugin: each tap's hidden state, or
/// `down_k(h_k)` when the coordinator applies the shared down-projections (`d / r` floats
/// per tap instead of `d`; see [`crate::speculative::CloudDown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideInputs {
    #[default]
    Taps,
    Down,
}

/// The per-position states a device has received, per slot (a tap layer or a projected tap,
/// and the final block), rows of positions `first..first + rows`.
struct History {
    widths: Vec<usize>,
    /// The ladder side attends over every position; the mlp side reads one.
    keep_all: bool,
    first: usize,
    slots: Vec<Vec<f32>>,
}

impl History {
    fn rows(&self) -> usize {
        self.slots[0].len() / self.widths[0]
    }

    /// Appends rows for positions `first..`; a gap or an overlap is the caller's bug.
    fn push(&mut self, first: usize, new: Vec<Vec<f32>>) -> Result<()> {
        let n = new.first().map_or(0, |s| s.len() / self.widths[0]);
        let bad = new.len() != self.widths.len() || new.iter().zip(&self.widths).any(|(s, w)| s.len() != n * w);
        if bad {
            return Err(ModelError::InvalidInput("hidden states of the wrong size".into()));
        }
        if self.rows() > 0 && first != self.first + self.rows() {
            return Err(ModelError::InvalidInput(format!("states for position {first} after {} rows from {}", self.rows(), self.first)));
        }
        if self.rows() == 0 {
            self.first = first;
        }
        for (acc, s) in self.slots.iter_mut().zip(new) {
            acc.extend(s);
        }
        if !self.keep_all {
            self.forget_before(self.first + self.rows() - n.min(self.rows()));
        }
        Ok(())
    }

    /// Drops rows of positions `end..` (a rejected draft's).
    fn truncate(&mut self, end: usize) {
        let keep = end.saturating_sub(self.first).min(self.rows());
        for (s, w) in self.slots.iter_mut().zip(&self.widths) {
            s.truncate(keep * w);
        }
    }

    /// Drops rows before `position` (the mlp side never reads them again).
    fn forget_before(&mut self, position: usize) {
        let drop = position.saturating_sub(self.first).min(self.rows());
        for (s, w) in self.slots.iter_mut().zip(&self.widths) {
            s.drain(..drop * w);
        }
        self.first += drop;
    }

    /// Slot `k` at `position` as `[1, t, width]`: with every earlier row for the ladder side.
    fn tensor(&self, k: usize, position: usize, device: &burn::tensor::Device) -> Tensor<3> {
        let w = self.widths[k];
        let at = position - self.first;
        let from = if self.keep_all { 0 } else { at };
        let rows = self.slots[k][from * w..(at + 1) * w].to_vec();
        from_vec(rows, [1, at + 1 - from, w], device)
    }
}

/// The device's choice at each position: the personal model's distribution (gate, side
/// networks, memory: [`PersonalModel::decide_row`]) or the backbone's through the frozen
/// head, then the sampler. Naive and speculative decoding both decide every token here, one
/// position at a time with the same tensor shapes, so given the same states they choose the
/// same tokens.
pub(crate) struct Decider<'a> {
    head: &'a FrozenHead,
    model: Option<&'a PersonalModel>,
    sampling: Sampling,
    inputs: SideInputs,
    /// Slot of each plugin tap, and of the final block's state.
    tap_slot: Vec<usize>,
    last_slot: usize,
    hist: History,
}

impl<'a> Decider<'a> {
    /// `layers`: what a source returns with [`SideInputs::Taps`] (ascending, the last the
    /// final block). With [`SideInputs::Down`] the slots are the final block's state, then
    /// one projected state per plugin tap.
    pub(crate) fn new(
        head: &'a FrozenHead,
        model: Option<&'a PersonalModel>,
        sampling: &Sampling,
        layers: &[usize],
        inputs: SideInputs,
        d: usize,
    ) -> Result<Self> {
        sampling.validate()?;
        if head.hidden_size() != d {
            return Err(ModelError::InvalidInput(format!("head expects hidden size {}, source gives {d}", head.hidden_size())));
        }
        if inputs == SideInputs::Down && model.is_some_and(|m| !m.reads_body_down()) {
            return Err(ModelError::InvalidInput("the personal side network has its own down-projections: it needs the taps".into()));
        }
        let plugin = model.map(|m| &m.body);
        let (tap_slot, widths) = match (inputs, plugin) {
            (SideInputs::Down, Some(p)) => {
                ((1..=p.shape.taps.len()).collect(), std::iter::once(d).chain(p.shape.taps.iter().map(|_| p.shape.d_side)).collect())
            }
            (SideInputs::Down, None) => (vec![], vec![d]),
            (SideInputs::Taps, _) => {
                let taps = plugin.map_or(&[][..], |p| &p.shape.taps);
                let slot = |t: &usize| layers.iter().position(|l| l == t).ok_or_else(|| ModelError::InvalidInput(format!("source lacks tap layer {t}")));
                (taps.iter().map(slot).collect::<Result<Vec<_>>>()?, vec![d; layers.len()])
            }
        };
        let last_slot = if inputs == SideInputs::Down { 0 } else { widths.len() - 1 };
        let keep_all = model.is_some_and(PersonalModel::keeps_history);
        let slots = vec![Vec::new(); widths.len()];
        let hist = History { widths, keep_all, first: 0, slots };
        Ok(Self { head, model, sampling: sampling.clone(), inputs, tap_slot, last_slot, hist })
    }

    pub(crate) fn push(&mut self, first: usize, states: Vec<Vec<f32>>) -> Result<()> {
        self.hist.push(first, states)
    }

    pub(crate) fn truncate(&mut self, end: usize) {
        self.hist.truncate(end);
    }

    /// The token after `position` (chosen from that position's states; `context`: the
    /// sequence up to it, `position + 1` ids) and whether the personal model produced it.
    pub(crate) fn decide(&self, position: usize, context: &[u32]) -> (u32, bool) {
        debug_assert_eq!(context.len(), position + 1);
        let device = self.head.device();
        let h_all = self.hist.tensor(self.last_slot, position, &device);
        let t = h_all.dims()[1];
        let (logits, side) = match self.model {
            Some(m) => {
                let taps: Vec<Tensor<3>> = self.tap_slot.iter().map(|&k| self.hist.tensor(k, position, &device)).collect();
                m.decide_row(self.head, &taps, h_all, self.inputs == SideInputs::Down)
            }
            None => (to_vec(self.head.logits(h_all.narrow(1, t - 1, 1))), false),
        };
        (self.sampling.pick(&logits, position + 1, context), side)
    }
}

/// How long to decode, how to pick tokens, and where to stop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoding {
    pub max_new: usize,
    pub sampling: Sampling,
    /// Ids that end a generation, kept as its last id: the checkpoint's EOS ids
    /// ([`crate::tokenizer::ModelTokens::eos`]); empty to run to `max_new`.
    pub stop: Vec<u32>,
}

/// Decodes up to `d.max_new` tokens after `prompt`, stopping early after an id of `d.stop`
/// or at the source's context limit. With a personal model, its gate routes each token:
/// `g > threshold` takes the model's distribution, otherwise the backbone's.
pub fn generate(source: &mut dyn HiddenStates, head: &FrozenHead, model: Option<&PersonalModel>, prompt: &[u32], d: &Decoding) -> Result<Generation> {
    generate_with(source, head, model, prompt, d, &mut |_, _| true)
}

/// The generated text (stop ids left out), ending once it contains `stop_text` if given;
/// `on_text` sees each new piece as it is decoded.
#[allow(clippy::too_many_arguments)]
pub fn generate_text(
    source: &mut dyn HiddenStates,
    head: &FrozenHead,
    model: Option<&PersonalModel>,
    tok: &crate::tokenizer::Tokenizer,
    prompt: &[u32],
    d: &Decoding,
    stop_text: Option<&str>,
    on_text: &mut dyn FnMut(&str),
) -> Result<(Generation, String)> {
    let mut text = TextSink::new(tok, &d.stop, stop_text, on_text);
    let g = generate_with(source, head, model, prompt, d, &mut |id, _| text.token(id))?;
    let s = text.finish()?;
    Ok((g, s))
}

/// Turns ids into text as they are decoded: stop ids left out, multi-byte characters whole.
pub struct TextSink<'a> {
    tok: &'a crate::tokenizer::Tokenizer,
    stop_ids: &'a [u32],
    stop_text: Option<&'a str>,
    on_text: &'a mut dyn FnMut(&str),
    kept: Vec<u32>,
    text: String,
}

impl<'a> TextSink<'a> {
    pub fn new(tok: &'a crate::tokenizer::Tokenizer, stop_ids: &'a [u32], stop_text: Option<&'a str>, on_text: &'a mut dyn FnMut(&str)) -> Self {
        Self { tok, stop_ids, stop_text, on_text, kept: Vec::new(), text: String::new() }
    }

    /// Takes the next id; false once the text contains the stop text.
    pub fn token(&mut self, id: u32) -> bool {
        if self.stop_ids.contains(&id) {
            return true;
        }
        self.kept.push(id);
        // Decoding the whole tail each time keeps multi-byte characters whole.
        if let Ok(now) = self.tok.decode(&self.kept)
            && now.len() > self.text.len()
            && now.starts_with(&self.text)
        {
            (self.on_text)(&now[self.text.len()..]);
            self.text = now;
        }
        self.stop_text.is_none_or(|s| !self.text.contains(s))
    }

    pub fn finish(self) -> Result<String> {
        self.tok.decode(&self.kept)
    }
}

/// Checks a prompt against a context of `max_positions`.
pub(crate) fn check_prompt(prompt: &[u32], max_positions: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    if prompt.len() >= max_positions {
        return Err(ModelError::InvalidInput(format!("prompt of {} tokens leaves no room in the context of {max_positions}", prompt.len())));
    }
    Ok(())
}

/// [`generate`], calling `on_token(id, from_side)` as each token is chosen (for streaming);
/// decoding ends after a token for which it returns false. One extension of the source per
/// token: the naive protocol.
pub fn generate_with(
    source: &mut dyn HiddenStates,
    head: &FrozenHead,
    model: Option<&PersonalModel>,
    prompt: &[u32],
    dec: &Decoding,
    on_token: &mut dyn FnMut(u32, bool) -> bool,
) -> Result<Generation> {
    check_prompt(prompt, source.max_positions())?;
    let layers = source.layers().to_vec();
    let mut decider = Decider::new(head, model, &dec.sampling, &layers, SideInputs::Taps, source.hidden_size())?;
    let mut out = Generation::default();
    let mut next_in = prompt.to_vec();
    let mut seq = prompt.to_vec();
    let mut position = 0;
    let room = source.max_positions() - prompt.len();
    for _ in 0..dec.max_new.min(room) {
        let first = position;
        position += next_in.len();
        decider.push(first, source.extend(&next_in)?)?;
        let (id, side) = decider.decide(position - 1, &seq);
        seq.push(id);
        out.ids.push(id);
        out.from_side.push(side);
        if !on_token(id, side) || dec.stop.contains(&id) {
            break;
        }
        next_in = vec![id];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Sampling;

    /// The ids drawn at positions 0..n.
    fn draws(s: &Sampling, logits: &[f32], context: &[u32], n: usize) -> std::collections::BTreeSet<u32> {
        (0..n).map(|p| s.pick(logits, p, context)).collect()
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let greedy = Sampling::greedy();
        // A positive logit is divided, a negative one multiplied.
        let rep = Sampling { repeat_penalty: 1.5, ..greedy.clone() };
        assert_eq!(rep.pick(&[2.0, 1.9, -1.0], 3, &[0]), 1);
        assert_eq!(greedy.pick(&[2.0, 1.9, -1.0], 3, &[0]), 0);
        assert_eq!(rep.penalize(&[2.0, 1.9, -1.0], &[2]), vec![2.0, 1.9, -1.5]);
        // Presence once, frequency per occurrence; only the last `repeat_last_n` count.
        let pf = Sampling { presence_penalty: 0.5, frequency_penalty: 0.25, repeat_last_n: 3, ..greedy.clone() };
        assert_eq!(pf.penalize(&[1.0, 1.0, 1.0], &[2, 0, 0, 1]), vec![0.0, 0.25, 1.0]);
        // Ids outside the vocabulary in the context are ignored.
        assert_eq!(pf.penalize(&[1.0, 1.0], &[7]), vec![1.0, 1.0]);
        let off = Sampling { repeat_last_n: 0, ..rep };
        assert_eq!(off.pick(&[2.0, 1.9, -1.0], 3, &[0]), 0);
    }

    #[test]
    fn top_p_and_min_p_keep_the_likely_tokens() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let warm = Sampling { temperature: 1.0, seed: 9, ..Sampling::default() };
        assert_eq!(draws(&warm, &logits, &[], 400).len(), 3);
        let top_p = |p| Sampling { top_p: p, ..warm.clone() };
        assert_eq!(draws(&top_p(0.45), &logits, &[], 400), [0].into());
        assert_eq!(draws(&top_p(0.7), &logits, &[], 400), [0, 1].into());
        assert_eq!(draws(&top_p(0.81), &logits, &[], 400), [0, 1, 2].into());
        // min-p against the most likely: 0.4 and 0.6 of it.
        let min_p = |p| Sampling { min_p: p, ..warm.clone() };
        assert_eq!(draws(&min_p(0.5), &logits, &[], 400), [0, 1].into());
        assert_eq!(draws(&min_p(0.7), &logits, &[], 400), [0].into());
        // The shorter prefix wins; top-k first.
        assert_eq!(draws(&Sampling { min_p: 0.5, top_p: 0.95, ..warm.clone() }, &logits, &[], 400), [0, 1].into());
        assert_eq!(draws(&Sampling { top_k: 2, top_p: 0.9, ..warm.clone() }, &logits, &[], 400), [0, 1].into());
        // Top-p over the top-k tokens: 0.5 / 0.8 of their mass is token 0 alone.
        assert_eq!(draws(&Sampling { top_k: 2, top_p: 0.62, ..warm.clone() }, &logits, &[], 400), [0].into());
        // Penalties come first: token 0 penalized below the others is filtered out.
        let after = Sampling { frequency_penalty: 2.0, min_p: 0.5, ..warm };
        assert_eq!(draws(&after, &logits, &[0], 400), [1, 2].into());
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        for bad in [
            Sampling { top_p: 0.0, ..Sampling::default() },
            Sampling { top_p: 1.5, ..Sampling::default() },
            Sampling { min_p: 1.0, ..Sampling::default() },
            Sampling { repeat_penalty: 0.0, ..Sampling::default() },
            Sampling { repeat_penalty: f64::INFINITY, ..Sampling::default() },
            Sampling { presence_penalty: 3.0, ..Sampling::default() },
            Sampling { frequency_penalty: f64::NAN, ..Sampling::default() },
            Sampling { repeat_last_n: usize::MAX, ..Sampling::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        Sampling::default().validate().unwrap();
    }
}
