//! `spa quickstart`: the whole system in one command, on loopback. A real coordinator (TLS
//! gRPC server, sled store, the shipped backbone) and N real device agents (each with its own
//! home, identity key and sled store) run in this process; the operator's calls go through
//! the Admin service. Devices enroll with one-time tokens, add synthetic data with distinct
//! styles, then federated rounds run with SecAgg+ over gRPC, and each device generates text
//! through the coordinator's backbone and its own side plugin and gate.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use spa_client::agent::{self, AgentOptions};
use spa_client::data::Format;
use spa_client::ops;
use spa_coordinator::admin_cli::{Target, admin_client, with_admin};
use spa_coordinator::rounds::RoundRecord;
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
    pub strategy: String,
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
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        Self {
            devices: 8,
            examples: 60,
            rounds: 5,
            local_epochs: 3,
            lr: 3e-3,
            strategy: "fedavg".into(),
            show: 3,
            dir: None,
            seed: 0,
            model: None,
            users: None,
            shared_down: false,
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
            sampling: Sampling { temperature: 0.5, top_k: 5, seed: cfg.seed + 1 },
            stop: Some("\n".into()),
            ..Default::default()
        };
        let mine = spa_client::generate::generate(&h, &ex.prompt, &opts, &mut |_| {}).await?;
        let base = backbone_alone(model, &ex.prompt, cfg.seed + 1)?;
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

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The backbone's own continuation (no side plugin), one line.
fn backbone_alone(dir: &Path, prompt: &str, seed: u64) -> anyhow::Result<String> {
    use spa_model::generate::{Decoding, LocalStates, generate_text};
    let device = spa_model::BackendKind::resolve(None)?.device()?;
    let bb = spa_model::backbone::load_backbone_as(dir, &device, None)?;
    let tok = spa_model::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let head = spa_model::side::FrozenHead::from_backbone(&bb);
    let mut src = LocalStates::new(&bb, &[bb.config.num_layers])?;
    let tokens = spa_model::tokenizer::ModelTokens::from_dir(dir)?;
    let dec = Decoding { max_new: 80, sampling: Sampling { temperature: 0.5, top_k: 5, seed }, stop: tokens.eos.clone() };
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

    // The coordinator: init a home (loopback, free port), serve it.
    let coord = dir.join("coordinator");
    spa_coordinator::init::init(&coord, &[])?;
    let toml = coord.join("coordinator.toml");
    let mut text = std::fs::read_to_string(&toml)?.replace("127.0.0.1:7443", "127.0.0.1:0").replace("selection_grace_secs = 2", "selection_grace_secs = 30");
    let model = match &cfg.model {
        Some(m) => std::fs::canonicalize(m).map_err(|e| anyhow::anyhow!("--model {}: {e}", m.display()))?,
        None => PathBuf::from(spa_coordinator::config::DEFAULT_BACKBONE),
    };
    if cfg.model.is_some() {
        // A TOML basic string: the path's backslashes and quotes escaped.
        let quoted = toml_string(&model.display().to_string());
        text = text.replace("path = \"\"", &format!("path = {quoted}"));
    }
    std::fs::write(&toml, text)?;
    let server = spa_coordinator::server::start(&coord).await?;
    let url = format!("https://{}", server.addr);
    let ca = std::fs::read_to_string(coord.join("tls/ca.pem"))?;
    let (mut admin, cred) = admin_client(&Target { home: coord.clone(), coordinator: Some(url.clone()) }).await?;
    out(Output::Setup { coordinator: url.clone(), devices, dir: dir.display().to_string() });

    // Devices: enroll with one-time tokens, add their (synthetic) private data.
    for (i, u) in users.iter().enumerate() {
        let token = admin.create_token(with_admin(&cred, CreateTokenRequest { ttl_seconds: 600, note: format!("quickstart {i}") })?).await?.into_inner().token;
        let h = home(&dir, i);
        ops::enroll(&h, &url, &token, &ca, &u.user).await?;
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

    // Each device agent on its own thread, as a separate process would be.
    let agents: Vec<_> = (0..devices)
        .map(|i| {
            let h = home(&dir, i);
            let opts = AgentOptions { rounds: Some(cfg.rounds), max_backoff: Duration::from_secs(2) };
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
        strategy: cfg.strategy.clone(),
        // Used by fedprox only (the coordinator records 0 for the other strategies).
        prox_mu: 0.01,
        dp_l2_clip: 0.0,
        dp_noise_multiplier: 0.0,
    };
    admin.start_rounds(with_admin(&cred, plan)?).await?;
    let started = Instant::now();
    // Rounds are numbered from 1 in a fresh home; show each once it is final and evaluated.
    for id in 1..=cfg.rounds as u64 {
        loop {
            let r = admin.round_status(with_admin(&cred, RoundStatusRequest { round_id: id })?).await;
            if let Ok(r) = r {
                let r = r.into_inner();
                let v: RoundRecord = serde_json::from_str(&r.record_json)?;
                let evaluated = v.metrics.len() >= v.cohort.len();
                // A device may skip evaluating when the next round takes it first.
                let next_started = r.state == "committed"
                    && !evaluated
                    && id < cfg.rounds as u64
                    && admin.round_status(with_admin(&cred, RoundStatusRequest { round_id: id + 1 })?).await.is_ok();
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
    for a in agents {
        a.join().map_err(|_| anyhow::anyhow!("a device agent panicked"))??;
    }
    Ok(Federation { server, dir, users, model, _tmp: tmp })
}
