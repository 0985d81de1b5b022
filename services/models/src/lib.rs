//! Base models from outside the Hugging Face ecosystem. Today: GGUF files (llama.cpp's
//! format) read, dequantized and converted into the Hugging Face layout the trainer loads,
//! without libtorch, so the control plane's `loraforge models import` can do it.

mod convert;
pub mod gguf;
pub mod quant;
mod tokenizer;

pub use convert::{import_gguf, ImportSummary};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is damaged or not what it claims to be.
    #[error("malformed GGUF: {0}")]
    Format(String),
    /// A valid file using something we do not convert (an architecture, a quantization, a tokenizer).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The vocabulary does not make a consistent tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("writing {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}
