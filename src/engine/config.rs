//! Reading diffusers' JSON config files (the VAE's, the UNet's, the
//! scheduler's) with bounded size, and the limits every model config must
//! satisfy before a model is built from it.
use std::path::Path;

use super::error::{EngineError, Result};

pub(crate) fn json_usize(v: &serde_json::Value, key: &str, default: Option<usize>, path: &Path) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| EngineError::Config {
            path: path.to_path_buf(),
            reason: format!("`{key}` is not an unsigned integer"),
        }),
        None => {
            default.ok_or_else(|| EngineError::Config { path: path.to_path_buf(), reason: format!("`{key}` missing") })
        }
    }
}

pub(crate) fn json_usizes(v: &serde_json::Value, key: &str, path: &Path) -> Result<Vec<usize>> {
    let bad =
        || EngineError::Config { path: path.to_path_buf(), reason: format!("`{key}` must be a list of integers") };
    v.get(key)
        .and_then(|x| x.as_array())
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(bad))
        .collect()
}

/// Largest config file read (diffusers' are about 1 KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Most resolution levels a UNet or VAE config may declare (SD has 4).
pub(crate) const MAX_LEVELS: usize = 8;

/// Most resnets (or transformer layers) per level a config may declare.
pub(crate) const MAX_LAYERS: usize = 16;

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::NotFound { path: path.to_path_buf() },
        _ => EngineError::Io { path: path.to_path_buf(), source },
    };
    let f = super::weights::open_regular(path)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_CONFIG_BYTES + 1), &mut text).map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_CONFIG_BYTES} bytes"),
        });
    }
    serde_json::from_str(&text).map_err(|e| EngineError::Config { path: path.to_path_buf(), reason: e.to_string() })
}

/// Most channels (or latent channels, or context width) a config may declare:
/// SD uses at most 1,280 and SDXL 2,048. Products of a few such sizes (a
/// weight's shape) then never overflow.
pub(crate) const MAX_CHANNELS: usize = 1 << 16;

/// `value` of `key` is a size from 1 to [`MAX_CHANNELS`].
pub(crate) fn check_size(path: &Path, key: &str, value: usize) -> Result<()> {
    if value == 0 || value > MAX_CHANNELS {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            reason: format!("`{key}` is {value}, expected 1 to {MAX_CHANNELS}"),
        });
    }
    Ok(())
}

/// Sizes every config must satisfy before a model is built from it (the
/// weights then check every tensor's shape): 1..=[`MAX_LEVELS`] levels of
/// channel counts (1..=[`MAX_CHANNELS`]) that `norm_num_groups` (nonzero)
/// divides, and 1..=[`MAX_LAYERS`] layers per block.
pub(crate) fn check_levels(path: &Path, channels: &[usize], groups: usize, layers_per_block: usize) -> Result<()> {
    let bad = |reason: String| Err(EngineError::Config { path: path.to_path_buf(), reason });
    if channels.is_empty() || channels.len() > MAX_LEVELS {
        return bad(format!("`block_out_channels` has {} entries, expected 1 to {MAX_LEVELS}", channels.len()));
    }
    if groups == 0 {
        return bad("`norm_num_groups` is 0".into());
    }
    for &c in channels {
        check_size(path, "block_out_channels", c)?;
    }
    if let Some(c) = channels.iter().find(|&&c| c % groups != 0) {
        return bad(format!("`block_out_channels` entry {c} is not a multiple of `norm_num_groups` {groups}"));
    }
    if layers_per_block == 0 || layers_per_block > MAX_LAYERS {
        return bad(format!("`layers_per_block` is {layers_per_block}, expected 1 to {MAX_LAYERS}"));
    }
    Ok(())
}
