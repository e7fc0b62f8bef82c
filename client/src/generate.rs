//! `spa-client generate`: the coordinator's backbone (one Generate session, its KV cache on
//! the coordinator) and the device's personal model (SPA v2: side networks, memory, gate). Speculative by default: the
//! coordinator drafts, this device verifies (spa_model::speculative), a few round trips
//! per generated token instead of one; `naive` keeps one round trip per token.
use std::path::Path;
use std::time::Duration;

use prost::Message;
use serde::Serialize;
use spa_model::BackendKind;
use spa_model::generate::{Decoding, Sampling, SideInputs, TextSink};
use spa_model::side::{Plugin, SideVariant};
use spa_model::speculative::{self, Block, CloudDown, DraftSource, SpecStats};
use spa_proto::methods;
use spa_proto::reason::Reason;
use spa_proto::tensor::{decode_f32, dtype_size};
use spa_proto::v1::*;
use tokio::sync::mpsc;

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::net::Session;
use crate::remote::{Model, model};
use crate::store::ClientStore;

/// What the device asks for per position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Inputs {
    /// `down` when this device's down-projections are a committed global version's, else `taps`.
    #[default]
    Auto,
    /// Every tap's hidden state (d floats per tap).
    Taps,
    /// The coordinator applies the shared down-projections (d / r floats per tap).
    Down,
}

/// The sampler's command-line flags (`spa-client generate`, `spa model generate`, `spa
/// generate-bench`), as llama.cpp's: penalties, then top-k, top-p, min-p, then the temperature.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy (the most likely token after the penalties).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities sum to at least p (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the tokens at least this fraction as likely as the most likely (0 = all).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    /// Penalize the tokens of the last --repeat-last-n (1 = off; llama.cpp's users often take 1.1).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f64,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtracted from the logit of a token in that window (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f64,
    /// Subtracted per occurrence in that window (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}

/// How `spa-client generate` decodes.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Greedy at temperature 0.
    pub sampling: Sampling,
    /// End once the generated text contains this.
    pub stop: Option<String>,
    /// Wrap the prompt in the model's chat template.
    pub chat: bool,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// One round trip per token, no drafts.
    pub naive: bool,
    /// Most tokens drafted per round trip (the draft length adapts below it).
    pub max_draft: usize,
    pub inputs: Inputs,
    /// Let the coordinator draft from the global side plugin after tokens the gate gave to
    /// the side, where side drafts are accepted more than backbone drafts (with a plugin from
    /// federated rounds).
    pub side_drafts: bool,
    /// Reach the coordinator here instead of at the enrolled address.
    pub coordinator: Option<String>,
    /// Where the device runs its personal model.
    pub backend: BackendKind,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 200,
            sampling: Sampling::greedy(),
            stop: None,
            chat: false,
            ignore_eos: false,
            naive: false,
            max_draft: 16,
            inputs: Inputs::Auto,
            side_drafts: true,
            coordinator: None,
            backend: BackendKind::default(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GenerateReport {
    pub prompt: String,
    pub text: String,
    pub tokens: usize,
    /// Tokens the personal model spoke (the gate routed the rest to the backbone).
    pub side_tokens: usize,
    pub round_trips: usize,
    /// Drafted tokens received and accepted (0 for naive decoding).
    pub drafted: usize,
    pub accepted: usize,
    /// What the device asked for per position: taps or down.
    pub inputs: SideInputs,
    /// gRPC message bytes of the Generate stream, each way.
    pub bytes_sent: usize,
    pub bytes_received: usize,
    pub reconnects: usize,
    /// Decoding alone (the stream open to the last token), and the whole command.
    pub decode_seconds: f64,
    pub seconds: f64,
}

/// Personalized generation. Ends after `max_tokens`, at the model's end of sequence, or
/// once the text contains `stop`; `on_text` sees each new piece of text.
pub async fn generate(home: &Path, prompt: &str, opts: &GenerateOptions, on_text: &mut dyn FnMut(&str)) -> Result<GenerateReport> {
    let started = std::time::Instant::now();
    let store = ClientStore::open(home)?;
    let s = Session::open_at(home, &store, opts.coordinator.as_deref()).await?;
    let device = opts.backend.device()?;
    let m = model(&s, &store, &device, &ClientConfig::load(home)?).await?;
    let (personal, record) = crate::personal::load(&store, &m, &device)?;
    let plugin = &personal.body;
    let global = record.global_version;
    // Release the store: a `run` agent on this home may need it while we generate.
    drop(store);
    let mut ids = m.tokens.prompt_ids(&m.tokenizer, prompt, opts.chat)?;
    if ids.is_empty() {
        return Err(ClientError::Invalid("the prompt is empty (or has no known token)".into()));
    }
    let ctx = m.config.max_position_embeddings;
    if ids.len() >= ctx {
        ids.drain(..ids.len() + 1 - ctx);
    }
    let dec = Decoding { max_new: opts.max_tokens, sampling: opts.sampling.clone(), stop: if opts.ignore_eos { vec![] } else { m.tokens.eos.clone() } };
    let own_down = !personal.reads_body_down();
    let down = match (opts.inputs, global) {
        (Inputs::Taps, _) => None,
        (Inputs::Down, None) => return Err(ClientError::Invalid("--inputs down needs a body from federated rounds (`spa-client run`)".into())),
        (Inputs::Down, Some(_)) if own_down => {
            return Err(ClientError::Invalid("--inputs down: this device's personal side network has down-projections of its own; use --inputs taps".into()));
        }
        (Inputs::Auto, None) => None,
        (Inputs::Auto, _) if own_down => None,
        (_, Some(_)) => Some(CloudDown::from_params(plugin.shared()?.as_set())?),
    };
    let decoding = std::time::Instant::now();
    let side = opts.side_drafts;
    // The coordinator reserves this much KV cache for the session.
    let positions = (ids.len() + dec.max_new.max(1)).min(ctx);
    let mut remote = match RemoteDrafts::open(&s, &m, plugin, &dec, positions, global, down.as_ref(), side).await {
        // Locally trained since: the coordinator's down-projections are not this plugin's.
        Err(ClientError::Status(st)) if Reason::of(&st) == Some(Reason::DownProjectionsUnavailable) && down.is_some() && opts.inputs == Inputs::Auto => {
            tracing::info!("down-projections refused ({}); asking for taps", st.message());
            RemoteDrafts::open(&s, &m, plugin, &dec, positions, global, None, side).await?
        }
        other => other?,
    };
    let max_draft = if opts.naive { 0 } else { opts.max_draft };
    let mut text = TextSink::new(&m.tokenizer, &dec.stop, opts.stop.as_deref(), on_text);
    let (layers, inputs) = (plugin.shape.feature_layers.clone(), remote.inputs);
    let (g, stats) = tokio::task::block_in_place(|| {
        speculative::generate(&mut remote, &m.head, Some(&personal), &layers, inputs, &ids, &dec, max_draft, &mut |id, _| text.token(id))
    })?;
    let text = text.finish()?;
    let SpecStats { round_trips, drafted, accepted, .. } = stats;
    Ok(GenerateReport {
        prompt: prompt.into(),
        text,
        tokens: g.ids.len(),
        side_tokens: g.from_side.iter().filter(|&&x| x).count(),
        round_trips,
        drafted,
        accepted,
        inputs,
        bytes_sent: remote.bytes_sent,
        bytes_received: remote.bytes_received,
        reconnects: remote.reconnects,
        decode_seconds: decoding.elapsed().as_secs_f64(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The coordinator's Generate stream as a [`DraftSource`]. A broken stream is reopened
/// with a resume of the same session (its KV cache kept on the coordinator), so the
/// generation goes on where it was.
struct RemoteDrafts<'a> {
    s: &'a Session,
    open: GenerateOpen,
    tx: mpsc::Sender<GenerateRequest>,
    rx: tonic::Streaming<GenerateResponse>,
    session: u64,
    inputs: SideInputs,
    /// Floats per position of each slot.
    widths: Vec<usize>,
    max_positions: usize,
    /// Tokens the coordinator holds that this device has confirmed.
    confirmed: usize,
    bytes_sent: usize,
    bytes_received: usize,
    reconnects: usize,
}

/// Reconnect attempts per step, and the first pause between them (doubling).
const RESUME_TRIES: u32 = 4;
const RESUME_PAUSE: Duration = Duration::from_millis(200);

impl<'a> RemoteDrafts<'a> {
    /// `positions`: the most the session will hold; `global`: the committed version the
    /// plugin's shared part is; `down`: its down-projections, if the coordinator is to apply them.
    #[allow(clippy::too_many_arguments)]
    async fn open(
        s: &'a Session,
        m: &Model,
        plugin: &Plugin,
        dec: &Decoding,
        positions: usize,
        global: Option<u64>,
        down: Option<&CloudDown>,
        side_drafts: bool,
    ) -> Result<Self> {
        let d = m.config.hidden_size;
        let (inputs, layers, widths) = match down {
            Some(cd) => (SideInputs::Down, plugin.shape.taps.clone(), std::iter::once(d).chain(plugin.shape.taps.iter().map(|_| cd.d_side())).collect()),
            None => (SideInputs::Taps, plugin.shape.feature_layers.clone(), vec![d; plugin.shape.feature_layers.len()]),
        };
        let sampling = &dec.sampling;
        let open = GenerateOpen {
            backbone_version: m.info.backbone_version.clone(),
            layers: layers.iter().map(|&x| x as u32).collect(),
            // f16 with down-projections: a quarter of f32 taps' bytes before the reduction.
            dtype: if inputs == SideInputs::Down { DType::DtypeF16 } else { m.wire_dtype() } as i32,
            inputs: if inputs == SideInputs::Down { spa_proto::v1::SideInputs::Down } else { spa_proto::v1::SideInputs::Taps } as i32,
            global_version: global.unwrap_or(0),
            down_digest: down.map_or(vec![], |cd| spa_proto::auth::sha256(&cd.canonical_bytes()).to_vec()),
            sampling: Some(spa_proto::v1::Sampling {
                temperature: sampling.temperature,
                top_k: sampling.top_k as u32,
                seed: sampling.seed,
                top_p: Some(sampling.top_p),
                min_p: sampling.min_p,
                repeat_penalty: Some(sampling.repeat_penalty),
                repeat_last_n: Some(sampling.repeat_last_n as u32),
                presence_penalty: sampling.presence_penalty,
                frequency_penalty: sampling.frequency_penalty,
            }),
            stop: dec.stop.clone(),
            // The ladder side attends over every position; the mlp side reads one.
            last_only: plugin.config.variant != SideVariant::Ladder,
            resume_session: 0,
            resume_length: 0,
            // The coordinator's copy drafts from the last position alone: the mlp side.
            side_drafts: side_drafts && global.is_some() && plugin.config.variant == SideVariant::Mlp,
            max_positions: positions as u32,
        };
        let (tx, rx, bytes) = Self::connect(s, &open).await?;
        Ok(Self { s, open, tx, rx, session: 0, inputs, widths, max_positions: positions, confirmed: 0, bytes_sent: bytes, bytes_received: 0, reconnects: 0 })
    }

    /// Opens a stream with `open` as its signed first message.
    async fn connect(s: &Session, open: &GenerateOpen) -> Result<(mpsc::Sender<GenerateRequest>, tonic::Streaming<GenerateResponse>, usize)> {
        let (tx, rx) = mpsc::channel::<GenerateRequest>(4);
        let first = GenerateRequest { kind: Some(generate_request::Kind::Open(open.clone())) };
        s.record(methods::BACKBONE_GENERATE, &first);
        // The signature covers the opening message.
        let h = s.signer.sign(methods::BACKBONE_GENERATE, &first, crate::net::signing_time_ms());
        let bytes = first.encoded_len();
        tx.send(first).await.map_err(|_| closed())?;
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        h.apply(req.metadata_mut());
        let rx = s.backbone().generate(req).await?.into_inner();
        Ok((tx, rx, bytes))
    }

    /// One request and its answer on the current stream.
    async fn exchange(&mut self, ext: GenerateExtend) -> Result<GenerateResponse> {
        let req = GenerateRequest { kind: Some(generate_request::Kind::Extend(ext)) };
        self.bytes_sent += req.encoded_len();
        self.tx.send(req).await.map_err(|_| closed())?;
        let resp = self.s.next(&mut self.rx).await?.ok_or_else(closed)?;
        self.bytes_received += resp.encoded_len();
        Ok(resp)
    }

    /// The step, reconnecting (resuming the session at `base` confirmed tokens) when the
    /// stream breaks; a refusal by the coordinator is returned as it is.
    async fn step_async(&mut self, accepted: usize, ids: &[u32], k: usize, side: bool) -> Result<Block> {
        let base = self.confirmed + accepted;
        let mut ext = GenerateExtend { ids: ids.to_vec(), accepted: accepted as u32, draft: k as u32, side_draft: side };
        let mut pause = RESUME_PAUSE;
        let mut tries = 0;
        let mut refused = None;
        let resp = loop {
            match self.exchange(ext.clone()).await {
                Ok(r) => break r,
                Err(e) if broken(&e) && self.session != 0 && tries < RESUME_TRIES => {
                    tries += 1;
                    tracing::info!("generation stream broke ({e}); resuming session {}", self.session);
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    let mut open = self.open.clone();
                    (open.resume_session, open.resume_length) = (self.session, base as u32);
                    match Self::connect(self.s, &open).await {
                        Ok((tx, rx, bytes)) => {
                            (self.tx, self.rx) = (tx, rx);
                            self.bytes_sent += bytes;
                            self.reconnects += 1;
                            // The resumed session holds `base` tokens and no drafts.
                            ext.accepted = 0;
                        }
                        Err(e) => refused = Some(e),
                    }
                }
                Err(e) => {
                    return Err(match refused {
                        Some(r) => ClientError::Invalid(format!("{e}; resuming the session failed: {r}")),
                        None => e,
                    });
                }
            }
        };
        self.session = resp.session;
        self.confirmed = base + ids.len();
        self.block(resp)
    }

    fn block(&self, resp: GenerateResponse) -> Result<Block> {
        let n = resp.positions as usize;
        let width: usize = self.widths.iter().sum();
        let elem = dtype_size(self.open.dtype)?;
        if resp.features.len() != n * width * elem || resp.draft.len() >= n.max(1) {
            return Err(ClientError::Invalid(format!("coordinator returned {n} positions / {} bytes / {} drafts", resp.features.len(), resp.draft.len())));
        }
        let vals = decode_f32(&resp.features, self.open.dtype, "generation features")?;
        let mut states: Vec<Vec<f32>> = self.widths.iter().map(|w| Vec::with_capacity(n * w)).collect();
        for row in vals.chunks_exact(width) {
            let mut at = 0;
            for (slot, w) in states.iter_mut().zip(&self.widths) {
                slot.extend_from_slice(&row[at..at + w]);
                at += w;
            }
        }
        Ok(Block { first: resp.first_position as usize, positions: n, states, drafts: resp.draft })
    }
}

fn closed() -> ClientError {
    ClientError::Invalid("the coordinator ended the generation stream".into())
}

/// A transport failure (worth a resume), not a refusal.
fn broken(e: &ClientError) -> bool {
    match e {
        ClientError::Status(s) => {
            matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Aborted | tonic::Code::DeadlineExceeded)
        }
        ClientError::Transport(_) => true,
        ClientError::Invalid(_) => true,
        _ => false,
    }
}

impl DraftSource for RemoteDrafts<'_> {
    fn max_positions(&self) -> usize {
        self.max_positions
    }
    fn step(&mut self, accepted: usize, ids: &[u32], k: usize, side: bool) -> spa_model::Result<Block> {
        // Called from inside `block_in_place` on a multi-thread runtime.
        tokio::runtime::Handle::current()
            .block_on(self.step_async(accepted, ids, k, side))
            .map_err(|e| spa_model::ModelError::InvalidInput(format!("backbone stream: {e}")))
    }
}
