//! In-memory driver for whole SecAgg+ sessions: n clients and one server with the transport
//! replaced by direct calls, and dropouts chosen per phase. The tests use it to check the
//! protocol, and the in-process federated simulation (`spa simulate`) aggregates with it, so
//! a simulated round runs the same state machines, crypto and encodings as a networked one.
use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

use crate::client::FRAME_LANES;
use crate::error::{Result, SecAggError};
use crate::messages::{AdvertiseKeys, MaskedInputRequest, ShareKeysRequest, ShareKeysResponse, UnmaskRequest, UnmaskResponse};
use crate::{AggregateOutput, ClientIncoming, ClientOutgoing, ClientState, IdentitySigner, SecAggServer, SessionConfig, ShardedOutput, ShardedServer};

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

/// A fresh Ed25519 identity key.
pub fn identity() -> Result<Ed25519KeyPair> {
    let err = |_| SecAggError::Crypto("Ed25519 key generation failed".into());
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(err)?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| SecAggError::Crypto("bad Ed25519 key".into()))
}

/// What a session produced.
pub struct Outcome {
    /// The aggregate, or why the server aborted.
    pub result: Result<AggregateOutput>,
    /// Which clients ended in an error (client-side aborts).
    pub client_errors: BTreeMap<u32, SecAggError>,
}

fn one(out: Vec<ClientOutgoing>) -> Result<ClientOutgoing> {
    let mut it = out.into_iter();
    match (it.next(), it.next()) {
        (Some(o), None) => Ok(o),
        _ => Err(SecAggError::Malformed("a client step must emit exactly one message".into())),
    }
}

fn unexpected(message: &'static str) -> SecAggError {
    SecAggError::UnexpectedMessage { phase: "simulation", message }
}

/// The default frame size, in lanes, of masked uploads.
pub fn default_chunk() -> usize {
    FRAME_LANES
}

/// Runs one session. `inputs[i]` (already encoded lanes) belongs to client `ids[i]`;
/// `drop_at(id)` says where, if anywhere, a client vanishes; `chunk` is the upload frame
/// size in lanes; `seed` seeds the clients' key generation (tests want repeatable runs; pass
/// a random seed otherwise).
pub fn run(config: &SessionConfig, ids: &[u32], inputs: &[Vec<u32>], drop_at: impl Fn(u32) -> Option<Stage>, chunk: usize, seed: u64) -> Outcome {
    let mut client_errors = BTreeMap::new();
    let result = SecAggServer::new(config.clone())
        .and_then(|mut server| drive(&mut server, &|id| Some((config.clone(), id)), ids, inputs, &drop_at, chunk.max(1), seed, &mut client_errors));
    Outcome { result, client_errors }
}

/// What a sharded session produced.
pub struct ShardedOutcome {
    /// The released shard sums (contributors as global seats), or why every shard failed.
    pub result: Result<ShardedOutput>,
    /// Which clients ended in an error (client-side aborts).
    pub client_errors: BTreeMap<u32, SecAggError>,
}

/// Runs a sharded round in memory: `server`'s shards, `inputs[i]` belonging to global seat
/// `seats[i]`, dropouts and seeding as in [`run`].
pub fn run_sharded(
    server: &mut ShardedServer,
    seats: &[u32],
    inputs: &[Vec<u32>],
    drop_at: impl Fn(u32) -> Option<Stage>,
    chunk: usize,
    seed: u64,
) -> ShardedOutcome {
    let mut client_errors = BTreeMap::new();
    let placement = server.clone();
    let session_of = |seat: u32| placement.seat(seat).map(|(s, local)| (placement.shards()[s].server.config().clone(), local));
    let result = drive(server, &session_of, seats, inputs, &drop_at, chunk.max(1), seed, &mut client_errors);
    ShardedOutcome { result, client_errors }
}

/// The server side as the driver sees it: messages by the driver's id for a client, phases
/// closed with the next requests by the same ids.
trait Aggregator {
    type Output;
    fn advertise(&mut self, id: u32, msg: AdvertiseKeys, identity_pk: [u8; 32]) -> Result<()>;
    fn share_keys(&mut self, id: u32, msg: ShareKeysResponse) -> Result<()>;
    fn masked_chunk(&mut self, id: u32, offset: u64, data: &[u32]) -> Result<()>;
    fn unmask(&mut self, id: u32, msg: UnmaskResponse) -> Result<()>;
    fn close_advertise(&mut self) -> Result<Vec<(u32, ShareKeysRequest)>>;
    fn close_share_keys(&mut self) -> Result<Vec<(u32, MaskedInputRequest)>>;
    fn close_masked_inputs(&mut self) -> Result<Vec<(u32, UnmaskRequest)>>;
    fn close_unmask(&mut self) -> Result<Self::Output>;
}

impl Aggregator for SecAggServer {
    type Output = AggregateOutput;
    fn advertise(&mut self, _: u32, msg: AdvertiseKeys, pk: [u8; 32]) -> Result<()> {
        self.handle_advertise(msg, pk)
    }
    fn share_keys(&mut self, _: u32, msg: ShareKeysResponse) -> Result<()> {
        self.handle_share_keys(msg)
    }
    fn masked_chunk(&mut self, id: u32, offset: u64, data: &[u32]) -> Result<()> {
        self.handle_masked_chunk(id, offset, data)
    }
    fn unmask(&mut self, _: u32, msg: UnmaskResponse) -> Result<()> {
        self.handle_unmask(msg)
    }
    fn close_advertise(&mut self) -> Result<Vec<(u32, ShareKeysRequest)>> {
        SecAggServer::close_advertise(self)
    }
    fn close_share_keys(&mut self) -> Result<Vec<(u32, MaskedInputRequest)>> {
        SecAggServer::close_share_keys(self)
    }
    fn close_masked_inputs(&mut self) -> Result<Vec<(u32, UnmaskRequest)>> {
        SecAggServer::close_masked_inputs(self)
    }
    fn close_unmask(&mut self) -> Result<AggregateOutput> {
        SecAggServer::close_unmask(self)
    }
}

impl Aggregator for ShardedServer {
    type Output = ShardedOutput;
    fn advertise(&mut self, id: u32, msg: AdvertiseKeys, pk: [u8; 32]) -> Result<()> {
        self.with_seat(id, |s, _| s.handle_advertise(msg, pk))
    }
    fn share_keys(&mut self, id: u32, msg: ShareKeysResponse) -> Result<()> {
        self.with_seat(id, |s, _| s.handle_share_keys(msg))
    }
    fn masked_chunk(&mut self, id: u32, offset: u64, data: &[u32]) -> Result<()> {
        self.with_seat(id, |s, local| s.handle_masked_chunk(local, offset, data))
    }
    fn unmask(&mut self, id: u32, msg: UnmaskResponse) -> Result<()> {
        self.with_seat(id, |s, _| s.handle_unmask(msg))
    }
    fn close_advertise(&mut self) -> Result<Vec<(u32, ShareKeysRequest)>> {
        Ok(ShardedServer::close_advertise(self)?.requests)
    }
    fn close_share_keys(&mut self) -> Result<Vec<(u32, MaskedInputRequest)>> {
        Ok(ShardedServer::close_share_keys(self)?.requests)
    }
    fn close_masked_inputs(&mut self) -> Result<Vec<(u32, UnmaskRequest)>> {
        Ok(ShardedServer::close_masked_inputs(self)?.requests)
    }
    fn close_unmask(&mut self) -> Result<ShardedOutput> {
        ShardedServer::close_unmask(self)
    }
}

/// Drives every client of `ids` through a session with `server`; `session_of(id)` is the
/// session config and client id the client `id` runs with.
#[allow(clippy::too_many_arguments)]
fn drive<A: Aggregator>(
    server: &mut A,
    session_of: &dyn Fn(u32) -> Option<(SessionConfig, u32)>,
    ids: &[u32],
    inputs: &[Vec<u32>],
    drop_at: &dyn Fn(u32) -> Option<Stage>,
    chunk: usize,
    seed: u64,
    client_errors: &mut BTreeMap<u32, SecAggError>,
) -> Result<A::Output> {
    if ids.len() != inputs.len() {
        return Err(SecAggError::LengthMismatch { expected: ids.len(), got: inputs.len() });
    }
    let mut clients: BTreeMap<u32, ClientState> = BTreeMap::new();
    let input_of: BTreeMap<u32, &Vec<u32>> = ids.iter().copied().zip(inputs).collect();
    for &id in ids {
        let (config, local) = session_of(id).ok_or(SecAggError::Dropped(id))?;
        let key = identity()?;
        let rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(id as u64));
        let (st, adv) = ClientState::start(local, config, &key, rng)?;
        if drop_at(id) == Some(Stage::Advertise) {
            continue;
        }
        server.advertise(id, adv, key.public_key())?;
        clients.insert(id, st);
    }
    for (u, req) in server.close_advertise()? {
        let Some(st) = clients.remove(&u) else { continue };
        if drop_at(u) == Some(Stage::ShareKeys) {
            continue;
        }
        match st.handle(ClientIncoming::ShareKeys(req)) {
            Ok((st, out)) => {
                let ClientOutgoing::ShareKeys(resp) = one(out)? else { return Err(unexpected("not ShareKeys")) };
                server.share_keys(u, resp)?;
                clients.insert(u, st);
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    for (u, req) in server.close_share_keys()? {
        let Some(st) = clients.remove(&u) else { continue };
        if drop_at(u) == Some(Stage::MaskedInput) {
            continue;
        }
        let step = st.handle(ClientIncoming::MaskedInputRequest(req)).and_then(|(st, _)| st.handle(ClientIncoming::Input(input_of[&u].clone())));
        match step {
            Ok((st, out)) => {
                let ClientOutgoing::MaskedInput(masked) = one(out)? else { return Err(unexpected("not MaskedInput")) };
                for c in masked.chunks(chunk) {
                    server.masked_chunk(u, c.offset, &c.data)?;
                }
                clients.insert(u, st);
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    for (u, req) in server.close_masked_inputs()? {
        let Some(st) = clients.remove(&u) else { continue };
        if drop_at(u) == Some(Stage::Unmask) {
            continue;
        }
        match st.handle(ClientIncoming::Unmask(req)) {
            Ok((_, out)) => {
                let ClientOutgoing::Unmask(resp) = one(out)? else { return Err(unexpected("not Unmask")) };
                server.unmask(u, resp)?;
            }
            Err(e) => {
                client_errors.insert(u, e);
            }
        }
    }
    server.close_unmask()
}
