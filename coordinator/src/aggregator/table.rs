//! The shards one process aggregates: each a SecAgg+ server machine in memory, named by
//! (round, shard) and driven by the wire messages of the Aggregator service. The same table
//! serves the aggregator role (`service.rs`) and a leader that aggregates in process.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spa_aggregation::{SecAggError, SecAggServer};
use spa_proto::secagg;
use spa_proto::v1;
use spa_proto::v1::close_shard_response::Result as Closed;
use tonic::Status;

use crate::lock;

/// (round id, shard index).
pub type ShardKey = (u64, u32);

/// One device's message for a shard, as the leader forwards it (the device's seat checked).
pub enum ShardCall {
    Advertise {
        identity_pk: Vec<u8>,
        msg: v1::AdvertiseKeysMsg,
    },
    ShareKeys(v1::ShareKeysMsg),
    /// A masked vector as u32 little-endian bytes (verified against the device's hash): moved
    /// as they came, into the shard or onto the wire.
    Masked {
        client_id: u32,
        bytes: Vec<u8>,
    },
    Unmask(v1::UnmaskMsg),
}

/// A SecAgg+ machine's refusal: the caller's message (or the shard) is at fault.
fn refused(e: SecAggError) -> Status {
    Status::failed_precondition(format!("secure aggregation: {e}"))
}

/// The key of a request, which every request must carry.
pub fn key_of(k: Option<&v1::ShardKey>) -> Result<ShardKey, Status> {
    let k = k.ok_or_else(|| Status::invalid_argument("missing shard key"))?;
    Ok((k.round_id, k.shard))
}

pub fn wire_key((round_id, shard): ShardKey) -> Option<v1::ShardKey> {
    Some(v1::ShardKey { round_id, shard })
}

/// Shards in memory. Opening a shard of round r forgets those of earlier rounds (they ended,
/// or their leader died with them): one round runs at a time.
pub struct ShardTable {
    shards: Mutex<HashMap<ShardKey, Arc<Mutex<SecAggServer>>>>,
    /// The smallest floor this table accepts (`rounds.min_shard_contributors` on an
    /// aggregator): a leader cannot ask it to release a smaller group's sum.
    min_floor: usize,
    /// The newest leadership term that opened or closed a shard here: older leaders are fenced.
    term: Mutex<u64>,
}

impl ShardTable {
    pub fn new(min_floor: usize) -> Self {
        Self { shards: Mutex::new(HashMap::new()), min_floor, term: Mutex::new(0) }
    }

    /// Shards held now.
    pub fn len(&self) -> usize {
        lock(&self.shards).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses a leader whose term is older than the newest seen here, and remembers a newer.
    fn fence(&self, term: u64) -> Result<(), Status> {
        let mut newest = lock(&self.term);
        if term < *newest {
            return Err(Status::failed_precondition(format!("a newer leader (term {}) runs the shards here; term {term} is fenced off", *newest)));
        }
        *newest = term;
        Ok(())
    }

    pub fn open(&self, r: &v1::OpenShardRequest) -> Result<(), Status> {
        let key = key_of(r.key.as_ref())?;
        self.fence(r.leader_term)?;
        let floor = r.floor as usize;
        if floor < self.min_floor {
            return Err(Status::failed_precondition(format!("this aggregator releases sums of at least {} contributors; asked for {floor}", self.min_floor)));
        }
        let config = secagg::config_from_json(&r.session_config_json)?;
        if config.round_id != key.0 {
            return Err(Status::invalid_argument(format!("session of round {} opened as round {}", config.round_id, key.0)));
        }
        let server = SecAggServer::new(config).map_err(refused)?.with_release_floor(floor);
        let mut g = lock(&self.shards);
        g.retain(|k, _| k.0 >= key.0);
        if g.contains_key(&key) {
            return Err(Status::already_exists(format!("shard {} of round {} is open", key.1, key.0)));
        }
        g.insert(key, Arc::new(Mutex::new(server)));
        Ok(())
    }

    fn shard(&self, key: ShardKey) -> Result<Arc<Mutex<SecAggServer>>, Status> {
        lock(&self.shards).get(&key).cloned().ok_or_else(|| Status::not_found(format!("no shard {} of round {} here", key.1, key.0)))
    }

    /// The lanes of the shard's vectors (to bound an upload before reading it).
    pub fn lanes(&self, key: ShardKey) -> Result<u64, Status> {
        let shard = self.shard(key)?;
        let m = lock(&shard).config().m;
        Ok(m)
    }

    /// Hands a device's message to its shard's machine.
    pub fn apply(&self, key: ShardKey, call: ShardCall) -> Result<(), Status> {
        let shard = self.shard(key)?;
        let mut s = lock(&shard);
        match call {
            ShardCall::Advertise { identity_pk, msg } => {
                let pk: [u8; 32] = identity_pk.try_into().map_err(|_| Status::invalid_argument("identity key must be 32 bytes"))?;
                s.handle_advertise(secagg::advertise_from_wire(&msg)?, pk)
            }
            ShardCall::ShareKeys(m) => s.handle_share_keys(secagg::share_keys_from_wire(&m)),
            ShardCall::Masked { client_id, bytes } => {
                let lanes = secagg::lanes_from_bytes(&bytes)?;
                let frame = spa_aggregation::client::FRAME_LANES;
                lanes.chunks(frame).enumerate().try_for_each(|(k, c)| s.handle_masked_chunk(client_id, (k * frame) as u64, c))
            }
            ShardCall::Unmask(m) => s.handle_unmask(secagg::unmask_from_wire(&m)),
        }
        .map_err(refused)
    }

    /// Closes the shard's `phase`. A shard that fails here answers `failed` and is gone;
    /// after Unmask the shard is gone either way (its sum is the answer). Mask removal is
    /// heavy: call this from a blocking thread.
    pub fn close(&self, key: ShardKey, phase: v1::ShardPhase, term: u64) -> Result<v1::CloseShardResponse, Status> {
        use v1::ShardPhase as P;
        self.fence(term)?;
        let shard = self.shard(key)?;
        let mut s = lock(&shard);
        let result = match phase {
            P::Advertise => s.close_advertise().map(|reqs| {
                let (clients, tasks) = reqs.iter().map(|(c, r)| (*c, secagg::share_keys_task(key.0, r))).unzip();
                Closed::ShareKeys(v1::ShareKeysRequests { tasks, clients })
            }),
            P::ShareKeys => s.close_share_keys().map(|reqs| {
                let (clients, tasks) = reqs.iter().map(|(c, r)| (*c, secagg::masked_input_task(key.0, &r.shares))).unzip();
                Closed::MaskedInput(v1::MaskedInputRequests { tasks, clients })
            }),
            P::MaskedInput => s.close_masked_inputs().map(|reqs| {
                let (clients, tasks) = reqs.iter().map(|(c, r)| (*c, secagg::unmask_task(key.0, r))).unzip();
                Closed::Unmask(v1::UnmaskRequests { tasks, clients })
            }),
            P::Unmask => s.close_unmask().map(|o| {
                Closed::Sum(v1::ShardSum { lanes: secagg::lanes_to_bytes(&o.sum), contributors: o.contributors, survivors_connected: o.survivors_connected })
            }),
            P::Unspecified => return Err(Status::invalid_argument("phase is unspecified")),
        };
        drop(s);
        let result = result.unwrap_or_else(|e| Closed::Failed(e.to_string()));
        if matches!(result, Closed::Failed(_) | Closed::Sum(_)) {
            self.drop_shard(key);
        }
        Ok(v1::CloseShardResponse { result: Some(result) })
    }

    pub fn drop_shard(&self, key: ShardKey) {
        lock(&self.shards).remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(round_id: u64, floor: u32) -> v1::OpenShardRequest {
        let config = spa_aggregation::SessionConfig::recommended(round_id, 0, 20, 11).unwrap();
        v1::OpenShardRequest { key: wire_key((round_id, 0)), session_config_json: secagg::config_to_json(&config), floor, leader_term: 2 }
    }

    #[test]
    fn a_shard_opens_at_or_above_the_tables_floor_and_a_new_round_forgets_the_old() {
        let t = ShardTable::new(10);
        assert_eq!(t.open(&open(1, 9)).unwrap_err().code(), tonic::Code::FailedPrecondition);
        t.open(&open(1, 10)).unwrap();
        let mut wrong_round = open(2, 10);
        wrong_round.key = wire_key((3, 0));
        assert_eq!(t.open(&wrong_round).unwrap_err().code(), tonic::Code::InvalidArgument);
        t.open(&open(2, 10)).unwrap();
        assert_eq!(t.len(), 1, "round 1's shard is forgotten when round 2 opens");
        assert_eq!(t.lanes((1, 0)).unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(t.lanes((2, 0)).unwrap(), 11);
        let short = ShardCall::Masked { client_id: 1, bytes: vec![0; 5] };
        assert_eq!(t.apply((2, 0), short).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(t.close((2, 0), v1::ShardPhase::Unspecified, 2).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_leader_older_than_one_seen_is_fenced_off() {
        let t = ShardTable::new(2);
        let mut old = open(1, 10);
        old.leader_term = 1;
        t.open(&old).unwrap();
        t.open(&open(2, 10)).unwrap();
        old.key = wire_key((3, 0));
        assert!(t.open(&old).unwrap_err().message().contains("term 1 is fenced off"));
        assert_eq!(t.close((2, 0), v1::ShardPhase::Advertise, 1).unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(t.len(), 1, "the fenced leader's close left the shard alone");
    }
}
