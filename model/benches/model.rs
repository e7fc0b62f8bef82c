//! Model hot paths, measured in one run so that ratios are meaningful on a noisy machine:
//! - a plain 1024^2 f32 matmul (the machine's practical peak, the baseline of every ratio);
//! - backbone prefill and per-token decode (KV cache) at two sizes;
//! - one side-plugin training pass (mlp and ladder) as achieved FLOP/s;
//! - side FLOPs per token as a fraction of the backbone's (analytic, several LLaMA shapes).
//!
//! Every figure is the median of several repetitions. Run:
//!   cargo bench -p spa-model --bench model [-- flex|ndarray ... backbone|side|side-mlp|side-ladder|linear|pretrain|flops ...]
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use spa_model::backbone::{TokenBatch, load_backbone};
use spa_model::data::synthetic::synthetic_users;
use spa_model::features::{extract_features, tokenize_examples};
use spa_model::side::{FrozenHead, Plugin, SideConfig, SideVariant};
use spa_model::tensor_util::to_vec;
use spa_model::tokenizer::Tokenizer;
use spa_model::train::{TrainConfig, train_plugin};
use spa_model::{Backbone, BackboneConfig, BackendKind};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn matmul_gflops(device: &Device, n: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let s = time(9, || {
        let c = a.clone().matmul(b.clone());
        std::hint::black_box(to_vec(c.slice([0..1, 0..1])));
    });
    2.0 * (n * n * n) as f64 / s / 1e9
}

fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shakespeare-char")
}

/// A larger backbone of the same family (random weights: speed does not depend on them).
fn medium(device: &Device) -> Backbone {
    let json = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":68,
        "hidden_size":512,"intermediate_size":1376,"num_hidden_layers":8,"num_attention_heads":8,
        "num_key_value_heads":4,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":10000.0,
        "max_position_embeddings":256,"tie_word_embeddings":false,"hidden_act":"silu"}"#;
    Backbone::init_random(BackboneConfig::from_json(json).expect("config"), 0, device)
}

fn bench_backbone(name: &str, bb: &Backbone, peak: f64) {
    let cfg = &bb.config;
    let ctx = cfg.max_position_embeddings;
    let seq: Vec<u32> = (0..ctx).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    for batch in [1usize, 8] {
        let tb = TokenBatch::new(vec![seq.clone(); batch], cfg, 0).unwrap();
        let s = time(5, || {
            let out = bb.forward(&tb, &[], true, None);
            std::hint::black_box(to_vec(out.logits.unwrap().slice([0..1, 0..1, 0..1])));
        });
        let tokens = (batch * ctx) as f64;
        // Mean attention span over a causal prefill is ctx / 2.
        let gflops = 2.0 * cfg.macs_per_token(ctx / 2) * tokens / s / 1e9;
        println!("| {name} | prefill {batch}x{ctx} | {:.1} ms | {:.0} tokens/s | {gflops:.1} GFLOP/s | {:.0}% |", s * 1e3, tokens / s, 100.0 * gflops / peak);
    }
    let (prompt, steps) = (ctx / 2, 64);
    let runs: Vec<f64> = (0..6)
        .map(|_| {
            let mut cache = bb.new_cache();
            bb.forward(&TokenBatch::new(vec![seq[..prompt].to_vec()], cfg, 0).unwrap(), &[], false, Some(&mut cache));
            let t = Instant::now();
            for i in 0..steps {
                let tb = TokenBatch::new(vec![vec![seq[prompt + i]]], cfg, cache.len()).unwrap();
                let out = bb.forward(&tb, &[], true, Some(&mut cache));
                std::hint::black_box(to_vec(out.logits.unwrap()));
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    // The first run is a warm-up.
    let per_token = median(runs[1..].to_vec()) / steps as f64;
    let gflops = 2.0 * cfg.macs_per_token(prompt + steps / 2) / per_token / 1e9;
    println!(
        "| {name} | decode 1 token at {prompt}..{} (KV cache) | {:.2} ms/token | {:.0} tokens/s | {gflops:.2} GFLOP/s | {:.1}% |",
        prompt + steps,
        per_token * 1e3,
        1.0 / per_token,
        100.0 * gflops / peak
    );
}

/// Training FLOPs per loss token, counted as model FLOPs (as MFU counts them): forward and
/// backward of the trainable side network, gate and personal head (3x their forward MACs),
/// plus the frozen head on the side state (forward and input gradient, 2x). The backbone's
/// own prediction through the head is made once per call, outside the steps: not counted.
/// The mlp step does less arithmetic than this (no input gradient for the taps or the gate).
fn train_flops_per_token(p: &Plugin, ctx: usize) -> f64 {
    let head = (p.shape.d_model * p.shape.vocab) as f64;
    2.0 * (3.0 * p.macs_per_token(ctx) + 2.0 * head)
}

fn bench_side(bb: &Backbone, peak: f64, variants: &[SideVariant]) {
    let tok = Tokenizer::from_file(&shipped_dir().join("tokenizer.json")).unwrap();
    let users = synthetic_users(4, 60, 1);
    let examples: Vec<_> = users.iter().flat_map(|u| u.train.clone()).collect();
    let ex = tokenize_examples(&tok, &examples, bb.config.max_position_embeddings).unwrap();
    let head = FrozenHead::from_backbone(bb);
    let runs = [(SideVariant::Mlp, 8), (SideVariant::Ladder, 8), (SideVariant::Ladder, 16)];
    for (variant, r) in runs.into_iter().filter(|(v, _)| variants.contains(v)) {
        let side = SideConfig { variant, reduction: r, ..SideConfig::default() };
        let plugin = Plugin::new(&side, &bb.config, &bb.device).unwrap();
        let pos = variant.positions();
        let feats = extract_features(bb, &ex, &plugin.shape.feature_layers, pos, 8).unwrap();
        let train = TrainConfig { epochs: 1, batch_tokens: 1024, batch_sequences: 8, ..TrainConfig::default() };
        let (mut tokens, mut steps) = (0, 0);
        // (whole call, steps alone): the call also computes the backbone's own predictions
        // once and copies the plugin to and from the autodiff device.
        let mut run = || {
            let t = Instant::now();
            let (_, r) = train_plugin(plugin.clone(), &head, &feats, &train, None, &mut |_| {}).unwrap();
            (tokens, steps) = (r.tokens, r.steps);
            (t.elapsed().as_secs_f64(), r.step_seconds)
        };
        run();
        // The host's speed drifts between runs: each repetition is paired with a matmul
        // measured just before it, and the ratio is the median of the pairs' ratios.
        let pairs: Vec<(f64, (f64, f64))> = (0..7).map(|_| (matmul_gflops(&bb.device, 1024), run())).collect();
        // The ladder attends over whole sequences: its per-token cost uses their mean length.
        let mean_len = feats.examples.iter().map(|e| e.len()).sum::<usize>() / feats.examples.len().max(1);
        let flops = train_flops_per_token(&plugin, mean_len) * tokens as f64;
        let ratios = pairs.iter().map(|(p, (_, s))| flops / s / 1e9 / p).collect();
        let s = median(pairs.iter().map(|(_, (_, s))| *s).collect());
        let call = median(pairs.iter().map(|(_, (c, _))| *c).collect());
        let gflops = flops / s / 1e9;
        println!(
            "| side {variant:?} r={r} | train {steps} steps, {tokens} loss tokens | {:.1} ms/step | {:.0} tokens/s | {gflops:.2} GFLOP/s | {:.1}% (median of 7 paired ratios; {:.1}% of the peak above) |",
            s * 1e3 / steps as f64,
            tokens as f64 / s,
            100.0 * median(ratios),
            100.0 * gflops / peak
        );
        println!(
            "| side {variant:?} r={r} | whole call: {steps} steps + setup | {:.1} ms | {:.1} ms/step with the setup | {:.2} GFLOP/s | {:.1}% |",
            call * 1e3,
            call * 1e3 / steps as f64,
            flops / call / 1e9,
            100.0 * flops / call / 1e9 / peak
        );
    }
}

/// `Linear::forward` flattens leading dimensions into one 2-D gemm; the alternative is a
/// batched 3-D matmul against the broadcast weight.
fn bench_linear_layout(device: &Device, peak: f64) {
    let (b, t, din, dout) = (16usize, 256usize, 256usize, 688usize);
    let x = Tensor::<3>::random([b, t, din], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<2>::random([din, dout], Distribution::Normal(0.0, 1.0), device);
    let flops = 2.0 * (b * t * din * dout) as f64;
    let flat = time(9, || {
        let y = x.clone().reshape([b * t, din]).matmul(w.clone()).reshape([b, t, dout]);
        std::hint::black_box(to_vec(y.slice([0..1, 0..1, 0..1])));
    });
    let batched = time(9, || {
        let y = x.clone().matmul(w.clone().unsqueeze::<3>());
        std::hint::black_box(to_vec(y.slice([0..1, 0..1, 0..1])));
    });
    for (name, s) in [("flattened 2-D gemm (ours)", flat), ("batched 3-D matmul", batched)] {
        println!("| linear [16,256,256]x[256,688] | {name} | {:.2} ms | | {:.1} GFLOP/s | {:.0}% |", s * 1e3, flops / s / 1e9, 100.0 * flops / s / 1e9 / peak);
    }
}

/// Pretraining steps of the shipped architecture (batch 16 x 256 tokens, forward + backward +
/// AdamW), on synthetic text: training tokens/s.
fn bench_pretrain(device: &Device, peak: f64) {
    use spa_model::pretrain::{PretrainConfig, pretrain};
    let users = synthetic_users(16, 200, 2);
    let text: String = users.iter().flat_map(|u| u.train.iter().map(|e| format!("{}{}", e.prompt, e.reply))).collect();
    let tok_json = spa_model::tokenizer::char_level_json(text.chars());
    let tok = Tokenizer::from_json(&tok_json).unwrap();
    let (train, val) = text.split_at(text.len() * 9 / 10);
    let steps = 12;
    let cfg = PretrainConfig { steps, eval_every: 1000, eval_windows: 1, warmup: 2, ..PretrainConfig::default() };
    let dir = tempfile::tempdir().unwrap();
    let r = pretrain(&tok, &tok_json, train, val, &cfg, None, device, dir.path(), &mut |_| {}).unwrap();
    let bb = load_backbone(dir.path(), device).unwrap();
    // Forward + backward = 3x the forward FLOPs; mean causal attention span = ctx / 2.
    let gflops = 3.0 * 2.0 * bb.config.macs_per_token(cfg.context / 2) * r.tokens_per_second / 1e9;
    println!(
        "| pretrain d256 L4 (dropout {}) | {steps} steps of {}x{} | {:.0} ms/step | {:.0} tokens/s | {gflops:.1} GFLOP/s | {:.0}% |",
        cfg.dropout,
        cfg.batch,
        cfg.context,
        r.seconds * 1e3 / steps as f64,
        r.tokens_per_second,
        100.0 * gflops / peak
    );
}

/// Side FLOPs per token as a fraction of the backbone's, analytic (the design's <= 5%
/// budget), for the shipped backbone and for LLaMA shapes too large to run here.
fn side_flops_table() {
    let llama = |d: usize, ff: usize, l: usize, h: usize, kv: usize| {
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":32000,"hidden_size":{d},
            "intermediate_size":{ff},"num_hidden_layers":{l},"num_attention_heads":{h},"num_key_value_heads":{kv},
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":2048,"tie_word_embeddings":false}}"#
        );
        BackboneConfig::from_json(&json).expect("config")
    };
    let shipped = BackboneConfig::from_json(&std::fs::read_to_string(shipped_dir().join("config.json")).unwrap()).unwrap();
    let backbones = [
        ("shipped d256 L4", shipped, 256),
        ("TinyLlama-1.1B shape (d2048 L22)", llama(2048, 5632, 22, 32, 4), 256),
        ("TinyLlama-1.1B shape (d2048 L22)", llama(2048, 5632, 22, 32, 4), 2048),
        ("LLaMA-7B shape (d4096 L32)", llama(4096, 11008, 32, 32, 32), 256),
        ("LLaMA-7B shape (d4096 L32)", llama(4096, 11008, 32, 32, 32), 2048),
    ];
    println!("\n## side FLOPs per token vs the backbone's (analytic; taps = every layer)\n");
    println!("| backbone | context | mlp r=8 | ladder r=8 | ladder r=16 |");
    println!("|---|---|---|---|---|");
    for (name, bb, ctx) in backbones {
        let frac = |variant, r| {
            let side = SideConfig { variant, reduction: r, ..SideConfig::default() };
            let shape = side.resolve(&bb).unwrap();
            format!("{:.2}%", 100.0 * side.macs_per_token(&shape, ctx) / bb.macs_per_token(ctx))
        };
        println!("| {name} | {ctx} | {} | {} | {} |", frac(SideVariant::Mlp, 8), frac(SideVariant::Ladder, 8), frac(SideVariant::Ladder, 16));
    }
}

fn main() {
    // As the binaries do (`spa_model::alloc`); `SPA_GLIBC_DEFAULTS=1` measures without it.
    if std::env::var_os("SPA_GLIBC_DEFAULTS").is_none() {
        spa_model::alloc::keep_freed_memory();
    }
    // Arguments: backend names (flex, ndarray; default both) and section names (backbone,
    // side (or side-mlp, side-ladder), linear, pretrain, flops; default all).
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let (backends, sections): (Vec<&String>, Vec<&String>) = args.iter().partition(|a| a.parse::<BackendKind>().is_ok());
    let kinds: Vec<BackendKind> =
        if backends.is_empty() { vec![BackendKind::Flex, BackendKind::Ndarray] } else { backends.iter().map(|n| n.parse().unwrap()).collect() };
    let on = |name: &str| sections.is_empty() || sections.iter().any(|s| s.as_str() == name);
    for kind in kinds {
        let device = kind.device().expect("backend");
        let peak = matmul_gflops(&device, 1024);
        println!("\n## backend {kind}: plain matmul 1024x1024x1024 = {peak:.1} GFLOP/s (the % column is relative to it)\n");
        println!("| model | work | median time | throughput | achieved | % of matmul |");
        println!("|---|---|---|---|---|---|");
        let shipped = load_backbone(&shipped_dir(), &device).expect("shipped backbone");
        if on("backbone") {
            bench_backbone("shipped d256 L4", &shipped, peak);
            bench_backbone("medium d512 L8", &medium(&device), peak);
        }
        let variants: Vec<SideVariant> = [(SideVariant::Mlp, "side-mlp"), (SideVariant::Ladder, "side-ladder")]
            .into_iter()
            .filter(|(_, name)| on("side") || on(name))
            .map(|(v, _)| v)
            .collect();
        if !variants.is_empty() {
            bench_side(&shipped, peak, &variants);
        }
        if on("linear") {
            bench_linear_layout(&device, peak);
        }
        if on("pretrain") {
            bench_pretrain(&device, peak);
        }
    }
    if on("side") || on("side-mlp") || on("side-ladder") || on("flops") {
        side_flops_table();
    }
}
