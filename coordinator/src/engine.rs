//! The backbone worker: one thread owns the frozen backbone and the KV caches of generation
//! sessions, and runs the jobs the gRPC handlers send it. Requests are validated by the
//! handlers before they get here ([`ModelMeta::check_*`]); a panic inside a job is caught and
//! reported as an error, so the worker keeps serving. Jobs wait in one queue per device and
//! devices take turns ([`Fair`]); a Features job yields after each slice of its sequences, so
//! one device's many or large requests delay another's next step by one slice at most.
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use crate::error::{CoordinatorError, io};
use crate::metrics::METRICS;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use spa_model::backbone::{TokenBatch, WeightDtype, load_backbone_as};
use spa_model::generate::Sampling;
use spa_model::side::head::ShippedTensor;
use spa_model::side::{FrozenHead, ParamSet, Plugin, SideConfig};
use spa_model::speculative::{Block, DraftForm, Drafter};
use spa_model::tensor_util::to_vec;
use spa_model::{Backbone, BackboneConfig, BackendKind};
use tokio::sync::oneshot;

/// What the handlers know of the served backbone.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    /// `bb-` + 16 hex digits of SHA-256 over config.json and the weights.
    pub version: String,
    pub config: BackboneConfig,
    pub config_json: String,
    pub tokenizer_json: String,
    /// Empty when the checkpoint has no such file.
    pub generation_config_json: String,
    pub tokenizer_config_json: String,
}

/// A checkpoint file that may be absent (empty string then).
fn optional_file(path: &Path) -> Result<String, CoordinatorError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other.map_err(io(path)),
    }
}

/// One sequence of a Features job: ids and the positions [from, to) to return.
pub struct SeqJob {
    pub ids: Vec<u32>,
    pub from: usize,
    pub to: usize,
}

/// Why the backbone worker could not do a job.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("backbone worker stopped")]
    Stopped,
    #[error("the generation session is gone (idle too long, or resumed on another stream)")]
    SessionGone,
    /// A request the handler's checks let through but the model refused (a side config
    /// that does not fit the backbone, say).
    #[error("{0}")]
    Refused(spa_model::ModelError),
    #[error("backbone: {0}")]
    Model(#[from] spa_model::ModelError),
    #[error("backbone produced non-finite features")]
    NonFinite,
    #[error("encoding: {0}")]
    Encoding(#[from] spa_proto::ProtoError),
    #[error("backbone job panicked: {0}")]
    Panicked(String),
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Job {
    Features {
        seqs: Vec<SeqJob>,
        layers: Vec<usize>,
        dtype: i32,
        /// What the slices done so far produced, one blob per sequence.
        done: Vec<Vec<u8>>,
        reply: Reply<Vec<Vec<u8>>>,
    },
    Head {
        reply: Reply<Vec<ShippedTensor>>,
    },
    Open {
        session: u64,
        opening: Box<Opening>,
        reply: Reply<()>,
    },
    Resume {
        session: u64,
        owner: String,
        fingerprint: [u8; 32],
        length: usize,
        reply: Reply<Option<u64>>,
    },
    Step {
        session: u64,
        epoch: u64,
        accepted: usize,
        ids: Vec<u32>,
        draft: usize,
        side: bool,
        reply: Reply<Block>,
    },
    /// The stream broke: keep the cache for a resume until it idles out.
    Detach {
        session: u64,
        epoch: u64,
    },
    Close {
        session: u64,
        epoch: u64,
    },
}

/// How a generation session was opened, validated by the handler.
pub struct Opening {
    /// The device that opened it; only it may resume it.
    pub owner: String,
    /// SHA-256 of the opening message without its resume fields: a resume must repeat it.
    pub fingerprint: [u8; 32],
    pub form: DraftForm,
    pub sampling: Sampling,
    pub stop: Vec<u32>,
    pub last_only: bool,
    /// The coordinator's side config and a global shared part, for side drafts.
    pub side: Option<(SideConfig, ParamSet)>,
}

/// A session's state beside the backbone.
struct Session {
    drafter: Drafter,
    owner: String,
    fingerprint: [u8; 32],
    used: Instant,
    attached: bool,
    /// Which stream holds the session: a resume takes it over (the broken stream may not
    /// have noticed yet), and the old stream's later calls are ignored.
    epoch: u64,
}

/// A job and the device it is for (the unit of fairness).
struct Queued {
    owner: String,
    job: Job,
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Queued>,
    pub meta: std::sync::Arc<ModelMeta>,
}

fn version_of(dir: &Path) -> Result<String, CoordinatorError> {
    let config = dir.join("config.json");
    let mut all = std::fs::read(&config).map_err(io(&config))?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        all.extend_from_slice(&spa_proto::auth::sha256(&std::fs::read(&f).map_err(io(&f))?));
    }
    Ok(format!("bb-{}", &hex::encode(spa_proto::auth::sha256(&all))[..16]))
}

impl Engine {
    /// Loads the backbone on a dedicated thread; returns once it is ready.
    /// `dtype`: the weights' precision (`None`: the checkpoint's own, see `load_backbone_as`).
    /// Sessions idle for `session_idle` are dropped; broken-off ones are kept for a resume,
    /// at most `parked.per_device` of one device and `parked.total` in all.
    pub fn start(dir: &Path, backend: BackendKind, dtype: Option<WeightDtype>, session_idle: Duration, parked: Parked) -> Result<Self, CoordinatorError> {
        let version = version_of(dir)?;
        let (config_path, tokenizer_path) = (dir.join("config.json"), dir.join("tokenizer.json"));
        let config_json = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let tokenizer_json = std::fs::read_to_string(&tokenizer_path).map_err(io(&tokenizer_path))?;
        let generation_config_json = optional_file(&dir.join("generation_config.json"))?;
        let tokenizer_config_json = optional_file(&dir.join("tokenizer_config.json"))?;
        // The checkpoint's special tokens must parse before devices are told about them.
        let present = |s: &String| (!s.is_empty()).then(|| s.clone());
        spa_model::tokenizer::ModelTokens::from_json(&config_json, present(&generation_config_json).as_deref(), present(&tokenizer_config_json).as_deref())?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<BackboneConfig, spa_model::ModelError>>();
        let dir_display = dir.display().to_string();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("backbone".into())
            .spawn(move || {
                let loaded = backend.device().and_then(|d| load_backbone_as(&dir, &d, dtype));
                let bb = match loaded {
                    Ok(bb) => {
                        let _ = ready_tx.send(Ok(bb.config.clone()));
                        bb
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                worker(bb, rx, session_idle, parked);
            })
            .map_err(|e| CoordinatorError::Other(format!("cannot start the backbone thread: {e}")))?;
        let config = ready_rx
            .recv()
            .map_err(|_| CoordinatorError::Other("backbone worker died while loading".into()))?
            .map_err(|e| CoordinatorError::Other(format!("backbone {}: {e}", dir_display)))?;
        let meta = ModelMeta { version, config, config_json, tokenizer_json, generation_config_json, tokenizer_config_json };
        Ok(Self { tx, meta: std::sync::Arc::new(meta) })
    }

    async fn call<T>(&self, owner: &str, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Queued { owner: owner.to_string(), job: make(reply) }).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Per sequence, the features at positions [from, to), laid out [positions, layers, hidden].
    pub async fn features(&self, owner: &str, seqs: Vec<SeqJob>, layers: Vec<usize>, dtype: i32) -> Result<Vec<Vec<u8>>, EngineError> {
        self.call(owner, |reply| Job::Features { done: Vec::with_capacity(seqs.len()), seqs, layers, dtype, reply }).await
    }

    /// The frozen final norm and head as devices receive them.
    pub async fn head(&self, owner: &str) -> Result<Vec<ShippedTensor>, EngineError> {
        self.call(owner, |reply| Job::Head { reply }).await
    }

    /// Starts session `session` (the handler allocates ids), held by stream epoch 0.
    pub async fn open(&self, session: u64, opening: Opening) -> Result<(), EngineError> {
        let owner = opening.owner.clone();
        self.call(&owner, |reply| Job::Open { session, opening: Box::new(opening), reply }).await
    }

    /// Hands a session of `owner` opened with `fingerprint` to a new stream, truncated to
    /// `length` confirmed tokens; the new stream's epoch, or None if there is no such
    /// session (gone idle, another device's, opened otherwise, or shorter).
    pub async fn resume(&self, session: u64, owner: String, fingerprint: [u8; 32], length: usize) -> Result<Option<u64>, EngineError> {
        let queue = owner.clone();
        self.call(&queue, |reply| Job::Resume { session, owner, fingerprint, length, reply }).await
    }

    /// [`Drafter::step`] on a session of `owner`, for the stream that holds it.
    #[allow(clippy::too_many_arguments)]
    pub async fn step(&self, owner: &str, session: u64, epoch: u64, accepted: usize, ids: Vec<u32>, draft: usize, side: bool) -> Result<Block, EngineError> {
        self.call(owner, |reply| Job::Step { session, epoch, accepted, ids, draft, side, reply }).await
    }

    pub fn detach(&self, session: u64, epoch: u64) {
        let _ = self.tx.send(Queued { owner: String::new(), job: Job::Detach { session, epoch } });
    }

    pub fn close(&self, session: u64, epoch: u64) {
        let _ = self.tx.send(Queued { owner: String::new(), job: Job::Close { session, epoch } });
    }
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

fn worker(bb: Backbone, rx: mpsc::Receiver<Queued>, idle: Duration, parked: Parked) {
    let mut w = Worker { bb, sessions: HashMap::new(), idle, parked };
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
        if let Some(rest) = w.run(job) {
            fair.resume(owner, rest);
        }
    }
}

/// How many broken-off sessions are kept for a resume.
#[derive(Clone, Copy, Debug)]
pub struct Parked {
    pub per_device: usize,
    pub total: usize,
}

struct Worker {
    bb: Backbone,
    sessions: HashMap<u64, Session>,
    idle: Duration,
    parked: Parked,
}

impl Worker {
    /// Runs a job, or a slice of it: what is left of it comes back.
    fn run(&mut self, job: Job) -> Option<Job> {
        let idle = self.idle;
        self.sessions.retain(|_, s| s.used.elapsed() < idle);
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
            Job::Step { session, epoch, accepted, ids, draft, side, reply } => {
                let Some(entry) = self.sessions.get_mut(&session).filter(|s| s.epoch == epoch) else {
                    let _ = reply.send(Err(EngineError::SessionGone));
                    return None;
                };
                entry.used = Instant::now();
                let bb = &self.bb;
                let r = guarded(|| Ok(entry.drafter.step(bb, accepted, &ids, draft, side)?));
                if let Ok(block) = &r {
                    METRICS.backbone_tokens.inc_by((ids.len() + block.drafts.len()) as u64);
                }
                if r.is_err() {
                    self.sessions.remove(&session);
                }
                let _ = reply.send(r);
            }
            Job::Detach { session, epoch } => self.detach(session, epoch),
        }
        None
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
        let bb = &self.bb;
        let mut drafter = Drafter::new(bb, opening.form, opening.sampling, opening.stop, opening.last_only).map_err(EngineError::Refused)?;
        if let Some((cfg, shared)) = &opening.side {
            let plugin = Plugin::new(cfg, &bb.config, &bb.device).and_then(|p| p.load(shared)).map_err(EngineError::Refused)?;
            drafter = drafter.with_side(plugin).map_err(EngineError::Refused)?;
        }
        let (owner, fingerprint) = (opening.owner, opening.fingerprint);
        self.sessions.insert(session, Session { drafter, owner, fingerprint, used: Instant::now(), attached: true, epoch: 0 });
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
            if most.len() <= self.parked.per_device && total <= self.parked.total {
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
