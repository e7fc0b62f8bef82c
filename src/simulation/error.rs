//! What a simulation or an experiment's feature bank fails with.
use spa_aggregation::SecAggError;
use spa_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, SimError>;
