//! SecAgg+ messages between their wire form (`v1`) and spa-aggregation's structs. Every
//! length is checked here, so the state machines only ever see well-formed keys.
use spa_aggregation::SessionConfig;
use spa_aggregation::messages::{
    AdvertiseKeys, EncryptedShare, NeighbourKeys, RevealedShare, ShareKeysRequest, ShareKeysResponse, UnmaskRequest, UnmaskResponse,
};

use crate::ProtoError;
use crate::v1;

/// The enrolled device key signs SecAgg+ key advertisements ("flsa/v1/adv" domain).
impl spa_aggregation::IdentitySigner for crate::auth::DeviceSigner {
    fn public_key(&self) -> [u8; 32] {
        crate::auth::DeviceSigner::public_key(self)
    }

    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.sign_raw(msg)
    }
}

fn key(b: &[u8], what: &str) -> Result<[u8; 32], ProtoError> {
    b.try_into().map_err(|_| ProtoError::Invalid(format!("{what} must be 32 bytes, got {}", b.len())))
}

/// Parses a session configuration and checks it.
pub fn config_from_json(json: &str) -> Result<SessionConfig, ProtoError> {
    let c: SessionConfig = serde_json::from_str(json).map_err(|e| ProtoError::Invalid(format!("session config: {e}")))?;
    c.validate().map_err(|e| ProtoError::Invalid(format!("session config: {e}")))?;
    Ok(c)
}

pub fn config_to_json(c: &SessionConfig) -> String {
    serde_json::to_string(c).expect("a session config serializes")
}

pub fn advertise_to_wire(a: &AdvertiseKeys) -> v1::AdvertiseKeysMsg {
    v1::AdvertiseKeysMsg { round_id: a.round_id, client_id: a.client_id, c_pk: a.c_pk.to_vec(), s_pk: a.s_pk.to_vec(), sig: a.sig.clone() }
}

pub fn advertise_from_wire(m: &v1::AdvertiseKeysMsg) -> Result<AdvertiseKeys, ProtoError> {
    if m.sig.len() != 64 {
        return Err(ProtoError::Invalid(format!("signature must be 64 bytes, got {}", m.sig.len())));
    }
    Ok(AdvertiseKeys { client_id: m.client_id, round_id: m.round_id, c_pk: key(&m.c_pk, "c_pk")?, s_pk: key(&m.s_pk, "s_pk")?, sig: m.sig.clone() })
}

fn shares_to_wire(v: &[EncryptedShare]) -> Vec<v1::EncryptedShareMsg> {
    v.iter().map(|s| v1::EncryptedShareMsg { peer: s.peer, ct: s.ct.clone() }).collect()
}

fn shares_from_wire(v: &[v1::EncryptedShareMsg]) -> Vec<EncryptedShare> {
    // Ciphertext lengths are checked by the AEAD open / the server's own checks.
    v.iter().map(|s| EncryptedShare { peer: s.peer, ct: s.ct.clone() }).collect()
}

pub fn share_keys_task(round_id: u64, r: &ShareKeysRequest) -> v1::ShareKeysTask {
    v1::ShareKeysTask {
        round_id,
        session_id: r.session_id.to_vec(),
        session_config_json: config_to_json(&r.config),
        neighbours: r
            .neighbours
            .iter()
            .map(|n| v1::NeighbourKeysMsg { id: n.id, identity_pk: n.identity_pk.to_vec(), c_pk: n.c_pk.to_vec(), s_pk: n.s_pk.to_vec(), sig: n.sig.clone() })
            .collect(),
    }
}

pub fn share_keys_request(t: &v1::ShareKeysTask) -> Result<ShareKeysRequest, ProtoError> {
    Ok(ShareKeysRequest {
        session_id: key(&t.session_id, "session_id")?,
        config: config_from_json(&t.session_config_json)?,
        neighbours: t
            .neighbours
            .iter()
            .map(|n| {
                Ok(NeighbourKeys {
                    id: n.id,
                    identity_pk: key(&n.identity_pk, "identity_pk")?,
                    c_pk: key(&n.c_pk, "c_pk")?,
                    s_pk: key(&n.s_pk, "s_pk")?,
                    sig: n.sig.clone(),
                })
            })
            .collect::<Result<_, ProtoError>>()?,
    })
}

pub fn share_keys_to_wire(round_id: u64, r: &ShareKeysResponse) -> v1::ShareKeysMsg {
    v1::ShareKeysMsg { round_id, client_id: r.client_id, shares: shares_to_wire(&r.shares) }
}

pub fn share_keys_from_wire(m: &v1::ShareKeysMsg) -> ShareKeysResponse {
    ShareKeysResponse { client_id: m.client_id, shares: shares_from_wire(&m.shares) }
}

pub fn masked_input_task(round_id: u64, shares: &[EncryptedShare]) -> v1::MaskedInputTask {
    v1::MaskedInputTask { round_id, shares: shares_to_wire(shares) }
}

pub fn masked_input_request(t: &v1::MaskedInputTask) -> spa_aggregation::messages::MaskedInputRequest {
    spa_aggregation::messages::MaskedInputRequest { shares: shares_from_wire(&t.shares) }
}

pub fn unmask_task(round_id: u64, r: &UnmaskRequest) -> v1::UnmaskTask {
    v1::UnmaskTask { round_id, alive: r.alive.clone(), dropped: r.dropped.clone() }
}

pub fn unmask_request(t: &v1::UnmaskTask) -> UnmaskRequest {
    UnmaskRequest { alive: t.alive.clone(), dropped: t.dropped.clone() }
}

fn revealed_to_wire(v: &[RevealedShare]) -> Vec<v1::RevealedShareMsg> {
    v.iter().map(|r| v1::RevealedShareMsg { peer: r.peer, share: r.share.clone() }).collect()
}

fn revealed_from_wire(v: &[v1::RevealedShareMsg]) -> Vec<RevealedShare> {
    v.iter().map(|r| RevealedShare { peer: r.peer, share: r.share.clone() }).collect()
}

pub fn unmask_to_wire(round_id: u64, r: &UnmaskResponse) -> v1::UnmaskMsg {
    v1::UnmaskMsg { round_id, client_id: r.client_id, b_shares: revealed_to_wire(&r.b_shares), s_shares: revealed_to_wire(&r.s_shares) }
}

pub fn unmask_from_wire(m: &v1::UnmaskMsg) -> UnmaskResponse {
    UnmaskResponse { client_id: m.client_id, b_shares: revealed_from_wire(&m.b_shares), s_shares: revealed_from_wire(&m.s_shares) }
}

/// The messages of an `UploadMasked` stream: first the header (lane count and the SHA-256 of
/// the lanes' bytes; the call's signature covers it), then the lanes in chunks. `corrupt`
/// flips a bit after hashing (fault injection: the coordinator must refuse the upload).
pub fn upload_messages(round_id: u64, client_id: u32, lanes: &[u32], corrupt: bool) -> Vec<v1::MaskedUpload> {
    use v1::masked_upload::Kind;
    let mut bytes = lanes_to_bytes(lanes);
    let sha256 = crate::auth::sha256(&bytes).to_vec();
    let header = v1::MaskedUploadHeader { round_id, client_id, lanes: lanes.len() as u64, sha256 };
    if corrupt && let Some(b) = bytes.first_mut() {
        *b ^= 1;
    }
    let mut msgs = vec![v1::MaskedUpload { kind: Some(Kind::Header(header)) }];
    msgs.extend(bytes.chunks(crate::limits::CHUNK_BYTES).map(|c| v1::MaskedUpload { kind: Some(Kind::Lanes(c.to_vec())) }));
    msgs
}

/// Lanes as little-endian bytes, and back (a ragged byte count is an error).
pub fn lanes_to_bytes(lanes: &[u32]) -> Vec<u8> {
    lanes.iter().flat_map(|l| l.to_le_bytes()).collect()
}

pub fn lanes_from_bytes(b: &[u8]) -> Result<Vec<u32>, ProtoError> {
    if !b.len().is_multiple_of(4) {
        return Err(ProtoError::Ragged { what: "masked lanes".into(), found: b.len(), elem: 4 });
    }
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// A masked vector arriving in chunks (a device's upload, a leader's forward of it): chunks
/// of at most `CHUNK_BYTES`, never past `lanes` lanes, and exactly that many at the end. The
/// messages name what is wrong; callers make them the status their wire needs.
pub struct LaneBuffer {
    bytes: Vec<u8>,
    want: u64,
}

impl LaneBuffer {
    pub fn new(lanes: u64) -> Self {
        Self { bytes: Vec::with_capacity((lanes * 4) as usize), want: lanes * 4 }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        if chunk.len() > crate::limits::CHUNK_BYTES || (self.bytes.len() + chunk.len()) as u64 > self.want {
            return Err("upload chunk too large or past the declared lanes".into());
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    pub fn finish(self) -> Result<Vec<u8>, String> {
        match self.bytes.len() as u64 {
            n if n == self.want => Ok(self.bytes),
            n => Err(format!("upload truncated: {n} of {} bytes", self.want)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_buffer_takes_exactly_its_lanes() {
        let mut b = LaneBuffer::new(3);
        b.push(&[1; 8]).unwrap();
        assert!(b.push(&[0; 8]).is_err(), "past 3 lanes");
        assert!(LaneBuffer::new(3).finish().unwrap_err().contains("0 of 12"));
        assert!(LaneBuffer::new(1 << 30).push(&vec![0; crate::limits::CHUNK_BYTES + 1]).is_err(), "chunk over the limit");
        b.push(&[2; 4]).unwrap();
        assert_eq!(b.finish().unwrap().len(), 12);
    }

    #[test]
    fn wrong_key_lengths_are_refused() {
        let m = v1::AdvertiseKeysMsg { round_id: 1, client_id: 1, c_pk: vec![0; 31], s_pk: vec![0; 32], sig: vec![0; 64] };
        assert!(advertise_from_wire(&m).unwrap_err().to_string().contains("c_pk"));
        let m = v1::AdvertiseKeysMsg { c_pk: vec![0; 32], sig: vec![0; 63], ..m };
        assert!(advertise_from_wire(&m).is_err());
        assert!(lanes_from_bytes(&[0; 7]).is_err());
        assert_eq!(lanes_from_bytes(&lanes_to_bytes(&[1, u32::MAX])).unwrap(), vec![1, u32::MAX]);
        assert!(config_from_json("{}").is_err());
    }
}
