//! Prometheus metrics: counters the round loop, the auth checks and the backbone worker
//! bump as things happen, gauges read from the shared state when scraped, and a minimal
//! HTTP endpoint (`GET /metrics`, text format) on its own listen address
//! (`server.metrics_listen`). docs/grafana-dashboard.json charts them.
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

/// Every metric of the process (one registry: a coordinator is one process).
pub struct Metrics {
    registry: Registry,
    pub rounds: Family<Outcome, Counter>,
    pub phase_seconds: Family<Phase, Histogram>,
    pub dropouts: Family<Reason, Counter>,
    pub refused_calls: Family<Kind, Counter>,
    /// Device calls sent to another replica, by kind (`leader`, `owner`).
    pub redirected_calls: Family<Kind, Counter>,
    pub backbone_tokens: Counter,
    /// KV pool bytes the generation sessions reserved (`limits.kv_pool_mib`).
    pub kv_reserved_bytes: Gauge,
    /// Generation steps (sessions) per batch the backbone worker ran together.
    pub step_batch: Histogram,
    devices_enrolled: Gauge,
    devices_online: Gauge,
    generation_sessions: Gauge,
    open_connections: Gauge,
    leader: Gauge,
    member: Gauge,
    device_cache: Gauge,
    /// The registered families' names, as exposed (`spa_` and the name).
    families: Vec<String>,
}

fn phase_histogram() -> Histogram {
    // 10 ms .. ~45 min.
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Registers `metric` and notes its family's name as exposed.
fn reg(registry: &mut Registry, families: &mut Vec<String>, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    families.push(format!("spa_{name}"));
    registry.register(name, help, metric);
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("spa");
        let m = Metrics {
            rounds: Family::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
            dropouts: Family::default(),
            refused_calls: Family::default(),
            redirected_calls: Family::default(),
            backbone_tokens: Counter::default(),
            kv_reserved_bytes: Gauge::default(),
            step_batch: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            devices_enrolled: Gauge::default(),
            devices_online: Gauge::default(),
            generation_sessions: Gauge::default(),
            open_connections: Gauge::default(),
            leader: Gauge::default(),
            member: Gauge::default(),
            device_cache: Gauge::default(),
            registry: Registry::default(),
            families: Vec::new(),
        };
        let mut families = Vec::new();
        reg(&mut registry, &mut families, "rounds", "Rounds ended, by outcome (committed, aborted)", m.rounds.clone());
        reg(&mut registry, &mut families, "round_phase_seconds", "Wall time of each round phase", m.phase_seconds.clone());
        reg(&mut registry, &mut families, "dropouts", "Seats that left a round, by reason", m.dropouts.clone());
        reg(&mut registry, &mut families, "refused_calls", "Refused device and admin calls (auth, replay, quota)", m.refused_calls.clone());
        reg(
            &mut registry,
            &mut families,
            "redirected_calls",
            "Device calls sent to another replica (NOT_LEADER, NOT_OWNER), by kind",
            m.redirected_calls.clone(),
        );
        reg(&mut registry, &mut families, "backbone_tokens", "Token positions the backbone computed (features and generation)", m.backbone_tokens.clone());
        reg(
            &mut registry,
            &mut families,
            "kv_reserved_bytes",
            "KV cache bytes the generation sessions reserved, open and parked (limits.kv_pool_mib)",
            m.kv_reserved_bytes.clone(),
        );
        reg(&mut registry, &mut families, "generation_step_batch", "Sessions whose generation steps ran batched together", m.step_batch.clone());
        reg(&mut registry, &mut families, "devices_enrolled", "Enrolled devices, revoked ones excluded", m.devices_enrolled.clone());
        reg(&mut registry, &mut families, "devices_online", "Devices that polled within rounds.online_secs", m.devices_online.clone());
        reg(&mut registry, &mut families, "generation_sessions", "Open Generate streams", m.generation_sessions.clone());
        reg(&mut registry, &mut families, "open_connections", "TCP connections open (limits.max_connections)", m.open_connections.clone());
        reg(&mut registry, &mut families, "leader", "1 while this coordinator holds the leadership lease (runs the rounds)", m.leader.clone());
        reg(&mut registry, &mut families, "member", "1 while this coordinator serves devices as a member of a shared store", m.member.clone());
        reg(
            &mut registry,
            &mut families,
            "device_cache",
            "1 while device lookups are served from memory (PostgreSQL store: its change listener is up)",
            m.device_cache.clone(),
        );
        Metrics { registry, families, ..m }
    }

    /// The name of every metric family served (a family without samples yet is not in the
    /// exposition at all, so this is what a dashboard is checked against).
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// The text exposition, with the gauges `g` read just before.
    pub fn render(&self, g: Gauges) -> String {
        self.devices_enrolled.set(g.devices_enrolled as i64);
        self.devices_online.set(g.devices_online as i64);
        self.generation_sessions.set(g.generation_sessions as i64);
        self.open_connections.set(g.open_connections as i64);
        self.leader.set(g.leader as i64);
        self.member.set(g.member as i64);
        self.device_cache.set(g.device_cache as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The exposition, rendered when the endpoint is asked (the gauges read then).
pub type Render = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The metrics of an aggregator process (`serve --role aggregator`): its own registry, so that
/// it exposes nothing of the coordinator's (no store, no devices there).
pub struct AggregatorMetrics {
    registry: Registry,
    shards: Gauge,
    /// Phase closes by outcome: the phase whose requests it returned, `sum`, or `failed`.
    pub closes: Family<Outcome, Counter>,
    /// Calls refused (a malformed body, an unknown shard, a floor, a fenced term).
    pub refused_calls: Counter,
}

impl AggregatorMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("spa_aggregator");
        let (shards, closes, refused_calls) = (Gauge::default(), Family::default(), Counter::default());
        registry.register("shards", "Shards this aggregator holds now (in memory)", shards.clone());
        registry.register("closes", "Shard phase closes, by outcome (a phase's requests, sum, failed)", closes.clone());
        registry.register("refused_calls", "Calls refused as the caller's error or by the floor or fence", refused_calls.clone());
        Self { registry, shards, closes, refused_calls }
    }

    /// The text exposition, with `shards` held now.
    pub fn render(&self, shards: usize) -> String {
        self.shards.set(shards as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

pub static AGGREGATOR_METRICS: LazyLock<AggregatorMetrics> = LazyLock::new(AggregatorMetrics::new);

/// What the gauges show, read from the running service when the endpoint is asked.
pub struct Gauges {
    pub devices_enrolled: usize,
    pub devices_online: usize,
    pub generation_sessions: usize,
    pub open_connections: usize,
    pub leader: bool,
    pub member: bool,
    pub device_cache: bool,
}

/// Serves `GET /metrics` on `listener` until the task is dropped: one short request per
/// connection, its head bounded to 8 KiB and 5 s.
pub async fn serve(listener: TcpListener, render: Render) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; 8192];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < head.len() && !head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            });
            if read.await.is_err() {
                return;
            }
            let reply = if head[..n].starts_with(b"GET /metrics ") {
                let body = render().await;
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
