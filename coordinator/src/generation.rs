//! The Generate stream: a device's generation session, per-token or speculative (the
//! coordinator drafts, the device verifies; spa_model::speculative). This file validates
//! every message and keeps the session's bookkeeping; the backbone worker (`engine/`)
//! owns the KV cache and runs the drafts.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use spa_model::generate::Sampling;
use spa_model::side::ParamSet;
use spa_model::speculative::{CloudDown, DraftForm};
use spa_proto::methods;
use spa_proto::reason::{Reason, invalid};
use spa_proto::v1::*;
use tokio::sync::mpsc;
use tonic::{Code, Request, Status, Streaming};

use crate::auth::Ended;
use crate::engine::{Opening, encode_block};
use crate::state::{BoxStream, Shared};
use crate::status::internal;

/// Most stop ids an opening may name.
const MAX_STOP_IDS: usize = 64;

/// What a validated opening asks for, beside what the engine keeps.
struct Plan {
    opening: Opening,
    /// Bytes per position on the wire.
    position_bytes: usize,
}

/// Opens (or resumes) a session and serves its stream.
pub async fn serve(s: Arc<Shared>, req: Request<Streaming<GenerateRequest>>) -> Result<BoxStream<GenerateResponse>, Status> {
    // Sessions stay with the device's member: its KV cache is there.
    let hold = s.hold(req.metadata(), methods::BACKBONE_GENERATE).await?;
    let mut input = req.into_inner();
    // The session opens with its first message, which the request signature covers; a
    // stream that never sends it is not kept open.
    let wait = Duration::from_secs(s.config.limits.first_message_secs);
    let first = tokio::time::timeout(wait, input.message())
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no `open` message within {} s", wait.as_secs())))??
        .ok_or_else(|| Status::invalid_argument("a Generate stream must start with an `open` message"))?;
    let device = s.auth.check(hold, methods::BACKBONE_GENERATE, &spa_proto::auth::body_digest(&first)).await?;
    let Some(generate_request::Kind::Open(open)) = first.kind else {
        return Err(Status::invalid_argument("a Generate stream must start with an `open` message"));
    };
    let plan = check_open(&s, &open, device.device_id.clone()).await?;
    let max = s.config.limits.max_sessions_per_device;
    let device_slot = s
        .device_sessions
        .take(&device.device_id, max)
        .ok_or_else(|| Status::resource_exhausted(format!("this device already has {max} generation sessions open")))?;
    let permit = s.sessions.clone().try_acquire_owned().map_err(|_| {
        let max = s.config.limits.max_sessions;
        Status::resource_exhausted(format!("{max} generation sessions already open; retry later"))
    })?;
    let max_positions = plan.opening.max_positions;
    let (session, epoch, confirmed) = start_session(&s, &open, plan.opening).await?;
    let (tx, rx) = mpsc::channel::<Result<GenerateResponse, Status>>(4);
    let stream = Stream {
        s: s.clone(),
        _permit: permit,
        _device_slot: device_slot,
        device: device.device_id,
        key_hex: device.public_key_hex,
        session,
        epoch,
        last_only: open.last_only,
        dtype: open.dtype,
        position_bytes: plan.position_bytes,
        max_positions,
        confirmed,
        pending: 0,
    };
    tokio::spawn(stream.run(input, tx));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// A new session, or the resumed one: id, this stream's epoch, confirmed length.
async fn start_session(s: &Shared, open: &GenerateOpen, opening: Opening) -> Result<(u64, u64, usize), Status> {
    if open.resume_session != 0 {
        let length = open.resume_length as usize;
        let ok = s.engine.resume(open.resume_session, opening.owner, opening.fingerprint, length).await?;
        return match ok {
            Some(epoch) => Ok((open.resume_session, epoch, length)),
            None => Err(Status::not_found("no such generation session to resume (it idled out, or was not opened like this): open a new one")),
        };
    }
    let session = s.next_session.fetch_add(1, Ordering::SeqCst);
    s.engine.open(session, opening).await?;
    Ok((session, 0, 0))
}

/// The device's sampler as it sent it (checked by the caller); a field left out is off.
fn sampling_from_wire(x: &spa_proto::v1::Sampling) -> Sampling {
    let off = Sampling::default();
    Sampling {
        temperature: x.temperature,
        top_k: x.top_k as usize,
        top_p: x.top_p.unwrap_or(off.top_p),
        min_p: x.min_p,
        repeat_penalty: x.repeat_penalty.unwrap_or(off.repeat_penalty),
        repeat_last_n: x.repeat_last_n.map_or(off.repeat_last_n, |n| n as usize),
        presence_penalty: x.presence_penalty,
        frequency_penalty: x.frequency_penalty,
        seed: x.seed,
    }
}

async fn check_open(s: &Arc<Shared>, open: &GenerateOpen, owner: String) -> Result<Plan, Status> {
    s.check_version(&open.backbone_version)?;
    let layers = s.check_layers(&open.layers)?;
    let elem = Shared::check_dtype(open.dtype)?;
    let cfg = &s.engine.meta.config;
    let sampling = open.sampling.as_ref().map_or_else(Sampling::greedy, sampling_from_wire);
    sampling.validate().map_err(|e| invalid("open.sampling", e.to_string()))?;
    if open.stop.len() > MAX_STOP_IDS || open.stop.iter().any(|&t| t as usize >= cfg.vocab_size) {
        return Err(invalid("open.stop", format!("stop: at most {MAX_STOP_IDS} ids, each in the vocabulary")));
    }
    let form = match SideInputs::try_from(open.inputs) {
        Ok(SideInputs::Taps) => DraftForm::Taps(layers),
        Ok(SideInputs::Down) => DraftForm::Down { down: cloud_down(s, open, layers.len()).await?, taps: layers },
        Err(_) => return Err(invalid("open.inputs", format!("unknown side inputs {}", open.inputs))),
    };
    let mut bare = open.clone();
    (bare.resume_session, bare.resume_length) = (0, 0);
    let fingerprint = spa_proto::auth::sha256(&bare.encode_to_vec());
    let position_bytes = form.width(cfg.hidden_size) * elem;
    let side = match open.side_drafts {
        true => Some((s.config.side.clone(), global(s, open.global_version).await?)),
        false => None,
    };
    let max_positions = match open.max_positions as usize {
        0 => cfg.max_position_embeddings,
        n if n <= cfg.max_position_embeddings => n,
        n => return Err(invalid("open.max_positions", format!("max_positions {n} exceeds the context of {}", cfg.max_position_embeddings))),
    };
    let opening = Opening { owner, fingerprint, form, sampling, stop: open.stop.clone(), last_only: open.last_only, max_positions, side };
    Ok(Plan { opening, position_bytes })
}

/// The shared part of committed global version `v`.
async fn global(s: &Shared, v: u64) -> Result<ParamSet, Status> {
    let bytes = s.store.checkpoint(v).await?.ok_or_else(|| Status::failed_precondition(format!("no committed global version {v}")))?;
    ParamSet::from_safetensors(&bytes).map_err(internal)
}

/// The down-projections of global checkpoint `open.global_version`, if the device holds the
/// same ones (its digest); otherwise the device must ask for taps.
async fn cloud_down(s: &Shared, open: &GenerateOpen, taps: usize) -> Result<Arc<CloudDown>, Status> {
    let v = open.global_version;
    let unavailable = |why: String| Reason::DownProjectionsUnavailable.status(Code::FailedPrecondition, format!("{why}: ask for taps (SIDE_INPUTS_TAPS)"));
    // Only a version the store no longer keeps is the device's to work around; a store
    // failure stays the store's status.
    let Some(bytes) = s.store.checkpoint(v).await? else { return Err(unavailable(format!("no committed global version {v}"))) };
    let set = ParamSet::from_safetensors(&bytes).map_err(internal)?;
    let down = CloudDown::from_params(&set).map_err(|e| unavailable(format!("global version {v}: {e}")))?;
    if spa_proto::auth::sha256(&down.canonical_bytes()).as_slice() != open.down_digest.as_slice() {
        return Err(unavailable(format!("this device's down-projections differ from global version {v}'s")));
    }
    if down.taps() != taps {
        return Err(invalid("open.layers", format!("{taps} layers for {} down-projections", down.taps())));
    }
    Ok(Arc::new(down))
}

/// What becomes of a session when its stream ends: kept for a resume by the same device
/// (for `limits.session_idle_secs`, within the device's share of parked sessions), or closed
/// (refused, revoked or idle), with the status the device is told.
enum End {
    Park,
    Close(Status),
}

/// One open stream's bookkeeping, to check each message before the engine sees it.
struct Stream {
    s: Arc<Shared>,
    /// This stream's slot among `limits.max_sessions`, given back when the stream is dropped.
    _permit: tokio::sync::OwnedSemaphorePermit,
    _device_slot: crate::state::Held,
    /// Checked before each step: revoking a device, or rotating the key the stream was
    /// opened with, ends its open streams.
    device: String,
    key_hex: String,
    session: u64,
    epoch: u64,
    last_only: bool,
    dtype: i32,
    position_bytes: usize,
    /// The positions the session reserved.
    max_positions: usize,
    /// Tokens the device has confirmed, and drafts it has not yet judged.
    confirmed: usize,
    pending: usize,
}

impl Stream {
    /// Serves the stream's steps. A stream idle for `limits.session_idle_secs` (no message,
    /// or its answers not read) is closed with its session and gives back its slot.
    async fn run(mut self, mut input: Streaming<GenerateRequest>, tx: mpsc::Sender<Result<GenerateResponse, Status>>) {
        match self.serve(&mut input, &tx).await {
            End::Park => self.s.engine.detach(self.session, self.epoch),
            End::Close(e) => {
                let _ = tx.try_send(Err(e));
                self.s.engine.close(self.session, self.epoch)
            }
        }
    }

    async fn serve(&mut self, input: &mut Streaming<GenerateRequest>, tx: &mpsc::Sender<Result<GenerateResponse, Status>>) -> End {
        let idle = Duration::from_secs(self.s.config.limits.session_idle_secs);
        let idle_out = || End::Close(Status::deadline_exceeded(format!("generation session idle for {} s: closed", idle.as_secs())));
        loop {
            let msg = match tokio::time::timeout(idle, input.message()).await {
                Err(_) => return idle_out(),
                Ok(Ok(Some(m))) => m,
                // Finished, or cut between steps: a client's cancel arrives as a clean end,
                // so the server cannot tell them apart and keeps the cache for a resume.
                Ok(Ok(None)) => return End::Park,
                // A message that does not decode (spa_proto::codec) or is too large: the caller's.
                Ok(Err(e)) if matches!(e.code(), Code::InvalidArgument | Code::Internal | Code::OutOfRange | Code::ResourceExhausted) => {
                    return End::Close(Status::invalid_argument(format!("undecodable Generate message: {}", e.message())));
                }
                Ok(Err(e)) => {
                    tracing::debug!("generate stream broken: {e}");
                    return End::Park;
                }
            };
            match crate::auth::still_allowed(&self.s.store, &self.device, &self.key_hex).await {
                Ok(()) => {}
                Err(Ended::Revoked(e)) => return End::Close(e),
                Err(Ended::Rotated(e)) => {
                    let _ = tx.try_send(Err(e));
                    return End::Park;
                }
            }
            let resp = match self.step(msg).await {
                Ok(resp) => resp,
                Err(e) => return End::Close(e),
            };
            match tokio::time::timeout(idle, tx.send(Ok(resp))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return End::Park,
                Err(_) => return idle_out(),
            }
        }
    }

    async fn step(&mut self, msg: GenerateRequest) -> Result<GenerateResponse, Status> {
        let Some(generate_request::Kind::Extend(e)) = msg.kind else {
            return Err(Status::invalid_argument("only `extend` messages may follow `open`"));
        };
        let (accepted, draft) = (e.accepted as usize, e.draft as usize);
        if accepted > self.pending {
            return Err(invalid("extend.accepted", format!("{accepted} drafts accepted of {} sent", self.pending)));
        }
        let limit = self.s.config.limits.max_draft_tokens as usize;
        if draft > limit {
            return Err(invalid("extend.draft", format!("draft {draft} exceeds the limit of {limit} tokens")));
        }
        self.s.check_ids("extend.ids", &e.ids, self.confirmed + accepted)?;
        let after = self.confirmed + accepted + e.ids.len();
        if after > self.max_positions {
            let msg = format!("{after} positions exceed the {} this session reserved (open.max_positions)", self.max_positions);
            return Err(invalid("extend.ids", msg));
        }
        let rows = if self.last_only { 1 } else { e.ids.len() } + draft;
        let bytes = rows * self.position_bytes;
        let max_bytes = self.s.config.limits.max_message_bytes.saturating_sub(4096);
        if bytes > max_bytes {
            return Err(invalid("extend.ids", format!("this step would return {bytes} bytes, limit {max_bytes}: send fewer tokens")));
        }
        let n = e.ids.len();
        let block = self.s.engine.step(&self.device, self.session, self.epoch, accepted, e.ids, draft, e.side_draft).await?;
        self.confirmed += accepted + n;
        self.pending = block.drafts.len();
        Ok(GenerateResponse {
            first_position: block.first as u32,
            positions: block.positions as u32,
            features: encode_block(&block, self.dtype)?,
            draft: block.drafts,
            session: self.session,
        })
    }
}
