//! `spa-coordinator model ...`: inspect, evaluate and pretrain backbones. Thin wrappers over
//! spa-model that print JSON.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use spa_model::backbone::{TokenBatch, load_backbone};
use spa_model::data::shakespeare::{parse_play_script, pretraining_text, rank_roles};
use spa_model::pretrain::{PretrainConfig, PretrainEvent, pretrain, windowed_loss};
use spa_model::tensor_util::to_vec;
use spa_model::tokenizer::{Tokenizer, char_level_json};
use spa_model::BackendKind;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Print the logits of a token sequence as JSON: {"logits": [[...], ...]}.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
    },
    /// Mean loss (nats/token) of a model on a text file, as JSON.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        /// Number of evenly spaced windows (0 = enough to cover the text once).
        #[arg(long, default_value_t = 0)]
        windows: usize,
    },
    /// Rank the speaking roles of a play-script corpus (the devices of the experiments).
    Roles {
        #[arg(long)]
        corpus: PathBuf,
        /// Skip this many top roles.
        #[arg(long, default_value_t = 0)]
        skip: usize,
        #[arg(long, default_value_t = 40)]
        take: usize,
    },
    /// Pretrain a small LLaMA-architecture backbone with a character-level tokenizer.
    Pretrain(PretrainArgs),
}

#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[arg(long)]
    corpus: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// File with one speaker name per line whose speeches are left out of pretraining.
    #[arg(long)]
    exclude_speakers: Option<PathBuf>,
    /// Fraction of the (remaining) corpus held out, from its end, for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    intermediate: usize,
    #[arg(long, default_value_t = 256)]
    context: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Store weights as f32 instead of f16.
    #[arg(long)]
    f32: bool,
}

pub fn run(cmd: ModelCommand, backend: Option<BackendKind>) -> Result<()> {
    let device = BackendKind::resolve(backend)?.device()?;
    match cmd {
        ModelCommand::Logits { model, ids } => {
            let bb = load_backbone(&model, &device)?;
            let batch = TokenBatch::new(vec![ids.clone()], &bb.config, 0)?;
            let logits = to_vec(bb.forward(&batch, &[], true, None).logits.expect("logits"));
            let rows: Vec<&[f32]> = logits.chunks(bb.config.vocab_size).collect();
            println!("{}", serde_json::json!({ "logits": rows }));
        }
        ModelCommand::Eval { model, text, windows } => {
            let bb = load_backbone(&model, &device)?;
            let tok = Tokenizer::from_file(&model.join("tokenizer.json"))?;
            let content = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            let ids = tok.encode(&content)?;
            let ctx = bb.config.max_position_embeddings;
            if ids.len() <= ctx + 1 {
                bail!("text has {} tokens; needs more than the context of {ctx}", ids.len());
            }
            let n = if windows == 0 { ids.len().div_ceil(ctx) } else { windows };
            let loss = windowed_loss(&bb, &ids, ctx, n, 8);
            println!("{}", serde_json::json!({ "loss": loss, "tokens": n * ctx, "text_tokens": ids.len(), "unit": "nats/token" }));
        }
        ModelCommand::Roles { corpus, skip, take } => {
            let text = std::fs::read_to_string(&corpus).with_context(|| format!("reading {}", corpus.display()))?;
            let ranked = rank_roles(&parse_play_script(&text));
            let sel: Vec<_> = ranked.iter().skip(skip).take(take).map(|r| serde_json::json!({"name": r.name, "speeches": r.speeches, "chars": r.chars})).collect();
            println!("{}", serde_json::to_string_pretty(&sel)?);
        }
        ModelCommand::Pretrain(a) => run_pretrain(a, &device)?,
    }
    Ok(())
}

fn read_lines(path: &Path) -> Result<HashSet<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

fn run_pretrain(a: PretrainArgs, device: &spa_model::burn::tensor::Device) -> Result<()> {
    let text = std::fs::read_to_string(&a.corpus).with_context(|| format!("reading {}", a.corpus.display()))?;
    let exclude = match &a.exclude_speakers {
        Some(p) => read_lines(p)?,
        None => HashSet::new(),
    };
    let speeches = parse_play_script(&text);
    if speeches.is_empty() {
        bail!("{} has no `SPEAKER:` blocks", a.corpus.display());
    }
    let corpus = pretraining_text(&speeches, &exclude);
    if !(0.0..0.5).contains(&a.val_fraction) {
        bail!("--val-fraction must be in [0, 0.5)");
    }
    let cut = corpus.char_indices().nth(((1.0 - a.val_fraction) * corpus.chars().count() as f64) as usize).map_or(corpus.len(), |(i, _)| i);
    let (train, val) = corpus.split_at(cut);
    // The vocabulary covers the whole file, so device data (excluded roles) encodes fully.
    let tok_json = char_level_json(text.chars());
    let tok = Tokenizer::from_json(&tok_json)?;
    let cfg = PretrainConfig {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        context: a.context,
        batch: a.batch,
        steps: a.steps,
        lr: a.lr,
        eval_every: a.eval_every,
        seed: a.seed,
        save_dtype_f16: !a.f32,
        ..Default::default()
    };
    eprintln!(
        "pretraining on {} chars ({} held out), {} speakers excluded, vocab {}",
        train.len(),
        val.len(),
        exclude.len(),
        tok.vocab_size()
    );
    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"));
    let report = pretrain(&tok, &tok_json, train, val, &cfg, device, &a.out, &mut |e| match e {
        PretrainEvent::Start { .. } => {}
        PretrainEvent::Step { loss, lr, .. } => {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3} lr {lr:.2e}"));
        }
        PretrainEvent::Eval { step, train_loss, val_loss } => {
            bar.println(format!("step {step}: train {train_loss:.4} val {val_loss:.4} nats/char"));
        }
    })?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
