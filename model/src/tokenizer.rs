//! Tokenizers are HF `tokenizer.json` files read by the `tokenizers` crate, so any LLaMA
//! checkpoint's own tokenizer works. [`char_level_json`] writes the one our default backbone
//! uses: one token per character (a BPE model with no merges, which HF reads natively).
use std::path::Path;

use crate::error::{ModelError, Result};

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={})", self.vocab_size)
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "the checkpoint directory needs tokenizer.json",
            });
        }
        let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Tokenizer { message, .. } => ModelError::Tokenizer { path: path.to_path_buf(), message },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e: Box<dyn std::error::Error + Send + Sync>| ModelError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })?;
        let vocab_size = inner.get_vocab_size(true);
        let bos_id = inner.token_to_id(BOS);
        let eos_id = inner.token_to_id(EOS);
        Ok(Self { inner, vocab_size, bos_id, eos_id })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer { path: "tokenizer.json".into(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer { path: "tokenizer.json".into(), message: e.to_string() })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// A `tokenizer.json` with `<unk>`=0, `<s>`=1, `</s>`=2, then one token per character of
/// `chars` (sorted, deduplicated).
pub fn char_level_json(chars: impl IntoIterator<Item = char>) -> String {
    let mut chars: Vec<char> = chars.into_iter().collect();
    chars.sort_unstable();
    chars.dedup();
    let specials = [UNK, BOS, EOS];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + specials.len()).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let v = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": UNK, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    serde_json::to_string_pretty(&v).expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_round_trip_and_unknowns() {
        let tok = Tokenizer::from_json(&char_level_json("Hello, world!\n".chars())).unwrap();
        assert_eq!(tok.vocab_size(), 3 + 11);
        let ids = tok.encode("Hello,\nworld!").unwrap();
        assert_eq!(ids.len(), 13);
        assert_eq!(tok.decode(&ids).unwrap(), "Hello,\nworld!");
        // Characters outside the vocabulary become <unk> (id 0) and decode to nothing.
        assert_eq!(tok.encode("Hz").unwrap(), vec![tok.token_to_id("H").unwrap(), 0]);
        assert_eq!(tok.bos_id, Some(1));
        assert_eq!(tok.eos_id, Some(2));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Tokenizer::from_json("{not json").is_err());
    }
}
