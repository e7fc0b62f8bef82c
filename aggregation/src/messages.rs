//! Protocol messages of §8.3 as plain structs (serde), one per protobuf
//! message, so the transport crates map them 1:1. Byte fields are `Vec<u8>`
//! where their length is untrusted on arrival and checked by the receiver.

use serde::{Deserialize, Serialize};

use crate::config::SessionConfig;

/// R0, client → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// Sender.
    pub client_id: u32,
    /// Round the keys are for.
    pub round_id: u64,
    /// X25519 channel public key.
    pub c_pk: [u8; 32],
    /// X25519 mask public key.
    pub s_pk: [u8; 32],
    /// Ed25519 over "flsa/v1/adv"‖config_hash‖round_id‖c_pk‖s_pk (64 bytes).
    pub sig: Vec<u8>,
}

/// One neighbour's advertised keys, forwarded by the server in R1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// Neighbour id.
    pub id: u32,
    /// Its enrolled Ed25519 identity key (from the coordinator's device registry).
    pub identity_pk: [u8; 32],
    /// X25519 channel public key.
    pub c_pk: [u8; 32],
    /// X25519 mask public key.
    pub s_pk: [u8; 32],
    /// Its advertisement signature.
    pub sig: Vec<u8>,
}

/// R1, server → client: the session id and the keys of N(u) ∩ U1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShareKeysRequest {
    /// SHA-256 session id over the config hash and the U1 roster.
    pub session_id: [u8; 32],
    /// The session configuration (the client checks it against its own).
    pub config: SessionConfig,
    /// N(u) ∩ U1.
    pub neighbours: Vec<NeighbourKeys>,
}

/// One encrypted share pair for a neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// Recipient (in R1 responses) or sender (in R2 requests).
    pub peer: u32,
    /// AEAD(k_enc(u→v), u‖v‖share_b‖share_s): 104 bytes.
    pub ct: Vec<u8>,
}

/// R1, client → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeysResponse {
    /// Sender.
    pub client_id: u32,
    /// One entry per neighbour, `peer` = recipient.
    pub shares: Vec<EncryptedShare>,
}

/// R2, server → client: ciphertexts from the v ∈ U2 ∩ N(u), `peer` = sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInputRequest {
    /// Ciphertexts addressed to this client.
    pub shares: Vec<EncryptedShare>,
}

/// R2, client → server: one frame of the masked vector (the transport streams them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedChunk {
    /// Sender.
    pub client_id: u32,
    /// Lane offset of `data[0]`.
    pub offset: u64,
    /// Masked lanes (u32 little-endian on the wire).
    pub data: Vec<u32>,
}

/// R4, server → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// N(u) ∩ U3: reveal their self-mask (b) shares.
    pub alive: Vec<u32>,
    /// N(u) ∩ (U2 \ U3): reveal their mask-key (s) shares.
    pub dropped: Vec<u32>,
}

/// One revealed share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The peer whose secret this is a share of.
    pub peer: u32,
    /// 40-byte share (5 little-endian u64 field elements).
    pub share: Vec<u8>,
}

/// R4, client → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Sender.
    pub client_id: u32,
    /// Shares of b_v for v in `alive`.
    pub b_shares: Vec<RevealedShare>,
    /// Shares of s_sk_v for v in `dropped`.
    pub s_shares: Vec<RevealedShare>,
}
