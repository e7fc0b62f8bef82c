//! Operator verbs that call the running coordinator over TLS with the admin credential:
//! `token create`, `devices list | revoke`, `round start | status | list | abort`,
//! `checkpoint export`, `status`; and `init`. What each prints with `--json` is a
//! `Serialize` struct below.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use spa_proto::auth::HDR_AUTHORIZATION;
use spa_proto::limits::MAX_MESSAGE_BYTES;
use spa_proto::v1::admin_client::AdminClient;
use spa_proto::v1::*;
use tonic::transport::Channel;

use crate::config::CoordinatorConfig;
use crate::server::ADDR_FILE;

mod rounds;

pub use rounds::{CheckpointCommand, DpArgs, RoundCommand, run_checkpoint, run_round};

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
    },
    /// List tokens (ids and states; the tokens themselves are never kept).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke an unused token by its id (`tok-...`): it can no longer enroll a device.
    Revoke {
        #[command(flatten)]
        target: Target,
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// List enrolled devices.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a device: its signed calls are refused from now on.
    Revoke {
        #[command(flatten)]
        target: Target,
        id: String,
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
    let n: u64 = num.parse().with_context(|| format!("invalid duration '{s}' (e.g. 90s, 30m, 24h, 7d)"))?;
    Ok(Duration::from_secs(n.checked_mul(mult).context("duration too long")?))
}

/// An admin client for `target`.
/// An Admin service client over the coordinator's TLS channel.
pub type Admin = AdminClient<Channel>;

pub async fn admin_client(target: &Target) -> Result<(Admin, String)> {
    let home = &target.home;
    let cfg = CoordinatorConfig::load(home)?;
    let url = match &target.coordinator {
        Some(u) => u.clone(),
        None => match std::fs::read_to_string(home.join(ADDR_FILE)) {
            Ok(s) => s.trim().to_string(),
            Err(_) => format!("https://{}", cfg.server.listen),
        },
    };
    let ca = std::fs::read(cfg.resolve(home, &cfg.server.ca_cert)).context("reading the CA certificate")?;
    let cred = std::fs::read_to_string(cfg.resolve(home, &cfg.server.admin_credential)).context("reading the admin credential")?;
    let ch = crate::net::connect(&url, &ca).await?;
    let client = AdminClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok((client, cred.trim().to_string()))
}

pub fn with_admin<M>(cred: &str, body: M) -> Result<tonic::Request<M>> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert(HDR_AUTHORIZATION, format!("Bearer {cred}").parse().context("credential is not ASCII")?);
    Ok(req)
}

/// The status stays in the error's chain: the binary's exit code is read from it.
pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    let msg = format!("coordinator refused: {} ({:?})", s.message(), s.code());
    anyhow::Error::new(s).context(msg)
}

/// One JSON document on stdout (`--json`).
pub fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// What a verb prints: `v` as one JSON document with `--json`, else as `text` writes it.
pub fn emit<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T)) -> Result<()> {
    if json {
        return print_json(v);
    }
    text(v);
    Ok(())
}

// What each verb prints with `--json`.
#[derive(Serialize)]
struct TokenCreated {
    token: String,
    token_id: String,
    expires_at_ms: u64,
}

#[derive(Serialize)]
struct DeviceRow {
    device_id: String,
    name: String,
    enrolled_at_ms: u64,
    last_seen_ms: u64,
    key_rotated_at_ms: u64,
    revoked: bool,
    public_key_hex: String,
}

#[derive(Serialize)]
struct Revoked {
    device_id: String,
    was_active: bool,
}

#[derive(Serialize)]
struct ServerStatus {
    backbone_version: String,
    devices: u64,
    active_devices: u64,
    uptime_seconds: u64,
    version: String,
    global_version: u64,
    tokens_outstanding: u64,
}

pub async fn run_token(cmd: TokenCommand, json: bool) -> Result<()> {
    match cmd {
        TokenCommand::Create { target, ttl, note } => {
            let ttl = parse_duration(&ttl)?;
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.create_token(with_admin(&cred, CreateTokenRequest { ttl_seconds: ttl.as_secs(), note })?).await.map_err(status_err)?.into_inner();
            emit(json, &TokenCreated { token: r.token, token_id: r.token_id, expires_at_ms: r.expires_at_ms }, |t| {
                println!("{}", t.token);
                eprintln!("token {} expires at {} (Unix ms); it is shown only once", t.token_id, t.expires_at_ms);
            })?;
        }
        TokenCommand::List { target } => list_tokens(target, json).await?,
        TokenCommand::Revoke { target, token_id } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.revoke_token(with_admin(&cred, RevokeTokenRequest { token_id: token_id.clone() })?).await.map_err(status_err)?.into_inner();
            emit(json, &serde_json::json!({ "token_id": token_id, "was_usable": r.was_usable }), |_| {
                if r.was_usable {
                    println!("revoked {token_id}");
                } else {
                    println!("revoked {token_id} (it could no longer enroll anyway: used, expired or revoked before)");
                }
            })?;
        }
    }
    Ok(())
}

async fn list_tokens(target: Target, json: bool) -> Result<()> {
    let (mut c, cred) = admin_client(&target).await?;
    let r = c.list_tokens(with_admin(&cred, ListTokensRequest {})?).await.map_err(status_err)?.into_inner();
    let now = spa_proto::auth::now_ms();
    let state = |t: &TokenInfo| match () {
        _ if t.revoked_at_ms > 0 => "revoked",
        _ if !t.used_by.is_empty() => "used",
        _ if t.expires_at_ms <= now => "expired",
        _ => "usable",
    };
    if json {
        let rows: Vec<_> = r
            .tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "token_id": t.token_id, "state": state(t), "created_at_ms": t.created_at_ms, "expires_at_ms": t.expires_at_ms,
                    "note": t.note, "used_by": t.used_by, "revoked_at_ms": t.revoked_at_ms,
                })
            })
            .collect();
        return print_json(&rows);
    }
    println!("{:<18} {:<8} {:>15} {:<22} NOTE", "TOKEN", "STATE", "EXPIRES (ms)", "USED BY");
    for t in &r.tokens {
        println!("{:<18} {:<8} {:>15} {:<22} {}", t.token_id, state(t), t.expires_at_ms, t.used_by, t.note);
    }
    Ok(())
}

pub async fn run_devices(cmd: DevicesCommand, json: bool) -> Result<()> {
    match cmd {
        DevicesCommand::List { target } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.list_devices(with_admin(&cred, ListDevicesRequest {})?).await.map_err(status_err)?.into_inner();
            if json {
                let rows: Vec<DeviceRow> = r
                    .devices
                    .iter()
                    .map(|d| DeviceRow {
                        device_id: d.device_id.clone(),
                        name: d.name.clone(),
                        enrolled_at_ms: d.enrolled_at_ms,
                        last_seen_ms: d.last_seen_ms,
                        revoked: d.revoked,
                        public_key_hex: d.public_key_hex.clone(),
                        key_rotated_at_ms: d.key_rotated_at_ms,
                    })
                    .collect();
                print_json(&rows)?;
            } else {
                println!("{:<22} {:<20} {:<8} {:>15}", "DEVICE", "NAME", "STATE", "LAST SEEN (ms)");
                for d in r.devices {
                    // Names from before names were checked at entry may hold anything.
                    let name = if crate::status::check_label("name", &d.name, 64).is_ok() { d.name.clone() } else { crate::status::echo(&d.name) };
                    println!("{:<22} {:<20} {:<8} {:>15}", d.device_id, name, if d.revoked { "revoked" } else { "active" }, d.last_seen_ms);
                }
            }
        }
        DevicesCommand::Revoke { target, id } => {
            let (mut c, cred) = admin_client(&target).await?;
            let r = c.revoke_device(with_admin(&cred, RevokeDeviceRequest { device_id: id.clone() })?).await.map_err(status_err)?.into_inner();
            emit(json, &Revoked { device_id: id, was_active: r.was_active }, |v| {
                if v.was_active {
                    println!("revoked {}", v.device_id);
                } else {
                    println!("{} was already revoked", v.device_id);
                }
            })?;
        }
    }
    Ok(())
}

pub async fn run_status(target: Target, json: bool) -> Result<()> {
    let (mut c, cred) = admin_client(&target).await?;
    let r = c.server_status(with_admin(&cred, ServerStatusRequest {})?).await.map_err(status_err)?.into_inner();
    let v = ServerStatus {
        backbone_version: r.backbone_version,
        devices: r.devices,
        active_devices: r.active_devices,
        uptime_seconds: r.uptime_seconds,
        version: r.version,
        global_version: r.global_version,
        tokens_outstanding: r.tokens_outstanding,
    };
    // The text form is the same document, indented.
    let pretty = serde_json::to_string_pretty(&v)?;
    emit(json, &v, |_| println!("{pretty}"))
}

/// `init` entry point for the binary.
pub fn run_init(home: &Path, names: &[String], json: bool) -> Result<()> {
    emit(json, &crate::init::init(home, names)?, |r| {
        println!("initialised {}", r.home.display());
        println!("  config:           {}", r.config.display());
        println!("  CA certificate:   {} (give it to devices: spa-client enroll --ca)", r.ca_cert.display());
        println!("  admin credential: {}", r.admin_credential.display());
    })
}

/// `rotate-credential` entry point for the binary.
pub fn run_rotate_credential(home: &Path, json: bool) -> Result<()> {
    let path = crate::init::rotate_admin_credential(home)?;
    #[derive(serde::Serialize)]
    struct Rotated<'a> {
        admin_credential: &'a Path,
    }
    emit(json, &Rotated { admin_credential: &path }, |r| println!("new admin credential in {} (the old one no longer works)", r.admin_credential.display()))
}

pub fn run_rotate_tls(home: &Path, names: &[String], json: bool) -> Result<()> {
    emit(json, &crate::init::rotate_tls(home, names)?, |r| {
        println!("new server key and certificate for {} in {} (devices trust the same CA); restart serve to use them", r.names.join(", "), r.cert.display())
    })
}
