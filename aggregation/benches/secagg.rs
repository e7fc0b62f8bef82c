//! SecAgg+ benchmarks (see docs/BENCHMARKS.md for figures and commands).
//! Sessions are built in memory with the crate's own state machines.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use spa_aggregation::client::FRAME_LANES;
use spa_aggregation::messages::{MaskedInputRequest, ShareKeysRequest};
use spa_aggregation::prg::{CipherSuite, MaskKey, MaskPrg, Sign};
use spa_aggregation::quant::QuantParams;
use spa_aggregation::shamir::{Lagrange, Share, split};
use spa_aggregation::{ClientIncoming, ClientOutgoing, ClientState, IdentitySigner, MaskedInput, SecAggServer, SessionConfig};

const M1: usize = 1 << 20;

fn identity() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn config(n: u32, degree: u32, threshold: u32, m: u64) -> SessionConfig {
    let mut c = SessionConfig::recommended(1, 1, n, m).unwrap();
    c.degree = degree;
    c.threshold = threshold;
    c.validate().unwrap();
    c
}

/// A session advanced to R2 for `ids`: the server, each client's state and its R1/R2 requests.
struct Prepared {
    server: SecAggServer,
    clients: BTreeMap<u32, ClientState>,
    share_reqs: BTreeMap<u32, ShareKeysRequest>,
    masked_reqs: BTreeMap<u32, MaskedInputRequest>,
}

fn prepare(cfg: &SessionConfig, ids: &[u32]) -> Prepared {
    let mut server = SecAggServer::new(cfg.clone()).unwrap();
    let mut clients = BTreeMap::new();
    for &id in ids {
        let key = identity();
        let (st, adv) = ClientState::start(id, cfg.clone(), &key, ChaCha20Rng::seed_from_u64(id as u64)).unwrap();
        server.handle_advertise(adv, key.public_key()).unwrap();
        clients.insert(id, st);
    }
    let share_reqs: BTreeMap<u32, ShareKeysRequest> = server.close_advertise().unwrap().into_iter().collect();
    for (u, req) in &share_reqs {
        let st = clients.remove(u).unwrap();
        let (st, out) = st.handle(ClientIncoming::ShareKeys(req.clone())).unwrap();
        let Some(ClientOutgoing::ShareKeys(r)) = out.into_iter().next() else { unreachable!() };
        server.handle_share_keys(r).unwrap();
        clients.insert(*u, st);
    }
    let masked_reqs = server.close_share_keys().unwrap().into_iter().collect();
    Prepared { server, clients, share_reqs, masked_reqs }
}

fn masked_input(st: ClientState, req: MaskedInputRequest, input: Vec<u32>) -> (ClientState, MaskedInput) {
    let (st, _) = st.handle(ClientIncoming::MaskedInputRequest(req)).unwrap();
    let (st, out) = st.handle(ClientIncoming::Input(input)).unwrap();
    let Some(ClientOutgoing::MaskedInput(mi)) = out.into_iter().next() else { unreachable!() };
    (st, mi)
}

fn prg(c: &mut Criterion) {
    eprintln!("AES-NI detected: {}", std::arch::is_x86_feature_detected!("aes"));
    let mut g = c.benchmark_group("prg_expand_add_1M");
    g.throughput(Throughput::Bytes((M1 * 4) as u64));
    let mut acc = vec![0u32; M1];
    for suite in [CipherSuite::Aes128Ctr, CipherSuite::ChaCha20] {
        let p = MaskPrg::new(suite, &MaskKey::from_bytes([7; 32]));
        g.bench_function(format!("{suite:?}"), |b| b.iter(|| p.apply(Sign::Add, 0, black_box(&mut acc))));
    }
    let x = vec![3u32; M1];
    g.bench_function("plain_add_baseline", |b| {
        b.iter(|| {
            for (a, v) in acc.iter_mut().zip(black_box(&x)) {
                *a = a.wrapping_add(*v);
            }
        })
    });
    g.finish();
}

fn client_masking(c: &mut Criterion) {
    // n = 21, full graph: k = 20 neighbours, 1M lanes, 1 + 20 expansions.
    let ids: Vec<u32> = (1..=21).collect();
    let cfg = config(21, 20, 11, M1 as u64);
    let mut p = prepare(&cfg, &ids);
    let st = p.clients.remove(&1).unwrap();
    let (_, mi) = masked_input(st, p.masked_reqs.remove(&1).unwrap(), vec![5; M1]);
    let mut out = vec![0u32; M1];
    let mut g = c.benchmark_group("client_mask_1M_k20");
    g.throughput(Throughput::Bytes((M1 * 4) as u64));
    g.bench_function("whole_vector", |b| b.iter(|| mi.write_masked(0, black_box(&mut out)).unwrap()));
    g.bench_function("1MiB_frames", |b| b.iter(|| mi.chunks(FRAME_LANES).map(|f| f.data.len()).sum::<usize>()));
    g.finish();
}

fn client_crypto(c: &mut Criterion) {
    // One client with k = 72 neighbours (sparse config: n = 200, k = 72, t = 24;
    // 73 clients advertise so the graph over U1 is complete with degree 72).
    let ids: Vec<u32> = (1..=73).collect();
    let cfg = config(200, 72, 24, 1001);
    let p = prepare(&cfg, &ids);
    let key = identity();
    let (share_req, masked_req) = (p.share_reqs[&1].clone(), p.masked_reqs[&1].clone());
    // The 72 advertisement verifications are part of the figure below; one costs:
    let nb = &share_req.neighbours[0];
    let msg = spa_aggregation::crypto::advertisement_message(&cfg.config_hash(), cfg.round_id, &nb.c_pk, &nb.s_pk);
    c.bench_function("ed25519_verify_one", |b| b.iter(|| spa_aggregation::crypto::verify_signature(nb.id, &nb.identity_pk, black_box(&msg), &nb.sig).unwrap()));
    // Client 1's keys came from seed 1, so restarting with that seed reproduces them.
    c.bench_function("client_crypto_per_session_k72", |b| {
        b.iter(|| {
            let (st, _) = ClientState::start(1, cfg.clone(), &key, ChaCha20Rng::seed_from_u64(1)).unwrap();
            let (st, _) = st.handle(ClientIncoming::ShareKeys(share_req.clone())).unwrap();
            st.handle(ClientIncoming::MaskedInputRequest(masked_req.clone())).unwrap()
        })
    });
}

fn quantization(c: &mut Criterion) {
    let q = QuantParams { bits: 20, clip: 1.0, w_max: 1024 };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let delta: Vec<f32> = (0..M1).map(|i| ((i % 2000) as f32 / 1000.0) - 1.0).collect();
    let mut out = vec![0u32; M1 + 1];
    let mut g = c.benchmark_group("quantize_1M");
    g.throughput(Throughput::Elements(M1 as u64));
    g.bench_function("encode", |b| b.iter(|| q.encode_into(&delta, 100, &mut rng, &mut out).unwrap()));
    g.finish();
}

fn server_accumulate(c: &mut Criterion) {
    let ids: Vec<u32> = (1..=3).collect();
    let cfg = config(3, 2, 2, M1 as u64);
    let p = prepare(&cfg, &ids);
    let data = vec![9u32; M1];
    let mut g = c.benchmark_group("server_accumulate_1M");
    g.throughput(Throughput::Bytes((M1 * 4) as u64));
    g.bench_function("handle_masked_chunk_1MiB_frames", |b| {
        b.iter_batched_ref(
            || p.server.clone(),
            |s| {
                for (i, f) in data.chunks(FRAME_LANES).enumerate() {
                    s.handle_masked_chunk(1, (i * FRAME_LANES) as u64, f).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn server_unmask(c: &mut Criterion) {
    // n = 1000, m = 100k, k = 20, t = 6; 30% drop after sharing (before upload).
    let n = 1000u32;
    let m = 100_000usize;
    let ids: Vec<u32> = (1..=n).collect();
    let cfg = config(n, 20, 6, m as u64);
    let mut p = prepare(&cfg, &ids);
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut alive = 0;
    for &u in &ids {
        let st = p.clients.remove(&u).unwrap();
        if rng.next_u32() % 10 < 3 {
            continue;
        }
        let (st, mi) = masked_input(st, p.masked_reqs.remove(&u).unwrap(), vec![u; m]);
        for f in mi.chunks(FRAME_LANES) {
            p.server.handle_masked_chunk(u, f.offset, &f.data).unwrap();
        }
        p.clients.insert(u, st);
        alive += 1;
    }
    let reqs = p.server.close_masked_inputs().unwrap();
    for (u, req) in reqs {
        let st = p.clients.remove(&u).unwrap();
        let (_, out) = st.handle(ClientIncoming::Unmask(req)).unwrap();
        let Some(ClientOutgoing::Unmask(r)) = out.into_iter().next() else { unreachable!() };
        p.server.handle_unmask(r).unwrap();
    }
    eprintln!("server_unmask: {alive} of {n} clients in U3");
    let threads = if cfg!(feature = "rayon") { "rayon" } else { "1thread" };
    let mut g = c.benchmark_group("server_unmask_n1000_m100k_k20_drop30");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function(threads, |b| b.iter_batched(|| p.server.clone(), |mut s| s.close_unmask().unwrap(), BatchSize::LargeInput));
    g.finish();
}

fn shamir(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut g = c.benchmark_group("shamir");
    for t in [24usize, 500] {
        let holders: Vec<u32> = (0..t as u32).collect();
        let shares = split(&[5u8; 32], t, &holders, &mut rng).unwrap();
        let refs: Vec<&Share> = shares.iter().collect();
        let lag = Lagrange::new(&holders).unwrap();
        g.bench_function(format!("reconstruct_cached_t{t}"), |b| b.iter(|| lag.reconstruct(black_box(&refs)).unwrap()));
        g.bench_function(format!("lagrange_build_t{t}"), |b| b.iter(|| Lagrange::new(black_box(&holders)).unwrap()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = prg, client_masking, client_crypto, quantization, server_accumulate, shamir, server_unmask
}
criterion_main!(benches);
