//! Text generation, by the backbone alone or personalized (side plugin + gate), over any
//! source of backbone hidden states: a local backbone with a KV cache here, the
//! coordinator's generation stream on a device. The frozen head turns hidden states into
//! logits on the caller's side, so the backbone's own logits never need to travel.
use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, KvCache, TokenBatch};
use crate::error::{ModelError, Result};
use crate::side::{FrozenHead, Plugin, SideVariant};
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 0, seed: 0 }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if self.temperature.is_finite() && (0.0..=10.0).contains(&self.temperature) {
            Ok(())
        } else {
            Err(ModelError::InvalidInput(format!("temperature {} must be in [0, 10]", self.temperature)))
        }
    }

    fn pick(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature == 0.0 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        if self.top_k > 0 && self.top_k < idx.len() {
            idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(self.top_k);
        }
        let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) as f64) / self.temperature).exp()).collect();
        let mut r = rng.random_range(0.0..w.iter().sum::<f64>());
        for (&i, wi) in idx.iter().zip(&w) {
            if r < *wi {
                return i as u32;
            }
            r -= wi;
        }
        argmax()
    }
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

/// Hidden states the plugin has seen so far, per layer (the ladder side attends over all).
struct History {
    d: usize,
    keep_all: bool,
    layers: Vec<Vec<f32>>,
}

impl History {
    fn push(&mut self, new: Vec<Vec<f32>>) {
        for (acc, s) in self.layers.iter_mut().zip(new) {
            if self.keep_all {
                acc.extend(s);
            } else {
                let last = s.len() - self.d;
                *acc = s[last..].to_vec();
            }
        }
    }

    fn tensor(&self, k: usize, plugin_device: &burn::tensor::Device) -> Tensor<3> {
        let t = self.layers[k].len() / self.d;
        from_vec(self.layers[k].clone(), [1, t, self.d], plugin_device)
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
/// or at the source's context limit. With a plugin, its gate routes each token:
/// `g > threshold` takes the side plugin's distribution, otherwise the backbone's.
pub fn generate(
    source: &mut dyn HiddenStates,
    head: &FrozenHead,
    plugin: Option<&Plugin>,
    prompt: &[u32],
    d: &Decoding,
) -> Result<Generation> {
    generate_with(source, head, plugin, prompt, d, &mut |_, _| true)
}

/// The generated text (stop ids left out), ending once it contains `stop_text` if given;
/// `on_text` sees each new piece as it is decoded.
#[allow(clippy::too_many_arguments)]
pub fn generate_text(
    source: &mut dyn HiddenStates,
    head: &FrozenHead,
    plugin: Option<&Plugin>,
    tok: &crate::tokenizer::Tokenizer,
    prompt: &[u32],
    d: &Decoding,
    stop_text: Option<&str>,
    on_text: &mut dyn FnMut(&str),
) -> Result<(Generation, String)> {
    let mut kept = Vec::new();
    let mut text = String::new();
    let g = generate_with(source, head, plugin, prompt, d, &mut |id, _| {
        if d.stop.contains(&id) {
            return true;
        }
        kept.push(id);
        // Decoding the whole tail each time keeps multi-byte characters whole.
        if let Ok(now) = tok.decode(&kept)
            && now.len() > text.len()
            && now.starts_with(&text)
        {
            on_text(&now[text.len()..]);
            text = now;
        }
        stop_text.is_none_or(|s| !text.contains(s))
    })?;
    Ok((g, tok.decode(&kept)?))
}

/// [`generate`], calling `on_token(id, from_side)` as each token is chosen (for streaming);
/// decoding ends after a token for which it returns false.
pub fn generate_with(
    source: &mut dyn HiddenStates,
    head: &FrozenHead,
    plugin: Option<&Plugin>,
    prompt: &[u32],
    dec: &Decoding,
    on_token: &mut dyn FnMut(u32, bool) -> bool,
) -> Result<Generation> {
    let sampling = &dec.sampling;
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    if prompt.len() >= source.max_positions() {
        return Err(ModelError::InvalidInput(format!(
            "prompt of {} tokens leaves no room in the context of {}",
            prompt.len(),
            source.max_positions()
        )));
    }
    let layers = source.layers().to_vec();
    let d = source.hidden_size();
    if head.hidden_size() != d {
        return Err(ModelError::InvalidInput(format!("head expects hidden size {}, source gives {d}", head.hidden_size())));
    }
    let tap_index = match plugin {
        Some(p) => p
            .shape
            .taps
            .iter()
            .map(|t| layers.iter().position(|l| l == t).ok_or_else(|| ModelError::InvalidInput(format!("source lacks tap layer {t}"))))
            .collect::<Result<Vec<_>>>()?,
        None => vec![],
    };
    let keep_all = plugin.is_some_and(|p| p.config.variant == SideVariant::Ladder);
    let mut hist = History { d, keep_all, layers: vec![Vec::new(); layers.len()] };
    let device = head.device();
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut out = Generation::default();
    let mut next_in = prompt.to_vec();
    let room = source.max_positions() - prompt.len();
    for _ in 0..dec.max_new.min(room) {
        hist.push(source.extend(&next_in)?);
        let last = hist.layers.len() - 1;
        let h_all = hist.tensor(last, &device);
        let t = h_all.dims()[1];
        let h_last = h_all.narrow(1, t - 1, 1);
        let bb_logits = head.logits(h_last.clone());
        let (logits, side) = match plugin {
            Some(p) => {
                let taps: Vec<Tensor<3>> = tap_index.iter().map(|&k| hist.tensor(k, &device)).collect();
                let o = p.forward(&taps, hist.tensor(last, &device), head);
                let g = to_vec(o.gate.narrow(1, t - 1, 1))[0] as f64;
                if g > p.config.gate.threshold {
                    (head.logits(o.side_hidden.narrow(1, t - 1, 1)), true)
                } else {
                    (bb_logits, false)
                }
            }
            None => (bb_logits, false),
        };
        let id = sampling.pick(&to_vec(logits), &mut rng);
        out.ids.push(id);
        out.from_side.push(side);
        if !on_token(id, side) || dec.stop.contains(&id) {
            break;
        }
        next_in = vec![id];
    }
    Ok(out)
}
