//! spa-aggregation: secure aggregation (SecAgg+ with dropout recovery, per
//! `SECAGG.md`), its vector encodings and the server-side aggregation
//! strategies. Pure logic: no I/O, no clocks, no threads (except rayon under
//! the optional `rayon` feature). See README.md for the message flow.
//!
//! - [`client::ClientState`]: the client state machine.
//! - [`server::SecAggServer`]: the server state machine.
//! - [`config::SessionConfig`]: the agreed parameters, `config_hash`, `session_id`.
//! - [`quant`], [`dp`]: encodings of f32 updates into u32 lanes.
//! - [`shards`]: a round's cohort split into SecAgg+ sessions, released and summed apart.
//! - [`strategy`]: FedAvg, FedProx's client term, FedAdagrad/FedAdam/FedYogi.
//! - [`sim`]: whole sessions in memory (tests and the in-process simulation).

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod crypto;
pub mod dp;
pub mod error;
pub mod harary;
pub mod messages;
mod par;
pub mod prg;
pub mod quant;
pub mod server;
pub mod shamir;
pub mod shards;
pub mod sim;
pub mod spec;
pub mod strategy;

pub use client::{ClientIncoming, ClientOutgoing, ClientState, MaskedInput};
pub use config::{Encoding, SessionConfig};
pub use crypto::{IdentitySigner, system_rng};
pub use error::{Result, SecAggError};
pub use server::{AggregateOutput, SecAggServer, ServerPhase};
pub use shards::{SeatMap, ShardedOutput, ShardedServer};
