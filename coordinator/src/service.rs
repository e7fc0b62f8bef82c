//! The gRPC services: Device (enrollment, ping), Admin (tokens, devices, status) and
//! Backbone (model info, frozen head, features; generation sessions in `generation.rs`).
//! Every input is validated before it reaches the store or the backbone worker (the
//! backbone's checks are on [`Shared`], which generation shares).
use std::sync::Arc;

use spa_proto::auth::{now_ms, random_bytes};
use spa_proto::limits::{CHUNK_BYTES, MAX_DEVICE_NAME};
use spa_proto::methods;
use spa_proto::reason::invalid;
use spa_proto::tensor::{feature_chunks, tensor_chunks_lazy};
use spa_proto::v1::admin_server::Admin;
use spa_proto::v1::backbone_server::Backbone;
use spa_proto::v1::device_server::Device;
use spa_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::SeqJob;
use crate::state::{BoxStream, Shared};
use crate::store::{StoreError, TokenRecord, token_hash};

pub struct DeviceService(pub Arc<Shared>);
pub struct AdminService(pub Arc<Shared>);
pub struct BackboneService(pub Arc<Shared>);

#[tonic::async_trait]
impl Device for DeviceService {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        if !self.0.enroll_attempts.allowed(peer) {
            return Err(Status::resource_exhausted("too many failed enrollment attempts from this address; wait a minute"));
        }
        let r = req.into_inner();
        if r.token.is_empty() || r.token.len() > 256 {
            return Err(invalid("token", "token must be 1..=256 characters"));
        }
        spa_proto::auth::check_public_key(&r.public_key)?;
        crate::status::check_label("name", &r.name, MAX_DEVICE_NAME)?;
        let s = &self.0;
        let rec = s.store.enroll(&token_hash(&r.token), &r.public_key, &r.name, now_ms()).await.map_err(|e| {
            if matches!(e, StoreError::UnknownToken | StoreError::TokenUsed | StoreError::TokenExpired | StoreError::TokenRevoked) {
                s.enroll_attempts.failed(peer);
            }
            tracing::warn!("enrollment refused: {e}");
            Status::from(e)
        })?;
        tracing::info!(device = %rec.device_id, name = %rec.name, "device enrolled");
        Ok(Response::new(EnrollResponse { device_id: rec.device_id, backbone_version: s.engine.meta.version.clone() }))
    }

    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let rec = self.0.signed(&req, methods::DEVICE_PING).await?;
        crate::fault::stall_point(methods::DEVICE_PING).await;
        Ok(Response::new(PingResponse { device_id: rec.device_id, server_time_ms: now_ms(), backbone_version: self.0.engine.meta.version.clone() }))
    }

    async fn rotate_key(&self, req: Request<RotateKeyRequest>) -> Result<Response<RotateKeyResponse>, Status> {
        let rec = self.0.signed(&req, methods::DEVICE_ROTATE_KEY).await?;
        let r = req.into_inner();
        spa_proto::auth::check_public_key(&r.new_public_key)?;
        spa_proto::auth::verify_rotation(&rec.device_id, &r.new_public_key, &r.proof)
            .map_err(|_| invalid("proof", "proof is not the new key's signature of the rotation message"))?;
        let now = now_ms();
        self.0.store.rotate_key(&rec.device_id, &rec.public_key_hex, &r.new_public_key, now).await?;
        tracing::info!(device = %rec.device_id, "device key rotated");
        Ok(Response::new(RotateKeyResponse { device_id: rec.device_id, rotated_at_ms: now }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        let s = &self.0;
        s.auth.admin(&req)?;
        let r = req.into_inner();
        let max = s.config.auth.max_token_ttl_secs;
        if r.ttl_seconds == 0 || r.ttl_seconds > max {
            return Err(invalid("ttl_seconds", format!("ttl_seconds must be in 1..={max}")));
        }
        crate::status::check_label("note", &r.note, 256)?;
        let token = format!("spa_{}", hex::encode(random_bytes::<24>()));
        let hash = token_hash(&token);
        let now = now_ms();
        let rec = TokenRecord {
            token_id: format!("tok-{}", &hex::encode(hash)[..12]),
            created_at_ms: now,
            expires_at_ms: now + r.ttl_seconds * 1000,
            note: r.note,
            used_by: None,
            revoked_at_ms: None,
        };
        s.store.add_token(&hash, &rec).await?;
        tracing::info!(token_id = %rec.token_id, "enrollment token created");
        Ok(Response::new(CreateTokenResponse { token, token_id: rec.token_id, expires_at_ms: rec.expires_at_ms }))
    }

    async fn list_devices(&self, req: Request<ListDevicesRequest>) -> Result<Response<ListDevicesResponse>, Status> {
        let s = &self.0;
        s.auth.admin(&req)?;
        let mut devices = Vec::new();
        for d in s.store.devices().await? {
            devices.push(DeviceInfo {
                last_seen_ms: s.store.last_seen(&d.device_id).await?,
                device_id: d.device_id,
                name: d.name,
                enrolled_at_ms: d.enrolled_at_ms,
                revoked: d.revoked,
                public_key_hex: d.public_key_hex,
                key_rotated_at_ms: d.key_rotated_at_ms.unwrap_or(0),
            });
        }
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn list_tokens(&self, req: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        self.0.auth.admin(&req)?;
        let mut tokens: Vec<TokenInfo> = (self.0.store.tokens().await?.into_iter())
            .map(|t| TokenInfo {
                token_id: t.token_id,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
                note: t.note,
                used_by: t.used_by.unwrap_or_default(),
                revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
            })
            .collect();
        tokens.sort_by_key(|t| t.created_at_ms);
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<RevokeTokenResponse>, Status> {
        self.0.auth.admin(&req)?;
        let id = req.into_inner().token_id;
        crate::status::check_id("token_id", &id)?;
        let was_usable = self.0.store.revoke_token(&id, now_ms()).await?;
        tracing::info!(token_id = %id, "enrollment token revoked");
        Ok(Response::new(RevokeTokenResponse { was_usable }))
    }

    async fn revoke_device(&self, req: Request<RevokeDeviceRequest>) -> Result<Response<RevokeDeviceResponse>, Status> {
        let s = &self.0;
        s.auth.admin(&req)?;
        let id = req.into_inner().device_id;
        crate::status::check_id("device_id", &id)?;
        let was_active = s.store.revoke(&id, now_ms()).await?;
        tracing::info!(device = %id, "device revoked");
        Ok(Response::new(RevokeDeviceResponse { was_active }))
    }

    async fn server_status(&self, req: Request<ServerStatusRequest>) -> Result<Response<ServerStatusResponse>, Status> {
        let s = &self.0;
        s.auth.admin(&req)?;
        let devices = s.store.devices().await?;
        let now = now_ms();
        let tokens = s.store.tokens().await?;
        Ok(Response::new(ServerStatusResponse {
            backbone_version: s.engine.meta.version.clone(),
            devices: devices.len() as u64,
            active_devices: devices.iter().filter(|d| !d.revoked).count() as u64,
            uptime_seconds: s.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            global_version: s.store.latest_checkpoint_version().await?.unwrap_or(0),
            tokens_outstanding: tokens.iter().filter(|t| t.used_by.is_none() && t.revoked_at_ms.is_none() && t.expires_at_ms > now).count() as u64,
        }))
    }

    async fn start_rounds(&self, req: Request<StartRoundsRequest>) -> Result<Response<StartRoundsResponse>, Status> {
        self.0.auth.admin(&req)?;
        Ok(Response::new(crate::round_service::start_rounds(&self.0, req.into_inner()).await?))
    }

    async fn list_rounds(&self, req: Request<ListRoundsRequest>) -> Result<Response<ListRoundsResponse>, Status> {
        self.0.auth.admin(&req)?;
        Ok(Response::new(crate::round_service::list_rounds(&self.0, req.get_ref()).await?))
    }

    async fn round_status(&self, req: Request<RoundStatusRequest>) -> Result<Response<RoundInfo>, Status> {
        self.0.auth.admin(&req)?;
        Ok(Response::new(crate::round_service::round_info(&self.0, req.get_ref().round_id).await?))
    }

    async fn abort_round(&self, req: Request<AbortRoundRequest>) -> Result<Response<AbortRoundResponse>, Status> {
        self.0.auth.admin(&req)?;
        Ok(Response::new(crate::round_service::abort_round(&self.0, req.get_ref().round_id).await?))
    }

    type GetCheckpointStream = BoxStream<TensorChunk>;

    async fn get_checkpoint(&self, req: Request<GetCheckpointRequest>) -> Result<Response<Self::GetCheckpointStream>, Status> {
        self.0.auth.admin(&req)?;
        Ok(Response::new(crate::round_service::checkpoint_stream(&self.0, req.get_ref().version).await?))
    }
}

#[tonic::async_trait]
impl Backbone for BackboneService {
    async fn get_model_info(&self, req: Request<GetModelInfoRequest>) -> Result<Response<ModelInfo>, Status> {
        let s = &self.0;
        s.signed(&req, methods::BACKBONE_GET_MODEL_INFO).await?;
        let m = &s.engine.meta;
        Ok(Response::new(ModelInfo {
            backbone_version: m.version.clone(),
            config_json: m.config_json.clone(),
            tokenizer_json: m.tokenizer_json.clone(),
            num_layers: m.config.num_layers as u32,
            hidden_size: m.config.hidden_size as u32,
            vocab_size: m.config.vocab_size as u32,
            max_positions: m.config.max_position_embeddings as u32,
            max_sequences_per_request: s.config.limits.max_sequences_per_request,
            max_feature_bytes_per_request: s.config.limits.max_feature_bytes_per_request,
            generation_config_json: m.generation_config_json.clone(),
            tokenizer_config_json: m.tokenizer_config_json.clone(),
        }))
    }

    type GetHeadStream = BoxStream<TensorChunk>;

    async fn get_head(&self, req: Request<GetHeadRequest>) -> Result<Response<Self::GetHeadStream>, Status> {
        let rec = self.0.signed(&req, methods::BACKBONE_GET_HEAD).await?;
        self.0.check_version(&req.get_ref().backbone_version)?;
        let tensors = self.0.engine.head(&rec.device_id).await?;
        // Chunks are cut as the stream is read: one chunk's copy at a time, not the whole head.
        let chunks = tensors.into_iter().flat_map(|t| {
            let dtype = if t.f16 { DType::DtypeF16 } else { DType::DtypeF32 } as i32;
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            tensor_chunks_lazy(t.name, dtype, shape, t.bytes, CHUNK_BYTES)
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.map(Ok)))))
    }

    type FeaturesStream = BoxStream<FeaturesChunk>;

    async fn features(&self, req: Request<FeaturesRequest>) -> Result<Response<Self::FeaturesStream>, Status> {
        let s = &self.0;
        let rec = s.signed(&req, methods::BACKBONE_FEATURES).await?;
        if crate::fault::stalls(methods::BACKBONE_FEATURES) {
            return Ok(Response::new(Box::pin(tokio_stream::pending())));
        }
        // Held until the answer is read or dropped: unread answers count too.
        let max = s.config.limits.max_feature_requests_per_device;
        let held = s
            .device_features
            .take(&rec.device_id, max)
            .ok_or_else(|| Status::resource_exhausted(format!("this device already has {max} Features requests in flight; read their answers first")))?;
        let r = req.into_inner();
        self.0.check_version(&r.backbone_version)?;
        let layers = self.0.check_layers(&r.layers)?;
        let elem = Shared::check_dtype(r.dtype)?;
        let max_seqs = s.config.limits.max_sequences_per_request;
        if r.sequences.is_empty() || r.sequences.len() > max_seqs as usize {
            return Err(invalid("sequences", format!("a Features request holds 1..={max_seqs} sequences, got {}", r.sequences.len())));
        }
        let d = s.engine.meta.config.hidden_size as u64;
        let mut total = 0u64;
        let mut seqs = Vec::with_capacity(r.sequences.len());
        for (i, q) in r.sequences.into_iter().enumerate() {
            self.0.check_ids(&format!("sequences.{i}.ids"), &q.ids, 0)?;
            if q.from >= q.to || q.to as usize > q.ids.len() {
                return Err(invalid(
                    &format!("sequences.{i}"),
                    format!("sequence {i}: positions [{}, {}) are not a non-empty range within its {} tokens", q.from, q.to, q.ids.len()),
                ));
            }
            total += (q.to - q.from) as u64 * layers.len() as u64 * d * elem as u64;
            seqs.push(SeqJob { ids: q.ids, from: q.from as usize, to: q.to as usize });
        }
        let limit = s.config.limits.max_feature_bytes_per_request;
        if total > limit {
            return Err(invalid("sequences", format!("request asks for {total} bytes of features, limit {limit}: split it")));
        }
        let blobs = s.engine.features(&rec.device_id, seqs, layers, r.dtype).await?;
        let chunks = blobs.iter().enumerate().flat_map(|(i, b)| feature_chunks(i as u32, b, CHUNK_BYTES)).collect();
        // Revocation (or rotating the key it was signed with) cuts the answer between chunks.
        Ok(Response::new(Box::pin(crate::auth::cut_on_revocation(s.store.clone(), rec, chunks, held))))
    }

    type GenerateStream = BoxStream<GenerateResponse>;

    async fn generate(&self, req: Request<Streaming<GenerateRequest>>) -> Result<Response<Self::GenerateStream>, Status> {
        crate::generation::serve(self.0.clone(), req).await.map(Response::new)
    }
}
