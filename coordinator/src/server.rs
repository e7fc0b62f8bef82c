//! `spa-coordinator serve`: TLS gRPC server with the Device, Admin and Backbone services,
//! health and reflection, explicit message-size limits, and graceful shutdown.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{CoordinatorError, Result, io};
use spa_model::BackendKind;
use spa_model::side::Plugin;
use spa_proto::v1::admin_server::AdminServer;
use spa_proto::v1::backbone_server::BackboneServer;
use spa_proto::v1::device_server::DeviceServer;
use spa_proto::v1::rounds_server::RoundsServer;
use tokio::sync::oneshot;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::aggregator::{RoleTls, ShardHost, ShardTable};
use crate::auth::Auth;
use crate::config::{CoordinatorConfig, StoreBackend};
use crate::engine::Engine;
use crate::round_service::RoundsService;
use crate::service::{AdminService, BackboneService, DeviceService};
use crate::state::Shared;
use crate::store::Store;

/// The file `serve` writes with the address it listens on, once it accepts connections.
pub const ADDR_FILE: &str = "serve.addr";

/// What a `serve` process does in a deployment (docs/SCALING.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Everything in one process: devices, admin, the rounds (when it holds the lease) and
    /// their shards (in process, or on `[rounds] aggregators` when set).
    #[default]
    All,
    /// As `all`, but the shards run on `[rounds] aggregators` only (required).
    Leader,
    /// Devices and admin only; never runs the rounds (polls go to the leader). Needs the
    /// PostgreSQL store, where the leader is found.
    Frontend,
    /// The Aggregator service only (mutual TLS): SecAgg+ shards in memory, for a leader.
    Aggregator,
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    pruner: tokio::task::JoinHandle<()>,
    round_loop: Option<tokio::task::JoinHandle<()>>,
    /// Renews this process's membership (shared store): stops with it.
    membership: Option<crate::AbortOnDrop>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    home: PathBuf,
    store: Store,
    drain: Duration,
    shared: Arc<Shared>,
}

impl Running {
    /// TCP connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops accepting, lets in-flight calls finish within the drain deadline (then cuts
    /// them), and flushes the store.
    pub async fn shutdown(mut self) -> Result<()> {
        self.leave().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = match tokio::time::timeout(self.drain, &mut self.task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("calls still open {} s after shutdown began: cutting them", self.drain.as_secs());
                self.task.abort();
                self.store.flush().await?;
                Ok(Ok(()))
            }
        };
        self.pruner.abort();
        if let Some(r) = &self.round_loop {
            r.abort();
        }
        if let Some(m) = &self.metrics {
            m.abort();
        }
        let _ = std::fs::remove_file(self.home.join(ADDR_FILE));
        r??;
        Ok(())
    }

    /// A member stopping serves no device from now and ends its incarnation in the store, so
    /// its devices go to the others at their next look rather than when its lease lapses.
    async fn leave(&mut self) {
        let Some(m) = &self.shared.members else { return };
        m.leave();
        self.membership.take();
        if let Some(mine) = m.incarnation()
            && let Err(e) = self.store.leave_members(mine).await
        {
            tracing::warn!("leaving the members: {e} (the devices move once the lease lapses)");
        }
    }

    /// Serves until the task ends on its own (an error).
    pub async fn wait(self) -> Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// Seeds global checkpoint version 0 (a fresh plugin's shared part) on first start.
async fn seed_checkpoint(store: &Store, cfg: &CoordinatorConfig, engine: &Engine) -> Result<()> {
    if store.latest_checkpoint_version().await?.is_some() {
        return Ok(());
    }
    let device = BackendKind::Flex.device()?;
    let plugin = Plugin::new(&cfg.side, &engine.meta.config, &device).map_err(|e| CoordinatorError::Config(format!("[side] config: {e}")))?;
    let bytes = plugin.shared()?.as_set().to_safetensors();
    store.put_checkpoint(0, &bytes).await?;
    Ok(())
}

/// Secrets that group or others may read are refused: a copied or carelessly made home.
pub(crate) fn check_secret_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CoordinatorError::Config(format!("{} is open to group or others (mode {mode:o}): `chmod 600` it", path.display())));
        }
    }
    let _ = path;
    Ok(())
}

/// Loads everything and starts serving in the background, on coordinator.toml's backend.
pub async fn start(home: &Path) -> Result<Running> {
    start_on(home, None).await
}

/// [`start`], with `backend` (the CLI's `--device`) in place of `[backbone] device`.
pub async fn start_on(home: &Path, backend: Option<BackendKind>) -> Result<Running> {
    start_as(home, backend, Role::All).await
}

/// Where this process's rounds run their shards: in process, or on the configured
/// aggregators (reached with the role certificate).
fn shard_hosts(home: &Path, cfg: &CoordinatorConfig, role: Role) -> Result<Vec<ShardHost>> {
    let r = &cfg.rounds;
    if r.aggregators.is_empty() {
        if role == Role::Leader {
            return Err(CoordinatorError::Config("--role leader runs its shards on aggregators: list them in [rounds] aggregators".into()));
        }
        return Ok(vec![ShardHost::Local(Arc::new(ShardTable::new(0)))]);
    }
    let s = &cfg.server;
    check_secret_mode(&cfg.resolve(home, &s.role_key))?;
    let read = |p: &Path| {
        let p = cfg.resolve(home, p);
        std::fs::read(&p).map_err(|e| CoordinatorError::Config(format!("{}: {e} (`spa-coordinator rotate-tls` issues a role certificate)", p.display())))
    };
    let tls = RoleTls { ca_pem: read(&s.ca_cert)?, cert_pem: read(&s.role_cert)?, key_pem: read(&s.role_key)? };
    // A close (mask removal of a large shard) may take a while; a dead peer is found sooner
    // by the channel's pings.
    let timeout = Duration::from_secs(r.phase_timeout_secs.max(60));
    r.aggregators.iter().map(|u| ShardHost::remote(u, &tls, timeout).map_err(CoordinatorError::Config)).collect()
}

/// [`start_on`] in `role` (not [`Role::Aggregator`]: [`crate::aggregator::start`]).
pub async fn start_as(home: &Path, backend: Option<BackendKind>, role: Role) -> Result<Running> {
    let cfg = CoordinatorConfig::load(home)?;
    if role == Role::Frontend && cfg.server.store_backend != StoreBackend::Postgres {
        return Err(CoordinatorError::Config("--role frontend needs the PostgreSQL store (server.store_backend), where the leader is found".into()));
    }
    let hosts = shard_hosts(home, &cfg, role)?;
    check_secret_mode(&cfg.resolve(home, &cfg.server.admin_credential))?;
    check_secret_mode(&cfg.resolve(home, &cfg.server.key))?;
    let store = open_store(home, &cfg).await?;
    let cred_path = cfg.resolve(home, &cfg.server.admin_credential);
    std::fs::read_to_string(&cred_path).map_err(io(&cred_path))?;
    let auth = Auth::new(store.clone(), &cfg, &cred_path).await?;
    let engine = start_engine(home, &cfg, &store, backend).await?;
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| CoordinatorError::Config(format!("cannot listen on {}: {e}", cfg.server.listen)))?;
    let addr = listener.local_addr().map_err(|e| CoordinatorError::Other(format!("listener address: {e}")))?;
    let url = match cfg.server.advertise_url.as_str() {
        "" => format!("https://{addr}"),
        u => u.to_string(),
    };
    let members = store.shared().then(|| {
        let timing = crate::members::Timing { ttl_ms: cfg.server.member_lease_secs * 1000 };
        Arc::new(crate::members::Members::new(url.clone(), timing, cfg.auth.clock_window_secs * 1000))
    });
    let membership = members.clone().map(|m| crate::AbortOnDrop(tokio::spawn(crate::members::keep(m, store.clone()))));
    let rounds = crate::rounds::Rounds::new(store.clone(), cfg.rounds.clone(), url, hosts);
    let shared = Shared::new(store.clone(), auth, engine, rounds.clone(), members, cfg.clone());
    let router = router(home, &cfg, &shared).await?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let incoming = crate::conn::capped(listener, cfg.limits.max_connections, shared.connections.clone());
    let flush_store = store.clone();
    let task = tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        let _ = flush_store.flush().await;
        r
    });
    let pruner = tokio::spawn(housekeeping(shared.clone()));
    let round_loop = (role != Role::Frontend).then(|| tokio::spawn(crate::rounds::round_loop(rounds)));
    let scraped = shared.clone();
    let render: crate::metrics::Render = Arc::new(move || {
        let s = scraped.clone();
        Box::pin(async move { crate::metrics::METRICS.render(s.gauges().await) })
    });
    let metrics = start_metrics(home, &cfg, render).await?;
    store.log("server.start", &addr.to_string()).await?;
    if let Some(m) = &shared.members {
        // Ready once this member serves devices (its join is seen by every peer first).
        let t = std::time::Instant::now();
        while !m.serving() && t.elapsed() < Duration::from_millis(m.timing.ttl_ms * 2) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let addr_file = home.join(ADDR_FILE);
    std::fs::write(&addr_file, format!("https://{addr}\n")).map_err(io(&addr_file))?;
    tracing::info!(%addr, "coordinator serving (TLS)");
    let drain = Duration::from_secs(cfg.server.drain_secs);
    Ok(Running { addr, stop: Some(stop_tx), task, pruner, round_loop, membership, metrics, home: home.to_path_buf(), store, drain, shared })
}

/// The configured store, with a warning for devices enrolled with keys now refused as weak.
async fn open_store(home: &Path, cfg: &CoordinatorConfig) -> Result<Store> {
    let s = &cfg.server;
    let store = match s.store_backend {
        StoreBackend::Sled => Store::open_with_cache(&cfg.resolve(home, &s.store), s.store_cache_mb << 20)
            .map_err(|e| CoordinatorError::Other(format!("opening the store (is another coordinator running on this home?): {e}")))?,
        StoreBackend::Postgres => {
            let file = cfg.resolve(home, &s.postgres_conninfo);
            check_secret_mode(&file)?;
            let conninfo = std::fs::read_to_string(&file).map_err(io(&file))?;
            Store::connect_postgres(conninfo.trim(), s.postgres_connections)
                .await
                .map_err(|e| CoordinatorError::Other(format!("opening the PostgreSQL store ({}): {e}", file.display())))?
        }
    };
    let weak: Vec<String> = (store.devices().await?.into_iter())
        .filter(|d| !d.revoked && !hex::decode(&d.public_key_hex).is_ok_and(|k| spa_proto::auth::check_public_key(&k).is_ok()))
        .map(|d| d.device_id)
        .collect();
    if !weak.is_empty() {
        tracing::error!(devices = ?weak, "devices enrolled with weak keys (small order or not canonical): their calls are refused; revoke them and enroll again");
    }
    Ok(store)
}

/// The backbone worker on `backend` (else `[backbone] device`, else BURN_DEVICE, else
/// flex), and global version 0 on a first start.
async fn start_engine(home: &Path, cfg: &CoordinatorConfig, store: &Store, backend: Option<BackendKind>) -> Result<Engine> {
    let backend = match (backend, &cfg.backbone.device) {
        (Some(b), _) => b,
        (None, Some(d)) => d.parse::<BackendKind>()?,
        (None, None) => BackendKind::resolve(None)?,
    };
    let dir = cfg.backbone_dir(home);
    let idle = Duration::from_secs(cfg.limits.session_idle_secs);
    let limits = crate::engine::SessionLimits {
        parked_per_device: cfg.limits.max_sessions_per_device,
        parked_total: cfg.limits.max_sessions,
        kv_pool_bytes: (cfg.limits.kv_pool_mib * (1 << 20) as f64) as usize,
    };
    let dtype = cfg.backbone.weight_dtype()?;
    let engine = tokio::task::spawn_blocking(move || Engine::start(&dir, backend, dtype, idle, limits)).await??;
    seed_checkpoint(store, cfg, &engine).await?;
    tracing::info!(version = %engine.meta.version, "backbone loaded");
    Ok(engine)
}

/// The four services, health and reflection behind TLS, with the connection limits.
async fn router(home: &Path, cfg: &CoordinatorConfig, shared: &Arc<Shared>) -> Result<tonic::transport::server::Router> {
    let (cert_path, key_path) = (cfg.resolve(home, &cfg.server.cert), cfg.resolve(home, &cfg.server.key));
    let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
    let key = std::fs::read(&key_path).map_err(io(&key_path))?;
    let max = cfg.limits.max_message_bytes;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<DeviceServer<DeviceService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health.set_serving::<BackboneServer<BackboneService>>().await;
    health.set_serving::<RoundsServer<RoundsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spa_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // Dead peers are found by HTTP/2 pings (an idle, silent socket is closed after the
    // timeout), a TLS handshake must finish in time, and one connection may not open
    // unbounded concurrent streams. TCP options and the connection cap: `conn::capped`.
    let lim = &cfg.limits;
    Ok(Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(lim.keepalive_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(lim.keepalive_timeout_secs)))
        .max_concurrent_streams(Some(256))
        .max_connection_age(Duration::from_secs(lim.max_connection_age_secs))
        .max_connection_age_grace(Duration::from_secs(lim.connection_age_grace_secs))
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).timeout(Duration::from_secs(lim.tls_handshake_secs)))?
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(DeviceServer::new(DeviceService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max))
        .add_service(AdminServer::new(AdminService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max))
        .add_service(BackboneServer::new(BackboneService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max))
        .add_service(RoundsServer::new(RoundsService(shared.clone())).max_decoding_message_size(max).max_encoding_message_size(max)))
}

/// Every 2 s: write pending last-call times, reopen the store if a write failed (a full
/// disk), mark the clock; every minute: forget expired nonces, old rounds and events.
async fn housekeeping(shared: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_secs(2));
    for tick in 0u64.. {
        t.tick().await;
        if shared.store.heal().await {
            let minute = tick % 30 == 0;
            shared.auth.tick(minute).await;
            // Retention is the leader's (every replica deleting the same rows would be waste).
            if minute && shared.rounds.lease().is_some() {
                prune_history(&shared).await;
            }
        }
    }
}

/// Retention (`rounds.keep_rounds`, `rounds.keep_events_days`); a failure waits for the next minute.
async fn prune_history(s: &Shared) {
    let r = &s.config.rounds;
    let before = match r.keep_events_days {
        0 => 0,
        d => spa_proto::auth::now_ms().saturating_sub(d * 86_400_000),
    };
    match s.store.prune_history(r.keep_rounds, before).await {
        Ok((0, 0)) => {}
        Ok((rounds, events)) => tracing::info!(rounds, events, "old rounds and events deleted (retention)"),
        Err(e) => tracing::warn!("retention: {e}"),
    }
}

/// The file holding the Prometheus endpoint's bound address.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";

/// The Prometheus endpoint, when `server.metrics_listen` names one: `render` answers each scrape.
pub(crate) async fn start_metrics(home: &Path, cfg: &CoordinatorConfig, render: crate::metrics::Render) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if cfg.server.metrics_listen.is_empty() {
        return Ok(None);
    }
    let listen = &cfg.server.metrics_listen;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| CoordinatorError::Config(format!("server.metrics_listen {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| CoordinatorError::Other(e.to_string()))?;
    let file = home.join(METRICS_ADDR_FILE);
    std::fs::write(&file, format!("http://{addr}/metrics\n")).map_err(io(&file))?;
    tracing::info!(%addr, "Prometheus metrics on /metrics");
    Ok(Some(tokio::spawn(crate::metrics::serve(listener, render))))
}

/// Serves in `role` until SIGTERM or ctrl-c, then shuts down gracefully.
pub async fn serve(home: &Path, backend: Option<BackendKind>, role: Role) -> Result<()> {
    if role == Role::Aggregator {
        let running = crate::aggregator::start(home).await?;
        println!("aggregating on https://{}", running.addr);
        shutdown_signal().await;
        tracing::info!("shutting down");
        return running.shutdown().await;
    }
    let running = start_as(home, backend, role).await?;
    println!("serving on https://{}", running.addr);
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
