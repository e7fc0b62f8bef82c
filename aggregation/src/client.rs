//! SecAgg+ client state machine (§8.3), one state per protocol phase:
//!
//! ```text
//! start() ──AdvertiseKeys──▶ AwaitShareKeys
//!   ShareKeysRequest   ─▶ AwaitMaskedInputRequest   (sends ShareKeysResponse)
//!   MaskedInputRequest ─▶ AwaitInput                (decrypts shares, derives masks)
//!   Input(encoded)     ─▶ AwaitUnmask               (emits MaskedInput, streamed in chunks)
//!   UnmaskRequest      ─▶ Completed                 (sends UnmaskResponse)
//!   Abort(reason)      ─▶ Aborted                   (from any state)
//! ```
//!
//! `handle(self, msg)` consumes the state. Any failed check returns an error
//! and drops the state, which erases every secret it held (the session is
//! over for this client: abort semantics). Message validity is checked fully
//! before anything is sent, so a failing message never leaks a partial reply.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use zeroize::Zeroizing;

use crate::config::{RosterEntry, SessionConfig, session_id as derive_session_id};
use crate::crypto::{
    IdentitySigner, SessionKeys, advertisement_message, agree, enc_key, open_shares, pairwise_mask_key, seal_shares, self_mask_key, verify_signature,
};
use crate::error::{Result, SecAggError};
use crate::messages::{
    AdvertiseKeys, EncryptedShare, MaskedChunk, MaskedInputRequest, RevealedShare, ShareKeysRequest, ShareKeysResponse, UnmaskRequest, UnmaskResponse,
};
use crate::prg::{CHUNK_BYTES, MaskPrg, Sign};
use crate::shamir::{self, Share};

/// Lanes per transport frame: 1 MiB of u32.
pub const FRAME_LANES: usize = 1 << 18;

/// What the client machine consumes: server messages and the local input.
#[derive(Debug)]
pub enum ClientIncoming {
    /// R1 from the server.
    ShareKeys(ShareKeysRequest),
    /// R2 from the server.
    MaskedInputRequest(MaskedInputRequest),
    /// Local: the encoded vector (m lanes, weight last), once training is done.
    Input(Vec<u32>),
    /// R4 from the server.
    Unmask(UnmaskRequest),
    /// The server aborted the session, or a local deadline passed.
    Abort(String),
}

/// What the client machine asks the transport to send.
#[derive(Debug)]
pub enum ClientOutgoing {
    /// R1 reply.
    ShareKeys(ShareKeysResponse),
    /// R2 reply: the masked vector, to be streamed with [`MaskedInput::chunks`].
    MaskedInput(MaskedInput),
    /// R4 reply.
    Unmask(UnmaskResponse),
}

/// Which share of a peer this client revealed (a peer gets at most one kind, ever).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevealedKind {
    /// The self-mask seed share (peer survived).
    SelfMask,
    /// The mask-key share (peer dropped).
    MaskKey,
}

/// The client's view of one session: identity, config and the keys it checks against.
struct Session {
    id: u32,
    config: SessionConfig,
    config_hash: [u8; 32],
}

/// After advertising keys: waiting for the neighbours' keys.
pub struct AwaitShareKeys {
    s: Session,
    keys: SessionKeys,
    rng: ChaCha20Rng,
}

#[derive(Clone, Copy)]
struct PeerKeys {
    c_pk: [u8; 32],
    s_pk: [u8; 32],
}

/// After sending encrypted shares: waiting for the shares addressed to us.
pub struct AwaitMaskedInputRequest {
    s: Session,
    session_id: [u8; 32],
    keys: SessionKeys,
    b_u: Zeroizing<[u8; 32]>,
    neighbours: BTreeMap<u32, PeerKeys>,
    /// X25519(c_sk, c_pk_v) per neighbour, kept from R1: both directions' keys derive from it.
    channel_dh: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

/// Shares decrypted and masks derived: waiting for the local encoded input.
pub struct AwaitInput {
    s: Session,
    held: BTreeMap<u32, (Share, Share)>,
    masks: Vec<(Sign, MaskPrg)>,
}

/// Masked input sent: waiting for the unmask request.
pub struct AwaitUnmask {
    s: Session,
    held: BTreeMap<u32, (Share, Share)>,
    revealed: BTreeMap<u32, RevealedKind>,
}

/// Finished: every secret is gone; the reveal decisions are kept so that any
/// later request is refused with the reason on record.
pub struct Completed {
    /// Client id.
    pub id: u32,
    /// The kind of share revealed for each peer.
    pub revealed: BTreeMap<u32, RevealedKind>,
}

/// The client's SecAgg+ state.
pub enum ClientState {
    /// Keys advertised.
    AwaitShareKeys(Box<AwaitShareKeys>),
    /// Shares sent.
    AwaitMaskedInputRequest(Box<AwaitMaskedInputRequest>),
    /// Waiting for the local input to mask.
    AwaitInput(AwaitInput),
    /// Masked input sent.
    AwaitUnmask(AwaitUnmask),
    /// Unmask response sent.
    Completed(Completed),
    /// Aborted (reason); holds no secrets.
    Aborted(String),
}

impl std::fmt::Debug for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientState::{}", self.phase())
    }
}

impl ClientState {
    /// Starts a session: fresh c_sk, s_sk from `rng` (seed it with
    /// [`crate::crypto::system_rng`] in production) and the signed advertisement.
    pub fn start(client_id: u32, config: SessionConfig, signer: &dyn IdentitySigner, mut rng: ChaCha20Rng) -> Result<(ClientState, AdvertiseKeys)> {
        config.validate()?;
        let config_hash = config.config_hash();
        let keys = SessionKeys::generate(&mut rng);
        let (c_pk, s_pk) = keys.public_keys();
        let sig = signer.sign(&advertisement_message(&config_hash, config.round_id, &c_pk, &s_pk));
        let adv = AdvertiseKeys { client_id, round_id: config.round_id, c_pk, s_pk, sig: sig.to_vec() };
        let s = Session { id: client_id, config, config_hash };
        Ok((ClientState::AwaitShareKeys(Box::new(AwaitShareKeys { s, keys, rng })), adv))
    }

    /// The phase name (for logs and errors).
    pub fn phase(&self) -> &'static str {
        match self {
            ClientState::AwaitShareKeys(_) => "AwaitShareKeys",
            ClientState::AwaitMaskedInputRequest(_) => "AwaitMaskedInputRequest",
            ClientState::AwaitInput(_) => "AwaitInput",
            ClientState::AwaitUnmask(_) => "AwaitUnmask",
            ClientState::Completed(_) => "Completed",
            ClientState::Aborted(_) => "Aborted",
        }
    }

    /// Advances the machine by one message.
    pub fn handle(self, msg: ClientIncoming) -> Result<(ClientState, Vec<ClientOutgoing>)> {
        let phase = self.phase();
        match (self, msg) {
            (_, ClientIncoming::Abort(reason)) => Ok((ClientState::Aborted(reason), vec![])),
            (ClientState::AwaitShareKeys(st), ClientIncoming::ShareKeys(req)) => {
                let (next, resp) = st.share_keys(req)?;
                Ok((ClientState::AwaitMaskedInputRequest(Box::new(next)), vec![ClientOutgoing::ShareKeys(resp)]))
            }
            (ClientState::AwaitMaskedInputRequest(st), ClientIncoming::MaskedInputRequest(req)) => {
                Ok((ClientState::AwaitInput(st.receive_shares(req)?), vec![]))
            }
            (ClientState::AwaitInput(st), ClientIncoming::Input(input)) => {
                let (next, masked) = st.mask(input)?;
                Ok((ClientState::AwaitUnmask(next), vec![ClientOutgoing::MaskedInput(masked)]))
            }
            (ClientState::AwaitUnmask(st), ClientIncoming::Unmask(req)) => {
                let (next, resp) = st.unmask(req)?;
                Ok((ClientState::Completed(next), vec![ClientOutgoing::Unmask(resp)]))
            }
            (ClientState::Completed(c), ClientIncoming::Unmask(req)) => {
                // A second request: name a peer whose other share was already revealed, if any.
                for v in req.alive.iter().chain(&req.dropped) {
                    if c.revealed.contains_key(v) {
                        return Err(SecAggError::BothSharesRequested(*v));
                    }
                }
                Err(SecAggError::UnexpectedMessage { phase, message: "UnmaskRequest" })
            }
            (_, msg) => Err(SecAggError::UnexpectedMessage { phase, message: incoming_name(&msg) }),
        }
    }
}

fn incoming_name(m: &ClientIncoming) -> &'static str {
    match m {
        ClientIncoming::ShareKeys(_) => "ShareKeysRequest",
        ClientIncoming::MaskedInputRequest(_) => "MaskedInputRequest",
        ClientIncoming::Input(_) => "Input",
        ClientIncoming::Unmask(_) => "UnmaskRequest",
        ClientIncoming::Abort(_) => "Abort",
    }
}

impl AwaitShareKeys {
    fn share_keys(mut self: Box<Self>, req: ShareKeysRequest) -> Result<(AwaitMaskedInputRequest, ShareKeysResponse)> {
        let s = &self.s;
        let cfg = &s.config;
        if req.config.config_hash() != s.config_hash {
            return Err(SecAggError::Malformed("server config differs from the round plan".into()));
        }
        let t = cfg.threshold as usize;
        let max = (cfg.degree.min(cfg.n_selected - 1)) as usize;
        if req.neighbours.len() > max {
            return Err(SecAggError::Malformed(format!("{} neighbours, at most {max}", req.neighbours.len())));
        }
        if req.neighbours.len() < t {
            return Err(SecAggError::BelowThreshold { what: "neighbours in U1".into(), have: req.neighbours.len(), need: t });
        }
        let (my_c, my_s) = self.keys.public_keys();
        // Distinct keys: a repeated key (ours or another's) would let the server
        // make us agree with ourselves or alias two neighbours.
        let mut keys_seen: HashSet<[u8; 32]> = HashSet::from([my_c, my_s]);
        let mut neighbours = BTreeMap::new();
        for nb in &req.neighbours {
            if nb.id == s.id {
                return Err(SecAggError::Malformed("own id in the neighbour list".into()));
            }
            if neighbours.contains_key(&nb.id) {
                return Err(SecAggError::Malformed(format!("duplicate neighbour {}", nb.id)));
            }
            if !keys_seen.insert(nb.c_pk) || !keys_seen.insert(nb.s_pk) {
                return Err(SecAggError::Malformed(format!("repeated public key from neighbour {}", nb.id)));
            }
            let msg = advertisement_message(&s.config_hash, cfg.round_id, &nb.c_pk, &nb.s_pk);
            verify_signature(nb.id, &nb.identity_pk, &msg, &nb.sig)?;
            neighbours.insert(nb.id, PeerKeys { c_pk: nb.c_pk, s_pk: nb.s_pk });
        }
        // With the full graph the neighbour list is all of U1 but us, so the
        // session id can be recomputed rather than trusted.
        if cfg.is_full_graph() {
            let mut roster: Vec<RosterEntry> = neighbours.iter().map(|(&id, k)| RosterEntry { id, c_pk: k.c_pk, s_pk: k.s_pk }).collect();
            roster.push(RosterEntry { id: s.id, c_pk: my_c, s_pk: my_s });
            if derive_session_id(&s.config_hash, &roster)? != req.session_id {
                return Err(SecAggError::Malformed("session id does not match the roster".into()));
            }
        }
        let sid = req.session_id;
        let mut b_u = Zeroizing::new([0u8; 32]);
        self.rng.fill_bytes(&mut b_u[..]);
        let holders: Vec<u32> = neighbours.keys().copied().collect();
        let b_shares = shamir::split(&b_u, t, &holders, &mut self.rng)?;
        let s_sk = Zeroizing::new(self.keys.s_sk.to_bytes());
        let s_shares = shamir::split(&s_sk, t, &holders, &mut self.rng)?;
        let mut shares = Vec::with_capacity(holders.len());
        let mut channel_dh = BTreeMap::new();
        for ((v, bs), ss) in holders.iter().zip(&b_shares).zip(&s_shares) {
            let dh = agree(&self.keys.c_sk, &neighbours[v].c_pk)?;
            let key = enc_key(&sid, &dh, s.id, *v)?;
            shares.push(EncryptedShare { peer: *v, ct: seal_shares(&key, &sid, s.id, *v, bs, ss)? });
            channel_dh.insert(*v, dh);
        }
        let resp = ShareKeysResponse { client_id: s.id, shares };
        let next = AwaitMaskedInputRequest { s: self.s, session_id: sid, keys: self.keys, b_u, neighbours, channel_dh };
        Ok((next, resp))
    }
}

impl AwaitMaskedInputRequest {
    fn receive_shares(self: Box<Self>, req: MaskedInputRequest) -> Result<AwaitInput> {
        let s = &self.s;
        let cfg = &s.config;
        let t = cfg.threshold as usize;
        let mut held = BTreeMap::new();
        for e in &req.shares {
            let dh = self.channel_dh.get(&e.peer).ok_or(SecAggError::UnknownNeighbour(e.peer))?;
            if held.contains_key(&e.peer) {
                return Err(SecAggError::Malformed(format!("two ciphertexts from {}", e.peer)));
            }
            let key = enc_key(&self.session_id, dh, e.peer, s.id)?;
            held.insert(e.peer, open_shares(&key, &self.session_id, e.peer, s.id, &e.ct)?);
        }
        if held.len() < t {
            return Err(SecAggError::BelowThreshold { what: "neighbours in U2".into(), have: held.len(), need: t });
        }
        // Masks: +PRG(self), +PRG(s_uv) for v > u, −PRG(s_uv) for v < u, over v ∈ N(u) ∩ U2.
        let mut masks = Vec::with_capacity(held.len() + 1);
        masks.push((Sign::Add, MaskPrg::new(cfg.ciphersuite, &self_mask_key(&self.session_id, &self.b_u)?)));
        for &v in held.keys() {
            let dh = agree(&self.keys.s_sk, &self.neighbours[&v].s_pk)?;
            let key = pairwise_mask_key(&self.session_id, &dh, s.id, v, cfg.m, cfg.modulus_bits)?;
            let sign = if v > s.id { Sign::Add } else { Sign::Sub };
            masks.push((sign, MaskPrg::new(cfg.ciphersuite, &key)));
        }
        // c_sk, s_sk and b_u are dropped (erased) here: only the derived masks remain.
        Ok(AwaitInput { s: self.s, held, masks })
    }
}

impl AwaitInput {
    fn mask(self, input: Vec<u32>) -> Result<(AwaitUnmask, MaskedInput)> {
        let m = self.s.config.m as usize;
        if input.len() != m {
            return Err(SecAggError::LengthMismatch { expected: m, got: input.len() });
        }
        let masked = MaskedInput { client_id: self.s.id, input, masks: self.masks };
        Ok((AwaitUnmask { s: self.s, held: self.held, revealed: BTreeMap::new() }, masked))
    }
}

impl AwaitUnmask {
    fn unmask(mut self, req: UnmaskRequest) -> Result<(Completed, UnmaskResponse)> {
        let t = self.s.config.threshold as usize;
        let alive: BTreeSet<u32> = req.alive.iter().copied().collect();
        let dropped: BTreeSet<u32> = req.dropped.iter().copied().collect();
        if alive.len() != req.alive.len() || dropped.len() != req.dropped.len() {
            return Err(SecAggError::Malformed("duplicate id in the unmask request".into()));
        }
        if let Some(&v) = alive.intersection(&dropped).next() {
            return Err(SecAggError::BothSharesRequested(v));
        }
        for &v in alive.iter().chain(&dropped) {
            if !self.held.contains_key(&v) {
                return Err(SecAggError::UnknownNeighbour(v));
            }
        }
        for (&v, kind) in alive.iter().map(|v| (v, RevealedKind::SelfMask)).chain(dropped.iter().map(|v| (v, RevealedKind::MaskKey))) {
            if self.revealed.get(&v).is_some_and(|k| *k != kind) {
                return Err(SecAggError::BothSharesRequested(v));
            }
        }
        if alive.len() < t {
            return Err(SecAggError::BelowThreshold { what: "alive neighbours".into(), have: alive.len(), need: t });
        }
        let reveal = |v: &u32, pick: fn(&(Share, Share)) -> &Share| RevealedShare { peer: *v, share: pick(&self.held[v]).to_bytes().to_vec() };
        let b_shares = alive.iter().map(|v| reveal(v, |p| &p.0)).collect();
        let s_shares = dropped.iter().map(|v| reveal(v, |p| &p.1)).collect();
        for &v in &alive {
            self.revealed.insert(v, RevealedKind::SelfMask);
        }
        for &v in &dropped {
            self.revealed.insert(v, RevealedKind::MaskKey);
        }
        let resp = UnmaskResponse { client_id: self.s.id, b_shares, s_shares };
        Ok((Completed { id: self.s.id, revealed: self.revealed }, resp))
    }
}

/// The masked vector y_u = x_u + PRG(self) + Σ±PRG(s_uv), computed lazily so
/// the transport can stream it frame by frame with O(frame) extra memory.
pub struct MaskedInput {
    client_id: u32,
    input: Vec<u32>,
    masks: Vec<(Sign, MaskPrg)>,
}

impl std::fmt::Debug for MaskedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskedInput {{ client_id: {}, lanes: {}, masks: {} }}", self.client_id, self.input.len(), self.masks.len())
    }
}

impl MaskedInput {
    /// Number of lanes (m).
    pub fn len(&self) -> usize {
        self.input.len()
    }

    /// Whether the vector is empty (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    /// Writes masked lanes `[offset, offset + out.len())` into `out`.
    pub fn write_masked(&self, offset: usize, out: &mut [u32]) -> Result<()> {
        let end = offset.checked_add(out.len()).filter(|&e| e <= self.input.len());
        let Some(end) = end else {
            return Err(SecAggError::LengthMismatch { expected: self.input.len(), got: offset.saturating_add(out.len()) });
        };
        self.fill(offset, out, end);
        Ok(())
    }

    /// `write_masked` for a range already known to be in bounds.
    fn fill(&self, offset: usize, out: &mut [u32], end: usize) {
        out.copy_from_slice(&self.input[offset..end]);
        // Apply every mask to one 64 KiB piece before moving on, so the piece stays in cache.
        let piece = CHUNK_BYTES / 4;
        for (i, part) in out.chunks_mut(piece).enumerate() {
            let at = (offset + i * piece) as u64;
            for (sign, prg) in &self.masks {
                prg.apply(*sign, at, part);
            }
        }
    }

    /// One transport frame.
    pub fn chunk(&self, offset: usize, lanes: usize) -> Result<MaskedChunk> {
        let mut data = vec![0u32; lanes.min(self.input.len().saturating_sub(offset))];
        self.write_masked(offset, &mut data)?;
        Ok(MaskedChunk { client_id: self.client_id, offset: offset as u64, data })
    }

    /// All frames in order, `lanes_per_chunk` lanes each (the last may be shorter).
    pub fn chunks(&self, lanes_per_chunk: usize) -> impl Iterator<Item = MaskedChunk> + '_ {
        let step = lanes_per_chunk.max(1);
        (0..self.input.len()).step_by(step).map(move |off| {
            let end = (off + step).min(self.input.len());
            let mut data = vec![0u32; end - off];
            self.fill(off, &mut data, end);
            MaskedChunk { client_id: self.client_id, offset: off as u64, data }
        })
    }

    /// The whole masked vector.
    pub fn into_vec(self) -> Vec<u32> {
        let mut out = vec![0u32; self.input.len()];
        self.fill(0, &mut out, self.input.len());
        out
    }
}
