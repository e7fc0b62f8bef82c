//! A round's shards as the leader sees them: which seats sit in which shard (the placement
//! of `spa_aggregation::shards`), where each shard runs (a [`ShardHost`]: this process or an
//! aggregator), and which have failed. The shards' SecAgg+ machines live with their hosts.
use spa_aggregation::{SeatMap, SessionConfig};
use spa_proto::secagg;

use crate::aggregator::{ShardHost, ShardKey};

/// One shard of the round.
pub(super) struct Slot {
    pub host: ShardHost,
    /// Global seats, in local-client order (local client `i + 1` is `members[i]`).
    pub members: Vec<u32>,
    /// The session its devices are sent (JSON, as in their training request).
    pub config_json: String,
    /// The fewest contributors it releases a sum of (its floor, or its threshold's need).
    pub min_clients: usize,
    /// Why it left the round (its members with it); None while it runs.
    pub failed: Option<String>,
    /// Whether its failure is already in the round record.
    pub reported: bool,
}

impl Slot {
    /// The global seat of local client `local`, if it is one of this shard's.
    pub fn global(&self, local: u32) -> Option<u32> {
        self.members.get((local as usize).checked_sub(1)?).copied()
    }
}

pub(super) struct ShardSet {
    pub round_id: u64,
    /// The leadership term the shards were opened under (aggregators fence older terms).
    pub term: u64,
    pub slots: Vec<Slot>,
    route: SeatMap,
    /// Lanes of every shard's vectors.
    pub m: u64,
}

impl ShardSet {
    /// Opens each shard on a host: shard `i` on `hosts[i % k]`, else the next host that
    /// takes it. A shard no host takes is failed from the start.
    pub async fn open(round_id: u64, term: u64, sessions: Vec<(SessionConfig, Vec<u32>)>, floor: usize, hosts: &[ShardHost]) -> Self {
        let m = sessions.first().map_or(0, |(c, _)| c.m);
        // Placement gives each seat one shard (spa_aggregation::shards::assign); were it not
        // so, no answer would be taken and the round would end at its deadline.
        let route = SeatMap::new(sessions.iter().map(|(_, members)| members.as_slice())).unwrap_or_else(|e| {
            tracing::error!(round = round_id, "shard placement: {e}");
            SeatMap::default()
        });
        let mut slots = Vec::with_capacity(sessions.len());
        for (i, (config, members)) in sessions.into_iter().enumerate() {
            let config_json = secagg::config_to_json(&config);
            let min_clients = floor.max(config.threshold as usize + 1);
            let (mut placed, mut why) = (None, String::from("no aggregator is configured"));
            for j in 0..hosts.len() {
                let host = &hosts[(i + j) % hosts.len()];
                match host.open((round_id, i as u32), config_json.clone(), floor, term).await {
                    Ok(()) => {
                        placed = Some(host.clone());
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(shard = i, aggregator = host.name(), "could not open the shard: {}", e.message());
                        why = format!("no aggregator took it (last, {}: {})", host.name(), e.message());
                    }
                }
            }
            let failed = placed.is_none().then_some(why);
            let host = placed.unwrap_or_else(|| hosts[i % hosts.len()].clone());
            slots.push(Slot { host, members, config_json, min_clients, failed, reported: false });
        }
        Self { round_id, term, slots, route, m }
    }

    /// (shard, local client id) of global `seat`.
    pub fn seat(&self, seat: u32) -> Option<(usize, u32)> {
        self.route.seat(seat)
    }

    pub fn key(&self, shard: usize) -> ShardKey {
        (self.round_id, shard as u32)
    }

    /// (shard, host) of the shards still running.
    pub fn running(&self) -> Vec<(usize, ShardHost)> {
        self.slots.iter().enumerate().filter(|(_, s)| s.failed.is_none()).map(|(i, s)| (i, s.host.clone())).collect()
    }

    /// Marks `shard` failed with `why` (the first reason stays).
    pub fn fail(&mut self, shard: usize, why: String) {
        self.slots[shard].failed.get_or_insert(why);
    }

    /// (shard, why) of the failures not yet in the record, now marked as reported.
    pub fn take_unreported(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let (Some(why), false) = (&s.failed, s.reported) {
                out.push((i, why.clone()));
                s.reported = true;
            }
        }
        out
    }

    /// The round cannot go on: every shard failed. A lone shard's own reason, else all of them.
    pub fn all_failed(&self) -> Option<String> {
        if !self.slots.iter().all(|s| s.failed.is_some()) {
            return None;
        }
        if let [s] = &self.slots[..] {
            return s.failed.clone();
        }
        let why: Vec<String> = self.slots.iter().enumerate().map(|(i, s)| format!("shard {i}: {}", s.failed.as_deref().unwrap_or(""))).collect();
        Some(format!("every shard failed ({})", why.join("; ")))
    }
}
