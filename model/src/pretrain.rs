//! Pretraining a small LLaMA-architecture backbone from scratch on a character-level
//! corpus: random windows, AdamW with warmup + cosine decay, periodic held-out loss, the
//! best checkpoint kept in HF layout (so the normal loader reads it back).
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, WeightDtype, save_backbone};
use crate::config::{BackboneConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context: usize,
    pub batch: usize,
    pub steps: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    /// Residual and embedding dropout while training (the backbone serves without it).
    pub dropout: f64,
    pub eval_every: usize,
    /// Windows averaged for each held-out evaluation.
    pub eval_windows: usize,
    pub seed: u64,
    pub save_dtype_f16: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            intermediate: 688,
            context: 256,
            batch: 16,
            steps: 3000,
            lr: 2e-3,
            warmup: 100,
            weight_decay: 0.1,
            dropout: 0.1,
            eval_every: 250,
            eval_windows: 64,
            seed: 1,
            save_dtype_f16: true,
        }
    }
}

#[derive(Clone, Debug)]
pub enum PretrainEvent {
    Start { total_steps: usize },
    Step { step: usize, loss: f32, lr: f64 },
    Eval { step: usize, train_loss: f32, val_loss: f32 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PretrainReport {
    pub params: usize,
    pub train_chars: usize,
    pub val_chars: usize,
    pub steps: usize,
    pub tokens_seen: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub best_val_loss: f32,
    pub best_step: usize,
    pub evals: Vec<(usize, f32, f32)>,
}

fn lr_at(cfg: &PretrainConfig, step: usize) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let p = (step - cfg.warmup) as f64 / (cfg.steps - cfg.warmup).max(1) as f64;
    let min = 0.1 * cfg.lr;
    min + 0.5 * (cfg.lr - min) * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
}

/// `[B, T+1]` windows starting at the given offsets: inputs are `[.., :T]`, targets `[.., 1:]`.
fn windows(ids: &[u32], starts: &[usize], t: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let b = starts.len();
    let mut x = Vec::with_capacity(b * t);
    let mut y = Vec::with_capacity(b * t);
    for &s in starts {
        x.extend(ids[s..s + t].iter().map(|&v| v as i64));
        y.extend(ids[s + 1..s + t + 1].iter().map(|&v| v as i64));
    }
    (Tensor::from_data(TensorData::new(x, [b, t]), device), Tensor::from_data(TensorData::new(y, [b, t]), device))
}

fn lm_loss(bb: &Backbone, x: Tensor<2, Int>, y: Tensor<2, Int>) -> Tensor<1> {
    let out = bb.forward_ids(x, &[], true, None);
    let lp = log_softmax(out.logits.expect("asked for logits"), 2);
    lp.gather(2, y.unsqueeze_dim(2)).mean().neg()
}

/// Mean loss (nats/token) of `bb` on fixed, evenly spaced windows of `ids`.
pub fn windowed_loss(bb: &Backbone, ids: &[u32], t: usize, n_windows: usize, batch: usize) -> f32 {
    // A window is t inputs and their t next tokens.
    if ids.len() < t + 1 || t == 0 {
        return f32::NAN;
    }
    let span = ids.len() - t - 1;
    let starts: Vec<usize> = (0..n_windows).map(|i| i * span / n_windows.max(1)).collect();
    let mut total = 0.0;
    for chunk in starts.chunks(batch) {
        let (x, y) = windows(ids, chunk, t, &bb.device);
        total += lm_loss(bb, x, y).into_scalar::<f32>() * chunk.len() as f32;
    }
    total / starts.len() as f32
}

/// The backbone pretraining starts from: `init` (its vocabulary must be the tokenizer's), or
/// random weights of `cfg`'s shape.
fn start_model(tokenizer: &Tokenizer, cfg: &PretrainConfig, init: Option<&Backbone>, device: &Device) -> Result<Backbone> {
    let config = BackboneConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: cfg.hidden,
        intermediate_size: cfg.intermediate,
        num_layers: cfg.layers,
        num_heads: cfg.heads,
        num_kv_heads: cfg.kv_heads,
        head_dim: cfg.hidden / cfg.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: cfg.context,
        tie_word_embeddings: false,
        // The vocabulary is ours (char_level_json, or an earlier run's): its specials are too.
        bos_token_id: tokenizer.token_to_id(crate::tokenizer::BOS),
        eos_token_ids: tokenizer.token_to_id(crate::tokenizer::EOS).into_iter().collect(),
    };
    // Round-trip through HF JSON so every config we write is one the loader accepts.
    let config = BackboneConfig::from_json(&config.to_hf_json().to_string())?;
    Ok(match init {
        Some(bb) if bb.config.vocab_size != tokenizer.vocab_size() => {
            return Err(ModelError::InvalidInput(format!("initial backbone has {} tokens, the tokenizer {}", bb.config.vocab_size, tokenizer.vocab_size())));
        }
        Some(bb) => Backbone::from_parts(bb.config.clone(), bb.net.clone(), device),
        None => Backbone::init_random(config, cfg.seed, device),
    })
}

/// Pretrains on `train_text`, evaluating on `val_text`, and writes the best checkpoint (HF
/// layout plus `tokenizer.json` and `pretrain.json`) to `out`. With `init`, training continues
/// from that backbone (its architecture wins over `cfg`'s; its vocabulary must be the
/// tokenizer's), so a long run can be spread over several sessions.
#[allow(clippy::too_many_arguments)]
pub fn pretrain(
    tokenizer: &Tokenizer,
    tokenizer_json: &str,
    train_text: &str,
    val_text: &str,
    cfg: &PretrainConfig,
    init: Option<&Backbone>,
    device: &Device,
    out: &Path,
    on_event: &mut dyn FnMut(PretrainEvent),
) -> Result<PretrainReport> {
    let train = tokenizer.encode(train_text)?;
    let val = tokenizer.encode(val_text)?;
    if train.len() <= cfg.context + 1 || val.len() <= cfg.context + 1 {
        return Err(ModelError::Data("corpus too small for the context length".into()));
    }
    if cfg.steps == 0 || cfg.batch == 0 || cfg.eval_every == 0 {
        return Err(ModelError::InvalidInput("steps, batch and eval_every must be > 0".into()));
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return Err(ModelError::InvalidInput(format!("dropout {} outside [0, 1)", cfg.dropout)));
    }
    let init = start_model(tokenizer, cfg, init, device)?;
    let config = init.config.clone();
    if cfg.context > config.max_position_embeddings {
        return Err(ModelError::InvalidInput(format!("context {} exceeds the backbone's {}", cfg.context, config.max_position_embeddings)));
    }
    let ad = device.clone().autodiff();
    let mut net = init.net.clone().fork(&ad).train();
    let rope_ad = crate::backbone::rope::Rope::new(&config, &ad);
    let mut optim = AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32).with_grad_clipping(Some(GradientClippingConfig::Norm(1.0))).init();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut report =
        PretrainReport { params: config.num_params(), train_chars: train.len(), val_chars: val.len(), best_val_loss: f32::INFINITY, ..Default::default() };
    on_event(PretrainEvent::Start { total_steps: cfg.steps });
    let started = Instant::now();
    let mut recent = Vec::new();
    for step in 0..cfg.steps {
        let starts: Vec<usize> = (0..cfg.batch).map(|_| rng.random_range(0..train.len() - cfg.context - 1)).collect();
        let (x, y) = windows(&train, &starts, cfg.context, &ad);
        let bb = Backbone { config: config.clone(), net: net.clone(), rope: rope_ad.clone(), device: ad.clone(), dropout: cfg.dropout };
        let loss = lm_loss(&bb, x, y);
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(ModelError::Data(format!("pretraining diverged at step {step}")));
        }
        let lr = lr_at(cfg, step);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(lr, net, grads);
        report.steps = step + 1;
        report.tokens_seen += cfg.batch * cfg.context;
        recent.push(value);
        on_event(PretrainEvent::Step { step, loss: value, lr });
        if (step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps {
            let eval_bb = Backbone::from_parts(config.clone(), net.clone().valid().fork(device), device);
            let val_loss = windowed_loss(&eval_bb, &val, cfg.context, cfg.eval_windows, cfg.batch);
            let train_loss = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
            report.evals.push((step + 1, train_loss, val_loss));
            on_event(PretrainEvent::Eval { step: step + 1, train_loss, val_loss });
            if val_loss < report.best_val_loss {
                report.best_val_loss = val_loss;
                report.best_step = step + 1;
                let dtype = if cfg.save_dtype_f16 { WeightDtype::F16 } else { WeightDtype::F32 };
                save_backbone(&eval_bb, out, dtype)?;
                std::fs::write(out.join("tokenizer.json"), tokenizer_json).map_err(crate::error::io_err(out))?;
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.tokens_per_second = report.tokens_seen as f64 / report.seconds;
    let path = out.join("pretrain.json");
    let text = serde_json::json!({ "config": cfg, "report": report });
    std::fs::write(&path, serde_json::to_string_pretty(&text).expect("json")).map_err(crate::error::io_err(&path))?;
    Ok(report)
}
