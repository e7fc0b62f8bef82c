//! `spa-client run`: the device agent. It polls the coordinator (with backoff when it is
//! unreachable) and does what each answer says:
//!
//! ```text
//! Train        fetch global version v, train the body (the side network) locally, keeping
//!              its best epoch on the validation split, quantize weight * (shared - v),
//!              start the SecAgg+ client machine, advertise keys
//! ShareKeys    encrypted shares for the neighbours
//! MaskedInput  decrypt the shares addressed to us, mask the update, upload it (streamed)
//! Unmask       reveal the shares the server asks for (never both kinds for one peer)
//! Evaluate     a new version was committed: adopt it as the body, fit the personal model
//!              against it (SPA v2, personal.rs), evaluate on the held-out split, report
//! Abort        forget the round's secrets
//! ```
//!
//! Only the shared part ever leaves the device, and only masked: the update is built from
//! [`SharedParams::delta_from`] (the one place a plugin's parameters become an outgoing
//! vector); the personal model is saved to the local store.
use std::path::Path;
use std::time::Duration;

use spa_aggregation::{ClientIncoming, ClientOutgoing, ClientState, Encoding, SessionConfig, system_rng};
use spa_model::BackendKind;
use spa_model::side::{Plugin, SharedParams};
use spa_model::train::{TrainConfig, train_plugin, train_with_validation};
use spa_proto::methods;
use spa_proto::reason::Reason;
use spa_proto::secagg;
use spa_proto::v1::poll_response::Task;
use spa_proto::v1::*;
use tonic::Code;

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::fault::{fault_point, garbage};
use crate::net::Session;
use crate::personal::local_splits;
use crate::remote::{Model, model, receive_params};
use crate::store::ClientStore;

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Exit after evaluating this many committed versions (None: run until stopped).
    pub rounds: Option<u32>,
    /// Longest wait between polls when the coordinator is unreachable.
    pub max_backoff: Duration,
    /// Where the device trains its plugin.
    pub backend: BackendKind,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self { rounds: None, max_backoff: Duration::from_secs(10), backend: BackendKind::default() }
    }
}

/// What the agent reports as it goes (the binary prints these).
#[derive(Debug)]
pub enum AgentEvent {
    Connected {
        device_id: String,
    },
    /// The coordinator polled does not run the rounds; the agent moves to the one that does.
    Redirected {
        to: String,
    },
    Unreachable {
        error: String,
        retry_in: Duration,
    },
    Trained {
        round_id: u64,
        version: u64,
        examples: usize,
        final_loss: f32,
    },
    Phase {
        round_id: u64,
        phase: &'static str,
    },
    RoundFailed {
        round_id: u64,
        error: String,
    },
    /// Held-out loss of the backbone alone, the adopted body alone (the global adapter) and
    /// the personal model fitted against it.
    Evaluated {
        round_id: u64,
        version: u64,
        backbone_loss: f64,
        global_loss: f64,
        personalized_loss: f64,
    },
}

/// What every step needs: the connection, the served model, the config. The store is opened
/// only by the steps that use it, so that `spa-client generate` and `status` can open it
/// while the agent waits between rounds (sled allows one process at a time).
struct Ctx<'a> {
    home: &'a Path,
    s: &'a Session,
    m: &'a Model,
    cfg: &'a ClientConfig,
    device: &'a spa_model::burn::tensor::Device,
}

/// A round this device takes part in.
struct InRound {
    round_id: u64,
    client_id: u32,
    state: ClientState,
    /// The encoded update (lanes, weight last), consumed when masking.
    input: Option<Vec<u32>>,
}

/// Runs the agent until `opts.rounds` versions were evaluated, or forever.
pub async fn run(home: &Path, opts: &AgentOptions, on_event: &mut dyn FnMut(AgentEvent)) -> Result<u32> {
    let cfg = ClientConfig::load(home)?;
    let device = opts.backend.device()?;
    let mut backoff = Duration::from_millis(500);
    let mut evaluated = 0u32;
    // The replica running the rounds, where a replica sent this device; None: the enrolled address.
    let mut route: Option<String> = None;
    loop {
        // (Re)connect, then poll until the connection fails.
        let (s, m) = match connect(home, &device, route.as_deref()).await {
            Ok(x) => x,
            Err(e) => {
                // A leader that went away: back to the enrolled address, which redirects anew.
                route = None;
                back_off(e, &mut backoff, opts.max_backoff, on_event).await?;
                continue;
            }
        };
        on_event(AgentEvent::Connected { device_id: s.identity.device_id.clone() });
        backoff = Duration::from_millis(500);
        let mut current: Option<InRound> = None;
        // A round this device left (an error mid-protocol): its later requests are ignored.
        let mut abandoned: Option<u64> = None;
        loop {
            let task = match s.rounds().poll(s.request(methods::ROUNDS_POLL, PollRequest {})).await {
                Ok(r) => r.into_inner().task,
                Err(e) => {
                    // A replica that does not run the rounds names the one that does.
                    route = Reason::leader_url(&e);
                    match &route {
                        Some(to) => on_event(AgentEvent::Redirected { to: to.clone() }),
                        None => back_off(e.into(), &mut backoff, opts.max_backoff, on_event).await?,
                    }
                    break;
                }
            };
            backoff = Duration::from_millis(500);
            let round_id = task_round(&task);
            let evaluating = matches!(task, Some(Task::Evaluate(_)));
            if round_id != 0 && abandoned == Some(round_id) && !evaluating && !matches!(task, Some(Task::Abort(_))) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let ctx = Ctx { home, s: &s, m: &m, cfg: &cfg, device: &device };
            match handle(&ctx, &mut current, task, on_event).await {
                Ok(Some(wait)) => tokio::time::sleep(wait).await,
                Ok(None) => {
                    if evaluating {
                        evaluated += 1;
                        if opts.rounds.is_some_and(|n| evaluated >= n) {
                            return Ok(evaluated);
                        }
                    }
                }
                Err(e) => {
                    fatal(&e)?;
                    current = None;
                    abandoned = Some(round_id);
                    // Another coordinator serves this device now: connect anew to find it.
                    let moved = matches!(&e, ClientError::Status(st) if Reason::owner_url(st).is_some());
                    on_event(AgentEvent::RoundFailed { round_id, error: e.to_string() });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if moved {
                        break;
                    }
                }
            }
        }
    }
}

/// Errors that no retry fixes: revoked or unknown device, a broken local store, a device key
/// that cannot be opened.
fn fatal(e: &ClientError) -> Result<()> {
    match e {
        ClientError::Status(s) if s.code() == Code::Unauthenticated || Reason::of(s) == Some(Reason::DeviceRevoked) => {
            Err(ClientError::Refused(s.message().into()))
        }
        ClientError::NotEnrolled | ClientError::Store(_) | ClientError::Key(_) => Err(ClientError::Invalid(e.to_string())),
        _ => Ok(()),
    }
}

/// An unreachable coordinator: report, wait, and double the wait (up to `max`); a fatal
/// error ends the agent instead.
async fn back_off(e: ClientError, backoff: &mut Duration, max: Duration, on_event: &mut dyn FnMut(AgentEvent)) -> Result<()> {
    fatal(&e)?;
    on_event(AgentEvent::Unreachable { error: e.to_string(), retry_in: *backoff });
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(max);
    Ok(())
}

/// A session at `url` (None: the enrolled address) and the device's model.
async fn connect(home: &Path, device: &spa_model::burn::tensor::Device, url: Option<&str>) -> Result<(Session, Model)> {
    let store = ClientStore::open(home)?;
    let s = Session::open_at(home, &store, url).await?;
    let m = model(&s, &store, device, &ClientConfig::load(home)?).await?;
    Ok((s, m))
}

fn task_round(t: &Option<Task>) -> u64 {
    match t {
        Some(Task::Train(t)) => t.round_id,
        Some(Task::ShareKeys(t)) => t.round_id,
        Some(Task::MaskedInput(t)) => t.round_id,
        Some(Task::Unmask(t)) => t.round_id,
        Some(Task::Evaluate(t)) => t.round_id,
        Some(Task::Abort(t)) => t.round_id,
        _ => 0,
    }
}

/// The machine of round `round_id`, taken out of `current` (it is put back after a step).
fn take_round(current: &mut Option<InRound>, round_id: u64) -> Result<InRound> {
    match current.take() {
        Some(r) if r.round_id == round_id => Ok(r),
        _ => Err(ClientError::Invalid(format!("not taking part in round {round_id} (restarted mid-round?)"))),
    }
}

fn one(out: Vec<ClientOutgoing>) -> Result<ClientOutgoing> {
    out.into_iter().next().ok_or_else(|| ClientError::Invalid("the SecAgg+ client produced no message".into()))
}

fn secagg_err(e: spa_aggregation::SecAggError) -> ClientError {
    ClientError::Invalid(format!("secure aggregation: {e}"))
}

/// One task; returns how long to wait before the next poll.
async fn handle(ctx: &Ctx<'_>, current: &mut Option<InRound>, task: Option<Task>, on_event: &mut dyn FnMut(AgentEvent)) -> Result<Option<Duration>> {
    let s = ctx.s;
    match task {
        None => Ok(Some(Duration::from_secs(1))),
        Some(Task::Idle(i)) => Ok(Some(Duration::from_millis(i.retry_after_ms.clamp(50, 10_000) as u64))),
        Some(Task::Train(t)) => {
            if current.as_ref().is_some_and(|r| r.round_id == t.round_id) {
                return Ok(Some(Duration::from_millis(200)));
            }
            *current = None;
            fault_point("training", t.round_id).await;
            let config = secagg::config_from_json(&t.session_config_json)?;
            if config.round_id != t.round_id || config.model_version != t.global_version {
                return Err(ClientError::Invalid("the session config names another round or version".into()));
            }
            let (input, examples, final_loss) = train_for_round(ctx, &t, &config).await?;
            let (state, adv) = ClientState::start(t.client_id, config, &s.signer, system_rng().map_err(secagg_err)?).map_err(secagg_err)?;
            s.rounds().advertise_keys(s.request(methods::ROUNDS_ADVERTISE_KEYS, secagg::advertise_to_wire(&adv))).await?;
            on_event(AgentEvent::Trained { round_id: t.round_id, version: t.global_version, examples, final_loss });
            *current = Some(InRound { round_id: t.round_id, client_id: t.client_id, state, input: Some(input) });
            Ok(None)
        }
        Some(Task::ShareKeys(t)) => {
            fault_point("share_keys", t.round_id).await;
            let mut r = take_round(current, t.round_id)?;
            let (state, out) = r.state.handle(ClientIncoming::ShareKeys(secagg::share_keys_request(&t)?)).map_err(secagg_err)?;
            let ClientOutgoing::ShareKeys(mut resp) = one(out)? else { return Err(ClientError::Invalid("unexpected SecAgg+ output".into())) };
            if garbage("share_keys", t.round_id) {
                resp.shares.pop();
            }
            s.rounds().share_keys(s.request(methods::ROUNDS_SHARE_KEYS, secagg::share_keys_to_wire(t.round_id, &resp))).await?;
            r.state = state;
            on_event(AgentEvent::Phase { round_id: t.round_id, phase: "share_keys" });
            *current = Some(r);
            Ok(None)
        }
        Some(Task::MaskedInput(t)) => {
            fault_point("masked_input", t.round_id).await;
            let mut r = take_round(current, t.round_id)?;
            let (state, _) = r.state.handle(ClientIncoming::MaskedInputRequest(secagg::masked_input_request(&t))).map_err(secagg_err)?;
            let input = r.input.take().ok_or_else(|| ClientError::Invalid("no update to mask".into()))?;
            let (state, out) = state.handle(ClientIncoming::Input(input)).map_err(secagg_err)?;
            let ClientOutgoing::MaskedInput(masked) = one(out)? else { return Err(ClientError::Invalid("unexpected SecAgg+ output".into())) };
            upload(s, t.round_id, r.client_id, &masked.into_vec(), garbage("masked_input", t.round_id)).await?;
            r.state = state;
            on_event(AgentEvent::Phase { round_id: t.round_id, phase: "masked_input" });
            *current = Some(r);
            Ok(None)
        }
        Some(Task::Unmask(t)) => {
            fault_point("unmask", t.round_id).await;
            let r = take_round(current, t.round_id)?;
            let (state, out) = r.state.handle(ClientIncoming::Unmask(secagg::unmask_request(&t))).map_err(secagg_err)?;
            let ClientOutgoing::Unmask(resp) = one(out)? else { return Err(ClientError::Invalid("unexpected SecAgg+ output".into())) };
            s.rounds().unmask(s.request(methods::ROUNDS_UNMASK, secagg::unmask_to_wire(t.round_id, &resp))).await?;
            on_event(AgentEvent::Phase { round_id: t.round_id, phase: "unmask" });
            *current = Some(InRound { round_id: t.round_id, client_id: r.client_id, state, input: None });
            Ok(None)
        }
        Some(Task::Evaluate(t)) => {
            *current = None;
            let h = evaluate_version(ctx, &t).await?;
            on_event(AgentEvent::Evaluated {
                round_id: t.round_id,
                version: t.global_version,
                backbone_loss: h.backbone.loss,
                global_loss: h.global.loss,
                personalized_loss: h.model.loss,
            });
            Ok(None)
        }
        Some(Task::Abort(t)) => {
            if current.as_ref().is_some_and(|r| r.round_id == t.round_id) {
                *current = None;
            }
            on_event(AgentEvent::RoundFailed { round_id: t.round_id, error: format!("aborted by the coordinator: {}", t.reason) });
            Ok(None)
        }
    }
}

/// Global version `v` from the coordinator, checked against the local plugin's layout.
async fn fetch_global(s: &Session, version: u64, layout: &SharedParams) -> Result<SharedParams> {
    let stream = s.global().get_global(s.request(methods::ROUNDS_GET_GLOBAL, GetGlobalRequest { version })).await?.into_inner();
    Ok(SharedParams::from_coordinator(receive_params(s, stream).await?, layout)?)
}

/// The body of global version `shared`.
fn body_of(m: &Model, cfg: &ClientConfig, device: &spa_model::burn::tensor::Device, shared: &SharedParams) -> Result<Plugin> {
    Ok(Plugin::new(&cfg.side, &m.config, device)?.load(shared.as_set())?)
}

/// Local training of the body for a round; returns the encoded update, the number of
/// training examples and the last epoch's loss. The trained body leaves only as the masked
/// update (the device keeps the committed versions it adopts).
async fn train_for_round(ctx: &Ctx<'_>, t: &TrainTask, config: &SessionConfig) -> Result<(Vec<u32>, usize, f32)> {
    let Ctx { home, s, m, cfg, device } = *ctx;
    let store = &ClientStore::open(home)?;
    let layout = Plugin::new(&cfg.side, &m.config, device)?.shared()?;
    let global = fetch_global(s, t.global_version, &layout).await?;
    let n_shared = layout.as_set().numel();
    let fits = match &config.encoding {
        Encoding::SignedTwosComplement { .. } => config.m == n_shared as u64 + 1,
        Encoding::DistributedDiscreteGaussian(dp) => dp.dim as usize == n_shared,
    };
    if !fits {
        return Err(ClientError::Invalid(format!(
            "the round aggregates {} lanes but this device's shared part has {n_shared} parameters (is client.toml's [side] the coordinator's?)",
            config.m
        )));
    }
    let body = body_of(m, cfg, device, &global)?;
    let splits = local_splits(s, store, m, &body, &mut ()).await?;
    let n_train = splits.train.examples.len();
    let tc = TrainConfig { epochs: t.local_epochs as usize, lr: t.lr, prox_mu: t.prox_mu, seed: t.seed, val_fraction: 0.0, ..cfg.train.clone() };
    let (trained, report) = tokio::task::block_in_place(|| {
        if splits.val.num_loss_tokens() > 0 {
            train_with_validation(body, &m.head, &splits.train, &splits.val, &tc, Some(&global), &mut |_| {})
        } else {
            train_plugin(body, &m.head, &splits.train, &tc, Some(&global), &mut |_| {})
        }
    })?;
    let final_loss = report.epoch_losses.last().copied().unwrap_or(f32::NAN);
    let delta = trained.shared()?.delta_from(&global)?;
    let mut rng = system_rng().map_err(secagg_err)?;
    let (input, weight) = config.encode_update(&delta, n_train as u32, &mut rng).map_err(secagg_err)?;
    dump_update(home, t.round_id, &delta, weight)?;
    Ok((input, n_train, final_loss))
}

/// Test-only (the `fault-injection` feature, `SPA_TEST_DUMP_UPDATES`): the plaintext update,
/// written to the device's own home so tests can compare the secure aggregate with it.
fn dump_update(home: &Path, round_id: u64, delta: &[f32], weight: u32) -> Result<()> {
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("SPA_TEST_DUMP_UPDATES").is_some() {
        let p = home.join(format!("update-round-{round_id}.json"));
        let body = serde_json::json!({ "delta": delta, "weight": weight });
        std::fs::write(&p, body.to_string()).map_err(crate::error::io(&p))?;
    }
    let _ = (home, round_id, delta, weight);
    Ok(())
}

/// Streams the masked vector: a signed header (lanes, SHA-256), then 1 MiB frames
/// (`corrupt`: fault injection, the bytes sent are not the ones hashed).
async fn upload(s: &Session, round_id: u64, client_id: u32, lanes: &[u32], corrupt: bool) -> Result<()> {
    let msgs = secagg::upload_messages(round_id, client_id, lanes, corrupt);
    let h = s.signer.sign(methods::ROUNDS_UPLOAD_MASKED, &msgs[0], crate::net::signing_time_ms());
    for msg in &msgs {
        s.record(methods::ROUNDS_UPLOAD_MASKED, msg);
    }
    let mut req = tonic::Request::new(tokio_stream::iter(msgs));
    h.apply(req.metadata_mut());
    s.rounds().upload_masked(req).await?;
    Ok(())
}

/// Adopts committed version `v` as the body, fits the personal model against it, saves
/// both, evaluates on the held-out split (the training split for devices with fewer than
/// ten examples) and reports the metrics.
async fn evaluate_version(ctx: &Ctx<'_>, t: &EvaluateTask) -> Result<crate::personal::Heldout> {
    let Ctx { home, s, m, cfg, device } = *ctx;
    let store = &ClientStore::open(home)?;
    let layout = Plugin::new(&cfg.side, &m.config, device)?.shared()?;
    let global = fetch_global(s, t.global_version, &layout).await?;
    let body = body_of(m, cfg, device, &global)?;
    let splits = local_splits(s, store, m, &body, &mut ()).await?;
    let seed = cfg.train.seed ^ t.global_version;
    let (model, heldout) = tokio::task::block_in_place(|| crate::personal::fit_model(&body, &m.head, &splits, &cfg.personal, seed))?;
    let h = match heldout {
        Some(h) => h,
        None => tokio::task::block_in_place(|| crate::personal::heldout(&model, &m.head, &splits.train))?,
    };
    let (e, bb) = (h.model, h.backbone);
    let record = crate::personal::record(m, &cfg.side, Some(t.global_version), &splits, heldout);
    let meta = crate::store::TrainedMeta { examples: splits.train.examples.len(), ..crate::ops::body_meta(m, cfg, &body)? };
    crate::personal::save(store, &meta, &model, &record)?;
    s.rounds()
        .report_metrics(s.request(
            methods::ROUNDS_REPORT_METRICS,
            MetricsReport {
                round_id: t.round_id,
                global_version: t.global_version,
                tokens: e.tokens as u64,
                backbone_loss: bb.loss,
                personalized_loss: e.loss,
                backbone_acc: bb.accuracy,
                personalized_acc: e.accuracy,
            },
        ))
        .await?;
    store.set_global_version(t.global_version)?;
    Ok(h)
}
