//! `model import`: a LLaMA-architecture GGUF file turned into an HF checkpoint directory
//! (`config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that the rest of the project loads like any HF download.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value as Json, json};

use super::file::{GgufFile, TensorInfo, Value};
use crate::backbone::WeightDtype;
use crate::backbone::checkpoint::{encode_tensor, expected_tensors, write_encoded};
use crate::backbone::layout::{EMBED, FINAL_NORM, LM_HEAD, Norm, Proj};
use crate::config::BackboneConfig;
use crate::error::{ModelError, Result, io_err};

/// What an import did, printed by the CLI as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub name: Option<String>,
    pub tensors: usize,
    pub parameters: usize,
    /// ggml type of the source tensors -> how many.
    pub source_types: BTreeMap<String, usize>,
    pub dtype: String,
    pub weights_bytes: u64,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub chat_template: bool,
}

/// The HF name of a GGUF tensor of the llama architecture.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some(EMBED),
        "output_norm.weight" => Some(FINAL_NORM),
        "output.weight" => Some(LM_HEAD),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let proj = |p: Proj| Some(p.name(layer));
    match part {
        "attn_q.weight" => proj(Proj::Q),
        "attn_k.weight" => proj(Proj::K),
        "attn_v.weight" => proj(Proj::V),
        "attn_output.weight" => proj(Proj::O),
        "ffn_gate.weight" => proj(Proj::Gate),
        "ffn_up.weight" => proj(Proj::Up),
        "ffn_down.weight" => proj(Proj::Down),
        "attn_norm.weight" => Some(Norm::Input.name(layer)),
        "ffn_norm.weight" => Some(Norm::PostAttention.name(layer)),
        _ => None,
    }
}

/// Undoes llama.cpp's q/k row permutation. Its converter reorders each head's rows from HF's
/// rotate-half layout (row `a * half + j`, `a` in {0, 1}) to interleaved pairs (row `2 j + a`)
/// for its own RoPE kernel; we rotate halves, as HF does.
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for a in 0..2 {
            for j in 0..half {
                let src = (h * head_dim + 2 * j + a) * cols;
                let dst = (h * head_dim + a * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn meta_u64(g: &GgufFile, key: &str) -> Result<Option<u64>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad(g, format!("'{key}' is not an integer: {v:?}"))),
    }
}

fn need_u64(g: &GgufFile, key: &str) -> Result<u64> {
    meta_u64(g, key)?.ok_or_else(|| bad(g, format!("metadata key '{key}' is missing")))
}

/// An f32 value as the shortest decimal that rounds to it (1e-5, not 9.9999997e-6), which is
/// what the converter was given.
fn meta_f64(g: &GgufFile, key: &str) -> Option<f64> {
    match g.get(key)? {
        Value::F32(v) => v.to_string().parse().ok(),
        v => v.as_f64(),
    }
}

fn bad(g: &GgufFile, message: String) -> ModelError {
    ModelError::Checkpoint { path: g.path.clone(), message }
}

/// HF `config.json` from the `llama.*` metadata; validated by [`BackboneConfig::from_json`].
fn config_json(g: &GgufFile, vocab_size: usize, tied: bool) -> Result<Json> {
    let heads = need_u64(g, "llama.attention.head_count")?;
    let hidden = need_u64(g, "llama.embedding_length")?;
    let head_dim = match meta_u64(g, "llama.attention.key_length")? {
        Some(k) => k,
        None => meta_u64(g, "llama.rope.dimension_count")?.unwrap_or(hidden / heads.max(1)),
    };
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": need_u64(g, "llama.feed_forward_length")?,
        "num_hidden_layers": need_u64(g, "llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_u64(g, "llama.attention.head_count_kv")?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta_f64(g, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": meta_f64(g, "llama.rope.freq_base").unwrap_or(10000.0),
        "max_position_embeddings": need_u64(g, "llama.context_length")?,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    match g.get("llama.rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = meta_f64(g, "llama.rope.scaling.factor").ok_or_else(|| bad(g, "linear rope scaling without llama.rope.scaling.factor".into()))?;
            c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some(other) => return Err(bad(g, format!("rope scaling '{other}' is not supported (linear only)"))),
    }
    if let Some(b) = meta_u64(g, "tokenizer.ggml.bos_token_id")? {
        c["bos_token_id"] = b.into();
    }
    let eos = eos_ids(g)?;
    if !eos.is_empty() {
        c["eos_token_id"] = if eos.len() == 1 { eos[0].into() } else { eos.clone().into() };
    }
    BackboneConfig::from_json(&c.to_string())?;
    Ok(c)
}

/// End-of-sequence ids: `eos_token_id`, then `eot_token_id` (end of turn) when it differs.
fn eos_ids(g: &GgufFile) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = meta_u64(g, key)?
            && !ids.contains(&(id as u32))
        {
            ids.push(id as u32);
        }
    }
    Ok(ids)
}

/// Every tensor of the file mapped to its HF name; errors name what is foreign or missing.
fn map_tensors<'a>(g: &'a GgufFile, cfg: &BackboneConfig) -> Result<Vec<(&'a TensorInfo, String)>> {
    let mut mapped = Vec::new();
    let mut foreign = Vec::new();
    for t in &g.tensors {
        match hf_name(&t.name) {
            Some(n) => mapped.push((t, n)),
            None if t.name == "rope_freqs.weight" => {
                return Err(bad(g, "rope_freqs.weight (LLaMA 3.1 rope scaling) is not supported yet".into()));
            }
            None => foreign.push(t.name.clone()),
        }
    }
    if !foreign.is_empty() {
        return Err(bad(g, format!("tensors foreign to the llama architecture: {}", foreign.join(", "))));
    }
    let expected = expected_tensors(cfg);
    for (name, shape, _) in &expected {
        match mapped.iter().find(|(_, n)| n == name) {
            None => return Err(bad(g, format!("tensor for '{name}' is missing"))),
            Some((t, _)) if &t.shape() != shape => {
                return Err(ModelError::ShapeMismatch { name: t.name.clone(), expected: shape.clone(), found: t.shape() });
            }
            Some(_) => {}
        }
    }
    if let Some((t, n)) = mapped.iter().find(|(_, n)| !expected.iter().any(|(e, _, _)| e == n)) {
        return Err(bad(g, format!("tensor '{}' ({n}) does not fit a {}-layer model", t.name, cfg.num_layers)));
    }
    Ok(mapped)
}

fn write_json(dir: &Path, file: &str, v: &Json) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(v).expect("json")).map_err(io_err(&path))
}

/// Imports `gguf` into `out` (created if needed), storing weights as `dtype`.
pub fn import_gguf(gguf: &Path, out: &Path, dtype: WeightDtype) -> Result<ImportReport> {
    let g = GgufFile::open(gguf)?;
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("");
    if arch != "llama" {
        return Err(ModelError::UnsupportedArchitecture(format!("GGUF general.architecture '{arch}'; only 'llama' (LLaMA-family decoders) is supported")));
    }
    let tokenizer = super::vocab::tokenizer_json(&g).map_err(|m| bad(&g, m))?;
    let vocab_size = tokenizer["model"]["vocab"].as_object().map_or(0, |v| v.len());
    let tied = g.tensor("output.weight").is_none();
    let config = config_json(&g, vocab_size, tied)?;
    let cfg = BackboneConfig::from_json(&config.to_string())?;
    let mapped = map_tensors(&g, &cfg)?;

    let mut source_types = BTreeMap::new();
    let mut encoded = Vec::with_capacity(mapped.len());
    for (t, name) in &mapped {
        *source_types.entry(format!("{:?}", t.ty)).or_insert(0) += 1;
        let mut values = g.tensor_f32(t)?;
        if let Some(bad_at) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(&g, format!("tensor '{}' holds a non-finite value at {bad_at}", t.name)));
        }
        let shape = t.shape();
        if name.ends_with(Proj::Q.suffix()) {
            values = unpermute_rows(&values, cfg.num_heads, shape[1]);
        } else if name.ends_with(Proj::K.suffix()) {
            values = unpermute_rows(&values, cfg.num_kv_heads, shape[1]);
        }
        encoded.push(encode_tensor(name.clone(), shape, &values, dtype));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_encoded(&out.join("model.safetensors"), encoded, dtype)?;
    let mut config = config;
    config["torch_dtype"] = dtype.torch_name().into();
    write_json(out, "config.json", &config)?;
    write_json(out, "tokenizer.json", &tokenizer)?;
    let mut generation = json!({});
    for key in ["bos_token_id", "eos_token_id"] {
        if let Some(v) = config.get(key) {
            generation[key] = v.clone();
        }
    }
    write_json(out, "generation_config.json", &generation)?;
    let chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str);
    write_json(out, "tokenizer_config.json", &tokenizer_config(&g, &tokenizer, chat_template, &cfg)?)?;
    let weights_bytes = std::fs::metadata(out.join("model.safetensors")).map_err(io_err(out))?.len();
    Ok(ImportReport {
        name: g.get("general.name").and_then(Value::as_str).map(String::from),
        tensors: mapped.len(),
        parameters: cfg.num_params(),
        source_types,
        dtype: dtype.torch_name().into(),
        weights_bytes,
        vocab_size,
        bos_token_id: cfg.bos_token_id,
        eos_token_ids: cfg.eos_token_ids.clone(),
        chat_template: chat_template.is_some(),
    })
}

/// `tokenizer_config.json`: the special tokens by content, BOS handling and the chat template.
fn tokenizer_config(g: &GgufFile, tokenizer: &Json, chat_template: Option<&str>, cfg: &BackboneConfig) -> Result<Json> {
    let content = |id: Option<u32>| -> Option<String> {
        let id = id?;
        let vocab = tokenizer["model"]["vocab"].as_object()?;
        vocab.iter().find(|(_, v)| v.as_u64() == Some(id as u64)).map(|(k, _)| k.clone())
    };
    let mut c = json!({
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        "add_eos_token": g.get("tokenizer.ggml.add_eos_token").and_then(Value::as_bool).unwrap_or(false),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(b) = content(cfg.bos_token_id) {
        c["bos_token"] = b.into();
    }
    if let Some(e) = content(cfg.eos_token_ids.first().copied()) {
        c["eos_token"] = e.into();
    }
    if let Some(p) = content(meta_u64(g, "tokenizer.ggml.padding_token_id")?.map(|p| p as u32)) {
        c["pad_token"] = p.into();
    }
    if let Some(t) = chat_template {
        c["chat_template"] = t.into();
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute`, written from its definition, undone by ours.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, head_dim, cols) = (3, 8, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        // reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2): row (h, j, a) <- (h, a, j).
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for j in 0..head_dim / 2 {
                for a in 0..2 {
                    let dst = (h * head_dim + j * 2 + a) * cols;
                    let src = (h * head_dim + a * head_dim / 2 + j) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
    }

    #[test]
    fn maps_llama_names() {
        assert_eq!(hf_name("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
    }
}
