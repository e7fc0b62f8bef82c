//! The coordinator's half of a generation session ([`Drafter`]: the KV cache and the
//! drafting rules; no I/O, the engine wraps it), and where a device's drafts come from
//! ([`DraftSource`]: the coordinator's stream, or [`LocalDrafts`]).
use super::block::{Block, DraftForm};
use crate::backbone::decode::{MAX_POSITIONS, Seq, forward_batch};
use crate::backbone::host::HostOutput;
use crate::backbone::{Backbone, BackboneOutput, KvCache, TokenBatch};
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
        let mut run = self.begin(bb, accepted, ids, k, side)?;
        while let Some(input) = run.input.take() {
            let tb = TokenBatch::new(vec![input], &bb.config, self.cache.len())?;
            let o = bb.forward(&tb, &self.layers, false, Some(&mut self.cache));
            self.absorb(bb, &mut run, &o);
        }
        self.finish(run)
    }

    /// [`Self::step`] for several sessions at once (the backbone worker's batch): each
    /// iteration runs the next forward of every session still drafting (its new ids, then
    /// its last draft) as one batched forward on flex, so each weight is read once per
    /// iteration for all of them; a session sending more than a few ids runs its first
    /// forward alone. Each session's block is the one `step` gives it alone.
    pub fn step_many(bb: &Backbone, steps: &mut [(&mut Drafter, StepArgs)]) -> Vec<Result<Block>> {
        let mut runs: Vec<Result<Run>> = steps.iter_mut().map(|(d, a)| d.begin(bb, a.accepted, &a.ids, a.k, a.side)).collect();
        loop {
            let mut inputs: Vec<Option<Vec<u32>>> = runs.iter_mut().map(|r| r.as_mut().ok().and_then(|r| r.input.take())).collect();
            if inputs.iter().all(Option::is_none) {
                break;
            }
            let few = |i: &Option<Vec<u32>>| i.as_ref().is_some_and(|ids| ids.len() <= MAX_POSITIONS);
            let mut batched =
                (!bb.device.is_autodiff() && inputs.iter().filter(|i| few(i)).count() > 1).then(|| Self::forward_together(bb, steps, &inputs, &few)).flatten();
            for (i, ((d, _), run)) in steps.iter_mut().zip(&mut runs).enumerate() {
                let Ok(run) = run else { continue };
                let o = match (batched.as_mut().and_then(|b| b[i].take()), inputs[i].take()) {
                    (Some(o), _) => o,
                    (None, Some(input)) => match TokenBatch::new(vec![input], &bb.config, d.cache.len()) {
                        Ok(tb) => bb.forward(&tb, &d.layers, false, Some(&mut d.cache)),
                        Err(e) => {
                            run.failed = Some(e);
                            continue;
                        }
                    },
                    (None, None) => continue,
                };
                d.absorb(bb, run, &o);
            }
        }
        steps.iter_mut().zip(runs).map(|((d, _), run)| d.finish(run?)).collect()
    }

    /// One batched forward of the inputs `few` picks (over the union of the sessions' layers),
    /// each session's output as `step`'s forward gives it; None off flex.
    fn forward_together(
        bb: &Backbone,
        steps: &mut [(&mut Drafter, StepArgs)],
        inputs: &[Option<Vec<u32>>],
        few: &dyn Fn(&Option<Vec<u32>>) -> bool,
    ) -> Option<Vec<Option<BackboneOutput>>> {
        let mut layers: Vec<usize> = steps.iter().flat_map(|(d, _)| d.layers.iter().copied()).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut seqs: Vec<Seq> =
            steps.iter_mut().zip(inputs).filter(|(_, i)| few(i)).map(|((d, _), i)| Seq { ids: i.as_deref().expect("picked"), cache: &mut d.cache }).collect();
        let mut outs = forward_batch(bb, &mut seqs, &layers, false)?.into_iter();
        drop(seqs);
        let picked = steps.iter().zip(inputs).map(|((d, _), i)| {
            let h = if few(i) { outs.next() } else { None }?;
            let taps = d.layers.iter().map(|l| h.taps[layers.iter().position(|x| x == l).expect("in the union")].clone()).collect();
            let t = i.as_ref().map_or(0, Vec::len);
            Some(bb.host_output(&[HostOutput { taps, ..h }], t, d.layers.len(), false))
        });
        Some(picked.collect())
    }

    /// Checks a step, truncates to the kept tokens and appends `ids`: the run's first input.
    fn begin(&mut self, bb: &Backbone, accepted: usize, ids: &[u32], k: usize, side: bool) -> Result<Run> {
        if accepted > self.pending {
            return Err(ModelError::InvalidInput(format!("{accepted} drafts accepted of {} sent", self.pending)));
        }
        let keep = self.confirmed() + accepted;
        let max = self.max;
        if ids.is_empty() || keep + ids.len() > max {
            return Err(ModelError::InvalidInput(format!("{} new tokens after {keep} do not fit the context of {max}", ids.len())));
        }
        TokenBatch::new(vec![ids.to_vec()], &bb.config, keep)?;
        self.cache.truncate(keep);
        self.ids.truncate(keep);
        self.ids.extend_from_slice(ids);
        self.pending = 0;
        let from = if self.last_only { ids.len() - 1 } else { 0 };
        Ok(Run {
            k,
            side,
            skip: from,
            positions: ids.len() - from,
            first: keep + from,
            rows: vec![Vec::new(); self.layers.len()],
            drafts: Vec::new(),
            input: Some(ids.to_vec()),
            draft_after: k > 0,
            failed: None,
        })
    }

    /// Takes the output of the run's last forward: its states, then the next draft if one is
    /// due (the run's next input).
    fn absorb(&mut self, bb: &Backbone, run: &mut Run, o: &BackboneOutput) {
        let d = bb.config.hidden_size;
        for (acc, tap) in run.rows.iter_mut().zip(&o.taps) {
            acc.extend_from_slice(&to_vec(tap.clone())[run.skip * d..]);
        }
        run.skip = 0;
        if run.draft_after && run.drafts.len() < run.k && self.cache.len() < self.max {
            let side = if run.side { self.side.as_ref() } else { None };
            let lg = draft_logits(bb, o, side);
            let t = self.sampling.pick(&lg, self.cache.len(), &self.ids);
            self.ids.push(t);
            run.drafts.push(t);
            run.draft_after = run.drafts.len() < run.k && !self.stop.contains(&t);
            run.input = Some(vec![t]);
        }
    }

    fn finish(&mut self, run: Run) -> Result<Block> {
        self.pending = run.drafts.len();
        if let Some(e) = run.failed {
            return Err(e);
        }
        if run.rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(ModelError::InvalidInput("backbone produced non-finite states".into()));
        }
        let positions = run.positions + run.drafts.len();
        Ok(Block { first: run.first, positions, states: self.form.slots(run.rows), drafts: run.drafts })
    }
}

/// One session's step in a batch ([`Drafter::step_many`]).
pub struct StepArgs {
    pub accepted: usize,
    pub ids: Vec<u32>,
    pub k: usize,
    pub side: bool,
}

/// A step between its forwards: what [`Drafter::step`] keeps from one to the next.
struct Run {
    k: usize,
    side: bool,
    /// Positions of the next output to leave out (the first forward's, before `last_only`'s row).
    skip: usize,
    /// The block's first position, and how many of the first forward's positions it holds.
    first: usize,
    positions: usize,
    /// Per slot, the states so far.
    rows: Vec<Vec<f32>>,
    drafts: Vec<u32>,
    /// What the next forward runs (None: the step is done).
    input: Option<Vec<u32>>,
    /// Whether a draft follows the next output.
    draft_after: bool,
    failed: Option<ModelError>,
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
