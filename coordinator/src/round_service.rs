//! gRPC handlers of federated rounds: the device-facing Rounds service (signed calls) and
//! the Admin verbs that start, list, inspect and abort rounds. Inputs are checked here; the
//! round logic is in [`crate::rounds`].
use std::sync::Arc;

use spa_aggregation::strategy::StrategyName;
use spa_model::side::ParamSet;
use spa_proto::auth::{body_digest, sha256};
use spa_proto::limits::CHUNK_BYTES;
use spa_proto::methods;
use spa_proto::reason::invalid;
use spa_proto::secagg;
use spa_proto::tensor::{encode_f32, tensor_chunks};
use spa_proto::v1::rounds_server::Rounds as RoundsRpc;
use spa_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::rounds::{AnswerError, RoundPlan, RoundRecord};
use crate::state::{BoxStream, Shared};
use crate::status::internal;
use crate::store::DeviceRecord;

pub struct RoundsService(pub Arc<Shared>);

fn identity_pk(rec: &DeviceRecord) -> Result<[u8; 32], Status> {
    hex::decode(&rec.public_key_hex).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| internal("stored public key is not 32 bytes"))
}

/// A committed checkpoint as a stream of f32 tensor chunks.
pub async fn checkpoint_stream(s: &Shared, version: u64) -> Result<BoxStream<TensorChunk>, Status> {
    let bytes = s.store.checkpoint(version).await?.ok_or_else(|| Status::not_found(format!("no committed global version {version}")))?;
    let set = ParamSet::from_safetensors(&bytes).map_err(internal)?;
    let mut chunks = Vec::new();
    for (name, t) in &set.tensors {
        let raw = encode_f32(&t.values, DType::DtypeF32 as i32).map_err(internal)?;
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        chunks.extend(tensor_chunks(name, DType::DtypeF32 as i32, &shape, &raw, CHUNK_BYTES));
    }
    Ok(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok))))
}

/// The bytes of a masked upload after its header (u32 little-endian lanes), checked against the round and the
/// header's length and hash.
async fn read_upload(s: &Shared, device: &str, h: &MaskedUploadHeader, stream: &mut Streaming<MaskedUpload>) -> Result<Vec<u8>, Status> {
    let m = s.rounds.expected_lanes(h.round_id).ok_or_else(|| Status::failed_precondition(format!("round {} is not in progress", h.round_id)))?;
    // A device outside the cohort is refused before anything is buffered.
    if !s.rounds.holds_seat(device, h.round_id) {
        return Err(AnswerError::NotInCohort.into());
    }
    if h.lanes != m {
        return Err(invalid("header.lanes", format!("upload declares {} lanes, the session has {m}", h.lanes)));
    }
    if h.sha256.len() != 32 {
        return Err(invalid("header.sha256", "sha256 must be 32 bytes"));
    }
    // Buffered, then added in one step: a device that dies mid-upload is a dropout
    // rather than a partial vector that would make the sum unrecoverable.
    let mut buf = secagg::LaneBuffer::new(m);
    while let Some(msg) = stream.message().await? {
        let Some(masked_upload::Kind::Lanes(b)) = msg.kind else {
            return Err(Status::invalid_argument("a second header in one upload"));
        };
        buf.push(&b).map_err(|e| invalid("lanes", e))?;
    }
    let bytes = buf.finish().map_err(|e| invalid("lanes", e))?;
    if sha256(&bytes)[..] != h.sha256[..] {
        return Err(invalid("header.sha256", "upload does not match its declared SHA-256"));
    }
    Ok(bytes)
}

#[tonic::async_trait]
impl RoundsRpc for RoundsService {
    async fn poll(&self, req: Request<PollRequest>) -> Result<Response<PollResponse>, Status> {
        let rec = self.0.signed(&req, methods::ROUNDS_POLL).await?;
        Ok(Response::new(PollResponse { task: Some(self.0.rounds.poll(&rec.device_id)) }))
    }

    type GetGlobalStream = BoxStream<TensorChunk>;

    async fn get_global(&self, req: Request<GetGlobalRequest>) -> Result<Response<Self::GetGlobalStream>, Status> {
        // A committed version is the store's: the device's own member serves it.
        self.0.signed(&req, methods::ROUNDS_GET_GLOBAL).await?;
        Ok(Response::new(checkpoint_stream(&self.0, req.get_ref().version).await?))
    }

    async fn advertise_keys(&self, req: Request<AdvertiseKeysMsg>) -> Result<Response<Ack>, Status> {
        let rec = self.0.signed(&req, methods::ROUNDS_ADVERTISE_KEYS).await?;
        // Checked here so that a malformed message is the caller's error, its seat kept.
        secagg::advertise_from_wire(req.get_ref())?;
        self.0.rounds.advertise(&rec.device_id, identity_pk(&rec)?, req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn share_keys(&self, req: Request<ShareKeysMsg>) -> Result<Response<Ack>, Status> {
        let rec = self.0.signed(&req, methods::ROUNDS_SHARE_KEYS).await?;
        self.0.rounds.share_keys(&rec.device_id, req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn upload_masked(&self, req: Request<Streaming<MaskedUpload>>) -> Result<Response<Ack>, Status> {
        let hold = self.0.hold(req.metadata(), methods::ROUNDS_UPLOAD_MASKED).await?;
        let mut stream = req.into_inner();
        // The signature covers the header message, so it is checked once the header arrived.
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let rec = self.0.auth.check(hold, methods::ROUNDS_UPLOAD_MASKED, &body_digest(&first)).await?;
        let Some(masked_upload::Kind::Header(h)) = first.kind else {
            return Err(Status::invalid_argument("an upload starts with its header"));
        };
        let bytes = match read_upload(&self.0, &rec.device_id, &h, &mut stream).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.0.rounds.broken_upload(&rec.device_id, h.round_id, e.message());
                return Err(e);
            }
        };
        self.0.rounds.masked_input(&rec.device_id, h.round_id, h.client_id, bytes).await?;
        Ok(Response::new(Ack {}))
    }

    async fn unmask(&self, req: Request<UnmaskMsg>) -> Result<Response<Ack>, Status> {
        let rec = self.0.signed(&req, methods::ROUNDS_UNMASK).await?;
        self.0.rounds.unmask(&rec.device_id, req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn report_metrics(&self, req: Request<MetricsReport>) -> Result<Response<Ack>, Status> {
        let rec = self.0.signed(&req, methods::ROUNDS_REPORT_METRICS).await?;
        self.0.rounds.report_metrics(&rec.device_id, req.get_ref()).await?;
        Ok(Response::new(Ack {}))
    }
}

// ---- Admin verbs ------------------------------------------------------------------------

pub async fn start_rounds(s: &Shared, r: StartRoundsRequest) -> Result<StartRoundsResponse, Status> {
    // The parse error does not repeat the name: a reply never echoes what a caller sent.
    let strategy = r.strategy.parse::<StrategyName>().map_err(|e| invalid("strategy", e.to_string()))?;
    let plan = RoundPlan {
        rounds: r.rounds,
        min_clients: r.min_clients,
        max_clients: r.max_clients,
        deadline_secs: r.deadline_seconds,
        local_epochs: r.local_epochs,
        lr: r.lr,
        strategy,
        prox_mu: r.prox_mu,
        dp_l2_clip: r.dp_l2_clip,
        dp_noise_multiplier: r.dp_noise_multiplier,
    };
    let run_id = s.rounds.start_run(plan).await?;
    Ok(StartRoundsResponse { run_id })
}

fn info(r: &RoundRecord) -> RoundInfo {
    RoundInfo { round_id: r.round_id, state: r.state.name().into(), record_json: serde_json::to_string(r).expect("record serializes") }
}

/// A page of rounds (every round at once would outgrow the message limit: at 1000 devices a
/// record is ~40 KB).
pub async fn list_rounds(s: &Shared, r: &ListRoundsRequest) -> Result<ListRoundsResponse, Status> {
    let limit = match r.limit {
        0 => 100,
        n @ 1..=1000 => n as usize,
        n => return Err(invalid("limit", format!("limit must be at most 1000, got {n}"))),
    };
    let before = (r.before_round_id > 0).then_some(r.before_round_id);
    Ok(ListRoundsResponse { rounds: s.store.rounds_before(before, limit).await?.iter().map(info).collect() })
}

pub async fn round_info(s: &Shared, id: u64) -> Result<RoundInfo, Status> {
    let rec = if id == 0 {
        s.store.latest_round().await?.ok_or_else(|| Status::not_found("no rounds yet"))?
    } else {
        s.store.round(id).await?.ok_or_else(|| Status::not_found(format!("no round {id}")))?
    };
    Ok(info(&rec))
}

pub async fn abort_round(s: &Shared, id: u64) -> Result<AbortRoundResponse, Status> {
    let was_running = s.rounds.abort(id).await?;
    Ok(AbortRoundResponse { was_running })
}
