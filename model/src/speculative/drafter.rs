//! The coordinator's half of a generation session ([`Drafter`]: the KV cache and the
//! drafting rules; no I/O, the engine wraps it), and where a device's drafts come from
//! ([`DraftSource`]: the coordinator's stream, or [`LocalDrafts`]).
use super::block::{Block, DraftForm};
use crate::backbone::{Backbone, KvCache, TokenBatch};
use crate::error::{ModelError, Result};
use crate::generate::Sampling;
use crate::side::Plugin;
use crate::tensor_util::to_vec;

/// The coordinator's half of one generation session: the KV cache and the drafting rules.
pub struct Drafter {
    cache: KvCache,
    /// The ids in the cache (the sampler's penalties read them).
    ids: Vec<u32>,
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
    /// The most positions the cache holds (sent tokens and drafts).
    max: usize,
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
        let max = bb.config.max_position_embeddings;
        Ok(Self { cache: bb.new_cache(), ids: Vec::new(), pending: 0, form, layers, sampling, stop, last_only, side: None, max })
    }

    /// Holds at most `positions` (at most the context), its cache reserved for them at once:
    /// drafting stops there, and more tokens are refused.
    pub fn with_max_positions(mut self, bb: &Backbone, positions: usize) -> Result<Self> {
        if positions == 0 || positions > bb.config.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!("max positions {positions} must be in 1..={}", bb.config.max_position_embeddings)));
        }
        (self.cache, self.max) = (KvCache::with_capacity(&bb.config, positions), positions);
        Ok(self)
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
        self.ids.truncate(length);
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
        let max = self.max;
        if ids.is_empty() || keep + ids.len() > max {
            return Err(ModelError::InvalidInput(format!("{} new tokens after {keep} do not fit the context of {max}", ids.len())));
        }
        self.cache.truncate(keep);
        self.ids.truncate(keep);
        self.ids.extend_from_slice(ids);
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
            let t = self.sampling.pick(&lg, position, &self.ids);
            self.ids.push(t);
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
