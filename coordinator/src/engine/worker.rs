//! The backbone worker's thread: the devices' queues served in turn ([`Fair`]), the
//! generation sessions' KV caches ([`Session`]), each job run under a panic guard.
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use spa_model::Backbone;
use spa_model::backbone::{KvCache, TokenBatch};
use spa_model::side::{FrozenHead, Plugin};
use spa_model::speculative::{Block, Drafter, StepArgs};
use spa_model::tensor_util::to_vec;

use super::jobs::{EngineError, Job, Opening, Queued};
use crate::metrics::METRICS;

/// A session's state beside the backbone.
struct Session {
    drafter: Drafter,
    /// Bytes of the KV pool this session reserved at its opening.
    reserved: usize,
    owner: String,
    fingerprint: [u8; 32],
    used: Instant,
    attached: bool,
    /// Which stream holds the session: a resume takes it over (the broken stream may not
    /// have noticed yet), and the old stream's later calls are ignored.
    epoch: u64,
}

/// Jobs waiting, one queue per device, the devices served in turn.
#[derive(Default)]
struct Fair {
    queues: HashMap<String, std::collections::VecDeque<Job>>,
    turn: std::collections::VecDeque<String>,
}

impl Fair {
    fn push(&mut self, q: Queued) {
        let jobs = self.queues.entry(q.owner.clone()).or_default();
        if jobs.is_empty() {
            self.turn.push_back(q.owner);
        }
        jobs.push_back(q.job);
    }

    /// The next device's oldest job.
    fn pop(&mut self) -> Option<(String, Job)> {
        let owner = self.turn.pop_front()?;
        let jobs = self.queues.get_mut(&owner)?;
        let job = jobs.pop_front()?;
        if jobs.is_empty() {
            self.queues.remove(&owner);
        } else {
            self.turn.push_back(owner.clone());
        }
        Some((owner, job))
    }

    /// The oldest job of each device in turn whose oldest job is a generation step (at most
    /// `max`): each device's turn moves on as if it had been served alone.
    fn pop_steps(&mut self, max: usize) -> Vec<Job> {
        let mut out = Vec::new();
        for _ in 0..self.turn.len() {
            if out.len() == max {
                break;
            }
            let owner = self.turn.pop_front().expect("counted");
            let jobs = self.queues.get_mut(&owner).expect("a device in turn has jobs");
            if matches!(jobs.front(), Some(Job::Step { .. })) {
                out.push(jobs.pop_front().expect("checked"));
            }
            if jobs.is_empty() {
                self.queues.remove(&owner);
            } else {
                self.turn.push_back(owner);
            }
        }
        out
    }

    /// The rest of a job that yielded: first in its device's queue, the device's turn last.
    fn resume(&mut self, owner: String, job: Job) {
        let jobs = self.queues.entry(owner.clone()).or_default();
        if jobs.is_empty() {
            self.turn.push_back(owner);
        }
        jobs.push_front(job);
    }
}

/// A block as the wire carries it: per position, each slot's row, in `dtype`.
pub fn encode_block(b: &Block, dtype: i32) -> Result<Vec<u8>, EngineError> {
    let n = b.positions;
    let mut out = Vec::with_capacity(b.states.iter().map(Vec::len).sum());
    for p in 0..n {
        for slot in &b.states {
            let w = slot.len() / n;
            out.extend_from_slice(&slot[p * w..(p + 1) * w]);
        }
    }
    Ok(spa_proto::tensor::encode_f32(&out, dtype)?)
}

fn layout(taps: &[Vec<f32>], b: usize, t: usize, d: usize, from: usize, to: usize, dtype: i32) -> Result<Vec<u8>, EngineError> {
    let l = taps.len();
    let mut out = Vec::with_capacity((to - from) * l * d);
    for p in from..to {
        for tap in taps {
            let at = (b * t + p) * d;
            out.extend_from_slice(&tap[at..at + d]);
        }
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Err(EngineError::NonFinite);
    }
    Ok(spa_proto::tensor::encode_f32(&out, dtype)?)
}

/// Most generation steps in one batch.
const MAX_BATCH: usize = 64;

pub(super) fn worker(bb: Backbone, rx: mpsc::Receiver<Queued>, idle: Duration, limits: SessionLimits) {
    let mut w = Worker { bb, sessions: HashMap::new(), idle, limits };
    let mut fair = Fair::default();
    loop {
        // Block only when nothing waits; then take in everything sent meanwhile.
        if fair.turn.is_empty() {
            match rx.recv() {
                Ok(q) => fair.push(q),
                Err(_) => return,
            }
        }
        while let Ok(q) = rx.try_recv() {
            fair.push(q);
        }
        let Some((owner, job)) = fair.pop() else { continue };
        let idle = w.idle;
        w.sessions.retain(|_, s| s.used.elapsed() < idle);
        if let Job::Step { .. } = job {
            // Other devices' waiting steps join it: one batched forward per drafting iteration.
            let mut batch = vec![job];
            batch.extend(fair.pop_steps(MAX_BATCH - 1));
            w.steps(batch);
        } else if let Some(rest) = w.run(job) {
            fair.resume(owner, rest);
        }
        METRICS.kv_reserved_bytes.set(w.reserved() as i64);
    }
}

/// What generation sessions may hold: how many broken-off ones are kept for a resume (of
/// one device, in all), and the KV pool every session reserves its cache from.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub parked_per_device: usize,
    pub parked_total: usize,
    pub kv_pool_bytes: usize,
}

struct Worker {
    bb: Backbone,
    sessions: HashMap<u64, Session>,
    idle: Duration,
    limits: SessionLimits,
}

impl Worker {
    /// Runs a job, or a slice of it: what is left of it comes back.
    fn run(&mut self, job: Job) -> Option<Job> {
        match job {
            Job::Features { .. } => return self.features_slice(job),
            Job::Close { session, epoch } => {
                if self.sessions.get(&session).is_some_and(|s| s.epoch == epoch) {
                    self.sessions.remove(&session);
                }
            }
            Job::Head { reply } => {
                let _ = reply.send(guarded(|| Ok(FrozenHead::shipped(&self.bb))));
            }
            Job::Open { session, opening, reply } => {
                let r = guarded(|| self.open(session, *opening));
                let _ = reply.send(r);
            }
            Job::Resume { session, owner, fingerprint, length, reply } => {
                let ok = match self.sessions.get_mut(&session) {
                    Some(s) if s.owner == owner && s.fingerprint == fingerprint && length <= s.drafter.len() && length > 0 => {
                        s.drafter.truncate(length);
                        s.attached = true;
                        s.used = Instant::now();
                        s.epoch += 1;
                        Some(s.epoch)
                    }
                    _ => None,
                };
                let _ = reply.send(Ok(ok));
            }
            Job::Detach { session, epoch } => self.detach(session, epoch),
            Job::Step { .. } => unreachable!("the worker loop batches steps"),
        }
        None
    }

    /// Generation steps of distinct sessions, batched ([`Drafter::step_many`]); a step whose
    /// session is gone (or held by a newer stream) is told so, a session whose step failed is
    /// closed.
    fn steps(&mut self, jobs: Vec<Job>) {
        let mut asked = HashMap::new();
        for job in jobs {
            let Job::Step { session, epoch, accepted, ids, draft, side, reply } = job else { unreachable!("steps only") };
            match self.sessions.get(&session) {
                Some(s) if s.epoch == epoch && !asked.contains_key(&session) => {
                    asked.insert(session, (StepArgs { accepted, ids, k: draft, side }, reply));
                }
                _ => {
                    let _ = reply.send(Err(EngineError::SessionGone));
                }
            }
        }
        let mut replies = Vec::new();
        let mut steps = Vec::new();
        let wanted: std::collections::HashSet<u64> = asked.keys().copied().collect();
        for (id, s) in self.sessions.iter_mut().filter(|(id, _)| wanted.contains(*id)) {
            let (args, reply) = asked.remove(id).expect("asked");
            s.used = Instant::now();
            replies.push((*id, args.ids.len(), reply));
            steps.push((&mut s.drafter, args));
        }
        if !steps.is_empty() {
            METRICS.step_batch.observe(steps.len() as f64);
        }
        let bb = &self.bb;
        let results: Vec<Result<Block, EngineError>> = match guarded(|| Ok(Drafter::step_many(bb, &mut steps))) {
            Ok(all) => all.into_iter().map(|r| r.map_err(EngineError::Model)).collect(),
            // A panic fails every step of the batch (their caches may be half written).
            Err(e) => {
                let msg = match e {
                    EngineError::Panicked(m) => m,
                    other => other.to_string(),
                };
                replies.iter().map(|_| Err(EngineError::Panicked(msg.clone()))).collect()
            }
        };
        drop(steps);
        for ((session, sent, reply), r) in replies.into_iter().zip(results) {
            match &r {
                Ok(block) => {
                    METRICS.backbone_tokens.inc_by((sent + block.drafts.len()) as u64);
                }
                Err(_) => {
                    self.sessions.remove(&session);
                }
            }
            let _ = reply.send(r);
        }
    }

    /// The next slice of a Features job (one sequence on flex, whose host forward runs one
    /// at a time anyway, which also keeps transient features small; eight elsewhere, where
    /// the tensor forward batches). A job whose caller went away is dropped.
    fn features_slice(&mut self, job: Job) -> Option<Job> {
        let Job::Features { seqs, layers, dtype, mut done, reply } = job else { return None };
        if reply.is_closed() {
            return None;
        }
        let per_call = if spa_model::device::is_flex(&self.bb.device) { 1 } else { 8 };
        let chunk = &seqs[done.len()..(done.len() + per_call).min(seqs.len())];
        let bb = &self.bb;
        let r = guarded(|| {
            let d = bb.config.hidden_size;
            let tb = TokenBatch::new(chunk.iter().map(|s| s.ids.clone()).collect(), &bb.config, 0)?;
            let o = bb.forward(&tb, &layers, false, None);
            METRICS.backbone_tokens.inc_by(chunk.iter().map(|s| s.ids.len() as u64).sum());
            let taps: Vec<Vec<f32>> = o.taps.into_iter().map(to_vec).collect();
            chunk.iter().enumerate().map(|(b, s)| layout(&taps, b, tb.max_len, d, s.from, s.to, dtype)).collect::<Result<Vec<_>, _>>()
        });
        match r {
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
            Ok(blobs) => {
                done.extend(blobs);
                if done.len() == seqs.len() {
                    let _ = reply.send(Ok(done));
                    None
                } else {
                    Some(Job::Features { seqs, layers, dtype, done, reply })
                }
            }
        }
    }

    fn open(&mut self, session: u64, opening: Opening) -> Result<(), EngineError> {
        let reserved = opening.max_positions * KvCache::bytes_per_position(&self.bb.config);
        self.make_room(reserved)?;
        let bb = &self.bb;
        let mut drafter = Drafter::new(bb, opening.form, opening.sampling, opening.stop, opening.last_only)
            .and_then(|d| d.with_max_positions(bb, opening.max_positions))
            .map_err(EngineError::Refused)?;
        if let Some((cfg, shared)) = &opening.side {
            let plugin = Plugin::new(cfg, &bb.config, &bb.device).and_then(|p| p.load(shared)).map_err(EngineError::Refused)?;
            drafter = drafter.with_side(plugin).map_err(EngineError::Refused)?;
        }
        let (owner, fingerprint) = (opening.owner, opening.fingerprint);
        self.sessions.insert(session, Session { drafter, reserved, owner, fingerprint, used: Instant::now(), attached: true, epoch: 0 });
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.sessions.values().map(|s| s.reserved).sum()
    }

    /// Frees `need` bytes of the KV pool for a new session, evicting parked sessions (the
    /// longest unused first) if it must; a session being served is never evicted, so a
    /// session that opened is never cut short for lack of memory.
    fn make_room(&mut self, need: usize) -> Result<(), EngineError> {
        let pool = self.limits.kv_pool_bytes;
        let attached: usize = self.sessions.values().filter(|s| s.attached).map(|s| s.reserved).sum();
        if attached + need > pool {
            return Err(EngineError::PoolFull { need, free: pool - self.reserved().min(pool), pool });
        }
        while self.reserved() + need > pool {
            let oldest = self.sessions.iter().filter(|(_, s)| !s.attached).min_by_key(|(_, s)| s.used).map(|(id, _)| *id);
            self.sessions.remove(&oldest.expect("parked sessions hold the rest"));
        }
        Ok(())
    }

    fn detach(&mut self, session: u64, epoch: u64) {
        if let Some(s) = self.sessions.get_mut(&session).filter(|s| s.epoch == epoch) {
            s.attached = false;
            s.used = Instant::now();
        }
        // Detached caches are kept for resumes. Over a device's share, that device loses its
        // own oldest; over the total, the device holding the most does: one device parking
        // many sessions never evicts another's.
        loop {
            let mut by_owner: HashMap<&str, Vec<(Instant, u64)>> = HashMap::new();
            for (id, s) in self.sessions.iter().filter(|(_, s)| !s.attached) {
                by_owner.entry(s.owner.as_str()).or_default().push((s.used, *id));
            }
            let total: usize = by_owner.values().map(Vec::len).sum();
            let Some(most) = by_owner.into_values().max_by_key(|v| v.len()) else { return };
            if most.len() <= self.limits.parked_per_device && total <= self.limits.parked_total {
                return;
            }
            let oldest = most.iter().min().expect("non-empty").1;
            self.sessions.remove(&oldest);
        }
    }
}

fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(EngineError::Panicked(msg.unwrap_or_default()))
    })
}
