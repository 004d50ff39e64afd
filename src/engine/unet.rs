//! The SD-2.1 UNet: candle-transformers' `UNet2DConditionModel`, configured
//! from the folder's own `config.json` (so the tiny fixture and the real
//! SD-2.1-base both load), with weights from a LoRA-merging backend.
use std::path::Path;

use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModelConfig};

use super::error::{EngineError, Result};
use super::vae::{json_usize, json_usizes, read_json};

/// The UNet's architecture plus its input/output channel counts.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub model: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
}

impl UNetConfig {
    pub fn from_json(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let bad = |reason: String| EngineError::Config { path: path.to_path_buf(), reason };
        let channels = json_usizes(&v, "block_out_channels", path)?;
        let n = channels.len();
        let down_types: Vec<String> = v
            .get("down_block_types")
            .and_then(|x| x.as_array())
            .ok_or_else(|| bad("`down_block_types` missing".into()))?
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect();
        if down_types.len() != n {
            return Err(bad(format!("{} down blocks for {n} channel counts", down_types.len())));
        }
        // diffusers' `attention_head_dim` is, for SD 2.x, the number of heads.
        let heads: Vec<usize> = match v.get("attention_head_dim") {
            Some(serde_json::Value::Number(x)) => vec![x.as_u64().unwrap_or(8) as usize; n],
            Some(serde_json::Value::Array(_)) => json_usizes(&v, "attention_head_dim", path)?,
            _ => vec![8; n],
        };
        if heads.len() != n {
            return Err(bad(format!("{} attention head counts for {n} blocks", heads.len())));
        }
        let tlpb = v.get("transformer_layers_per_block").and_then(|x| x.as_u64()).unwrap_or(1) as usize;
        let blocks = (0..n)
            .map(|i| BlockConfig {
                out_channels: channels[i],
                use_cross_attn: down_types[i].starts_with("CrossAttn").then_some(tlpb),
                attention_head_dim: heads[i],
            })
            .collect();
        let f64_or = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let model = UNet2DConditionModelConfig {
            center_input_sample: v.get("center_input_sample").and_then(|x| x.as_bool()).unwrap_or(false),
            flip_sin_to_cos: v.get("flip_sin_to_cos").and_then(|x| x.as_bool()).unwrap_or(true),
            freq_shift: f64_or("freq_shift", 0.0),
            blocks,
            layers_per_block: json_usize(&v, "layers_per_block", Some(2), path)?,
            downsample_padding: json_usize(&v, "downsample_padding", Some(1), path)?,
            mid_block_scale_factor: f64_or("mid_block_scale_factor", 1.0),
            norm_num_groups: json_usize(&v, "norm_num_groups", Some(32), path)?,
            norm_eps: f64_or("norm_eps", 1e-5),
            cross_attention_dim: json_usize(&v, "cross_attention_dim", None, path)?,
            sliced_attention_size: None,
            use_linear_projection: v.get("use_linear_projection").and_then(|x| x.as_bool()).unwrap_or(false),
        };
        Ok(Self {
            model,
            in_channels: json_usize(&v, "in_channels", Some(4), path)?,
            out_channels: json_usize(&v, "out_channels", Some(4), path)?,
        })
    }

    /// SD-2.1-base (epsilon prediction, 512 px).
    pub fn sd21_base() -> Self {
        let b = |c, x: bool, h| BlockConfig { out_channels: c, use_cross_attn: x.then_some(1), attention_head_dim: h };
        Self {
            model: UNet2DConditionModelConfig {
                blocks: vec![b(320, true, 5), b(640, true, 10), b(1280, true, 20), b(1280, false, 20)],
                cross_attention_dim: 1024,
                use_linear_projection: true,
                ..Default::default()
            },
            in_channels: 4,
            out_channels: 4,
        }
    }
}
