//! spa-client: the device side of SPA.
//!
//! - [`store`]: the device's sled store (identity, data, feature cache, plugin parts).
//! - [`keyseal`]: the identity key sealed with a passphrase at rest.
//! - [`net`]: TLS connection to the coordinator, every call signed with the device key.
//! - [`data`]: local data formats.
//! - [`ops`]: the commands (enroll, status, data, train) as library functions.
//! - [`personal`]: the device's model (SPA v2): data splits, the personal fit, its storage.
//! - [`remote`]: the served model, frozen head and features fetched from the coordinator.
//! - [`generate`]: personalized generation over the coordinator's stream, speculative.
//! - [`agent`]: `run`, the device agent of federated rounds (SecAgg+ client side).
//!
//! Invariant: the personal model (every private parameter, the datastore) is written only to
//! the local store; the only parameters that leave the device are the shared part's update,
//! quantized and masked.
pub mod agent;
pub mod config;
pub mod data;
pub mod error;
mod fault;
pub mod generate;
pub mod keyseal;
pub mod net;
pub mod ops;
pub mod personal;
pub mod remote;
pub mod rotate;
pub mod store;

pub use error::{ClientError, Result};
