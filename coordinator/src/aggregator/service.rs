//! `spa-coordinator serve --role aggregator`: the Aggregator service alone, over mutual TLS
//! (a caller must present a certificate from the deployment's CA with client use: the
//! leader's role certificate). No backbone, no store: a shard's state is in memory only.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spa_proto::v1::aggregator_server::{Aggregator, AggregatorServer};
use spa_proto::v1::*;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::ROLE_MESSAGE_BYTES;
use super::table::{ShardCall, ShardTable, key_of};
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result, io};

pub struct AggregatorService(pub Arc<ShardTable>);

/// Counts a refused call (`spa_aggregator_refused_calls_total`).
fn counted<T>(r: std::result::Result<T, Status>) -> std::result::Result<T, Status> {
    if r.is_err() {
        crate::metrics::AGGREGATOR_METRICS.refused_calls.inc();
    }
    r
}

fn missing(what: &str) -> Status {
    Status::invalid_argument(format!("missing {what}"))
}

impl AggregatorService {
    /// One device's message (`call`, None when the message lacked it) applied to shard `key`.
    fn applied(&self, key: Option<ShardKey>, call: Option<ShardCall>) -> std::result::Result<Response<Ack>, Status> {
        counted((|| {
            self.0.apply(key_of(key.as_ref())?, call.ok_or_else(|| missing("msg"))?)?;
            Ok(Response::new(Ack {}))
        })())
    }
}

#[tonic::async_trait]
impl Aggregator for AggregatorService {
    async fn open_shard(&self, req: Request<OpenShardRequest>) -> std::result::Result<Response<Ack>, Status> {
        counted(self.0.open(req.get_ref()).map(|()| Response::new(Ack {})))
    }

    async fn shard_advertise(&self, req: Request<ShardAdvertiseMsg>) -> std::result::Result<Response<Ack>, Status> {
        let m = req.into_inner();
        self.applied(m.key, m.msg.map(|msg| ShardCall::Advertise { identity_pk: m.identity_pk, msg }))
    }

    async fn shard_share_keys(&self, req: Request<ShardShareKeysMsg>) -> std::result::Result<Response<Ack>, Status> {
        let m = req.into_inner();
        self.applied(m.key, m.msg.map(ShardCall::ShareKeys))
    }

    async fn shard_masked(&self, req: Request<Streaming<ShardMaskedMsg>>) -> std::result::Result<Response<Ack>, Status> {
        counted(
            async move {
                use shard_masked_msg::Kind;
                let mut stream = req.into_inner();
                let Some(ShardMaskedMsg { kind: Some(Kind::Header(h)) }) = stream.message().await? else {
                    return Err(Status::invalid_argument("a masked upload starts with its header"));
                };
                let key = key_of(h.key.as_ref())?;
                let m = self.0.lanes(key)?;
                if h.lanes != m {
                    return Err(Status::invalid_argument(format!("upload declares {} lanes, the shard has {m}", h.lanes)));
                }
                let mut buf = spa_proto::secagg::LaneBuffer::new(m);
                while let Some(msg) = stream.message().await? {
                    let Some(Kind::Lanes(b)) = msg.kind else { return Err(Status::invalid_argument("a second header in one upload")) };
                    buf.push(&b).map_err(Status::invalid_argument)?;
                }
                let bytes = buf.finish().map_err(Status::invalid_argument)?;
                self.0.apply(key, ShardCall::Masked { client_id: h.client_id, bytes })?;
                Ok(Response::new(Ack {}))
            }
            .await,
        )
    }

    async fn shard_unmask(&self, req: Request<ShardUnmaskMsg>) -> std::result::Result<Response<Ack>, Status> {
        let m = req.into_inner();
        self.applied(m.key, m.msg.map(ShardCall::Unmask))
    }

    async fn close_shard(&self, req: Request<CloseShardRequest>) -> std::result::Result<Response<CloseShardResponse>, Status> {
        counted(
            async move {
                let r = req.into_inner();
                let key = key_of(r.key.as_ref())?;
                let phase = ShardPhase::try_from(r.phase).map_err(|_| Status::invalid_argument(format!("unknown phase {}", r.phase)))?;
                let t = self.0.clone();
                let term = r.leader_term;
                let out = tokio::task::spawn_blocking(move || t.close(key, phase, term)).await.map_err(|e| Status::internal(format!("close task: {e}")))??;
                closed(&out);
                Ok(Response::new(out))
            }
            .await,
        )
    }

    async fn drop_shard(&self, req: Request<ShardKey>) -> std::result::Result<Response<Ack>, Status> {
        counted(
            async move {
                let r = req.get_ref();
                self.0.drop_shard((r.round_id, r.shard));
                Ok(Response::new(Ack {}))
            }
            .await,
        )
    }
}

/// Counts a close by its outcome (`spa_aggregator_closes_total`).
fn closed(out: &CloseShardResponse) {
    use close_shard_response::Result as R;
    let outcome = match &out.result {
        Some(R::ShareKeys(_)) => "share_keys",
        Some(R::MaskedInput(_)) => "masked_input",
        Some(R::Unmask(_)) => "unmask",
        Some(R::Sum(_)) => "sum",
        Some(R::Failed(_)) | None => "failed",
    };
    crate::metrics::AGGREGATOR_METRICS.closes.get_or_create(&crate::metrics::Outcome { outcome: outcome.into() }).inc();
}

/// A running aggregator.
pub struct RunningAggregator {
    pub addr: SocketAddr,
    pub table: Arc<ShardTable>,
    stop: Option<oneshot::Sender<()>>,
    /// The Prometheus endpoint (`server.metrics_listen`), stopped with the aggregator.
    _metrics: Option<crate::AbortOnDrop>,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RunningAggregator {
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.map_err(|e| CoordinatorError::Other(e.to_string()))??;
        Ok(())
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io(path))
}

/// Starts the aggregator role of `home`: `[server] listen`, its server certificate, the CA
/// as the only root for callers, `[rounds] min_shard_contributors` as its own floor.
pub async fn start(home: &Path) -> Result<RunningAggregator> {
    let cfg = CoordinatorConfig::load(home)?;
    let s = &cfg.server;
    crate::server::check_secret_mode(&cfg.resolve(home, &s.key))?;
    let (cert, key, ca) = (read(&cfg.resolve(home, &s.cert))?, read(&cfg.resolve(home, &s.key))?, read(&cfg.resolve(home, &s.ca_cert))?);
    let table = Arc::new(ShardTable::new(cfg.rounds.min_shard_contributors as usize));
    let listener = tokio::net::TcpListener::bind(&s.listen).await.map_err(|e| CoordinatorError::Config(format!("cannot listen on {}: {e}", s.listen)))?;
    let addr = listener.local_addr().map_err(|e| CoordinatorError::Other(format!("listener address: {e}")))?;
    let lim = &cfg.limits;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(ca));
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(lim.keepalive_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(lim.keepalive_timeout_secs)))
        .tls_config(tls.timeout(Duration::from_secs(lim.tls_handshake_secs)))?
        .add_service(
            AggregatorServer::new(AggregatorService(table.clone())).max_decoding_message_size(ROLE_MESSAGE_BYTES).max_encoding_message_size(ROLE_MESSAGE_BYTES),
        );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    let held = table.clone();
    let render: crate::metrics::Render = Arc::new(move || {
        let n = held.len();
        Box::pin(async move { crate::metrics::AGGREGATOR_METRICS.render(n) })
    });
    let metrics = crate::server::start_metrics(home, &cfg, render).await?.map(crate::AbortOnDrop);
    let addr_file = home.join(crate::server::ADDR_FILE);
    std::fs::write(&addr_file, format!("https://{addr}\n")).map_err(io(&addr_file))?;
    tracing::info!(%addr, floor = cfg.rounds.min_shard_contributors, "aggregator serving (mutual TLS)");
    Ok(RunningAggregator { addr, table, stop: Some(stop_tx), task, _metrics: metrics })
}
