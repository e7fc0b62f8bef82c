//! SecAgg+ server state machine (§8.3, §8.5). Phases, in order:
//!
//! ```text
//! CollectingKeys          handle_advertise*      close_advertise()    → ShareKeysRequest per u ∈ U1
//! CollectingShares        handle_share_keys*     close_share_keys()   → MaskedInputRequest per u ∈ U2
//! CollectingMaskedInputs  handle_masked_chunk*   close_masked_inputs()→ UnmaskRequest per u ∈ U3
//! CollectingUnmaskShares  handle_unmask*         close_unmask()       → AggregateOutput (the sum)
//! Done | Aborted
//! ```
//!
//! The caller owns time: it calls `close_*` when the phase deadline passes
//! (or everyone answered). Whoever has not answered validly by then is
//! dropped for the rest of the session; later messages are rejected.
//! A `handle_*` error concerns that one client (it is excluded) and leaves the
//! session running; a `close_*` error aborts the session (no output).
//!
//! Memory: one m-lane accumulator plus O(n·k) ciphertexts and shares. Masked
//! chunks are added into the accumulator as they arrive, so a client whose
//! upload stops part-way leaves lanes that can never be unmasked without
//! revealing it: `close_masked_inputs` then aborts. A transport that must
//! survive mid-upload drops buffers a client's frames until its last one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use subtle::ConstantTimeEq;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::config::{RosterEntry, SessionConfig, session_id as derive_session_id};
use crate::crypto::{SHARE_CT_BYTES, advertisement_message, agree, pairwise_mask_key, public_of, self_mask_key, verify_signature};
use crate::error::{Result, SecAggError};
use crate::harary::NeighbourGraph;
use crate::messages::{AdvertiseKeys, EncryptedShare, MaskedInputRequest, NeighbourKeys, ShareKeysRequest, ShareKeysResponse, UnmaskRequest, UnmaskResponse};
use crate::prg::{MaskJob, MaskPrg, Sign, remove_masks};
use crate::shamir::{LagrangeCache, Share};

/// The server's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerPhase {
    /// R0: collecting AdvertiseKeys.
    CollectingKeys,
    /// R1: collecting ShareKeysResponse.
    CollectingShares,
    /// R2: collecting masked vectors.
    CollectingMaskedInputs,
    /// R4: collecting UnmaskResponse.
    CollectingUnmaskShares,
    /// Output produced.
    Done,
    /// Aborted; no output.
    Aborted,
}

#[derive(Clone)]
struct Advertised {
    identity_pk: [u8; 32],
    c_pk: [u8; 32],
    s_pk: [u8; 32],
    sig: Vec<u8>,
}

/// The unmasked aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateOutput {
    /// Σ_{u∈U3} x_u (mod 2^32), m lanes; decode with the session's encoding.
    pub sum: Vec<u32>,
    /// U3: the clients whose inputs are in the sum.
    pub contributors: Vec<u32>,
    /// Whether U3's neighbour graph is connected (§8.5; always true for the full graph).
    pub survivors_connected: bool,
}

/// Server side of one SecAgg+ session. `Clone` so a caller can checkpoint it.
#[derive(Clone)]
pub struct SecAggServer {
    config: SessionConfig,
    config_hash: [u8; 32],
    phase: ServerPhase,
    advertised: BTreeMap<u32, Advertised>,
    session_id: [u8; 32],
    graph: Option<NeighbourGraph>,
    u1: BTreeSet<u32>,
    u2: BTreeSet<u32>,
    u3: BTreeSet<u32>,
    /// Ciphertexts by recipient, `peer` = sender.
    inbox: BTreeMap<u32, Vec<EncryptedShare>>,
    /// Lanes received so far per uploading client (uploads are in order).
    progress: HashMap<u32, u64>,
    /// Clients whose upload broke part-way (their lanes are in the accumulator).
    broken: BTreeSet<u32>,
    accumulator: Vec<u32>,
    unmask_asked: BTreeMap<u32, UnmaskRequest>,
    /// Revealed shares by owner: (holder, share).
    b_shares: HashMap<u32, Vec<(u32, Share)>>,
    s_shares: HashMap<u32, Vec<(u32, Share)>>,
    unmask_responded: BTreeSet<u32>,
    /// The fewest clients any phase may close with, above the threshold's own need
    /// ([`SecAggServer::with_release_floor`]).
    floor: usize,
}

impl SecAggServer {
    /// A session in `CollectingKeys`.
    pub fn new(config: SessionConfig) -> Result<Self> {
        config.validate()?;
        Ok(SecAggServer {
            config_hash: config.config_hash(),
            config,
            phase: ServerPhase::CollectingKeys,
            advertised: BTreeMap::new(),
            session_id: [0; 32],
            graph: None,
            u1: BTreeSet::new(),
            u2: BTreeSet::new(),
            u3: BTreeSet::new(),
            inbox: BTreeMap::new(),
            progress: HashMap::new(),
            broken: BTreeSet::new(),
            accumulator: Vec::new(),
            unmask_asked: BTreeMap::new(),
            b_shares: HashMap::new(),
            s_shares: HashMap::new(),
            unmask_responded: BTreeSet::new(),
            floor: 0,
        })
    }

    /// A session that releases a sum only of at least `floor` clients: every phase that
    /// closes with fewer aborts, before U3's shares are asked for, so a small group's sum is
    /// never computed (a shard of a round holds its own privacy floor). Below the threshold's
    /// need the threshold rules.
    pub fn with_release_floor(mut self, floor: usize) -> Self {
        self.floor = floor;
        self
    }

    /// Current phase.
    pub fn phase(&self) -> ServerPhase {
        self.phase
    }

    /// The session configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// session_id (all zeros before `close_advertise`).
    pub fn session_id(&self) -> [u8; 32] {
        self.session_id
    }

    /// The neighbour graph, once U1 is fixed.
    pub fn graph(&self) -> Option<&NeighbourGraph> {
        self.graph.as_ref()
    }

    /// U1, U2, U3 as fixed so far.
    pub fn survivors(&self) -> (&BTreeSet<u32>, &BTreeSet<u32>, &BTreeSet<u32>) {
        (&self.u1, &self.u2, &self.u3)
    }

    /// The fewest clients a phase may close with: each needs t neighbours, and the release
    /// floor holds.
    pub fn min_clients(&self) -> usize {
        (self.config.threshold as usize + 1).max(self.floor)
    }

    /// Aborts the session (caller's decision, e.g. an operator cancel).
    pub fn abort(&mut self) {
        self.fail();
    }

    fn fail(&mut self) {
        self.phase = ServerPhase::Aborted;
        self.accumulator = Vec::new();
        self.b_shares.clear();
        self.s_shares.clear();
        self.inbox.clear();
    }

    fn abort_with(&mut self, e: SecAggError) -> SecAggError {
        self.fail();
        match e {
            SecAggError::Aborted(_) => e,
            other => SecAggError::Aborted(other.to_string()),
        }
    }

    fn expect(&self, phase: ServerPhase, message: &'static str) -> Result<()> {
        if self.phase == phase { Ok(()) } else { Err(SecAggError::UnexpectedMessage { phase: phase_name(self.phase), message }) }
    }

    fn need(&self, what: &str, have: usize) -> Result<()> {
        let need = self.min_clients();
        if have < need {
            return Err(SecAggError::BelowThreshold { what: what.into(), have, need });
        }
        Ok(())
    }

    // ---- R0 -------------------------------------------------------------

    /// Accepts one key advertisement. `identity_pk` is the sender's enrolled
    /// Ed25519 key, looked up by the caller from its device registry.
    pub fn handle_advertise(&mut self, msg: AdvertiseKeys, identity_pk: [u8; 32]) -> Result<()> {
        self.expect(ServerPhase::CollectingKeys, "AdvertiseKeys")?;
        let id = msg.client_id;
        if msg.round_id != self.config.round_id {
            return Err(SecAggError::Malformed(format!("client {id} advertised for round {}", msg.round_id)));
        }
        if self.advertised.contains_key(&id) {
            return Err(SecAggError::Malformed(format!("client {id} advertised twice")));
        }
        if self.advertised.len() >= self.config.n_selected as usize {
            return Err(SecAggError::Malformed(format!("more than n_selected clients; {id} refused")));
        }
        if msg.c_pk == msg.s_pk || self.advertised.values().any(|a| [a.c_pk, a.s_pk].iter().any(|k| *k == msg.c_pk || *k == msg.s_pk)) {
            return Err(SecAggError::Malformed(format!("client {id} reuses a public key")));
        }
        let signed = advertisement_message(&self.config_hash, msg.round_id, &msg.c_pk, &msg.s_pk);
        verify_signature(id, &identity_pk, &signed, &msg.sig)?;
        self.advertised.insert(id, Advertised { identity_pk, c_pk: msg.c_pk, s_pk: msg.s_pk, sig: msg.sig });
        Ok(())
    }

    /// Deadline of R0: fixes U1, session_id and the graph, and returns each
    /// client's ShareKeysRequest.
    pub fn close_advertise(&mut self) -> Result<Vec<(u32, ShareKeysRequest)>> {
        self.expect(ServerPhase::CollectingKeys, "close_advertise")?;
        self.build_share_keys_requests().map_err(|e| self.abort_with(e))
    }

    fn build_share_keys_requests(&mut self) -> Result<Vec<(u32, ShareKeysRequest)>> {
        self.need("U1", self.advertised.len())?;
        let roster: Vec<RosterEntry> = self.advertised.iter().map(|(&id, a)| RosterEntry { id, c_pk: a.c_pk, s_pk: a.s_pk }).collect();
        self.session_id = derive_session_id(&self.config_hash, &roster)?;
        self.u1 = self.advertised.keys().copied().collect();
        let ids: Vec<u32> = self.u1.iter().copied().collect();
        let graph = NeighbourGraph::build(&self.session_id, &ids, self.config.degree, self.config.ciphersuite)?;
        let mut out = Vec::with_capacity(ids.len());
        for &u in &ids {
            let neighbours = graph
                .neighbours(u)
                .unwrap_or_default()
                .into_iter()
                .map(|v| {
                    let a = &self.advertised[&v];
                    NeighbourKeys { id: v, identity_pk: a.identity_pk, c_pk: a.c_pk, s_pk: a.s_pk, sig: a.sig.clone() }
                })
                .collect::<Vec<_>>();
            if neighbours.len() < self.config.threshold as usize {
                return Err(SecAggError::BelowThreshold { what: format!("neighbours of {u}"), have: neighbours.len(), need: self.config.threshold as usize });
            }
            out.push((u, ShareKeysRequest { session_id: self.session_id, config: self.config.clone(), neighbours }));
        }
        self.graph = Some(graph);
        self.phase = ServerPhase::CollectingShares;
        Ok(out)
    }

    // ---- R1 -------------------------------------------------------------

    /// Accepts one client's encrypted shares: exactly one 104-byte ciphertext per neighbour.
    pub fn handle_share_keys(&mut self, resp: ShareKeysResponse) -> Result<()> {
        self.expect(ServerPhase::CollectingShares, "ShareKeysResponse")?;
        let u = resp.client_id;
        if !self.u1.contains(&u) {
            return Err(SecAggError::Dropped(u));
        }
        if self.u2.contains(&u) {
            return Err(SecAggError::Malformed(format!("client {u} sent shares twice")));
        }
        let graph = self.graph.as_ref().ok_or(SecAggError::Aborted("no graph".into()))?;
        let expected: BTreeSet<u32> = graph.neighbours(u).unwrap_or_default().into_iter().collect();
        let got: BTreeSet<u32> = resp.shares.iter().map(|e| e.peer).collect();
        if got.len() != resp.shares.len() || got != expected {
            return Err(SecAggError::Malformed(format!("client {u}: shares not addressed to exactly its neighbours")));
        }
        if let Some(e) = resp.shares.iter().find(|e| e.ct.len() != SHARE_CT_BYTES) {
            return Err(SecAggError::Malformed(format!("client {u}: ciphertext of {} bytes", e.ct.len())));
        }
        for e in resp.shares {
            self.inbox.entry(e.peer).or_default().push(EncryptedShare { peer: u, ct: e.ct });
        }
        self.u2.insert(u);
        Ok(())
    }

    /// Deadline of R1: fixes U2 and returns each client's MaskedInputRequest
    /// (the ciphertexts from its neighbours in U2).
    pub fn close_share_keys(&mut self) -> Result<Vec<(u32, MaskedInputRequest)>> {
        self.expect(ServerPhase::CollectingShares, "close_share_keys")?;
        if let Err(e) = self.need("U2", self.u2.len()) {
            return Err(self.abort_with(e));
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        let out = self
            .u2
            .iter()
            .map(|&u| {
                let shares = inbox.remove(&u).unwrap_or_default().into_iter().filter(|e| self.u2.contains(&e.peer)).collect();
                (u, MaskedInputRequest { shares })
            })
            .collect();
        self.accumulator = vec![0u32; self.config.m as usize];
        self.phase = ServerPhase::CollectingMaskedInputs;
        Ok(out)
    }

    // ---- R2 -------------------------------------------------------------

    /// Adds one frame of a client's masked vector into the accumulator.
    /// Frames must arrive in order without gaps or overlap.
    pub fn handle_masked_chunk(&mut self, client_id: u32, offset: u64, data: &[u32]) -> Result<()> {
        self.expect(ServerPhase::CollectingMaskedInputs, "MaskedChunk")?;
        let u = client_id;
        if !self.u2.contains(&u) || self.broken.contains(&u) {
            return Err(SecAggError::Dropped(u));
        }
        let m = self.config.m;
        let done = self.progress.get(&u).copied().unwrap_or(0);
        if done == m {
            return Err(SecAggError::Malformed(format!("client {u} sent lanes past the end")));
        }
        let end = offset.checked_add(data.len() as u64);
        if offset != done || data.is_empty() || end.is_none_or(|e| e > m) {
            if done > 0 {
                self.broken.insert(u);
            }
            return Err(SecAggError::Malformed(format!("client {u}: chunk at {offset} of {} lanes, expected offset {done} within m = {m}", data.len())));
        }
        let acc = &mut self.accumulator[offset as usize..offset as usize + data.len()];
        for (a, &d) in acc.iter_mut().zip(data) {
            *a = a.wrapping_add(d);
        }
        self.progress.insert(u, offset + data.len() as u64);
        Ok(())
    }

    /// Deadline of R2: U3 = clients with complete vectors. Aborts if any upload
    /// stopped part-way or U3 is too small; returns each U3 client's UnmaskRequest.
    pub fn close_masked_inputs(&mut self) -> Result<Vec<(u32, UnmaskRequest)>> {
        self.expect(ServerPhase::CollectingMaskedInputs, "close_masked_inputs")?;
        let m = self.config.m;
        let partial: Vec<u32> = self.progress.iter().filter(|&(_, &d)| d > 0 && d < m).map(|(&u, _)| u).chain(self.broken.iter().copied()).collect();
        if let Some(u) = partial.first() {
            let e = SecAggError::Aborted(format!("client {u} uploaded part of its vector; the sum cannot be unmasked"));
            return Err(self.abort_with(e));
        }
        self.u3 = self.progress.iter().filter(|&(_, &d)| d == m).map(|(&u, _)| u).collect();
        if let Err(e) = self.need("U3", self.u3.len()) {
            return Err(self.abort_with(e));
        }
        let graph = self.graph.as_ref().ok_or(SecAggError::Aborted("no graph".into()))?;
        let mut out = Vec::with_capacity(self.u3.len());
        for &u in &self.u3 {
            let (mut alive, mut dropped) = (Vec::new(), Vec::new());
            for v in graph.neighbours(u).unwrap_or_default() {
                if self.u3.contains(&v) {
                    alive.push(v);
                } else if self.u2.contains(&v) {
                    dropped.push(v);
                }
            }
            let req = UnmaskRequest { alive, dropped };
            self.unmask_asked.insert(u, req.clone());
            out.push((u, req));
        }
        self.phase = ServerPhase::CollectingUnmaskShares;
        Ok(out)
    }

    // ---- R4 -------------------------------------------------------------

    /// Accepts one client's revealed shares: exactly the ones it was asked for.
    pub fn handle_unmask(&mut self, resp: UnmaskResponse) -> Result<()> {
        self.expect(ServerPhase::CollectingUnmaskShares, "UnmaskResponse")?;
        let u = resp.client_id;
        let asked = self.unmask_asked.get(&u).ok_or(SecAggError::Dropped(u))?;
        if self.unmask_responded.contains(&u) {
            return Err(SecAggError::Malformed(format!("client {u} answered twice")));
        }
        // Any order, but no duplicates and exactly what was asked.
        let ids = |v: &[crate::messages::RevealedShare]| {
            let mut ids: Vec<u32> = v.iter().map(|r| r.peer).collect();
            ids.sort_unstable();
            ids
        };
        if ids(&resp.b_shares) != asked.alive || ids(&resp.s_shares) != asked.dropped {
            return Err(SecAggError::Malformed(format!("client {u}: revealed shares differ from the request")));
        }
        let parse =
            |v: &[crate::messages::RevealedShare]| -> Result<Vec<(u32, Share)>> { v.iter().map(|r| Ok((r.peer, Share::from_bytes(&r.share)?))).collect() };
        let (bs, ss) = (parse(&resp.b_shares)?, parse(&resp.s_shares)?);
        for (owner, share) in bs {
            self.b_shares.entry(owner).or_default().push((u, share));
        }
        for (owner, share) in ss {
            self.s_shares.entry(owner).or_default().push((u, share));
        }
        self.unmask_responded.insert(u);
        Ok(())
    }

    /// Deadline of R4: reconstructs b_u for u ∈ U3 and s_sk_u for u ∈ U2 \ U3,
    /// removes the masks and returns the sum. Aborts if any reconstruction has
    /// fewer than t shares or a rebuilt key does not match its advertised key.
    pub fn close_unmask(&mut self) -> Result<AggregateOutput> {
        self.expect(ServerPhase::CollectingUnmaskShares, "close_unmask")?;
        let jobs = match self.mask_removal_jobs() {
            Ok(j) => j,
            Err(e) => return Err(self.abort_with(e)),
        };
        let mut sum = std::mem::take(&mut self.accumulator);
        remove_masks(&jobs, &mut sum);
        let connected = self.graph.as_ref().is_some_and(|g| g.is_connected(&self.u3));
        self.b_shares.clear();
        self.s_shares.clear();
        self.phase = ServerPhase::Done;
        Ok(AggregateOutput { sum, contributors: self.u3.iter().copied().collect(), survivors_connected: connected })
    }

    /// The (sign, PRG) pairs whose application to the accumulator yields Σx.
    fn mask_removal_jobs(&self) -> Result<Vec<MaskJob>> {
        let t = self.config.threshold as usize;
        let cfg = &self.config;
        let sid = self.session_id;
        let graph = self.graph.as_ref().ok_or(SecAggError::Aborted("no graph".into()))?;
        let mut cache = LagrangeCache::default();
        let mut jobs = Vec::new();
        let empty = Vec::new();
        for &u in &self.u3 {
            let shares: Vec<(u32, &Share)> = self.b_shares.get(&u).unwrap_or(&empty).iter().map(|(h, s)| (*h, s)).collect();
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold { what: format!("b-shares of {u}"), have: shares.len(), need: t });
            }
            let b_u = Zeroizing::new(cache.reconstruct(t, &shares)?);
            jobs.push((Sign::Sub, MaskPrg::new(cfg.ciphersuite, &self_mask_key(&sid, &b_u)?)));
        }
        let dropped: Vec<u32> = self.u2.difference(&self.u3).copied().collect();
        // Key agreement dominates here; run it in parallel when rayon is enabled.
        let per_dropped = crate::par::map(&dropped, |&u| -> Result<Vec<MaskJob>> {
            let shares: Vec<(u32, &Share)> = self.s_shares.get(&u).unwrap_or(&empty).iter().map(|(h, s)| (*h, s)).collect();
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold { what: format!("s-shares of {u}"), have: shares.len(), need: t });
            }
            let raw = Zeroizing::new(LagrangeCache::default().reconstruct(t, &shares)?);
            let s_sk = StaticSecret::from(*raw);
            let advertised = &self.advertised[&u].s_pk;
            if !bool::from(public_of(&s_sk).ct_eq(advertised)) {
                return Err(SecAggError::Reconstruction(format!("rebuilt mask key of {u} does not match its public key")));
            }
            let mut out = Vec::new();
            for v in graph.neighbours(u).unwrap_or_default() {
                if !self.u3.contains(&v) {
                    continue;
                }
                let dh = agree(&s_sk, &self.advertised[&v].s_pk)?;
                let key = pairwise_mask_key(&sid, &dh, u, v, cfg.m, cfg.modulus_bits)?;
                // v added +PRG(s_uv) if u > v, −PRG(s_uv) if u < v; undo it.
                let sign = if u > v { Sign::Sub } else { Sign::Add };
                out.push((sign, MaskPrg::new(cfg.ciphersuite, &key)));
            }
            Ok(out)
        });
        for r in per_dropped {
            jobs.extend(r?);
        }
        Ok(jobs)
    }
}

fn phase_name(p: ServerPhase) -> &'static str {
    match p {
        ServerPhase::CollectingKeys => "CollectingKeys",
        ServerPhase::CollectingShares => "CollectingShares",
        ServerPhase::CollectingMaskedInputs => "CollectingMaskedInputs",
        ServerPhase::CollectingUnmaskShares => "CollectingUnmaskShares",
        ServerPhase::Done => "Done",
        ServerPhase::Aborted => "Aborted",
    }
}
