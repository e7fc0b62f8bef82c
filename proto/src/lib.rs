//! spa-proto: the SPA wire protocol.
//!
//! - [`v1`]: code generated from `proto/spa/v1/*.proto` (messages, servers, clients).
//! - [`methods`]: one constant per RPC method path (what signatures cover).
//! - [`limits`]: message-size limits both sides configure explicitly.
//! - [`tensor`]: tensors as dtype + shape + little-endian bytes, chunking and reassembly.
//! - [`secagg`]: SecAgg+ messages between wire form and spa-aggregation's structs.
//! - [`auth`]: Ed25519 request signing and verification, clock window.
//! - [`replay`]: the replay window of signed calls' nonces.
//! - [`reason`]: why a call was refused, as typed details a client matches on.
//!
//! Invariant: no I/O here; this crate is pure encoding, checking and cryptography.
pub mod auth;
pub mod codec;
pub mod error;
pub mod exit;
pub mod limits;
pub mod reason;
pub mod replay;
pub mod secagg;
pub mod tensor;

pub use error::ProtoError;

/// Generated messages and services of package `spa.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("spa.v1");
}

/// RPC method paths, e.g. [`methods::BACKBONE_FEATURES`] = `/spa.v1.Backbone/Features`.
pub mod methods {
    include!(concat!(env!("OUT_DIR"), "/spa_methods.rs"));
}

/// Encoded `FileDescriptorSet` of the protocol, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/spa_descriptor.bin"));
