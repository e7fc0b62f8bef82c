//! Operator verbs that call the running coordinator over TLS with the admin credential:
//! `token create`, `devices list`, `devices revoke`, `status`.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use spa_proto::auth::HDR_AUTHORIZATION;
use spa_proto::limits::MAX_MESSAGE_BYTES;
use spa_proto::v1::admin_client::AdminClient;
use spa_proto::v1::*;
use tonic::transport::Channel;

use crate::config::CoordinatorConfig;
use crate::server::ADDR_FILE;

/// Where to reach the coordinator and with which credential.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Coordinator home (config, CA certificate, admin credential).
    #[arg(long)]
    pub home: PathBuf,
    /// Coordinator URL; default: the address `serve` wrote to HOME/serve.addr, else the
    /// configured listen address.
    #[arg(long)]
    pub coordinator: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a one-time enrollment token (shown once; the coordinator keeps its hash).
    Create {
        #[command(flatten)]
        target: Target,
        /// Lifetime: 90s, 30m, 24h, 7d or plain seconds.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Free-text note stored with the token.
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// List enrolled devices.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device: its signed calls are refused from now on.
    Revoke {
        #[command(flatten)]
        target: Target,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

/// Parses `90s`, `30m`, `24h`, `7d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration '{s}' (e.g. 90s, 30m, 24h, 7d)"))?;
    Ok(Duration::from_secs(
        n.checked_mul(mult).context("duration too long")?,
    ))
}

/// An admin client for `target`.
pub async fn admin_client(target: &Target) -> Result<(AdminClient<Channel>, String)> {
    let home = &target.home;
    let cfg = CoordinatorConfig::load(home)?;
    let url = match &target.coordinator {
        Some(u) => u.clone(),
        None => match std::fs::read_to_string(home.join(ADDR_FILE)) {
            Ok(s) => s.trim().to_string(),
            Err(_) => format!("https://{}", cfg.server.listen),
        },
    };
    let ca = std::fs::read(cfg.resolve(home, &cfg.server.ca_cert))
        .context("reading the CA certificate")?;
    let cred = std::fs::read_to_string(cfg.resolve(home, &cfg.server.admin_credential))
        .context("reading the admin credential")?;
    let ch = crate::net::connect(&url, &ca).await?;
    let client = AdminClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok((client, cred.trim().to_string()))
}

pub fn with_admin<M>(cred: &str, body: M) -> Result<tonic::Request<M>> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert(
        HDR_AUTHORIZATION,
        format!("Bearer {cred}")
            .parse()
            .context("credential is not ASCII")?,
    );
    Ok(req)
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("coordinator refused: {} ({:?})", s.message(), s.code())
}

pub async fn run_token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            target,
            ttl,
            note,
            json,
        } => {
            let ttl = parse_duration(&ttl)?;
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
            let (mut c, cred) = admin_client(&target).await?;
            let r = c
                .create_token(with_admin(
                    &cred,
                    CreateTokenRequest {
                        ttl_seconds: ttl.as_secs(),
                        note,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"token": r.token, "token_id": r.token_id, "expires_at_ms": r.expires_at_ms})
                );
            } else {
                println!("{}", r.token);
                eprintln!(
                    "token {} expires at {} (Unix ms); it is shown only once",
                    r.token_id, r.expires_at_ms
                );
            }
        }
    }
    Ok(())
}

pub async fn run_devices(cmd: DevicesCommand) -> Result<()> {
    match cmd {
        DevicesCommand::List { target, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c
                .list_devices(with_admin(&cred, ListDevicesRequest {})?)
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                let v: Vec<_> = r
                    .devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({"device_id": d.device_id, "name": d.name, "enrolled_at_ms": d.enrolled_at_ms,
                            "last_seen_ms": d.last_seen_ms, "revoked": d.revoked, "public_key_hex": d.public_key_hex})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<22} {:<20} {:<8} {:>15}",
                    "DEVICE", "NAME", "STATE", "LAST SEEN (ms)"
                );
                for d in r.devices {
                    println!(
                        "{:<22} {:<20} {:<8} {:>15}",
                        d.device_id,
                        d.name,
                        if d.revoked { "revoked" } else { "active" },
                        d.last_seen_ms
                    );
                }
            }
        }
        DevicesCommand::Revoke { target, id, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c
                .revoke_device(with_admin(
                    &cred,
                    RevokeDeviceRequest {
                        device_id: id.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"device_id": id, "was_active": r.was_active})
                );
            } else if r.was_active {
                println!("revoked {id}");
            } else {
                println!("{id} was already revoked");
            }
        }
    }
    Ok(())
}

pub async fn run_status(target: Target, json: bool) -> Result<()> {
    let (mut c, cred) = admin_client(&target).await?;
    let r = c
        .server_status(with_admin(&cred, ServerStatusRequest {})?)
        .await
        .map_err(status_err)?
        .into_inner();
    let v = serde_json::json!({"backbone_version": r.backbone_version, "devices": r.devices, "active_devices": r.active_devices,
        "uptime_seconds": r.uptime_seconds, "version": r.version, "global_version": r.global_version,
        "tokens_outstanding": r.tokens_outstanding});
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

/// `init` entry point for the binary.
pub fn run_init(home: &Path, names: &[String], json: bool) -> Result<()> {
    let r = crate::init::init(home, names)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("initialised {}", r.home.display());
        println!("  config:           {}", r.config.display());
        println!(
            "  CA certificate:   {} (give it to devices: spa-client enroll --ca)",
            r.ca_cert.display()
        );
        println!("  admin credential: {}", r.admin_credential.display());
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum RoundCommand {
    /// Queue a run of federated rounds over the enrolled, online devices.
    Start {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Fewest devices that must contribute (the round aborts below this).
        #[arg(long, default_value_t = 3)]
        min_clients: u32,
        /// Most devices selected per round.
        #[arg(long, default_value_t = 100)]
        max_clients: u32,
        /// Seconds for selection and for local training (each).
        #[arg(long, default_value_t = 300)]
        deadline: u32,
        #[arg(long, default_value_t = 1)]
        local_epochs: u32,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        /// fedavg | fedprox | fedadam | fedyogi | fedadagrad
        #[arg(long, default_value = "fedavg")]
        strategy: String,
        /// FedProx's proximal weight (with --strategy fedprox).
        #[arg(long, default_value_t = 0.01)]
        prox_mu: f64,
        /// Distributed DP: L2 clip of each device's update (0 = off).
        #[arg(long, default_value_t = 0.0)]
        dp_clip: f64,
        /// Distributed DP noise multiplier z (central sigma = z * clip).
        #[arg(long, default_value_t = 0.0)]
        dp_noise: f64,
        #[arg(long)]
        json: bool,
    },
    /// One round (default: the latest).
    Status {
        #[command(flatten)]
        target: Target,
        id: Option<u64>,
        /// Print again every second until the round commits or aborts.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every round.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Abort a round in progress (and the rest of its run).
    Abort {
        #[command(flatten)]
        target: Target,
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

fn round_line(r: &RoundInfo) -> String {
    let v: serde_json::Value = serde_json::from_str(&r.record_json).unwrap_or_default();
    let mean = &v["mean_metrics"];
    let metrics = if mean.is_object() {
        format!(
            "  held-out loss {:.3} -> {:.3}, acc {:.3} -> {:.3} ({} devices)",
            mean["backbone_loss"].as_f64().unwrap_or(f64::NAN),
            mean["personalized_loss"].as_f64().unwrap_or(f64::NAN),
            mean["backbone_acc"].as_f64().unwrap_or(f64::NAN),
            mean["personalized_acc"].as_f64().unwrap_or(f64::NAN),
            v["metrics"].as_object().map_or(0, |m| m.len()),
        )
    } else {
        String::new()
    };
    format!(
        "round {:>4}  run {} #{}  {:<12} base v{} -> {}  cohort {}  contributors {}{}{}",
        r.round_id,
        v["run_id"],
        v["index"],
        r.state,
        v["base_version"],
        v["committed_version"].as_u64().map_or("-".into(), |c| format!("v{c}")),
        v["cohort"].as_array().map_or(0, |a| a.len()),
        v["contributors"].as_array().map_or(0, |a| a.len()),
        v["reason"].as_str().map_or(String::new(), |r| format!("  ({r})")),
        metrics,
    )
}

fn round_json(r: &RoundInfo) -> serde_json::Value {
    serde_json::from_str(&r.record_json).unwrap_or_default()
}

pub async fn run_round(cmd: RoundCommand) -> Result<()> {
    match cmd {
        RoundCommand::Start { target, rounds, min_clients, max_clients, deadline, local_epochs, lr, strategy, prox_mu, dp_clip, dp_noise, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let req = StartRoundsRequest {
                rounds,
                min_clients,
                max_clients,
                deadline_seconds: deadline,
                local_epochs,
                lr,
                strategy,
                prox_mu,
                dp_l2_clip: dp_clip,
                dp_noise_multiplier: dp_noise,
            };
            let r = c.start_rounds(with_admin(&cred, req)?).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::json!({ "run_id": r.run_id }));
            } else {
                println!("run {} queued: {rounds} round(s); watch with `round status --watch`", r.run_id);
            }
        }
        RoundCommand::Status { target, id, watch, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let mut id = id.unwrap_or(0);
            loop {
                let r = c.round_status(with_admin(&cred, RoundStatusRequest { round_id: id })?).await.map_err(status_err)?.into_inner();
                // Watching "the latest" follows the round it found first, not later ones.
                id = r.round_id;
                if json {
                    println!("{}", round_json(&r));
                } else {
                    println!("{}", round_line(&r));
                }
                if !watch || r.state == "committed" || r.state == "aborted" {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        RoundCommand::List { target, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.list_rounds(with_admin(&cred, ListRoundsRequest {})?).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::Value::Array(r.rounds.iter().map(round_json).collect()));
            } else if r.rounds.is_empty() {
                println!("no rounds yet");
            } else {
                for x in &r.rounds {
                    println!("{}", round_line(x));
                }
            }
        }
        RoundCommand::Abort { target, id, json } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.abort_round(with_admin(&cred, AbortRoundRequest { round_id: id })?).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::json!({ "round_id": id, "was_running": r.was_running }));
            } else if r.was_running {
                println!("round {id}: abort requested");
            } else {
                println!("round {id} had already finished");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Write a committed global version (shared side-plugin parameters) as safetensors.
    Export {
        #[command(flatten)]
        target: Target,
        /// Global version (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_checkpoint(cmd: CheckpointCommand) -> Result<()> {
    let CheckpointCommand::Export { target, version, out, json } = cmd;
    let (mut c, cred) = admin_client(&target).await?;
    let version = match version {
        Some(v) => v,
        None => c.server_status(with_admin(&cred, ServerStatusRequest {})?).await.map_err(status_err)?.into_inner().global_version,
    };
    let mut stream = c.get_checkpoint(with_admin(&cred, GetCheckpointRequest { version })?).await.map_err(status_err)?.into_inner();
    let mut asm = spa_proto::tensor::TensorAssembler::new(spa_proto::limits::MAX_TENSOR_BYTES);
    while let Some(chunk) = stream.message().await.map_err(status_err)? {
        asm.push(chunk)?;
    }
    let mut set = spa_model::side::ParamSet::default();
    for (name, t) in asm.finish()? {
        let values = t.to_f32(&name)?;
        set.tensors.insert(name, spa_model::side::NamedTensor { shape: t.shape.iter().map(|&d| d as usize).collect(), values });
    }
    std::fs::write(&out, set.to_safetensors()).with_context(|| format!("writing {}", out.display()))?;
    if json {
        println!("{}", serde_json::json!({ "version": version, "tensors": set.tensors.len(), "parameters": set.numel(), "out": out }));
    } else {
        println!("global version {version}: {} tensors, {} parameters -> {}", set.tensors.len(), set.numel(), out.display());
    }
    Ok(())
}
