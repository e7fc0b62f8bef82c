//! Light devices for load and failover tests: each with its own enrolled identity and signed
//! calls over loopback TLS, running the SecAgg+ client machine on a random update instead of
//! training (training is what the agent process does in the other tests). Shared by
//! tests/load.rs and tests/deployment.rs.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use spa_aggregation::{ClientIncoming, ClientOutgoing, ClientState, system_rng};
use spa_proto::auth::{DeviceSigner, generate_pkcs8, now_ms, public_key_of};
use spa_proto::reason::Reason;
use spa_proto::v1::admin_client::AdminClient;
use spa_proto::v1::device_client::DeviceClient;
use spa_proto::v1::poll_response::Task;
use spa_proto::v1::rounds_client::RoundsClient;
use spa_proto::v1::*;
use spa_proto::{methods, secagg};
use tonic::transport::Channel;

/// What the devices sent: per round, the sum of the updates and how many; and, for devices
/// that keep them ([`Part::lenient`]), each update by (round, device).
#[derive(Default)]
pub struct Sent {
    pub sums: HashMap<u64, (Vec<f64>, usize)>,
    pub each: HashMap<(u64, String), Vec<f32>>,
}

pub type Sums = Arc<Mutex<Sent>>;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A device's part in the round it is in.
struct InRound {
    round_id: u64,
    client_id: u32,
    state: ClientState,
    input: Option<Vec<u32>>,
}

/// What a device does in the rounds: whether it uploads its masked vector (else it drops out
/// there), and whether its update is expected in the committed sum.
#[derive(Clone, Copy)]
pub struct Part {
    pub uploads: bool,
    pub counted: bool,
    /// A refused answer or an aborted round leaves the round instead of failing the device
    /// (its shard's aggregator may die); its updates are kept by device.
    pub lenient: bool,
    /// SIGKILLs a process (an aggregator) when the first device gets a request of a phase.
    pub kill: Option<Kill>,
}

/// Which process to SIGKILL, at the first request of `phase` in `round` that any device gets.
#[derive(Clone, Copy, Debug)]
pub struct Kill {
    pub pid: u32,
    pub round: u64,
    pub phase: Phase,
}

/// The requests of a round, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Train,
    ShareKeys,
    MaskedInput,
    Unmask,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Train, Phase::ShareKeys, Phase::MaskedInput, Phase::Unmask];
}

static KILLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Carries out `part`'s kill if this is its request (once per test process).
fn maybe_kill(part: Part, round: u64, phase: Phase) -> Result<(), Error> {
    if let Some(k) = part.kill
        && (k.round, k.phase) == (round, phase)
        && !KILLED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        std::process::Command::new("kill").args(["-9", &k.pid.to_string()]).status()?;
    }
    Ok(())
}

/// Lets the next test in this process kill again.
pub fn rearm_kill() {
    KILLED.store(false, std::sync::atomic::Ordering::SeqCst);
}

pub const FULL: Part = Part { uploads: true, counted: true, lenient: false, kill: None };

/// Where a device's calls go: its home coordinator, or the leader a follower sent it to.
#[derive(Clone)]
pub struct Link {
    pub home: Channel,
    /// The deployment's CA (to reach a leader it is sent to).
    pub ca: Arc<Vec<u8>>,
}

fn rounds_client(ch: Channel) -> RoundsClient<Channel> {
    RoundsClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

/// One light device: polls and answers until it evaluated `rounds` committed versions. Sent
/// to a leader (`NOT_LEADER`), it polls there until that fails, then goes home again; while
/// no one leads (UNAVAILABLE) it waits.
pub async fn device(link: Link, signer: DeviceSigner, seed: u64, rounds: usize, sums: Sums, part: Part) -> Result<(), Error> {
    let home = rounds_client(link.home.clone());
    let mut rpc = home.clone();
    let mut away = false;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut cur: Option<InRound> = None;
    let mut evaluated = 0;
    while evaluated < rounds {
        let task = match rpc.clone().poll(signer.request(methods::ROUNDS_POLL, PollRequest {})).await {
            Ok(r) => r.into_inner().task,
            Err(e) => {
                // A leader that died may still be named until another takes its lease.
                let leader = match Reason::leader_url(&e) {
                    Some(url) => spa_coordinator::net::connect(&url, &link.ca).await.ok(),
                    None => None,
                };
                if let Some(ch) = leader {
                    (rpc, away) = (rounds_client(ch), true);
                } else if away || part.lenient || e.code() == tonic::Code::Unavailable {
                    (rpc, away) = (home.clone(), false);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    return Err(e.into());
                }
                continue;
            }
        };
        match step(&mut rpc.clone(), &signer, &mut rng, &mut cur, task, &sums, part).await {
            Ok(done) => evaluated += usize::from(done),
            Err(_) if part.lenient => {
                cur = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A device's answer to one task; true once it evaluated a committed version.
async fn step(
    rpc: &mut RoundsClient<Channel>,
    signer: &DeviceSigner,
    rng: &mut ChaCha20Rng,
    cur: &mut Option<InRound>,
    task: Option<Task>,
    sums: &Sums,
    part: Part,
) -> Result<bool, Error> {
    match task {
        None => tokio::time::sleep(Duration::from_secs(1)).await,
        Some(Task::Idle(i)) => tokio::time::sleep(Duration::from_millis(i.retry_after_ms.clamp(50, 10_000) as u64)).await,
        Some(Task::Train(t)) => {
            if cur.as_ref().is_some_and(|r| r.round_id == t.round_id) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(false);
            }
            maybe_kill(part, t.round_id, Phase::Train)?;
            let config = secagg::config_from_json(&t.session_config_json)?;
            let quant = config.quant_params().ok_or("no quantization")?;
            let delta: Vec<f32> = (0..config.m - 1).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.1).collect();
            let input = quant.encode(&delta, 1, rng)?;
            let (state, adv) = ClientState::start(t.client_id, config, signer, system_rng()?)?;
            rpc.advertise_keys(signer.request(methods::ROUNDS_ADVERTISE_KEYS, secagg::advertise_to_wire(&adv))).await?;
            let mut g = sums.lock().unwrap();
            if part.counted {
                let (sum, n) = g.sums.entry(t.round_id).or_insert_with(|| (vec![0.0; delta.len()], 0));
                sum.iter_mut().zip(&delta).for_each(|(s, d)| *s += *d as f64);
                *n += 1;
            }
            if part.lenient {
                g.each.insert((t.round_id, signer.device_id().to_string()), delta);
            }
            *cur = Some(InRound { round_id: t.round_id, client_id: t.client_id, state, input: Some(input) });
        }
        Some(Task::ShareKeys(t)) => {
            maybe_kill(part, t.round_id, Phase::ShareKeys)?;
            let r = cur.take().filter(|r| r.round_id == t.round_id).ok_or("share_keys outside a round")?;
            let (state, out) = r.state.handle(ClientIncoming::ShareKeys(secagg::share_keys_request(&t)?))?;
            let Some(ClientOutgoing::ShareKeys(resp)) = out.into_iter().next() else { return Err("no shares".into()) };
            rpc.share_keys(signer.request(methods::ROUNDS_SHARE_KEYS, secagg::share_keys_to_wire(t.round_id, &resp))).await?;
            *cur = Some(InRound { state, ..r });
        }
        Some(Task::MaskedInput(t)) => {
            maybe_kill(part, t.round_id, Phase::MaskedInput)?;
            let mut r = cur.take().filter(|r| r.round_id == t.round_id).ok_or("masked_input outside a round")?;
            if !part.uploads {
                // Offered again at every poll until the phase's deadline; never answered.
                *cur = Some(r);
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(false);
            }
            let (state, _) = r.state.handle(ClientIncoming::MaskedInputRequest(secagg::masked_input_request(&t)))?;
            let (state, out) = state.handle(ClientIncoming::Input(r.input.take().ok_or("no input")?))?;
            let Some(ClientOutgoing::MaskedInput(masked)) = out.into_iter().next() else { return Err("no masked input".into()) };
            upload(rpc, signer, t.round_id, r.client_id, &masked.into_vec()).await?;
            *cur = Some(InRound { state, ..r });
        }
        Some(Task::Unmask(t)) => {
            maybe_kill(part, t.round_id, Phase::Unmask)?;
            let r = cur.take().filter(|r| r.round_id == t.round_id).ok_or("unmask outside a round")?;
            let (state, out) = r.state.handle(ClientIncoming::Unmask(secagg::unmask_request(&t)))?;
            let Some(ClientOutgoing::Unmask(resp)) = out.into_iter().next() else { return Err("no reveal".into()) };
            rpc.unmask(signer.request(methods::ROUNDS_UNMASK, secagg::unmask_to_wire(t.round_id, &resp))).await?;
            *cur = Some(InRound { state, ..r });
        }
        Some(Task::Evaluate(t)) => {
            *cur = None;
            // Reported, the version is not offered again.
            let m = MetricsReport {
                round_id: t.round_id,
                global_version: t.global_version,
                tokens: 1,
                backbone_loss: 1.0,
                personalized_loss: 1.0,
                ..Default::default()
            };
            rpc.report_metrics(signer.request(methods::ROUNDS_REPORT_METRICS, m)).await?;
            return Ok(true);
        }
        Some(Task::Abort(_)) if part.lenient => *cur = None,
        Some(Task::Abort(t)) => return Err(format!("round {} aborted: {}", t.round_id, t.reason).into()),
    }
    Ok(false)
}

pub async fn upload(rpc: &mut RoundsClient<Channel>, signer: &DeviceSigner, round_id: u64, client_id: u32, lanes: &[u32]) -> Result<(), Error> {
    let msgs = secagg::upload_messages(round_id, client_id, lanes, false);
    let h = signer.sign(methods::ROUNDS_UPLOAD_MASKED, &msgs[0], now_ms());
    let mut req = tonic::Request::new(tokio_stream::iter(msgs));
    h.apply(req.metadata_mut());
    rpc.upload_masked(req).await?;
    Ok(())
}

/// A new device: a token from the admin service (credential `cred`), a fresh key, enrolled.
pub async fn enroll(ch: &Channel, cred: &str, name: &str) -> DeviceSigner {
    let mut req = tonic::Request::new(CreateTokenRequest { ttl_seconds: 600, note: String::new() });
    req.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().unwrap());
    let token = AdminClient::new(ch.clone()).create_token(req).await.unwrap().into_inner().token;
    let pkcs8 = generate_pkcs8().unwrap();
    let public_key = public_key_of(&pkcs8).unwrap().to_vec();
    let id = DeviceClient::new(ch.clone()).enroll(EnrollRequest { token, public_key, name: name.into() }).await.unwrap().into_inner().device_id;
    DeviceSigner::from_pkcs8(&pkcs8, id).unwrap()
}
