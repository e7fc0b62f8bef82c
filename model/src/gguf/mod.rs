//! GGUF, llama.cpp's model file: the container ([`file`]), ggml's quantized types
//! ([`quant`]), the tokenizer it carries ([`vocab`]) and the import of a LLaMA-architecture
//! file into an HF checkpoint directory ([`import`]).
//!
//! The reader is our own (~250 lines): the crates.io GGUF parsers are thin and little used,
//! and none dequantizes; candle's reader lives inside candle-core, a second tensor library.
pub mod file;
pub mod import;
pub mod quant;
pub mod vocab;

pub use file::{GgufFile, TensorInfo, Value};
pub use import::{ImportReport, import_gguf};
pub use quant::GgmlType;
