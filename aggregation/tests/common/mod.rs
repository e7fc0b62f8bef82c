//! In-memory driver for whole SecAgg+ sessions: n clients and one server,
//! with the transport replaced by direct calls and dropouts chosen per phase.

#![allow(dead_code)]

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use spa_aggregation::client::FRAME_LANES;
use spa_aggregation::{
    AggregateOutput, ClientIncoming, ClientOutgoing, ClientState, IdentitySigner, SecAggError,
    SecAggServer, SessionConfig,
};

/// Phases at which a client can vanish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Never advertises.
    Advertise,
    /// Does not answer ShareKeysRequest.
    ShareKeys,
    /// Does not upload its masked vector.
    MaskedInput,
    /// Does not answer the unmask request.
    Unmask,
}

pub fn identity() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

pub fn cfg(n: u32, degree: u32, threshold: u32, m: u64) -> SessionConfig {
    let mut c = SessionConfig::recommended(7, 3, n, m).unwrap();
    c.degree = degree;
    c.threshold = threshold;
    c.validate().unwrap();
    c
}

pub struct Outcome {
    pub result: Result<AggregateOutput, SecAggError>,
    /// Which clients ended in an error (client-side aborts).
    pub client_errors: BTreeMap<u32, SecAggError>,
}

fn unwrap_one(out: Vec<ClientOutgoing>) -> ClientOutgoing {
    assert_eq!(out.len(), 1);
    out.into_iter().next().unwrap()
}

/// Runs one session. `inputs[i]` belongs to client `ids[i]`; `drop_at(id)`
/// says where (if anywhere) a client vanishes; `chunk` is the frame size.
pub fn run(
    config: &SessionConfig,
    ids: &[u32],
    inputs: &[Vec<u32>],
    drop_at: impl Fn(u32) -> Option<Stage>,
    chunk: usize,
    seed: u64,
) -> Outcome {
    let mut server = SecAggServer::new(config.clone()).unwrap();
    let mut clients: BTreeMap<u32, ClientState> = BTreeMap::new();
    let mut input_of: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut client_errors = BTreeMap::new();
    for (&id, x) in ids.iter().zip(inputs) {
        let key = identity();
        let rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(id as u64));
        let (st, adv) = ClientState::start(id, config.clone(), &key, rng).unwrap();
        input_of.insert(id, x.clone());
        if drop_at(id) == Some(Stage::Advertise) {
            continue;
        }
        server.handle_advertise(adv, key.public_key()).unwrap();
        clients.insert(id, st);
    }
    let fail = |e| Outcome {
        result: Err(e),
        client_errors: BTreeMap::new(),
    };
    let reqs = match server.close_advertise() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for (u, req) in reqs {
        let st = clients.remove(&u).unwrap();
        if drop_at(u) == Some(Stage::ShareKeys) {
            continue;
        }
        match st.handle(ClientIncoming::ShareKeys(req)) {
            Ok((st, out)) => {
                let ClientOutgoing::ShareKeys(resp) = unwrap_one(out) else {
                    panic!("expected ShareKeys")
                };
                server.handle_share_keys(resp).unwrap();
                clients.insert(u, st);
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    let reqs = match server.close_share_keys() {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                result: Err(e),
                client_errors,
            };
        }
    };
    for (u, req) in reqs {
        let st = clients.remove(&u).unwrap();
        if drop_at(u) == Some(Stage::MaskedInput) {
            continue;
        }
        let step = st
            .handle(ClientIncoming::MaskedInputRequest(req))
            .and_then(|(st, _)| st.handle(ClientIncoming::Input(input_of[&u].clone())));
        match step {
            Ok((st, out)) => {
                let ClientOutgoing::MaskedInput(masked) = unwrap_one(out) else {
                    panic!("expected MaskedInput")
                };
                for c in masked.chunks(chunk) {
                    server
                        .handle_masked_chunk(c.client_id, c.offset, &c.data)
                        .unwrap();
                }
                clients.insert(u, st);
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    let reqs = match server.close_masked_inputs() {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                result: Err(e),
                client_errors,
            };
        }
    };
    for (u, req) in reqs {
        let st = clients.remove(&u).unwrap();
        if drop_at(u) == Some(Stage::Unmask) {
            continue;
        }
        match st.handle(ClientIncoming::Unmask(req)) {
            Ok((_, out)) => {
                let ClientOutgoing::Unmask(resp) = unwrap_one(out) else {
                    panic!("expected Unmask")
                };
                server.handle_unmask(resp).unwrap();
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    Outcome {
        result: server.close_unmask(),
        client_errors,
    }
}

/// Σ inputs of `contributors` mod 2^32, computed in the clear.
pub fn plain_sum(ids: &[u32], inputs: &[Vec<u32>], contributors: &[u32]) -> Vec<u32> {
    let mut sum = vec![0u32; inputs[0].len()];
    for (id, x) in ids.iter().zip(inputs) {
        if contributors.contains(id) {
            for (s, v) in sum.iter_mut().zip(x) {
                *s = s.wrapping_add(*v);
            }
        }
    }
    sum
}

pub fn default_chunk() -> usize {
    FRAME_LANES
}
