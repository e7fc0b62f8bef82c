//! A round's cohort split into shards, each its own SecAgg+ session, as the aggregators of
//! Bonawitz et al. 2019 ("Towards Federated Learning at Scale"):
//!
//! - who shares a shard with whom follows from a hash of the round's seed and each device's
//!   id ([`assign`]), so no one places a device beside chosen others short of choosing the
//!   whole cohort (the seed is a hash of the round and its cohort: [`shard_seed`]);
//! - each shard releases only its own sum, and only when at least its floor of contributors
//!   survived: its server machine enforces the floor itself
//!   ([`SecAggServer::with_release_floor`]), so a shard below it never computes a sum;
//! - a shard that fails (below its floor, an upload cut part-way, a reconstruction that does
//!   not hold) takes only its own members out of the round; the others go on;
//! - the round's mean is decoded from the released sums added in i64
//!   ([`SessionConfig::decode_mean_of`]).
//!
//! Seats: the caller numbers its cohort 1..=n ("global" seats); inside a shard a device is
//! client `local` of that shard's session (1..=shard size), the id its messages carry.
use std::collections::HashMap;

use ring::digest::{Context, SHA256};

use crate::config::{SessionConfig, recommended_graph};
use crate::error::{Result, SecAggError};
use crate::messages::{MaskedInputRequest, ShareKeysRequest, UnmaskRequest};
use crate::server::{AggregateOutput, SecAggServer};

/// Domain label of the shard seed and of each device's place (part of the spec).
const LABEL: &[u8] = b"flsa/v1/shards";

/// The seed a round's shard assignment derives from: a hash of the round, its base version
/// and its cohort (in the caller's order). Anyone holding the cohort list can recompute it.
pub fn shard_seed(round_id: u64, base_version: u64, cohort: &[impl AsRef<str>]) -> [u8; 32] {
    let mut h = Context::new(&SHA256);
    h.update(LABEL);
    h.update(&round_id.to_be_bytes());
    h.update(&base_version.to_be_bytes());
    for d in cohort {
        let d = d.as_ref().as_bytes();
        h.update(&(d.len() as u64).to_be_bytes());
        h.update(d);
    }
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// How many shards a cohort of `n` splits into: as few as keep each at most `shard_size`,
/// but never so many that a shard holds fewer than `floor` (a shard that small could never
/// release); at least one.
pub fn shard_count(n: usize, shard_size: usize, floor: usize) -> usize {
    n.div_ceil(shard_size.max(1)).min(n / floor.max(1)).max(1)
}

/// One session per shard, from the round's `base` session: each sized for its members
/// (n, neighbour graph and threshold per §8.1), everything else (encoding, vector length,
/// deadlines, ids) as in `base`, whose quantization must fit the largest shard.
pub fn sessions(base: &SessionConfig, shards: Vec<Vec<u32>>) -> Result<Vec<(SessionConfig, Vec<u32>)>> {
    shards
        .into_iter()
        .map(|members| {
            let n = u32::try_from(members.len()).map_err(|_| SecAggError::InvalidConfig("shard too large".into()))?;
            let (degree, threshold) = recommended_graph(n, base.active_mode)?;
            let config = SessionConfig { n_selected: n, degree, threshold, ..base.clone() };
            config.validate()?;
            Ok((config, members))
        })
        .collect()
}

/// Splits `cohort` into [`shard_count`] shards of equal size (within one): devices sorted by
/// SHA-256(label, seed, id), then cut in order. Returns each shard's global seats
/// (1-based positions in `cohort`), ascending.
pub fn assign(seed: &[u8; 32], cohort: &[impl AsRef<str>], shard_size: usize, floor: usize) -> Vec<Vec<u32>> {
    let mut keyed: Vec<([u8; 32], u32)> = cohort
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut h = Context::new(&SHA256);
            h.update(LABEL);
            h.update(seed);
            h.update(d.as_ref().as_bytes());
            (h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes"), i as u32 + 1)
        })
        .collect();
    keyed.sort_unstable();
    let shards = shard_count(cohort.len(), shard_size, floor);
    let (base, extra) = (cohort.len() / shards, cohort.len() % shards);
    let mut it = keyed.into_iter().map(|(_, seat)| seat);
    (0..shards)
        .map(|s| {
            let mut seats: Vec<u32> = it.by_ref().take(base + usize::from(s < extra)).collect();
            seats.sort_unstable();
            seats
        })
        .collect()
}

/// One shard: its session, its members' global seats (local client `i + 1` is
/// `members[i]`), and why it failed, once it has.
#[derive(Clone)]
pub struct Shard {
    /// The shard's SecAgg+ session.
    pub server: SecAggServer,
    /// Global seats, in local-client order.
    pub members: Vec<u32>,
    /// Why this shard left the round (its members with it); None while it runs.
    pub failed: Option<String>,
}

impl Shard {
    /// The global seat of local client `local` (1-based).
    fn global(&self, local: u32) -> u32 {
        self.members[local as usize - 1]
    }
}

/// What closing a phase gave: the next requests, by global seat, of the shards still
/// running, and the shards that failed at this close.
pub struct Closed<R> {
    /// (global seat, request).
    pub requests: Vec<(u32, R)>,
    /// (shard index, why) of the shards this close failed.
    pub failed: Vec<(usize, String)>,
}

/// The released sums of a round's shards.
pub struct ShardedOutput {
    /// Each released shard's sum, its contributors as global seats.
    pub released: Vec<(usize, AggregateOutput)>,
    /// (shard index, why) of the shards that failed at the last close.
    pub failed: Vec<(usize, String)>,
}

impl ShardedOutput {
    /// Every contributor of every released sum (global seats).
    pub fn contributors(&self) -> impl Iterator<Item = u32> + '_ {
        self.released.iter().flat_map(|(_, o)| o.contributors.iter().copied())
    }

    /// The round's mean update and total weight, decoded with `config`'s encoding (every
    /// shard's encoding is the same).
    pub fn decode_mean(&self, config: &SessionConfig) -> Result<(Vec<f32>, u64)> {
        let sums: Vec<(&[u32], usize)> = self.released.iter().map(|(_, o)| (o.sum.as_slice(), o.contributors.len())).collect();
        config.decode_mean_of(&sums)
    }
}

/// The server side of a sharded round: one [`SecAggServer`] per shard, messages routed by
/// global seat, phases closed together.
#[derive(Clone)]
pub struct ShardedServer {
    shards: Vec<Shard>,
    route: SeatMap,
}

/// Where each global seat sits: (shard, local client id), from the shards' member lists
/// (local client `i + 1` of shard `s` is `members[s][i]`).
#[derive(Clone, Debug, Default)]
pub struct SeatMap(HashMap<u32, (usize, u32)>);

impl SeatMap {
    /// Fails on a seat listed in two shards.
    pub fn new<'a>(members: impl IntoIterator<Item = &'a [u32]>) -> Result<Self> {
        let mut route = HashMap::new();
        for (i, seats) in members.into_iter().enumerate() {
            for (local, &seat) in seats.iter().enumerate() {
                if route.insert(seat, (i, local as u32 + 1)).is_some() {
                    return Err(SecAggError::InvalidConfig(format!("seat {seat} is in two shards")));
                }
            }
        }
        Ok(Self(route))
    }

    /// (shard, local client id) of global `seat`.
    pub fn seat(&self, seat: u32) -> Option<(usize, u32)> {
        self.0.get(&seat).copied()
    }
}

impl ShardedServer {
    /// Shards from (session, members) pairs: each session sized for its members and
    /// releasing only sums of at least `floor` clients. Every session must share one encoding
    /// and vector length (the sums are added).
    pub fn new(shards: Vec<(SessionConfig, Vec<u32>)>, floor: usize) -> Result<Self> {
        let bad = |s: String| Err(SecAggError::InvalidConfig(s));
        let Some((first, _)) = shards.first() else { return bad("a sharded round needs at least one shard".into()) };
        let (encoding, m) = (first.encoding.clone(), first.m);
        let route = SeatMap::new(shards.iter().map(|(_, members)| members.as_slice()))?;
        let mut out = Vec::with_capacity(shards.len());
        for (i, (config, members)) in shards.into_iter().enumerate() {
            if config.n_selected as usize != members.len() {
                return bad(format!("shard {i}: session for {} clients, {} members", config.n_selected, members.len()));
            }
            if config.encoding != encoding || config.m != m {
                return bad(format!("shard {i}: its encoding differs from shard 0's"));
            }
            out.push(Shard { server: SecAggServer::new(config)?.with_release_floor(floor), members, failed: None });
        }
        Ok(Self { shards: out, route })
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Shard 0's session (the encoding and vector length every shard shares).
    pub fn config(&self) -> &SessionConfig {
        self.shards[0].server.config()
    }

    /// (shard, local client id) of global `seat`.
    pub fn seat(&self, seat: u32) -> Option<(usize, u32)> {
        self.route.seat(seat)
    }

    /// Runs `f` on the session of `seat`'s shard with its local client id; `Dropped` when the
    /// seat is unknown or its shard has failed.
    pub fn with_seat<R>(&mut self, seat: u32, f: impl FnOnce(&mut SecAggServer, u32) -> Result<R>) -> Result<R> {
        let (s, local) = self.seat(seat).ok_or(SecAggError::Dropped(seat))?;
        let shard = &mut self.shards[s];
        if shard.failed.is_some() {
            return Err(SecAggError::Dropped(seat));
        }
        f(&mut shard.server, local)
    }

    /// Closes R0 in every running shard.
    pub fn close_advertise(&mut self) -> Result<Closed<ShareKeysRequest>> {
        self.close_phase(|s| s.close_advertise())
    }

    /// Closes R1 in every running shard.
    pub fn close_share_keys(&mut self) -> Result<Closed<MaskedInputRequest>> {
        self.close_phase(|s| s.close_share_keys())
    }

    /// Closes R2 in every running shard (a shard below its floor fails here, before any of
    /// its shares are revealed).
    pub fn close_masked_inputs(&mut self) -> Result<Closed<UnmaskRequest>> {
        self.close_phase(|s| s.close_masked_inputs())
    }

    /// Closes R4: each running shard's sum, or its failure. Fails only when no shard released.
    pub fn close_unmask(&mut self) -> Result<ShardedOutput> {
        let (outs, failed) = self.close_each(|s| s.close_unmask())?;
        let released = outs
            .into_iter()
            .map(|(s, mut out)| {
                out.contributors = out.contributors.iter().map(|&local| self.shards[s].global(local)).collect();
                (s, out)
            })
            .collect();
        Ok(ShardedOutput { released, failed })
    }

    /// A phase's close in every running shard, its requests by global seat.
    fn close_phase<R>(&mut self, close: impl Fn(&mut SecAggServer) -> Result<Vec<(u32, R)>>) -> Result<Closed<R>> {
        let (per_shard, failed) = self.close_each(close)?;
        let mut requests = Vec::new();
        for (s, reqs) in per_shard {
            let shard = &self.shards[s];
            requests.extend(reqs.into_iter().map(|(local, r)| (shard.global(local), r)));
        }
        Ok(Closed { requests, failed })
    }

    /// Runs `close` on every running shard; a shard whose close fails is out, with its
    /// reason. An error only when no shard is left: a lone shard's own error, else all
    /// their reasons.
    #[allow(clippy::type_complexity)]
    fn close_each<T>(&mut self, close: impl Fn(&mut SecAggServer) -> Result<T>) -> Result<(Vec<(usize, T)>, Vec<(usize, String)>)> {
        let (mut done, mut failed, mut last) = (Vec::new(), Vec::new(), None);
        for (i, shard) in self.shards.iter_mut().enumerate().filter(|(_, s)| s.failed.is_none()) {
            match close(&mut shard.server) {
                Ok(t) => done.push((i, t)),
                Err(e) => {
                    shard.failed = Some(e.to_string());
                    failed.push((i, e.to_string()));
                    last = Some(e);
                }
            }
        }
        if self.shards.iter().all(|s| s.failed.is_some()) {
            if let (1, Some(e)) = (self.shards.len(), last) {
                return Err(e);
            }
            let why: Vec<String> = self.shards.iter().enumerate().map(|(i, s)| format!("shard {i}: {}", s.failed.as_deref().unwrap_or(""))).collect();
            return Err(SecAggError::Aborted(format!("every shard failed ({})", why.join("; "))));
        }
        Ok((done, failed))
    }
}
