//! The crate's single error type.
//!
//! Every input that comes from a peer or from the server is untrusted: a
//! malformed or inconsistent message yields one of these errors, never a panic.

use thiserror::Error;

/// Errors of the secure-aggregation protocol, the encoders and the strategies.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SecAggError {
    /// The session configuration is inconsistent or unsafe.
    #[error("invalid session config: {0}")]
    InvalidConfig(String),
    /// The message is not valid in the current protocol phase.
    #[error("unexpected message {message} in phase {phase}")]
    UnexpectedMessage {
        /// The phase the state machine was in.
        phase: &'static str,
        /// The kind of message that arrived.
        message: &'static str,
    },
    /// A message is malformed (bad length, duplicate or unknown id, bad index).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A signature did not verify.
    #[error("bad signature from client {0}")]
    BadSignature(u32),
    /// A ciphertext failed to decrypt (wrong key, session or tampering).
    #[error("share ciphertext from client {0} failed to decrypt")]
    DecryptionFailed(u32),
    /// A peer that is not one of our neighbours appeared in a message.
    #[error("client {0} is not a neighbour")]
    UnknownNeighbour(u32),
    /// The server asked for both the self-mask share and the key share of one peer.
    #[error("refusing to reveal both shares of client {0}")]
    BothSharesRequested(u32),
    /// Fewer participants or shares than the threshold requires.
    #[error("below threshold: {what} has {have}, needs {need}")]
    BelowThreshold {
        /// What was counted.
        what: String,
        /// How many there are.
        have: usize,
        /// How many are needed.
        need: usize,
    },
    /// A vector or chunk does not match the configured length.
    #[error("vector length mismatch: expected {expected}, got {got}")]
    LengthMismatch {
        /// Expected number of lanes.
        expected: usize,
        /// Received number of lanes.
        got: usize,
    },
    /// Secret reconstruction failed (duplicate x-coordinates, inconsistent shares).
    #[error("secret reconstruction failed: {0}")]
    Reconstruction(String),
    /// A cryptographic primitive failed (key agreement with a low-order point, RNG failure).
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// A client's late message: the phase's deadline had passed.
    #[error("client {0} is late or dropped")]
    Dropped(u32),
    /// The session was aborted; no output is produced.
    #[error("session aborted: {0}")]
    Aborted(String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, SecAggError>;
