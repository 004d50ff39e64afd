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
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: bad config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("non-finite values in {stage} output (precision {precision}){}", non_finite_hint(.precision))]
    NonFinite { stage: &'static str, precision: String },
    #[error(
        "not enough memory: a {width}x{height} frame needs about {needed_mb} MB, {available_mb} MB are left to this \
         process (address-space limit, cgroup limit or free memory); use smaller frames, a smaller cave-tile, or give \
         the process more memory"
    )]
    NotEnoughMemory { width: usize, height: usize, needed_mb: u64, available_mb: u64 },
    #[error("cancelled")]
    Cancelled,
    #[error("device: {0}")]
    Device(String),
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Lower precisions can overflow where f32 does not: suggest f32 only when it
/// is not what already ran.
fn non_finite_hint(precision: &str) -> &'static str {
    if precision == "f32" {
        ": the weights or the input hold NaN or infinite values"
    } else {
        "; try precision=f32"
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// `s` cut to at most `max_chars` characters (on a character boundary), for
/// quoting names read from untrusted files in errors.
pub(crate) fn clip(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_suggests_f32_only_below_f32() {
        let f32_err = EngineError::NonFinite { stage: "UNet", precision: "f32".into() }.to_string();
        assert!(!f32_err.contains("try precision=f32") && f32_err.contains("NaN"), "{f32_err}");
        let f16_err = EngineError::NonFinite { stage: "UNet", precision: "f16".into() }.to_string();
        assert!(f16_err.contains("try precision=f32"), "{f16_err}");
    }
}
