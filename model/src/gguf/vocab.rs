//! An HF `tokenizer.json` built from a GGUF's tokenizer metadata (`tokenizer.ggml.*`):
//! byte-level BPE from `tokens` and `merges`, control tokens as special added tokens, and the
//! pre-tokenizer that `tokenizer.ggml.pre` names, written as the HF pipeline that splits text
//! the way llama.cpp's regexes for that name do (`llama-vocab.cpp`).
use serde_json::{Value as Json, json};

use super::file::{GgufFile, Value};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// LLaMA 3's split (`llama-bpe`): case-insensitive contractions, digits in threes.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

/// The HF pre-tokenizer for a llama.cpp pre-tokenizer name, and whether BPE looks whole
/// words up before merging (`ignore_merges`, LLaMA 3), or `None` if we do not know the name.
/// `ByteLevel` with `use_regex` splits with GPT-2's regex, which llama.cpp spells out.
pub fn pre_tokenizer(pre: &str) -> Option<(Json, bool)> {
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        // llama.cpp: "\p{N}" then the GPT-2 regex. HF ships these models with Digits + ByteLevel.
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true),
            ]}),
            false,
        ),
        "gpt-2" | "gpt2" => (byte_level(false, true), false),
        "llama-bpe" | "llama3" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [
                split(LLAMA3_REGEX),
                byte_level(false, false),
            ]}),
            true,
        ),
        _ => return None,
    })
}

/// Pre-tokenizer names [`pre_tokenizer`] knows, for error messages.
pub const KNOWN_PRE: &str = "smollm, starcoder, refact, codeshell, gpt-2, llama-bpe";

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>, String> {
    let arr = g.get(key).and_then(Value::as_array).ok_or_else(|| format!("'{key}' is missing or not an array"))?;
    arr.iter().map(|v| v.as_str().map(String::from).ok_or_else(|| format!("'{key}' holds a non-string"))).collect()
}

/// `tokenizer.json` for a GGUF whose `tokenizer.ggml.model` is `gpt2` (byte-level BPE).
pub fn tokenizer_json(g: &GgufFile) -> Result<Json, String> {
    let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model '{model}' is not supported: only byte-level BPE ('gpt2') is; \
             for a SentencePiece model ('llama') import its HF directory instead"
        ));
    }
    // llama.cpp's "default" (also used when the key is absent) is a four-regex chain no HF
    // tokenizer ships; we refuse it rather than tokenize differently.
    let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let (pre, ignore_merges) = pre_tokenizer(pre_name).ok_or_else(|| format!("pre-tokenizer '{pre_name}' is not supported (known: {KNOWN_PRE})"))?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.clone(), id.into()).is_some() {
            return Err(format!("token '{tok}' appears twice in the vocabulary"));
        }
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == CONTROL}));
        }
    }
    for m in &merges {
        let mut parts = m.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("merge '{m}' is not two tokens separated by one space"));
        };
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            return Err(format!("merge '{m}' names a token outside the vocabulary"));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": byte_level(true, true),
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        }
    }))
}
