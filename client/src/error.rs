/// Errors of the device client. Messages say what to do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("this home is not enrolled: run `spa-client enroll --coordinator URL --token T --home DIR` first")]
    NotEnrolled,
    #[error("this home is already enrolled as {0}; use another --home")]
    AlreadyEnrolled(String),
    #[error("local store: {0}")]
    Store(#[from] sled::Error),
    #[error("model: {0}")]
    Model(#[from] spa_model::ModelError),
    #[error("protocol: {0}")]
    Proto(#[from] spa_proto::ProtoError),
    #[error("coordinator: {} ({:?}{})", .0.message(), .0.code(), fields(.0))]
    Status(#[from] tonic::Status),
    #[error("connection: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The identity key cannot be had (sealed without its passphrase, or a wrong one): no
    /// retry helps.
    #[error("device key: {0}")]
    Key(String),
    /// The device has no usable personal model (never fitted, another backbone, a v1 store).
    #[error("{0}")]
    NoPersonalModel(String),
    /// Revoked or unknown to the coordinator: no retry helps.
    #[error("the coordinator refuses this device: {0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io { path: path.display().to_string(), source }
}

/// ", field X" for the request fields a refusal names.
fn fields(status: &tonic::Status) -> String {
    spa_proto::reason::invalid_fields(status).iter().map(|f| format!(", field {f}")).collect()
}
