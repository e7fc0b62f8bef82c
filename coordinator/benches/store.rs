//! The store's cost per operation, sled against PostgreSQL on the same machine, through the
//! `Backend` interface the coordinator uses: what every signed call costs (the device lookup;
//! the nonce write, which replicas did per call before a device's calls had one member, and
//! the read of a device's kept nonces that replaced it, once per device and handover), an enrollment, a round record write and a commit
//! (a 215 KB checkpoint, the default plugin's shared part). PostgreSQL is a throwaway cluster
//! on a Unix socket started by `scripts/postgres.sh` (synchronous commit, fsync on, as
//! shipped); sled flushes before every acknowledged change, as the coordinator does.
//!
//! `cargo bench --bench store -- [repeats]` (default 5): per operation the median over the
//! repeats of the mean latency, and the lookups' throughput with 16 concurrent callers.
use std::process::Command;
use std::time::Instant;

use spa_aggregation::strategy::{ServerOptimizer, StrategyName};
use spa_coordinator::store::records::{RoundPlan, RoundRecord};
use spa_coordinator::store::{Store, TokenRecord, token_hash};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Mean microseconds per call of `n` sequential calls of `op(i)`.
async fn per_call<F: AsyncFnMut(usize)>(n: usize, mut op: F) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        op(i).await;
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// One repeat on a fresh store: (operation, microseconds per call), and lookups per second
/// with 16 callers.
async fn measure(s: &Store, rep: usize) -> (Vec<(&'static str, f64)>, f64) {
    let n = 200;
    let mut ids = Vec::new();
    let token = |i: usize| format!("bench-{rep}-{i}");
    for i in 0..n {
        let rec = TokenRecord { token_id: token(i), created_at_ms: 0, expires_at_ms: u64::MAX, note: String::new(), used_by: None, revoked_at_ms: None };
        s.add_token(&token_hash(&token(i)), &rec).await.unwrap();
    }
    let key = |i: usize| spa_proto::auth::sha256(format!("key-{rep}-{i}").as_bytes());
    let enroll = per_call(n, async |i| ids.push(s.enroll(&token_hash(&token(i)), &key(i), "d", 1).await.unwrap().device_id)).await;
    let ids = &ids;
    let lookup = per_call(2000, async |i| assert!(s.device(&ids[i % n]).await.unwrap().is_some())).await;
    let nonce = per_call(2000, async |i| assert!(s.record_nonce(&ids[i % n], &format!("{rep}-{i}"), 1).await.unwrap())).await;
    // What a replica reads once per device as it takes the device (members.rs), in place of the
    // write per call it replaced.
    let taking = per_call(2000, async |i| assert!(s.device_nonces(&ids[i % n], 0).await.unwrap().len() <= 2000)).await;
    let plan = RoundPlan {
        rounds: 1000,
        min_clients: 2,
        max_clients: 100,
        deadline_secs: 60,
        local_epochs: 1,
        lr: 0.01,
        strategy: StrategyName::FedAvg,
        prox_mu: 0.0,
        dp_l2_clip: 0.0,
        dp_noise_multiplier: 0.0,
    };
    let lease = s.lead("bench", "", 600_000).await.unwrap().unwrap();
    let run = s.create_run(&plan, 0).await.unwrap();
    let mut round: RoundRecord = s.start_round(&lease, &run).await.unwrap();
    round.cohort = ids.clone()[..100].to_vec();
    let put_round = per_call(200, async |_| s.put_round(&lease, &round).await.unwrap()).await;
    let optimizer = ServerOptimizer::new(StrategyName::FedAvg.config(0.0).unwrap()).unwrap();
    let checkpoint = vec![7u8; 53_792 * 4];
    let base = s.latest_checkpoint_version().await.unwrap().map_or(0, |v| v + 1);
    let commit = per_call(20, async |i| s.commit_round(&lease, base + i as u64, &checkpoint, &round, &optimizer).await.unwrap()).await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|k| {
            let (s, ids) = (s.clone(), ids.clone());
            tokio::spawn(async move {
                for i in 0..500 {
                    s.device(&ids[(k * 31 + i) % ids.len()]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let concurrent = 16.0 * 500.0 / t.elapsed().as_secs_f64();
    let ops = vec![
        ("enroll", enroll),
        ("device lookup", lookup),
        ("nonce write", nonce),
        ("device's kept nonces read", taking),
        ("round record write", put_round),
        ("commit (215 KB)", commit),
    ];
    (ops, concurrent)
}

async fn run(s: &Store, repeats: usize) -> (Vec<(&'static str, f64)>, f64) {
    let mut all = Vec::new();
    let mut conc = Vec::new();
    for rep in 0..repeats {
        let (ops, c) = measure(s, rep).await;
        all.push(ops);
        conc.push(c);
    }
    let ops = (0..all[0].len()).map(|k| (all[0][k].0, median(all.iter().map(|r| r[k].1).collect()))).collect();
    (ops, median(conc))
}

fn main() {
    let repeats: usize = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sled = Store::open(&dir.path().join("sled")).unwrap();
    let (sled_ops, sled_conc) = rt.block_on(run(&sled, repeats));
    let pg_dir = dir.path().join("pg");
    let out = Command::new(SCRIPT).arg("start").arg(&pg_dir).output().unwrap();
    assert!(out.status.success(), "scripts/postgres.sh start: {}", String::from_utf8_lossy(&out.stderr));
    let conninfo = String::from_utf8(out.stdout).unwrap();
    let pg = rt.block_on(Store::connect_postgres(conninfo.trim(), 16)).unwrap();
    let (pg_ops, pg_conc) = rt.block_on(run(&pg, repeats));
    // Lookups are served from its cache while the change listener is up (store/postgres/cache.rs).
    println!("PostgreSQL device cache live: {}", pg.device_cache_live());
    drop(pg);
    let _ = Command::new(SCRIPT).arg("stop").arg(&pg_dir).output();
    println!("median of {repeats} repeats, microseconds per call (one caller)");
    println!("| operation | sled | PostgreSQL | PostgreSQL / sled |");
    println!("|---|---|---|---|");
    for ((name, a), (_, b)) in sled_ops.iter().zip(&pg_ops) {
        println!("| {name} | {a:.0} | {b:.0} | {:.2} |", b / a);
    }
    println!("| device lookups/s, 16 callers | {sled_conc:.0} | {pg_conc:.0} | {:.2} |", pg_conc / sled_conc);
}
