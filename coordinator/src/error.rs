//! Errors of the coordinator library (start-up, configuration, init). The binary adds
//! context with anyhow; handlers map their own errors to gRPC statuses.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("model: {0}")]
    Model(#[from] spa_model::ModelError),
    #[error("rounds: {0}")]
    Rounds(#[from] crate::rounds::RoundError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("background task: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;

/// Maps an I/O error to one that names `path` (and says what was being done).
pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CoordinatorError + '_ {
    move |source| CoordinatorError::Io { path: path.display().to_string(), source }
}

/// `Err(Config(msg))` unless `ok`.
pub fn ensure(ok: bool, msg: &str) -> Result<()> {
    if ok { Ok(()) } else { Err(CoordinatorError::Config(msg.into())) }
}
