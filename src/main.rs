use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use spa::experiment::ExperimentConfig;
use spa::quickstart::{Output, QuickstartConfig};
use spa::simulation::{SimConfig, Simulation};
use spa_aggregation::strategy::StrategyName;
use spa_model::BackendKind;
use spa_model::backbone::load_backbone_as;
use spa_model::data::synthetic::synthetic_users;
use spa_model::generate::{Decoding, LocalStates, Sampling, generate_text};
use spa_model::personal::PersonalModel;
use spa_model::side::SideConfig;
use spa_model::tokenizer::{ModelTokens, Tokenizer};
use spa_model::train::TrainConfig;

/// SPA: federated side-plugin personalization of a frozen LLM.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Compute backend: flex (default), ndarray, cuda. Overrides BURN_DEVICE.
    #[arg(long, global = true)]
    device: Option<BackendKind>,
    /// Print results as JSON (one document, or one line per event) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job on embedded defaults: a coordinator and device agents on loopback (TLS
    /// gRPC), enrollment, federated rounds with SecAgg+, personalized generation. No setup.
    Quickstart(QuickArgs),
    /// An in-process federated simulation with every knob exposed.
    Simulate(SimArgs),
    /// A personalization table: backbone, local-only, global adapter (+FT) and SPA with its
    /// ablations on the same devices and seeds (configs/experiments/*.toml). Paths in the
    /// config are relative to the working directory (run from the repository root).
    Experiment(ExpArgs),
    /// Collaborative decoding measured end to end: the quickstart's rounds, then generation
    /// through a loopback proxy that delays each direction, per token and speculative, with
    /// tap states and cloud-side down-projections. Fails if a speculative text differs from
    /// its per-token text.
    GenerateBench(GenBenchArgs),
    /// The backbone workbench: import a GGUF, pretrain, evaluate, logits, roles, generate.
    #[command(subcommand)]
    Model(spa::model_cli::ModelCommand),
}

#[derive(Parser, Debug, Clone)]
struct GenBenchArgs {
    /// Backbone directory (HF layout). Default: the shipped models/shakespeare-char.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Devices (synthetic users, or the first roles of --roles-file).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    #[arg(long, default_value_t = 3)]
    local_epochs: u32,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Devices are roles of this play script (LEAF-style cue -> reply) instead of synthetic users.
    #[arg(long, requires = "roles_file")]
    play: Option<PathBuf>,
    /// One role per line (`#` comments).
    #[arg(long)]
    roles_file: Option<PathBuf>,
    /// Keep each role's first this many train examples.
    #[arg(long)]
    max_train: Option<usize>,
    /// One-way delays, milliseconds (each one a row per mode).
    #[arg(long, value_delimiter = ',', default_value = "0,10,25")]
    delay_ms: Vec<u64>,
    /// Generations per mode.
    #[arg(long, default_value_t = 5)]
    prompts: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: spa_client::generate::SamplingArgs,
    #[arg(long, default_value_t = 16)]
    max_draft: usize,
    /// Cut every connection after this many text pieces of each speculative generation
    /// (each must resume and still match).
    #[arg(long)]
    cut_after: Option<usize>,
    /// One JSON line per row instead of the markdown table.
    #[arg(skip)]
    json: bool,
}

#[derive(Parser, Debug, Clone)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["config", "report"])))]
struct ExpArgs {
    /// The experiment's TOML file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redraw the tables (and with --out the plots) of a result.json this command wrote,
    /// without running anything.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the whole result as one JSON object instead of the markdown tables.
    #[arg(skip)]
    json: bool,
    /// Also write result.json, table.md and the per-round plots (loss.svg, accuracy.svg) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Parser, Debug, Clone)]
struct QuickArgs {
    #[arg(long, default_value_t = 8)]
    devices: usize,
    #[arg(long, default_value_t = 60)]
    examples: usize,
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(long, default_value_t = 3)]
    local_epochs: u32,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// fedavg | fedprox | fedadam | fedyogi | fedadagrad
    #[arg(long, default_value = "fedavg")]
    strategy: StrategyName,
    /// Devices whose personalized text is shown at the end.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Keep the coordinator and device homes here (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backbone directory (HF layout, e.g. an imported GGUF). Default: the shipped
    /// models/shakespeare-char.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print the round records and samples as JSON lines.
    #[arg(skip)]
    json: bool,
}

#[derive(Parser, Debug, Clone)]
struct SimArgs {
    /// Backbone directory (HF layout). Default: the shipped models/shakespeare-char.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Examples per synthetic device (80% train, 20% test).
    #[arg(long, default_value_t = 60)]
    examples: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 3)]
    local_epochs: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// fedavg | fedprox | fedadam | fedyogi | fedadagrad
    #[arg(long, default_value = "fedavg")]
    strategy: StrategyName,
    /// FedProx's mu (with --strategy fedprox).
    #[arg(long, default_value_t = 0.01)]
    prox_mu: f64,
    /// Fraction of each cohort that drops after masking starts.
    #[arg(long, default_value_t = 0.25)]
    dropout: f64,
    /// As the coordinator's `round start` takes them.
    #[command(flatten)]
    dp: spa_coordinator::admin_cli::DpArgs,
    /// Devices whose personalized text is shown at the end.
    #[arg(long, default_value_t = 3)]
    show: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print round reports as JSON lines.
    #[arg(skip)]
    json: bool,
}

fn quickstart(a: QuickArgs, backend: BackendKind) -> Result<()> {
    let cfg = QuickstartConfig {
        devices: a.devices,
        examples: a.examples,
        rounds: a.rounds,
        local_epochs: a.local_epochs,
        lr: a.lr,
        strategy: a.strategy,
        show: a.show,
        dir: a.dir.clone(),
        seed: a.seed,
        model: a.model.clone(),
        users: None,
        shared_down: false,
        backend,
    };
    let json = a.json;
    let mut first_round = true;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(spa::quickstart::quickstart(&cfg, &mut |o| {
        if json {
            println!("{}", serde_json::to_string(&o).expect("serializes"));
        } else {
            // The round table's header goes above the first round.
            let header = first_round && matches!(o, Output::Round(_));
            first_round &= !header;
            print!("{}", o.text(header));
        }
    }))
}

fn generate_bench(a: GenBenchArgs, backend: BackendKind) -> Result<()> {
    let users = match (&a.play, &a.roles_file) {
        (Some(play), Some(roles)) => {
            let read = |p: &Path| std::fs::read_to_string(p).with_context(|| p.display().to_string());
            let speeches = spa_model::data::shakespeare::parse_play_script(&read(play)?);
            let names: Vec<String> =
                read(roles)?.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).take(a.devices).map(str::to_owned).collect();
            let mut users = spa_model::data::shakespeare::leaf_users(&speeches, &names, Default::default(), 0.8);
            for u in &mut users {
                u.train.truncate(a.max_train.unwrap_or(usize::MAX));
            }
            anyhow::ensure!(users.iter().all(|u| !u.train.is_empty() && !u.test.is_empty()), "a role has no speeches in {}", play.display());
            Some(users)
        }
        _ => None,
    };
    let cfg = spa::genbench::GenBenchConfig {
        quickstart: QuickstartConfig {
            devices: a.devices,
            rounds: a.rounds,
            local_epochs: a.local_epochs,
            lr: a.lr,
            model: a.model.clone(),
            users,
            backend,
            ..QuickstartConfig::default()
        },
        delays_ms: a.delay_ms.clone(),
        prompts: a.prompts,
        max_tokens: a.max_tokens,
        sampling: a.sampling.sampling(),
        max_draft: a.max_draft,
        cut_after: a.cut_after,
    };
    cfg.sampling.validate()?;
    if !a.json {
        print!("{}", spa::genbench::Row::HEADER);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(spa::genbench::run(&cfg, &mut |r| {
        if a.json {
            println!("{}", serde_json::to_string(r).expect("serializes"));
        } else {
            println!("{r}");
        }
    }))?;
    Ok(())
}

/// The shipped backbone, found from the working directory or from the source tree.
fn default_model() -> PathBuf {
    let local = Path::new("models/shakespeare-char");
    if local.join("config.json").exists() { local.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shakespeare-char") }
}

fn main() -> std::process::ExitCode {
    spa_model::alloc::keep_freed_memory();
    spa_proto::exit::finish(run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    let backend = BackendKind::resolve(cli.device)?;
    let device = backend.device()?;
    // Each command's `json` is this global flag.
    match cli.command {
        Command::Quickstart(a) => quickstart(QuickArgs { json: cli.json, ..a }, backend),
        Command::Simulate(a) => simulate(SimArgs { json: cli.json, ..a }, &device),
        Command::Experiment(a) => experiment(ExpArgs { json: cli.json, ..a }, &device),
        Command::GenerateBench(a) => generate_bench(GenBenchArgs { json: cli.json, ..a }, backend),
        Command::Model(cmd) => spa::model_cli::run(cmd, &device, cli.json),
    }
}

fn experiment(a: ExpArgs, device: &spa_model::burn::tensor::Device) -> Result<()> {
    let result = match (&a.config, &a.report) {
        (Some(config), _) => run_experiment(config, device)?,
        (None, Some(report)) => spa::experiment::report::read(report)?,
        (None, None) => anyhow::bail!("give --config or --report"),
    };
    if let Some(out) = &a.out {
        spa::experiment::report::write(&result, out)?;
        eprintln!("wrote {}/result.json, table.md, loss.svg, accuracy.svg", out.display());
    }
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print!("{}", spa::experiment::report::markdown(&result));
    }
    Ok(())
}

fn run_experiment(config: &Path, device: &spa_model::burn::tensor::Device) -> Result<spa::experiment::ExperimentResult> {
    let cfg = ExperimentConfig::from_file(config)?;
    let dir = cfg.backbone.clone().unwrap_or_else(default_model);
    let bb = load_backbone_as(&dir, device, None).with_context(|| format!("loading the backbone from {}", dir.display()))?;
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tokens = ModelTokens::from_dir(&dir)?;
    let (users, left_out) = cfg.users(Path::new("."))?;
    let left = if left_out.is_empty() { String::new() } else { format!(" ({} roles left out: in the backbone's pretraining)", left_out.len()) };
    eprintln!(
        "{}: backbone {} ({} layers, d={}), {} devices{left}, arms {:?}, seeds {:?}",
        cfg.name,
        dir.display(),
        bb.config.num_layers,
        bb.config.hidden_size,
        users.len(),
        cfg.arms.iter().map(|a| a.name()).collect::<Vec<_>>(),
        cfg.seeds
    );
    let model = spa::experiment::Model { backbone: &bb, tokenizer: &tok, tokens: &tokens, label: dir.display().to_string() };
    let mut result = spa::experiment::run(&cfg, &model, users, &mut |line| eprintln!("{line}"))?;
    result.left_out = left_out;
    Ok(result)
}

fn simulate(a: SimArgs, device: &spa_model::burn::tensor::Device) -> Result<()> {
    let model = a.model.clone().unwrap_or_else(default_model);
    let bb = load_backbone_as(&model, device, None).with_context(|| format!("loading the backbone from {}", model.display()))?;
    let tok = Tokenizer::from_file(&model.join("tokenizer.json"))?;
    let tokens = ModelTokens::from_dir(&model)?;
    let dp = a.dp.params()?;
    let strategy = a.strategy.config(a.prox_mu as f32)?;
    let prox_mu = a.strategy.client_mu(a.prox_mu);
    let config = SimConfig {
        rounds: a.rounds,
        side: SideConfig { seed: a.seed, ..SideConfig::default() },
        local: TrainConfig { epochs: a.local_epochs, lr: a.lr, batch_tokens: 256, prox_mu, seed: a.seed, ..TrainConfig::default() },
        strategy,
        dropout: a.dropout,
        clip: 1.0,
        seed: a.seed,
        cohort: None,
        eval_devices: 0,
        dp: dp.map(|(clip, noise)| spa::simulation::SimDp { l2_clip: clip as f32, noise_multiplier: noise as f32 }),
    };
    eprintln!(
        "backbone {} ({} layers, d={}); {} synthetic devices, {} rounds, strategy {}, {:.0}% dropout after masking",
        model.display(),
        bb.config.num_layers,
        bb.config.hidden_size,
        a.devices,
        a.rounds,
        a.strategy,
        100.0 * a.dropout
    );
    let users = synthetic_users(a.devices, a.examples, a.seed);
    let mut sim = Simulation::new(&bb, &tok, users, config)?;
    let before = sim.evaluate()?;
    if !a.json {
        print!("{}", spa::simulation::RoundReport::header(&before));
    }
    for _ in 0..a.rounds {
        let r = sim.round()?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("{r}");
        }
    }
    // Greedy decoding loops on a small character-level model; mild sampling reads better.
    let dec = Decoding { max_new: 80, sampling: Sampling { temperature: 0.5, top_k: 5, seed: a.seed, ..Sampling::default() }, stop: tokens.eos.clone() };
    for i in 0..a.show.min(sim.devices.len()) {
        let features = sim.features(i)?;
        let ex = &features.data.test[0];
        let prompt = tokens.prompt_ids(&tok, &ex.prompt, false)?;
        let body = PersonalModel::of_body(sim.plugin(i)?);
        let mut src = LocalStates::new(&bb, &body.body.shape.feature_layers)?;
        let (mine, mine_text) = generate_text(&mut src, sim.head(), Some(&body), &tok, &prompt, &dec, Some("\n"), &mut |_| {})?;
        let mut src = LocalStates::new(&bb, &[bb.config.num_layers])?;
        let (_, base) = generate_text(&mut src, sim.head(), None, &tok, &prompt, &dec, Some("\n"), &mut |_| {})?;
        println!("\n--- device {} ---\n{}", sim.devices[i].name, ex.prompt.trim_end());
        println!("  backbone alone: {}", base.trim_end());
        println!("  federated side: {}   (side spoke {:.0}% of tokens)", mine_text.trim_end(), 100.0 * mine.side_fraction());
        println!("  reference:      {}", ex.reply.trim_end());
    }
    Ok(())
}
