/// Errors of encoding, chunking and reassembly. Messages say what was expected and found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("unsupported dtype {0}")]
    Dtype(i32),
    #[error("{what}: {found} bytes is not a whole number of {elem}-byte elements")]
    Ragged { what: String, found: usize, elem: usize },
    #[error("{what}: size mismatch, expected {expected} bytes, found {found}")]
    SizeMismatch { what: String, expected: u64, found: u64 },
    #[error("{what}: chunk at offset {offset}, expected offset {expected}")]
    OutOfOrder { what: String, offset: u64, expected: u64 },
    #[error("{what}: {size} bytes exceeds the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("{what}: stream ended after {received} of {expected} bytes (truncated)")]
    Truncated { what: String, received: u64, expected: u64 },
    #[error("{what}: chunk changes dtype or shape mid-stream")]
    Inconsistent { what: String },
    #[error("{what}: contains NaN or infinite values")]
    NonFinite { what: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<ProtoError> for tonic::Status {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::TooLarge { .. } => tonic::Status::resource_exhausted(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}
