//! The coordinator's cost of a federated round with many devices: the real round loop,
//! sled store and SecAgg+ server, with N simulated devices in the same process calling the
//! Rounds handlers directly (no network: the figure is the coordinator's own compute).
//! Each device runs the real SecAgg+ client machine on a random quantized update.
//!
//! `SPA_BENCH_STORE=postgres` runs it on a throwaway PostgreSQL (`scripts/postgres.sh`) and adds
//! the database's WAL and growth per round. `SPA_BENCH_AGGREGATORS=k` runs the shards on k
//! aggregator processes (`spa-coordinator serve --role aggregator`, mutual TLS on loopback) and
//! adds their CPU time and peak memory; the coordinator's busy time then includes its waits
//! for them.
//!
//! `cargo bench --bench round -- [devices] [rounds] [params] [dropout] [shard size]` (defaults
//! 100, 3, 53792 = the default side plugin's shared part, 0.0, 1000: one SecAgg+ session up to
//! 1000 devices, floor min(100, size / 2)). A dropout fraction of the devices
//! never upload their masked vector (the phase then ends at its deadline, max(2, N/50) s, and the server
//! recovers their pairwise masks). Prints per round the wall time, the coordinator's busy
//! time (handlers, phase closes, unmasking, decoding, strategy, commit) and each phase.
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use spa_aggregation::sim::identity;
use spa_aggregation::{ClientIncoming, ClientOutgoing, ClientState, IdentitySigner};
use spa_coordinator::aggregator::{ShardHost, ShardTable};
use spa_coordinator::config::RoundsSection;
use spa_coordinator::rounds::{RoundPlan, RoundState, Rounds, round_loop};
use spa_coordinator::store::{Store, TokenRecord, token_hash};
use spa_model::side::{NamedTensor, ParamSet};
use spa_proto::auth::now_ms;
use spa_proto::secagg;
use spa_proto::v1::poll_response::Task;

fn arg(i: usize, default: usize) -> usize {
    std::env::args().filter(|a| !a.starts_with('-')).nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

async fn device<K: IdentitySigner + Send + Sync + 'static>(rounds: Arc<Rounds>, id: String, key: K, seed: u64, drops: bool) {
    let pk = key.public_key();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut state: Option<(u64, u32, ClientState, Vec<u32>)> = None;
    loop {
        match rounds.poll(&id) {
            Task::Train(t) => {
                if state.as_ref().is_some_and(|s| s.0 == t.round_id) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let cfg = secagg::config_from_json(&t.session_config_json).unwrap();
                let q = cfg.quant_params().unwrap();
                let delta: Vec<f32> = (0..cfg.m - 1).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.01).collect();
                let input = q.encode(&delta, 10, &mut rng).unwrap();
                let (st, adv) = ClientState::start(t.client_id, cfg, &key, ChaCha20Rng::seed_from_u64(rng.next_u64())).unwrap();
                rounds.advertise(&id, pk, secagg::advertise_to_wire(&adv)).await.unwrap();
                state = Some((t.round_id, t.client_id, st, input));
            }
            Task::ShareKeys(t) => {
                let (r, seat, st, input) = state.take().unwrap();
                let (st, out) = st.handle(ClientIncoming::ShareKeys(secagg::share_keys_request(&t).unwrap())).unwrap();
                let Some(ClientOutgoing::ShareKeys(resp)) = out.into_iter().next() else { panic!() };
                rounds.share_keys(&id, secagg::share_keys_to_wire(t.round_id, &resp)).await.unwrap();
                state = Some((r, seat, st, input));
            }
            Task::MaskedInput(t) if !drops => {
                let (r, seat, st, input) = state.take().unwrap();
                let (st, _) = st.handle(ClientIncoming::MaskedInputRequest(secagg::masked_input_request(&t))).unwrap();
                let (st, out) = st.handle(ClientIncoming::Input(input)).unwrap();
                let Some(ClientOutgoing::MaskedInput(masked)) = out.into_iter().next() else { panic!() };
                rounds.masked_input(&id, t.round_id, seat, secagg::lanes_to_bytes(&masked.into_vec())).await.unwrap();
                state = Some((r, seat, st, vec![]));
            }
            Task::Unmask(t) => {
                let (_, _, st, _) = state.take().unwrap();
                let (_, out) = st.handle(ClientIncoming::Unmask(secagg::unmask_request(&t))).unwrap();
                let Some(ClientOutgoing::Unmask(resp)) = out.into_iter().next() else { panic!() };
                rounds.unmask(&id, secagg::unmask_to_wire(t.round_id, &resp)).await.unwrap();
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        tokio::task::yield_now().await;
    }
}

/// The initial global version (`m` parameters) and `n` enrolled devices: their ids and keys.
async fn enroll(store: &Store, n: usize, m: usize) -> Vec<(String, impl IdentitySigner + Send + Sync + 'static)> {
    let mut set = ParamSet::default();
    set.tensors.insert("shared.w".into(), NamedTensor { shape: vec![m], values: vec![0.0; m] });
    store.put_checkpoint(0, &set.to_safetensors()).await.unwrap();
    let mut keys = Vec::new();
    for i in 0..n {
        let key = identity().unwrap();
        let token = format!("bench-token-{i}");
        let rec = TokenRecord {
            token_id: format!("tok-{i}"),
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + 3_600_000,
            note: String::new(),
            used_by: None,
            revoked_at_ms: None,
        };
        store.add_token(&token_hash(&token), &rec).await.unwrap();
        let d = store.enroll(&token_hash(&token), &key.public_key(), &format!("bench-{i}"), now_ms()).await.unwrap();
        keys.push((d.device_id, key));
    }
    keys
}

fn main() {
    let (n, n_rounds, m) = (arg(1, 100), arg(2, 3), arg(3, 53_792));
    let dropout: f64 = std::env::args().filter(|a| !a.starts_with('-')).nth(4).and_then(|a| a.parse().ok()).unwrap_or(0.0);
    let n_drop = (dropout * n as f64).floor() as usize;
    // Devices per SecAgg+ shard (one session up to this many).
    let shard_size = arg(5, 1000) as u64;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let pg = std::env::var("SPA_BENCH_STORE").is_ok_and(|v| v == "postgres").then(|| Postgres::start(dir.path()));
    let store = match &pg {
        Some(pg) => rt.block_on(Store::connect_postgres(&pg.conninfo, 16)).unwrap(),
        None => Store::open(&dir.path().join("store")).unwrap(),
    };
    let keys = rt.block_on(enroll(&store, n, m));
    let before = pg.as_ref().map(|pg| rt.block_on(pg.usage()));
    // With dropouts a phase ends at its deadline; the devices of this process must still
    // finish their own work within it (1000 devices mask for ~10 s on 2 cores).
    let phase_timeout_secs = if n_drop > 0 { (n as u64 / 50).max(2) } else { 600 };
    let cfg = RoundsSection {
        online_secs: 600,
        selection_grace_secs: 0,
        phase_timeout_secs,
        evaluate_secs: 0,
        clip: 1.0,
        w_max: 1024,
        keep_checkpoints: 0,
        keep_rounds: 0,
        keep_events_days: 0,
        leader_lease_secs: 10,
        shard_size,
        min_shard_contributors: (shard_size / 2).min(100),
        aggregators: Vec::new(),
    };
    let aggs = std::env::var("SPA_BENCH_AGGREGATORS").ok().and_then(|k| k.parse().ok()).map(|k| Aggregators::start(dir.path(), k));
    rt.block_on(async {
        let hosts = match &aggs {
            Some(a) => a.hosts(),
            None => vec![ShardHost::Local(Arc::new(ShardTable::new(0)))],
        };
        let rounds = Rounds::new(store.clone(), cfg, String::new(), hosts);
        tokio::spawn(round_loop(rounds.clone()));
        for (i, (id, key)) in keys.into_iter().enumerate() {
            tokio::spawn(device(rounds.clone(), id, key, i as u64, i >= n - n_drop));
        }
        // Every device polls once before the run is queued, so selection takes all of them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let plan = RoundPlan {
            rounds: n_rounds as u32,
            min_clients: (n - n_drop) as u32,
            max_clients: n as u32,
            deadline_secs: 600,
            local_epochs: 1,
            lr: 1e-3,
            strategy: spa_aggregation::strategy::StrategyName::FedAvg,
            prox_mu: 0.0,
            dp_l2_clip: 0.0,
            dp_noise_multiplier: 0.0,
        };
        let started = Instant::now();
        rounds.start_run(plan).await.unwrap();
        loop {
            let rs = store.rounds().await.unwrap();
            if rs.len() == n_rounds && rs.iter().all(|r| r.state == RoundState::Committed || r.state == RoundState::Aborted) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1800), "rounds did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    println!(
        "{n} devices ({n_drop} drop after sharing keys), {m} shared parameters (+1 weight lane), {n_rounds} rounds, SecAgg+ graph as SessionConfig::recommended sizes it"
    );
    println!("| round | state | contributors | wall ms | coordinator busy ms | busy / wall | phases (ms) |");
    println!("|---|---|---|---|---|---|---|");
    let mut busy = Vec::new();
    for r in rt.block_on(store.rounds()).unwrap() {
        let wall = r.finished_ms.unwrap_or(r.updated_ms) - r.started_ms;
        busy.push(r.coordinator_busy_ms);
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1}% | {:?} |",
            r.round_id,
            r.state.name(),
            r.contributors.len(),
            wall,
            r.coordinator_busy_ms,
            100.0 * r.coordinator_busy_ms / wall.max(1) as f64,
            r.phase_ms
        );
    }
    for r in rt.block_on(store.rounds()).unwrap().iter().filter(|r| r.reason.is_some()) {
        println!("round {} aborted: {}", r.round_id, r.reason.as_deref().unwrap_or_default());
    }
    busy.sort_by(f64::total_cmp);
    println!("median coordinator busy time per round: {:.1} ms", busy[busy.len() / 2]);
    if let Some(a) = aggs {
        a.report();
    }
    if let (Some(pg), Some(before)) = (&pg, before) {
        let after = rt.block_on(pg.usage());
        let per_round = |a: i64, b: i64| (a - b) as f64 / n_rounds as f64 / 1024.0;
        println!(
            "PostgreSQL per round (the rounds alone, enrollment excluded): WAL {:.0} KiB, database growth {:.0} KiB",
            per_round(after.wal, before.wal),
            per_round(after.size, before.size)
        );
        println!("rows after the run: {}", after.rows);
    }
}

/// Aggregator processes on loopback, their homes sharing one CA (`init` in `dir/ca`).
struct Aggregators {
    ca_home: std::path::PathBuf,
    children: Vec<std::process::Child>,
    urls: Vec<String>,
}

impl Aggregators {
    fn start(dir: &std::path::Path, k: usize) -> Self {
        use spa_coordinator::config::CoordinatorConfig;
        let ca_home = dir.join("ca");
        spa_coordinator::init::init(&ca_home, &[]).unwrap();
        let (mut children, mut urls) = (Vec::new(), Vec::new());
        for i in 0..k {
            let home = dir.join(format!("agg{i}"));
            spa_coordinator::init::init(&home, &[]).unwrap();
            for f in ["ca.pem", "server.pem", "server.key"] {
                std::fs::copy(ca_home.join("tls").join(f), home.join("tls").join(f)).unwrap();
            }
            let mut cfg = CoordinatorConfig::load(&home).unwrap();
            cfg.server.listen = "127.0.0.1:0".into();
            cfg.rounds.min_shard_contributors = 2;
            cfg.save(&home).unwrap();
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_spa-coordinator"))
                .args(["serve", "--role", "aggregator", "--home"])
                .arg(&home)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            children.push(child);
            let t = Instant::now();
            let addr = loop {
                if let Ok(s) = std::fs::read_to_string(home.join("serve.addr"))
                    && s.ends_with('\n')
                {
                    break s.trim().to_string();
                }
                assert!(t.elapsed() < Duration::from_secs(30), "aggregator {i} did not start");
                std::thread::sleep(Duration::from_millis(20));
            };
            urls.push(addr);
        }
        Self { ca_home, children, urls }
    }

    fn hosts(&self) -> Vec<ShardHost> {
        let read = |f: &str| std::fs::read(self.ca_home.join("tls").join(f)).unwrap();
        let tls = spa_coordinator::aggregator::RoleTls { ca_pem: read("ca.pem"), cert_pem: read("role.pem"), key_pem: read("role.key") };
        self.urls.iter().map(|u| ShardHost::remote(u, &tls, Duration::from_secs(600)).unwrap()).collect()
    }

    /// Each aggregator's CPU seconds (user + system) and peak resident memory.
    fn report(mut self) {
        for (i, c) in self.children.iter_mut().enumerate() {
            let pid = c.id();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let rest: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
            let ticks = |k: usize| rest.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let cpu = (ticks(11) + ticks(12)) / 100.0;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap_or("?").trim().to_string();
            println!("aggregator {i} ({}): CPU {cpu:.2} s, peak RSS {hwm}", self.urls[i]);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");

/// A throwaway cluster (`scripts/postgres.sh`) for `SPA_BENCH_STORE=postgres`.
struct Postgres {
    dir: std::path::PathBuf,
    conninfo: String,
}

/// WAL position and database size in bytes, and row counts per table.
struct Usage {
    wal: i64,
    size: i64,
    rows: String,
}

impl Postgres {
    fn start(dir: &std::path::Path) -> Self {
        let dir = dir.join("pg");
        let out = std::process::Command::new(SCRIPT).arg("start").arg(&dir).output().unwrap();
        assert!(out.status.success(), "scripts/postgres.sh start: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir, conninfo: String::from_utf8(out.stdout).unwrap().trim().to_string() }
    }

    async fn usage(&self) -> Usage {
        let (c, conn) = tokio_postgres::connect(&self.conninfo, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let q = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, pg_database_size(current_database())";
        let row = c.query_one(q, &[]).await.unwrap();
        let mut rows = Vec::new();
        for t in ["devices", "tokens", "rounds", "runs", "checkpoints", "events", "nonces", "last_seen"] {
            let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.unwrap().get(0);
            rows.push(format!("{t} {n}"));
        }
        Usage { wal: row.get(0), size: row.get(1), rows: rows.join(", ") }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(SCRIPT).arg("stop").arg(&self.dir).output();
    }
}
