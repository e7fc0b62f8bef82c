//! What the handlers send the backbone worker, and what comes back.
use spa_model::generate::Sampling;
use spa_model::side::head::ShippedTensor;
use spa_model::side::{ParamSet, SideConfig};
use spa_model::speculative::{Block, DraftForm};
use tokio::sync::oneshot;

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
    #[error("the KV pool holds {free} free bytes of {pool}; this session needs {need}: retry later, or open it with fewer max_positions")]
    PoolFull { need: usize, free: usize, pool: usize },
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

pub(super) enum Job {
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
    /// The most positions the session holds, reserved from the KV pool at the opening.
    pub max_positions: usize,
    /// The coordinator's side config and a global shared part, for side drafts.
    pub side: Option<(SideConfig, ParamSet)>,
}

/// A job and the device it is for (the unit of fairness).
pub(super) struct Queued {
    pub(super) owner: String,
    pub(super) job: Job,
}
