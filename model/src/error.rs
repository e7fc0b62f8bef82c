use std::path::PathBuf;

/// Everything that can go wrong in the model core. Messages name the file, tensor or
/// setting at fault so that an operator can fix a checkpoint without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing file {path}: {hint}")]
    MissingFile { path: PathBuf, hint: &'static str },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture: {0}")]
    UnsupportedArchitecture(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("tensor '{name}': unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    WrongDtype { name: String, dtype: String },
    #[error("tensor '{name}': shape mismatch, expected {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("device: {0}")]
    Device(String),
    #[error("parameters: {0}")]
    Params(String),
    #[error("data: {0}")]
    Data(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
