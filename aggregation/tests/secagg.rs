//! Whole-protocol tests: in-memory sessions with dropouts, and adversarial
//! server/peer behaviour against the client and server machines.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Stage, cfg, identity, plain_sum, run};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use ring::signature::Ed25519KeyPair;
use spa_aggregation::messages::{MaskedInputRequest, ShareKeysRequest, UnmaskRequest};
use spa_aggregation::quant::QuantParams;
use spa_aggregation::{ClientIncoming, ClientOutgoing, ClientState, Encoding, IdentitySigner, SecAggError, SecAggServer, ServerPhase, SessionConfig};

fn random_inputs(n: usize, m: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| (0..m).map(|_| rng.next_u32()).collect()).collect()
}

#[test]
fn full_graph_session_without_dropouts_sums_exactly() {
    let ids: Vec<u32> = (1..=10).collect();
    let c = cfg(10, 9, 6, 1000);
    let inputs = random_inputs(10, 1000, 1);
    let out = run(&c, &ids, &inputs, |_| None, 300, 1).result.unwrap();
    assert_eq!(out.contributors, ids);
    assert_eq!(out.sum, plain_sum(&ids, &inputs, &ids));
    assert!(out.survivors_connected);
}

#[test]
fn dropouts_at_every_phase_are_recovered() {
    let ids: Vec<u32> = (100..120).collect();
    let c = cfg(20, 19, 11, 777);
    let inputs = random_inputs(20, 777, 2);
    let drop = |id: u32| match id {
        100 => Some(Stage::Advertise),
        101 | 102 => Some(Stage::ShareKeys),
        103..=105 => Some(Stage::MaskedInput),
        106 | 107 => Some(Stage::Unmask),
        _ => None,
    };
    let out = run(&c, &ids, &inputs, drop, 100, 2).result.unwrap();
    let expected: Vec<u32> = ids.iter().copied().filter(|&i| !(100..=105).contains(&i)).collect();
    assert_eq!(out.contributors, expected, "clients dropping at unmask are still in the sum");
    assert_eq!(out.sum, plain_sum(&ids, &inputs, &out.contributors));
}

#[test]
fn sparse_graph_session_n50() {
    let ids: Vec<u32> = (0..50).map(|i| i * 7 + 3).collect();
    let c = cfg(50, 12, 5, 513);
    let inputs = random_inputs(50, 513, 3);
    let drop = |id: u32| match id % 10 {
        1 => Some(Stage::MaskedInput),
        5 => Some(Stage::Unmask),
        _ => None,
    };
    let o = run(&c, &ids, &inputs, drop, 64, 3);
    let out = o.result.unwrap();
    assert!(o.client_errors.is_empty());
    assert_eq!(out.sum, plain_sum(&ids, &inputs, &out.contributors));
    assert!(out.survivors_connected);
    assert_eq!(out.contributors.len(), 50 - ids.iter().filter(|i| *i % 10 == 1).count());
}

#[test]
fn chacha_suite_session() {
    let ids: Vec<u32> = (1..=8).collect();
    let mut c = cfg(8, 7, 5, 100);
    c.ciphersuite = spa_aggregation::prg::CipherSuite::ChaCha20;
    let inputs = random_inputs(8, 100, 4);
    let out = run(&c, &ids, &inputs, |id| (id == 3).then_some(Stage::MaskedInput), 33, 4).result.unwrap();
    assert_eq!(out.sum, plain_sum(&ids, &inputs, &out.contributors));
}

#[test]
fn server_aborts_below_threshold() {
    let ids: Vec<u32> = (1..=10).collect();
    let c = cfg(10, 9, 6, 50);
    let inputs = random_inputs(10, 50, 5);
    // 4 masked-input dropouts leave |U3| = 6 < t + 1.
    let o = run(&c, &ids, &inputs, |id| (id <= 4).then_some(Stage::MaskedInput), 50, 5);
    assert!(matches!(o.result, Err(SecAggError::Aborted(_))), "{:?}", o.result.err());
    // Enough clients upload but too few answer the unmask request.
    let o = run(&c, &ids, &inputs, |id| (id <= 5).then_some(Stage::Unmask), 50, 5);
    assert!(matches!(o.result, Err(SecAggError::Aborted(_))), "{:?}", o.result.err());
    // Too few advertise.
    let o = run(&c, &ids, &inputs, |id| (id <= 4).then_some(Stage::Advertise), 50, 5);
    assert!(matches!(o.result, Err(SecAggError::Aborted(_))));
}

/// Decoded mean equals the plaintext weighted mean within quantization error.
#[test]
fn decoded_mean_matches_plaintext_weighted_mean() {
    let n = 30u32;
    let dim = 2000usize;
    let ids: Vec<u32> = (1..=n).collect();
    let c = cfg(n, n - 1, n / 2 + 1, dim as u64 + 1);
    let Encoding::SignedTwosComplement { quant_bits, clip, w_max } = c.encoding.clone() else { unreachable!() };
    let q = QuantParams { bits: quant_bits, clip, w_max };
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let mut deltas = Vec::new();
    let mut weights = Vec::new();
    let mut inputs = Vec::new();
    for _ in 0..n {
        let d: Vec<f32> = (0..dim).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.6) * 1.5).collect();
        let w = 1 + rng.next_u32() % 2000;
        inputs.push(q.encode(&d, w, &mut rng).unwrap());
        deltas.push(d);
        weights.push(w.min(w_max));
    }
    let drop = |id: u32| match id {
        2 => Some(Stage::ShareKeys),
        5 | 9 => Some(Stage::MaskedInput),
        11 => Some(Stage::Unmask),
        _ => None,
    };
    let out = run(&c, &ids, &inputs, drop, 512, 6).result.unwrap();
    let (mean, total_w) = q.decode_mean(&out.sum).unwrap();
    let mut want = vec![0f64; dim];
    let mut wsum = 0f64;
    for (i, id) in ids.iter().enumerate() {
        if out.contributors.contains(id) {
            for (a, &d) in want.iter_mut().zip(&deltas[i]) {
                *a += weights[i] as f64 * d.clamp(-clip, clip) as f64;
            }
            wsum += weights[i] as f64;
        }
    }
    assert_eq!(total_w as f64, wsum);
    // Each client's rounding moves its lane by < 1 unit: error < n / (s·Σw).
    let tol = out.contributors.len() as f64 / (q.scale() * wsum);
    for (got, w) in mean.iter().zip(&want) {
        assert!((*got as f64 - w / wsum).abs() <= tol, "{got} vs {}", w / wsum);
    }
    assert!(mean.iter().any(|&x| x < 0.0), "negative means decode");
}

#[test]
fn chunks_and_whole_vector_agree() {
    let c = cfg(3, 2, 2, 70_000);
    let mut clients = Vec::new();
    let mut server = SecAggServer::new(c.clone()).unwrap();
    for id in 1..=3 {
        let keyp = identity();
        let (st, adv) = ClientState::start(id, c.clone(), &keyp, ChaCha20Rng::seed_from_u64(id as u64)).unwrap();
        server.handle_advertise(adv, keyp.public_key()).unwrap();
        clients.push(st);
    }
    let mut states = BTreeMap::new();
    for ((u, req), st) in server.close_advertise().unwrap().into_iter().zip(clients) {
        let (st, out) = st.handle(ClientIncoming::ShareKeys(req)).unwrap();
        let ClientOutgoing::ShareKeys(r) = out.into_iter().next().unwrap() else { panic!() };
        server.handle_share_keys(r).unwrap();
        states.insert(u, st);
    }
    let (u, req) = server.close_share_keys().unwrap().into_iter().next().unwrap();
    let st = states.remove(&u).unwrap();
    let (st, _) = st.handle(ClientIncoming::MaskedInputRequest(req)).unwrap();
    let (_, out) = st.handle(ClientIncoming::Input((0..70_000).collect())).unwrap();
    let ClientOutgoing::MaskedInput(mi) = out.into_iter().next().unwrap() else { panic!() };
    let chunked: Vec<u32> = mi.chunks(16_387).flat_map(|c| c.data).collect();
    let piece = mi.chunk(20_000, 5).unwrap();
    assert_eq!(piece.data, chunked[20_000..20_005]);
    assert!(mi.chunk(69_999, 5).unwrap().data.len() == 1);
    assert_eq!(chunked, mi.into_vec());
}

// ---- adversarial ------------------------------------------------------------

/// A session driven by hand up to a chosen point.
struct Manual {
    config: SessionConfig,
    server: SecAggServer,
    keys: BTreeMap<u32, Ed25519KeyPair>,
    clients: BTreeMap<u32, ClientState>,
}

impl Manual {
    fn new(n: u32, round_id: u64) -> Self {
        let mut config = cfg(n, n - 1, n / 2 + 1, 64);
        config.round_id = round_id;
        let mut server = SecAggServer::new(config.clone()).unwrap();
        let mut keys = BTreeMap::new();
        let mut clients = BTreeMap::new();
        for id in 1..=n {
            let k = identity();
            let (st, adv) = ClientState::start(id, config.clone(), &k, ChaCha20Rng::seed_from_u64(round_id * 100 + id as u64)).unwrap();
            server.handle_advertise(adv, k.public_key()).unwrap();
            keys.insert(id, k);
            clients.insert(id, st);
        }
        Manual { config, server, keys, clients }
    }

    fn share_keys_requests(&mut self) -> BTreeMap<u32, ShareKeysRequest> {
        self.server.close_advertise().unwrap().into_iter().collect()
    }

    fn advance_to_masked_input_requests(&mut self) -> BTreeMap<u32, MaskedInputRequest> {
        for (u, req) in self.share_keys_requests() {
            let st = self.clients.remove(&u).unwrap();
            let (st, out) = st.handle(ClientIncoming::ShareKeys(req)).unwrap();
            let ClientOutgoing::ShareKeys(r) = out.into_iter().next().unwrap() else { panic!() };
            self.server.handle_share_keys(r).unwrap();
            self.clients.insert(u, st);
        }
        self.server.close_share_keys().unwrap().into_iter().collect()
    }

    fn advance_to_unmask_requests(&mut self) -> BTreeMap<u32, UnmaskRequest> {
        for (u, req) in self.advance_to_masked_input_requests() {
            let st = self.clients.remove(&u).unwrap();
            let (st, _) = st.handle(ClientIncoming::MaskedInputRequest(req)).unwrap();
            let (st, out) = st.handle(ClientIncoming::Input(vec![u; 64])).unwrap();
            let ClientOutgoing::MaskedInput(mi) = out.into_iter().next().unwrap() else { panic!() };
            self.server.handle_masked_chunk(u, 0, &mi.into_vec()).unwrap();
            self.clients.insert(u, st);
        }
        self.server.close_masked_inputs().unwrap().into_iter().collect()
    }
}

#[test]
fn client_never_reveals_both_shares_of_a_peer() {
    let mut s = Manual::new(6, 1);
    let reqs = s.advance_to_unmask_requests();
    let st = s.clients.remove(&1).unwrap();
    let mut req = reqs[&1].clone();
    req.dropped.push(req.alive[0]);
    let peer = req.alive[0];
    assert_eq!(st.handle(ClientIncoming::Unmask(req)).unwrap_err(), SecAggError::BothSharesRequested(peer));

    // The decision persists: after answering, asking for the other kind is refused.
    let st = s.clients.remove(&2).unwrap();
    let req = reqs[&2].clone();
    let (done, out) = st.handle(ClientIncoming::Unmask(req.clone())).unwrap();
    // The server takes the shares in any order, but not a duplicated one.
    let Some(ClientOutgoing::Unmask(mut resp)) = out.into_iter().next() else { panic!() };
    resp.b_shares.reverse();
    let mut dup = resp.clone();
    dup.b_shares[0] = dup.b_shares[1].clone();
    assert!(matches!(s.server.handle_unmask(dup), Err(SecAggError::Malformed(_))));
    s.server.handle_unmask(resp).unwrap();
    let ClientState::Completed(c) = &done else { panic!("{done:?}") };
    assert_eq!(c.revealed.len(), req.alive.len());
    let swapped = UnmaskRequest { alive: vec![], dropped: req.alive.clone() };
    assert_eq!(done.handle(ClientIncoming::Unmask(swapped)).unwrap_err(), SecAggError::BothSharesRequested(req.alive[0]));
}

#[test]
fn client_checks_unmask_requests() {
    let mut s = Manual::new(6, 2);
    let reqs = s.advance_to_unmask_requests();
    let mut take = |u: u32| s.clients.remove(&u).unwrap();
    // Unknown neighbour.
    let mut r = reqs[&1].clone();
    r.dropped.push(99);
    assert_eq!(take(1).handle(ClientIncoming::Unmask(r)).unwrap_err(), SecAggError::UnknownNeighbour(99));
    // Too few alive neighbours: the server is fishing for key shares.
    let all = reqs[&2].alive.clone();
    let r = UnmaskRequest { alive: all[..2].to_vec(), dropped: all[2..].to_vec() };
    assert!(matches!(take(2).handle(ClientIncoming::Unmask(r)), Err(SecAggError::BelowThreshold { .. })));
    // Duplicates.
    let mut r = reqs[&3].clone();
    r.alive.push(r.alive[0]);
    assert!(matches!(take(3).handle(ClientIncoming::Unmask(r)), Err(SecAggError::Malformed(_))));
}

#[test]
fn replayed_round1_ciphertexts_from_another_session_are_rejected() {
    let mut a = Manual::new(5, 10);
    let mut b = Manual::new(5, 11);
    let reqs_a = a.advance_to_masked_input_requests();
    let reqs_b = b.advance_to_masked_input_requests();
    // Replay session A's ciphertexts to client 1 of session B, as a whole…
    let st = b.clients.remove(&1).unwrap();
    assert!(matches!(st.handle(ClientIncoming::MaskedInputRequest(reqs_a[&1].clone())), Err(SecAggError::DecryptionFailed(_))));
    // …or one mixed into otherwise genuine ciphertexts.
    let mut mixed = reqs_b[&2].clone();
    mixed.shares[0] = reqs_a[&2].shares[0].clone();
    let st = b.clients.remove(&2).unwrap();
    assert!(matches!(st.handle(ClientIncoming::MaskedInputRequest(mixed)), Err(SecAggError::DecryptionFailed(_))));
    // A ciphertext re-addressed from another peer of the same session fails too.
    let mut swapped = reqs_b[&3].clone();
    swapped.shares[0].ct = swapped.shares[1].ct.clone();
    let st = b.clients.remove(&3).unwrap();
    assert!(matches!(st.handle(ClientIncoming::MaskedInputRequest(swapped)), Err(SecAggError::DecryptionFailed(_))));
}

#[test]
fn client_rejects_unknown_neighbours_and_bad_keys() {
    let mut s = Manual::new(5, 3);
    let reqs = s.advance_to_masked_input_requests();
    let mut r = reqs[&1].clone();
    r.shares[0].peer = 77;
    let st = s.clients.remove(&1).unwrap();
    assert_eq!(st.handle(ClientIncoming::MaskedInputRequest(r)).unwrap_err(), SecAggError::UnknownNeighbour(77));

    let mut s = Manual::new(5, 4);
    let reqs = s.share_keys_requests();
    let st = |s: &mut Manual, u| s.clients.remove(&u).unwrap();
    // A forged advertisement signature.
    let mut r = reqs[&1].clone();
    r.neighbours[0].sig[0] ^= 1;
    let v = r.neighbours[0].id;
    assert_eq!(st(&mut s, 1).handle(ClientIncoming::ShareKeys(r)).unwrap_err(), SecAggError::BadSignature(v));
    // A neighbour carrying another neighbour's key (re-signed would be needed; the duplicate check fires first).
    let mut r = reqs[&2].clone();
    r.neighbours[1].s_pk = r.neighbours[0].s_pk;
    assert!(matches!(st(&mut s, 2).handle(ClientIncoming::ShareKeys(r)), Err(SecAggError::Malformed(_))));
    // A tampered session id (full graph: recomputed by the client).
    let mut r = reqs[&3].clone();
    r.session_id[0] ^= 1;
    assert!(matches!(st(&mut s, 3).handle(ClientIncoming::ShareKeys(r)), Err(SecAggError::Malformed(_))));
    // A config that differs from the round plan (m mismatch).
    let mut r = reqs[&4].clone();
    r.config.m += 1;
    assert!(matches!(st(&mut s, 4).handle(ClientIncoming::ShareKeys(r)), Err(SecAggError::Malformed(_))));
    // Too few neighbours.
    let mut r = reqs[&5].clone();
    r.neighbours.truncate(2);
    assert!(matches!(st(&mut s, 5).handle(ClientIncoming::ShareKeys(r)), Err(SecAggError::BelowThreshold { .. })));
}

#[test]
fn vector_length_is_enforced() {
    let mut s = Manual::new(4, 5);
    let reqs = s.advance_to_masked_input_requests();
    let st = s.clients.remove(&1).unwrap();
    let (st, _) = st.handle(ClientIncoming::MaskedInputRequest(reqs[&1].clone())).unwrap();
    assert_eq!(st.handle(ClientIncoming::Input(vec![0; 65])).unwrap_err(), SecAggError::LengthMismatch { expected: 64, got: 65 });
    // Server: oversize, gaps and overlaps are refused.
    assert!(s.server.handle_masked_chunk(2, 0, &[0; 65]).is_err());
    assert!(s.server.handle_masked_chunk(2, 10, &[0; 4]).is_err());
    s.server.handle_masked_chunk(3, 0, &[0; 32]).unwrap();
    assert!(s.server.handle_masked_chunk(3, 16, &[0; 16]).is_err(), "overlap");
    // Client 3 is now half-uploaded and broken: the sum cannot be unmasked.
    assert!(matches!(s.server.close_masked_inputs(), Err(SecAggError::Aborted(_))));
    assert_eq!(s.server.phase(), ServerPhase::Aborted);
}

#[test]
fn server_rejects_bad_and_late_messages() {
    let mut s = Manual::new(5, 6);
    let other = identity();
    // Advertisement signed by a key other than the enrolled one.
    let mut fresh = SecAggServer::new(s.config.clone()).unwrap();
    let (_, adv) = ClientState::start(9, s.config.clone(), &other, ChaCha20Rng::seed_from_u64(9)).unwrap();
    assert_eq!(fresh.handle_advertise(adv.clone(), s.keys[&1].public_key()), Err(SecAggError::BadSignature(9)));
    // Wrong round, then a duplicate advertisement.
    let mut wrong_round = adv.clone();
    wrong_round.round_id += 1;
    assert!(matches!(fresh.handle_advertise(wrong_round, other.public_key()), Err(SecAggError::Malformed(_))));
    fresh.handle_advertise(adv.clone(), other.public_key()).unwrap();
    assert!(matches!(fresh.handle_advertise(adv, other.public_key()), Err(SecAggError::Malformed(_))));
    // More clients than selected.
    let (_, adv) = ClientState::start(10, s.config.clone(), &other, ChaCha20Rng::seed_from_u64(10)).unwrap();
    assert!(matches!(s.server.handle_advertise(adv, other.public_key()), Err(SecAggError::Malformed(_))));
    let reqs = s.share_keys_requests();
    // Late advertisement.
    let (_, adv) = ClientState::start(9, s.config.clone(), &other, ChaCha20Rng::seed_from_u64(9)).unwrap();
    assert!(matches!(s.server.handle_advertise(adv, other.public_key()), Err(SecAggError::UnexpectedMessage { .. })));
    let mut responses = BTreeMap::new();
    for (u, req) in reqs {
        let st = s.clients.remove(&u).unwrap();
        let (st, out) = st.handle(ClientIncoming::ShareKeys(req)).unwrap();
        let ClientOutgoing::ShareKeys(r) = out.into_iter().next().unwrap() else { panic!() };
        responses.insert(u, r);
        s.clients.insert(u, st);
    }
    // A response missing one neighbour's ciphertext is refused.
    let mut short = responses[&1].clone();
    short.shares.pop();
    assert!(matches!(s.server.handle_share_keys(short), Err(SecAggError::Malformed(_))));
    for u in [1, 2, 3, 4] {
        s.server.handle_share_keys(responses[&u].clone()).unwrap();
    }
    let reqs = s.server.close_share_keys().unwrap();
    assert_eq!(reqs.len(), 4);
    assert!(reqs.iter().all(|(_, r)| r.shares.iter().all(|e| e.peer != 5)), "5 is not in U2");
    // Client 5 answers after the deadline: rejected; it is dropped.
    assert!(s.server.handle_share_keys(responses[&5].clone()).is_err());
    assert!(!s.server.survivors().1.contains(&5));
}

// ---- property tests -----------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Masks cancel: for random graphs (full or sparse), thresholds and
    /// dropout sets, a session either outputs exactly Σ x over U3 or aborts
    /// because a threshold was not met.
    #[test]
    fn masks_cancel_for_random_graphs_and_dropouts(
        n in 4u32..28,
        sparse in any::<bool>(),
        k_frac in 0.2f64..0.9,
        t_frac in 0.2f64..0.8,
        drops in proptest::collection::vec(0u8..12, 28),
        m in 1usize..300,
        chunk in 1usize..128,
        seed in any::<u64>(),
    ) {
        let k = if sparse { (((n - 2) as f64 * k_frac) as u32 / 2 * 2).max(2) } else { n - 1 };
        let t = ((k as f64 * t_frac) as u32).max(1);
        let mut c = cfg(n, k, t, (m + 1) as u64);
        c.m = (m + 1) as u64;
        let ids: Vec<u32> = (0..n).map(|i| i * 3 + 1).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        // Lanes straddling the i32 boundary exercise wrap-around.
        let inputs: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..=m).map(|_| 0x7fff_fff0u32.wrapping_add(rng.next_u32() % 32)).collect())
            .collect();
        let stage_of: BTreeMap<u32, Stage> = ids.iter().zip(&drops).filter_map(|(&id, &d)| {
            let s = match d { 0 => Stage::Advertise, 1 => Stage::ShareKeys, 2 => Stage::MaskedInput, 3 => Stage::Unmask, _ => return None };
            Some((id, s))
        }).collect();
        let o = run(&c, &ids, &inputs, |id| stage_of.get(&id).copied(), chunk, seed);
        match o.result {
            Ok(out) => {
                prop_assert_eq!(&out.sum, &plain_sum(&ids, &inputs, &out.contributors));
                let expected: BTreeSet<u32> = ids.iter().copied()
                    .filter(|id| !matches!(stage_of.get(id), Some(Stage::Advertise | Stage::ShareKeys | Stage::MaskedInput)))
                    .filter(|id| !o.client_errors.contains_key(id))
                    .collect();
                prop_assert_eq!(out.contributors.iter().copied().collect::<BTreeSet<_>>(), expected);
            }
            Err(e) => prop_assert!(
                matches!(&e, SecAggError::Aborted(msg) if msg.contains("below threshold")),
                "unexpected failure {e:?}"
            ),
        }
        // Clients only abort for threshold reasons in honest runs.
        for e in o.client_errors.values() {
            prop_assert!(matches!(e, SecAggError::BelowThreshold { .. }), "client error {e:?}");
        }
    }
}

#[test]
fn quantization_uses_the_config_encoding() {
    let c = SessionConfig::recommended(1, 1, 100, 11).unwrap();
    assert!(matches!(c.encoding, Encoding::SignedTwosComplement { quant_bits: 20, .. }));
}
