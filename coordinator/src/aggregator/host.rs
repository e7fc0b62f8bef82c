//! Where a leader runs a shard: in its own process (the table it holds) or on an aggregator
//! process, over mutual TLS. Both answer the same calls with the same statuses.
use std::sync::Arc;
use std::time::Duration;

use spa_proto::limits::CHUNK_BYTES;
use spa_proto::v1;
use spa_proto::v1::aggregator_client::AggregatorClient;
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ROLE_MESSAGE_BYTES;
use super::table::{ShardCall, ShardKey, ShardTable, wire_key};

/// A shard's home.
#[derive(Clone)]
pub enum ShardHost {
    Local(Arc<ShardTable>),
    Remote { url: String, client: AggregatorClient<Channel>, uploads: Arc<tokio::sync::Semaphore> },
}

/// Masked vectors a leader forwards to one aggregator at once: each is held in memory until
/// sent (a thousand devices uploading together would otherwise hold a thousand copies; the
/// aggregator adds them one at a time anyway).
const UPLOADS_IN_FLIGHT: usize = 32;

/// What the leader presents to aggregators, and trusts of them: the deployment's CA and the
/// role certificate it issued (`tls/role.pem`, client and server use).
pub struct RoleTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl ShardHost {
    /// An aggregator at `url` (`https://host:port`). The channel connects on first use, so a
    /// leader starts while an aggregator is down; a dead peer is found by HTTP/2 pings.
    pub fn remote(url: &str, tls: &RoleTls, call_timeout: Duration) -> Result<Self, String> {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem)).identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        let ep = Endpoint::from_shared(url.to_string())
            .and_then(|e| e.tls_config(config))
            .map_err(|e| format!("aggregator URL '{url}': {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(call_timeout)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10));
        let client = AggregatorClient::new(ep.connect_lazy()).max_decoding_message_size(ROLE_MESSAGE_BYTES).max_encoding_message_size(ROLE_MESSAGE_BYTES);
        Ok(ShardHost::Remote { url: url.to_string(), client, uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT)) })
    }

    /// For logs and round records.
    pub fn name(&self) -> &str {
        match self {
            ShardHost::Local(_) => "this process",
            ShardHost::Remote { url, .. } => url,
        }
    }

    pub async fn open(&self, key: ShardKey, session_config_json: String, floor: usize, leader_term: u64) -> Result<(), Status> {
        let r = v1::OpenShardRequest { key: wire_key(key), session_config_json, floor: floor as u32, leader_term };
        match self {
            ShardHost::Local(t) => t.open(&r),
            ShardHost::Remote { client, .. } => client.clone().open_shard(r).await.map(drop),
        }
    }

    pub async fn send(&self, key: ShardKey, call: ShardCall) -> Result<(), Status> {
        let (mut c, uploads) = match self {
            ShardHost::Local(t) => return t.apply(key, call),
            ShardHost::Remote { client, uploads, .. } => (client.clone(), uploads),
        };
        let k = wire_key(key);
        match call {
            ShardCall::Advertise { identity_pk, msg } => c.shard_advertise(v1::ShardAdvertiseMsg { key: k, identity_pk, msg: Some(msg) }).await.map(drop),
            ShardCall::ShareKeys(msg) => c.shard_share_keys(v1::ShardShareKeysMsg { key: k, msg: Some(msg) }).await.map(drop),
            ShardCall::Unmask(msg) => c.shard_unmask(v1::ShardUnmaskMsg { key: k, msg: Some(msg) }).await.map(drop),
            ShardCall::Masked { client_id, bytes } => {
                use v1::shard_masked_msg::Kind;
                let _permit = uploads.acquire().await.map_err(|_| Status::unavailable("closing"))?;
                let header = v1::ShardMaskedHeader { key: k, client_id, lanes: bytes.len() as u64 / 4 };
                // A vector of one chunk (most) is moved, not copied.
                let chunks = match bytes.len() <= CHUNK_BYTES {
                    true => vec![bytes],
                    false => bytes.chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect(),
                };
                let msgs: Vec<v1::ShardMaskedMsg> =
                    std::iter::once(Kind::Header(header)).chain(chunks.into_iter().map(Kind::Lanes)).map(|k| v1::ShardMaskedMsg { kind: Some(k) }).collect();
                c.shard_masked(tokio_stream::iter(msgs)).await.map(drop)
            }
        }
    }

    /// Closes the shard's phase (mask removal, the heavy close, off the async threads).
    pub async fn close(&self, key: ShardKey, phase: v1::ShardPhase, leader_term: u64) -> Result<v1::CloseShardResponse, Status> {
        match self {
            ShardHost::Local(t) => {
                let t = t.clone();
                tokio::task::spawn_blocking(move || t.close(key, phase, leader_term)).await.map_err(|e| Status::internal(format!("close task: {e}")))?
            }
            ShardHost::Remote { client, .. } => {
                let r = v1::CloseShardRequest { key: wire_key(key), phase: phase as i32, leader_term };
                Ok(client.clone().close_shard(r).await?.into_inner())
            }
        }
    }

    /// Forgets the shard (best effort: an unreachable aggregator forgets it when the next
    /// round opens there).
    pub async fn drop_shard(&self, key: ShardKey) {
        match self {
            ShardHost::Local(t) => t.drop_shard(key),
            ShardHost::Remote { client, url, .. } => {
                if let Err(e) = client.clone().drop_shard(v1::ShardKey { round_id: key.0, shard: key.1 }).await {
                    tracing::debug!(aggregator = %url, "dropping shard {}: {}", key.1, e.message());
                }
            }
        }
    }
}
