//! The GGUF reader and importer on files these tests write themselves: every ggml type
//! against gguf-py's dequantization (tests/fixtures/gguf-quants), and a whole LLaMA
//! checkpoint (the tiny-llama parity fixture) written as llama.cpp would write it (q/k rows
//! permuted, GGUF names, tokenizer metadata), imported, and checked against HF's logits.
use std::path::{Path, PathBuf};

use spa_model::backbone::{TokenBatch, WeightDtype, load_backbone};
use spa_model::gguf::{GgmlType, GgufFile, import_gguf};
use spa_model::tensor_util::to_vec;
use spa_model::tokenizer::{ModelTokens, Tokenizer};
use spa_model::{BackendKind, ModelError};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Metadata values the writer knows.
enum V {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF v3 file: metadata, tensor descriptors, data aligned to 32.
fn write_gguf(path: &Path, kv: &[(&str, V)], tensors: &[(String, Vec<u64>, GgmlType, Vec<u8>)]) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        match v {
            V::U32(x) => out.extend(4u32.to_le_bytes().into_iter().chain(x.to_le_bytes())),
            V::F32(x) => out.extend(6u32.to_le_bytes().into_iter().chain(x.to_le_bytes())),
            V::Bool(b) => out.extend(7u32.to_le_bytes().into_iter().chain([*b as u8])),
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            V::Strs(a) => {
                out.extend(9u32.to_le_bytes().into_iter().chain(8u32.to_le_bytes()).chain((a.len() as u64).to_le_bytes()));
                a.iter().for_each(|s| put_str(&mut out, s));
            }
            V::I32s(a) => {
                out.extend(9u32.to_le_bytes().into_iter().chain(5u32.to_le_bytes()).chain((a.len() as u64).to_le_bytes()));
                a.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + bytes.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn every_type_dequantizes_like_gguf_py() {
    let text = std::fs::read_to_string(fixtures().join("gguf-quants/reference.json")).unwrap();
    let reference: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quants.gguf");
    let mut tensors = Vec::new();
    let mut expected = Vec::new();
    for (name, r) in &reference {
        let ty = GgmlType::from_id(r["id"].as_u64().unwrap() as u32).unwrap();
        let hex = r["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let values: Vec<f32> = r["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        tensors.push((format!("t.{name}"), vec![values.len() as u64], ty, bytes));
        expected.push((format!("t.{name}"), values));
    }
    assert_eq!(tensors.len(), 13, "every supported type has a reference");
    write_gguf(&path, &[("general.architecture", V::Str("test".into()))], &tensors);
    let g = GgufFile::open(&path).unwrap();
    for (name, want) in expected {
        let got = g.tensor_f32(g.tensor(&name).unwrap()).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name}[{i}]: ours {a}, gguf-py {b}");
        }
    }
}

/// llama.cpp's converter's q/k permutation (its `permute`), applied to HF `[out, in]` rows.
fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head_dim = w.len() / cols / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..head_dim / 2 {
            for a in 0..2 {
                let dst = (h * head_dim + 2 * j + a) * cols;
                let src = (h * head_dim + a * head_dim / 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// A byte-level BPE vocabulary of `n` tokens: three control tokens, single characters, and
/// merges of the first letters.
fn tiny_vocab(n: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    let mut types = vec![3, 3, 3];
    // 'Ġ' is the byte-level form of a space.
    for c in "Ġ!,.?0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'\n".chars() {
        tokens.push(if c == '\n' { "Ċ".into() } else { c.to_string() });
        types.push(1);
    }
    let mut merges = Vec::new();
    for pair in [
        "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "a n", "r e", "o r", "Ġ w", "i s", "Ġ is", "e n", "a t", "Ġa n", "Ġan d", "Ġ o", "o u",
        "Ġ c", "Ġ b", "Ġ f", "Ġ m",
    ] {
        if tokens.len() == n {
            break;
        }
        let (a, b) = pair.split_once(' ').unwrap();
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(pair.to_string());
    }
    assert_eq!(tokens.len(), n);
    (tokens, types, merges)
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny-llama fixture as a llama.cpp GGUF, every tensor stored as `ty`.
fn tiny_llama_gguf(path: &Path, ty: GgmlType, arch: &str) {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let bytes = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (heads, kv_heads) = (u("num_attention_heads") as usize, u("num_key_value_heads") as usize);
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let mut v: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let shape = view.shape().to_vec();
        let cols = *shape.last().unwrap();
        if name.ends_with("q_proj.weight") {
            v = permute(&v, heads, cols);
        } else if name.ends_with("k_proj.weight") {
            v = permute(&v, kv_heads, cols);
        }
        let gguf_name = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        let data: Vec<u8> = match (ty, shape.len()) {
            (GgmlType::F16, 2) => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let t = if shape.len() == 2 { ty } else { GgmlType::F32 };
        tensors.push((gguf_name, shape.iter().rev().map(|&d| d as u64).collect(), t, data));
    }
    let (tokens, types, merges) = tiny_vocab(u("vocab_size") as usize);
    let kv = vec![
        ("general.architecture", V::Str(arch.into())),
        ("general.name", V::Str("tiny".into())),
        ("llama.block_count", V::U32(u("num_hidden_layers"))),
        ("llama.context_length", V::U32(u("max_position_embeddings"))),
        ("llama.embedding_length", V::U32(u("hidden_size"))),
        ("llama.feed_forward_length", V::U32(u("intermediate_size"))),
        ("llama.attention.head_count", V::U32(heads as u32)),
        ("llama.attention.head_count_kv", V::U32(kv_heads as u32)),
        ("llama.rope.freq_base", V::F32(cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32)),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str("smollm".into())),
        ("tokenizer.ggml.tokens", V::Strs(tokens)),
        ("tokenizer.ggml.token_type", V::I32s(types)),
        ("tokenizer.ggml.merges", V::Strs(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ("tokenizer.chat_template", V::Str(CHAT_TEMPLATE.into())),
    ];
    write_gguf(path, &kv, &tensors);
}

fn reference_logits() -> (Vec<u32>, Vec<f32>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-llama/reference.json")).unwrap()).unwrap();
    let ids = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let logits = v["logits"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
    (ids, logits)
}

fn max_diff_after_import(gguf: &Path, dtype: WeightDtype) -> f32 {
    let out = gguf.with_extension("hf");
    import_gguf(gguf, &out, dtype).unwrap();
    let bb = load_backbone(&out, &BackendKind::Flex.device().unwrap()).unwrap();
    let (ids, want) = reference_logits();
    let got = to_vec(bb.forward(&TokenBatch::new(vec![ids], &bb.config, 0).unwrap(), &[], true, None).logits.unwrap());
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn imported_llama_matches_hf_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_llama_gguf(&path, GgmlType::F32, "llama");
    let d = max_diff_after_import(&path, WeightDtype::F32);
    assert!(d <= 1e-4, "f32 GGUF -> f32 import: logits max abs diff {d}");

    let out = path.with_extension("hf");
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let special = ModelTokens::from_dir(&out).unwrap();
    assert_eq!(special.bos, Some(1));
    assert_eq!(special.eos, vec![2]);
    let chat = special.chat_prompt("hi").unwrap().expect("the GGUF's chat template");
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    let tok = Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let t = |s: &str| tok.token_to_id(s).unwrap();
    // Merges apply by rank ("a t" before "Ġ c"), digits split one by one, control tokens are
    // single ids.
    let plain = tok.encode("the cat is 42").unwrap();
    assert_eq!(plain, vec![t("t"), t("he"), t("Ġc"), t("at"), t("Ġis"), t("Ġ"), t("4"), t("2")]);
    assert_eq!(tok.encode("<|im_start|>the cat is 42").unwrap(), [vec![1], plain].concat());
    assert_eq!(tok.decode(&tok.encode("the cat is 42").unwrap()).unwrap(), "the cat is 42");
}

#[test]
fn half_precision_imports_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny16.gguf");
    tiny_llama_gguf(&path, GgmlType::F16, "llama");
    let d = max_diff_after_import(&path, WeightDtype::BF16);
    // f16 storage then bf16 (8 mantissa bits) on weights of std 0.15: logits move by ~1e-2.
    assert!(d <= 0.1, "f16 GGUF -> bf16 import: logits max abs diff {d}");
}

#[test]
fn foreign_and_broken_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen.gguf");
    tiny_llama_gguf(&path, GgmlType::F32, "qwen2");
    let err = import_gguf(&path, &dir.path().join("out"), WeightDtype::F32).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedArchitecture(ref m) if m.contains("qwen2")), "{err}");

    let good = dir.path().join("tiny.gguf");
    tiny_llama_gguf(&good, GgmlType::F32, "llama");
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = GgufFile::open(&cut).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    assert!(GgufFile::open(&cut).is_err());
    let mut magic = bytes.clone();
    magic[0] = b'X';
    std::fs::write(&cut, &magic).unwrap();
    assert!(GgufFile::open(&cut).unwrap_err().to_string().contains("magic"));
    // A string length beyond the file is refused before any allocation.
    let mut huge = bytes.clone();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&cut, &huge).unwrap();
    assert!(GgufFile::open(&cut).unwrap_err().to_string().contains("longer than the file"));
    assert!(matches!(GgufFile::open(&dir.path().join("absent.gguf")), Err(ModelError::Io { .. })));
}
