//! Secure aggregation in shards, wherever they run. A round's SecAgg+ shards run either in
//! the leader's process or on aggregator processes (`[rounds] aggregators`), Bonawitz et al.
//! 2019's aggregators: each holds its shards' server machines in memory only and releases a
//! shard's sum only at the floor it enforces itself.
//!
//! - `table.rs`: the shards of one process, driven by wire messages ([`ShardTable`]).
//! - `host.rs`: where the leader sends a shard's messages ([`ShardHost`]: in process or remote).
//! - `service.rs`: the aggregator role's gRPC server (`serve --role aggregator`).
mod host;
mod service;
mod table;

pub use host::{RoleTls, ShardHost};
pub use service::{AggregatorService, RunningAggregator, start};
pub use table::{ShardCall, ShardKey, ShardTable};

/// The largest message between roles: a shard's ShareKeys requests hold every member's
/// neighbour keys (about 6 MB for 1000 members of degree 40).
pub const ROLE_MESSAGE_BYTES: usize = 256 << 20;
