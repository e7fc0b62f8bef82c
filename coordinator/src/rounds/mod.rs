//! Federated rounds: the round loop and the state the device-facing Rounds service feeds.
//!
//! One round at a time, phase by phase (`round_loop.rs`, `run_round`):
//!
//! ```text
//! Selecting   wait for >= min_clients online devices (polled recently), pick <= max_clients
//! Training    devices fetch global version v, train locally, advertise SecAgg+ keys
//! ShareKeys   encrypted Shamir shares are routed between neighbours
//! MaskedInput devices upload masked, quantized updates (weight * (shared - global))
//! Unmask      survivors reveal shares; dropped devices' masks are removed
//! Committed   the decoded mean goes through the server strategy -> global version v+1
//! ```
//!
//! A cohort larger than `rounds.shard_size` runs as several SecAgg+ sessions (shards,
//! `spa_aggregation::shards`) whose phases close together; a shard below its floor releases
//! nothing and its devices leave the round, the others go on; the mean adds the shard sums.
//! Each shard runs on a host (`crate::aggregator`): this process, or an aggregator process
//! that the handlers forward devices' answers to; a host that is gone fails its shard only.
//!
//! Every phase boundary is written to the store before the phase's requests go out, and a
//! commit writes checkpoint, round record and optimizer state in one transaction. Only the
//! holder of the store's leadership lease runs the loop (on sled, the one process; on
//! PostgreSQL, one of the replicas), and every round write carries the lease, so a leader that
//! lost it is refused. The SecAgg+ server state lives only in memory: a coordinator that takes
//! the lease (at start, on one machine) marks a round it finds mid-phase as aborted and its run
//! goes on with the next round from the last committed version. The coordinator never holds
//! an individual unmasked update: it sees masked lanes.
//!
//! Files: `state.rs` (what the loop and the device handlers share, and how an answer is
//! checked and forwarded), `round_loop.rs` (the loop, its phases and the lease), `shards.rs`
//! (the round's shards: seats, hosts, failures), `closes.rs` (a phase closed on every shard).
//! What the store keeps of plans, rounds, runs and dropouts is `crate::store::records`.
use spa_aggregation::SecAggError;

use crate::store::StoreError;

mod closes;
mod round_loop;
mod shards;
mod state;

pub use crate::store::records::{DeviceMetrics, DropReason, Dropout, RoundPlan, RoundRecord, RoundState, RunRecord, RunState};
pub use round_loop::round_loop;
pub use state::{AnswerError, Rounds};

impl From<crate::store::records::InvalidPlan> for RoundError {
    fn from(e: crate::store::records::InvalidPlan) -> Self {
        RoundError::InvalidPlan(e.0)
    }
}

/// Why a round or an operator's request failed. `Aborted*` end a round; the service maps
/// the rest to statuses (`crate::status`).
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    #[error("{0}")]
    InvalidPlan(String),
    #[error("no round {0}")]
    NoSuchRound(u64),
    #[error("aborted: {0}")]
    Aborted(String),
    /// No shard of the round is left to release a sum (a lone shard's reason, else each's).
    #[error("secure aggregation: {0}")]
    Shards(String),
    #[error("aborted: aborted by the operator")]
    AbortedByOperator,
    /// State the coordinator itself keeps is missing or broken.
    #[error("{0}")]
    Internal(String),
}
