//! What the spec fixes below every module that derives keys or sizes graphs: the
//! domain-separation labels (SECAGG.md §8.2) and the cohort bound. Here, not in `config`, so
//! `crypto` and `harary` read them without importing the config that builds on them.

/// Domain-separation labels (ASCII; part of the spec).
pub mod labels {
    /// Canonical config encoding prefix.
    pub const CONFIG: &[u8] = b"flsa/v1/config";
    /// session_id derivation.
    pub const SESSION: &[u8] = b"flsa/v1/session";
    /// Neighbour-graph shuffle key (HKDF info).
    pub const GRAPH: &[u8] = b"flsa/v1/graph";
    /// Directional share-channel key (HKDF info prefix).
    pub const ENC: &[u8] = b"flsa/v1/enc";
    /// Pairwise mask seed (HKDF info prefix).
    pub const MASK: &[u8] = b"flsa/v1/mask";
    /// Self-mask key (HKDF info).
    pub const SELF: &[u8] = b"flsa/v1/self";
    /// Key advertisement signature prefix.
    pub const ADV: &[u8] = b"flsa/v1/adv";
    /// Additional data of the share ciphertexts.
    pub const SHARE_AAD: &[u8] = b"flsa/v1/share";
}

/// Upper bound on the cohort size (the parameter finder's range).
pub const MAX_CLIENTS: u32 = 1_000_000;
