//! Backbone features of a device's examples, cached across epochs (the backbone is frozen,
//! so it runs forward once per example). The client fills a [`FeatureSet`] from the
//! coordinator over gRPC; experiments and tests fill it from a local [`Backbone`].
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, TokenBatch};
use crate::data::Example;
use crate::error::{ModelError, Result};
use crate::tensor_util::to_vec;
use crate::tokenizer::Tokenizer;

/// `prompt + reply` as token ids; position `j` predicts `ids[j + 1]`, and the reply starts
/// at `reply_start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub reply_start: usize,
}

impl TokenizedExample {
    /// Positions whose next token is a reply token.
    pub fn loss_positions(&self) -> std::ops::Range<usize> {
        self.reply_start - 1..self.ids.len() - 1
    }
}

/// Tokenizes examples, keeping each within `max_len` tokens by cutting the prompt from the
/// left (the reply is what the model is trained on). Examples with an empty prompt or reply
/// are skipped.
pub fn tokenize_examples(tok: &Tokenizer, examples: &[Example], max_len: usize) -> Result<Vec<TokenizedExample>> {
    let mut out = Vec::with_capacity(examples.len());
    for e in examples {
        let p = tok.encode(&e.prompt)?;
        let mut r = tok.encode(&e.reply)?;
        if p.is_empty() || r.is_empty() {
            continue;
        }
        r.truncate(max_len.saturating_sub(1));
        let keep = (max_len - r.len()).min(p.len());
        let mut ids = p[p.len() - keep..].to_vec();
        let reply_start = ids.len();
        ids.extend(r);
        out.push(TokenizedExample { ids, reply_start });
    }
    Ok(out)
}

/// Features of one example at positions `first..first + targets.len()`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExampleFeatures {
    pub first: usize,
    /// Next token at each stored position.
    pub targets: Vec<u32>,
    /// Whether each stored position is a training target (a reply token follows).
    pub loss: Vec<bool>,
    /// `[positions, layers, d]`, layers in [`FeatureSet::layers`] order.
    pub feats: Vec<f32>,
}

/// What an example's features are besides their values, in its byte form.
#[derive(Serialize, Deserialize)]
struct RecordHeader {
    first: usize,
    targets: Vec<u32>,
    loss: Vec<bool>,
    n: usize,
}

impl ExampleFeatures {
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// `u32 header length | JSON header | f32 little-endian values`: a device's feature
    /// cache record, and the experiments' features on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let h = serde_json::to_vec(&RecordHeader { first: self.first, targets: self.targets.clone(), loss: self.loss.clone(), n: self.feats.len() })
            .expect("a header serializes");
        let mut out = Vec::with_capacity(4 + h.len() + 4 * self.feats.len());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        for v in &self.feats {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The inverse of [`Self::to_bytes`]; a record whose parts disagree is refused.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = || ModelError::Data("corrupt feature record".into());
        let hl = u32::from_le_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let h: RecordHeader = serde_json::from_slice(b.get(4..4 + hl).ok_or_else(bad)?).map_err(|_| bad())?;
        let raw = b.get(4 + hl..).ok_or_else(bad)?;
        // One value per position and feature: a record whose parts disagree would be indexed
        // out of bounds by its readers.
        let positions = h.targets.len();
        if Some(raw.len()) != h.n.checked_mul(4) || h.loss.len() != positions || (positions == 0) != (h.n == 0) || !h.n.is_multiple_of(positions) {
            return Err(bad());
        }
        let feats = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Self { first: h.first, targets: h.targets, loss: h.loss, feats })
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Which positions a side variant needs: the `mlp` side is per token, so only the loss
/// positions; the `ladder` side attends over the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Positions {
    LossOnly,
    All,
}

impl Positions {
    pub fn range(self, ex: &TokenizedExample) -> std::ops::Range<usize> {
        match self {
            Self::LossOnly => ex.loss_positions(),
            Self::All => 0..ex.ids.len() - 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureSet {
    /// Backbone layers stored (0 = embeddings, i = block i), ascending, last = final layer.
    pub layers: Vec<usize>,
    pub d: usize,
    pub positions: Positions,
    pub examples: Vec<ExampleFeatures>,
}

impl FeatureSet {
    pub fn num_loss_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.loss.iter().filter(|&&l| l).count()).sum()
    }

    /// Index of the final layer (the one the frozen head reads) among the stored layers.
    pub fn last_layer_index(&self) -> Result<usize> {
        let last = *self.layers.last().ok_or_else(|| ModelError::InvalidInput("empty feature set".into()))?;
        self.layer_index(last)
    }

    pub fn layer_index(&self, layer: usize) -> Result<usize> {
        self.layers.iter().position(|&l| l == layer).ok_or_else(|| ModelError::InvalidInput(format!("features lack layer {layer}")))
    }

    /// Builds an example's features from the per-layer hidden states `[layers][pos][d]`
    /// returned by a backbone (locally or over the network), validating every size.
    pub fn example_from_states(&self, ex: &TokenizedExample, states: &[Vec<f32>]) -> Result<ExampleFeatures> {
        let range = self.positions.range(ex);
        let n = range.len();
        if states.len() != self.layers.len() || states.iter().any(|s| s.len() != n * self.d) {
            return Err(ModelError::InvalidInput(format!("expected {} layers x {n} positions x {} values", self.layers.len(), self.d)));
        }
        if states.iter().flatten().any(|v| !v.is_finite()) {
            return Err(ModelError::InvalidInput("features contain NaN or infinite values".into()));
        }
        let (l, d) = (self.layers.len(), self.d);
        let mut feats = vec![0.0; n * l * d];
        for (k, s) in states.iter().enumerate() {
            for p in 0..n {
                feats[(p * l + k) * d..(p * l + k + 1) * d].copy_from_slice(&s[p * d..(p + 1) * d]);
            }
        }
        let loss_from = ex.reply_start - 1;
        Ok(ExampleFeatures {
            first: range.start,
            targets: range.clone().map(|j| ex.ids[j + 1]).collect(),
            loss: range.map(|j| j >= loss_from).collect(),
            feats,
        })
    }
}

/// Runs `backbone` over `examples` (a few at a time) and keeps the requested layers at the
/// positions the side variant needs.
pub fn extract_features(backbone: &Backbone, examples: &[TokenizedExample], layers: &[usize], positions: Positions, batch: usize) -> Result<FeatureSet> {
    backbone.check_taps(layers)?;
    let mut set = FeatureSet { layers: layers.to_vec(), d: backbone.config.hidden_size, positions, examples: vec![] };
    for chunk in examples.chunks(batch.max(1)) {
        let tb = TokenBatch::new(chunk.iter().map(|e| e.ids.clone()).collect(), &backbone.config, 0)?;
        let out = backbone.forward(&tb, layers, false, None);
        let taps: Vec<Vec<f32>> = out.taps.into_iter().map(to_vec).collect();
        let (t, d) = (tb.max_len, set.d);
        for (b, ex) in chunk.iter().enumerate() {
            let range = positions.range(ex);
            let states: Vec<Vec<f32>> = taps.iter().map(|tap| tap[(b * t + range.start) * d..(b * t + range.end) * d].to_vec()).collect();
            let f = set.example_from_states(ex, &states)?;
            set.examples.push(f);
        }
    }
    Ok(set)
}
