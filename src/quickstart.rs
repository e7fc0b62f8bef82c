//! `spa quickstart`: the whole system in one command, on loopback. A real coordinator (TLS
//! gRPC server, sled store, the shipped backbone) and N real device agents (each with its own
//! home, identity key and sled store) run in this process; the operator's calls go through
//! the Admin service. Devices enroll with one-time tokens, add synthetic data with distinct
//! styles, then federated rounds run with SecAgg+ over gRPC, and each device generates text
//! through the coordinator's backbone and its own side plugin and gate.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use spa_aggregation::strategy::StrategyName;
use spa_client::agent::{self, AgentOptions};
use spa_client::data::Format;
use spa_client::ops;
use spa_coordinator::admin_cli::{Admin, Target, admin_client, with_admin};
use spa_coordinator::config::CoordinatorConfig;
use spa_coordinator::rounds::{DeviceMetrics, RoundRecord};
use spa_model::BackendKind;
use spa_model::data::UserData;
use spa_model::data::synthetic::synthetic_users;
use spa_model::generate::Sampling;
use spa_proto::v1::{CreateTokenRequest, RoundStatusRequest, StartRoundsRequest};

#[derive(Clone, Debug)]
pub struct QuickstartConfig {
    pub devices: usize,
    /// Synthetic examples per device.
    pub examples: usize,
    pub rounds: u32,
    pub local_epochs: u32,
    pub lr: f64,
    pub strategy: StrategyName,
    /// Devices whose personalized text is shown at the end.
    pub show: usize,
    /// Where homes go (a temporary directory when None).
    pub dir: Option<PathBuf>,
    pub seed: u64,
    /// Backbone directory (HF layout); None = the shipped default.
    pub model: Option<PathBuf>,
    /// The devices' data; None = `devices` synthetic users of `examples` examples.
    pub users: Option<Vec<UserData>>,
    /// Devices keep the body's down-projections in their personal models, so generation can
    /// ask the coordinator for projected inputs (`[personal] shared_down`).
    pub shared_down: bool,
    /// Where the coordinator serves the backbone and the devices train and generate.
    pub backend: BackendKind,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        Self {
            devices: 8,
            examples: 60,
            rounds: 5,
            local_epochs: 3,
            lr: 3e-3,
            strategy: StrategyName::FedAvg,
            show: 3,
            dir: None,
            seed: 0,
            model: None,
            users: None,
            shared_down: false,
            backend: BackendKind::default(),
        }
    }
}

/// What the quickstart shows: round records as the coordinator keeps them, and samples.
#[derive(Debug, Serialize)]
pub enum Output {
    Setup { coordinator: String, devices: usize, dir: String },
    Round(Box<RoundRecord>),
    Sample { device: String, prompt: String, backbone: String, personalized: String, side_tokens: usize, tokens: usize, reference: String },
}

impl Output {
    /// The text form: a line of setup, a row of the round table (`header`: with the table's
    /// header above it), or a sample beside the backbone's and the reference.
    pub fn text(&self, header: bool) -> String {
        let first_line = |s: &str| s.lines().next().unwrap_or("").trim_end().to_string();
        match self {
            Output::Setup { coordinator, devices, dir } => format!(
                "coordinator serving on {coordinator} (TLS); {devices} devices enrolled with one-time tokens; homes in {dir}\n\
                 each device trains the side plugin + gate on its own data; only SecAgg+-masked updates of the shared part leave it\n\n"
            ),
            Output::Round(r) => {
                let mut s = String::new();
                if header {
                    s += "| round | global version | contributors/cohort | held-out loss: backbone -> personalized | accuracy: backbone -> personalized | wall s | coordinator busy ms |\n";
                    s += "|---|---|---|---|---|---|---|\n";
                }
                let m = r.mean_metrics.as_ref();
                let f = |get: fn(&DeviceMetrics) -> f64| m.map_or("-".to_string(), |m| format!("{:.3}", get(m)));
                s += &format!(
                    "| {} | {} | {}/{} | {} -> {} | {} -> {} | {:.1} | {:.1} |\n",
                    r.round_id,
                    r.committed_version.map_or("-".to_string(), |v| v.to_string()),
                    r.contributors.len(),
                    r.cohort.len(),
                    f(|m| m.backbone_loss),
                    f(|m| m.personalized_loss),
                    f(|m| m.backbone_acc),
                    f(|m| m.personalized_acc),
                    r.finished_ms.unwrap_or(0).saturating_sub(r.started_ms) as f64 / 1000.0,
                    r.coordinator_busy_ms,
                );
                s
            }
            Output::Sample { device, prompt, backbone, personalized, side_tokens, tokens, reference } => format!(
                "\n--- {device} ---\n{}\n  backbone alone: {}\n  personalized:   {}   (side plugin spoke {side_tokens} of {tokens} tokens)\n  reference:      {}\n",
                prompt.trim_end(),
                first_line(backbone),
                first_line(personalized),
                reference.trim_end()
            ),
        }
    }
}

fn home(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("device-{i}"))
}

/// A federation after its rounds: the coordinator still serving, the device homes under
/// `dir` (`device-{i}` holds `users[i]`'s data and trained plugin).
pub struct Federation {
    pub server: spa_coordinator::server::Running,
    pub dir: PathBuf,
    pub users: Vec<UserData>,
    pub model: PathBuf,
    _tmp: tempfile::TempDir,
}

pub async fn quickstart(cfg: &QuickstartConfig, out: &mut dyn FnMut(Output)) -> anyhow::Result<()> {
    let f = federate(cfg, out).await?;
    let (dir, users, model) = (&f.dir, &f.users, &f.model);

    // Personalized generation through the service, next to the backbone alone.
    for (i, u) in users.iter().enumerate().take(cfg.show) {
        let ex = &u.test[0];
        let h = home(dir, i);
        let opts = spa_client::generate::GenerateOptions {
            max_tokens: 80,
            sampling: Sampling { temperature: 0.5, top_k: 5, seed: cfg.seed + 1, ..Sampling::default() },
            stop: Some("\n".into()),
            backend: cfg.backend,
            ..Default::default()
        };
        let mine = spa_client::generate::generate(&h, &ex.prompt, &opts, &mut |_| {}).await?;
        let base = backbone_alone(model, &ex.prompt, cfg.seed + 1, cfg.backend)?;
        out(Output::Sample {
            device: u.user.clone(),
            prompt: ex.prompt.clone(),
            backbone: base,
            personalized: mine.text.clone(),
            side_tokens: mine.side_tokens,
            tokens: mine.tokens,
            reference: ex.reply.clone(),
        });
    }
    f.server.shutdown().await?;
    Ok(())
}

/// The backbone's own continuation (no side plugin), one line.
fn backbone_alone(dir: &Path, prompt: &str, seed: u64, backend: BackendKind) -> anyhow::Result<String> {
    use spa_model::generate::{Decoding, LocalStates, generate_text};
    let device = backend.device()?;
    let bb = spa_model::backbone::load_backbone_as(dir, &device, None)?;
    let tok = spa_model::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let head = spa_model::side::FrozenHead::from_backbone(&bb);
    let mut src = LocalStates::new(&bb, &[bb.config.num_layers])?;
    let tokens = spa_model::tokenizer::ModelTokens::from_dir(dir)?;
    let dec = Decoding { max_new: 80, sampling: Sampling { temperature: 0.5, top_k: 5, seed, ..Sampling::default() }, stop: tokens.eos.clone() };
    let (_, text) = generate_text(&mut src, &head, None, &tok, &tokens.prompt_ids(&tok, prompt, false)?, &dec, Some("\n"), &mut |_| {})?;
    Ok(text)
}

/// Enrolls the devices, adds their data and runs the rounds over the service.
pub async fn federate(cfg: &QuickstartConfig, out: &mut dyn FnMut(Output)) -> anyhow::Result<Federation> {
    let users = match &cfg.users {
        Some(u) => u.clone(),
        None => {
            anyhow::ensure!(cfg.examples >= 10, "at least 10 examples per device (a tenth is held out)");
            synthetic_users(cfg.devices, cfg.examples, cfg.seed)
        }
    };
    let devices = users.len();
    anyhow::ensure!(devices >= 3, "the quickstart needs at least 3 devices (secure aggregation threshold)");
    anyhow::ensure!(cfg.rounds >= 1, "at least one round");
    let tmp = tempfile::tempdir()?;
    let dir = cfg.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let coord = dir.join("coordinator");
    let (server, model) = serve_coordinator(cfg, &coord).await?;
    let url = format!("https://{}", server.addr);
    let (mut admin, cred) = admin_client(&Target { home: coord.clone(), coordinator: Some(url.clone()) }).await?;
    out(Output::Setup { coordinator: url.clone(), devices, dir: dir.display().to_string() });
    let ca = std::fs::read_to_string(coord.join("tls/ca.pem"))?;
    enroll_devices(cfg, &users, &dir, &url, &ca, &mut admin, &cred).await?;

    // Each device agent on its own thread, as a separate process would be.
    let agents: Vec<_> = (0..devices)
        .map(|i| {
            let h = home(&dir, i);
            let opts = AgentOptions { rounds: Some(cfg.rounds), max_backoff: Duration::from_secs(2), backend: cfg.backend };
            std::thread::spawn(move || -> anyhow::Result<u32> {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
                Ok(rt.block_on(agent::run(&h, &opts, &mut |_| {}))?)
            })
        })
        .collect();
    let plan = StartRoundsRequest {
        rounds: cfg.rounds,
        min_clients: devices as u32,
        max_clients: devices as u32,
        deadline_seconds: 600,
        local_epochs: cfg.local_epochs,
        lr: cfg.lr,
        strategy: cfg.strategy.to_string(),
        prox_mu: cfg.strategy.client_mu(0.01),
        dp_l2_clip: 0.0,
        dp_noise_multiplier: 0.0,
    };
    admin.start_rounds(with_admin(&cred, plan)?).await?;
    watch_rounds(cfg.rounds, &mut admin, &cred, out).await?;
    for a in agents {
        a.join().map_err(|_| anyhow::anyhow!("a device agent panicked"))??;
    }
    Ok(Federation { server, dir, users, model, _tmp: tmp })
}

/// A coordinator home in `coord` (loopback, a free port, `cfg`'s backbone), served; and the
/// backbone's directory.
async fn serve_coordinator(cfg: &QuickstartConfig, coord: &Path) -> anyhow::Result<(spa_coordinator::server::Running, PathBuf)> {
    spa_coordinator::init::init(coord, &[])?;
    let model = match &cfg.model {
        Some(m) => std::fs::canonicalize(m).map_err(|e| anyhow::anyhow!("--model {}: {e}", m.display()))?,
        None => PathBuf::from(spa_coordinator::config::DEFAULT_BACKBONE),
    };
    let mut ccfg = CoordinatorConfig::load(coord)?;
    // A free loopback port; every device is online before the first round selects.
    ccfg.server.listen = "127.0.0.1:0".into();
    ccfg.rounds.selection_grace_secs = 30;
    if cfg.model.is_some() {
        ccfg.backbone.path = model.display().to_string();
    }
    ccfg.save(coord)?;
    Ok((spa_coordinator::server::start_on(coord, Some(cfg.backend)).await?, model))
}

/// Each device enrolls with a one-time token and adds its private data.
async fn enroll_devices(cfg: &QuickstartConfig, users: &[UserData], dir: &Path, url: &str, ca: &str, admin: &mut Admin, cred: &str) -> anyhow::Result<()> {
    for (i, u) in users.iter().enumerate() {
        let token = admin.create_token(with_admin(cred, CreateTokenRequest { ttl_seconds: 600, note: format!("quickstart {i}") })?).await?.into_inner().token;
        let h = home(dir, i);
        ops::enroll(&h, url, &token, ca, &u.user).await?;
        if cfg.shared_down {
            let mut c = spa_client::config::ClientConfig::load(&h)?;
            c.personal.shared_down = true;
            c.save(&h)?;
        }
        let jsonl: String = u.train.iter().chain(&u.test).map(|e| serde_json::json!({ "input": e.prompt, "output": e.reply }).to_string() + "\n").collect();
        let file = h.join("data.jsonl");
        std::fs::write(&file, jsonl)?;
        ops::data_add(&h, &file, Format::Jsonl, None)?;
    }
    Ok(())
}

/// Shows each of the run's rounds once it is final and evaluated (rounds are numbered from 1
/// in a fresh home).
async fn watch_rounds(rounds: u32, admin: &mut Admin, cred: &str, out: &mut dyn FnMut(Output)) -> anyhow::Result<()> {
    let started = Instant::now();
    for id in 1..=rounds as u64 {
        loop {
            let r = admin.round_status(with_admin(cred, RoundStatusRequest { round_id: id })?).await;
            if let Ok(r) = r {
                let r = r.into_inner();
                let v: RoundRecord = serde_json::from_str(&r.record_json)?;
                let evaluated = v.metrics.len() >= v.cohort.len();
                // A device may skip evaluating when the next round takes it first.
                let next_started = r.state == "committed"
                    && !evaluated
                    && id < rounds as u64
                    && admin.round_status(with_admin(cred, RoundStatusRequest { round_id: id + 1 })?).await.is_ok();
                if r.state == "aborted" || (r.state == "committed" && (evaluated || next_started)) {
                    anyhow::ensure!(r.state == "committed", "round {id} aborted: {}", v.reason.as_deref().unwrap_or("?"));
                    out(Output::Round(Box::new(v)));
                    break;
                }
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "rounds did not finish within an hour");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
