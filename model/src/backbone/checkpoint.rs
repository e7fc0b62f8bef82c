//! Reading and writing HF-layout checkpoints: `config.json` + `model.safetensors` (or a
//! sharded `model.safetensors.index.json`). All name and layout mapping lives here: HF
//! stores linear weights `[out, in]`, our `Linear` keeps `[in, out]`.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::attention::SelfAttention;
use super::block::DecoderLayer;
use super::layers::{Embedding, Linear, RmsNorm};
use super::llama::{Backbone, LlamaForCausalLM, LlamaModel};
use super::mlp::Mlp;
use crate::config::BackboneConfig;
use crate::error::{ModelError, Result, io_err};
use crate::tensor_util::to_vec as tensor_values;

/// How a checkpoint tensor is laid out relative to ours.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Layout {
    /// HF `[out, in]`, ours `[in, out]`.
    LinearTransposed,
    AsIs,
}

/// Every tensor a LLaMA checkpoint must provide, with its HF shape.
pub(crate) fn expected_tensors(c: &BackboneConfig) -> Vec<(String, Vec<usize>, Layout)> {
    let d = c.hidden_size;
    let (qd, kvd, ff) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, d], Layout::AsIs)];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let lin = Layout::LinearTransposed;
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, d], lin));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, d], lin));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, d], lin));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, qd], lin));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, d], lin));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![ff, d], lin));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, ff], lin));
        v.push((format!("{p}.input_layernorm.weight"), vec![d], Layout::AsIs));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d], Layout::AsIs));
    }
    v.push(("model.norm.weight".into(), vec![d], Layout::AsIs));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, d], Layout::LinearTransposed));
    }
    v
}

/// Names a checkpoint may carry that we ignore on purpose.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight"
}

/// The safetensors files of a checkpoint directory, sharded or not.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::MissingFile {
            path: single,
            hint: "expected model.safetensors or model.safetensors.index.json",
        });
    }
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Checkpoint { path: index.clone(), message: e.to_string() })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Checkpoint {
        path: index.clone(),
        message: "no weight_map".into(),
    })?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let chunks = |w: usize| bytes.chunks_exact(w);
    Ok(match dtype {
        Dtype::F32 => chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(ModelError::WrongDtype { name: name.into(), dtype: format!("{other:?}") }),
    })
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Loads `dir` (HF layout) onto `device`. Errors name the missing file, the missing or
/// misshapen tensor, or the unsupported dtype.
pub fn load_backbone(dir: &Path, device: &Device) -> Result<Backbone> {
    let config = BackboneConfig::from_file(&dir.join("config.json"))?;
    let expected = expected_tensors(&config);
    let wanted: HashMap<&str, (&Vec<usize>, Layout)> =
        expected.iter().map(|(n, s, l)| (n.as_str(), (s, *l))).collect();
    let mut found: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    let mut unexpected = Vec::new();
    for file in weight_files(dir)? {
        let bytes = std::fs::read(&file).map_err(io_err(&file))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::Checkpoint { path: file.clone(), message: e.to_string() })?;
        for (name, view) in st.tensors() {
            let Some((shape, layout)) = wanted.get(name.as_str()) else {
                if !ignorable(&name) {
                    unexpected.push(name);
                }
                continue;
            };
            if view.shape() != shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    name,
                    expected: shape.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
            let mut values = to_f32(&name, view.dtype(), view.data())?;
            if *layout == Layout::LinearTransposed {
                values = transpose(&values, shape[0], shape[1]);
            }
            found.insert(name, (shape.to_vec(), values));
        }
    }
    if let Some((missing, _, _)) = expected.iter().find(|(n, _, _)| !found.contains_key(n)) {
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("tensor '{missing}' is missing"),
        });
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("unexpected tensors for a LLaMA decoder: {}", unexpected.join(", ")),
        });
    }
    let mut take = |name: &str| found.remove(name).expect("checked above");
    let c = &config;
    let linear = |(shape, v): (Vec<usize>, Vec<f32>)| Linear::from_data(shape[1], shape[0], v, device);
    let norm = |(shape, v): (Vec<usize>, Vec<f32>)| RmsNorm {
        weight: Param::from_data(TensorData::new(v, shape), device),
        eps: c.rms_norm_eps,
    };
    let layers = (0..c.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            DecoderLayer {
                self_attn: SelfAttention {
                    q_proj: linear(take(&format!("{p}.self_attn.q_proj.weight"))),
                    k_proj: linear(take(&format!("{p}.self_attn.k_proj.weight"))),
                    v_proj: linear(take(&format!("{p}.self_attn.v_proj.weight"))),
                    o_proj: linear(take(&format!("{p}.self_attn.o_proj.weight"))),
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: linear(take(&format!("{p}.mlp.gate_proj.weight"))),
                    up_proj: linear(take(&format!("{p}.mlp.up_proj.weight"))),
                    down_proj: linear(take(&format!("{p}.mlp.down_proj.weight"))),
                },
                input_layernorm: norm(take(&format!("{p}.input_layernorm.weight"))),
                post_attention_layernorm: norm(take(&format!("{p}.post_attention_layernorm.weight"))),
            }
        })
        .collect();
    let (eshape, ev) = take("model.embed_tokens.weight");
    let embed_tokens = Embedding { weight: Param::from_data(TensorData::new(ev, eshape), device) };
    let lm_head = (!c.tie_word_embeddings).then(|| linear(take("lm_head.weight")));
    let net = LlamaForCausalLM {
        model: LlamaModel { embed_tokens, layers, norm: norm(take("model.norm.weight")) },
        lm_head,
    };
    Ok(Backbone::from_parts(config, net, device))
}

/// Storage precision of a checkpoint we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    /// Half the bytes; what the shipped default backbone uses.
    F16,
    /// Half the bytes, f32's range (HF's usual release dtype).
    BF16,
}

impl SaveDtype {
    /// The `torch_dtype` name HF's config.json uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }
}

/// Writes `config.json` and `model.safetensors` in HF layout (the tokenizer is the caller's).
pub fn save_backbone(backbone: &Backbone, dir: &Path, dtype: SaveDtype) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let c = &backbone.config;
    let net = &backbone.net;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let put_linear = |name: String, l: &Linear, t: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>| {
        let [din, dout] = l.weight.val().dims();
        t.insert(name, (vec![dout, din], transpose(&tensor_values(l.weight.val()), din, dout)));
    };
    let put = |name: String, w: &Param<Tensor<1>>, t: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>| {
        let v = tensor_values(w.val());
        t.insert(name, (vec![v.len()], v));
    };
    let emb = net.model.embed_tokens.weight.val();
    let eshape = emb.dims().to_vec();
    tensors.insert("model.embed_tokens.weight".into(), (eshape, tensor_values(emb)));
    for (i, layer) in net.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &layer.self_attn;
        put_linear(format!("{p}.self_attn.q_proj.weight"), &a.q_proj, &mut tensors);
        put_linear(format!("{p}.self_attn.k_proj.weight"), &a.k_proj, &mut tensors);
        put_linear(format!("{p}.self_attn.v_proj.weight"), &a.v_proj, &mut tensors);
        put_linear(format!("{p}.self_attn.o_proj.weight"), &a.o_proj, &mut tensors);
        put_linear(format!("{p}.mlp.gate_proj.weight"), &layer.mlp.gate_proj, &mut tensors);
        put_linear(format!("{p}.mlp.up_proj.weight"), &layer.mlp.up_proj, &mut tensors);
        put_linear(format!("{p}.mlp.down_proj.weight"), &layer.mlp.down_proj, &mut tensors);
        put(format!("{p}.input_layernorm.weight"), &layer.input_layernorm.weight, &mut tensors);
        put(format!("{p}.post_attention_layernorm.weight"), &layer.post_attention_layernorm.weight, &mut tensors);
    }
    put("model.norm.weight".into(), &net.model.norm.weight, &mut tensors);
    if let Some(head) = &net.lm_head {
        put_linear("lm_head.weight".into(), head, &mut tensors);
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, dtype)?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&c.to_hf_json()).expect("json");
    std::fs::write(&cfg_path, text).map_err(io_err(&cfg_path))
}

/// Serialises named f32 tensors as safetensors (f32, f16 or bf16 on disk).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    dtype: SaveDtype,
) -> Result<()> {
    let encoded = tensors.iter().map(|(n, (s, v))| encode_tensor(n.clone(), s.clone(), v, dtype)).collect();
    write_encoded(path, encoded, dtype)
}

/// A named tensor as its little-endian bytes in `dtype`, ready for [`write_encoded`].
pub(crate) fn encode_tensor(name: String, shape: Vec<usize>, values: &[f32], dtype: SaveDtype) -> (String, Vec<usize>, Vec<u8>) {
    let bytes = match dtype {
        SaveDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SaveDtype::F16 => values.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        SaveDtype::BF16 => values.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
    };
    (name, shape, bytes)
}

/// Writes tensors encoded by [`encode_tensor`] with the same `dtype` as one safetensors file.
pub(crate) fn write_encoded(path: &Path, encoded: Vec<(String, Vec<usize>, Vec<u8>)>, dtype: SaveDtype) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(dtype.safetensors(), s.clone(), b).expect("consistent view");
            (n.clone(), view)
        })
        .collect();
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, meta, path)
        .map_err(|e| ModelError::Checkpoint { path: path.to_path_buf(), message: e.to_string() })
}
