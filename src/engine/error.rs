//! Typed engine errors: every message names the file, the tensor key and the
//! expected vs found shape where those apply.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: wrong format: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: truncated: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: bad config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("non-finite values in {stage} output (precision {precision}); try precision=f32")]
    NonFinite { stage: &'static str, precision: String },
    #[error("cancelled")]
    Cancelled,
    #[error("device: {0}")]
    Device(String),
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;
