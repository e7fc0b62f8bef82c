//! Mask PRG: expands a 256-bit seed-derived key into u32 lanes and adds or
//! subtracts them (mod 2^32) into a vector, in 64 KiB pieces so the keystream
//! never leaves L2 and no m-sized temporary exists.
//!
//! Suite 1 (AES): AES-128-CTR, key = first 16 bytes of the 32-byte mask key,
//! 128-bit big-endian counter starting at 0; keystream bytes read as
//! little-endian u32 lanes (lane i = bytes 4i..4i+4, so block b holds lanes 4b..4b+4).
//! Suite 2 (ChaCha20): RFC 8439 ChaCha20, key = the 32-byte mask key,
//! nonce = 12 zero bytes, block counter starting at 0; lane i = keystream
//! bytes 4i..4i+4, little-endian.
//!
//! The expansion is position-addressable ([`MaskPrg::apply`] takes a lane
//! offset), which lets a client emit its masked vector chunk by chunk and lets
//! the server remove masks over disjoint accumulator ranges in parallel.

use aes::Aes128;
use aes::cipher::{InnerIvInit, KeyInit, KeyIvInit, StreamCipherCore, StreamCipherSeekCore, generic_array::GenericArray};
use chacha20::ChaChaCore;
use ctr::{CtrCore, flavors::Ctr128BE};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::{Result, SecAggError};

/// Keystream buffer size: 64 KiB, per the spec.
pub const CHUNK_BYTES: usize = 64 * 1024;

type AesCtrCore = CtrCore<Aes128, Ctr128BE>;
type ChaCha20Core = ChaChaCore<chacha20::cipher::consts::U10>;

/// The negotiated cipher suite (`ciphersuite` in the session config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CipherSuite {
    /// X25519, HKDF-SHA256, ChaCha20-Poly1305 shares, AES-128-CTR mask PRG.
    Aes128Ctr = 1,
    /// Same, with a ChaCha20 mask PRG for devices without AES hardware.
    ChaCha20 = 2,
}

impl CipherSuite {
    /// Wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses a wire code.
    pub fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(CipherSuite::Aes128Ctr),
            2 => Ok(CipherSuite::ChaCha20),
            _ => Err(SecAggError::InvalidConfig(format!("unknown ciphersuite {c}"))),
        }
    }
}

/// A 32-byte mask key (pairwise seed s_uv or the self-mask key); erased on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskKey(pub(crate) [u8; 32]);

impl MaskKey {
    /// Wraps raw key bytes (known-answer tests, cross-language checks).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        MaskKey(b)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

impl Drop for MaskKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Whether the keystream is added to or subtracted from the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// target += PRG
    Add,
    /// target −= PRG
    Sub,
}

impl Sign {
    /// The opposite sign.
    pub fn flip(self) -> Self {
        match self {
            Sign::Add => Sign::Sub,
            Sign::Sub => Sign::Add,
        }
    }
}

/// A keyed mask PRG, ready to expand at any lane offset. Holding the AES key
/// schedule (not the raw key) makes each chunk's set-up a copy, not a key expansion.
#[derive(Clone)]
pub enum MaskPrg {
    /// Suite 1.
    Aes(Box<Aes128>),
    /// Suite 2.
    ChaCha(Box<[u8; 32]>),
}

impl std::fmt::Debug for MaskPrg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaskPrg::Aes(_) => "MaskPrg::Aes(..)",
            MaskPrg::ChaCha(_) => "MaskPrg::ChaCha(..)",
        })
    }
}

impl Drop for MaskPrg {
    fn drop(&mut self) {
        // aes 0.8 does not zeroize its schedule without the `zeroize` feature
        // of cipher; the ChaCha key we own is erased here.
        if let MaskPrg::ChaCha(k) = self {
            k.zeroize();
        }
    }
}

impl MaskPrg {
    /// Keys the PRG of `suite` with `key`.
    pub fn new(suite: CipherSuite, key: &MaskKey) -> Self {
        match suite {
            CipherSuite::Aes128Ctr => MaskPrg::Aes(Box::new(Aes128::new(GenericArray::from_slice(&key.0[..16])))),
            CipherSuite::ChaCha20 => MaskPrg::ChaCha(Box::new(key.0)),
        }
    }

    /// `out[i] ±= lane(lane_offset + i)` (mod 2^32) for every i.
    pub fn apply(&self, sign: Sign, lane_offset: u64, out: &mut [u32]) {
        match self {
            MaskPrg::Aes(aes) => {
                // 4 lanes per 16-byte block; the counter is the block index.
                let block = lane_offset / 4;
                let iv = (block as u128).to_be_bytes();
                let core = AesCtrCore::inner_iv_init((**aes).clone(), GenericArray::from_slice(&iv));
                expand(core, (lane_offset % 4) as usize, sign, out);
            }
            MaskPrg::ChaCha(key) => {
                // 16 lanes per 64-byte block; RFC 8439 has a 32-bit block counter.
                let mut core = ChaCha20Core::new(GenericArray::from_slice(&key[..]), &GenericArray::default());
                core.set_block_pos((lane_offset / 16) as u32);
                expand(core, (lane_offset % 16) as usize, sign, out);
            }
        }
    }

    /// The raw lanes `[lane_offset, lane_offset + out.len())` (tests, graph shuffle).
    pub fn keystream(&self, lane_offset: u64, out: &mut [u32]) {
        out.fill(0);
        self.apply(Sign::Add, lane_offset, out);
    }
}

thread_local! {
    // One keystream buffer per thread, allocated once: a 64 KiB array on the
    // stack would be re-zeroed on every call, which costs ~20% at small chunks.
    static KEYSTREAM: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; CHUNK_BYTES].into_boxed_slice());
}

/// Generates keystream 64 KiB at a time and folds it into `out`, skipping the
/// first `skip` lanes of the first block. The keystream left in the buffer is
/// not erased: it is overwritten by the next call, and erasing 64 KiB with
/// volatile writes would cost more than generating it.
fn expand<C: StreamCipherCore>(mut core: C, mut skip: usize, sign: Sign, mut out: &mut [u32]) {
    let block_bytes = std::mem::size_of::<GenericArray<u8, C::BlockSize>>();
    let lanes_per_block = block_bytes / 4;
    KEYSTREAM.with(|cell| {
        let mut guard = cell.borrow_mut();
        let cap_blocks = guard.len() / block_bytes;
        // SAFETY: GenericArray<u8, N> is #[repr(transparent)] over [u8; N]
        // (alignment 1), so the byte buffer is a valid slice of cap_blocks blocks.
        let blocks: &mut [GenericArray<u8, C::BlockSize>] = unsafe { std::slice::from_raw_parts_mut(guard.as_mut_ptr().cast(), cap_blocks) };
        while !out.is_empty() {
            let nblocks = (skip + out.len()).div_ceil(lanes_per_block).min(cap_blocks);
            core.write_keystream_blocks(&mut blocks[..nblocks]);
            let take = (nblocks * lanes_per_block - skip).min(out.len());
            // SAFETY: as above, the first nblocks blocks are nblocks·block_bytes bytes.
            let bytes: &[u8] = unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), nblocks * block_bytes) };
            let (head, rest) = std::mem::take(&mut out).split_at_mut(take);
            fold(sign, head, &bytes[skip * 4..skip * 4 + take * 4]);
            out = rest;
            skip = 0;
        }
    });
}

#[inline]
fn fold(sign: Sign, out: &mut [u32], ks: &[u8]) {
    // Two monomorphic loops so LLVM vectorises each (little-endian loads + add/sub).
    match sign {
        Sign::Add => {
            for (o, k) in out.iter_mut().zip(ks.chunks_exact(4)) {
                *o = o.wrapping_add(u32::from_le_bytes([k[0], k[1], k[2], k[3]]));
            }
        }
        Sign::Sub => {
            for (o, k) in out.iter_mut().zip(ks.chunks_exact(4)) {
                *o = o.wrapping_sub(u32::from_le_bytes([k[0], k[1], k[2], k[3]]));
            }
        }
    }
}

/// Reads a PRG's keystream as a sequence of u32 words (used for the graph shuffle).
pub(crate) struct WordStream {
    prg: MaskPrg,
    buf: Vec<u32>,
    pos: usize,
    next_offset: u64,
}

impl WordStream {
    pub(crate) fn new(prg: MaskPrg) -> Self {
        WordStream { prg, buf: Vec::new(), pos: 0, next_offset: 0 }
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.pos == self.buf.len() {
            self.buf = vec![0; 1024];
            self.prg.keystream(self.next_offset, &mut self.buf);
            self.next_offset += self.buf.len() as u64;
            self.pos = 0;
        }
        let w = self.buf[self.pos];
        self.pos += 1;
        w
    }

    /// Uniform integer in `0..bound` (bound ≥ 1), by rejection: no modulo bias.
    pub(crate) fn below(&mut self, bound: u32) -> u32 {
        let zone = u32::MAX - (u32::MAX - bound + 1) % bound;
        loop {
            let w = self.next_u32();
            if w <= zone {
                return w % bound;
            }
        }
    }
}

/// One mask to remove: apply `PRG` with this sign over the whole accumulator.
pub type MaskJob = (Sign, MaskPrg);

/// Applies every (sign, PRG) job to the accumulator, 64 KiB range by range
/// (parallel over ranges with the `rayon` feature): each range stays in cache
/// while all jobs pass over it.
pub fn remove_masks(jobs: &[MaskJob], acc: &mut [u32]) {
    let piece = CHUNK_BYTES / 4;
    crate::par::for_each_chunk(acc, piece, |i, part| {
        for (sign, prg) in jobs {
            prg.apply(*sign, (i * piece) as u64, part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_is_offset_consistent_and_sub_inverts_add() {
        for suite in [CipherSuite::Aes128Ctr, CipherSuite::ChaCha20] {
            let prg = MaskPrg::new(suite, &MaskKey([9; 32]));
            let mut whole = vec![0u32; 70_000];
            prg.keystream(0, &mut whole);
            for &(off, len) in &[(0usize, 5usize), (3, 17), (15, 1), (16, 33), (16_385, 40_000), (69_990, 10)] {
                let mut part = vec![0u32; len];
                prg.keystream(off as u64, &mut part);
                assert_eq!(part, whole[off..off + len], "{suite:?} off {off}");
            }
            let mut v: Vec<u32> = (0..1000).collect();
            prg.apply(Sign::Add, 7, &mut v);
            prg.apply(Sign::Sub, 7, &mut v);
            assert_eq!(v, (0..1000).collect::<Vec<u32>>());
        }
    }

    /// Pinned keystreams (key = bytes 0..32) for cross-language clients,
    /// checked against OpenSSL's AES-128-CTR and RFC 8439 ChaCha20 when pinned.
    #[test]
    fn known_answer_keystreams() {
        let key = MaskKey(std::array::from_fn(|i| i as u8));
        let cases = [
            (CipherSuite::Aes128Ctr, [0x373ba1c6, 0x825b8f87, 0x62814f6f, 0x79d8c8a1, 0x95134673], [0xd537afc5, 0x8a911629, 0x28a1194e, 0x5165cd9e]),
            (CipherSuite::ChaCha20, [0x7d2bfd39, 0x6a19c5d9, 0x7703bd8d, 0x494adcb8, 0x6fd8358a], [0xbadd3b6a, 0x4eb08a41, 0xb291d97e, 0x8a405e7f]),
        ];
        for (suite, head, at_1000) in cases {
            let prg = MaskPrg::new(suite, &key);
            let mut h = [0u32; 5];
            prg.keystream(0, &mut h);
            assert_eq!(h, head, "{suite:?}");
            let mut m = [0u32; 4];
            prg.keystream(1000, &mut m);
            assert_eq!(m, at_1000, "{suite:?}");
        }
    }

    #[test]
    fn below_is_in_range() {
        let mut ws = WordStream::new(MaskPrg::new(CipherSuite::Aes128Ctr, &MaskKey([1; 32])));
        for b in [1u32, 2, 3, 7, 1000, u32::MAX] {
            for _ in 0..100 {
                assert!(ws.below(b) < b);
            }
        }
    }
}
