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
mod block;
mod drafter;
mod policy;

use serde::Serialize;

pub use block::{Block, CloudDown, DraftForm};
pub use drafter::{DraftSource, Drafter, LocalDrafts, StepArgs};
pub use policy::AdaptiveDraft;
use policy::SourceChoice;

use crate::error::{ModelError, Result};
use crate::generate::{Decider, Decoding, Generation, SideInputs, check_prompt};
use crate::personal::PersonalModel;
use crate::side::FrozenHead;

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
    // The prompt and the tokens chosen so far: the sampler's penalties read them.
    let mut seq = prompt.to_vec();
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
            let (id, from_side) = decider.decide(len - 1 + acc, &seq);
            seq.push(id);
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
