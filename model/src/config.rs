//! The backbone's configuration *is* HuggingFace's `config.json` (LLaMA family), read with
//! serde defaults for optional keys, then checked and turned into [`BackboneConfig`].
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result, io_err};

/// `config.json` as HF writes it (transformers v4 and v5 spellings both accepted).
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers v4 spelling.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers v4 spelling of the scaling block.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// transformers v5 spelling: `{"rope_theta": .., "rope_type": .., ...}`.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Rotary frequency scaling variants we implement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// LLaMA 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
}

/// Validated run-time configuration of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The architecture is one we run, and every size is positive and below any released model's.
fn check_hf(hf: &HfLlamaConfig) -> Result<()> {
    let cfg_err = |message: String| ModelError::Config { path: "config.json".into(), message };
    let arch_ok = hf.architectures.iter().any(|a| a == "LlamaForCausalLM") || hf.model_type.as_deref() == Some("llama");
    if !arch_ok {
        return Err(ModelError::UnsupportedArchitecture(format!(
            "architectures={:?} model_type={:?}; only LLaMA-family decoders (LlamaForCausalLM) are supported",
            hf.architectures, hf.model_type
        )));
    }
    if let Some(act) = &hf.hidden_act
        && act != "silu"
    {
        return Err(ModelError::UnsupportedArchitecture(format!("hidden_act '{act}' (only silu)")));
    }
    if hf.attention_bias || hf.mlp_bias {
        return Err(ModelError::UnsupportedArchitecture("attention_bias / mlp_bias are not supported".into()));
    }
    let nonzero = [
        ("vocab_size", hf.vocab_size),
        ("hidden_size", hf.hidden_size),
        ("intermediate_size", hf.intermediate_size),
        ("num_hidden_layers", hf.num_hidden_layers),
        ("num_attention_heads", hf.num_attention_heads),
        ("max_position_embeddings", hf.max_position_embeddings),
    ];
    for (k, v) in nonzero {
        if v == 0 {
            return Err(cfg_err(format!("{k} must be > 0")));
        }
    }
    // Upper bounds far above any LLaMA release (Llama 3.1 405B: 126 layers, hidden 16384,
    // intermediate 53248, vocabulary 128256, context 131072). A config past them is broken
    // or hostile, and a device would try to allocate for it before anything else refused.
    let at_most = [
        ("vocab_size", hf.vocab_size, 1 << 22),
        ("hidden_size", hf.hidden_size, 1 << 16),
        ("intermediate_size", hf.intermediate_size, 1 << 18),
        ("num_hidden_layers", hf.num_hidden_layers, 1024),
        ("num_attention_heads", hf.num_attention_heads, 1024),
        ("max_position_embeddings", hf.max_position_embeddings, 1 << 21),
    ];
    for (k, v, max) in at_most {
        if v > max {
            return Err(cfg_err(format!("{k} = {v} is beyond any supported model (at most {max})")));
        }
    }
    Ok(())
}

impl BackboneConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::MissingFile { path: path.to_path_buf(), hint: "a HuggingFace checkpoint directory needs config.json" });
        }
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config { message, .. } => ModelError::Config { path: path.to_path_buf(), message },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg_err = |message: String| ModelError::Config { path: "config.json".into(), message };
        let hf: HfLlamaConfig = serde_json::from_str(text).map_err(|e| cfg_err(e.to_string()))?;
        Self::from_hf(&hf)
    }

    pub fn from_hf(hf: &HfLlamaConfig) -> Result<Self> {
        let cfg_err = |message: String| ModelError::Config { path: "config.json".into(), message };
        check_hf(hf)?;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(cfg_err(format!("num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})", hf.num_attention_heads)));
        }
        let head_dim = match hf.head_dim {
            Some(h) => h,
            None => {
                if !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
                    return Err(cfg_err("hidden_size not divisible by num_attention_heads".into()));
                }
                hf.hidden_size / hf.num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(cfg_err(format!("head_dim must be even and > 0, got {head_dim}")));
        }
        if !(hf.rms_norm_eps > 0.0 && hf.rms_norm_eps.is_finite()) {
            return Err(cfg_err("rms_norm_eps must be positive and finite".into()));
        }
        // v5 nests rope settings in rope_parameters; v4 has rope_theta + rope_scaling.
        let params = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = hf.rope_theta.or_else(|| hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10000.0);
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            return Err(cfg_err("rope_theta must be positive".into()));
        }
        let rope_scaling = parse_rope_scaling(params).map_err(cfg_err)?;
        let eos_token_ids = match &hf.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n.as_u64().ok_or_else(|| cfg_err("bad eos_token_id".into()))? as u32],
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| cfg_err("bad eos_token_id".into()))).collect::<Result<_>>()?,
            Some(other) => return Err(cfg_err(format!("bad eos_token_id {other}"))),
        };
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        })
    }

    /// HF `config.json` for a checkpoint we write (v4 spelling, which v4 and v5 both read).
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = self.eos_token_ids.first() {
            v["eos_token_id"] = (*e).into();
        }
        v
    }

    /// Parameters of the whole decoder (embedding, blocks, final norm, head).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let attn = d * self.num_heads * self.head_dim * 2 + d * self.num_kv_heads * self.head_dim * 2;
        let mlp = 3 * d * self.intermediate_size;
        let block = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_layers * block + d + head
    }

    /// Forward multiply-accumulates per token at context length `ctx` (attention included).
    pub fn macs_per_token(&self, ctx: usize) -> f64 {
        let d = self.hidden_size as f64;
        let qo = 2.0 * d * (self.num_heads * self.head_dim) as f64;
        let kv = 2.0 * d * (self.num_kv_heads * self.head_dim) as f64;
        let mlp = 3.0 * d * self.intermediate_size as f64;
        let attn = 2.0 * (self.num_heads * self.head_dim) as f64 * ctx as f64;
        self.num_layers as f64 * (qo + kv + mlp + attn) + d * self.vocab_size as f64
    }
}

fn parse_rope_scaling(params: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(p) = params else { return Ok(RopeScaling::None) };
    if p.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |k: &str| p.get(k).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling needs '{k}'"));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: f("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position: f("original_max_position_embeddings")? as usize,
        }),
        other => Err(format!("unsupported rope scaling type '{other}' (default, linear, llama3)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":64,
        "intermediate_size":160,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_parameters":{"rope_theta":50000.0,"rope_type":"default"},"rms_norm_eps":1e-5}"#;

    #[test]
    fn reads_v5_rope_parameters() {
        let c = BackboneConfig::from_json(V5).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 2);
    }

    #[test]
    fn round_trips_through_hf_json() {
        let c = BackboneConfig::from_json(V5).unwrap();
        let again = BackboneConfig::from_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn rejects_other_architectures_and_bad_heads() {
        let gpt2 = V5.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        assert!(matches!(BackboneConfig::from_json(&gpt2), Err(ModelError::UnsupportedArchitecture(_))));
        let bad = V5.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let err = BackboneConfig::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
        let scaled = V5.replace("\"rope_type\":\"default\"", "\"rope_type\":\"yarn\"");
        assert!(BackboneConfig::from_json(&scaled).unwrap_err().to_string().contains("yarn"));
    }

    /// A hostile or broken coordinator's config is refused before anything is allocated.
    #[test]
    fn rejects_sizes_beyond_any_model() {
        let huge = V5.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":1000000000");
        let err = BackboneConfig::from_json(&huge).unwrap_err().to_string();
        assert!(err.contains("num_hidden_layers") && err.contains("at most 1024"), "{err}");
        let wide = V5.replace("\"hidden_size\":64", "\"hidden_size\":1048576");
        assert!(BackboneConfig::from_json(&wide).unwrap_err().to_string().contains("hidden_size"));
    }
}
